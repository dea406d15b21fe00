-- Paid live classes, their enrolments held in escrow, and the calendar
-- copies that keep every host's and attendee's schedule in sync.
--
-- Money: a fan's price moves into the class's escrow account
-- (`ledger.accounts` kind 'escrow', reference 'class:<id>') when they enrol.
-- It leaves escrow exactly one way per enrolment: back to the fan (withdrawal
-- before the cut-off, or the creator cancelling), or to the creator when the
-- class has ended (the settlement cron). Invariant, asserted at settlement:
-- a scheduled class's escrow balance equals the sum of its active enrolments'
-- prices.
--
-- Lock order, the same in every function below: the class row first (which
-- serialises everything that happens to one class, and enforces capacity),
-- then the payer's wallet (`ledger.lock_for_spend`), then escrow, then the
-- credited wallets last (ADR 0005).
--
-- `authenticated` may read classes and its own enrolments and calendar
-- events; every write goes through the SECURITY DEFINER functions, which
-- take the caller from `auth.uid()`.

-- How long before the start a fan may still withdraw with a full refund
-- (SPEC §3). The one place this rule lives; routes read it through
-- `withdraw_until` in the class rows they return.
create function app.class_withdrawal_cutoff() returns interval
  language sql immutable as $$ select interval '24 hours' $$;
grant execute on function app.class_withdrawal_cutoff() to authenticated, stagepass_service;

create table app.classes (
  id                uuid primary key,
  creator_id        uuid not null references app.users (id),
  title             text not null
                    constraint classes_title_length check (char_length(title) between 1 and 120),
  description       text not null default ''
                    constraint classes_description_length check (char_length(description) <= 5000),
  starts_at         timestamptz not null,
  -- IANA zone the creator scheduled in, for display; the instant is
  -- `starts_at`. Checked against Postgres's own zone database on write.
  time_zone         text not null
                    constraint classes_time_zone_length check (char_length(time_zone) between 1 and 64),
  duration_minutes  integer not null
                    constraint classes_duration_range check (duration_minutes between 15 and 480),
  capacity          integer not null
                    constraint classes_capacity_range check (capacity between 1 and 1000),
  price_tokens      bigint not null
                    constraint classes_price_range check (price_tokens between 0 and 100000),
  status            text not null default 'scheduled'
                    constraint classes_status_check check (status in ('scheduled', 'cancelled', 'settled')),
  -- Active enrolments; the database refuses overbooking even if a check
  -- above it were missed.
  seats_taken       integer not null default 0
                    constraint classes_seats_range check (seats_taken between 0 and capacity),
  -- Bumped on every change, so calendar consumers (iCalendar SEQUENCE) see
  -- updates in order.
  sequence          integer not null default 0,
  created_at        timestamptz not null default now(),
  updated_at        timestamptz not null default now()
);
create index classes_upcoming on app.classes (starts_at, id) where status = 'scheduled';
create index classes_creator on app.classes (creator_id, starts_at, id);
create trigger classes_touch before update on app.classes
  for each row execute function app.touch_updated_at();

create table app.enrollments (
  id                 uuid primary key,
  class_id           uuid not null references app.classes (id),
  user_id            uuid not null references app.users (id),
  -- enrolled: paid, in escrow; withdrawn: the fan left and was refunded;
  -- refunded: the class was cancelled; settled: paid out to the creator.
  status             text not null default 'enrolled'
                     constraint enrollments_status_check
                     check (status in ('enrolled', 'withdrawn', 'refunded', 'settled')),
  -- What the fan paid (the class price at enrolment).
  price_tokens       bigint not null constraint enrollments_price_range check (price_tokens >= 0),
  -- Journal ('class_enrollment', id); null for a free class.
  charge_journal_id  uuid,
  -- Journal ('class_refund', id) of a withdrawal or cancellation.
  refund_journal_id  uuid,
  created_at         timestamptz not null default now(),
  updated_at         timestamptz not null default now()
);
-- One active seat per fan and class: a second enrolment is refused by the
-- database; after a withdrawal the fan may enrol again (a new row).
create unique index enrollments_active_key on app.enrollments (class_id, user_id)
  where status in ('enrolled', 'settled');
create index enrollments_user on app.enrollments (user_id, created_at desc);
create trigger enrollments_touch before update on app.enrollments
  for each row execute function app.touch_updated_at();

