//! The web UI: plain ES modules, one CSS file and one HTML page from `web/` at the repository
//! root, embedded into the binary at compile time (building needs no Node) and served by Nexus.
//!
//! `/` is the single-page app (hash routes `#/chat`, `#/network`, `#/account`, `#/node`,
//! `#/signin`); `/assets/*` the files it loads. Every response carries a strict
//! Content-Security-Policy (scripts and styles from this origin only, no inline code),
//! `nosniff` and no framing. Assets are revalidated on each load (`no-cache` with an `ETag`), so
//! a new binary never serves stale scripts and an unchanged one answers `304`.

use axum::Router;
use axum::body::Body;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// What this Nexus offers that the UI cannot discover by itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// "Sign in with …" through an OpenID Connect provider is configured.
    pub oidc: bool,
    /// Passkeys are available (Nexus is reached at a domain name).
    pub passkeys: bool,
}

/// Sent with every UI response.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; \
     manifest-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! assets {
    ($($path:literal => $ct:expr),* $(,)?) => {
        &[$(Asset {
            path: $path,
            content_type: $ct,
            body: include_bytes!(concat!("../../../web/assets/", $path)),
        }),*]
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file under `web/assets` (a test checks that none is missing).
static ASSETS: &[Asset] = assets! {
    "style.css" => "text/css; charset=utf-8",
    "favicon.svg" => "image/svg+xml",
    "app.js" => JS,
    "api.js" => JS,
    "dom.js" => JS,
    "format.js" => JS,
    "markdown.js" => JS,
    "webauthn.js" => JS,
    "pages/signin.js" => JS,
    "pages/chat.js" => JS,
    "pages/network.js" => JS,
    "pages/account.js" => JS,
    "pages/node.js" => JS,
};

const INDEX: &[u8] = include_bytes!("../../../web/index.html");

/// `LATTICE_WEB_DIR=web`: serve the UI's files from that directory instead of the embedded
/// copies (only the files that are embedded, by the same names), so editing the UI needs no
/// rebuild. Read once.
fn dev_dir() -> Option<&'static std::path::Path> {
    static DIR: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| std::env::var_os("LATTICE_WEB_DIR").map(std::path::PathBuf::from))
        .as_deref()
}

/// The bytes of `rel` (relative to `web/`): from the dev directory when set and readable.
fn body_of(rel: &str, embedded: &'static [u8]) -> std::borrow::Cow<'static, [u8]> {
    match dev_dir().and_then(|d| std::fs::read(d.join(rel)).ok()) {
        Some(b) => std::borrow::Cow::Owned(b),
        None => std::borrow::Cow::Borrowed(embedded),
    }
}

/// The UI's routes, to merge into Nexus's router.
pub fn router(features: Features) -> Router {
    let config = serde_json::json!({
        "oidc": features.oidc,
        "passkeys": features.passkeys,
    })
    .to_string();
    Router::new()
        .route(
            "/",
            get(|h: HeaderMap| async move {
                serve(&h, body_of("index.html", INDEX), "text/html; charset=utf-8")
            }),
        )
        .route(
            "/assets/config.json",
            get(move |h: HeaderMap| {
                let body = config.clone().into_bytes();
                async move { serve_owned(&h, body, "application/json") }
            }),
        )
        .route("/assets/{*path}", get(asset))
}

async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.path == path) {
        Some(a) => serve(
            &headers,
            body_of(&format!("assets/{}", a.path), a.body),
            a.content_type,
        ),
        None => not_found(),
    }
}

fn not_found() -> Response {
    let mut r = (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "not found",
    )
        .into_response();
    secure(r.headers_mut());
    r
}

/// FNV-1a: a stable fingerprint of the bytes for the `ETag` (not a security boundary).
fn etag(body: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("\"{h:016x}\"")
}

