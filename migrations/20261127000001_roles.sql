-- Roles and the `auth` shim.
--
-- Stagepass runs user requests the way Supabase's PostgREST does: inside the
-- request's transaction it switches to the `authenticated` role and publishes
-- the verified token's claims in `request.jwt.claims`, so row-level security
-- policies written with `auth.uid()` hold even if a handler has a bug.
--
-- Roles are cluster-wide, so they are created only when missing (a second
-- database on the same cluster, or Supabase where `anon` and `authenticated`
-- already exist).
do $$
begin
  if not exists (select 1 from pg_roles where rolname = 'anon') then
    create role anon nologin noinherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'authenticated') then
    create role authenticated nologin noinherit;
  end if;
  -- Webhooks, jobs and cron: explicit grants, never BYPASSRLS. (Supabase's
  -- own `service_role` bypasses RLS, which is why we do not use it.)
  if not exists (select 1 from pg_roles where rolname = 'stagepass_service') then
    create role stagepass_service nologin noinherit nobypassrls;
  end if;
  -- The login the functions use (DATABASE_URL). It owns nothing, bypasses
  -- nothing, and can only become one of the two roles above. Its password
  -- is set by the operator: ALTER ROLE stagepass_app PASSWORD '…'.
  if not exists (select 1 from pg_roles where rolname = 'stagepass_app') then
    create role stagepass_app login noinherit nobypassrls;
  end if;
end
$$;

grant authenticated to stagepass_app;
grant stagepass_service to stagepass_app;

-- On Supabase the `auth` schema and `auth.uid()` exist; elsewhere (local
-- development, tests) we define the same functions with the same meaning.
create schema if not exists auth;
grant usage on schema auth to authenticated, stagepass_service, anon;

do $$
begin
  if not exists (
    select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace
    where n.nspname = 'auth' and p.proname = 'uid'
  ) then
    create function auth.uid() returns uuid
      language sql stable
      as $f$ select nullif(nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub', '')::uuid $f$;
    grant execute on function auth.uid() to authenticated, stagepass_service, anon;
  end if;
  if not exists (
    select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace
    where n.nspname = 'auth' and p.proname = 'jwt'
  ) then
    create function auth.jwt() returns jsonb
      language sql stable
      as $f$ select coalesce(nullif(current_setting('request.jwt.claims', true), ''), '{}')::jsonb $f$;
    grant execute on function auth.jwt() to authenticated, stagepass_service, anon;
  end if;
end
$$;

-- Everything of ours lives in schema `app`, which Supabase's PostgREST does
-- not expose: the functions are the only door, and RLS is the second lock.
create schema app;
revoke all on schema app from public;
grant usage on schema app to authenticated, stagepass_service;
