-- Paid 1:1 calls (issue 11, SPEC §3 "Calls", reference/calls-payouts.md §2,
-- ADR 0018): creator call settings, the call lifecycle, and server-
-- authoritative per-minute billing through the call's escrow.
--
-- Lifecycle (every transition one transaction, under the call row's lock;
-- each bumps `sequence`, which emits `call.updated` to both parties):
--
--   ringing ──accept──▶ accepted ──both joined──▶ active ──▶ ended
--      │ decline / cancel / 2 min      │ hang up / not joined     ▲
--      ▼                               └──────────────────────────┘
--   declined / cancelled / expired
--
-- Money: fan wallet ──call_hold──▶ escrow 'call:<id>' ──call_minute──▶
-- creator wallet (+ platform fee, `ledger.settings`), and at the end
-- ──call_refund──▶ fan. Prepaid per started minute:
--   * accept holds `hold_minutes` (2) minutes at the price snapshotted on
--     the call when the fan asked (never a price from a client);
--   * minute N (1-based) starts at started_at + (N−1) min and is charged
--     (journal ('call_minute', '<call>:<N>'), so at most once) as soon as
--     anything looks at the call after it started: a heartbeat, a join,
--     the end, the per-minute sweep, a call-tick job;
--   * the escrow is topped up so the minute after the current one (by the
--     clock) is always held ('call_hold', '<call>:<funded minutes>'); a
--     refused top-up (no funds, debt, daily limit) ends the call when its
--     funded time ends, with warnings 60 s and 30 s before;
--   * minutes are charged only up to the last sign of life (the later of
--     the two parties' last heartbeat or join), so a call that goes silent
--     is never billed for the silence; after `heartbeat_timeout_seconds`
--     (120) of silence it ends at that last sign of life;
--   * ending charges every minute started before the end (never more than
--     was funded) and refunds the rest of the escrow in the same
--     transaction as the status change: the escrow of an ended call is 0.
--
-- Clock: `app.now()` only (ADR 0014). Lock order: call rows (by id), then
-- wallets (by id), then escrow; the same as tips and classes (ADR 0005).

-- Operator settings of calls, one row (changed with SQL by the operator;
-- read by every call function).
create table app.call_config (
  id                         boolean primary key default true constraint call_config_singleton check (id),
  -- Minutes held on accept (SPEC: K = 2).
  hold_minutes               integer not null default 2 constraint call_config_hold check (hold_minutes between 1 and 10),
  -- How long an invitation rings (SPEC: 2 minutes).
  ring_seconds               integer not null default 120 constraint call_config_ring check (ring_seconds between 30 and 600),
  -- How long both parties have to join after the accept.
  join_seconds               integer not null default 120 constraint call_config_join check (join_seconds between 30 and 600),
  -- Silence after which a call ends at its last sign of life (SPEC: 120 s).
  heartbeat_timeout_seconds  integer not null default 120 constraint call_config_heartbeat check (heartbeat_timeout_seconds between 30 and 600),
  -- Agora join privilege beyond the funded time (reference §2.2: ≤ 3 min).
  token_grace_seconds        integer not null default 60 constraint call_config_grace check (token_grace_seconds between 0 and 180),
  -- Agora reported a party left (not by quitting): the call ends at the
  -- leave unless they rejoin within this (reference §1.5: about 60 s).
  leave_grace_seconds        integer not null default 60 constraint call_config_leave_grace check (leave_grace_seconds between 10 and 600)
);
insert into app.call_config default values;
alter table app.call_config enable row level security;
alter table app.call_config force row level security;
grant select on app.call_config to authenticated, stagepass_service;
create policy call_config_read on app.call_config for select to authenticated, stagepass_service using (true);

-- A creator's call settings: public to signed-in users (a creator's
-- profile shows them), written only through app.set_call_settings.
create table app.call_settings (
  creator_id        uuid primary key references app.users (id),
  price_per_minute  bigint not null constraint call_settings_price_range check (price_per_minute between 1 and 10000),
  audio_enabled     boolean not null default false,
  video_enabled     boolean not null default false,
  updated_at        timestamptz not null default app.now()
);
alter table app.call_settings enable row level security;
alter table app.call_settings force row level security;
grant select on app.call_settings to authenticated, stagepass_service;
create policy call_settings_read on app.call_settings for select to authenticated, stagepass_service using (true);

-- Agora uids: server-assigned integers in 1 … 2³²−1, never 0.
create sequence app.agora_uids as bigint minvalue 1 maxvalue 4294967295 cycle;

create table app.calls (
  id                 uuid primary key,
  fan_id             uuid not null references app.users (id),
  creator_id         uuid not null references app.users (id),
  media              text not null constraint calls_media_check check (media in ('audio', 'video')),
  -- The creator's price when the fan asked: every minute of this call costs it.
  price_per_minute   bigint not null constraint calls_price_range check (price_per_minute between 1 and 10000),
  status             text not null default 'ringing' constraint calls_status_check
                     check (status in ('ringing', 'accepted', 'active', 'ended', 'declined', 'cancelled', 'expired')),
  -- The Agora channel (one per call) and the two parties' uids in it.
  channel            text not null constraint calls_channel_key unique,
  fan_uid            bigint not null constraint calls_fan_uid_range check (fan_uid between 1 and 4294967295),
  creator_uid        bigint not null constraint calls_creator_uid_range check (creator_uid between 1 and 4294967295),
  requested_at       timestamptz not null default app.now(),
  ring_until         timestamptz not null,
  accepted_at        timestamptz,
  join_until         timestamptz,
  fan_joined_at      timestamptz,
  creator_joined_at  timestamptz,
  -- Both parties joined: minute 1 starts.
  started_at         timestamptz,
  -- Last heartbeat (or join) of each party.
  fan_seen_at        timestamptz,
  creator_seen_at    timestamptz,
  -- Agora said the party left the channel (not by quitting), and the
  -- last event sequence of each party's client (older events are ignored).
  fan_left_at        timestamptz,
  creator_left_at    timestamptz,
  fan_client_seq     bigint,
  creator_client_seq bigint,
  -- Minutes paid into escrow so far (held or charged), and charged to the creator.
  funded_minutes     integer not null default 0,
  billed_minutes     integer not null default 0,
  -- A top-up was refused: the call ends when its funded time ends.
  funding_failed_at  timestamptz,
  -- The out-of-funds warnings sent (60, then 30 seconds before the end).
  warned_60          boolean not null default false,
  warned_30          boolean not null default false,
  ended_at           timestamptz,
  end_reason         text constraint calls_end_reason_check check (end_reason in
                       ('hung_up', 'heartbeat_timeout', 'funds_exhausted', 'not_joined', 'left_channel')),
  ended_by           uuid,
  refunded_tokens    bigint,
  sequence           integer not null default 0,
  created_at         timestamptz not null default app.now(),
  updated_at         timestamptz not null default app.now(),
  constraint calls_two_parties check (fan_id <> creator_id),
  constraint calls_billing_order check (billed_minutes between 0 and funded_minutes),
  constraint calls_ended_shape check ((status = 'ended') = (ended_at is not null and end_reason is not null))
)
-- Room on each page for the row's next versions: every minute of an active
-- call updates it (billed, funded), and an update that fits its page
-- touches none of the seven indexes (HOT).
with (fillfactor = 50);
-- A fan has one open call at a time; a creator is in one call at a time
-- (several may ring).
create unique index calls_fan_open on app.calls (fan_id) where status in ('ringing', 'accepted', 'active');
create unique index calls_creator_live on app.calls (creator_id) where status in ('accepted', 'active');
create index calls_open on app.calls (id) where status in ('ringing', 'accepted', 'active');
create index calls_fan on app.calls (fan_id, created_at desc);
create index calls_creator on app.calls (creator_id, created_at desc);
create trigger calls_touch before update on app.calls
  for each row execute function app.touch_updated_at();

