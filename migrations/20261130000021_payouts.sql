-- Creator payouts through Stripe Connect Express (issue 12, ADR 0019,
-- docs/PAYOUTS.md; SPEC §3 "Payouts", reference/calls-payouts.md §3).
--
-- What is paid: a creator's *earnings* (tokens credited to their wallet by
-- tips, class settlements and call minutes) that were earned before the
-- cycle's period end and not paid yet, capped by what their wallet holds
-- net of debt (earnings already spent are not paid twice, bought or granted
-- tokens are never paid). 1 token = 5 US cents, in integer cents.
--
-- Cycles are the 1st and the 15th (UTC). A cycle's period is
-- [previous cycle day 00:00, cycle day 00:00): the 15th pays the 1st–14th,
-- the 1st pays the 15th–end of the previous month. The run at 02:00 on a
-- cycle day cannot include a day that has not ended (docs/PAYOUTS.md says
-- why SPEC's "1st–15th" is read this way). An opt-in ("release my
-- earnings") made before 06:00 UTC on a cycle day counts for that cycle,
-- later ones for the next.
--
-- Money: freezing a payout moves its tokens from the creator's wallet to
-- payout clearing ('payout_hold'); the transfer job creates the Stripe
-- Transfer and, in the same transaction as recording its id, retires the
-- tokens ('payout_sent': payout clearing → Stripe clearing). A refusal by
-- Stripe gives the tokens back ('payout_release') until a retry holds them
-- again; a reversal re-credits them ('payout_reversal'). An answer we never
-- saw (timeout, 5xx, a crash before the commit) changes nothing: the tokens
-- stay held and the retry asks Stripe with the same idempotency key, or
-- after Stripe's 24 h window looks the transfer up first.
--
-- SQLSTATEs: SP090 creators only, SP091 below the payout minimum, SP092
-- payout not found, SP093 payout busy (another delivery holds it), SP094
-- admin only (payout holds), SP095 unknown creator.

create table app.payout_config (
  id                boolean primary key default true constraint payout_config_singleton check (id),
  -- SPEC: 1 token = 5 US cents. A change is a migration, never a setting.
  cents_per_token   integer not null default 5 constraint payout_config_cents check (cents_per_token = 5),
  minimum_tokens    bigint not null default 1000,
  -- On a cycle day, opt-ins until this time of day count for the cycle.
  request_cutoff    interval not null default '6 hours',
  -- The run starts at this time of day on a cycle day (the cron's schedule).
  run_at            interval not null default '2 hours',
  -- A refused transfer is retried (daily: Stripe replays a saved answer for
  -- 24 h) until this long after the freeze, then abandoned.
  retry_for         interval not null default '7 days',
  -- Stripe keeps idempotency keys at least this long; a retry after it
  -- looks the transfer up before creating one.
  idempotency_window interval not null default '24 hours'
);
insert into app.payout_config default values;
alter table app.payout_config enable row level security;
alter table app.payout_config force row level security;
grant select on app.payout_config to authenticated, stagepass_service;
create policy payout_config_read on app.payout_config for select to authenticated, stagepass_service using (true);

-- The cycle an instant belongs to: the first cycle day whose cut-off
-- (06:00 UTC) is after it.
create function app.payout_cycle_at(p_at timestamptz) returns date
  language sql stable set search_path = '' as $$
  with t as (select (p_at at time zone 'UTC') as l, (select request_cutoff from app.payout_config) as cut)
  select case
    when extract(day from l) = 1 and l - date_trunc('day', l) < cut then date_trunc('day', l)::date
    when extract(day from l) < 15 or (extract(day from l) = 15 and l - date_trunc('day', l) < cut)
      then (date_trunc('month', l) + interval '14 days')::date
    else (date_trunc('month', l) + interval '1 month')::date
  end from t
$$;
grant execute on function app.payout_cycle_at(timestamptz) to authenticated, stagepass_service;

-- A cycle's period: [previous cycle day, cycle day) in UTC.
create function app.payout_period(p_cycle date, out period_start timestamptz, out period_end timestamptz)
  language sql immutable set search_path = '' as $$
  select (case when extract(day from p_cycle) = 1 then p_cycle - interval '1 month' + interval '14 days'
               else p_cycle - interval '14 days' end)::timestamp at time zone 'UTC',
         p_cycle::timestamp at time zone 'UTC'
$$;
grant execute on function app.payout_period(date) to authenticated, stagepass_service;

-- The cycle whose run is under way: today if today is a cycle day and the
-- run time has come, else none. Payouts are frozen only then (a creator who
-- becomes eligible between cycle days waits for the next one).
create function app.payout_cycle_running() returns date
  language sql stable set search_path = '' as $$
  select d from (select (app.now() at time zone 'UTC') as l) t,
         lateral (select date_trunc('day', t.l)::date as d) x
   where extract(day from t.l) in (1, 15)
     and t.l - date_trunc('day', t.l) >= (select run_at from app.payout_config)
$$;
grant execute on function app.payout_cycle_running() to stagepass_service;

-- ---------------------------------------------------------------------------
-- Connect accounts: one Express account per creator, created on demand.
-- Eligibility comes only from Stripe's events (account.updated,
-- capability.updated); the gate is the transfers capability being active.
create table app.connect_accounts (
  creator_id            uuid primary key references app.users (id),
  stripe_account_id     text not null constraint connect_accounts_account_key unique
                          constraint connect_accounts_account_format check (stripe_account_id ~ '^acct_[A-Za-z0-9]{1,64}$'),
  livemode              boolean not null,
  details_submitted     boolean not null default false,
  payouts_enabled       boolean not null default false,
  transfers             text not null default 'inactive'
                          constraint connect_accounts_transfers_check check (transfers in ('active', 'inactive', 'pending', 'unknown')),
  currently_due         text[] not null default '{}',
  past_due              text[] not null default '{}',
  eventually_due        text[] not null default '{}',
  current_deadline      timestamptz,
  disabled_reason       text,
  future_currently_due  text[] not null default '{}',
  -- The last bank payout Stripe reported for the account (its schedule
  -- pays the bank; a failed one stops scheduled payouts until fixed).
  bank_payout_status    text constraint connect_accounts_bank_check check (bank_payout_status in ('paid', 'failed', 'canceled')),
  bank_payout_failure   text,
  -- `created` of the newest account or capability event applied: an older
  -- one arriving late is recorded and ignored.
  account_state_at      bigint not null default 0,
  transfers_state_at    bigint not null default 0,
  created_at            timestamptz not null default app.now(),
  updated_at            timestamptz not null default app.now()
);
alter table app.connect_accounts enable row level security;
alter table app.connect_accounts force row level security;
grant select on app.connect_accounts to authenticated, stagepass_service;
create policy connect_accounts_own on app.connect_accounts for select to authenticated
  using (creator_id = auth.uid());
create policy connect_accounts_service on app.connect_accounts for select to stagepass_service using (true);

-- Bank payouts of connected accounts, as Stripe's events report them.
create table app.connect_bank_payouts (
  id              text primary key,
  creator_id      uuid not null references app.users (id),
  amount_cents    bigint not null,
  currency        text not null,
  status          text not null,
  failure_code    text,
  arrival_date    timestamptz,
  event_created   bigint not null,
  updated_at      timestamptz not null default app.now()
);
create index connect_bank_payouts_creator on app.connect_bank_payouts (creator_id, arrival_date desc);
alter table app.connect_bank_payouts enable row level security;
alter table app.connect_bank_payouts force row level security;
grant select on app.connect_bank_payouts to authenticated, stagepass_service;
create policy connect_bank_payouts_own on app.connect_bank_payouts for select to authenticated
  using (creator_id = auth.uid());
create policy connect_bank_payouts_service on app.connect_bank_payouts for select to stagepass_service using (true);

-- The caller's Stripe account, or null (SP090: only creators are paid).
create function app.my_connect_account() returns text
  language plpgsql stable security definer set search_path = '' as $$
declare
  caller uuid := auth.uid();
begin
  perform 1 from app.users where id = caller and role = 'creator';
  if not found then
    raise exception 'only creators are paid out' using errcode = 'SP090';
  end if;
  return (select stripe_account_id from app.connect_accounts where creator_id = caller);
end
$$;
revoke all on function app.my_connect_account() from public;
grant execute on function app.my_connect_account() to authenticated;

-- Records the account Stripe created for the caller. Two concurrent
-- onboardings send the same idempotency key, so Stripe answers both with
-- one account; the first row wins either way. Returns the stored id.
create function app.record_connect_account(p_account text, p_livemode boolean) returns text
  language plpgsql security definer set search_path = '' as $$
declare
  caller uuid := auth.uid();
begin
  perform 1 from app.users where id = caller and role = 'creator';
  if not found then
    raise exception 'only creators are paid out' using errcode = 'SP090';
  end if;
  -- No arbiter: concurrent first onboardings insert the same row, and the
  -- loser may meet it on either unique index (creator or account); both
  -- are "already recorded".
  insert into app.connect_accounts (creator_id, stripe_account_id, livemode)
    values (caller, p_account, p_livemode) on conflict do nothing;
  return (select stripe_account_id from app.connect_accounts where creator_id = caller);
end
$$;
revoke all on function app.record_connect_account(text, boolean) from public;
grant execute on function app.record_connect_account(text, boolean) to authenticated;

-- Tells the creator their payout account changed (realtime).
create function app.connect_account_emit() returns trigger
  language plpgsql security definer set search_path = '' as $$
begin
  perform app.emit('realtime', 'user:' || new.creator_id::text, 'payout_account.updated',
    jsonb_build_object('transfers', new.transfers, 'details_submitted', new.details_submitted,
                       'currently_due', to_jsonb(new.currently_due), 'past_due', to_jsonb(new.past_due),
                       'disabled_reason', new.disabled_reason, 'bank_payout_status', new.bank_payout_status),
    'payout_account:' || new.creator_id::text || ':' || extract(epoch from app.now())::text
      || ':' || new.account_state_at::text || ':' || new.transfers_state_at::text);
  return null;
end
$$;
revoke all on function app.connect_account_emit() from public;
create trigger connect_accounts_emit after update on app.connect_accounts
  for each row when (old is distinct from new) execute function app.connect_account_emit();

-- account.updated. Returns applied, stale (an older event than one already
-- applied) or unknown_account (not one of ours).
create function app.apply_connect_account(
  p_account text, p_created bigint, p_details_submitted boolean, p_payouts_enabled boolean,
  p_transfers text, p_currently_due text[], p_past_due text[], p_eventually_due text[],
  p_deadline timestamptz, p_disabled_reason text, p_future_due text[]
) returns text
  language plpgsql security definer set search_path = '' as $$
declare
  a app.connect_accounts;
begin
  select * into a from app.connect_accounts where stripe_account_id = p_account for update;
  if not found then
    return 'unknown_account';
  end if;
  if p_created < a.account_state_at then
    return 'stale';
  end if;
  update app.connect_accounts set
    details_submitted = coalesce(p_details_submitted, false),
    payouts_enabled = coalesce(p_payouts_enabled, false),
    transfers = case when p_created >= transfers_state_at then coalesce(p_transfers, 'inactive') else transfers end,
    transfers_state_at = greatest(transfers_state_at, p_created),
    currently_due = coalesce(p_currently_due, '{}'), past_due = coalesce(p_past_due, '{}'),
    eventually_due = coalesce(p_eventually_due, '{}'), current_deadline = p_deadline,
    disabled_reason = p_disabled_reason, future_currently_due = coalesce(p_future_due, '{}'),
    account_state_at = p_created, updated_at = app.now()
  where creator_id = a.creator_id;
  return 'applied';
end
$$;
revoke all on function app.apply_connect_account(text, bigint, boolean, boolean, text, text[], text[], text[], timestamptz, text, text[]) from public;
grant execute on function app.apply_connect_account(text, bigint, boolean, boolean, text, text[], text[], text[], timestamptz, text, text[]) to stagepass_service;

-- capability.updated for `transfers` (other capabilities are not ours).
create function app.apply_connect_capability(p_account text, p_created bigint, p_status text) returns text
  language plpgsql security definer set search_path = '' as $$
declare
  a app.connect_accounts;
begin
  select * into a from app.connect_accounts where stripe_account_id = p_account for update;
  if not found then
    return 'unknown_account';
  end if;
  if p_created < a.transfers_state_at then
    return 'stale';
  end if;
  update app.connect_accounts
     set transfers = case when p_status in ('active', 'inactive', 'pending') then p_status else 'unknown' end,
         transfers_state_at = p_created, updated_at = app.now()
   where creator_id = a.creator_id;
  return 'applied';
end
$$;
revoke all on function app.apply_connect_capability(text, bigint, text) from public;
grant execute on function app.apply_connect_capability(text, bigint, text) to stagepass_service;

-- payout.paid / payout.failed / payout.canceled of a connected account:
-- recorded, shown to the creator; no tokens move (the money is in the
-- creator's Stripe balance, and a failed bank payout is retried by Stripe
-- once the creator fixes their bank details).
create function app.apply_bank_payout(
  p_account text, p_payout text, p_created bigint, p_status text, p_amount bigint, p_currency text,
  p_failure text, p_arrival timestamptz
) returns text
  language plpgsql security definer set search_path = '' as $$
declare
  a app.connect_accounts;
  newest boolean;
begin
  select * into a from app.connect_accounts where stripe_account_id = p_account for update;
  if not found then
    return 'unknown_account';
  end if;
  insert into app.connect_bank_payouts as b
      (id, creator_id, amount_cents, currency, status, failure_code, arrival_date, event_created)
    values (p_payout, a.creator_id, p_amount, p_currency, p_status, p_failure, p_arrival, p_created)
    on conflict (id) do update
      set status = excluded.status, failure_code = excluded.failure_code,
          arrival_date = excluded.arrival_date, event_created = excluded.event_created, updated_at = app.now()
      where b.event_created <= excluded.event_created;
  if not found then
    return 'stale';
  end if;
  newest := not exists (select 1 from app.connect_bank_payouts
                         where creator_id = a.creator_id and id <> p_payout and event_created > p_created);
  if newest and p_status in ('paid', 'failed', 'canceled') then
    update app.connect_accounts set bank_payout_status = p_status,
           bank_payout_failure = case when p_status = 'failed' then p_failure end, updated_at = app.now()
     where creator_id = a.creator_id;
  end if;
  return 'applied';
end
$$;
revoke all on function app.apply_bank_payout(text, text, bigint, text, bigint, text, text, timestamptz) from public;
grant execute on function app.apply_bank_payout(text, text, bigint, text, bigint, text, text, timestamptz) to stagepass_service;

-- ---------------------------------------------------------------------------
-- Admin holds: a held creator's payouts are not frozen or sent.
create table app.payout_holds (
  creator_id  uuid primary key references app.users (id),
  reason      text not null,
  held_by     uuid not null references app.users (id),
  held_at     timestamptz not null default app.now()
);
alter table app.payout_holds enable row level security;
alter table app.payout_holds force row level security;
grant select on app.payout_holds to stagepass_service;
create policy payout_holds_service on app.payout_holds for select to stagepass_service using (true);

-- Every hold and release, append-only: who, when, why.
create table app.payout_hold_log (
  id          bigint generated always as identity primary key,
  creator_id  uuid not null references app.users (id),
  action      text not null constraint payout_hold_log_action_check check (action in ('hold', 'release')),
  reason      text not null,
  actor_id    uuid not null references app.users (id),
  at          timestamptz not null default app.now()
);
create index payout_hold_log_creator on app.payout_hold_log (creator_id, at);
create trigger payout_hold_log_append_only before update or delete on app.payout_hold_log
  for each row execute function app.refuse_change();
create trigger payout_hold_log_no_truncate before truncate on app.payout_hold_log
  for each statement execute function app.refuse_change();
alter table app.payout_hold_log enable row level security;
alter table app.payout_hold_log force row level security;
grant select on app.payout_hold_log to stagepass_service;
create policy payout_hold_log_service on app.payout_hold_log for select to stagepass_service using (true);

-- Holds or releases a creator's payouts (admins only, in the database:
-- SP094; SP095 not a creator). Returns whether anything changed.
create function app.set_payout_hold(p_creator uuid, p_hold boolean, p_reason text) returns boolean
  language plpgsql security definer set search_path = '' as $$
