//! What the chain holds for an address, next to what the off-chain ledger says: custody and
//! wallet balances, a node's stake, on-chain reputation, earnings and staking pool (with an
//! expected APY from its recent off-chain earnings), a signed-in user's credit on its way to the
//! chain, and the exact transactions a wallet sends to deposit or stake. Reads only: Nexus never
//! signs for a user here.
// Handlers return axum's `Response` as their error (the OpenAI error envelope), as axum intends.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use lattice_accounts::{ChainPosition, UsageGroup};
use lattice_api::ApiError;
use lattice_chain::{Address, ChainError, Deployment, Protocol, U256};
use lattice_ledger::Money;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::Nexus;
use crate::api::Signed;

type ApiResult = Result<Response, Response>;

/// Days of off-chain earnings the expected APY is computed from.
pub(crate) const APY_WINDOW_DAYS: i64 = 7;
/// Nodes one `/lattice/v1/chain/nodes` answer covers (online first, then known).
const MAX_NODES: usize = 100;
/// How long one `/lattice/v1/chain/nodes` answer is served to everyone: anyone may ask, and an
/// answer costs a few chain reads per node.
pub(crate) const NODES_TTL: Duration = Duration::from_secs(5);

/// The last `/lattice/v1/chain/nodes` answer and when it was read. Callers that find it stale
/// wait on the lock while one of them reads the chain, so a burst costs one read.
#[derive(Default)]
pub(crate) struct NodesCache(tokio::sync::Mutex<Option<(Instant, serde_json::Value)>>);

fn err(e: ApiError) -> Response {
    lattice_http::error_response(&e)
}

fn no_chain() -> Response {
    err(ApiError::new(
        404,
        "invalid_request_error",
        Some("no_chain"),
        "this Nexus is not connected to a chain",
    ))
}

fn chain_err(e: ChainError) -> Response {
    tracing::warn!(error = %e, "reading the chain");
    err(ApiError::overloaded(
        "The chain did not answer; retry shortly.",
    ))
}

fn store_err(e: lattice_accounts::StoreError) -> Response {
    tracing::error!(error = %e, "accounts store");
    err(ApiError::overloaded(
        "The accounts store is unavailable; retry shortly.",
    ))
}

/// `0x` and 40 hex digits (any case), or a 400 naming `param`.
pub(crate) fn parse_address(s: &str, param: &str) -> Result<Address, Response> {
    let bad = || {
        err(ApiError::invalid_param(
            param,
            format!("`{param}` must be an address: 0x followed by 40 hex digits."),
        ))
    };
    let hex = s.strip_prefix("0x").ok_or_else(bad)?;
    if hex.len() != 40 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    hex.parse::<Address>().map_err(|_| bad())
}

fn protocol(nexus: &Nexus) -> Result<&Protocol, Response> {
    nexus
        .chain
        .as_ref()
        .map(|c| &c.protocol)
        .ok_or_else(no_chain)
}

fn lower(a: Address) -> String {
    format!("{a:#x}")
}

#[derive(Serialize)]
struct ChainInfo {
    chain_id: u64,
    /// "embedded" (inside Nexus: no RPC endpoint a wallet could use) or "rpc".
    kind: &'static str,
    token: String,
    users: String,
    nodes: String,
    tokenomics: String,
}

fn chain_info(p: &Protocol) -> ChainInfo {
    let d: &Deployment = p.deployment();
    ChainInfo {
        chain_id: p.chain().chain_id(),
        kind: p.chain().kind(),
        token: lower(d.token),
        users: lower(d.users),
        nodes: lower(d.nodes),
        tokenomics: lower(d.tokenomics),
    }
}

/// Expected yearly return of a pool: `income` earned over `days`, annualised, over `staked`.
/// None when nothing is staked. Rounded to a millionth.
pub(crate) fn expected_apy(income: U256, days: i64, staked: U256) -> Option<f64> {
    if staked.is_zero() || days <= 0 {
        return None;
    }
    let days = U256::from(days.unsigned_abs());
    let ppm = income.saturating_mul(U256::from(365u64 * 1_000_000)) / (days * staked);
    let ppm = u64::try_from(ppm).unwrap_or(u64::MAX);
    Some(ppm as f64 / 1e6)
}

