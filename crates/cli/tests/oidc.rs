//! "Sign in with OpenID Connect" end to end through Nexus over HTTP: a `lattice nexus` process
//! configured with a real OpenID provider (`oidc-provider`, node, tests/oidc, installed by
//! scripts/setup.sh) on an ephemeral port. A headless "browser" (a cookie-keeping HTTP client
//! that does not follow redirects) starts the sign-in at Nexus, fills in the provider's login and
//! consent forms, and delivers the provider's redirect back to Nexus' callback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use reqwest::{Client, Response, StatusCode, Url};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const CLIENT_ID: &str = "nexus-e2e";
const CLIENT_SECRET: &str = "nexus-e2e-secret";
const CALLBACK_PATH: &str = "/lattice/v1/auth/oidc/callback";
/// 10 LAI (the default faucet) in the smallest unit.
const TEN_LAI: &str = "10000000000000000000";

/// A port that was free a moment ago (the listener is dropped before Nexus binds it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the provider on an ephemeral port; returns it (killed when dropped) and its issuer.
async fn spawn_provider(redirect_uri: &str) -> (Child, String) {
    let dir = manifest_dir().join("../../tests/oidc");
    assert!(
        dir.join("node_modules/oidc-provider").is_dir(),
        "oidc-provider is not installed in {}: run scripts/setup.sh",
        dir.display()
    );
    let mut child = Command::new("node")
        .arg("provider.mjs")
        .arg("0")
        .current_dir(&dir)
        .env("OIDC_CLIENT_ID", CLIENT_ID)
        .env("OIDC_CLIENT_SECRET", CLIENT_SECRET)
        .env("OIDC_REDIRECT_URIS", redirect_uri)
        // The provider exits when our end of its stdin closes, even if this test crashes.
        .env("OIDC_EXIT_ON_STDIN_EOF", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn node (is Node.js installed? run scripts/setup.sh)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let issuer = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(issuer) = line.strip_prefix("READY ") {
                return issuer.trim().to_owned();
            }
        }
        panic!("the OpenID provider exited before it was ready")
    })
    .await
    .expect("the OpenID provider did not start within 30 s");
    // Keep draining stdout so the provider never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, issuer)
}

/// Starts `lattice nexus` on `port` with the provider; returns it (killed when dropped) and its
/// URL once it prints `listening on URL`.
async fn spawn_nexus(dir: &Path, port: u16, issuer: &str) -> (Child, String) {
    let listen = format!("127.0.0.1:{port}");
    let public = format!("http://{listen}");
    let db = dir.join("nexus.db");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lattice"))
        .args(["nexus", "--listen", &listen, "--db"])
        .arg(&db)
        .args(["--public-url", &public, "--oidc-issuer", issuer])
        .args(["--oidc-client-id", CLIENT_ID])
        .args(["--oidc-client-secret", CLIENT_SECRET])
        .env("LATTICE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn lattice nexus");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.strip_prefix("listening on ") {
                return url.trim().to_owned();
            }
        }
        panic!("lattice nexus exited before it was listening")
    })
    .await
    .expect("lattice nexus did not start within 60 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, url)
}

