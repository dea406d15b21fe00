-- Queries whose cost grew with the data (issue 14, the 5-minute soak:
-- p99 167 → 1,367 ms as tables grew; docs/RELIABILITY.md, "Soak"). Each
-- statement below now reads a number of rows bounded by what it returns
-- (or by the caller's own recent activity), not by the size of a table.
--
-- Redefines app.claim_outbox (from 20261127000007) and app.my_entries (from
-- 20261127000004); same signatures, results and privileges.

-- 1. The outbox claim. `order by id limit n` over `delivered_at is null`
-- walked the primary key through every delivered row (and, in development
-- without QStash, every reminder job waiting for its `not_before`):
-- 7,460 buffers for 0 rows after a 5-minute soak. Due rows are now found
-- through partial indexes of undelivered rows only, and waiting jobs by
-- their `not_before`.
create index outbox_undelivered_id on app.outbox (id) where delivered_at is null;
create index outbox_ready_id on app.outbox (id)
  where delivered_at is null and (kind = 'realtime' or not_before is null);
create index outbox_deferred_jobs on app.outbox (not_before, id)
  where delivered_at is null and kind = 'job' and not_before is not null;

create or replace function app.claim_outbox(p_limit integer, p_inline boolean) returns setof app.outbox
  language plpgsql security definer set search_path = '' as $$
declare
  lim integer := least(greatest(p_limit, 1), 500);
begin
  if not p_inline then
    -- QStash holds a job until its `not_before`: every undelivered row is
    -- due from its `next_attempt_at`.
    return query
    update app.outbox o set claimed_until = now() + interval '60 seconds', attempts = o.attempts + 1
     where o.id in (
       select id from app.outbox
        where delivered_at is null and next_attempt_at <= now()
          and (claimed_until is null or claimed_until < now())
        order by id limit lim
        for update skip locked)
    returning o.*;
    return;
  end if;
  -- Inline jobs run from their `not_before`: the rows due without one, and
  -- the jobs whose time has come, oldest first.
  return query
  update app.outbox o set claimed_until = now() + interval '60 seconds', attempts = o.attempts + 1
   where o.id in (
     select x.id from app.outbox x
      -- The candidates (at most 2 × lim ids) first, then their rows by key.
      where x.id = any (array(
          (select id from app.outbox
            where delivered_at is null and (kind = 'realtime' or not_before is null)
              and next_attempt_at <= now() and (claimed_until is null or claimed_until < now())
            order by id limit lim)
          union all
          (select id from app.outbox
            where delivered_at is null and kind = 'job' and not_before is not null
              and not_before <= now() and next_attempt_at <= now()
              and (claimed_until is null or claimed_until < now())
            order by id limit lim)))
        and x.delivered_at is null and x.next_attempt_at <= now()
        and (x.claimed_until is null or x.claimed_until < now())
      order by x.id limit lim
      for update skip locked)
  returning o.*;
end
$$;
revoke all on function app.claim_outbox(integer, boolean) from public;
grant execute on function app.claim_outbox(integer, boolean) to stagepass_app, stagepass_service;

-- 2. The fan's ledger page read every entry of the caller's wallet and
-- debt account (and each one's journal) to sort them and keep 50. Now the
-- newest `limit` of each account by id, merged, then their journals: the
-- rows read are bounded by the page. `id < coalesce(p_before, max)` is the
-- index bound (an `is null or` test is not).
create index entries_account_id on ledger.entries (account_id, id);

create or replace function app.my_entries(p_before bigint, p_limit integer)
  returns table (id bigint, journal_id uuid, kind text, reference text, account text, amount bigint,
                 metadata jsonb, created_at timestamptz)
  language sql stable security definer set search_path = '' as $$
  select e.id, j.id, j.kind, j.reference, e.account, e.amount, j.metadata, e.created_at
  from (
    select x.id, x.journal_id, a.kind as account, x.amount, x.created_at
    from ledger.accounts a
    cross join lateral (
      select y.id, y.journal_id, y.amount, y.created_at
        from ledger.entries y
       where y.account_id = a.id and y.id < coalesce(p_before, 9223372036854775807)
       order by y.id desc
       limit least(greatest(p_limit, 1), 100)) x
    where a.owner_id = auth.uid() and a.kind in ('wallet', 'debt') and a.reference is null
    order by x.id desc
    limit least(greatest(p_limit, 1), 100)) e
  join ledger.journals j on j.id = e.journal_id
  order by e.id desc
$$;
revoke all on function app.my_entries(bigint, integer) from public;
grant execute on function app.my_entries(bigint, integer) to authenticated;

-- 3. What a user spent in the last 24 hours (every spend, every balance
-- read) fetched every entry of the wallet in 24 hours and dropped the
-- credits: a creator receiving tips read all of them (1,848 buffers for 0
-- rows). The debits of an account now have their own index, carrying what
-- the sum needs; the journal is read for debits only. (ledger.spent_last_24h
-- itself is unchanged: the planner picks this index for it.)
create index entries_debits on ledger.entries (account_id, created_at)
  include (amount, journal_id) where amount < 0;

-- 4. The realtime token lists the caller's live classes (as host or as an
-- enrolled fan); it walked every upcoming class. Enrolled seats by user:
create index enrollments_user_enrolled on app.enrollments (user_id, class_id)
  where status = 'enrolled';