-- Calendar copies: one row per (user, source). Kept in sync with their
-- source by the functions that change it, never written by users.
create table app.calendar_events (
  id           uuid primary key default gen_random_uuid(),
  user_id      uuid not null references app.users (id),
  source_kind  text not null constraint calendar_events_source_kind_check check (source_kind in ('class')),
  source_id    uuid not null,
  role         text not null constraint calendar_events_role_check check (role in ('host', 'attendee')),
  title        text not null,
  starts_at    timestamptz not null,
  ends_at      timestamptz not null,
  status       text not null default 'confirmed'
               constraint calendar_events_status_check check (status in ('confirmed', 'cancelled')),
  sequence     integer not null default 0,
  created_at   timestamptz not null default now(),
  updated_at   timestamptz not null default now(),
  constraint calendar_events_source_key unique (user_id, source_kind, source_id),
  constraint calendar_events_time_order check (ends_at > starts_at)
);
create index calendar_events_user_time on app.calendar_events (user_id, starts_at);
create index calendar_events_source on app.calendar_events (source_kind, source_id);
create trigger calendar_events_touch before update on app.calendar_events
  for each row execute function app.touch_updated_at();

alter table app.classes enable row level security;
alter table app.classes force row level security;
alter table app.enrollments enable row level security;
alter table app.enrollments force row level security;
alter table app.calendar_events enable row level security;
alter table app.calendar_events force row level security;

-- Classes are public to signed-in users while scheduled; a cancelled or
-- settled class stays visible to its creator and to fans who enrolled.
grant select on app.classes to authenticated, stagepass_service;
create policy classes_read on app.classes for select to authenticated using (
  status = 'scheduled' or creator_id = auth.uid()
  or exists (select 1 from app.enrollments e where e.class_id = classes.id and e.user_id = auth.uid()));
create policy classes_service_read on app.classes for select to stagepass_service using (true);

grant select (id, class_id, user_id, status, price_tokens, created_at, updated_at)
  on app.enrollments to authenticated;
grant select on app.enrollments to stagepass_service;
create policy enrollments_read_own on app.enrollments for select to authenticated
  using (user_id = auth.uid());
create policy enrollments_service_read on app.enrollments for select to stagepass_service using (true);

grant select on app.calendar_events to authenticated, stagepass_service;
create policy calendar_events_read_own on app.calendar_events for select to authenticated
  using (user_id = auth.uid());
create policy calendar_events_service_read on app.calendar_events for select to stagepass_service
  using (true);

-- A class as the API returns it: the row plus what is derived from it.
create view app.class_view with (security_invoker = true) as
  select c.id, c.creator_id, c.title, c.description, c.starts_at,
         c.starts_at + make_interval(mins => c.duration_minutes) as ends_at,
         c.time_zone, c.duration_minutes, c.capacity, c.price_tokens, c.status,
         c.seats_taken, c.sequence,
         c.starts_at - app.class_withdrawal_cutoff() as withdraw_until,
         exists (select 1 from app.enrollments e
                  where e.class_id = c.id and e.user_id = auth.uid()
                    and e.status in ('enrolled', 'settled')) as enrolled,
         c.created_at, c.updated_at
    from app.classes c;
grant select on app.class_view to authenticated, stagepass_service;

-- Raises SP038 unless `p_zone` is an IANA zone name ('Area/City', or 'UTC')
-- that Postgres's own zone database knows, so a display zone can always be
-- converted. The shape check keeps out abbreviations and POSIX rules
-- ('EST', 'UTC+5'), which `timezone()` would accept; the lookup is cached
-- by Postgres (scanning `pg_timezone_names` instead costs ~50 ms a call).
create function app.check_time_zone(p_zone text) returns void
  language plpgsql stable set search_path = '' as $$
begin
  if p_zone is null or p_zone !~ '^(UTC|[A-Za-z]+(/[A-Za-z0-9_+-]+)+)$' then
    raise exception 'not a zone name: %', p_zone using errcode = 'SP038';
  end if;
  begin
    perform pg_catalog.timezone(p_zone, pg_catalog.now());
  exception when invalid_parameter_value then
    raise exception 'unknown time zone %', p_zone using errcode = 'SP038';
  end;
end
$$;

-- Locks the class for a change by its creator; SP041 unknown, SP035 not the
-- owner, SP031 no longer scheduled.
create function app.lock_own_scheduled_class(p_class uuid) returns app.classes
  language plpgsql security definer set search_path = '' as $$
declare
  c app.classes;
begin
  select * into c from app.classes where id = p_class for update;
  if not found then
    raise exception 'class not found' using errcode = 'SP041';
  end if;
  if c.creator_id is distinct from auth.uid() then
    raise exception 'not the owner of this class' using errcode = 'SP035';
  end if;
  if c.status <> 'scheduled' then
    raise exception 'class is %', c.status using errcode = 'SP031';
  end if;
  return c;
