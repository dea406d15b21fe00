-- Token purchases: the packages, creating a purchase, and the Stripe-driven
-- credit and claw-back. Webhooks and the reconciliation cron run as
-- `stagepass_service`; a user can only start a purchase of a listed package.

-- The only purchasable sizes (SPEC §2). The Rust constant
-- `stagepass_ledger::packages::PACKAGES` must equal this table (tested).
create table app.token_packages (
  id            text primary key,
  tokens        bigint not null,
  price_cents   bigint not null,
  bonus_tokens  bigint not null default 0,
  credited_tokens bigint generated always as (tokens + bonus_tokens) stored
);
insert into app.token_packages (id, tokens, price_cents, bonus_tokens) values
  ('starter', 50, 500, 0), ('small', 200, 1900, 0), ('medium', 433, 3900, 0),
  ('large', 812, 6900, 0), ('xl', 1488, 11900, 0), ('xxl', 4986, 34900, 0),
  ('mega', 8446, 54900, 422);
grant select on app.token_packages to authenticated, stagepass_service;
alter table app.token_packages enable row level security;
alter table app.token_packages force row level security;
create policy token_packages_read on app.token_packages for select
  to authenticated, stagepass_service using (true);

alter table app.purchases
  -- While a request is creating this purchase's PaymentIntent, a duplicate
  -- of it gets 409; after the lease a retry may proceed (Stripe's own
  -- idempotency key makes the repeated call safe).
  add column creating_until timestamptz,
  add column client_secret text;

-- Starts (or finds) the caller's purchase `p_id` of package `p_package`.
-- The id is derived by the caller from (user, Idempotency-Key), so a retry
-- finds the same row. Returns the row and whether another request holds it.
create function app.begin_purchase(p_id uuid, p_package text)
  returns table (id uuid, tokens bigint, price_cents bigint, payment_intent_id text,
                 client_secret text, status text, busy boolean)
  language plpgsql security definer set search_path = '' as $$
#variable_conflict use_column
declare
  caller uuid := auth.uid();
  pkg app.token_packages;
begin
  if caller is null then
    raise exception 'no authenticated user' using errcode = '28000';
  end if;
  select * into pkg from app.token_packages where token_packages.id = p_package;
  if not found then
    raise exception 'unknown package' using errcode = 'SP020';
  end if;
  insert into app.purchases (id, user_id, package, tokens, price_cents, creating_until)
    values (p_id, caller, pkg.id, pkg.credited_tokens, pkg.price_cents, now() + interval '15 seconds')
    on conflict (id) do nothing;
  if found then
    return query select p_id, pkg.credited_tokens, pkg.price_cents, null::text, null::text, 'pending'::text, false;
    return;
  end if;
  -- An existing purchase: it must be the caller's and the same package.
  return query
    with claimed as (
      update app.purchases p
         set creating_until = now() + interval '15 seconds'
       where p.id = p_id and p.user_id = caller and p.stripe_payment_intent_id is null
         and (p.creating_until is null or p.creating_until < now())
      returning p.id)
    select p.id, p.tokens, p.price_cents, p.stripe_payment_intent_id, p.client_secret, p.status,
           (p.stripe_payment_intent_id is null and not exists (select 1 from claimed))
      from app.purchases p
     where p.id = p_id and p.user_id = caller and p.package = p_package;
  if not found then
    raise exception 'purchase id conflict' using errcode = 'SP021';
  end if;
end
$$;
revoke all on function app.begin_purchase(uuid, text) from public;
grant execute on function app.begin_purchase(uuid, text) to authenticated;

-- Records the PaymentIntent created for the caller's purchase.
create function app.attach_payment_intent(p_id uuid, p_payment_intent text, p_client_secret text)
  returns void
  language plpgsql security definer set search_path = '' as $$
begin
  update app.purchases
     set stripe_payment_intent_id = p_payment_intent, client_secret = p_client_secret,
         creating_until = null
   where id = p_id and user_id = auth.uid()
     and (stripe_payment_intent_id is null or stripe_payment_intent_id = p_payment_intent);
  if not found then
    raise exception 'purchase not found' using errcode = 'SP021';
  end if;
end
$$;
revoke all on function app.attach_payment_intent(uuid, text, text) from public;
grant execute on function app.attach_payment_intent(uuid, text, text) to authenticated;

