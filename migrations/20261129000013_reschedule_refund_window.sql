-- A reschedule cannot take away a fan's refund right (issue 14, SPEC §3,
-- ADR 0013).
--
-- Before this, a creator could move a paid class with enrolled fans to
-- start in two minutes: every fan's withdrawal then hit the 24 h cut-off
-- (409 cutoff_passed) and settlement paid their escrow to the creator.
-- The rule now:
--
-- 1. A class with paid enrolments cannot be moved to start less than
--    `app.class_withdrawal_cutoff()` (24 h) from now (SP043).
-- 2. After any reschedule (a new start or a new duration) of a class with
--    enrolments, every fan enrolled at that moment may withdraw with a full
--    refund until `app.enrollments.refund_until` = the earlier of the change
--    + `app.class_reschedule_refund_window()` (24 h) and the new start —
--    whatever the normal cut-off says. Fans who enrol later saw the new
--    time and get the normal cut-off only.
-- 3. They are told: `class.updated` carries `refund_window_until` (the
--    window this change opened) on the class's channel, which every enrolled
--    fan may subscribe to, and the calendar copies move (SEQUENCE bump).
-- 4. Settlement never pays out escrow a fan can still withdraw: a class
--    with an open window is skipped (by rule 1 and the cap at the start a
--    window closes before the class ends; this is the second line).

-- How long a reschedule reopens the full-refund withdrawal. The one place
-- this rule lives.
create function app.class_reschedule_refund_window() returns interval
  language sql immutable as $$ select interval '24 hours' $$;
grant execute on function app.class_reschedule_refund_window() to authenticated, stagepass_service;

-- Until when this enrolment may withdraw with a full refund regardless of
-- the cut-off (set by a reschedule; null: never rescheduled while enrolled).
alter table app.enrollments add column refund_until timestamptz;
grant select (refund_until) on app.enrollments to authenticated;

-- The window the last reschedule opened, for the class.updated message.
alter table app.classes add column reschedule_refund_until timestamptz;

-- The caller's own withdrawal deadline: the cut-off, or a reschedule's
-- window if that is later.
create or replace view app.class_view with (security_invoker = true) as
  select c.id, c.creator_id, c.title, c.description, c.starts_at,
         c.starts_at + make_interval(mins => c.duration_minutes) as ends_at,
         c.time_zone, c.duration_minutes, c.capacity, c.price_tokens, c.status,
         c.seats_taken, c.sequence,
         greatest(c.starts_at - app.class_withdrawal_cutoff(),
                  (select e.refund_until from app.enrollments e
                    where e.class_id = c.id and e.user_id = auth.uid()
                      and e.status = 'enrolled')) as withdraw_until,
         exists (select 1 from app.enrollments e
                  where e.class_id = c.id and e.user_id = auth.uid()
                    and e.status in ('enrolled', 'settled')) as enrolled,
         c.created_at, c.updated_at
    from app.classes c;

-- update_class (20261127000006) plus rules 1 and 2.
create or replace function app.update_class(
  p_id uuid, p_title text, p_description text, p_starts_at timestamptz, p_time_zone text,
  p_duration_minutes integer, p_capacity integer, p_price_tokens bigint
) returns setof app.class_view
  language plpgsql security definer set search_path = '' as $$
declare
  c app.classes := app.lock_own_scheduled_class(p_id);
  changed app.classes;
  new_start timestamptz := coalesce(p_starts_at, c.starts_at);
  rescheduled boolean;
  window_until timestamptz;
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
  -- Rule 1: paid fans keep at least a day to decide.
  if new_start <> c.starts_at and new_start < now() + app.class_withdrawal_cutoff() then
    perform 1 from app.enrollments e
     where e.class_id = p_id and e.status = 'enrolled' and e.price_tokens > 0;
    if found then
      raise exception 'a class with paid enrolments cannot be moved to start within 24 hours'
        using errcode = 'SP043', detail = (now() + app.class_withdrawal_cutoff())::text;
    end if;
  end if;
  rescheduled := new_start <> c.starts_at
    or coalesce(p_duration_minutes, c.duration_minutes) <> c.duration_minutes;
  if rescheduled and c.seats_taken > 0 then
    -- Rule 2: never past the new start, so it always closes before the end.
    window_until := least(now() + app.class_reschedule_refund_window(), new_start);
    update app.enrollments
       set refund_until = least(greatest(refund_until, window_until), new_start)
     where class_id = p_id and status = 'enrolled';
  end if;
  update app.classes
     set title = coalesce(p_title, title), description = coalesce(p_description, description),
         starts_at = new_start, time_zone = coalesce(p_time_zone, time_zone),
         duration_minutes = coalesce(p_duration_minutes, duration_minutes),
         capacity = coalesce(p_capacity, capacity), price_tokens = coalesce(p_price_tokens, price_tokens),
         reschedule_refund_until = case when rescheduled then window_until
                                        else reschedule_refund_until end,
         sequence = sequence + 1
   where id = p_id
  returning * into changed;
  if (changed.title, changed.starts_at, changed.duration_minutes)
     is distinct from (c.title, c.starts_at, c.duration_minutes) then
    perform app.sync_class_calendar(p_id);
  end if;
  return query select * from app.class_view where id = p_id;
end
$$;

-- withdraw (20261127000006): the cut-off, or the enrolment's reschedule
-- window while it is open.
create or replace function app.withdraw(p_class uuid)
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
  if now() > c.starts_at - app.class_withdrawal_cutoff()
     and not coalesce(now() < e.refund_until, false) then
    raise exception 'the withdrawal cut-off has passed' using errcode = 'SP034',
      detail = greatest(c.starts_at - app.class_withdrawal_cutoff(), e.refund_until)::text;
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

-- settle_class (20261127000006): rule 4.
create or replace function app.settle_class(p_class uuid) returns bigint
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
  perform 1 from app.enrollments
   where class_id = p_class and status = 'enrolled' and refund_until > now();
  if found then
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

-- settle_ended_classes (20261127000006): a class with an open refund window
-- is not picked (it would count as settled without being settled).
create or replace function app.settle_ended_classes(p_limit integer)
  returns table (settled_classes integer, settled_tokens bigint)
  language plpgsql security definer set search_path = '' as $$
declare
  ended uuid;
  n integer := 0;
  total bigint := 0;
begin
  for ended in
    select c.id from app.classes c
     where c.status = 'scheduled' and c.starts_at + make_interval(mins => c.duration_minutes) <= now()
       and not exists (select 1 from app.enrollments e
                        where e.class_id = c.id and e.status = 'enrolled' and e.refund_until > now())
     order by c.starts_at, c.id
     limit least(greatest(p_limit, 1), 500)
     for update of c skip locked
  loop
    total := total + app.settle_class(ended);
    n := n + 1;
  end loop;
  return query select n, total;
end
$$;

-- class_emit (20261127000007): class.updated tells fans about the refund
-- window a reschedule opened.
create or replace function app.class_emit() returns trigger
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
    if (new.starts_at, new.duration_minutes) is distinct from (old.starts_at, old.duration_minutes)
       and new.seats_taken > 0 then
      data := data || jsonb_build_object('refund_window_until', new.reschedule_refund_until);
    end if;
    perform app.emit('realtime', 'class:' || new.id::text, 'class.updated', data,
      'class.updated:' || new.id::text || ':' || new.sequence::text);
    if new.starts_at <> old.starts_at and new.seats_taken > 0 then
      perform app.schedule_class_reminder(new.id, new.starts_at);
    end if;
  end if;
  return null;
end
$$;
