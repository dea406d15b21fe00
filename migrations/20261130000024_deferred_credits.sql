-- Popular creators without a queue: deferred credits (issue 13, part 3;
-- docs/adr/0021-deferred-credits-for-hot-creators.md).
--
-- A credit can never overdraw, so it need not lock the balance the way a
-- spend must. A tip's credits (the creator's share, the platform's fee) are
-- appended to `ledger.entries` as before and recorded in
-- `ledger.pending_credits`; the account row is neither updated nor locked,
-- so tips into one creator no longer wait for each other's commit.
--
-- The rules that keep every invariant of SPEC §2 exact:
--
-- 1. An account's balance is its row plus its pending credits, read in one
--    statement (one snapshot: a concurrent fold, which deletes pending rows
--    and adds them to the row in one transaction, is seen whole or not at
--    all). `ledger.balances` and `ledger.pending_of` are the only readers.
-- 2. Every debit folds first, under the row lock it already takes
--    (`ledger.fold_locked`): `lock_for_spend`, `ledger.post` and
--    `ledger.post_many` for every debited leg, the claw-back, the payout
--    hold, the call sweep's top-up check. The funds check, the sign
--    constraint and the daily limit then see every committed credit, and
--    the row never exceeds row + pending, so nothing can overdraw.
-- 3. Folds are bookkeeping, not money movements: `app.fold_credits` runs
--    after each tip's response for its recipient, and the outbox cron
--    folds whatever a lost kick left (`app.fold_all_credits`). A fold
--    locks the account row, so its `balance.updated` message (the
--    statement trigger on `ledger.accounts`) is ordered by that lock: the
--    last message of a wallet carries its balance once the last fold ran.
-- 4. The audit checks row + pending = Σ entries, and that each pending
--    row matches its own entry (same account, same positive amount).
-- 5. Balance rows are locked `for no key update` (what an UPDATE of the
--    balance takes anyway), no longer `for update`. Inserting an entry or a
--    pending credit checks its foreign key with `for key share` on the
--    account row; `for update` conflicts with that, `for no key update`
--    does not. With `for update`, a tip from A to B (holding A, crediting
--    B) and one from B to A (holding B, crediting A) deadlocked on each
--    other's foreign-key check, and every tip into a creator waited for a
--    fold of that creator.

create table ledger.pending_credits (
  entry_id    bigint primary key references ledger.entries (id),
  account_id  uuid not null references ledger.accounts (id),
  amount      bigint not null constraint pending_credits_amount_positive check (amount > 0)
);
create index pending_credits_account on ledger.pending_credits (account_id);
grant select on ledger.pending_credits to stagepass_service;

-- Credits recorded but not yet folded into `p_account`'s row. Stable: in a
-- statement it reads that statement's snapshot, like the row beside it.
create function ledger.pending_of(p_account uuid) returns bigint
  language sql stable security definer set search_path = '' as $$
  select coalesce(sum(amount), 0)::bigint from ledger.pending_credits where account_id = p_account
$$;
revoke all on function ledger.pending_of(uuid) from public;
grant execute on function ledger.pending_of(uuid) to stagepass_service;

-- Every account with its balance (row + pending), for the audit, the
-- tests and the benches.
create view ledger.balances as
  select a.id, a.kind, a.owner_id, a.reference,
         a.balance + ledger.pending_of(a.id) as balance,
         a.balance as folded_balance
    from ledger.accounts a;
revoke all on ledger.balances from public;
grant select on ledger.balances to stagepass_service;

-- Folds `p_account`'s pending credits into its row. The caller holds the
-- row's lock (`for no key update`): folds and debits of one account are then
-- serialised, and a pending row committed after this statement's snapshot
-- simply stays pending. Returns the amount folded.
create function ledger.fold_locked(p_account uuid) returns bigint
  language plpgsql security definer set search_path = '' as $$
declare
  total bigint;
begin
  with d as (delete from ledger.pending_credits where account_id = p_account returning amount)
  select sum(amount)::bigint into total from d;
  if total is not null then
    update ledger.accounts set balance = balance + total where id = p_account;
  end if;
  return coalesce(total, 0);
end
$$;
revoke all on function ledger.fold_locked(uuid) from public;

-- Locks `p_account`, folds its pending credits, returns its balance.
create function ledger.lock_and_fold(p_account uuid) returns bigint
  language plpgsql security definer set search_path = '' as $$
begin
  perform 1 from ledger.accounts where id = p_account for no key update;
  if not found then
    return null;
  end if;
  perform ledger.fold_locked(p_account);
  return (select balance from ledger.accounts where id = p_account);
