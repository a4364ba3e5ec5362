//! Subjects, locks and rate limits through real components on both
//! backends: semantics, atomicity under concurrent calls, isolation.

use std::sync::Arc;
use std::time::Duration;

use rolehost::backend::Backend;
use rolehost::{Host, RoleLimits};
use rolehost_tests::{call_json, eventually, host, host_with_limits, on_all_backends, probe};
use serde_json::{json, Value};

on_all_backends!(
    subject_reads_writes_and_buffering,
    subject_atomic_operations,
    subject_bad_input,
    subject_store_is_all_or_nothing,
    subject_updates_lose_nothing,
    lock_takeover_fences_the_stale_holder,
    a_call_whose_caller_goes_away_releases_its_locks,
    locks_exclude_concurrent_workers,
    rate_limits_are_exact_under_concurrency,
    subjects_and_locks_are_per_role,
    example_profile_counts_logins,
    example_rate_limiter_denies_past_the_limit,
);

async fn subject_reads_writes_and_buffering(b: Arc<dyn Backend>, p: String) {
    let host = host(b, &p, &[("alice", "kvprobe")]);
    let op = |v: Value| probe(&host, "alice", v);
    assert_eq!(op(json!({"op":"subject_exists","subject":"u1"})).await, Ok(json!(false)));
    // Buffered writes are invisible until store, and discarded if not stored.
    let unstored = op(json!({"op":"subject_store","subject":"u1","set":{"name":"Ada"},"store":false})).await;
    assert_eq!(unstored, Ok(json!({"pending":1,"after_store":1})));
    assert_eq!(op(json!({"op":"subject_exists","subject":"u1"})).await, Ok(json!(false)));
    let stored =
        op(json!({"op":"subject_store","subject":"u1","set":{"name":"Ada","age":36},"extended":{"name":"ext"}})).await;
    assert_eq!(stored, Ok(json!({"pending":3,"after_store":0})));
    assert_eq!(op(json!({"op":"subject_get","subject":"u1","prop":"name"})).await, Ok(json!("\"Ada\"")));
    assert_eq!(
        op(json!({"op":"subject_get","subject":"u1","prop":"name","extended":true})).await,
        Ok(json!("\"ext\""))
    );
    assert_eq!(op(json!({"op":"subject_get","subject":"u1","prop":"nope"})).await, Ok(json!(null)));
    assert_eq!(
        op(json!({"op":"subject_load","subject":"u1"})).await,
        Ok(json!({"default":{"name":"Ada","age":36},"extended":{"name":"ext"}}))
    );
    op(json!({"op":"subject_store","subject":"u1","remove":["age"]})).await.unwrap();
    assert_eq!(op(json!({"op":"subject_load","subject":"u1"})).await.unwrap()["default"], json!({"name":"Ada"}));
    for name in ["u2", "u3", "order-1"] {
        op(json!({"op":"subject_incr","subject":name,"prop":"n","delta":1})).await.unwrap();
    }
    assert_eq!(op(json!({"op":"subject_list","pattern":"u*"})).await, Ok(json!(["u1", "u2", "u3"])));
    assert_eq!(op(json!({"op":"subject_list"})).await.unwrap().as_array().unwrap().len(), 4);
    // Subjects and kv keys of the same name do not collide.
    op(json!({"op":"set","key":"u1","value":"kv"})).await.unwrap();
    assert_eq!(op(json!({"op":"subject_exists","subject":"u1"})).await, Ok(json!(true)));
    assert_eq!(op(json!({"op":"get","key":"u1"})).await, Ok(json!("kv")));
    assert_eq!(op(json!({"op":"subject_expire","subject":"u1","ttl_ms":1000})).await, Ok(json!(true)));
    assert!(op(json!({"op":"subject_expiry","subject":"u1"})).await.unwrap().is_u64());
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(op(json!({"op":"subject_exists","subject":"u1"})).await, Ok(json!(false)));
    assert_eq!(op(json!({"op":"subject_delete","subject":"u2"})).await, Ok(json!(true)));
    assert_eq!(op(json!({"op":"subject_delete","subject":"u2"})).await, Ok(json!(false)));
    assert_eq!(op(json!({"op":"subject_list","pattern":"u*"})).await, Ok(json!(["u3"])));
}

