-- Admits one request against the sliding one-minute windows of one or more
-- scopes (a key, its team), atomically: either it is recorded in every scope
-- or in none. Time is Redis's own, so edges' clocks do not matter.
--
-- KEYS, four per scope: requests (zset id -> admitted ms), tokens (zset
-- id -> admitted ms), token amounts (hash id -> tokens, "_sum" -> total),
-- running (zset id -> lease end ms).
-- ARGV: request id, tokens to reserve, window ms, lease ms, then per scope:
-- requests per minute, tokens per minute, concurrent (0 = no limit).
--
-- Returns {1, then per scope: remaining requests, reset requests ms,
-- remaining tokens, reset tokens ms}, or {0, refusing scope (0-based), kind
-- (1 requests, 2 tokens, 3 concurrency), retry after ms, then the same four
-- standing numbers per scope}: the caller picks the binding limit.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local id = ARGV[1]
local tokens = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local lease = tonumber(ARGV[4])
local scopes = #KEYS / 4

local function oldest(zset)
  local first = redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')
  if #first == 0 then return nil end
  return tonumber(first[2])
end

local function standing(i)
  local req, tok, amt = KEYS[i * 4 + 1], KEYS[i * 4 + 2], KEYS[i * 4 + 3]
  local rpm, tpm = tonumber(ARGV[5 + i * 3]), tonumber(ARGV[6 + i * 3])
  local used_req = redis.call('ZCARD', req)
  local used_tok = tonumber(redis.call('HGET', amt, '_sum') or '0')
  local first_req, first_tok = oldest(req), oldest(tok)
  return math.max(rpm - used_req, 0), first_req and (first_req + window - now) or 0,
         math.max(tpm - used_tok, 0), first_tok and (first_tok + window - now) or 0
end

for i = 0, scopes - 1 do
  local req, tok, amt, run = KEYS[i * 4 + 1], KEYS[i * 4 + 2], KEYS[i * 4 + 3], KEYS[i * 4 + 4]
  local rpm, tpm, conc = tonumber(ARGV[5 + i * 3]), tonumber(ARGV[6 + i * 3]), tonumber(ARGV[7 + i * 3])
  redis.call('ZREMRANGEBYSCORE', req, '-inf', now - window)
  local expired = redis.call('ZRANGEBYSCORE', tok, '-inf', now - window)
  if #expired > 0 then
    local freed = 0
    for _, member in ipairs(expired) do
      freed = freed + tonumber(redis.call('HGET', amt, member) or '0')
      redis.call('HDEL', amt, member)
    end
    redis.call('HINCRBY', amt, '_sum', -freed)
    redis.call('ZREMRANGEBYSCORE', tok, '-inf', now - window)
  end
  redis.call('ZREMRANGEBYSCORE', run, '-inf', now)

  local kind, wait = 0, 0
  if rpm > 0 and redis.call('ZCARD', req) >= rpm then
    kind, wait = 1, oldest(req) + window - now
  elseif tpm > 0 then
    local sum = tonumber(redis.call('HGET', amt, '_sum') or '0')
    if sum + tokens > tpm then
      kind, wait = 2, window
      -- When enough of the oldest charges leave the window.
      local charges = redis.call('ZRANGE', tok, 0, -1, 'WITHSCORES')
      local freed = 0
      for j = 1, #charges, 2 do
        freed = freed + tonumber(redis.call('HGET', amt, charges[j]) or '0')
        if sum - freed + tokens <= tpm then
          wait = tonumber(charges[j + 1]) + window - now
          break
        end
      end
    end
  end
  if kind == 0 and conc > 0 and redis.call('ZCARD', run) >= conc then
    kind, wait = 3, 1000
  end
  if kind > 0 then
    local answer = {0, i, kind, wait}
    for j = 0, scopes - 1 do
      local rr, rr_reset, rt, rt_reset = standing(j)
      table.insert(answer, rr)
      table.insert(answer, rr_reset)
      table.insert(answer, rt)
      table.insert(answer, rt_reset)
    end
    return answer
  end
end

for i = 0, scopes - 1 do
  local req, tok, amt, run = KEYS[i * 4 + 1], KEYS[i * 4 + 2], KEYS[i * 4 + 3], KEYS[i * 4 + 4]
  redis.call('ZADD', req, now, id)
  redis.call('ZADD', tok, now, id)
  redis.call('HSET', amt, id, tokens)
  redis.call('HINCRBY', amt, '_sum', tokens)
  redis.call('ZADD', run, now + lease, id)
  redis.call('PEXPIRE', req, window + lease)
  redis.call('PEXPIRE', tok, window + lease)
  redis.call('PEXPIRE', amt, window + lease)
  redis.call('PEXPIRE', run, window + lease)
end
local answer = {1}
for j = 0, scopes - 1 do
  local rr, rr_reset, rt, rt_reset = standing(j)
  table.insert(answer, rr)
  table.insert(answer, rr_reset)
  table.insert(answer, rt)
  table.insert(answer, rt_reset)
end
return answer