declare
  caller uuid := auth.uid();
  changed boolean;
begin
  perform 1 from app.users where id = caller and role = 'admin';
  if not found then
    raise exception 'admin role required' using errcode = 'SP094';
  end if;
  perform 1 from app.users where id = p_creator and role = 'creator';
  if not found then
    raise exception 'unknown creator' using errcode = 'SP095';
  end if;
  if p_hold then
    insert into app.payout_holds (creator_id, reason, held_by) values (p_creator, p_reason, caller)
      on conflict (creator_id) do nothing;
  else
    delete from app.payout_holds where creator_id = p_creator;
  end if;
  changed := found;
  if changed then
    insert into app.payout_hold_log (creator_id, action, reason, actor_id)
      values (p_creator, case when p_hold then 'hold' else 'release' end, p_reason, caller);
  end if;
  return changed;
end
$$;
revoke all on function app.set_payout_hold(uuid, boolean, text) from public;
grant execute on function app.set_payout_hold(uuid, boolean, text) to authenticated;

-- ---------------------------------------------------------------------------
-- Earnings and payouts.

-- Tokens credited to a wallet by tips, class settlements and call minutes
-- before `p_before`, by source.
create function ledger.earnings(p_wallet uuid, p_from timestamptz, p_before timestamptz,
  out tips bigint, out classes bigint, out calls bigint)
  language sql stable security definer set search_path = '' as $$
  select coalesce(sum(e.amount) filter (where j.kind = 'tip'), 0)::bigint,
         coalesce(sum(e.amount) filter (where j.kind = 'class_settlement'), 0)::bigint,
         coalesce(sum(e.amount) filter (where j.kind = 'call_minute'), 0)::bigint
    from ledger.entries e join ledger.journals j on j.id = e.journal_id
   where e.account_id = p_wallet and e.amount > 0
     and e.created_at >= coalesce(p_from, '-infinity') and e.created_at < p_before
     and j.kind in ('tip', 'class_settlement', 'call_minute')
