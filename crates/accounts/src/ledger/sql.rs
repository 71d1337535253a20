//! The ledger's rows: loading the slice of state an operation touches, and writing back what a
//! batch changed with a few multi-row statements (shared by both writers).

use std::collections::{BTreeSet, HashMap};

use lattice_ledger::{Account, Charge, Hold, KeyUsage, Ledger, Money, Posting};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use super::{UsageRecord, parse_money};
use crate::StoreError;
use crate::db::{Backend, day_of};

/// Everything one transaction writes: the values of changed rows at one consistent cut of the
/// ledger, and the rows that only ever get appended.
#[derive(Debug, Default)]
pub(super) struct WriteSet {
    pub(super) balances: Vec<(Account, Money)>,
    pub(super) holds_removed: Vec<String>,
    /// Request, hold, expiry (unix seconds).
    pub(super) holds_added: Vec<(String, Hold, i64)>,
    pub(super) charges: Vec<(String, Charge)>,
    pub(super) keys: Vec<(String, KeyUsage)>,
    pub(super) applied: Vec<String>,
    /// External account, issued, redeemed (running totals).
    pub(super) externals: Vec<(Account, Money, Money)>,
    /// Leg number within its operation, posting.
    pub(super) postings: Vec<(usize, Posting)>,
    /// Faucet credit to mint on-chain: op, user, amount.
    pub(super) grants: Vec<(String, String, Money)>,
    pub(super) usages: Vec<UsageRecord>,
}

impl WriteSet {
    pub(super) fn is_empty(&self) -> bool {
        self.balances.is_empty()
            && self.holds_removed.is_empty()
            && self.holds_added.is_empty()
            && self.charges.is_empty()
            && self.keys.is_empty()
            && self.applied.is_empty()
            && self.postings.is_empty()
            && self.grants.is_empty()
            && self.usages.is_empty()
    }

    /// Takes what `ledger` changed since the last cut, with the rows' current values.
    pub(super) fn cut(ledger: &mut Ledger, expiry: impl Fn(&str) -> i64) -> Self {
        let changes = ledger.take_changes();
        let mut balances: Vec<(Account, Money)> = changes
            .balances
            .into_iter()
            .map(|a| {
                let v = ledger.balance(&a);
                (a, v)
            })
            .collect();
        balances.sort();
        let mut holds_removed: Vec<String> = changes.holds_removed.into_iter().collect();
        holds_removed.sort();
        let holds_added = changes
            .holds_added
            .into_iter()
            .filter_map(|r| {
                let h = ledger.holds.get(&r)?.clone();
                let e = expiry(&r);
                Some((r, h, e))
            })
            .collect();
        let charges = changes
            .charges
            .into_iter()
            .filter_map(|r| ledger.charges.get(&r).cloned().map(|c| (r, c)))
            .collect();
        let keys = changes
            .keys
            .into_iter()
            .filter_map(|k| ledger.keys.get(&k).copied().map(|u| (k, u)))
            .collect();
        let externals = [Account::Faucet, Account::Chain]
            .into_iter()
            .filter_map(|a| {
                let issued = ledger.issued.get(&a).copied().unwrap_or_default();
                let redeemed = ledger.redeemed.get(&a).copied().unwrap_or_default();
                (!issued.is_zero() || !redeemed.is_zero()).then_some((a, issued, redeemed))
            })
            .collect();
        Self {
            balances,
            holds_removed,
            holds_added,
            charges,
            keys,
            applied: changes.applied.into_iter().collect(),
            externals,
            ..Self::default()
        }
    }
}

/// A bound value of a multi-row insert.
enum V {
    T(String),
    O(Option<String>),
    I(i64),
}

fn int(v: u64) -> V {
    V::I(i64::try_from(v).unwrap_or(i64::MAX))
}