end
$$;
revoke all on function app.lock_own_scheduled_class(uuid) from public;

-- Refunds `p_amount` from `p_from` (an escrow) to a user: debt is repaid
-- first, the rest goes to the wallet, like every credit (ADR 0005). The
-- wallet is locked before the debt, the order spends and claw-backs use, so
-- a refund and a claw-back of one user cannot deadlock.
create function ledger.refund_to_user(
  p_kind text, p_reference text, p_from uuid, p_user uuid, p_amount bigint, p_metadata jsonb
) returns uuid
  language plpgsql security definer set search_path = '' as $$
declare
  owed bigint;
  repay bigint;
begin
  perform 1 from ledger.accounts
   where kind = 'wallet' and owner_id = p_user and reference is null for update;
  select -balance into owed from ledger.accounts
   where kind = 'debt' and owner_id = p_user and reference is null for update;
  repay := least(coalesce(owed, 0), p_amount);
  return ledger.post(p_kind, p_reference,
    array[p_from, ledger.account_of('debt', p_user), ledger.account_of('wallet', p_user)],
    array[-p_amount, repay, p_amount - repay], p_metadata);
end
$$;
revoke all on function ledger.refund_to_user(text, text, uuid, uuid, bigint, jsonb) from public;

create function ledger.class_escrow(p_class uuid) returns uuid
  language sql stable security definer set search_path = '' as $$
  select id from ledger.accounts where kind = 'escrow' and reference = 'class:' || p_class::text
$$;
revoke all on function ledger.class_escrow(uuid) from public;

-- Creates a class for the caller, who must be a creator (SP033), starting in
-- the future (SP039), with a known zone (SP038); opens its escrow account and
-- puts it on the creator's calendar.
create function app.create_class(
  p_id uuid, p_title text, p_description text, p_starts_at timestamptz, p_time_zone text,
  p_duration_minutes integer, p_capacity integer, p_price_tokens bigint
) returns setof app.class_view
  language plpgsql security definer set search_path = '' as $$
declare
  caller uuid := auth.uid();
begin
  if caller is null then
    raise exception 'no authenticated user' using errcode = '28000';
  end if;
  perform 1 from app.users where id = caller and role = 'creator';
  if not found then
    raise exception 'only creators create classes' using errcode = 'SP033';
  end if;
  if p_starts_at <= now() then
    raise exception 'a class must start in the future' using errcode = 'SP039';
  end if;
  perform app.check_time_zone(p_time_zone);
  insert into app.classes (id, creator_id, title, description, starts_at, time_zone,
                           duration_minutes, capacity, price_tokens)
    values (p_id, caller, p_title, coalesce(p_description, ''), p_starts_at, p_time_zone,
            p_duration_minutes, p_capacity, p_price_tokens);
  insert into ledger.accounts (kind, owner_id, reference) values ('escrow', caller, 'class:' || p_id::text);
  insert into app.calendar_events (user_id, source_kind, source_id, role, title, starts_at, ends_at)
    values (caller, 'class', p_id, 'host', p_title, p_starts_at,
            p_starts_at + make_interval(mins => p_duration_minutes));
  return query select * from app.class_view where id = p_id;
end
$$;
revoke all on function app.create_class(uuid, text, text, timestamptz, text, integer, integer, bigint) from public;
grant execute on function app.create_class(uuid, text, text, timestamptz, text, integer, integer, bigint)
  to authenticated;

-- Copies a class's title and times onto every calendar copy of it (host and
-- attendees, cancelled copies too, so they never disagree with the source)
-- and bumps their sequence.
create function app.sync_class_calendar(p_class uuid) returns void
  language sql security definer set search_path = '' as $$
  update app.calendar_events ev
     set title = c.title, starts_at = c.starts_at,
         ends_at = c.starts_at + make_interval(mins => c.duration_minutes),
         sequence = ev.sequence + 1
    from app.classes c
   where c.id = p_class and ev.source_kind = 'class' and ev.source_id = p_class
$$;
revoke all on function app.sync_class_calendar(uuid) from public;

-- The owner edits a scheduled class; a null argument leaves the field as it
-- is. The price is fixed once anyone holds a seat (SP040): fans paid the
-- price they saw, and escrow must equal the sum of what they paid. Capacity
-- cannot drop below the seats taken (SP042). A new start must be in the
-- future (SP039). Every calendar copy follows a new title or time.
create function app.update_class(
  p_id uuid, p_title text, p_description text, p_starts_at timestamptz, p_time_zone text,
  p_duration_minutes integer, p_capacity integer, p_price_tokens bigint
) returns setof app.class_view
  language plpgsql security definer set search_path = '' as $$
