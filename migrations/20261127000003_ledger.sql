-- The token ledger: double-entry, append-only.
--
-- Every movement of tokens is a journal whose entries sum to zero. An
-- account's balance is kept on its row (so a debit can lock it and check
-- funds) and always equals the sum of its entries (the ledger-audit cron
-- recomputes it). Entries and journals are never edited; a correction is a
-- new journal.
--
-- The database itself refuses overdrafts: `accounts_balance_sign` forbids
-- a negative wallet, escrow or payout clearing balance whatever the code
-- does. Debt from a refund or chargeback of tokens already spent is not a
-- negative wallet: it is the user's `debt` account going negative, and a
-- user with debt cannot spend (checked in the spend functions).
--
-- Nothing here is readable or writable by `authenticated`: money moves only
-- through the SECURITY DEFINER functions below, each checking who the
-- caller is from the verified claims (`auth.uid()`).

create schema ledger;
revoke all on schema ledger from public;

create table ledger.accounts (
  id          uuid primary key default gen_random_uuid(),
  kind        text not null constraint accounts_kind_check check (kind in
                ('wallet', 'debt', 'escrow', 'platform_revenue', 'stripe_clearing', 'payout_clearing')),
  -- wallet and debt: the user; escrow/payout clearing may name one too.
  owner_id    uuid references app.users (id),
  -- escrow: what is held, e.g. 'class:<uuid>'; null for per-user and singleton accounts.
  reference   text,
  balance     bigint not null default 0,
  created_at  timestamptz not null default now(),
  -- Stripe clearing goes negative as tokens are issued against card payments;
  -- debt is the negative of what a user owes; everything else never goes below zero.
  constraint accounts_balance_sign check (case kind
    when 'debt' then balance <= 0
    when 'stripe_clearing' then true
    else balance >= 0 end)
);

create unique index accounts_user_key on ledger.accounts (kind, owner_id)
  where reference is null and owner_id is not null;
create unique index accounts_singleton_key on ledger.accounts (kind)
  where reference is null and owner_id is null;
create unique index accounts_reference_key on ledger.accounts (kind, reference)
  where reference is not null;

insert into ledger.accounts (kind) values ('platform_revenue'), ('stripe_clearing'), ('payout_clearing');

create table ledger.journals (
  id          uuid primary key default gen_random_uuid(),
  -- Reason code: purchase, tip, refund, dispute, …
  kind        text not null,
  -- What caused it (a PaymentIntent id, a tip id, …). (kind, reference) is
  -- unique: the same payment can never be credited twice.
  reference   text not null,
  metadata    jsonb,
  created_at  timestamptz not null default now(),
  constraint journals_kind_reference_key unique (kind, reference)
);

create table ledger.entries (
  id          bigint generated always as identity primary key,
  journal_id  uuid not null references ledger.journals (id),
  account_id  uuid not null references ledger.accounts (id),
  -- Positive: credit (the account's balance grows); negative: debit.
  amount      bigint not null constraint entries_amount_nonzero check (amount <> 0),
  created_at  timestamptz not null default now()
);
create index entries_account_time on ledger.entries (account_id, created_at);
create index entries_journal on ledger.entries (journal_id);

-- Append-only, for everyone including the owner.
create trigger entries_append_only before update or delete on ledger.entries
  for each row execute function app.refuse_change();
create trigger entries_no_truncate before truncate on ledger.entries
  for each statement execute function app.refuse_change();
create trigger journals_append_only before update or delete on ledger.journals
  for each row execute function app.refuse_change();
create trigger journals_no_truncate before truncate on ledger.journals
  for each statement execute function app.refuse_change();

-- Every journal sums to zero, checked at commit (after all its entries).
-- Definer rights: the deferred check runs at commit as whoever commits.
create function ledger.check_journal_balanced() returns trigger
  language plpgsql security definer set search_path = '' as $$
declare
  total numeric;
begin
  select sum(amount) into total from ledger.entries where journal_id = new.journal_id;
  if total <> 0 then
    raise exception 'journal % does not balance (sum %)', new.journal_id, total using errcode = 'SP000';
  end if;
  return null;
end
$$;
create constraint trigger entries_balanced after insert on ledger.entries
  deferrable initially deferred for each row execute function ledger.check_journal_balanced();

-- Every user has a wallet and a debt account from the moment they exist.
create function ledger.open_user_accounts() returns trigger
  language plpgsql security definer set search_path = '' as $$
begin
  insert into ledger.accounts (kind, owner_id) values ('wallet', new.id), ('debt', new.id);
  return null;
end
$$;
create trigger users_open_accounts after insert on app.users
  for each row execute function ledger.open_user_accounts();

-- Settings in one place: the platform fee on tips, classes and calls, in
-- basis points of the tokens (default 0: creators get 100 %).
create table ledger.settings (
  id                 boolean primary key default true constraint settings_singleton check (id),
  platform_fee_bps   integer not null default 0 constraint settings_fee_range check (platform_fee_bps between 0 and 5000)
);
insert into ledger.settings default values;

create function ledger.account_of(p_kind text, p_owner uuid) returns uuid
  language sql stable security definer set search_path = '' as $$
  select id from ledger.accounts where kind = p_kind and owner_id = p_owner and reference is null
$$;

create function ledger.singleton(p_kind text) returns uuid
  language sql stable security definer set search_path = '' as $$
  select id from ledger.accounts where kind = p_kind and owner_id is null and reference is null
$$;

-- Posts one balanced journal. Legs are applied in the order given: callers
-- put the debited (locked, checked) accounts first and credits last, so a
-- popular creator's wallet row is locked only from its credit to the commit.
-- A second journal with the same (kind, reference) is refused with SP002:
-- this is how "credited at most once" is enforced.
create function ledger.post(
  p_kind text, p_reference text, p_accounts uuid[], p_amounts bigint[], p_metadata jsonb
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
  for i in 1 .. array_length(p_accounts, 1) loop
    if p_amounts[i] = 0 then
      continue;
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
revoke all on function ledger.post(text, text, uuid[], bigint[], jsonb) from public;

-- Tokens a user spent (tips, classes, calls) in the last 24 hours.
create function ledger.spent_last_24h(p_wallet uuid) returns bigint
  language sql stable security definer set search_path = '' as $$
  select coalesce(-sum(e.amount), 0)::bigint
  from ledger.entries e join ledger.journals j on j.id = e.journal_id
  where e.account_id = p_wallet and e.amount < 0
    and e.created_at > now() - interval '24 hours'
    and j.kind in ('tip', 'class_enrollment', 'call_minute')
$$;

-- The service role (ledger-audit cron) reads everything; it writes only
-- through the functions.
grant usage on schema ledger to stagepass_service;
grant select on all tables in schema ledger to stagepass_service;
