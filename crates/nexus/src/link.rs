//! Server side of the node link: challenge–response registration, then a reader that applies
//! heartbeats and routes token events to their streams, and a writer fed by a bounded queue.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use lattice_link::{
    LinkEvent, MAX_BATCH_RECEIPTS, MAX_FRAME_BYTES, MAX_FRAME_EVENTS, NexusFrame, NodeFrame,
    PROTOCOL_VERSION, challenge_message, decode, encode, legacy_hello_version,
    legacy_rejected_frame, recover_address, write_frames,
};
use lattice_router::{NodeId, Reputation};
use tokio::sync::mpsc;

use crate::Nexus;
use crate::billing::Parked;
use crate::registry::{LINK_QUEUE, LinkHandle, RequestOutcome};
use crate::settlement;

/// Time a node has to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A link with no frame for this long is considered dead (heartbeats come every 2 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

pub(crate) async fn upgrade(State(nexus): State<Arc<Nexus>>, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .read_buffer_size(lattice_link::READ_BUFFER_BYTES)
        .on_upgrade(move |socket| async move { serve(nexus, socket).await })
}

/// The next text message (pings and pongs are skipped; binary frames are not the protocol's).
async fn recv_text(ws: &mut WebSocket) -> Result<axum::extract::ws::Utf8Bytes, String> {
    loop {
        match ws.recv().await {
            Some(Ok(Message::Text(t))) => return Ok(t),
            Some(Ok(Message::Binary(_))) => {
                return Err("binary frames are not part of the protocol".into());
            }
            Some(Ok(Message::Close(_))) | None => return Err("link closed".into()),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
        }
    }
}

async fn recv_frame(ws: &mut WebSocket) -> Result<NodeFrame, String> {
    decode(recv_text(ws).await?.as_str()).map_err(|e| e.to_string())
}

async fn send_frame(ws: &mut WebSocket, f: &NexusFrame) -> Result<(), String> {
    let text = encode(f).map_err(|e| e.to_string())?;
    ws.send(Message::Text(text.into()))
        .await
        .map_err(|e| e.to_string())
}