async fn subject_atomic_operations(b: Arc<dyn Backend>, p: String) {
    let host = host(b, &p, &[("alice", "kvprobe")]);
    let op = |v: Value| probe(&host, "alice", v);
    assert_eq!(op(json!({"op":"subject_incr","subject":"s","prop":"n","delta":5})).await, Ok(json!(5)));
    assert_eq!(op(json!({"op":"subject_incr","subject":"s","prop":"n","delta":-2})).await, Ok(json!(3)));
    assert_eq!(op(json!({"op":"subject_incr","subject":"s","prop":"n","delta":1,"extended":true})).await, Ok(json!(1)));
    assert_eq!(op(json!({"op":"subject_incr_float","subject":"s","prop":"f","delta":0.5})).await, Ok(json!(0.5)));
    assert_eq!(op(json!({"op":"subject_incr_float","subject":"s","prop":"f","delta":1.25})).await, Ok(json!(1.75)));
    let cas = |expected: Value, new: Value| {
        op(json!({"op":"subject_cas","subject":"s","prop":"c","expected":expected,"new":new}))
    };
    assert_eq!(cas(json!("1"), json!("2")).await, Ok(json!(false)));
    assert_eq!(cas(Value::Null, json!("{\"a\":1}")).await, Ok(json!(true)));
    assert_eq!(cas(Value::Null, json!("2")).await, Ok(json!(false)));
    assert_eq!(cas(json!("{\"a\":1}"), json!("[1,2]")).await, Ok(json!(true)));
    assert_eq!(cas(json!("[1,2]"), Value::Null).await, Ok(json!(true)));
    assert_eq!(op(json!({"op":"subject_get","subject":"s","prop":"c"})).await, Ok(json!(null)));
    assert_eq!(op(json!({"op":"subject_update","subject":"s","prop":"n","times":4})).await, Ok(json!(7)));
    assert_eq!(op(json!({"op":"subject_get","subject":"s","prop":"n"})).await, Ok(json!("7")));
}

async fn subject_bad_input(b: Arc<dyn Backend>, p: String) {
    let limits = RoleLimits { max_batch_entries: 5, ..RoleLimits::default() };
    let host = host_with_limits(b, &p, &[("alice", "kvprobe")], limits);
    let err = |v: Value| {
        let host = &host;
        async move { probe(host, "alice", v).await.unwrap_err() }
    };
    assert_eq!(err(json!({"op":"subject_exists","subject":""})).await, "invalid-key");
    assert_eq!(err(json!({"op":"subject_get","subject":"s","prop":""})).await, "invalid-key");
    assert_eq!(err(json!({"op":"subject_get","subject":"s","prop":"a\nb"})).await, "invalid-key");
    assert_eq!(
        err(json!({"op":"subject_set_raw","subject":"s","prop":"p","json":"{not json"})).await,
        "invalid-argument"
    );
    let huge = json!({"op":"subject_incr_float","subject":"f","prop":"p","delta":1e308});
    probe(&host, "alice", huge.clone()).await.unwrap();
    assert_eq!(err(huge).await, "invalid-argument", "an infinite result is refused");
    let six: serde_json::Map<String, Value> = (0..6).map(|i| (format!("p{i}"), json!(i))).collect();
    assert_eq!(err(json!({"op":"subject_store","subject":"s","set":six})).await, "too-large");
    assert_eq!(err(json!({"op":"subject_list","pattern":"[x"})).await, "invalid-key");
    probe(&host, "alice", json!({"op":"subject_store","subject":"s","set":{"word":"ten"}})).await.unwrap();
    assert_eq!(err(json!({"op":"subject_incr","subject":"s","prop":"word","delta":1})).await, "invalid-argument");
    let kept = probe(&host, "alice", json!({"op":"subject_get","subject":"f","prop":"p"})).await.unwrap();
    assert_eq!(kept.as_str().unwrap().parse::<f64>().unwrap(), 1e308, "the refused increment changed nothing");
}

