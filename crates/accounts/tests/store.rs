//! The accounts store against real databases: SQLite (a file) and PostgreSQL (the server from
//! `LATTICE_TEST_POSTGRES_URL`, or a throwaway cluster started by scripts/postgres.sh).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use lattice_accounts::{
    Accounts, AccountsConfig, BatchKind, BatchLimits, Db, FaucetOutcome, LedgerConfig, LedgerMode,
    NodeTokenRefused, PostError, ReceiptBatch, SiweMessage, StoredReceipt, UsageGroup, UsageRecord,
    WithdrawError, WithdrawalStatus,
};
use lattice_ledger::{Account, Applied, LedgerError, Money, Op, Split};
use lattice_link::{NodeKey, ReceiptInBatch, UsageReceipt};

/// A database for one test; dropping it stops a cluster it started.
struct TestDb {
    url: String,
    _dir: Option<tempfile::TempDir>,
    /// Port of the cluster this test started (stopped and deleted on drop).
    cluster: Option<String>,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(port) = &self.cluster {
            let _ = std::process::Command::new(manifest_dir().join("../../scripts/postgres.sh"))
                .args(["--stop", port])
                .output();
        }
    }
}

async fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    TestDb {
        url: format!("sqlite://{}", dir.path().join("nexus.db").display()),
        _dir: Some(dir),
        cluster: None,
    }
}

async fn postgres() -> TestDb {
    let (admin, cluster) = match std::env::var("LATTICE_TEST_POSTGRES_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let script = manifest_dir().join("../../scripts/postgres.sh");
            let out = std::process::Command::new(script).output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let url = String::from_utf8(out.stdout).unwrap().trim().to_owned();
            let port = url
                .rsplit(':')
                .next()
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .to_owned();
            (url, Some(port))
        }
    };
    // A fresh database per test.
    let name = format!("lattice_test_{}", uuid_like());
    let db = Db::open(&admin).await;
    // The admin database gets migrated too (harmless); we only need a connection to it.
    let db = db.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(db.pool())
        .await
        .unwrap();
    let base = admin.rsplit_once('/').unwrap().0;
    TestDb {
        url: format!("{base}/{name}"),
        _dir: None,
        cluster,
    }
}

