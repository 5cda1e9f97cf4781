-- Waiting (due or not) and running jobs of kind ARGV[2]: {tenant ARGV[3]'s, everyone's}, for the pending
-- caps. Waiting jobs are counted per due set (a fair kind's sets are named "tenant/provider"), running ones
-- from what workers hold, so nothing walks the backlog.
local kind, tenant = ARGV[2], ARGV[3]
local mine, all = 0, 0
for _, group in ipairs(redis.call('ZRANGE', key('groups', kind), 0, -1)) do
    local n = redis.call('ZCARD', key('due', kind, 'g', group))
    all = all + n
    if string.sub(group, 1, #tenant + 1) == tenant .. '/' then
        mine = mine + n
    end
end
for _, prio in ipairs(redis.call('ZRANGE', key('prios', kind), 0, -1)) do
    all = all + redis.call('ZCARD', key('due', kind, 'p', prio))
end
for _, worker in ipairs(redis.call('SMEMBERS', key('holders'))) do
    for _, id in ipairs(redis.call('SMEMBERS', key('running', worker))) do
        local j = redis.call('HMGET', key('job', id), 'kind', 'tenant_id')
        if j[1] == kind then
            all = all + 1
            if j[2] == tenant then
                mine = mine + 1
            end
        end
    end
end
return { mine, all }
