//! `hf:` pulls against a hand-written HTTP server on 127.0.0.1: redirects, hashes, truncation.
//! The server answers canned routes and counts hits, so idempotence is observable.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::fs;
use std::sync::{Arc, Mutex};

use common::*;
use lattice_models::{ModelError, ModelSpec, ModelStore, PullOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Default)]
struct Route {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Announce the full length but close after this many body bytes.
    cut_after: Option<usize>,
    /// Omit Content-Length and end the body by closing the connection.
    no_length: bool,
}

#[derive(Clone, Default)]
struct Server {
    routes: Arc<Mutex<HashMap<String, Route>>>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

impl Server {
    async fn start() -> (Self, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Server::default();
        let s = server.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16384 {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&req).into_owned();
                    let path = text.split(' ').nth(1).unwrap_or("/").to_owned();
                    *s.hits.lock().unwrap().entry(path.clone()).or_default() += 1;
                    let route = s
                        .routes
                        .lock()
                        .unwrap()
                        .get(&path)
                        .cloned()
                        .unwrap_or(Route {
                            status: 404,
                            body: b"not found".to_vec(),
                            ..Route::default()
                        });
                    let mut head = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", route.status);
                    if !route.no_length {
                        head.push_str(&format!("Content-Length: {}\r\n", route.body.len()));
                    }
                    for (k, v) in &route.headers {
                        head.push_str(&format!("{k}: {v}\r\n"));
                    }
                    head.push_str("\r\n");
                    let body = &route.body[..route.cut_after.unwrap_or(route.body.len())];
                    let _ = sock.write_all(head.as_bytes()).await;
                    let _ = sock.write_all(body).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        (server, format!("http://{addr}"))
    }

    fn route(&self, path: &str, route: Route) {
        self.routes.lock().unwrap().insert(path.into(), route);
    }