$$;
revoke all on function ledger.earnings(uuid, timestamptz, timestamptz) from public;
-- The ledger audit (service role) checks no creator was paid more than earned.
grant execute on function ledger.earnings(uuid, timestamptz, timestamptz) to stagepass_service;

create table app.payouts (
  id                uuid primary key default gen_random_uuid(),
  creator_id        uuid not null references app.users (id),
  cycle             date not null constraint payouts_cycle_day check (extract(day from cycle) in (1, 15)),
  period_start      timestamptz not null,
  period_end        timestamptz not null,
  stripe_account_id text not null,
  -- The statement (immutable once frozen): the period's earnings by source,
  -- what was earned earlier and not paid, and what is paid.
  period_tips       bigint not null,
  period_classes    bigint not null,
  period_calls      bigint not null,
  carried_over      bigint not null,
  earned_total      bigint not null,
  paid_before       bigint not null,
  wallet_available  bigint not null,
  tokens            bigint not null constraint payouts_tokens_positive check (tokens > 0),
  cents_per_token   integer not null,
  amount_cents      bigint not null,
  frozen_at         timestamptz not null default app.now(),
  -- The payout's progress (mutable).
  status            text not null default 'held' constraint payouts_status_check check (status in
                      ('held', 'sent', 'released', 'abandoned', 'reversed')),
  holds             integer not null default 1,
  attempts          integer not null default 0,
  first_attempt_at  timestamptz,
  last_attempt_at   timestamptz,
  next_attempt_at   timestamptz not null default app.now(),
  give_up_at        timestamptz not null,
  last_error        text,
  transfer_id       text constraint payouts_transfer_key unique,
  sent_at           timestamptz,
  reversed_cents    bigint not null default 0,
  reversed_tokens   bigint not null default 0,
  updated_at        timestamptz not null default app.now(),
  constraint payouts_creator_cycle_key unique (creator_id, cycle),
  constraint payouts_amount check (amount_cents = tokens * cents_per_token),
  constraint payouts_statement check (tokens <= earned_total - paid_before and tokens <= wallet_available
                                      and carried_over = earned_total - paid_before - period_tips - period_classes - period_calls),
  constraint payouts_sent_has_transfer check ((status = 'sent' or status = 'reversed') = (transfer_id is not null))
);
create index payouts_creator on app.payouts (creator_id, cycle desc);
create index payouts_due on app.payouts (next_attempt_at) where status in ('held', 'released');
alter table app.payouts enable row level security;
alter table app.payouts force row level security;
grant select on app.payouts to authenticated, stagepass_service;
create policy payouts_own on app.payouts for select to authenticated using (creator_id = auth.uid());
create policy payouts_service on app.payouts for select to stagepass_service using (true);

