//! The ledger's rows: loading the slice of state an operation touches, and writing back what a
//! batch changed with a few multi-row statements (shared by both writers).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use lattice_ledger::{
    Account, Charge, HashMap, HashSet, Hold, KeyUsage, Ledger, Money, Op, Posting,
};
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
    /// What settlement has to move, netted per (user, node) and direction.
    pub(super) settle: Vec<SettleItem>,
    /// `settle` by user: the indices of that user's items.
    settle_index: HashMap<String, Vec<usize>>,
}

/// The charges (or refunds) of one (user, node) pair in one written batch: a row of
/// `settle_items`, which the settler nets into a batch line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SettleItem {
    /// The first request charged, or the first refund's op id: unique, since every charge and
    /// refund is applied once.
    pub(super) item: String,
    pub(super) user: String,
    pub(super) node: String,
    pub(super) refund: bool,
    pub(super) amount: Money,
    pub(super) tokens: u64,
    pub(super) requests: u64,
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
            && self.settle.is_empty()
    }

    /// Adds a charge (or refund) of `amount` from `user` to `node` to the pair's settlement
    /// item, starting one named `item` if the pair has none yet in this set.
    pub(super) fn settle(
        &mut self,
        item: &str,
        (user, node): (&str, &str),
        refund: bool,
        amount: Money,
        tokens: u64,
    ) {
        if let Some(ix) = self.settle_index.get(user) {
            for &i in ix {
                let s = &mut self.settle[i];
                if s.node == node
                    && s.refund == refund
                    && let Some(sum) = s.amount.checked_add(amount)
                {
                    s.amount = sum;
                    s.tokens = s.tokens.saturating_add(tokens);
                    s.requests += 1;
                    return;
                }
            }
        }
        // A new pair (or, never in practice, a sum past Money's range: a new item).
        self.settle_index
            .entry(user.to_owned())
            .or_default()
            .push(self.settle.len());
        self.settle.push(SettleItem {
            item: item.to_owned(),
            user: user.to_owned(),
            node: node.to_owned(),
            refund,
            amount,
            tokens,
            requests: 1,
        });
    }

    /// Moves the append-only rows (journal lines, grants, usage records, settlement items) of
    /// `from` into this set.
    pub(super) fn set_appended(&mut self, from: WriteSet) {
        self.postings = from.postings;
        self.grants = from.grants;
        self.usages = from.usages;
        self.settle = from.settle;
        self.settle_index = from.settle_index;
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

    /// The exclusive writer's form of a cut: open holds are left out, as if every one of them
    /// were released. Its holds live only in its memory (it is the only writer, so nothing else
    /// needs them), so the database holds settled state: a user's row is their available plus
    /// held credit, held rows and keys' reservations are zero, no hold rows are written, and the
    /// journal has a charge's legs netted in its `charges` row (see [`net_postings`]). A crash
    /// thus loses open holds the way a release would give them back, with nothing to sweep at
    /// the next start; and a request writes one row (its charge with its usage record), no hold
    /// rows and no journal rows.
    pub(super) fn net_holds(&mut self, ledger: &Ledger) {
        let mut users: BTreeSet<String> = BTreeSet::new();
        self.balances.retain(|(a, _)| match a {
            Account::User(u) | Account::Held(u) => {
                users.insert(u.clone());
                false
            }
            _ => true,
        });
        for u in users {
            let held = ledger.balance(&Account::Held(u.clone()));
            let user = Account::User(u);
            // Cannot overflow: every internal balance is part of what was issued, a Money.
            let v = ledger.balance(&user).checked_add(held).unwrap_or(held);
            self.balances.push((user, v));
        }
        self.balances.sort();
        // None of them is on disk: holds found there are released before this writer starts.
        self.holds_added.clear();
        self.holds_removed.clear();
        for (_, u) in &mut self.keys {
            u.held = Money::ZERO;
        }
    }
}

