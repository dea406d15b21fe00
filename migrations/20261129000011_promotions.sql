-- Promotional grants of tokens (issue 9, item 8): an admin (or the operator)
-- gives a user tokens for a stated reason, as one balanced journal from the
-- platform's `promotions` account into the user's wallet, recorded in the
-- append-only `app.token_grants` in the same transaction.
--
-- The `promotions` account is the issuer of promotional tokens the way
-- `stripe_clearing` is the issuer of bought ones: its balance is minus every
-- token ever granted, so it never goes above zero, and the sum of all
-- balances stays zero (the ledger audit checks both).
--
-- SQLSTATEs (the contract with `stagepass_ledger::grants`):
--   SP050 amount out of range (1–10,000 tokens)
--   SP051 reason missing, longer than 500 characters, or with control characters
--   SP052 an admin granting to themselves
--   SP053 the caller is not an admin (in the database, never by a token claim)
--   SP054 no such user
--   SP002 this grant id was already applied (ledger.post)

alter table ledger.accounts drop constraint accounts_kind_check;
alter table ledger.accounts add constraint accounts_kind_check check (kind in
  ('wallet', 'debt', 'escrow', 'platform_revenue', 'stripe_clearing', 'payout_clearing', 'promotions'));

alter table ledger.accounts drop constraint accounts_balance_sign;
alter table ledger.accounts add constraint accounts_balance_sign check (case kind
  when 'debt' then balance <= 0
  when 'stripe_clearing' then true
  when 'promotions' then balance <= 0
  else balance >= 0 end);

insert into ledger.accounts (kind) values ('promotions');

-- Who granted what to whom, when and why. One row per grant, written only by
-- `app.apply_token_grant`, never changed.
create table app.token_grants (
  -- Also the journal's reference: ('promotion', id) is unique in the ledger.
  id          uuid primary key,
  user_id     uuid not null references app.users (id),
  amount      bigint not null constraint token_grants_amount_range check (amount between 1 and 10000),
  reason      text not null constraint token_grants_reason_check
                check (char_length(btrim(reason)) between 1 and 500 and reason !~ '[[:cntrl:]]'),
  -- The admin who granted; null when the operator did (CLI, `stagepass dev`).
  granted_by  uuid references app.users (id),
  -- `user:<uuid>` or `operator:<name>`: always says who.
  actor       text not null,
  journal_id  uuid not null unique references ledger.journals (id),
  granted_at  timestamptz not null default now()
);
create index token_grants_user on app.token_grants (user_id, granted_at desc);

create trigger token_grants_append_only before update or delete on app.token_grants
  for each row execute function app.refuse_change();
create trigger token_grants_no_truncate before truncate on app.token_grants
  for each statement execute function app.refuse_change();

alter table app.token_grants enable row level security;
alter table app.token_grants force row level security;
-- The audit cron reads it; nobody writes it except the definer function.
grant select on app.token_grants to stagepass_service;
create policy token_grants_service_read on app.token_grants for select to stagepass_service
  using (true);

-- The one way tokens are granted. Definer rights, callable by nobody but the
-- owner (the operator's connection) and `app.admin_grant_tokens`. Returns the
-- journal and the user's wallet balance after the grant.
create function app.apply_token_grant(
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
  return query select journal, a.balance from ledger.accounts a where a.id = wallet;
end
$$;
revoke all on function app.apply_token_grant(uuid, uuid, bigint, text, uuid, text) from public;

-- The admin route: the caller must be an admin *in the database*.
create function app.admin_grant_tokens(p_grant uuid, p_user uuid, p_amount bigint, p_reason text)
  returns table (journal_id uuid, balance bigint)
  language plpgsql security definer set search_path = '' as $$
declare
  caller uuid := auth.uid();
begin
  if caller is null then
    raise exception 'no authenticated user' using errcode = '28000';
  end if;
  perform 1 from app.users u where u.id = caller and u.role = 'admin';
  if not found then
    raise exception 'admin role required' using errcode = 'SP053';
  end if;
  return query select g.journal_id, g.balance
    from app.apply_token_grant(p_grant, p_user, p_amount, p_reason, caller, 'user:' || caller::text) g;
end
$$;
revoke all on function app.admin_grant_tokens(uuid, uuid, bigint, text) from public;
grant execute on function app.admin_grant_tokens(uuid, uuid, bigint, text) to authenticated;
