-- The iCalendar feed carries each class's description (issue 14: a fixed
-- text was sent). The return type grows a column, so the function is
-- replaced (no view or function depends on it).
drop function app.calendar_feed_events(bytea);
create function app.calendar_feed_events(p_token_hash bytea)
  returns table (id uuid, source_kind text, source_id uuid, role text, title text,
                 starts_at timestamptz, ends_at timestamptz, status text, sequence integer,
                 created_at timestamptz, updated_at timestamptz, description text)
  language sql stable security definer set search_path = '' as $$
  select ev.id, ev.source_kind, ev.source_id, ev.role, ev.title, ev.starts_at, ev.ends_at,
         ev.status, ev.sequence, ev.created_at, ev.updated_at, coalesce(c.description, '')
    from app.calendar_feeds f
    join app.calendar_events ev on ev.user_id = f.user_id
    left join app.classes c on ev.source_kind = 'class' and c.id = ev.source_id
   where f.token_hash = p_token_hash and ev.ends_at > now() - interval '90 days'
   order by ev.starts_at, ev.id
   limit 2000
$$;
revoke all on function app.calendar_feed_events(bytea) from public;
grant execute on function app.calendar_feed_events(bytea) to stagepass_service;
