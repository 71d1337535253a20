//! `x-lattice-node`: which node answered a request, as a response header. The network engine
//! picks the node inside the handler; this middleware gives each request a slot (task-local, as
//! the handler runs in the middleware's task) that the engine fills when a node starts
//! answering, and copies it into the response headers.

use std::sync::{Arc, OnceLock};

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

/// The response header naming the answering node's address.
pub(crate) const HEADER: &str = "x-lattice-node";

tokio::task_local! {
    static ANSWERED_BY: Arc<OnceLock<String>>;
}

/// Records `address` as the node answering the current request (the first one wins: after a
/// node started answering there is no failover).
pub(crate) fn record(address: &str) {
    let _ = ANSWERED_BY.try_with(|slot| slot.set(address.to_owned()));
}

pub(crate) async fn layer(req: Request, next: Next) -> Response {
    let slot = Arc::new(OnceLock::new());
    let mut resp = ANSWERED_BY.scope(slot.clone(), next.run(req)).await;
    if let Some(v) = slot.get().and_then(|a| HeaderValue::from_str(a).ok()) {
        resp.headers_mut().insert(HEADER, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    async fn call(app: Router) -> Option<String> {
        let r = app
            .layer(axum::middleware::from_fn(super::layer))
            .oneshot(axum::http::Request::get("/").body(Body::empty()).unwrap())
            .await
            .unwrap();
        r.headers()
            .get(super::HEADER)
            .map(|v| v.to_str().unwrap().to_owned())
    }

    #[tokio::test]
    async fn the_node_recorded_by_the_handler_is_the_header() {
        let app = Router::new().route(
            "/",
            get(|| async {
                tokio::task::yield_now().await;
                super::record("0x00000000000000000000000000000000000000aa");
                super::record("0x00000000000000000000000000000000000000bb");
                "ok"
            }),
        );
        assert_eq!(
            call(app).await.as_deref(),
            Some("0x00000000000000000000000000000000000000aa")
        );
    }

    #[tokio::test]
    async fn no_node_no_header_and_recording_outside_a_request_is_harmless() {
        super::record("0x1");
        assert_eq!(
            call(Router::new().route("/", get(|| async { "ok" }))).await,
            None
        );
    }
}
