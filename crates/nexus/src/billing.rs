//! Billing on the request path: before routing, hold the most the request can cost; when the
//! node's signed receipt arrives with the answer, verify it and charge the actual cost (the rest
//! is released in the same transaction). Without a valid receipt — a node lost mid-stream, a
//! client gone, a forged or inconsistent receipt — nothing is charged and the hold is released.
//! A Nexus crash leaves holds behind; the restarted replica releases its own, and a sweeper
//! releases any that outlive their time-to-live.

use std::sync::Arc;

use lattice_accounts::{Accounts, PostError, UsageRecord};
use lattice_engine::{EngineError, Payer, Prompt, Usage};
use lattice_ledger::{Applied, LedgerError, Money, Op, Rate, Split};
use lattice_link::{Price, UsageReceipt};

pub(crate) struct Billing {
    pub(crate) accounts: Arc<Accounts>,
    pub(crate) split: Split,
    pub(crate) chain_id: u64,
}

pub(crate) fn rate(p: Price) -> Rate {
    Rate {
        input_per_mtok: Money::from_units(u128::from(p.input_per_mtok)),
        output_per_mtok: Money::from_units(u128::from(p.output_per_mtok)),
    }
}

/// An upper bound of a request's tokens: a token covers at least one byte, plus the chat
/// template's markers per message; never more than the context window.
pub(crate) fn token_bounds(prompt: &Prompt, max_tokens: Option<u32>, context: u32) -> (u64, u64) {
    let prompt_bytes = match prompt {
        Prompt::Text(t) => t.len() + 16,
        Prompt::Chat(m) => {
            m.iter()
                .map(|m| m.content.len() + m.role.len() + 16)
                .sum::<usize>()
                + 64
        }
    };
    let context = u64::from(context.max(1));
    let prompt = u64::try_from(prompt_bytes).unwrap_or(u64::MAX).min(context);
    let completion = max_tokens.map_or(context, u64::from).min(context);
    (prompt, completion)
}

/// Why a receipt was refused.
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
    r.verify(node).map_err(|e| e.to_string())
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
    pub(crate) receipt: Option<UsageReceipt>,
    pub(crate) settled: bool,
    pub(crate) history: Option<History>,
}

/// What happened to a finished request's bill.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Settlement {
    Charged(Money),
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
    }

    pub(crate) async fn settle(&mut self, usage: &Usage) -> Settlement {
        self.settled = true;
        let Some((node, price)) = self.node.clone() else {
            self.release();
            return Settlement::Refused("no node".into());
        };
        let checked = match &self.receipt {
            None => Err("the node sent no receipt".to_owned()),
            Some(r) => check_receipt(
                r,
                &self.request,
                &self.payer,
                &self.model,
                &node,
                price,
                self.billing.chain_id,
                usage,
            ),
        };
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
        let receipt = serde_json::to_string(&self.receipt).unwrap_or_default();
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
            cost,
            receipt,
        };
        match self.billing.accounts.ledger().charge(op, record).await {
            Ok(Applied::Posted(_) | Applied::Duplicate) => {
                if let Some((conv, mut messages, answer)) = self.history.take() {
                    messages.push(("assistant".into(), answer));
                    let accounts = self.billing.accounts.clone();
                    let (user, request) = (self.payer.user_id.clone(), self.request.clone());
                    tokio::spawn(async move {
                        if let Err(e) = accounts
                            .record_chat(&user, &conv, &messages, &request)
                            .await
                        {
                            tracing::warn!(request_id = %request, error = %e, "chat history not saved");
                        }
                    });
                }
                Settlement::Charged(cost)
            }
            Err(e) => {
                tracing::error!(request_id = %self.request, error = %e, "charge failed; the hold will be released");
                self.release();
                Settlement::Deferred(e.to_string())
            }
        }
    }

    fn release(&self) {
        let op = Op::Release {
            request: self.request.clone(),
        };
        if !self.billing.accounts.ledger().post_detached(op) {
            tracing::warn!(request_id = %self.request, "ledger queue full; the sweeper will release the hold");
        }
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
        let db = lattice_accounts::Db::open("sqlite::memory:").await.unwrap();
        let accounts = Arc::new(
            Accounts::open(db, lattice_accounts::AccountsConfig::default())
                .await
                .unwrap(),
        );
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
        });
        (billing, payer)
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
            receipt: None,
            settled: false,
            history: None,
        }
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
        let receipt = |request: &str, key: &NodeKey| {
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
            .sign(key)
            .unwrap()
        };
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
