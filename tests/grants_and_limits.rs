//! Grants (shared namespaces, WASI capabilities) and per-role limits (TTL
//! policy, operation quotas, fuel, stack), through real components on both
//! backends.

use std::collections::BTreeMap;
use std::sync::Arc;

use rolehost::backend::Backend;
use rolehost::{Access, CallError, Grants, RoleLimits};
use rolehost_tests::{host_with_specs, on_all_backends, probe};
use serde_json::{json, Value};

on_all_backends!(
    shared_namespaces_follow_their_grants,
    read_only_grants_refuse_every_write,
    ungranted_namespaces_are_denied_everywhere,
    default_and_max_ttl_apply_to_every_write,
    operation_quotas_per_call_and_per_second,
    sdk_listings_fit_a_small_batch_limit,
    waiting_for_a_lock_is_one_operation,
    listing_a_granted_namespace_stays_within_the_readers_memory,
    clear_costs_an_operation_per_key,
);

fn grants(namespaces: &[(&str, Access)]) -> Grants {
    Grants {
        namespaces: namespaces.iter().map(|(n, a)| (n.to_string(), *a)).collect::<BTreeMap<_, _>>(),
        ..Grants::default()
    }
}

/// bob may write `catalog`, alice may only read it, carol has no grant.
fn catalog_host(b: Arc<dyn Backend>, p: &str) -> rolehost::Host {
    let limits = RoleLimits::default;
    host_with_specs(
        b,
        p,
        vec![
            ("bob", "kvprobe", limits(), grants(&[("catalog", Access::ReadWrite)])),
            ("alice", "kvprobe", limits(), grants(&[("catalog", Access::Read)])),
            ("carol", "kvprobe", limits(), Grants::default()),
        ],
    )
}

fn in_catalog(mut op: Value) -> Value {
    op["ns"] = json!("catalog");
    op
}

