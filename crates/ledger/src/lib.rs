//! The off-chain ledger's rules, with no I/O: Nexus's store loads the rows an operation touches
//! into a [`Ledger`], applies operations, and writes back what changed in one transaction.
//!
//! Every movement is a [`Posting`] from one account to another, tagged with the operation's id
//! (a request id for holds and charges), so the journal is double-entry by construction and
//! `Σ internal balances = Σ deposits + Σ faucet − Σ withdrawals` always holds.

mod money;

use std::collections::{HashMap as StdMap, HashSet as StdSet};

use serde::{Deserialize, Serialize};

pub use money::{Money, ParseMoneyError, Rate, UNITS_PER_LAI};

/// The ledger's maps: std's with foldhash's hasher (seeded per process), cheaper than SipHash on
/// these short string keys (a hold and its charge in memory: 3.3 → 2.2 µs). Their keys are
/// Nexus's own: request ids it generates for paid requests, user and key ids, node addresses
/// (derived from keys, so not aimable at an unknown seed); none is a string a client or node
/// picks freely. Maps keyed by such strings (e.g. receipts' request ids) keep SipHash.
pub type HashMap<K, V> = StdMap<K, V, foldhash::fast::RandomState>;
pub type HashSet<K> = StdSet<K, foldhash::fast::RandomState>;

/// Where money sits. External accounts (`Faucet`, `Chain`) are sources and sinks and carry no
/// balance; every other account's balance is a non-negative [`Money`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Account {
    /// A user's spendable credit.
    User(String),
    /// Credit of a user reserved by in-flight requests.
    Held(String),
    /// A node operator's earnings, by node address.
    Node(String),
    /// Stakers' share of a node's earnings, by node address.
    Pool(String),
    /// The network's maintenance share.
    Treasury,
    /// Starter credit comes from here.
    Faucet,
    /// Deposits come from and withdrawals go to the chain.
    Chain,
}

impl Account {
    pub fn is_external(&self) -> bool {
        matches!(self, Account::Faucet | Account::Chain)
    }

    /// Stable text form used as a database key: `user:ID`, `held:ID`, `node:ADDR`, `pool:ADDR`,
    /// `treasury`, `faucet`, `chain`.
    pub fn key(&self) -> String {
        match self {
            Account::User(id) => format!("user:{id}"),
            Account::Held(id) => format!("held:{id}"),
            Account::Node(a) => format!("node:{a}"),
            Account::Pool(a) => format!("pool:{a}"),
            Account::Treasury => "treasury".into(),
            Account::Faucet => "faucet".into(),
            Account::Chain => "chain".into(),
        }
    }

    pub fn from_key(key: &str) -> Option<Account> {
        Some(match key.split_once(':') {
            Some(("user", id)) => Account::User(id.to_owned()),
            Some(("held", id)) => Account::Held(id.to_owned()),
            Some(("node", a)) => Account::Node(a.to_owned()),
            Some(("pool", a)) => Account::Pool(a.to_owned()),
            None if key == "treasury" => Account::Treasury,
            None if key == "faucet" => Account::Faucet,
            None if key == "chain" => Account::Chain,
            _ => return None,
        })
    }
}

/// One line of the journal: `amount` moved from `debit` to `credit` by operation `op`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posting {
    pub op: String,
    pub debit: Account,
    pub credit: Account,
    pub amount: Money,
}

/// How a charge is divided, in basis points; the node and pool shares are rounded down and the
/// treasury takes the remainder, so the parts always add up to the charge exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub node_bps: u16,
    pub pool_bps: u16,
    pub treasury_bps: u16,
}

impl Split {
    pub fn new(node_bps: u16, pool_bps: u16, treasury_bps: u16) -> Result<Self, LedgerError> {
        let sum = u32::from(node_bps) + u32::from(pool_bps) + u32::from(treasury_bps);
        if sum != 10_000 {
            return Err(LedgerError::BadSplit(sum));
        }
        Ok(Self {
            node_bps,
            pool_bps,
            treasury_bps,
        })
    }

