-- Purchases, Stripe events, idempotency records, trust and spending limits,
-- and the user-facing money functions.

-- Admin-set facts about a user that only the service path may change.
alter table app.user_private
  add column vip_granted_at timestamptz,
  -- Per-user override of the daily spending limit (tokens per rolling 24 h).
  add column daily_spend_limit_tokens bigint
    constraint user_private_daily_limit_range check (daily_spend_limit_tokens between 0 and 10000000);

-- Token purchases by card. A row is created `pending` when the PaymentIntent
-- is created and only the signed `payment_intent.succeeded` webhook (or the
-- reconciliation job asking Stripe) moves it to `succeeded` and credits the
-- tokens, exactly once (journal ('purchase', payment_intent_id)).
create table app.purchases (
  id                        uuid primary key,
  user_id                   uuid not null references app.users (id),
  package                   text not null,
  tokens                    bigint not null constraint purchases_tokens_positive check (tokens > 0),
  price_cents               bigint not null constraint purchases_price_range check (price_cents between 50 and 1000000),
  stripe_payment_intent_id  text constraint purchases_payment_intent_key unique,
  status                    text not null default 'pending' constraint purchases_status_check
                              check (status in ('pending', 'succeeded', 'failed', 'canceled', 'refunded', 'disputed')),
  tokens_clawed_back        bigint not null default 0,
  created_at                timestamptz not null default now(),
  updated_at                timestamptz not null default now()
);
create index purchases_user on app.purchases (user_id, created_at desc);
create index purchases_pending on app.purchases (created_at) where status = 'pending';
create trigger purchases_touch before update on app.purchases
  for each row execute function app.touch_updated_at();

alter table app.purchases enable row level security;
alter table app.purchases force row level security;
grant select on app.purchases to authenticated;
create policy purchases_read_own on app.purchases for select to authenticated using (user_id = auth.uid());
grant select, insert, update on app.purchases to stagepass_service;
create policy purchases_service on app.purchases for all to stagepass_service using (true) with check (true);

-- Stripe events applied, recorded in the same transaction as their effect:
-- a redelivered event finds its id here and changes nothing; a failed effect
-- rolls the record back with it, so Stripe's retry applies it.
create table app.stripe_events (
  id          text primary key,
  type        text not null,
  applied_at  timestamptz not null default now()
);
alter table app.stripe_events enable row level security;
alter table app.stripe_events force row level security;
grant select, insert on app.stripe_events to stagepass_service;
create policy stripe_events_service on app.stripe_events for all to stagepass_service using (true) with check (true);

-- Idempotency records: scoped per user and route, with the request's
-- fingerprint and the response; written in the same transaction as the
-- effect. Expired records are removed by the cleanup cron.
create table app.idempotency_keys (
  user_id      uuid not null references app.users (id),
  route        text not null,
  key          text not null constraint idempotency_key_format check (key ~ '^[\x21-\x7e]{1,255}$'),
  fingerprint  text not null,
  status_code  smallint not null,
  response     jsonb not null,
  created_at   timestamptz not null default now(),
  expires_at   timestamptz not null,
  primary key (user_id, route, key)
);
create index idempotency_expiry on app.idempotency_keys (expires_at);
alter table app.idempotency_keys enable row level security;
alter table app.idempotency_keys force row level security;
grant select, insert, update on app.idempotency_keys to authenticated, stagepass_service;
grant delete on app.idempotency_keys to stagepass_service;
create policy idempotency_own on app.idempotency_keys for all to authenticated
  using (user_id = auth.uid()) with check (user_id = auth.uid());
create policy idempotency_service on app.idempotency_keys for all to stagepass_service
  using (true) with check (true);

-- Trust level, derived from account facts (SPEC §4), never stored by hand
-- except the admin's VIP grant. A chargeback drops anyone to basic.
create function app.trust_level(p_user uuid) returns text
  language sql stable security definer set search_path = '' as $$
  with facts as (
    select
      u.created_at,
      coalesce(p.email_verified, false) as email_verified,
      p.vip_granted_at is not null as vip,
      exists (select 1 from app.purchases x where x.user_id = u.id and x.status = 'disputed') as chargeback,
      exists (select 1 from app.purchases x where x.user_id = u.id and x.status = 'succeeded') as settled
    from app.users u left join app.user_private p on p.user_id = u.id
    where u.id = p_user
  )
  select case
    when chargeback then 'basic'
    when vip then 'vip'
    when settled and created_at <= now() - interval '30 days' then 'trusted'
    when email_verified and created_at <= now() - interval '7 days' then 'verified'
    else 'basic' end
  from facts
