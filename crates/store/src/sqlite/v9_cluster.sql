-- Version 9: what several processes (or, on PostgreSQL, nodes) must count or do once, kept in
-- the database: the grants' quotas and the periodic jobs.

-- The grants' quotas, counted with each release (in its transaction), so a limit holds
-- whatever process released and across restarts. One row per counter and window: `key` names
-- both (`agent:…:minute:29000000`), `n` counts the releases in it, and the row may go once
-- `window_end` has passed.
CREATE TABLE quota_counts (
    key TEXT PRIMARY KEY,
    window_end INTEGER NOT NULL,
    n INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX quota_counts_window_end ON quota_counts(window_end);

-- Periodic jobs (an audit checkpoint, retention): a job is claimed for a period by moving its
-- `next_at` forward, which succeeds for one claimant only once the period has passed.
CREATE TABLE job_claims (
    name TEXT PRIMARY KEY,
    next_at INTEGER NOT NULL
) WITHOUT ROWID;
