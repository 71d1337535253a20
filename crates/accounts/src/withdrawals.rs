//! Withdrawals: off-chain credit leaves for an on-chain address.
//!
//! The order of writes is what makes a withdrawal safe without touching the ledger writer:
//!
//! 1. a `withdrawals` row is inserted with status `requested` and the ledger op id it will use;
//! 2. `Op::Withdraw` is posted through [`crate::LedgerStore::post`], which answers after the
//!    durable commit (the op is then in `applied_ops`); the ledger refuses it when the credit
//!    does not cover it, and the row is marked `rejected`;
//! 3. the row is marked `debited`.
//!
//! A crash between 1 and 2 leaves a `requested` row whose op may or may not have been applied;
//! [`Accounts::recover_withdrawals`] re-posts it (the op is idempotent: applied already → no
//! change) or marks it rejected. The settler batches only rows whose op is in `applied_ops`, so
//! the chain never pays out credit that was not debited. Once in a batch, the batch's status
//! says whether the withdrawal is `sent` or `confirmed` on-chain.

use std::time::Duration;

use lattice_ledger::{LedgerError, Money, Op};
use serde::Serialize;
use sqlx::Row;

use crate::db::now;
use crate::ledger::parse_money;
use crate::{Accounts, PostError, StoreError};

/// Bounds on withdrawals; every one is explicit.
#[derive(Debug, Clone, Copy)]
pub struct WithdrawalLimits {
    /// Smallest amount one withdrawal may move (an on-chain transfer costs gas).
    pub min_amount: Money,
    /// Withdrawals of one user that may be pending (requested, debited or sent) at once.
    pub max_pending: u32,
    /// Most withdrawals one listing returns (newest first).
    pub max_listed: u32,
}

impl Default for WithdrawalLimits {
    fn default() -> Self {
        Self {
            // 0.01 LAI.
            min_amount: Money::from_units(lattice_ledger::UNITS_PER_LAI / 100),
            max_pending: 5,
            max_listed: 100,
        }
    }
}