-- The statement never changes after the freeze; only progress does.
create function app.payouts_statement_frozen() returns trigger
  language plpgsql set search_path = '' as $$
begin
  if (new.creator_id, new.cycle, new.period_start, new.period_end, new.stripe_account_id, new.period_tips,
      new.period_classes, new.period_calls, new.carried_over, new.earned_total, new.paid_before,
      new.wallet_available, new.tokens, new.cents_per_token, new.amount_cents, new.frozen_at)
     is distinct from
     (old.creator_id, old.cycle, old.period_start, old.period_end, old.stripe_account_id, old.period_tips,
      old.period_classes, old.period_calls, old.carried_over, old.earned_total, old.paid_before,
      old.wallet_available, old.tokens, old.cents_per_token, old.amount_cents, old.frozen_at) then
    raise exception 'a payout statement is immutable' using errcode = 'SP000';
  end if;
  return new;
end
$$;
create trigger payouts_statement_immutable before update on app.payouts
  for each row execute function app.payouts_statement_frozen();
create trigger payouts_no_delete before delete on app.payouts
  for each row execute function app.refuse_change();
create trigger payouts_no_truncate before truncate on app.payouts
  for each statement execute function app.refuse_change();

-- Tells the creator their payout changed (realtime `payout.updated`).
create function app.payout_emit() returns trigger
  language plpgsql security definer set search_path = '' as $$
begin
  perform app.emit('realtime', 'user:' || new.creator_id::text, 'payout.updated',
    jsonb_build_object('payout_id', new.id, 'cycle', new.cycle, 'status', new.status, 'tokens', new.tokens,
                       'amount_cents', new.amount_cents, 'reversed_cents', new.reversed_cents,
                       'attempts', new.attempts),
    'payout:' || new.id::text || ':' || new.status || ':' || new.attempts::text || ':' || new.reversed_cents::text);
  return null;
end
$$;
revoke all on function app.payout_emit() from public;
create trigger payouts_emit_insert after insert on app.payouts
  for each row execute function app.payout_emit();
create trigger payouts_emit_update after update on app.payouts
  for each row when (old.status is distinct from new.status or old.reversed_cents is distinct from new.reversed_cents)
  execute function app.payout_emit();