async fn shared_namespaces_follow_their_grants(b: Arc<dyn Backend>, p: String) {
    let host = catalog_host(b.clone(), &p);
    let bob = |op: Value| probe(&host, "bob", in_catalog(op));
    bob(json!({"op":"set","key":"item","value":"from bob"})).await.unwrap();
    bob(json!({"op":"subject_store","subject":"sku-1","set":{"price":5}})).await.unwrap();
    let token = bob(json!({"op":"lock_hold","name":"l","ttl_ms":1000,"wait_ms":0})).await;
    assert!(token.as_ref().is_ok_and(Value::is_u64), "bob takes the shared lock: {token:?}");
    // Bob's own namespace is separate from the shared one.
    assert_eq!(probe(&host, "bob", json!({"op":"get","key":"item"})).await, Ok(json!(null)));
    let alice = |op: Value| probe(&host, "alice", in_catalog(op));
    assert_eq!(alice(json!({"op":"get","key":"item"})).await, Ok(json!("from bob")));
    // Measured on the store as it is, it still counts as a get.
    let metrics = host.metrics().render();
    let counted = |line: &&str| line.contains(r#"role="alice""#) && line.contains(r#"op="get""#);
    let hits = metrics.lines().filter(|l| l.starts_with("rolehost_state_hits_total")).find(counted);
    assert!(hits.is_some_and(|l| l.ends_with(" 1")), "{metrics}");
    assert_eq!(alice(json!({"op":"list_all"})).await, Ok(json!(["item"])));
    assert_eq!(alice(json!({"op":"subject_get","subject":"sku-1","prop":"price"})).await, Ok(json!("5")));
    assert_eq!(alice(json!({"op":"subject_list"})).await, Ok(json!(["sku-1"])));
    let look = alice(json!({"op":"rate_check","key":"api","limit":5,"window_ms":60000,"cost":0})).await.unwrap();
    assert_eq!(look["allowed"], true);
    // Shared data lives under `{prefix}@catalog:`, under no role's prefix.
    let page = b.scan(&format!("{p}*"), None, 100).await.unwrap();
    let mut keys = page.keys;
    keys.sort();
    assert_eq!(
        keys,
        [format!("{p}@catalog:fence:{{l}}"), format!("{p}@catalog:kv:item"), format!("{p}@catalog:s:sku-1")]
    );
}

async fn read_only_grants_refuse_every_write(b: Arc<dyn Backend>, p: String) {
    let host = catalog_host(b, &p);
    probe(&host, "bob", in_catalog(json!({"op":"set","key":"k","value":"v"}))).await.unwrap();
    probe(&host, "bob", in_catalog(json!({"op":"subject_store","subject":"s","set":{"a":1}}))).await.unwrap();
    let writes = [
        json!({"op":"set","key":"k","value":"x"}),
        json!({"op":"delete","key":"k"}),
        json!({"op":"set_later","key":"k","value":"x"}),
        json!({"op":"delete_later","key":"k"}),
        json!({"op":"set_many","entries":{"a":"1"}}),
        json!({"op":"delete_many","keys":["k"]}),
        json!({"op":"expire","key":"k","ttl_ms":10}),
        json!({"op":"expire","key":"k"}),
        json!({"op":"clear"}),
        json!({"op":"incr","key":"n","delta":1}),
        json!({"op":"set_if_absent","key":"new","value":"x"}),
        json!({"op":"cas","key":"k","expected":"v","new":"x"}),
        json!({"op":"get_and_delete","key":"k"}),
        json!({"op":"subject_store","subject":"s","set":{"a":2}}),
        json!({"op":"subject_store","subject":"s","remove":["a"]}),
        json!({"op":"subject_incr","subject":"s","prop":"a","delta":1}),
        json!({"op":"subject_incr_float","subject":"s","prop":"a","delta":1.0}),
        json!({"op":"subject_cas","subject":"s","prop":"a","expected":"1","new":"3"}),
        json!({"op":"subject_update","subject":"s","prop":"a"}),
        json!({"op":"subject_delete","subject":"s"}),
        json!({"op":"subject_expire","subject":"s","ttl_ms":10}),
        json!({"op":"lock_hold","name":"l","ttl_ms":1000,"wait_ms":0}),
        json!({"op":"rate_check","key":"api","limit":5,"window_ms":60000}),
    ];
    for op in writes {
        assert_eq!(probe(&host, "alice", in_catalog(op.clone())).await, Err("access-denied".into()), "{op}");
    }
    // Nothing changed, queued writes included.
    host.settle().await;
    assert_eq!(probe(&host, "bob", in_catalog(json!({"op":"get","key":"k"}))).await, Ok(json!("v")));
    assert_eq!(probe(&host, "bob", in_catalog(json!({"op":"expiry","key":"k"}))).await, Ok(json!("persistent")));
    assert_eq!(
        probe(&host, "bob", in_catalog(json!({"op":"subject_get","subject":"s","prop":"a"}))).await,
        Ok(json!("1"))
    );
    assert_eq!(probe(&host, "bob", in_catalog(json!({"op":"list_all"}))).await, Ok(json!(["k"])));
}

async fn ungranted_namespaces_are_denied_everywhere(b: Arc<dyn Backend>, p: String) {
    let host = catalog_host(b, &p);
    for ns in ["catalog", "bob", "alice", "@catalog", "", "../bob"] {
        let ops = [
            json!({"op":"get","key":"k"}),
            json!({"op":"list_all"}),
            json!({"op":"subject_exists","subject":"s"}),
            json!({"op":"subject_list"}),
            json!({"op":"lock_hold","name":"l","ttl_ms":1000,"wait_ms":0}),
            json!({"op":"rate_check","key":"api","limit":5,"window_ms":60000,"cost":0}),
        ];
        for mut op in ops {
            op["ns"] = json!(ns);
            let result = probe(&host, "carol", op.clone()).await;
            if ns.is_empty() {
                assert!(result.is_ok(), "own namespace: {op} gave {result:?}");
            } else {
                assert_eq!(result, Err("access-denied".into()), "{op}");
            }
        }
    }
}

async fn default_and_max_ttl_apply_to_every_write(b: Arc<dyn Backend>, p: String) {
    let default = RoleLimits { default_ttl_ms: Some(60_000), ..RoleLimits::default() };
    let capped = RoleLimits { max_ttl_ms: Some(5_000), ..RoleLimits::default() };
    let host = host_with_specs(
        b,
        &p,
        vec![("def", "kvprobe", default, Grants::default()), ("cap", "kvprobe", capped, Grants::default())],
    );
    let expiry = |role: &'static str, key: &str| {
        let host = &host;
        let op = json!({"op":"expiry","key":key});
        async move { probe(host, role, op).await.unwrap() }
    };
    let ms = |v: Value| v.as_u64().unwrap_or_else(|| panic!("expected a TTL, got {v}"));
    for role in ["def", "cap"] {
        let op = |v: Value| probe(&host, role, v);
        op(json!({"op":"set","key":"plain","value":"v"})).await.unwrap();
        op(json!({"op":"incr","key":"n","delta":1})).await.unwrap();
        op(json!({"op":"set_many","entries":{"m":"1"}})).await.unwrap();
        op(json!({"op":"set_if_absent","key":"nx","value":"1"})).await.unwrap();
        op(json!({"op":"cas","key":"c","new":"1"})).await.unwrap();
        for key in ["plain", "n", "m", "nx", "c"] {
            let left = ms(expiry(role, key).await);
            let max = if role == "def" { 60_000 } else { 5_000 };
            assert!(left > max - 5_000 && left <= max, "{role}/{key}: {left}");
        }
        op(json!({"op":"subject_store","subject":"s","set":{"a":1}})).await.unwrap();
        op(json!({"op":"subject_incr","subject":"t","prop":"a","delta":1})).await.unwrap();
        for subject in ["s", "t"] {
            assert!(op(json!({"op":"subject_expiry","subject":subject})).await.unwrap().is_u64(), "{role}/{subject}");
        }
    }
    // A role's own TTL is kept under the default; the cap refuses longer ones and persistence.
    probe(&host, "def", json!({"op":"set","key":"short","value":"v","ttl_ms":30_000})).await.unwrap();
    assert!(ms(expiry("def", "short").await) <= 30_000);
    probe(&host, "def", json!({"op":"expire","key":"short"})).await.unwrap();
    assert_eq!(expiry("def", "short").await, json!("persistent"), "persist is allowed without a cap");
    let refused = [
        json!({"op":"set","key":"long","value":"v","ttl_ms":5001}),
        json!({"op":"expire","key":"plain","ttl_ms":6000}),
        json!({"op":"expire","key":"plain"}),
        json!({"op":"subject_expire","subject":"s"}),
    ];
    for op in refused {
        assert_eq!(probe(&host, "cap", op.clone()).await, Err("invalid-argument".into()), "{op}");
    }
    probe(&host, "cap", json!({"op":"set","key":"ok","value":"v","ttl_ms":5000})).await.unwrap();
}

