-- The in-flight claim of a purchase outlives its holder's Stripe call
-- (issue 14, ADR 0013).
--
-- `app.begin_purchase` leased a purchase for 15 s to the request creating
-- its PaymentIntent, but the Stripe client may take 2 × 10 s + 2 s. A
-- duplicate arriving after the lease claimed the purchase and called Stripe
-- too; whichever attached second was refused (SP021) and answered 422
-- `idempotency_key_reused` for the very same request. Now the lease is one
-- function, 60 s, and the route bounds its Stripe call to 30 s (a test
-- checks the Rust bound stays below this lease); a holder whose call fails
-- releases the claim so the client's retry need not wait for the lease.

create function app.purchase_claim_lease() returns interval
  language sql stable as $$ select interval '60 seconds' $$;
grant execute on function app.purchase_claim_lease() to authenticated;

-- begin_purchase (20261127000005) with the lease from the function above.
create or replace function app.begin_purchase(p_id uuid, p_package text)
  returns table (id uuid, tokens bigint, price_cents bigint, payment_intent_id text,
                 client_secret text, status text, busy boolean)
  language plpgsql security definer set search_path = '' as $$
#variable_conflict use_column
declare
  caller uuid := auth.uid();
  pkg app.token_packages;
  lease interval := app.purchase_claim_lease();
begin
  if caller is null then
    raise exception 'no authenticated user' using errcode = '28000';
  end if;
  select * into pkg from app.token_packages where token_packages.id = p_package;
  if not found then
    raise exception 'unknown package' using errcode = 'SP020';
  end if;
  insert into app.purchases (id, user_id, package, tokens, price_cents, creating_until)
    values (p_id, caller, pkg.id, pkg.credited_tokens, pkg.price_cents, clock_timestamp() + lease)
    on conflict (id) do nothing;
  if found then
    return query select p_id, pkg.credited_tokens, pkg.price_cents, null::text, null::text, 'pending'::text, false;
    return;
  end if;
  -- An existing purchase: it must be the caller's and the same package.
  return query
    with claimed as (
      update app.purchases p
         set creating_until = clock_timestamp() + lease
       where p.id = p_id and p.user_id = caller and p.stripe_payment_intent_id is null
         and (p.creating_until is null or p.creating_until < clock_timestamp())
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

-- The holder's Stripe call failed: give the claim back, so a retry with the
-- same Idempotency-Key proceeds at once (Stripe's own idempotency key makes
-- the repeated call safe).
create function app.release_purchase_claim(p_id uuid) returns void
  language sql security definer set search_path = '' as $$
  update app.purchases set creating_until = null
   where id = p_id and user_id = auth.uid() and stripe_payment_intent_id is null
$$;
revoke all on function app.release_purchase_claim(uuid) from public;
grant execute on function app.release_purchase_claim(uuid) to authenticated;
