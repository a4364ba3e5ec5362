//! One conformance suite, run against every backend: each operation, TTL
//! expiry observed, and atomics under concurrent callers.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rolehost::backend::{Backend, Expiry, RateDecision, ScanPage, FENCE_TTL, READ_FIELD_COST};
use rolehost::StateError;
use rolehost_tests::{on_all_backends, scan_pages};

on_all_backends!(
    get_set_exists_delete,
    binary_values_round_trip,
    ttl_expires_keys,
    batch_operations,
    expire_and_persist,
    scan_pages_through_every_match_once,
    scan_finds_every_key_while_listed_ones_are_deleted,
    scan_respects_patterns,
    scan_refuses_cursors_it_did_not_give,
    delete_matching_clears_only_matches,
    increment_semantics,
    set_if_absent_and_get_and_delete,
    compare_and_swap_branches,
    concurrent_increments_are_exact,
    concurrent_calls_keep_their_own_results,
    concurrent_set_if_absent_has_one_winner,
    concurrent_compare_and_swap_loses_no_update,
    hash_reads_and_atomic_writes,
    hash_increments,
    hash_compare_and_set_branches,
    locks_fence_and_expire,
    concurrent_lock_acquire_has_one_winner,
    rate_limit_admits_the_limit_then_refills,
    fallback_ttl_applies_only_to_keys_without_one,
    concurrent_rate_checks_admit_exactly_the_limit,
);

async fn get_set_exists_delete(b: Arc<dyn Backend>, p: String) {
    let k = format!("{p}k");
    assert_eq!(b.get(&k, None).await.unwrap(), None);
    assert!(!b.exists(&k).await.unwrap());
    b.set(&k, b"v1", None).await.unwrap();
    assert_eq!(b.get(&k, None).await.unwrap().as_deref(), Some(&b"v1"[..]));
    assert!(b.exists(&k).await.unwrap());
    b.set(&k, b"v2", None).await.unwrap();
    assert_eq!(b.get(&k, None).await.unwrap().as_deref(), Some(&b"v2"[..]));
    assert_eq!(b.delete_many(std::slice::from_ref(&k)).await.unwrap(), 1);
    assert_eq!(b.delete_many(std::slice::from_ref(&k)).await.unwrap(), 0);
    assert_eq!(b.get(&k, None).await.unwrap(), None);
}

async fn binary_values_round_trip(b: Arc<dyn Backend>, p: String) {
    let value: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let k = format!("{p}embedding");
    b.set(&k, &value, None).await.unwrap();
    assert_eq!(b.get(&k, None).await.unwrap(), Some(value.clone()));
    b.set(&k, b"", None).await.unwrap();
    assert_eq!(b.get(&k, None).await.unwrap(), Some(Vec::new()), "empty value is not absence");
}

