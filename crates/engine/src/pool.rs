//! HTTP/1 connections to one upstream origin, reused. hyper's own pooled client (hyper-util's
//! legacy `Client`) spawns a task per request to watch the connection become idle again, and
//! builds a connect future, a pool key and a `Host` header for every request; under the router
//! benchmark that was ~8 % of the node's CPU. Here a connection is taken from a short stack
//! of idle ones (or opened), and given back when its response has been read to the end.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use http::header::{HOST, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::{BodyDataStream, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service;

pub(crate) type Body = Full<Bytes>;
type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// A connection idle this long is closed instead of reused (hyper's pool's default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the end of a finished stream's body may take to arrive before its connection is
/// dropped instead of reused (a server writes `[DONE]` and the body's end together, or nearly).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Where requests go and how connections are made.
pub(crate) struct Pool {
    https: Https,
    /// `scheme://authority` of the upstream, for the connector.
    origin: Uri,
    host: HeaderValue,
    connect_timeout: Duration,
    /// Most-recently-used last; every entry is a connection whose last response ended.
    idle: Mutex<VecDeque<Idle>>,
    max_idle: usize,
}

struct Idle {
    tx: SendRequest<Body>,
    since: Instant,
}

/// A connection in use by one response; see [`Lease::finish`].
pub(crate) struct Lease {
    tx: SendRequest<Body>,
    pool: Arc<Pool>,
}

impl Pool {
    /// `origin` must have a scheme and an authority; `host` is its `Host` header.
    pub(crate) fn new(
        https: Https,
        origin: Uri,
        host: HeaderValue,
        connect_timeout: Duration,
        max_idle: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            https,
            origin,
            host,
            connect_timeout,
            idle: Mutex::new(VecDeque::new()),
            max_idle,
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `req` (whose URI is in origin form, `/path`) on an idle connection or a new one.
    /// A reused connection that the server closed just before hands the request back unsent;
    /// it is then sent once more on a new connection.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
    ) -> Result<(Response<Incoming>, Lease), String> {
        req.headers_mut().insert(HOST, self.host.clone());
        if let Some(mut tx) = self.take_idle().await {
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok((resp, self.lease(tx))),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(crate::upstream::error_chain(e.error())),
                },
            }
        }
        let mut tx = self.connect().await?;
        let resp = tx
            .send_request(req)
            .await
            .map_err(|e| crate::upstream::error_chain(&e))?;
        Ok((resp, self.lease(tx)))
    }

    fn lease(self: &Arc<Self>, tx: SendRequest<Body>) -> Lease {
        Lease {
            tx,
            pool: self.clone(),
        }
    }

    /// The most recently used idle connection that is still open.
    async fn take_idle(&self) -> Option<SendRequest<Body>> {
        loop {
            let mut tx = {
                let mut idle = self.idle();
                let c = idle.pop_back()?;
                if c.since.elapsed() > IDLE_TIMEOUT {
                    // The rest are older still.
                    idle.clear();
                    return None;
                }
                c.tx
            };
            if tx.is_ready() {
                return Some(tx);
            }
            if tx.is_closed() {
                continue;
            }
            // Given back before its connection task noted that the response ended: ready in
            // a moment, or closed.
            if let Ok(Ok(())) = tokio::time::timeout(self.connect_timeout, tx.ready()).await {
                return Some(tx);
            }
        }
    }

    /// A new connection (TCP, and TLS for `https`), bounded by the connect timeout as a whole.
    async fn connect(&self) -> Result<SendRequest<Body>, String> {
        let timeout = self.connect_timeout;
        let mut https = self.https.clone();
        let connect = async {
            std::future::poll_fn(|cx| https.poll_ready(cx)).await?;
            https.call(self.origin.clone()).await
        };
        let io = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => return Err(crate::upstream::error_chain(e.as_ref())),
            Err(_) => return Err(format!("connecting took longer than {timeout:?}")),
        };
        let (tx, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| crate::upstream::error_chain(&e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(tx)
    }

    fn give_back(&self, tx: SendRequest<Body>) {
        if tx.is_closed() {
            return;
        }
        let mut idle = self.idle();
        if idle.len() < self.max_idle {
            idle.push_back(Idle {
                tx,
                since: Instant::now(),
            });
        }
    }

    #[cfg(test)]
    pub(crate) fn idle_count(&self) -> usize {
        self.idle().len()
    }
}

impl Lease {
    /// The response ended by its protocol (the stream's last event): the connection is reused
    /// once its body has ended too — at once when that is already known, else after reading the
    /// rest in the background (bounded); a body with more data is not reused. A lease dropped
    /// without `finish` closes its connection (hyper closes one whose response is unread).
    pub(crate) fn finish(self, mut body: BodyDataStream<Incoming>, ended: bool) {
        if ended {
            return self.pool.give_back(self.tx);
        }
        match body.next().now_or_never() {
            Some(None) => self.pool.give_back(self.tx),
            Some(Some(_)) => {}
            None => {
                tokio::spawn(async move {
                    if let Ok(None) = tokio::time::timeout(DRAIN_TIMEOUT, body.next()).await {
                        self.pool.give_back(self.tx);
                    }
                });
            }
        }
    }
}
