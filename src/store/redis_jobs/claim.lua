-- Claims up to ARGV[4] due jobs of kind ARGV[2] for worker ARGV[3]: highest priority first, then by run_at
-- and id. The attempt counts from here. Each claimed job comes back as
-- {id, args, attempt, max_attempts, enqueued_at, run_at, attempted_at, progress, handbacks}.
-- ARGV[7] names this claim: a claim whose answer was lost (Redis died after running it) is asked again under
-- the same name and answers the jobs it took that are still the worker's, instead of taking more.
local kind, worker, limit, token = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[7]
local now = now_ms()
local claimed = {}
local record = key('claim', worker, token)

local function answer(resume)
    if ARGV[5] == 'fair' then
        return { claimed, resume }
    end
    return claimed
end

local function row(id, attempt)
    local j = redis.call('HMGET', key('job', id), 'args', 'max_attempts', 'enqueued_at', 'run_at', 'attempted_at',
        'progress', 'handbacks')
    return { tonumber(id), j[1], attempt, tonumber(j[2]), tonumber(j[3]), tonumber(j[4]), tonumber(j[5]), j[6],
        tonumber(j[7]) }
end

local earlier = redis.call('GET', record)
if earlier then
    for _, id in ipairs(cjson.decode(earlier)) do
        local j = redis.call('HMGET', key('job', id), 'state', 'locked_by', 'attempt')
        if j[1] == 'running' and j[2] == worker then
            claimed[#claimed + 1] = row(id, tonumber(j[3]))
        end
    end
    return answer('')
end

local function claim_one(id, from)
    redis.call('ZREM', from, member(id))
    local h = key('job', id)
    local attempt = redis.call('HINCRBY', h, 'attempt', 1)
    redis.call('HSET', h, 'state', 'running', 'attempted_at', now, 'locked_by', worker)
    if redis.call('HGET', h, 'unique_while_pending') == '1' then
        release_key(id)
    end
    redis.call('SADD', key('running', worker), id)
    claimed[#claimed + 1] = row(id, attempt)
end

-- Remembers what this claim took, for a few minutes, in case its answer is lost.
local function remember()
    local ids = {}
    for i, c in ipairs(claimed) do
        ids[i] = tostring(c[1])
    end
    if #ids > 0 then
        redis.call('SADD', key('holders'), worker)
        redis.call('SET', record, cjson.encode(ids), 'EX', 300)
    end
end

-- Takes up to `n` due members of one sorted set; returns whether the set is now empty.
local function take(from, n)
    local ids = redis.call('ZRANGE', from, '-inf', now, 'BYSCORE', 'LIMIT', 0, n)
    for _, m in ipairs(ids) do
        claim_one(unpad(m), from)
    end
    return redis.call('EXISTS', from) == 0
end

if ARGV[5] == 'fair' then
    -- The (tenant, provider) groups after the cursor ARGV[6], at most 4 * limit of them; an equal share of
    -- the batch from each group with due jobs, oldest first. Answers the claimed jobs and where to resume.
    local walked = redis.call('ZRANGE', key('groups', kind), '(' .. ARGV[6], '+', 'BYLEX', 'LIMIT', 0, 4 * limit)
    local due = {}
    for _, group in ipairs(walked) do
        local q = key('due', kind, 'g', group)
        if #redis.call('ZRANGE', q, '-inf', now, 'BYSCORE', 'LIMIT', 0, 1) > 0 then
            due[#due + 1] = group
        elseif redis.call('EXISTS', q) == 0 then
            redis.call('ZREM', key('groups', kind), group)
        end
    end
    local share = math.max(1, math.ceil(limit / math.max(#due, 1)))
    for _, group in ipairs(due) do
        local left = limit - #claimed
        if left <= 0 then
            break
        end
        if take(key('due', kind, 'g', group), math.min(share, left)) then
            redis.call('ZREM', key('groups', kind), group)
        end
    end
    local resume = ''
    if #walked >= 4 * limit then
        resume = walked[#walked]
    end
    remember()
    return answer(resume)
end

local prios = redis.call('ZRANGE', key('prios', kind), 0, -1)
for _, prio in ipairs(prios) do
    local left = limit - #claimed
    if left <= 0 then
        break
    end
    if take(key('due', kind, 'p', prio), left) then
        redis.call('ZREM', key('prios', kind), prio)
    end
end
remember()
return answer('')
