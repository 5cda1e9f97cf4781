-- Which process fired a schedule's last tick, for operators asking "who ran the purger last night?".
ALTER TABLE job_schedules ADD COLUMN fired_by TEXT;
