-- Version 8: user roles, and the per-day count of agents' actions the dashboard charts.

-- What a user may do in the dashboard: an `operator` manages agents, connections and users; a
-- `user` sees only their own accounts, approvals and activity. Existing users become `user`.
-- (No config_revision trigger: a role does not change what a token release is decided on.)
ALTER TABLE users ADD COLUMN role TEXT NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'operator'));

-- `audit_daily_counts`: an action's allowed entries by agents since a time, per UTC day and
-- agent (optionally one user's). One range walk of (action, at) that never reads the table
-- (the grouped columns are in the index). Partial, so refusals and the operators' and users'
-- own entries cost the write path nothing here.
CREATE INDEX audit_events_agent_daily ON audit_events(action, at, subject_user, actor_id)
    WHERE actor_type = 'agent' AND decision = 'allow';
