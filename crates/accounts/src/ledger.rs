//! The ledger on disk. One writer task per Nexus applies operations in batches (group commit):
//! it loads the rows a batch touches (row-locked on PostgreSQL, so several Nexus replicas can
//! share the database), applies the operations with the pure [`lattice_ledger::Ledger`], writes
//! back what changed plus the journal, and commits once. An operation either lands with its
//! batch or not at all; a replayed operation is a no-op.

use std::collections::BTreeSet;
use std::time::Duration;

use lattice_ledger::{Account, Applied, Charge, Hold, KeyUsage, Ledger, LedgerError, Money, Op};
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use tokio::sync::{mpsc, oneshot};

use crate::StoreError;
use crate::db::{Backend, Db, day_of, now};

/// Bounds of the writer; every one is explicit.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// Which Nexus replica places holds (crash recovery releases its own stale holds).
    pub owner: String,
    /// A hold not charged or released within this time is released by the sweeper.
    pub hold_ttl: Duration,
    /// Operations committed in one transaction at most.
    pub max_batch: usize,
    /// Operations waiting for the writer at most; beyond, posting waits (back-pressure).
    pub queue: usize,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            owner: "nexus".into(),
            hold_ttl: Duration::from_secs(15 * 60),
            max_batch: 1024,
            queue: 16 * 1024,
        }
    }
}

/// What a charged request consumed, stored with its charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageRecord {
    pub request_id: String,
    pub user_id: String,
    pub key_id: Option<String>,
    pub node: String,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: Money,
    /// The node's signed receipt (JSON).
    pub receipt: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("ledger storage failed: {0}")]
    Store(String),
    #[error("the ledger writer has stopped")]
    Closed,
}

struct Job {
    op: Op,
    usage: Option<UsageRecord>,
    reply: oneshot::Sender<Result<Applied, PostError>>,
}

/// Handle to the ledger; cheap to clone.
#[derive(Clone)]
pub struct LedgerStore {
    tx: mpsc::Sender<Job>,
    db: Db,
    config: LedgerConfig,
}

impl LedgerStore {
    /// Starts the writer task (it ends when every handle is dropped).
    pub fn start(db: Db, config: LedgerConfig) -> Self {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        tokio::spawn(writer(db.clone(), config.clone(), rx));
        Self { tx, db, config }
    }

    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    pub async fn post(&self, op: Op) -> Result<Applied, PostError> {
        self.submit(op, None).await
    }

    /// Posts a charge together with the usage record it is based on.
    pub async fn charge(&self, op: Op, usage: UsageRecord) -> Result<Applied, PostError> {
        self.submit(op, Some(usage)).await
    }

