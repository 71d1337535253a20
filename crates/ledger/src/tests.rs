#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;

use super::*;

fn m(units: u128) -> Money {
    Money::from_units(units)
}

fn funded(user: &str, units: u128) -> Ledger {
    let mut l = Ledger::default();
    l.apply(&Op::Faucet {
        op: format!("faucet:{user}"),
        user: user.into(),
        amount: m(units),
    })
    .unwrap();
    l
}

fn hold(request: &str, user: &str, units: u128) -> Op {
    Op::Hold {
        request: request.into(),
        user: user.into(),
        key: None,
        amount: m(units),
    }
}

fn charge(request: &str, user: &str, units: u128) -> Op {
    Op::Charge {
        request: request.into(),
        user: user.into(),
        node: "0xnode".into(),
        amount: m(units),
        split: Split::default(),
    }
}

#[test]
fn hold_then_charge_splits_and_releases_the_rest() {
    let mut l = funded("u", 1_000);
    l.apply(&hold("r1", "u", 400)).unwrap();
    assert_eq!(l.balance(&Account::User("u".into())), m(600));
    assert_eq!(l.balance(&Account::Held("u".into())), m(400));
    let Applied::Posted(p) = l.apply(&charge("r1", "u", 101)).unwrap() else {
        panic!("charge posted nothing")
    };
    // 90 % of 101 = 90, 5 % = 5, treasury takes the remainder 6, 299 back to the user.
    let amounts: Vec<_> = p.iter().map(|p| (p.credit.clone(), p.amount)).collect();
    assert_eq!(
        amounts,
        vec![
            (Account::Node("0xnode".into()), m(90)),
            (Account::Pool("0xnode".into()), m(5)),
            (Account::Treasury, m(6)),
            (Account::User("u".into()), m(299)),
        ]
    );
    assert!(p.iter().all(|p| p.op == "charge:r1"));
    assert_eq!(l.balance(&Account::User("u".into())), m(899));
    assert_eq!(l.balance(&Account::Held("u".into())), Money::ZERO);
    assert!(l.holds.is_empty());
    // Replaying the charge (or releasing afterwards) moves nothing.
    assert_eq!(
        l.apply(&charge("r1", "u", 101)).unwrap(),
        Applied::Duplicate
    );
    assert_eq!(
        l.apply(&Op::Release {
            request: "r1".into()
        })
        .unwrap(),
        Applied::Duplicate
    );
    assert_eq!(l.balance(&Account::User("u".into())), m(899));
    assert_eq!(l.total_internal(), l.total_external_net());
}

#[test]
fn insufficient_funds_and_limits_leave_state_untouched() {
    let mut l = funded("u", 100);
    let before = (l.balances.clone(), l.holds.clone());
    assert_eq!(
        l.apply(&hold("r", "u", 101)),
        Err(LedgerError::InsufficientFunds {
            needed: m(101),
            available: m(100)
        })
    );
    assert_eq!((l.balances.clone(), l.holds.clone()), before);
    let keyed = |r: &str, amount| Op::Hold {
        request: r.into(),
        user: "u".into(),
        key: Some(("k".into(), Some(m(50)))),
        amount: m(amount),
    };
    l.apply(&keyed("a", 30)).unwrap();
    assert_eq!(
        l.apply(&keyed("b", 21)),
        Err(LedgerError::KeyLimitExceeded { limit: m(50) })
    );
    l.apply(&charge("a", "u", 10)).unwrap();
    assert_eq!(
        l.keys["k"],
        KeyUsage {
            spent: m(10),
            held: Money::ZERO
        }
    );
    l.apply(&keyed("b", 40)).unwrap();
    assert_eq!(
        l.apply(&keyed("c", 1)),
        Err(LedgerError::KeyLimitExceeded { limit: m(50) })
    );
    assert_eq!(
        l.apply(&charge("b", "u", 41)),
        Err(LedgerError::ChargeExceedsHold {
            charge: m(41),
            held: m(40)
        })
    );
    assert_eq!(
        l.apply(&charge("b", "someone-else", 1)),
        Err(LedgerError::WrongUser {
            request: "b".into()
        })
    );
    assert_eq!(
        l.apply(&hold("b", "u", 1)),
        Err(LedgerError::DuplicateHold("b".into()))
    );
}