/// Writes a [`WriteSet`] inside `tx` (the caller commits).
pub(super) async fn write_back(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    ws: &WriteSet,
    t: i64,
    owner: &str,
) -> Result<(), StoreError> {
    let rows = ws
        .balances
        .iter()
        .map(|(a, v)| vec![V::T(a.key()), V::T(v.to_string())])
        .collect();
    insert_rows(
        tx,
        backend,
        "INSERT INTO balances (account, amount) VALUES",
        rows,
        "ON CONFLICT (account) DO UPDATE SET amount = excluded.amount",
    )
    .await?;
    for chunk in ws.holds_removed.chunks(500) {
        let sql = format!(
            "DELETE FROM holds WHERE request_id IN ({})",
            backend.placeholders(1, chunk.len())
        );
        let mut q = sqlx::query(&sql);
        for r in chunk {
            q = q.bind(r.as_str());
        }
        q.execute(&mut **tx).await?;
    }
    let rows = ws
        .holds_added
        .iter()
        .map(|(r, h, expires)| {
            vec![
                V::T(r.clone()),
                V::T(h.user.clone()),
                V::O(h.key.clone()),
                V::T(h.amount.to_string()),
                V::I(*expires),
                V::T(owner.to_owned()),
            ]
        })
        .collect();
    insert_rows(
        tx,
        backend,
        "INSERT INTO holds (request_id, user_id, key_id, amount, expires_at, owner) VALUES",
        rows,
        "ON CONFLICT (request_id) DO UPDATE SET user_id = excluded.user_id, key_id = excluded.key_id,
         amount = excluded.amount, owner = excluded.owner, expires_at = excluded.expires_at",
    )
    .await?;
    let rows = ws
        .charges
        .iter()
        .map(|(r, c)| {
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
        .collect();
    insert_rows(tx, backend,
        "INSERT INTO charges (request_id, user_id, key_id, node, amount, node_part, pool_part, treasury_part, refunded, created_at) VALUES",
        rows,
        "ON CONFLICT (request_id) DO UPDATE SET refunded = excluded.refunded",
    )
    .await?;
    let rows = ws
        .keys
        .iter()
        .map(|(k, u)| {
            vec![
                V::T(k.clone()),
                V::T(u.spent.to_string()),
                V::T(u.held.to_string()),
            ]
        })
        .collect();
    insert_rows(
        tx,
        backend,
        "INSERT INTO key_usage (key_id, spent, held) VALUES",
        rows,
        "ON CONFLICT (key_id) DO UPDATE SET spent = excluded.spent, held = excluded.held",
    )
    .await?;
    let rows = ws
        .applied
        .iter()
        .map(|op| vec![V::T(op.clone()), V::I(t)])
        .collect();
    insert_rows(
        tx,
        backend,
        "INSERT INTO applied_ops (op, created_at) VALUES",
        rows,
        "",
    )
    .await?;
    let rows = ws
        .externals
        .iter()
        .map(|(a, issued, redeemed)| {
            vec![
                V::T(a.key()),
                V::T(issued.to_string()),
                V::T(redeemed.to_string()),
            ]
        })
        .collect();
    insert_rows(tx, backend,
        "INSERT INTO external_totals (account, issued, redeemed) VALUES",
        rows,
        "ON CONFLICT (account) DO UPDATE SET issued = excluded.issued, redeemed = excluded.redeemed",
    )
    .await?;
    let rows = ws
        .postings
        .iter()
        .map(|(leg, p)| {
            vec![
                V::T(p.op.clone()),
                int(*leg as u64),
                V::T(p.debit.key()),
                V::T(p.credit.key()),
                V::T(p.amount.to_string()),
                V::I(t),
            ]
        })
        .collect();
    insert_rows(
        tx,
        backend,
        "INSERT INTO journal (op, leg, debit, credit, amount, created_at) VALUES",
        rows,
        "",
    )
    .await?;
    let rows = ws
        .grants
        .iter()
        .map(|(op, user, amount)| {
            vec![
                V::T(op.clone()),
                V::T(user.clone()),
                V::T(amount.to_string()),
                V::I(t),
            ]
        })
        .collect();
    insert_rows(
        tx,
        backend,
        "INSERT INTO chain_grants (op, user_id, amount, created_at) VALUES",
        rows,
        "",
    )
    .await?;
    let day = day_of(t);
    let rows = ws
        .usages
        .iter()
        .map(|u| {
            vec![
                V::T(u.request_id.clone()),
                V::T(u.user_id.clone()),
                V::O(u.key_id.clone()),
                V::T(u.node.clone()),
                V::T(u.model.clone()),
                int(u.prompt_tokens),
                int(u.completion_tokens),
                V::T(u.cost.to_string()),
                V::T(day.clone()),
                V::T(u.receipt.clone()),
                V::I(t),
            ]
        })
        .collect();
    insert_rows(tx, backend,
        "INSERT INTO usage_records (request_id, user_id, key_id, node, model, prompt_tokens, completion_tokens, cost, day, receipt, created_at) VALUES",
        rows,
        "",
    )
    .await?;
    Ok(())
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
async fn select_in<E>(
    ex: &mut E,
    backend: Backend,
    prefix: &str,
    values: &BTreeSet<String>,
    suffix: &str,
) -> Result<Vec<AnyRow>, StoreError>
where
    for<'c> &'c mut E: sqlx::Executor<'c, Database = Any>,
{
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
        out.extend(q.fetch_all(&mut *ex).await?);
    }
    Ok(out)
}

/// Inserts `(value, defaults…)` rows that don't exist yet (PostgreSQL, before locking them).
pub(super) async fn insert_missing(
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

/// Reads rows of the ledger's tables, by key, through `ex` (a transaction or the pool);
/// `lock` is appended to the statements whose rows a shared writer locks.
pub(super) struct Loader<'a, E> {
    pub(super) ex: &'a mut E,
    pub(super) backend: Backend,
    pub(super) lock: &'static str,
}

impl<E> Loader<'_, E>
where
    for<'c> &'c mut E: sqlx::Executor<'c, Database = Any>,
{
    pub(super) async fn holds(
        &mut self,
        requests: &BTreeSet<String>,
    ) -> Result<HashMap<String, Hold>, StoreError> {
        let mut out = HashMap::new();
        for r in select_in(
            self.ex,
            self.backend,
            "SELECT request_id, user_id, key_id, amount FROM holds WHERE request_id IN",
            requests,
            self.lock,
        )
        .await?
        {
            out.insert(
                r.try_get("request_id")?,
                Hold {
                    user: r.try_get("user_id")?,
                    key: r.try_get("key_id")?,
                    amount: parse_money(&r.try_get::<String, _>("amount")?)?,
                },
            );
        }
        Ok(out)
    }

    pub(super) async fn charges(
        &mut self,
        requests: &BTreeSet<String>,
    ) -> Result<HashMap<String, Charge>, StoreError> {
        let mut out = HashMap::new();
        for r in select_in(self.ex, self.backend,
            "SELECT request_id, user_id, key_id, node, amount, node_part, pool_part, treasury_part, refunded FROM charges WHERE request_id IN",
            requests,
            self.lock,
        )
        .await?
        {
            out.insert(
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
        Ok(out)
    }

    /// Balances of `accounts` that have a row (missing ones are zero).
    pub(super) async fn balances(
        &mut self,
        accounts: &BTreeSet<String>,
    ) -> Result<HashMap<Account, Money>, StoreError> {
        let mut out = HashMap::new();
        for r in select_in(
            self.ex,
            self.backend,
            "SELECT account, amount FROM balances WHERE account IN",
            accounts,
            self.lock,
        )
        .await?
        {
            let key: String = r.try_get("account")?;
            let account = Account::from_key(&key)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown account {key}")))?;
            out.insert(account, parse_money(&r.try_get::<String, _>("amount")?)?);
        }
        Ok(out)
    }

    pub(super) async fn keys(
        &mut self,
        keys: &BTreeSet<String>,
    ) -> Result<HashMap<String, KeyUsage>, StoreError> {
        let mut out = HashMap::new();
        for r in select_in(
            self.ex,
            self.backend,
            "SELECT key_id, spent, held FROM key_usage WHERE key_id IN",
            keys,
            self.lock,
        )
        .await?
        {
            out.insert(
                r.try_get("key_id")?,
                KeyUsage {
                    spent: parse_money(&r.try_get::<String, _>("spent")?)?,
                    held: parse_money(&r.try_get::<String, _>("held")?)?,
                },
            );
        }
        Ok(out)
    }

    /// Which of `ops` were applied before.
    pub(super) async fn applied(
        &mut self,
        ops: &BTreeSet<String>,
    ) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for r in select_in(
            self.ex,
            self.backend,
            "SELECT op FROM applied_ops WHERE op IN",
            ops,
            "",
        )
        .await?
        {
            out.push(r.try_get("op")?);
        }
        Ok(out)
    }

    /// Issued and redeemed totals of the external accounts.
    pub(super) async fn externals(&mut self) -> Result<Vec<(Account, Money, Money)>, StoreError> {
        let externals: BTreeSet<String> = ["faucet".to_owned(), "chain".to_owned()].into();
        let mut out = Vec::new();
        for r in select_in(
            self.ex,
            self.backend,
            "SELECT account, issued, redeemed FROM external_totals WHERE account IN",
            &externals,
            self.lock,
        )
        .await?
        {
            let key: String = r.try_get("account")?;
            if let Some(a) = Account::from_key(&key) {
                out.push((
                    a,
                    parse_money(&r.try_get::<String, _>("issued")?)?,
                    parse_money(&r.try_get::<String, _>("redeemed")?)?,
                ));
            }
        }
        Ok(out)
    }
}
