-- The 24-hour spending window in constant time (issue 14, the soak).
--
-- `ledger.spent_last_24h(wallet)` summed every spending debit of the wallet
-- in the last 24 hours: its cost grew with what the fan had spent that day
-- (0.6 → 2.4 ms a call over a 3-minute soak, called by every tip, enrolment
-- and balance read), and the soak's throughput fell with it.
--
-- Now each spending debit also adds itself to an hourly total,
-- `ledger.spend_hours (account, hour)`, in the same transaction (a trigger on
-- `ledger.entries`, so no path that posts a debit can miss it). The window
-- (now − 24 h, …] is read as
--   * the whole hours after the one the window starts in (≤ 25 rows), plus
--   * the debits of that first, partial hour itself (entries, by index),
-- which is exactly the old sum: every debit is counted once, either in its
-- hour's total (its hour lies wholly inside the window) or individually (it
-- lies in the partial hour). The totals are derived data: the ledger audit
-- and the tests compare them with the entries.
--
-- Contention: a debit's hour row is the payer's own, and the payer's wallet
-- row is already locked (`ledger.lock_for_spend`) by the transaction that
-- posts the debit, so the total adds no wait of its own.

create table ledger.spend_hours (
  account_id uuid not null references ledger.accounts (id),
  hour       timestamptz not null,
  spent      bigint not null check (spent > 0),
  primary key (account_id, hour)
);
comment on table ledger.spend_hours is
  'Spending debits (tips, classes, calls) per account and hour: derived from ledger.entries for the 24-hour window (migration 19).';

-- The kinds of journal that count as spending (as ledger.spent_last_24h
-- always counted them).
create function ledger.is_spending(p_kind text) returns boolean
  language sql immutable parallel safe set search_path = '' as $$
  select p_kind in ('tip', 'class_enrollment', 'call_minute')
$$;

create function ledger.count_spending() returns trigger
  language plpgsql security definer set search_path = '' as $$
begin
  if new.amount < 0
     and ledger.is_spending((select j.kind from ledger.journals j where j.id = new.journal_id)) then
    insert into ledger.spend_hours as h (account_id, hour, spent)
      values (new.account_id, date_trunc('hour', new.created_at), -new.amount)
      on conflict (account_id, hour) do update set spent = h.spent + excluded.spent;
  end if;
  return null;
end
$$;
revoke all on function ledger.count_spending() from public;

create trigger entries_count_spending after insert on ledger.entries
  for each row when (new.amount < 0) execute function ledger.count_spending();

-- What is already there (only the last 25 hours can ever be read).
insert into ledger.spend_hours (account_id, hour, spent)
select e.account_id, date_trunc('hour', e.created_at), -sum(e.amount)
  from ledger.entries e join ledger.journals j on j.id = e.journal_id
 where e.amount < 0 and ledger.is_spending(j.kind)
   and e.created_at > app.now() - interval '25 hours'
 group by 1, 2;

create or replace function ledger.spent_last_24h(p_wallet uuid) returns bigint
  language sql stable security definer set search_path = '' as $$
  with w as (select app.now() - interval '24 hours' as since,
                    date_trunc('hour', app.now() - interval '24 hours') as first_hour)
  select (coalesce((select sum(h.spent) from ledger.spend_hours h, w
                     where h.account_id = p_wallet and h.hour > w.first_hour), 0)
        + coalesce((select -sum(e.amount)
                      from ledger.entries e join ledger.journals j on j.id = e.journal_id, w
                     where e.account_id = p_wallet and e.amount < 0
                       and e.created_at > w.since
                       and e.created_at < w.first_hour + interval '1 hour'
                       and ledger.is_spending(j.kind)), 0))::bigint
$$;

-- Hours older than the window are never read again; the cleanup cron drops
-- them (as the service role, through this function only).
create function ledger.prune_spend_hours() returns bigint
  language sql security definer set search_path = '' as $$
  with gone as (
    delete from ledger.spend_hours where hour < app.now() - interval '48 hours' returning 1
  )
  select count(*) from gone
$$;
revoke all on function ledger.prune_spend_hours() from public;
grant execute on function ledger.prune_spend_hours() to stagepass_service;
grant select on ledger.spend_hours to stagepass_service;
