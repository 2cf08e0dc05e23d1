-- The spend guard's Redis store (RedisBudgetStore in budget_redis.py): on the Redis side, the
-- one place its counting is written. Each command runs as one script, so a reservation's
-- check and its additions to every bucket are one atomic step for every process sharing
-- these keys, and an alert's flag is set by the one call that gives it.
--
-- A rule's window is a hash; for each part P of it: `usd:P` and `tokens:P`, its use
-- (reservations in flight included), and `alert:warning:P`, `alert:cap:P` once that alert
-- has been given. A storm key's breaker is a list of its recent call times (oldest first)
-- and a string, the end of its cool-down.
--
-- ARGV[1] names the command; the rest are its arguments, below. Amounts are whole
-- nanodollars and tokens: Lua's numbers are doubles, exact below 2**53. Times are seconds
-- on the callers' wall clock; a time passed to Redis or returned is a string formatted
-- %.17g (Lua's own conversion keeps 14 digits, which rounds epoch seconds to 0.1 ms).
-- Limits and marks are '' when the rule has none.

local function exact(x)
  return string.format('%.17g', x)
end

local function limit(s)
  if s == '' then return nil end
  return tonumber(s)
end

local KINDS = {'warning', 'cap'}

-- Each bucket's arguments: part cap_usd cap_tokens warn_usd warn_tokens ttl_ms.
local PER_BUCKET = 6

local function buckets_from(n, first)
  local buckets = {}
  for i = 1, n do
    local a = first + (i - 1) * PER_BUCKET
    buckets[i] = {
      key = KEYS[i], part = ARGV[a],
      cap = {usd = limit(ARGV[a + 1]), tokens = limit(ARGV[a + 2])},
      warning = {usd = limit(ARGV[a + 3]), tokens = limit(ARGV[a + 4])},
      ttl = ARGV[a + 5],
    }
  end
  return buckets
end

local function use_of(b)
  local v = redis.call('HMGET', b.key, 'usd:' .. b.part, 'tokens:' .. b.part)
  return tonumber(v[1] or '0'), tonumber(v[2] or '0')
end

-- Has the use reached the bucket's warning mark, or its cap?
local function reached(b, usd, tokens, kind)
  local mark = b[kind]
  return (mark.usd ~= nil and usd >= mark.usd) or (mark.tokens ~= nil and tokens >= mark.tokens)
end

-- Give alert `kind` of bucket `i` if it has not been given in this window.
local function once(b, i, kind, alerts)
  if redis.call('HSETNX', b.key, 'alert:' .. kind .. ':' .. b.part, 1) == 1 then
    alerts[#alerts + 1] = i - 1
    alerts[#alerts + 1] = kind
  end
end

-- The alerts the uses of `counted` buckets (indexes into `buckets`) reach for the first time.
local function crossings(buckets, counted)
  local alerts = {}
  for _, i in ipairs(counted) do
    local b = buckets[i]
    local usd, tokens = use_of(b)
    for _, kind in ipairs(KINDS) do
      if reached(b, usd, tokens, kind) then once(b, i, kind, alerts) end
    end
  end
  return alerts
end

-- The breaker: nil when the call may go on (it is counted), else the refusal.
-- A call while cooling down is refused and not counted; the call that makes more than
-- `calls` in the last `seconds` trips the breaker and is refused.
local function breaker(calls_key, cooling_key, now, calls, seconds, cooldown, ttl)
  local cooling = redis.call('GET', cooling_key)
  if cooling and now < tonumber(cooling) then
    return {'storm', exact(tonumber(cooling) - now), 0}
  end
  -- Forget the calls that have left the window: made at or before now - seconds.
  local horizon = now - seconds
  while true do
    local oldest = redis.call('LINDEX', calls_key, 0)
    if not oldest or tonumber(oldest) > horizon then break end
    redis.call('LPOP', calls_key)
  end
  if redis.call('RPUSH', calls_key, exact(now)) > calls then
    redis.call('DEL', calls_key)
    redis.call('SET', cooling_key, exact(now + cooldown), 'PX', ttl)
    return {'storm', exact(cooldown), 1}
  end
  redis.call('PEXPIRE', calls_key, ttl)
  return nil
end

local commands = {}

-- reserve now usd tokens n <bucket arguments> x n [calls seconds cooldown ttl_ms]
-- KEYS: the n buckets' hashes, then, when the breaker is asked, the storm key's call list
-- and cool-down.
-- -> {'storm', seconds of cool-down left, 1 when this call tripped it, else 0}
--    | {'granted' or 'refused', the index of the bucket crossed (-1: none),
--       {usd, tokens} of each bucket after (granted) or as found (refused),
--       {index, kind} of each alert given}
function commands.reserve(now, usd, tokens, n)
  now, usd, tokens, n = tonumber(now), tonumber(usd), tonumber(tokens), tonumber(n)
  local storm_at = 6 + n * PER_BUCKET
  if ARGV[storm_at] ~= nil then
    local refusal = breaker(
      KEYS[n + 1], KEYS[n + 2], now, tonumber(ARGV[storm_at]),
      tonumber(ARGV[storm_at + 1]), tonumber(ARGV[storm_at + 2]), ARGV[storm_at + 3])
    if refusal then return refusal end
  end
  local buckets = buckets_from(n, 6)
  local uses, crossed = {}, -1
  for i, b in ipairs(buckets) do
    local u, t = use_of(b)
    uses[#uses + 1] = u
    uses[#uses + 1] = t
    if crossed < 0 and ((b.cap.usd ~= nil and u + usd > b.cap.usd)
        or (b.cap.tokens ~= nil and t + tokens > b.cap.tokens)) then
      crossed = i - 1
    end
  end
  -- Every bucket asked about is counted from now on (refused: from nothing).
  if crossed >= 0 then usd, tokens = 0, 0 end
  for _, b in ipairs(buckets) do
    redis.call('HINCRBY', b.key, 'usd:' .. b.part, usd)
    redis.call('HINCRBY', b.key, 'tokens:' .. b.part, tokens)
    redis.call('PEXPIRE', b.key, b.ttl)
  end
  if crossed >= 0 then
    local alerts = {}
    once(buckets[crossed + 1], crossed + 1, 'cap', alerts)
    return {'refused', crossed, uses, alerts}
  end
  uses = {}
  local all = {}
  for i, b in ipairs(buckets) do
    local u, t = use_of(b)
    uses[#uses + 1] = u
    uses[#uses + 1] = t
    all[i] = i
  end
  return {'granted', -1, uses, crossings(buckets, all)}
end

-- adjust usd tokens n <bucket arguments> x n <1 if the bucket's window is live, else 0> x n
-- -> {index, kind} of each alert given.
-- Adds to each bucket counted, and to each whose window has not ended though it is not
-- counted yet (what a process counted while Redis was away, paid back); one whose window
-- has ended and is no longer kept is left alone. Whatever the caps; no use goes below zero.
function commands.adjust(usd, tokens, n)
  n = tonumber(n)
  local buckets = buckets_from(n, 5)
  local live_at = 5 + n * PER_BUCKET
  local counted = {}
  for i, b in ipairs(buckets) do
    if ARGV[live_at + i - 1] == '1' or redis.call('HEXISTS', b.key, 'usd:' .. b.part) == 1 then
      for _, what in ipairs({{'usd:', usd}, {'tokens:', tokens}}) do
        local field = what[1] .. b.part
        if redis.call('HINCRBY', b.key, field, what[2]) < 0 then
          redis.call('HSET', b.key, field, 0)
        end
      end
      redis.call('PEXPIRE', b.key, b.ttl)
      counted[#counted + 1] = i
    end
  end
  return crossings(buckets, counted)
end

return commands[ARGV[1]](unpack(ARGV, 2))
