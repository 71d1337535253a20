//! The exclusive writer: the ledger's hot rows in memory, written behind.
//!
//! Every operation is applied under one short lock (no I/O inside it). Rows an operation needs
//! that are not in memory yet are read from the database first, outside the lock; since this
//! writer is the only one, a row not in memory is current on disk. A background task takes a
//! cut of everything changed since the previous one — the changed rows' current values and the
//! journal lines, usage records, grants and settlement items appended meanwhile — and commits it
//! in one transaction; `durable` then advances to the last operation the cut contains. Cuts
//! leave open holds out ([`WriteSet::net_holds`]): they are this writer's alone and end with it.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lattice_ledger::{Account, Applied, Charge, HashMap, HashSet, KeyUsage, Ledger, Money, Op};
use tokio::sync::{Notify, watch};

use super::native::Native;
use super::shared;
use super::sql::{Loader, WriteSet, first_new_charge, net_postings, write_back};
use super::{LedgerConfig, Need, Needs, PostError, UsageRecord, each_need, side_rows};
use crate::StoreError;
use crate::db::{Db, now};

pub(super) struct Hot {
    db: Db,
    /// The writer's own connection (none for an in-memory SQLite database).
    native: Option<Native>,
    owner: Arc<str>,
    config: LedgerConfig,
    state: Mutex<State>,
    /// Something was applied (or the handles are gone): the writer has work.
    wake: Notify,
    /// The sequence number of the last operation that is durable.
    durable: watch::Sender<u64>,
    /// Callers waiting for durability: the writer gathers for `gather`, not `gather_unawaited`.
    awaited: AtomicUsize,
    /// A caller started waiting, or the last handle dropped (wakes a gathering writer only).
    hurry: Notify,
    closing: AtomicBool,
}

/// Operations per second (a paid request is two: hold and charge) from which the writer gathers
/// for `LedgerConfig::gather_unawaited` instead of `gather`: under load, larger and fewer
/// commits cost less per row; below it, short gathers keep each commit's burst of work small.
const BUSY_OPS_PER_SEC: u64 = 8_000;

/// Counts a caller waiting for durability (and hurries the writer's gather) while it lives.
struct Awaited<'a>(&'a Hot);

impl<'a> Awaited<'a> {
    fn new(hot: &'a Hot) -> Self {
        hot.awaited.fetch_add(1, Ordering::SeqCst);
        hot.hurry.notify_waiters();
        Self(hot)
    }
}

impl Drop for Awaited<'_> {
    fn drop(&mut self) {
        self.0.awaited.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Dropped with the last [`super::LedgerStore`] handle: tells the writer to write what is
/// pending and stop.
pub(super) struct Alive(Arc<Hot>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.closing.store(true, Ordering::SeqCst);
        self.0.wake.notify_one();
        self.0.hurry.notify_waiters();
    }
}

#[derive(Default)]
struct State {
    ledger: Ledger,
    /// Accounts, keys and one-off ids whose rows were read (a missing row is zero or absent).
    accounts: HashSet<Account>,
    /// Users and nodes all of whose accounts were read (an index of `accounts` by name, so the
    /// request path checks an operation without building account keys).
    users: HashSet<String>,
    nodes: HashSet<String>,
    keys: HashSet<String>,
    once: HashSet<String>,
    /// When each open hold expires (unix seconds).
    expiry: HashMap<String, i64>,
    /// Operations applied so far.
    seq: u64,
    /// Journal lines, usage records, grants and settlement items since the last cut.
    appended: WriteSet,
    /// Charges in memory, oldest first, with the sequence number that last touched them.
    recent: VecDeque<(String, u64)>,
    touched: HashMap<String, u64>,
}

/// Rows to read before an operation can be applied.
#[derive(Debug, Default)]
struct Missing {
    accounts: BTreeSet<String>,
    /// The users and nodes those accounts belong to (some may be in memory already).
    users: BTreeSet<String>,
    nodes: BTreeSet<String>,
    keys: BTreeSet<String>,
    once: BTreeSet<String>,
    /// A charge that may be on disk only (a replay or refund of an old request).
    charge: Option<String>,
}

