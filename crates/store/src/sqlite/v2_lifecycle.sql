-- Version 2: crash-window detection, background-refresh claims, idle keep-alive, the webhook
-- outbox and operator tokens for the admin API.

-- Set just before an upstream refresh call, cleared by the commit of its outcome: a value
-- that survives a restart means the provider's answer may have been lost.
ALTER TABLE connected_accounts ADD COLUMN refresh_started_at INTEGER;
-- The background refresher claims an account until this time, so that several nodes never
-- refresh the same account in the same pass.
ALTER TABLE connected_accounts ADD COLUMN refresh_claimed_until INTEGER;
CREATE INDEX connected_accounts_expiry ON connected_accounts(status, access_expires_at);

-- Refresh idle accounts at least this often (seconds), for providers that revoke refresh
-- tokens left unused; NULL means never.
ALTER TABLE connections ADD COLUMN keep_alive_secs INTEGER;

-- Webhook deliveries, written in the same transaction as the event they report and sent
-- (at least once) by a background task. The body holds no secret.
CREATE TABLE webhook_outbox (
    id               TEXT PRIMARY KEY,
    event            TEXT NOT NULL,
    body             TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL,
    delivered_at     INTEGER,
    failed_at        INTEGER,
    last_error       TEXT
);
CREATE INDEX webhook_outbox_due ON webhook_outbox(delivered_at, failed_at, next_attempt_at);

-- Bearer tokens for the admin API, stored as HMAC-SHA-256 under the server's pepper.
CREATE TABLE operator_tokens (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    secret_hash  TEXT NOT NULL UNIQUE,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    revoked_at   INTEGER
);
