//! Settlement: the off-chain ledger reaches the chain.
//!
//! Every tick the settler (1) finishes batches recorded earlier — asks the chain whether each id
//! was applied, resends those that were not (the contracts apply an id at most once), marks
//! them confirmed; (2) puts new faucet credit into a grant batch and new charges, netted per
//! (user, node), into a settlement batch and debited withdrawals, netted per (user,
//! destination), into a withdrawal batch — each recorded with its entries *before* it is sent;
//! (3) credits new on-chain deposits, once per event, `confirmations` blocks behind the head;
//! (4) after an epoch ends, posts every node's uptime and reputation to NetworkStatus.
//! Batches are sent strictly in the order they were recorded, so the credit a batch spends is
//! always on-chain before it. One replica should run the settler (`--no-settle` on the others).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use lattice_accounts::{Accounts, BatchKind, BatchLimits, ChainBatch, StoreError};
use lattice_chain::{
    Address, B256, ChainError, GrantEntry, Protocol, SettleEntry, U256, WithdrawEntry,
};
use lattice_ledger::Money;
use serde::Serialize;

use crate::Nexus;

/// Whether nodes need stake on-chain to be admitted, and who provides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StakePolicy {
    /// Stake is not checked.
    Off,
    /// A node is admitted only if the NodeRegistry says it is active.
    Require,
    /// As Require, but the operator stakes the minimum for a node that has none (a local
    /// network, where the operator runs the nodes).
    Sponsor,
}

#[derive(Clone)]
pub struct ChainSettings {
    pub protocol: Protocol,
    /// Run the settlement loop (one replica should).
    pub settle: bool,
    pub interval: Duration,
    pub limits: BatchLimits,
    /// Deposits are credited this many blocks behind the head (reorg safety).
    pub confirmations: u64,
    pub stake: StakePolicy,
}

#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("batch {batch}: {message}")]
    BadBatch { batch: String, message: String },
}

/// What one settlement pass did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Pass {
    /// Batches found already applied on-chain and marked confirmed.
    pub recovered: usize,
    /// Batches sent and confirmed.
    pub sent: usize,
    pub deposits: usize,
    /// Withdrawals left `requested` (a crash before their debit) that were debited or rejected.
    pub withdrawals_recovered: usize,
}

/// A withdrawal left `requested` this long is taken to be abandoned by a crash (a live request
/// debits within milliseconds) and is re-posted or rejected by the settler.
const WITHDRAWAL_RECOVERY_AFTER: Duration = Duration::from_secs(30);

/// A difference between what the off-chain records imply and what the chain holds.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    pub address: String,
    pub expected: String,
    pub on_chain: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Reconciliation {
    pub checked: usize,
    /// Σ of confirmed settlement batches, and what the chain says it settled in total; they
    /// differ if a batch was applied twice (or a user could not pay).
    pub settled_expected: String,
    pub settled_on_chain: String,
    pub mismatches: Vec<Mismatch>,
    /// Batches recorded but not yet confirmed when this ran (their effect may be missing).
    pub pending_batches: usize,
    pub at: i64,
}

/// Fault injection for the chaos test: `LATTICE_FAULT_SETTLE_ABORT=<probability>` makes the
/// process abort at a random point of settlement (after recording a batch, after the chain
/// applied it but before it is marked). Read once; unset in normal runs.
struct Faults {
    probability: f64,
}

impl Faults {
    fn from_env() -> Option<Self> {
        let p: f64 = std::env::var("LATTICE_FAULT_SETTLE_ABORT")
            .ok()?
            .parse()
            .ok()?;
        (p > 0.0).then_some(Self { probability: p })
    }

    fn maybe_abort(&self, point: &str) {
        let mut b = [0u8; 8];
        if getrandom::getrandom(&mut b).is_ok()
            && (u64::from_le_bytes(b) as f64 / u64::MAX as f64) < self.probability
        {
            tracing::error!(point, "fault injection: aborting during settlement");
            std::process::abort();
        }
    }
}

pub(crate) struct Settler {
    accounts: Arc<Accounts>,
    protocol: Protocol,
    limits: BatchLimits,
    confirmations: u64,
    faults: Option<Faults>,
    /// False until the first pass: withdrawals left `requested` by an earlier run are
    /// recovered at once, later ones only after `WITHDRAWAL_RECOVERY_AFTER`.
    started: std::sync::atomic::AtomicBool,
}

