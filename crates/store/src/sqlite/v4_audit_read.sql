-- Reading the audit trail (admin API `GET /api/v1/audit`). Each index holds the rowid (`seq`),
-- so "this value, below the cursor, newest first" is one range walk that stops after a page.
-- Partial where the column is often empty, so the write path pays only for what it stores.
CREATE INDEX audit_events_subject_user ON audit_events(subject_user) WHERE subject_user IS NOT NULL;
CREATE INDEX audit_events_agent_actor ON audit_events(actor_id) WHERE actor_type = 'agent';
CREATE INDEX audit_events_agent_target ON audit_events(agent_id) WHERE agent_id IS NOT NULL;
CREATE INDEX audit_events_connection ON audit_events(connection) WHERE connection IS NOT NULL;
CREATE INDEX audit_events_action ON audit_events(action);
