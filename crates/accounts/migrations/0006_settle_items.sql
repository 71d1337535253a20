-- What settlement still has to move on-chain, netted per (user, node) as the ledger writes it:
-- one row per pair per written batch of ledger operations (a writer's transaction), not one per
-- charge, so the settler reads and marks a few rows per batch line instead of every charge
-- (see crates/accounts/src/settlement.rs). Portable SQLite/PostgreSQL.
--
-- Replaces charges.batch_id: every charge made before this table existed becomes an item of its
-- own below, with the batch it went into, if any.
CREATE TABLE settle_items (
    item       TEXT PRIMARY KEY NOT NULL,      -- the first request charged (or 'refund:<request>')
    user_id    TEXT NOT NULL,
    node       TEXT NOT NULL,
    amount     TEXT NOT NULL,                  -- Σ charged (or Σ refunded) in that write
    refund     BIGINT NOT NULL,                -- 1: the amount goes back from the node to the user
    tokens     BIGINT NOT NULL,                -- prompt + completion tokens of the charges
    requests   BIGINT NOT NULL,                -- how many charges (or refunds)
    batch_id   TEXT,                           -- the settlement batch it went into
    created_at BIGINT NOT NULL
);
CREATE INDEX settle_items_unbatched ON settle_items(created_at) WHERE batch_id IS NULL;
CREATE INDEX settle_items_user ON settle_items(user_id);

-- Earlier charges: those waiting for a batch, and those in one (a charge refunded after it was
-- batched stays settled, as it was).
INSERT INTO settle_items (item, user_id, node, amount, refund, tokens, requests, batch_id,
                          created_at)
SELECT c.request_id, c.user_id, c.node, c.amount, 0,
       COALESCE(r.prompt_tokens + r.completion_tokens, 0), 1, c.batch_id, c.created_at
FROM charges c LEFT JOIN usage_records r ON r.request_id = c.request_id
WHERE c.refunded = 0 OR c.batch_id IS NOT NULL;

-- Every charge kept this index up to date until it was batched.
DROP INDEX charges_unbatched;
ALTER TABLE charges DROP COLUMN batch_id;
