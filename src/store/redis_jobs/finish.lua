-- Applies attempt results of worker ARGV[2] (ARGV[3]: a JSON array of
-- {id, attempt, state, delay_ms, error, give_back}), as PostgreSQL's `finish` does: only the holder of that
-- attempt may end it; others are skipped. `give_back` 1 returns the attempt as a hand-back (a snooze), 2 as if
-- never claimed. Answers the ids applied.
local worker = ARGV[2]
local results = cjson.decode(ARGV[3])
local now = now_ms()
local applied = {}
local woken = {}
for _, c in ipairs(results) do
    local id = string.format('%.0f', c.id)
    if holds(id, c.attempt, worker) then
        local h = key('job', id)
        unhold(id, worker)
        local err = c.error ~= cjson.null and c.error or nil
        append_error(id, err)
        if c.state == 'completed' then
            if redis.call('HGET', h, 'unique_while_active') == '1' then
                release_key(id)
            end
            finish_for_good(id, 'completed', now)
        elseif c.state == 'dead' then
            release_key(id)
            finish_for_good(id, 'dead', now)
        else
            if c.give_back > 0 then
                redis.call('HINCRBY', h, 'attempt', -1)
            end
            if c.give_back == 1 then
                redis.call('HINCRBY', h, 'handbacks', 1)
            end
            local run_at = tonumber(field(id, 'run_at'))
            if c.delay_ms ~= cjson.null then
                run_at = now + math.floor(c.delay_ms)
            end
            make_available(id, run_at)
            if run_at <= now then
                woken[field(id, 'kind')] = true
            end
        end
        applied[#applied + 1] = tonumber(id)
    end
end
for kind in pairs(woken) do
    redis.call('PUBLISH', key('wake'), kind)
end
return { applied, MOVES }