impl Settler {
    pub(crate) fn new(accounts: Arc<Accounts>, settings: &ChainSettings) -> Self {
        Self {
            accounts,
            protocol: settings.protocol.clone(),
            limits: settings.limits,
            confirmations: settings.confirmations,
            faults: Faults::from_env(),
            started: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn fault(&self, point: &str) {
        if let Some(f) = &self.faults {
            f.maybe_abort(point);
        }
    }

    /// One pass: finish recorded batches, record and send new ones, credit deposits.
    pub(crate) async fn pass(&self) -> Result<Pass, SettleError> {
        let withdrawals_recovered = self
            .accounts
            .recover_withdrawals(if self.started.load(std::sync::atomic::Ordering::Relaxed) {
                WITHDRAWAL_RECOVERY_AFTER
            } else {
                Duration::ZERO
            })
            .await?;
        self.started
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut pass = Pass {
            withdrawals_recovered,
            ..Pass::default()
        };
        for batch in self.accounts.unconfirmed_batches().await? {
            if self.finish(&batch).await? {
                pass.sent += 1;
            } else {
                pass.recovered += 1;
            }
        }
        // Grants first: the credit a settlement or a withdrawal spends is on-chain before it.
        // One batch per kind per pass, more only while a batch's limits left items out: what
        // arrives during the pass waits for the next one (chasing it sent a one-line batch per
        // few milliseconds of traffic, each a transaction, for as long as requests kept coming).
        for kind in [BatchKind::Grant, BatchKind::Settle, BatchKind::Withdraw] {
            loop {
                let id = fresh_id()?;
                let Some(batch) = self
                    .accounts
                    .prepare_batch(kind, &id.to_string(), self.limits)
                    .await?
                else {
                    break;
                };
                self.fault("recorded");
                self.finish(&batch).await?;
                pass.sent += 1;
                if !batch.more {
                    break;
                }
            }
        }
        pass.deposits = self.scan_deposits().await?;
        Ok(pass)
    }

    /// Makes sure `batch` is applied on-chain and marks it confirmed. Returns whether this call
    /// sent it (false: the chain already had it, e.g. sent before a crash).
    async fn finish(&self, batch: &ChainBatch) -> Result<bool, SettleError> {
        let bad = |message: String| SettleError::BadBatch {
            batch: batch.id.clone(),
            message,
        };
        let id: B256 = batch.id.parse().map_err(|e| bad(format!("id: {e}")))?;
        let done = match batch.kind {
            BatchKind::Grant => self.protocol.grant_applied(id).await?,
            BatchKind::Settle => self.protocol.batch_settled(id).await?,
            BatchKind::Withdraw => self.protocol.withdrawal_applied(id).await?,
        };
        if done {
            // A withdrawal's transaction hash is what its user sees: find it in the chain's logs.
            let tx = match batch.kind {
                BatchKind::Withdraw => self.withdrawal_tx(id).await?.map(|h| h.to_string()),
                _ => None,
            };
            self.accounts
                .confirm_batch(&batch.id, tx.as_deref())
                .await?;
            tracing::info!(batch = %batch.id, kind = ?batch.kind, "batch was already on-chain; confirmed");
            return Ok(false);
        }
        let address = |s: &str| s.parse::<Address>().map_err(|e| bad(format!("{s}: {e}")));
        let amount = |m: Money| U256::from(m.units());
        let submitted = match batch.kind {
            BatchKind::Grant => {
                let entries = batch
                    .entries
                    .iter()
                    .map(|e| {
                        Ok(GrantEntry {
                            user: address(&e.user)?,
                            amount: amount(e.amount),
                        })
                    })
                    .collect::<Result<Vec<_>, SettleError>>()?;
                self.protocol.grant_batch(id, &entries).await?
            }
            BatchKind::Settle => {
                let entries = batch
                    .entries
                    .iter()
                    .map(|e| {
                        Ok(SettleEntry {
                            user: address(&e.user)?,
                            node: address(e.node.as_deref().unwrap_or_default())?,
                            amount: amount(e.amount),
                            tokens: e.tokens,
                            requests: e.requests,
                        })
                    })
                    .collect::<Result<Vec<_>, SettleError>>()?;
                self.protocol.settle_batch(id, &entries).await?
            }
            BatchKind::Withdraw => {
                let entries = batch
                    .entries
                    .iter()
                    .map(|e| {
                        Ok(WithdrawEntry {
                            user: address(&e.user)?,
                            to: address(e.to.as_deref().unwrap_or_default())?,
                            amount: amount(e.amount),
                        })
                    })
                    .collect::<Result<Vec<_>, SettleError>>()?;
                let (submitted, shortfalls) = self.protocol.withdraw_batch(id, &entries).await?;
                for s in shortfalls {
                    // Custody held less than was debited off-chain (the user withdrew on-chain
                    // directly); reconciliation reports the user.
                    tracing::error!(batch = %batch.id, user = %s.user, requested = %s.requested,
                        paid = %s.paid, "withdrawal short: custody held less than was debited");
                }
                submitted
            }
        };
        self.fault("applied");
        let tx = submitted.tx_hash.to_string();
        self.accounts.confirm_batch(&batch.id, Some(&tx)).await?;
        tracing::info!(batch = %batch.id, kind = ?batch.kind, entries = batch.entries.len(),
            total = %batch.total, tx = %tx, applied = submitted.applied, "batch settled on-chain");
        Ok(submitted.applied)
    }

    /// The transaction that applied withdrawal batch `id`, searched in the last
    /// `WITHDRAWAL_TX_SEARCH` blocks (only needed when a batch was applied before a crash).
    async fn withdrawal_tx(&self, id: B256) -> Result<Option<B256>, SettleError> {
        const WITHDRAWAL_TX_SEARCH: u64 = 50_000;
        let head = self.protocol.chain().block_number().await?;
        let from = head
            .saturating_sub(WITHDRAWAL_TX_SEARCH)
            .max(self.protocol.deployment().block);
        Ok(self.protocol.withdrawal_tx(id, from, head).await?)
    }

    /// Credits deposits up to `confirmations` blocks behind the head, once per event.
    async fn scan_deposits(&self) -> Result<usize, SettleError> {
        const CURSOR: &str = "deposits";
        const SPAN: u64 = 5_000;
        let head = self.protocol.chain().block_number().await?;
        let safe = head.saturating_sub(self.confirmations);
        let mut from = match self.accounts.cursor(CURSOR).await? {
            Some(c) => u64::try_from(c).unwrap_or(0).saturating_add(1),
            None => self.protocol.deployment().block,
        };
        let mut credited = 0;
        while from <= safe {
            let to = safe.min(from.saturating_add(SPAN - 1));
            for d in self.protocol.deposits(from, to).await? {
                let Ok(units) = u128::try_from(d.amount) else {
                    tracing::warn!(deposit = %d.id, amount = %d.amount, "deposit too large to credit");
                    continue;
                };
                let block = i64::try_from(d.block).unwrap_or(i64::MAX);
                if self
                    .accounts
                    .credit_deposit(&d.id, &d.user.to_string(), Money::from_units(units), block)
                    .await?
                {
                    credited += 1;
                    tracing::info!(deposit = %d.id, user = %d.user, amount = %d.amount, "deposit credited");
                }
            }
            self.accounts
                .set_cursor(CURSOR, i64::try_from(to).unwrap_or(i64::MAX))
                .await?;
            from = to + 1;
        }
        Ok(credited)
    }
}

/// Compares each user's custody balance on-chain with what confirmed batches and credited
/// deposits imply.
pub async fn reconcile(
    accounts: &Accounts,
    protocol: &Protocol,
) -> Result<Reconciliation, SettleError> {
    let pending_batches = accounts.unconfirmed_batches().await?.len();
    let expected = accounts.chain_expectations().await?;
    let mut mismatches = Vec::new();
    let mut settled = Money::ZERO;
    for (address, e) in &expected {
        settled = settled.checked_add(e.settled).unwrap_or(settled);
        let Ok(addr) = address.parse::<Address>() else {
            mismatches.push(Mismatch {
                address: address.clone(),
                expected: "a valid address".into(),
                on_chain: "-".into(),
            });
            continue;
        };
        let on_chain = protocol.user_balance(addr).await?;
        let want = e.balance().map(|m| U256::from(m.units()));
        if want != Some(on_chain) {
            mismatches.push(Mismatch {
                address: address.clone(),
                expected: want.map_or_else(|| "negative".into(), |w| w.to_string()),
                on_chain: on_chain.to_string(),
            });
        }
    }
    let settled_on_chain = protocol.total_settled().await?;
    let settled_expected = U256::from(settled.units());
    if settled_on_chain != settled_expected {
        mismatches.push(Mismatch {
            address: "total settled".into(),
            expected: settled_expected.to_string(),
            on_chain: settled_on_chain.to_string(),
        });
    }
    Ok(Reconciliation {
        checked: expected.len(),
        settled_expected: settled_expected.to_string(),
        settled_on_chain: settled_on_chain.to_string(),
        mismatches,
        pending_batches,
        at: time_now(),
    })
}

fn time_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn fresh_id() -> Result<B256, SettleError> {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).map_err(|e| SettleError::BadBatch {
        batch: "-".into(),
        message: format!("no randomness: {e}"),
    })?;
    Ok(B256::from(b))
}

/// Node uptime sampled each settlement tick, per epoch.
#[derive(Default)]
struct Uptime {
    ticks: u64,
    online: HashMap<String, u64>,
}

/// The settlement loop (and the epoch status poster and periodic reconciliation).
pub(crate) async fn run(nexus: Arc<Nexus>, settings: ChainSettings) {
    let settler = Settler::new(nexus.accounts.clone(), &settings);
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut uptime: BTreeMap<u64, Uptime> = BTreeMap::new();
    let mut last_reconcile = std::time::Instant::now()
        .checked_sub(Duration::from_secs(3600))
        .unwrap_or_else(std::time::Instant::now);
    loop {
        tick.tick().await;
        match settler.pass().await {
            Ok(p) if p.sent + p.recovered + p.deposits > 0 => {
                tracing::debug!(?p, "settlement pass");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "settlement pass failed; retrying next tick");
                continue;
            }
        }
        if let Err(e) = post_status(&nexus, &settings.protocol, &mut uptime).await {
            tracing::warn!(error = %e, "posting network status failed; retrying next tick");
        }
        if last_reconcile.elapsed() >= Duration::from_secs(600) {
            last_reconcile = std::time::Instant::now();
            match reconcile(&nexus.accounts, &settings.protocol).await {
                Ok(r) => {
                    if r.mismatches.is_empty() {
                        tracing::info!(
                            users = r.checked,
                            "reconciled with the chain: no difference"
                        );
                    } else {
                        tracing::error!(mismatches = ?r.mismatches, "off-chain and on-chain balances differ");
                    }
                    *nexus
                        .reconciliation
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(r);
                }
                Err(e) => tracing::warn!(error = %e, "reconciliation failed"),
            }
        }
    }
}

