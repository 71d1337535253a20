//! The ledger on disk, behind one of two writers (both apply operations with the pure
//! [`lattice_ledger::Ledger`] rules and write each batch with a few multi-row statements in one
//! transaction; a replayed operation is a no-op):
//!
//! - **Exclusive** (the default; one Nexus owns the database): the ledger's hot rows live in
//!   memory, loaded on first touch. An operation is applied there at once — a hold or a charge
//!   costs microseconds and no database round trip — and a background task writes every change
//!   behind it, one consistent cut per transaction (group commit). [`LedgerStore::post`] waits
//!   until its operation is durable; [`LedgerStore::apply`] and [`LedgerStore::charge`] (the
//!   request path) do not. Its holds live in memory only: the database records settled state,
//!   as if every open hold were released (a user's row is their available plus held credit, a
//!   charge's journal legs pay from it directly), so a request writes one row (its charge
//!   with its usage record) and no hold or journal rows. What a crash can lose is the cut not
//!   yet committed — the charges of requests that ended in the last few milliseconds — and
//!   open holds, which it gives back.
//! - **Shared** (several Nexus replicas on one PostgreSQL database): every batch loads the rows it
//!   touches row-locked, applies, writes back and commits before anyone hears the outcome.

mod hot;
mod native;
mod shared;
mod sql;

pub(crate) use sql::AMOUNT_SPLIT;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use lattice_ledger::{Account, Applied, Ledger, LedgerError, Money, Op, Posting};
use serde::Serialize;
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

use crate::StoreError;
use crate::db::{Db, now};
use sql::WriteSet;

/// Which writer owns the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LedgerMode {
    /// One Nexus owns the database: state in memory, written behind (see the module docs).
    #[default]
    Exclusive,
    /// Several replicas share a PostgreSQL database: row locks, commit before replying.
    Shared,
}

/// Bounds of the writer; every one is explicit.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    pub mode: LedgerMode,
    /// Which Nexus replica places holds (on restart, a shared writer releases its own).
    pub owner: String,
    /// A hold not charged or released within this time is released by the sweeper.
    pub hold_ttl: Duration,
    /// Operations committed in one transaction at most (shared writer).
    pub max_batch: usize,
    /// Operations applied but not yet durable at most; beyond, new holds are refused (exclusive)
    /// or posting waits (shared).
    pub queue: usize,
    /// Charges kept in memory for replay detection and refunds (exclusive); older ones are read
    /// back from the database when needed.
    pub recent_charges: usize,
    /// Release holds left behind when the store opens (a Nexus does; a tool that only reads the
    /// ledger next to a running Nexus must not). Shared writer: an exclusive one owns the
    /// database and always releases the holds it finds there as it starts.
    pub recover_holds: bool,
    /// How long an exclusive writer waits for the database's writer lock (another writer may be
    /// finishing its last commit) before it refuses to open.
    pub lock_wait: Duration,
    /// The exclusive writer starts a transaction at most this often (it gathers what arrives
    /// meanwhile); also the most a caller waiting for durability (a `post`, `sync`) waits
    /// beyond its commit.
    pub gather: Duration,
    /// ... and at most this often while nobody waits and operations arrive at 8,000/s or more
    /// (holds, charges and releases on the request path are durable with the next commit,
    /// unawaited; below that rate the writer keeps to `gather`). Each commit rewrites every
    /// page it touched and pays a transaction's fixed work, so under load a few large cuts cost
    /// far less per row than many small ones (SQLite: ~4.6 µs of CPU per charge row in
    /// transactions of 60 rows, ~2.3 µs in transactions of 600). Operations not yet durable are
    /// lost with a crash: for a charge, its user is not charged and its node not paid.
    pub gather_unawaited: Duration,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            mode: LedgerMode::Exclusive,
            owner: "nexus".into(),
            hold_ttl: Duration::from_secs(15 * 60),
            max_batch: 1024,
            queue: 64 * 1024,
            recent_charges: 100_000,
            recover_holds: true,
            lock_wait: Duration::from_secs(10),
            gather: Duration::from_millis(5),
            gather_unawaited: Duration::from_millis(40),
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
    /// The node's signed receipt (JSON): a `UsageReceipt` signed alone, or a
    /// `lattice_link::ReceiptInBatch` naming its place in `batch`.
    pub receipt: String,
    /// The signed batch the receipt is in, written once with the first of its charges.
    #[serde(skip)]
    pub batch: Option<Arc<ReceiptBatch>>,
}

