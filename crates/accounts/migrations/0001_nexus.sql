-- Nexus's database. Portable between SQLite and PostgreSQL: the same file runs on both.
-- Money columns are TEXT holding a decimal count of the smallest LAI unit (values exceed
-- 64 bits); arithmetic on them happens in Rust, inside the transaction that locks the rows.

-- Nodes Nexus has seen, keyed by their EVM address; survives restarts so reputation is kept.
CREATE TABLE nodes (
    address     TEXT PRIMARY KEY NOT NULL,
    label       TEXT,
    kind        TEXT NOT NULL,
    models      TEXT NOT NULL,                 -- JSON array of {id, context_length, quantization}
    price_in    TEXT NOT NULL,                 -- units per 1M input tokens
    price_out   TEXT NOT NULL,
    reputation  DOUBLE PRECISION NOT NULL DEFAULT 0.5,
    first_seen  BIGINT NOT NULL,               -- unix seconds
    last_seen   BIGINT NOT NULL
);

CREATE TABLE users (
    id            TEXT PRIMARY KEY NOT NULL,
    address       TEXT NOT NULL UNIQUE,        -- on-chain address (custodial or the user's wallet)
    custodial_key TEXT,                        -- hex secp256k1 key when Nexus generated the address
    keep_history  BIGINT NOT NULL DEFAULT 0,
    created_at    BIGINT NOT NULL
);

-- Ways to sign in: ('siwe', address), ('passkey', credential id), ('oidc:ISSUER', sub).
CREATE TABLE identities (
    kind       TEXT NOT NULL,
    subject    TEXT NOT NULL,
    user_id    TEXT NOT NULL REFERENCES users(id),
    detail     TEXT,                           -- e.g. the stored passkey or the email claim
    created_at BIGINT NOT NULL,
    PRIMARY KEY (kind, subject)
);
CREATE INDEX identities_user ON identities(user_id);

CREATE TABLE sessions (
    token_hash TEXT PRIMARY KEY NOT NULL,      -- sha256 of the cookie value
    user_id    TEXT NOT NULL REFERENCES users(id),
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY NOT NULL,
    user_id      TEXT NOT NULL REFERENCES users(id),
    name         TEXT NOT NULL,
    hash         TEXT NOT NULL UNIQUE,         -- sha256 of the key; the key itself is shown once
    prefix       TEXT NOT NULL,                -- first characters, to recognise it in a list
    spend_limit  TEXT,                         -- units, NULL = unlimited
    rpm_limit    BIGINT,                       -- requests per minute, NULL = unlimited
    created_at   BIGINT NOT NULL,
    revoked_at   BIGINT
);
CREATE INDEX api_keys_user ON api_keys(user_id);

-- Single-use challenges (SIWE nonces, passkey and OIDC flow state), with an expiry.
CREATE TABLE challenges (
    id         TEXT PRIMARY KEY NOT NULL,
    purpose    TEXT NOT NULL,
    data       TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);

CREATE TABLE faucet_grants (
    identity   TEXT PRIMARY KEY NOT NULL,      -- kind:subject, once per identity
    user_id    TEXT NOT NULL,
    client     TEXT NOT NULL,                  -- client address, for the rate limit
    amount     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX faucet_grants_time ON faucet_grants(created_at);

-- The ledger (see crates/ledger): balances of internal accounts, open holds, settled charges,
-- per-key spending, applied one-off operations, totals of external accounts, and the journal.
CREATE TABLE balances (
    account TEXT PRIMARY KEY NOT NULL,
    amount  TEXT NOT NULL
);

CREATE TABLE holds (
    request_id TEXT PRIMARY KEY NOT NULL,
    user_id    TEXT NOT NULL,
    key_id     TEXT,
    amount     TEXT NOT NULL,
    owner      TEXT NOT NULL,                  -- the Nexus replica that placed it
    expires_at BIGINT NOT NULL
);
CREATE INDEX holds_expiry ON holds(expires_at);

CREATE TABLE charges (
    request_id    TEXT PRIMARY KEY NOT NULL,
    user_id       TEXT NOT NULL,
    key_id        TEXT,
    node          TEXT NOT NULL,
    amount        TEXT NOT NULL,
    node_part     TEXT NOT NULL,
    pool_part     TEXT NOT NULL,
    treasury_part TEXT NOT NULL,
    refunded      BIGINT NOT NULL DEFAULT 0,
    created_at    BIGINT NOT NULL
);

CREATE TABLE key_usage (
    key_id TEXT PRIMARY KEY NOT NULL,
    spent  TEXT NOT NULL,
    held   TEXT NOT NULL
);

CREATE TABLE applied_ops (
    op         TEXT PRIMARY KEY NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE external_totals (
    account  TEXT PRIMARY KEY NOT NULL,
    issued   TEXT NOT NULL,
    redeemed TEXT NOT NULL
);

CREATE TABLE journal (
    op         TEXT NOT NULL,
    leg        BIGINT NOT NULL,
    debit      TEXT NOT NULL,
    credit     TEXT NOT NULL,
    amount     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (op, leg)
);

-- One row per charged request, with the node's signed receipt (EIP-712) it was charged on.
CREATE TABLE usage_records (
    request_id        TEXT PRIMARY KEY NOT NULL,
    user_id           TEXT NOT NULL,
    key_id            TEXT,
    node              TEXT NOT NULL,
    model             TEXT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cost              TEXT NOT NULL,
    day               TEXT NOT NULL,           -- YYYY-MM-DD (UTC)
    receipt           TEXT NOT NULL,           -- JSON of the signed receipt
    created_at        BIGINT NOT NULL
);
CREATE INDEX usage_user_day ON usage_records(user_id, day);
CREATE INDEX usage_node_day ON usage_records(node, day);

-- Chat history, kept only for users who opted in; deleting a conversation deletes its rows.
CREATE TABLE conversations (
    id         TEXT PRIMARY KEY NOT NULL,
    user_id    TEXT NOT NULL REFERENCES users(id),
    title      TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX conversations_user ON conversations(user_id, updated_at);

CREATE TABLE messages (
    conversation_id TEXT NOT NULL REFERENCES conversations(id),
    seq             BIGINT NOT NULL,
    role            TEXT NOT NULL,
    content         TEXT NOT NULL,
    request_id      TEXT,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);
