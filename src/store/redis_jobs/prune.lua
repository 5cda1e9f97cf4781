-- Deletes up to ARGV[4] finished jobs: completed and cancelled that finished more than ARGV[2] ms ago, dead
-- more than ARGV[3] ms ago. A job still holding its idempotency key gives it back. Answers how many went.
local now = now_ms()
local limit = tonumber(ARGV[4])
local gone = 0
local function sweep(set, keep_ms)
    local ids = redis.call('ZRANGE', set, '-inf', '(' .. (now - keep_ms), 'BYSCORE', 'LIMIT', 0, limit - gone)
    for _, m in ipairs(ids) do
        local id = unpad(m)
        release_key(id)
        if set == key('dead') then
            local tally = tally_field(id)
            if redis.call('HINCRBY', key('tally', 'dead'), tally, -1) <= 0 then
                redis.call('HDEL', key('tally', 'dead'), tally)
            end
        end
        redis.call('DEL', key('job', id))
        redis.call('ZREM', key('all'), id)
        redis.call('ZREM', set, m)
        gone = gone + 1
    end
end
sweep(key('finished'), tonumber(ARGV[2]))
if gone < limit then
    sweep(key('dead'), tonumber(ARGV[3]))
end
return gone
