-- Takes back up to ARGV[5] jobs held by worker ARGV[2], which the caller found silent (PostgreSQL's worker
-- registry decides that, with its outage-aware witness rule), whose attempt started before now - ARGV[3] ms:
-- requeued to run now, or dead-lettered when that was the last attempt. ARGV[4] names the rescuer.
-- Answers {id, kind, dead (0/1)} per job.
local worker, silent_ms, rescuer, limit = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local now = now_ms()
local answers = {}
local woken = {}
for _, id in ipairs(redis.call('SMEMBERS', key('running', worker))) do
    if #answers >= limit then
        break
    end
    local j = redis.call('HMGET', key('job', id), 'state', 'locked_by', 'attempt', 'max_attempts', 'attempted_at', 'kind')
    if j[1] ~= 'running' or j[2] ~= worker then
        unhold(id, worker)
    elseif tonumber(j[5]) < now - silent_ms then
        local attempt, max_attempts = tonumber(j[3]), tonumber(j[4])
        unhold(id, worker)
        append_error(id, cjson.encode({
            attempt = attempt,
            at = iso(now),
            class = 'crash',
            worker = worker,
            error = string.format(
                'worker %s stopped heartbeating during attempt %d (killed, crashed or cut off) while %s kept in touch',
                worker, attempt, rescuer),
        }))
        if attempt >= max_attempts then
            release_key(id)
            finish_for_good(id, 'dead', now)
            answers[#answers + 1] = { tonumber(id), j[6], 1 }
        else
            make_available(id, now)
            woken[j[6]] = true
            answers[#answers + 1] = { tonumber(id), j[6], 0 }
        end
    end
end
for kind in pairs(woken) do
    redis.call('PUBLISH', key('wake'), kind)
end
return { answers, MOVES }