/// A role with a per-second quota far below the tries a wait makes (one
/// every 100 ms at most) still waits as long as it asked, and is told the
/// lock stayed taken, not that its quota ran out.
async fn waiting_for_a_lock_is_one_operation(b: Arc<dyn Backend>, p: String) {
    let limits = RoleLimits { max_ops_per_second: Some(5), ..RoleLimits::default() };
    let host = host_with_specs(b.clone(), &p, vec![("slow", "kvprobe", limits, Grants::default())]);
    // Taken by someone else for a minute.
    let (key, fence) = (format!("{p}slow:lock:{{busy}}"), format!("{p}slow:fence:{{busy}}"));
    assert!(b.lock_acquire(&key, &fence, "other", MINUTE).await.unwrap().is_some());
    let wait = json!({"op":"lock_hold","name":"busy","ttl_ms":1000,"wait_ms":1500});
    assert_eq!(probe(&host, "slow", wait).await, Ok(Value::Null));
}

const MINUTE: std::time::Duration = std::time::Duration::from_secs(60);

async fn operation_quotas_per_call_and_per_second(b: Arc<dyn Backend>, p: String) {
    let per_call = RoleLimits { max_ops_per_call: 10, ..RoleLimits::default() };
    let per_second = RoleLimits { max_ops_per_second: Some(30), ..RoleLimits::default() };
    let host = host_with_specs(
        b.clone(),
        &p,
        vec![("call", "kvprobe", per_call, Grants::default()), ("rate", "kvprobe", per_second, Grants::default())],
    );
    let ops: Vec<Value> = (0..12).map(|i| json!({"op":"set","key":format!("k{i}"),"value":"v"})).collect();
    // The probe opens a bucket for the batch and one per operation: 1 + 2 per
    // set, so 4 sets fit in 10.
    let answers = probe(&host, "call", json!({"op":"batch","ops":ops})).await.unwrap();
    let kinds: Vec<&str> = answers
        .as_array()
        .unwrap()
        .iter()
        .map(|a| if a.get("ok").is_some() { "ok" } else { a["err"]["kind"].as_str().unwrap() })
        .collect();
    assert_eq!(kinds.iter().filter(|k| **k == "ok").count(), 4, "{kinds:?}");
    assert!(kinds[4..].iter().all(|k| *k == "quota-exceeded"), "{kinds:?}");
    // A batch counts one operation per key.
    let big = probe(&host, "call", json!({"op":"set_many","entries":{},"count":11})).await;
    assert_eq!(big, Err("quota-exceeded".into()));
    // So does a subject's load, per property: 8 fit (with the probe's bucket
    // and the open), 9 not.
    for (props, fits) in [(8, true), (9, false)] {
        let fields: Vec<(String, Vec<u8>)> = (0..props).map(|i| (format!("p{i}"), b"1".to_vec())).collect();
        b.hash_apply(&format!("{p}call:s:many{props}"), &fields, &[], None).await.unwrap();
        let load = probe(&host, "call", json!({"op":"subject_load","subject":format!("many{props}")})).await;
        assert_eq!(load.is_ok(), fits, "{props} properties: {load:?}");
        assert!(fits || load == Err("quota-exceeded".into()), "{load:?}");
    }
    // The next call has a fresh per-call budget.
    assert_eq!(probe(&host, "call", json!({"op":"get","key":"k0"})).await, Ok(json!("v")));
    // Per second: a burst of 40 probe operations (80 state operations: the
    // probe opens a bucket for the batch and for each) against 30 a second.
    // The first 14 pass; the bucket refills only 0.03 operations a millisecond, so most
    // of the rest are refused.
    let ops: Vec<Value> = (0..40).map(|i| json!({"op":"set","key":format!("r{i}"),"value":"v"})).collect();
    let answers = probe(&host, "rate", json!({"op":"batch","ops":ops})).await.unwrap();
    let passed: Vec<bool> = answers.as_array().unwrap().iter().map(|a| a.get("ok").is_some()).collect();
    assert!(passed[..14].iter().all(|p| *p), "{passed:?}");
    assert!(passed[14..].iter().filter(|p| !**p).count() >= 5, "{passed:?}");
    // The budget belongs to the role, not the call, and refills with time.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(probe(&host, "rate", json!({"op":"get","key":"r0"})).await, Ok(json!("v")));
    // Listing pages of up to 500 (the SDK's) costs what the page holds, so
    // it works under quotas below 500: the keys set (14, more if the burst
    // was slow) against 30 a second, and 4 against 10 a call.
    let listed = probe(&host, "rate", json!({"op":"list_all"})).await.unwrap();
    let set = passed.iter().filter(|p| **p).count();
    assert_eq!(listed.as_array().map(Vec::len), Some(set), "{listed}");
    assert_eq!(probe(&host, "call", json!({"op":"count"})).await, Ok(json!(4)));
    // A page a call can no longer pay for is refused, as any operation.
    let ops: Vec<Value> = (0..4).map(|_| json!({"op":"count"})).collect();
    let answers = probe(&host, "call", json!({"op":"batch","ops":ops})).await.unwrap();
    let counted: Vec<bool> = answers.as_array().unwrap().iter().map(|a| a.get("ok") == Some(&json!(4))).collect();
    assert_eq!(counted, [true, false, false, false], "{answers}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fuel_and_stack_overflow_fail_only_their_call() {
    let backend = rolehost_tests::backend("memory").unwrap();
    let fueled = RoleLimits { fuel: Some(5_000_000), ..RoleLimits::default() };
    let host = host_with_specs(
        backend,
        "t:",
        vec![
            ("fueled", "kvprobe", fueled, Grants::default()),
            ("deep", "kvprobe", RoleLimits::default(), Grants::default()),
        ],
    );
    let err = host.call("fueled", br#"{"op":"spin"}"#).await.unwrap_err();
    assert!(matches!(err, CallError::OutOfFuel { fuel: 5_000_000, .. }), "{err}");
    assert_eq!(probe(&host, "fueled", json!({"op":"incr","key":"n","delta":1})).await, Ok(json!(1)));
    let err = host.call("deep", br#"{"op":"recurse","depth":100000000}"#).await.unwrap_err();
    match &err {
        CallError::Trap { message, .. } => assert!(message.contains("stack"), "{err}"),
        other => panic!("expected a stack overflow trap, got {other}"),
    }
    assert_eq!(probe(&host, "deep", json!({"op":"recurse","depth":100})).await, Ok(json!(50)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wasi_grants_expose_only_what_is_named() {
    std::env::set_var("ROLEHOST_TEST_GRANTED", "visible");
    std::env::set_var("ROLEHOST_TEST_SECRET", "hidden");
    let dir = std::env::temp_dir().join(format!("rolehost-grant-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hello.txt"), "hello from the host").unwrap();
    let granted = Grants {
        env: vec!["ROLEHOST_TEST_GRANTED".into(), "ROLEHOST_TEST_UNSET".into()],
        dir: Some(dir.clone()),
        ..Grants::default()
    };
    let backend = rolehost_tests::backend("memory").unwrap();
    let host = host_with_specs(
        backend,
        "t:",
        vec![
            ("granted", "kvprobe", RoleLimits::default(), granted),
            ("bare", "kvprobe", RoleLimits::default(), Grants::default()),
        ],
    );
    let op = |role: &'static str, v: Value| probe(&host, role, v);
    assert_eq!(op("granted", json!({"op":"read_env","name":"ROLEHOST_TEST_GRANTED"})).await, Ok(json!("visible")));
    assert_eq!(op("granted", json!({"op":"read_env","name":"ROLEHOST_TEST_SECRET"})).await, Ok(json!(null)));
    assert_eq!(op("granted", json!({"op":"list_env"})).await, Ok(json!(["ROLEHOST_TEST_GRANTED"])));
    assert_eq!(op("bare", json!({"op":"list_env"})).await, Ok(json!([])));
    assert_eq!(
        op("granted", json!({"op":"read_file","path":"/data/hello.txt"})).await,
        Ok(json!("hello from the host"))
    );
    assert_eq!(op("granted", json!({"op":"list_dir","path":"/data"})).await, Ok(json!(["hello.txt"])));
    for path in ["/etc/passwd", "/data/../../etc/passwd", "../hello.txt", "/proc/self/environ"] {
        assert_eq!(op("granted", json!({"op":"read_file","path":path})).await, Err("access-denied".into()), "{path}");
    }
    assert_eq!(op("bare", json!({"op":"read_file","path":"/data/hello.txt"})).await, Err("access-denied".into()));
    assert_eq!(op("bare", json!({"op":"list_dir","path":"/"})).await, Err("access-denied".into()));
}

/// The SDK's helpers that page for the role (get-by-prefix, list-keys)
/// stay within a small `max-batch-entries`.
async fn sdk_listings_fit_a_small_batch_limit(b: Arc<dyn Backend>, p: String) {
    let small = RoleLimits { max_batch_entries: 100, ..RoleLimits::default() };
    let host = host_with_specs(b, &p, vec![("small", "kvprobe", small, Grants::default())]);
    for start in [0, 100] {
        let entries: serde_json::Map<String, Value> =
            (start..start + 75).map(|i| (format!("item:{i:03}"), json!(i.to_string()))).collect();
        probe(&host, "small", json!({"op":"set_many","entries":entries})).await.unwrap();
    }
    let pairs = probe(&host, "small", json!({"op":"by_prefix","prefix":"item:"})).await.unwrap();
    let pairs = pairs.as_array().unwrap();
    assert_eq!(pairs.len(), 150, "every key, though over the batch limit");
    assert_eq!(pairs[0], json!(["item:000", "0"]));
    assert_eq!(pairs[149], json!(["item:174", "174"]), "sorted by key");
    let keys = probe(&host, "small", json!({"op":"list_all","pattern":"item:*"})).await.unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 150);
    probe(&host, "small", json!({"op":"set","key":"other","value":"v"})).await.unwrap();
    assert_eq!(probe(&host, "small", json!({"op":"count","pattern":"item:*"})).await, Ok(json!(150)));
    assert_eq!(probe(&host, "small", json!({"op":"count"})).await, Ok(json!(151)));
}

/// A page of names from a granted namespace never holds more bytes than
/// the reader's memory limit: names others wrote passed none of its limits
/// (here 10 MB of them, against 8 MiB).
async fn listing_a_granted_namespace_stays_within_the_readers_memory(b: Arc<dyn Backend>, p: String) {
    let reader = RoleLimits { max_memory_bytes: 8 << 20, ..RoleLimits::default() };
    let host = host_with_specs(b.clone(), &p, vec![("alice", "kvprobe", reader, grants(&[("catalog", Access::Read)]))]);
    let long = "k".repeat(100_000);
    for i in 0..100 {
        b.set(&format!("{p}@catalog:kv:{i:03}{long}"), b"v", None).await.unwrap();
    }
    let list = json!({"op":"list","limit":100,"ns":"catalog"});
    match probe(&host, "alice", list).await {
        Err(kind) => assert_eq!(kind, "too-large"),
        Ok(page) => {
            let bytes: usize = page["keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().len()).sum();
            assert!(bytes <= 8 << 20, "a page of {bytes} bytes of names");
        }
    }
}

/// `clear` is charged like the listing and deletes it does, an operation
/// per key: a role allowed 5 operations a call cannot sweep 100 keys.
async fn clear_costs_an_operation_per_key(b: Arc<dyn Backend>, p: String) {
    let limits = RoleLimits { max_ops_per_call: 5, ..RoleLimits::default() };
    let host = host_with_specs(b.clone(), &p, vec![("sweeper", "kvprobe", limits, Grants::default())]);
    let entries: Vec<(String, Vec<u8>)> = (0..100).map(|i| (format!("{p}sweeper:kv:k{i:03}"), b"v".to_vec())).collect();
    b.set_many(&entries, None).await.unwrap();
    assert_eq!(probe(&host, "sweeper", json!({"op":"clear"})).await, Err("quota-exceeded".into()));
    let left = b.scan(&format!("{p}sweeper:kv:*"), None, 1000).await.unwrap().keys.len();
    assert!(left >= 95, "{left} keys left: more deleted than the quota paid for");
    // A role with room clears them all.
    let host = host_with_specs(b.clone(), &p, vec![("sweeper", "kvprobe", RoleLimits::default(), Grants::default())]);
    assert_eq!(probe(&host, "sweeper", json!({"op":"clear"})).await, Ok(json!(left)));
}