/// A writer stores {a: i, b: i} again and again while readers load the
/// subject: no reader ever sees a and b from different stores.
async fn subject_store_is_all_or_nothing(b: Arc<dyn Backend>, p: String) {
    let host = Arc::new(host(b, &p, &[("alice", "kvprobe")]));
    let writer = {
        let host = host.clone();
        tokio::spawn(async move {
            for i in 0..150 {
                let set = json!({"a": i, "b": i, "c": i});
                probe(&host, "alice", json!({"op":"subject_store","subject":"pair","set":set})).await.unwrap();
            }
        })
    };
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let host = host.clone();
            tokio::spawn(async move {
                let mut seen = 0;
                for _ in 0..100 {
                    let snapshot = probe(&host, "alice", json!({"op":"subject_load","subject":"pair"})).await.unwrap();
                    let d = &snapshot["default"];
                    assert!(d["a"] == d["b"] && d["b"] == d["c"], "half a store: {d}");
                    seen += d.as_object().is_some_and(|o| !o.is_empty()) as u32;
                }
                seen
            })
        })
        .collect();
    writer.await.unwrap();
    let mut seen = 0;
    for reader in readers {
        seen += reader.await.unwrap();
    }
    assert!(seen > 0, "readers never saw a stored subject");
}

async fn subject_updates_lose_nothing(b: Arc<dyn Backend>, p: String) {
    let host = Arc::new(host(b, &p, &[("alice", "kvprobe")]));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let host = host.clone();
            tokio::spawn(async move {
                let op = if i % 2 == 0 {
                    json!({"op":"subject_update","subject":"hot","prop":"n","times":25})
                } else {
                    json!({"op":"subject_incr","subject":"hot","prop":"n","delta":1,"times":25})
                };
                probe(&host, "alice", op).await.unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(probe(&host, "alice", json!({"op":"subject_get","subject":"hot","prop":"n"})).await, Ok(json!("200")));
    // An update that loses every time gives up with `conflict` after the
    // SDK's 1000 attempts (each one's rival write landed).
    let lost = probe(&host, "alice", json!({"op":"subject_update_contended","subject":"hot","prop":"n"})).await;
    let lost = lost.unwrap();
    assert_eq!(lost["attempts"], 1000, "{lost}");
    assert!(lost["conflict"].as_str().unwrap().contains("1000 attempts"), "{lost}");
    assert_eq!(probe(&host, "alice", json!({"op":"subject_get","subject":"hot","prop":"n"})).await, Ok(json!("1200")));
}

async fn lock_takeover_fences_the_stale_holder(b: Arc<dyn Backend>, p: String) {
    let host = host(b, &p, &[("alice", "kvprobe")]);
    let result = probe(&host, "alice", json!({"op":"lock_takeover","name":"job"})).await.unwrap();
    assert_eq!(result["released_by_drop"], true, "{result}");
    assert_eq!(result["taken_while_held"], false);
    assert!(result["second"].as_u64() > result["first"].as_u64(), "{result}");
    assert_eq!(result["stale_extend"], false, "{result}");
    assert_eq!(result["stale_release"], false, "{result}");
    assert_eq!(result["owner_extend"], true, "{result}");
    assert_eq!(result["owner_release"], true, "{result}");
    // A lock still held when a call ends is released then.
    let token =
        probe(&host, "alice", json!({"op":"lock_hold","name":"held","ttl_ms":60000,"wait_ms":0})).await.unwrap();
    let next = probe(&host, "alice", json!({"op":"lock_hold","name":"held","ttl_ms":60000,"wait_ms":0})).await.unwrap();
    assert!(next.as_u64() > token.as_u64(), "{token} then {next}");
}

async fn locks_exclude_concurrent_workers(b: Arc<dyn Backend>, p: String) {
    let host = Arc::new(host(b, &p, &[("worker", "worker"), ("reader", "kvprobe")]));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let host = host.clone();
            tokio::spawn(async move { host.call("worker", b"").await.unwrap() })
        })
        .collect();
    let mut tokens = Vec::new();
    for task in tasks {
        tokens.push(String::from_utf8(task.await.unwrap()).unwrap().parse::<u64>().unwrap());
    }
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 16, "tokens are unique");
    let log = read_worker_log(&host, &p).await;
    assert_eq!(log, tokens, "the log holds every token once, in increasing order");
}

/// The worker role's `log` key, read by a kvprobe loaded under the identity
/// `worker` (same identity, same namespace).
async fn read_worker_log(host: &Host, p: &str) -> Vec<u64> {
    let peek = rolehost_tests::host(host.backend().clone(), p, &[("worker", "kvprobe")]);
    let log = probe(&peek, "worker", json!({"op":"get","key":"log"})).await.unwrap();
    log.as_str().unwrap().split(',').map(|t| t.parse().unwrap()).collect()
}

