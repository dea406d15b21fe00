-- Realtime messages and background jobs, recorded in the same transaction
-- as the change that causes them (a transactional outbox, ADR 0007), and
-- the private iCalendar feeds.
--
-- A committed change always has its messages recorded; a rolled-back one
-- never has. Delivery happens after the commit (right after the response,
-- and every minute by the `deliver-outbox` cron for whatever that missed),
-- at least once: each message carries a stable key that Ably (message id)
-- and QStash (deduplication id) use to drop a repeat.

create table app.outbox (
  id               bigint generated always as identity primary key,
  -- realtime: an Ably message; job: a QStash message to one of our job functions.
  kind             text not null constraint outbox_kind_check check (kind in ('realtime', 'job')),
  -- realtime: the channel ('user:<id>', 'class:<id>'); job: the job's name ('class-reminder').
  destination      text not null,
  -- realtime: the event name ('tip.received', …); job: null.
  name             text,
  payload          jsonb not null,
  -- The Ably message id / QStash deduplication id. Recording the same key
  -- again (a retried transaction, two enrolments scheduling one reminder)
  -- keeps one row.
  dedup_key        text not null constraint outbox_dedup_key unique,
  -- job: not to run before this instant (QStash `Upstash-Not-Before`).
  not_before       timestamptz,
  created_at       timestamptz not null default now(),
  attempts         integer not null default 0,
  next_attempt_at  timestamptz not null default now(),
  -- A deliverer holds the row until then (no transaction stays open over
  -- the HTTP call); a crashed deliverer's claim simply runs out.
  claimed_until    timestamptz,
  delivered_at     timestamptz,
  last_error       text
);
create index outbox_pending on app.outbox (next_attempt_at, id) where delivered_at is null;
create index outbox_delivered on app.outbox (delivered_at) where delivered_at is not null;

alter table app.outbox enable row level security;
alter table app.outbox force row level security;
grant select, update, delete on app.outbox to stagepass_service;
create policy outbox_service on app.outbox for all to stagepass_service using (true) with check (true);

-- A deliverer's two steps, one statement each (no transaction is held over
-- the calls to Ably and QStash). Granted to the functions' login itself, so
-- delivering after a response costs one round trip per step.
--
-- Claims up to `p_limit` due rows for 60 s. With `p_inline` (development
-- without QStash) a job is due only from its `not_before`; with QStash it is
-- handed over at once, QStash holding it until then.
-- (`usage` lets the login name them; it grants nothing in the schema that
-- `authenticated`, which every user request runs as, cannot already do.)
grant usage on schema app to stagepass_app;

create function app.claim_outbox(p_limit integer, p_inline boolean) returns setof app.outbox
  language sql security definer set search_path = '' as $$
  update app.outbox o set claimed_until = now() + interval '60 seconds', attempts = o.attempts + 1
   where o.id in (
     select id from app.outbox
      where delivered_at is null and next_attempt_at <= now()
        and (claimed_until is null or claimed_until < now())
        and (kind = 'realtime' or not p_inline or not_before is null or not_before <= now())
      order by id limit least(greatest(p_limit, 1), 500)
      for update skip locked)
  returning o.*
$$;
revoke all on function app.claim_outbox(integer, boolean) from public;
grant execute on function app.claim_outbox(integer, boolean) to stagepass_app, stagepass_service;

-- Records what happened to claimed rows: delivered, or retried with backoff
-- (5 s · 2^attempts, at most an hour); after `p_max_attempts` a row stays
-- undelivered with `next_attempt_at = infinity` (given up, kept for a look).
create function app.record_outbox(
  p_ids bigint[], p_done boolean[], p_errors text[], p_max_attempts integer
) returns void
  language sql security definer set search_path = '' as $$
  update app.outbox o
     set delivered_at = case when r.done then now() end,
         last_error = r.error, claimed_until = null,
         next_attempt_at = case
           when r.done then o.next_attempt_at
           when o.attempts >= p_max_attempts then 'infinity'::timestamptz
           else now() + make_interval(secs => least(3600, 5 * power(2, least(o.attempts, 12))))
         end
    from unnest(p_ids, p_done, p_errors) as r(id, done, error)
   where o.id = r.id
$$;
revoke all on function app.record_outbox(bigint[], boolean[], text[], integer) from public;
grant execute on function app.record_outbox(bigint[], boolean[], text[], integer)
  to stagepass_app, stagepass_service;

