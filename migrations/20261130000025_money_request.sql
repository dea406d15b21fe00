-- A money request in one statement (issue 13, part 2).
--
-- Before: BEGIN with the timeout, claims and role; first sight; the
-- idempotency lock and lookup; SAVEPOINT; the effect; RELEASE; the record;
-- COMMIT — eight round trips, the last four inside the payer's wallet lock.
-- Now the function sends one statement in an implicit transaction:
--   select * from app.money_request($claims, $route, $key, $fingerprint, …)
-- and inside it, in this order (each a statement of its own, so each takes
-- a fresh READ COMMITTED snapshot, as the round trips did):
--
-- 1. the verified claims and the `authenticated` role, for this
--    transaction (as `app.read_me` does, migration 22), and first sight;
-- 2. `app.idempotency_begin` (migration 23): the in-flight lock, then the
--    stored record. Taken by a concurrent duplicate: outcome `in_flight`
--    (the route answers 409). A record: outcome `stored` with its
--    fingerprint, status and body (the route replays it, or answers 422 for
--    a different body — the comparison stays in Rust, in one place);
-- 3. the effect. Its response body is built here, with the fields of the
--    Rust type the route answers with (`Tip`, `Enrollment`;
--    `crates/routes/tests/tips.rs` compares them);
-- 4. the record (status and body) with the key, as `Idempotency::store`
--    writes it; outcome `applied`.
--
-- An error fails the statement and rolls all of it back (no SAVEPOINT is
-- needed: nothing before the effect must survive it). A deadlock is
-- retried by the route, as before. A refusal of the effect (insufficient
-- funds, class full, …: SQLSTATE class SP) reaches the route as the same
-- error the effect raised; the route maps it to its problem document (one
-- source: the Rust error types) and records that with the key in a second
-- statement, `app.money_request_refused`, which keeps a record already
-- there: between the two statements the key's lock is free, and a request
-- with the same key that recorded first (it may have succeeded) is the
-- answer for both.
--
-- Security invoker, executable only by the functions' login, for the same
-- reasons as the `app.read_*` functions (migration 22).

create function app.money_request(
  p_claims text, p_route text, p_key text, p_fingerprint text, p_ttl_hours integer,
  p_success smallint, p_effect text, p_args jsonb)
  returns table (outcome text, status_code smallint, response jsonb, fingerprint text)
  language plpgsql volatile set search_path = '' as $$
declare
  caller uuid;
  found_key record;
  body jsonb;
begin
  perform set_config('request.jwt.claims', p_claims, true);
  perform set_config('role', 'authenticated', true);
  perform app.ensure_current_user();
  caller := auth.uid();
  select * into found_key from app.idempotency_begin(caller, p_route, p_key);
  if not found_key.locked then
    return query select 'in_flight'::text, null::smallint, null::jsonb, null::text;
    return;
  end if;
  if found_key.fingerprint is not null then
    return query select 'stored'::text, found_key.status_code, found_key.response, found_key.fingerprint;
    return;
  end if;
  case p_effect
    when 'tip' then
      select jsonb_build_object('tip_id', p_args ->> 'tip_id', 'journal_id', t.journal_id,
                                'balance', t.balance)
        into body
        from app.tip((p_args ->> 'tip_id')::uuid, (p_args ->> 'recipient_id')::uuid,
                     (p_args ->> 'amount')::bigint, p_args ->> 'message') t;
    when 'enroll' then
      select jsonb_build_object('enrollment_id', e.enrollment_id, 'class_id', p_args ->> 'class_id',
                                'journal_id', e.journal_id, 'price_tokens', e.price_tokens,
                                'balance', e.balance)
        into body
        from app.enroll((p_args ->> 'class_id')::uuid, (p_args ->> 'enrollment_id')::uuid) e;
    else
      raise exception 'unknown money request effect %', p_effect using errcode = 'SP000';
  end case;
  insert into app.idempotency_keys as k
      (user_id, route, key, fingerprint, status_code, response, expires_at)
    values (caller, p_route, p_key, p_fingerprint, p_success, body,
            app.now() + make_interval(hours => p_ttl_hours))
    on conflict (user_id, route, key) do update set
      fingerprint = excluded.fingerprint, status_code = excluded.status_code,
      response = excluded.response, created_at = app.now(), expires_at = excluded.expires_at;
  return query select 'applied'::text, p_success, body, p_fingerprint;
end
$$;
revoke all on function app.money_request(text, text, text, text, integer, smallint, text, jsonb) from public;
grant execute on function app.money_request(text, text, text, text, integer, smallint, text, jsonb) to stagepass_app;

-- A refused money request's answer, recorded with its key unless a record is
-- there already (see above). Returns the record that stands: this one
-- (`recorded`), or the one found.
create function app.money_request_refused(
  p_claims text, p_route text, p_key text, p_fingerprint text, p_ttl_hours integer,
  p_status smallint, p_response jsonb)
  returns table (recorded boolean, fingerprint text, status_code smallint, response jsonb)
  language plpgsql volatile set search_path = '' as $$
declare
  caller uuid;
begin
  perform set_config('request.jwt.claims', p_claims, true);
  perform set_config('role', 'authenticated', true);
  caller := auth.uid();
  -- An expired record is replaced, as `Idempotency::store` does; a live one
  -- stands.
  insert into app.idempotency_keys as k
      (user_id, route, key, fingerprint, status_code, response, expires_at)
    values (caller, p_route, p_key, p_fingerprint, p_status, p_response,
            app.now() + make_interval(hours => p_ttl_hours))
    on conflict (user_id, route, key) do update set
      fingerprint = excluded.fingerprint, status_code = excluded.status_code,
      response = excluded.response, created_at = app.now(), expires_at = excluded.expires_at
      where k.expires_at <= app.now();
  if found then
    return query select true, p_fingerprint, p_status, p_response;
    return;
  end if;
  -- A statement of its own: it sees the record the conflict found.
  return query
  select false, k.fingerprint, k.status_code, k.response
    from app.idempotency_keys k
   where k.user_id = caller and k.route = p_route and k.key = p_key;
end
$$;
revoke all on function app.money_request_refused(text, text, text, text, integer, smallint, jsonb) from public;
grant execute on function app.money_request_refused(text, text, text, text, integer, smallint, jsonb) to stagepass_app;