fn uuid_like() -> String {
    let mut b = [0u8; 8];
    getrandom(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn getrandom(b: &mut [u8]) {
    let k = NodeKey::generate().unwrap();
    let a = k.address();
    for (i, x) in b.iter_mut().enumerate() {
        *x = a.as_bytes()[2 + i];
    }
}

fn lai(n: u64) -> Money {
    Money::from_lai(n).unwrap()
}

fn config(owner: &str, mode: LedgerMode) -> AccountsConfig {
    AccountsConfig {
        passkeys: Some(lattice_accounts::PasskeyConfig {
            rp_id: "localhost".into(),
            origin: "http://localhost:8080".into(),
        }),
        faucet_amount: lai(10),
        siwe_domain: "localhost:8080".into(),
        master_secret: [7; 32],
        ledger: LedgerConfig {
            mode,
            owner: owner.into(),
            ..LedgerConfig::default()
        },
        ..AccountsConfig::default()
    }
}

async fn open(url: &str, mode: LedgerMode, owner: &str) -> Accounts {
    Accounts::open(Db::open(url).await.unwrap(), config(owner, mode))
        .await
        .unwrap()
}

/// Signs in a fresh wallet with a real SIWE signature; returns (accounts user id, session).
async fn siwe_user(acc: &Accounts, client: &str) -> (String, String, NodeKey) {
    let key = NodeKey::generate().unwrap();
    let nonce = acc.siwe_nonce().await.unwrap();
    let text = siwe_text(&key.address(), &nonce);
    let sig = key.sign(&text).unwrap();
    let s = acc.siwe_sign_in(&text, &sig, None, client).await.unwrap();
    (s.user.id, s.session, key)
}

fn siwe_text(address: &str, nonce: &str) -> String {
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap();
    SiweMessage {
        domain: "localhost:8080".into(),
        address: address.into(),
        statement: Some("Sign in to Lattice".into()),
        uri: "http://localhost:8080".into(),
        version: "1".into(),
        chain_id: 31337,
        nonce: nonce.into(),
        issued_at: now,
        expiration_time: None,
        not_before: None,
    }
    .to_text()
}

fn hold_op(request: &str, user: &str, amount: Money) -> Op {
    Op::Hold {
        request: request.into(),
        user: user.into(),
        key: None,
        amount,
    }
}

fn charge_op(request: &str, user: &str, units: u128) -> Op {
    Op::Charge {
        request: request.into(),
        user: user.into(),
        node: "0xnode".into(),
        amount: Money::from_units(units),
        split: Split::default(),
    }
}

fn usage(request: &str, user: &str) -> UsageRecord {
    UsageRecord {
        request_id: request.into(),
        user_id: user.into(),
        key_id: None,
        node: "0xnode".into(),
        model: "smollm2-135m".into(),
        prompt_tokens: 10,
        completion_tokens: 5,
        receipt: "{}".into(),
        batch: None,
    }
}

async fn sign_in_faucet_hold_charge(url: &str, mode: LedgerMode) {
    let acc = open(url, mode, "a").await;
    let (user, session, key) = siwe_user(&acc, "10.0.0.1").await;
    assert_eq!(acc.balance(&user).await.unwrap().available, lai(10));
    // Session authenticates; the SIWE account's address is the wallet's.
    let caller = acc.authenticate(&session).await.unwrap().unwrap();
    assert_eq!(caller.user_id, user);
    assert_eq!(caller.address, key.address());
    // Signing in again: same user, no second faucet.
    let nonce = acc.siwe_nonce().await.unwrap();
    let text = siwe_text(&key.address(), &nonce);
    let sig = key.sign(&text).unwrap();
    let again = acc
        .siwe_sign_in(&text, &sig, None, "10.0.0.1")
        .await
        .unwrap();
    assert_eq!(again.user.id, user);
    assert_eq!(again.faucet, FaucetOutcome::AlreadyClaimed);
    // Replaying the same signed message (nonce used) is refused.
    assert!(
        acc.siwe_sign_in(&text, &sig, None, "10.0.0.1")
            .await
            .is_err()
    );

    let l = acc.ledger();
    let hold = hold_op("r1", &user, lai(4));
    assert!(matches!(l.post(hold.clone()).await, Ok(Applied::Posted(_))));
    assert_eq!(
        l.post(hold).await,
        Err(PostError::Ledger(LedgerError::DuplicateHold("r1".into())))
    );
    let b = acc.balance(&user).await.unwrap();
    assert_eq!((b.available, b.held), (lai(6), lai(4)));
    let cost = 1_000_000_000_000_000_000u128; // 1 LAI
    assert!(matches!(
        l.charge(charge_op("r1", &user, cost), usage("r1", &user))
            .await,
        Ok(Applied::Posted(_))
    ));
    // Replay: no-op, charged once.
    assert_eq!(
        l.charge(charge_op("r1", &user, cost), usage("r1", &user))
            .await,
        Ok(Applied::Duplicate)
    );
    let b = acc.balance(&user).await.unwrap();
    assert_eq!((b.available, b.held), (lai(9), Money::ZERO));
    assert_eq!(
        l.balance(&Account::Node("0xnode".into())).await.unwrap(),
        Money::from_units(cost * 9 / 10)
    );
    let audit = l.audit().await.unwrap();
    assert!(audit.balanced(), "{audit:?}");
    assert_eq!(audit.issued, lai(10));
    // The faucet's leg, then the hold's and the charge's: the exclusive writer records the
    // charge's three parts paid from the user's credit (no hold leg, no leg giving the rest
    // back); the shared one the hold's leg and the charge's four.
    let legs = match mode {
        LedgerMode::Exclusive => 1 + 3,
        LedgerMode::Shared => 1 + 1 + 4,
    };
    assert_eq!(audit.journal_lines, legs, "{audit:?}");
    if mode == LedgerMode::Exclusive {
        // The exclusive writer keeps a charge's legs in its `charges` row; before migration
        // 0007 it wrote them into `journal` as well. Such a charge counts once.
        let (node_part, pool_part, treasury_part): (String, String, String) = sqlx::query_as(
            "SELECT node_part, pool_part, treasury_part FROM charges WHERE request_id = 'r1'",
        )
        .fetch_one(acc.db().pool())
        .await
        .unwrap();
        let legacy = [
            ("node:0xnode", node_part),
            ("pool:0xnode", pool_part),
            ("treasury", treasury_part),
        ];
        for (leg, (credit, amount)) in legacy.into_iter().filter(|l| l.1 != "0").enumerate() {
            sqlx::query(
                "INSERT INTO journal (op, leg, debit, credit, amount, created_at)
                 VALUES ($1, $2, $3, $4, $5, 0)",
            )
            .bind("charge:r1")
            .bind(leg as i64)
            .bind(format!("user:{user}"))
            .bind(credit)
            .bind(amount)
            .execute(acc.db().pool())
            .await
            .unwrap();
        }
        let audit = l.audit().await.unwrap();
        assert!(audit.balanced(), "{audit:?}");
        assert_eq!(audit.journal_lines, legs, "{audit:?}");
    }

    let today = time::OffsetDateTime::now_utc().date().to_string();
    let rows = acc
        .usage(&user, &today, &today, UsageGroup::Model)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (
            rows[0].requests,
            rows[0].prompt_tokens,
            rows[0].completion_tokens
        ),
        (1, 10, 5)
    );
    assert_eq!(rows[0].cost, Money::from_units(cost));
    let node_rows = acc
        .node_usage("0xNODE", &today, &today, UsageGroup::Day)
        .await
        .unwrap();
    assert_eq!(node_rows.len(), 1);
}

async fn concurrent_holds_never_overspend(url: &str, mode: LedgerMode) {
    let acc = Arc::new(open(url, mode, "a").await);
    let (user, _, _) = siwe_user(&acc, "10.0.0.2").await;
    // 10 LAI covers 33 holds of 0.3 LAI; 1,000 requests race for them.
    let each = Money::from_units(300_000_000_000_000_000);
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let acc = acc.clone();
            let user = user.clone();
            tokio::spawn(async move {
                let r = format!("req{i}");
                let held = acc.ledger().post(hold_op(&r, &user, each)).await;
                match held {
                    Ok(Applied::Posted(_)) => {
                        let c = acc
                            .ledger()
                            .charge(charge_op(&r, &user, 100), usage(&r, &user))
                            .await;
                        assert!(matches!(c, Ok(Applied::Posted(_))), "{c:?}");
                        true
                    }
                    Err(PostError::Ledger(LedgerError::InsufficientFunds { .. })) => false,
                    other => panic!("unexpected {other:?}"),
                }
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap() {
            ok += 1;
        }
    }
    // Charges of 100 units free 0.3 LAI − 100 each time, so later holds fit again: the exact
    // count depends on interleaving, but every hold was covered when it was placed.
    assert!(ok >= 33, "only {ok} holds succeeded");
    assert!(
        ok < 1000,
        "balance covered only some requests, yet all {ok} succeeded"
    );
    let b = acc.balance(&user).await.unwrap();
    assert_eq!(b.held, Money::ZERO);
    assert_eq!(
        b.available,
        lai(10).checked_sub(Money::from_units(100 * ok)).unwrap()
    );
    let audit = acc.ledger().audit().await.unwrap();
    assert!(audit.balanced(), "{audit:?}");
}

async fn holds_are_released_after_a_crash(url: &str, mode: LedgerMode) {
    let (user, open_holds) = {
        let acc = open(url, mode, "replica-1").await;
        let (user, _, _) = siwe_user(&acc, "10.0.0.3").await;
        for i in 0..5 {
            acc.ledger()
                .post(hold_op(&format!("crash{i}"), &user, lai(1)))
                .await
                .unwrap();
        }
        let b = acc.balance(&user).await.unwrap();
        (user, b.held)
        // Dropped without releasing: like a crash.
    };
    assert_eq!(open_holds, lai(5));
    if mode == LedgerMode::Shared {
        // Another replica leaves them alone (they are not expired)…
        let other = open(url, mode, "replica-2").await;
        assert_eq!(other.balance(&user).await.unwrap().held, lai(5));
        drop(other);
    }
    // …the restarted owner releases them (an exclusive writer owns every hold it finds).
    let acc = open(url, mode, "replica-1").await;
    let b = acc.balance(&user).await.unwrap();
    assert_eq!((b.available, b.held), (lai(10), Money::ZERO));
    assert!(acc.ledger().audit().await.unwrap().balanced());

    // Holds and a charge applied without waiting for the disk, then a stop: what was synced
    // is kept, every hold is released on the next start, the books balance.
    for i in 0..3 {
        acc.ledger()
            .apply(hold_op(&format!("late{i}"), &user, lai(1)))
            .await
            .unwrap();
    }
    acc.ledger()
        .charge(charge_op("late0", &user, 1_000), usage("late0", &user))
        .await
        .unwrap();
    acc.ledger().sync().await.unwrap();
    drop(acc);
    let acc = open(url, mode, "replica-1").await;
    let b = acc.balance(&user).await.unwrap();
    assert_eq!(
        (b.available, b.held),
        (
            lai(10).checked_sub(Money::from_units(1_000)).unwrap(),
            Money::ZERO
        )
    );
    let audit = acc.ledger().audit().await.unwrap();
    assert!(audit.balanced(), "{audit:?}");
    assert_eq!(audit.hold_count, 0);
}

/// A tool that opens the ledger next to a running Nexus (`lattice chain reconcile`) changes
/// nothing: the running writer's holds stay, and it charges them as if the tool never came.
async fn a_reader_next_to_a_running_writer_changes_nothing(url: &str, mode: LedgerMode) {
    let acc = open(url, mode, "nexus").await;
    let (user, _, _) = siwe_user(&acc, "10.0.0.10").await;
    acc.ledger()
        .post(hold_op("live", &user, lai(2)))
        .await
        .unwrap();
    let mut cfg = config("lattice-chain-reconcile", LedgerMode::Shared);
    cfg.ledger.recover_holds = false;
    let reader = Accounts::open(Db::open(url).await.unwrap(), cfg)
        .await
        .unwrap();
    let audit = reader.ledger().audit().await.unwrap();
    // A shared writer records its holds; an exclusive one keeps them in memory only (the
    // database shows settled state, as if they were released).
    let on_disk = match mode {
        LedgerMode::Shared => (1, lai(2)),
        LedgerMode::Exclusive => (0, Money::ZERO),
    };
    assert_eq!((audit.hold_count, audit.open_holds), on_disk, "{audit:?}");
    assert!(audit.balanced(), "{audit:?}");
    drop(reader);
    assert!(matches!(
        acc.ledger()
            .charge(charge_op("live", &user, 500), usage("live", &user))
            .await,
        Ok(Applied::Posted(_))
    ));
    let audit = acc.ledger().audit().await.unwrap();
    assert!(audit.balanced(), "{audit:?}");
    assert_eq!(audit.hold_count, 0);
    assert_eq!(
        acc.balance(&user).await.unwrap().available,
        lai(10).checked_sub(Money::from_units(500)).unwrap()
    );
}

/// Charges beyond the exclusive writer's memory are read back: a replay is still a no-op and a
/// refund still finds its charge.
async fn old_charges_are_read_back(url: &str, mode: LedgerMode) {
    let mut cfg = config("a", mode);
    cfg.ledger.recent_charges = 2;
    let acc = Accounts::open(Db::open(url).await.unwrap(), cfg)
        .await
        .unwrap();
    let (user, _, _) = siwe_user(&acc, "10.0.0.8").await;
    let l = acc.ledger();
    for i in 0..6 {
        let r = format!("old{i}");
        l.apply(hold_op(&r, &user, lai(1))).await.unwrap();
        l.charge(charge_op(&r, &user, 100), usage(&r, &user))
            .await
            .unwrap();
        // Each charge durable before the next, so the oldest ones leave memory.
        l.sync().await.unwrap();
    }
    assert_eq!(
        l.charge(charge_op("old0", &user, 100), usage("old0", &user))
            .await,
        Ok(Applied::Duplicate)
    );
    let before = acc.balance(&user).await.unwrap().available;
    assert!(matches!(
        l.post(Op::Refund {
            request: "old0".into()
        })
        .await,
        Ok(Applied::Posted(_))
    ));
    assert_eq!(
        acc.balance(&user).await.unwrap().available,
        before.checked_add(Money::from_units(100)).unwrap()
    );
    assert_eq!(
        l.post(Op::Refund {
            request: "old0".into()
        })
        .await,
        Ok(Applied::Duplicate)
    );
    let audit = l.audit().await.unwrap();
    assert!(audit.balanced(), "{audit:?}");
}

async fn api_keys_limits_and_revocation(url: &str, mode: LedgerMode) {
    let acc = open(url, mode, "a").await;
    let (user, _, _) = siwe_user(&acc, "10.0.0.4").await;
    let k = acc
        .create_key(&user, "ci", Some(lai(1)), Some(2))
        .await
        .unwrap();
    assert!(k.secret.starts_with("lk_") && k.secret.len() > 40);
    let caller = acc.authenticate(&k.secret).await.unwrap().unwrap();
    assert_eq!(caller.user_id, user);
    let info = caller.key.clone().unwrap();
    assert_eq!(info.spend_limit, Some(lai(1)));
    // Requests per minute.
    assert!(acc.admit(&caller) && acc.admit(&caller));
    assert!(!acc.admit(&caller));
    // Spending limit is enforced by holds.
    let hold = |r: &str, amount| Op::Hold {
        request: r.into(),
        user: user.clone(),
        key: Some((info.id.clone(), info.spend_limit)),
        amount,
    };
    acc.ledger().post(hold("k1", lai(1))).await.unwrap();
    assert_eq!(
        acc.ledger().post(hold("k2", Money::from_units(1))).await,
        Err(PostError::Ledger(LedgerError::KeyLimitExceeded {
            limit: lai(1)
        }))
    );
    let listed = acc.list_keys(&user).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(!format!("{listed:?}").contains(&k.secret), "secret listed");
    assert!(acc.revoke_key(&user, &k.key.id).await.unwrap());
    assert!(acc.authenticate(&k.secret).await.unwrap().is_none());
    assert!(!acc.revoke_key(&user, &k.key.id).await.unwrap());
    assert!(acc.authenticate("lk_wrong").await.unwrap().is_none());
    assert!(acc.authenticate("ls_wrong").await.unwrap().is_none());
    assert!(acc.authenticate("").await.unwrap().is_none());
}

/// A key revoked through another replica (straight in the shared database) stops working within
/// the key cache's TTL; before that, an entry past half the TTL is served at once while it is
/// re-read in the background.
async fn a_key_revoked_elsewhere_stops_within_the_ttl(url: &str) {
    use std::time::{Duration, Instant};
    let mut cfg = config("a", LedgerMode::Exclusive);
    // Wide enough that every step below has seconds of margin on a loaded machine.
    cfg.key_cache_ttl = Duration::from_secs(6);
    let acc = Accounts::open(Db::open(url).await.unwrap(), cfg)
        .await
        .unwrap();
    let (user, _, _) = siwe_user(&acc, "10.0.0.9").await;
    let k = acc.create_key(&user, "ci", None, None).await.unwrap();
    let before_cached = Instant::now();
    assert!(acc.authenticate(&k.secret).await.unwrap().is_some());
    let elsewhere = Db::open(url).await.unwrap();
    sqlx::query("UPDATE api_keys SET revoked_at = 1 WHERE id = $1")
        .bind(&k.key.id)
        .execute(elsewhere.pool())
        .await
        .unwrap();
    // Past half the TTL: still served from the cache at once, and re-read in the background.
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    assert!(
        acc.authenticate(&k.secret).await.unwrap().is_some(),
        "a stale entry is served while it is refreshed"
    );
    // The background read, not the expiry (6 s after caching), finds the revocation.
    loop {
        if acc.authenticate(&k.secret).await.unwrap().is_none() {
            break;
        }
        assert!(
            before_cached.elapsed() < Duration::from_millis(5_500),
            "the revocation was not found before the entry expired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn faucet_rate_limit_and_history(url: &str, mode: LedgerMode) {
    let acc = open(url, mode, "a").await;
    // Five grants per client address per hour; the sixth account gets none.
    let mut users = Vec::new();
    for _ in 0..6 {
        users.push(siwe_user(&acc, "10.9.9.9").await.0);
    }
    assert_eq!(acc.balance(&users[4]).await.unwrap().available, lai(10));
    assert_eq!(acc.balance(&users[5]).await.unwrap().available, Money::ZERO);
    // Concurrent sign-ins from one address do not all pass the same count.
    let racing = futures::future::join_all((0..12).map(|_| siwe_user(&acc, "10.8.8.8"))).await;
    let mut funded = 0;
    for (user, ..) in &racing {
        if acc.balance(user).await.unwrap().available == lai(10) {
            funded += 1;
        }
    }
    assert_eq!(
        funded, 5,
        "five grants per address per hour, however they arrive"
    );
    // Claimable later from another address, once.
    assert_eq!(
        acc.claim_faucet(&users[5], "10.1.1.1").await.unwrap(),
        FaucetOutcome::Granted { amount: lai(10) }
    );
    assert_eq!(
        acc.claim_faucet(&users[5], "10.1.1.2").await.unwrap(),
        FaucetOutcome::AlreadyClaimed
    );

    let u = &users[0];
    let msgs = vec![
        ("user".to_owned(), "hi".to_owned()),
        ("assistant".to_owned(), "hello".to_owned()),
    ];
    assert!(
        !acc.record_chat(u, "c1", &msgs, "r1").await.unwrap(),
        "stored without opt-in"
    );
    acc.set_keep_history(u, true).await.unwrap();
    assert!(acc.record_chat(u, "c1", &msgs, "r1").await.unwrap());
    assert!(acc.record_chat(u, "c1", &msgs, "r2").await.unwrap());
    // Someone else can't write into or read it.
    acc.set_keep_history(&users[1], true).await.unwrap();
    assert!(!acc.record_chat(&users[1], "c1", &msgs, "r3").await.unwrap());
    assert_eq!(acc.conversation(&users[1], "c1").await.unwrap(), None);
    let convs = acc.conversations(u).await.unwrap();
    assert_eq!(convs.len(), 1);
    assert_eq!(convs[0].title, "hi");
    assert_eq!(acc.conversation(u, "c1").await.unwrap().unwrap().len(), 4);
    assert_eq!(acc.delete_history(u, Some("c1")).await.unwrap(), 1);
    assert_eq!(acc.conversation(u, "c1").await.unwrap(), None);
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM messages")
        .fetch_one(acc.db().pool())
        .await
        .unwrap();
    assert_eq!(left, 0, "deleted history must be gone from the database");
}

async fn passkeys_register_and_sign_in(url: &str, mode: LedgerMode) {
    use webauthn_authenticator_rs::WebauthnAuthenticator as _;
    use webauthn_authenticator_rs::softpasskey::SoftPasskey;
    let acc = open(url, mode, "a").await;
    let origin = webauthn_authenticator_rs::prelude::Url::parse("http://localhost:8080").unwrap();
    let mut authenticator = SoftPasskey::new(true);
    // Register: the JSON crosses HTTP both ways.
    let (challenge, ccr) = acc.passkey_register_start("alice", None).await.unwrap();
    let ccr = serde_json::from_str(&serde_json::to_string(&ccr).unwrap()).unwrap();
    let cred = authenticator.do_registration(origin.clone(), ccr).unwrap();
    let cred = serde_json::from_str(&serde_json::to_string(&cred).unwrap()).unwrap();
    let s = acc
        .passkey_register_finish(&challenge, &cred, "10.0.0.7")
        .await
        .unwrap();
    assert!(s.new_user);
    assert_eq!(s.faucet, FaucetOutcome::Granted { amount: lai(10) });
    assert!(s.user.custodial && s.user.address.starts_with("0x") && s.user.address.len() == 42);
    // The challenge is single-use; the name is taken now.
    assert!(
        acc.passkey_register_finish(&challenge, &cred, "10.0.0.7")
            .await
            .is_err()
    );
    assert!(acc.passkey_register_start("alice", None).await.is_err());
    assert!(
        acc.passkey_register_start("a", None).await.is_err(),
        "too short"
    );
    // Sign in twice (the signature counter is updated and checked).
    for _ in 0..2 {
        let (challenge, rcr) = acc.passkey_login_start("alice").await.unwrap();
        let rcr = serde_json::from_str(&serde_json::to_string(&rcr).unwrap()).unwrap();
        let assertion = authenticator
            .do_authentication(origin.clone(), rcr)
            .unwrap();
        let again = acc
            .passkey_login_finish(&challenge, &assertion, "10.0.0.7")
            .await
            .unwrap();
        assert_eq!(again.user.id, s.user.id);
        assert_eq!(again.faucet, FaucetOutcome::AlreadyClaimed);
        assert!(acc.authenticate(&again.session).await.unwrap().is_some());
        // Replaying the assertion on its consumed challenge fails.
        assert!(
            acc.passkey_login_finish(&challenge, &assertion, "10.0.0.7")
                .await
                .is_err()
        );
    }
    assert!(acc.passkey_login_start("nobody").await.is_err());
}

/// A withdrawal row as a crash right after recording it (before the ledger debit) leaves it.
async fn left_requested(acc: &Accounts, op: &str, user: &str, to: &str, amount: Money, age: i64) {
    let at = time::OffsetDateTime::now_utc().unix_timestamp() - age;
    sqlx::query(
        "INSERT INTO withdrawals (op, seq, user_id, destination, amount, status, created_at, updated_at)
         VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM withdrawals), $2, $3, $4,
                 'requested', $5, $5)",
    )
    .bind(op)
    .bind(user)
    .bind(to)
    .bind(amount.to_string())
    .bind(at)
    .execute(acc.db().pool())
    .await
    .unwrap();
}

async fn status_of(acc: &Accounts, user: &str, op: &str) -> WithdrawalStatus {
    acc.withdrawal(user, op).await.unwrap().unwrap().status
}

/// Withdrawals debit the ledger right after their row is recorded, refuse what the credit does
/// not cover, are bounded, recover rows a crash left `requested` without debiting twice, and
/// only debited ones go into a withdrawal batch, which reconciliation then counts.
async fn withdrawals_debit_first_and_recover(url: &str, mode: LedgerMode) {
    let acc = open(url, mode, "a").await;
    let (user, _, key) = siwe_user(&acc, "10.0.0.9").await;
    let dest = "0x00000000000000000000000000000000000000d1";
    let w = acc.request_withdrawal(&user, dest, lai(3)).await.unwrap();
    assert_eq!(w.status, WithdrawalStatus::Debited);
    assert!(w.id.starts_with("withdraw:"), "{w:?}");
    assert_eq!(acc.balance(&user).await.unwrap().available, lai(7));

    // Beyond the credit: refused by the ledger, the row rejected, nothing moved.
    match acc.request_withdrawal(&user, dest, lai(8)).await {
        Err(WithdrawError::InsufficientFunds { needed, available }) => {
            assert_eq!((needed, available), (lai(8), lai(7)));
        }
        other => panic!("expected insufficient funds: {other:?}"),
    }
    assert_eq!(acc.balance(&user).await.unwrap().available, lai(7));
    let list = acc.withdrawals(&user).await.unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].status, WithdrawalStatus::Rejected, "newest first");
    assert_eq!(list[0].reason.as_deref(), Some("insufficient credit"));
    assert!(matches!(
        acc.request_withdrawal(&user, dest, Money::from_units(1))
            .await,
        Err(WithdrawError::TooSmall { .. })
    ));

    // A crash before the debit: the recovery posts it now.
    left_requested(&acc, "withdraw:crash-1", &user, dest, lai(2), 60).await;
    // A crash after the debit but before the row was marked: the recovery must not debit again.
    acc.ledger()
        .post(Op::Withdraw {
            op: "withdraw:crash-2".into(),
            user: user.clone(),
            amount: lai(1),
        })
        .await
        .unwrap();
    left_requested(&acc, "withdraw:crash-2", &user, dest, lai(1), 60).await;
    assert_eq!(acc.balance(&user).await.unwrap().available, lai(6));
    assert_eq!(
        status_of(&acc, &user, "withdraw:crash-2").await,
        WithdrawalStatus::Debited,
        "the ledger's applied op is the truth, whatever the row says"
    );
    // More than the credit: rejected by the recovery.
    left_requested(&acc, "withdraw:crash-3", &user, dest, lai(100), 60).await;
    // Too recent to be abandoned: left alone (a live request may be debiting it).
    left_requested(&acc, "withdraw:live", &user, dest, lai(1), 0).await;
    let recovered = acc
        .recover_withdrawals(std::time::Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(recovered, 3);
    assert_eq!(acc.balance(&user).await.unwrap().available, lai(4));
    assert_eq!(
        status_of(&acc, &user, "withdraw:crash-1").await,
        WithdrawalStatus::Debited
    );
    assert_eq!(
        status_of(&acc, &user, "withdraw:crash-2").await,
        WithdrawalStatus::Debited
    );
    assert_eq!(
        status_of(&acc, &user, "withdraw:crash-3").await,
        WithdrawalStatus::Rejected
    );
    assert_eq!(
        status_of(&acc, &user, "withdraw:live").await,
        WithdrawalStatus::Requested
    );
    let position = acc.chain_position(&user).await.unwrap();
    assert_eq!(position.withdrawing, lai(6));
    assert_eq!(position.withdrawn, Money::ZERO);

    // Only withdrawals whose debit is applied go into the batch, netted per (user, destination).
    let other = "0x00000000000000000000000000000000000000d2";
    acc.request_withdrawal(&user, other, lai(1)).await.unwrap();
    let id = format!("0x{}", "ab".repeat(32));
    let batch = acc
        .prepare_batch(BatchKind::Withdraw, &id, BatchLimits::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(batch.total, lai(7));
    let mut lines: Vec<(String, Money)> = batch
        .entries
        .iter()
        .map(|e| (e.to.clone().unwrap(), e.amount))
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        vec![(dest.to_owned(), lai(6)), (other.to_owned(), lai(1))]
    );
    assert!(batch.entries.iter().all(|e| e.node.is_none()));
    assert_eq!(
        batch.entries[0].user.to_lowercase(),
        key.address().to_lowercase()
    );
    assert!(
        acc.prepare_batch(BatchKind::Withdraw, "0x01", BatchLimits::default())
            .await
            .unwrap()
            .is_none(),
        "every debited withdrawal is in a batch; the live one is not debited"
    );
    assert_eq!(
        status_of(&acc, &user, "withdraw:crash-1").await,
        WithdrawalStatus::Sent
    );
    acc.confirm_batch(&id, Some("0xfeed")).await.unwrap();
    let done = acc
        .withdrawal(&user, "withdraw:crash-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.status, WithdrawalStatus::Confirmed);
    assert_eq!(done.tx_hash.as_deref(), Some("0xfeed"));
    let position = acc.chain_position(&user).await.unwrap();
    assert_eq!(position.withdrawn, lai(7));
    assert_eq!(position.withdrawing, Money::ZERO);
    let expected = acc.chain_expectations().await.unwrap();
    let mine = &expected[&key.address().to_lowercase()];
    assert_eq!(mine.withdrawn, lai(7));

    // At most `max_pending` (5) on their way: the live requested row plus four more.
    for _ in 0..4 {
        acc.request_withdrawal(&user, dest, Money::from_units(10u128.pow(16)))
            .await
            .unwrap();
    }
    assert!(matches!(
        acc.request_withdrawal(&user, dest, Money::from_units(10u128.pow(16)))
            .await,
        Err(WithdrawError::TooManyPending { max: 5 })
    ));
}

/// Each scenario on SQLite and PostgreSQL, with the exclusive (write-behind) and the shared
/// (commit per batch) writer.
async fn node_tokens_bind_one_address_and_revoke(url: &str, mode: LedgerMode) {
    let acc = open(url, mode, "a").await;
    let (alice, _, alice_key) = siwe_user(&acc, "10.0.0.8").await;
    let (bob, _, bob_key) = siwe_user(&acc, "10.0.0.9").await;
    let node1 = NodeKey::generate().unwrap().address().to_lowercase();
    let node2 = NodeKey::generate().unwrap().address().to_lowercase();
    let t = acc.create_node_token(&alice, Some("rack 1")).await.unwrap();
    assert!(t.secret.starts_with("lnt_") && t.secret.len() == 47);
    assert!(
        acc.create_node_token(&alice, Some(&"x".repeat(65)))
            .await
            .is_err(),
        "labels are bounded"
    );
    // First use binds the address to the token's user; the same node again is accepted.
    let owner = acc
        .admit_node_token(&t.secret, &node1.to_uppercase().replacen("0X", "0x", 1))
        .await
        .unwrap()
        .unwrap();
    assert!(owner.first_use);
    assert_eq!(owner.user_id, alice);
    assert_eq!(owner.user_address, alice_key.address().to_lowercase());
    let again = acc
        .admit_node_token(&t.secret, &node1)
        .await
        .unwrap()
        .unwrap();
    assert!(!again.first_use);
    // Another address with the same token is refused, naming the bound one.
    assert_eq!(
        acc.admit_node_token(&t.secret, &node2).await.unwrap(),
        Err(NodeTokenRefused::BoundToOther(node1.clone()))
    );
    // An address belongs to one live token: bob's token cannot take alice's node.
    let b = acc.create_node_token(&bob, None).await.unwrap();
    assert_eq!(
        acc.admit_node_token(&b.secret, &node1).await.unwrap(),
        Err(NodeTokenRefused::NodeTaken)
    );
    assert_eq!(
        acc.admit_node_token("lnt_unknown", &node1).await.unwrap(),
        Err(NodeTokenRefused::Unknown)
    );
    assert_eq!(
        acc.admit_node_token(&"lnt_x".repeat(40), &node1)
            .await
            .unwrap(),
        Err(NodeTokenRefused::Unknown),
        "oversized tokens are not even hashed"
    );
    assert_eq!(
        acc.admit_node_token(&t.secret.replace("lnt_", "lk_"), &node1)
            .await
            .unwrap(),
        Err(NodeTokenRefused::Unknown)
    );
    assert_eq!(
        acc.node_owner(&node1).await.unwrap(),
        Some(alice_key.address().to_lowercase())
    );
    assert_eq!(
        acc.user_nodes(&alice).await.unwrap(),
        vec![(node1.clone(), true)]
    );
    let listed = acc.list_node_tokens(&alice).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].node_address.as_deref(), Some(node1.as_str()));
    assert!(!format!("{listed:?}").contains(&t.secret), "secret listed");
    // Only its owner revokes it; then it is refused and the node is free for a new token.
    assert_eq!(
        acc.revoke_node_token(&bob, &t.token.id).await.unwrap(),
        None
    );
    assert_eq!(
        acc.revoke_node_token(&alice, &t.token.id).await.unwrap(),
        Some(Some(node1.clone()))
    );
    assert_eq!(
        acc.revoke_node_token(&alice, &t.token.id).await.unwrap(),
        None
    );
    assert_eq!(
        acc.admit_node_token(&t.secret, &node1).await.unwrap(),
        Err(NodeTokenRefused::Revoked)
    );
    assert_eq!(acc.node_owner(&node1).await.unwrap(), None);
    assert_eq!(
        acc.user_nodes(&alice).await.unwrap(),
        vec![(node1.clone(), false)]
    );
    let rebound = acc
        .admit_node_token(&b.secret, &node1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rebound.user_id, bob);
    assert_eq!(
        acc.node_owners().await.unwrap().get(&node1),
        Some(&bob_key.address().to_lowercase()),
        "bound again, to the new token's user"
    );
}