end
$$;
revoke all on function ledger.lock_and_fold(uuid) from public;

-- Folds the accounts of `p_accounts` that have pending credits, locking
-- them in id order (as every multi-account lock here does). Returns how
-- many it folded.
create function ledger.fold_accounts(p_accounts uuid[]) returns integer
  language plpgsql security definer set search_path = '' as $$
declare
  account uuid;
  folded integer := 0;
begin
  for account in
    select a.id from ledger.accounts a
     where a.id = any (p_accounts)
       and exists (select 1 from ledger.pending_credits p where p.account_id = a.id)
     order by a.id for no key update of a
  loop
    if ledger.fold_locked(account) > 0 then
      folded := folded + 1;
    end if;
  end loop;
  return folded;
end
$$;
revoke all on function ledger.fold_accounts(uuid[]) from public;

-- After a tip's response: folds its recipients' wallets (users' ids). No
-- money moves, so the function login may call it for anyone.
create function app.fold_credits(p_users uuid[]) returns integer
  language sql security definer set search_path = '' as $$
  select ledger.fold_accounts(array(
    select a.id from ledger.accounts a
     where a.kind = 'wallet' and a.reference is null and a.owner_id = any (p_users)))
$$;
revoke all on function app.fold_credits(uuid[]) from public;
grant execute on function app.fold_credits(uuid[]) to stagepass_app, stagepass_service;

-- The outbox cron: folds up to `p_limit` accounts with pending credits
-- (platform revenue, and any recipient whose fold after the response was
-- lost to a crash).
create function app.fold_all_credits(p_limit integer) returns integer
  language sql security definer set search_path = '' as $$
  select ledger.fold_accounts(array(
    select distinct p.account_id from ledger.pending_credits p limit p_limit))
$$;
revoke all on function app.fold_all_credits(integer) from public;
grant execute on function app.fold_all_credits(integer) to stagepass_app, stagepass_service;

-- One balanced journal (as before), with debits folding first and, when
-- `p_defer_credits`, credits recorded as pending instead of applied.
create function ledger.post_legs(
  p_kind text, p_reference text, p_accounts uuid[], p_amounts bigint[], p_metadata jsonb,
  p_defer_credits boolean
) returns uuid
  language plpgsql security definer set search_path = '' as $$
declare
  journal uuid;
  entry bigint;
  i integer;
begin
  if coalesce(array_length(p_accounts, 1), 0) < 2
     or array_length(p_accounts, 1) <> array_length(p_amounts, 1) then
    raise exception 'a journal needs two or more legs' using errcode = 'SP000';
  end if;
  if (select sum(a) from unnest(p_amounts) a) <> 0 then
    raise exception 'journal legs do not sum to zero' using errcode = 'SP000';
  end if;
  insert into ledger.journals (kind, reference, metadata)
    values (p_kind, p_reference, p_metadata)
    on conflict on constraint journals_kind_reference_key do nothing
    returning id into journal;
  if journal is null then
    raise exception '% % already applied', p_kind, p_reference using errcode = 'SP002';
  end if;
  for i in 1 .. array_length(p_accounts, 1) loop
    if p_amounts[i] = 0 then
      continue;
    end if;
    if p_amounts[i] > 0 and p_defer_credits then
      insert into ledger.entries (journal_id, account_id, amount)
        values (journal, p_accounts[i], p_amounts[i]) returning id into entry;
      insert into ledger.pending_credits (entry_id, account_id, amount)
        values (entry, p_accounts[i], p_amounts[i]);
      continue;
    end if;
    if p_amounts[i] < 0 and ledger.lock_and_fold(p_accounts[i]) is null then
      raise exception 'unknown account %', p_accounts[i] using errcode = 'SP000';
    end if;
    update ledger.accounts set balance = balance + p_amounts[i] where id = p_accounts[i];
    if not found then
      raise exception 'unknown account %', p_accounts[i] using errcode = 'SP000';
    end if;
    insert into ledger.entries (journal_id, account_id, amount) values (journal, p_accounts[i], p_amounts[i]);
  end loop;
  return journal;
end
$$;
revoke all on function ledger.post_legs(text, text, uuid[], bigint[], jsonb, boolean) from public;

-- Every other journal applies its credits at once, as before.
create or replace function ledger.post(
  p_kind text, p_reference text, p_accounts uuid[], p_amounts bigint[], p_metadata jsonb
) returns uuid
  language sql security definer set search_path = '' as $$
  select ledger.post_legs(p_kind, p_reference, p_accounts, p_amounts, p_metadata, false)
$$;

-- The spend check, now on row + pending: the wallet's pending credits are
-- folded under the lock before the funds check.
create or replace function ledger.lock_for_spend(p_user uuid, p_amount bigint, out wallet uuid, out balance bigint)
  language plpgsql security definer set search_path = '' as $$
declare
  debt bigint;
  spent bigint;
  day_limit bigint;
begin
  select a.id, a.balance into wallet, balance
    from ledger.accounts a where a.kind = 'wallet' and a.owner_id = p_user and a.reference is null
    for no key update;
  if wallet is null then
    raise exception 'no wallet' using errcode = 'SP001';
  end if;
  balance := balance + ledger.fold_locked(wallet);
  select a.balance into debt from ledger.accounts a
    where a.kind = 'debt' and a.owner_id = p_user and a.reference is null;
  if debt < 0 then
    raise exception 'account in debt' using errcode = 'SP003', detail = (-debt)::text;
  end if;
  if balance < p_amount then
    raise exception 'insufficient funds' using errcode = 'SP001', detail = balance::text;
  end if;
  spent := ledger.spent_last_24h(wallet);
  day_limit := app.daily_spend_limit(p_user);
  if spent + p_amount > day_limit then
    raise exception 'daily spending limit' using errcode = 'SP004',
      detail = json_build_object('limit', day_limit, 'spent', spent)::text;
  end if;
end
$$;

-- A tip locks only its payer's wallet; the creator's share and the fee are
-- deferred credits. Everything else is as in migration 07.
create or replace function app.tip(p_tip_id uuid, p_recipient uuid, p_amount bigint, p_message text)
  returns table (journal_id uuid, balance bigint)
  language plpgsql security definer set search_path = '' as $$
declare
  payer uuid := auth.uid();
  payer_wallet uuid;
  payer_balance bigint;
  fee bigint;
  journal uuid;
begin
  if payer is null then
    raise exception 'no authenticated user' using errcode = '28000';
  end if;
  if p_amount < 1 or p_amount > 10000 then
    raise exception 'amount out of range' using errcode = 'SP010';
  end if;
  if p_recipient = payer then
    raise exception 'cannot tip yourself' using errcode = 'SP011';
  end if;
  perform 1 from app.users where id = p_recipient and role = 'creator';
  if not found then
    raise exception 'recipient is not a creator' using errcode = 'SP012';
  end if;
  select l.wallet, l.balance into payer_wallet, payer_balance from ledger.lock_for_spend(payer, p_amount) l;
  select (p_amount * platform_fee_bps) / 10000 into fee from ledger.settings;
  journal := ledger.post_legs(
    'tip', p_tip_id::text,
    array[payer_wallet, ledger.singleton('platform_revenue'), ledger.account_of('wallet', p_recipient)],
    array[-p_amount, fee, p_amount - fee],
    jsonb_build_object('from', payer, 'to', p_recipient, 'message', p_message),
    true);
  perform app.emit('realtime', 'user:' || p_recipient::text, 'tip.received',
    jsonb_build_object('tip_id', p_tip_id, 'from', payer, 'amount', p_amount - fee,
                       'message', p_message),
    'tip:' || p_tip_id::text);
  return query select journal, payer_balance - p_amount;
end
$$;

-- The caller's balance: row + pending, in this one statement.
create or replace function app.my_balance()
  returns table (balance bigint, debt bigint, spent_today bigint, daily_limit bigint, trust_level text)
  language sql stable security definer set search_path = '' as $$
  select w.balance + ledger.pending_of(w.id), -d.balance, ledger.spent_last_24h(w.id),
         app.daily_spend_limit(auth.uid()), app.trust_level(auth.uid())
  from ledger.accounts w
  join ledger.accounts d on d.kind = 'debt' and d.owner_id = w.owner_id and d.reference is null
  where w.kind = 'wallet' and w.owner_id = auth.uid() and w.reference is null
$$;

-- The debits and readers below are their latest definitions with one change
-- each: a fold under the locks they already take (ledger.post_many and
-- app.advance_calls, commented), `ledger.lock_and_fold` where they locked a
-- wallet to read its balance (ledger.payout_move's hold,
-- app.claw_back_purchase), `ledger.pending_of` beside a balance they answer
-- with (app.creator_payable, app.enroll for a free class,
-- app.apply_token_grant).

-- ---------------------------------------------------------------------------
create or replace function ledger.post_many(
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
   order by a.id for no key update;
  -- A debited account's deferred credits are folded first, under its lock.
  perform ledger.fold_locked(d.account_id) from pg_temp.post_many_net d
   where d.delta < 0 and exists (select 1 from ledger.pending_credits p where p.account_id = d.account_id);
  update ledger.accounts a set balance = a.balance + d.delta
    from pg_temp.post_many_net d where a.id = d.account_id;
  insert into ledger.entries (journal_id, account_id, amount)
  select journal_id, account_id, amount from pg_temp.post_many_legs order by journal_id;
  return n;
end
$$;

-- ---------------------------------------------------------------------------
create or replace function app.advance_calls(p_ids uuid[]) returns integer
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
  -- locks only its payer's wallet, so the two cannot deadlock.
  perform 1 from ledger.accounts a
   where (a.reference is null and a.kind in ('wallet', 'debt')
          and a.owner_id in (select x.fan_id from app.calls x where x.id in (select id from pg_temp.call_ids)
                             union select x.creator_id from app.calls x where x.id in (select id from pg_temp.call_ids)))
      or (a.kind = 'escrow' and a.reference in (select 'call:' || i::text from unnest(p_ids) i))
      or (fee_bps > 0 and a.kind = 'platform_revenue' and a.owner_id is null and a.reference is null)
   order by a.id for no key update;
  -- The fans' wallets are read for the top-up check below: their deferred
  -- credits (tips they received) are folded first, under the locks just taken.
  perform ledger.fold_locked(w.id) from ledger.accounts w
   where w.kind = 'wallet' and w.reference is null
     and w.owner_id in (select x.fan_id from app.calls x where x.id in (select id from pg_temp.call_ids))
     and exists (select 1 from ledger.pending_credits p where p.account_id = w.id);

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

-- ---------------------------------------------------------------------------
create or replace function ledger.payout_move(p_kind text, p_reference text, p_creator uuid, p_tokens bigint, p_payout uuid)
  returns boolean
  language plpgsql security definer set search_path = '' as $$
declare
  wallet uuid := ledger.account_of('wallet', p_creator);
  clearing uuid := ledger.singleton('payout_clearing');
  meta jsonb := jsonb_build_object('payout_id', p_payout);
begin
  case p_kind
    when 'payout_hold' then
      if ledger.lock_and_fold(wallet) < p_tokens then
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

-- ---------------------------------------------------------------------------
create or replace function app.claw_back_purchase(
  p_payment_intent text, p_kind text, p_reference text, p_amount_refunded_cents bigint
) returns bigint
  language plpgsql security definer set search_path = '' as $$
declare
  p app.purchases;
  target bigint;
  due bigint;
  in_wallet bigint;
  from_wallet bigint;
begin
  if p_kind not in ('refund', 'dispute') then
    raise exception 'bad claw-back kind' using errcode = '22023';
  end if;
  select * into p from app.purchases where stripe_payment_intent_id = p_payment_intent for update;
  if not found then
    return 0;
  end if;
  if p_kind = 'dispute' then
    target := p.tokens;
  else
    -- Proportional to the cumulative amount refunded, rounded up so a full
    -- refund takes every token back.
    target := least(p.tokens, (p.tokens * p_amount_refunded_cents + p.price_cents - 1) / p.price_cents);
  end if;
  if not exists (select 1 from ledger.journals j
                  where j.kind = 'purchase' and j.reference = p_payment_intent) then
    -- Never credited (events out of order): nothing to take back, and the
    -- later success must not credit.
    update app.purchases
       set status = case when p_kind = 'dispute' or p.status = 'disputed' then 'disputed'
                         else 'refunded' end
     where id = p.id;
    return 0;
  end if;
  due := target - p.tokens_clawed_back;
  if due > 0 then
    in_wallet := ledger.lock_and_fold(ledger.account_of('wallet', p.user_id));
    from_wallet := least(in_wallet, due);
    perform ledger.post(p_kind, p_reference,
      array[ledger.account_of('wallet', p.user_id), ledger.account_of('debt', p.user_id),
            ledger.singleton('stripe_clearing')],
      array[-from_wallet, -(due - from_wallet), due],
      jsonb_build_object('purchase_id', p.id, 'payment_intent', p_payment_intent));
  else
    due := 0;
  end if;
  update app.purchases
     set tokens_clawed_back = tokens_clawed_back + due,
         status = case when p_kind = 'dispute' or p.status = 'disputed' then 'disputed'
                       when target >= p.tokens then 'refunded' else status end
   where id = p.id;
  return due;
end
$$;

-- ---------------------------------------------------------------------------
create or replace function app.creator_payable(p_creator uuid, p_before timestamptz,
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
  select a.balance + ledger.pending_of(a.id) + coalesce((select d.balance from ledger.accounts d
                                where d.kind = 'debt' and d.owner_id = p_creator and d.reference is null), 0)
    into available from ledger.accounts a where a.id = wallet;
  payable := greatest(0, least(earned - paid, available));
end
$$;

-- ---------------------------------------------------------------------------
create or replace function app.enroll(p_class uuid, p_enrollment uuid)
  returns table (enrollment_id uuid, journal_id uuid, price_tokens bigint, balance bigint)
  language plpgsql security definer set search_path = '' as $$
#variable_conflict use_column
declare
  caller uuid := auth.uid();
  c app.classes;
  wallet uuid;
  wallet_balance bigint;
  journal uuid;
begin
  if caller is null then
    raise exception 'no authenticated user' using errcode = '28000';
  end if;
  select * into c from app.classes where id = p_class for update;
  if not found then
    raise exception 'class not found' using errcode = 'SP041';
  end if;
  if c.creator_id = caller then
    raise exception 'cannot enrol in your own class' using errcode = 'SP036';
  end if;
  if c.status <> 'scheduled' or c.starts_at <= app.now() then
    raise exception 'class is not open for enrolment' using errcode = 'SP031';
  end if;
  perform 1 from app.enrollments e
   where e.class_id = p_class and e.user_id = caller and e.status in ('enrolled', 'settled');
  if found then
    raise exception 'already enrolled' using errcode = 'SP032';
  end if;
  if c.seats_taken >= c.capacity then
    raise exception 'class is full' using errcode = 'SP030';
  end if;
  if c.price_tokens > 0 then
    select l.wallet, l.balance into wallet, wallet_balance from ledger.lock_for_spend(caller, c.price_tokens) l;
    journal := ledger.post('class_enrollment', p_enrollment::text,
      array[wallet, ledger.class_escrow(p_class)], array[-c.price_tokens, c.price_tokens],
      jsonb_build_object('class_id', p_class, 'user_id', caller));
    wallet_balance := wallet_balance - c.price_tokens;
  else
    select a.balance + ledger.pending_of(a.id) into wallet_balance from ledger.accounts a
     where a.kind = 'wallet' and a.owner_id = caller and a.reference is null;
  end if;
  insert into app.enrollments (id, class_id, user_id, price_tokens, charge_journal_id)
    values (p_enrollment, p_class, caller, c.price_tokens, journal);
  update app.classes set seats_taken = seats_taken + 1 where id = p_class;
  insert into app.calendar_events as ev (user_id, source_kind, source_id, role, title, starts_at, ends_at)
    values (caller, 'class', p_class, 'attendee', c.title, c.starts_at,
            c.starts_at + make_interval(mins => c.duration_minutes))
    on conflict on constraint calendar_events_source_key do update
      set status = 'confirmed', title = excluded.title, starts_at = excluded.starts_at,
          ends_at = excluded.ends_at, sequence = ev.sequence + 1;
  return query select p_enrollment, journal, c.price_tokens, wallet_balance;
end
$$;

-- ---------------------------------------------------------------------------
create or replace function app.apply_token_grant(
  p_grant uuid, p_user uuid, p_amount bigint, p_reason text, p_by uuid, p_actor text
) returns table (journal_id uuid, balance bigint)
  language plpgsql security definer set search_path = '' as $$
declare
  wallet uuid;
  journal uuid;
begin
  if p_amount is null or p_amount < 1 or p_amount > 10000 then
    raise exception 'grant amount out of range' using errcode = 'SP050';
  end if;
  if p_reason is null or char_length(btrim(p_reason)) not between 1 and 500
     or p_reason ~ '[[:cntrl:]]' then
    raise exception 'a grant needs a reason of 1–500 characters without control characters'
      using errcode = 'SP051';
  end if;
  if p_by is not null and p_by = p_user then
    raise exception 'admins cannot grant tokens to themselves' using errcode = 'SP052';
  end if;
  wallet := ledger.account_of('wallet', p_user);
  if wallet is null then
    raise exception 'user not found' using errcode = 'SP054';
  end if;
  -- Debit the issuer first, credit the wallet last (ledger.post's order).
  journal := ledger.post(
    'promotion', p_grant::text,
    array[ledger.singleton('promotions'), wallet],
    array[-p_amount, p_amount],
    jsonb_build_object('by', p_actor, 'reason', p_reason));
  insert into app.token_grants (id, user_id, amount, reason, granted_by, actor, journal_id)
    values (p_grant, p_user, p_amount, p_reason, p_by, p_actor, journal);
  return query select journal, a.balance + ledger.pending_of(a.id) from ledger.accounts a where a.id = wallet;
end
$$;