    async fn submit(&self, op: Op, usage: Option<UsageRecord>) -> Result<Applied, PostError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { op, usage, reply })
            .await
            .map_err(|_| PostError::Closed)?;
        rx.await.map_err(|_| PostError::Closed)?
    }

    /// Queues an operation without waiting for it (used from `Drop`); returns false when the
    /// queue is full or closed, in which case the hold sweeper recovers it later.
    pub fn post_detached(&self, op: Op) -> bool {
        let (reply, _rx) = oneshot::channel();
        self.tx
            .try_send(Job {
                op,
                usage: None,
                reply,
            })
            .is_ok()
    }

    pub async fn balance(&self, account: &Account) -> Result<Money, StoreError> {
        let row = sqlx::query("SELECT amount FROM balances WHERE account = $1")
            .bind(account.key())
            .fetch_optional(&self.db.pool)
            .await?;
        match row {
            Some(r) => parse_money(&r.try_get::<String, _>("amount")?),
            None => Ok(Money::ZERO),
        }
    }

    /// Releases holds that outlived their time-to-live, and (`own_too`) every hold this replica
    /// placed before it restarted. Returns how many were released.
    pub async fn sweep_holds(&self, own_too: bool) -> Result<usize, StoreError> {
        let rows = if own_too {
            sqlx::query(
                "SELECT request_id FROM holds WHERE expires_at < $1 OR owner = $2 LIMIT 10000",
            )
            .bind(now())
            .bind(&self.config.owner)
            .fetch_all(&self.db.pool)
            .await?
        } else {
            sqlx::query("SELECT request_id FROM holds WHERE expires_at < $1 LIMIT 10000")
                .bind(now())
                .fetch_all(&self.db.pool)
                .await?
        };
        let mut released = 0;
        for r in rows {
            let request: String = r.try_get("request_id")?;
            if let Ok(Applied::Posted(_)) = self.post(Op::Release { request }).await {
                released += 1;
            }
        }
        Ok(released)
    }

    /// Reads the whole ledger back and checks its invariants (tests, `lattice` reconciliation).
    pub async fn audit(&self) -> Result<Audit, StoreError> {
        let mut a = Audit::default();
        for r in sqlx::query("SELECT account, amount FROM balances")
            .fetch_all(&self.db.pool)
            .await?
        {
            let account: String = r.try_get("account")?;
            let amount = parse_money(&r.try_get::<String, _>("amount")?)?;
            a.internal = add(a.internal, amount)?;
            if account.starts_with("held:") {
                a.held = add(a.held, amount)?;
            }
        }
        for r in sqlx::query("SELECT issued, redeemed FROM external_totals")
            .fetch_all(&self.db.pool)
            .await?
        {
            a.issued = add(a.issued, parse_money(&r.try_get::<String, _>("issued")?)?)?;
            a.redeemed = add(
                a.redeemed,
                parse_money(&r.try_get::<String, _>("redeemed")?)?,
            )?;
        }
        for r in sqlx::query("SELECT amount FROM holds")
            .fetch_all(&self.db.pool)
            .await?
        {
            a.open_holds = add(
                a.open_holds,
                parse_money(&r.try_get::<String, _>("amount")?)?,
            )?;
            a.hold_count += 1;
        }
        // Every journal line moves money between two accounts; per op its legs are unique.
        let r = sqlx::query("SELECT COUNT(*) AS n FROM journal")
            .fetch_one(&self.db.pool)
            .await?;
        a.journal_lines = r.try_get::<i64, _>("n")?;
        Ok(a)
    }
}

/// Totals read back from the database.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Audit {
    pub internal: Money,
    pub held: Money,
    pub issued: Money,
    pub redeemed: Money,
    pub open_holds: Money,
    pub hold_count: u64,
    pub journal_lines: i64,
}

impl Audit {
    /// Σ internal balances = issued − redeemed, and held balances = open holds.
    pub fn balanced(&self) -> bool {
        self.issued.checked_sub(self.redeemed) == Some(self.internal)
            && self.held == self.open_holds
    }
}

fn add(a: Money, b: Money) -> Result<Money, StoreError> {
    a.checked_add(b)
        .ok_or_else(|| StoreError::Corrupt("money overflow".into()))
}

pub(crate) fn parse_money(s: &str) -> Result<Money, StoreError> {
    s.parse()
        .map_err(|e: lattice_ledger::ParseMoneyError| StoreError::Corrupt(e.to_string()))
}

async fn writer(db: Db, config: LedgerConfig, mut rx: mpsc::Receiver<Job>) {
    let max = config.max_batch.max(1);
    let mut jobs = Vec::with_capacity(max);
    while rx.recv_many(&mut jobs, max).await > 0 {
        let ops: Vec<(&Op, Option<&UsageRecord>)> =
            jobs.iter().map(|j| (&j.op, j.usage.as_ref())).collect();
        let mut outcome = apply_batch(&db, &config, &ops).await;
        // A busy database (another process holds the write lock) is worth one more try.
        if outcome.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            outcome = apply_batch(&db, &config, &ops).await;
        }
        match outcome {
            Ok(results) => {
                for (job, r) in jobs.drain(..).zip(results) {
                    let _ = job.reply.send(r.map_err(PostError::from));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, ops = jobs.len(), "ledger batch failed; nothing applied");
                let msg = e.to_string();
                for job in jobs.drain(..) {
                    let _ = job.reply.send(Err(PostError::Store(msg.clone())));
                }
            }
        }
    }
}