#[test]
fn refund_reverses_a_charge_once() {
    let mut l = funded("u", 1_000);
    l.apply(&hold("r", "u", 500)).unwrap();
    l.apply(&charge("r", "u", 200)).unwrap();
    let op = Op::Refund {
        request: "r".into(),
    };
    assert!(matches!(l.apply(&op).unwrap(), Applied::Posted(_)));
    assert_eq!(l.balance(&Account::User("u".into())), m(1_000));
    assert_eq!(l.balance(&Account::Node("0xnode".into())), Money::ZERO);
    assert_eq!(l.apply(&op).unwrap(), Applied::Duplicate);
    assert_eq!(
        l.apply(&Op::Refund {
            request: "never".into()
        }),
        Err(LedgerError::NotCharged("never".into()))
    );
}

#[test]
fn changes_track_rows_to_write() {
    let mut l = funded("u", 10);
    let c = l.take_changes();
    assert!(c.balances.contains(&Account::User("u".into())));
    assert!(c.applied.contains("faucet:u"));
    l.apply(&hold("r", "u", 5)).unwrap();
    l.apply(&Op::Release {
        request: "r".into(),
    })
    .unwrap();
    let c = l.take_changes();
    // Held and released in one batch: no hold row to insert or delete.
    assert!(c.holds_added.is_empty() && c.holds_removed.is_empty());
    l.apply(&hold("s", "u", 5)).unwrap();
    l.take_changes();
    l.apply(&charge("s", "u", 5)).unwrap();
    let c = l.take_changes();
    assert!(c.holds_removed.contains("s"));
    assert!(c.charges.contains("s"));
}

#[test]
fn account_keys_round_trip() {
    for a in [
        Account::User("a:b".into()),
        Account::Held("x".into()),
        Account::Node("0xab".into()),
        Account::Pool("0xab".into()),
        Account::Treasury,
        Account::Faucet,
        Account::Chain,
    ] {
        assert_eq!(Account::from_key(&a.key()), Some(a));
    }
    assert_eq!(Account::from_key("bogus"), None);
}

#[test]
fn split_must_cover_everything() {
    assert_eq!(
        Split::new(9_000, 500, 400),
        Err(LedgerError::BadSplit(9_900))
    );
    let s = Split::new(3_333, 3_333, 3_334).unwrap();
    let (n, p, t) = s.parts(m(10));
    assert_eq!((n, p, t), (m(3), m(3), m(4)));
}

// Property: for any sequence of operations, money is conserved, no internal balance goes
// negative (unsigned + checked), failed operations change nothing, each request is charged at
// most once, and held balances equal the sum of open holds.
const USERS: [&str; 3] = ["alice", "bob", "carol"];
const NODES: [&str; 2] = ["0xn1", "0xn2"];