/// An applied operation's journal legs as the exclusive writer records them in `journal` (see
/// [`WriteSet::net_holds`]): a hold or release moves nothing on disk, and a charge's legs are
/// its `charges` row — its node, pool and treasury parts paid from the user's credit directly
/// (`held → node` is `user → node` once the hold is netted, and the leg giving the rest back,
/// `held → user`, disappears) — which the `journal_lines` view expands (migration 0007), so
/// they are not written twice.
pub(super) fn net_postings<'a>(
    op: &'a Op,
    postings: &'a [Posting],
) -> impl Iterator<Item = Posting> + 'a {
    let journaled = !matches!(op, Op::Hold { .. } | Op::Release { .. } | Op::Charge { .. });
    postings.iter().filter(move |_| journaled).cloned()
}

/// A bound value of an insert.
pub(super) enum V<'a> {
    T(Cow<'a, str>),
    O(Option<&'a str>),
    I(i64),
    /// An integer or NULL.
    N(Option<i64>),
}

fn int(v: u64) -> V<'static> {
    V::I(i64::try_from(v).unwrap_or(i64::MAX))
}

fn text<'a>(s: &'a str) -> V<'a> {
    V::T(Cow::Borrowed(s))
}

fn owned(s: String) -> V<'static> {
    V::T(Cow::Owned(s))
}

/// An upsert or append into one table: `HEAD (…) TAIL`, with `cols` values per row.
pub(super) struct Insert {
    pub(super) head: &'static str,
    pub(super) cols: usize,
    pub(super) tail: &'static str,
}

impl Insert {
    /// What follows the rows. A retried write (whose earlier attempt may have committed)
    /// appends nothing twice: upserts store values, not increments, and appends skip rows
    /// that are there. The one increment, [`USAGE`], is guarded by the writers instead: a retry
    /// of a cut that had committed writes nothing ([`first_new_charge`]).
    pub(super) fn tail(&self, retry: bool) -> &'static str {
        if retry && self.tail.is_empty() {
            "ON CONFLICT DO NOTHING"
        } else {
            self.tail
        }
    }

    /// The single-row statement with anonymous placeholders (SQLite).
    pub(super) fn one_row(&self, retry: bool) -> String {
        format!(
            "{} ({}) {}",
            self.head,
            Backend::Sqlite.placeholders(1, self.cols),
            self.tail(retry)
        )
    }
}

const BALANCES: Insert = Insert {
    head: "INSERT INTO balances (account, amount) VALUES",
    cols: 2,
    tail: "ON CONFLICT (account) DO UPDATE SET amount = excluded.amount",
};
const HOLDS: Insert = Insert {
    head: "INSERT INTO holds (request_id, user_id, key_id, amount, expires_at, owner) VALUES",
    cols: 6,
    tail: "ON CONFLICT (request_id) DO UPDATE SET user_id = excluded.user_id, key_id = excluded.key_id,
         amount = excluded.amount, owner = excluded.owner, expires_at = excluded.expires_at",
};
/// A charge with its usage record (migration 0008). A charge written again (refunded) keeps its
/// usage: only `refunded` changes.
const CHARGES: Insert = Insert {
    head: "INSERT INTO charges (request_id, user_id, key_id, node, amount, node_part, pool_part, treasury_part, refunded, created_at, model, prompt_tokens, completion_tokens, day, receipt) VALUES",
    cols: 15,
    tail: "ON CONFLICT (request_id) DO UPDATE SET refunded = excluded.refunded",
};
const NEW_CHARGES: Insert = Insert {
    tail: "",
    ..CHARGES
};
const KEYS: Insert = Insert {
    head: "INSERT INTO key_usage (key_id, spent, held) VALUES",
    cols: 3,
    tail: "ON CONFLICT (key_id) DO UPDATE SET spent = excluded.spent, held = excluded.held",
};
const APPLIED: Insert = Insert {
    head: "INSERT INTO applied_ops (op, created_at) VALUES",
    cols: 2,
    tail: "",
};
const EXTERNALS: Insert = Insert {
    head: "INSERT INTO external_totals (account, issued, redeemed) VALUES",
    cols: 3,
    tail: "ON CONFLICT (account) DO UPDATE SET issued = excluded.issued, redeemed = excluded.redeemed",
};
const JOURNAL: Insert = Insert {
    head: "INSERT INTO journal (op, leg, debit, credit, amount, created_at) VALUES",
    cols: 6,
    tail: "",
};
const GRANTS: Insert = Insert {
    head: "INSERT INTO chain_grants (op, user_id, amount, created_at) VALUES",
    cols: 4,
    tail: "",
};
const SETTLE: Insert = Insert {
    head: "INSERT INTO settle_items (item, user_id, node, amount, refund, tokens, requests, created_at) VALUES",
    cols: 8,
    tail: "",
};