async fn ttl_expires_keys(b: Arc<dyn Backend>, p: String) {
    let (short, long) = (format!("{p}short"), format!("{p}long"));
    // TTLs of a second and more: a loaded machine may stall for a while.
    b.set(&short, b"x", Some(Duration::from_millis(1000))).await.unwrap();
    b.set(&long, b"y", Some(Duration::from_secs(60))).await.unwrap();
    match b.expiry(&short).await.unwrap() {
        Expiry::ExpiresIn(left) => assert!(left <= Duration::from_millis(1000)),
        other => panic!("expected a TTL, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(b.get(&short, None).await.unwrap(), None);
    assert!(!b.exists(&short).await.unwrap());
    assert_eq!(b.expiry(&short).await.unwrap(), Expiry::Missing);
    assert_eq!(b.get(&long, None).await.unwrap().as_deref(), Some(&b"y"[..]));
    // An expired key is not listed either.
    let page = b.scan(&format!("{p}*"), None, 100).await.unwrap();
    assert_eq!(page.keys, vec![long.clone()]);
    // Overwriting without a TTL makes the key persistent.
    b.set(&long, b"z", None).await.unwrap();
    assert_eq!(b.expiry(&long).await.unwrap(), Expiry::Persistent);
}

async fn batch_operations(b: Arc<dyn Backend>, p: String) {
    let keys: Vec<String> = (0..5).map(|i| format!("{p}k{i}")).collect();
    let entries: Vec<(String, Vec<u8>)> = keys.iter().map(|k| (k.clone(), k.as_bytes().to_vec())).collect();
    b.set_many(&entries[..3], None).await.unwrap();
    b.set_many(&entries[3..], Some(Duration::from_millis(1000))).await.unwrap();
    let values = b.get_many(&keys, None).await.unwrap();
    assert_eq!(values.len(), 5);
    for (key, value) in keys.iter().zip(&values) {
        assert_eq!(value.as_deref(), Some(key.as_bytes()));
    }
    // With a limit, get-many gives the same answers while the values fit
    // (a key of another type is nil, as in MGET) and refuses them one byte
    // less; so does get for one value.
    let hash = format!("{p}hash");
    b.hash_apply(&hash, &[("f".to_owned(), b"v".to_vec())], &[], None).await.unwrap();
    let mut asked = keys.clone();
    asked.insert(1, hash);
    let mut expected = values.clone();
    expected.insert(1, None);
    let size = keys.iter().map(String::len).sum::<usize>();
    assert_eq!(b.get_many(&asked, Some(size)).await.unwrap(), expected);
    assert!(matches!(b.get_many(&asked, Some(size - 1)).await, Err(StateError::TooLarge(_))));
    assert_eq!(b.get_many(&[], Some(0)).await.unwrap(), Vec::<Option<Vec<u8>>>::new());
    let one = &keys[0];
    assert_eq!(b.get(one, Some(one.len())).await.unwrap().as_deref(), Some(one.as_bytes()));
    assert!(matches!(b.get(one, Some(one.len() - 1)).await, Err(StateError::TooLarge(_))));
    assert_eq!(b.get(&format!("{p}absent"), Some(0)).await.unwrap(), None);
    assert!(matches!(b.expiry(&keys[4]).await.unwrap(), Expiry::ExpiresIn(_)));
    assert_eq!(b.expiry(&keys[0]).await.unwrap(), Expiry::Persistent);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let values = b.get_many(&keys, None).await.unwrap();
    assert_eq!(values.iter().filter(|v| v.is_some()).count(), 3);
    let missing = format!("{p}missing");
    assert_eq!(b.delete_many(&[keys[0].clone(), keys[1].clone(), missing]).await.unwrap(), 2);
    assert_eq!(b.get_many(&[], None).await.unwrap(), Vec::<Option<Vec<u8>>>::new());
    b.set_many(&[], None).await.unwrap();
    assert_eq!(b.delete_many(&[]).await.unwrap(), 0);
}

async fn expire_and_persist(b: Arc<dyn Backend>, p: String) {
    let k = format!("{p}k");
    assert!(!b.expire(&k, Some(Duration::from_secs(5))).await.unwrap());
    assert!(!b.expire(&k, None).await.unwrap());
    b.set(&k, b"v", None).await.unwrap();
    assert!(b.expire(&k, None).await.unwrap(), "persist of an existing key without TTL");
    assert!(b.expire(&k, Some(Duration::from_secs(5))).await.unwrap());
    match b.expiry(&k).await.unwrap() {
        Expiry::ExpiresIn(left) => {
            assert!(left > Duration::from_secs(3) && left <= Duration::from_secs(5))
        }
        other => panic!("expected a TTL, got {other:?}"),
    }
    assert!(b.expire(&k, None).await.unwrap());
    assert_eq!(b.expiry(&k).await.unwrap(), Expiry::Persistent);
    assert!(b.expire(&k, Some(Duration::from_millis(100))).await.unwrap());
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(b.get(&k, None).await.unwrap(), None);
}

/// Pages of every size, including ones smaller than a Redis SCAN batch, so
/// the cursor must resume inside a batch.
async fn scan_pages_through_every_match_once(b: Arc<dyn Backend>, p: String) {
    let expected: BTreeSet<String> = (0..600).map(|i| format!("{p}item:{i:04}")).collect();
    let entries: Vec<(String, Vec<u8>)> = expected.iter().map(|k| (k.clone(), b"1".to_vec())).collect();
    b.set_many(&entries, None).await.unwrap();
    b.set(&format!("{p}other"), b"1", None).await.unwrap();
    for limit in [1, 7, 100, 1000] {
        let mut seen = Vec::new();
        scan_pages(&*b, &format!("{p}item:*"), limit, async |page: ScanPage| {
            assert!(page.keys.len() <= limit, "page of {} over limit {limit}", page.keys.len());
            if let Some(c) = &page.cursor {
                assert!(!c.contains(&p), "cursor {c:?} shows the prefix");
            }
            seen.extend(page.keys);
        })
        .await;
        let unique: BTreeSet<String> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "limit {limit}: a key came twice");
        assert_eq!(unique, expected, "limit {limit}");
    }
}

async fn scan_finds_every_key_while_listed_ones_are_deleted(b: Arc<dyn Backend>, p: String) {
    let expected: BTreeSet<String> = (0..600).map(|i| format!("{p}item:{i:04}")).collect();
    let entries: Vec<(String, Vec<u8>)> = expected.iter().map(|k| (k.clone(), b"1".to_vec())).collect();
    b.set_many(&entries, None).await.unwrap();
    // Each page's keys are deleted before the next page is asked for, as a
    // clean-up job does: the keys not yet listed must all still come.
    let mut seen = BTreeSet::new();
    scan_pages(&*b, &format!("{p}item:*"), 50, async |page: ScanPage| {
        b.delete_many(&page.keys).await.unwrap();
        seen.extend(page.keys);
    })
    .await;
    assert_eq!(expected.difference(&seen).count(), 0, "keys never listed");
}

/// Float increments store the same text on every backend (the memory
/// store formats in Rust, Redis in Lua), for a spread of magnitudes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn float_increments_store_the_same_text_on_memory_and_redis() {
    let Some(redis) = rolehost_tests::backend("redis") else { return };
    let memory = rolehost_tests::backend("memory").unwrap();
    let p = rolehost_tests::unique("floats");
    // A fixed pseudo-random walk: deltas from 1e-30 to 1e30, both signs.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut deltas = vec![0.1, 0.2, 1e-20, -0.30000000000000004, 1e20, 2.0 / 3.0];
    for _ in 0..300 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mantissa = (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
        let exponent = ((seed >> 3) % 61) as i32 - 30;
        deltas.push(mantissa * 10f64.powi(exponent));
    }
    for (i, delta) in deltas.iter().enumerate() {
        // A few running sums, and fresh fields.
        let field = if i % 3 == 0 { format!("f{i}") } else { format!("sum{}", i % 4) };
        let key = format!("{p}subject");
        let on_memory = memory.hash_increment_float(&key, &field, *delta, None).await.unwrap();
        let on_redis = redis.hash_increment_float(&key, &field, *delta, None).await.unwrap();
        assert_eq!(on_memory.to_bits(), on_redis.to_bits(), "delta {delta:e}");
        let stored_memory = memory.hash_get(&key, &field, None).await.unwrap();
        let stored_redis = redis.hash_get(&key, &field, None).await.unwrap();
        assert_eq!(stored_memory, stored_redis, "delta {delta:e}");
    }
}

