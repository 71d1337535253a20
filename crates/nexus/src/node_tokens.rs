//! Pre-registered node tokens and the signed-in operator's nodes: create a token (the secret
//! is shown once), list them with the node bound to each, revoke one (its node's link is ended
//! and it is refused when it reconnects), and the user's nodes with their status, off-chain
//! earnings and on-chain stake.
// Handlers return axum's `Response` as their error (the OpenAI error envelope), as axum intends.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use lattice_api::ApiError;
use lattice_ledger::Account;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::Nexus;
use crate::api::{ApiResult, Signed, body, err, store_err};
use crate::registry::NodeStatus;

#[derive(Deserialize)]
pub(crate) struct NewTokenBody {
    #[serde(default)]
    label: Option<String>,
}

pub(crate) async fn create(
    State(nexus): State<Arc<Nexus>>,
    Signed(c): Signed,
    b: Result<Json<NewTokenBody>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let label = b.label.as_deref().map(str::trim).filter(|l| !l.is_empty());
    if label.is_some_and(|l| l.len() > lattice_accounts::MAX_NODE_TOKEN_LABEL) {
        return Err(err(ApiError::invalid_param(
            "label",
            format!(
                "A node token label is at most {} bytes.",
                lattice_accounts::MAX_NODE_TOKEN_LABEL
            ),
        )));
    }
    let t = nexus
        .accounts
        .create_node_token(&c.user_id, label)
        .await
        .map_err(store_err)?;
    Ok((axum::http::StatusCode::CREATED, Json(t)).into_response())
}

#[derive(Serialize)]
struct Listed {
    #[serde(flatten)]
    token: lattice_accounts::NodeToken,
    /// The bound node is linked to this Nexus now.
    online: bool,
}

pub(crate) async fn list(State(nexus): State<Arc<Nexus>>, Signed(c): Signed) -> ApiResult {
    let tokens = nexus
        .accounts
        .list_node_tokens(&c.user_id)
        .await
        .map_err(store_err)?;
    let online: Vec<String> = nexus
        .registry
        .status()
        .into_iter()
        .map(|n| n.address)
        .collect();
    let data: Vec<Listed> = tokens
        .into_iter()
        .map(|token| Listed {
            online: token
                .node_address
                .as_ref()
                .is_some_and(|a| online.contains(a)),
            token,
        })
        .collect();
    Ok(Json(json!({ "data": data })).into_response())
}

pub(crate) async fn revoke(
    State(nexus): State<Arc<Nexus>>,
    Signed(c): Signed,
    Path(id): Path<String>,
) -> ApiResult {
    match nexus
        .accounts
        .revoke_node_token(&c.user_id, &id)
        .await
        .map_err(store_err)?
    {
        Some(address) => {
            let disconnected = address.as_deref().map_or(0, |a| {
                nexus.registry.kick_address(a, "its node token was revoked")
            });
            tracing::info!(token = %id, node = ?address, disconnected, "node token revoked");
            Ok(Json(json!({
                "id": id,
                "revoked": true,
                "node_address": address,
                "disconnected": disconnected > 0,
            }))
            .into_response())
        }
        None => Err(err(ApiError::not_found(&format!(
            "/lattice/v1/account/node-tokens/{id}"
        )))),
    }
}

/// Where a node of the user stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum NodeState {
    /// Linked, no model has passed its canary yet.
    Calibrating,
    /// Linked, and at least one model admitted with its circuit closed: it gets traffic.
    Healthy,
    /// Linked, calibrated once, but every admitted model's circuit is open (failing probes).
    Unhealthy,
    /// Not linked.
    Offline,
}

pub(crate) fn state(n: Option<&NodeStatus>) -> NodeState {
    let Some(n) = n.filter(|n| n.online) else {
        return NodeState::Offline;
    };
    if n.models.iter().any(|m| m.admitted && m.circuit == "closed") {
        NodeState::Healthy
    } else if n.models.iter().any(|m| m.admitted) {
        NodeState::Unhealthy
    } else {
        NodeState::Calibrating
    }
}

/// `GET /lattice/v1/account/nodes`: the nodes bound to the signed-in user's node tokens, with
/// status, off-chain earnings (the ledger's node and pool accounts) and stake on-chain.
pub(crate) async fn my_nodes(State(nexus): State<Arc<Nexus>>, Signed(c): Signed) -> ApiResult {
    let mine = nexus
        .accounts
        .user_nodes(&c.user_id)
        .await
        .map_err(store_err)?;
    let online: HashMap<String, NodeStatus> = nexus
        .registry
        .status()
        .into_iter()
        .map(|n| (n.address.clone(), n))
        .collect();
    let known: HashMap<String, crate::KnownNode> = nexus
        .db
        .known_nodes()
        .await
        .into_iter()
        .map(|k| (k.address.clone(), k))
        .collect();
    let l = nexus.accounts.ledger();
    let mut data = Vec::with_capacity(mine.len());
    for (address, live) in mine {
        let n = online.get(&address);
        let k = known.get(&address);
        nexus.node_settled(&address).await;
        let earned = l
            .balance(&Account::Node(address.clone()))
            .await
            .map_err(store_err)?;
        let pool = l
            .balance(&Account::Pool(address.clone()))
            .await
            .map_err(store_err)?;
        let (stake, stake_error) = match crate::onchain::node_stake(&nexus, &address).await {
            Ok(s) => (s, None),
            Err(e) => (None, Some(e)),
        };
        data.push(json!({
            "address": address,
            "label": n.and_then(|n| n.label.clone()).or_else(|| k.and_then(|k| k.label.clone())),
            "status": state(n),
            "token_live": live,
            "models": n.map(|n| n.models.clone()),
            "served": n.map(|n| n.served),
            "reputation": n.map(|n| n.reputation).or_else(|| k.map(|k| k.reputation)),
            "last_seen": k.map(|k| k.last_seen),
            "earned": earned,
            "staking_pool": pool,
            "stake": stake,
            "stake_error": stake_error,
        }));
    }
    Ok(Json(json!({ "chain": nexus.chain.is_some(), "data": data })).into_response())
}