async fn rate_limits_are_exact_under_concurrency(b: Arc<dyn Backend>, p: String) {
    let host = Arc::new(host(b, &p, &[("alice", "kvprobe")]));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let host = host.clone();
            tokio::spawn(async move {
                let mut allowed = 0;
                for _ in 0..10 {
                    let d =
                        probe(&host, "alice", json!({"op":"rate_check","key":"api","limit":37,"window_ms":3_600_000}))
                            .await
                            .unwrap();
                    allowed += d["allowed"].as_bool().unwrap() as u32;
                }
                allowed
            })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        allowed += task.await.unwrap();
    }
    assert_eq!(allowed, 37);
    let err = |v: Value| {
        let host = host.clone();
        async move { probe(&host, "alice", v).await.unwrap_err() }
    };
    assert_eq!(err(json!({"op":"rate_check","key":"x","limit":0,"window_ms":1000})).await, "invalid-argument");
    assert_eq!(err(json!({"op":"rate_check","key":"x","limit":5,"window_ms":0})).await, "invalid-argument");
    assert_eq!(err(json!({"op":"rate_check","key":"x","limit":5,"window_ms":1000,"cost":6})).await, "invalid-argument");
    // Finer than a microsecond a unit (10 M a second), or rounded more than
    // 1 % off (600 000 a second would be 500 000): refused, not slowed.
    for limit in [10_000_000, 600_000] {
        let check = json!({"op":"rate_check","key":"x","limit":limit,"window_ms":1000});
        assert_eq!(err(check).await, "invalid-argument", "{limit}");
    }
    // Exact, or within 1 %: kept.
    for (limit, window_ms) in [(1_000_000u64, 1000u64), (3, 1000), (u32::MAX.into(), 365 * 24 * 3600 * 1000)] {
        let check = json!({"op":"rate_check","key":format!("ok{limit}"),"limit":limit,"window_ms":window_ms});
        assert!(probe(&host, "alice", check).await.is_ok(), "{limit} per {window_ms} ms");
    }
    assert_eq!(err(json!({"op":"rate_check","key":"","limit":5,"window_ms":1000})).await, "invalid-key");
}