/// Samples which nodes are online; once an epoch has ended, posts its uptime and reputation.
async fn post_status(
    nexus: &Nexus,
    protocol: &Protocol,
    uptime: &mut BTreeMap<u64, Uptime>,
) -> Result<(), SettleError> {
    const CURSOR: &str = "status_epoch";
    let epoch = protocol.current_epoch().await?;
    let statuses = nexus.registry.status();
    let sample = uptime.entry(epoch).or_default();
    sample.ticks += 1;
    for s in statuses.iter().filter(|s| s.online) {
        *sample.online.entry(s.address.to_lowercase()).or_default() += 1;
    }
    let Some(ended) = epoch.checked_sub(1) else {
        return Ok(());
    };
    let posted = nexus.accounts.cursor(CURSOR).await?;
    if posted.is_some_and(|p| p >= i64::try_from(ended).unwrap_or(i64::MAX)) {
        return Ok(());
    }
    let reputation: HashMap<String, f64> = nexus
        .db
        .known_nodes()
        .await
        .into_iter()
        .map(|n| (n.address.to_lowercase(), n.reputation))
        .collect();
    let seen = uptime.remove(&ended).unwrap_or_default();
    let mut entries: Vec<(Address, u16, u16)> = reputation
        .iter()
        .filter_map(|(address, rep)| {
            let node = address.parse::<Address>().ok()?;
            let online = seen.online.get(address).copied().unwrap_or(0);
            // Basis points of the epoch's ticks the node was online (≤ 10,000, fits u16).
            let up = (online.min(seen.ticks) * 10_000)
                .checked_div(seen.ticks)
                .map_or(0, |bps| u16::try_from(bps).unwrap_or(10_000));
            Some((node, up, (rep.clamp(0.0, 1.0) * 10_000.0).round() as u16))
        })
        .collect();
    entries.sort();
    let root = merkle_root(&entries);
    for chunk in entries.chunks(512) {
        protocol.post_status(ended, root, chunk).await?;
    }
    if entries.is_empty() {
        protocol.post_status(ended, root, &[]).await?;
    }
    nexus
        .accounts
        .set_cursor(CURSOR, i64::try_from(ended).unwrap_or(i64::MAX))
        .await?;
    uptime.retain(|e, _| *e >= epoch);
    tracing::info!(epoch = ended, nodes = entries.len(), %root, "posted network status");
    Ok(())
}