fn secure(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

fn serve(
    headers: &HeaderMap,
    body: std::borrow::Cow<'static, [u8]>,
    content_type: &'static str,
) -> Response {
    let tag = etag(&body);
    let body = match body {
        std::borrow::Cow::Borrowed(b) => Body::from(b),
        std::borrow::Cow::Owned(b) => Body::from(b),
    };
    respond(headers, body, &tag, content_type)
}

fn serve_owned(headers: &HeaderMap, body: Vec<u8>, content_type: &'static str) -> Response {
    let tag = etag(&body);
    respond(headers, Body::from(body), &tag, content_type)
}

fn respond(headers: &HeaderMap, body: Body, tag: &str, content_type: &'static str) -> Response {
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut r = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = Response::new(body);
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        r
    };
    let h = r.headers_mut();
    secure(h);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(tag) {
        h.insert(header::ETAG, v);
    }
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(path: &str, headers: &[(&str, &str)]) -> Response {
        let mut req = Request::get(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        router(Features::default())
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    async fn text(r: Response) -> String {
        let b = axum::body::to_bytes(r.into_body(), 1 << 22).await.unwrap();
        String::from_utf8(b.to_vec()).unwrap()
    }

    fn header<'a>(r: &'a Response, name: &str) -> &'a str {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }

    #[tokio::test]
    async fn index_is_html_with_a_strict_policy() {
        let r = get("/", &[]).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "content-type"), "text/html; charset=utf-8");
        let csp = header(&r, "content-security-policy");
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe"),
            "{csp}"
        );
        assert_eq!(header(&r, "x-content-type-options"), "nosniff");
        assert_eq!(header(&r, "cache-control"), "no-cache");
        let html = text(r).await;
        assert!(html.contains("/assets/app.js"), "{html}");
    }

    #[tokio::test]
    async fn assets_have_their_content_type_and_unknown_paths_are_404() {
        let r = get("/assets/app.js", &[]).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "content-type"), JS);
        let r = get("/assets/style.css", &[]).await;
        assert_eq!(header(&r, "content-type"), "text/css; charset=utf-8");
        let r = get("/assets/pages/chat.js", &[]).await;
        assert_eq!(r.status(), StatusCode::OK);
        for bad in [
            "/assets/nope.js",
            "/assets/../Cargo.toml",
            "/assets/%2e%2e/index.html",
        ] {
            let r = get(bad, &[]).await;
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{bad}");
            assert_eq!(header(&r, "x-content-type-options"), "nosniff");
        }
    }

    #[tokio::test]
    async fn an_unchanged_asset_is_not_sent_again() {
        let r = get("/assets/app.js", &[]).await;
        let tag = header(&r, "etag").to_owned();
        assert!(tag.starts_with('"') && tag.len() == 18, "{tag}");
        let again = get("/assets/app.js", &[("if-none-match", &tag)]).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        assert!(text(again).await.is_empty());
        let other = get(
            "/assets/app.js",
            &[("if-none-match", "\"0000000000000000\"")],
        )
        .await;
        assert_eq!(other.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn config_tells_the_ui_what_is_offered() {
        let r = router(Features {
            oidc: true,
            passkeys: false,
        })
        .oneshot(
            Request::get("/assets/config.json")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(header(&r, "content-type"), "application/json");
        let v: serde_json::Value = serde_json::from_str(&text(r).await).unwrap();
        assert_eq!(v, serde_json::json!({"oidc": true, "passkeys": false}));
    }

    /// Every file in `web/assets` is embedded, and the page has no inline code the policy would
    /// block (inline scripts, event-handler attributes, style attributes).
    #[test]
    fn every_asset_is_embedded_and_nothing_is_inline() {
        let root = std::path::PathBuf::from(
            std::env::var_os("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
        )
        .join("../../web");
        let mut on_disk = Vec::new();
        let mut dirs = vec![root.join("assets")];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else {
                    let rel = p.strip_prefix(root.join("assets")).unwrap();
                    on_disk.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        on_disk.sort();
        let mut embedded: Vec<String> = ASSETS.iter().map(|a| a.path.to_owned()).collect();
        embedded.sort();
        assert_eq!(on_disk, embedded, "web/assets and ASSETS differ");
        let html = String::from_utf8(INDEX.to_vec()).unwrap().to_lowercase();
        for (i, _) in html.match_indices("<script") {
            let tag = &html[i..i + html[i..].find('>').unwrap()];
            assert!(tag.contains(" src="), "inline script: {tag}");
        }
        assert!(!html.contains(" style="), "inline style attribute");
        assert!(
            !html.contains(" onclick=") && !html.contains(" onload="),
            "inline handler"
        );
        for a in ASSETS.iter().filter(|a| a.content_type == JS) {
            let js = std::str::from_utf8(a.body).unwrap();
            assert!(!js.contains(".innerHTML"), "{} sets innerHTML", a.path);
            assert!(!js.contains("eval("), "{} uses eval", a.path);
        }
    }
}