/// A hold outliving its time-to-live is released by the sweeper, unless its request renewed it
/// (as Nexus does while an answer streams): the renewed one is charged at the end.
async fn a_renewed_hold_outlives_its_ttl(url: &str, mode: LedgerMode) {
    use std::time::Duration;
    let mut cfg = config("a", mode);
    cfg.ledger.hold_ttl = Duration::from_secs(3);
    let acc = Accounts::open(Db::open(url).await.unwrap(), cfg)
        .await
        .unwrap();
    let (user, _, _) = siwe_user(&acc, "10.0.0.7").await;
    let l = acc.ledger();
    l.apply(hold_op("streaming", &user, lai(2))).await.unwrap();
    l.apply(hold_op("abandoned", &user, lai(2))).await.unwrap();
    // Expiry is in whole seconds: the sweep is past the holds' (≤ hold + 4 s) and a second or
    // more before the renewed one (≥ hold + 5 s).
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    l.renew_hold("streaming").await.unwrap();
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert_eq!(l.sweep_holds(false).await.unwrap(), 1);
    let b = acc.balance(&user).await.unwrap();
    assert_eq!(
        (b.available, b.held),
        (lai(8), lai(2)),
        "only the renewed hold is left"
    );
    let cost = 1_000_000_000_000_000_000u128; // 1 LAI
    let out = l
        .charge_many(vec![
            (
                charge_op("streaming", &user, cost),
                usage("streaming", &user),
            ),
            (
                charge_op("abandoned", &user, cost),
                usage("abandoned", &user),
            ),
        ])
        .await;
    assert!(matches!(out[0], Ok(Applied::Posted(_))), "{out:?}");
    assert_eq!(
        out[1],
        Err(PostError::Ledger(LedgerError::NoHold("abandoned".into())))
    );
    let b = acc.balance(&user).await.unwrap();
    assert_eq!((b.available, b.held), (lai(9), Money::ZERO));
    let audit = l.audit().await.unwrap();
    assert!(audit.balanced(), "{audit:?}");
}

