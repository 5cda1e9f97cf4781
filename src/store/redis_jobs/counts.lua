-- The counts behind the operators' overview and the queue gauges, in the shape of PostgreSQL's
-- `queue_counts`: one row per queue, kind, tenant and provider. Waiting jobs are counted from the due sets
-- (ZCOUNT, never a walk of the jobs), running ones from what workers hold (bounded by their concurrency),
-- dead ones and the last five minutes' ends from the tallies kept as jobs end. Plain kinds carry no tenant
-- in their due sets, so their waiting jobs count under no tenant.
-- Answers {now_ms, JSON array of [queue, kind, tenant, provider, pending, scheduled, running, dead,
-- oldest_pending_ms or -1, completed_5m, dead_5m]}.
local now = now_ms()
local rows = {}
local order = {}
local function row(queue, kind, tenant, provider)
    local k = queue .. '\t' .. kind .. '\t' .. tenant .. '\t' .. provider
    local r = rows[k]
    if not r then
        r = { queue, kind, tenant, provider, 0, 0, 0, 0, -1, 0, 0 }
        rows[k] = r
        order[#order + 1] = k
    end
    return r
end
local function split(text)
    local parts = {}
    for part in string.gmatch(text .. '\t', '([^\t]*)\t') do
        parts[#parts + 1] = part
    end
    return parts
end
local function waiting(r, set)
    r[5] = r[5] + redis.call('ZCOUNT', set, '-inf', now)
    r[6] = r[6] + redis.call('ZCOUNT', set, '(' .. now, '+inf')
    local first = redis.call('ZRANGE', set, 0, 0, 'WITHSCORES')
    if first[2] then
        local at = tonumber(first[2])
        if at <= now and (r[9] < 0 or at < r[9]) then
            r[9] = at
        end
    end
end

local kinds = redis.call('HGETALL', key('kinds'))
for i = 1, #kinds, 2 do
    local kind, queue = kinds[i], kinds[i + 1]
    for _, group in ipairs(redis.call('ZRANGE', key('groups', kind), 0, -1)) do
        local tenant, provider = string.match(group, '^(.*)/([^/]*)$')
        waiting(row(queue, kind, tenant or group, provider or ''), key('due', kind, 'g', group))
    end
    for _, prio in ipairs(redis.call('ZRANGE', key('prios', kind), 0, -1)) do
        waiting(row(queue, kind, '', ''), key('due', kind, 'p', prio))
    end
end
for _, worker in ipairs(redis.call('SMEMBERS', key('holders'))) do
    for _, id in ipairs(redis.call('SMEMBERS', key('running', worker))) do
        local f = split(tally_field(id))
        local r = row(f[1], f[2], f[3], f[4])
        r[7] = r[7] + 1
    end
end
local dead = redis.call('HGETALL', key('tally', 'dead'))
for i = 1, #dead, 2 do
    local f = split(dead[i])
    local r = row(f[1], f[2], f[3], f[4])
    r[8] = r[8] + tonumber(dead[i + 1])
end
local slot = math.floor(now / ENDED_SLOT_MS)
for s = slot - 29, slot do
    local ended = redis.call('HGETALL', key('ended', s))
    for i = 1, #ended, 2 do
        local f = split(ended[i])
        local column = ({ completed = 10, dead = 11 })[f[1]]
        if column then
            local r = row(f[2], f[3], f[4], f[5])
            r[column] = r[column] + tonumber(ended[i + 1])
        end
    end
end
local out = {}
for _, k in ipairs(order) do
    local r = rows[k]
    if r[5] + r[6] + r[7] + r[8] + r[10] + r[11] > 0 then
        out[#out + 1] = r
    end
end
if #out == 0 then
    return { now, '[]' }
end
return { now, cjson.encode(out) }