const BATCHES: Insert = Insert {
    head: "INSERT INTO receipt_batches (root, node, signature, leaves, created_at) VALUES",
    cols: 5,
    tail: "ON CONFLICT (root) DO NOTHING",
};

/// Adds a cut's new charges to their day's usage totals (migration 0009): one row per (user,
/// day, model, node, key) and cut, added to the stored one. An increment, so a retried write
/// must not run it twice: writers skip a retried cut that had committed ([`first_new_charge`]).
const USAGE: Insert = Insert {
    head: "INSERT INTO usage_daily (user_id, day, model, node, key_id, requests, prompt_tokens, completion_tokens, amount_hi, amount_lo) VALUES",
    cols: 10,
    tail: "ON CONFLICT (user_id, day, model, node, key_id) DO UPDATE SET
         requests = usage_daily.requests + excluded.requests,
         prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens,
         completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens,
         amount_hi = usage_daily.amount_hi + excluded.amount_hi
                     + (usage_daily.amount_lo + excluded.amount_lo) / 1000000000000000000,
         amount_lo = (usage_daily.amount_lo + excluded.amount_lo) % 1000000000000000000",
};

/// `usage_daily` stores money as `amount_hi * AMOUNT_SPLIT + amount_lo`.
pub(crate) const AMOUNT_SPLIT: u128 = 1_000_000_000_000_000_000;

/// A charge whose row this cut inserts (not upserts), if any: present in the database, it
/// shows that an earlier attempt at the cut committed (a cut is one transaction).
pub(super) fn first_new_charge(ws: &WriteSet) -> Option<&str> {
    let charged: HashSet<&str> = ws.charges.iter().map(|(r, _)| r.as_str()).collect();
    ws.usages
        .iter()
        .map(|u| u.request_id.as_str())
        .find(|r| charged.contains(r))
}

/// One `usage_daily` increment: requests, prompt and completion tokens, cost.
#[derive(Default)]
struct UsageSum {
    requests: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost: Money,
}

/// Removes holds that were charged or released.
pub(super) const DELETE_HOLD: &str = "DELETE FROM holds WHERE request_id = ?";