/// A node's signature over a batch of receipts, stored once for all its receipts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptBatch {
    /// Merkle root, hex (what a `ReceiptInBatch` names).
    pub root: String,
    /// The signing node's address.
    pub node: String,
    pub signature: String,
    /// The leaves in the batch frame's order.
    pub leaves: Vec<[u8; 32]>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("ledger storage failed: {0}")]
    Store(String),
    /// New holds wait until the writer catches up (the exclusive writer's queue bound).
    #[error("{0} ledger operations are waiting to be written; retry shortly")]
    Backlog(usize),
    #[error("the ledger writer has stopped")]
    Closed,
}

#[derive(Clone)]
enum Writer {
    Shared(mpsc::Sender<shared::Job>),
    Exclusive(Arc<hot::Hot>),
}

/// Handle to the ledger; cheap to clone.
#[derive(Clone)]
pub struct LedgerStore {
    writer: Writer,
    /// The exclusive writer flushes and stops when the last handle drops this.
    _alive: Option<Arc<hot::Alive>>,
    db: Db,
    config: LedgerConfig,
}

impl LedgerStore {
    /// Starts the writer task (it ends, after writing what is pending, when every handle is
    /// dropped).
    pub async fn start(db: Db, config: LedgerConfig) -> Result<Self, StoreError> {
        let (writer, alive) = match config.mode {
            LedgerMode::Shared => {
                let (tx, rx) = mpsc::channel(config.queue.max(1));
                tokio::spawn(shared::writer(db.clone(), config.clone(), rx));
                (Writer::Shared(tx), None)
            }
            LedgerMode::Exclusive => {
                let (hot, alive) = hot::Hot::start(db.clone(), config.clone()).await?;
                (Writer::Exclusive(hot), Some(alive))
            }
        };
        Ok(Self {
            writer,
            _alive: alive,
            db,
            config,
        })
    }

    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    /// Applies `op` and returns once it is durable.
    pub async fn post(&self, op: Op) -> Result<Applied, PostError> {
        match &self.writer {
            Writer::Shared(tx) => submit(tx, op, None).await,
            Writer::Exclusive(hot) => {
                let (applied, seq) = hot.apply(&op, None).await?;
                hot.durable(seq).await?;
                Ok(applied)
            }
        }
    }

    /// Applies `op`; on the exclusive writer it becomes durable with the next commit, without
    /// waiting for it (holds and releases on the request path).
    pub async fn apply(&self, op: Op) -> Result<Applied, PostError> {
        match &self.writer {
            Writer::Shared(tx) => submit(tx, op, None).await,
            Writer::Exclusive(hot) => Ok(hot.apply(&op, None).await?.0),
        }
    }

    /// Applies a charge together with the usage record it is based on, like [`Self::apply`].
    pub async fn charge(&self, op: Op, usage: UsageRecord) -> Result<Applied, PostError> {
        match &self.writer {
            Writer::Shared(tx) => submit(tx, op, Some(usage)).await,
            Writer::Exclusive(hot) => Ok(hot.apply(&op, Some(usage)).await?.0),
        }
    }

    /// Applies charges together (one lock for all of them on the exclusive writer), like
    /// [`Self::charge`]; outcomes in order.
    pub async fn charge_many(
        &self,
        charges: Vec<(Op, UsageRecord)>,
    ) -> Vec<Result<Applied, PostError>> {
        match &self.writer {
            Writer::Shared(tx) => {
                futures::future::join_all(
                    charges
                        .into_iter()
                        .map(|(op, usage)| submit(tx, op, Some(usage))),
                )
                .await
            }
            Writer::Exclusive(hot) => hot
                .apply_many(
                    charges
                        .into_iter()
                        .map(|(op, usage)| (op, Some(usage)))
                        .collect(),
                )
                .await
                .into_iter()
                .map(|r| r.map(|(a, _)| a))
                .collect(),
        }
    }

    /// Returns once everything applied before the call is durable.
    pub async fn sync(&self) -> Result<(), PostError> {
        match &self.writer {
            Writer::Shared(_) => Ok(()),
            Writer::Exclusive(hot) => hot.durable(hot.seq()).await,
        }
    }

    /// Queues an operation without waiting for it (used from `Drop`); returns false when it
    /// could not be queued, in which case the hold sweeper recovers it later.
    pub fn post_detached(&self, op: Op) -> bool {
        match &self.writer {
            Writer::Shared(tx) => {
                let (reply, _rx) = oneshot::channel();
                tx.try_send(shared::Job {
                    op,
                    usage: None,
                    reply,
                })
                .is_ok()
            }
            Writer::Exclusive(hot) => hot.apply_detached(op),
        }
    }

