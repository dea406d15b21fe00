-- Feature flags (issue 15, ADR 0016): gradual rollouts as data. A flag is on
-- for a user when (in this order, first match wins):
--   1. the flag is disabled          → off for everyone (the kill switch; the
--                                      allow list does not override it)
--   2. the user is on the deny list  → off
--   3. the user is on the allow list → on
--   4. `roles` is not empty and the user's role is not in it → off
--   5. bucket(key, user) < rollout_basis_points → on, else off
-- where bucket(key, user) is the first four bytes of
-- sha256('<key>:<user uuid, lower-case hyphenated>') as a big-endian unsigned
-- integer, modulo 10,000. `stagepass_platform::flags` computes exactly the
-- same in Rust (a test compares them over many ids). A user's bucket does not
-- depend on the percentage, so raising 5 % to 20 % keeps the first 5 % in.
--
-- Functions evaluate flags in Rust from a per-process cache refreshed at most
-- every FLAGS_CACHE_SECONDS through `app.flag_snapshot()`; `app.flag_on` is
-- the same rule for SQL that needs it.
--
-- Only an admin (in the database, never by a token claim) through
-- `app.admin_change_flag`, or the operator through `app.operator_change_flag`,
-- changes a flag; `authenticated` has no privilege on the tables at all.
-- Every change is one row of the append-only `app.feature_flag_changes`.
--
-- SQLSTATEs (the contract with `stagepass_routes::flags` and the CLI):
--   SP060 the caller is not an admin
--   SP061 reason missing, longer than 500 characters, or with control characters
--   SP062 a flag with this key already exists (create)
--   SP063 no such flag (change)
--   SP064 invalid flag fields (key, description, rollout, lists, roles)

create table app.feature_flags (
  key                  text primary key
                       constraint feature_flags_key_format check (key ~ '^[a-z][a-z0-9_]{1,39}$'),
  description          text not null
                       constraint feature_flags_description_check
                       check (char_length(btrim(description)) between 1 and 500
                              and description !~ '[[:cntrl:]]'),
  enabled              boolean not null default false,
  -- 0–10,000 basis points: 500 = 5 %, 10,000 = everyone (who passes the
  -- lists and roles).
  rollout_basis_points integer not null default 0
                       constraint feature_flags_rollout_range
                       check (rollout_basis_points between 0 and 10000),
  allow_users          uuid[] not null default '{}'
                       constraint feature_flags_allow_users_check
                       check (cardinality(allow_users) <= 1000 and array_position(allow_users, null) is null),
  deny_users           uuid[] not null default '{}'
                       constraint feature_flags_deny_users_check
                       check (cardinality(deny_users) <= 1000 and array_position(deny_users, null) is null),
  -- Empty: every role. Otherwise only these roles get the percentage.
  roles                text[] not null default '{}'
                       constraint feature_flags_roles_check
                       check (roles <@ array['fan', 'creator', 'admin']::text[]
                              and array_position(roles, null) is null),
  created_at           timestamptz not null default app.now(),
  updated_at           timestamptz not null default app.now()
);

create trigger feature_flags_touch before update on app.feature_flags
  for each row execute function app.touch_updated_at();

-- Who changed which flag, when, from what to what, and why. `before` is null
-- for the creation. Written only by `app.apply_flag_change`, never changed.
create table app.feature_flag_changes (
  id          bigint generated always as identity primary key,
  flag_key    text not null references app.feature_flags (key),
  before      jsonb,
  after       jsonb not null,
  -- The admin who made the change; null when the operator did (CLI).
  changed_by  uuid references app.users (id),
  -- `user:<uuid>` or `operator:<name>`: always says who.
  actor       text not null,
  reason      text not null constraint feature_flag_changes_reason_check
                check (char_length(btrim(reason)) between 1 and 500 and reason !~ '[[:cntrl:]]'),
  changed_at  timestamptz not null default app.now()
);
create index feature_flag_changes_key on app.feature_flag_changes (flag_key, id desc);

