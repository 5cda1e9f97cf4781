-- Adds jobs (ARGV[2]: a JSON array) under the ids PostgreSQL's outbox gave them. Idempotent by id, so a relay
-- that crashed after this and before deleting its outbox rows can send them again. Answers per job: "new",
-- "exists" (sent before), or "dup:<id>" (its idempotency key is held by job <id>; nothing was added).
-- A new job is already "queued" wherever its state is mirrored.
NOTE_MOVES = false
local jobs = cjson.decode(ARGV[2])
local now = now_ms()
local answers = {}
local woken = {}
local function val(v)
    if v == cjson.null then
        return nil
    end
    return v
end
for i, j in ipairs(jobs) do
    local id = string.format('%.0f', j.id)
    local unique_key = val(j.unique_key)
    local holder = unique_key and redis.call('HGET', key('unique', j.kind), unique_key)
    if redis.call('EXISTS', key('job', id)) == 1 then
        answers[i] = 'exists'
    elseif holder then
        answers[i] = 'dup:' .. holder
    else
        local run_at = val(j.run_at) or now
        local h = key('job', id)
        redis.call('HSET', h, 'id', id, 'kind', j.kind, 'queue', j.queue, 'args', j.args,
            'priority', j.priority, 'attempt', 0, 'max_attempts', j.max_attempts,
            'enqueued_at', val(j.enqueued_at) or now, 'errors', '[]', 'handbacks', 0,
            'unique_while_active', (j.unique_while_active or j.unique_while_pending) and '1' or '0',
            'unique_while_pending', j.unique_while_pending and '1' or '0', 'fair', j.fair and '1' or '0')
        if val(j.tenant_id) then
            redis.call('HSET', h, 'tenant_id', j.tenant_id)
        end
        if val(j.provider) then
            redis.call('HSET', h, 'provider', j.provider)
        end
        if unique_key then
            redis.call('HSET', h, 'unique_key', unique_key, 'idempotency_key', unique_key)
            redis.call('HSET', key('unique', j.kind), unique_key, id)
        end
        redis.call('HSET', key('kinds'), j.kind, j.queue)
        redis.call('ZADD', key('all'), j.id, id)
        make_available(id, run_at)
        if run_at <= now then
            woken[j.kind] = true
        end
        answers[i] = 'new'
    end
end
for kind in pairs(woken) do
    redis.call('PUBLISH', key('wake'), kind)
end
return answers