/// A session works until its time-to-live ends, then no longer.
async fn a_session_expires(url: &str, mode: LedgerMode) {
    use std::time::Duration;
    let mut cfg = config("a", mode);
    cfg.session_ttl = Duration::from_secs(2);
    let acc = Accounts::open(Db::open(url).await.unwrap(), cfg)
        .await
        .unwrap();
    let (user, session, _) = siwe_user(&acc, "10.0.0.8").await;
    let live = acc.session_user(&session).await.unwrap();
    assert_eq!(live.map(|u| u.id), Some(user));
    // Expiry is in whole seconds: live a second after sign-in whatever the start's fraction,
    // expired three seconds after.
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    assert!(acc.session_user(&session).await.unwrap().is_none());
}

/// A batch of charges (as Nexus posts a node's signed receipt batch): each outcome in order —
/// charged, replayed, refused for want of a hold — and only the good ones move money, with
/// their usage rows, also after a restart (from disk).
async fn charges_in_a_batch(url: &str, mode: LedgerMode) {
    let acc = open(url, mode, "a").await;
    let (user, _, _) = siwe_user(&acc, "10.0.0.9").await;
    let l = acc.ledger();
    for r in ["b1", "b2", "b3"] {
        l.apply(hold_op(r, &user, lai(2))).await.unwrap();
    }
    let cost = 1_000_000_000_000_000_000u128; // 1 LAI
    let batch = |rs: &[&str]| {
        rs.iter()
            .map(|r| (charge_op(r, &user, cost), usage(r, &user)))
            .collect::<Vec<_>>()
    };
    let out = l.charge_many(batch(&["b1", "b2", "nohold", "b1"])).await;
    assert!(matches!(out[0], Ok(Applied::Posted(_))), "{out:?}");
    assert!(matches!(out[1], Ok(Applied::Posted(_))), "{out:?}");
    assert_eq!(
        out[2],
        Err(PostError::Ledger(LedgerError::NoHold("nohold".into())))
    );
    assert_eq!(out[3], Ok(Applied::Duplicate), "a replay within the batch");
    let b = acc.balance(&user).await.unwrap();
    assert_eq!((b.available, b.held), (lai(6), lai(2)), "b3 still held");
    l.sync().await.unwrap();
    drop(acc);
    // From disk: the two charges and their usage rows, b3's hold released at restart.
    let acc = open(url, mode, "a").await;
    acc.ledger().sweep_holds(true).await.unwrap();
    let b = acc.balance(&user).await.unwrap();
    assert_eq!((b.available, b.held), (lai(8), Money::ZERO));
    let today = time::OffsetDateTime::now_utc().date().to_string();
    let rows = acc
        .usage(&user, &today, &today, UsageGroup::Model)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].requests, 2);
    assert_eq!(rows[0].cost, Money::from_units(2 * cost));
    let audit = acc.ledger().audit().await.unwrap();
    assert!(audit.balanced(), "{audit:?}");
}