impl Missing {
    fn is_empty(&self) -> bool {
        self.accounts.is_empty()
            && self.keys.is_empty()
            && self.once.is_empty()
            && self.charge.is_none()
    }
}

/// What was read for a [`Missing`].
struct Loaded {
    balances: HashMap<Account, Money>,
    keys: HashMap<String, KeyUsage>,
    applied: Vec<String>,
    charge: Option<(String, Charge)>,
}

impl State {
    /// Room for twice the `recent` charges kept in memory, reserved once. At under half load a
    /// removal leaves no tombstone and no insertion finds the table full, so the request path
    /// never rehashes ~100k charges at once (a doubling or tombstone rehash held the ledger lock
    /// for 10-140 ms under load: a stall of every request).
    fn with_room(recent: usize) -> Self {
        let mut st = Self::default();
        let room = recent.saturating_mul(2);
        st.ledger.charges.reserve(room);
        st.touched.reserve(room);
        st.recent.reserve(room);
        st
    }

    /// Every row `op` reads is in memory: it can be applied now (the request path's case).
    fn ready(&self, op: &Op) -> bool {
        let mut ready = !self.needs_charge_read(op, false);
        each_need(op, &self.ledger, &mut |n| {
            ready &= match n {
                Need::User(u) => self.users.contains(u),
                Need::Node(n) => self.nodes.contains(n),
                Need::Key(k) => self.keys.contains(k),
                Need::Once(o) => {
                    self.once.contains(o.as_ref()) || self.ledger.applied.contains(o.as_ref())
                }
            }
        });
        ready
    }

    /// A charge or refund of a request neither held nor charged in memory: its charge may be on
    /// disk only (a replay or refund of an old request).
    fn needs_charge_read(&self, op: &Op, charge_checked: bool) -> bool {
        match (op, op.request()) {
            (Op::Charge { .. } | Op::Refund { .. }, Some(r)) => {
                !charge_checked
                    && !self.ledger.holds.contains_key(r)
                    && !self.ledger.charges.contains_key(r)
            }
            _ => false,
        }
    }

    fn missing(&self, op: &Op, charge_checked: bool) -> Missing {
        let mut needs = Needs::default();
        needs.add(op, &self.ledger);
        let mut m = Missing {
            users: needs.users,
            nodes: needs.nodes,
            accounts: needs
                .accounts
                .into_iter()
                .filter(|k| Account::from_key(k).is_some_and(|a| !self.accounts.contains(&a)))
                .collect(),
            keys: needs
                .keys
                .into_iter()
                .filter(|k| !self.keys.contains(k))
                .collect(),
            once: needs
                .once
                .into_iter()
                .filter(|o| !self.once.contains(o) && !self.ledger.applied.contains(o))
                .collect(),
            charge: None,
        };
        if self.needs_charge_read(op, charge_checked) {
            m.charge = op.request().map(str::to_owned);
        }
        m
    }

    fn merge(&mut self, missing: Missing, loaded: Loaded) {
        self.users.extend(missing.users);
        self.nodes.extend(missing.nodes);
        for k in missing.accounts {
            if let Some(a) = Account::from_key(&k)
                && self.accounts.insert(a.clone())
                && let Some(v) = loaded.balances.get(&a)
            {
                self.ledger.balances.insert(a, *v);
            }
        }
        for k in missing.keys {
            if self.keys.insert(k.clone())
                && let Some(u) = loaded.keys.get(&k)
            {
                self.ledger.keys.insert(k, *u);
            }
        }
        self.once.extend(missing.once);
        self.ledger.applied.extend(loaded.applied);
        if let Some((r, c)) = loaded.charge
            && !self.ledger.charges.contains_key(&r)
        {
            self.ledger.charges.insert(r.clone(), c);
            self.recent.push_back((r.clone(), 0));
            self.touched.insert(r, 0);
        }
    }
}

