-- The small SQL functions every money request calls, as PL/pgSQL (issue 13).
--
-- Measured: `app.money_request` called by pgbench directly (4 clients, 64
-- fans tipping 64 creators, no HTTP) ran at 226–231 tips/s, with
-- `track_functions = all` showing per call, among others:
--   ledger.spent_last_24h_many 1.84 ms, app.emit 0.75 ms,
--   ledger.singleton 0.33 ms, app.daily_spend_limit 0.32 ms,
--   ledger.account_of 0.17 ms, ledger.is_spending 0.14 ms
-- for what are index lookups and one insert. After this migration, the same
-- pgbench run: 464 tips/s (spent_last_24h_many 0.22 ms, app.emit 0.21 ms,
-- ledger.singleton 0.05 ms, ledger.account_of 0.04 ms). A LANGUAGE sql function that
-- cannot be inlined into its caller (SECURITY DEFINER, a SET clause, a set
-- result) is planned again on every call from a new statement (PostgreSQL
-- before 18 keeps an SQL function's plan only for the calling query), and a
-- PL/pgSQL caller issues a new statement for each call. PL/pgSQL keeps each
-- statement's plan for the session, so the same bodies cost an execution,
-- not a planning, per call.
--
-- Each function below keeps its signature, volatility, rights, settings and
-- result exactly (CREATE OR REPLACE keeps the grants); only the language
-- changes. The bodies are the current ones (migration 17 rewrote the clock
-- calls; migration 20 added 'call_hold' to the spending kinds).
--
-- `ledger.is_spending` is the exception: an expression over its argument,
-- it loses its SET clause instead, which lets PostgreSQL inline it into the
-- queries that call it (it names no table, so the search path is moot).

create or replace function app.emit(
  p_kind text, p_destination text, p_name text, p_payload jsonb, p_dedup_key text,
  p_not_before timestamptz default null
) returns void
  language plpgsql security definer set search_path = '' as $$
begin
  insert into app.outbox as o (kind, destination, name, payload, dedup_key, not_before)
    values (p_kind, p_destination, p_name, p_payload, p_dedup_key, p_not_before)
    on conflict on constraint outbox_dedup_key do update
      set payload = excluded.payload, not_before = excluded.not_before
      where o.delivered_at is null and o.claimed_until is null;
end
$$;

create or replace function ledger.account_of(p_kind text, p_owner uuid) returns uuid
  language plpgsql stable security definer set search_path = '' as $$
begin
  return (select id from ledger.accounts where kind = p_kind and owner_id = p_owner and reference is null);
end
$$;

create or replace function ledger.singleton(p_kind text) returns uuid
  language plpgsql stable security definer set search_path = '' as $$
begin
  return (select id from ledger.accounts where kind = p_kind and owner_id is null and reference is null);
end
$$;

-- Inlinable (see above): no SET clause.
create or replace function ledger.is_spending(p_kind text) returns boolean
  language sql immutable parallel safe as $$
  select p_kind in ('tip', 'class_enrollment', 'call_minute', 'call_hold')
$$;
alter function ledger.is_spending(text) reset all;

create or replace function app.trust_level(p_user uuid) returns text
  language plpgsql stable security definer set search_path = '' as $$
begin
  return (
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
      when settled and created_at <= app.now() - interval '30 days' then 'trusted'
      when email_verified and created_at <= app.now() - interval '7 days' then 'verified'
      else 'basic' end
    from facts);
end
$$;

create or replace function app.daily_spend_limit(p_user uuid) returns bigint
  language plpgsql stable security definer set search_path = '' as $$
begin
  return coalesce(
    (select daily_spend_limit_tokens from app.user_private where user_id = p_user),
    case app.trust_level(p_user)
      when 'vip' then 100000 when 'trusted' then 50000 when 'verified' then 20000 else 10000 end);
end
$$;

-- Always the generic plan: left to choose, the plan cache kept planning this
-- query for every call (1.1 ms of planning for 0.3 ms of execution; its
-- generic estimate for an array argument never looked cheaper). The plan is
-- the same either way: one index probe of spend_hours and one of entries per
-- wallet.
create or replace function ledger.spent_last_24h_many(p_wallets uuid[])
  returns table (wallet uuid, spent bigint)
  language plpgsql stable security definer set search_path = '' set plan_cache_mode = force_generic_plan as $$
begin
  return query
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
    from ws;
end
$$;

create or replace function ledger.spent_last_24h(p_wallet uuid) returns bigint
  language plpgsql stable security definer set search_path = '' as $$
begin
  return coalesce((select s.spent from ledger.spent_last_24h_many(array[p_wallet]) s), 0);
end
$$;

create or replace function ledger.pending_of(p_account uuid) returns bigint
  language plpgsql stable security definer set search_path = '' as $$
begin
  return (select coalesce(sum(amount), 0)::bigint from ledger.pending_credits where account_id = p_account);
end
$$;

create or replace function ledger.post(
  p_kind text, p_reference text, p_accounts uuid[], p_amounts bigint[], p_metadata jsonb
) returns uuid
  language plpgsql security definer set search_path = '' as $$
begin
  return ledger.post_legs(p_kind, p_reference, p_accounts, p_amounts, p_metadata, false);
end
$$;

-- Every account with its balance: the pending credits as one grouped join,
-- not a function call per account (the audit reads every account).
create or replace view ledger.balances as
  select a.id, a.kind, a.owner_id, a.reference,
         a.balance + coalesce(p.pending, 0) as balance,
         a.balance as folded_balance
    from ledger.accounts a
    left join (select account_id, sum(amount)::bigint as pending
                 from ledger.pending_credits group by account_id) p on p.account_id = a.id;
