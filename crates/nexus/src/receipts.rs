//! Receipts a node sent unsigned, waiting for the batch signature that covers them.
//!
//! Per link: the reader records each unsigned receipt's leaf as it passes (so a batch frame,
//! which follows its receipts on the same link, always finds them); a finished request's bill
//! parks its charge here; a verified batch hands back the parked charges it covers with their
//! evidence (the batch, shared, and the receipt's leaf in it). A batch may be verified before
//! its requests' bills are parked (the reader runs ahead of the streams' consumers), so verified
//! evidence waits too. Everything here is bounded and expires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lattice_accounts::ReceiptBatch;
use lattice_link::{UsageReceipt, verify_batch};

use crate::billing::Parked;

/// Receipts a link may have outstanding (unsigned, or signed but not yet claimed by their
/// bills); beyond, the node is misbehaving.
pub(crate) const MAX_UNSIGNED: usize = 65_536;
/// A parked charge or a verified receipt waits this long for its other half.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// Evidence that the node signed one receipt: its verified batch (shared by the batch's
/// receipts and stored once) and its leaf there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Evidence {
    pub(crate) batch: Arc<ReceiptBatch>,
    pub(crate) leaf: u64,
}

/// Keyed by request ids a node sends, so these maps keep std's flooding-resistant SipHash.
#[derive(Default)]
struct State {
    leaves: HashMap<String, [u8; 32]>,
    signed: HashMap<String, (Evidence, Instant)>,
    parked: HashMap<String, (Parked, Instant)>,
}

#[derive(Default)]
pub(crate) struct ReceiptBook {
    state: Mutex<State>,
}

/// Why a batch was not accepted, with the parked charges it named (to be released).
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) why: String,
    /// The node broke the protocol (named a receipt it never sent): close its link.
    pub(crate) fatal: bool,
    pub(crate) parked: Vec<Parked>,
}

impl ReceiptBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an unsigned receipt passing on the link.
    pub(crate) fn seen(&self, r: &UsageReceipt) -> Result<(), String> {
        let leaf = r.struct_hash().map_err(|e| e.to_string())?;
        let mut st = self.lock();
        if st.leaves.len() + st.signed.len() >= MAX_UNSIGNED {
            return Err(format!(
                "{MAX_UNSIGNED} receipts are waiting for a batch signature"
            ));
        }
        st.leaves.insert(r.request_id.clone(), leaf);
        Ok(())
    }

    /// Parks a finished request's charge; returns it with its evidence when its batch was
    /// verified already.
    pub(crate) fn park(&self, request: &str, charge: Parked) -> Option<(Parked, Evidence)> {
        let mut st = self.lock();
        if let Some((ev, _)) = st.signed.remove(request) {
            return Some((charge, ev));
        }
        st.parked
            .insert(request.to_owned(), (charge, Instant::now()));
        None
    }

    /// Verifies a batch signed by `node` over `requests`' receipts (in that order): the parked
    /// charges it covers come back with their evidence; the others' evidence waits for them.
    pub(crate) fn batch(
        &self,
        node: &str,
        chain_id: u64,
        requests: &[String],
        signature: &str,
    ) -> Result<Vec<(Parked, Evidence)>, Refused> {
        let leaves: Option<Vec<[u8; 32]>> = {
            let mut st = self.lock();
            let found: Vec<Option<[u8; 32]>> =
                requests.iter().map(|r| st.leaves.remove(r)).collect();
            found.into_iter().collect()
        };
        let take_parked = |book: &Self| {
            let mut st = book.lock();
            requests
                .iter()
                .filter_map(|r| st.parked.remove(r).map(|(p, _)| p))
                .collect()
        };
        let Some(leaves) = leaves else {
            return Err(Refused {
                why: "the batch names a receipt the node never sent".into(),
                fatal: true,
                parked: take_parked(self),
            });
        };
        let root = match verify_batch(node, chain_id, &leaves, signature) {
            Ok(root) => root,
            Err(e) => {
                return Err(Refused {
                    why: e.to_string(),
                    fatal: false,
                    parked: take_parked(self),
                });
            }
        };
        let batch = Arc::new(ReceiptBatch {
            root: hex::encode(root),
            node: node.to_owned(),
            signature: signature.to_owned(),
            leaves,
        });
        let now = Instant::now();
        let mut ready = Vec::new();
        let mut st = self.lock();
        for (leaf, r) in (0u64..).zip(requests) {
            let ev = Evidence {
                batch: batch.clone(),
                leaf,
            };
            match st.parked.remove(r) {
                Some((p, _)) => ready.push((p, ev)),
                None => {
                    st.signed.insert(r.clone(), (ev, now));
                }
            }
        }
        Ok(ready)
    }

    /// Removes what waited too long; returns the parked charges to release.
    pub(crate) fn expire(&self, wait: Duration) -> Vec<Parked> {
        let mut st = self.lock();
        st.signed.retain(|_, (_, t)| t.elapsed() < wait);
        let old: Vec<String> = st
            .parked
            .iter()
            .filter(|(_, (_, t))| t.elapsed() >= wait)
            .map(|(r, _)| r.clone())
            .collect();
        old.iter()
            .filter_map(|r| st.parked.remove(r).map(|(p, _)| p))
            .collect()
    }

    /// The link is gone: every parked charge, to release.
    pub(crate) fn close(&self) -> Vec<Parked> {
        let mut st = self.lock();
        st.leaves.clear();
        st.signed.clear();
        st.parked.drain().map(|(_, (p, _))| p).collect()
    }
}
