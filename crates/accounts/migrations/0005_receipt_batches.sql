-- Receipt batches a node signed (see crates/link/src/receipt.rs), stored once for all their
-- receipts: a charge's `usage_records.receipt` names its batch's root and its leaf, and the
-- receipt's Merkle proof is rebuilt from the leaves here. Portable SQLite/PostgreSQL.
CREATE TABLE receipt_batches (
    root       TEXT PRIMARY KEY NOT NULL,      -- Merkle root, hex
    node       TEXT NOT NULL,                  -- the signing node's address
    signature  TEXT NOT NULL,                  -- over UsageBatch(root, count), hex
    leaves     TEXT NOT NULL,                  -- the leaves in order, 64 hex digits each
    created_at BIGINT NOT NULL
);