-- Opt-ins: "pay me in the next cycle". One open request per creator; the
-- payout that answers it closes it. A creator who is not eligible (no
-- active transfers capability, held, below the minimum) stays open and is
-- carried over to the next cycle.
create table app.payout_requests (
  id            uuid primary key,
  creator_id    uuid not null references app.users (id),
  cycle         date not null,
  requested_at  timestamptz not null default app.now(),
  payout_id     uuid references app.payouts (id),
  -- Why the last run did not pay it (no_account, transfers_inactive,
  -- held, below_minimum, platform_funds), and in which cycle.
  skipped_reason text,
  skipped_cycle  date
);
create unique index payout_requests_open on app.payout_requests (creator_id) where payout_id is null;
create index payout_requests_due on app.payout_requests (cycle) where payout_id is null;
alter table app.payout_requests enable row level security;
alter table app.payout_requests force row level security;
grant select on app.payout_requests to authenticated, stagepass_service;
create policy payout_requests_own on app.payout_requests for select to authenticated using (creator_id = auth.uid());
create policy payout_requests_service on app.payout_requests for select to stagepass_service using (true);

-- What a creator could be paid for earnings before `p_before`, in tokens:
-- earned − already paid (held or sent, net of reversals), capped by the
-- wallet net of debt.
create function app.creator_payable(p_creator uuid, p_before timestamptz,
  out earned bigint, out paid bigint, out available bigint, out payable bigint)
  language plpgsql stable security definer set search_path = '' as $$
declare
  wallet uuid := ledger.account_of('wallet', p_creator);
  e record;
begin
  select * into e from ledger.earnings(wallet, null, p_before);
  earned := e.tips + e.classes + e.calls;
  select coalesce(sum(p.tokens - p.reversed_tokens), 0)::bigint into paid
    from app.payouts p where p.creator_id = p_creator and p.status in ('held', 'sent', 'reversed');
  select a.balance + coalesce((select d.balance from ledger.accounts d
                                where d.kind = 'debt' and d.owner_id = p_creator and d.reference is null), 0)
    into available from ledger.accounts a where a.id = wallet;
  payable := greatest(0, least(earned - paid, available));
end
$$;
revoke all on function app.creator_payable(uuid, timestamptz) from public;
grant execute on function app.creator_payable(uuid, timestamptz) to stagepass_service;

-- The caller asks to be paid in the next cycle (SP090 creators only, SP091
-- below the minimum right now). Returns the open request (an existing one
-- is returned, not duplicated) and whether it is new.
create function app.request_payout(p_id uuid)
  returns table (id uuid, cycle date, requested_at timestamptz, created boolean, payable_tokens bigint)
  language plpgsql security definer set search_path = '' as $$
declare
  caller uuid := auth.uid();
  cfg app.payout_config;
  r app.payout_requests;
  p record;
  is_new boolean := false;
begin
  perform 1 from app.users u where u.id = caller and u.role = 'creator' for share;
  if not found then
    raise exception 'only creators are paid out' using errcode = 'SP090';
  end if;
  select * into cfg from app.payout_config;
  select * into p from app.creator_payable(caller, 'infinity');
  if p.payable < cfg.minimum_tokens then
    raise exception 'payable % below the minimum %', p.payable, cfg.minimum_tokens using errcode = 'SP091';
  end if;
  select * into r from app.payout_requests q where q.creator_id = caller and q.payout_id is null;
  if not found then
    insert into app.payout_requests as q (id, creator_id, cycle)
      values (p_id, caller, app.payout_cycle_at(app.now()))
      on conflict do nothing returning q.* into r;
    if r.id is null then -- a concurrent request won
      select * into r from app.payout_requests q where q.creator_id = caller and q.payout_id is null;
    else
      is_new := true;
    end if;
  end if;
  return query select r.id, r.cycle, r.requested_at, is_new, p.payable;
end
$$;
revoke all on function app.request_payout(uuid) from public;
grant execute on function app.request_payout(uuid) to authenticated;

-- Posts one payout journal between a creator's wallet and payout clearing
-- (or clearing and Stripe clearing). Returns false when the wallet lacks
-- the tokens (a hold only).
create function ledger.payout_move(p_kind text, p_reference text, p_creator uuid, p_tokens bigint, p_payout uuid)
  returns boolean
  language plpgsql security definer set search_path = '' as $$
declare
  wallet uuid := ledger.account_of('wallet', p_creator);
  clearing uuid := ledger.singleton('payout_clearing');
  meta jsonb := jsonb_build_object('payout_id', p_payout);
begin
  case p_kind
    when 'payout_hold' then
      if (select balance from ledger.accounts where id = wallet for update) < p_tokens then
        return false;
      end if;
      perform ledger.post(p_kind, p_reference, array[wallet, clearing], array[-p_tokens, p_tokens], meta);
    when 'payout_release' then
      perform ledger.post(p_kind, p_reference, array[clearing, wallet], array[-p_tokens, p_tokens], meta);
    when 'payout_sent' then
      perform ledger.post(p_kind, p_reference, array[clearing, ledger.singleton('stripe_clearing')],
                          array[-p_tokens, p_tokens], meta);
    when 'payout_reversal' then
      perform ledger.post(p_kind, p_reference, array[ledger.singleton('stripe_clearing'), wallet],
                          array[-p_tokens, p_tokens], meta);
    else
      raise exception 'unknown payout journal %', p_kind using errcode = 'SP000';
  end case;
  return true;
end
$$;
revoke all on function ledger.payout_move(text, text, uuid, bigint, uuid) from public;

-- The run: freezes a statement and holds the tokens for up to `p_limit`
-- open requests due in the running cycle, in request order, while their
-- amounts fit `p_budget_cents` (the platform's available Stripe balance
-- less what is already in flight; null: no limit), and queues one
-- `payout-transfer` job per payout through the outbox. Requests that
-- cannot be paid stay open with the reason. Safe to run concurrently and
-- again (SKIP LOCKED; one payout per creator and cycle). Returns what it
-- did, per request.
create function app.freeze_payouts(p_limit integer, p_budget_cents bigint)
  returns table (request_id uuid, creator_id uuid, payout_id uuid, outcome text)
  language plpgsql security definer set search_path = '' set jit = off as $$
