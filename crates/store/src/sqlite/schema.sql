-- Latchkey schema v1 (SQLite). Timestamps are Unix seconds. Sealed columns (BLOB) hold
-- envelope ciphertexts whose AAD names table, column and row; nothing here is plaintext secret.

CREATE TABLE data_keys (
    version     INTEGER PRIMARY KEY,
    kek_id      TEXT NOT NULL,
    wrapped     BLOB NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE server_secrets (
    name   TEXT PRIMARY KEY,
    value  BLOB NOT NULL
);

CREATE TABLE users (
    id             TEXT PRIMARY KEY,
    username       TEXT NOT NULL UNIQUE,
    password_hash  TEXT,
    totp_seed      BLOB,
    totp_enabled   INTEGER NOT NULL DEFAULT 0,
    -- The last TOTP step accepted: a code is never accepted twice.
    totp_last_step INTEGER,
    created_at     INTEGER NOT NULL
);

CREATE TABLE connections (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    provider       TEXT NOT NULL,
    client_id      TEXT NOT NULL,
    client_secret  BLOB,
    authorize_url  TEXT NOT NULL,
    token_url      TEXT NOT NULL,
    revoke_url     TEXT,
    userinfo_url   TEXT,
    api_base_url   TEXT,
    issuer         TEXT,
    scopes         TEXT NOT NULL,
    created_at     INTEGER NOT NULL
);

CREATE TABLE connected_accounts (
    id                   TEXT PRIMARY KEY,
    user_id              TEXT NOT NULL REFERENCES users(id),
    connection_id        TEXT NOT NULL REFERENCES connections(id),
    upstream_account_id  TEXT,
    scopes               TEXT NOT NULL,
    access_token         BLOB,
    access_expires_at    INTEGER,
    refresh_token        BLOB,
    status               TEXT NOT NULL,
    status_reason        TEXT,
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL,
    last_used_at         INTEGER,
    last_refreshed_at    INTEGER,
    token_version        INTEGER NOT NULL
);
CREATE INDEX connected_accounts_user_connection ON connected_accounts(user_id, connection_id);

-- Upstream access tokens narrowed to a scope set (providers that honour `scope` on refresh).
CREATE TABLE scoped_tokens (
    id            TEXT PRIMARY KEY,
    account_id    TEXT NOT NULL REFERENCES connected_accounts(id),
    scopes        TEXT NOT NULL,
    access_token  BLOB NOT NULL,
    expires_at    INTEGER
);
CREATE INDEX scoped_tokens_account ON scoped_tokens(account_id);

CREATE TABLE agents (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    secret_hash  TEXT UNIQUE,
    disabled     INTEGER NOT NULL DEFAULT 0,
    -- Apps (clients whose users sign in through /authorize): exact redirect URIs, space-separated.
    redirect_uris          TEXT NOT NULL DEFAULT '',
    public_client          INTEGER NOT NULL DEFAULT 0,
    rotate_refresh_tokens  INTEGER NOT NULL DEFAULT 0,
    -- For access-token exchange: the audience (API identifier) this client serves.
    resource_server        TEXT,
    created_at   INTEGER NOT NULL
);

CREATE TABLE agent_keys (
    agent_id    TEXT NOT NULL REFERENCES agents(id),
    kid         TEXT NOT NULL,
    alg         TEXT NOT NULL,
    jwk         TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (agent_id, kid)
);

CREATE TABLE grants (
    agent_id       TEXT NOT NULL REFERENCES agents(id),
    connection_id  TEXT NOT NULL REFERENCES connections(id),
    scopes         TEXT NOT NULL,
    ip_allowlist   TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    PRIMARY KEY (agent_id, connection_id)
);

-- Single-use identifiers of client assertions and subject tokens, kept until they expire.
CREATE TABLE used_jtis (
    key         TEXT PRIMARY KEY,
    expires_at  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX used_jtis_expiry ON used_jtis(expires_at);

-- Authorization codes (hash only): single use, kept after use to detect replay.
CREATE TABLE auth_codes (
    hash            TEXT PRIMARY KEY,
    client_id       TEXT NOT NULL REFERENCES agents(id),
    user_id         TEXT NOT NULL REFERENCES users(id),
    redirect_uri    TEXT NOT NULL,
    scope           TEXT NOT NULL,
    nonce           TEXT,
    code_challenge  TEXT NOT NULL,
    audience        TEXT NOT NULL,
    auth_time       INTEGER NOT NULL,
    amr             TEXT NOT NULL,
    expires_at      INTEGER NOT NULL,
    used            INTEGER NOT NULL DEFAULT 0,
    family_id       TEXT
);

-- What one sign-in granted an app; revoking the family revokes everything derived from it.
CREATE TABLE token_families (
    id          TEXT PRIMARY KEY,
    client_id   TEXT NOT NULL REFERENCES agents(id),
    user_id     TEXT NOT NULL REFERENCES users(id),
    scope       TEXT NOT NULL,
    auth_time   INTEGER NOT NULL,
    amr         TEXT NOT NULL,
    revoked     INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);

-- Latchkey refresh tokens (hash only). `rotated` ones are kept to detect reuse.
CREATE TABLE refresh_tokens (
    hash        TEXT PRIMARY KEY,
    family_id   TEXT NOT NULL REFERENCES token_families(id),
    state       TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE sessions (
    hash              TEXT PRIMARY KEY,
    user_id           TEXT NOT NULL REFERENCES users(id),
    auth_methods      TEXT NOT NULL,
    authenticated_at  INTEGER NOT NULL,
    pending_mfa       INTEGER NOT NULL DEFAULT 0,
    expires_at        INTEGER NOT NULL
);

CREATE TABLE connect_flows (
    state_hash     TEXT PRIMARY KEY,
    user_id        TEXT NOT NULL REFERENCES users(id),
    connection_id  TEXT NOT NULL REFERENCES connections(id),
    code_verifier  BLOB NOT NULL,
    redirect_uri   TEXT NOT NULL,
    -- The scopes asked of the provider (the connection's, the user's earlier ones, new ones).
    scopes         TEXT NOT NULL DEFAULT '',
    -- Where the browser goes afterwards: '' (account page), 'return:{path}' (an /authorize
    -- request to resume), or 'app:{connect session id}' (My Account API).
    then_to        TEXT NOT NULL DEFAULT '',
    expires_at     INTEGER NOT NULL
);

-- My Account API connect transactions (auth_session, ticket and connect_code as hashes).
CREATE TABLE account_connects (
    id              TEXT PRIMARY KEY,
    ticket_hash     TEXT UNIQUE,
    code_hash       TEXT UNIQUE,
    user_id         TEXT NOT NULL REFERENCES users(id),
    client_id       TEXT NOT NULL REFERENCES agents(id),
    connection_id   TEXT NOT NULL REFERENCES connections(id),
    redirect_uri    TEXT NOT NULL,
    state           TEXT,
    code_challenge  TEXT,
    scopes          TEXT NOT NULL,
    params          TEXT NOT NULL,
    account_id      TEXT,
    completed       INTEGER NOT NULL DEFAULT 0,
    expires_at      INTEGER NOT NULL
);

CREATE TABLE audit_events (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    at             INTEGER NOT NULL,
    actor_type     TEXT NOT NULL,
    actor_id       TEXT NOT NULL,
    auth_method    TEXT NOT NULL,
    subject_user   TEXT,
    action         TEXT NOT NULL,
    connection     TEXT,
    account_id     TEXT,
    scopes         TEXT,
    decision       TEXT NOT NULL,
    reason         TEXT,
    audit_context  TEXT,
    request_id     TEXT,
    client_ip      TEXT
);