/// Applies a batch in one transaction; per-operation outcomes, or an error if nothing landed.
pub(crate) async fn apply_batch(
    db: &Db,
    config: &LedgerConfig,
    ops: &[(&Op, Option<&UsageRecord>)],
) -> Result<Vec<Result<Applied, LedgerError>>, StoreError> {
    let mut tx = db.begin_write().await?;
    let lock = db.for_update();
    let mut ledger = Ledger::default();

    // Phase 1: holds and charges of the requests in the batch.
    let requests: BTreeSet<String> = ops
        .iter()
        .filter_map(|(op, _)| op.request().map(str::to_owned))
        .collect();
    for r in select_in(
        &mut tx,
        db.backend,
        "SELECT request_id, user_id, key_id, amount FROM holds WHERE request_id IN",
        &requests,
        lock,
    )
    .await?
    {
        ledger.holds.insert(
            r.try_get("request_id")?,
            Hold {
                user: r.try_get("user_id")?,
                key: r.try_get("key_id")?,
                amount: parse_money(&r.try_get::<String, _>("amount")?)?,
            },
        );
    }
    for r in select_in(&mut tx, db.backend,
        "SELECT request_id, user_id, key_id, node, amount, node_part, pool_part, treasury_part, refunded FROM charges WHERE request_id IN",
        &requests,
        lock,
    )
    .await?
    {
        ledger.charges.insert(
            r.try_get("request_id")?,
            Charge {
                user: r.try_get("user_id")?,
                key: r.try_get("key_id")?,
                node: r.try_get("node")?,
                amount: parse_money(&r.try_get::<String, _>("amount")?)?,
                node_part: parse_money(&r.try_get::<String, _>("node_part")?)?,
                pool_part: parse_money(&r.try_get::<String, _>("pool_part")?)?,
                treasury_part: parse_money(&r.try_get::<String, _>("treasury_part")?)?,
                refunded: r.try_get::<i64, _>("refunded")? != 0,
            },
        );
    }

    // Phase 2: every account, key and one-off id the batch can touch.
    let mut accounts: BTreeSet<String> = BTreeSet::new();
    let mut keys: BTreeSet<String> = BTreeSet::new();
    let mut once: BTreeSet<String> = BTreeSet::new();
    let user_accounts = |u: &str, acc: &mut BTreeSet<String>| {
        acc.insert(Account::User(u.to_owned()).key());
        acc.insert(Account::Held(u.to_owned()).key());
    };
    for (op, _) in ops {
        match op {
            Op::Deposit { op, user, .. }
            | Op::Faucet { op, user, .. }
            | Op::Withdraw { op, user, .. } => {
                user_accounts(user, &mut accounts);
                once.insert(op.clone());
            }
            Op::Hold { user, key, .. } => {
                user_accounts(user, &mut accounts);
                if let Some((k, _)) = key {
                    keys.insert(k.clone());
                }
            }
            Op::Charge { user, node, .. } => {
                user_accounts(user, &mut accounts);
                accounts.insert(Account::Node(node.clone()).key());
                accounts.insert(Account::Pool(node.clone()).key());
                accounts.insert(Account::Treasury.key());
            }
            Op::Release { .. } => {}
            Op::Refund { request } => {
                once.insert(format!("refund:{request}"));
            }
        }
    }
    for h in ledger.holds.values() {
        user_accounts(&h.user, &mut accounts);
        keys.extend(h.key.clone());
    }
    for c in ledger.charges.values() {
        user_accounts(&c.user, &mut accounts);
        accounts.insert(Account::Node(c.node.clone()).key());
        accounts.insert(Account::Pool(c.node.clone()).key());
        accounts.insert(Account::Treasury.key());
        keys.extend(c.key.clone());
    }
    if db.backend == Backend::Postgres {
        // Rows must exist to be locked; create missing ones at zero first.
        insert_missing(
            &mut tx,
            "INSERT INTO balances (account, amount) VALUES",
            "('0')",
            &accounts,
            "account",
        )
        .await?;
        insert_missing(
            &mut tx,
            "INSERT INTO key_usage (key_id, spent, held) VALUES",
            "('0', '0')",
            &keys,
            "key_id",
        )
        .await?;
    }
    for r in select_in(
        &mut tx,
        db.backend,
        "SELECT account, amount FROM balances WHERE account IN",
        &accounts,
        lock,
    )
    .await?
    {
        let key: String = r.try_get("account")?;
        let account = Account::from_key(&key)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown account {key}")))?;
        ledger
            .balances
            .insert(account, parse_money(&r.try_get::<String, _>("amount")?)?);
    }
    for r in select_in(
        &mut tx,
        db.backend,
        "SELECT key_id, spent, held FROM key_usage WHERE key_id IN",
        &keys,
        lock,
    )
    .await?
    {
        ledger.keys.insert(
            r.try_get("key_id")?,
            KeyUsage {
                spent: parse_money(&r.try_get::<String, _>("spent")?)?,
                held: parse_money(&r.try_get::<String, _>("held")?)?,
            },
        );
    }
    for r in select_in(
        &mut tx,
        db.backend,
        "SELECT op FROM applied_ops WHERE op IN",
        &once,
        "",
    )
    .await?
    {
        ledger.applied.insert(r.try_get("op")?);
    }
    let externals: BTreeSet<String> = ["faucet".to_owned(), "chain".to_owned()].into();
    for r in select_in(
        &mut tx,
        db.backend,
        "SELECT account, issued, redeemed FROM external_totals WHERE account IN",
        &externals,
        lock,
    )
    .await?
    {
        let key: String = r.try_get("account")?;
        if let Some(a) = Account::from_key(&key) {
            ledger
                .issued
                .insert(a.clone(), parse_money(&r.try_get::<String, _>("issued")?)?);
            ledger
                .redeemed
                .insert(a, parse_money(&r.try_get::<String, _>("redeemed")?)?);
        }
    }

    // Apply.
    let t = now();
    let expires = t.saturating_add(i64::try_from(config.hold_ttl.as_secs()).unwrap_or(i64::MAX));
    let mut results = Vec::with_capacity(ops.len());
    let mut postings = Vec::new();
    let mut usages = Vec::new();
    let mut grants = Vec::new();
    for (op, usage) in ops {
        let r = ledger.apply(op);
        if let Ok(Applied::Posted(p)) = &r {
            postings.extend(p.iter().cloned().enumerate());
            match (op, usage) {
                (Op::Charge { .. }, Some(u)) => usages.push(*u),
                // Credit created off-chain must be minted into custody on-chain (settlement).
                (Op::Faucet { op, user, amount }, _) => {
                    grants.push(vec![
                        V::T(op.clone()),
                        V::T(user.clone()),
                        V::T(amount.to_string()),
                        V::I(t),
                    ]);
                }
                _ => {}
            }
        }
        results.push(r);
    }
    let changes = ledger.take_changes();

    // Write back: a few multi-row statements per batch, not one per row.
    let rows: Vec<Vec<V>> = changes
        .balances
        .iter()
        .map(|a| vec![V::T(a.key()), V::T(ledger.balance(a).to_string())])
        .collect();
    insert_rows(
        &mut tx,
        db.backend,
        "INSERT INTO balances (account, amount) VALUES",
        rows,
        "ON CONFLICT (account) DO UPDATE SET amount = excluded.amount",
    )
    .await?;
    let removed: BTreeSet<String> = changes.holds_removed.iter().cloned().collect();
    let removed: Vec<&String> = removed.iter().collect();
    for chunk in removed.chunks(500) {
        let sql = format!(
            "DELETE FROM holds WHERE request_id IN ({})",
            db.backend.placeholders(1, chunk.len())
        );
        let mut q = sqlx::query(&sql);
        for r in chunk {
            q = q.bind(*r);
        }
        q.execute(&mut *tx).await?;
    }
    let rows: Vec<Vec<V>> = changes
        .holds_added
        .iter()
        .filter_map(|r| {
            ledger.holds.get(r).map(|h| {
                vec![
                    V::T(r.clone()),
                    V::T(h.user.clone()),
                    V::O(h.key.clone()),
                    V::T(h.amount.to_string()),
                    V::T(config.owner.clone()),
                    V::I(expires),
                ]
            })
        })
        .collect();
    insert_rows(&mut tx, db.backend,
        "INSERT INTO holds (request_id, user_id, key_id, amount, owner, expires_at) VALUES",
        rows,
        "ON CONFLICT (request_id) DO UPDATE SET user_id = excluded.user_id, key_id = excluded.key_id,
         amount = excluded.amount, owner = excluded.owner, expires_at = excluded.expires_at",
    )
    .await?;
    let rows: Vec<Vec<V>> = changes
        .charges
        .iter()
        .filter_map(|r| {
            ledger.charges.get(r).map(|c| {
                vec![
                    V::T(r.clone()),
                    V::T(c.user.clone()),
                    V::O(c.key.clone()),
                    V::T(c.node.clone()),
                    V::T(c.amount.to_string()),
                    V::T(c.node_part.to_string()),
                    V::T(c.pool_part.to_string()),
                    V::T(c.treasury_part.to_string()),
                    V::I(i64::from(c.refunded)),
                    V::I(t),
                ]
            })
        })
        .collect();
    insert_rows(&mut tx, db.backend,
        "INSERT INTO charges (request_id, user_id, key_id, node, amount, node_part, pool_part, treasury_part, refunded, created_at) VALUES",
        rows,
        "ON CONFLICT (request_id) DO UPDATE SET refunded = excluded.refunded",
    )
    .await?;
    let rows: Vec<Vec<V>> = changes
        .keys
        .iter()
        .filter_map(|k| {
            ledger.keys.get(k).map(|u| {
                vec![
                    V::T(k.clone()),
                    V::T(u.spent.to_string()),
                    V::T(u.held.to_string()),
                ]
            })
        })
        .collect();
    insert_rows(
        &mut tx,
        db.backend,
        "INSERT INTO key_usage (key_id, spent, held) VALUES",
        rows,
        "ON CONFLICT (key_id) DO UPDATE SET spent = excluded.spent, held = excluded.held",
    )
    .await?;
    let rows: Vec<Vec<V>> = changes
        .applied
        .iter()
        .map(|op| vec![V::T(op.clone()), V::I(t)])
        .collect();
    insert_rows(
        &mut tx,
        db.backend,
        "INSERT INTO applied_ops (op, created_at) VALUES",
        rows,
        "",
    )
    .await?;
    let rows: Vec<Vec<V>> = [Account::Faucet, Account::Chain]
        .into_iter()
        .filter_map(|a| {
            let issued = ledger.issued.get(&a).copied().unwrap_or_default();
            let redeemed = ledger.redeemed.get(&a).copied().unwrap_or_default();
            (!issued.is_zero() || !redeemed.is_zero()).then(|| {
                vec![
                    V::T(a.key()),
                    V::T(issued.to_string()),
                    V::T(redeemed.to_string()),
                ]
            })
        })
        .collect();
    insert_rows(&mut tx, db.backend,
        "INSERT INTO external_totals (account, issued, redeemed) VALUES",
        rows,
        "ON CONFLICT (account) DO UPDATE SET issued = excluded.issued, redeemed = excluded.redeemed",
    )
    .await?;
    let rows: Vec<Vec<V>> = postings
        .iter()
        .map(|(leg, p)| {
            vec![
                V::T(p.op.clone()),
                V::I(i64::try_from(*leg).unwrap_or(i64::MAX)),
                V::T(p.debit.key()),
                V::T(p.credit.key()),
                V::T(p.amount.to_string()),
                V::I(t),
            ]
        })
        .collect();
    insert_rows(
        &mut tx,
        db.backend,
        "INSERT INTO journal (op, leg, debit, credit, amount, created_at) VALUES",
        rows,
        "",
    )
    .await?;
    insert_rows(
        &mut tx,
        db.backend,
        "INSERT INTO chain_grants (op, user_id, amount, created_at) VALUES",
        grants,
        "",
    )
    .await?;
    let day = day_of(t);
    let rows: Vec<Vec<V>> = usages
        .iter()
        .map(|u| {
            vec![
                V::T(u.request_id.clone()),
                V::T(u.user_id.clone()),
                V::O(u.key_id.clone()),
                V::T(u.node.clone()),
                V::T(u.model.clone()),
                V::I(i64::try_from(u.prompt_tokens).unwrap_or(i64::MAX)),
                V::I(i64::try_from(u.completion_tokens).unwrap_or(i64::MAX)),
                V::T(u.cost.to_string()),
                V::T(day.clone()),
                V::T(u.receipt.clone()),
                V::I(t),
            ]
        })
        .collect();
    insert_rows(&mut tx, db.backend,
        "INSERT INTO usage_records (request_id, user_id, key_id, node, model, prompt_tokens, completion_tokens, cost, day, receipt, created_at) VALUES",
        rows,
        "",
    )
    .await?;
    tx.commit().await?;
    Ok(results)
}