declare
  cyc date := app.payout_cycle_running();
  cfg app.payout_config;
  per record;
  q record;
  acct app.connect_accounts;
  pay record;
  e record;
  budget bigint := p_budget_cents;
  reason text;
  new_id uuid;
begin
  if cyc is null then
    return;
  end if;
  select * into cfg from app.payout_config;
  select * into per from app.payout_period(cyc);
  for q in
    select r.* from app.payout_requests r
     where r.payout_id is null and r.cycle <= cyc
       and (r.skipped_cycle is distinct from cyc or r.skipped_reason = 'platform_funds')
     order by r.requested_at
     limit p_limit
     for update skip locked
  loop
    reason := null;
    select * into acct from app.connect_accounts a where a.creator_id = q.creator_id;
    if not found then
      reason := 'no_account';
    elsif acct.transfers <> 'active' then
      reason := 'transfers_inactive';
    elsif exists (select 1 from app.payout_holds h where h.creator_id = q.creator_id) then
      reason := 'held';
    elsif exists (select 1 from app.payouts p where p.creator_id = q.creator_id and p.cycle = cyc) then
      reason := 'already_paid_this_cycle';
    else
      -- The wallet is locked first, so the payable amount cannot shrink
      -- under a concurrent spend before its tokens are held.
      perform 1 from ledger.accounts w where w.id = ledger.account_of('wallet', q.creator_id) for update;
      select * into pay from app.creator_payable(q.creator_id, per.period_end);
      if pay.payable < cfg.minimum_tokens then
        reason := 'below_minimum';
      elsif budget is not null and pay.payable * cfg.cents_per_token > budget then
        reason := 'platform_funds';
      end if;
    end if;
    if reason is not null then
      update app.payout_requests r set skipped_reason = reason, skipped_cycle = cyc where r.id = q.id;
      request_id := q.id; creator_id := q.creator_id; payout_id := null; outcome := reason;
      return next;
      continue;
    end if;
    select * into e from ledger.earnings(ledger.account_of('wallet', q.creator_id), per.period_start, per.period_end);
    new_id := gen_random_uuid();
    insert into app.payouts (id, creator_id, cycle, period_start, period_end, stripe_account_id,
                             period_tips, period_classes, period_calls, carried_over, earned_total, paid_before,
                             wallet_available, tokens, cents_per_token, amount_cents, give_up_at)
      values (new_id, q.creator_id, cyc, per.period_start, per.period_end, acct.stripe_account_id,
              e.tips, e.classes, e.calls, pay.earned - pay.paid - e.tips - e.classes - e.calls, pay.earned, pay.paid,
              pay.available, pay.payable, cfg.cents_per_token, pay.payable * cfg.cents_per_token,
              app.now() + cfg.retry_for);
    if not ledger.payout_move('payout_hold', new_id::text || ':1', q.creator_id, pay.payable, new_id) then
      raise exception 'payable tokens are not in the wallet' using errcode = 'SP000';
    end if;
    update app.payout_requests r set payout_id = new_id, skipped_reason = null, skipped_cycle = null
     where r.id = q.id;
    perform app.emit('job', 'payout-transfer', null, jsonb_build_object('payout_id', new_id),
                     'payout-transfer:' || new_id::text || ':1');
    if budget is not null then
      budget := budget - pay.payable * cfg.cents_per_token;
    end if;
    request_id := q.id; creator_id := q.creator_id; payout_id := new_id; outcome := 'frozen';
    return next;
  end loop;
end
$$;
revoke all on function app.freeze_payouts(integer, bigint) from public;
grant execute on function app.freeze_payouts(integer, bigint) to stagepass_service;

-- The transfer job, step 1 (its own committed transaction, before Stripe is
-- asked): locks the payout (SP093 when another delivery holds it; SP092
-- unknown), decides what to do and records the attempt's start, so a crash
-- after Stripe's answer still leaves a trace of when it was first asked.
-- Returns the payout and `action`: send, lookup_then_send (the first
-- attempt was longer ago than Stripe's idempotency window), done (already
-- sent, reversed or abandoned), not_due, or abandoned (just now: the
-- tokens could not be held again, or retries ran out).
create function app.begin_payout_attempt(p_payout uuid)
  returns table (action text, payout jsonb)
  language plpgsql security definer set search_path = '' as $$
declare
  p app.payouts;
  cfg app.payout_config;
begin
  select * into cfg from app.payout_config;
  begin
    select * into p from app.payouts where id = p_payout for update nowait;
  exception when lock_not_available then
    raise exception 'payout % is busy', p_payout using errcode = 'SP093';
  end;
  if not found then
    raise exception 'payout % not found', p_payout using errcode = 'SP092';
  end if;
  if p.status in ('sent', 'reversed', 'abandoned') then
    return query select 'done'::text, to_jsonb(p);
    return;
  end if;
  if app.now() < p.next_attempt_at then
    return query select 'not_due'::text, to_jsonb(p);
    return;
  end if;
  if p.status = 'released' then
    -- A refusal gave the tokens back; hold them again for this retry.
    if app.now() >= p.give_up_at or not ledger.payout_move('payout_hold', p.id::text || ':' || (p.holds + 1),
                                                             p.creator_id, p.tokens, p.id) then
      update app.payouts set status = 'abandoned', updated_at = app.now(),
             last_error = coalesce(last_error, '') ||
               case when app.now() >= p.give_up_at then ' (retries ran out)' else ' (tokens no longer in the wallet)' end
       where id = p.id returning * into p;
      return query select 'abandoned'::text, to_jsonb(p);
      return;
    end if;
    update app.payouts set status = 'held', holds = holds + 1 where id = p.id;
  end if;
  update app.payouts set attempts = attempts + 1, first_attempt_at = coalesce(first_attempt_at, app.now()),
         last_attempt_at = app.now(), updated_at = app.now()
   where id = p.id returning * into p;
  return query select case when p.attempts > 1 and p.first_attempt_at < app.now() - cfg.idempotency_window
                           then 'lookup_then_send' else 'send' end, to_jsonb(p);
