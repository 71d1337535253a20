//! OpenAI-compatible HTTP API over any [`Engine`] (a node's model or Nexus's network): request
//! validation, SSE streaming, Prometheus metrics and explicit bounds on body, tokens and load.

mod embeddings;
mod handlers;
mod metrics;
mod params;
mod stream;
mod tools;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::DefaultBodyLimit;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use lattice_api::ApiError;
use lattice_engine::Engine;
use tower::ServiceBuilder;

pub use metrics::Metrics;

/// Limits applied to every request; each has a clear error when exceeded.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest accepted request body (413 beyond).
    pub max_body_bytes: usize,
    /// HTTP requests processed at once, streaming ones included (503 beyond).
    pub max_in_flight: usize,
    /// Stop sequences per request (OpenAI allows 4).
    pub max_stop_sequences: usize,
    /// Length of one stop sequence, in bytes.
    pub max_stop_bytes: usize,
    /// Answers one request may ask for (`n`, times the prompts of a completions list); each
    /// is generated as a request of its own.
    pub max_choices: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 << 20,
            max_in_flight: 256,
            max_stop_sequences: 4,
            max_stop_bytes: 256,
            max_choices: 16,
        }
    }
}

/// Resolves who is calling the API (Nexus: API keys and sessions); its errors are the response.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate<'a>(
        &'a self,
        headers: &'a axum::http::HeaderMap,
    ) -> futures::future::BoxFuture<'a, Result<lattice_engine::Payer, ApiError>>;
}

pub(crate) struct AppState {
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) auth: Option<Arc<dyn Authenticator>>,
    pub(crate) limits: Limits,
    pub(crate) metrics: Metrics,
    pub(crate) started: std::time::SystemTime,
}

/// Wrapper so handlers can return `Result<_, ApiErrorResponse>`.
pub(crate) struct ApiErrorResponse(pub(crate) ApiError);

impl From<ApiError> for ApiErrorResponse {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiErrorResponse {
    fn into_response(self) -> Response {
        error_response(&self.0)
    }
}

/// The OpenAI-style JSON error response for `e` (with Retry-After on 429/503).
pub fn error_response(e: &ApiError) -> Response {
    let status = axum::http::StatusCode::from_u16(e.status)
        .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        e.to_json(),
    )
        .into_response();
    if status == axum::http::StatusCode::SERVICE_UNAVAILABLE
        || status == axum::http::StatusCode::TOO_MANY_REQUESTS
    {
        resp.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("1"),
        );
    }
    resp
}

/// Builds the HTTP application for an engine; metric names start with `metrics_prefix`
/// (`lattice_node`, `lattice_nexus`).
pub fn router(engine: Arc<dyn Engine>, limits: Limits, metrics_prefix: &str) -> Router {
    router_with_auth(engine, limits, metrics_prefix, None)
}

/// Like [`router`], with completions requiring a caller `auth` accepts (`/v1/models` stays
/// public, so a sign-in page can show what the network serves).
pub fn router_with_auth(
    engine: Arc<dyn Engine>,
    limits: Limits,
    metrics_prefix: &str,
    auth: Option<Arc<dyn Authenticator>>,
) -> Router {
    let max_in_flight = limits.max_in_flight.max(1);
    let max_body = limits.max_body_bytes;
    let state = Arc::new(AppState {
        engine,
        auth,
        limits,
        metrics: Metrics::new(metrics_prefix),
        started: std::time::SystemTime::now(),
    });
    let api = Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(handlers::models))
        .route("/v1/models/{id}", get(handlers::model))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
                    error_response(&ApiError::overloaded(
                        "Too many requests in flight on this node; retry shortly.",
                    ))
                }))
                .load_shed()
                .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                    max_in_flight,
                )),
        );
    Router::new()
        .merge(api)
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .fallback(
            |uri: axum::http::Uri| async move { error_response(&ApiError::not_found(uri.path())) },
        )
        .method_not_allowed_fallback(|| async { error_response(&ApiError::method_not_allowed()) })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            error_response(&ApiError::internal("internal error"))
        }))
        .with_state(state)
}

/// Binds a listener with a deep accept backlog (4096, like nginx or sglang-router use) so bursts
/// of new connections are not refused before the server gets to them.
pub fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Serves `app` on `listener` until `shutdown` resolves. Sets `TCP_NODELAY` on every
/// connection: tokens are tiny writes and must not wait for Nagle.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
