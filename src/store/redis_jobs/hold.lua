-- Whether worker ARGV[4] still holds attempt ARGV[3] of job ARGV[2]; with ARGV[5] given, also saves it as the
-- job's progress (a checkpoint). Answers 1 or 0.
if not holds(ARGV[2], ARGV[3], ARGV[4]) then
    return 0
end
if ARGV[5] and ARGV[5] ~= '' then
    redis.call('HSET', key('job', ARGV[2]), 'progress', ARGV[5])
end
return 1
