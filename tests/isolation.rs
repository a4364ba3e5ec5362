//! Isolation: roles using the same key names see only their own data, and
//! nothing a guest passes reaches outside its prefix. Bad input gets the
//! documented error variant.

use std::sync::Arc;

use rolehost::backend::Backend;
use rolehost::RoleLimits;
use rolehost_tests::{host, host_with_limits, on_all_backends, probe, shared_redis};
use serde_json::{json, Value};

on_all_backends!(
    same_key_names_stay_separate,
    listing_patterns_never_leave_the_prefix,
    clear_and_deletes_touch_only_the_caller,
    bad_input_gets_the_documented_error,
    other_buckets_are_denied,
    list_keys_pages_with_a_cursor,
);

const ROLES: &[(&str, &str)] = &[("alice", "kvprobe"), ("bob", "kvprobe")];

async fn seed(host: &rolehost::Host) {
    for role in ["alice", "bob"] {
        for key in ["shared-name", "a1", "b:kv:x", "*", "z"] {
            let value = format!("{role}'s {key}");
            probe(host, role, json!({"op":"set","key":key,"value":value})).await.unwrap();
        }
    }
}

async fn same_key_names_stay_separate(b: Arc<dyn Backend>, p: String) {
    let host = host(b, &p, ROLES);
    seed(&host).await;
    for role in ["alice", "bob"] {
        let got = probe(&host, role, json!({"op":"get","key":"shared-name"})).await.unwrap();
        assert_eq!(got, json!(format!("{role}'s shared-name")));
    }
    // Atomics too.
    assert_eq!(probe(&host, "alice", json!({"op":"incr","key":"n","delta":5})).await.unwrap(), json!(5));
    assert_eq!(probe(&host, "bob", json!({"op":"incr","key":"n","delta":1})).await.unwrap(), json!(1));
    assert_eq!(
        probe(&host, "bob", json!({"op":"cas","key":"shared-name","expected":"alice's shared-name","new":"pwned"}))
            .await,
        Ok(json!(false))
    );
    assert_eq!(probe(&host, "bob", json!({"op":"get_and_delete","key":"a1"})).await.unwrap(), json!("bob's a1"));
    assert_eq!(probe(&host, "alice", json!({"op":"get","key":"a1"})).await.unwrap(), json!("alice's a1"));
}

async fn listing_patterns_never_leave_the_prefix(b: Arc<dyn Backend>, p: String) {
    let host = host(b, &p, ROLES);
    seed(&host).await;
    probe(&host, "bob", json!({"op":"set","key":"bob-only","value":"1"})).await.unwrap();
    let alice_keys = |keys: &[&str]| json!(keys);
    let cases: Vec<(String, Value)> = vec![
        ("*".into(), alice_keys(&["*", "a1", "b:kv:x", "shared-name", "z"])),
        ("*:*".into(), alice_keys(&["b:kv:x"])),
        ("[a-z]*".into(), alice_keys(&["a1", "b:kv:x", "shared-name", "z"])),
        ("\\*".into(), alice_keys(&["*"])),
        ("..".into(), alice_keys(&[])),
        ("bob*".into(), alice_keys(&[])),
        ("bob:kv:*".into(), alice_keys(&[])),
        (format!("{p}bob:kv:*"), alice_keys(&[])),
        ("*bob-only".into(), alice_keys(&[])),
        ("../bob/*".into(), alice_keys(&[])),
    ];
    for (pattern, expected) in cases {
        let got = probe(&host, "alice", json!({"op":"list_all","pattern":pattern})).await.unwrap();
        assert_eq!(got, expected, "pattern {pattern:?}");
    }
    let all = probe(&host, "alice", json!({"op":"list_all"})).await.unwrap();
    assert!(!all.as_array().unwrap().contains(&json!("bob-only")));
    // get_by_prefix with glob characters in the prefix stays literal.
    let pairs = probe(&host, "alice", json!({"op":"by_prefix","prefix":"*"})).await.unwrap();
    assert_eq!(pairs, json!([["*", "alice's *"]]));
}

async fn clear_and_deletes_touch_only_the_caller(b: Arc<dyn Backend>, p: String) {
    let host = host(b, &p, ROLES);
    seed(&host).await;
    assert_eq!(probe(&host, "alice", json!({"op":"clear"})).await.unwrap(), json!(5));
    assert_eq!(probe(&host, "alice", json!({"op":"list_all"})).await.unwrap(), json!([]));
    assert_eq!(probe(&host, "bob", json!({"op":"list_all"})).await.unwrap().as_array().unwrap().len(), 5);
    assert_eq!(
        probe(&host, "alice", json!({"op":"delete_many","keys":["shared-name","z","*"]})).await.unwrap(),
        json!(0)
    );
    assert_eq!(probe(&host, "alice", json!({"op":"delete","key":"z"})).await.unwrap(), json!(false));
    assert_eq!(probe(&host, "alice", json!({"op":"exists","key":"z"})).await.unwrap(), json!(false));
    assert_eq!(probe(&host, "alice", json!({"op":"expire","key":"z","ttl_ms":10})).await.unwrap(), json!(false));
    assert_eq!(probe(&host, "bob", json!({"op":"expiry","key":"z"})).await.unwrap(), json!("persistent"));
    assert_eq!(probe(&host, "bob", json!({"op":"get","key":"z"})).await.unwrap(), json!("bob's z"));
}