-- Credits a succeeded PaymentIntent, exactly once. Tokens first repay any
-- debt, the rest go to the wallet. A purchase already refunded or disputed
-- (events out of order) is not credited. Returns what happened:
-- 'credited', 'already_credited', 'not_creditable', 'unknown'.
create function app.credit_purchase(p_payment_intent text, p_amount_cents bigint)
  returns text
  language plpgsql security definer set search_path = '' as $$
declare
  p app.purchases;
  owed bigint;
  repay bigint;
begin
  select * into p from app.purchases where stripe_payment_intent_id = p_payment_intent for update;
  if not found then
    return 'unknown';
  end if;
  if p.status = 'succeeded' then
    return 'already_credited';
  end if;
  if p.status in ('refunded', 'disputed', 'canceled') then
    return 'not_creditable';
  end if;
  if p_amount_cents <> p.price_cents then
    raise exception 'amount % does not match the package price %', p_amount_cents, p.price_cents
      using errcode = 'SP022';
  end if;
  -- The user's wallet, then their debt: the order claw-backs and spends
  -- lock them in, so a credit and a claw-back of one user arriving together
  -- cannot deadlock.
  perform 1 from ledger.accounts
   where kind = 'wallet' and owner_id = p.user_id and reference is null for update;
  select -balance into owed from ledger.accounts
   where kind = 'debt' and owner_id = p.user_id and reference is null for update;
  repay := least(owed, p.tokens);
  perform ledger.post('purchase', p_payment_intent,
    array[ledger.singleton('stripe_clearing'), ledger.account_of('debt', p.user_id),
          ledger.account_of('wallet', p.user_id)],
    array[-p.tokens, repay, p.tokens - repay],
    jsonb_build_object('purchase_id', p.id, 'package', p.package, 'price_cents', p.price_cents));
  update app.purchases set status = 'succeeded', creating_until = null where id = p.id;
  return 'credited';
end
$$;
revoke all on function app.credit_purchase(text, bigint) from public;
grant execute on function app.credit_purchase(text, bigint) to stagepass_service;

-- Marks a PaymentIntent failed or canceled (only while pending).
create function app.fail_purchase(p_payment_intent text, p_status text) returns text
  language plpgsql security definer set search_path = '' as $$
begin
  if p_status not in ('failed', 'canceled') then
    raise exception 'bad status' using errcode = '22023';
  end if;
  update app.purchases set status = p_status, creating_until = null
   where stripe_payment_intent_id = p_payment_intent and status = 'pending';
  return case when found then p_status else 'unchanged' end;
end
$$;
revoke all on function app.fail_purchase(text, text) from public;
grant execute on function app.fail_purchase(text, text) to stagepass_service;

-- Claws back tokens of a purchase after a refund (`p_kind` 'refund', with
-- the charge's cumulative amount refunded) or a dispute ('dispute', all of
-- it). Takes what the wallet holds and records the rest as debt. The journal
-- reference makes each distinct refund state and each dispute apply once.
-- Only what was credited can be taken back: whether it was is the purchase
-- journal's existence, not the status (a refund or dispute that arrived
-- before the success also leaves 'refunded' or 'disputed'). A chargeback
-- stays on record ('disputed') whatever arrives after it: trust levels
-- depend on it.
create function app.claw_back_purchase(
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
    select balance into in_wallet from ledger.accounts
     where kind = 'wallet' and owner_id = p.user_id and reference is null for update;
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
revoke all on function app.claw_back_purchase(text, text, text, bigint) from public;
grant execute on function app.claw_back_purchase(text, text, text, bigint) to stagepass_service;

-- Purchases the reconciliation cron should ask Stripe about.
create function app.stale_pending_purchases(p_older_than interval, p_limit integer)
  returns table (id uuid, payment_intent_id text)
  language sql stable security definer set search_path = '' as $$
  select id, stripe_payment_intent_id from app.purchases
   where status = 'pending' and stripe_payment_intent_id is not null
     and created_at < now() - p_older_than
   order by created_at limit least(p_limit, 500)
$$;
revoke all on function app.stale_pending_purchases(interval, integer) from public;
grant execute on function app.stale_pending_purchases(interval, integer) to stagepass_service;

-- The rate limiter asks for a caller's trust level before the request's
-- transaction exists, in one round trip: the function only maps a user id
-- to a level name.
grant execute on function app.trust_level(uuid) to stagepass_app;