/// A fresh browser: keeps cookies, does not follow redirects.
fn browser() -> Client {
    Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The value of attribute `name="…"` in one tag.
fn attr(tag: &str, name: &str) -> Option<String> {
    let pat = format!(" {name}=\"");
    let start = tag.find(&pat)? + pat.len();
    let end = start + tag[start..].find('"')?;
    Some(
        tag[start..end]
            .replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&amp;", "&"),
    )
}

/// The first form of a page: (action, method, fields), with `login`/`password` filled in.
fn parse_form(html: &str, login: &str) -> (String, String, Vec<(String, String)>) {
    let start = html
        .find("<form")
        .unwrap_or_else(|| panic!("no form in page:\n{html}"));
    let end = start + html[start..].find("</form>").unwrap();
    let form = &html[start..end];
    let open = &form[..form.find('>').unwrap()];
    let action = attr(open, "action").unwrap();
    let method = attr(open, "method")
        .unwrap_or_else(|| "get".into())
        .to_lowercase();
    let mut fields = Vec::new();
    for chunk in form.split("<input").skip(1) {
        let tag = &chunk[..chunk.find('>').unwrap_or(chunk.len())];
        let Some(name) = attr(tag, "name") else {
            continue;
        };
        let value = match name.as_str() {
            "login" => login.to_owned(),
            "password" => "any-password".to_owned(),
            _ => attr(tag, "value").unwrap_or_default(),
        };
        fields.push((name, value));
    }
    (action, method, fields)
}

/// The `Set-Cookie` headers of a response.
fn set_cookies(resp: &Response) -> Vec<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

/// The value a `Set-Cookie` header of `resp` gives cookie `name`.
fn set_cookie(resp: &Response, name: &str) -> Option<String> {
    set_cookies(resp).iter().find_map(|c| {
        let v = c.strip_prefix(name)?.strip_prefix('=')?;
        Some(v.split(';').next().unwrap_or_default().to_owned())
    })
}

fn location(resp: &Response, base: &Url) -> Url {
    let l = resp.headers()["location"].to_str().unwrap();
    base.join(l).unwrap()
}

fn query(url: &Url, key: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// Starts a sign-in at Nexus with `browser`: checks the redirect to the provider and the state
/// cookie; returns the authorization URL and the state.
async fn start(browser: &Client, nexus: &str, issuer: &str) -> (Url, String) {
    let url = Url::parse(&format!("{nexus}/lattice/v1/auth/oidc/start")).unwrap();
    let resp = browser.get(url.clone()).send().await.unwrap();
    assert!(
        matches!(
            resp.status(),
            StatusCode::SEE_OTHER | StatusCode::FOUND | StatusCode::TEMPORARY_REDIRECT
        ),
        "start: {}",
        resp.status()
    );
    let auth = location(&resp, &url);
    assert!(
        auth.as_str().starts_with(issuer),
        "start redirects to {auth}, not to the provider {issuer}"
    );
    assert_eq!(query(&auth, "client_id").as_deref(), Some(CLIENT_ID));
    assert_eq!(
        query(&auth, "redirect_uri").as_deref(),
        Some(format!("{nexus}{CALLBACK_PATH}").as_str())
    );
    let state = query(&auth, "state").unwrap_or_else(|| panic!("no state in {auth}"));
    assert_eq!(
        set_cookie(&resp, "lattice_oidc_state").as_deref(),
        Some(state.as_str()),
        "state cookie: {:?}",
        set_cookies(&resp)
    );
    let c = set_cookies(&resp).concat();
    assert!(c.contains("HttpOnly"), "{c}");
    assert!(c.contains("Path=/lattice/v1/auth/oidc"), "{c}");
    (auth, state)
}

/// Acts as the user at the provider from the authorization URL: follows redirects, submits
/// the login and consent forms, and stops at the redirect to `callback` (not delivered).
async fn drive_login(browser: &Client, auth_url: Url, callback: &str, login: &str) -> Url {
    let mut current = auth_url;
    let mut resp = browser.get(current.clone()).send().await.unwrap();
    for _ in 0..20 {
        let status = resp.status();
        if status.is_redirection() {
            let next = location(&resp, &current);
            if next.as_str().starts_with(callback) {
                return next;
            }
            resp = browser.get(next.clone()).send().await.unwrap();
            current = next;
        } else if status == StatusCode::OK {
            let html = resp.text().await.unwrap();
            let (action, method, fields) = parse_form(&html, login);
            let target = current.join(&action).unwrap();
            resp = if method == "post" {
                browser.post(target.clone()).form(&fields).send().await
            } else {
                browser.get(target.clone()).query(&fields).send().await
            }
            .unwrap();
            current = target;
        } else {
            panic!(
                "unexpected {status} at {current}: {}",
                resp.text().await.unwrap_or_default()
            );
        }
    }
    panic!("no redirect back to Nexus after 20 steps")
}

/// Asserts an OpenAI-style JSON error with `status`; returns its message.
async fn api_error(resp: Response, status: StatusCode) -> String {
    assert_eq!(resp.status(), status);
    assert!(
        set_cookie(&resp, "lattice_session").is_none(),
        "an error set a session: {:?}",
        set_cookies(&resp)
    );
    let v: Value = resp.json().await.unwrap();
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"));
    assert!(!msg.is_empty(), "{v}");
    msg.to_owned()
}

async fn account(browser: &Client, nexus: &str) -> Value {
    let resp = browser
        .get(format!("{nexus}/lattice/v1/account"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_sign_in_through_nexus() {
    let port = free_port();
    let nexus_url = format!("http://127.0.0.1:{port}");
    let callback = format!("{nexus_url}{CALLBACK_PATH}");
    let (_provider, issuer) = spawn_provider(&callback).await;
    let dir = tempfile::tempdir().unwrap();
    let (_nexus, url) = spawn_nexus(dir.path(), port, &issuer).await;
    assert_eq!(url, nexus_url);

    // Browser A signs in: start → provider login/consent → callback → session cookie.
    let a = browser();
    let (auth, state) = start(&a, &nexus_url, &issuer).await;
    let back = drive_login(&a, auth, &callback, "alice").await;
    assert_eq!(query(&back, "state").as_deref(), Some(state.as_str()));
    assert_eq!(
        query(&back, "iss").as_deref(),
        Some(issuer.as_str()),
        "RFC 9207 iss"
    );
    assert!(query(&back, "code").is_some(), "no code in {back}");
    let resp = a.get(back.clone()).send().await.unwrap();
    assert!(
        resp.status().is_redirection(),
        "callback: {}",
        resp.status()
    );
    assert_eq!(resp.headers()["location"], "/");
    let session = set_cookie(&resp, "lattice_session")
        .unwrap_or_else(|| panic!("no session cookie: {:?}", set_cookies(&resp)));
    assert!(!session.is_empty());
    assert_eq!(
        set_cookie(&resp, "lattice_oidc_state").as_deref(),
        Some(""),
        "the state cookie is cleared: {:?}",
        set_cookies(&resp)
    );

    // The session cookie signs the browser in: a new custodial account with the faucet.
    let acct = account(&a, &nexus_url).await;
    let ids = acct["identities"].as_array().unwrap();
    assert_eq!(ids.len(), 1, "{acct}");
    let kind = ids[0]["kind"].as_str().unwrap();
    assert!(kind.starts_with("oidc:"), "{acct}");
    assert_eq!(kind, format!("oidc:{issuer}"));
    assert_eq!(ids[0]["subject"], "alice", "{acct}");
    assert_eq!(acct["balance"]["available"], TEN_LAI, "{acct}");
    let user_id = acct["user"]["id"].as_str().unwrap().to_owned();
    let address = acct["user"]["address"].as_str().unwrap();
    assert!(address.starts_with("0x") && address.len() == 42, "{acct}");
    // The same session works as a bearer token.
    let resp = Client::new()
        .get(format!("{nexus_url}/lattice/v1/account"))
        .bearer_auth(&session)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // Replaying the callback in the same browser: its state cookie is gone → 401.
    let resp = a.get(back.clone()).send().await.unwrap();
    let msg = api_error(resp, StatusCode::UNAUTHORIZED).await;
    assert!(msg.contains("not started in this browser"), "{msg}");
    // …and with the state cookie put back by hand: the state is used → 401.
    let resp = Client::new()
        .get(back.clone())
        .header("cookie", format!("lattice_oidc_state={state}"))
        .send()
        .await
        .unwrap();
    let msg = api_error(resp, StatusCode::UNAUTHORIZED).await;
    assert!(msg.contains("already used"), "{msg}");

    // A sign-in started in browser A cannot be finished in browser B (no state cookie).
    let (auth, state2) = start(&a, &nexus_url, &issuer).await;
    assert_ne!(state2, state);
    let back2 = drive_login(&a, auth, &callback, "alice").await;
    let b = browser();
    let resp = b.get(back2.clone()).send().await.unwrap();
    let msg = api_error(resp, StatusCode::UNAUTHORIZED).await;
    assert!(msg.contains("not started in this browser"), "{msg}");
    let resp = b
        .get(format!("{nexus_url}/lattice/v1/account"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "B is not signed in"
    );
    // The refusal did not burn A's flow: A finishes it, into the same account, no second faucet.
    let resp = a.get(back2).send().await.unwrap();
    assert!(
        resp.status().is_redirection(),
        "callback: {}",
        resp.status()
    );
    let session2 = set_cookie(&resp, "lattice_session").unwrap();
    assert_ne!(session2, session);
    let acct = account(&a, &nexus_url).await;
    assert_eq!(acct["user"]["id"], user_id.as_str(), "{acct}");
    assert_eq!(acct["identities"].as_array().unwrap().len(), 1, "{acct}");
    assert_eq!(acct["balance"]["available"], TEN_LAI, "{acct}");

    // The provider refused (the user denied consent): 401 with the provider's error.
    let resp = b
        .get(format!(
            "{callback}?error=access_denied&error_description=User%20denied"
        ))
        .send()
        .await
        .unwrap();
    let msg = api_error(resp, StatusCode::UNAUTHORIZED).await;
    assert!(msg.contains("access_denied"), "{msg}");
    let resp = b
        .get(format!("{callback}?error=access_denied"))
        .send()
        .await
        .unwrap();
    api_error(resp, StatusCode::UNAUTHORIZED).await;
    // No code or state: a bad request.
    let resp = b.get(&callback).send().await.unwrap();
    api_error(resp, StatusCode::BAD_REQUEST).await;
}

/// This package's directory, read when the test runs (cargo and nextest set it): a test binary
/// reused from a build in another checkout must not look in that checkout.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}
