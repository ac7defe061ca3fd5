-- Version 6: approvals — CIBA requests (`/bc-authorize`) and token exchanges the policy holds
-- for the user's decision — and when a session last gave a TOTP code (step-up).

-- One row per request shown to the user. The `auth_req_id` the client polls with is stored
-- only as its SHA-256 (`req_hash`). `request_hash` names exactly what was asked (client, user,
-- connection, scopes, details): an approval covers that request and nothing more, and an
-- identical pending request collapses into this row instead of prompting again.
CREATE TABLE approvals (
    id                     TEXT PRIMARY KEY,
    req_hash               TEXT NOT NULL UNIQUE,
    kind                   TEXT NOT NULL,          -- 'ciba' or 'exchange'
    client_id              TEXT NOT NULL,
    user_id                TEXT NOT NULL,
    connection             TEXT,
    scopes                 TEXT NOT NULL,
    audience               TEXT,
    authorization_details  TEXT,                   -- verbatim JSON, as the client sent it
    binding_message        TEXT,
    audit_context          TEXT,
    login_hint             TEXT,
    risk                   TEXT NOT NULL,
    step_up                INTEGER NOT NULL,       -- approving needs a recent TOTP code
    single_use             INTEGER NOT NULL,       -- consumed by its first redemption
    request_hash           TEXT NOT NULL,
    status                 TEXT NOT NULL,          -- pending, approved, denied, expired, redeemed
    created_at             INTEGER NOT NULL,
    expires_at             INTEGER NOT NULL,
    interval               INTEGER NOT NULL,       -- seconds between polls (raised by slow_down)
    last_polled_at         INTEGER,
    decided_by             TEXT,
    decided_at             INTEGER,
    stepped_up             INTEGER NOT NULL DEFAULT 0,
    redeemed_at            INTEGER,                -- the auth_req_id was redeemed
    reason                 TEXT
);
CREATE INDEX approvals_request ON approvals(request_hash, status);
CREATE INDEX approvals_user ON approvals(user_id, status);
CREATE INDEX approvals_client ON approvals(client_id, status);
CREATE INDEX approvals_due ON approvals(status, expires_at);

-- When this session's user last gave a TOTP code (sign-in with a code, or a step-up).
ALTER TABLE sessions ADD COLUMN mfa_at INTEGER;
UPDATE sessions SET mfa_at = authenticated_at WHERE auth_methods LIKE '%otp%';