alter table app.calls enable row level security;
alter table app.calls force row level security;
grant select on app.calls to authenticated, stagepass_service;
create policy calls_read_party on app.calls for select to authenticated
  using (fan_id = auth.uid() or creator_id = auth.uid());
create policy calls_service_read on app.calls for select to stagepass_service using (true);

-- Until when the call is paid for: started_at + funded minutes; before the
-- start, the latest it could be (the join deadline + funded minutes).
create function app.call_funded_until(c app.calls) returns timestamptz
  language sql stable set search_path = '' as $$
  select case
    when c.status = 'active' then c.started_at + make_interval(mins => c.funded_minutes)
    when c.status = 'accepted' then c.join_until + make_interval(mins => c.funded_minutes)
  end
$$;
grant execute on function app.call_funded_until(app.calls) to authenticated, stagepass_service;

-- A call as the API returns it.
create view app.call_view with (security_invoker = true) as
  select c.id, c.fan_id, c.creator_id, c.media, c.price_per_minute, c.status, c.channel,
         c.requested_at, c.ring_until, c.accepted_at, c.join_until, c.started_at,
         c.fan_joined_at, c.creator_joined_at,
         greatest(c.fan_seen_at, c.creator_seen_at) as last_seen_at,
         c.funded_minutes, c.billed_minutes,
         c.billed_minutes * c.price_per_minute as charged_tokens,
         case when c.status in ('accepted', 'active') then (c.funded_minutes - c.billed_minutes) * c.price_per_minute
              else 0 end as held_tokens,
         app.call_funded_until(c) as funded_until,
         c.funding_failed_at is not null and c.status in ('accepted', 'active') as ending_for_funds,
         c.ended_at, c.end_reason, c.ended_by, c.refunded_tokens, c.sequence, c.created_at, c.updated_at
    from app.calls c;

grant select on app.call_view to authenticated, stagepass_service;

-- Minutes started at or before `p_at` of a call started at `p_started`
-- (minute N starts at p_started + (N−1) min); 0 before the start.
create function app.call_minutes_started(p_started timestamptz, p_at timestamptz) returns integer
  language sql immutable parallel safe set search_path = '' as $$
  select case when p_started is null or p_at < p_started then 0
              else floor(extract(epoch from (p_at - p_started)) / 60)::integer + 1 end
$$;

create function ledger.call_escrow(p_call uuid) returns uuid
  language sql stable security definer set search_path = '' as $$
  select id from ledger.accounts where kind = 'escrow' and reference = 'call:' || p_call::text
$$;
revoke all on function ledger.call_escrow(uuid) from public;

-- The call holds count toward the fan's daily spending limit (they are what
-- leaves the wallet); 'call_minute' moves escrow to the creator and debits
-- no wallet.
create or replace function ledger.is_spending(p_kind text) returns boolean
  language sql immutable parallel safe set search_path = '' as $$
  select p_kind in ('tip', 'class_enrollment', 'call_minute', 'call_hold')
$$;

-- The 24-hour spending window (migration 19) of many wallets in one query:
-- the sweep checks every fan's daily limit before a top-up, and one call of
-- the single-wallet function per fan cost ~50 µs (function-call overhead,
-- not the index reads). The single-wallet function is now this one with a
-- one-element array, so the window is defined once.
create function ledger.spent_last_24h_many(p_wallets uuid[])
  returns table (wallet uuid, spent bigint)
  language sql stable security definer set search_path = '' as $$
  with w as (select app.now() - interval '24 hours' as since,
                    date_trunc('hour', app.now() - interval '24 hours') as first_hour),
       ws as (select distinct x as wallet from unnest(p_wallets) x where x is not null)
  select ws.wallet,
         (coalesce((select sum(h.spent) from ledger.spend_hours h, w
                     where h.account_id = ws.wallet and h.hour > w.first_hour), 0)
        + coalesce((select -sum(e.amount)
                      from ledger.entries e join ledger.journals j on j.id = e.journal_id, w
                     where e.account_id = ws.wallet and e.amount < 0
                       and e.created_at > w.since
                       and e.created_at < w.first_hour + interval '1 hour'
                       and ledger.is_spending(j.kind)), 0))::bigint
    from ws
$$;
revoke all on function ledger.spent_last_24h_many(uuid[]) from public;

create or replace function ledger.spent_last_24h(p_wallet uuid) returns bigint
  language sql stable security definer set search_path = '' as $$
  select coalesce((select s.spent from ledger.spent_last_24h_many(array[p_wallet]) s), 0)
$$;