async fn subjects_and_locks_are_per_role(b: Arc<dyn Backend>, p: String) {
    let host = Arc::new(host(b, &p, &[("alice", "kvprobe"), ("bob", "kvprobe")]));
    probe(&host, "alice", json!({"op":"subject_store","subject":"secret","set":{"pin":1234}})).await.unwrap();
    for pattern in [json!(null), json!("*"), json!("*:*"), json!(format!("{p}alice:s:*")), json!("alice*")] {
        assert_eq!(
            probe(&host, "bob", json!({"op":"subject_list","pattern":pattern})).await,
            Ok(json!([])),
            "{pattern}"
        );
    }
    assert_eq!(probe(&host, "bob", json!({"op":"subject_exists","subject":"secret"})).await, Ok(json!(false)));
    assert_eq!(probe(&host, "bob", json!({"op":"subject_delete","subject":"secret"})).await, Ok(json!(false)));
    assert_eq!(
        probe(&host, "alice", json!({"op":"subject_get","subject":"secret","prop":"pin"})).await,
        Ok(json!("1234"))
    );
    // Alice holds lock `job` for a while (long enough for the checks
    // below on a slow machine); Bob's lock `job` is another lock.
    let holding = {
        let host = host.clone();
        tokio::spawn(async move {
            probe(&host, "alice", json!({"op":"lock_hold","name":"job","ttl_ms":10000,"wait_ms":0,"sleep_ms":4000}))
                .await
        })
    };
    // Wait until alice really holds it.
    let lock_key = format!("{p}alice:lock:{{job}}");
    let start = std::time::Instant::now();
    while !host.backend().exists(&lock_key).await.unwrap() {
        assert!(start.elapsed() < Duration::from_secs(60), "alice never took the lock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        probe(&host, "alice", json!({"op":"lock_hold","name":"job","ttl_ms":1000,"wait_ms":0})).await,
        Ok(json!(null))
    );
    let bobs = probe(&host, "bob", json!({"op":"lock_hold","name":"job","ttl_ms":1000,"wait_ms":0})).await;
    assert!(bobs.as_ref().is_ok_and(Value::is_u64), "bob takes his own lock `job`: {bobs:?}");
    let alices = holding.await.unwrap();
    assert!(alices.as_ref().is_ok_and(Value::is_u64), "{alices:?}");
    // Rate limits too.
    probe(&host, "alice", json!({"op":"rate_check","key":"api","limit":1,"window_ms":3_600_000})).await.unwrap();
    let bob =
        probe(&host, "bob", json!({"op":"rate_check","key":"api","limit":1,"window_ms":3_600_000})).await.unwrap();
    assert_eq!(bob["allowed"], true);
}

async fn a_call_whose_caller_goes_away_releases_its_locks(b: Arc<dyn Backend>, p: String) {
    let host = host(b, &p, &[("alice", "kvprobe")]);
    let lock_key = format!("{p}alice:lock:{{job}}");
    // The call takes lock `job` (TTL 60 s) and sleeps holding it; its
    // caller gives up once the lock is taken, dropping the call mid-way.
    let hold = json!({"op":"lock_hold","name":"job","ttl_ms":60000,"wait_ms":0,"sleep_ms":30000});
    let b = host.backend();
    b.exists(&lock_key).await.unwrap(); // connected before the call starts
    let mut call = Box::pin(probe(&host, "alice", hold));
    // Watched while the call runs (an unpolled call could hold up the
    // watching, e.g. while it connects).
    let held = async || b.exists(&lock_key).await.unwrap();
    let taken = eventually("alice never took the lock", Duration::from_secs(60), held);
    tokio::select! {
        answer = &mut call => panic!("the call ended before its caller went away: {answer:?}"),
        () = taken => {}
    }
    drop(call);
    // Released in the background, long before its TTL.
    let released = async || !b.exists(&lock_key).await.unwrap();
    eventually("the dropped call's lock is still held", Duration::from_secs(20), released).await;
    let again = probe(&host, "alice", json!({"op":"lock_hold","name":"job","ttl_ms":1000,"wait_ms":0})).await;
    assert!(again.as_ref().is_ok_and(Value::is_u64), "the lock is free again: {again:?}");
    // The metrics count it as cancelled, and nothing is left in flight.
    let metrics = host.metrics().render();
    let line = |name: &str, labels: &[&str]| {
        metrics.lines().find(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label))).map(str::to_owned)
    };
    let cancelled = line("rolehost_calls_total", &[r#"role="alice""#, r#"outcome="cancelled""#]);
    assert_eq!(cancelled.as_deref().and_then(|l| l.rsplit(' ').next()), Some("1"), "{metrics}");
    let in_flight = line("rolehost_calls_in_flight", &[r#"role="alice""#]);
    assert_eq!(in_flight.as_deref().and_then(|l| l.rsplit(' ').next()), Some("0"), "{metrics}");
}

async fn example_profile_counts_logins(b: Arc<dyn Backend>, p: String) {
    let host = host(b, &p, &[("profile", "profile")]);
    for expected in 1..=3 {
        assert_eq!(host.call("profile", br#"{"user":"u1"}"#).await.unwrap(), expected.to_string().into_bytes());
    }
    assert_eq!(host.call("profile", br#"{"user":"u2"}"#).await.unwrap(), b"1");
    let peek = rolehost_tests::host(host.backend().clone(), &p, &[("profile", "kvprobe")]);
    let snapshot = probe(&peek, "profile", json!({"op":"subject_load","subject":"user-u1"})).await.unwrap();
    assert_eq!(snapshot["default"]["login_count"], 3);
    assert!(snapshot["extended"]["last_login"].as_u64().unwrap() > 1_700_000_000, "{snapshot}");
}

async fn example_rate_limiter_denies_past_the_limit(b: Arc<dyn Backend>, p: String) {
    let host = host(b, &p, &[("rate-limiter", "rate-limiter")]);
    let request = json!({"client":"c1","limit":3,"window_ms":60000});
    let mut answers = Vec::new();
    for _ in 0..5 {
        let answer = call_json(&host, "rate-limiter", request.clone()).await;
        answers.push((answer["result"].as_str().unwrap().to_owned(), answer["remaining"].as_u64().unwrap()));
    }
    let expected: Vec<(String, u64)> = [("allowed", 2), ("allowed", 1), ("allowed", 0), ("denied", 0), ("denied", 0)]
        .map(|(r, n)| (r.to_owned(), n))
        .to_vec();
    assert_eq!(answers, expected);
    let other = call_json(&host, "rate-limiter", json!({"client":"c2","limit":3,"window_ms":60000})).await;
    assert_eq!(other["result"], "allowed", "clients are limited separately");
}
