//! Accounts API: sign-in (SIWE), the signed-in account, API keys, faucet, usage, node earnings
//! and chat history. Browser sessions use an HttpOnly cookie; scripts may send the session or an
//! API key as `Authorization: Bearer`. Errors use the OpenAI JSON envelope.
// Handlers return axum's `Response` as their error (the OpenAI error envelope), as axum intends.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures::FutureExt;
use futures::future::BoxFuture;
use lattice_accounts::{Accounts, Caller, StoreError, UsageGroup};
use lattice_api::ApiError;
use lattice_engine::Payer;
use lattice_ledger::{Account, Money};
use serde::Deserialize;
use serde_json::json;

use crate::Nexus;

pub(crate) const SESSION_COOKIE: &str = "lattice_session";

pub(crate) type ApiResult = Result<Response, Response>;

pub(crate) fn err(e: ApiError) -> Response {
    lattice_http::error_response(&e)
}

pub(crate) fn store_err(e: StoreError) -> Response {
    match e {
        StoreError::SignIn(m) => err(ApiError::unauthorized(m)),
        StoreError::Config(m) => err(ApiError::invalid_request(m)),
        StoreError::Limit(m) | StoreError::Conflict(m) => err(ApiError::invalid_request(m)),
        e => {
            tracing::error!(error = %e, "accounts store");
            err(ApiError::overloaded(
                "The accounts store is unavailable; retry shortly.",
            ))
        }
    }
}

/// Largest body of an accounts-API request.
pub(crate) const MAX_BODY_BYTES: usize = 64 << 10;

pub(crate) fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, Response> {
    b.map(|Json(v)| v).map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            err(ApiError::payload_too_large(MAX_BODY_BYTES))
        } else {
            err(ApiError::invalid_request(format!("Invalid JSON body: {e}")))
        }
    })
}

/// The bearer token or session cookie of a request.
pub(crate) fn token(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return v.strip_prefix("Bearer ").map(str::trim);
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(SESSION_COOKIE)?.strip_prefix('='))
}

/// Authenticates an OpenAI API call: 401 without or with a wrong key, 429 over its rate.
pub(crate) struct NexusAuth(pub(crate) Arc<Accounts>);

impl lattice_http::Authenticator for NexusAuth {
    fn authenticate<'a>(
        &'a self,
        headers: &'a HeaderMap,
    ) -> BoxFuture<'a, Result<Payer, ApiError>> {
        async move {
            let Some(t) = token(headers) else {
                return Err(ApiError::unauthorized(
                    "You didn't provide an API key. Send `Authorization: Bearer lk_…`; create a key \
                     with POST /lattice/v1/keys after signing in.",
                ));
            };
            let caller = match self.0.authenticate(t).await {
                Ok(Some(c)) => c,
                Ok(None) => {
                    return Err(ApiError::unauthorized(
                        "Incorrect API key provided (unknown, revoked or expired).",
                    ));
                }
                Err(e) => {
                    tracing::error!(error = %e, "authenticating");
                    return Err(ApiError::overloaded("Authentication is unavailable; retry shortly."));
                }
            };
            if !self.0.admit(&caller) {
                return Err(ApiError::rate_limited(
                    "This API key's requests-per-minute limit is reached; retry in a minute.",
                ));
            }
            Ok(Payer {
                user_id: caller.user_id,
                address: caller.address,
                key_spend_limit: caller
                    .key
                    .as_ref()
                    .and_then(|k| k.spend_limit)
                    .map(Money::units),
                key_id: caller.key.map(|k| k.id),
            })
        }
        .boxed()
    }
}

/// The signed-in caller of an accounts-API request.
pub(crate) struct Signed(pub(crate) Caller);

impl FromRequestParts<Arc<Nexus>> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, nexus: &Arc<Nexus>) -> Result<Self, Response> {
        let Some(t) = token(&parts.headers) else {
            return Err(err(ApiError::unauthorized("Sign in first.")));
        };
        match nexus.accounts.authenticate(t).await {
            Ok(Some(c)) => Ok(Signed(c)),
            Ok(None) => Err(err(ApiError::unauthorized(
                "Your session has expired or the key is invalid; sign in again.",
            ))),
            Err(e) => Err(store_err(e)),
        }
    }
}

