-- Names the claim that took a running row. A worker whose claim committed but whose answer never reached it
-- (the connection cut at that instant) asks again under the same name and gets those rows, instead of
-- leaving them running under a live worker that nobody would ever rescue (see store::jobs::claimed_under).
ALTER TABLE jobs ADD COLUMN claim_token bigint;
