//! Billing on the request path: before routing, hold the most the request can cost; when the
//! answer ends, check the node's receipt against the stream and park the charge until the node's
//! batch signature covers the receipt (`crate::receipts`), then charge the actual cost (the rest
//! of the hold is released in the same operation). Without a valid receipt — a node lost
//! mid-stream, a client gone, a forged or inconsistent receipt, a batch never signed — nothing
//! is charged and the hold is released. A Nexus crash gives open holds back: the exclusive
//! ledger writer never records them; with the shared writer the restarted replica releases its
//! own, and a sweeper releases any that outlive their time-to-live.

use lattice_ledger::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lattice_accounts::{Accounts, PostError, UsageRecord};
use lattice_engine::{EngineError, Payer, Prompt, Usage};
use lattice_ledger::{Applied, LedgerError, Money, Op, Rate, Split};
use lattice_link::{ChargeColumns, Price, ReceiptInBatch, UsageReceipt};
use tokio::sync::Notify;

use crate::receipts::{Evidence, ReceiptBook};

pub(crate) struct Billing {
    pub(crate) accounts: Arc<Accounts>,
    pub(crate) split: Split,
    pub(crate) chain_id: u64,
    pub(crate) unsettled: Arc<Unsettled>,
}

/// Charges parked until their batch signature arrives, counted per user and per node, so that a
/// user's own reads (balance, usage) see every answer they already received.
#[derive(Default)]
pub(crate) struct Unsettled {
    counts: Mutex<Counts>,
    changed: Notify,
}

#[derive(Default)]
struct Counts {
    users: HashMap<String, usize>,
    nodes: HashMap<String, usize>,
}

/// Counts one more (allocating a key only for a name not counted yet).
fn count_up(map: &mut HashMap<String, usize>, key: &str) {
    match map.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            map.insert(key.to_owned(), 1);
        }
    }
}

fn count_down(map: &mut HashMap<String, usize>, key: &str) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Unsettled {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, user: &str, node: &str) {
        let mut c = self.lock();
        count_up(&mut c.users, user);
        count_up(&mut c.nodes, node);
    }

    fn done(&self, user: &str, node: &str) {
        {
            let mut c = self.lock();
            count_down(&mut c.users, user);
            count_down(&mut c.nodes, node);
        }
        self.changed.notify_waiters();
    }

    fn user_pending(&self, user: &str) -> bool {
        self.lock().users.contains_key(user)
    }

    fn node_pending(&self, node: &str) -> bool {
        self.lock().nodes.contains_key(node)
    }

    /// Waits (at most `limit`) until none of `user`'s charges is parked.
    pub(crate) async fn wait_user(&self, user: &str, limit: Duration) {
        self.wait(|| self.user_pending(user), limit).await;
    }

    /// Waits (at most `limit`) until none of the charges a node served is parked.
    pub(crate) async fn wait_node(&self, node: &str, limit: Duration) {
        self.wait(|| self.node_pending(node), limit).await;
    }

    async fn wait(&self, pending: impl Fn() -> bool, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !pending() {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return;
            }
        }
    }
}

/// A finished request's charge, waiting for the node's batch signature. Dropped unsettled, it
/// releases the hold.
pub(crate) struct Parked {
    billing: Arc<Billing>,
    /// Taken when it is charged or refused.
    charge: Option<Pending>,
}

struct Pending {
    op: Op,
    record: UsageRecord,
    receipt: UsageReceipt,
}

impl std::fmt::Debug for Parked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Parked");
        if let Some(c) = &self.charge {
            d.field("request", &c.record.request_id).field("op", &c.op);
        }
        d.finish()
    }
}

impl Parked {
    pub(crate) fn model(&self) -> &str {
        self.charge.as_ref().map_or("", |c| c.record.model.as_str())
    }

    /// Charges with its place in the signed batch stored as the receipt.
    pub(crate) async fn charge(self, ev: Evidence) {
        Self::charge_all(vec![(self, ev)]).await;
    }