/// The client's IP address (faucet rate limit).
pub(crate) struct Client(String);

impl<S: Send + Sync> FromRequestParts<S> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Client(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map_or_else(|| "unknown".into(), |c| c.0.ip().to_string()),
        ))
    }
}

fn with_session(mut resp: Response, session: &str, max_age: u64) -> Response {
    let cookie =
        format!("{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

pub(crate) async fn siwe_nonce(State(nexus): State<Arc<Nexus>>) -> ApiResult {
    let nonce = nexus.accounts.siwe_nonce().await.map_err(store_err)?;
    let c = nexus.accounts.config();
    Ok(Json(json!({
        "nonce": nonce,
        "domain": c.siwe_domain,
        "chain_id": c.chain_id,
        "statement": "Sign in to Lattice",
    }))
    .into_response())
}

#[derive(Deserialize)]
pub(crate) struct SiweBody {
    message: String,
    signature: String,
}

pub(crate) async fn siwe_sign_in(
    State(nexus): State<Arc<Nexus>>,
    Client(client): Client,
    headers: HeaderMap,
    b: Result<Json<SiweBody>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    // Signed in already: the wallet is linked to the current account.
    let link_to = current_user(&nexus, &headers).await;
    let s = nexus
        .accounts
        .siwe_sign_in(&b.message, &b.signature, link_to.as_deref(), &client)
        .await
        .map_err(store_err)?;
    Ok(signed_in(&nexus, s))
}

pub(crate) async fn sign_out(State(nexus): State<Arc<Nexus>>, headers: HeaderMap) -> ApiResult {
    if let Some(t) = token(&headers) {
        nexus.accounts.sign_out(t).await.map_err(store_err)?;
    }
    Ok(with_session(
        Json(json!({"signed_out": true})).into_response(),
        "",
        0,
    ))
}

pub(crate) async fn account(State(nexus): State<Arc<Nexus>>, Signed(c): Signed) -> ApiResult {
    let a = &nexus.accounts;
    let user = a.user(&c.user_id).await.map_err(store_err)?;
    nexus.settled(&c.user_id).await;
    let balance = a.balance(&c.user_id).await.map_err(store_err)?;
    let identities = a.identities(&c.user_id).await.map_err(store_err)?;
    Ok(Json(json!({
        "user": user,
        "balance": balance,
        "balance_lai": balance.available.to_lai_string(),
        "identities": identities,
    }))
    .into_response())
}

#[derive(Deserialize)]
pub(crate) struct AccountPatch {
    keep_history: bool,
}

pub(crate) async fn update_account(
    State(nexus): State<Arc<Nexus>>,
    Signed(c): Signed,
    b: Result<Json<AccountPatch>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    nexus
        .accounts
        .set_keep_history(&c.user_id, b.keep_history)
        .await
        .map_err(store_err)?;
    Ok(Json(json!({"keep_history": b.keep_history})).into_response())
}

pub(crate) async fn faucet(
    State(nexus): State<Arc<Nexus>>,
    Signed(c): Signed,
    Client(client): Client,
) -> ApiResult {
    let f = nexus
        .accounts
        .claim_faucet(&c.user_id, &client)
        .await
        .map_err(store_err)?;
    Ok(Json(json!({ "faucet": f })).into_response())
}

#[derive(Deserialize)]
pub(crate) struct NewKeyBody {
    #[serde(default)]
    name: Option<String>,
    /// Units of LAI (decimal string).
    #[serde(default)]
    spend_limit: Option<Money>,
    #[serde(default)]
    rpm_limit: Option<u32>,
}

pub(crate) async fn create_key(
    State(nexus): State<Arc<Nexus>>,
    Signed(c): Signed,
    b: Result<Json<NewKeyBody>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let name = b.name.unwrap_or_else(|| "API key".into());
    if name.is_empty() || name.len() > 100 {
        return Err(err(ApiError::invalid_param(
            "name",
            "A key name is 1 to 100 bytes.",
        )));
    }
    if b.rpm_limit == Some(0) {
        return Err(err(ApiError::invalid_param(
            "rpm_limit",
            "rpm_limit must be at least 1.",
        )));
    }
    let k = nexus
        .accounts
        .create_key(&c.user_id, &name, b.spend_limit, b.rpm_limit)
        .await
        .map_err(store_err)?;
    Ok((axum::http::StatusCode::CREATED, Json(k)).into_response())
}

pub(crate) async fn list_keys(State(nexus): State<Arc<Nexus>>, Signed(c): Signed) -> ApiResult {
    let keys = nexus
        .accounts
        .list_keys(&c.user_id)
        .await
        .map_err(store_err)?;
    Ok(Json(json!({ "data": keys })).into_response())
}

pub(crate) async fn revoke_key(
    State(nexus): State<Arc<Nexus>>,
    Signed(c): Signed,
    Path(id): Path<String>,
) -> ApiResult {
    if nexus
        .accounts
        .revoke_key(&c.user_id, &id)
        .await
        .map_err(store_err)?
    {
        Ok(Json(json!({"id": id, "revoked": true})).into_response())
    } else {
        Err(err(ApiError::not_found(&format!("/lattice/v1/keys/{id}"))))
    }
}

#[derive(Deserialize)]
pub(crate) struct UsageQuery {
    from: Option<String>,
    to: Option<String>,
    group: Option<UsageGroup>,
}

/// Longest usage range one request may scan (rows are summed as they stream).
const MAX_USAGE_DAYS: i64 = 366;

fn day_range(q: &UsageQuery) -> Result<(String, String), Response> {
    let today = time::OffsetDateTime::now_utc().date();
    let parse = |s: &Option<String>, default: time::Date| -> Result<time::Date, Response> {
        match s {
            None => Ok(default),
            Some(d) => {
                time::Date::parse(d, time::macros::format_description!("[year]-[month]-[day]"))
                    .map_err(|_| {
                        err(ApiError::invalid_request(format!(
                            "Bad date {d:?}: use YYYY-MM-DD."
                        )))
                    })
            }
        }
    };
    let from = parse(&q.from, today - time::Duration::days(30))?;
    let to = parse(&q.to, today)?;
    let days = (to - from).whole_days();
    if !(0..=MAX_USAGE_DAYS).contains(&days) {
        return Err(err(ApiError::invalid_request(format!(
            "`from` must not be after `to`, and a range spans at most {MAX_USAGE_DAYS} days."
        ))));
    }
    Ok((from.to_string(), to.to_string()))
}

pub(crate) async fn usage(
    State(nexus): State<Arc<Nexus>>,
    Signed(c): Signed,
    q: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| err(ApiError::invalid_request(e.to_string())))?;
    let (from, to) = day_range(&q)?;
    let group = q.group.unwrap_or(UsageGroup::Day);
    nexus.settled(&c.user_id).await;
    let rows = nexus
        .accounts
        .usage(&c.user_id, &from, &to, group)
        .await
        .map_err(store_err)?;
    Ok(Json(json!({"from": from, "to": to, "group": group, "data": rows})).into_response())
}

pub(crate) async fn node_earnings(
    State(nexus): State<Arc<Nexus>>,
    Path(address): Path<String>,
    q: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| err(ApiError::invalid_request(e.to_string())))?;
    let address = address.to_lowercase();
    if address.len() != 42 || !address.starts_with("0x") {
        return Err(err(ApiError::invalid_request(
            "Expected a node address 0x….",
        )));
    }
    let (from, to) = day_range(&q)?;
    let group = q.group.unwrap_or(UsageGroup::Day);
    nexus.node_settled(&address).await;
    let l = nexus.accounts.ledger();
    let earned = l
        .balance(&Account::Node(address.clone()))
        .await
        .map_err(store_err)?;
    let pool = l
        .balance(&Account::Pool(address.clone()))
        .await
        .map_err(store_err)?;
    let rows = nexus
        .accounts
        .node_usage(&address, &from, &to, group)
        .await
        .map_err(store_err)?;
    Ok(Json(json!({
        "node": address,
        "earned": earned,
        "staking_pool": pool,
        "from": from, "to": to, "group": group,
        "data": rows,
    }))
    .into_response())
}