async fn scan_refuses_cursors_it_did_not_give(b: Arc<dyn Backend>, p: String) {
    for k in ["0", "a", "b", "c"] {
        b.set(&format!("{p}{k}"), b"1", None).await.unwrap();
    }
    // A start cursor of another store ("0"), none at all, or junk: refused
    // alike on every backend, rather than listing from somewhere.
    for cursor in ["0", "", "junk", "m", "0:0"] {
        match b.scan(&format!("{p}*"), Some(cursor), 10).await {
            Err(StateError::InvalidArgument(message)) => assert!(message.contains("cursor"), "{message}"),
            other => panic!("cursor {cursor:?}: {other:?}"),
        }
    }
    // One it gave goes on where it stopped.
    let first = b.scan(&format!("{p}*"), None, 2).await.unwrap();
    let mut keys = first.keys;
    let mut cursor = first.cursor;
    while let Some(at) = cursor {
        let page = b.scan(&format!("{p}*"), Some(&at), 2).await.unwrap();
        keys.extend(page.keys);
        cursor = page.cursor;
    }
    keys.sort();
    assert_eq!(keys, ["0", "a", "b", "c"].map(|k| format!("{p}{k}")));
}

async fn scan_respects_patterns(b: Arc<dyn Backend>, p: String) {
    for k in ["a1", "a2", "b1", "ab", "*", "x:y", "A1"] {
        b.set(&format!("{p}{k}"), b"1", None).await.unwrap();
    }
    let list = |pattern: &'static str| {
        let (b, p) = (b.clone(), p.clone());
        async move {
            let page = b.scan(&format!("{p}{pattern}"), None, 100).await.unwrap();
            let mut keys: Vec<String> = page.keys.iter().map(|k| k[p.len()..].to_owned()).collect();
            keys.sort();
            keys
        }
    };
    assert_eq!(list("a*").await, ["a1", "a2", "ab"]);
    assert_eq!(list("?1").await, ["A1", "a1", "b1"]);
    assert_eq!(list("[a-b]1").await, ["a1", "b1"]);
    assert_eq!(list("[^a]1").await, ["A1", "b1"]);
    assert_eq!(list("\\*").await, ["*"]);
    assert_eq!(list("*:*").await, ["x:y"]);
    assert!(list("zzz*").await.is_empty());
}

