-- A money request's idempotency check in one statement (issue 13, part 2,
-- first step): the in-flight lock and the lookup of a stored response were
-- two round trips (platform/src/idempotency.rs).
--
-- The lookup must see a record committed by a concurrent request with the
-- same key that finished just before the lock was taken. In one SQL
-- statement its snapshot would predate the lock, so a request could miss
-- that record and run the effect a second time. Here it is a statement of
-- its own inside a volatile PL/pgSQL function, which (READ COMMITTED) takes
-- a new snapshot after the lock is held: the same order as the two
-- statements it replaces.
--
-- Security invoker: it reads as the caller (RLS: a user's own records; the
-- service role's purchases path). The lock key is the one the Rust code
-- used (the user id as text, lowercase and hyphenated in both), so old and
-- new instances running side by side during a deploy exclude each other.

create function app.idempotency_begin(p_user uuid, p_route text, p_key text)
  returns table (locked boolean, fingerprint text, status_code smallint, response jsonb)
  language plpgsql volatile set search_path = '' as $$
begin
  if not pg_catalog.pg_try_advisory_xact_lock(
           pg_catalog.hashtextextended(p_user::text || '|' || p_route || '|' || p_key, 7402)) then
    return query select false, null::text, null::smallint, null::jsonb;
    return;
  end if;
  return query
  select true, k.fingerprint, k.status_code, k.response
    from app.idempotency_keys k
   where k.user_id = p_user and k.route = p_route and k.key = p_key and k.expires_at > app.now();
  if not found then
    return query select true, null::text, null::smallint, null::jsonb;
  end if;
end
$$;
revoke all on function app.idempotency_begin(uuid, text, text) from public;
grant execute on function app.idempotency_begin(uuid, text, text) to authenticated, stagepass_service;
