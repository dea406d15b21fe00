-- Users: one identity. `users.id` is Supabase's `auth.users.id` (the token's
-- `sub`). Public profile fields live in `app.users`; private facts (e-mail)
-- in `app.user_private`, readable only by their owner.

create table app.users (
  id           uuid primary key,
  role         text not null default 'fan'
               constraint users_role_check check (role in ('fan', 'creator', 'admin')),
  -- Lower-case handle, 3–30 of [a-z0-9_]; unique.
  handle       text
               constraint users_handle_format check (handle ~ '^[a-z0-9_]{3,30}$'),
  display_name text
               constraint users_display_name_length check (char_length(display_name) between 1 and 60),
  created_at   timestamptz not null default now(),
  updated_at   timestamptz not null default now(),
  constraint users_handle_key unique (handle)
);

create table app.user_private (
  user_id        uuid primary key references app.users (id) on delete cascade,
  -- Only ever copied from a verified token's `email` claim, never from a body.
  email          text,
  email_verified boolean not null default false,
  created_at     timestamptz not null default now(),
  updated_at     timestamptz not null default now()
);

-- Append-only audit of every role change: who, when, old and new.
create table app.role_changes (
  id          bigint generated always as identity primary key,
  user_id     uuid not null references app.users (id),
  old_role    text not null,
  new_role    text not null,
  -- The admin who made the change; null when an operator used the CLI.
  changed_by  uuid references app.users (id),
  -- `user:<uuid>` or `operator:<name>`: always says who.
  actor       text not null,
  reason      text,
  changed_at  timestamptz not null default now()
);

create function app.touch_updated_at() returns trigger
  language plpgsql as $$
begin
  new.updated_at := now();
  return new;
end
$$;

create trigger users_touch before update on app.users
  for each row execute function app.touch_updated_at();
create trigger user_private_touch before update on app.user_private
  for each row execute function app.touch_updated_at();

-- The audit table refuses edits and deletes from anyone, owner included.
create function app.refuse_change() returns trigger
  language plpgsql as $$
begin
  raise exception '% is append-only', tg_table_name using errcode = '42501';
end
$$;

create trigger role_changes_append_only before update or delete on app.role_changes
  for each row execute function app.refuse_change();
create trigger role_changes_no_truncate before truncate on app.role_changes
  for each statement execute function app.refuse_change();

-- Grants. Column grants are the contract: a user may read public profile
-- columns of anyone and update only their own handle and display name.
-- `role` is not updatable by `authenticated` at all, so no policy bug and no
-- hand-written SQL can promote a user.
grant select (id, role, handle, display_name, created_at) on app.users to authenticated;
grant update (handle, display_name) on app.users to authenticated;
grant select on app.user_private to authenticated;
grant select on app.users, app.user_private to stagepass_service;

alter table app.users enable row level security;
alter table app.users force row level security;
alter table app.user_private enable row level security;
alter table app.user_private force row level security;
alter table app.role_changes enable row level security;
alter table app.role_changes force row level security;

create policy users_read on app.users for select to authenticated using (true);
create policy users_update_own on app.users for update to authenticated
  using (id = auth.uid()) with check (id = auth.uid());
create policy users_service_read on app.users for select to stagepass_service using (true);

create policy user_private_read_own on app.user_private for select to authenticated
  using (user_id = auth.uid());
create policy user_private_service_read on app.user_private for select to stagepass_service
  using (true);

-- First sight: creates the caller's user row from the verified claims only
-- (`sub`, `email`, `email_verified`), as a fan. Returns the row. Definer
-- rights because `authenticated` cannot insert users; it can only make
-- *itself* exist, with the role fixed to `fan`.
create function app.ensure_current_user()
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
revoke all on function app.ensure_current_user() from public;
grant execute on function app.ensure_current_user() to authenticated;

-- The one place a role changes, shared by the admin route and the operator
-- CLI. Locks the target row, refuses to remove the last admin, records the
-- change. Returns the previous role (equal to the new one: nothing changed,
-- nothing recorded).
create function app.apply_role_change(
  target uuid, new_role text, by_user uuid, actor text, reason text
) returns text
  language plpgsql security definer set search_path = '' as $$
declare
  previous text;
begin
  if new_role not in ('fan', 'creator', 'admin') then
    raise exception 'invalid role' using errcode = '22023';
  end if;
  select u.role into previous from app.users u where u.id = target for update;
  if not found then
    raise exception 'user not found' using errcode = 'P0002';
  end if;
  if previous = new_role then
    return previous;
  end if;
  if previous = 'admin' then
    perform 1 from app.users u where u.role = 'admin' and u.id <> target limit 1;
    if not found then
      raise exception 'cannot remove the last admin' using errcode = 'P0001', hint = 'last_admin';
    end if;
  end if;
  update app.users set role = new_role where id = target;
  insert into app.role_changes (user_id, old_role, new_role, changed_by, actor, reason)
    values (target, previous, new_role, by_user, actor, reason);
  return previous;
end
$$;
revoke all on function app.apply_role_change(uuid, text, uuid, text, text) from public;

-- The admin route: the caller must be an admin *in the database* (a token's
-- claims are never trusted for this).
create function app.admin_set_role(target uuid, new_role text, reason text)
  returns text
  language plpgsql security definer set search_path = '' as $$
declare
  caller uuid := auth.uid();
begin
  perform 1 from app.users u where u.id = caller and u.role = 'admin';
  if not found then
    raise exception 'admin role required' using errcode = '42501';
  end if;
  return app.apply_role_change(target, new_role, caller, 'user:' || caller::text, reason);
end
$$;
revoke all on function app.admin_set_role(uuid, text, text) from public;
grant execute on function app.admin_set_role(uuid, text, text) to authenticated;

-- The operator CLI (bootstrapping the first admin). Creates the user row
-- when the person has not signed in yet. Only the service role may call it.
create function app.operator_set_role(target uuid, new_role text, operator text, reason text)
  returns text
  language plpgsql security definer set search_path = '' as $$
begin
  insert into app.users (id) values (target) on conflict do nothing;
  return app.apply_role_change(target, new_role, null, 'operator:' || operator, reason);
end
$$;
revoke all on function app.operator_set_role(uuid, text, text, text) from public;
grant execute on function app.operator_set_role(uuid, text, text, text) to stagepass_service;