/// Charges on receipts a node signed in one batch: the batch is stored once, each charge names
/// its leaf, and each stored receipt comes back as evidence that verifies against the node (a
/// receipt of the batch that was not charged has none).
async fn receipts_in_a_batch_are_stored_once(url: &str, mode: LedgerMode) {
    let acc = open(url, mode, "a").await;
    let (user, _, _) = siwe_user(&acc, "10.0.0.12").await;
    let node = NodeKey::generate().unwrap();
    let receipts: Vec<UsageReceipt> = ["q0", "q1", "q2"]
        .iter()
        .map(|r| UsageReceipt {
            request_id: (*r).into(),
            user: format!("0x{}", hex::encode([0x11; 20])),
            // What Nexus checked: the row's model and token counts are the receipt's.
            model: "smollm2-135m".into(),
            prompt_tokens: 10,
            completion_tokens: 5,
            price_in: 1_000,
            price_out: 2_000,
            timestamp: 1_795_000_000,
            chain_id: 31337,
            signature: String::new(),
        })
        .collect();
    let leaves: Vec<[u8; 32]> = receipts.iter().map(|r| r.struct_hash().unwrap()).collect();
    let signature = lattice_link::sign_batch(&node, 31337, &leaves).unwrap();
    let batch = Arc::new(ReceiptBatch {
        root: hex::encode(lattice_link::merkle_root(&leaves)),
        node: node.address(),
        signature,
        leaves,
    });
    // q0 and q2 are charged (in two calls, so possibly two cuts); q1 is not. q0's receipt is
    // stored in the compact form Nexus writes, q2's as the JSON it wrote before.
    for (leaf, r) in [(0u64, &receipts[0]), (2, &receipts[2])] {
        let id = r.request_id.as_str();
        acc.ledger()
            .apply(hold_op(id, &user, lai(1)))
            .await
            .unwrap();
        let mut u = usage(id, &user);
        let stored = ReceiptInBatch {
            receipt: r.clone(),
            root: batch.root.clone(),
            leaf,
        };
        let columns = lattice_link::ChargeColumns {
            request_id: id,
            model: &u.model,
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
        };
        u.receipt = if leaf == 0 {
            stored.compact(columns).unwrap()
        } else {
            serde_json::to_string(&stored).unwrap()
        };
        u.batch = Some(batch.clone());
        acc.ledger()
            .charge(charge_op(id, &user, 1_000), u)
            .await
            .unwrap();
    }
    // Three leaves: the first's proof climbs two levels, the third (promoted alone) one.
    for (r, depth) in [(&receipts[0], 2), (&receipts[2], 1)] {
        let Some(StoredReceipt::Batched(ev)) = acc.stored_receipt(&r.request_id).await.unwrap()
        else {
            panic!("no batched receipt for {}", r.request_id)
        };
        assert_eq!(&ev.receipt, r);
        assert_eq!((ev.count, ev.proof.len()), (3, depth));
        assert_eq!(ev.verify(&node.address()), Ok(()));
        let other = NodeKey::generate().unwrap();
        assert!(ev.verify(&other.address()).is_err());
    }
    assert_eq!(acc.stored_receipt("q1").await.unwrap(), None);
    // A charge stored with the whole evidence (before batches were stored once) reads back as
    // it is; one signed alone, too.
    let Some(StoredReceipt::Batched(whole)) = acc.stored_receipt("q0").await.unwrap() else {
        panic!("q0 lost its receipt")
    };
    let mut signed = receipts[1].clone();
    signed.request_id = "alone".into();
    let signed = signed.sign(&node).unwrap();
    for (id, text) in [
        ("old", serde_json::to_string(&whole).unwrap()),
        ("alone", serde_json::to_string(&signed).unwrap()),
    ] {
        acc.ledger()
            .apply(hold_op(id, &user, lai(1)))
            .await
            .unwrap();
        let mut u = usage(id, &user);
        u.receipt = text;
        acc.ledger()
            .charge(charge_op(id, &user, 1_000), u)
            .await
            .unwrap();
    }
    assert_eq!(
        acc.stored_receipt("old").await.unwrap(),
        Some(StoredReceipt::Batched(whole))
    );
    assert_eq!(
        acc.stored_receipt("alone").await.unwrap(),
        Some(StoredReceipt::Alone(signed))
    );
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM receipt_batches")
        .fetch_one(acc.db().pool())
        .await
        .unwrap();
    assert_eq!(n, 1);
}