fn op_strategy() -> impl Strategy<Value = Op> {
    let user = prop::sample::select(USERS.to_vec()).prop_map(String::from);
    let node = prop::sample::select(NODES.to_vec()).prop_map(String::from);
    let request = (0u8..8).prop_map(|i| format!("req{i}"));
    let opid = (0u8..6).prop_map(|i| format!("op{i}"));
    let amount = (0u128..2_000).prop_map(Money::from_units);
    let key = prop::option::of((0u8..2).prop_flat_map(|k| {
        prop::option::of((0u128..3_000).prop_map(Money::from_units))
            .prop_map(move |limit| (format!("key{k}"), limit))
    }));
    prop_oneof![
        (opid.clone(), user.clone(), amount.clone()).prop_map(|(op, user, amount)| Op::Deposit {
            op: format!("dep:{op}"),
            user,
            amount
        }),
        (opid.clone(), user.clone(), amount.clone()).prop_map(|(op, user, amount)| Op::Faucet {
            op: format!("fct:{op}"),
            user,
            amount
        }),
        (opid, user.clone(), amount.clone()).prop_map(|(op, user, amount)| Op::Withdraw {
            op: format!("wd:{op}"),
            user,
            amount
        }),
        (request.clone(), user.clone(), key, amount.clone()).prop_map(
            |(request, user, key, amount)| Op::Hold {
                request,
                user,
                key,
                amount
            }
        ),
        (
            request.clone(),
            user,
            node,
            amount,
            (0u16..=10_000, 0u16..=10_000)
        )
            .prop_map(|(request, user, node, amount, (a, b))| {
                let node_bps = a;
                let pool_bps = b.min(10_000 - node_bps);
                let split = Split::new(node_bps, pool_bps, 10_000 - node_bps - pool_bps)
                    .unwrap_or_default();
                Op::Charge {
                    request,
                    user,
                    node,
                    amount,
                    split,
                }
            }),
        request.clone().prop_map(|request| Op::Release { request }),
        request.prop_map(|request| Op::Refund { request }),
    ]
}

fn snapshot(l: &Ledger) -> String {
    let mut b: Vec<_> = l.balances.iter().map(|(a, v)| (a.key(), *v)).collect();
    b.sort();
    let mut h: Vec<_> = l
        .holds
        .iter()
        .map(|(r, h)| (r.clone(), h.clone()))
        .collect();
    h.sort_by(|a, b| a.0.cmp(&b.0));
    let mut c: Vec<_> = l
        .charges
        .iter()
        .map(|(r, c)| (r.clone(), c.clone()))
        .collect();
    c.sort_by(|a, b| a.0.cmp(&b.0));
    let mut k: Vec<_> = l.keys.iter().map(|(r, u)| (r.clone(), *u)).collect();
    k.sort_by(|a, b| a.0.cmp(&b.0));
    format!("{b:?}{h:?}{c:?}{k:?}")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn ledger_invariants_hold(ops in prop::collection::vec(op_strategy(), 1..80)) {
        let mut l = Ledger::default();
        let mut charged: HashMap<String, usize> = HashMap::default();
        for op in &ops {
            let before = snapshot(&l);
            match l.apply(op) {
                Ok(Applied::Posted(postings)) => {
                    for p in &postings {
                        prop_assert!(!p.amount.is_zero());
                        prop_assert_eq!(&p.op, &op.id());
                    }
                    if let Op::Charge { request, .. } = op {
                        *charged.entry(request.clone()).or_default() += 1;
                    }
                }
                Ok(Applied::Duplicate) => prop_assert_eq!(snapshot(&l), before),
                Err(_) => prop_assert_eq!(snapshot(&l), before, "a failed op changed state"),
            }
            // Conservation: Σ internal balances = Σ deposits + faucet − withdrawals.
            prop_assert_eq!(l.total_internal(), l.total_external_net());
            // Held balances equal open holds, per user and per key.
            for u in USERS {
                let open = l.holds.values().filter(|h| h.user == u)
                    .fold(Money::ZERO, |a, h| a.checked_add(h.amount).unwrap());
                prop_assert_eq!(l.balance(&Account::Held(u.into())), open);
            }
            for (k, usage) in &l.keys {
                let open = l.holds.values().filter(|h| h.key.as_deref() == Some(k.as_str()))
                    .fold(Money::ZERO, |a, h| a.checked_add(h.amount).unwrap());
                prop_assert_eq!(usage.held, open);
            }
        }
        prop_assert!(charged.values().all(|&n| n == 1), "a request was charged twice: {charged:?}");
    }
}