-- Posts many two- or three-leg journals in one pass (set-based: the sweep
-- bills thousands of minutes at once). Journal i, (p_kinds[i], p_refs[i]),
-- moves p_amounts[i] from p_from[i] to p_to[i], p_fees[i] of it to platform
-- revenue instead. The touched accounts are locked first, in id order (ADR
-- 0005), and each is updated once by its net change (an escrow that one
-- journal credits and another debits by as much is not written at all).
-- A (kind, reference) already posted is refused with SP002, as by
-- ledger.post. Returns the journals posted.
create function ledger.post_many(
  p_kinds text[], p_refs text[], p_from uuid[], p_to uuid[], p_amounts bigint[], p_fees bigint[]
) returns integer
  language plpgsql security definer set search_path = '' set client_min_messages = warning set jit = off as $$
declare
  revenue uuid := ledger.singleton('platform_revenue');
  n integer := coalesce(array_length(p_refs, 1), 0);
  posted integer;
begin
  if n = 0 then
    return 0;
  end if;
  if array_length(p_kinds, 1) <> n or array_length(p_from, 1) <> n or array_length(p_to, 1) <> n
     or array_length(p_amounts, 1) <> n or array_length(p_fees, 1) <> n
     or exists (select 1 from unnest(p_amounts, p_fees) x(a, f)
                 where a is null or f is null or a <= 0 or f < 0 or f > a) then
    raise exception 'malformed batch' using errcode = 'SP000';
  end if;
  create temporary table if not exists pg_temp.post_many_legs (
    journal_id uuid, account_id uuid, amount bigint) on commit drop;
  truncate pg_temp.post_many_legs;
  with input as (
    select k, r, f, t, a, fee from unnest(p_kinds, p_refs, p_from, p_to, p_amounts, p_fees) as i(k, r, f, t, a, fee)
  ), journals as (
    insert into ledger.journals (kind, reference, metadata)
    select k, r, null from input
    on conflict on constraint journals_kind_reference_key do nothing
    returning id, kind, reference
  )
  insert into pg_temp.post_many_legs (journal_id, account_id, amount)
  select j.id, leg.account, leg.amount
    from journals j join input i on i.k = j.kind and i.r = j.reference,
         lateral (values (i.f, -i.a), (i.t, i.a - i.fee), (revenue, i.fee)) as leg(account, amount)
   where leg.amount <> 0;
  select count(distinct journal_id) into posted from pg_temp.post_many_legs;
  if posted <> n then
    raise exception '% of % references already applied', n - posted, n using errcode = 'SP002';
  end if;
  create temporary table if not exists pg_temp.post_many_net (
    account_id uuid primary key, delta bigint) on commit drop;
  truncate pg_temp.post_many_net;
  insert into pg_temp.post_many_net
  select account_id, sum(amount) from pg_temp.post_many_legs group by account_id having sum(amount) <> 0;
  perform 1 from ledger.accounts a where a.id in (select account_id from pg_temp.post_many_net)
   order by a.id for update;
  update ledger.accounts a set balance = a.balance + d.delta
    from pg_temp.post_many_net d where a.id = d.account_id;
  insert into ledger.entries (journal_id, account_id, amount)
  select journal_id, account_id, amount from pg_temp.post_many_legs order by journal_id;
  return n;
end
$$;
revoke all on function ledger.post_many(text[], text[], uuid[], uuid[], bigint[], bigint[]) from public;

-- Wallets and escrows change balance all the time: new account rows leave
-- room for HOT updates too (existing pages keep theirs until rewritten).
alter table ledger.accounts set (fillfactor = 70);

-- Two per-row triggers of the ledger become per-statement ones (transition
-- tables), with the same effect: a sweep posts thousands of entries and
-- updates thousands of wallets in one statement each, and a per-row
-- function call cost ~100 µs a row (issue 11's benchmark: 0.4 s of a
-- 2,000-call sweep). For the one-row statements of ledger.post nothing
-- changes but the trigger's granularity.
--
-- balance.updated (migration 07): one message per wallet and transaction
-- with the balance at its end, now recorded for every wallet a statement
-- changed at once. Same columns, key and upsert as app.emit.
create function ledger.emit_balances_updated() returns trigger
  language plpgsql security definer set search_path = '' as $$
begin
  insert into app.outbox as o (kind, destination, name, payload, dedup_key, not_before)
  select 'realtime', 'user:' || n.owner_id::text, 'balance.updated',
         jsonb_build_object('balance', n.balance),
         'balance:' || n.id::text || ':' || pg_catalog.txid_current()::text, null
    from new_balances n join old_balances b on b.id = n.id
   where n.kind = 'wallet' and n.balance is distinct from b.balance
  on conflict on constraint outbox_dedup_key do update
    set payload = excluded.payload, not_before = excluded.not_before
    where o.delivered_at is null and o.claimed_until is null;
  return null;
end
$$;
revoke all on function ledger.emit_balances_updated() from public;
drop trigger accounts_balance_updated on ledger.accounts;
create trigger accounts_balance_updated after update on ledger.accounts
  referencing old table as old_balances new table as new_balances
  for each statement execute function ledger.emit_balances_updated();

-- The hourly spending totals (migration 19), summed per statement.
create function ledger.count_spending_entries() returns trigger
  language plpgsql security definer set search_path = '' as $$
begin
  insert into ledger.spend_hours as h (account_id, hour, spent)
  select e.account_id, date_trunc('hour', e.created_at), -sum(e.amount)
    from new_entries e join ledger.journals j on j.id = e.journal_id
   where e.amount < 0 and ledger.is_spending(j.kind)
   group by 1, 2
  on conflict (account_id, hour) do update set spent = h.spent + excluded.spent;
  return null;
end
$$;
revoke all on function ledger.count_spending_entries() from public;
drop trigger entries_count_spending on ledger.entries;
create trigger entries_count_spending after insert on ledger.entries
  referencing new table as new_entries
  for each statement execute function ledger.count_spending_entries();

-- Realtime: every change of a call's `sequence` tells both parties
-- (`call.updated` on `user:<id>`, message id `call:<call>:<sequence>:<party>`).
create function app.call_emit() returns trigger
  language plpgsql security definer set search_path = '' as $$
declare
  data jsonb;
  party uuid;
begin
  if tg_op = 'UPDATE' and new.sequence = old.sequence then
    return null;
  end if;
  data := jsonb_build_object(
    'call_id', new.id, 'status', new.status, 'fan_id', new.fan_id, 'creator_id', new.creator_id,
    'media', new.media, 'price_per_minute', new.price_per_minute, 'sequence', new.sequence,
    'ring_until', new.ring_until, 'started_at', new.started_at,
    'funded_until', app.call_funded_until(new), 'billed_minutes', new.billed_minutes,
    'ending_for_funds', new.funding_failed_at is not null and new.status in ('accepted', 'active'),
    'end_reason', new.end_reason);
  foreach party in array array[new.fan_id, new.creator_id] loop
    perform app.emit('realtime', 'user:' || party::text, 'call.updated', data,
      'call:' || new.id::text || ':' || new.sequence::text || ':' || party::text);
  end loop;
  return null;