async fn serve(nexus: Arc<Nexus>, mut ws: WebSocket) {
    let registered = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&nexus, &mut ws)).await
    {
        Ok(Ok(r)) => r,
        Ok(Err(Refusal { reason, legacy })) => {
            tracing::warn!(%reason, "node link refused");
            if legacy {
                let _ = ws
                    .send(Message::Text(legacy_rejected_frame(&reason).into()))
                    .await;
            } else {
                let _ = send_frame(&mut ws, &NexusFrame::Rejected { reason }).await;
            }
            // A clean close: the node reads the rejection, then the close frame.
            let _ = ws.send(Message::Close(None)).await;
            return;
        }
        Err(_) => {
            tracing::warn!("node link handshake timed out");
            return;
        }
    };
    let (id, address, link, out_rx) = registered;
    let chain_id = nexus.config.accounts.chain_id;
    let (mut sink, mut stream) = ws.split();
    let writer = tokio::spawn(async move {
        write_frames(out_rx, &mut sink, |t| Message::Text(t.into())).await;
        let _ = sink.close().await;
    });
    let reason = 'read: loop {
        let next = tokio::select! {
            reason = link.kicked() => break reason,
            next = tokio::time::timeout(IDLE_TIMEOUT, stream.next()) => next,
        };
        let msg = match next {
            Err(_) => break "no heartbeat within the idle timeout".to_owned(),
            Ok(None) => break "link closed by the node".to_owned(),
            Ok(Some(Err(e))) => break format!("link error: {e}"),
            Ok(Some(Ok(m))) => m,
        };
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(_) => break "link closed by the node".to_owned(),
            Message::Binary(_) => break "binary frames are not part of the protocol".to_owned(),
            _ => continue,
        };
        match decode::<NodeFrame>(text.as_str()) {
            Ok(NodeFrame::Heartbeat {
                queued,
                busy,
                slots,
                tokens_per_s,
            }) => {
                nexus
                    .registry
                    .heartbeat(id, queued, busy, slots, tokens_per_s);
                for p in link.book.expire(crate::receipts::WAIT) {
                    nexus.registry.record(id, p.model(), RequestOutcome::Failed);
                    p.refuse("the node never signed a batch covering the receipt");
                }
            }
            Ok(NodeFrame::Events { stream, events }) => {
                if events.is_empty() || events.len() > MAX_FRAME_EVENTS {
                    break format!(
                        "an events frame must carry 1 to {MAX_FRAME_EVENTS} events, not {}",
                        events.len()
                    );
                }
                // Recorded here, in link order, so the batch frame that follows finds it.
                for event in &events {
                    if let LinkEvent::Receipt(r) = event
                        && r.signature.is_empty()
                        && let Err(why) = link.book.seen(r)
                    {
                        break 'read why;
                    }
                }
                link.deliver(stream, events);
            }
            Ok(NodeFrame::Receipts {
                requests,
                signature,
            }) => {
                if requests.is_empty() || requests.len() > MAX_BATCH_RECEIPTS {
                    break format!(
                        "a receipt batch must cover 1 to {MAX_BATCH_RECEIPTS} requests, not {}",
                        requests.len()
                    );
                }
                match link.book.batch(&address, chain_id, &requests, &signature) {
                    Ok(ready) if ready.is_empty() => {}
                    Ok(ready) => {
                        tokio::spawn(Parked::charge_all(ready));
                    }
                    Err(refused) => {
                        tracing::warn!(node = %id, reason = %refused.why, receipts = requests.len(), "receipt batch refused; nothing charged for it");
                        for p in refused.parked {
                            nexus.registry.record(id, p.model(), RequestOutcome::Failed);
                            p.refuse(&refused.why);
                        }
                        if refused.fatal {
                            break format!("receipt batch refused: {}", refused.why);
                        }
                    }
                }
            }
            Ok(other) => break format!("unexpected frame after registration: {other:?}"),
            Err(e) => break format!("bad frame: {e}"),
        }
    };
    tracing::info!(node = %id, %reason, "node offline");
    for p in link.book.close() {
        p.refuse("the node's link closed before it signed the receipt");
    }
    if let Some((address, reputation)) = nexus.registry.remove(id) {
        nexus.db.save_reputation(&address, reputation).await;
    }
    writer.abort();
}

type Registered = (NodeId, String, Arc<LinkHandle>, mpsc::Receiver<NexusFrame>);

/// Why a handshake failed; `legacy` when the node speaks a pre-3 protocol, so the refusal is
/// sent in the frame format it reads.
struct Refusal {
    reason: String,
    legacy: bool,
}

impl From<String> for Refusal {
    fn from(reason: String) -> Self {
        Self {
            reason,
            legacy: false,
        }
    }
}

impl From<&str> for Refusal {
    fn from(reason: &str) -> Self {
        reason.to_owned().into()
    }
}

fn version_refusal(version: u32) -> String {
    format!("protocol version {version} is not supported (this Nexus speaks {PROTOCOL_VERSION})")
}

async fn hello(ws: &mut WebSocket) -> Result<(u32, String), Refusal> {
    let t = recv_text(ws).await?;
    match decode::<NodeFrame>(t.as_str()) {
        Ok(NodeFrame::Hello { version, address }) => Ok((version, address)),
        Ok(_) => Err("expected hello".into()),
        Err(e) => Err(match legacy_hello_version(t.as_str()) {
            Some(version) => Refusal {
                reason: version_refusal(version),
                legacy: true,
            },
            None => e.to_string().into(),
        }),
    }
}