async fn delete_matching_clears_only_matches(b: Arc<dyn Backend>, p: String) {
    let entries: Vec<(String, Vec<u8>)> = (0..700).map(|i| (format!("{p}gone:{i}"), b"1".to_vec())).collect();
    b.set_many(&entries, None).await.unwrap();
    b.set(&format!("{p}kept"), b"1", None).await.unwrap();
    assert_eq!(b.delete_matching(&format!("{p}gone:*")).await.unwrap(), 700);
    let left = b.scan(&format!("{p}*"), None, 1000).await.unwrap();
    assert_eq!(left.keys, vec![format!("{p}kept")]);
}

async fn increment_semantics(b: Arc<dyn Backend>, p: String) {
    let k = format!("{p}n");
    assert_eq!(b.increment(&k, 5, None).await.unwrap(), 5);
    assert_eq!(b.increment(&k, -7, None).await.unwrap(), -2);
    assert_eq!(b.get(&k, None).await.unwrap().as_deref(), Some(&b"-2"[..]));
    // The TTL survives an increment.
    b.expire(&k, Some(Duration::from_secs(30))).await.unwrap();
    b.increment(&k, 1, None).await.unwrap();
    assert!(matches!(b.expiry(&k).await.unwrap(), Expiry::ExpiresIn(_)));
    let text = format!("{p}text");
    b.set(&text, b"ten", None).await.unwrap();
    assert!(matches!(b.increment(&text, 1, None).await, Err(StateError::InvalidArgument(_))));
    let max = format!("{p}max");
    b.set(&max, i64::MAX.to_string().as_bytes(), None).await.unwrap();
    assert!(matches!(b.increment(&max, 1, None).await, Err(StateError::InvalidArgument(_))));
    assert_eq!(
        b.get(&max, None).await.unwrap(),
        Some(i64::MAX.to_string().into_bytes()),
        "failed increment changed nothing"
    );
}

async fn set_if_absent_and_get_and_delete(b: Arc<dyn Backend>, p: String) {
    let k = format!("{p}k");
    assert!(b.set_if_absent(&k, b"first", Some(Duration::from_millis(1000))).await.unwrap());
    assert!(!b.set_if_absent(&k, b"second", None).await.unwrap());
    assert_eq!(b.get(&k, None).await.unwrap().as_deref(), Some(&b"first"[..]));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(b.set_if_absent(&k, b"third", None).await.unwrap(), "expired key counts as absent");
    // Within a byte limit: a value one byte over it is refused and kept.
    assert!(matches!(b.get_and_delete(&k, Some(4)).await, Err(StateError::TooLarge(_))));
    assert_eq!(b.get_and_delete(&k, Some(5)).await.unwrap().as_deref(), Some(&b"third"[..]));
    assert_eq!(b.get_and_delete(&k, Some(5)).await.unwrap(), None);
    assert!(b.set_if_absent(&k, b"third", None).await.unwrap());
    assert_eq!(b.get_and_delete(&k, None).await.unwrap().as_deref(), Some(&b"third"[..]));
    assert_eq!(b.get_and_delete(&k, None).await.unwrap(), None);
    assert!(!b.exists(&k).await.unwrap());
}

async fn compare_and_swap_branches(b: Arc<dyn Backend>, p: String) {
    let k = format!("{p}k");
    // absent → value
    assert!(!b.compare_and_swap(&k, Some(b"x"), Some(b"y"), None).await.unwrap());
    assert!(b.compare_and_swap(&k, None, Some(b"v1"), None).await.unwrap());
    assert!(!b.compare_and_swap(&k, None, Some(b"v2"), None).await.unwrap());
    // value → value, with TTL
    assert!(!b.compare_and_swap(&k, Some(b"wrong"), Some(b"v2"), None).await.unwrap());
    assert!(b.compare_and_swap(&k, Some(b"v1"), Some(b"v2"), Some(Duration::from_secs(30))).await.unwrap());
    assert_eq!(b.get(&k, None).await.unwrap().as_deref(), Some(&b"v2"[..]));
    assert!(matches!(b.expiry(&k).await.unwrap(), Expiry::ExpiresIn(_)));
    // value → delete
    assert!(b.compare_and_swap(&k, Some(b"v2"), None, None).await.unwrap());
    assert!(!b.exists(&k).await.unwrap());
    // binary and empty values compare exactly
    assert!(b.compare_and_swap(&k, None, Some(b""), None).await.unwrap());
    assert!(!b.compare_and_swap(&k, None, Some(b"x"), None).await.unwrap(), "empty value is present");
    assert!(b.compare_and_swap(&k, Some(b""), Some(&[0, 255]), None).await.unwrap());
    assert!(b.compare_and_swap(&k, Some(&[0, 255]), None, None).await.unwrap());
}