end
$$;
create trigger calls_emit_insert after insert on app.calls
  for each row execute function app.call_emit();
create trigger calls_emit_update after update on app.calls
  for each row when (new.sequence is distinct from old.sequence) execute function app.call_emit();

-- The out-of-funds warnings, `call.ending` to both parties.
create function app.call_warn(c app.calls, p_seconds integer) returns void
  language plpgsql security definer set search_path = '' as $$
declare
  party uuid;
begin
  foreach party in array array[c.fan_id, c.creator_id] loop
    perform app.emit('realtime', 'user:' || party::text, 'call.ending',
      jsonb_build_object('call_id', c.id, 'ends_at', app.call_funded_until(c), 'seconds_left', p_seconds,
                         'reason', 'funds_exhausted'),
      'call.ending:' || c.id::text || ':' || p_seconds::text || ':' || party::text);
  end loop;
end
$$;
revoke all on function app.call_warn(app.calls, integer) from public;

-- The creator sets their call settings (SP070 not a creator).
create function app.set_call_settings(p_price bigint, p_audio boolean, p_video boolean)
  returns setof app.call_settings
  language plpgsql security definer set search_path = '' as $$
declare
  caller uuid := auth.uid();
begin
  perform 1 from app.users where id = caller and role = 'creator';
  if not found then
    raise exception 'only creators take calls' using errcode = 'SP070';
  end if;
  if p_price is null or p_price not between 1 and 10000 then
    raise exception 'price out of range' using errcode = 'SP071';
  end if;
  return query
  insert into app.call_settings as s (creator_id, price_per_minute, audio_enabled, video_enabled)
    values (caller, p_price, coalesce(p_audio, false), coalesce(p_video, false))
    on conflict (creator_id) do update
      set price_per_minute = excluded.price_per_minute, audio_enabled = excluded.audio_enabled,
          video_enabled = excluded.video_enabled, updated_at = app.now()
  returning s.*;
end
$$;
revoke all on function app.set_call_settings(bigint, boolean, boolean) from public;
grant execute on function app.set_call_settings(bigint, boolean, boolean) to authenticated;

-- A fan asks a creator for a call. The price is the creator's current
-- price, snapshotted on the call. Refused: SP072 not a creator taking calls
-- of this kind, SP073 the fan already has an open call, SP074 own call;
-- and by `ledger.lock_for_spend` (SP001 funds, SP003 debt, SP004 daily
-- limit) when the fan could not fund the first `hold_minutes` minutes.
-- Nothing moves yet: the hold is taken on accept.
create function app.request_call(p_id uuid, p_creator uuid, p_media text)
  returns setof app.call_view
  language plpgsql security definer set search_path = '' as $$
declare
  caller uuid := auth.uid();
  s app.call_settings;
  cfg app.call_config;
begin
  if caller is null then
    raise exception 'no authenticated user' using errcode = '28000';
  end if;
  if p_creator = caller then
    raise exception 'cannot call yourself' using errcode = 'SP074';
  end if;
  select * into cfg from app.call_config;
  select cs.* into s from app.call_settings cs join app.users u on u.id = cs.creator_id
   where cs.creator_id = p_creator and u.role = 'creator';
  if not found or (p_media = 'audio' and not s.audio_enabled) or (p_media = 'video' and not s.video_enabled)
     or p_media not in ('audio', 'video') then
    raise exception 'this creator does not take % calls', p_media using errcode = 'SP072';
  end if;
  -- An open call that is over by this time (rung out, silent, …) still counts
  -- until the sweep (or a look at it) ends it, within a minute.
  perform 1 from app.calls where fan_id = caller and status in ('ringing', 'accepted', 'active');
  if found then
    raise exception 'you already have an open call' using errcode = 'SP073';
  end if;
  perform ledger.lock_for_spend(caller, s.price_per_minute * cfg.hold_minutes);
  insert into app.calls (id, fan_id, creator_id, media, price_per_minute, channel, fan_uid, creator_uid, ring_until)
    values (p_id, caller, p_creator, p_media, s.price_per_minute, 'call_' || replace(p_id::text, '-', ''),
            nextval('app.agora_uids'), nextval('app.agora_uids'),
            app.now() + make_interval(secs => cfg.ring_seconds));
  insert into ledger.accounts (kind, owner_id, reference) values ('escrow', caller, 'call:' || p_id::text);
  return query select * from app.call_view where id = p_id;
end
$$;
revoke all on function app.request_call(uuid, uuid, text) from public;
grant execute on function app.request_call(uuid, uuid, text) to authenticated;

-- Locks a call the caller is a party to (SP075 unknown or not theirs).
create function app.lock_party_call(p_call uuid) returns app.calls
  language plpgsql security definer set search_path = '' as $$
declare
  c app.calls;
begin
  select * into c from app.calls where id = p_call for update;
  if not found or auth.uid() is null or auth.uid() not in (c.fan_id, c.creator_id) then
    raise exception 'call not found' using errcode = 'SP075';
  end if;
  return c;
end
$$;
revoke all on function app.lock_party_call(uuid) from public;

-- Charges every due minute of the given calls, tops their escrow up one
-- minute ahead, ends those whose time is up (silence, funds, no join,
-- unanswered), in a few set-based statements. The caller has locked the
-- calls' rows. Returns the minutes charged.
create function app.advance_calls(p_ids uuid[]) returns integer
  language plpgsql security definer set search_path = '' set client_min_messages = warning set jit = off as $$
declare
  cfg app.call_config;
  fee_bps integer;
  charged integer;
  k app.calls;
