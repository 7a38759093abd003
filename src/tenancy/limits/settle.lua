-- Settles one request in every scope it was admitted to: its token charge
-- becomes what it used, and its lease on a concurrency slot ends. A refund
-- takes the request out of every window, as if it had never been admitted.
-- KEYS: as for admit.lua, four per scope. ARGV: request id, tokens used,
-- 1 to refund (0 to settle).
local id = ARGV[1]
local used = tonumber(ARGV[2])
local refund = ARGV[3] == '1'
for i = 0, #KEYS / 4 - 1 do
  local req, tok, amt, run = KEYS[i * 4 + 1], KEYS[i * 4 + 2], KEYS[i * 4 + 3], KEYS[i * 4 + 4]
  local reserved = redis.call('HGET', amt, id)
  if refund then
    redis.call('ZREM', req, id)
    redis.call('ZREM', tok, id)
    if reserved then
      redis.call('HDEL', amt, id)
      redis.call('HINCRBY', amt, '_sum', -tonumber(reserved))
    end
  elseif reserved then
    redis.call('HSET', amt, id, used)
    redis.call('HINCRBY', amt, '_sum', used - tonumber(reserved))
  end
  redis.call('ZREM', run, id)
end
return 1
