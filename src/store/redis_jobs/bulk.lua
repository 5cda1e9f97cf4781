-- A bulk operator action over jobs matching the filter ARGV[3] (JSON, see `matches`; `ids` narrows to those
-- jobs), at most ARGV[4] of them: ARGV[2] is `replay` (dead jobs, newest first, so of several with one key
-- the newest is replayed), `purge` (dead jobs are deleted), `cancel` or `count` (waiting jobs, cancelled or
-- only counted). Answers {count, {{id, holder}...}} where the pairs are replays refused because another job
-- holds the key.
local op, limit = ARGV[2], tonumber(ARGV[4])
local f = cjson.decode(ARGV[3])
local now = now_ms()
local picked = {}

local function consider(id)
    if #picked < limit and matches(id, f, now) then
        picked[#picked + 1] = id
    end
end

-- Considers the members of a sorted set in chunks (newest first when `rev`) until enough are picked.
local function walk(set, rev)
    local from = 0
    while #picked < limit do
        local chunk = rev and redis.call('ZRANGE', set, from, from + 499, 'REV')
            or redis.call('ZRANGE', set, from, from + 499)
        if #chunk == 0 then
            return
        end
        for _, m in ipairs(chunk) do
            consider(unpad(m))
        end
        from = from + 500
    end
end

local ids = nil
if f.ids ~= nil and f.ids ~= cjson.null then
    ids = {}
    for _, n in ipairs(f.ids) do
        ids[#ids + 1] = string.format('%.0f', n)
    end
end
local function states_ok(id)
    local state = field(id, 'state')
    if op == 'replay' or op == 'purge' then
        return state == 'dead'
    end
    return state == 'available'
end

if ids then
    table.sort(ids, function(a, b) return tonumber(a) > tonumber(b) end)
    for _, id in ipairs(ids) do
        if states_ok(id) then
            consider(id)
        end
    end
elseif op == 'replay' or op == 'purge' then
    walk(key('dead'), true)
else
    local kinds = redis.call('HGETALL', key('kinds'))
    for i = 1, #kinds, 2 do
        local kind = kinds[i]
        if f.kind == nil or f.kind == cjson.null or f.kind == kind then
            local sets = {}
            for _, group in ipairs(redis.call('ZRANGE', key('groups', kind), 0, -1)) do
                sets[#sets + 1] = key('due', kind, 'g', group)
            end
            for _, prio in ipairs(redis.call('ZRANGE', key('prios', kind), 0, -1)) do
                sets[#sets + 1] = key('due', kind, 'p', prio)
            end
            for _, set in ipairs(sets) do
                walk(set, false)
            end
        end
    end
end

local count, held, woken = 0, {}, {}
for _, id in ipairs(picked) do
    if op == 'replay' then
        local holder = replay(id, now)
        if holder then
            held[#held + 1] = { tonumber(id), tonumber(holder) }
        else
            count = count + 1
            woken[field(id, 'kind')] = true
        end
    elseif op == 'purge' then
        local tally = tally_field(id)
        if redis.call('HINCRBY', key('tally', 'dead'), tally, -1) <= 0 then
            redis.call('HDEL', key('tally', 'dead'), tally)
        end
        release_key(id)
        redis.call('ZREM', key('dead'), member(id))
        redis.call('ZREM', key('all'), id)
        redis.call('DEL', key('job', id))
        count = count + 1
    elseif op == 'cancel' then
        redis.call('ZREM', due_set(id), member(id))
        release_key(id)
        finish_for_good(id, 'cancelled', now)
        count = count + 1
    else
        count = count + 1
    end
end
for kind in pairs(woken) do
    redis.call('PUBLISH', key('wake'), kind)
end
return { { count, held }, MOVES }