    /// Charges a signed batch's requests together (one ledger operation each, applied under
    /// one lock), each with its place in the batch stored as its receipt (the batch itself is
    /// stored once). A charge that fails releases its hold.
    pub(crate) async fn charge_all(ready: Vec<(Parked, Evidence)>) {
        let Some(billing) = ready.first().map(|(p, _)| p.billing.clone()) else {
            return;
        };
        let mut charges = Vec::with_capacity(ready.len());
        // Request, user and node of each charge, to report its outcome.
        let mut names = Vec::with_capacity(ready.len());
        for (mut p, ev) in ready {
            let Some(Pending {
                op,
                mut record,
                receipt,
            }) = p.charge.take()
            else {
                continue;
            };
            let stored = ReceiptInBatch {
                receipt,
                root: ev.batch.root.clone(),
                leaf: ev.leaf,
            };
            let columns = ChargeColumns {
                request_id: &record.request_id,
                model: &record.model,
                prompt_tokens: record.prompt_tokens,
                completion_tokens: record.completion_tokens,
            };
            record.receipt = stored
                .compact(columns)
                .unwrap_or_else(|| serde_json::to_string(&stored).unwrap_or_default());
            record.batch = Some(ev.batch);
            names.push((
                record.request_id.clone(),
                record.user_id.clone(),
                record.node.clone(),
            ));
            charges.push((op, record));
        }
        let outcomes = billing.accounts.ledger().charge_many(charges).await;
        for ((request, user, node), outcome) in names.iter().zip(outcomes) {
            if let Err(e) = outcome {
                tracing::error!(request_id = %request, error = %e, "charge failed; the hold will be released");
                release(&billing, request);
            }
            billing.unsettled.done(user, node);
        }
    }

    /// Nothing is charged (the batch was refused or never came): the hold is released.
    pub(crate) fn refuse(mut self, why: &str) {
        if let Some(c) = self.charge.take() {
            tracing::warn!(request_id = %c.record.request_id, reason = %why, "usage receipt refused; nothing charged");
            self.give_back(&c);
        }
    }

    fn give_back(&self, c: &Pending) {
        release(&self.billing, &c.record.request_id);
        self.billing
            .unsettled
            .done(&c.record.user_id, &c.record.node);
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        if let Some(c) = self.charge.take() {
            self.give_back(&c);
        }
    }
}

/// Posts a charge.
async fn charge(billing: &Arc<Billing>, op: Op, record: UsageRecord) -> Result<(), PostError> {
    match billing.accounts.ledger().charge(op, record).await? {
        Applied::Posted(_) | Applied::Duplicate => Ok(()),
    }
}

/// Saves an opted-in exchange (in the background) when its answer ends, as the user's choice
/// stands then.
fn save_history(billing: &Arc<Billing>, user: &str, request: &str, history: History) {
    let (conv, messages, _) = history;
    let accounts = billing.accounts.clone();
    let (user, request) = (user.to_owned(), request.to_owned());
    tokio::spawn(async move {
        if let Err(e) = accounts
            .record_chat(&user, &conv, &messages, &request)
            .await
        {
            tracing::warn!(request_id = %request, error = %e, "chat history not saved");
        }
    });
}

fn release(billing: &Billing, request: &str) {
    let op = Op::Release {
        request: request.to_owned(),
    };
    if !billing.accounts.ledger().post_detached(op) {
        tracing::warn!(request_id = %request, "ledger queue full; the sweeper will release the hold");
    }
}

pub(crate) fn rate(p: Price) -> Rate {
    Rate {
        input_per_mtok: Money::from_units(u128::from(p.input_per_mtok)),
        output_per_mtok: Money::from_units(u128::from(p.output_per_mtok)),
    }
}