    /// (node, pool, treasury) parts of `amount`.
    pub fn parts(&self, amount: Money) -> (Money, Money, Money) {
        let node = amount
            .mul_div(u128::from(self.node_bps), 10_000)
            .unwrap_or(Money::ZERO);
        let pool = amount
            .mul_div(u128::from(self.pool_bps), 10_000)
            .unwrap_or(Money::ZERO);
        let treasury = amount
            .checked_sub(node)
            .and_then(|r| r.checked_sub(pool))
            .unwrap_or(Money::ZERO);
        (node, pool, treasury)
    }
}

impl Default for Split {
    /// 90 % to the node, 5 % to its staking pool, 5 % to the treasury.
    fn default() -> Self {
        Self {
            node_bps: 9_000,
            pool_bps: 500,
            treasury_bps: 500,
        }
    }
}

/// Credit reserved for one request until it is charged or released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub user: String,
    pub key: Option<String>,
    pub amount: Money,
}

/// A settled charge, kept so a replay is recognised and a refund can reverse it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    pub user: String,
    pub key: Option<String>,
    pub node: String,
    pub amount: Money,
    pub node_part: Money,
    pub pool_part: Money,
    pub treasury_part: Money,
    pub refunded: bool,
}

/// What an API key has spent and has reserved, for its optional spending limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KeyUsage {
    pub spent: Money,
    pub held: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Credit arriving from the chain (once per on-chain event id).
    Deposit {
        op: String,
        user: String,
        amount: Money,
    },
    /// Starter credit (once per identity; the caller picks `op`).
    Faucet {
        op: String,
        user: String,
        amount: Money,
    },
    Withdraw {
        op: String,
        user: String,
        amount: Money,
    },
    /// Reserve the most a request can cost before it is routed.
    Hold {
        request: String,
        user: String,
        /// The API key and its spending limit, if the key has one.
        key: Option<(String, Option<Money>)>,
        amount: Money,
    },
    /// Charge the actual cost of a held request and release the rest.
    Charge {
        request: String,
        user: String,
        node: String,
        amount: Money,
        split: Split,
    },
    /// Give a held request's credit back in full (failure, no receipt, crash recovery).
    Release { request: String },
    /// Reverse a charge entirely (a dispute upheld).
    Refund { request: String },
}

impl Op {
    /// The id postings of this operation carry; also its idempotency key.
    pub fn id(&self) -> String {
        match self {
            Op::Deposit { op, .. } | Op::Faucet { op, .. } | Op::Withdraw { op, .. } => op.clone(),
            Op::Hold { request, .. } => format!("hold:{request}"),
            Op::Charge { request, .. } => format!("charge:{request}"),
            Op::Release { request } => format!("release:{request}"),
            Op::Refund { request } => format!("refund:{request}"),
        }
    }

    /// The request this operation is about, if any.
    pub fn request(&self) -> Option<&str> {
        match self {
            Op::Hold { request, .. }
            | Op::Charge { request, .. }
            | Op::Release { request }
            | Op::Refund { request } => Some(request),
            _ => None,
        }
    }
}

/// What applying an operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Postings were added to the journal.
    Posted(Vec<Posting>),
    /// The operation had already been applied (or its request already settled): nothing moved.
    Duplicate,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("insufficient credit: {needed} units needed, {available} available")]
    InsufficientFunds { needed: Money, available: Money },
    #[error("the API key's spending limit of {limit} units would be exceeded")]
    KeyLimitExceeded { limit: Money },
    #[error("request {0} already holds credit")]
    DuplicateHold(String),
    #[error("no credit is held for request {0}")]
    NoHold(String),
    #[error("charge of {charge} units exceeds the {held} held for the request")]
    ChargeExceedsHold { charge: Money, held: Money },
    #[error("request {request} is held for another user")]
    WrongUser { request: String },
    #[error("nothing was charged for request {0}")]
    NotCharged(String),
    #[error("node {node} cannot cover the refund ({needed} units needed)")]
    RefundUncovered { node: String, needed: Money },
    #[error("fee split adds up to {0} basis points, not 10000")]
    BadSplit(u32),
    #[error("amount overflow")]
    Overflow,
}