begin
  if coalesce(array_length(p_ids, 1), 0) = 0 then
    return 0;
  end if;
  select * into cfg from app.call_config;
  select platform_fee_bps into fee_bps from ledger.settings;
  -- The calls, as a table: `= any (array)` would compare every row with
  -- every element (quadratic for a sweep of thousands).
  create temporary table if not exists pg_temp.call_ids (id uuid primary key) on commit drop;
  truncate pg_temp.call_ids;
  insert into pg_temp.call_ids select distinct i from unnest(p_ids) i where i is not null;
  analyze pg_temp.call_ids;
  -- Every account this may touch, in one pass in id order (the parties'
  -- wallets and debts, the escrows, revenue when a fee is due): a tip
  -- locks its two wallets the same way, so the two cannot deadlock.
  perform 1 from ledger.accounts a
   where (a.reference is null and a.kind in ('wallet', 'debt')
          and a.owner_id in (select x.fan_id from app.calls x where x.id in (select id from pg_temp.call_ids)
                             union select x.creator_id from app.calls x where x.id in (select id from pg_temp.call_ids)))
      or (a.kind = 'escrow' and a.reference in (select 'call:' || i::text from unnest(p_ids) i))
      or (fee_bps > 0 and a.kind = 'platform_revenue' and a.owner_id is null and a.reference is null)
   order by a.id for update;

  -- 1–2, repeated while a call still has a started minute it could pay
  -- for (a late sweep catches up minute by minute, topping up as it goes).
  create temporary table if not exists pg_temp.call_step (
    id uuid primary key, fan_id uuid, creator_id uuid, price bigint, billed integer,
    new_billed integer, funded integer, started integer, clock_started integer, wants_topup boolean,
    ok boolean) on commit drop;
  charged := 0;
  for pass in 1 .. 60 loop
    -- 1. The minutes started up to the last sign of life (and now), never
    --    beyond what was funded, are charged (escrow → creator, less the
    --    fee); 2. the escrow is topped up so the minute after the current
    --    one (by the clock, whether or not anyone was heard from in it) is
    --    held, if the fan may still spend it (no debt, the tokens, the daily
    --    limit; a fan has one open call, so each wallet appears once): the
    --    funded time runs ahead of the talk, so running out of funds is
    --    seen, and warned about, a minute early. A silence ends the call at
    --    its last sign of life and refunds what was held beyond it.
    --    Both in one posting: the escrow's debit and credit cancel out.
    truncate pg_temp.call_step;
    insert into pg_temp.call_step (id, fan_id, creator_id, price, billed, new_billed, funded, started,
                                   clock_started, wants_topup, ok)
    select c.id, c.fan_id, c.creator_id, c.price_per_minute, c.billed_minutes,
           greatest(c.billed_minutes, least(c.funded_minutes, x.started)), c.funded_minutes, x.started,
           app.call_minutes_started(c.started_at, app.now()),
           c.funding_failed_at is null
             and c.funded_minutes < app.call_minutes_started(c.started_at, app.now()) + 1,
           false
      from app.calls c,
           -- least() skips nulls: a leave Agora reported also bounds it.
           lateral (select app.call_minutes_started(c.started_at,
                      least(app.now(), greatest(c.fan_seen_at, c.creator_seen_at),
                            c.fan_left_at, c.creator_left_at)) as started) x
     where c.id in (select id from pg_temp.call_ids) and c.status = 'active';
    delete from pg_temp.call_step where new_billed = billed and not wants_topup;
    update pg_temp.call_step t
       set ok = w.balance >= t.price
                and (select d.balance from ledger.accounts d
                      where d.kind = 'debt' and d.owner_id = t.fan_id and d.reference is null) = 0
                and sp.spent + t.price <= app.daily_spend_limit(t.fan_id)
      from ledger.accounts w,
           ledger.spent_last_24h_many(array(
             select ledger.account_of('wallet', x.fan_id) from pg_temp.call_step x where x.wants_topup)) sp
     where t.wants_topup and w.kind = 'wallet' and w.owner_id = t.fan_id and w.reference is null
       and sp.wallet = w.id;
    perform ledger.post_many(array_agg(l.kind), array_agg(l.ref), array_agg(l.src), array_agg(l.dst),
                             array_agg(l.amount), array_agg(l.fee))
      from (select 'call_minute'::text as kind, s.id::text || ':' || m as ref, ledger.call_escrow(s.id) as src,
                   ledger.account_of('wallet', s.creator_id) as dst, s.price as amount,
                   (s.price * fee_bps) / 10000 as fee
              from pg_temp.call_step s, generate_series(s.billed + 1, s.new_billed) m
            union all
            select 'call_hold', s.id::text || ':' || (s.funded + 1), ledger.account_of('wallet', s.fan_id),
                   ledger.call_escrow(s.id), s.price, 0::bigint
              from pg_temp.call_step s where s.ok) l
    having count(*) > 0;
    charged := charged + (select coalesce(sum(new_billed - billed), 0) from pg_temp.call_step);
    update app.calls c
       set billed_minutes = s.new_billed, funded_minutes = s.funded + case when s.ok then 1 else 0 end
      from pg_temp.call_step s where c.id = s.id;
    -- A refused top-up: the call ends with its funded time; first warning now.
    update app.calls c set funding_failed_at = app.now(), warned_60 = true, sequence = c.sequence + 1
      from pg_temp.call_step s where c.id = s.id and s.wants_topup and not s.ok;
    for k in select x.* from app.calls x join pg_temp.call_step s on s.id = x.id and s.wants_topup and not s.ok loop
      perform app.call_warn(k, 60);
      perform app.emit('job', 'call-tick', null, jsonb_build_object('call_id', k.id),
        'call-tick:' || k.id::text || ':warn', app.call_funded_until(k) - interval '30 seconds');
      perform app.emit('job', 'call-tick', null, jsonb_build_object('call_id', k.id),
        'call-tick:' || k.id::text || ':end', app.call_funded_until(k));
    end loop;
    -- Another pass only for a call that just got a minute held and has
    -- more minutes started than charged, or is still not a minute ahead of
    -- the clock (a late sweep catching up).
    exit when not exists (
      select 1 from pg_temp.call_step s
       where s.ok and (s.started > s.new_billed or s.funded + 1 < s.clock_started + 1));
  end loop;
  -- The second warning, 30 s before a funded end that will not move.
  for k in select x.* from app.calls x
            where x.id in (select id from pg_temp.call_ids) and x.status = 'active' and x.funding_failed_at is not null
              and not x.warned_30 and app.now() >= app.call_funded_until(x) - interval '30 seconds'
              and app.now() < app.call_funded_until(x) loop
    update app.calls set warned_30 = true, sequence = sequence + 1 where id = k.id;
    perform app.call_warn(k, 30);
  end loop;

  -- 3. End what is over.
  for k in select x.* from app.calls x
            where x.id in (select id from pg_temp.call_ids)
              and (   (x.status = 'ringing' and app.now() >= x.ring_until)
                   or (x.status = 'accepted' and app.now() >= x.join_until)
                   or (x.status = 'active'
                       and (app.now() - greatest(x.fan_seen_at, x.creator_seen_at)
                              >= make_interval(secs => cfg.heartbeat_timeout_seconds)
                            or (x.funding_failed_at is not null and app.now() >= app.call_funded_until(x))
                            or app.now() - least(x.fan_left_at, x.creator_left_at)
                              >= make_interval(secs => cfg.leave_grace_seconds))))
            order by x.id loop
    if k.status = 'ringing' and app.now() >= k.ring_until then
      update app.calls set status = 'expired', sequence = sequence + 1 where id = k.id;
    elsif k.status = 'accepted' and app.now() >= k.join_until then
      perform app.end_call(k.id, 'not_joined', null, k.join_until);
    elsif k.status = 'active'
          and app.now() - greatest(k.fan_seen_at, k.creator_seen_at)
              >= make_interval(secs => cfg.heartbeat_timeout_seconds) then
      perform app.end_call(k.id, 'heartbeat_timeout', null, greatest(k.fan_seen_at, k.creator_seen_at));
    elsif k.status = 'active' and app.now() - least(k.fan_left_at, k.creator_left_at)
                                  >= make_interval(secs => cfg.leave_grace_seconds) then
      perform app.end_call(k.id, 'left_channel', null, least(k.fan_left_at, k.creator_left_at));
    elsif k.status = 'active' and k.funding_failed_at is not null
          and app.now() >= app.call_funded_until(k) then
      perform app.end_call(k.id, 'funds_exhausted', null, app.call_funded_until(k));
    end if;
  end loop;
  return charged;
