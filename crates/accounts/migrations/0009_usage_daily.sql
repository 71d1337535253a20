-- Usage totals per (user, day, model, node, key), kept as charges are written: the usage and
-- earnings reads sum a few rows per day instead of every charge of the range, and a charge no
-- longer adds two index entries (`charges_user_day`, `charges_node_day`). Only charges with a
-- usage record count, as before. Money is exact: an amount can exceed 64 bits, so a total is
-- amount_hi * 10^18 + amount_lo with 0 <= amount_lo < 10^18. Portable SQLite / PostgreSQL.
CREATE TABLE usage_daily (
    user_id           TEXT NOT NULL,
    day               TEXT NOT NULL,         -- YYYY-MM-DD (UTC), as charges.day
    model             TEXT NOT NULL,
    node              TEXT NOT NULL,
    key_id            TEXT NOT NULL,         -- '' for requests made in a signed-in session
    requests          BIGINT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    amount_hi         BIGINT NOT NULL,
    amount_lo         BIGINT NOT NULL,
    PRIMARY KEY (user_id, day, model, node, key_id)
);
CREATE INDEX usage_daily_node ON usage_daily(node, day);

-- The charges so far. Each amount (decimal text) is split into its digits above the last 18
-- (`hi`) and the last 18 (`low`); `low` is summed in two 9-digit halves so no sum can overflow.
INSERT INTO usage_daily (user_id, day, model, node, key_id, requests, prompt_tokens,
                         completion_tokens, amount_hi, amount_lo)
SELECT user_id, day, model, node, key_id, requests, prompt_tokens, completion_tokens,
       hi + (mid + lo / 1000000000) / 1000000000,
       ((mid + lo / 1000000000) % 1000000000) * 1000000000 + lo % 1000000000
  FROM (SELECT user_id, day, model, node, key_id,
               COUNT(*) AS requests,
               CAST(SUM(prompt_tokens) AS BIGINT) AS prompt_tokens,
               CAST(SUM(completion_tokens) AS BIGINT) AS completion_tokens,
               CAST(SUM(hi) AS BIGINT) AS hi,
               CAST(SUM(low / 1000000000) AS BIGINT) AS mid,
               CAST(SUM(low % 1000000000) AS BIGINT) AS lo
          FROM (SELECT user_id, day, model, node, COALESCE(key_id, '') AS key_id,
                       COALESCE(prompt_tokens, 0) AS prompt_tokens,
                       COALESCE(completion_tokens, 0) AS completion_tokens,
                       CASE WHEN length(amount) > 18
                            THEN CAST(substr(amount, 1, length(amount) - 18) AS BIGINT)
                            ELSE 0 END AS hi,
                       CAST(CASE WHEN length(amount) > 18
                                 THEN substr(amount, length(amount) - 17)
                                 ELSE amount END AS BIGINT) AS low
                  FROM charges
                 WHERE model IS NOT NULL AND day IS NOT NULL) AS c
         GROUP BY user_id, day, model, node, key_id) AS g;

DROP INDEX charges_user_day;
DROP INDEX charges_node_day;