    pub async fn balance(&self, account: &Account) -> Result<Money, StoreError> {
        if let Writer::Exclusive(hot) = &self.writer
            && let Some(v) = hot.balance(account)
        {
            return Ok(v);
        }
        let row = sqlx::query("SELECT amount FROM balances WHERE account = $1")
            .bind(account.key())
            .fetch_optional(&self.db.pool)
            .await?;
        match row {
            Some(r) => parse_money(&r.try_get::<String, _>("amount")?),
            None => Ok(Money::ZERO),
        }
    }

    /// Gives `request`'s open hold another full time-to-live from now: a request still streaming
    /// renews its hold, so a long answer's credit is not released (and the answer left unpaid)
    /// by the sweeper. A hold that is gone stays gone.
    pub async fn renew_hold(&self, request: &str) -> Result<(), StoreError> {
        let ttl = i64::try_from(self.config.hold_ttl.as_secs()).unwrap_or(i64::MAX);
        let until = now().saturating_add(ttl);
        match &self.writer {
            Writer::Exclusive(hot) => hot.renew_hold(request, until),
            Writer::Shared(_) => {
                sqlx::query("UPDATE holds SET expires_at = $1 WHERE request_id = $2")
                    .bind(until)
                    .bind(request)
                    .execute(&self.db.pool)
                    .await?;
            }
        }
        Ok(())
    }

    /// Releases holds that outlived their time-to-live, and (`own_too`) every hold this replica
    /// placed before it restarted (the exclusive writer owns every hold it finds at start).
    /// Returns how many were released.
    pub async fn sweep_holds(&self, own_too: bool) -> Result<usize, StoreError> {
        let requests: Vec<String> = match &self.writer {
            Writer::Exclusive(hot) => hot.expired_holds(now()),
            Writer::Shared(_) => {
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
                rows.iter()
                    .map(|r| r.try_get("request_id"))
                    .collect::<Result<_, _>>()?
            }
        };
        let mut released = 0;
        for request in requests {
            if let Ok(Applied::Posted(_)) = self.post(Op::Release { request }).await {
                released += 1;
            }
        }
        Ok(released)
    }

    /// Reads the whole ledger back and checks its invariants (tests, `lattice` reconciliation).
    pub async fn audit(&self) -> Result<Audit, StoreError> {
        self.sync()
            .await
            .map_err(|e| StoreError::Ledger(e.to_string()))?;
        let mut a = Audit::default();
        // What the journal moved into (credited) and out of (debited) each account; the lines
        // stream (one entry per account is kept, not the journal).
        let mut journal: HashMap<String, (Money, Money)> = HashMap::new();
        let mut lines =
            sqlx::query("SELECT debit, credit, amount FROM journal_lines").fetch(&self.db.pool);
        while let Some(r) = lines.try_next().await? {
            let amount = parse_money(&r.try_get::<String, _>("amount")?)?;
            let d = journal.entry(r.try_get("debit")?).or_default();
            d.1 = add(d.1, amount)?;
            let c = journal.entry(r.try_get("credit")?).or_default();
            c.0 = add(c.0, amount)?;
            a.journal_lines += 1;
        }
        drop(lines);
        let mut replays = true;
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
            // An internal account holds what came in less what went out.
            let (credited, debited) = journal.remove(&account).unwrap_or_default();
            replays &= debited.checked_add(amount) == Some(credited);
        }
        for r in sqlx::query("SELECT account, issued, redeemed FROM external_totals")
            .fetch_all(&self.db.pool)
            .await?
        {
            let account: String = r.try_get("account")?;
            let issued = parse_money(&r.try_get::<String, _>("issued")?)?;
            let redeemed = parse_money(&r.try_get::<String, _>("redeemed")?)?;
            a.issued = add(a.issued, issued)?;
            a.redeemed = add(a.redeemed, redeemed)?;
            // An external account issues what it pays out and redeems what it is paid.
            let (credited, debited) = journal.remove(&account).unwrap_or_default();
            replays &= (debited, credited) == (issued, redeemed);
        }
        // Accounts without a row: the journal must leave them at zero.
        a.journal_replays = replays && journal.values().all(|(c, d)| c == d);
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
        Ok(a)
    }
}

async fn submit(
    tx: &mpsc::Sender<shared::Job>,
    op: Op,
    usage: Option<UsageRecord>,
) -> Result<Applied, PostError> {
    let (reply, rx) = oneshot::channel();
    tx.send(shared::Job { op, usage, reply })
        .await
        .map_err(|_| PostError::Closed)?;
    rx.await.map_err(|_| PostError::Closed)?
}