-- Records a message (definer rights: users never write the outbox directly).
-- A repeat of a key not yet delivered takes the newer payload: several
-- balance changes of one wallet in one transaction become one message.
create function app.emit(
  p_kind text, p_destination text, p_name text, p_payload jsonb, p_dedup_key text,
  p_not_before timestamptz default null
) returns void
  language sql security definer set search_path = '' as $$
  insert into app.outbox as o (kind, destination, name, payload, dedup_key, not_before)
    values (p_kind, p_destination, p_name, p_payload, p_dedup_key, p_not_before)
    on conflict on constraint outbox_dedup_key do update
      set payload = excluded.payload, not_before = excluded.not_before
      where o.delivered_at is null and o.claimed_until is null
$$;
revoke all on function app.emit(text, text, text, jsonb, text, timestamptz) from public;

-- balance.updated: every change of a wallet's balance, whatever moved it
-- (tip, purchase, refund, chargeback, enrolment, withdrawal, cancellation,
-- settlement). One message per wallet and transaction, with the balance
-- at its end.
create function ledger.emit_balance_updated() returns trigger
  language plpgsql security definer set search_path = '' as $$
begin
  perform app.emit('realtime', 'user:' || new.owner_id::text, 'balance.updated',
    jsonb_build_object('balance', new.balance),
    'balance:' || new.id::text || ':' || pg_catalog.txid_current()::text);
  return null;
end
$$;
create trigger accounts_balance_updated after update of balance on ledger.accounts
  for each row when (new.kind = 'wallet' and new.balance is distinct from old.balance)
  execute function ledger.emit_balance_updated();

-- How long before its start a class's reminder goes out (SPEC §3).
create function app.class_reminder_lead() returns interval
  language sql immutable as $$ select interval '15 minutes' $$;
grant execute on function app.class_reminder_lead() to authenticated, stagepass_service;

-- Schedules the reminder of a class for its current start: one QStash
-- message per (class, start), so every enrolment after the first and every
-- retry is a repeat, and a reschedule gets a new one (the old one finds
-- the start moved and does nothing). None when the reminder time has passed.
create function app.schedule_class_reminder(p_class uuid, p_starts_at timestamptz) returns void
  language plpgsql security definer set search_path = '' as $$
begin
  if p_starts_at - app.class_reminder_lead() > now() then
    perform app.emit('job', 'class-reminder', null,
      jsonb_build_object('class_id', p_class, 'starts_at', p_starts_at),
      'class-reminder:' || p_class::text || ':' || extract(epoch from p_starts_at)::bigint::text,
      p_starts_at - app.class_reminder_lead());
  end if;
end
$$;
revoke all on function app.schedule_class_reminder(uuid, timestamptz) from public;

create function app.enrollment_emit() returns trigger
  language plpgsql security definer set search_path = '' as $$
begin
  perform app.schedule_class_reminder(c.id, c.starts_at) from app.classes c where c.id = new.class_id;
  return null;
end
$$;
create trigger enrollments_schedule_reminder after insert on app.enrollments
  for each row when (new.status = 'enrolled') execute function app.enrollment_emit();

