-- Latchkey schema, PostgreSQL version 1: the end state of the SQLite schema (schema.sql and
-- v2–v8) in one step. Timestamps are Unix seconds (BIGINT). Sealed columns (BYTEA) hold
-- envelope ciphertexts whose AAD names table, column and row; nothing here is plaintext secret.
-- Text compares byte by byte (COLLATE "C"), as in SQLite, so every listing orders the same on
-- both backends whatever locale the database was created with. Flags are BOOLEAN.

CREATE TABLE data_keys (
    version     BIGINT PRIMARY KEY,
    kek_id      TEXT COLLATE "C" NOT NULL,
    wrapped     BYTEA NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE server_secrets (
    name   TEXT COLLATE "C" PRIMARY KEY,
    value  BYTEA NOT NULL
);

-- `role`: an `operator` manages agents, connections and users in the dashboard; a `user` sees
-- only their own accounts, approvals and activity.
CREATE TABLE users (
    id              TEXT COLLATE "C" PRIMARY KEY,
    username        TEXT COLLATE "C" NOT NULL UNIQUE,
    password_hash   TEXT COLLATE "C",
    totp_seed       BYTEA,
    totp_enabled    BOOLEAN NOT NULL DEFAULT FALSE,
    -- The last TOTP step accepted: a code is never accepted twice.
    totp_last_step  BIGINT,
    role            TEXT COLLATE "C" NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'operator')),
    created_at      BIGINT NOT NULL
);

CREATE TABLE connections (
    id               TEXT COLLATE "C" PRIMARY KEY,
    name             TEXT COLLATE "C" NOT NULL UNIQUE,
    provider         TEXT COLLATE "C" NOT NULL,
    client_id        TEXT COLLATE "C" NOT NULL,
    client_secret    BYTEA,
    authorize_url    TEXT COLLATE "C" NOT NULL,
    token_url        TEXT COLLATE "C" NOT NULL,
    revoke_url       TEXT COLLATE "C",
    userinfo_url     TEXT COLLATE "C",
    api_base_url     TEXT COLLATE "C",
    issuer           TEXT COLLATE "C",
    scopes           TEXT COLLATE "C" NOT NULL,
    -- Refresh idle accounts at least this often (seconds); NULL means never.
    keep_alive_secs  BIGINT,
    created_at       BIGINT NOT NULL
);

CREATE TABLE connected_accounts (
    id                     TEXT COLLATE "C" PRIMARY KEY,
    user_id                TEXT COLLATE "C" NOT NULL REFERENCES users(id),
    connection_id          TEXT COLLATE "C" NOT NULL REFERENCES connections(id),
    upstream_account_id    TEXT COLLATE "C",
    scopes                 TEXT COLLATE "C" NOT NULL,
    access_token           BYTEA,
    access_expires_at      BIGINT,
    refresh_token          BYTEA,
    status                 TEXT COLLATE "C" NOT NULL,
    status_reason          TEXT COLLATE "C",
    created_at             BIGINT NOT NULL,
    updated_at             BIGINT NOT NULL,
    last_used_at           BIGINT,
    last_refreshed_at      BIGINT,
    token_version          BIGINT NOT NULL,
    -- Set just before an upstream refresh call, cleared by the commit of its outcome.
    refresh_started_at     BIGINT,
    -- The background refresher claims an account until this time.
    refresh_claimed_until  BIGINT
);
CREATE INDEX connected_accounts_user_connection ON connected_accounts(user_id, connection_id);
CREATE INDEX connected_accounts_connection ON connected_accounts(connection_id);
CREATE INDEX connected_accounts_expiry ON connected_accounts(status, access_expires_at);

-- Upstream access tokens narrowed to a scope set (providers that honour `scope` on refresh).
CREATE TABLE scoped_tokens (
    id            TEXT COLLATE "C" PRIMARY KEY,
    account_id    TEXT COLLATE "C" NOT NULL REFERENCES connected_accounts(id),
    scopes        TEXT COLLATE "C" NOT NULL,
    access_token  BYTEA NOT NULL,
    expires_at    BIGINT
);
CREATE INDEX scoped_tokens_account ON scoped_tokens(account_id);

CREATE TABLE agents (
    id                     TEXT COLLATE "C" PRIMARY KEY,
    name                   TEXT COLLATE "C" NOT NULL,
    secret_hash            TEXT COLLATE "C" UNIQUE,
    disabled               BOOLEAN NOT NULL DEFAULT FALSE,
    -- Apps: exact redirect URIs, space-separated.
    redirect_uris          TEXT COLLATE "C" NOT NULL DEFAULT '',
    public_client          BOOLEAN NOT NULL DEFAULT FALSE,
    rotate_refresh_tokens  BOOLEAN NOT NULL DEFAULT FALSE,
    -- For access-token exchange: the audience (API identifier) this client serves.
    resource_server        TEXT COLLATE "C",
    created_at             BIGINT NOT NULL
);