/// An upper bound of a request's tokens: a token covers at least one byte, plus the chat
/// template's markers per message; never more than the context window (for embeddings, per
/// text: each is refused beyond it, and each adds its model's two markers).
pub(crate) fn token_bounds(prompt: &Prompt, max_tokens: Option<u32>, context: u32) -> (u64, u64) {
    let context = u64::from(context.max(1));
    if let Prompt::Embed(texts) = prompt {
        let prompt = texts
            .iter()
            .map(|t| (u64::try_from(t.len()).unwrap_or(u64::MAX).saturating_add(2)).min(context))
            .fold(0u64, u64::saturating_add);
        return (prompt, 0);
    }
    let prompt_bytes = match prompt {
        Prompt::Text(t) => t.len() + 16,
        Prompt::Chat(m) => {
            m.iter()
                .map(|m| m.content.len() + m.role.len() + 16)
                .sum::<usize>()
                + 64
        }
        Prompt::Embed(_) => 0,
    };
    let prompt = u64::try_from(prompt_bytes).unwrap_or(u64::MAX).min(context);
    let completion = max_tokens.map_or(context, u64::from).min(context);
    (prompt, completion)
}

/// Why a receipt was refused (its fields; the signature is checked alone or with its batch).
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_receipt(
    r: &UsageReceipt,
    request: &str,
    payer: &Payer,
    model: &str,
    node: &str,
    price: Price,
    chain_id: u64,
    usage: &Usage,
) -> Result<(), String> {
    if r.request_id != request || r.model != model {
        return Err("receipt is for another request or model".into());
    }
    if !r.user.eq_ignore_ascii_case(&payer.address) {
        return Err("receipt names another user".into());
    }
    if r.chain_id != chain_id {
        return Err(format!("receipt signed for chain {}", r.chain_id));
    }
    if r.price_in != price.input_per_mtok || r.price_out != price.output_per_mtok {
        return Err("receipt price differs from the node's registered price".into());
    }
    if r.prompt_tokens != u64::from(usage.prompt_tokens)
        || r.completion_tokens != u64::from(usage.completion_tokens)
    {
        return Err("receipt token counts differ from the stream's usage".into());
    }
    // A receipt signed alone must carry the node's signature; an unsigned one is charged only
    // once a batch signed by the node covers it.
    if !r.signature.is_empty() {
        r.verify(node).map_err(|e| e.to_string())?;
    }
    Ok(())
}

impl Billing {
    /// Holds `amount` for the request; 402 when the credit or the key's limit doesn't cover it.
    pub(crate) async fn hold(
        &self,
        request: &str,
        payer: &Payer,
        amount: Money,
    ) -> Result<(), EngineError> {
        let op = Op::Hold {
            request: request.to_owned(),
            user: payer.user_id.clone(),
            key: payer
                .key_id
                .clone()
                .map(|k| (k, payer.key_spend_limit.map(Money::from_units))),
            amount,
        };
        match self.accounts.ledger().apply(op).await {
            Ok(_) => Ok(()),
            Err(PostError::Ledger(LedgerError::InsufficientFunds { needed, available })) => {
                Err(EngineError::PaymentRequired(format!(
                    "Insufficient credits: this request may cost up to {} and your balance is {}. \
                     Lower max_tokens or add credits.",
                    needed.to_lai_string(),
                    available.to_lai_string()
                )))
            }
            Err(PostError::Ledger(LedgerError::KeyLimitExceeded { limit })) => {
                Err(EngineError::PaymentRequired(format!(
                    "This API key's spending limit of {} would be exceeded.",
                    limit.to_lai_string()
                )))
            }
            Err(e) => Err(EngineError::Unavailable(format!(
                "Billing is unavailable right now ({e}); retry shortly."
            ))),
        }
    }
}

/// Conversation id, the request's (role, content) messages and the answer so far, for
/// opted-in chat history.
pub(crate) type History = (String, Vec<(String, String)>, String);

/// One request's bill; releases its hold when dropped unsettled.
pub(crate) struct Bill {
    pub(crate) billing: Arc<Billing>,
    pub(crate) request: String,
    pub(crate) payer: Payer,
    pub(crate) model: String,
    pub(crate) hold: Money,
    pub(crate) node: Option<(String, Price)>,
    /// Where the answering node's batch signatures arrive.
    pub(crate) book: Option<Arc<ReceiptBook>>,
    pub(crate) receipt: Option<UsageReceipt>,
    pub(crate) settled: bool,
    pub(crate) history: Option<History>,
    /// When the hold was placed or last renewed.
    pub(crate) renewed: Instant,
    /// Deltas seen (the clock is read every [`RENEW_CHECK_DELTAS`]).
    pub(crate) deltas: u32,
}