end
$$;
revoke all on function app.begin_payout_attempt(uuid) from public;
grant execute on function app.begin_payout_attempt(uuid) to stagepass_service;

-- Step 2, success: in one transaction with Stripe's answer, records the
-- transfer and retires the tokens. A payout already sent is left alone
-- (returns false); a transfer that does not match the statement is an
-- invariant violation (SP000), never recorded.
create function app.record_payout_sent(p_payout uuid, p_transfer text, p_amount_cents bigint, p_destination text)
  returns boolean
  language plpgsql security definer set search_path = '' as $$
declare
  p app.payouts;
begin
  select * into p from app.payouts where id = p_payout for update;
  if not found then
    raise exception 'payout % not found', p_payout using errcode = 'SP092';
  end if;
  if p.status in ('sent', 'reversed') then
    if p.transfer_id <> p_transfer then
      raise exception 'payout % has transfer %, not %', p_payout, p.transfer_id, p_transfer using errcode = 'SP000';
    end if;
    return false;
  end if;
  if p_amount_cents <> p.amount_cents or p_destination <> p.stripe_account_id then
    raise exception 'transfer % does not match payout %', p_transfer, p_payout using errcode = 'SP000';
  end if;
  if p.status <> 'held' then
    -- Released or abandoned, yet Stripe has the transfer (a lookup found
    -- it): hold the tokens again, whatever the wallet says now: the money
    -- has left. A wallet that cannot cover it is an invariant alarm.
    if not ledger.payout_move('payout_hold', p.id::text || ':' || (p.holds + 1), p.creator_id, p.tokens, p.id) then
      raise exception 'payout % was sent after its tokens were released and spent', p_payout using errcode = 'SP000';
    end if;
    update app.payouts set holds = holds + 1 where id = p.id;
  end if;
  perform ledger.payout_move('payout_sent', p.id::text, p.creator_id, p.tokens, p.id);
  update app.payouts set status = 'sent', transfer_id = p_transfer, sent_at = app.now(), last_error = null,
         updated_at = app.now()
   where id = p.id;
  return true;
end
$$;
revoke all on function app.record_payout_sent(uuid, text, bigint, text) from public;
grant execute on function app.record_payout_sent(uuid, text, bigint, text) to stagepass_service;

-- Step 2, failure. `p_refused`: Stripe refused it (a 4xx that is not a
-- rate limit or an idempotency conflict): the tokens go back to the wallet
-- and a retry is due in a day (Stripe replays a saved refusal for 24 h),
-- until `give_up_at`. Otherwise the answer was not seen (timeout, 5xx,
-- 429): the tokens stay held, a retry is due after `p_retry_in`. Either
-- way the next `payout-transfer` job is queued for that time. Returns the
-- status after.
create function app.record_payout_failure(p_payout uuid, p_refused boolean, p_error text, p_retry_in interval)
  returns text
  language plpgsql security definer set search_path = '' as $$
declare
  p app.payouts;
  next_at timestamptz;
begin
  select * into p from app.payouts where id = p_payout for update;
  if not found then
    raise exception 'payout % not found', p_payout using errcode = 'SP092';
  end if;
  if p.status <> 'held' then
    return p.status;
  end if;
  next_at := app.now() + case when p_refused then interval '1 day' else p_retry_in end;
  if p_refused then
    perform ledger.payout_move('payout_release', p.id::text || ':' || p.holds, p.creator_id, p.tokens, p.id);
  end if;
  if p_refused and next_at > p.give_up_at then
    update app.payouts set status = 'abandoned', last_error = left(p_error, 500), updated_at = app.now()
     where id = p.id;
    return 'abandoned';
  end if;
  update app.payouts set status = case when p_refused then 'released' else 'held' end,
         last_error = left(p_error, 500), next_attempt_at = next_at, updated_at = app.now()
   where id = p.id;
  perform app.emit('job', 'payout-transfer', null, jsonb_build_object('payout_id', p.id),
                   'payout-transfer:' || p.id::text || ':' || (p.attempts + 1), next_at);
  return case when p_refused then 'released' else 'held' end;
end
$$;
revoke all on function app.record_payout_failure(uuid, boolean, text, interval) from public;
grant execute on function app.record_payout_failure(uuid, boolean, text, interval) to stagepass_service;

-- Payouts to reconcile: held or released ones whose job is overdue by
-- `p_quiet` and untouched as long (an answer never recorded, a message
-- lost). The hourly run looks held ones up at Stripe, then queues the job.
create function app.payouts_to_reconcile(p_quiet interval, p_limit integer)
  returns setof app.payouts
  language sql stable security definer set search_path = '' as $$
  select * from app.payouts
   where status in ('held', 'released') and next_attempt_at <= app.now() - p_quiet
     and coalesce(last_attempt_at, frozen_at) < app.now() - p_quiet
   order by next_attempt_at
   limit p_limit
$$;
revoke all on function app.payouts_to_reconcile(interval, integer) from public;
grant execute on function app.payouts_to_reconcile(interval, integer) to stagepass_service;

-- Queues the transfer job again, after `p_delay_seconds` (the hourly run
-- after a lookup found nothing; a job that found no pacing slot soon
-- enough). Each call queues a new message.
create function app.requeue_payout(p_payout uuid, p_delay_seconds double precision) returns void
  language sql security definer set search_path = '' as $$
  select app.emit('job', 'payout-transfer', null, jsonb_build_object('payout_id', p.id),
                  'payout-transfer:' || p.id::text || ':requeue:' || gen_random_uuid()::text,
                  app.now() + make_interval(secs => greatest(p_delay_seconds, 0)))
    from app.payouts p where p.id = p_payout and p.status in ('held', 'released')