pub(crate) async fn conversations(State(nexus): State<Arc<Nexus>>, Signed(c): Signed) -> ApiResult {
    let list = nexus
        .accounts
        .conversations(&c.user_id)
        .await
        .map_err(store_err)?;
    Ok(Json(json!({ "data": list })).into_response())
}

pub(crate) async fn conversation(
    State(nexus): State<Arc<Nexus>>,
    Signed(c): Signed,
    Path(id): Path<String>,
) -> ApiResult {
    match nexus
        .accounts
        .conversation(&c.user_id, &id)
        .await
        .map_err(store_err)?
    {
        Some(m) => Ok(Json(json!({"id": id, "messages": m})).into_response()),
        None => Err(err(ApiError::not_found(&format!(
            "/lattice/v1/history/{id}"
        )))),
    }
}

pub(crate) async fn delete_conversation(
    State(nexus): State<Arc<Nexus>>,
    Signed(c): Signed,
    Path(id): Path<String>,
) -> ApiResult {
    let n = nexus
        .accounts
        .delete_history(&c.user_id, Some(&id))
        .await
        .map_err(store_err)?;
    if n == 0 {
        return Err(err(ApiError::not_found(&format!(
            "/lattice/v1/history/{id}"
        ))));
    }
    Ok(Json(json!({"deleted": n})).into_response())
}

