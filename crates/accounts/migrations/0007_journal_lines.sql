-- The journal as one relation: the rows of `journal`, and the legs of every charge that has
-- none there. The exclusive writer records a charge's legs only in its `charges` row (the user
-- pays node_part to node:NODE, pool_part to pool:NODE and treasury_part to treasury, from
-- user:ID; zero parts move nothing), where they were written a second time before; the shared
-- writer still writes a charge's legs into `journal` (from held:ID, with the leg giving the
-- rest of the hold back), so those charges appear here once, through `journal`.
-- Portable SQLite/PostgreSQL.
CREATE VIEW journal_lines AS
SELECT op, leg, debit, credit, amount, created_at FROM journal
UNION ALL
SELECT 'charge:' || c.request_id, 0, 'user:' || c.user_id, 'node:' || c.node, c.node_part, c.created_at
  FROM charges c
 WHERE c.node_part <> '0'
   AND NOT EXISTS (SELECT 1 FROM journal j WHERE j.op = 'charge:' || c.request_id)
UNION ALL
SELECT 'charge:' || c.request_id, 1, 'user:' || c.user_id, 'pool:' || c.node, c.pool_part, c.created_at
  FROM charges c
 WHERE c.pool_part <> '0'
   AND NOT EXISTS (SELECT 1 FROM journal j WHERE j.op = 'charge:' || c.request_id)
UNION ALL
SELECT 'charge:' || c.request_id, 2, 'user:' || c.user_id, 'treasury', c.treasury_part, c.created_at
  FROM charges c
 WHERE c.treasury_part <> '0'
   AND NOT EXISTS (SELECT 1 FROM journal j WHERE j.op = 'charge:' || c.request_id);