$$;
revoke all on function app.requeue_payout(uuid, double precision) from public;
grant execute on function app.requeue_payout(uuid, double precision) to stagepass_service;

-- transfer.reversed: `p_amount_reversed` is the transfer's cumulative
-- reversed amount in cents. The reversed tokens go back to the creator's
-- wallet (earned, now unpaid again; an admin who reverses for fraud holds
-- the creator too); a partial reversal re-credits whole tokens only. Each
-- cumulative amount is applied once. Returns what it did.
create function app.apply_transfer_reversed(p_transfer text, p_amount_reversed bigint) returns text
  language plpgsql security definer set search_path = '' as $$
declare
  p app.payouts;
  v_tokens bigint;
begin
  select * into p from app.payouts where transfer_id = p_transfer for update;
  if not found then
    return 'unknown_transfer';
  end if;
  if p_amount_reversed <= p.reversed_cents then
    return 'stale';
  end if;
  v_tokens := least(p_amount_reversed, p.amount_cents) / p.cents_per_token - p.reversed_tokens;
  if v_tokens > 0 then
    perform ledger.payout_move('payout_reversal', p.id::text || ':' || p_amount_reversed, p.creator_id, v_tokens, p.id);
  end if;
  update app.payouts set reversed_cents = least(p_amount_reversed, amount_cents),
         reversed_tokens = reversed_tokens + greatest(v_tokens, 0),
         status = case when p_amount_reversed >= amount_cents then 'reversed' else status end,
         updated_at = app.now()
   where id = p.id;
  return 'reversed:' || greatest(v_tokens, 0);
end
$$;
revoke all on function app.apply_transfer_reversed(text, bigint) from public;
grant execute on function app.apply_transfer_reversed(text, bigint) to stagepass_service;

-- A period's earnings, entry by entry (the CSV export): the caller's own
-- payouts only (SP092 otherwise).
create function app.payout_earnings(p_payout uuid)
  returns table (earned_at timestamptz, source text, reference text, tokens bigint, cents bigint)
  language plpgsql stable security definer set search_path = '' as $$
declare
  p app.payouts;
begin
  select * into p from app.payouts where id = p_payout and creator_id = auth.uid();
  if not found then
    raise exception 'payout not found' using errcode = 'SP092';
  end if;
  return query
  select e.created_at,
         case j.kind when 'tip' then 'tip' when 'class_settlement' then 'class' else 'call' end,
         j.reference, e.amount, e.amount * p.cents_per_token
    from ledger.entries e join ledger.journals j on j.id = e.journal_id
   where e.account_id = ledger.account_of('wallet', p.creator_id) and e.amount > 0
     and e.created_at >= p.period_start and e.created_at < p.period_end
     and j.kind in ('tip', 'class_settlement', 'call_minute')
   order by e.created_at, e.id;
end
$$;
revoke all on function app.payout_earnings(uuid) from public;
grant execute on function app.payout_earnings(uuid) to authenticated;

-- The caller's payout picture (creators only, SP090).
create function app.my_payout_summary()
  returns table (payable_tokens bigint, minimum_tokens bigint, cents_per_token integer, next_cycle date,
                 held boolean, open_request uuid, open_request_cycle date, skipped_reason text)
  language plpgsql stable security definer set search_path = '' as $$
declare
  caller uuid := auth.uid();
  cfg app.payout_config;
  r app.payout_requests;
begin
  perform 1 from app.users u where u.id = caller and u.role = 'creator';
  if not found then
    raise exception 'only creators are paid out' using errcode = 'SP090';
  end if;
  select * into cfg from app.payout_config;
  select * into r from app.payout_requests q where q.creator_id = caller and q.payout_id is null;
  return query select (select c.payable from app.creator_payable(caller, 'infinity') c), cfg.minimum_tokens,
    cfg.cents_per_token, app.payout_cycle_at(app.now()),
    exists (select 1 from app.payout_holds h where h.creator_id = caller), r.id, r.cycle, r.skipped_reason;
end
$$;
revoke all on function app.my_payout_summary() from public;
grant execute on function app.my_payout_summary() to authenticated;

-- Pacing of calls to Stripe (25 requests/s per endpoint in live mode): one
-- row per paced endpoint holds the next free instant. This reads the wall
-- clock on purpose, in its own schema: it paces real requests to a real
-- service, it is not a rule of the product (ADR 0019; the one-clock test
-- covers `app` and `ledger`).
create schema pacing;
revoke all on schema pacing from public;
grant usage on schema pacing to stagepass_service;
create table pacing.slots (
  name       text primary key,
  next_free  timestamptz not null default '-infinity'
);
alter table pacing.slots enable row level security;
alter table pacing.slots force row level security;
-- Takes the next slot of `p_name` if it is at most `p_max_wait_ms` away and
-- returns how long to wait for it (ms), or null (nothing taken: come back
-- later). Slots are `p_interval_ms` apart.
create function pacing.take(p_name text, p_interval_ms double precision, p_max_wait_ms double precision)
  returns double precision
  language plpgsql security definer set search_path = '' as $$
declare
  t timestamptz := clock_timestamp();
  slot timestamptz;
begin
  insert into pacing.slots (name) values (p_name) on conflict (name) do nothing;
  update pacing.slots set next_free = greatest(next_free, t) + make_interval(secs => p_interval_ms / 1000)
   where name = p_name and greatest(next_free, t) <= t + make_interval(secs => p_max_wait_ms / 1000)
   returning next_free - make_interval(secs => p_interval_ms / 1000) into slot;
  if slot is null then
    return null;
  end if;
  return greatest(0, extract(epoch from slot - t) * 1000);
end
$$;
revoke all on function pacing.take(text, double precision, double precision) from public;
grant execute on function pacing.take(text, double precision, double precision) to stagepass_service;
