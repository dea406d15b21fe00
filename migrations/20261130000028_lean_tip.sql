-- A tip in fewer statements (issue 13): the same writes, the same checks in
-- the same order, the same errors; about half the statements.
--
-- Measured with `scripts/bench/sql-tips.sh` (pgbench calling
-- `app.money_request` directly, no HTTP), the functions' own time per tip
-- before this migration was spent mostly on statements that re-read what the
-- tip already knew:
--   * `ledger.post_legs` locked and folded the payer's wallet a second time
--     (`ledger.lock_and_fold`: a locking read, a delete, a read), although
--     `ledger.lock_for_spend` had just done so under the same lock;
--   * each leg was its own `insert` (and each credit a second one into
--     `ledger.pending_credits`), each firing the statement triggers on
--     `ledger.entries` once;
--   * the recipient, their wallet, the platform's account and the fee were
--     four lookups, and the debt, the daily limit and the day's spending three
--     more, each through a function call of its own.
--
-- Now:
--   * `ledger.lock_for_spend`: the wallet's lock; the fold (skipped, as
--     before, when nothing is pending); then the debt, the user's own daily
--     limit and the day's spending in one statement, read after the lock as
--     before (a fresh snapshot, so a claw-back that committed while this
--     waited is seen). The trust level is computed only for a user without a
--     limit of their own (`app.daily_spend_limit`, unchanged). Every caller
--     (tips, enrolments, call holds and top-ups) gets the same checks in the
--     same order: SP001 no wallet, SP003 debt, SP001 funds, SP004 daily limit.
--   * `app.tip`: the recipient check, their wallet, the platform's revenue
--     account and the fee in one lookup (a creator has a wallet from the moment
--     they exist: `ledger.open_user_accounts`); then, under the payer's lock
--     that `lock_for_spend` took, the journal, the payer's balance, and the
--     legs with their pending credits in one statement; then `tip.received`.
--     The legs are exactly those `ledger.post_legs(…, true)` wrote: the
--     payer's debit applied, the fee and the creator's share as pending
--     credits (ADR 0021), a zero leg (a fee of 0) left out. The deferred
--     balance check (`ledger.entries_balanced`), the spending hours and the
--     `balance.updated` message are the triggers', as before.
--
-- `ledger.post_legs` itself is unchanged; the other journals still use it.

create or replace function ledger.lock_for_spend(p_user uuid, p_amount bigint, out wallet uuid, out balance bigint)
  language plpgsql security definer set search_path = '' as $$
declare
  folded bigint;
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
  with d as (delete from ledger.pending_credits where account_id = wallet returning amount)
  select sum(amount)::bigint into folded from d;
  if folded is not null then
    update ledger.accounts a set balance = a.balance + folded where a.id = wallet;
    balance := balance + folded;
  end if;
  select (select a.balance from ledger.accounts a
           where a.kind = 'debt' and a.owner_id = p_user and a.reference is null),
         (select p.daily_spend_limit_tokens from app.user_private p where p.user_id = p_user),
         coalesce((select s.spent from ledger.spent_last_24h_many(array[wallet]) s), 0)
    into debt, day_limit, spent;
  if debt < 0 then
    raise exception 'account in debt' using errcode = 'SP003', detail = (-debt)::text;
  end if;
  if balance < p_amount then
    raise exception 'insufficient funds' using errcode = 'SP001', detail = balance::text;
  end if;
  if day_limit is null then
    day_limit := app.daily_spend_limit(p_user);
  end if;
  if spent + p_amount > day_limit then
    raise exception 'daily spending limit' using errcode = 'SP004',
      detail = json_build_object('limit', day_limit, 'spent', spent)::text;
  end if;
end
$$;

create or replace function app.tip(p_tip_id uuid, p_recipient uuid, p_amount bigint, p_message text)
  returns table (journal_id uuid, balance bigint)
  language plpgsql security definer set search_path = '' as $$
declare
  payer uuid := auth.uid();
  payer_wallet uuid;
  payer_balance bigint;
  recipient_wallet uuid;
  revenue uuid;
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
  select w.id,
         (select (p_amount * s.platform_fee_bps) / 10000 from ledger.settings s),
         (select r.id from ledger.accounts r
           where r.kind = 'platform_revenue' and r.owner_id is null and r.reference is null)
    into recipient_wallet, fee, revenue
    from app.users u
    join ledger.accounts w on w.kind = 'wallet' and w.owner_id = u.id and w.reference is null
   where u.id = p_recipient and u.role = 'creator';
  if not found then
    raise exception 'recipient is not a creator' using errcode = 'SP012';
  end if;
  select l.wallet, l.balance into payer_wallet, payer_balance from ledger.lock_for_spend(payer, p_amount) l;
  insert into ledger.journals (kind, reference, metadata)
    values ('tip', p_tip_id::text,
            jsonb_build_object('from', payer, 'to', p_recipient, 'message', p_message))
    on conflict on constraint journals_kind_reference_key do nothing
    returning id into journal;
  if journal is null then
    raise exception 'tip % already applied', p_tip_id using errcode = 'SP002';
  end if;
  update ledger.accounts a set balance = a.balance - p_amount where a.id = payer_wallet;
  with e as (
    insert into ledger.entries (journal_id, account_id, amount)
    select journal, l.account, l.amount
      from unnest(array[payer_wallet, revenue, recipient_wallet],
                  array[-p_amount, fee, p_amount - fee]) as l(account, amount)
     where l.amount <> 0
    returning id, account_id, amount)
  insert into ledger.pending_credits (entry_id, account_id, amount)
    select e.id, e.account_id, e.amount from e where e.amount > 0;
  insert into app.outbox as o (kind, destination, name, payload, dedup_key, not_before)
    values ('realtime', 'user:' || p_recipient::text, 'tip.received',
            jsonb_build_object('tip_id', p_tip_id, 'from', payer, 'amount', p_amount - fee,
                               'message', p_message),
            'tip:' || p_tip_id::text, null)
    on conflict on constraint outbox_dedup_key do update
      set payload = excluded.payload, not_before = excluded.not_before
      where o.delivered_at is null and o.claimed_until is null;
  return query select journal, payer_balance - p_amount;
end
$$;