/// A bound value of a multi-row insert.
enum V {
    T(String),
    O(Option<String>),
    I(i64),
}

/// `HEAD (…), (…), … TAIL` in chunks of at most ~1,000 parameters (every SQLite and PostgreSQL
/// accepts that many).
async fn insert_rows(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    head: &str,
    rows: Vec<Vec<V>>,
    tail: &str,
) -> Result<(), StoreError> {
    let Some(cols) = rows.first().map(Vec::len) else {
        return Ok(());
    };
    let per = (1000 / cols.max(1)).max(1);
    for chunk in rows.chunks(per) {
        let mut sql = String::with_capacity(head.len() + chunk.len() * cols * 5 + tail.len());
        sql.push_str(head);
        for (i, _) in chunk.iter().enumerate() {
            sql.push_str(if i == 0 { " (" } else { ", (" });
            sql.push_str(&backend.placeholders(i * cols + 1, cols));
            sql.push(')');
        }
        sql.push(' ');
        sql.push_str(tail);
        let mut q = sqlx::query(&sql);
        for row in chunk {
            for v in row {
                q = match v {
                    V::T(s) => q.bind(s.as_str()),
                    V::O(s) => q.bind(s.as_deref()),
                    V::I(i) => q.bind(*i),
                };
            }
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

/// `SELECT … WHERE col IN (…)` over a set, in chunks within every backend's parameter limit.
async fn select_in(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    prefix: &str,
    values: &BTreeSet<String>,
    suffix: &str,
) -> Result<Vec<AnyRow>, StoreError> {
    let mut out = Vec::new();
    let values: Vec<&String> = values.iter().collect();
    for chunk in values.chunks(500) {
        let sql = format!(
            "{prefix} ({}){suffix}",
            backend.placeholders(1, chunk.len())
        );
        let mut q = sqlx::query(&sql);
        for v in chunk {
            q = q.bind(*v);
        }
        out.extend(q.fetch_all(&mut **tx).await?);
    }
    Ok(out)
}

/// Inserts `(value, defaults…)` rows that don't exist yet (PostgreSQL, before locking them).
async fn insert_missing(
    tx: &mut Transaction<'static, Any>,
    prefix: &str,
    defaults: &str,
    values: &BTreeSet<String>,
    col: &str,
) -> Result<(), StoreError> {
    // `defaults` is like "('0')"; each row becomes ($n, '0').
    let rest = defaults.trim_start_matches('(');
    let values: Vec<&String> = values.iter().collect();
    for chunk in values.chunks(500) {
        let rows: Vec<String> = (1..=chunk.len())
            .map(|i| format!("(${i}, {rest}"))
            .collect();
        let sql = format!(
            "{prefix} {} ON CONFLICT ({col}) DO NOTHING",
            rows.join(", ")
        );
        let mut q = sqlx::query(&sql);
        for v in chunk {
            q = q.bind(*v);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}
