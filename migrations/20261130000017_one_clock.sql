-- One clock (issue 10, ADR 0014).
--
-- Every rule that needs the time asks `app.now()`; it is the only function
-- of schemas `app` and `ledger` that reads the wall clock. In a migrated
-- (production) database it is `pg_catalog.now()`, the transaction's start,
-- and nothing a session sets can move it: there is no setting it reads.
-- Test databases get another body from the test harness, installed by the
-- superuser (crates/platform/src/testing.rs, `TestDb`), which adds the test
-- clock's offset; roles a request runs as cannot create or replace
-- functions in `app`, so that body cannot appear in production through a
-- request.
--
-- Inlinable (`language sql`, one expression, no `set` clause): the planner
-- folds it exactly as it folds `now()`, in index conditions too.
create function app.now() returns timestamptz
  language sql stable parallel safe as $$ select pg_catalog.now() $$;
comment on function app.now() is
  'The one clock of the rules (ADR 0014): the transaction''s start in production.';
grant execute on function app.now() to public;

-- Every function of `app` and `ledger` that read the wall clock now asks
-- app.now() instead. Each is redefined from its LATEST definition (whatever
-- migrations 02–16 left in the catalog: `pg_get_functiondef`), with only the
-- clock calls replaced, so the bodies stay otherwise identical by
-- construction; owners, grants, `security definer` and `search_path`
-- settings are kept by `create or replace`. At the time of writing that is:
--   app.begin_purchase (clock_timestamp(): the claim lease; now the
--     transaction's start, which differs by at most the 5 s statement
--     timeout against a 60 s lease), app.calendar_feed_events,
--   app.check_time_zone, app.claim_outbox, app.create_class, app.enroll,
--   app.record_outbox, app.rotate_calendar_feed, app.schedule_class_reminder,
--   app.settle_class, app.settle_ended_classes, app.stale_pending_purchases,
--   app.touch_updated_at, app.trust_level, app.update_class, app.withdraw,
--   ledger.spent_last_24h.
-- Column defaults that read the clock ask app.now() too (rules read
-- users.created_at for trust age, outbox.next_attempt_at for scheduling,
-- idempotency_keys.created_at, purchases.created_at for stale purchases,
-- ledger entries' created_at for the 24 h window, …): `set default` changes
-- the catalog only, no table is rewritten.
do $$
declare
  clock_call constant text :=
    '(^|[^[:alnum:]_.$])(pg_catalog\.)?(now|clock_timestamp|statement_timestamp|transaction_timestamp)[[:space:]]*\([[:space:]]*\)';
  clock_word constant text :=
    '(^|[^[:alnum:]_.$])(pg_catalog\.)?current_timestamp([^[:alnum:]_(]|$)';
  f record;
  d record;
begin
  for f in
    select p.oid from pg_proc p join pg_namespace n on n.oid = p.pronamespace
     where n.nspname in ('app', 'ledger') and p.prokind in ('f', 'p')
       and p.oid <> 'app.now()'::regprocedure
       and (p.prosrc ~* clock_call or p.prosrc ~* clock_word)
     order by p.oid
  loop
    execute regexp_replace(regexp_replace(pg_get_functiondef(f.oid), clock_call, '\1app.now()', 'gi'),
                           clock_word, '\1app.now()\3', 'gi');
  end loop;

  for d in
    select n.nspname, c.relname, a.attname
      from pg_attrdef ad
      join pg_class c on c.oid = ad.adrelid
      join pg_namespace n on n.oid = c.relnamespace
      join pg_attribute a on a.attrelid = ad.adrelid and a.attnum = ad.adnum
     where n.nspname in ('app', 'ledger')
       and (pg_get_expr(ad.adbin, ad.adrelid) ~* clock_call
            or pg_get_expr(ad.adbin, ad.adrelid) ~* clock_word)
     order by 1, 2, 3
  loop
    execute format('alter table %I.%I alter column %I set default app.now()',
                   d.nspname, d.relname, d.attname);
  end loop;
end
$$;

-- The invariant, checked here so that this migration fails rather than
-- leave a second clock behind (a test checks it again after every later
-- migration: crates/platform/tests/clock.rs).
do $$
declare
  clock constant text :=
    '\mnow[[:space:]]*\(|\m(clock_timestamp|current_timestamp|statement_timestamp|transaction_timestamp'
    '|localtimestamp|localtime|current_date|current_time|timeofday)\M|''(now|today|tomorrow|yesterday)''';
  offenders text;
begin
  select string_agg(what, ', ') into offenders from (
    select p.oid::regprocedure::text as what
      from pg_proc p join pg_namespace n on n.oid = p.pronamespace
     where n.nspname in ('app', 'ledger') and p.prokind in ('f', 'p')
       and p.oid <> 'app.now()'::regprocedure
       and regexp_replace(pg_get_functiondef(p.oid), 'app\.now\(\)', '', 'g') ~* clock
    union all
    select format('default of %s.%s', c.oid::regclass, a.attname)
      from pg_attrdef ad
      join pg_class c on c.oid = ad.adrelid
      join pg_namespace n on n.oid = c.relnamespace
      join pg_attribute a on a.attrelid = ad.adrelid and a.attnum = ad.adnum
     where n.nspname in ('app', 'ledger')
       and regexp_replace(pg_get_expr(ad.adbin, ad.adrelid), 'app\.now\(\)', '', 'g') ~* clock
  ) o;
  if offenders is not null then
    raise exception 'still reading the wall clock: %', offenders;
  end if;
end
$$;