/// The ledger's state, or the slice of it an operation batch touches. Missing balances are zero.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    pub balances: HashMap<Account, Money>,
    pub holds: HashMap<String, Hold>,
    pub charges: HashMap<String, Charge>,
    pub keys: HashMap<String, KeyUsage>,
    /// Ids of applied deposits, faucet grants, withdrawals and refunds.
    pub applied: HashSet<String>,
    /// Totals that came in from or went out to external accounts.
    pub issued: HashMap<Account, Money>,
    pub redeemed: HashMap<Account, Money>,
    /// What changed since the last [`Ledger::take_changes`].
    changes: Changes,
}

/// Keys whose rows must be written back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub balances: HashSet<Account>,
    pub holds_added: HashSet<String>,
    pub holds_removed: HashSet<String>,
    pub charges: HashSet<String>,
    pub keys: HashSet<String>,
    pub applied: HashSet<String>,
}

impl Ledger {
    pub fn balance(&self, account: &Account) -> Money {
        self.balances.get(account).copied().unwrap_or_default()
    }

    /// Applies one operation: either all of its postings or none.
    pub fn apply(&mut self, op: &Op) -> Result<Applied, LedgerError> {
        let id = op.id();
        match op {
            Op::Deposit { user, amount, .. } => {
                self.once(&id, Account::Chain, Account::User(user.clone()), *amount)
            }
            Op::Faucet { user, amount, .. } => {
                self.once(&id, Account::Faucet, Account::User(user.clone()), *amount)
            }
            Op::Withdraw { user, amount, .. } => {
                if self.applied.contains(&id) {
                    return Ok(Applied::Duplicate);
                }
                let from = Account::User(user.clone());
                let available = self.balance(&from);
                if available < *amount {
                    return Err(LedgerError::InsufficientFunds {
                        needed: *amount,
                        available,
                    });
                }
                let p = self.post(vec![(from, Account::Chain, *amount)], &id)?;
                self.mark_applied(id);
                Ok(Applied::Posted(p))
            }
            Op::Hold {
                request,
                user,
                key,
                amount,
            } => self.hold(&id, request, user, key.as_ref(), *amount),
            Op::Charge {
                request,
                user,
                node,
                amount,
                split,
            } => self.charge(&id, request, user, node, *amount, split),
            Op::Release { request } => {
                let Some(hold) = self.holds.get(request).cloned() else {
                    // Charged, released before, or never held: nothing to give back.
                    return Ok(Applied::Duplicate);
                };
                let p = self.post(
                    vec![(
                        Account::Held(hold.user.clone()),
                        Account::User(hold.user.clone()),
                        hold.amount,
                    )],
                    &id,
                )?;
                self.unhold(request, &hold, None)?;
                Ok(Applied::Posted(p))
            }
            Op::Refund { request } => self.refund(&id, request),
        }
    }

    fn once(
        &mut self,
        id: &str,
        from: Account,
        to: Account,
        amount: Money,
    ) -> Result<Applied, LedgerError> {
        if self.applied.contains(id) {
            return Ok(Applied::Duplicate);
        }
        let p = self.post(vec![(from, to, amount)], id)?;
        self.mark_applied(id.to_owned());
        Ok(Applied::Posted(p))
    }

    fn hold(
        &mut self,
        id: &str,
        request: &str,
        user: &str,
        key: Option<&(String, Option<Money>)>,
        amount: Money,
    ) -> Result<Applied, LedgerError> {
        if self.holds.contains_key(request) || self.charges.contains_key(request) {
            return Err(LedgerError::DuplicateHold(request.to_owned()));
        }
        let available = self.balance(&Account::User(user.to_owned()));
        if available < amount {
            return Err(LedgerError::InsufficientFunds {
                needed: amount,
                available,
            });
        }
        let mut key_usage = None;
        if let Some((key_id, limit)) = key {
            let mut usage = self.keys.get(key_id).copied().unwrap_or_default();
            let committed = usage
                .spent
                .checked_add(usage.held)
                .and_then(|c| c.checked_add(amount))
                .ok_or(LedgerError::Overflow)?;
            if let Some(limit) = limit
                && committed > *limit
            {
                return Err(LedgerError::KeyLimitExceeded { limit: *limit });
            }
            usage.held = usage
                .held
                .checked_add(amount)
                .ok_or(LedgerError::Overflow)?;
            key_usage = Some((key_id.clone(), usage));
        }
        let p = self.post(
            vec![(
                Account::User(user.to_owned()),
                Account::Held(user.to_owned()),
                amount,
            )],
            id,
        )?;
        if let Some((key_id, usage)) = key_usage {
            self.keys.insert(key_id.clone(), usage);
            self.changes.keys.insert(key_id);
        }
        self.holds.insert(
            request.to_owned(),
            Hold {
                user: user.to_owned(),
                key: key.map(|(k, _)| k.clone()),
                amount,
            },
        );
        self.changes.holds_removed.remove(request);
        self.changes.holds_added.insert(request.to_owned());
        Ok(Applied::Posted(p))
    }

