//! A misbehaving role fails only its own call, with a distinct error, and
//! the host keeps serving. Redis being down is `unavailable`, and the host
//! recovers by itself.

use std::time::Duration;

use rolehost::backend::{Backend, ScanPage};
use rolehost::{CallError, Grants, Host, RoleLimits};
use rolehost_tests::{backend, free_port, host, host_with_limits, host_with_specs, probe, scan_pages, RedisServer};
use serde_json::json;

fn limits() -> RoleLimits {
    RoleLimits {
        deadline_ms: 500,
        max_memory_bytes: 16 << 20,
        max_response_bytes: 1000,
        max_log_bytes: 1000,
        ..RoleLimits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panic_is_a_trap_and_the_host_keeps_serving() {
    let host =
        host_with_limits(backend("memory").unwrap(), "t:", &[("bad", "kvprobe"), ("counter", "counter")], limits());
    let err = host.call("bad", br#"{"op":"panic"}"#).await.unwrap_err();
    assert!(matches!(err, CallError::Trap { .. }), "{err}");
    assert!(err.to_string().contains("bad"), "{err}");
    assert_eq!(host.call("counter", b"").await.unwrap(), b"1");
    assert_eq!(probe(&host, "bad", json!({"op":"incr","key":"n","delta":1})).await, Ok(json!(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_endless_loop_hits_the_deadline_while_others_run() {
    let (host, spinning) = spinner_beside_counter();
    // Other calls complete while the loop runs.
    counter_counts_to_three(&host).await;
    let err = spinning.await.unwrap().unwrap_err();
    assert!(matches!(err, CallError::DeadlineExceeded { millis: 500, .. }), "{err}");
    assert_eq!(host.call("counter", b"").await.unwrap(), b"4");
}

/// On one thread, as on a `serve` worker: the spinning guest yields at every
/// epoch tick, so the thread's other calls run long before its deadline.
#[tokio::test(flavor = "current_thread")]
async fn a_spinning_guest_yields_to_the_other_calls_of_its_thread() {
    let (host, spinning) = spinner_beside_counter();
    // The spinner starts; this task runs again only once it yields.
    tokio::task::yield_now().await;
    counter_counts_to_three(&host).await;
    assert!(!spinning.is_finished(), "the other calls had to wait for the spinner's deadline");
    let err = spinning.await.unwrap().unwrap_err();
    assert!(matches!(err, CallError::DeadlineExceeded { millis: 500, .. }), "{err}");
}

/// A host with a counter and a kvprobe running an endless loop (500 ms
/// deadline), already spawned.
fn spinner_beside_counter() -> (std::sync::Arc<Host>, tokio::task::JoinHandle<Result<Vec<u8>, CallError>>) {
    // The counter's calls get the default deadline: they run beside the
    // spinning one, which may slow them on a loaded machine.
    let host = std::sync::Arc::new(host_with_specs(
        backend("memory").unwrap(),
        "t:",
        vec![
            ("spinner", "kvprobe", limits(), Grants::default()),
            ("counter", "counter", RoleLimits::default(), Grants::default()),
        ],
    ));
    let spinner = host.clone();
    (host, tokio::spawn(async move { spinner.call("spinner", br#"{"op":"spin"}"#).await }))
}

async fn counter_counts_to_three(host: &Host) {
    for expected in 1..=3 {
        assert_eq!(host.call("counter", b"").await.unwrap(), expected.to_string().into_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_growth_stops_at_the_limit() {
    let host = host_with_limits(backend("memory").unwrap(), "t:", &[("hog", "kvprobe")], limits());
    let err = host.call("hog", br#"{"op":"grow"}"#).await.unwrap_err();
    assert!(matches!(err, CallError::OutOfMemory { bytes, .. } if bytes == 16 << 20), "{err}");
    // The next call gets a fresh instance and works.
    assert_eq!(probe(&host, "hog", json!({"op":"exists","key":"k"})).await, Ok(json!(false)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_responses_and_log_floods_are_contained() {
    let limits = RoleLimits { deadline_ms: 30_000, ..limits() };
    let host = host_with_limits(backend("memory").unwrap(), "t:", &[("loud", "kvprobe")], limits);
    let err = host.call("loud", br#"{"op":"respond","len":1001}"#).await.unwrap_err();
    match err {
        CallError::Role { error, .. } => assert_eq!(error.kind(), "too-large"),
        other => panic!("expected a too-large role error, got {other}"),
    }
    assert_eq!(host.call("loud", br#"{"op":"respond","len":1000}"#).await.unwrap().len(), 1000);
    // Far past the log budget: output is dropped, the call still succeeds.
    assert_eq!(probe(&host, "loud", json!({"op":"print","message":"spam","times":20000})).await, Ok(json!(null)));
    assert_eq!(probe(&host, "loud", json!({"op":"log","message":"spam","times":20000})).await, Ok(json!(null)));
}

/// How many keys match `pattern`, page by page.
async fn count_keys(b: &dyn Backend, pattern: &str) -> usize {
    let mut count = 0;
    scan_pages(b, pattern, 1000, async |page: ScanPage| count += page.keys.len()).await;
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clearing_a_huge_role_is_stopped_by_the_deadline_and_can_go_on() {
    let b = backend("memory").unwrap();
    const KEYS: usize = 200_000;
    let entries: Vec<(String, Vec<u8>)> = (0..KEYS).map(|i| (format!("t:big:kv:k{i}"), b"v".to_vec())).collect();
    for chunk in entries.chunks(10_000) {
        b.set_many(chunk, None).await.unwrap();
    }
    b.set("t:other:kv:k1", b"v", None).await.unwrap();
    // DEADLINE is far less than deleting 200k keys takes (about 250 ms in
    // a debug build): the memory store never waits, so only its pauses
    // between pages let the deadline in.
    const DEADLINE: u64 = 50;
    let hurried =
        host_with_limits(b.clone(), "t:", &[("big", "kvprobe")], RoleLimits { deadline_ms: DEADLINE, ..limits() });
    let err = hurried.call("big", br#"{"op":"clear"}"#).await.unwrap_err();
    assert!(matches!(err, CallError::DeadlineExceeded { millis: DEADLINE, .. }), "{err}");
    let left = count_keys(&*b, "t:big:kv:*").await;
    assert!(left > 0, "the clear was stopped before the end");
    // With time enough, clearing again removes the rest and only that: in
    // calls of at most max-ops-per-call keys each (an operation per key).
    let patient =
        host_with_limits(b.clone(), "t:", &[("big", "kvprobe")], RoleLimits { deadline_ms: 60_000, ..limits() });
    let mut calls = 0;
    while let Err(kind) = probe(&patient, "big", json!({"op":"clear"})).await {
        assert_eq!(kind, "quota-exceeded");
        calls += 1;
        assert!(calls <= left.div_ceil(limits().max_ops_per_call as usize), "{calls} calls");
    }
    assert_eq!(count_keys(&*b, "t:big:kv:*").await, 0);
    assert_eq!(b.get("t:other:kv:k1", None).await.unwrap(), Some(b"v".to_vec()), "another role's key is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_roles_and_bad_requests_are_errors() {
    let host = host(backend("memory").unwrap(), "t:", &[("probe", "kvprobe")]);
    assert!(matches!(host.call("nope", b"").await, Err(CallError::UnknownRole(_))));
    let err = host.call("probe", b"not json").await.unwrap_err();
    match err {
        CallError::Role { error, .. } => assert_eq!(error.kind(), "invalid-argument"),
        other => panic!("expected a role error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_is_unavailable_and_the_host_recovers() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let backend =
        std::sync::Arc::new(rolehost::backend::RedisBackend::new(&rolehost::backend::RedisOptions::new(&url)).unwrap());
    let host = host(backend, "t:", &[("probe", "kvprobe")]);
    // Nothing listens yet.
    let op = json!({"op":"incr","key":"n","delta":1});
    assert_eq!(probe(&host, "probe", op.clone()).await, Err("unavailable".to_owned()));
    let Some(mut server) = RedisServer::start_on(port, &[]) else {
        return;
    };
    let mut recovered = false;
    for _ in 0..40 {
        if probe(&host, "probe", op.clone()).await == Ok(json!(1)) {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "calls did not succeed after Redis came up");
    server.kill();
    assert_eq!(probe(&host, "probe", op.clone()).await, Err("unavailable".to_owned()));
    let Some(_server) = RedisServer::start_on(port, &[]) else {
        return;
    };
    let mut recovered = false;
    for _ in 0..40 {
        if probe(&host, "probe", op.clone()).await.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "calls did not succeed after Redis came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_roles_come_from_the_cache_and_damage_is_survived() {
    let dir = std::env::temp_dir().join(format!("rolehost-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let options =
        || rolehost::HostOptions { cache: Some(rolehost::cache::CompileCache::new(&dir)), ..Default::default() };
    let load = || {
        let host = rolehost::Host::with_options(backend("memory").unwrap(), "t:", options()).unwrap();
        let role = host.load(&rolehost_tests::spec("probe", "kvprobe")).unwrap();
        (role.from_cache(), host)
    };
    let (cached, _) = load();
    assert!(!cached, "the first load compiles");
    let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let (cached, host) = load();
    assert!(cached, "the second load uses the cache");
    assert_eq!(probe(&host, "probe", json!({"op":"incr","key":"n","delta":2})).await, Ok(json!(2)));
    // A damaged entry is compiled again, and rewritten: garbage, and one
    // flipped bit in the middle of the compiled code.
    std::fs::write(&entries[0], b"garbage").unwrap();
    let (cached, host) = load();
    assert!(!cached);
    assert_eq!(probe(&host, "probe", json!({"op":"incr","key":"n","delta":2})).await, Ok(json!(2)));
    assert!(load().0, "the entry was rewritten");
    let mut entry = std::fs::read(&entries[0]).unwrap();
    let middle = entry.len() / 2;
    entry[middle] ^= 1;
    std::fs::write(&entries[0], entry).unwrap();
    let (cached, host) = load();
    assert!(!cached, "a flipped bit went unnoticed");
    assert_eq!(probe(&host, "probe", json!({"op":"incr","key":"n","delta":2})).await, Ok(json!(2)));
    assert!(load().0, "the entry was rewritten");
    // An entry, or a directory, others may write is not used (someone
    // could have put code there); a link to an entry is not followed.
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &std::path::Path, mode| std::fs::set_permissions(path, PermissionsExt::from_mode(mode)).unwrap();
    mode(&entries[0], 0o666);
    assert!(!load().0, "an entry others may write was used");
    mode(&entries[0], 0o644);
    assert!(load().0);
    mode(&dir, 0o777);
    assert!(!load().0, "a directory others may write was used");
    mode(&dir, 0o700);
    let moved = dir.join("elsewhere");
    std::fs::rename(&entries[0], &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &entries[0]).unwrap();
    assert!(!load().0, "a link was followed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pooling_allocator_runs_the_same_calls() {
    let options = rolehost::HostOptions { pooling: true, max_concurrency: 32, ..Default::default() };
    let host = std::sync::Arc::new(rolehost::Host::with_options(backend("memory").unwrap(), "t:", options).unwrap());
    let mut spec = rolehost_tests::spec("probe", "kvprobe");
    spec.limits = limits();
    host.load(&spec).unwrap();
    host.load(&rolehost_tests::spec("counter", "counter")).unwrap();
    let calls: Vec<_> = (0..32)
        .map(|_| {
            let host = host.clone();
            tokio::spawn(async move { host.call("counter", b"").await.unwrap() })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
    assert_eq!(host.call("counter", b"").await.unwrap(), b"33");
    let err = host.call("probe", br#"{"op":"grow"}"#).await.unwrap_err();
    assert!(matches!(err, CallError::OutOfMemory { .. }), "{err}");
    assert_eq!(probe(&host, "probe", json!({"op":"incr","key":"n","delta":1})).await, Ok(json!(1)));
    // A reused pool slot starts from the component's image: nothing one
    // call left in memory is visible to the next.
    for i in 0..20 {
        let left = probe(&host, "probe", json!({"op":"stash","value":format!("secret {i}")})).await;
        assert_eq!(left, Ok(json!("")), "call {i} saw an earlier call's memory");
    }
    let mut big = rolehost_tests::spec("big", "kvprobe");
    big.limits.max_memory_bytes = 1 << 30;
    let refused = host.load(&big).err().expect("a role over the pool's memory is refused");
    assert!(refused.to_string().contains("pooling"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_warm_instances_give_their_pool_slots_to_other_roles() {
    // A pool of 4 instances, and a role that keeps up to 4 warm.
    let options = rolehost::HostOptions { pooling: true, max_concurrency: 4, ..Default::default() };
    let host = std::sync::Arc::new(rolehost::Host::with_options(backend("memory").unwrap(), "t:", options).unwrap());
    let mut warm = rolehost_tests::spec("warm", "kvprobe");
    warm.limits.warm_instances = 4;
    host.load(&warm).unwrap();
    host.load(&rolehost_tests::spec("counter", "counter")).unwrap();
    // Four calls at once leave four warm instances, every slot of the pool.
    let hold = json!({"op":"lock_hold","name":"l","ttl_ms":1000,"wait_ms":0,"sleep_ms":200});
    let calls: Vec<_> = (0..4)
        .map(|i| {
            let (host, mut hold) = (host.clone(), hold.clone());
            hold["name"] = json!(format!("l{i}"));
            tokio::spawn(async move { probe(&host, "warm", hold).await })
        })
        .collect();
    for call in calls {
        assert!(call.await.unwrap().is_ok());
    }
    // Another role still gets an instance, and so does the warm one.
    assert_eq!(host.call("counter", b"").await.unwrap(), b"1");
    assert_eq!(probe(&host, "warm", json!({"op":"incr","key":"n","delta":1})).await, Ok(json!(1)));
}

/// A call that ends on a version already replaced keeps no instance warm:
/// none could reuse it, and it would hold one of the pool's slots for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replaced_version_keeps_no_warm_instance() {
    let options = rolehost::HostOptions { pooling: true, max_concurrency: 3, ..Default::default() };
    let host = std::sync::Arc::new(rolehost::Host::with_options(backend("memory").unwrap(), "t:", options).unwrap());
    let mut warm = rolehost_tests::spec("warm", "kvprobe");
    warm.limits.warm_instances = 3;
    host.load(&warm).unwrap();
    let hold = |name: &str, sleep_ms: u64| {
        let (host, hold) =
            (host.clone(), json!({"op":"lock_hold","name":name,"ttl_ms":5000,"wait_ms":0,"sleep_ms":sleep_ms}));
        tokio::spawn(async move { probe(&host, "warm", hold).await })
    };
    // Two calls on the first version: one ends after the reload, the
    // other runs on (so the old version is still alive).
    let (old, long) = (hold("old", 1500), hold("long", 6000));
    for name in ["old", "long"] {
        while !host.backend().exists(&format!("t:warm:lock:{{{name}}}")).await.unwrap() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    let reloading = host.clone();
    tokio::task::spawn_blocking(move || reloading.reload("warm").unwrap()).await.unwrap();
    assert!(old.await.unwrap().is_ok());
    // The two slots of the pool the long call leaves serve the new version
    // at once.
    let (a, b) = (hold("a", 500), hold("b", 500));
    assert!(a.await.unwrap().is_ok());
    assert!(b.await.unwrap().is_ok(), "a slot was still held by the old version's warm instance");
    assert!(long.await.unwrap().is_ok());
}

/// A call refused because the host as a whole is at its limit says so,
/// not that the role is (raising the role's limit would change nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_host_says_which_limit_it_reached() {
    let options = rolehost::HostOptions { max_concurrency: 1, ..Default::default() };
    let host = std::sync::Arc::new(rolehost::Host::with_options(backend("memory").unwrap(), "t:", options).unwrap());
    host.load(&rolehost_tests::spec("probe", "kvprobe")).unwrap();
    host.load(&rolehost_tests::spec("counter", "counter")).unwrap();
    let running = hold_a_call(&host).await;
    let refused = host.call("counter", b"").await;
    let message = refused.as_ref().err().map(ToString::to_string).unwrap_or_default();
    assert!(message.contains("busy: the host runs its most calls at once (1)"), "{refused:?}");
    running.abort();
}

/// Starts a call of `probe` that holds a lock for a minute (abort it to
/// end it) and returns once it runs.
async fn hold_a_call(
    host: &std::sync::Arc<rolehost::Host>,
) -> tokio::task::JoinHandle<Result<serde_json::Value, String>> {
    let running = {
        let host = host.clone();
        let hold = json!({"op":"lock_hold","name":"l","ttl_ms":60_000,"wait_ms":0,"sleep_ms":60_000});
        tokio::spawn(async move { probe(&host, "probe", hold).await })
    };
    let start = std::time::Instant::now();
    while !host.backend().exists("t:probe:lock:{l}").await.unwrap() {
        assert!(start.elapsed() < std::time::Duration::from_secs(60), "the first call never started");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    running
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reloaded_role_keeps_its_concurrency_budget() {
    // The first call holds the role's one slot for a minute (the test
    // aborts it); reloading, which compiles, must not outlast it.
    let limits = RoleLimits { max_concurrency: 1, deadline_ms: 120_000, ..limits() };
    let host = std::sync::Arc::new(host_with_limits(backend("memory").unwrap(), "t:", &[("probe", "kvprobe")], limits));
    let running = hold_a_call(&host).await;
    // The new version is bound by the same budget as the old one, whose
    // call still runs.
    host.reload("probe").unwrap();
    assert!(!running.is_finished(), "the first call ended early: {:?}", running.await);
    let second = host.call("probe", br#"{"op":"incr","key":"n","delta":1}"#).await;
    let busy = second.as_ref().err().map(ToString::to_string).unwrap_or_default();
    assert!(busy.contains("busy: it runs its max-concurrency of 1 calls"), "{second:?}");
    let metrics = host.metrics().render();
    assert!(metrics.contains(r#"rolehost_calls_total{outcome="busy",role="probe"} 1"#), "{metrics}");
    running.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lowered_concurrency_limit_counts_the_calls_still_running_on_the_old_version() {
    let limits = RoleLimits { max_concurrency: 2, deadline_ms: 120_000, ..limits() };
    let host = std::sync::Arc::new(host_with_limits(backend("memory").unwrap(), "t:", &[("probe", "kvprobe")], limits));
    let running = hold_a_call(&host).await;
    let incr = br#"{"op":"incr","key":"n","delta":1}"#;
    let mut spec = rolehost_tests::spec("probe", "kvprobe");
    spec.limits = RoleLimits { max_concurrency: 1, ..host.role("probe").unwrap().spec().limits.clone() };
    host.reload_with(&spec).unwrap();
    // One call runs on the old version: the new limit of one is used up.
    let second = host.call("probe", incr).await;
    assert!(matches!(second, Err(CallError::Busy { .. })), "{second:?}");
    // Raised again, there is room for one more.
    spec.limits.max_concurrency = 2;
    host.reload_with(&spec).unwrap();
    assert!(host.call("probe", incr).await.is_ok());
    // Once the old call ends, its slot serves a new call under the limit of one.
    spec.limits.max_concurrency = 1;
    host.reload_with(&spec).unwrap();
    running.abort();
    let _ = running.await;
    assert!(host.call("probe", incr).await.is_ok(), "the slot of the aborted call came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_role_reloaded_with_a_new_spec_takes_its_limits_and_grants_and_an_unloaded_one_is_gone() {
    let host = host_with_limits(backend("memory").unwrap(), "t:", &[("probe", "kvprobe")], limits());
    let set = |value: &str| json!({"op":"set","key":"k","value":value});
    let shared = json!({"op":"get","key":"k","ns":"catalog"});
    assert_eq!(probe(&host, "probe", set("twelve bytes")).await, Ok(json!(null)));
    assert_eq!(probe(&host, "probe", shared.clone()).await, Err("access-denied".into()));
    let mut spec = rolehost_tests::spec("probe", "kvprobe");
    spec.limits = RoleLimits { max_value_bytes: 8, max_concurrency: 1, deadline_ms: 60_000, ..limits() };
    spec.grants = Grants { namespaces: [("catalog".to_owned(), rolehost::Access::Read)].into(), ..Grants::default() };
    host.reload_with(&spec).unwrap();
    assert_eq!(host.role("probe").unwrap().spec(), &spec);
    // New limits and grants apply; the state stays.
    assert_eq!(probe(&host, "probe", set("twelve bytes")).await, Err("too-large".into()));
    assert_eq!(probe(&host, "probe", json!({"op":"get","key":"k"})).await, Ok(json!("twelve bytes")));
    assert_eq!(probe(&host, "probe", shared).await, Ok(json!(null)));
    // So does the new concurrency limit: one call at a time.
    let host = std::sync::Arc::new(host);
    let running = hold_a_call(&host).await;
    let second = host.call("probe", b"{}").await;
    assert!(matches!(second, Err(CallError::Busy { .. })), "{second:?}");
    running.abort();
    // A spec that fails its checks is refused and the last one keeps serving.
    let mut bad = spec.clone();
    bad.limits.max_value_bytes = 0;
    assert!(host.reload_with(&bad).is_err());
    assert_eq!(host.role("probe").unwrap().spec(), &spec);
    // Unloaded: calls are refused as for a role never loaded; its state stays.
    assert!(host.unload("probe").is_some());
    assert!(matches!(host.call("probe", b"{}").await, Err(CallError::UnknownRole(_))));
    assert!(host.unload("probe").is_none());
    assert!(host.reload_with(&spec).is_err(), "reloaded a role that is not loaded");
    assert_eq!(host.backend().get("t:probe:kv:k", None).await.unwrap(), Some(b"twelve bytes".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_that_lowers_the_value_limit_keeps_get_many_reads_bounded() {
    // 4 MiB of memory and values of at most 256 KiB: get-many reads 16
    // keys at a time, so 17 such values are refused after two reads, the
    // first holding 4 MiB.
    let limits = RoleLimits { max_memory_bytes: 4 << 20, max_value_bytes: 256 << 10, ..limits() };
    let host = host_with_limits(backend("memory").unwrap(), "t:", &[("probe", "kvprobe")], limits.clone());
    let keys: Vec<String> = (0..17).map(|i| format!("k{i}")).collect();
    for key in &keys {
        host.backend().set(&format!("t:probe:kv:{key}"), &vec![b'v'; 256 << 10], None).await.unwrap();
    }
    let reads = || {
        let metrics = host.metrics().render();
        let line = metrics.lines().find(|l| {
            l.starts_with("rolehost_state_ops_total") && l.contains(r#"role="probe""#) && l.contains(r#"op="get_many""#)
        });
        line.and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).unwrap_or(0)
    };
    let get_many = json!({"op":"get_many","keys":keys});
    assert_eq!(probe(&host, "probe", get_many.clone()).await, Err("too-large".into()));
    assert_eq!(reads(), 2);
    // The new limit would allow 4096 keys a read, but the values stored
    // under the old one are still there: reads stay 16 keys.
    let mut spec = rolehost_tests::spec("probe", "kvprobe");
    spec.limits = RoleLimits { max_value_bytes: 1 << 10, ..limits };
    host.reload_with(&spec).unwrap();
    assert_eq!(probe(&host, "probe", get_many.clone()).await, Err("too-large".into()));
    assert_eq!(reads(), 4, "one read of all 17 values");
    // So do they when the role is taken out and loaded again.
    host.unload("probe").unwrap();
    host.load(&spec).unwrap();
    assert_eq!(probe(&host, "probe", get_many).await, Err("too-large".into()));
    assert_eq!(reads(), 6, "one read of all 17 values after loading the role again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warm_instances_are_reused_until_a_call_fails() {
    // One outer bucket open, then an open and an increment per inner op.
    let limits = RoleLimits { warm_instances: 1, max_ops_per_call: 5, deadline_ms: 500, ..limits() };
    let host = host_with_limits(backend("memory").unwrap(), "t:", &[("probe", "kvprobe")], limits);
    let stash = |value: &str| {
        let op = json!({"op":"stash","value":value});
        let host = &host;
        async move { probe(host, "probe", op).await.unwrap() }
    };
    assert_eq!(stash("a").await, json!(""));
    // The trade a warm instance makes: the next call sees its memory.
    assert_eq!(stash("b").await, json!("a"));
    // Quotas stay per call: the same instance runs this five-op call twice.
    let incr = json!({"op":"batch","ops":[{"op":"incr","key":"n","delta":1},{"op":"incr","key":"n","delta":1}]});
    for _ in 0..2 {
        let answer = probe(&host, "probe", incr.clone()).await.unwrap();
        assert!(answer[1]["ok"].is_number(), "{answer}");
    }
    assert_eq!(stash("c").await, json!("b"), "still the same instance");
    // A trap drops the instance: the next call starts fresh.
    assert!(matches!(host.call("probe", br#"{"op":"panic"}"#).await, Err(CallError::Trap { .. })));
    assert_eq!(stash("d").await, json!(""));
    // So does a missed deadline.
    let spun = host.call("probe", br#"{"op":"spin"}"#).await;
    assert!(matches!(spun, Err(CallError::DeadlineExceeded { .. })), "{spun:?}");
    assert_eq!(stash("e").await, json!(""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_warm_instances_every_call_is_fresh() {
    let host = host(backend("memory").unwrap(), "t:", &[("probe", "kvprobe")]);
    for i in 0..5 {
        let left = probe(&host, "probe", json!({"op":"stash","value":format!("secret {i}")})).await;
        assert_eq!(left, Ok(json!("")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_metrics_count_hits_misses_errors_and_bytes() {
    let host = host(backend("memory").unwrap(), "t:", &[("m", "kvprobe")]);
    let op = |body: serde_json::Value| probe(&host, "m", body);
    op(json!({"op":"set","key":"k","value":"hello"})).await.unwrap();
    op(json!({"op":"get","key":"k"})).await.unwrap();
    op(json!({"op":"get","key":"k"})).await.unwrap();
    op(json!({"op":"get","key":"missing"})).await.unwrap();
    assert_eq!(op(json!({"op":"incr","key":"k","delta":1})).await, Err("invalid-argument".into()));
    let metrics = host.metrics().render();
    let value = |name: &str, labels: &[&str]| -> Option<f64> {
        let line = metrics.lines().find(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))?;
        line.rsplit(' ').next()?.parse().ok()
    };
    let role = r#"role="m""#;
    assert_eq!(value("rolehost_state_hits_total", &[role, r#"op="get""#]), Some(2.0));
    assert_eq!(value("rolehost_state_misses_total", &[role, r#"op="get""#]), Some(1.0));
    assert_eq!(value("rolehost_state_read_bytes_total", &[role]), Some(10.0), "two reads of 5 bytes");
    assert_eq!(value("rolehost_state_written_bytes_total", &[role]), Some(5.0));
    let error = value("rolehost_state_errors_total", &[role, r#"op="increment""#, r#"kind="invalid-argument""#]);
    assert_eq!(error, Some(1.0), "{metrics}");
}
