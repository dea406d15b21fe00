-- Authenticated reads in one statement (issue 13, first slice: `GET /api/v1/me`
-- and `GET /api/v1/tokens/balance`).
--
-- Before: BEGIN (with the statement timeout), the claims and role, first
-- sight, the read, COMMIT: five round trips for a warm read. Now the
-- function sends one statement in an implicit transaction:
--   select * from app.read_me($claims)
-- Inside it, the verified claims and the `authenticated` role are set for
-- the rest of that transaction (exactly what `db::begin_user` does), first
-- sight runs, then the read: each statement of the function is planned and
-- run as `authenticated`, so row-level security applies as before.
--
-- Security invoker on purpose: `set_config('role', …)` is refused inside a
-- security definer function, and the caller must be the functions' login
-- (`stagepass_app`, member of `authenticated`), which already sets claims it
-- verified itself. Nobody else may execute these: `authenticated` could
-- otherwise pass claims of its choosing.
--
-- The statement timeout of such a statement cannot come from a BEGIN; it is
-- the login role's default instead (a session setting, applied when a
-- connection logs in — through a transaction pooler too), the same 5 s.

alter role stagepass_app set statement_timeout = '5s';

create function app.read_me(p_claims text)
  returns table (id uuid, role text, handle text, display_name text, email text,
                 email_verified boolean, created_at timestamptz)
  language plpgsql volatile set search_path = '' as $$
begin
  perform set_config('request.jwt.claims', p_claims, true);
  perform set_config('role', 'authenticated', true);
  perform app.ensure_current_user();
  -- A statement of its own: it sees what first sight wrote.
  return query
  select u.id, u.role, u.handle, u.display_name, p.email, coalesce(p.email_verified, false), u.created_at
    from app.users u left join app.user_private p on p.user_id = u.id
   where u.id = auth.uid();
end
$$;
revoke all on function app.read_me(text) from public;
grant execute on function app.read_me(text) to stagepass_app;

create function app.read_balance(p_claims text)
  returns table (balance bigint, debt bigint, spent_today bigint, daily_limit bigint, trust_level text)
  language plpgsql volatile set search_path = '' as $$
begin
  perform set_config('request.jwt.claims', p_claims, true);
  perform set_config('role', 'authenticated', true);
  perform app.ensure_current_user();
  return query select * from app.my_balance();
end
$$;
revoke all on function app.read_balance(text) from public;
grant execute on function app.read_balance(text) to stagepass_app;

-- The other authenticated reads, the same way: a ledger page, the upcoming
-- classes, one class, the caller's schedule. Each body is the read the route
-- ran inside `db::begin_user` before, unchanged.

create function app.read_entries(p_claims text, p_before bigint, p_limit integer)
  returns table (id bigint, journal_id uuid, kind text, reference text, account text, amount bigint,
                 metadata jsonb, created_at timestamptz)
  language plpgsql volatile set search_path = '' as $$
begin
  perform set_config('request.jwt.claims', p_claims, true);
  perform set_config('role', 'authenticated', true);
  return query select * from app.my_entries(p_before, p_limit);
end
$$;
revoke all on function app.read_entries(text, bigint, integer) from public;
grant execute on function app.read_entries(text, bigint, integer) to stagepass_app;

create function app.read_upcoming_classes(p_claims text, p_creator uuid, p_after_starts_at timestamptz,
                                          p_after_id uuid, p_limit bigint)
  returns setof app.class_view
  language plpgsql volatile set search_path = '' as $$
begin
  perform set_config('request.jwt.claims', p_claims, true);
  perform set_config('role', 'authenticated', true);
  return query
  select * from app.class_view c
   where c.status = 'scheduled' and c.starts_at > app.now()
     and (p_creator is null or c.creator_id = p_creator)
     and (p_after_starts_at is null or (c.starts_at, c.id) > (p_after_starts_at, p_after_id))
   order by c.starts_at, c.id limit p_limit;
end
$$;
revoke all on function app.read_upcoming_classes(text, uuid, timestamptz, uuid, bigint) from public;
grant execute on function app.read_upcoming_classes(text, uuid, timestamptz, uuid, bigint) to stagepass_app;

create function app.read_class(p_claims text, p_id uuid)
  returns setof app.class_view
  language plpgsql volatile set search_path = '' as $$
begin
  perform set_config('request.jwt.claims', p_claims, true);
  perform set_config('role', 'authenticated', true);
  return query select * from app.class_view c where c.id = p_id;
end
$$;
revoke all on function app.read_class(text, uuid) from public;
grant execute on function app.read_class(text, uuid) to stagepass_app;

create function app.read_schedule(p_claims text, p_from timestamptz, p_to timestamptz, p_limit bigint)
  returns table (id uuid, source_kind text, source_id uuid, role text, title text,
                 starts_at timestamptz, ends_at timestamptz, status text, sequence integer,
                 updated_at timestamptz)
  language plpgsql volatile set search_path = '' as $$
begin
  perform set_config('request.jwt.claims', p_claims, true);
  perform set_config('role', 'authenticated', true);
  -- RLS limits the rows to the caller's; the filter says so too, so the
  -- index on (user_id, starts_at) serves it.
  return query
  select e.id, e.source_kind, e.source_id, e.role, e.title, e.starts_at, e.ends_at, e.status,
         e.sequence, e.updated_at
    from app.calendar_events e
   where e.user_id = auth.uid() and e.starts_at < p_to and e.ends_at > p_from
   order by e.starts_at, e.id limit p_limit;
end
$$;
revoke all on function app.read_schedule(text, timestamptz, timestamptz, bigint) from public;
grant execute on function app.read_schedule(text, timestamptz, timestamptz, bigint) to stagepass_app;