    fn charge(
        &mut self,
        id: &str,
        request: &str,
        user: &str,
        node: &str,
        amount: Money,
        split: &Split,
    ) -> Result<Applied, LedgerError> {
        if self.charges.contains_key(request) {
            return Ok(Applied::Duplicate);
        }
        let hold = self
            .holds
            .get(request)
            .cloned()
            .ok_or_else(|| LedgerError::NoHold(request.to_owned()))?;
        if hold.user != user {
            return Err(LedgerError::WrongUser {
                request: request.to_owned(),
            });
        }
        let rest = hold
            .amount
            .checked_sub(amount)
            .ok_or(LedgerError::ChargeExceedsHold {
                charge: amount,
                held: hold.amount,
            })?;
        let (node_part, pool_part, treasury_part) = split.parts(amount);
        let held = Account::Held(user.to_owned());
        let p = self.post(
            vec![
                (held.clone(), Account::Node(node.to_owned()), node_part),
                (held.clone(), Account::Pool(node.to_owned()), pool_part),
                (held.clone(), Account::Treasury, treasury_part),
                (held, Account::User(user.to_owned()), rest),
            ],
            id,
        )?;
        self.unhold(request, &hold, Some(amount))?;
        self.charges.insert(
            request.to_owned(),
            Charge {
                user: user.to_owned(),
                key: hold.key.clone(),
                node: node.to_owned(),
                amount,
                node_part,
                pool_part,
                treasury_part,
                refunded: false,
            },
        );
        self.changes.charges.insert(request.to_owned());
        Ok(Applied::Posted(p))
    }

    fn refund(&mut self, id: &str, request: &str) -> Result<Applied, LedgerError> {
        let Some(charge) = self.charges.get(request).cloned() else {
            return Err(LedgerError::NotCharged(request.to_owned()));
        };
        if charge.refunded {
            return Ok(Applied::Duplicate);
        }
        let node = Account::Node(charge.node.clone());
        if self.balance(&node) < charge.node_part {
            return Err(LedgerError::RefundUncovered {
                node: charge.node.clone(),
                needed: charge.node_part,
            });
        }
        let pool = Account::Pool(charge.node.clone());
        if self.balance(&pool) < charge.pool_part {
            return Err(LedgerError::RefundUncovered {
                node: charge.node.clone(),
                needed: charge.pool_part,
            });
        }
        let user = Account::User(charge.user.clone());
        let p = self.post(
            vec![
                (node, user.clone(), charge.node_part),
                (pool, user.clone(), charge.pool_part),
                (Account::Treasury, user, charge.treasury_part),
            ],
            id,
        )?;
        if let Some(k) = &charge.key
            && let Some(u) = self.keys.get_mut(k)
        {
            u.spent = u.spent.checked_sub(charge.amount).unwrap_or(Money::ZERO);
            self.changes.keys.insert(k.clone());
        }
        if let Some(c) = self.charges.get_mut(request) {
            c.refunded = true;
        }
        self.changes.charges.insert(request.to_owned());
        Ok(Applied::Posted(p))
    }

    /// Removes a hold, moving its amount out of the key's reservation (and `spent` into the
    /// key's spending when charged).
    fn unhold(
        &mut self,
        request: &str,
        hold: &Hold,
        spent: Option<Money>,
    ) -> Result<(), LedgerError> {
        if let Some(k) = &hold.key {
            let mut u = self.keys.get(k).copied().unwrap_or_default();
            u.held = u.held.checked_sub(hold.amount).unwrap_or(Money::ZERO);
            if let Some(s) = spent {
                u.spent = u.spent.checked_add(s).ok_or(LedgerError::Overflow)?;
            }
            self.keys.insert(k.clone(), u);
            self.changes.keys.insert(k.clone());
        }
        self.holds.remove(request);
        if !self.changes.holds_added.remove(request) {
            self.changes.holds_removed.insert(request.to_owned());
        }
        Ok(())
    }

