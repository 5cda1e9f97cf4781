-- Room on each page for a job's later versions. A job row is written three times (queued, claimed, finished)
-- and every one of those updates changes an indexed column, so none is HOT; on a full page the new version
-- moves to another page, which also costs a second lock record and the whole tuple in the WAL. With half of
-- each page free when rows are inserted, the claim and the finish land beside the row, and page pruning
-- reclaims the dead versions in place: 920 -> 710 WAL bytes per no-op job in `cargo bench --bench jobs`.
-- Pages written before this keep their layout until rewritten.
ALTER TABLE jobs SET (fillfactor = 50);
