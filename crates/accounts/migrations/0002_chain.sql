-- Settlement to the chain (see crates/accounts/src/settlement.rs). Portable SQLite/PostgreSQL.

-- Which settlement batch a charge went into; NULL until it is put into one.
ALTER TABLE charges ADD COLUMN batch_id TEXT;
CREATE INDEX charges_unbatched ON charges(created_at) WHERE batch_id IS NULL;

-- Credit issued off-chain (faucet, operator bootstrap) that must be minted into custody on-chain.
CREATE TABLE chain_grants (
    op         TEXT PRIMARY KEY NOT NULL,      -- the ledger op that issued it
    user_id    TEXT NOT NULL,
    amount     TEXT NOT NULL,
    batch_id   TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX chain_grants_unbatched ON chain_grants(created_at) WHERE batch_id IS NULL;

-- Batches sent (or to be sent) to the chain. A batch is recorded with its entries *before* it is
-- sent, so a crash at any point is recovered by asking the chain whether its id was applied.
CREATE TABLE chain_batches (
    id           TEXT PRIMARY KEY NOT NULL,    -- 0x… 32-byte id used on-chain
    kind         TEXT NOT NULL,                -- 'grant' | 'settle'
    seq          BIGINT NOT NULL,              -- creation order; batches are sent in this order
    status       TEXT NOT NULL,                -- 'prepared' | 'confirmed'
    entries      TEXT NOT NULL,                -- JSON array of entries
    total        TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    confirmed_at BIGINT,
    tx_hash      TEXT                          -- the transaction that applied it, when we saw it
);
CREATE INDEX chain_batches_status ON chain_batches(status, seq);

-- On-chain deposits credited off-chain (once per event).
CREATE TABLE chain_deposits (
    id         TEXT PRIMARY KEY NOT NULL,      -- txhash:logindex
    user_id    TEXT NOT NULL,
    amount     TEXT NOT NULL,
    block      BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Scan positions (e.g. the deposit watcher's last block) and last posted status epoch.
CREATE TABLE chain_cursors (
    name  TEXT PRIMARY KEY NOT NULL,
    value BIGINT NOT NULL
);