const TASKS: usize = 8;

async fn concurrent_increments_are_exact(b: Arc<dyn Backend>, p: String) {
    let k = format!("{p}counter");
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (b, k) = (b.clone(), k.clone());
            tokio::spawn(async move {
                for _ in 0..100 {
                    b.increment(&k, 1, None).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(b.get(&k, None).await.unwrap(), Some(b"800".to_vec()));
}

/// Many callers at once, some of whose operations fail: each gets its own
/// answer (on Redis they share pipelines, where one command's error must
/// not become another's).
async fn concurrent_calls_keep_their_own_results(b: Arc<dyn Backend>, p: String) {
    b.set(&format!("{p}text"), b"not a number", None).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u32 {
        let (b, p) = (b.clone(), p.clone());
        tasks.spawn(async move {
            let key = format!("{p}k{i}");
            match i % 3 {
                0 => {
                    b.set(&key, i.to_string().as_bytes(), None).await.unwrap();
                    assert_eq!(b.get(&key, None).await.unwrap(), Some(i.to_string().into_bytes()), "key {key}");
                }
                1 => assert_eq!(b.increment(&key, i as i64, None).await.unwrap(), i as i64),
                _ => {
                    let error = b.increment(&format!("{p}text"), 1, None).await.unwrap_err();
                    assert!(matches!(error, StateError::InvalidArgument(_)), "{error:?}");
                }
            }
        });
    }
    while let Some(task) = tasks.join_next().await {
        task.unwrap();
    }
    assert_eq!(b.get(&format!("{p}text"), None).await.unwrap(), Some(b"not a number".to_vec()));
}

async fn concurrent_set_if_absent_has_one_winner(b: Arc<dyn Backend>, p: String) {
    for round in 0..20 {
        let k = format!("{p}lock{round}");
        let tasks: Vec<_> = (0..TASKS)
            .map(|i| {
                let (b, k) = (b.clone(), k.clone());
                tokio::spawn(async move { b.set_if_absent(&k, i.to_string().as_bytes(), None).await.unwrap() })
            })
            .collect();
        let mut winners = 0;
        for task in tasks {
            winners += task.await.unwrap() as usize;
        }
        assert_eq!(winners, 1, "round {round}");
    }
}

async fn concurrent_compare_and_swap_loses_no_update(b: Arc<dyn Backend>, p: String) {
    let k = format!("{p}cas");
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (b, k) = (b.clone(), k.clone());
            tokio::spawn(async move {
                for _ in 0..25 {
                    loop {
                        let old = b.get(&k, None).await.unwrap();
                        let n: u64 = old.as_deref().map_or(0, |v| std::str::from_utf8(v).unwrap().parse().unwrap());
                        let new = (n + 1).to_string();
                        if b.compare_and_swap(&k, old.as_deref(), Some(new.as_bytes()), None).await.unwrap() {
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(b.get(&k, None).await.unwrap(), Some((TASKS * 25).to_string().into_bytes()));
}

fn fields(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    pairs.iter().map(|(f, v)| (f.to_string(), v.as_bytes().to_vec())).collect()
}

async fn hash_reads_and_atomic_writes(b: Arc<dyn Backend>, p: String) {
    let k = format!("{p}subject");
    assert_eq!(b.hash_get(&k, "pname", None).await.unwrap(), None);
    assert!(b.hash_get_all(&k, usize::MAX).await.unwrap().is_empty());
    b.hash_apply(&k, &fields(&[("pname", "\"ada\""), ("page", "36"), ("elogin", "1")]), &[], None).await.unwrap();
    assert_eq!(b.hash_get(&k, "page", None).await.unwrap().as_deref(), Some(&b"36"[..]));
    assert_eq!(b.hash_get(&k, "page", Some(2)).await.unwrap().as_deref(), Some(&b"36"[..]));
    assert!(matches!(b.hash_get(&k, "page", Some(1)).await, Err(StateError::TooLarge(_))));
    assert_eq!(b.hash_get(&k, "pmissing", Some(0)).await.unwrap(), None);
    b.hash_apply(&k, &fields(&[("page", "37")]), &["elogin".to_owned(), "pmissing".to_owned()], None).await.unwrap();
    let mut all = b.hash_get_all(&k, usize::MAX).await.unwrap();
    all.sort();
    assert_eq!(all, fields(&[("page", "37"), ("pname", "\"ada\"")]));
    // 16 bytes of fields and values and two fields' cost: a caller taking
    // fewer is refused them.
    let whole = 16 + 2 * READ_FIELD_COST;
    assert_eq!(b.hash_get_all(&k, whole).await.unwrap().len(), 2);
    assert!(matches!(b.hash_get_all(&k, whole - 1).await, Err(StateError::TooLarge(_))));
    // Many tiny fields are refused on their number alone.
    let tiny: Vec<(String, Vec<u8>)> = (0..1000).map(|i| (i.to_string(), Vec::new())).collect();
    let many = format!("{p}many");
    b.hash_apply(&many, &tiny, &[], None).await.unwrap();
    let error = b.hash_get_all(&many, 999 * READ_FIELD_COST).await.unwrap_err();
    assert!(matches!(&error, StateError::TooLarge(m) if m.contains("bytes of fields and values")), "{error}");
    // The TTL survives writes; removing the last field deletes the hash.
    assert!(b.expire(&k, Some(Duration::from_secs(30))).await.unwrap());
    b.hash_apply(&k, &fields(&[("page", "38")]), &[], None).await.unwrap();
    assert!(matches!(b.expiry(&k).await.unwrap(), Expiry::ExpiresIn(_)));
    b.hash_apply(&k, &[], &["page".to_owned(), "pname".to_owned()], None).await.unwrap();
    assert!(!b.exists(&k).await.unwrap());
    b.hash_apply(&k, &[], &[], None).await.unwrap();
    assert!(!b.exists(&k).await.unwrap());
}

async fn hash_increments(b: Arc<dyn Backend>, p: String) {
    let k = format!("{p}subject");
    assert_eq!(b.hash_increment(&k, "pn", 3, None).await.unwrap(), 3);
    assert_eq!(b.hash_increment(&k, "pn", -5, None).await.unwrap(), -2);
    assert_eq!(b.hash_increment_float(&k, "pf", 1.5, None).await.unwrap(), 1.5);
    assert_eq!(b.hash_increment_float(&k, "pf", 2.25, None).await.unwrap(), 3.75);
    assert_eq!(b.hash_get(&k, "pf", None).await.unwrap().as_deref(), Some(&b"3.75"[..]));
    assert_eq!(b.hash_increment_float(&k, "pn", 0.5, None).await.unwrap(), -1.5);
    assert_eq!(b.hash_increment_float(&k, "pw", 2.0, None).await.unwrap(), 2.0);
    assert_eq!(
        b.hash_get(&k, "pw", None).await.unwrap().as_deref(),
        Some(&b"2"[..]),
        "whole floats stored as integers"
    );
    b.hash_apply(&k, &fields(&[("ptext", "\"x\"")]), &[], None).await.unwrap();
    assert!(matches!(b.hash_increment(&k, "ptext", 1, None).await, Err(StateError::InvalidArgument(_))));
    assert!(matches!(b.hash_increment(&k, "pf", 1, None).await, Err(StateError::InvalidArgument(_))));
    assert!(matches!(b.hash_increment_float(&k, "ptext", 1.0, None).await, Err(StateError::InvalidArgument(_))));
    // A number followed by a NUL is no number (Lua's tonumber stops at it).
    b.hash_apply(&k, &[("pnul".to_owned(), b"1.5\0".to_vec())], &[], None).await.unwrap();
    assert!(matches!(b.hash_increment_float(&k, "pnul", 1.0, None).await, Err(StateError::InvalidArgument(_))));
    // A failed increment on a new hash leaves nothing behind.
    let fresh = format!("{p}fresh");
    b.set(&format!("{p}other"), b"1", None).await.unwrap();
    assert_eq!(b.hash_increment(&fresh, "pn", 1, None).await.unwrap(), 1);
    // Any field name, the empty one too, with a fallback TTL or without.
    let empty = format!("{p}empty-field");
    assert_eq!(b.hash_increment(&empty, "", 1, Some(Duration::from_secs(60))).await, Ok(1));
    assert_eq!(b.hash_increment(&empty, "", 1, None).await, Ok(2));
    assert_eq!(b.hash_get_all(&empty, 1024).await, Ok(vec![(String::new(), b"2".to_vec())]));
    assert!(matches!(b.expiry(&empty).await, Ok(Expiry::ExpiresIn(_))), "the fallback TTL");
}

async fn hash_compare_and_set_branches(b: Arc<dyn Backend>, p: String) {
    let k = format!("{p}subject");
    assert!(!b.hash_compare_and_set(&k, "pa", Some(b"1"), Some(b"2"), None).await.unwrap());
    assert!(b.hash_compare_and_set(&k, "pa", None, Some(b"1"), None).await.unwrap());
    assert!(!b.hash_compare_and_set(&k, "pa", None, Some(b"9"), None).await.unwrap());
    assert!(b.hash_compare_and_set(&k, "pa", Some(b"1"), Some(b"2"), None).await.unwrap());
    assert_eq!(b.hash_get(&k, "pa", None).await.unwrap().as_deref(), Some(&b"2"[..]));
    assert!(b.hash_compare_and_set(&k, "pa", Some(b"2"), None, None).await.unwrap());
    assert!(!b.exists(&k).await.unwrap(), "the last field removed deletes the hash");
}

async fn locks_fence_and_expire(b: Arc<dyn Backend>, p: String) {
    // As the namespace builds them: one hash tag, so one Cluster slot.
    let (lock, fence) = (format!("{p}lock:{{job}}"), format!("{p}fence:{{job}}"));
    let ttl = Duration::from_millis(1000);
    let micros = || SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64;
    let before = micros();
    let first = b.lock_acquire(&lock, &fence, "a", ttl).await.unwrap().expect("a free lock is taken");
    // Tokens follow the clock (the server's, for Redis: the same machine).
    assert!((before..=micros()).contains(&first), "{before} <= {first}");
    assert_eq!(b.lock_acquire(&lock, &fence, "b", ttl).await.unwrap(), None);
    assert!(!b.expire_if_equal(&lock, b"b", Duration::from_secs(5)).await.unwrap());
    assert!(b.expire_if_equal(&lock, b"a", Duration::from_millis(1000)).await.unwrap());
    assert!(!b.compare_and_swap(&lock, Some(b"b"), None, None).await.unwrap(), "non-owner release");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let second = b.lock_acquire(&lock, &fence, "b", Duration::from_secs(5)).await.unwrap().unwrap();
    assert!(second > first, "{first} then {second}");
    assert!(!b.compare_and_swap(&lock, Some(b"a"), None, None).await.unwrap(), "stale owner release");
    assert!(!b.expire_if_equal(&lock, b"a", Duration::from_secs(5)).await.unwrap(), "stale owner extend");
    assert!(b.compare_and_swap(&lock, Some(b"b"), None, None).await.unwrap());
    // A counter ahead of the clock (many grants in a microsecond, or a
    // clock that stepped back) goes on counting.
    let ahead = micros() + 3_600_000_000;
    b.set(&fence, ahead.to_string().as_bytes(), None).await.unwrap();
    assert_eq!(b.lock_acquire(&lock, &fence, "c", ttl).await.unwrap(), Some(ahead + 1));
    assert!(b.compare_and_swap(&lock, Some(b"c"), None, None).await.unwrap());
    // The counter outlives its last grant by a day, not for ever; once
    // gone (deleted here as its expiry would), tokens still grow.
    match b.expiry(&fence).await.unwrap() {
        Expiry::ExpiresIn(left) => assert!(left <= FENCE_TTL && left > FENCE_TTL / 2, "{left:?}"),
        other => panic!("the fence counter lives for ever: {other:?}"),
    }
    b.delete_many(std::slice::from_ref(&fence)).await.unwrap();
    let third = b.lock_acquire(&lock, &fence, "d", ttl).await.unwrap().unwrap();
    assert!(third > second, "{second} then {third}");
}

async fn concurrent_lock_acquire_has_one_winner(b: Arc<dyn Backend>, p: String) {
    // As the namespace builds them: one hash tag, so one Cluster slot.
    let (lock, fence) = (format!("{p}lock:{{job}}"), format!("{p}fence:{{job}}"));
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let (b, lock, fence) = (b.clone(), lock.clone(), fence.clone());
            tokio::spawn(
                async move { b.lock_acquire(&lock, &fence, &i.to_string(), Duration::from_secs(5)).await.unwrap() },
            )
        })
        .collect();
    let mut tokens = Vec::new();
    for task in tasks {
        tokens.extend(task.await.unwrap());
    }
    assert_eq!(tokens.len(), 1, "one winner: {tokens:?}");
}

async fn rate_limit_admits_the_limit_then_refills(b: Arc<dyn Backend>, p: String) {
    let k = format!("{p}rate");
    let hour = Duration::from_secs(3600);
    let check = |cost| {
        let (b, k) = (b.clone(), k.clone());
        async move { b.rate_check(&k, 3, hour, cost).await.unwrap() }
    };
    let remaining: Vec<u64> = [check(1).await, check(1).await, check(1).await].iter().map(|d| d.remaining).collect();
    assert_eq!(remaining, [2, 1, 0]);
    let denied: RateDecision = check(1).await;
    assert!(!denied.allowed);
    assert_eq!(denied.remaining, 0);
    assert!(denied.retry_after > Duration::ZERO && denied.retry_after <= hour / 3, "{denied:?}");
    assert!(denied.reset_after <= hour && denied.reset_after > hour - Duration::from_secs(60), "{denied:?}");
    let look = check(0).await;
    assert_eq!(look.remaining, 0, "cost 0 only looks");
    // A short window refills smoothly: one unit every second.
    let k2 = format!("{p}fast");
    let window = Duration::from_secs(2);
    assert!(b.rate_check(&k2, 2, window, 2).await.unwrap().allowed);
    assert!(!b.rate_check(&k2, 2, window, 1).await.unwrap().allowed);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let refilled = b.rate_check(&k2, 2, window, 1).await.unwrap();
    assert!(refilled.allowed, "{refilled:?}");
    // The limiter's key expires once it is full again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(!b.exists(&k2).await.unwrap());
}

async fn concurrent_rate_checks_admit_exactly_the_limit(b: Arc<dyn Backend>, p: String) {
    let k = format!("{p}rate");
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (b, k) = (b.clone(), k.clone());
            tokio::spawn(async move {
                let mut allowed = 0;
                for _ in 0..25 {
                    allowed += b.rate_check(&k, 50, Duration::from_secs(3600), 1).await.unwrap().allowed as u64;
                }
                allowed
            })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        allowed += task.await.unwrap();
    }
    assert_eq!(allowed, 50, "200 checks against a limit of 50");
}

async fn fallback_ttl_applies_only_to_keys_without_one(b: Arc<dyn Backend>, p: String) {
    let ttl = Some(Duration::from_secs(60));
    let (n, h) = (format!("{p}n"), format!("{p}h"));
    b.increment(&n, 1, ttl).await.unwrap();
    assert!(matches!(b.expiry(&n).await.unwrap(), Expiry::ExpiresIn(_)));
    // An existing TTL is kept, not reset.
    b.expire(&n, Some(Duration::from_secs(5))).await.unwrap();
    b.increment(&n, 1, ttl).await.unwrap();
    match b.expiry(&n).await.unwrap() {
        Expiry::ExpiresIn(left) => assert!(left <= Duration::from_secs(5)),
        other => panic!("{other:?}"),
    }
    b.hash_apply(&h, &fields(&[("pa", "1")]), &[], ttl).await.unwrap();
    assert!(matches!(b.expiry(&h).await.unwrap(), Expiry::ExpiresIn(_)));
    for (key, write) in [("i", 0), ("f", 1), ("c", 2)] {
        let k = format!("{p}{key}");
        match write {
            0 => drop(b.hash_increment(&k, "pn", 1, ttl).await.unwrap()),
            1 => drop(b.hash_increment_float(&k, "pn", 1.5, ttl).await.unwrap()),
            _ => drop(b.hash_compare_and_set(&k, "pn", None, Some(b"1"), ttl).await.unwrap()),
        }
        assert!(matches!(b.expiry(&k).await.unwrap(), Expiry::ExpiresIn(_)), "{key}");
    }
    // A failed write sets no TTL.
    let word = format!("{p}word");
    b.set(&word, b"ten", None).await.unwrap();
    assert!(b.increment(&word, 1, ttl).await.is_err());
    assert_eq!(b.expiry(&word).await.unwrap(), Expiry::Persistent);
    // Nor does a write of nothing, to a persistent hash.
    b.hash_apply(&word, &[], &[], ttl).await.unwrap();
    let persistent = format!("{p}persistent");
    b.hash_apply(&persistent, &fields(&[("pa", "1")]), &[], None).await.unwrap();
    b.hash_apply(&persistent, &[], &[], ttl).await.unwrap();
    assert_eq!(b.expiry(&persistent).await.unwrap(), Expiry::Persistent);
    let text = format!("{p}text");
    b.hash_apply(&text, &fields(&[("pt", "\"x\"")]), &[], None).await.unwrap();
    assert!(b.hash_increment(&text, "pt", 1, ttl).await.is_err());
    assert!(b.hash_increment_float(&text, "pt", 1.0, ttl).await.is_err());
    assert_eq!(b.expiry(&text).await.unwrap(), Expiry::Persistent);
    let plain = format!("{p}plain");
    b.increment(&plain, 1, None).await.unwrap();
    assert_eq!(b.expiry(&plain).await.unwrap(), Expiry::Persistent);
}