/// The rows of a [`WriteSet`] as inserts, in the order they are written (`t`: now, unix
/// seconds; `owner`: the replica that places the holds). Every writer deletes the cut's removed
/// holds before these: a removed hold is never among the added ones (request ids hold once).
pub(super) fn inserts<'a>(
    ws: &'a WriteSet,
    t: i64,
    owner: &'a str,
) -> Vec<(&'static Insert, Vec<Vec<V<'a>>>)> {
    let day = day_of(t);
    let usage: HashMap<&str, &UsageRecord> = ws
        .usages
        .iter()
        .map(|u| (u.request_id.as_str(), u))
        .collect();
    // A charge whose usage record is in this set was made since the last one: its row is new
    // (a plain insert, which PostgreSQL does in ~3/4 of an upsert's time). The rest (refunds,
    // charges posted without a usage record) are upserts.
    let mut charges: (Vec<Vec<V<'a>>>, Vec<Vec<V<'a>>>) = (Vec::new(), Vec::new());
    // (user, model, node, key) → the cut's totals; all of a cut's rows are made on `day`. In key
    // order, so writers sharing a PostgreSQL database lock these rows in one order.
    let mut sums: BTreeMap<(&str, &str, &str, &str), UsageSum> = BTreeMap::new();
    for (r, c) in &ws.charges {
        let mut row = vec![
            text(r),
            text(&c.user),
            V::O(c.key.as_deref()),
            text(&c.node),
            owned(c.amount.to_string()),
            owned(c.node_part.to_string()),
            owned(c.pool_part.to_string()),
            owned(c.treasury_part.to_string()),
            V::I(i64::from(c.refunded)),
            V::I(t),
        ];
        match usage.get(r.as_str()).copied() {
            Some(u) => {
                let sum = sums
                    .entry((&c.user, &u.model, &c.node, c.key.as_deref().unwrap_or("")))
                    .or_default();
                sum.requests += 1;
                sum.prompt_tokens = sum.prompt_tokens.saturating_add(u.prompt_tokens);
                sum.completion_tokens = sum.completion_tokens.saturating_add(u.completion_tokens);
                // Saturates rather than drops (u128 units exceed any supply of LAI).
                sum.cost = Money::from_units(sum.cost.units().saturating_add(c.amount.units()));
                row.extend([
                    text(&u.model),
                    int(u.prompt_tokens),
                    int(u.completion_tokens),
                    owned(day.clone()),
                    text(&u.receipt),
                ]);
                charges.0.push(row);
            }
            None => {
                row.extend([V::O(None), V::N(None), V::N(None), V::O(None), V::O(None)]);
                charges.1.push(row);
            }
        }
    }
    vec![
        (
            &BALANCES,
            ws.balances
                .iter()
                .map(|(a, v)| vec![owned(a.key()), owned(v.to_string())])
                .collect(),
        ),
        (
            &HOLDS,
            ws.holds_added
                .iter()
                .map(|(r, h, expires)| {
                    vec![
                        text(r),
                        text(&h.user),
                        V::O(h.key.as_deref()),
                        owned(h.amount.to_string()),
                        V::I(*expires),
                        text(owner),
                    ]
                })
                .collect(),
        ),
        (&NEW_CHARGES, charges.0),
        (&CHARGES, charges.1),
        (
            &KEYS,
            ws.keys
                .iter()
                .map(|(k, u)| {
                    vec![
                        text(k),
                        owned(u.spent.to_string()),
                        owned(u.held.to_string()),
                    ]
                })
                .collect(),
        ),
        (
            &APPLIED,
            ws.applied
                .iter()
                .map(|op| vec![text(op), V::I(t)])
                .collect(),
        ),
        (
            &EXTERNALS,
            ws.externals
                .iter()
                .map(|(a, issued, redeemed)| {
                    vec![
                        owned(a.key()),
                        owned(issued.to_string()),
                        owned(redeemed.to_string()),
                    ]
                })
                .collect(),
        ),
        (
            &JOURNAL,
            ws.postings
                .iter()
                .map(|(leg, p)| {
                    vec![
                        text(&p.op),
                        int(*leg as u64),
                        owned(p.debit.key()),
                        owned(p.credit.key()),
                        owned(p.amount.to_string()),
                        V::I(t),
                    ]
                })
                .collect(),
        ),
        (
            &GRANTS,
            ws.grants
                .iter()
                .map(|(op, user, amount)| {
                    vec![text(op), text(user), owned(amount.to_string()), V::I(t)]
                })
                .collect(),
        ),
        (
            &SETTLE,
            ws.settle
                .iter()
                .map(|s| {
                    vec![
                        text(&s.item),
                        text(&s.user),
                        text(&s.node),
                        owned(s.amount.to_string()),
                        V::I(i64::from(s.refund)),
                        int(s.tokens),
                        int(s.requests),
                        V::I(t),
                    ]
                })
                .collect(),
        ),
        (&BATCHES, batch_rows(&ws.usages, t)),
        (
            &USAGE,
            sums.into_iter()
                .map(|((user, model, node, key), s)| {
                    let units = s.cost.units();
                    vec![
                        text(user),
                        owned(day.clone()),
                        text(model),
                        text(node),
                        text(key),
                        int(s.requests),
                        int(s.prompt_tokens),
                        int(s.completion_tokens),
                        V::I(i64::try_from(units / AMOUNT_SPLIT).unwrap_or(i64::MAX)),
                        V::I(i64::try_from(units % AMOUNT_SPLIT).unwrap_or(0)),
                    ]
                })
                .collect(),
        ),
    ]
}