/// Holds a shared writer left on disk (say its replicas stopped and one Nexus now owns the
/// database) are given back when an exclusive writer opens it, with the books balanced; holds
/// of the exclusive writer never reach the disk.
async fn switching_to_the_exclusive_writer_releases_recorded_holds(url: &str) {
    let user = {
        let mut cfg = config("replica-1", LedgerMode::Shared);
        cfg.ledger.recover_holds = false;
        let acc = Accounts::open(Db::open(url).await.unwrap(), cfg)
            .await
            .unwrap();
        let (user, _, _) = siwe_user(&acc, "10.0.0.11").await;
        for i in 0..3 {
            acc.ledger()
                .post(hold_op(&format!("s{i}"), &user, lai(2)))
                .await
                .unwrap();
        }
        let audit = acc.ledger().audit().await.unwrap();
        assert_eq!((audit.hold_count, audit.open_holds), (3, lai(6)));
        user
    };
    let acc = open(url, LedgerMode::Exclusive, "nexus").await;
    let b = acc.balance(&user).await.unwrap();
    assert_eq!((b.available, b.held), (lai(10), Money::ZERO));
    acc.ledger()
        .post(hold_op("x", &user, lai(3)))
        .await
        .unwrap();
    let b = acc.balance(&user).await.unwrap();
    assert_eq!((b.available, b.held), (lai(7), lai(3)));
    let audit = acc.ledger().audit().await.unwrap();
    assert!(audit.balanced(), "{audit:?}");
    assert_eq!(
        (audit.hold_count, audit.held),
        (0, Money::ZERO),
        "{audit:?}"
    );
    // What the database says of the user: their credit as if the open hold were released.
    drop(acc);
    let mut cfg = config("reader", LedgerMode::Shared);
    cfg.ledger.recover_holds = false;
    let reader = Accounts::open(Db::open(url).await.unwrap(), cfg)
        .await
        .unwrap();
    let b = reader.balance(&user).await.unwrap();
    assert_eq!((b.available, b.held), (lai(10), Money::ZERO));
}

/// One exclusive writer per database: a second Nexus opening it is refused while the first
/// runs (each would spend from its own copy of the balances), and opens once it has stopped.
async fn one_exclusive_writer_per_database(url: &str) {
    let first = open(url, LedgerMode::Exclusive, "a").await;
    let (user, _, _) = siwe_user(&first, "10.0.0.10").await;
    let mut cfg = config("b", LedgerMode::Exclusive);
    cfg.ledger.lock_wait = std::time::Duration::from_millis(300);
    let second = Accounts::open(Db::open(url).await.unwrap(), cfg.clone()).await;
    let Err(e) = second else {
        panic!("a second exclusive writer opened next to a running one")
    };
    assert!(
        matches!(e, lattice_accounts::StoreError::Conflict(_)),
        "{e}"
    );
    assert!(e.to_string().contains("--ledger-mode shared"), "{e}");
    // A shared reader (like `lattice chain reconcile`) is not refused.
    let mut shared = config("reader", LedgerMode::Shared);
    shared.ledger.recover_holds = false;
    let reader = Accounts::open(Db::open(url).await.unwrap(), shared)
        .await
        .unwrap();
    assert_eq!(reader.balance(&user).await.unwrap().available, lai(10));
    drop(first);
    // The first writer finishes its last commit and lets go; the second waits for that.
    cfg.ledger.lock_wait = std::time::Duration::from_secs(10);
    let second = Accounts::open(Db::open(url).await.unwrap(), cfg)
        .await
        .unwrap();
    assert_eq!(second.balance(&user).await.unwrap().available, lai(10));
}

