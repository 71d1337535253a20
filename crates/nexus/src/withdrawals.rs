//! `POST /lattice/v1/account/withdrawals` and `GET /lattice/v1/account/withdrawals`: the
//! signed-in user moves off-chain credit to an on-chain address. The debit is made here (see
//! `lattice_accounts` withdrawals for the order of writes); the settler releases the LAI from
//! the user's custody on-chain in an idempotent withdrawal batch.
// Handlers return axum's `Response` as their error (the OpenAI error envelope), as axum intends.
#![allow(clippy::result_large_err)]

use std::sync::{Arc, OnceLock};

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use lattice_accounts::{StoreError, WithdrawError};
use lattice_api::ApiError;
use lattice_chain::Address;
use lattice_ledger::Money;
use serde::Deserialize;
use serde_json::json;

use crate::Nexus;
use crate::api::Signed;
use crate::onchain::parse_address;

type ApiResult = Result<Response, Response>;

fn err(e: ApiError) -> Response {
    lattice_http::error_response(&e)
}

fn store_err(e: StoreError) -> Response {
    tracing::error!(error = %e, "accounts store");
    err(ApiError::overloaded(
        "The accounts store is unavailable; retry shortly.",
    ))
}

#[derive(Deserialize)]
pub(crate) struct WithdrawBody {
    /// Units of LAI (10⁻¹⁸), a decimal string.
    amount: Option<serde_json::Value>,
    /// Destination address; the account's own address when absent.
    #[serde(default)]
    to: Option<String>,
}

/// Fault injection for the crash test: `LATTICE_FAULT_WITHDRAW_ABORT=<probability>` aborts the
/// process after a withdrawal is recorded and before its debit is posted. Unset in normal runs.
fn maybe_abort() {
    static P: OnceLock<Option<f64>> = OnceLock::new();
    let p = P.get_or_init(|| {
        std::env::var("LATTICE_FAULT_WITHDRAW_ABORT")
            .ok()?
            .parse::<f64>()
            .ok()
            .filter(|p| *p > 0.0)
    });
    let Some(p) = *p else { return };
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_ok() && (u64::from_le_bytes(b) as f64 / u64::MAX as f64) < p
    {
        tracing::error!("fault injection: aborting between recording and debiting a withdrawal");
        std::process::abort();
    }
}

fn parse_amount(v: Option<&serde_json::Value>) -> Result<Money, Response> {
    let bad = || {
        err(ApiError::invalid_param(
            "amount",
            "`amount` is a positive whole number of units (10⁻¹⁸ LAI) as a decimal string, \
             e.g. \"1500000000000000000\" for 1.5 LAI.",
        ))
    };
    let s = v.and_then(serde_json::Value::as_str).ok_or_else(bad)?;
    let m: Money = s.parse().map_err(|_| bad())?;
    if m.is_zero() {
        return Err(bad());
    }
    Ok(m)
}

pub(crate) async fn create(
    State(nexus): State<Arc<Nexus>>,
    Signed(c): Signed,
    b: Result<Json<WithdrawBody>, JsonRejection>,
) -> ApiResult {
    let Some(chain) = &nexus.chain else {
        return Err(err(ApiError::new(
            404,
            "invalid_request_error",
            Some("no_chain"),
            "this Nexus is not connected to a chain: there is nowhere to withdraw to",
        )));
    };
    let b = crate::api::body(b)?;
    let amount = parse_amount(b.amount.as_ref())?;
    let to = match b.to.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => parse_address(s, "to")?,
        None => parse_address(&c.address.to_lowercase(), "to")?,
    };
    let d = chain.protocol.deployment();
    if to == Address::ZERO || [d.token, d.users, d.nodes, d.status, d.tokenomics].contains(&to) {
        return Err(err(ApiError::invalid_param(
            "to",
            "`to` must be a wallet address: not the zero address nor one of the protocol's \
             contracts (LAI sent there could not be recovered).",
        )));
    }
    let to = format!("{to:#x}");
    let a = &nexus.accounts;
    let w = a
        .record_withdrawal(&c.user_id, &to, amount)
        .await
        .map_err(withdraw_err)?;
    maybe_abort();
    let w = a
        .debit_withdrawal(&c.user_id, &w.id, amount)
        .await
        .map_err(withdraw_err)?;
    let balance = a.balance(&c.user_id).await.map_err(store_err)?;
    tracing::info!(user = %c.user_id, withdrawal = %w.id, amount = %amount, to = %to, "withdrawal debited");
    Ok((
        StatusCode::CREATED,
        Json(json!({ "withdrawal": w, "balance": balance })),
    )
        .into_response())
}

fn withdraw_err(e: WithdrawError) -> Response {
    match e {
        WithdrawError::InsufficientFunds { needed, available } => {
            err(ApiError::payment_required(format!(
                "Your credit does not cover this withdrawal: {} requested, {} available.",
                needed.to_lai_string(),
                available.to_lai_string()
            )))
        }
        e @ WithdrawError::TooSmall { .. } => err(ApiError::invalid_param("amount", e.to_string())),
        e @ WithdrawError::TooManyPending { .. } => err(ApiError::new(
            409,
            "invalid_request_error",
            Some("too_many_pending_withdrawals"),
            e.to_string(),
        )),
        e @ WithdrawError::Refused(_) => err(ApiError::invalid_request(e.to_string())),
        e @ WithdrawError::Pending(_) => {
            tracing::error!(error = %e, "withdrawal debit");
            err(ApiError::overloaded(format!(
                "{e}. See GET /lattice/v1/account/withdrawals."
            )))
        }
        WithdrawError::Store(e) => store_err(e),
    }
}

pub(crate) async fn list(State(nexus): State<Arc<Nexus>>, Signed(c): Signed) -> ApiResult {
    let list = nexus
        .accounts
        .withdrawals(&c.user_id)
        .await
        .map_err(store_err)?;
    let limits = nexus.accounts.config().withdrawals;
    Ok(Json(json!({
        "data": list,
        "min_amount": limits.min_amount,
        "max_pending": limits.max_pending,
        "chain": nexus.chain.is_some(),
    }))
    .into_response())
}
