-- A charge and its usage record are one row: the usage record repeated the charge's request id,
-- user, key, node, cost and time, and cost a second row and primary key per charged request.
-- The usage columns are NULL for a charge posted without a usage record (they are counted in
-- no usage figures, as before). Portable SQLite (>= 3.33, UPDATE … FROM) / PostgreSQL.
ALTER TABLE charges ADD COLUMN model TEXT;
ALTER TABLE charges ADD COLUMN prompt_tokens BIGINT;
ALTER TABLE charges ADD COLUMN completion_tokens BIGINT;
ALTER TABLE charges ADD COLUMN day TEXT;               -- YYYY-MM-DD (UTC) the charge was made
ALTER TABLE charges ADD COLUMN receipt TEXT;           -- JSON of the node's signed receipt

UPDATE charges
   SET model = r.model,
       prompt_tokens = r.prompt_tokens,
       completion_tokens = r.completion_tokens,
       day = r.day,
       receipt = r.receipt
  FROM usage_records r
 WHERE r.request_id = charges.request_id;

DROP TABLE usage_records;
CREATE INDEX charges_user_day ON charges(user_id, day);
CREATE INDEX charges_node_day ON charges(node, day);
