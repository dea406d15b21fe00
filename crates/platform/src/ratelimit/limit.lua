-- Decides every rate-limit policy of one request in one call, and consumes
-- quota only when ALL of them allow it: a request refused by one limit
-- must not use up the others.
--
-- The two algorithms are those of @upstash/ratelimit (slidingWindow and
-- tokenBucket), with the same keys and the same arithmetic (one documented
-- difference in the bucket's refill cycle), so a JS service using that
-- library shares these counters. `src/ratelimit/algorithm.rs` is
-- the same arithmetic in Rust (the in-process limiter); keep them in step.
--
-- ARGV[1]  now, in milliseconds (passed in rather than Redis TIME, so tests
--          can move time and every instance uses the caller's clock, as
--          @upstash/ratelimit does)
-- ARGV[2]  number of policies
-- then four values per policy:
--   "sw", limit, window_ms, 0       KEYS: current window, previous window
--   "tb", max, interval_ms, refill  KEYS: the bucket (a hash)
--
-- Reply: { all_allowed, then per policy: allowed, remaining, reset_ms }
-- (allowed is 1 or 0; remaining is after this request when all allowed,
-- else what is left now; reset_ms is when more quota becomes available).

local now = tonumber(ARGV[1])
local count = tonumber(ARGV[2])
local checks = {}
local next_key = 1
local all_allowed = 1

-- Phase 1: read and decide, writing nothing.
for i = 1, count do
  local at = 2 + (i - 1) * 4
  local c = { kind = ARGV[at + 1], a = tonumber(ARGV[at + 2]), b = tonumber(ARGV[at + 3]),
              refill = tonumber(ARGV[at + 4]) }
  if c.kind == "sw" then
    local limit, window = c.a, c.b
    c.key = KEYS[next_key]
    local current = tonumber(redis.call("GET", KEYS[next_key]) or "0")
    local previous = tonumber(redis.call("GET", KEYS[next_key + 1]) or "0")
    next_key = next_key + 2
    -- The previous window counts with the share of it still inside the
    -- sliding window (@upstash/ratelimit's approximation).
    c.weighted = math.floor((1 - (now % window) / window) * previous)
    c.allowed = c.weighted + current < limit
    c.remaining = limit - (c.weighted + current)
    c.reset = (math.floor(now / window) + 1) * window
  else
    local max, interval = c.a, c.b
    c.key = KEYS[next_key]
    next_key = next_key + 1
    local bucket = redis.call("HMGET", c.key, "refilledAt", "tokens")
    if bucket[1] == false then
      c.refilled_at = now
      c.tokens = max
    else
      c.refilled_at = tonumber(bucket[1])
      c.tokens = tonumber(bucket[2]) or 0
    end
    if now >= c.refilled_at + interval then
      local refills = math.floor((now - c.refilled_at) / interval)
      c.tokens = math.min(max, c.tokens + refills * c.refill)
      c.refilled_at = c.refilled_at + refills * interval
    end
    -- A full bucket starts its refill cycle now, exactly as if its key had
    -- expired (which Redis may or may not have done yet): answers do not
    -- depend on expiry. (@upstash/ratelimit keeps the old cycle here.)
    if c.tokens >= max then
      c.tokens = max
      c.refilled_at = now
    end
    c.allowed = c.tokens > 0
    c.remaining = c.tokens
    c.reset = c.refilled_at + interval
  end
  if not c.allowed then
    all_allowed = 0
  end
  checks[i] = c
end

-- Phase 2: only when every policy allows, take one unit from each.
if all_allowed == 1 then
  for i = 1, count do
    local c = checks[i]
    if c.kind == "sw" then
      local used = redis.call("INCRBY", c.key, 1)
      if used == 1 then
        -- Long enough to serve as the next window's previous window.
        redis.call("PEXPIRE", c.key, c.b * 2 + 1000)
      end
      c.remaining = c.a - (c.weighted + used)
    else
      local remaining = c.tokens - 1
      redis.call("HSET", c.key, "refilledAt", c.refilled_at, "tokens", remaining)
      local expire = math.ceil((c.a - remaining) / c.refill) * c.b
      if expire > 0 then
        redis.call("PEXPIRE", c.key, expire)
      end
      c.remaining = remaining
    end
  end
end

local reply = { all_allowed }
for i = 1, count do
  local c = checks[i]
  reply[#reply + 1] = c.allowed and 1 or 0
  reply[#reply + 1] = c.remaining
  reply[#reply + 1] = c.reset
end
return reply