    /// Checks every movement first, then applies them all: an operation never half-applies.
    fn post(
        &mut self,
        moves: Vec<(Account, Account, Money)>,
        op: &str,
    ) -> Result<Vec<Posting>, LedgerError> {
        let moves: Vec<_> = moves.into_iter().filter(|m| !m.2.is_zero()).collect();
        // An operation has at most a handful of legs: the accounts it touches are looked up in
        // small vectors (no hashing, no allocation beyond them).
        let mut next: Vec<(&Account, Money)> = Vec::with_capacity(moves.len() + 1);
        let mut ext_in: Vec<(&Account, Money)> = Vec::new();
        let mut ext_out: Vec<(&Account, Money)> = Vec::new();
        fn slot<'a>(
            v: &mut Vec<(&'a Account, Money)>,
            a: &'a Account,
            start: impl FnOnce() -> Money,
        ) -> usize {
            match v.iter().position(|(x, _)| *x == a) {
                Some(i) => i,
                None => {
                    v.push((a, start()));
                    v.len() - 1
                }
            }
        }
        for (from, to, amount) in &moves {
            if from.is_external() {
                let i = slot(&mut ext_in, from, || {
                    self.issued.get(from).copied().unwrap_or_default()
                });
                let t = &mut ext_in[i].1;
                *t = t.checked_add(*amount).ok_or(LedgerError::Overflow)?;
            } else {
                let i = slot(&mut next, from, || self.balance(from));
                let cur = next[i].1;
                next[i].1 = cur
                    .checked_sub(*amount)
                    .ok_or(LedgerError::InsufficientFunds {
                        needed: *amount,
                        available: cur,
                    })?;
            }
            if to.is_external() {
                let i = slot(&mut ext_out, to, || {
                    self.redeemed.get(to).copied().unwrap_or_default()
                });
                let t = &mut ext_out[i].1;
                *t = t.checked_add(*amount).ok_or(LedgerError::Overflow)?;
            } else {
                let i = slot(&mut next, to, || self.balance(to));
                let t = &mut next[i].1;
                *t = t.checked_add(*amount).ok_or(LedgerError::Overflow)?;
            }
        }
        for (account, v) in next {
            if !self.changes.balances.contains(account) {
                self.changes.balances.insert(account.clone());
            }
            match self.balances.get_mut(account) {
                Some(b) => *b = v,
                None => {
                    self.balances.insert(account.clone(), v);
                }
            }
        }
        for (account, v) in ext_in {
            self.issued.insert(account.clone(), v);
        }
        for (account, v) in ext_out {
            self.redeemed.insert(account.clone(), v);
        }
        Ok(moves
            .into_iter()
            .map(|(debit, credit, amount)| Posting {
                op: op.to_owned(),
                debit,
                credit,
                amount,
            })
            .collect())
    }

    fn mark_applied(&mut self, id: String) {
        self.applied.insert(id.clone());
        self.changes.applied.insert(id);
    }

    /// What changed since the last call (the store writes these rows back).
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// Σ of internal balances (users, holds, nodes, pools, treasury).
    pub fn total_internal(&self) -> Option<Money> {
        self.balances
            .iter()
            .filter(|(a, _)| !a.is_external())
            .try_fold(Money::ZERO, |acc, (_, v)| acc.checked_add(*v))
    }

    /// Σ issued by external accounts − Σ returned to them.
    pub fn total_external_net(&self) -> Option<Money> {
        let issued = self
            .issued
            .values()
            .try_fold(Money::ZERO, |a, v| a.checked_add(*v))?;
        let redeemed = self
            .redeemed
            .values()
            .try_fold(Money::ZERO, |a, v| a.checked_add(*v))?;
        issued.checked_sub(redeemed)
    }
}

#[cfg(test)]
mod tests;
