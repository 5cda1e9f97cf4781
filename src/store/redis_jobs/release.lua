-- Hands jobs of worker ARGV[2] back to the queue (ARGV[3]: a JSON array of ids, or "" for all it holds), as
-- PostgreSQL's `release` does. With a note (ARGV[4], an error as JSON text: an interruption) the attempt is
-- given back only while the job has had fewer hand-backs than attempts; after that it counts, and on the last
-- attempt the job is dead-lettered. Without a note (never started) it is always given back.
-- Answers {id, kind} per job handed back or dead-lettered.
local worker, note = ARGV[2], ARGV[4]
local ids
if ARGV[3] == '' then
    ids = redis.call('SMEMBERS', key('running', worker))
else
    ids = cjson.decode(ARGV[3])
end
local now = now_ms()
local answers = {}
local woken = {}
for _, raw in ipairs(ids) do
    local id = string.format('%.0f', tonumber(raw))
    local j = redis.call('HMGET', key('job', id), 'state', 'locked_by', 'attempt', 'max_attempts', 'handbacks', 'kind')
    if j[1] == 'running' and j[2] == worker then
        local h = key('job', id)
        local attempt, max_attempts, handbacks = tonumber(j[3]), tonumber(j[4]), tonumber(j[5])
        local counted = note ~= '' and handbacks >= max_attempts
        local spent = counted and attempt >= max_attempts
        unhold(id, worker)
        if note ~= '' then
            redis.call('HINCRBY', h, 'handbacks', 1)
            append_error(id, note)
        end
        if not counted then
            redis.call('HSET', h, 'attempt', math.max(attempt - 1, 0))
        end
        if spent then
            release_key(id)
            finish_for_good(id, 'dead', now)
        else
            make_available(id, now)
            woken[j[6]] = true
        end
        answers[#answers + 1] = { tonumber(id), j[6] }
    end
end
for kind in pairs(woken) do
    redis.call('PUBLISH', key('wake'), kind)
end
return { answers, MOVES }