-- class.updated (a creator's edit: the sequence moves), class.cancelled,
-- and a new reminder when the start moves while fans are enrolled.
-- Seat counts change on every enrolment without a message.
create function app.class_emit() returns trigger
  language plpgsql security definer set search_path = '' as $$
declare
  data jsonb := jsonb_build_object(
    'class_id', new.id, 'title', new.title, 'starts_at', new.starts_at,
    'ends_at', new.starts_at + make_interval(mins => new.duration_minutes),
    'status', new.status, 'sequence', new.sequence);
begin
  if old.status = 'scheduled' and new.status = 'cancelled' then
    perform app.emit('realtime', 'class:' || new.id::text, 'class.cancelled', data,
      'class.cancelled:' || new.id::text);
  elsif new.status = 'scheduled' and new.sequence <> old.sequence then
    perform app.emit('realtime', 'class:' || new.id::text, 'class.updated', data,
      'class.updated:' || new.id::text || ':' || new.sequence::text);
    if new.starts_at <> old.starts_at and new.seats_taken > 0 then
      perform app.schedule_class_reminder(new.id, new.starts_at);
    end if;
  end if;
  return null;
end
$$;
create trigger classes_emit after update on app.classes
  for each row execute function app.class_emit();

-- tip.received: the tip function again (20261127000004), now also telling
-- the creator. Same rules, same lock order.
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
  perform app.emit('realtime', 'user:' || p_recipient::text, 'tip.received',
    jsonb_build_object('tip_id', p_tip_id, 'from', payer, 'amount', p_amount - fee,
                       'message', p_message),
    'tip:' || p_tip_id::text);
  return query select journal, payer_balance - p_amount;
end
$$;

-- The reminder job (QStash callback, or inline in development): notifies
-- the class's channel only if the class is still on, still starts when the
-- message was scheduled for, and someone is enrolled. Returns what it did.
-- Idempotent: a repeat records the same message key again.
create function app.run_class_reminder(p_class uuid, p_starts_at timestamptz) returns text
  language plpgsql security definer set search_path = '' as $$
declare
  c app.classes;
begin
  select * into c from app.classes where id = p_class for share;
  if not found then
    return 'class_not_found';
  elsif c.status <> 'scheduled' then
    return 'class_' || c.status;
  elsif c.starts_at <> p_starts_at then
    return 'rescheduled';
  elsif not exists (select 1 from app.enrollments e
                     where e.class_id = p_class and e.status = 'enrolled') then
    return 'nobody_enrolled';
  end if;
  perform app.emit('realtime', 'class:' || p_class::text, 'class.reminder',
    jsonb_build_object('class_id', c.id, 'title', c.title, 'starts_at', c.starts_at,
                       'ends_at', c.starts_at + make_interval(mins => c.duration_minutes)),
    'class.reminder:' || p_class::text || ':' || extract(epoch from c.starts_at)::bigint::text);
  return 'sent';
end
$$;
revoke all on function app.run_class_reminder(uuid, timestamptz) from public;
grant execute on function app.run_class_reminder(uuid, timestamptz) to stagepass_service;

-- Private iCalendar feeds: one per user, found by the SHA-256 of its
-- secret token (the token itself is shown once, when made, and never
-- stored). Rotating replaces the hash, so the old URL stops working.
create table app.calendar_feeds (
  user_id     uuid primary key references app.users (id),
  token_hash  bytea not null constraint calendar_feeds_token_hash_key unique
              constraint calendar_feeds_token_hash_length check (octet_length(token_hash) = 32),
  created_at  timestamptz not null default now()
);
alter table app.calendar_feeds enable row level security;
alter table app.calendar_feeds force row level security;

create function app.rotate_calendar_feed(p_token_hash bytea) returns timestamptz
  language plpgsql security definer set search_path = '' as $$
declare
  caller uuid := auth.uid();
  made timestamptz;
begin
  if caller is null then
    raise exception 'no authenticated user' using errcode = '28000';
  end if;
  insert into app.calendar_feeds as f (user_id, token_hash) values (caller, p_token_hash)
    on conflict (user_id) do update set token_hash = excluded.token_hash, created_at = now()
  returning f.created_at into made;
  return made;
end
$$;
revoke all on function app.rotate_calendar_feed(bytea) from public;
grant execute on function app.rotate_calendar_feed(bytea) to authenticated;

-- The events of the feed whose token hashes to `p_token_hash` (none for an
-- unknown or rotated token): from 90 days ago on, by start, at most 2,000.
create function app.calendar_feed_events(p_token_hash bytea)
  returns table (id uuid, source_kind text, source_id uuid, role text, title text,
                 starts_at timestamptz, ends_at timestamptz, status text, sequence integer,
                 created_at timestamptz, updated_at timestamptz)
  language sql stable security definer set search_path = '' as $$
  select ev.id, ev.source_kind, ev.source_id, ev.role, ev.title, ev.starts_at, ev.ends_at,
         ev.status, ev.sequence, ev.created_at, ev.updated_at
    from app.calendar_feeds f
    join app.calendar_events ev on ev.user_id = f.user_id
   where f.token_hash = p_token_hash and ev.ends_at > now() - interval '90 days'
   order by ev.starts_at, ev.id
   limit 2000
$$;
revoke all on function app.calendar_feed_events(bytea) from public;
grant execute on function app.calendar_feed_events(bytea) to stagepass_service;

-- Whether a feed exists for `p_token_hash` (an empty calendar and an
-- unknown token answer differently: 200 and 404).
create function app.calendar_feed_exists(p_token_hash bytea) returns boolean
  language sql stable security definer set search_path = '' as $$
  select exists (select 1 from app.calendar_feeds where token_hash = p_token_hash)
$$;
revoke all on function app.calendar_feed_exists(bytea) from public;
grant execute on function app.calendar_feed_exists(bytea) to stagepass_service;
