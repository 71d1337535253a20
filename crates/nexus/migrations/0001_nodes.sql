-- Nodes Nexus has seen, keyed by their EVM address; survives restarts so reputation is kept.
CREATE TABLE IF NOT EXISTS nodes (
    address     TEXT PRIMARY KEY NOT NULL,
    label       TEXT,
    kind        TEXT NOT NULL,
    models      TEXT NOT NULL,           -- JSON array of {id, context_length, quantization}
    price_in    INTEGER NOT NULL,        -- smallest LAI units per 1M input tokens
    price_out   INTEGER NOT NULL,
    reputation  REAL NOT NULL DEFAULT 0.5,
    first_seen  INTEGER NOT NULL,        -- unix seconds
    last_seen   INTEGER NOT NULL
);