/// Root of a binary Merkle tree over keccak(node ‖ uptime ‖ reputation) leaves (sorted pairs,
/// an odd node carried up), as OpenZeppelin's MerkleProof verifies.
fn merkle_root(entries: &[(Address, u16, u16)]) -> B256 {
    use lattice_chain::keccak256;
    let mut level: Vec<B256> = entries
        .iter()
        .map(|(a, u, r)| {
            let mut leaf = a.to_vec();
            leaf.extend(u.to_be_bytes());
            leaf.extend(r.to_be_bytes());
            keccak256(keccak256(leaf))
        })
        .collect();
    if level.is_empty() {
        return B256::ZERO;
    }
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [a, b] => {
                    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
                    keccak256([lo.as_slice(), hi.as_slice()].concat())
                }
                [a] => *a,
                _ => B256::ZERO,
            })
            .collect();
    }
    level[0]
}

/// Admission check at registration: the node's stake on-chain, sponsored if so configured.
pub(crate) async fn admit(
    settings: &ChainSettings,
    address: &str,
    models: &[String],
    price: (u128, u128),
) -> Result<(), String> {
    if settings.stake == StakePolicy::Off {
        return Ok(());
    }
    let node: Address = address
        .parse()
        .map_err(|e| format!("node address {address}: {e}"))?;
    let p = &settings.protocol;
    let active = p
        .node_active(node)
        .await
        .map_err(|e| format!("checking stake on-chain: {e}"))?;
    if active {
        return Ok(());
    }
    if settings.stake == StakePolicy::Require {
        return Err(format!(
            "node {address} has no active stake in the NodeRegistry on chain {}; stake first",
            p.chain().chain_id()
        ));
    }
    let state = p.node(node).await.map_err(|e| e.to_string())?;
    let min = p.min_stake().await.map_err(|e| e.to_string())?;
    if state.registered {
        return Err(format!(
            "node {address} is registered but inactive (stake {}, reputation {}); not sponsoring it again",
            state.stake, state.reputation
        ));
    }
    let offer = lattice_chain::NodeOffer {
        kind: 0,
        models: models.iter().take(16).cloned().collect(),
        price_in: price.0,
        price_out: price.1,
        metadata_uri: String::new(),
    };
    p.sponsor_node(node, &offer, min)
        .await
        .map_err(|e| format!("staking for node {address}: {e}"))?;
    tracing::info!(node = %address, stake = %min, "operator staked for the node on-chain");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merkle_root_is_order_independent_and_sensitive_to_content() {
        let a = (Address::repeat_byte(1), 10_000, 5_000);
        let b = (Address::repeat_byte(2), 9_000, 4_000);
        let c = (Address::repeat_byte(3), 0, 0);
        assert_eq!(merkle_root(&[]), B256::ZERO);
        assert_ne!(merkle_root(&[a]), B256::ZERO);
        assert_eq!(merkle_root(&[a, b]), merkle_root(&[b, a]));
        assert_ne!(merkle_root(&[a, b]), merkle_root(&[a, c]));
        assert_ne!(merkle_root(&[a, b, c]), merkle_root(&[a, b]));
    }
}