declare
  c app.classes := app.lock_own_scheduled_class(p_id);
  changed app.classes;
begin
  if p_starts_at is not null and p_starts_at <> c.starts_at and p_starts_at <= now() then
    raise exception 'a class must start in the future' using errcode = 'SP039';
  end if;
  if p_time_zone is not null then
    perform app.check_time_zone(p_time_zone);
  end if;
  if p_price_tokens is not null and p_price_tokens <> c.price_tokens and c.seats_taken > 0 then
    raise exception 'the price cannot change once fans have enrolled' using errcode = 'SP040';
  end if;
  if p_capacity is not null and p_capacity < c.seats_taken then
    raise exception 'capacity below the seats taken' using errcode = 'SP042',
      detail = c.seats_taken::text;
  end if;
  update app.classes
     set title = coalesce(p_title, title), description = coalesce(p_description, description),
         starts_at = coalesce(p_starts_at, starts_at), time_zone = coalesce(p_time_zone, time_zone),
         duration_minutes = coalesce(p_duration_minutes, duration_minutes),
         capacity = coalesce(p_capacity, capacity), price_tokens = coalesce(p_price_tokens, price_tokens),
         sequence = sequence + 1
   where id = p_id
  returning * into changed;
  -- Calendar copies carry only the title and the times: other edits do not
  -- touch them (nor bump their sequence).
  if (changed.title, changed.starts_at, changed.duration_minutes)
     is distinct from (c.title, c.starts_at, c.duration_minutes) then
    perform app.sync_class_calendar(p_id);
  end if;
  return query select * from app.class_view where id = p_id;
end
$$;
revoke all on function app.update_class(uuid, text, text, timestamptz, text, integer, integer, bigint) from public;
grant execute on function app.update_class(uuid, text, text, timestamptz, text, integer, integer, bigint)
  to authenticated;

-- The caller enrols in a class, paying its price into the class's escrow.
-- Checked in this order with the class row locked, so capacity holds under
-- any concurrency: SP041 unknown class, SP036 own class, SP031 not open
-- (cancelled, settled or started), SP032 already enrolled, SP030 full; then
-- `ledger.lock_for_spend` (debt, funds, daily limit: the journal kind
-- 'class_enrollment' counts toward it). A free class charges nothing.
create function app.enroll(p_class uuid, p_enrollment uuid)
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
  if c.status <> 'scheduled' or c.starts_at <= now() then
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
    select a.balance into wallet_balance from ledger.accounts a
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
revoke all on function app.enroll(uuid, uuid) from public;
grant execute on function app.enroll(uuid, uuid) to authenticated;

-- The caller leaves a class with a full refund from escrow, until the
-- cut-off before the start (SP034 after it). SP041 unknown class, SP037 not
-- enrolled (including a class already cancelled: that refunded everyone).
create function app.withdraw(p_class uuid)
  returns table (enrollment_id uuid, journal_id uuid, refunded_tokens bigint)
  language plpgsql security definer set search_path = '' as $$
#variable_conflict use_column
declare
  caller uuid := auth.uid();
  c app.classes;
  e app.enrollments;
  journal uuid;
begin
  if caller is null then
    raise exception 'no authenticated user' using errcode = '28000';
  end if;
  select * into c from app.classes where id = p_class for update;
  if not found then
    raise exception 'class not found' using errcode = 'SP041';
  end if;
  select * into e from app.enrollments x
   where x.class_id = p_class and x.user_id = caller and x.status = 'enrolled' for update;
  if not found or c.status <> 'scheduled' then
    raise exception 'not enrolled' using errcode = 'SP037';
  end if;
  if now() > c.starts_at - app.class_withdrawal_cutoff() then
    raise exception 'the withdrawal cut-off has passed' using errcode = 'SP034',
      detail = (c.starts_at - app.class_withdrawal_cutoff())::text;
  end if;
  if e.price_tokens > 0 then
    journal := ledger.refund_to_user('class_refund', e.id::text, ledger.class_escrow(p_class),
      caller, e.price_tokens, jsonb_build_object('class_id', p_class, 'reason', 'withdrawn'));
  end if;
  update app.enrollments set status = 'withdrawn', refund_journal_id = journal where id = e.id;
  update app.classes set seats_taken = seats_taken - 1 where id = p_class;
  update app.calendar_events set status = 'cancelled', sequence = sequence + 1
   where user_id = caller and source_kind = 'class' and source_id = p_class;
  return query select e.id, journal, e.price_tokens;