pub(crate) async fn delete_history(
    State(nexus): State<Arc<Nexus>>,
    Signed(c): Signed,
) -> ApiResult {
    let n = nexus
        .accounts
        .delete_history(&c.user_id, None)
        .await
        .map_err(store_err)?;
    Ok(Json(json!({"deleted": n})).into_response())
}

#[derive(Deserialize)]
pub(crate) struct PasskeyStart {
    name: String,
}

#[derive(Deserialize)]
pub(crate) struct PasskeyRegisterFinish {
    challenge: String,
    credential: lattice_accounts::RegisterPublicKeyCredential,
}

#[derive(Deserialize)]
pub(crate) struct PasskeyLoginFinish {
    challenge: String,
    credential: lattice_accounts::PublicKeyCredential,
}

fn signed_in(nexus: &Nexus, s: lattice_accounts::SignIn) -> Response {
    let max_age = nexus.accounts.config().session_ttl.as_secs();
    let resp = Json(json!({
        "user": s.user,
        "new_user": s.new_user,
        "faucet": s.faucet,
        "session": s.session,
    }))
    .into_response();
    with_session(resp, &s.session, max_age)
}

async fn current_user(nexus: &Nexus, headers: &HeaderMap) -> Option<String> {
    let t = token(headers)?;
    nexus
        .accounts
        .authenticate(t)
        .await
        .ok()
        .flatten()
        .map(|c| c.user_id)
}

/// Starts registering a passkey (a new account, or added to the signed-in one).
pub(crate) async fn passkey_register_start(
    State(nexus): State<Arc<Nexus>>,
    headers: HeaderMap,
    b: Result<Json<PasskeyStart>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let link_to = current_user(&nexus, &headers).await;
    let (challenge, options) = nexus
        .accounts
        .passkey_register_start(&b.name, link_to.as_deref())
        .await
        .map_err(store_err)?;
    Ok(Json(json!({"challenge": challenge, "options": options})).into_response())
}

pub(crate) async fn passkey_register_finish(
    State(nexus): State<Arc<Nexus>>,
    Client(client): Client,
    b: Result<Json<PasskeyRegisterFinish>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let s = nexus
        .accounts
        .passkey_register_finish(&b.challenge, &b.credential, &client)
        .await
        .map_err(store_err)?;
    Ok(signed_in(&nexus, s))
}