/// Charges reach settlement netted per (user, node): refunds come off the pair's charges, refunds
/// of settled charges wait for later ones, and refunds that cancel the charges leave nothing.
async fn settlement_nets_charges_and_refunds_per_node(url: &str, mode: LedgerMode) {
    let acc = open(url, mode, "a").await;
    let (user, _, key) = siwe_user(&acc, "10.0.0.9").await;
    let l = acc.ledger();
    let charge = |r: &str, node: &str, units: u128| {
        let (l, user, r, node) = (l.clone(), user.clone(), r.to_owned(), node.to_owned());
        async move {
            l.apply(hold_op(&r, &user, lai(1))).await.unwrap();
            let op = Op::Charge {
                request: r.clone(),
                user: user.clone(),
                node: node.clone(),
                amount: Money::from_units(units),
                split: Split::default(),
            };
            let usage = UsageRecord {
                node,
                ..usage(&r, &user)
            };
            assert!(matches!(l.charge(op, usage).await, Ok(Applied::Posted(_))));
        }
    };
    let refund = |r: &str| {
        let (l, r) = (l.clone(), r.to_owned());
        async move {
            let applied = l.post(Op::Refund { request: r }).await;
            assert!(matches!(applied, Ok(Applied::Posted(_))), "{applied:?}");
        }
    };
    let settle = |id: &str| {
        let (acc, id) = (&acc, id.to_owned());
        async move {
            acc.ledger().sync().await.unwrap();
            acc.prepare_batch(BatchKind::Settle, &id, BatchLimits::default())
                .await
                .unwrap()
        }
    };
    let lines = |b: &lattice_accounts::ChainBatch| {
        let mut v: Vec<(String, u128, u64, u32)> = b
            .entries
            .iter()
            .map(|e| {
                (
                    e.node.clone().unwrap(),
                    e.amount.units(),
                    e.tokens,
                    e.requests,
                )
            })
            .collect();
        v.sort();
        v
    };

    charge("r1", "0xnode", 100).await;
    l.sync().await.unwrap();
    charge("r2", "0xnode", 100).await;
    charge("r3", "0xnode", 100).await;
    charge("r4", "0xother", 50).await;
    refund("r3").await;
    let first = settle(&format!("0x{}", "01".repeat(32))).await.unwrap();
    // Three charged requests of 15 tokens each (the refunded one included), less its refund.
    assert_eq!(
        lines(&first),
        vec![("0xnode".into(), 200, 45, 3), ("0xother".into(), 50, 15, 1)]
    );
    assert_eq!(first.total, Money::from_units(250));
    assert!(
        first
            .entries
            .iter()
            .all(|e| e.user.eq_ignore_ascii_case(&key.address()))
    );
    assert!(settle("0x02").await.is_none(), "every item is in the batch");
    let position = acc.chain_position(&user).await.unwrap();
    assert_eq!(
        (position.settled, position.unsettled),
        (Money::ZERO, Money::from_units(250))
    );
    acc.confirm_batch(&first.id, None).await.unwrap();
    let position = acc.chain_position(&user).await.unwrap();
    assert_eq!(
        (position.settled, position.unsettled),
        (Money::from_units(250), Money::ZERO)
    );

    // Refunds of settled charges wait until the pair's later charges cover them, as one item
    // (however many refunds and passes) at the back of the queue.
    refund("r1").await;
    refund("r2").await;
    let unbatched = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM settle_items WHERE batch_id IS NULL AND refund = 1",
        )
        .fetch_one(acc.db().pool())
        .await
        .unwrap()
    };
    assert_eq!(unbatched().await, 2);
    assert!(settle("0x03").await.is_none());
    assert!(settle("0x04").await.is_none());
    assert_eq!(unbatched().await, 1);
    assert_eq!(
        acc.chain_position(&user).await.unwrap().unsettled,
        Money::ZERO
    );
    // A window full of debt moves the debt behind what came later (items are ordered by their
    // second, then name: "a1" is a second younger than the debt and sorts before it).
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    charge("a1", "0xother", 40).await;
    acc.ledger().sync().await.unwrap();
    let one = BatchLimits {
        max_items: 1,
        ..BatchLimits::default()
    };
    assert!(
        acc.prepare_batch(BatchKind::Settle, "0x0a", one)
            .await
            .unwrap()
            .is_none()
    );
    let later = acc
        .prepare_batch(BatchKind::Settle, &format!("0x{}", "0b".repeat(32)), one)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lines(&later), vec![("0xother".into(), 40, 15, 1)]);
    assert!(later.more, "a full window leaves items for the next batch");
    acc.confirm_batch(&later.id, None).await.unwrap();
    charge("r5", "0xnode", 300).await;
    let second = settle(&format!("0x{}", "05".repeat(32))).await.unwrap();
    assert_eq!(lines(&second), vec![("0xnode".into(), 100, 15, 1)]);
    assert!(!second.more);
    assert_eq!(unbatched().await, 0);

    // A charge refunded before settlement, alone on its pair: nothing to send, nothing left.
    charge("r6", "0xthird", 70).await;
    refund("r6").await;
    assert!(settle("0x06").await.is_none());
    assert!(settle("0x07").await.is_none());
    acc.confirm_batch(&second.id, None).await.unwrap();
    let position = acc.chain_position(&user).await.unwrap();
    assert_eq!(
        (position.settled, position.unsettled),
        (Money::from_units(390), Money::ZERO)
    );
    let expected = acc.chain_expectations().await.unwrap();
    assert_eq!(
        expected[&key.address().to_lowercase()].settled,
        Money::from_units(390)
    );
    // Lines beyond `max_entries` are left for the next batch, which says so.
    charge("r7", "0xnode", 10).await;
    charge("r8", "0xthird", 20).await;
    l.sync().await.unwrap();
    let one_line = BatchLimits {
        max_entries: 1,
        ..BatchLimits::default()
    };
    let (first, rest) = (
        format!("0x{}", "08".repeat(32)),
        format!("0x{}", "09".repeat(32)),
    );
    let first = acc
        .prepare_batch(BatchKind::Settle, &first, one_line)
        .await
        .unwrap()
        .unwrap();
    let rest = acc
        .prepare_batch(BatchKind::Settle, &rest, one_line)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.entries.len(), first.more), (1, true));
    assert_eq!((rest.entries.len(), rest.more), (1, false));
    assert!(
        acc.prepare_batch(BatchKind::Settle, "0x0c", one_line)
            .await
            .unwrap()
            .is_none()
    );
    let audit = l.audit().await.unwrap();
    assert!(audit.balanced(), "{audit:?}");
}