$$;
grant execute on function app.trust_level(uuid) to authenticated, stagepass_service;

-- Tokens a user may spend per rolling 24 h: their override, else by trust level.
create function app.daily_spend_limit(p_user uuid) returns bigint
  language sql stable security definer set search_path = '' as $$
  select coalesce(
    (select daily_spend_limit_tokens from app.user_private where user_id = p_user),
    case app.trust_level(p_user)
      when 'vip' then 100000 when 'trusted' then 50000 when 'verified' then 20000 else 10000 end)
$$;
grant execute on function app.daily_spend_limit(uuid) to authenticated, stagepass_service;

-- Locks the caller's wallet and checks they may spend `p_amount` now:
-- no debt, enough tokens, within the daily limit. Returns the wallet id and
-- its balance before the spend. Every spend (tip, class, call) starts here,
-- so concurrent spends of one user are serialised on their wallet row and
-- the daily limit cannot be raced.
create function ledger.lock_for_spend(p_user uuid, p_amount bigint, out wallet uuid, out balance bigint)
  language plpgsql security definer set search_path = '' as $$
declare
  debt bigint;
  spent bigint;
  day_limit bigint;
begin
  select a.id, a.balance into wallet, balance
    from ledger.accounts a where a.kind = 'wallet' and a.owner_id = p_user and a.reference is null
    for update;
  if wallet is null then
    raise exception 'no wallet' using errcode = 'SP001';
  end if;
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
revoke all on function ledger.lock_for_spend(uuid, bigint) from public;

-- A tip from the caller to a creator. 1–10,000 tokens; the creator gets the
-- tokens less the platform fee (default 0). `p_tip_id` is the journal
-- reference (one tip, one journal).
create function app.tip(p_tip_id uuid, p_recipient uuid, p_amount bigint, p_message text)
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
  -- Both wallets, in one global order (account id), before anything else:
  -- two users tipping each other at once then queue instead of deadlocking.
  -- The whole tip is this one function call, so locking the recipient now
  -- rather than at its credit costs microseconds, not a round trip.
  perform 1 from ledger.accounts a
   where a.kind = 'wallet' and a.reference is null and a.owner_id in (payer, p_recipient)
   order by a.id for update;
  select l.wallet, l.balance into payer_wallet, payer_balance from ledger.lock_for_spend(payer, p_amount) l;
  select (p_amount * platform_fee_bps) / 10000 into fee from ledger.settings;
  journal := ledger.post(
    'tip', p_tip_id::text,
    array[payer_wallet, ledger.singleton('platform_revenue'), ledger.account_of('wallet', p_recipient)],
    array[-p_amount, fee, p_amount - fee],
    jsonb_build_object('from', payer, 'to', p_recipient, 'message', p_message));
  return query select journal, payer_balance - p_amount;
end
$$;
revoke all on function app.tip(uuid, uuid, bigint, text) from public;
grant execute on function app.tip(uuid, uuid, bigint, text) to authenticated;

-- The caller's balance, debt and what they may still spend today.
create function app.my_balance()
  returns table (balance bigint, debt bigint, spent_today bigint, daily_limit bigint, trust_level text)
  language sql stable security definer set search_path = '' as $$
  select w.balance, -d.balance, ledger.spent_last_24h(w.id), app.daily_spend_limit(auth.uid()),
         app.trust_level(auth.uid())
  from ledger.accounts w
  join ledger.accounts d on d.kind = 'debt' and d.owner_id = w.owner_id and d.reference is null
  where w.kind = 'wallet' and w.owner_id = auth.uid() and w.reference is null
$$;
revoke all on function app.my_balance() from public;
grant execute on function app.my_balance() to authenticated;

-- The caller's ledger entries (wallet and debt), newest first, keyset-paginated
-- by entry id.
create function app.my_entries(p_before bigint, p_limit integer)
  returns table (id bigint, journal_id uuid, kind text, reference text, account text, amount bigint,
                 metadata jsonb, created_at timestamptz)
  language sql stable security definer set search_path = '' as $$
  select e.id, j.id, j.kind, j.reference, a.kind, e.amount, j.metadata, e.created_at
  from ledger.entries e
  join ledger.accounts a on a.id = e.account_id
  join ledger.journals j on j.id = e.journal_id
  where a.owner_id = auth.uid() and a.kind in ('wallet', 'debt') and a.reference is null
    and (p_before is null or e.id < p_before)
  order by e.id desc
  limit least(greatest(p_limit, 1), 100)
$$;
revoke all on function app.my_entries(bigint, integer) from public;
grant execute on function app.my_entries(bigint, integer) to authenticated;