end
$$;
revoke all on function app.advance_calls(uuid[]) from public;

-- Ends an accepted or active call (locked by the caller) at `p_at`:
-- charges every minute started before then (up to what was funded),
-- refunds the rest of the escrow to the fan, and records why, all in this
-- transaction. Repeating it on an ended call changes nothing.
create function app.end_call(p_call uuid, p_reason text, p_by uuid, p_at timestamptz) returns void
  language plpgsql security definer set search_path = '' as $$
declare
  c app.calls;
  escrow uuid := ledger.call_escrow(p_call);
  due integer;
  fee_bps integer;
  rest bigint;
begin
  select * into c from app.calls where id = p_call for update;
  if c.status not in ('accepted', 'active') then
    return;
  end if;
  if c.status = 'active' then
    due := least(c.funded_minutes, greatest(c.billed_minutes,
             app.call_minutes_started(c.started_at, least(p_at, app.call_funded_until(c)) - interval '1 microsecond')));
    due := greatest(due, 1);
    if due > c.billed_minutes then
      select platform_fee_bps into fee_bps from ledger.settings;
      perform ledger.post_many(array_agg('call_minute'::text order by m),
        array_agg(c.id::text || ':' || m order by m),
        array_agg(escrow order by m),
        array_agg(ledger.account_of('wallet', c.creator_id) order by m),
        array_agg(c.price_per_minute order by m),
        array_agg((c.price_per_minute * fee_bps) / 10000 order by m))
        from generate_series(c.billed_minutes + 1, due) m;
      c.billed_minutes := due;
    end if;
  end if;
  select balance into rest from ledger.accounts where id = escrow for update;
  if rest <> (c.funded_minutes - c.billed_minutes) * c.price_per_minute then
    raise exception 'escrow of call % holds % but % minutes of % are unused', p_call, rest,
      c.funded_minutes - c.billed_minutes, c.price_per_minute using errcode = 'SP000';
  end if;
  if rest > 0 then
    perform ledger.refund_to_user('call_refund', p_call::text, escrow, c.fan_id, rest,
      jsonb_build_object('call_id', p_call, 'reason', p_reason));
  end if;
  update app.calls
     set status = 'ended', billed_minutes = c.billed_minutes, ended_at = greatest(p_at, coalesce(c.started_at, c.accepted_at)),
         end_reason = p_reason, ended_by = p_by, refunded_tokens = rest, sequence = sequence + 1
   where id = p_call;
end
$$;
revoke all on function app.end_call(uuid, text, uuid, timestamptz) from public;

-- The creator answers a ringing call. Accepting holds the first minutes
-- from the fan's wallet (refused, and nothing moves, when the fan cannot
-- pay them: SP001/SP003/SP004), and opens the join window. SP076: the call
-- is no longer ringing (a call whose 2 minutes ran out is expired now and
-- returned, so the expiry commits; the caller answers 409); SP078: the creator
-- is already in a call; SP079: only the creator answers.
-- An answer repeated with the same meaning returns the call unchanged.
create function app.answer_call(p_call uuid, p_accept boolean) returns setof app.call_view
  language plpgsql security definer set search_path = '' as $$
declare
  c app.calls := app.lock_party_call(p_call);
  cfg app.call_config;
  w record;
