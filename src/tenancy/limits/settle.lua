-- Settles one request in every scope it was admitted to: its token charge
-- becomes what it used, and its lease on a concurrency slot ends.
-- KEYS: as for admit.lua, four per scope. ARGV: request id, tokens used.
local id = ARGV[1]
local used = tonumber(ARGV[2])
for i = 0, #KEYS / 4 - 1 do
  local amt, run = KEYS[i * 4 + 3], KEYS[i * 4 + 4]
  local reserved = redis.call('HGET', amt, id)
  if reserved then
    redis.call('HSET', amt, id, used)
    redis.call('HINCRBY', amt, '_sum', used - tonumber(reserved))
  end
  redis.call('ZREM', run, id)
end
return 1
