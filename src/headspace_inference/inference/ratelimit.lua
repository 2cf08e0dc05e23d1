-- The Redis rate limiter (RedisRateLimiter in ratelimit.py): on the Redis side, the one
-- place its admission rules are written. Each command runs as one script, so the check and
-- the booking are one atomic step for every process sharing these keys.
--
-- KEYS: [1] admissions (zset: id -> admission time), [2] tokens (hash: id -> tokens),
--       [3] the token total of the admissions kept, [4] the pause's end (a time).
-- ARGV[1] names the command; the rest are its arguments, below. Times are seconds on the
-- callers' wall clock. A time passed to Redis or returned is a string formatted %.17g:
-- Lua's own conversion keeps 14 digits, which rounds epoch seconds to 0.1 ms.

local z, h, total_key, pause_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

local function exact(x)
  return string.format('%.17g', x)
end

local function paused_until()
  return tonumber(redis.call('GET', pause_key) or '0')
end

-- Forget the admissions that have left the window: admitted at or before now - window.
local function prune(now, window)
  local horizon = exact(now - window)
  local old = redis.call('ZRANGEBYSCORE', z, '-inf', horizon)
  if #old == 0 then return end
  local used = redis.call('HMGET', h, unpack(old))
  local freed = 0
  for i = 1, #used do freed = freed + (tonumber(used[i]) or 0) end
  redis.call('ZREMRANGEBYSCORE', z, '-inf', horizon)
  redis.call('HDEL', h, unpack(old))
  redis.call('DECRBY', total_key, freed)
end

-- The earliest time at or after now, the pause's end and the last booked admission (first
-- come, first served) at which both windows ending then have room for `tokens`.
local function earliest(now, window, calls, limit, tokens)
  local at = math.max(now, paused_until())
  local n = redis.call('ZCARD', z)
  if n == 0 then return at end
  local last = redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')
  at = math.max(at, tonumber(last[2]))
  if n >= calls then
    -- The admission `calls` places back must have left the window.
    local e = redis.call('ZRANGE', z, n - calls, n - calls, 'WITHSCORES')
    at = math.max(at, tonumber(e[2]) + window)
  end
  local total = tonumber(redis.call('GET', total_key) or '0')
  if total + tokens > limit then
    -- Enough of the oldest admissions must have left for `tokens` to fit.
    local all = redis.call('ZRANGE', z, 0, -1, 'WITHSCORES')
    local remaining = total
    for i = 1, #all, 2 do
      remaining = remaining - (tonumber(redis.call('HGET', h, all[i])) or 0)
      if remaining + tokens <= limit then
        at = math.max(at, tonumber(all[i + 1]) + window)
        break
      end
    end
  end
  return at
end

local commands = {}

-- acquire now window calls limit tokens max_wait id ttl_ms
-- -> {1, wait, at}: booked at `at`, `wait` seconds from now;
--    {0, wait}: the earliest slot is beyond max_wait, and nothing is booked.
function commands.acquire(now, window, calls, limit, tokens, max_wait, id, ttl)
  now, window, calls = tonumber(now), tonumber(window), tonumber(calls)
  limit, tokens, max_wait = tonumber(limit), tonumber(tokens), tonumber(max_wait)
  prune(now, window)
  local at = earliest(now, window, calls, limit, tokens)
  if at - now > max_wait then return {0, exact(at - now)} end
  redis.call('ZADD', z, exact(at), id)
  redis.call('HSET', h, id, tokens)
  redis.call('INCRBY', total_key, tokens)
  for _, k in ipairs({z, h, total_key}) do redis.call('PEXPIRE', k, ttl) end
  return {1, exact(at - now), exact(at)}
end

-- reconcile id actual -> 1; 0 when the admission has already left the window.
function commands.reconcile(id, actual)
  local old = redis.call('HGET', h, id)
  if not old then return 0 end
  redis.call('HSET', h, id, actual)
  redis.call('INCRBY', total_key, tonumber(actual) - tonumber(old))
  return 1
end

-- give_back id -> 1, the admission undone; 0 when it is already gone.
function commands.give_back(id)
  local tokens = redis.call('HGET', h, id)
  if not tokens then return 0 end
  redis.call('ZREM', z, id)
  redis.call('HDEL', h, id)
  redis.call('DECRBY', total_key, tonumber(tokens))
  return 1
end

-- pause now seconds window -> 1. Nobody is admitted for `seconds`, at most one window; a
-- pause only ever ends later, never sooner.
function commands.pause(now, seconds, window)
  seconds = math.min(tonumber(seconds), tonumber(window))
  local ends = tonumber(now) + seconds
  if ends > paused_until() then
    redis.call('SET', pause_key, exact(ends), 'PX', math.floor(seconds * 1000) + 1000)
  end
  return 1
end

-- pause_left now -> seconds until the pause ends (0 or less: none).
function commands.pause_left(now)
  return exact(paused_until() - tonumber(now))
end

-- stats now window -> {calls in the window, their tokens, admissions booked after now,
-- seconds until the pause ends}.
function commands.stats(now, window)
  now = tonumber(now)
  prune(now, tonumber(window))
  local current = redis.call('ZRANGEBYSCORE', z, '-inf', exact(now))
  local tokens = 0
  if #current > 0 then
    for _, t in ipairs(redis.call('HMGET', h, unpack(current))) do
      tokens = tokens + (tonumber(t) or 0)
    end
  end
  local scheduled = redis.call('ZCOUNT', z, '(' .. exact(now), '+inf')
  return {#current, tokens, scheduled, exact(paused_until() - now)}
end

return commands[ARGV[1]](unpack(ARGV, 2))