/// Charges through the ledger land in the daily usage totals: per model, key (or session),
/// node and day, exactly, across write batches and with amounts past 64 bits.
async fn usage_totals_follow_the_charges(url: &str, mode: LedgerMode) {
    let acc = open(url, mode, "a").await;
    let (user, _, _) = siwe_user(&acc, "10.0.0.9").await;
    let l = acc.ledger();
    // (request, key, model, node, units). u1 is written alone, u2, u2b and u3 together (one
    // `charge_many`: for the exclusive writer one cut, so u2 and u2b are summed before the
    // database adds them), u4 last: 0.7 + 0.6 LAI carries past the low 18 digits in the
    // database's sum.
    let charges = [
        ("u1", None, "m1", "0xn1", 700_000_000_000_000_000u128),
        ("u2", None, "m1", "0xn1", 600_000_000_000_000_000),
        ("u2b", None, "m1", "0xn1", 500_000_000_000_000_000),
        ("u3", Some("k1"), "m1", "0xn2", 2_000_000_000_000_000_001),
        ("u4", Some("k1"), "m2", "0xn1", 3),
    ];
    let mut ops = Vec::new();
    for (i, (r, key, model, node, units)) in charges.iter().enumerate() {
        let hold = Op::Hold {
            request: (*r).into(),
            user: user.clone(),
            key: key.map(|k| (k.to_string(), None)),
            amount: Money::from_units(units + 1_000),
        };
        assert!(matches!(l.post(hold).await, Ok(Applied::Posted(_))));
        let charge = Op::Charge {
            request: (*r).into(),
            user: user.clone(),
            node: (*node).into(),
            amount: Money::from_units(*units),
            split: Split::default(),
        };
        let record = UsageRecord {
            request_id: (*r).into(),
            user_id: user.clone(),
            key_id: key.map(str::to_string),
            node: (*node).into(),
            model: (*model).into(),
            prompt_tokens: 10 + i as u64,
            completion_tokens: 1,
            receipt: "{}".into(),
            batch: None,
        };
        ops.push((charge, record));
    }
    let mut ops = ops.into_iter();
    let mut next = |n: usize| ops.by_ref().take(n).collect::<Vec<_>>();
    for group in [next(1), next(3), next(1)] {
        for outcome in l.charge_many(group).await {
            assert!(matches!(outcome, Ok(Applied::Posted(_))), "{outcome:?}");
        }
        l.sync().await.unwrap();
    }
    // A charge posted without a usage record counts in no usage figure.
    let hold = hold_op("u5", &user, lai(1));
    assert!(matches!(l.post(hold).await, Ok(Applied::Posted(_))));
    assert!(matches!(
        l.post(charge_op("u5", &user, 5)).await,
        Ok(Applied::Posted(_))
    ));

    let today = time::OffsetDateTime::now_utc().date().to_string();
    let summary = |rows: Vec<lattice_accounts::UsageRow>| -> Vec<(String, u64, u64, u128)> {
        rows.into_iter()
            .map(|r| (r.group, r.requests, r.prompt_tokens, r.cost.units()))
            .collect()
    };
    let by = |g| acc.usage(&user, &today, &today, g);
    assert_eq!(
        summary(by(UsageGroup::Model).await.unwrap()),
        vec![
            ("m1".into(), 4, 10 + 11 + 12 + 13, 3_800_000_000_000_000_001),
            ("m2".into(), 1, 14, 3),
        ]
    );
    assert_eq!(
        summary(by(UsageGroup::Key).await.unwrap()),
        vec![
            ("k1".into(), 2, 13 + 14, 2_000_000_000_000_000_004),
            ("session".into(), 3, 10 + 11 + 12, 1_800_000_000_000_000_000),
        ]
    );
    assert_eq!(
        summary(by(UsageGroup::Day).await.unwrap()),
        vec![(today.clone(), 5, 60, 3_800_000_000_000_000_004)]
    );
    let node = acc
        .node_usage("0xN1", &today, &today, UsageGroup::Model)
        .await
        .unwrap();
    assert_eq!(
        summary(node),
        vec![
            ("m1".into(), 3, 33, 1_800_000_000_000_000_000),
            ("m2".into(), 1, 14, 3),
        ]
    );
    // Another day's range has none of it.
    assert!(
        acc.usage(&user, "2000-01-01", "2000-12-31", UsageGroup::Model)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Migration 0009 builds the daily usage totals from the charges written before it, exactly
/// (amounts past 64 bits; low digits that carry; charges without usage left out).
async fn usage_totals_are_built_from_older_charges(url: &str) {
    sqlx::any::install_default_drivers();
    let connect = if url.starts_with("sqlite") {
        format!("{url}?mode=rwc")
    } else {
        url.to_owned()
    };
    let pool = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(&connect)
        .await
        .unwrap();
    let mut before = sqlx::migrate!("./migrations");
    before.migrations = before
        .migrations
        .iter()
        .filter(|m| m.version < 9)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    before.run(&pool).await.unwrap();
    // Request, user, key, node, amount, model (none: a charge without usage), day.
    type Row<'a> = (
        &'a str,
        &'a str,
        Option<&'a str>,
        &'a str,
        &'a str,
        Option<&'a str>,
        &'a str,
    );
    let rows: [Row; 7] = [
        (
            "r1",
            "ua",
            None,
            "0xn1",
            "999999999999999999",
            Some("m1"),
            "2026-01-01",
        ),
        ("r2", "ua", None, "0xn1", "1", Some("m1"), "2026-01-01"),
        (
            "r3",
            "ua",
            Some("k1"),
            "0xn1",
            "25000000000000000000000",
            Some("m1"),
            "2026-01-01",
        ),
        (
            "r4",
            "ua",
            Some("k1"),
            "0xn2",
            "1500000000000000000",
            Some("m2"),
            "2026-01-02",
        ),
        ("r5", "ua", None, "0xn1", "7", None, "2026-01-01"),
        ("r6", "ub", None, "0xn1", "11", Some("m1"), "2026-01-01"),
        (
            "r7",
            "ua",
            None,
            "0xn1",
            "999999999999999999",
            Some("m1"),
            "2026-01-01",
        ),
    ];
    for (r, user, key, node, amount, model, day) in rows {
        sqlx::query(
            "INSERT INTO charges (request_id, user_id, key_id, node, amount, node_part,
             pool_part, treasury_part, refunded, created_at, model, prompt_tokens,
             completion_tokens, day, receipt) VALUES ($1, $2, $3, $4, $5, '0', '0', '0', 0, 0,
             $6, $7, $8, $9, $10)",
        )
        .bind(r)
        .bind(user)
        .bind(key)
        .bind(node)
        .bind(amount)
        .bind(model)
        .bind(model.map(|_| 10i64))
        .bind(model.map(|_| 2i64))
        .bind(model.map(|_| day))
        .bind(model.map(|_| "{}"))
        .execute(&pool)
        .await
        .unwrap();
    }
    pool.close().await;
    let acc = open(url, LedgerMode::Exclusive, "a").await;
    let summary = |rows: Vec<lattice_accounts::UsageRow>| -> Vec<(String, u64, u64, u128)> {
        rows.into_iter()
            .map(|r| (r.group, r.requests, r.completion_tokens, r.cost.units()))
            .collect()
    };
    let e18 = 1_000_000_000_000_000_000u128;
    assert_eq!(
        summary(
            acc.usage("ua", "2026-01-01", "2026-01-31", UsageGroup::Model)
                .await
                .unwrap()
        ),
        vec![
            ("m1".into(), 4, 8, 25_002 * e18 - 1),
            ("m2".into(), 1, 2, 1_500_000_000_000_000_000),
        ]
    );
    assert_eq!(
        summary(
            acc.usage("ua", "2026-01-01", "2026-01-31", UsageGroup::Key)
                .await
                .unwrap()
        ),
        vec![
            ("k1".into(), 2, 4, 25_001_500_000_000_000_000_000),
            ("session".into(), 3, 6, 2 * e18 - 1),
        ]
    );
    assert_eq!(
        summary(
            acc.node_usage("0xn1", "2026-01-01", "2026-01-01", UsageGroup::Day)
                .await
                .unwrap()
        ),
        vec![("2026-01-01".into(), 5, 10, 25_002 * e18 - 1 + 11)]
    );
}

/// A test of one database URL, on SQLite and on PostgreSQL.
macro_rules! each_database {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let db = super::sqlite().await;
                super::$name(&db.url).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let db = super::postgres().await;
                super::$name(&db.url).await;
            }
        }
    };
}

each_database!(one_exclusive_writer_per_database);
each_database!(a_key_revoked_elsewhere_stops_within_the_ttl);
each_database!(switching_to_the_exclusive_writer_releases_recorded_holds);
each_database!(usage_totals_are_built_from_older_charges);

macro_rules! both {
    ($name:ident) => {
        mod $name {
            use lattice_accounts::LedgerMode::{Exclusive, Shared};
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let db = super::sqlite().await;
                super::$name(&db.url, Exclusive).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite_shared() {
                let db = super::sqlite().await;
                super::$name(&db.url, Shared).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let db = super::postgres().await;
                super::$name(&db.url, Shared).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres_exclusive() {
                let db = super::postgres().await;
                super::$name(&db.url, Exclusive).await;
            }
        }
    };
}

both!(sign_in_faucet_hold_charge);
both!(charges_in_a_batch);
both!(a_renewed_hold_outlives_its_ttl);
both!(a_session_expires);
both!(usage_totals_follow_the_charges);
both!(receipts_in_a_batch_are_stored_once);
both!(concurrent_holds_never_overspend);
both!(holds_are_released_after_a_crash);
both!(old_charges_are_read_back);
both!(a_reader_next_to_a_running_writer_changes_nothing);
both!(api_keys_limits_and_revocation);
both!(faucet_rate_limit_and_history);
both!(passkeys_register_and_sign_in);
both!(withdrawals_debit_first_and_recover);
both!(settlement_nets_charges_and_refunds_per_node);
both!(node_tokens_bind_one_address_and_revoke);

#[tokio::test]
async fn bad_database_urls_are_clear_errors() {
    let e = Db::open("mysql://x").await.unwrap_err().to_string();
    assert!(e.contains("unsupported database URL"), "{e}");
    let e = Db::open("postgres://nobody:pw@127.0.0.1:1/db")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("***") && !e.contains("pw@"), "{e}");
}

/// This package's directory, read when the test runs (cargo and nextest set it): a test binary
/// reused from a build in another checkout must not look in that checkout.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}