end
$$;
revoke all on function app.withdraw(uuid) from public;
grant execute on function app.withdraw(uuid) to authenticated;

-- The owner cancels a scheduled class: every enrolled fan is refunded from
-- escrow (one journal per enrolment), the creator is never paid, escrow ends
-- at zero, and every calendar copy is cancelled. Returns the fans refunded
-- and the tokens returned.
create function app.cancel_class(p_class uuid)
  returns table (refunded_enrollments integer, refunded_tokens bigint)
  language plpgsql security definer set search_path = '' as $$
declare
  c app.classes := app.lock_own_scheduled_class(p_class);
  escrow uuid := ledger.class_escrow(p_class);
  e record;
  journal uuid;
  fans integer := 0;
  tokens bigint := 0;
begin
  for e in select id, user_id, price_tokens from app.enrollments
            where class_id = p_class and status = 'enrolled' order by id for update loop
    journal := null;
    if e.price_tokens > 0 then
      journal := ledger.refund_to_user('class_refund', e.id::text, escrow, e.user_id, e.price_tokens,
        jsonb_build_object('class_id', p_class, 'reason', 'cancelled'));
    end if;
    update app.enrollments set status = 'refunded', refund_journal_id = journal where id = e.id;
    fans := fans + 1;
    tokens := tokens + e.price_tokens;
  end loop;
  if (select balance from ledger.accounts where id = escrow) <> 0 then
    raise exception 'escrow of class % not empty after refunds', p_class using errcode = 'SP000';
  end if;
  update app.classes set status = 'cancelled', seats_taken = 0, sequence = sequence + 1
   where id = p_class;
  update app.calendar_events set status = 'cancelled', sequence = sequence + 1
   where source_kind = 'class' and source_id = p_class;
  return query select fans, tokens;
end
$$;
revoke all on function app.cancel_class(uuid) from public;
grant execute on function app.cancel_class(uuid) to authenticated;

-- Settles one ended class: escrow to the creator less the platform fee, as
-- journal ('class_settlement', class id). The escrow must hold exactly the
-- active enrolments' prices (SP000 otherwise: never pay out a drifted hold).
create function app.settle_class(p_class uuid) returns bigint
  language plpgsql security definer set search_path = '' as $$
declare
  c app.classes;
  escrow uuid := ledger.class_escrow(p_class);
  held bigint;
  owed bigint;
  fee bigint;
begin
  select * into c from app.classes where id = p_class for update;
  if not found or c.status <> 'scheduled' then
    return 0;
  end if;
  select balance into held from ledger.accounts where id = escrow for update;
  select coalesce(sum(price_tokens), 0) into owed from app.enrollments
   where class_id = p_class and status = 'enrolled';
  if held <> owed then
    raise exception 'escrow of class % holds % but enrolments paid %', p_class, held, owed
      using errcode = 'SP000';
  end if;
  if held > 0 then
    select (held * platform_fee_bps) / 10000 into fee from ledger.settings;
    perform ledger.post('class_settlement', p_class::text,
      array[escrow, ledger.singleton('platform_revenue'), ledger.account_of('wallet', c.creator_id)],
      array[-held, fee, held - fee],
      jsonb_build_object('class_id', p_class, 'enrollments', c.seats_taken));
  end if;
  update app.enrollments set status = 'settled' where class_id = p_class and status = 'enrolled';
  update app.classes set status = 'settled', sequence = sequence + 1 where id = p_class;
  return held;
end
$$;
revoke all on function app.settle_class(uuid) from public;

-- Service path (settlement cron): settles up to `p_limit` classes that have
-- ended and are still scheduled. Rows another run holds are skipped, and a
-- settled class is never picked again, so repeated runs are harmless.
-- Returns the classes settled and the tokens paid out.
create function app.settle_ended_classes(p_limit integer)
  returns table (settled_classes integer, settled_tokens bigint)
  language plpgsql security definer set search_path = '' as $$
declare
  ended uuid;
  n integer := 0;
  total bigint := 0;
begin
  for ended in
    select id from app.classes
     where status = 'scheduled' and starts_at + make_interval(mins => duration_minutes) <= now()
     order by starts_at, id
     limit least(greatest(p_limit, 1), 500)
     for update skip locked
  loop
    total := total + app.settle_class(ended);
    n := n + 1;
  end loop;
  return query select n, total;
end
$$;
revoke all on function app.settle_ended_classes(integer) from public;
grant execute on function app.settle_ended_classes(integer) to stagepass_service;