CREATE TABLE agent_keys (
    agent_id    TEXT COLLATE "C" NOT NULL REFERENCES agents(id),
    kid         TEXT COLLATE "C" NOT NULL,
    alg         TEXT COLLATE "C" NOT NULL,
    jwk         TEXT COLLATE "C" NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (agent_id, kid)
);

-- `policy`: JSON (`latchkey_core::policy::GrantPolicy`), read and written whole with its grant.
CREATE TABLE grants (
    agent_id       TEXT COLLATE "C" NOT NULL REFERENCES agents(id),
    connection_id  TEXT COLLATE "C" NOT NULL REFERENCES connections(id),
    scopes         TEXT COLLATE "C" NOT NULL,
    ip_allowlist   TEXT COLLATE "C" NOT NULL,
    policy         TEXT COLLATE "C" NOT NULL DEFAULT '{}',
    created_at     BIGINT NOT NULL,
    PRIMARY KEY (agent_id, connection_id)
);
CREATE INDEX grants_connection ON grants(connection_id);

-- Single-use identifiers of client assertions and subject tokens, kept until they expire. The
-- primary key is what makes a `jti` single-use across every node.
CREATE TABLE used_jtis (
    key         TEXT COLLATE "C" PRIMARY KEY,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX used_jtis_expiry ON used_jtis(expires_at);

-- Authorization codes (hash only): single use, kept after use to detect replay.
CREATE TABLE auth_codes (
    hash            TEXT COLLATE "C" PRIMARY KEY,
    client_id       TEXT COLLATE "C" NOT NULL REFERENCES agents(id),
    user_id         TEXT COLLATE "C" NOT NULL REFERENCES users(id),
    redirect_uri    TEXT COLLATE "C" NOT NULL,
    scope           TEXT COLLATE "C" NOT NULL,
    nonce           TEXT COLLATE "C",
    code_challenge  TEXT COLLATE "C" NOT NULL,
    audience        TEXT COLLATE "C" NOT NULL,
    auth_time       BIGINT NOT NULL,
    amr             TEXT COLLATE "C" NOT NULL,
    expires_at      BIGINT NOT NULL,
    used            BOOLEAN NOT NULL DEFAULT FALSE,
    family_id       TEXT COLLATE "C"
);
CREATE INDEX auth_codes_user ON auth_codes(user_id);

-- What one sign-in granted an app; revoking the family revokes everything derived from it.
CREATE TABLE token_families (
    id          TEXT COLLATE "C" PRIMARY KEY,
    client_id   TEXT COLLATE "C" NOT NULL REFERENCES agents(id),
    user_id     TEXT COLLATE "C" NOT NULL REFERENCES users(id),
    scope       TEXT COLLATE "C" NOT NULL,
    auth_time   BIGINT NOT NULL,
    amr         TEXT COLLATE "C" NOT NULL,
    revoked     BOOLEAN NOT NULL DEFAULT FALSE,
    created_at  BIGINT NOT NULL
);
CREATE INDEX token_families_user ON token_families(user_id);

-- Latchkey refresh tokens (hash only). `rotated` ones are kept to detect reuse.
CREATE TABLE refresh_tokens (
    hash        TEXT COLLATE "C" PRIMARY KEY,
    family_id   TEXT COLLATE "C" NOT NULL REFERENCES token_families(id),
    state       TEXT COLLATE "C" NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX refresh_tokens_family ON refresh_tokens(family_id);

CREATE TABLE sessions (
    hash              TEXT COLLATE "C" PRIMARY KEY,
    user_id           TEXT COLLATE "C" NOT NULL REFERENCES users(id),
    auth_methods      TEXT COLLATE "C" NOT NULL,
    authenticated_at  BIGINT NOT NULL,
    pending_mfa       BOOLEAN NOT NULL DEFAULT FALSE,
    expires_at        BIGINT NOT NULL,
    -- When this session's user last gave a TOTP code (sign-in with a code, or a step-up).
    mfa_at            BIGINT
);
CREATE INDEX sessions_user ON sessions(user_id);
CREATE INDEX sessions_expiry ON sessions(expires_at);

CREATE TABLE connect_flows (
    state_hash     TEXT COLLATE "C" PRIMARY KEY,
    user_id        TEXT COLLATE "C" NOT NULL REFERENCES users(id),
    connection_id  TEXT COLLATE "C" NOT NULL REFERENCES connections(id),
    code_verifier  BYTEA NOT NULL,
    redirect_uri   TEXT COLLATE "C" NOT NULL,
    -- The scopes asked of the provider.
    scopes         TEXT COLLATE "C" NOT NULL DEFAULT '',
    -- '' (account page), 'return:{path}' or 'app:{connect session id}'.
    then_to        TEXT COLLATE "C" NOT NULL DEFAULT '',
    expires_at     BIGINT NOT NULL
);
CREATE INDEX connect_flows_user ON connect_flows(user_id);
CREATE INDEX connect_flows_expiry ON connect_flows(expires_at);

-- My Account API connect transactions (auth_session, ticket and connect_code as hashes).
CREATE TABLE account_connects (
    id              TEXT COLLATE "C" PRIMARY KEY,
    ticket_hash     TEXT COLLATE "C" UNIQUE,
    code_hash       TEXT COLLATE "C" UNIQUE,
    user_id         TEXT COLLATE "C" NOT NULL REFERENCES users(id),
    client_id       TEXT COLLATE "C" NOT NULL REFERENCES agents(id),
    connection_id   TEXT COLLATE "C" NOT NULL REFERENCES connections(id),
    redirect_uri    TEXT COLLATE "C" NOT NULL,
    state           TEXT COLLATE "C",
    code_challenge  TEXT COLLATE "C",
    scopes          TEXT COLLATE "C" NOT NULL,
    params          TEXT COLLATE "C" NOT NULL,
    account_id      TEXT COLLATE "C",
    completed       BOOLEAN NOT NULL DEFAULT FALSE,
    expires_at      BIGINT NOT NULL
);
CREATE INDEX account_connects_user ON account_connects(user_id);

-- The audit chain. `seq` is assigned by the writer as the last entry's + 1 while it holds the
-- chain's advisory lock (see `postgres/mod.rs`), so the chain is gap-free across nodes; `mac`
-- is the HMAC-SHA256 of the entry and its predecessor's MAC.
CREATE TABLE audit_events (
    seq            BIGINT PRIMARY KEY,
    at             BIGINT NOT NULL,
    actor_type     TEXT COLLATE "C" NOT NULL,
    actor_id       TEXT COLLATE "C" NOT NULL,
    auth_method    TEXT COLLATE "C" NOT NULL,
    subject_user   TEXT COLLATE "C",
    action         TEXT COLLATE "C" NOT NULL,
    connection     TEXT COLLATE "C",
    account_id     TEXT COLLATE "C",
    scopes         TEXT COLLATE "C",
    decision       TEXT COLLATE "C" NOT NULL,
    reason         TEXT COLLATE "C",
    audit_context  TEXT COLLATE "C",
    request_id     TEXT COLLATE "C",
    client_ip      TEXT COLLATE "C",
    agent_id       TEXT COLLATE "C",
    mac            TEXT COLLATE "C"
);
-- Reading the trail: "this value, below the cursor, newest first" is one backward range walk of
-- (value, seq) that stops after a page. Partial where the column is often empty.
CREATE INDEX audit_events_subject_user ON audit_events(subject_user, seq) WHERE subject_user IS NOT NULL;
CREATE INDEX audit_events_agent_actor ON audit_events(actor_id, seq) WHERE actor_type = 'agent';
CREATE INDEX audit_events_agent_target ON audit_events(agent_id, seq) WHERE agent_id IS NOT NULL;
CREATE INDEX audit_events_connection ON audit_events(connection, seq) WHERE connection IS NOT NULL;
CREATE INDEX audit_events_action ON audit_events(action, seq);
CREATE INDEX audit_events_at ON audit_events(at);
-- `audit_daily_counts`: one range walk of (action, at) that never reads the table.
CREATE INDEX audit_events_agent_daily ON audit_events(action, at, subject_user, actor_id)
    WHERE actor_type = 'agent' AND decision = 'allow';

-- Signed statements that the chain held entry `seq` with this MAC.
CREATE TABLE audit_checkpoints (
    seq         BIGINT PRIMARY KEY,
    mac         TEXT COLLATE "C" NOT NULL,
    at          BIGINT NOT NULL,
    public_key  TEXT COLLATE "C" NOT NULL,
    signature   TEXT COLLATE "C" NOT NULL
);

-- Webhook deliveries, written in the same transaction as the event they report and sent (at
-- least once) by a background task. The body holds no secret.
CREATE TABLE webhook_outbox (
    id               TEXT COLLATE "C" PRIMARY KEY,
    event            TEXT COLLATE "C" NOT NULL,
    body             TEXT COLLATE "C" NOT NULL,
    created_at       BIGINT NOT NULL,
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT NOT NULL,
    delivered_at     BIGINT,
    failed_at        BIGINT,
    last_error       TEXT COLLATE "C"
);
CREATE INDEX webhook_outbox_due ON webhook_outbox(next_attempt_at)
    WHERE delivered_at IS NULL AND failed_at IS NULL;

-- Bearer tokens for the admin API, stored as HMAC-SHA-256 under the server's pepper.
CREATE TABLE operator_tokens (
    id            TEXT COLLATE "C" PRIMARY KEY,
    name          TEXT COLLATE "C" NOT NULL UNIQUE,
    secret_hash   TEXT COLLATE "C" NOT NULL UNIQUE,
    created_at    BIGINT NOT NULL,
    last_used_at  BIGINT,
    revoked_at    BIGINT
);

-- Approvals: CIBA requests and token exchanges held for the user's decision. `ord` is the
-- order of insertion (SQLite's rowid), the tie-break of "newest first".
CREATE TABLE approvals (
    id                     TEXT COLLATE "C" PRIMARY KEY,
    ord                    BIGINT GENERATED ALWAYS AS IDENTITY,
    req_hash               TEXT COLLATE "C" NOT NULL UNIQUE,
    kind                   TEXT COLLATE "C" NOT NULL,
    client_id              TEXT COLLATE "C" NOT NULL,
    user_id                TEXT COLLATE "C" NOT NULL,
    connection             TEXT COLLATE "C",
    scopes                 TEXT COLLATE "C" NOT NULL,
    audience               TEXT COLLATE "C",
    authorization_details  TEXT COLLATE "C",
    binding_message        TEXT COLLATE "C",
    audit_context          TEXT COLLATE "C",
    login_hint             TEXT COLLATE "C",
    risk                   TEXT COLLATE "C" NOT NULL,
    step_up                BOOLEAN NOT NULL,
    single_use             BOOLEAN NOT NULL,
    request_hash           TEXT COLLATE "C" NOT NULL,
    status                 TEXT COLLATE "C" NOT NULL,
    created_at             BIGINT NOT NULL,
    expires_at             BIGINT NOT NULL,
    "interval"             BIGINT NOT NULL,
    last_polled_at         BIGINT,
    decided_by             TEXT COLLATE "C",
    decided_at             BIGINT,
    stepped_up             BOOLEAN NOT NULL DEFAULT FALSE,
    redeemed_at            BIGINT,
    reason                 TEXT COLLATE "C"
);
CREATE INDEX approvals_request ON approvals(request_hash, status);
CREATE INDEX approvals_user ON approvals(user_id, status);
CREATE INDEX approvals_client ON approvals(client_id, status);
CREATE INDEX approvals_due ON approvals(status, expires_at);
CREATE INDEX approvals_newest ON approvals(created_at, ord);

-- A revision counter for what token releases are decided on: every change to agents, their
-- keys, grants, connections, and users being added or removed moves it forward in the same
-- transaction (triggers, so a change by any node or by hand counts too). The trigger first
-- takes the configuration's advisory lock exclusively (class 1279983616, key 2; see
-- `postgres/mod.rs`): a release holds it shared from its revision check to its commit, so a
-- change waits for the releases decided on the old revision, and a release that starts after
-- a change began sees the new revision.
CREATE TABLE config_revision (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    value  BIGINT NOT NULL
);
INSERT INTO config_revision (id, value) VALUES (1, 1);

CREATE FUNCTION latchkey_config_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1279983616, 2);
    UPDATE config_revision SET value = value + 1 WHERE id = 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER agents_rev AFTER INSERT OR UPDATE OR DELETE ON agents
    FOR EACH ROW EXECUTE FUNCTION latchkey_config_changed();
CREATE TRIGGER agent_keys_rev AFTER INSERT OR UPDATE OR DELETE ON agent_keys
    FOR EACH ROW EXECUTE FUNCTION latchkey_config_changed();
CREATE TRIGGER grants_rev AFTER INSERT OR UPDATE OR DELETE ON grants
    FOR EACH ROW EXECUTE FUNCTION latchkey_config_changed();
CREATE TRIGGER connections_rev AFTER INSERT OR UPDATE OR DELETE ON connections
    FOR EACH ROW EXECUTE FUNCTION latchkey_config_changed();
-- Only a user's existence matters to a release; sign-ins (TOTP steps) and roles must not flush
-- the cache.
CREATE TRIGGER users_rev AFTER INSERT OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION latchkey_config_changed();
