-- The ids of jobs matching the filter ARGV[2] (JSON, see `matches`; `ids` narrows to those jobs), newest
-- first, below id ARGV[3] (0: no cursor), at most ARGV[4]. Walks at most ARGV[5] jobs, so a filter that
-- matches little in a large store does not hold Redis: answers {ids, lowest id walked or -1 when the walk
-- reached the end}, and the caller vouches only for ids above what was walked.
local f = cjson.decode(ARGV[2])
local before, limit, budget = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
local found = {}
if f.ids ~= nil and f.ids ~= cjson.null then
    local ids = {}
    for _, id in ipairs(f.ids) do
        ids[#ids + 1] = id
    end
    table.sort(ids, function(a, b) return a > b end)
    for _, n in ipairs(ids) do
        local id = string.format('%.0f', n)
        if #found < limit and (before == 0 or n < before) and matches(id, f, now) then
            found[#found + 1] = tonumber(id)
        end
    end
    return { found, -1 }
end
local top = before == 0 and '+inf' or '(' .. before
local walked, lowest = 0, -1
while #found < limit and walked < budget do
    local chunk = redis.call('ZRANGE', key('all'), top, '-inf', 'BYSCORE', 'REV', 'LIMIT', 0,
        math.min(256, budget - walked))
    if #chunk == 0 then
        return { found, -1 }
    end
    for _, id in ipairs(chunk) do
        walked = walked + 1
        lowest = tonumber(id)
        if matches(id, f, now) then
            found[#found + 1] = lowest
            if #found >= limit then
                break
            end
        end
    end
    top = '(' .. lowest
end
if #found >= limit then
    return { found, -1 }
end
return { found, lowest }
