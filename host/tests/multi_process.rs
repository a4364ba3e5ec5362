//! Several `rolehost` processes sharing one real redis-server: atomic
//! operations, rate limits and locks stay exact across processes.

// The serializing guard is held across awaits on purpose: it spans whole
// tests, each on its own runtime, and nothing else takes it.
#![allow(clippy::await_holding_lock)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rolehost_tests::{probe, role_path, shared_cluster, shared_redis};
use serde_json::json;

/// These tests each run several busy processes; one at a time keeps the
/// machine from starving them.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A manifest with the roles these tests run, on Redis database `url`.
fn manifest(name: &str, url: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rolehost-mp-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("roles.toml");
    let role = |name: &str, file: &str| {
        format!(
            "[[roles]]\nname = \"{name}\"\nwasm = \"{}\"\nlimits = {{ deadline-ms = 300000 }}\n",
            role_path(file).display()
        )
    };
    let text = format!(
        "state = \"{url}\"\n{}{}{}",
        role("shared", "kvprobe"),
        role("rate-limiter", "rate-limiter"),
        role("worker", "worker")
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn spawn(manifest: &PathBuf, role: &str, body: &str, repeat: usize, concurrency: usize) -> Child {
    Command::new(env!("CARGO_BIN_EXE_rolehost"))
        .arg("call")
        .arg("--manifest")
        .arg(manifest)
        .args([role, body, "--repeat", &repeat.to_string(), "--concurrency", &concurrency.to_string()])
        .env_remove("ROLEHOST_STATE")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs the same calls in two processes at once; their stdout lines.
fn in_two_processes(manifest: &PathBuf, role: &str, body: &str, repeat: usize, concurrency: usize) -> Vec<String> {
    in_processes(2, manifest, role, body, repeat, concurrency)
}

/// Runs the same calls in `n` processes at once; their stdout lines.
fn in_processes(
    n: usize,
    manifest: &PathBuf,
    role: &str,
    body: &str,
    repeat: usize,
    concurrency: usize,
) -> Vec<String> {
    let children: Vec<Child> = (0..n).map(|_| spawn(manifest, role, body, repeat, concurrency)).collect();
    let mut lines = Vec::new();
    for child in children {
        let out: Output = child.wait_with_output().unwrap();
        assert!(out.status.success(), "a process failed: {}", String::from_utf8_lossy(&out.stderr));
        lines.extend(String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned));
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_increments_are_exact_across_processes() {
    let _serial = serial();
    let Some(server) = shared_redis() else { return };
    let db = server.fresh_db();
    let manifest = manifest("incr", &server.url(db));
    let incr = r#"{"op":"subject_incr","subject":"hot","prop":"n","delta":1,"times":500}"#;
    let lines = in_two_processes(&manifest, "shared", incr, 16, 16);
    assert_eq!(lines.len(), 32);
    assert!(lines.iter().all(|l| l.starts_with(r#"{"ok":"#)), "every increment call succeeded: {lines:?}");
    let update = r#"{"op":"subject_update","subject":"hot","prop":"m","times":500}"#;
    let lines = in_two_processes(&manifest, "shared", update, 16, 16);
    assert_eq!(lines.len(), 32);
    assert!(lines.iter().all(|l| l.starts_with(r#"{"ok":"#)), "every update call succeeded: {lines:?}");
    let host = rolehost_tests::host(server.backend(db), "rolehost:", &[("shared", "kvprobe")]);
    let get = |prop: &str| json!({"op":"subject_get","subject":"hot","prop":prop});
    assert_eq!(probe(&host, "shared", get("n")).await, Ok(json!("16000")), "HINCRBY path");
    assert_eq!(probe(&host, "shared", get("m")).await, Ok(json!("16000")), "compare-and-set path");
}

/// Three processes increment one kv counter: every call gets a distinct
/// value and together they are exactly 1..=total.
fn three_processes_count_exactly(url: &str, name: &str) {
    let manifest = manifest(name, url);
    let incr = r#"{"op":"incr","key":"hits","delta":1}"#;
    let lines = in_processes(3, &manifest, "shared", incr, 150, 8);
    let mut values: Vec<u64> = lines
        .iter()
        .map(|l| l.strip_prefix(r#"{"ok":"#).and_then(|l| l.strip_suffix('}')).unwrap().parse().unwrap())
        .collect();
    values.sort();
    assert_eq!(values, (1..=450).collect::<Vec<u64>>());
}

#[test]
fn three_processes_increment_one_counter_exactly() {
    let _serial = serial();
    let Some(server) = shared_redis() else { return };
    three_processes_count_exactly(&server.url(server.fresh_db()), "three");
}

#[test]
fn three_processes_increment_one_counter_exactly_on_a_cluster() {
    let _serial = serial();
    let Some(cluster) = shared_cluster() else { return };
    // The cluster is this test binary's own; nothing else writes the counter.
    three_processes_count_exactly(&cluster.url(), "three-cluster");
}

#[test]
fn rate_limit_is_exact_across_processes() {
    let _serial = serial();
    let Some(server) = shared_redis() else { return };
    let manifest = manifest("rate", &server.url(server.fresh_db()));
    let body = r#"{"client":"c1","limit":50,"window_ms":3600000}"#;
    let lines = in_two_processes(&manifest, "rate-limiter", body, 100, 100);
    assert_eq!(lines.len(), 200);
    let allowed = lines.iter().filter(|l| l.contains(r#""result":"allowed""#)).count();
    let denied = lines.iter().filter(|l| l.contains(r#""result":"denied""#)).count();
    assert_eq!((allowed, denied), (50, 150));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_exclude_across_processes() {
    let _serial = serial();
    let Some(server) = shared_redis() else { return };
    let db = server.fresh_db();
    let manifest = manifest("locks", &server.url(db));
    // The worker errors if it finds another holder; every call succeeding
    // means no overlap, and the log proves no append was lost.
    let lines = in_two_processes(&manifest, "worker", "", 20, 8);
    let mut tokens: Vec<u64> = lines.iter().map(|l| l.parse().unwrap()).collect();
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 40, "tokens are unique: {tokens:?}");
    let host = rolehost_tests::host(server.backend(db), "rolehost:", &[("worker", "kvprobe")]);
    let log = probe(&host, "worker", json!({"op":"get","key":"log"})).await.unwrap();
    let logged: Vec<u64> = log.as_str().unwrap().split(',').map(|t| t.parse().unwrap()).collect();
    assert_eq!(logged, tokens, "appended in token order, none lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_holders_lock_is_freed_by_its_ttl() {
    let _serial = serial();
    let Some(server) = shared_redis() else { return };
    let db = server.fresh_db();
    let manifest = manifest("crash", &server.url(db));
    // Ready before the holder starts, so that the checks below fit well
    // inside its lock's TTL even on a slow machine.
    let host = rolehost_tests::host(server.backend(db), "rolehost:", &[("shared", "kvprobe")]);
    let hold = r#"{"op":"lock_hold","name":"job","ttl_ms":8000,"wait_ms":0,"sleep_ms":120000}"#;
    let mut holder = spawn(&manifest, "shared", hold, 1, 1);
    let try_lock = json!({"op":"lock_hold","name":"job","ttl_ms":1000,"wait_ms":0});
    // Wait until the other process has taken the lock (its last fencing
    // token, unlike the lock, outlives the TTL).
    let start = Instant::now();
    let fence = || server.cli(&["-n", &db.to_string(), "get", "rolehost:shared:fence:{job}"]).trim().parse::<u64>();
    let holders = loop {
        if let Ok(token) = fence() {
            break token;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "the holder never took the lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(probe(&host, "shared", try_lock.clone()).await, Ok(json!(null)), "held by the other process");
    holder.kill().unwrap(); // SIGKILL: no chance to release
    holder.wait().unwrap();
    assert_eq!(probe(&host, "shared", try_lock.clone()).await, Ok(json!(null)), "still held until the TTL ends");
    let wait = json!({"op":"lock_hold","name":"job","ttl_ms":1000,"wait_ms":9000});
    let token = probe(&host, "shared", wait).await.map(|t| t.as_u64());
    assert!(
        token.as_ref().is_ok_and(|t| t.is_some_and(|t| t > holders)),
        "taken after the TTL, with a token past the holder's {holders}: {token:?}"
    );
}