#[derive(Serialize)]
struct PoolInfo {
    /// Everything staked into the node's pool on-chain.
    staked: String,
    /// Pool income on-chain not yet claimed by stakers.
    unclaimed: String,
    /// The pool's share of each settled charge (on-chain split).
    pool_bps: u16,
    window_days: i64,
    /// What users paid this node over the window (off-chain usage records).
    charges: Money,
    /// The pool's share of those charges.
    income: Money,
    /// `income` annualised over `staked`, as a fraction (0.12 = 12 %); null when nothing is staked.
    expected_apy: Option<f64>,
}

#[derive(Serialize)]
struct NodeInfo {
    address: String,
    registered: bool,
    active: bool,
    stake: String,
    /// On-chain reputation in basis points (NetworkStatus posts it once per epoch).
    reputation_bps: u16,
    models: Vec<String>,
    /// Earnings the node can withdraw on-chain (`Tokenomics.nodeBalance`).
    earnings: String,
    /// Everything settlement ever credited to the node on-chain.
    earned_total: String,
    pool: PoolInfo,
}

/// Sum of what users paid `node` over the last `APY_WINDOW_DAYS` days (today included).
async fn recent_charges(nexus: &Nexus, node: &str) -> Result<Money, Response> {
    let today = time::OffsetDateTime::now_utc().date();
    let from = today - time::Duration::days(APY_WINDOW_DAYS - 1);
    let rows = nexus
        .accounts
        .node_usage(
            node,
            &from.to_string(),
            &today.to_string(),
            UsageGroup::Node,
        )
        .await
        .map_err(store_err)?;
    Ok(rows
        .iter()
        .fold(Money::ZERO, |a, r| a.checked_add(r.cost).unwrap_or(a)))
}

async fn node_info(nexus: &Nexus, p: &Protocol, node: Address) -> Result<NodeInfo, Response> {
    let address = lower(node);
    let (state, earnings, earned, pool, split) = futures::try_join!(
        p.node(node),
        p.node_balance(node),
        p.node_earned(node),
        p.pool(node),
        p.split(),
    )
    .map_err(chain_err)?;
    let charges = recent_charges(nexus, &address).await?;
    let income = charges
        .mul_div(u128::from(split.pool_bps), 10_000)
        .unwrap_or(Money::ZERO);
    Ok(NodeInfo {
        registered: state.registered,
        active: state.active,
        stake: state.stake.to_string(),
        reputation_bps: state.reputation,
        models: state.models,
        earnings: earnings.to_string(),
        earned_total: earned.to_string(),
        pool: PoolInfo {
            staked: pool.staked.to_string(),
            unclaimed: pool.unclaimed.to_string(),
            pool_bps: split.pool_bps,
            window_days: APY_WINDOW_DAYS,
            charges,
            income,
            expected_apy: expected_apy(U256::from(income.units()), APY_WINDOW_DAYS, pool.staked),
        },
        address,
    })
}

/// A node's stake on-chain, for the signed-in operator's list of nodes.
#[derive(Serialize)]
pub(crate) struct NodeStake {
    registered: bool,
    active: bool,
    /// The node's own stake (units).
    stake: String,
    /// Staked into its pool by others (units).
    pool_staked: String,
    reputation_bps: u16,
    /// Earnings the node can withdraw on-chain (units).
    earnings: String,
}

/// Reads `node`'s stake; `Ok(None)` when Nexus is not connected to a chain, `Err` with words
/// when the chain did not answer.
pub(crate) async fn node_stake(nexus: &Nexus, node: &str) -> Result<Option<NodeStake>, String> {
    let Some(c) = &nexus.chain else {
        return Ok(None);
    };
    let p = &c.protocol;
    let addr = node
        .parse::<Address>()
        .map_err(|_| format!("{node} is not an address"))?;
    let (state, earnings, pool) =
        futures::try_join!(p.node(addr), p.node_balance(addr), p.pool(addr)).map_err(|e| {
            tracing::warn!(error = %e, "reading a node's stake");
            "the chain did not answer; retry shortly".to_owned()
        })?;
    Ok(Some(NodeStake {
        registered: state.registered,
        active: state.active,
        stake: state.stake.to_string(),
        pool_staked: pool.staked.to_string(),
        reputation_bps: state.reputation,
        earnings: earnings.to_string(),
    }))
}

