//! OpenID Connect sign-in end to end against a real OpenID provider: `oidc-provider` (node,
//! tests/oidc, installed by scripts/setup.sh) on an ephemeral port. A headless "browser" (a
//! cookie-keeping HTTP client that does not follow redirects) fills in the provider's login and
//! consent forms until it is redirected back with `code` and `state`, which `oidc_finish` takes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::time::Duration;

use lattice_accounts::{
    Accounts, AccountsConfig, Db, FaucetOutcome, LedgerConfig, OidcConfig, OidcProvider, StoreError,
};
use lattice_ledger::Money;
use reqwest::{StatusCode, Url};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const CLIENT_ID: &str = "nexus-test";
const CLIENT_SECRET: &str = "nexus-test-secret";
/// Registered with the provider; never contacted (the browser stops at the redirect).
const REDIRECT_URI: &str = "http://127.0.0.1:1/auth/oidc/callback";

/// Starts the provider on an ephemeral port; returns it (killed when dropped) and its issuer.
async fn spawn_provider() -> (Child, String) {
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
        .env("OIDC_REDIRECT_URIS", REDIRECT_URI)
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

/// Acts as the user's browser from the authorization URL: follows redirects, submits the
/// provider's login and consent forms, and stops at the redirect to [`REDIRECT_URI`].
async fn drive_login(auth_url: &str, login: &str) -> Url {
    // A fresh browser per sign-in: no provider session carries over between users.
    let browser = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut current = Url::parse(auth_url).unwrap();
    let mut resp = browser.get(current.clone()).send().await.unwrap();
    for _ in 0..20 {
        let status = resp.status();
        if status.is_redirection() {
            let location = resp.headers()["location"].to_str().unwrap();
            let next = current.join(location).unwrap();
            if next.as_str().starts_with(REDIRECT_URI) {
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
    panic!("no redirect back to the client after 20 steps")
}

/// Starts a sign-in and logs `login` in at the provider; returns the callback's (code, state).
async fn authorize(acc: &Accounts, p: &OidcProvider, login: &str) -> (String, String) {
    let url = acc.oidc_start(p).await.unwrap();
    let callback = drive_login(&url, login).await;
    let q = |k: &str| {
        callback
            .query_pairs()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.into_owned())
    };
    assert_eq!(q("iss").as_deref(), Some(p.issuer()), "RFC 9207 iss");
    let code = q("code").unwrap_or_else(|| panic!("no code in {callback}"));
    (code, q("state").unwrap())
}

fn lai(n: u64) -> Money {
    Money::from_lai(n).unwrap()
}

async fn open_accounts(dir: &tempfile::TempDir) -> Accounts {
    let url = format!("sqlite://{}", dir.path().join("nexus.db").display());
    let config = AccountsConfig {
        faucet_amount: lai(10),
        master_secret: [7; 32],
        ledger: LedgerConfig {
            owner: "test".into(),
            ..LedgerConfig::default()
        },
        ..AccountsConfig::default()
    };
    Accounts::open(Db::open(&url).await.unwrap(), config)
        .await
        .unwrap()
}

fn refused(r: Result<impl std::fmt::Debug, StoreError>, what: &str) -> String {
    match r {
        Err(StoreError::SignIn(msg)) => msg,
        other => panic!("{what}: expected a refused sign-in, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_sign_in_with_a_real_provider() {
    let (_provider, issuer) = spawn_provider().await;
    let dir = tempfile::tempdir().unwrap();
    let acc = open_accounts(&dir).await;
    let p = OidcProvider::discover(OidcConfig {
        issuer: issuer.clone(),
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.into(),
        redirect_url: REDIRECT_URI.into(),
    })
    .await
    .unwrap();
    assert_eq!(p.issuer(), issuer);

    // First sign-in: a new custodial account with the faucet.
    let (code, state) = authorize(&acc, &p, "alice").await;
    let first = acc
        .oidc_finish(&p, &code, &state, None, "10.0.0.1")
        .await
        .unwrap();
    assert!(first.new_user);
    assert_eq!(first.faucet, FaucetOutcome::Granted { amount: lai(10) });
    let user = &first.user;
    assert!(user.custodial);
    assert!(user.address.starts_with("0x"), "{}", user.address);
    assert_eq!(user.address.len(), 42, "{}", user.address);
    assert!(user.address[2..].bytes().all(|b| b.is_ascii_hexdigit()));
    let ids = acc.identities(&user.id).await.unwrap();
    assert_eq!(ids.len(), 1);
    assert_eq!(ids[0].kind, format!("oidc:{issuer}"));
    assert_eq!(ids[0].subject, "alice");
    assert_eq!(
        acc.session_user(&first.session).await.unwrap().as_ref(),
        Some(user)
    );
    assert_eq!(acc.balance(&user.id).await.unwrap().available, lai(10));

    // The state is single-use: replaying the callback fails, whatever the code.
    let msg = refused(
        acc.oidc_finish(&p, &code, &state, None, "10.0.0.1").await,
        "replay",
    );
    assert!(msg.contains("already used"), "{msg}");
    let msg = refused(
        acc.oidc_finish(&p, &code, "not-a-state-we-issued", None, "10.0.0.1")
            .await,
        "bogus state",
    );
    assert!(msg.contains("sign-in state"), "{msg}");
    refused(
        acc.oidc_finish(&p, &code, &"s".repeat(2049), None, "10.0.0.1")
            .await,
        "oversized state",
    );
    refused(
        acc.oidc_finish(&p, &"c".repeat(2049), &state, None, "10.0.0.1")
            .await,
        "oversized code",
    );

    // A code the provider did not issue is refused by its token endpoint (and burns the state).
    let state = acc.oidc_start(&p).await.unwrap();
    let state = Url::parse(&state)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let msg = refused(
        acc.oidc_finish(&p, "forged-code", &state, None, "10.0.0.1")
            .await,
        "forged code",
    );
    assert!(msg.contains("code exchange failed"), "{msg}");
    refused(
        acc.oidc_finish(&p, "forged-code", &state, None, "10.0.0.1")
            .await,
        "state after a failed exchange",
    );

    // Signing in again: the same account, a new session, no second faucet.
    let (code, state) = authorize(&acc, &p, "alice").await;
    let again = acc
        .oidc_finish(&p, &code, &state, None, "10.0.0.2")
        .await
        .unwrap();
    assert_eq!(again.user.id, user.id);
    assert!(!again.new_user);
    assert_eq!(again.faucet, FaucetOutcome::AlreadyClaimed);
    assert_ne!(again.session, first.session);
    assert_eq!(acc.balance(&user.id).await.unwrap().available, lai(10));

    // Another provider user is another account.
    let (code, state) = authorize(&acc, &p, "bob").await;
    let bob = acc
        .oidc_finish(&p, &code, &state, None, "10.0.0.3")
        .await
        .unwrap();
    assert!(bob.new_user);
    assert_ne!(bob.user.id, user.id);
    assert_ne!(bob.user.address, user.address);

    // A signed-in user links another provider login to their account.
    let (code, state) = authorize(&acc, &p, "carol").await;
    let linked = acc
        .oidc_finish(&p, &code, &state, Some(&user.id), "10.0.0.4")
        .await
        .unwrap();
    assert_eq!(linked.user.id, user.id);
    assert!(!linked.new_user);
    let mut subjects: Vec<String> = acc
        .identities(&user.id)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.subject)
        .collect();
    subjects.sort();
    assert_eq!(subjects, ["alice", "carol"]);
    // …but not one that already belongs to someone else.
    let (code, state) = authorize(&acc, &p, "bob").await;
    let taken = acc
        .oidc_finish(&p, &code, &state, Some(&user.id), "10.0.0.4")
        .await;
    assert!(matches!(taken, Err(StoreError::Conflict(_))), "{taken:?}");
}

#[tokio::test]
async fn discovery_of_an_unreachable_issuer_fails_cleanly() {
    let err = OidcProvider::discover(OidcConfig {
        issuer: "http://127.0.0.1:1".into(),
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.into(),
        redirect_url: REDIRECT_URI.into(),
    })
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    let err = OidcProvider::discover(OidcConfig {
        issuer: "not a url".into(),
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.into(),
        redirect_url: REDIRECT_URI.into(),
    })
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
}

/// This package's directory, read when the test runs (cargo and nextest set it): a test binary
/// reused from a build in another checkout must not look in that checkout.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}
