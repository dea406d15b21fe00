-- A journal's entries in one statement (issue 13).
--
-- `ledger.post_legs` (migration 24) inserted each leg's entry, and each
-- deferred credit's pending row, with a statement of its own. Every insert
-- into `ledger.entries` fires the statement-level spending trigger
-- (`ledger.count_spending_entries`, a transition table and an upsert), so a
-- tip paid for it three times. Measured with `scripts/bench/sql-tips.sh`
-- before this migration: `post_legs` was the costliest function of a tip
-- (1.07 ms of its own per call) and the spending trigger ran twice per tip.
--
-- Now the legs that move a balance row are applied first, one by one and in
-- the order given, exactly as before (debits lock and fold their account
-- first; the lock order of every caller is unchanged), then every entry is
-- inserted by one statement in leg order, and the deferred credits' pending
-- rows by the same statement (from its RETURNING). The trigger fires once
-- per journal; the entries, their ids' order, the pending rows, the checks
-- and the errors are the same.
--
-- Same signature, result and rights (CREATE OR REPLACE keeps them).

create or replace function ledger.post_legs(
  p_kind text, p_reference text, p_accounts uuid[], p_amounts bigint[], p_metadata jsonb,
  p_defer_credits boolean
) returns uuid
  language plpgsql security definer set search_path = '' as $$
declare
  journal uuid;
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
  -- The balance rows, leg by leg (a deferred credit leaves its row alone).
  for i in 1 .. array_length(p_accounts, 1) loop
    if p_amounts[i] = 0 or (p_amounts[i] > 0 and p_defer_credits) then
      continue;
    end if;
    if p_amounts[i] < 0 then
      -- Lock, then fold: the debit's checks see every committed credit.
      perform 1 from ledger.accounts where id = p_accounts[i] for no key update;
      if not found then
        raise exception 'unknown account %', p_accounts[i] using errcode = 'SP000';
      end if;
      perform ledger.fold_locked(p_accounts[i]);
    end if;
    update ledger.accounts set balance = balance + p_amounts[i] where id = p_accounts[i];
    if not found then
      raise exception 'unknown account %', p_accounts[i] using errcode = 'SP000';
    end if;
  end loop;
  -- Every entry, in leg order; a deferred credit's pending row with it.
  with e as (
    insert into ledger.entries (journal_id, account_id, amount)
    select journal, l.account, l.amount
      from unnest(p_accounts, p_amounts) with ordinality as l (account, amount, leg)
     where l.amount <> 0
     order by l.leg
    returning id, account_id, amount)
  insert into ledger.pending_credits (entry_id, account_id, amount)
  select e.id, e.account_id, e.amount from e where p_defer_credits and e.amount > 0;
  return journal;
end
$$;