create trigger feature_flag_changes_append_only before update or delete on app.feature_flag_changes
  for each row execute function app.refuse_change();
create trigger feature_flag_changes_no_truncate before truncate on app.feature_flag_changes
  for each statement execute function app.refuse_change();

-- Grants: `authenticated` gets nothing on either table (no select, no
-- write); the service role (the CLI's `flags list`) may read. RLS is the
-- second lock: no policy lets anyone but the service role see a row.
alter table app.feature_flags enable row level security;
alter table app.feature_flags force row level security;
alter table app.feature_flag_changes enable row level security;
alter table app.feature_flag_changes force row level security;
grant select on app.feature_flags, app.feature_flag_changes to stagepass_service;
create policy feature_flags_service_read on app.feature_flags for select to stagepass_service
  using (true);
create policy feature_flag_changes_service_read on app.feature_flag_changes for select
  to stagepass_service using (true);

-- The bucket of (flag, user): 0–9,999, the same as `flags::bucket` in Rust.
create function app.flag_bucket(p_key text, p_user uuid) returns integer
  language sql immutable strict parallel safe set search_path = '' as $$
  select ((('x' || substr(encode(sha256(convert_to(p_key || ':' || p_user::text, 'UTF8')), 'hex'), 1, 8))
           ::bit(32)::bigint) % 10000)::integer
$$;
revoke all on function app.flag_bucket(text, uuid) from public;
grant execute on function app.flag_bucket(text, uuid) to authenticated, stagepass_service, stagepass_app;

-- The rule of the header for one flag row (no table access: pure).
create function app.flag_evaluate(
  p_enabled boolean, p_key text, p_rollout integer, p_allow uuid[], p_deny uuid[],
  p_roles text[], p_user uuid, p_role text
) returns boolean
  language sql immutable parallel safe set search_path = '' as $$
  select case
    when not p_enabled or p_user is null then false
    when p_user = any (p_deny) then false
    when p_user = any (p_allow) then true
    when cardinality(p_roles) > 0 and (p_role is null or not p_role = any (p_roles)) then false
    else app.flag_bucket(p_key, p_user) < p_rollout
  end
$$;
revoke all on function app.flag_evaluate(boolean, text, integer, uuid[], uuid[], text[], uuid, text)
  from public;
grant execute on function app.flag_evaluate(boolean, text, integer, uuid[], uuid[], text[], uuid, text)
  to authenticated, stagepass_service, stagepass_app;

-- Whether flag `p_key` is on for `p_user` (their role read from the
-- database). An unknown flag is off. For SQL rules that need a flag (the
-- future `calls` and `payouts` functions).
create function app.flag_on(p_key text, p_user uuid) returns boolean
  language sql stable security definer set search_path = '' as $$
  select coalesce((
    select app.flag_evaluate(f.enabled, f.key, f.rollout_basis_points, f.allow_users,
                             f.deny_users, f.roles, p_user,
                             (select u.role from app.users u where u.id = p_user))
      from app.feature_flags f where f.key = p_key), false)
$$;
revoke all on function app.flag_on(text, uuid) from public;
grant execute on function app.flag_on(text, uuid) to authenticated, stagepass_service, stagepass_app;

-- What a function's flag cache loads: every flag's rule, nothing else. One
-- round trip; callable by the functions' login without a role switch.
create function app.flag_snapshot()
  returns table (key text, enabled boolean, rollout_basis_points integer,
                 allow_users uuid[], deny_users uuid[], roles text[])
  language sql stable security definer set search_path = '' as $$
  select f.key, f.enabled, f.rollout_basis_points, f.allow_users, f.deny_users, f.roles
    from app.feature_flags f order by f.key
$$;
revoke all on function app.flag_snapshot() from public;
grant execute on function app.flag_snapshot() to stagepass_app, stagepass_service;

-- The one way a flag is created or changed, shared by the admin route and
-- the operator CLI. `p_patch` holds the fields to set (absent = unchanged;
-- on creation absent = the column default, and `description` is required):
-- description, enabled, rollout_basis_points, allow_users, deny_users,
-- roles. Lists are stored sorted without duplicates. A change that changes
-- nothing records nothing. Returns the flag as it is afterwards.
create function app.apply_flag_change(
  p_key text, p_create boolean, p_patch jsonb, p_by uuid, p_actor text, p_reason text
) returns setof app.feature_flags
  language plpgsql security definer set search_path = '' as $$
declare
  old_row app.feature_flags;
  new_row app.feature_flags;
  unknown text;
begin
  if p_reason is null or char_length(btrim(p_reason)) not between 1 and 500
     or p_reason ~ '[[:cntrl:]]' then
    raise exception 'a flag change needs a reason of 1–500 characters without control characters'
      using errcode = 'SP061';
  end if;
  if p_patch is null or jsonb_typeof(p_patch) <> 'object' then
    raise exception 'the change must be a JSON object' using errcode = 'SP064';
  end if;
  select k into unknown from jsonb_object_keys(p_patch) k
   where k not in ('description', 'enabled', 'rollout_basis_points', 'allow_users',
                   'deny_users', 'roles')
   limit 1;
  if unknown is not null then
    raise exception 'unknown flag field %', unknown using errcode = 'SP064';
  end if;

  if p_create then
    if p_key is null or p_key !~ '^[a-z][a-z0-9_]{1,39}$' then
      raise exception 'invalid flag key' using errcode = 'SP064';
    end if;
    perform 1 from app.feature_flags f where f.key = p_key;
    if found then
      raise exception 'flag % exists', p_key using errcode = 'SP062';
    end if;
    old_row := null;
    new_row.key := p_key;
    new_row.enabled := false;
    new_row.rollout_basis_points := 0;
    new_row.allow_users := '{}';
    new_row.deny_users := '{}';
    new_row.roles := '{}';
  else
    select * into old_row from app.feature_flags f where f.key = p_key for update;
    if not found then
      raise exception 'no flag %', p_key using errcode = 'SP063';
    end if;
    new_row := old_row;
  end if;

  begin
    if p_patch ? 'description' then
      new_row.description := p_patch ->> 'description';
    end if;
    if p_patch ? 'enabled' then
      new_row.enabled := (p_patch -> 'enabled')::boolean;
    end if;
    if p_patch ? 'rollout_basis_points' then
      new_row.rollout_basis_points := (p_patch -> 'rollout_basis_points')::integer;
    end if;
    if p_patch ? 'allow_users' then
      new_row.allow_users := array(select distinct x::uuid
        from jsonb_array_elements_text(p_patch -> 'allow_users') x order by 1);
    end if;
    if p_patch ? 'deny_users' then
      new_row.deny_users := array(select distinct x::uuid
        from jsonb_array_elements_text(p_patch -> 'deny_users') x order by 1);
    end if;
    if p_patch ? 'roles' then
      new_row.roles := array(select distinct x
        from jsonb_array_elements_text(p_patch -> 'roles') x order by 1);
    end if;
  exception when others then
    raise exception 'invalid flag field: %', sqlerrm using errcode = 'SP064';
  end;

  if p_create then
    begin
      insert into app.feature_flags
        (key, description, enabled, rollout_basis_points, allow_users, deny_users, roles)
        values (new_row.key, new_row.description, new_row.enabled, new_row.rollout_basis_points,
                new_row.allow_users, new_row.deny_users, new_row.roles)
        returning * into new_row;
    exception
      when unique_violation then
        raise exception 'flag % exists', p_key using errcode = 'SP062';
      when check_violation or not_null_violation then
        raise exception 'invalid flag field: %', sqlerrm using errcode = 'SP064';
    end;
  else
    if (new_row.description, new_row.enabled, new_row.rollout_basis_points, new_row.allow_users,
        new_row.deny_users, new_row.roles)
       is not distinct from
       (old_row.description, old_row.enabled, old_row.rollout_basis_points, old_row.allow_users,
        old_row.deny_users, old_row.roles) then
      return next old_row;
      return;
    end if;
    begin
      update app.feature_flags f
         set description = new_row.description, enabled = new_row.enabled,
             rollout_basis_points = new_row.rollout_basis_points,
             allow_users = new_row.allow_users, deny_users = new_row.deny_users,
             roles = new_row.roles
       where f.key = p_key
       returning * into new_row;
    exception when check_violation or not_null_violation then
      raise exception 'invalid flag field: %', sqlerrm using errcode = 'SP064';
    end;
  end if;

  insert into app.feature_flag_changes (flag_key, before, after, changed_by, actor, reason)
    values (p_key,
            case when old_row.key is null then null
                 else to_jsonb(old_row) - 'created_at' - 'updated_at' end,
            to_jsonb(new_row) - 'created_at' - 'updated_at',
            p_by, p_actor, p_reason);
  return next new_row;
end
$$;
revoke all on function app.apply_flag_change(text, boolean, jsonb, uuid, text, text) from public;

-- The admin routes: the caller must be an admin *in the database*.
create function app.admin_change_flag(p_key text, p_create boolean, p_patch jsonb, p_reason text)
  returns setof app.feature_flags
  language plpgsql security definer set search_path = '' as $$
declare
  caller uuid := auth.uid();
begin
  if caller is null then
    raise exception 'no authenticated user' using errcode = '28000';
  end if;
  perform 1 from app.users u where u.id = caller and u.role = 'admin';
  if not found then
    raise exception 'admin role required' using errcode = 'SP060';
  end if;
  return query select * from app.apply_flag_change(
    p_key, p_create, p_patch, caller, 'user:' || caller::text, p_reason);
end
$$;
revoke all on function app.admin_change_flag(text, boolean, jsonb, text) from public;
grant execute on function app.admin_change_flag(text, boolean, jsonb, text) to authenticated;

-- Every flag, for an admin (the list route and the item route's read).
create function app.admin_list_flags(p_key text default null)
  returns setof app.feature_flags
  language plpgsql stable security definer set search_path = '' as $$
declare
  caller uuid := auth.uid();
begin
  if caller is null then
    raise exception 'no authenticated user' using errcode = '28000';
  end if;
  perform 1 from app.users u where u.id = caller and u.role = 'admin';
  if not found then
    raise exception 'admin role required' using errcode = 'SP060';
  end if;
  return query select * from app.feature_flags f
    where p_key is null or f.key = p_key order by f.key;
end
$$;
revoke all on function app.admin_list_flags(text) from public;
grant execute on function app.admin_list_flags(text) to authenticated;

-- The operator CLI (`stagepass flags create|set`), as the service role.
create function app.operator_change_flag(
  p_key text, p_create boolean, p_patch jsonb, p_operator text, p_reason text
) returns setof app.feature_flags
  language sql security definer set search_path = '' as $$
  select * from app.apply_flag_change(p_key, p_create, p_patch, null, 'operator:' || p_operator, p_reason)
$$;
revoke all on function app.operator_change_flag(text, boolean, jsonb, text, text) from public;
grant execute on function app.operator_change_flag(text, boolean, jsonb, text, text) to stagepass_service;

-- The flags the next features will be gated by, off until an operator turns
-- them on (ADR 0016). Seeded without an audit row's `changed_by`, as the
-- operator "migration".
insert into app.feature_flags (key, description) values
  ('calls', 'Paid 1:1 video calls (SPEC calls); gates the call routes once they exist.'),
  ('payouts', 'Creator payouts through Stripe Connect; gates the payout routes once they exist.');
insert into app.feature_flag_changes (flag_key, before, after, actor, reason)
  select f.key, null, to_jsonb(f) - 'created_at' - 'updated_at', 'operator:migration',
         'seeded off by migration 20261130000018'
    from app.feature_flags f;
