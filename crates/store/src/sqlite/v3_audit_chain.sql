-- Version 3: the audit chain. Each entry carries the HMAC-SHA256 of its content and its
-- predecessor's MAC (key sealed by the KEK, never stored in the clear), plus the agent an
-- administrative change targets. Checkpoints (seq, MAC) are signed with an Ed25519 key.
ALTER TABLE audit_events ADD COLUMN agent_id TEXT;
ALTER TABLE audit_events ADD COLUMN mac TEXT;

CREATE TABLE audit_checkpoints (
    seq        INTEGER PRIMARY KEY,
    mac        TEXT NOT NULL,
    at         INTEGER NOT NULL,
    public_key TEXT NOT NULL,
    signature  TEXT NOT NULL
);
