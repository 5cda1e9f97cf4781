-- Shared by every job script (prepended to each). ARGV[1] is the key prefix, a Redis Cluster hash tag such as
-- "{activekg}", so every key a script touches lives in one slot and the script stays atomic.
--
-- Keys under the prefix:
--   job:<id>              HASH   the job: the same fields as a row of PostgreSQL's `jobs`
--   due:<kind>:p:<prio>   ZSET   available jobs of a plain kind at one priority, scored by run_at (ms)
--   prios:<kind>          ZSET   the priorities in use, scored by minus the priority (highest first)
--   due:<kind>:g:<group>  ZSET   available jobs of a fair kind for one "tenant/provider" group, by run_at
--   groups:<kind>         ZSET   the groups with available jobs, all scored 0 so they sort by name
--   running:<worker>      SET    jobs a worker holds
--   holders               SET    workers that hold jobs (so rescue finds workers no registry knows)
--   finished              ZSET   completed and cancelled jobs, by finished_at (pruning)
--   dead                  ZSET   dead-lettered jobs, by finished_at
--   unique:<kind>         HASH   idempotency key -> the job holding it
--   kinds                 HASH   kind -> its queue, for every kind ever enqueued (the counts walk it)
--   all                   ZSET   every job, scored by id (the operators' listing walks it newest first)
--   tally:dead            HASH   "queue\tkind\ttenant\tprovider" -> dead jobs kept (the counts read it)
--   ended:<10 s slot>     HASH   "state\tqueue\tkind\ttenant\tprovider" -> jobs that ended in that slot,
--                                kept 6 minutes (the counts' "last five minutes")
-- Members of the sorted sets are ids padded to 19 digits, so equal scores order by id as PostgreSQL does.
-- Nothing here unpacks a list into a call: a backlog of any size stays within Lua's stack.
local P = ARGV[1]

local function key(...)
    return P .. ':' .. table.concat({ ... }, ':')
end

local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function member(id)
    id = tostring(id)
    return string.rep('0', 19 - #id) .. id
end

-- The id a padded member stands for, as the decimal string keys use.
local function unpad(m)
    local id = string.gsub(m, '^0+', '')
    if id == '' then
        return '0'
    end
    return id
end

-- A time in ms as RFC 3339 UTC, as the attempt history stores it (scripts have no `os.date`).
local function iso(ms)
    local secs = math.floor(ms / 1000)
    local days, rem = math.floor(secs / 86400), secs % 86400
    -- Howard Hinnant's civil_from_days.
    local z = days + 719468
    local era = math.floor(z / 146097)
    local doe = z - era * 146097
    local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
    local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
    local mp = math.floor((5 * doy + 2) / 153)
    local d = doy - math.floor((153 * mp + 2) / 5) + 1
    local m = mp < 10 and mp + 3 or mp - 9
    local y = yoe + era * 400 + (m <= 2 and 1 or 0)
    return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%03dZ', y, m, d, math.floor(rem / 3600),
        math.floor(rem % 3600 / 60), rem % 60, ms % 1000)
end

local function field(id, name)
    return redis.call('HGET', key('job', id), name)
end

-- Moves of jobs back to waiting, or to dead or cancelled, as {kind, args, state, attempt, last error}: the
-- caller mirrors them into PostgreSQL for kinds whose state something there follows (a node's embedding
-- status), as the `jobs` table's trigger does. Scripts that move jobs answer {their answer, MOVES}.
local MOVES = {}
local NOTE_MOVES = true

local function note_move(id, state)
    if not NOTE_MOVES then
        return
    end
    local j = redis.call('HMGET', key('job', id), 'kind', 'args', 'attempt', 'errors')
    local last = ''
    if j[4] and j[4] ~= '[]' then
        local errors = cjson.decode(j[4])
        local e = errors[#errors]
        if type(e) == 'table' and type(e.error) == 'string' then
            last = e.error
        end
    end
    MOVES[#MOVES + 1] = { j[1], j[2], state, tonumber(j[3]), last }
end

-- Puts a job where claims look for it: its kind's queue, at its priority or in its group.
local function make_available(id, run_at)
    local j = redis.call('HMGET', key('job', id), 'kind', 'fair', 'tenant_id', 'provider', 'priority')
    local kind = j[1]
    if j[2] == '1' then
        local group = (j[3] or '') .. '/' .. (j[4] or '')
        redis.call('ZADD', key('due', kind, 'g', group), run_at, member(id))
        redis.call('ZADD', key('groups', kind), 0, group)
    else
        local prio = tonumber(j[5])
        redis.call('ZADD', key('due', kind, 'p', prio), run_at, member(id))
        redis.call('ZADD', key('prios', kind), -prio, prio)
    end
    redis.call('HSET', key('job', id), 'state', 'available', 'run_at', run_at)
    redis.call('HDEL', key('job', id), 'finished_at', 'locked_by')
    note_move(id, 'available')
end

-- The job's place in the counts: "queue\tkind\ttenant\tprovider".
local function tally_field(id)
    local j = redis.call('HMGET', key('job', id), 'queue', 'kind', 'tenant_id', 'provider')
    return (j[1] or '') .. '\t' .. (j[2] or '') .. '\t' .. (j[3] or '') .. '\t' .. (j[4] or '')
end

-- The last five minutes' ends are counted in 10-second slots, so reading them never walks the jobs.
local ENDED_SLOT_MS = 10000

-- Appends one error (JSON text) to the job's history without re-encoding the earlier ones; a failure (not
-- an operator's replay mark) counts in its 10-second slot for the per-minute history.
local function append_error(id, err)
    if not err or err == '' then
        return
    end
    if not string.find(err, '"class":"replayed"', 1, true) then
        local now = now_ms()
        local slot = key('ended', math.floor(now / ENDED_SLOT_MS))
        redis.call('HINCRBY', slot, 'failed\t' .. tally_field(id), 1)
        redis.call('EXPIRE', slot, 360)
    end
    local errors = field(id, 'errors') or '[]'
    if errors == '[]' then
        errors = '[' .. err .. ']'
    else
        errors = string.sub(errors, 1, -2) .. ',' .. err .. ']'
    end
    redis.call('HSET', key('job', id), 'errors', errors)
end

-- Gives the job's idempotency key back, if the job still holds it.
local function release_key(id)
    local j = redis.call('HMGET', key('job', id), 'kind', 'unique_key')
    if j[2] then
        if redis.call('HGET', key('unique', j[1]), j[2]) == tostring(id) then
            redis.call('HDEL', key('unique', j[1]), j[2])
        end
        redis.call('HDEL', key('job', id), 'unique_key')
    end
end

-- Ends a job for good: completed, cancelled or dead.
local function finish_for_good(id, state, now)
    local tally = tally_field(id)
    local slot = key('ended', math.floor(now / ENDED_SLOT_MS))
    redis.call('HINCRBY', slot, state .. '\t' .. tally, 1)
    redis.call('EXPIRE', slot, 360)
    if state == 'dead' then
        redis.call('HINCRBY', key('tally', 'dead'), tally, 1)
    end
    redis.call('HSET', key('job', id), 'state', state, 'finished_at', now)
    redis.call('HDEL', key('job', id), 'locked_by')
    if state ~= 'completed' then
        note_move(id, state)
    end
    if state == 'dead' then
        redis.call('ZADD', key('dead'), now, member(id))
    else
        redis.call('ZADD', key('finished'), now, member(id))
    end
end

-- Stops `worker` holding the job.
local function unhold(id, worker)
    redis.call('SREM', key('running', worker), id)
    if redis.call('SCARD', key('running', worker)) == 0 then
        redis.call('SREM', key('holders'), worker)
    end
end

-- Whether `worker` holds attempt `attempt` of the job.
local function holds(id, attempt, worker)
    local j = redis.call('HMGET', key('job', id), 'state', 'attempt', 'locked_by')
    return j[1] == 'running' and tonumber(j[2]) == tonumber(attempt) and j[3] == worker
end

-- The due set an available job waits in.
local function due_set(id)
    local j = redis.call('HMGET', key('job', id), 'kind', 'fair', 'tenant_id', 'provider', 'priority')
    if j[2] == '1' then
        return key('due', j[1], 'g', (j[3] or '') .. '/' .. (j[4] or ''))
    end
    return key('due', j[1], 'p', tonumber(j[5]))
end

-- The operator's view of a job's state: an available job is pending or scheduled by its run time.
local function view_state(state, run_at, now)
    if state == 'available' then
        if tonumber(run_at) > now then
            return 'scheduled'
        end
        return 'pending'
    end
    return state
end

-- Whether job `id` matches an admin filter (decoded JSON: queue, kind, state, tenant_id, since_ms, until_ms),
-- as PostgreSQL's `filter_sql` does; a job that is gone matches nothing.
local function matches(id, f, now)
    local j = redis.call('HMGET', key('job', id), 'queue', 'kind', 'state', 'run_at', 'tenant_id', 'enqueued_at')
    if not j[3] then
        return false
    end
    local given = function(v)
        return v ~= nil and v ~= cjson.null
    end
    return (not given(f.queue) or j[1] == f.queue)
        and (not given(f.kind) or j[2] == f.kind)
        and (not given(f.state) or view_state(j[3], j[4], now) == f.state)
        and (not given(f.tenant_id) or j[5] == f.tenant_id)
        and (not given(f.since_ms) or tonumber(j[6]) >= f.since_ms)
        and (not given(f.until_ms) or tonumber(j[6]) < f.until_ms)
end

-- Replays a dead or cancelled job with a fresh set of attempts, keeping its history with a `replayed` entry
-- at the boundary, and takes its idempotency key back. Answers the holder's id instead (changing nothing)
-- when another job holds that key by now.
local function replay(id, now)
    local h = key('job', id)
    local j = redis.call('HMGET', h, 'kind', 'idempotency_key', 'state', 'attempt')
    if j[2] then
        local holder = redis.call('HGET', key('unique', j[1]), j[2])
        if holder and holder ~= tostring(id) then
            return holder
        end
        redis.call('HSET', key('unique', j[1]), j[2], id)
        redis.call('HSET', h, 'unique_key', j[2])
    end
    if j[3] == 'dead' then
        redis.call('ZREM', key('dead'), member(id))
        local tally = tally_field(id)
        if redis.call('HINCRBY', key('tally', 'dead'), tally, -1) <= 0 then
            redis.call('HDEL', key('tally', 'dead'), tally)
        end
    else
        redis.call('ZREM', key('finished'), member(id))
    end
    append_error(id, cjson.encode({ attempt = tonumber(j[4]), at = iso(now), class = 'replayed',
        error = 'replayed by an operator after ' .. j[4] .. ' attempt(s)' }))
    redis.call('HSET', h, 'attempt', 0, 'handbacks', 0)
    make_available(id, now)
    return nil
end
