-- First sight in one index lookup when nothing is new (issue 13).
--
-- `app.ensure_current_user()` runs at the start of every authenticated
-- request (reads, money requests, `db::begin_seen`). For a user already
-- known, with the token's e-mail and verification already recorded — every
-- request but a user's first and the one after an e-mail change — it did
-- three statements: the `insert … on conflict do nothing` probe of
-- `app.users`, the check of `app.user_private`, then the select of the row
-- it returns. It now answers that case with one statement: the user's row
-- joined to its private row where both match the token. Anything else (no
-- row yet, no private row, a new e-mail or verification) falls through to
-- the same three statements as before, unchanged, so first sight, the
-- lock-free re-check and the write-only-when-new rule are exactly as they
-- were (migration 2).
--
-- Same signature, result, volatility, rights and settings (CREATE OR
-- REPLACE keeps the grants).

create or replace function app.ensure_current_user()
  returns table (id uuid, role text, handle text, display_name text, created_at timestamptz)
  language plpgsql security definer set search_path = '' as $$
declare
  claims jsonb := auth.jwt();
  uid uuid := auth.uid();
  claim_email text := nullif(claims ->> 'email', '');
  claim_verified boolean := coalesce(
    (claims -> 'user_metadata' ->> 'email_verified')::boolean,
    (claims ->> 'email_verified')::boolean,
    false);
begin
  if uid is null then
    raise exception 'no authenticated user' using errcode = '28000';
  end if;
  -- Known, and the token says nothing new: one lookup.
  return query select u.id, u.role, u.handle, u.display_name, u.created_at
    from app.users u join app.user_private p on p.user_id = u.id
   where u.id = uid and p.email is not distinct from claim_email
     and p.email_verified = claim_verified;
  if found then
    return;
  end if;
  insert into app.users (id) values (uid) on conflict do nothing;
  -- Write (and so lock the row) only when the token says something new:
  -- an upsert locks the conflicting row even when its WHERE is false, which
  -- would make every request of a user wait for their in-flight ones.
  perform 1 from app.user_private p
   where p.user_id = uid and p.email is not distinct from claim_email
     and p.email_verified = claim_verified;
  if not found then
    insert into app.user_private as p (user_id, email, email_verified)
      values (uid, claim_email, claim_verified)
      on conflict (user_id) do update
        set email = excluded.email, email_verified = excluded.email_verified
        where p.email is distinct from excluded.email
           or p.email_verified is distinct from excluded.email_verified;
  end if;
  return query select u.id, u.role, u.handle, u.display_name, u.created_at
    from app.users u where u.id = uid;
end
$$;