async fn bad_input_gets_the_documented_error(b: Arc<dyn Backend>, p: String) {
    let limits = RoleLimits { max_value_bytes: 4096, max_batch_entries: 10, ..RoleLimits::default() };
    let host = host_with_limits(b, &p, &[("alice", "kvprobe")], limits);
    let err = |op: Value| {
        let host = &host;
        async move { probe(host, "alice", op).await.unwrap_err() }
    };
    let huge_key = "k".repeat(1 << 20);
    assert_eq!(err(json!({"op":"get","key":""})).await, "invalid-key");
    assert_eq!(err(json!({"op":"set","key":"","value":"v"})).await, "invalid-key");
    assert_eq!(err(json!({"op":"get","key":huge_key})).await, "invalid-key");
    assert_eq!(err(json!({"op":"set","key":huge_key,"value":"v"})).await, "invalid-key");
    assert_eq!(err(json!({"op":"incr","key":"a\u{0}b","delta":1})).await, "invalid-key");
    assert_eq!(err(json!({"op":"get_many","keys":["ok", ""]})).await, "invalid-key");
    for pattern in ["[abc", "abc\\", "[]", "a\nb", "*a*b*c*d*e*f*g*h*i"] {
        assert_eq!(err(json!({"op":"list","pattern":pattern,"limit":10})).await, "invalid-key", "{pattern:?}");
    }
    assert_eq!(err(json!({"op":"set","key":"big","len":4097})).await, "too-large");
    assert_eq!(err(json!({"op":"set_if_absent","key":"big","value":"x".repeat(4097)})).await, "too-large");
    assert_eq!(err(json!({"op":"set_many","entries":{},"count":11})).await, "too-large");
    assert_eq!(err(json!({"op":"set","key":"t","value":"v","ttl_ms":0})).await, "invalid-argument");
    assert_eq!(err(json!({"op":"list","limit":0})).await, "invalid-argument");
    // Nothing of the refused writes landed.
    assert_eq!(probe(&host, "alice", json!({"op":"list_all"})).await.unwrap(), json!([]));
    probe(&host, "alice", json!({"op":"set","key":"fits","len":4096})).await.unwrap();
    probe(&host, "alice", json!({"op":"set","key":"word","value":"ten"})).await.unwrap();
    assert_eq!(err(json!({"op":"incr","key":"word","delta":1})).await, "invalid-argument");
}

async fn other_buckets_are_denied(b: Arc<dyn Backend>, p: String) {
    let host = host(b, &p, ROLES);
    for name in ["bob", "shared", "*", "../bob"] {
        assert_eq!(probe(&host, "alice", json!({"op":"open","name":name})).await.unwrap_err(), "access-denied");
    }
}

async fn list_keys_pages_with_a_cursor(b: Arc<dyn Backend>, p: String) {
    let host = host(b, &p, &[("alice", "kvprobe")]);
    probe(&host, "alice", json!({"op":"set_many","entries":{},"count":25})).await.unwrap();
    let mut seen = Vec::new();
    let mut cursor = Value::Null;
    loop {
        let page =
            probe(&host, "alice", json!({"op":"list","pattern":"bulk:*","cursor":cursor,"limit":4})).await.unwrap();
        let keys = page["keys"].as_array().unwrap();
        assert!(keys.len() <= 4);
        seen.extend(keys.iter().map(|k| k.as_str().unwrap().to_owned()));
        cursor = page["cursor"].clone();
        if cursor.is_null() {
            break;
        }
    }
    seen.sort();
    let mut expected: Vec<String> = (0..25).map(|i| format!("bulk:{i}")).collect();
    expected.sort();
    assert_eq!(seen, expected);
}

/// After roles ran on Redis, a raw scan of the server finds no key outside
/// the roles' documented prefixes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_holds_only_prefixed_keys() {
    let Some(server) = shared_redis() else { return };
    let db = server.fresh_db();
    let prefix = "iso:";
    let host = host(
        server.backend(db),
        prefix,
        &[("alice", "kvprobe"), ("bob", "kvprobe"), ("counter", "counter"), ("notes", "notes")],
    );
    seed(&host).await;
    host.call("counter", b"").await.unwrap();
    rolehost_tests::call_json(&host, "notes", json!({"op":"put","notes":{"n1":{},"n:2":{}}})).await;
    // Hostile keys and patterns along the way.
    for key in ["../bob/x", "bob:kv:y", "\\*", "[x]", "iso:bob:kv:z"] {
        probe(&host, "alice", json!({"op":"set","key":key,"value":"x"})).await.unwrap();
    }
    let keys = server.all_keys(db);
    assert!(keys.len() >= 17, "{keys:?}");
    for key in &keys {
        let owner = ["alice", "bob", "counter", "notes"]
            .into_iter()
            .find(|role| key.starts_with(&format!("{prefix}{role}:kv:")));
        assert!(owner.is_some(), "key {key:?} is outside every role's prefix");
    }
    assert!(keys.contains(&"iso:counter:kv:count".to_owned()));
    assert!(keys.contains(&"iso:alice:kv:iso:bob:kv:z".to_owned()));
    // A bad cursor is refused rather than trusted.
    assert_eq!(
        probe(&host, "alice", json!({"op":"list","cursor":"not-a-cursor","limit":5})).await.unwrap_err(),
        "invalid-argument"
    );
}
