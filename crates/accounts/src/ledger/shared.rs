//! The shared writer, for several Nexus replicas on one PostgreSQL database: every batch loads
//! the rows it touches row-locked, applies the operations with the pure rules, writes back what
//! changed and commits before anyone hears the outcome.

use std::collections::BTreeSet;
use std::time::Duration;

use lattice_ledger::{Applied, Ledger, LedgerError, Op};
use tokio::sync::{mpsc, oneshot};

use super::sql::{Loader, WriteSet, insert_missing, write_back};
use super::{LedgerConfig, Needs, PostError, UsageRecord, side_rows};
use crate::StoreError;
use crate::db::{Backend, Db, now};

pub(super) struct Job {
    pub(super) op: Op,
    pub(super) usage: Option<UsageRecord>,
    pub(super) reply: oneshot::Sender<Result<Applied, PostError>>,
}

pub(super) async fn writer(db: Db, config: LedgerConfig, mut rx: mpsc::Receiver<Job>) {
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
pub(super) async fn apply_batch(
    db: &Db,
    config: &LedgerConfig,
    ops: &[(&Op, Option<&UsageRecord>)],
) -> Result<Vec<Result<Applied, LedgerError>>, StoreError> {
    let mut tx = db.begin_write().await?;
    let mut ledger = Ledger::default();
    {
        let mut load = Loader {
            ex: &mut *tx,
            backend: db.backend,
            lock: db.for_update(),
        };
        // Holds and charges of the requests in the batch first: they name more accounts.
        let requests: BTreeSet<String> = ops
            .iter()
            .filter_map(|(op, _)| op.request().map(str::to_owned))
            .collect();
        ledger.holds = load.holds(&requests).await?;
        ledger.charges = load.charges(&requests).await?;
    }
    let mut needs = Needs::default();
    for (op, _) in ops {
        needs.add(op, &ledger);
    }
    if db.backend == Backend::Postgres {
        // Rows must exist to be locked; create missing ones at zero first.
        insert_missing(
            &mut tx,
            "INSERT INTO balances (account, amount) VALUES",
            "('0')",
            &needs.accounts,
            "account",
        )
        .await?;
        insert_missing(
            &mut tx,
            "INSERT INTO key_usage (key_id, spent, held) VALUES",
            "('0', '0')",
            &needs.keys,
            "key_id",
        )
        .await?;
    }
    {
        let mut load = Loader {
            ex: &mut *tx,
            backend: db.backend,
            lock: db.for_update(),
        };
        ledger.balances = load.balances(&needs.accounts).await?;
        ledger.keys = load.keys(&needs.keys).await?;
        ledger.applied = load.applied(&needs.once).await?.into_iter().collect();
        for (a, issued, redeemed) in load.externals().await? {
            ledger.issued.insert(a.clone(), issued);
            ledger.redeemed.insert(a, redeemed);
        }
    }

    let t = now();
    let expires = t.saturating_add(i64::try_from(config.hold_ttl.as_secs()).unwrap_or(i64::MAX));
    let mut results = Vec::with_capacity(ops.len());
    let mut extra = WriteSet::default();
    for (op, usage) in ops {
        let r = ledger.apply(op);
        if let Ok(Applied::Posted(p)) = &r {
            side_rows(&mut extra, &ledger, op, usage.cloned(), p.iter().cloned());
        }
        results.push(r);
    }
    let mut ws = WriteSet::cut(&mut ledger, |_| expires);
    ws.set_appended(extra);
    // A failed batch is never retried as it is: the next one loads what is on disk.
    write_back(&mut tx, db.backend, &ws, t, &config.owner, false).await?;
    tx.commit().await?;
    Ok(results)
}