pub(crate) async fn passkey_login_start(
    State(nexus): State<Arc<Nexus>>,
    b: Result<Json<PasskeyStart>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let (challenge, options) = nexus
        .accounts
        .passkey_login_start(&b.name)
        .await
        .map_err(store_err)?;
    Ok(Json(json!({"challenge": challenge, "options": options})).into_response())
}

pub(crate) async fn passkey_login_finish(
    State(nexus): State<Arc<Nexus>>,
    Client(client): Client,
    b: Result<Json<PasskeyLoginFinish>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let s = nexus
        .accounts
        .passkey_login_finish(&b.challenge, &b.credential, &client)
        .await
        .map_err(store_err)?;
    Ok(signed_in(&nexus, s))
}

const OIDC_STATE_COOKIE: &str = "lattice_oidc_state";
const OIDC_PATH: &str = "/lattice/v1/auth/oidc";

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(name)?.strip_prefix('='))
}

/// Redirects to the identity provider; the flow's `state` is bound to this browser by a cookie.
pub(crate) async fn oidc_start(State(nexus): State<Arc<Nexus>>) -> ApiResult {
    let Some(p) = &nexus.oidc else {
        return Err(err(ApiError::invalid_request(
            "OpenID Connect sign-in is not configured on this Nexus.",
        )));
    };
    let url = nexus.accounts.oidc_start(p).await.map_err(store_err)?;
    let state = state_param(&url).unwrap_or_default();
    let mut resp = axum::response::Redirect::to(&url).into_response();
    let c = format!(
        "{OIDC_STATE_COOKIE}={state}; Path={OIDC_PATH}; HttpOnly; SameSite=Lax; Max-Age=600"
    );
    if let Ok(v) = HeaderValue::from_str(&c) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}

fn state_param(url: &str) -> Option<String> {
    let q = url.split_once('?')?.1;
    q.split('&')
        .find_map(|kv| kv.strip_prefix("state="))
        .map(str::to_owned)
}

#[derive(Deserialize)]
pub(crate) struct OidcCallback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// The provider sends the browser back here: check the state against the cookie, finish the
/// sign-in, set the session and return to the app.
pub(crate) async fn oidc_callback(
    State(nexus): State<Arc<Nexus>>,
    Client(client): Client,
    headers: HeaderMap,
    q: Result<Query<OidcCallback>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Some(p) = &nexus.oidc else {
        return Err(err(ApiError::invalid_request(
            "OpenID Connect sign-in is not configured on this Nexus.",
        )));
    };
    let Query(q) = q.map_err(|e| err(ApiError::invalid_request(e.to_string())))?;
    if let Some(e) = q.error {
        return Err(err(ApiError::unauthorized(format!(
            "The identity provider refused the sign-in: {e}{}",
            q.error_description
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        ))));
    }
    let (Some(code), Some(state)) = (q.code, q.state) else {
        return Err(err(ApiError::invalid_request("Missing code or state.")));
    };
    if cookie(&headers, OIDC_STATE_COOKIE) != Some(state.as_str()) {
        return Err(err(ApiError::unauthorized(
            "This sign-in was not started in this browser; start again.",
        )));
    }
    let link_to = current_user(&nexus, &headers).await;
    let s = nexus
        .accounts
        .oidc_finish(p, &code, &state, link_to.as_deref(), &client)
        .await
        .map_err(store_err)?;
    let max_age = nexus.accounts.config().session_ttl.as_secs();
    let mut resp = with_session(
        axum::response::Redirect::to("/").into_response(),
        &s.session,
        max_age,
    );
    let clear =
        format!("{OIDC_STATE_COOKIE}=; Path={OIDC_PATH}; HttpOnly; SameSite=Lax; Max-Age=0");
    if let Ok(v) = HeaderValue::from_str(&clear) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(resp)
}