/// An answer checks whether its hold needs renewing once per this many deltas: often enough for
/// any node (64 tokens take seconds; the hold lives 15 minutes), rarely enough that the clock
/// read costs nothing per token.
const RENEW_CHECK_DELTAS: u32 = 64;

/// What happened to a finished request's bill.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Settlement {
    Charged(Money),
    /// Checked; charged when the node's batch signature covers the receipt.
    Parked(Money),
    /// No valid receipt: nothing charged, the node is penalised.
    Refused(String),
    /// Storage failed: nothing charged now; the hold is released by the sweeper.
    Deferred(String),
}

impl Bill {
    pub(crate) fn on_delta(&mut self, text: &str) {
        if let Some((_, _, answer)) = &mut self.history {
            answer.push_str(text);
        }
        // An answer still streaming after a third of the hold's time-to-live renews the hold,
        // so the sweeper never gives back the credit of an answer that is still being paid for.
        self.deltas = self.deltas.wrapping_add(1);
        if !self.deltas.is_multiple_of(RENEW_CHECK_DELTAS) {
            return;
        }
        let ttl = self.billing.accounts.ledger().config().hold_ttl;
        if self.renewed.elapsed() >= ttl / 3 {
            self.renewed = Instant::now();
            let (accounts, request) = (self.billing.accounts.clone(), self.request.clone());
            tokio::spawn(async move {
                if let Err(e) = accounts.ledger().renew_hold(&request).await {
                    tracing::warn!(request_id = %request, error = %e, "could not renew the hold of a streaming answer");
                }
            });
        }
    }

    pub(crate) async fn settle(&mut self, usage: &Usage) -> Settlement {
        self.settled = true;
        let Some((node, price)) = self.node.clone() else {
            self.release();
            return Settlement::Refused("no node".into());
        };
        let Some(receipt) = self.receipt.take() else {
            self.release();
            return Settlement::Refused("the node sent no receipt".into());
        };
        let checked = check_receipt(
            &receipt,
            &self.request,
            &self.payer,
            &self.model,
            &node,
            price,
            self.billing.chain_id,
            usage,
        );
        let cost = checked.and_then(|()| {
            rate(price)
                .cost(
                    u64::from(usage.prompt_tokens),
                    u64::from(usage.completion_tokens),
                )
                .filter(|c| *c <= self.hold)
                .ok_or_else(|| "receipt claims more than the request could cost".to_owned())
        });
        let cost = match cost {
            Ok(c) => c,
            Err(why) => {
                self.release();
                return Settlement::Refused(why);
            }
        };
        let op = Op::Charge {
            request: self.request.clone(),
            user: self.payer.user_id.clone(),
            node: node.clone(),
            amount: cost,
            split: self.billing.split,
        };
        let record = UsageRecord {
            request_id: self.request.clone(),
            user_id: self.payer.user_id.clone(),
            key_id: self.payer.key_id.clone(),
            node,
            model: self.model.clone(),
            prompt_tokens: u64::from(usage.prompt_tokens),
            completion_tokens: u64::from(usage.completion_tokens),
            receipt: String::new(),
            batch: None,
        };
        if let Some((conv, mut messages, answer)) = self.history.take() {
            messages.push(("assistant".into(), answer));
            save_history(
                &self.billing,
                &self.payer.user_id,
                &self.request,
                (conv, messages, String::new()),
            );
        }
        if receipt.signature.is_empty() {
            let Some(book) = &self.book else {
                self.release();
                return Settlement::Refused("an unsigned receipt outside a link".into());
            };
            self.billing
                .unsettled
                .add(&self.payer.user_id, &record.node);
            let parked = Parked {
                billing: self.billing.clone(),
                charge: Some(Pending {
                    op,
                    record,
                    receipt,
                }),
            };
            return match book.park(&self.request, parked) {
                Some((p, ev)) => {
                    // In a task of its own: this future goes with the client's stream, and a
                    // client leaving now must not drop a charge half-way (its hold unreleased,
                    // its user's reads waiting on it).
                    let _ = tokio::spawn(p.charge(ev)).await;
                    Settlement::Charged(cost)
                }
                None => Settlement::Parked(cost),
            };
        }
        let mut record = record;
        record.receipt = serde_json::to_string(&receipt).unwrap_or_default();
        // In a task of its own, like a parked charge above.
        let (billing, request) = (self.billing.clone(), self.request.clone());
        let charged = tokio::spawn(async move {
            let outcome = charge(&billing, op, record).await;
            if let Err(e) = &outcome {
                tracing::error!(request_id = %request, error = %e, "charge failed; the hold will be released");
                release(&billing, &request);
            }
            outcome.map_err(|e| e.to_string())
        })
        .await;
        match charged {
            Ok(Ok(())) => Settlement::Charged(cost),
            Ok(Err(e)) => Settlement::Deferred(e),
            // The task panicked or the runtime is shutting down: the sweeper releases the hold.
            Err(e) => Settlement::Deferred(e.to_string()),
        }
    }

