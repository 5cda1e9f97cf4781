-- One operator action on job ARGV[3], as PostgreSQL's admin queries do it: ARGV[2] is `retry` (a waiting job
-- runs now; a dead or cancelled one is replayed), `cancel` (a waiting or running job; it gives its key
-- back), or `reschedule` (a waiting job runs at ARGV[4] ms). Answers {outcome, detail}: {"ok", kind},
-- {"ok_running", "<attempt>"} (a running attempt was cancelled: tell its worker), {"missing", ""},
-- {"state", <view state>} (the action does not apply), or {"held", <holder id>} (a replay whose key
-- another job holds).
local op, id = ARGV[2], ARGV[3]
local now = now_ms()
local h = key('job', id)
local j = redis.call('HMGET', h, 'state', 'run_at', 'kind', 'locked_by', 'attempt')
if not j[1] then
    return { { 'missing', '' }, MOVES }
end
local state, kind = view_state(j[1], j[2], now), j[3]
local waiting = state == 'pending' or state == 'scheduled'

local function wake()
    redis.call('PUBLISH', key('wake'), kind)
end

if op == 'retry' then
    if waiting then
        redis.call('ZREM', due_set(id), member(id))
        make_available(id, now)
        wake()
        return { { 'ok', kind }, MOVES }
    elseif state == 'dead' or state == 'cancelled' then
        local held = replay(id, now)
        if held then
            return { { 'held', held }, MOVES }
        end
        wake()
        return { { 'ok', kind }, MOVES }
    end
elseif op == 'cancel' then
    if waiting or state == 'running' then
        if waiting then
            redis.call('ZREM', due_set(id), member(id))
        else
            unhold(id, j[4])
            append_error(id, cjson.encode({ attempt = tonumber(j[5]), at = iso(now), class = 'cancelled',
                worker = j[4], error = 'cancelled by an operator while running' }))
        end
        release_key(id)
        finish_for_good(id, 'cancelled', now)
        if state == 'running' then
            return { { 'ok_running', j[5] }, MOVES }
        end
        return { { 'ok', kind }, MOVES }
    end
elseif op == 'reschedule' then
    if waiting then
        local at = tonumber(ARGV[4])
        redis.call('ZREM', due_set(id), member(id))
        make_available(id, at)
        if at <= now then
            wake()
        end
        return { { 'ok', kind }, MOVES }
    end
end
return { { 'state', state }, MOVES }