/// What an operation reads.
#[derive(Debug)]
enum Need<'a> {
    /// A user's available and held balances.
    User(&'a str),
    /// A node's earnings, its staking pool and the treasury.
    Node(&'a str),
    /// An API key's spending.
    Key(&'a str),
    /// Whether a one-off operation was applied.
    Once(Cow<'a, str>),
}

/// Calls `f` with everything `op` reads, including through the hold or charge `ledger` has for
/// its request (without allocating, except for a refund's one-off id).
fn each_need<'a>(op: &'a Op, ledger: &'a Ledger, f: &mut impl FnMut(Need<'a>)) {
    match op {
        Op::Deposit { op, user, .. }
        | Op::Faucet { op, user, .. }
        | Op::Withdraw { op, user, .. } => {
            f(Need::User(user));
            f(Need::Once(Cow::Borrowed(op)));
        }
        Op::Hold { user, key, .. } => {
            f(Need::User(user));
            if let Some((k, _)) = key {
                f(Need::Key(k));
            }
        }
        Op::Charge { user, node, .. } => {
            f(Need::User(user));
            f(Need::Node(node));
        }
        Op::Release { .. } => {}
        Op::Refund { request } => f(Need::Once(Cow::Owned(format!("refund:{request}")))),
    }
    if let Some(r) = op.request() {
        if let Some(h) = ledger.holds.get(r) {
            f(Need::User(&h.user));
            if let Some(k) = &h.key {
                f(Need::Key(k));
            }
        }
        if let Some(c) = ledger.charges.get(r) {
            f(Need::User(&c.user));
            f(Need::Node(&c.node));
            if let Some(k) = &c.key {
                f(Need::Key(k));
            }
        }
    }
}

/// The rows operations read, by key: accounts (and the users and nodes they belong to), API
/// keys and one-off ids.
#[derive(Debug, Default)]
struct Needs {
    accounts: BTreeSet<String>,
    users: BTreeSet<String>,
    nodes: BTreeSet<String>,
    keys: BTreeSet<String>,
    once: BTreeSet<String>,
}

impl Needs {
    fn add(&mut self, op: &Op, ledger: &Ledger) {
        each_need(op, ledger, &mut |n| match n {
            Need::User(u) => {
                if !self.users.contains(u) {
                    self.accounts.insert(Account::User(u.to_owned()).key());
                    self.accounts.insert(Account::Held(u.to_owned()).key());
                    self.users.insert(u.to_owned());
                }
            }
            Need::Node(n) => {
                if !self.nodes.contains(n) {
                    self.accounts.insert(Account::Node(n.to_owned()).key());
                    self.accounts.insert(Account::Pool(n.to_owned()).key());
                    self.accounts.insert(Account::Treasury.key());
                    self.nodes.insert(n.to_owned());
                }
            }
            Need::Key(k) => {
                self.keys.insert(k.to_owned());
            }
            Need::Once(o) => {
                self.once.insert(o.into_owned());
            }
        });
    }
}

/// The append-only rows of an applied operation: its journal legs (as the writer records them),
/// the usage record of a charge, what settlement has to move for a charge or refund, and the
/// on-chain mint a faucet grant needs. `ledger` is the state `op` was applied to.
fn side_rows(
    ws: &mut WriteSet,
    ledger: &Ledger,
    op: &Op,
    usage: Option<UsageRecord>,
    postings: impl Iterator<Item = Posting>,
) {
    ws.postings.extend(postings.enumerate());
    match op {
        Op::Charge {
            request,
            user,
            node,
            amount,
            ..
        } => {
            let tokens = usage
                .as_ref()
                .map_or(0, |u| u.prompt_tokens.saturating_add(u.completion_tokens));
            ws.settle(request, (user, node), false, *amount, tokens);
            if let Some(u) = usage {
                ws.usages.push(u);
            }
        }
        Op::Refund { request } => {
            if let Some(c) = ledger.charges.get(request) {
                ws.settle(&op.id(), (&c.user, &c.node), true, c.amount, 0);
            }
        }
        Op::Faucet { op, user, amount } => {
            ws.grants.push((op.clone(), user.clone(), *amount));
        }
        _ => {}
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
    /// Lines of the journal (`journal_lines`: `journal` and the charges' legs).
    pub journal_lines: i64,
    /// Replaying the journal from zero gives every account its stored balance (and every
    /// external account its issued and redeemed totals).
    pub journal_replays: bool,
}

impl Audit {
    /// Σ internal balances = issued − redeemed, held balances = open holds, and the journal
    /// replays to the balances.
    pub fn balanced(&self) -> bool {
        self.issued.checked_sub(self.redeemed) == Some(self.internal)
            && self.held == self.open_holds
            && self.journal_replays
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