begin
  if c.creator_id <> auth.uid() then
    raise exception 'only the creator answers a call' using errcode = 'SP079';
  end if;
  if (p_accept and c.status in ('accepted', 'active')) or (not p_accept and c.status = 'declined') then
    return query select * from app.call_view where id = p_call;
    return;
  end if;
  if c.status <> 'ringing' then
    raise exception 'the call is %', c.status using errcode = 'SP076';
  end if;
  if app.now() >= c.ring_until then
    -- Rung out: recorded at once (not left to the sweep); the caller sees
    -- the status and answers 409 call_rang_out after committing it.
    update app.calls set status = 'expired', sequence = sequence + 1 where id = p_call;
    return query select * from app.call_view where id = p_call;
    return;
  end if;
  if not p_accept then
    update app.calls set status = 'declined', sequence = sequence + 1 where id = p_call;
    return query select * from app.call_view where id = p_call;
    return;
  end if;
  perform 1 from app.calls where creator_id = c.creator_id and status in ('accepted', 'active');
  if found then
    raise exception 'already in a call' using errcode = 'SP078';
  end if;
  select * into cfg from app.call_config;
  -- Both wallets in id order (the creator's is credited by later minutes).
  perform 1 from ledger.accounts a
   where a.kind = 'wallet' and a.reference is null and a.owner_id in (c.fan_id, c.creator_id)
   order by a.id for update;
  select * into w from ledger.lock_for_spend(c.fan_id, c.price_per_minute * cfg.hold_minutes);
  perform ledger.post('call_hold', p_call::text || ':' || cfg.hold_minutes,
    array[w.wallet, ledger.call_escrow(p_call)],
    array[-c.price_per_minute * cfg.hold_minutes, c.price_per_minute * cfg.hold_minutes],
    jsonb_build_object('call_id', p_call, 'minutes', cfg.hold_minutes));
  update app.calls
     set status = 'accepted', accepted_at = app.now(), funded_minutes = cfg.hold_minutes,
         join_until = app.now() + make_interval(secs => cfg.join_seconds), sequence = sequence + 1
   where id = p_call;
  return query select * from app.call_view where id = p_call;
end
$$;
revoke all on function app.answer_call(uuid, boolean) from public;
grant execute on function app.answer_call(uuid, boolean) to authenticated;

-- The fan withdraws a ringing request (no money was held). Repeating it
-- returns the call; SP076 once it is no longer ringing (end it instead).
create function app.cancel_call(p_call uuid) returns setof app.call_view
  language plpgsql security definer set search_path = '' as $$
declare
  c app.calls := app.lock_party_call(p_call);
begin
  if c.fan_id <> auth.uid() then
    raise exception 'only the fan cancels a request' using errcode = 'SP079';
  end if;
  if c.status = 'ringing' then
    update app.calls set status = 'cancelled', sequence = sequence + 1 where id = p_call;
  elsif c.status <> 'cancelled' then
    raise exception 'the call is %', c.status using errcode = 'SP076';
  end if;
  return query select * from app.call_view where id = p_call;
end
$$;
revoke all on function app.cancel_call(uuid) from public;
grant execute on function app.cancel_call(uuid) to authenticated;

-- A party says they joined the channel (or are still there: `p_join`
-- false is a heartbeat). When both have joined, the call starts and its
-- first minute is charged. Due minutes are charged and the escrow topped
-- up on every heartbeat. SP076 when the call is not accepted/active (an
-- ended call tells the client to leave).
create function app.call_presence(p_call uuid, p_join boolean) returns setof app.call_view
  language plpgsql security definer set search_path = '' as $$
declare
  c app.calls := app.lock_party_call(p_call);
  me uuid := auth.uid();
  is_fan boolean;
begin
  is_fan := c.fan_id = me;
  if c.status not in ('accepted', 'active') then
    raise exception 'the call is %', c.status using errcode = 'SP076';
  end if;
  -- Whatever is already over ends first (a late heartbeat never revives a
  -- call that timed out or ran out of funds). That end is returned, not
  -- raised, so it commits: the caller answers 409 with the call ended.
  perform app.advance_calls(array[p_call]);
  select * into c from app.calls where id = p_call;
  if c.status not in ('accepted', 'active') then
    return query select * from app.call_view where id = p_call;
    return;
  end if;
  if p_join then
    update app.calls
       set fan_joined_at = case when is_fan then coalesce(fan_joined_at, app.now()) else fan_joined_at end,
           creator_joined_at = case when is_fan then creator_joined_at else coalesce(creator_joined_at, app.now()) end,
           fan_seen_at = case when is_fan then app.now() else fan_seen_at end,
           creator_seen_at = case when is_fan then creator_seen_at else app.now() end,
           fan_left_at = case when is_fan then null else fan_left_at end,
           creator_left_at = case when is_fan then creator_left_at else null end,
           sequence = case when (case when is_fan then fan_joined_at else creator_joined_at end) is null
                           then sequence + 1 else sequence end
     where id = p_call
    returning * into c;
    if c.status = 'accepted' and c.fan_joined_at is not null and c.creator_joined_at is not null then
      update app.calls
         set status = 'active', started_at = app.now(), fan_seen_at = app.now(), creator_seen_at = app.now(),
             sequence = sequence + 1
       where id = p_call;
    end if;
  else
    update app.calls
       set fan_seen_at = case when is_fan then app.now() else fan_seen_at end,
           creator_seen_at = case when is_fan then creator_seen_at else app.now() end
     where id = p_call;
  end if;
  perform app.advance_calls(array[p_call]);
  return query select * from app.call_view where id = p_call;
end
$$;
revoke all on function app.call_presence(uuid, boolean) from public;
grant execute on function app.call_presence(uuid, boolean) to authenticated;

-- Either party hangs up an accepted or active call: it is settled now.
-- Repeating it returns the ended call; SP076 for a call that never
-- connected (cancel or decline it instead).
create function app.hang_up_call(p_call uuid) returns setof app.call_view
  language plpgsql security definer set search_path = '' as $$
declare
  c app.calls := app.lock_party_call(p_call);
begin
  perform app.advance_calls(array[p_call]);
  select * into c from app.calls where id = p_call;
  if c.status in ('accepted', 'active') then
    perform app.end_call(p_call, 'hung_up', auth.uid(), app.now());
  elsif c.status <> 'ended' then
    raise exception 'the call is %', c.status using errcode = 'SP076';
  end if;
  return query select * from app.call_view where id = p_call;
end
$$;
revoke all on function app.hang_up_call(uuid) from public;
grant execute on function app.hang_up_call(uuid) to authenticated;

-- What a party needs to join the channel: its uid and until when the call
-- is funded (the Agora token's join privilege follows it). SP076 unless
-- accepted or active.
create function app.call_join_grant(p_call uuid)
  returns table (channel text, uid bigint, funded_until timestamptz, issued_at timestamptz, grace_seconds integer,
                 status text)
  language plpgsql security definer set search_path = '' as $$
declare
  c app.calls := app.lock_party_call(p_call);
begin
  if c.status not in ('accepted', 'active') then
    raise exception 'the call is %', c.status using errcode = 'SP076';
  end if;
  -- An end this finds is returned (status), not raised, so it commits.
  perform app.advance_calls(array[p_call]);
  select * into c from app.calls where id = p_call;
  return query select c.channel, case when c.fan_id = auth.uid() then c.fan_uid else c.creator_uid end,
    app.call_funded_until(c), app.now(), (select token_grace_seconds from app.call_config), c.status;
end
$$;
revoke all on function app.call_join_grant(uuid) from public;
grant execute on function app.call_join_grant(uuid) to authenticated;

-- Service path (the per-minute sweep, the call-tick job): advances up to
-- `p_limit` open calls that have something due, skipping rows another
-- transaction holds. Duplicate, concurrent, late or skipped runs charge
-- exactly the minutes due (by index). Returns (calls, minutes charged).
create function app.sweep_calls(p_limit integer, p_only uuid default null)
  returns table (swept_calls integer, charged_minutes integer)
  language plpgsql security definer set search_path = '' as $$
declare
  ids uuid[];
begin
  select array_agg(id order by id) into ids from (
    select c.id from app.calls c
     where c.status in ('ringing', 'accepted', 'active') and (p_only is null or c.id = p_only)
       and (   (c.status = 'ringing' and c.ring_until <= app.now())
            or (c.status = 'accepted' and c.join_until <= app.now())
            or (c.status = 'active'
                and (app.call_minutes_started(c.started_at, app.now()) > c.billed_minutes
                     or c.funded_minutes < app.call_minutes_started(c.started_at, app.now()) + 1
                     or c.funding_failed_at is not null
                     or least(c.fan_left_at, c.creator_left_at) is not null
                     or app.now() - greatest(c.fan_seen_at, c.creator_seen_at)
                        >= make_interval(secs => (select heartbeat_timeout_seconds from app.call_config)))))
     order by c.id
     limit least(greatest(p_limit, 1), 20000)
     for update skip locked) x;
  return query select coalesce(array_length(ids, 1), 0), app.advance_calls(ids);
end
$$;
revoke all on function app.sweep_calls(integer, uuid) from public;
grant execute on function app.sweep_calls(integer, uuid) to stagepass_service;

-- Agora's channel events (NCS, reference §1.5), recorded once per noticeId
-- (Agora resends up to 3 times, and may duplicate or reorder events). They
-- corroborate; the billing clock is ours. What they change: a party's
-- leave that is not a quit (timeout, ban, new device, token expiry, …)
-- ends the call at the leave unless the party rejoins within
-- `leave_grace_seconds`; a rejoin clears it. Events older than the last
-- seen `clientSeq` of that party's client change nothing.
create table app.agora_notices (
  notice_id    text primary key constraint agora_notices_id_length check (char_length(notice_id) between 1 and 200),
  event_type   integer not null,
  channel      text,
  uid          bigint,
  outcome      text not null,
  received_at  timestamptz not null default app.now()
);
create index agora_notices_received on app.agora_notices (received_at);
alter table app.agora_notices enable row level security;
alter table app.agora_notices force row level security;
grant select, insert, delete on app.agora_notices to stagepass_service;
create policy agora_notices_service on app.agora_notices for all to stagepass_service using (true) with check (true);

-- Applies one notice (service path); returns what it did: 'duplicate',
-- 'ignored' (not an RTC join/leave of a call's party), 'stale' (an older
-- clientSeq), 'joined', 'left' (the grace starts), 'quit'.
create function app.apply_agora_notice(
  p_notice_id text, p_product integer, p_event integer, p_channel text, p_uid bigint,
  p_client_seq bigint, p_reason integer
) returns text
  language plpgsql security definer set search_path = '' as $$
declare
  c app.calls;
  is_fan boolean;
  last_seq bigint;
  outcome text;
begin
  -- 101/102 channel create/destroy; 103/104 host, 105/106 audience,
  -- 107/108 communication-profile join/leave.
  if p_product is distinct from 1 or p_event not in (103, 104, 105, 106, 107, 108)
     or p_channel is null or p_uid is null then
    outcome := 'ignored';
  else
    select * into c from app.calls where channel = p_channel for update;
    if not found or p_uid not in (c.fan_uid, c.creator_uid) or c.status not in ('accepted', 'active') then
      outcome := 'ignored';
    else
      is_fan := p_uid = c.fan_uid;
      last_seq := case when is_fan then c.fan_client_seq else c.creator_client_seq end;
      if p_client_seq is not null and last_seq is not null and p_client_seq <= last_seq then
        outcome := 'stale';
      elsif p_event in (103, 105, 107) then
        outcome := 'joined';
        update app.calls
           set fan_left_at = case when is_fan then null else fan_left_at end,
               creator_left_at = case when is_fan then creator_left_at else null end,
               fan_client_seq = case when is_fan then coalesce(p_client_seq, fan_client_seq) else fan_client_seq end,
               creator_client_seq = case when is_fan then creator_client_seq else coalesce(p_client_seq, creator_client_seq) end
         where id = c.id;
      else
        -- Reason 1 is a quit: the client hangs up through the API (or goes
        -- silent and times out); every other reason starts the grace.
        outcome := case when p_reason = 1 then 'quit' else 'left' end;
        update app.calls
           set fan_left_at = case when is_fan and p_reason is distinct from 1
                                  then coalesce(fan_left_at, app.now()) else fan_left_at end,
               creator_left_at = case when not is_fan and p_reason is distinct from 1
                                      then coalesce(creator_left_at, app.now()) else creator_left_at end,
               fan_client_seq = case when is_fan then coalesce(p_client_seq, fan_client_seq) else fan_client_seq end,
               creator_client_seq = case when is_fan then creator_client_seq else coalesce(p_client_seq, creator_client_seq) end
         where id = c.id;
      end if;
    end if;
  end if;
  insert into app.agora_notices (notice_id, event_type, channel, uid, outcome)
    values (p_notice_id, p_event, p_channel, p_uid, outcome)
    on conflict (notice_id) do nothing;
  if not found then
    -- A concurrent delivery of the same notice got there first: nothing
    -- of this one counts.
    raise exception 'duplicate notice' using errcode = 'SP080';
  end if;
  return outcome;
end
$$;
revoke all on function app.apply_agora_notice(text, integer, integer, text, bigint, bigint, integer) from public;
grant execute on function app.apply_agora_notice(text, integer, integer, text, bigint, bigint, integer) to stagepass_service;

-- Notices are kept 7 days (Agora retries within minutes); the cleanup cron
-- prunes older ones.
create function app.prune_agora_notices() returns bigint
  language sql security definer set search_path = '' as $$
  with gone as (delete from app.agora_notices where received_at < app.now() - interval '7 days' returning 1)
  select count(*) from gone
$$;
revoke all on function app.prune_agora_notices() from public;
grant execute on function app.prune_agora_notices() to stagepass_service;