impl Hot {
    /// Takes the writer lock, releases holds a recording writer left on disk, reads the external
    /// totals, then starts the writer task.
    pub(super) async fn start(
        db: Db,
        config: LedgerConfig,
    ) -> Result<(Arc<Self>, Arc<Alive>), StoreError> {
        // The lock first: what is read next must not change under another writer.
        let native = Native::open(&db, config.lock_wait).await?;
        let mut st = State::with_room(config.recent_charges);
        {
            let mut conn = db.pool.acquire().await?;
            let mut load = Loader {
                ex: &mut *conn,
                backend: db.backend,
                lock: "",
            };
            for (a, issued, redeemed) in load.externals().await? {
                st.ledger.issued.insert(a.clone(), issued);
                st.ledger.redeemed.insert(a, redeemed);
            }
        }
        // Holds on disk were left by a writer that recorded them (a shared one, or an earlier
        // version): give them back first, in the database, since this writer records none.
        let left: Vec<String> = sqlx::query_scalar("SELECT request_id FROM holds")
            .fetch_all(&db.pool)
            .await?;
        for chunk in left.chunks(config.max_batch.max(1)) {
            let ops: Vec<Op> = chunk
                .iter()
                .map(|r| Op::Release { request: r.clone() })
                .collect();
            let batch: Vec<(&Op, Option<&UsageRecord>)> = ops.iter().map(|o| (o, None)).collect();
            for r in shared::apply_batch(&db, &config, &batch).await? {
                r.map_err(|e| StoreError::Ledger(e.to_string()))?;
            }
        }
        let (durable, _) = watch::channel(0);
        let hot = Arc::new(Self {
            owner: config.owner.as_str().into(),
            native,
            db,
            config,
            state: Mutex::new(st),
            wake: Notify::new(),
            durable,
            awaited: AtomicUsize::new(0),
            hurry: Notify::new(),
            closing: AtomicBool::new(false),
        });
        tokio::spawn(hot.clone().run());
        let alive = Arc::new(Alive(hot.clone()));
        Ok((hot, alive))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is only changed by whole, non-panicking operations.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn seq(&self) -> u64 {
        self.lock().seq
    }

    /// Applies `op` (reading rows it needs first); returns the outcome and the sequence number
    /// that must be durable for the outcome to be.
    pub(super) async fn apply(
        &self,
        op: &Op,
        mut usage: Option<UsageRecord>,
    ) -> Result<(Applied, u64), PostError> {
        {
            let mut st = self.lock();
            if st.ready(op) {
                return self.apply_locked(&mut st, op, &mut usage);
            }
        }
        let mut charge_checked = false;
        // Each round reads rows the previous one revealed (a charge read back names its node).
        for _ in 0..4 {
            let missing = {
                let mut st = self.lock();
                let missing = st.missing(op, charge_checked);
                if missing.is_empty() {
                    return self.apply_locked(&mut st, op, &mut usage);
                }
                missing
            };
            charge_checked |= missing.charge.is_some();
            let loaded = self
                .load(&missing)
                .await
                .map_err(|e| PostError::Store(e.to_string()))?;
            self.lock().merge(missing, loaded);
        }
        Err(PostError::Store(
            "the ledger could not read the rows of an operation".into(),
        ))
    }

    /// Applies operations under one lock where every row they read is in memory (the others
    /// read their rows first, one by one); outcomes in order.
    pub(super) async fn apply_many(
        &self,
        mut ops: Vec<(Op, Option<UsageRecord>)>,
    ) -> Vec<Result<(Applied, u64), PostError>> {
        let mut out: Vec<Option<Result<(Applied, u64), PostError>>> = Vec::with_capacity(ops.len());
        {
            let mut st = self.lock();
            for (op, usage) in &mut ops {
                out.push(st.ready(op).then(|| self.apply_locked(&mut st, op, usage)));
            }
        }
        let mut results = Vec::with_capacity(ops.len());
        for (done, (op, usage)) in out.into_iter().zip(ops) {
            results.push(match done {
                Some(r) => r,
                None => self.apply(&op, usage).await,
            });
        }
        results
    }

    /// Applies `op` now when every row it needs is in memory, else in a task; false when neither
    /// is possible (no runtime), leaving it to the hold sweeper.
    pub(super) fn apply_detached(self: &Arc<Self>, op: Op) -> bool {
        {
            let mut st = self.lock();
            if st.ready(&op) {
                let _ = self.apply_locked(&mut st, &op, &mut None);
                return true;
            }
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let hot = self.clone();
        rt.spawn(async move {
            if let Err(e) = hot.apply(&op, None).await {
                tracing::warn!(op = %op.id(), error = %e, "detached ledger operation failed");
            }
        });
        true
    }

    fn apply_locked(
        &self,
        st: &mut State,
        op: &Op,
        usage: &mut Option<UsageRecord>,
    ) -> Result<(Applied, u64), PostError> {
        if matches!(op, Op::Hold { .. })
            && st.seq.saturating_sub(*self.durable.borrow()) >= self.config.queue as u64
        {
            return Err(PostError::Backlog(self.config.queue));
        }
        let applied = st.ledger.apply(op)?;
        if let Applied::Posted(p) = &applied {
            st.seq += 1;
            let seq = st.seq;
            // The usage record moves into the rows to write (an operation posts once).
            side_rows(
                &mut st.appended,
                &st.ledger,
                op,
                usage.take(),
                net_postings(op, p),
            );
            match op {
                Op::Hold { request, .. } => {
                    let ttl = i64::try_from(self.config.hold_ttl.as_secs()).unwrap_or(i64::MAX);
                    st.expiry.insert(request.clone(), now().saturating_add(ttl));
                }
                Op::Charge { request, .. } | Op::Refund { request } => {
                    st.expiry.remove(request);
                    st.recent.push_back((request.clone(), seq));
                    st.touched.insert(request.clone(), seq);
                }
                Op::Release { request } => {
                    st.expiry.remove(request);
                }
                _ => {}
            }
            self.wake.notify_one();
        }
        Ok((applied, st.seq))
    }

    async fn load(&self, m: &Missing) -> Result<Loaded, StoreError> {
        let mut conn = self.db.pool.acquire().await?;
        let mut load = Loader {
            ex: &mut *conn,
            backend: self.db.backend,
            lock: "",
        };
        let charge = match &m.charge {
            Some(r) => load
                .charges(&BTreeSet::from([r.clone()]))
                .await?
                .into_iter()
                .next(),
            None => None,
        };
        Ok(Loaded {
            balances: load.balances(&m.accounts).await?,
            keys: load.keys(&m.keys).await?,
            applied: load.applied(&m.once).await?,
            charge,
        })
    }

    /// Waits until operation `seq` is durable.
    pub(super) async fn durable(&self, seq: u64) -> Result<(), PostError> {
        let mut rx = self.durable.subscribe();
        if *rx.borrow_and_update() >= seq {
            return Ok(());
        }
        let _waiting = Awaited::new(self);
        rx.wait_for(|d| *d >= seq)
            .await
            .map(|_| ())
            .map_err(|_| PostError::Closed)
    }

    /// The balance in memory, when the account's row has been read.
    pub(super) fn balance(&self, account: &Account) -> Option<Money> {
        let st = self.lock();
        st.accounts
            .contains(account)
            .then(|| st.ledger.balance(account))
    }

    /// Moves an open hold's expiry to `until` (unix seconds).
    pub(super) fn renew_hold(&self, request: &str, until: i64) {
        if let Some(e) = self.lock().expiry.get_mut(request) {
            *e = until;
        }
    }

    /// Holds whose time ran out (bounded: the sweeper comes back for the rest).
    pub(super) fn expired_holds(&self, now: i64) -> Vec<String> {
        let st = self.lock();
        st.expiry
            .iter()
            .filter(|(_, e)| **e < now)
            .map(|(r, _)| r.clone())
            .take(10_000)
            .collect()
    }

    /// The writer: commits one cut at a time until the handles are gone and nothing is left.
    async fn run(self: Arc<Self>) {
        let mut last: Option<tokio::time::Instant> = None;
        // Operations arrived at `BUSY_OPS_PER_SEC` or faster since the previous cut.
        let mut busy = false;
        loop {
            // Gather: one transaction per `gather` at most (per `gather_unawaited` when busy and
            // nobody waits), unless the queue fills up or the handles are gone.
            if let Some(t) = last {
                // Registered before the checks, so a caller that starts waiting (or the last
                // handle dropping) after them still cuts the gather short.
                let hurry = self.hurry.notified();
                tokio::pin!(hurry);
                hurry.as_mut().enable();
                let (seq, durable) = (self.seq(), *self.durable.borrow());
                if !self.closing.load(Ordering::SeqCst)
                    && seq.saturating_sub(durable) < (self.config.queue as u64) / 4
                {
                    let soon = t + self.config.gather;
                    if !busy || self.awaited.load(Ordering::SeqCst) > 0 {
                        tokio::time::sleep_until(soon).await;
                    } else {
                        tokio::select! {
                            () = tokio::time::sleep_until(t + self.config.gather_unawaited) => {}
                            () = hurry => tokio::time::sleep_until(soon).await,
                        }
                    }
                }
            }
            let (cut, seq) = {
                let mut st = self.lock();
                let State {
                    ledger,
                    appended,
                    seq,
                    ..
                } = &mut *st;
                let mut cut = WriteSet::cut(ledger, |_| 0);
                cut.net_holds(ledger);
                cut.set_appended(std::mem::take(appended));
                (cut, *seq)
            };
            if cut.is_empty() {
                self.durable.send_if_modified(|d| {
                    let moved = *d < seq;
                    *d = seq.max(*d);
                    moved
                });
                if self.closing.load(Ordering::SeqCst) {
                    return;
                }
                self.wake.notified().await;
                continue;
            }
            let cut = Arc::new(cut);
            let now = tokio::time::Instant::now();
            let ops = seq.saturating_sub(*self.durable.borrow());
            busy = last.is_some_and(|t| {
                u128::from(ops) * 1_000_000_000
                    >= u128::from(BUSY_OPS_PER_SEC) * now.duration_since(t).as_nanos()
            });
            last = Some(now);
            let mut backoff = Duration::from_millis(20);
            let mut retry = false;
            while let Err(e) = self.write(&cut, retry).await {
                retry = true;
                tracing::error!(error = %e, rows = cut.postings.len(), "ledger write failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            self.durable.send_replace(seq);
            self.evict(seq);
        }
    }

    /// Writes `cut` in one transaction (`retry`: an earlier attempt failed, perhaps after its
    /// commit landed, so every row is written idempotently).
    async fn write(&self, cut: &Arc<WriteSet>, retry: bool) -> Result<(), StoreError> {
        if let Some(native) = &self.native {
            return native
                .write(cut.clone(), now(), self.owner.clone(), retry)
                .await;
        }
        let mut tx = self.db.begin_write().await?;
        let mut retry = retry;
        // Its usage totals are increments: a cut that had committed is not written again, and
        // one that had not is written as new (a conflict then fails instead of adding twice).
        if retry && let Some(r) = first_new_charge(cut) {
            let committed: Option<String> =
                sqlx::query_scalar("SELECT request_id FROM charges WHERE request_id = $1")
                    .bind(r)
                    .fetch_optional(&mut *tx)
                    .await?;
            if committed.is_some() {
                return Ok(());
            }
            retry = false;
        }
        write_back(&mut tx, self.db.backend, cut, now(), &self.owner, retry).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Forgets the oldest durable charges beyond the configured number.
    fn evict(&self, durable: u64) {
        let mut st = self.lock();
        while st.recent.len() > self.config.recent_charges {
            let Some((r, s)) = st.recent.front().cloned() else {
                break;
            };
            if s > durable {
                break;
            }
            st.recent.pop_front();
            if st.touched.get(&r) == Some(&s) {
                st.touched.remove(&r);
                st.ledger.charges.remove(&r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use lattice_ledger::Split;

    use super::*;

    /// Charges come and go from memory (each durable before the next, so the oldest are
    /// evicted) without the maps that keep them ever growing or rehashing: their room is
    /// reserved when the writer starts.
    #[tokio::test]
    async fn charges_churn_through_memory_without_growing_its_maps() {
        let db = Db::open("sqlite::memory:").await.unwrap();
        let config = LedgerConfig {
            recent_charges: 64,
            gather: Duration::ZERO,
            gather_unawaited: Duration::ZERO,
            ..LedgerConfig::default()
        };
        let (hot, _alive) = Hot::start(db, config).await.unwrap();
        let capacity = |hot: &Hot| {
            let st = hot.lock();
            (
                st.ledger.charges.capacity(),
                st.touched.capacity(),
                st.recent.capacity(),
            )
        };
        let reserved = capacity(&hot);
        assert!(reserved.0 >= 128 && reserved.1 >= 128 && reserved.2 >= 128);
        let faucet = Op::Faucet {
            op: "f".into(),
            user: "u".into(),
            amount: Money::from_units(1_000_000),
        };
        hot.apply(&faucet, None).await.unwrap();
        for i in 0..640 {
            let request = format!("r{i}");
            let hold = Op::Hold {
                request: request.clone(),
                user: "u".into(),
                key: None,
                amount: Money::from_units(10),
            };
            hot.apply(&hold, None).await.unwrap();
            let charge = Op::Charge {
                request,
                user: "u".into(),
                node: "n".into(),
                amount: Money::from_units(7),
                split: Split::new(8_000, 1_000, 1_000).unwrap(),
            };
            let (_, seq) = hot.apply(&charge, None).await.unwrap();
            hot.durable(seq).await.unwrap();
        }
        assert_eq!(
            hot.balance(&Account::User("u".into())),
            Some(Money::from_units(1_000_000 - 640 * 7))
        );
        let in_memory = hot.lock().recent.len();
        assert!(in_memory <= 64 + 2, "{in_memory} charges in memory");
        // No growth (a removal's tombstone may lower the free room, never raise it).
        let now = capacity(&hot);
        assert!(
            now.0 <= reserved.0 && now.1 <= reserved.1 && now.2 <= reserved.2,
            "{now:?} grew from {reserved:?}"
        );
    }

    /// Below `BUSY_OPS_PER_SEC` the writer commits after `gather` with nobody waiting; above it,
    /// unawaited operations wait for the long gather, and a caller that waits for durability
    /// cuts it short (the long gather is an hour here, so without that the wait would time out).
    #[tokio::test]
    async fn the_long_gather_is_for_busy_spells_and_a_waiting_caller_cuts_it_short() {
        let db = Db::open("sqlite::memory:").await.unwrap();
        let config = LedgerConfig {
            gather: Duration::ZERO,
            gather_unawaited: Duration::from_secs(3600),
            ..LedgerConfig::default()
        };
        let (hot, _alive) = Hot::start(db, config).await.unwrap();
        let faucet = |op: String| Op::Faucet {
            op,
            user: "u".into(),
            amount: Money::from_units(5),
        };
        let unawaited = |seq: u64| {
            let mut rx = hot.durable.subscribe();
            async move { rx.wait_for(|d| *d >= seq).await.map(|_| ()) }
        };
        let limit = Duration::from_secs(60);
        // Quiet: one operation at a time is committed without anyone waiting for it.
        let (_, first) = hot.apply(&faucet("q0".into()), None).await.unwrap();
        tokio::time::timeout(limit, unawaited(first))
            .await
            .expect("committed after the short gather")
            .unwrap();
        let (_, second) = hot.apply(&faucet("q1".into()), None).await.unwrap();
        tokio::time::timeout(limit, unawaited(second))
            .await
            .expect("committed after the short gather")
            .unwrap();
        // Busy: a thousand operations at once (far above 8,000/s) make the next gather long.
        let mut seq = 0;
        for i in 0..1_000 {
            seq = hot.apply(&faucet(format!("b{i}")), None).await.unwrap().1;
        }
        hot.durable(seq).await.unwrap();
        let (_, late) = hot.apply(&faucet("late".into()), None).await.unwrap();
        tokio::task::yield_now().await;
        assert!(*hot.durable.borrow() < late, "committed without a waiter");
        tokio::time::timeout(limit, hot.durable(late))
            .await
            .expect("the waiter hurried the writer")
            .unwrap();
        assert_eq!(hot.awaited.load(Ordering::SeqCst), 0);
    }
}
