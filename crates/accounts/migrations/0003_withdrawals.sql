-- Withdrawals from off-chain credit to an on-chain address (see crates/accounts/src/withdrawals.rs).
-- Portable SQLite/PostgreSQL.
--
-- A row is written *before* its ledger op is posted ('requested'), marked 'debited' once the op
-- is durably applied (it is then in applied_ops) or 'rejected' when the ledger refused it. The
-- settler puts only rows whose op is in applied_ops into withdrawal batches (chain_batches, kind
-- 'withdraw'); a batch's status says whether the withdrawal is sent or confirmed on-chain.
CREATE TABLE withdrawals (
    op          TEXT PRIMARY KEY NOT NULL,     -- the ledger op 'withdraw:<uuid>', also the API id
    seq         BIGINT NOT NULL,               -- creation order (listings, batches)
    user_id     TEXT NOT NULL,
    destination TEXT NOT NULL,                 -- 0x… lower-case address the LAI is sent to
    amount      TEXT NOT NULL,
    status      TEXT NOT NULL,                 -- 'requested' | 'debited' | 'rejected'
    reason      TEXT,                          -- why it was rejected
    batch_id    TEXT,                          -- the withdrawal batch it went into
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE INDEX withdrawals_user ON withdrawals(user_id, seq);
CREATE INDEX withdrawals_unbatched ON withdrawals(seq) WHERE batch_id IS NULL;
CREATE INDEX withdrawals_status ON withdrawals(status, seq);