    fn ok(&self, path: &str, body: &[u8]) {
        self.route(
            path,
            Route {
                status: 200,
                body: body.to_vec(),
                ..Route::default()
            },
        );
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

fn store(endpoint: &str) -> (tempfile::TempDir, ModelStore) {
    let tmp = tempfile::tempdir().unwrap();
    let store = ModelStore::new(tmp.path().join("models")).with_hf_endpoint(endpoint);
    (tmp, store)
}

fn spec(s: &str) -> ModelSpec {
    ModelSpec::parse(s).unwrap()
}

#[tokio::test]
async fn redirect_with_announced_hash_is_verified_and_idempotent() {
    let (server, endpoint) = Server::start().await;
    let content = model_bytes(300_000, 1);
    server.route(
        "/org/repo/resolve/main/sub/m.gguf",
        Route {
            status: 302,
            headers: vec![
                ("Location".into(), "/cdn/blob?sig=1".into()),
                ("X-Linked-Etag".into(), format!("\"{}\"", sha256(&content))),
            ],
            ..Route::default()
        },
    );
    server.ok("/cdn/blob?sig=1", &content);
    let (tmp, store) = store(&endpoint);
    let s = spec("hf:org/repo/sub/m.gguf");

    let rec = Arc::new(Recorder::default());
    let m = store
        .pull(&s, &PullOptions::default().with_progress(rec.clone()))
        .await
        .unwrap();
    let expected_path = tmp.path().join("models/hf/org/repo/main/sub/m.gguf");
    assert_eq!(m.path, expected_path);
    assert_eq!(fs::read(&m.path).unwrap(), content);
    assert!(m.verified, "the hub's X-Linked-Etag pins the hash");
    assert_eq!(m.sha256, Some(sha256(&content)));
    assert_eq!(m.name, "hf:org/repo/sub/m.gguf");
    assert_eq!(rec.bytes(), content.len() as u64);

    let again = store.pull(&s, &PullOptions::default()).await.unwrap();
    assert_eq!(again, m);
    assert_eq!(
        server.hits("/cdn/blob?sig=1"),
        1,
        "second pull must not download"
    );

    let resolved = store
        .resolve("hf:org/repo/sub/m.gguf", false)
        .await
        .unwrap();
    assert_eq!(resolved.path, expected_path);
    let listed = store.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "hf:org/repo/sub/m.gguf");
    assert!(listed[0].verified);
}

#[tokio::test]
async fn truncated_body_is_refused_and_leaves_nothing() {
    let (server, endpoint) = Server::start().await;
    let content = model_bytes(200_000, 2);
    server.route(
        "/o/r/resolve/main/t.gguf",
        Route {
            status: 200,
            body: content.clone(),
            cut_after: Some(100_000),
            ..Route::default()
        },
    );
    let (tmp, store) = store(&endpoint);
    let err = store
        .pull(&spec("hf:o/r/t.gguf"), &PullOptions::default())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            ModelError::Incomplete {
                expected: 200_000,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(msg.contains("was cut short"), "{msg}");
    let dir = tmp.path().join("models/hf/o/r/main");
    assert_eq!(
        names_in(&dir),
        ["t.gguf.lock"],
        "no .part and no final file"
    );

    let err = store.resolve("hf:o/r/t.gguf", false).await.unwrap_err();
    assert!(matches!(err, ModelError::NotDownloaded { .. }), "{err:?}");
}

#[tokio::test]
async fn unannounced_truncation_is_caught_by_the_given_sha256() {
    let (server, endpoint) = Server::start().await;
    let content = model_bytes(200_000, 3);
    // No Content-Length: the body just stops early, as a dying proxy might do.
    server.route(
        "/o/r/resolve/main/c.gguf",
        Route {
            status: 200,
            body: content.clone(),
            cut_after: Some(150_000),
            no_length: true,
            ..Route::default()
        },
    );
    let (_tmp, store) = store(&endpoint);
    let opts = PullOptions::default()
        .with_sha256(&sha256(&content))
        .unwrap();
    let err = store.pull(&spec("hf:o/r/c.gguf"), &opts).await.unwrap_err();
    assert!(matches!(err, ModelError::HashMismatch { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("is corrupt or truncated: expected sha256")
    );
}

#[tokio::test]
async fn wrong_announced_hash_is_refused() {
    let (server, endpoint) = Server::start().await;
    let content = model_bytes(50_000, 4);
    server.route(
        "/o/r/resolve/main/x.gguf",
        Route {
            status: 200,
            body: content.clone(),
            headers: vec![("X-Linked-Etag".into(), format!("\"{}\"", "ab".repeat(32)))],
            ..Route::default()
        },
    );
    let (_tmp, store) = store(&endpoint);
    let err = store
        .pull(&spec("hf:o/r/x.gguf"), &PullOptions::default())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "expected sha256 {}, got {}",
            "ab".repeat(32),
            sha256(&content)
        )),
        "{msg}"
    );
}

#[tokio::test]
async fn without_any_hash_the_computed_one_is_recorded() {
    let (server, endpoint) = Server::start().await;
    let content = model_bytes(40_000, 5);
    server.ok("/o/r/resolve/v2/n.gguf", &content);
    let (_tmp, store) = store(&endpoint);
    let s = spec("hf:o/r@v2/n.gguf");

    let m = store.pull(&s, &PullOptions::default()).await.unwrap();
    assert!(!m.verified, "nothing known-good to compare with");
    assert_eq!(m.sha256, Some(sha256(&content)));
    assert!(m.path.ends_with("hf/o/r/v2/n.gguf"));
    // The recorded hash makes the next pull a no-op...
    store.pull(&s, &PullOptions::default()).await.unwrap();
    assert_eq!(server.hits("/o/r/resolve/v2/n.gguf"), 1);
    // ...and a later --sha256 is checked against it without downloading again.
    let pinned = PullOptions::default()
        .with_sha256(&sha256(&content))
        .unwrap();
    let m = store.pull(&s, &pinned).await.unwrap();
    assert!(m.verified);
    assert_eq!(server.hits("/o/r/resolve/v2/n.gguf"), 1);
    // A different --sha256 means the local file is not the wanted one: fetch, then refuse.
    let other = PullOptions::default()
        .with_sha256(&"cd".repeat(32))
        .unwrap();
    let err = store.pull(&s, &other).await.unwrap_err();
    assert!(matches!(err, ModelError::HashMismatch { .. }), "{err:?}");
    assert_eq!(server.hits("/o/r/resolve/v2/n.gguf"), 2);
    assert!(
        !m.path.exists(),
        "the mismatching file was removed, not kept"
    );
}

#[tokio::test]
async fn http_errors_and_non_gguf_bodies_are_clear() {
    let (server, endpoint) = Server::start().await;
    server.ok(
        "/o/r/resolve/main/page.gguf",
        b"<!doctype html><p>login</p>",
    );
    server.route(
        "/o/gated/resolve/main/g.gguf",
        Route {
            status: 401,
            ..Route::default()
        },
    );
    let (_tmp, store) = store(&endpoint);

    let err = store
        .pull(&spec("hf:o/r/missing.gguf"), &PullOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ModelError::HttpStatus { status: 404, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("check the owner, repository"));

    let err = store
        .pull(&spec("hf:o/gated/g.gguf"), &PullOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");

    let err = store
        .pull(&spec("hf:o/r/page.gguf"), &PullOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, ModelError::NotGguf { .. }), "{err:?}");
}

#[tokio::test]
async fn redirect_loops_are_bounded() {
    let (server, endpoint) = Server::start().await;
    server.route(
        "/o/r/resolve/main/loop.gguf",
        Route {
            status: 302,
            headers: vec![("Location".into(), "/o/r/resolve/main/loop.gguf".into())],
            ..Route::default()
        },
    );
    let (_tmp, store) = store(&endpoint);
    let err = store
        .pull(&spec("hf:o/r/loop.gguf"), &PullOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("redirects"), "{err}");
    assert!(server.hits("/o/r/resolve/main/loop.gguf") <= 10);
}