#[derive(Deserialize)]
pub(crate) struct AccountQuery {
    /// Also report this staker's position in the address's pool.
    staker: Option<String>,
}

/// `GET /lattice/v1/chain/accounts/{address}`: custody and wallet balances of any address, and
/// when it is a registered node (or has a staked pool) its stake, reputation, earnings and
/// pool. Public: the chain is.
pub(crate) async fn account(
    State(nexus): State<Arc<Nexus>>,
    Path(address): Path<String>,
    q: Result<Query<AccountQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| err(ApiError::invalid_request(e.to_string())))?;
    let addr = parse_address(&address, "address")?;
    let staker = q
        .staker
        .as_deref()
        .map(|s| parse_address(s, "staker"))
        .transpose()?;
    let p = protocol(&nexus)?;
    let (custody, wallet, min_stake) =
        futures::try_join!(p.user_balance(addr), p.token_balance(addr), p.min_stake())
            .map_err(chain_err)?;
    let info = node_info(&nexus, p, addr).await?;
    // A registered node, or an address whose pool holds stake (staking needs no registration).
    let node = (info.registered || info.pool.staked != "0").then_some(info);
    let stake = match staker {
        Some(s) => {
            let pos = p.stake_of(addr, s).await.map_err(chain_err)?;
            Some(json!({
                "staker": lower(s),
                "amount": pos.amount.to_string(),
                "pending_reward": pos.pending_reward.to_string(),
            }))
        }
        None => None,
    };
    Ok(Json(json!({
        "address": lower(addr),
        "chain": chain_info(p),
        "custody": custody.to_string(),
        "wallet": wallet.to_string(),
        "min_stake": min_stake.to_string(),
        "node": node,
        "stake": stake,
    }))
    .into_response())
}

/// `GET /lattice/v1/chain/nodes`: the on-chain side of every node this Nexus knows (online
/// first), at most `MAX_NODES`, as read at most `NODES_TTL` ago.
pub(crate) async fn nodes(State(nexus): State<Arc<Nexus>>) -> ApiResult {
    let p = protocol(&nexus)?;
    let mut cached = nexus.chain_nodes.0.lock().await;
    if let Some((at, body)) = cached.as_ref()
        && at.elapsed() < NODES_TTL
    {
        return Ok(Json(body).into_response());
    }
    let body = read_nodes(&nexus, p).await?;
    let response = Json(&body).into_response();
    *cached = Some((Instant::now(), body));
    Ok(response)
}

async fn read_nodes(nexus: &Arc<Nexus>, p: &Protocol) -> Result<serde_json::Value, Response> {
    let mut addresses: Vec<String> = nexus
        .registry
        .status()
        .into_iter()
        .map(|n| n.address.to_lowercase())
        .collect();
    for k in nexus.db.known_nodes().await {
        let a = k.address.to_lowercase();
        if !addresses.contains(&a) {
            addresses.push(a);
        }
    }
    addresses.truncate(MAX_NODES);
    let parsed: Vec<Address> = addresses
        .iter()
        .filter_map(|a| a.parse::<Address>().ok())
        .collect();
    let infos: Vec<Result<NodeInfo, Response>> = futures::stream::iter(parsed)
        .map(|a| async move { node_info(nexus, p, a).await })
        .buffered(8)
        .collect()
        .await;
    let data = infos.into_iter().collect::<Result<Vec<_>, _>>()?;
    let min_stake = p.min_stake().await.map_err(chain_err)?;
    Ok(json!({
        "chain": chain_info(p),
        "min_stake": min_stake.to_string(),
        "data": data,
    }))
}