/// The receipt batches the usage records name, each once (a batch's charges may span cuts:
/// the later ones find it written).
fn batch_rows(usages: &[UsageRecord], t: i64) -> Vec<Vec<V<'_>>> {
    let mut seen: HashSet<&str> = HashSet::default();
    usages
        .iter()
        .filter_map(|u| u.batch.as_deref())
        .filter(|b| seen.insert(&b.root))
        .map(|b| {
            vec![
                text(&b.root),
                text(&b.node),
                text(&b.signature),
                owned(b.leaves.iter().map(hex::encode).collect()),
                V::I(t),
            ]
        })
        .collect()
}

/// Writes a [`WriteSet`] inside `tx` (the caller commits), each table with a few multi-row
/// statements (`retry`: an earlier attempt may have committed it).
pub(super) async fn write_back(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    ws: &WriteSet,
    t: i64,
    owner: &str,
    retry: bool,
) -> Result<(), StoreError> {
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
    for (ins, rows) in inserts(ws, t, owner) {
        insert_rows(tx, backend, ins, rows, retry).await?;
    }
    Ok(())
}

/// `HEAD (…), (…), … TAIL` in chunks of at most ~1,000 parameters (every SQLite and PostgreSQL
/// accepts that many).
async fn insert_rows(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    ins: &Insert,
    rows: Vec<Vec<V<'_>>>,
    retry: bool,
) -> Result<(), StoreError> {
    let cols = ins.cols;
    let per = (1000 / cols.max(1)).max(1);
    for chunk in rows.chunks(per) {
        let mut sql =
            String::with_capacity(ins.head.len() + chunk.len() * cols * 5 + ins.tail(retry).len());
        sql.push_str(ins.head);
        for (i, _) in chunk.iter().enumerate() {
            sql.push_str(if i == 0 { " (" } else { ", (" });
            sql.push_str(&backend.placeholders(i * cols + 1, cols));
            sql.push(')');
        }
        sql.push(' ');
        sql.push_str(ins.tail(retry));
        let mut q = sqlx::query(&sql);
        for row in chunk {
            for v in row {
                q = match v {
                    V::T(s) => q.bind(s.as_ref()),
                    V::O(s) => q.bind(*s),
                    V::I(i) => q.bind(*i),
                    V::N(i) => q.bind(*i),
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
        let mut out = HashMap::default();
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
        let mut out = HashMap::default();
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
        let mut out = HashMap::default();
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
        let mut out = HashMap::default();
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

#[cfg(test)]
mod tests {
    use lattice_ledger::{Applied, Split};

    use super::*;

    fn posted(l: &mut Ledger, op: &Op) -> Vec<Posting> {
        match l.apply(op) {
            Ok(Applied::Posted(p)) => p,
            other => panic!("{other:?}"),
        }
    }

    /// A batch's charges become one settlement item per (user, node), named by its first
    /// request, and its refunds one per pair the other way.
    #[test]
    fn settlement_items_net_a_batch_per_pair() {
        let mut l = Ledger::default();
        posted(
            &mut l,
            &Op::Faucet {
                op: "f".into(),
                user: "u".into(),
                amount: Money::from_units(1_000),
            },
        );
        let mut ws = WriteSet::default();
        let mut apply = |l: &mut Ledger, op: Op, tokens: u64| {
            let p = posted(l, &op);
            let usage = (tokens > 0).then(|| UsageRecord {
                request_id: op.request().unwrap_or_default().to_owned(),
                user_id: "u".into(),
                key_id: None,
                node: "n".into(),
                model: "m".into(),
                prompt_tokens: tokens,
                completion_tokens: 1,
                receipt: String::new(),
                batch: None,
            });
            super::super::side_rows(&mut ws, l, &op, usage, p.into_iter());
        };
        for (r, node, units) in [("a", "n", 100), ("b", "n", 100), ("c", "m", 50)] {
            apply(
                &mut l,
                Op::Hold {
                    request: r.into(),
                    user: "u".into(),
                    key: None,
                    amount: Money::from_units(200),
                },
                0,
            );
            apply(
                &mut l,
                Op::Charge {
                    request: r.into(),
                    user: "u".into(),
                    node: node.into(),
                    amount: Money::from_units(units),
                    split: Split::default(),
                },
                9,
            );
        }
        apply(
            &mut l,
            Op::Refund {
                request: "b".into(),
            },
            0,
        );
        let items: Vec<(&str, &str, bool, u128, u64, u64)> = ws
            .settle
            .iter()
            .map(|s| {
                assert_eq!(s.user, "u");
                (
                    s.item.as_str(),
                    s.node.as_str(),
                    s.refund,
                    s.amount.units(),
                    s.tokens,
                    s.requests,
                )
            })
            .collect();
        assert_eq!(
            items,
            vec![
                ("a", "n", false, 200, 20, 2),
                ("c", "m", false, 50, 10, 1),
                ("refund:b", "n", true, 100, 0, 1),
            ]
        );
    }

    /// Netting a hold and its charge leaves the charge's row (whose parts are its journal legs,
    /// paid from the user's credit) and balances that add up to the same total with nothing held.
    #[test]
    fn a_netted_cut_records_settled_state() {
        let mut l = Ledger::default();
        let faucet = Op::Faucet {
            op: "f".into(),
            user: "u".into(),
            amount: Money::from_units(1_000),
        };
        posted(&mut l, &faucet);
        let hold = |r: &str| Op::Hold {
            request: r.into(),
            user: "u".into(),
            key: Some(("k".into(), None)),
            amount: Money::from_units(300),
        };
        let charge = Op::Charge {
            request: "a".into(),
            user: "u".into(),
            node: "n".into(),
            amount: Money::from_units(100),
            split: Split::default(),
        };
        let mut legs: Vec<Posting> = Vec::new();
        for op in [hold("a"), charge.clone(), hold("b")] {
            let p = posted(&mut l, &op);
            legs.extend(net_postings(&op, &p));
        }
        // Nothing for `journal`: the charge's legs are its row's parts.
        assert!(legs.is_empty(), "{legs:?}");
        let user = Account::User("u".into());
        // In memory "b" holds 300; on disk the user has it back.
        assert_eq!(l.balance(&user), Money::from_units(600));
        let mut cut = WriteSet::cut(&mut l, |_| 0);
        cut.net_holds(&l);
        assert!(cut.holds_added.is_empty());
        assert!(
            cut.balances
                .iter()
                .all(|(a, _)| !matches!(a, Account::Held(_)))
        );
        assert!(cut.balances.contains(&(user, Money::from_units(900))));
        let total: u128 = cut.balances.iter().map(|(_, v)| v.units()).sum();
        assert_eq!(total, 1_000);
        let parts: Vec<(&str, u128, u128, u128)> = cut
            .charges
            .iter()
            .map(|(r, c)| {
                (
                    r.as_str(),
                    c.node_part.units(),
                    c.pool_part.units(),
                    c.treasury_part.units(),
                )
            })
            .collect();
        assert_eq!(parts, vec![("a", 90, 5, 5)]);
        assert_eq!(cut.keys[0].1.held, Money::ZERO);
        assert_eq!(cut.keys[0].1.spent, Money::from_units(100));
    }
}
