-- Pre-registered node tokens (see crates/accounts/src/node_tokens.rs). Portable SQLite/PostgreSQL.
-- A signed-in user creates a token, starts `lattice node --token …`, and the first node address
-- that registers with it is bound to the token (and so to the user, the node's operator).
CREATE TABLE node_tokens (
    id           TEXT PRIMARY KEY NOT NULL,
    user_id      TEXT NOT NULL REFERENCES users(id),
    label        TEXT,
    hash         TEXT NOT NULL UNIQUE,         -- sha256 of the token; the token itself is shown once
    prefix       TEXT NOT NULL,                -- first characters, to recognise it in a list
    node_address TEXT,                         -- lower-case 0x address, bound on first use
    created_at   BIGINT NOT NULL,
    bound_at     BIGINT,
    last_used_at BIGINT,                       -- last registration with this token
    revoked_at   BIGINT
);
CREATE INDEX node_tokens_user ON node_tokens(user_id);
-- A node address belongs to at most one live token (after a revocation it may be bound again).
CREATE UNIQUE INDEX node_tokens_live_address ON node_tokens(node_address)
    WHERE node_address IS NOT NULL AND revoked_at IS NULL;