/// `GET /lattice/v1/account/chain`: the signed-in user's address, its custody on-chain, and
/// how much of the off-chain balance is already reflected there.
pub(crate) async fn my_account(State(nexus): State<Arc<Nexus>>, Signed(c): Signed) -> ApiResult {
    let p = protocol(&nexus)?;
    let a = &nexus.accounts;
    let user = a
        .user(&c.user_id)
        .await
        .map_err(store_err)?
        .ok_or_else(|| err(ApiError::unauthorized("Sign in again.")))?;
    let addr = parse_address(&user.address.to_lowercase(), "address")?;
    nexus.settled(&c.user_id).await;
    let balance = a.balance(&c.user_id).await.map_err(store_err)?;
    let position: ChainPosition = a.chain_position(&c.user_id).await.map_err(store_err)?;
    let (custody, wallet) =
        futures::try_join!(p.user_balance(addr), p.token_balance(addr)).map_err(chain_err)?;
    let expected = position.expected_custody();
    let in_sync = expected.is_some_and(|e| U256::from(e.units()) == custody);
    Ok(Json(json!({
        "address": lower(addr),
        "custodial": user.custodial,
        "chain": chain_info(p),
        "on_chain": { "custody": custody.to_string(), "wallet": wallet.to_string() },
        "off_chain": balance,
        "position": position,
        "expected_custody": expected,
        "in_sync": in_sync,
    }))
    .into_response())
}

#[derive(Deserialize)]
pub(crate) struct CallsQuery {
    /// The node (stake) or the credited user (deposit).
    to: Option<String>,
    /// Units of LAI (10⁻¹⁸), a decimal string.
    amount: Option<String>,
}

/// `GET /lattice/v1/chain/calls/{action}?to=ADDRESS&amount=UNITS`: the two transactions a
/// wallet sends for `stake` (approve + Tokenomics.stake) or `deposit` (approve +
/// UserRegistry.depositFor), ready for `eth_sendTransaction`. Nothing is sent.
pub(crate) async fn calls(
    State(nexus): State<Arc<Nexus>>,
    Path(action): Path<String>,
    q: Result<Query<CallsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| err(ApiError::invalid_request(e.to_string())))?;
    let to = parse_address(q.to.as_deref().unwrap_or(""), "to")?;
    let amount = q
        .amount
        .as_deref()
        .filter(|s| !s.is_empty() && s.len() <= 39 && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u128>().ok())
        .filter(|&u| u > 0)
        .ok_or_else(|| {
            err(ApiError::invalid_param(
                "amount",
                "`amount` is a positive whole number of units (10⁻¹⁸ LAI).",
            ))
        })?;
    let p = protocol(&nexus)?;
    let d = p.deployment();
    let txs = match action.as_str() {
        "stake" => lattice_chain::stake_calls(d, to, U256::from(amount)),
        "deposit" => lattice_chain::deposit_calls(d, to, U256::from(amount)),
        _ => {
            return Err(err(ApiError::not_found(&format!(
                "/lattice/v1/chain/calls/{action}"
            ))));
        }
    };
    let labels = match action.as_str() {
        "stake" => [
            "LAIToken.approve(tokenomics, amount)",
            "Tokenomics.stake(node, amount)",
        ],
        _ => [
            "LAIToken.approve(userRegistry, amount)",
            "UserRegistry.depositFor(user, amount)",
        ],
    };
    let transactions: Vec<_> = txs
        .iter()
        .zip(labels)
        .map(|((to, data), call)| json!({"to": lower(*to), "data": data.to_string(), "call": call}))
        .collect();
    Ok(Json(json!({
        "chain_id": p.chain().chain_id(),
        "kind": p.chain().kind(),
        "action": action,
        "amount": amount.to_string(),
        "transactions": transactions,
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apy_is_income_annualised_over_stake() {
        let lai = U256::from(10u64).pow(U256::from(18u64));
        // 1 LAI in 7 days over 52 LAI staked: 365/7/52 ≈ 1.002747.
        let apy = expected_apy(lai, 7, lai * U256::from(52u64));
        assert_eq!(apy, Some(1.002747));
        assert_eq!(expected_apy(lai, 7, U256::ZERO), None);
        assert_eq!(expected_apy(U256::ZERO, 7, lai), Some(0.0));
    }

    #[test]
    fn addresses_are_bounded_and_checked() {
        assert!(parse_address("0x00000000000000000000000000000000000000aB", "a").is_ok());
        for bad in [
            "",
            "0x",
            "00000000000000000000000000000000000000ab",
            "0x00000000000000000000000000000000000000a",
            "0x00000000000000000000000000000000000000abc",
            "0x00000000000000000000000000000000000000zz",
        ] {
            assert!(parse_address(bad, "a").is_err(), "{bad}");
        }
    }
}
