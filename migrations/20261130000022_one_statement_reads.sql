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