async fn handshake(nexus: &Nexus, ws: &mut WebSocket) -> Result<Registered, Refusal> {
    let (version, address) = hello(ws).await?;
    if version != PROTOCOL_VERSION {
        return Err(version_refusal(version).into());
    }
    let mut nonce = [0u8; 16];
    getrandom::getrandom(&mut nonce).map_err(|e| e.to_string())?;
    let nonce = hex::encode(nonce);
    send_frame(
        ws,
        &NexusFrame::Challenge {
            nonce: nonce.clone(),
        },
    )
    .await?;
    let NodeFrame::Register {
        signature,
        kind,
        models,
        price,
        slots,
        decode_tps,
        label,
        token,
    } = recv_frame(ws).await?
    else {
        return Err("expected register".into());
    };
    let signer = recover_address(&challenge_message(&nonce, &address), &signature)
        .map_err(|e| e.to_string())?;
    if signer != address.to_lowercase() {
        return Err(format!("signature is from {signer}, not {address}").into());
    }
    if models.iter().any(|m| m.id.is_empty() || m.id.len() > 128) {
        return Err("model ids must be 1 to 128 bytes".into());
    }
    if models.is_empty() || models.len() > 64 {
        return Err("a node must offer between 1 and 64 models".into());
    }
    if label.as_ref().is_some_and(|l| l.len() > 64) {
        return Err("label is longer than 64 bytes".into());
    }
    let mut ids: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
    ids.sort_unstable();
    if ids.windows(2).any(|w| w[0] == w[1]) {
        return Err("a model id is listed twice".into());
    }
    let owner = node_owner(nexus, token.as_deref(), &signer).await?;
    if let Some(chain) = &nexus.chain {
        let ids: Vec<String> = models.iter().map(|m| m.id.clone()).collect();
        settlement::admit(
            chain,
            &signer,
            &ids,
            (
                u128::from(price.input_per_mtok),
                u128::from(price.output_per_mtok),
            ),
        )
        .await?;
    }
    let reputation = nexus
        .db
        .upsert_node(&signer, label.as_deref(), kind, &models, price)
        .await;
    let (tx, rx) = mpsc::channel(LINK_QUEUE);
    let link = Arc::new(LinkHandle::new(tx));
    let id = nexus.registry.add(
        signer.clone(),
        label,
        owner,
        kind,
        models.clone(),
        price,
        slots,
        if decode_tps.is_finite() {
            decode_tps
        } else {
            0.0
        },
        Reputation::from_score(reputation.unwrap_or(0.5)),
        link.clone(),
    )?;
    send_frame(
        ws,
        &NexusFrame::Registered {
            node_id: id.0,
            chain_id: nexus.config.accounts.chain_id,
        },
    )
    .await?;
    let names: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
    tracing::info!(node = %id, address = %signer, models = ?names, slots, "node registered; calibrating");
    nexus.health_kick.notify_one();
    Ok((id, signer, link, rx))
}

/// Checks the node's token (binding its address to the token's user on first use) and returns
/// the on-chain address of the node's owner, if it has one. Without a token the node is refused
/// when Nexus requires one; otherwise it keeps the owner it was bound to earlier, if any.
async fn node_owner(
    nexus: &Nexus,
    token: Option<&str>,
    address: &str,
) -> Result<Option<String>, String> {
    let unavailable = |e: lattice_accounts::StoreError| {
        tracing::error!(error = %e, "checking a node token");
        format!("node {address}: node tokens cannot be checked right now; retrying later")
    };
    let Some(token) = token else {
        if nexus.config.require_node_token {
            return Err(format!(
                "node {address}: this Nexus requires a node token: create one on the \
                 \"Run a node\" page and start the node with --token"
            ));
        }
        return nexus
            .accounts
            .node_owner(address)
            .await
            .map_err(unavailable);
    };
    match nexus.accounts.admit_node_token(token, address).await {
        Ok(Ok(owner)) => {
            if owner.first_use {
                tracing::info!(node = %address, token = %owner.token_id, owner = %owner.user_address, "node token bound to this node");
            }
            Ok(Some(owner.user_address))
        }
        Ok(Err(refused)) => Err(format!("node {address}: node token refused: {refused}")),
        Err(e) => Err(unavailable(e)),
    }
}