/// Where a withdrawal is on its way from the ledger to the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WithdrawalStatus {
    /// Recorded; the ledger debit is not known to have happened yet.
    Requested,
    /// The off-chain credit is debited; waiting for the next withdrawal batch.
    Debited,
    /// In a withdrawal batch recorded for the chain, not yet confirmed applied.
    Sent,
    /// Applied on-chain: the destination holds the LAI.
    Confirmed,
    /// The ledger refused the debit (see `reason`); nothing moved.
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Withdrawal {
    /// The ledger op id (`withdraw:…`).
    pub id: String,
    pub amount: Money,
    /// `0x…` lower-case destination address.
    pub to: String,
    pub status: WithdrawalStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The withdrawal batch (on-chain id) it went into.
    pub batch_id: Option<String>,
    /// The transaction that applied its batch, once confirmed.
    pub tx_hash: Option<String>,
    pub created_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum WithdrawError {
    #[error("insufficient credit: {needed} units requested, {available} available")]
    InsufficientFunds { needed: Money, available: Money },
    #[error("a withdrawal moves at least {min} units ({})", min.to_lai_string())]
    TooSmall { min: Money },
    #[error("{max} withdrawals are already pending; wait until one is confirmed")]
    TooManyPending { max: u32 },
    #[error("the ledger refused the withdrawal: {0}")]
    Refused(String),
    /// The debit's outcome is unknown (the ledger is unavailable); the row stays `requested`
    /// and [`Accounts::recover_withdrawals`] settles it.
    #[error(
        "the ledger is unavailable ({0}); the withdrawal will be completed or rejected shortly"
    )]
    Pending(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The ledger's `applied_ops` is the truth about the debit: a row whose op is applied is debited
/// whatever its status column says (it may lag behind after a crash).
const SELECT: &str = "SELECT w.op, w.destination, w.amount, w.status, w.reason, w.batch_id,
        w.created_at, b.status AS batch_status, b.tx_hash, COALESCE(a.op, '') AS applied_op
     FROM withdrawals w LEFT JOIN chain_batches b ON b.id = w.batch_id
     LEFT JOIN applied_ops a ON a.op = w.op";

fn withdrawal_of(r: &sqlx::any::AnyRow) -> Result<Withdrawal, StoreError> {
    let row_status: String = r.try_get("status")?;
    let batch_id: Option<String> = r.try_get("batch_id")?;
    let batch_status: Option<String> = r.try_get("batch_status")?;
    let applied = !r.try_get::<String, _>("applied_op")?.is_empty();
    let status = match (row_status.as_str(), batch_status.as_deref(), applied) {
        (_, Some("confirmed"), _) => WithdrawalStatus::Confirmed,
        (_, Some(_), _) => WithdrawalStatus::Sent,
        (_, None, true) => WithdrawalStatus::Debited,
        ("rejected", None, false) => WithdrawalStatus::Rejected,
        ("requested" | "debited", None, false) => WithdrawalStatus::Requested,
        (other, _, _) => {
            return Err(StoreError::Corrupt(format!(
                "unknown withdrawal status {other}"
            )));
        }
    };
    Ok(Withdrawal {
        id: r.try_get("op")?,
        amount: parse_money(&r.try_get::<String, _>("amount")?)?,
        to: r.try_get("destination")?,
        status,
        reason: r.try_get("reason")?,
        tx_hash: if status == WithdrawalStatus::Confirmed {
            r.try_get("tx_hash")?
        } else {
            None
        },
        batch_id,
        created_at: r.try_get("created_at")?,
    })
}

impl Accounts {
    /// Steps 1–3 of a withdrawal (see the module docs): the returned withdrawal is `debited`.
    pub async fn request_withdrawal(
        &self,
        user_id: &str,
        to: &str,
        amount: Money,
    ) -> Result<Withdrawal, WithdrawError> {
        let w = self.record_withdrawal(user_id, to, amount).await?;
        self.debit_withdrawal(user_id, &w.id, amount).await
    }

    /// Step 1: checks the bounds and inserts the `requested` row. `to` must be a valid address
    /// (the caller validates it; it is stored lower-case).
    pub async fn record_withdrawal(
        &self,
        user_id: &str,
        to: &str,
        amount: Money,
    ) -> Result<Withdrawal, WithdrawError> {
        let limits = self.config.withdrawals;
        if amount < limits.min_amount {
            return Err(WithdrawError::TooSmall {
                min: limits.min_amount,
            });
        }
        let op = format!("withdraw:{}", uuid::Uuid::new_v4().simple());
        let created_at = now();
        let to = to.to_lowercase();
        // The count and the insert share one write transaction: two concurrent requests cannot
        // both pass the bound.
        let mut tx = self.db.begin_write().await.map_err(StoreError::from)?;
        let pending: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM withdrawals w LEFT JOIN chain_batches b ON b.id = w.batch_id
             WHERE w.user_id = $1 AND w.status <> 'rejected'
             AND (b.status IS NULL OR b.status <> 'confirmed')",
        )
        .bind(user_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::from)?
        .try_get("n")
        .map_err(StoreError::from)?;
        if pending >= i64::from(limits.max_pending) {
            tx.rollback().await.map_err(StoreError::from)?;
            return Err(WithdrawError::TooManyPending {
                max: limits.max_pending,
            });
        }
        // `seq` orders withdrawals made within the same second (inside the write lock on
        // SQLite; on PostgreSQL two concurrent ones may share a number, which only ties them).
        sqlx::query(
            "INSERT INTO withdrawals (op, seq, user_id, destination, amount, status, created_at, updated_at)
             VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM withdrawals), $2, $3, $4,
                     'requested', $5, $5)",
        )
        .bind(&op)
        .bind(user_id)
        .bind(&to)
        .bind(amount.to_string())
        .bind(created_at)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(Withdrawal {
            id: op,
            amount,
            to,
            status: WithdrawalStatus::Requested,
            reason: None,
            batch_id: None,
            tx_hash: None,
            created_at,
        })
    }

    /// Steps 2–3: posts the ledger debit of withdrawal `op` and marks the row with the outcome.
    pub async fn debit_withdrawal(
        &self,
        user_id: &str,
        op: &str,
        amount: Money,
    ) -> Result<Withdrawal, WithdrawError> {
        let posted = self
            .ledger
            .post(Op::Withdraw {
                op: op.to_owned(),
                user: user_id.to_owned(),
                amount,
            })
            .await;
        match posted {
            // Posted now, or applied before (a re-post after a crash): debited either way.
            Ok(_) => {
                sqlx::query(
                    "UPDATE withdrawals SET status = 'debited', reason = NULL, updated_at = $1
                     WHERE op = $2 AND status <> 'debited'",
                )
                .bind(now())
                .bind(op)
                .execute(&self.db.pool)
                .await
                .map_err(StoreError::from)?;
            }
            Err(PostError::Ledger(LedgerError::InsufficientFunds { needed, available })) => {
                self.reject_withdrawal(op, "insufficient credit").await?;
                return Err(WithdrawError::InsufficientFunds { needed, available });
            }
            Err(PostError::Ledger(e)) => {
                let reason = e.to_string();
                self.reject_withdrawal(op, &reason).await?;
                return Err(WithdrawError::Refused(reason));
            }
            Err(e @ (PostError::Store(_) | PostError::Backlog(_) | PostError::Closed)) => {
                return Err(WithdrawError::Pending(e.to_string()));
            }
        }
        self.withdrawal(user_id, op)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("withdrawal {op} vanished")).into())
    }

    /// Marks a `requested` row rejected (a row that moved on already is left as it is).
    async fn reject_withdrawal(&self, op: &str, reason: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE withdrawals SET status = 'rejected', reason = $1, updated_at = $2
             WHERE op = $3 AND status = 'requested'",
        )
        .bind(reason)
        .bind(now())
        .bind(op)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Settles rows left `requested` for at least `older_than` (a crash or a ledger outage
    /// between recording and debiting): re-posts each debit — a no-op if it had been applied —
    /// and marks the row debited, or rejected when the credit no longer covers it. Returns how
    /// many rows it settled; at most 1,000 per call.
    pub async fn recover_withdrawals(&self, older_than: Duration) -> Result<usize, StoreError> {
        let cutoff = now().saturating_sub(i64::try_from(older_than.as_secs()).unwrap_or(i64::MAX));
        let rows = sqlx::query(
            "SELECT op, user_id, amount FROM withdrawals
             WHERE status = 'requested' AND created_at <= $1 ORDER BY seq LIMIT 1000",
        )
        .bind(cutoff)
        .fetch_all(&self.db.pool)
        .await?;
        let mut settled = 0;
        for r in rows {
            let op: String = r.try_get("op")?;
            let user: String = r.try_get("user_id")?;
            let amount = parse_money(&r.try_get::<String, _>("amount")?)?;
            match self.debit_withdrawal(&user, &op, amount).await {
                Ok(_) => {
                    tracing::warn!(withdrawal = %op, "a withdrawal left requested was debited");
                    settled += 1;
                }
                Err(e @ (WithdrawError::InsufficientFunds { .. } | WithdrawError::Refused(_))) => {
                    tracing::warn!(withdrawal = %op, error = %e, "a withdrawal left requested was rejected");
                    settled += 1;
                }
                Err(WithdrawError::Store(e)) => return Err(e),
                Err(e) => return Err(StoreError::Ledger(e.to_string())),
            }
        }
        Ok(settled)
    }

    /// One withdrawal of `user_id`.
    pub async fn withdrawal(
        &self,
        user_id: &str,
        op: &str,
    ) -> Result<Option<Withdrawal>, StoreError> {
        sqlx::query(&format!("{SELECT} WHERE w.op = $1 AND w.user_id = $2"))
            .bind(op)
            .bind(user_id)
            .fetch_optional(&self.db.pool)
            .await?
            .as_ref()
            .map(withdrawal_of)
            .transpose()
    }

    /// A user's withdrawals, newest first (at most `max_listed`).
    pub async fn withdrawals(&self, user_id: &str) -> Result<Vec<Withdrawal>, StoreError> {
        let rows = sqlx::query(&format!(
            "{SELECT} WHERE w.user_id = $1 ORDER BY w.seq DESC LIMIT $2"
        ))
        .bind(user_id)
        .bind(i64::from(self.config.withdrawals.max_listed))
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter().map(withdrawal_of).collect()
    }
}