    fn release(&self) {
        release(&self.billing, &self.request);
    }
}

impl Drop for Bill {
    fn drop(&mut self) {
        if !self.settled {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lattice_engine::Message;
    use lattice_link::NodeKey;

    async fn funded() -> (Arc<Billing>, Payer) {
        funded_with(lattice_accounts::AccountsConfig::default()).await
    }

    async fn funded_with(config: lattice_accounts::AccountsConfig) -> (Arc<Billing>, Payer) {
        let db = lattice_accounts::Db::open("sqlite::memory:").await.unwrap();
        let accounts = Arc::new(Accounts::open(db, config).await.unwrap());
        let identity = lattice_accounts::Identity {
            kind: "test".into(),
            subject: "u".into(),
            detail: None,
        };
        let s = accounts.sign_in(&identity, None, None, "t").await.unwrap();
        let payer = Payer {
            user_id: s.user.id,
            address: s.user.address,
            key_id: None,
            key_spend_limit: None,
        };
        let billing = Arc::new(Billing {
            accounts,
            split: Split::default(),
            chain_id: 31337,
            unsettled: Arc::default(),
        });
        (billing, payer)
    }

    /// The receipt of 3 prompt + 4 completion tokens at the price `bill` registers, unsigned.
    fn unsigned(request: &str, payer: &Payer) -> UsageReceipt {
        UsageReceipt {
            request_id: request.into(),
            user: payer.address.clone(),
            model: "m".into(),
            prompt_tokens: 3,
            completion_tokens: 4,
            price_in: 1_000_000,
            price_out: 2_000_000,
            timestamp: 1,
            chain_id: 31337,
            signature: String::new(),
        }
    }

    fn bill(billing: &Arc<Billing>, payer: &Payer, node: &NodeKey, request: &str) -> Bill {
        Bill {
            billing: billing.clone(),
            request: request.into(),
            payer: payer.clone(),
            model: "m".into(),
            hold: Money::from_units(1_000_000),
            node: Some((
                node.address(),
                Price {
                    input_per_mtok: 1_000_000,
                    output_per_mtok: 2_000_000,
                },
            )),
            book: Some(Arc::default()),
            receipt: None,
            settled: false,
            history: None,
            renewed: Instant::now(),
            deltas: 0,
        }
    }

    /// Holds `request`, passes its unsigned receipt through `book` and a batch signed by `node`
    /// covering it (verified before the answer's end), and returns the bill carrying the receipt.
    async fn batch_signed_first(
        billing: &Arc<Billing>,
        payer: &Payer,
        node: &NodeKey,
        book: &Arc<ReceiptBook>,
        request: &str,
    ) -> Bill {
        billing
            .hold(request, payer, Money::from_units(1_000_000))
            .await
            .unwrap();
        let r = unsigned(request, payer);
        book.seen(&r).unwrap();
        let sig = lattice_link::sign_batch(node, 31337, &[r.struct_hash().unwrap()]).unwrap();
        assert!(
            book.batch(&node.address(), 31337, &[request.into()], &sig)
                .unwrap()
                .is_empty()
        );
        let mut b = bill(billing, payer, node, request);
        b.book = Some(book.clone());
        b.receipt = Some(r);
        b
    }

    #[tokio::test]
    async fn only_a_valid_receipt_is_charged_and_holds_are_always_released() {
        let (billing, payer) = funded().await;
        let start = billing
            .accounts
            .balance(&payer.user_id)
            .await
            .unwrap()
            .available;
        let node = NodeKey::generate().unwrap();
        let usage = Usage::new(3, 4);
        let receipt = |request: &str, key: &NodeKey| unsigned(request, &payer).sign(key).unwrap();
        let accounts = billing.accounts.clone();
        let settle = |request: &'static str, r: Option<UsageReceipt>| {
            let (billing, payer, node) = (billing.clone(), payer.clone(), &node);
            async move {
                billing
                    .hold(request, &payer, Money::from_units(1_000_000))
                    .await
                    .unwrap();
                let mut b = bill(&billing, &payer, node, request);
                b.receipt = r;
                b.settle(&usage).await
            }
        };
        // No receipt, a forged one: nothing charged.
        assert!(matches!(settle("none", None).await, Settlement::Refused(_)));
        let forger = NodeKey::generate().unwrap();
        let forged = receipt("forged", &forger);
        assert!(matches!(
            settle("forged", Some(forged)).await,
            Settlement::Refused(_)
        ));
        // A valid one: 3 × 1 + 4 × 2 = 11 units.
        let good = receipt("good", &node);
        assert_eq!(
            settle("good", Some(good)).await,
            Settlement::Charged(Money::from_units(11))
        );
        // A bill dropped before the end (client gone, node lost) releases its hold.
        billing
            .hold("dropped", &payer, Money::from_units(5))
            .await
            .unwrap();
        drop(bill(&billing, &payer, &node, "dropped"));
        // Releases are queued; wait for the writer.
        for _ in 0..100 {
            if accounts.balance(&payer.user_id).await.unwrap().held == Money::ZERO {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let b = accounts.balance(&payer.user_id).await.unwrap();
        assert_eq!(b.held, Money::ZERO);
        assert_eq!(
            b.available,
            start.checked_sub(Money::from_units(11)).unwrap()
        );
        assert!(accounts.ledger().audit().await.unwrap().balanced());
    }

    /// An answer streaming past its hold's time-to-live renews the hold as its text passes, so
    /// the sweeper leaves it alone (and the answer is paid for at the end).
    #[tokio::test]
    async fn a_streaming_answer_renews_its_hold() {
        let mut config = lattice_accounts::AccountsConfig::default();
        config.ledger.hold_ttl = Duration::from_secs(3);
        let (billing, payer) = funded_with(config).await;
        let node = NodeKey::generate().unwrap();
        billing
            .hold("long", &payer, Money::from_units(1_000))
            .await
            .unwrap();
        let mut b = bill(&billing, &payer, &node, "long");
        // Text after a third of the time-to-live: the hold is renewed for another 3 s. Expiry is
        // in whole seconds: the sweep below is past the first (≤ hold + 4 s) and a second or
        // more before the renewed one (≥ hold + 5 s).
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        for _ in 0..RENEW_CHECK_DELTAS {
            b.on_delta("more");
        }
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        let ledger = billing.accounts.ledger();
        assert_eq!(
            ledger.sweep_holds(false).await.unwrap(),
            0,
            "the hold was swept"
        );
        let held = billing.accounts.balance(&payer.user_id).await.unwrap().held;
        assert_eq!(held, Money::from_units(1_000));
        b.settled = true;
    }

    /// A client that leaves while its charge is being applied (its stream's future is dropped
    /// mid-way) does not take the charge with it: it completes, no hold is left and the user's
    /// reads do not wait for it.
    #[tokio::test]
    async fn a_client_leaving_during_its_charge_does_not_drop_it() {
        let (billing, payer) = funded().await;
        let accounts = billing.accounts.clone();
        let start = accounts.balance(&payer.user_id).await.unwrap().available;
        let node = NodeKey::generate().unwrap();
        let book: Arc<ReceiptBook> = Arc::default();
        // The batch is verified before the answer's end reaches the bill: the charge is applied
        // while the client's stream awaits it.
        let mut b = batch_signed_first(&billing, &payer, &node, &book, "c").await;
        // Polled once and dropped: this new node's rows are read from the database first, so
        // the charge is not done in one poll.
        assert!(
            futures::FutureExt::now_or_never(b.settle(&Usage::new(3, 4))).is_none(),
            "the charge finished in one poll: the client never left mid-way"
        );
        drop(b);
        billing
            .unsettled
            .wait_user(&payer.user_id, Duration::from_secs(10))
            .await;
        assert!(!billing.unsettled.user_pending(&payer.user_id));
        let after = accounts.balance(&payer.user_id).await.unwrap();
        assert_eq!(after.held, Money::ZERO);
        assert_eq!(
            after.available,
            start.checked_sub(Money::from_units(11)).unwrap()
        );
        assert!(accounts.ledger().audit().await.unwrap().balanced());
    }

    #[tokio::test]
    async fn unsigned_receipts_are_charged_once_their_batch_is_signed() {
        let (billing, payer) = funded().await;
        let accounts = billing.accounts.clone();
        let start = accounts.balance(&payer.user_id).await.unwrap().available;
        let node = NodeKey::generate().unwrap();
        let usage = Usage::new(3, 4);
        let book: Arc<ReceiptBook> = Arc::default();
        let unsigned = |request: &str| unsigned(request, &payer);
        let finish = async |request: &str| {
            billing
                .hold(request, &payer, Money::from_units(1_000_000))
                .await
                .unwrap();
            let r = unsigned(request);
            book.seen(&r).unwrap();
            let mut b = bill(&billing, &payer, &node, request);
            b.book = Some(book.clone());
            b.receipt = Some(r);
            b.settle(&usage).await
        };
        // Two answers end; their charges wait for the signature (the user's reads wait too).
        let cost = Money::from_units(11);
        assert_eq!(finish("a").await, Settlement::Parked(cost));
        assert_eq!(finish("b").await, Settlement::Parked(cost));
        assert!(billing.unsettled.user_pending(&payer.user_id));
        assert!(billing.unsettled.node_pending(&node.address()));
        let leaves = [
            unsigned("a").struct_hash().unwrap(),
            unsigned("b").struct_hash().unwrap(),
        ];
        // Signed by someone else: refused, nothing charged, holds released.
        let forger = NodeKey::generate().unwrap();
        let forged = lattice_link::sign_batch(&forger, 31337, &leaves).unwrap();
        let refused = book
            .batch(&node.address(), 31337, &["a".into(), "b".into()], &forged)
            .err()
            .unwrap();
        assert!(!refused.fatal);
        assert_eq!(refused.parked.len(), 2);
        for p in refused.parked {
            p.refuse(&refused.why);
        }
        assert!(!billing.unsettled.user_pending(&payer.user_id));
        // The receipts' leaves were consumed by that batch: naming them again is a protocol
        // violation.
        let good = lattice_link::sign_batch(&node, 31337, &leaves).unwrap();
        assert!(
            book.batch(&node.address(), 31337, &["a".into(), "b".into()], &good)
                .err()
                .unwrap()
                .fatal
        );
        // A batch verified before the bill settles: the evidence waits and the charge is
        // immediate when the bill comes.
        let mut b = batch_signed_first(&billing, &payer, &node, &book, "c").await;
        assert_eq!(b.settle(&usage).await, Settlement::Charged(cost));
        accounts.ledger().sync().await.unwrap();
        for _ in 0..100 {
            if accounts.balance(&payer.user_id).await.unwrap().held == Money::ZERO {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let bal = accounts.balance(&payer.user_id).await.unwrap();
        assert_eq!(bal.held, Money::ZERO);
        assert_eq!(bal.available, start.checked_sub(cost).unwrap());
        // The stored receipt is the batch evidence, and it verifies.
        let today = time::OffsetDateTime::now_utc().date().to_string();
        let rows = accounts
            .usage(
                &payer.user_id,
                &today,
                &today,
                lattice_accounts::UsageGroup::Model,
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].requests, 1);
        let Some(lattice_accounts::StoredReceipt::Batched(evidence)) =
            accounts.stored_receipt("c").await.unwrap()
        else {
            panic!("no batched receipt stored for c")
        };
        assert_eq!(evidence.receipt.request_id, "c");
        assert_eq!(evidence.count, 1);
        assert_eq!(evidence.verify(&node.address()), Ok(()));
        assert!(evidence.verify(&forger.address()).is_err());
        assert!(accounts.ledger().audit().await.unwrap().balanced());
    }

    #[test]
    fn bounds_cover_the_prompt_and_respect_the_context() {
        let chat = Prompt::Chat(vec![Message {
            role: "user".into(),
            content: "hello".into(),
        }]);
        assert_eq!(token_bounds(&chat, Some(10), 2048), (5 + 4 + 16 + 64, 10));
        assert_eq!(token_bounds(&chat, None, 2048).1, 2048);
        let long = Prompt::Text("x".repeat(100_000));
        assert_eq!(token_bounds(&long, Some(1 << 30), 4096), (4096, 4096));
        // Embeddings: each text bounded on its own (its bytes and two markers, at most the
        // context), nothing generated whatever max_tokens says.
        let texts = Prompt::Embed(vec!["abc".into(), "x".repeat(1000), "é".into()]);
        assert_eq!(token_bounds(&texts, None, 256), (3 + 2 + 256 + 2 + 2, 0));
        assert_eq!(token_bounds(&texts, Some(50), 256).1, 0);
    }

    #[test]
    fn receipts_must_match_the_request() {
        let key = NodeKey::generate().unwrap();
        let payer = Payer {
            user_id: "u".into(),
            address: "0x7e5f4552091a69125d5dfcb7b8c2659029395bdf".into(),
            key_id: None,
            key_spend_limit: None,
        };
        let price = Price {
            input_per_mtok: 10,
            output_per_mtok: 20,
        };
        let usage = Usage::new(3, 4);
        let good = UsageReceipt {
            request_id: "r".into(),
            user: payer.address.clone(),
            model: "m".into(),
            prompt_tokens: 3,
            completion_tokens: 4,
            price_in: 10,
            price_out: 20,
            timestamp: 1,
            chain_id: 31337,
            signature: String::new(),
        }
        .sign(&key)
        .unwrap();
        let check = |r: &UsageReceipt| {
            check_receipt(r, "r", &payer, "m", &key.address(), price, 31337, &usage)
        };
        assert_eq!(check(&good), Ok(()));
        for (tamper, _why) in [
            (
                UsageReceipt {
                    completion_tokens: 5,
                    ..good.clone()
                },
                "counts",
            ),
            (
                UsageReceipt {
                    price_out: 1,
                    ..good.clone()
                },
                "price",
            ),
            (
                UsageReceipt {
                    request_id: "other".into(),
                    ..good.clone()
                },
                "request",
            ),
            (
                UsageReceipt {
                    chain_id: 1,
                    ..good.clone()
                },
                "chain",
            ),
            (
                UsageReceipt {
                    user: lattice_link::NO_USER.into(),
                    ..good.clone()
                },
                "user",
            ),
        ] {
            assert!(check(&tamper).is_err());
        }
        // Signed by someone else.
        let other = NodeKey::generate().unwrap();
        let forged = UsageReceipt {
            signature: String::new(),
            ..good.clone()
        }
        .sign(&other)
        .unwrap();
        assert!(check(&forged).is_err());
    }
}
