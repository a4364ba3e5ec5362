//! `rolehost serve` as a real process on a free port, driven by a real HTTP
//! client; Redis tests use a real redis-server.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rolehost_tests::{role_path, shared_redis, RedisCluster, RedisServer};

const TOKEN: &str = "admin-token-for-tests";
/// The secret role users' passwords derive from, where a test uses them.
const ACL_SECRET: &str = "acl-secret-for-tests";

struct Server {
    child: Child,
    base: String,
}

impl Server {
    /// Starts `rolehost serve` with `manifest` and extra flags, and waits for
    /// its "listening on" line.
    fn start(manifest: &Path, extra: &[&str]) -> Self {
        Self::start_logging(manifest, extra, "warn", Stdio::null())
    }

    /// The same, logging at `level` to `log` (the child's stderr).
    fn start_logging(manifest: &Path, extra: &[&str], level: &str, log: Stdio) -> Self {
        Self::launch(manifest, extra, &[("RUST_LOG", level)], log)
    }

    /// The same, with environment variables `env` (`RUST_LOG` among them:
    /// `warn` by default).
    fn launch(manifest: &Path, extra: &[&str], env: &[(&str, &str)], log: Stdio) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rolehost"))
            .args(["serve", "--manifest", manifest.to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .args(extra)
            .env_remove("ROLEHOST_STATE")
            .env("ROLEHOST_ADMIN_TOKEN", TOKEN)
            .env("ROLEHOST_ACL_SECRET", ACL_SECRET)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let base =
            line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected: {line:?}")).to_owned();
        Self { child, base }
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder().http_status_as_error(false).build().into()
    }

    /// POST `body` to `path`: (status, body, Retry-After).
    fn post(&self, path: &str, body: &str) -> (u16, String, Option<String>) {
        self.post_with(path, body, None)
    }

    fn post_with(&self, path: &str, body: &str, token: Option<&str>) -> (u16, String, Option<String>) {
        let mut request = Self::agent().post(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let mut response = request.send(body).unwrap();
        let retry = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
        (response.status().as_u16(), response.body_mut().read_to_string().unwrap(), retry)
    }

    /// Waits until `role` has a call in flight (from the metrics).
    fn wait_in_flight(&self, role: &str) {
        let needle = format!("rolehost_calls_in_flight{{role=\"{role}\"}} 1");
        let start = Instant::now();
        while !self.get("/metrics").1.contains(&needle) {
            assert!(start.elapsed() < Duration::from_secs(60), "no call of {role} in flight");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut response = Self::agent().get(format!("{}{path}", self.base)).call().unwrap();
        (response.status().as_u16(), response.body_mut().read_to_string().unwrap())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rolehost-serve-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A manifest in `dir` with `roles` as (name, wasm path, extra TOML).
fn manifest(dir: &Path, state: &str, roles: &[(&str, &Path, &str)]) -> PathBuf {
    let mut text = format!("state = \"{state}\"\n");
    for (name, wasm, extra) in roles {
        text += &format!("[[roles]]\nname = \"{name}\"\nwasm = \"{}\"\n{extra}\n", wasm.display());
    }
    let path = dir.join("roles.toml");
    // Replaced whole, as a watcher would want it.
    std::fs::write(dir.join("roles.toml.new"), text).unwrap();
    std::fs::rename(dir.join("roles.toml.new"), &path).unwrap();
    path
}

#[test]
fn calls_map_to_status_codes() {
    let dir = dir("status");
    let probe = role_path("kvprobe");
    let manifest = manifest(
        &dir,
        "memory",
        &[
            ("counter", &role_path("counter"), ""),
            ("probe", &probe, "limits = { deadline-ms = 2000, max-ops-per-call = 3 }"),
            ("tight", &role_path("counter"), "limits = { max-ops-per-call = 1 }"),
        ],
    );
    let server = Server::start(&manifest, &["--max-body-bytes", "1000"]);
    assert_eq!(server.post("/roles/counter", ""), (200, "1".into(), None));
    assert_eq!(server.post("/roles/counter", ""), (200, "2".into(), None));
    let (status, body, _) = server.post("/roles/nope", "");
    assert_eq!(status, 404);
    assert!(body.contains(r#""error":"unknown-role""#), "{body}");
    let (status, body, _) = server.post("/roles/probe", "not json");
    assert_eq!((status, body.contains(r#""error":"invalid-argument""#)), (422, true), "{body}");
    let (status, body, _) = server.post("/roles/probe", &"x".repeat(1001));
    assert_eq!((status, body.contains(r#""error":"too-large""#)), (413, true), "{body}");
    let (status, body, _) = server.post("/roles/probe", r#"{"op":"panic"}"#);
    assert_eq!((status, body.contains(r#""error":"trap""#)), (500, true), "{body}");
    let (status, body, _) = server.post("/roles/probe", r#"{"op":"spin"}"#);
    assert_eq!((status, body.contains(r#""error":"deadline""#)), (504, true), "{body}");
    // A role error in the response body is still a 200 from the probe; the
    // quota is the role's own error when the handler itself fails.
    let (status, body, _) = server.post("/roles/probe", r#"{"op":"set_many","entries":{},"count":5}"#);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("quota-exceeded"), "{body}");
    let (status, body, retry) = server.post("/roles/tight", "");
    assert_eq!((status, retry.as_deref()), (429, Some("1")), "{body}");
    assert!(body.contains(r#""error":"quota-exceeded""#), "{body}");
    assert_eq!(server.post("/roles/counter", ""), (200, "3".into(), None), "the host kept serving");
}

#[test]
fn busy_roles_answer_503_with_retry_after() {
    let dir = dir("busy");
    let manifest = manifest(&dir, "memory", &[("slow", &role_path("kvprobe"), "limits = { max-concurrency = 1 }")]);
    let server = Server::start(&manifest, &[]);
    // Long enough for the busy answer below on a slow machine.
    let hold = r#"{"op":"lock_hold","name":"l","ttl_ms":10000,"wait_ms":0,"sleep_ms":4000}"#;
    let base = server.base.clone();
    let first = std::thread::spawn(move || {
        let mut response = Server::agent().post(format!("{base}/roles/slow")).send(hold).unwrap();
        (response.status().as_u16(), response.body_mut().read_to_string().unwrap())
    });
    server.wait_in_flight("slow");
    let (status, body, retry) = server.post("/roles/slow", r#"{"op":"exists","key":"k"}"#);
    assert_eq!((status, retry.as_deref()), (503, Some("1")), "{body}");
    assert!(body.contains(r#""error":"busy""#), "{body}");
    let (status, body) = first.join().unwrap();
    assert!(status == 200 && body.starts_with(r#"{"ok":"#), "the first call finished: {status} {body}");
    assert_eq!(server.post("/roles/slow", r#"{"op":"exists","key":"k"}"#).0, 200);
}

#[test]
fn health_readiness_and_metrics_on_redis() {
    let Some(_) = shared_redis() else { return };
    let Some(mut redis) = RedisServer::start() else { return };
    let dir = dir("health");
    let counter = role_path("counter");
    let manifest = manifest(&dir, &redis.url(0), &[("counter", &counter, "")]);
    let server = Server::start(&manifest, &[]);
    assert_eq!(server.get("/healthz"), (200, "ok\n".into()));
    assert_eq!(server.get("/readyz").0, 200);
    assert_eq!(server.post("/roles/counter", ""), (200, "1".into(), None));
    let (status, health) = server.get("/health");
    assert_eq!(status, 200);
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["backend"]["kind"], "redis");
    assert_eq!(health["backend"]["connected"], true);
    assert!(
        health["backend"]["details"]["redis_version"].as_str().unwrap().starts_with(|c: char| c.is_ascii_digit()),
        "{health}"
    );
    assert!(health["backend"]["details"]["used_memory"].is_string(), "{health}");
    assert!(health["backend"]["details"]["connected_clients"].is_string(), "{health}");
    assert_eq!(health["roles"][0]["name"], "counter");
    assert_eq!(health["roles"][0]["sha256"].as_str().unwrap().len(), 64);
    let (_, metrics) = server.get("/metrics");
    for needle in [
        r#"rolehost_calls_total{outcome="ok",role="counter"} 1"#,
        r#"rolehost_state_ops_total{op="increment",role="counter"} 1"#,
        "rolehost_call_seconds_bucket",
        "rolehost_backend_seconds_bucket",
        "rolehost_calls_in_flight",
        "rolehost_backend_up 1",
        "rolehost_backend_used_memory_bytes ",
        "rolehost_backend_connected_clients ",
        "rolehost_backend_evicted_keys_total 0",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from\n{metrics}");
    }
    assert!(!metrics.contains("rolehost_backend_max_memory_bytes"), "no maxmemory: no limit to show");
    // Redis goes away: not ready, calls fail with 503; it returns: ready again.
    redis.kill();
    assert_eq!(server.get("/healthz").0, 200);
    assert_eq!(server.get("/readyz").0, 503);
    let (status, body, retry) = server.post("/roles/counter", "");
    assert_eq!((status, retry.as_deref()), (503, Some("1")), "{body}");
    assert!(server.get("/metrics").1.contains("rolehost_backend_up 0"));
    let Some(_redis) = RedisServer::start_on(redis.port, &[]) else { return };
    let start = Instant::now();
    while server.get("/readyz").0 != 200 {
        assert!(start.elapsed() < Duration::from_secs(10), "never ready again");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(server.post("/roles/counter", "").0, 200);
}

/// Health checks and scrapes that come together share one probe of the
/// backend: a flood of them while Redis is slow (here stopped for a
/// moment) costs it a probe or two, not one each.
#[test]
fn health_checks_at_once_share_one_probe() {
    let Some(_) = shared_redis() else { return };
    let Some(redis) = RedisServer::start() else { return };
    let dir = dir("health-probe");
    let manifest = manifest(&dir, &redis.url(0), &[("counter", &role_path("counter"), "")]);
    let server = Server::start(&manifest, &[]);
    assert_eq!(server.get("/readyz").0, 200);
    let probes = || -> u64 {
        let stats = redis.cli(&["info", "commandstats"]);
        let line = stats.lines().find_map(|l| l.strip_prefix("cmdstat_info:calls="));
        line.and_then(|l| l.split(',').next()?.parse().ok()).expect("cmdstat_info in INFO commandstats")
    };
    let before = probes();
    redis.freeze(true);
    let checks: Vec<_> = (0..30)
        .map(|i| {
            let url = format!("{}{}", server.base, ["/readyz", "/health", "/metrics"][i % 3]);
            std::thread::spawn(move || Server::agent().get(url).call().map(|r| r.status().as_u16()))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    redis.freeze(false);
    for check in checks {
        assert_eq!(check.join().unwrap().unwrap(), 200);
    }
    // The counting `info` of this test is one call too.
    let during = probes() - before - 1;
    assert!(during < 10, "{during} probes for 30 checks");
}

/// Every worker thread keeps a Redis connection of its own, so a call
/// runs on one thread from start to end (`workers.rs`).
#[test]
fn each_worker_thread_has_a_redis_connection_of_its_own() {
    let Some(_) = shared_redis() else { return };
    let counter = role_path("counter");
    // rolehost's connections to `server`, less the one that asks.
    let clients = |server: &RedisServer| {
        let clients = server.cli(&["client", "list"]);
        (clients.lines().filter(|line| !line.contains("cmd=client|list")).count(), clients)
    };
    // Six calls, each on a new HTTP connection (a new agent each time), so
    // that they go round the workers.
    let six_calls = |url: &str, threads: usize| {
        let dir = dir(&format!("workers-{threads}"));
        let manifest = manifest(&dir, url, &[("counter", &counter, "")]);
        let server = Server::start(&manifest, &["--threads", &threads.to_string()]);
        for n in 1..=6 {
            assert_eq!(server.post("/roles/counter", ""), (200, n.to_string(), None));
        }
        server
    };
    for threads in [1, 3] {
        let Some(redis) = RedisServer::start() else { return };
        let _server = six_calls(&redis.url(0), threads);
        let (rolehost, list) = clients(&redis);
        assert_eq!(rolehost, threads, "one connection per worker thread:\n{list}");
    }
    // A Cluster connection reaches every primary; each worker has one.
    let mut per_thread = None;
    for threads in [1, 3] {
        let Some(cluster) = RedisCluster::start(3) else { return };
        let _server = six_calls(&cluster.url(), threads);
        for node in &cluster.nodes {
            let (rolehost, list) = clients(node);
            let one = *per_thread.get_or_insert(rolehost);
            assert!(one >= 1, "no connection to a primary:\n{list}");
            assert_eq!(rolehost, one * threads, "a Cluster connection per worker thread:\n{list}");
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_rolehost"))
        .args(["serve", "--manifest", "/nonexistent.toml", "--threads", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--threads") && stderr.contains("1..=1024"), "{stderr}");
}

#[test]
fn reload_swaps_versions_and_refuses_bad_ones() {
    let dir = dir("reload");
    let wasm = dir.join("role.wasm");
    std::fs::copy(role_path("counter"), &wasm).unwrap();
    let manifest = manifest(&dir, "memory", &[("app", &wasm, "")]);
    let server = Server::start(&manifest, &["--watch"]);
    assert_eq!(server.post("/roles/app", "").1, "1");
    assert_eq!(server.post("/roles/app", "").1, "2");
    let reload = "/admin/roles/app/reload";
    assert_eq!(server.post(reload, "").0, 401, "no token");
    assert_eq!(server.post_with(reload, "", Some("wrong")).0, 401);
    // The scheme's name in any case; a refusal names the scheme wanted.
    let with_header = |value: &str| {
        let request = Server::agent().post(format!("{}{reload}", server.base)).header("Authorization", value);
        let response = request.send("").unwrap();
        (response.status().as_u16(), response.headers().get("www-authenticate").cloned())
    };
    assert_eq!(with_header(&format!("bearer {TOKEN}")).0, 200, "lower-case scheme");
    let (status, challenge) = with_header("Basic YWRtaW46YWRtaW4=");
    assert_eq!((status, challenge.as_ref().and_then(|v| v.to_str().ok())), (401, Some("Bearer")));
    assert_eq!(server.post_with("/admin/roles/nope/reload", "", Some(TOKEN)).0, 404);
    // A broken file is refused; the old version keeps serving.
    std::fs::write(&wasm, b"not a component").unwrap();
    let (status, body, _) = server.post_with(reload, "", Some(TOKEN));
    assert_eq!(status, 422, "{body}");
    assert_eq!(server.post("/roles/app", "").1, "3");
    // So is a pipe named by mistake, at once (reading it would never end),
    // and the reloads after it still run.
    std::fs::remove_file(&wasm).unwrap();
    assert!(Command::new("mkfifo").arg(&wasm).status().unwrap().success());
    let (status, body, _) = server.post_with(reload, "", Some(TOKEN));
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("not a regular file"), "{body}");
    std::fs::remove_file(&wasm).unwrap();
    // A new version is swapped in and keeps the identity's state.
    std::fs::copy(role_path("kvprobe"), &wasm).unwrap();
    let (status, body, _) = server.post_with(reload, "", Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    assert_eq!(server.post("/roles/app", r#"{"op":"get","key":"count"}"#).1, r#"{"ok":"3"}"#);
    // --watch notices a changed file by itself.
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::copy(role_path("counter"), &wasm).unwrap();
    let start = Instant::now();
    loop {
        if server.post("/roles/app", "").1 == "4" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the watcher never reloaded the file");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_manifest_reload_loads_reloads_and_unloads_roles() {
    let dir = dir("manifest-reload");
    let (counter, probe) = (role_path("counter"), role_path("kvprobe"));
    let path = manifest(&dir, "memory", &[("app", &probe, ""), ("old", &counter, "")]);
    // No watcher here: it could apply an edit before the route does.
    let server = Server::start(&path, &[]);
    let set = r#"{"op":"set","key":"k","value":"hello"}"#;
    assert_eq!(server.post("/roles/app", set).1, r#"{"ok":null}"#);
    let reload = |token| server.post_with("/admin/reload", "", token);
    assert_eq!(reload(None).0, 401, "no token");

    // `app` gets a smaller value limit, `old` goes, `new` comes; a role
    // whose file is broken is refused and the rest still applies.
    let broken = dir.join("broken.wasm");
    std::fs::write(&broken, b"not a component").unwrap();
    let roles: [(&str, &Path, &str); 3] =
        [("app", &probe, "limits = { max-value-bytes = 4 }"), ("new", &counter, ""), ("broken", &broken, "")];
    manifest(&dir, "memory", &roles);
    let (status, body, _) = reload(Some(TOKEN));
    assert_eq!(status, 422, "{body}");
    let changes: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(changes["reloaded"], serde_json::json!(["app"]), "{body}");
    assert_eq!(changes["loaded"], serde_json::json!(["new"]), "{body}");
    assert_eq!(changes["unloaded"], serde_json::json!(["old"]), "{body}");
    assert!(changes["refused"]["broken"].as_str().unwrap().contains("not a valid WebAssembly component"), "{body}");
    assert_eq!(server.post("/roles/old", "").0, 404);
    assert_eq!(server.post("/roles/broken", "").0, 404);
    assert_eq!(server.post("/roles/new", "").1, "1");
    // The new limit applies; the state stays.
    assert!(server.post("/roles/app", set).1.contains(r#""kind":"too-large""#));
    assert_eq!(server.post("/roles/app", r#"{"op":"get","key":"k"}"#).1, r#"{"ok":"hello"}"#);

    // Nothing changed: nothing is reloaded. A setting that needs a restart
    // is named, not applied.
    manifest(&dir, "redis://127.0.0.1:1", &roles[..2]);
    let (status, body, _) = reload(Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    let changes: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(changes["unchanged"], serde_json::json!(["app", "new"]), "{body}");
    assert_eq!(changes["needs_restart"], serde_json::json!(["state"]), "{body}");
    assert_eq!(server.post("/roles/new", "").1, "2");

    // An unreadable manifest changes nothing, nor does one without roles
    // (more likely caught half-written than meant).
    for (text, why) in [("[[roles]]\nwasm = 7\n", "bad manifest"), ("", "lists no roles")] {
        std::fs::write(&path, text).unwrap();
        let (status, body, _) = reload(Some(TOKEN));
        assert_eq!(status, 422, "{body}");
        assert!(body.contains(why), "{body}");
    }
    assert_eq!(server.post("/roles/new", "").1, "3");
    drop(server);

    // Settings a flag gives are not the manifest's to change.
    let path = manifest(&dir, "redis://127.0.0.1:1", &roles[..2]);
    let server = Server::start(&path, &["--prefix", "flagged:", "--state", "memory"]);
    let edited = manifest(&dir, "redis://127.0.0.1:2", &roles[..2]);
    std::fs::write(&edited, format!("global-prefix = \"edited:\"\n{}", std::fs::read_to_string(&edited).unwrap()))
        .unwrap();
    let (status, body, _) = server.post_with("/admin/reload", "", Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    let changes: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(changes["needs_restart"], serde_json::json!([]), "{body}");
    drop(server);

    // --watch notices a changed manifest by itself.
    manifest(&dir, "memory", &roles[..2]);
    let server = Server::start(&path, &["--watch"]);
    assert_eq!(server.post("/roles/new", "").1, "1");
    std::thread::sleep(Duration::from_millis(1100));
    manifest(&dir, "memory", &[("app", &probe, "")]);
    let start = Instant::now();
    while server.post("/roles/app", set).1 != r#"{"ok":null}"# {
        assert!(start.elapsed() < Duration::from_secs(10), "the watcher never applied the manifest");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(server.post("/roles/new", "").0, 404);
}

/// A manifest edit that points a role at another file (`app-v1.wasm` to
/// `app-v2.wasm`) loads it once: the watcher does not then take the new
/// file for a changed one and reload it again.
#[test]
fn a_role_moved_to_another_file_is_loaded_once() {
    let dir = dir("watch-moved");
    let (v1, v2) = (dir.join("app-v1.wasm"), dir.join("app-v2.wasm"));
    std::fs::copy(role_path("counter"), &v1).unwrap();
    std::fs::copy(role_path("kvprobe"), &v2).unwrap();
    let path = manifest(&dir, "memory", &[("app", &v1, "")]);
    let log = dir.join("serve.log");
    let server = Server::start_logging(&path, &["--watch"], "info", Stdio::from(std::fs::File::create(&log).unwrap()));
    std::thread::sleep(Duration::from_millis(1100));
    manifest(&dir, "memory", &[("app", &v2, "")]);
    let start = Instant::now();
    while server.post("/roles/app", r#"{"op":"get","key":"unset"}"#).1 != r#"{"ok":null}"# {
        assert!(start.elapsed() < Duration::from_secs(10), "the watcher never applied the manifest");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A few more polls.
    std::thread::sleep(Duration::from_millis(3000));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("file changed; reloaded").count(), 0, "{text}");
}

#[test]
fn the_watcher_loads_a_refused_role_once_its_file_appears() {
    let dir = dir("watch-refused");
    let (counter, probe) = (role_path("counter"), role_path("kvprobe"));
    let late = dir.join("late.wasm");
    let _ = std::fs::remove_file(&late);
    let path = manifest(&dir, "memory", &[("app", &probe, "")]);
    let server = Server::start(&path, &["--watch"]);
    std::thread::sleep(Duration::from_millis(1100));
    // `late` is listed before its file exists: refused, while `other` loads.
    manifest(&dir, "memory", &[("app", &probe, ""), ("late", &late, ""), ("other", &counter, "")]);
    let start = Instant::now();
    while server.post("/roles/other", "").0 != 200 {
        assert!(start.elapsed() < Duration::from_secs(10), "the watcher never applied the manifest");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(server.post("/roles/late", "").0, 404);
    // The file appears, with the manifest untouched: the role loads.
    std::fs::copy(&counter, dir.join("late.wasm.new")).unwrap();
    std::fs::rename(dir.join("late.wasm.new"), &late).unwrap();
    let start = Instant::now();
    while server.post("/roles/late", "").0 != 200 {
        assert!(start.elapsed() < Duration::from_secs(10), "the watcher never loaded the role whose file appeared");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(server.post("/roles/late", "").1, "2");
    assert_eq!(server.post("/roles/other", "").1, "2", "the others were left alone");
}

#[test]
fn a_manifest_reload_with_acl_users_runs_a_new_role_as_its_own_user() {
    let Some(_) = shared_redis() else { return };
    // An own server: the test changes its users.
    let Some(redis) = RedisServer::start() else { return };
    let dir = dir("manifest-reload-acl");
    let write = |roles: &str| {
        let text = format!("state = \"{}\"\n[redis]\nacl-users = true\n{roles}", redis.url(0));
        std::fs::write(dir.join("roles.toml"), text).unwrap();
        let applied = Command::new(env!("CARGO_BIN_EXE_rolehost"))
            .args(["acl", "--manifest", dir.join("roles.toml").to_str().unwrap(), "--apply"])
            .env_remove("ROLEHOST_STATE")
            .env("ROLEHOST_ACL_SECRET", ACL_SECRET)
            .output()
            .unwrap();
        assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
    };
    let counter = format!("[[roles]]\nwasm = \"{}\"\n", role_path("counter").display());
    write(&counter);
    let server = Server::start(&dir.join("roles.toml"), &[]);
    assert_eq!(server.post("/roles/counter", "").1, "1");

    let writer = format!("[[roles]]\nname = \"writer\"\nwasm = \"{}\"\n", role_path("kvprobe").display());
    write(&(counter + &writer));
    let (status, body, _) = server.post_with("/admin/reload", "", Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""loaded":["writer"]"#), "{body}");
    assert_eq!(server.post("/roles/writer", r#"{"op":"incr","key":"n","delta":2}"#).1, r#"{"ok":2}"#);
    // Redis sees the new role's own user.
    let clients = redis.cli(&["CLIENT", "LIST"]);
    assert!(clients.contains("user=rolehost-writer"), "{clients}");
}

#[test]
fn sigterm_lets_calls_in_flight_finish() {
    let dir = dir("shutdown");
    let manifest = manifest(&dir, "memory", &[("probe", &role_path("kvprobe"), "")]);
    let mut server = Server::start(&manifest, &["--shutdown-grace-secs", "10"]);
    let base = server.base.clone();
    let call = std::thread::spawn(move || {
        let body = r#"{"op":"lock_hold","name":"l","ttl_ms":5000,"wait_ms":0,"sleep_ms":1500}"#;
        let mut response = Server::agent().post(format!("{base}/roles/probe")).send(body).unwrap();
        (response.status().as_u16(), response.body_mut().read_to_string().unwrap())
    });
    server.wait_in_flight("probe");
    unsafe { libc_kill(server.child.id() as i32, 15) };
    let (status, body) = call.join().unwrap();
    assert!(status == 200 && body.starts_with(r#"{"ok":"#), "the call in flight finished: {status} {body}");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the server did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    // New connections are refused once it stopped.
    assert!(Server::agent().post(format!("{}/roles/probe", server.base)).send("").is_err());
}

/// A signal while the watcher compiles a role (a Python role's takes
/// seconds without the compile cache) stops the server after the grace
/// period, not once the compile is done.
#[test]
fn a_signal_during_a_reload_stops_after_the_grace_period() {
    let dir = dir("signal-during-reload");
    let cache = dir.join("empty-cache");
    let _ = std::fs::remove_dir_all(&cache);
    let path = manifest(&dir, "memory", &[("counter", &role_path("counter"), "")]);
    let log = dir.join("stderr.log");
    let env = [("RUST_LOG", "info"), ("ROLEHOST_CACHE", cache.to_str().unwrap())];
    let flags = ["--watch", "--shutdown-grace-secs", "1"];
    let mut server = Server::launch(&path, &flags, &env, Stdio::from(std::fs::File::create(&log).unwrap()));
    let (counter, python) = (role_path("counter"), role_path("counter-py"));
    manifest(&dir, "memory", &[("counter", &counter, ""), ("python", &python, "")]);
    let start = Instant::now();
    while !std::fs::read_to_string(&log).unwrap().contains("the manifest changed; applying it") {
        assert!(start.elapsed() < Duration::from_secs(30), "the watcher never applied the manifest");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(server.post("/roles/python", "").0, 404, "still compiling");
    unsafe { libc_kill(server.child.id() as i32, 15) };
    let signalled = Instant::now();
    while server.child.try_wait().unwrap().is_none() {
        // The grace period (1 s) and the runtime's end (1 s at most), with
        // room for a loaded machine, short of the compile's rest (about
        // 10 s on the test machine).
        assert!(signalled.elapsed() < Duration::from_secs(8), "the server waited for the compile");
        std::thread::sleep(Duration::from_millis(50));
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}

/// The grace period is for the first signal: a second one (an impatient
/// operator, or an orchestrator's last word) stops the server at once.
#[test]
fn a_second_signal_stops_at_once() {
    let dir = dir("second-signal");
    let manifest = manifest(&dir, "memory", &[("probe", &role_path("kvprobe"), "limits = { deadline-ms = 60000 }")]);
    let mut server = Server::start(&manifest, &["--shutdown-grace-secs", "60"]);
    let base = server.base.clone();
    std::thread::spawn(move || {
        let body = r#"{"op":"lock_hold","name":"l","ttl_ms":60000,"wait_ms":0,"sleep_ms":50000}"#;
        let _ = Server::agent().post(format!("{base}/roles/probe")).send(body);
    });
    server.wait_in_flight("probe");
    unsafe { libc_kill(server.child.id() as i32, 15) };
    std::thread::sleep(Duration::from_millis(300));
    assert!(server.child.try_wait().unwrap().is_none(), "the first signal waits for the call");
    unsafe { libc_kill(server.child.id() as i32, 2) };
    let start = Instant::now();
    while server.child.try_wait().unwrap().is_none() {
        // The call would hold it for 50 s, the grace period for 60.
        assert!(start.elapsed() < Duration::from_secs(20), "the second signal did not stop the server");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn reload_under_a_steady_stream_of_calls_loses_none() {
    let dir = dir("stream");
    let wasm = dir.join("role.wasm");
    std::fs::copy(role_path("counter"), &wasm).unwrap();
    let manifest = manifest(&dir, "memory", &[("app", &wasm, "")]);
    let server = Server::start(&manifest, &[]);
    let base = server.base.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (base, stop) = (base.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut statuses = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let response = Server::agent().post(format!("{base}/roles/app")).send("").unwrap();
                    statuses.push(response.status().as_u16());
                }
                statuses
            })
        })
        .collect();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(server.post_with("/admin/roles/app/reload", "", Some(TOKEN)).0, 200);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut calls = 0;
    for caller in callers {
        let statuses = caller.join().unwrap();
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
        calls += statuses.len();
    }
    // Every call counted once: the state carried over every reload.
    assert_eq!(server.post("/roles/app", "").1, (calls + 1).to_string());
}

#[test]
fn the_example_manifest_serves_counter_on_both_backends() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/roles.toml");
    let server = Server::start(&manifest, &["--state", "memory"]);
    assert_eq!(server.post("/roles/counter", "").1, "1");
    assert_eq!(server.post("/roles/counter", "").1, "2");
    drop(server);
    let Some(redis) = shared_redis() else { return };
    let url = redis.url(redis.fresh_db());
    let server = Server::start(&manifest, &["--state", &url]);
    assert_eq!(server.post("/roles/counter", "").1, "1");
    assert_eq!(server.post("/roles/counter", "").1, "2");
}

/// A connection goes to the worker serving the fewest, so workers whose
/// connections closed take the next ones; `rolehost_worker_connections`
/// says how many each serves.
#[test]
fn a_connection_goes_to_the_least_busy_worker() {
    let dir = dir("least-busy");
    let manifest = manifest(&dir, "memory", &[("counter", &role_path("counter"), "")]);
    let server = Server::start(&manifest, &["--threads", "2"]);
    // Keep-alive connections, each served once so that it is surely taken.
    let open = || {
        let mut stream = connect(&server, Duration::from_secs(30));
        let text = request(&mut stream, "GET /metrics");
        (stream, text)
    };
    // The workers' connections, as the newest connection's answer gives them.
    let loads = |metrics: &str| -> Vec<usize> {
        let count = |worker: usize| {
            let line = format!("rolehost_worker_connections{{worker=\"{worker}\"}} ");
            let line = metrics.lines().find_map(|l| l.strip_prefix(&line)).unwrap_or_else(|| panic!("{metrics}"));
            line.parse().unwrap()
        };
        vec![count(0), count(1)]
    };
    // Two on each worker, in turn as long as they are equally busy.
    let (first, mut second, third, fourth) = (open(), open(), open(), open());
    assert_eq!(loads(&fourth.1), [2, 2]);
    // The first worker's end (the first and third), once the server has
    // seen both close (asked on a connection it already serves, which
    // leaves the turns as they are).
    drop((first, third));
    let start = Instant::now();
    loop {
        let metrics = request(&mut second.0, "GET /metrics");
        if loads(&metrics) == [0, 2] {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "closed connections still counted: {metrics}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The next two both go to the first worker, while the plain next turn
    // would give one to each.
    let (fifth, sixth) = (open(), open());
    assert_eq!(loads(&sixth.1), [2, 2], "both new connections go to the first worker");
    drop((second, fourth, fifth, sixth));
}

/// A log reader that stops reading (here a pipe nobody reads, full after
/// a few hundred lines) holds up no call: the access log's lines wait,
/// and come out once it reads again.
#[test]
fn a_log_reader_that_stops_holds_up_no_call() {
    let dir = dir("log-reader");
    let manifest = manifest(&dir, "memory", &[("counter", &role_path("counter"), "")]);
    let mut server = Server::start_logging(&manifest, &[], "info", Stdio::piped());
    let mut stream = connect(&server, Duration::from_secs(10));
    const CALLS: usize = 3000;
    for n in 1..=CALLS {
        assert_eq!(request(&mut stream, "POST /roles/counter"), n.to_string());
    }
    let log = BufReader::new(server.child.stderr.take().unwrap());
    let (counted, count) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut calls = 0;
        for line in log.lines() {
            calls += usize::from(line.unwrap().contains(r#"role="counter" status=200"#));
            if calls == CALLS {
                let _ = counted.send(calls);
            }
        }
    });
    assert_eq!(count.recv_timeout(Duration::from_secs(30)), Ok(CALLS), "every call's line comes out");
}

/// Sends `line` (a request line without a body) on a keep-alive
/// connection; the response body.
fn request(stream: &mut TcpStream, line: &str) -> String {
    stream.write_all(format!("{line} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    let mut length = 0;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).unwrap();
        if header == "\r\n" {
            break;
        }
        if let Some(value) = header.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    String::from_utf8(body).unwrap()
}

/// A raw connection to `server`, with reads that give up after `patience`.
fn connect(server: &Server, patience: Duration) -> TcpStream {
    let stream = TcpStream::connect(server.base.strip_prefix("http://").unwrap()).unwrap();
    stream.set_read_timeout(Some(patience)).unwrap();
    stream
}

/// What the server sends until it closes the connection (or `patience` ends).
fn read_all(stream: &mut TcpStream) -> Result<String, ErrorKind> {
    let mut text = Vec::new();
    match stream.read_to_end(&mut text) {
        Ok(_) => Ok(String::from_utf8_lossy(&text).into_owned()),
        Err(e) if !text.is_empty() => panic!("{e} after {:?}", String::from_utf8_lossy(&text)),
        Err(e) => Err(e.kind()),
    }
}

#[test]
fn slow_and_idle_clients_are_cut_off() {
    let dir = dir("slow-clients");
    let manifest = manifest(&dir, "memory", &[("counter", &role_path("counter"), "")]);
    let log = dir.join("stderr.log");
    let flags = ["--read-timeout-secs", "1", "--max-body-bytes", "1000"];
    let server = Server::start_logging(&manifest, &flags, "info", Stdio::from(std::fs::File::create(&log).unwrap()));
    let patience = Duration::from_secs(30);
    // Headers that never end, and a connection that never sends anything:
    // closed without a response.
    let mut slow = connect(&server, patience);
    slow.write_all(b"POST /roles/counter HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut idle = connect(&server, patience);
    assert_eq!(read_all(&mut slow), Ok(String::new()));
    assert_eq!(read_all(&mut idle), Ok(String::new()));
    // A body that stops coming: 408 with a JSON error.
    let mut trickle = connect(&server, patience);
    trickle.write_all(b"POST /roles/counter HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc").unwrap();
    let answer = read_all(&mut trickle).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""error":"request-timeout""#), "{answer}");
    // An unknown role: 404 at once, its body not waited for.
    let mut unknown = connect(&server, patience);
    unknown.write_all(b"POST /roles/nope HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc").unwrap();
    let answer = read_all(&mut unknown).unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    // A Content-Length over the limit: 413 at once, before any body.
    let mut big = connect(&server, patience);
    big.write_all(b"POST /roles/counter HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n").unwrap();
    let answer = read_all(&mut big).unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains(r#""error":"too-large""#), "{answer}");
    // Headers past 32 KiB: 431, not held.
    let mut long = connect(&server, patience);
    let cookie = "a".repeat(40 << 10);
    long.write_all(format!("POST /roles/counter HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\n\r\n").as_bytes()).unwrap();
    let answer = read_all(&mut long).unwrap();
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // None of it touched the role.
    assert_eq!(server.post("/roles/counter", ""), (200, "1".into(), None));
    // The refused bodies are logged as calls, each with its status.
    let start = Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("status=200") || start.elapsed() > Duration::from_secs(30) {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for status in ["408", "413"] {
        assert!(text.contains(&format!(r#"role="counter" status={status}"#)), "{status}: {text}");
    }
}

/// `rolehost_request_body_bytes` from the metrics.
fn held(server: &Server) -> usize {
    let (_, metrics) = server.get("/metrics");
    let line = metrics.lines().find_map(|line| line.strip_prefix("rolehost_request_body_bytes "));
    line.expect("rolehost_request_body_bytes in the metrics").parse().unwrap()
}

/// Request bodies count against `--max-buffered-bytes` as they arrive
/// (not as a Content-Length promises) until their calls return: past it a
/// request gets 503 with Retry-After, and the budget comes back.
#[test]
fn request_bodies_held_at_once_are_capped_host_wide() {
    let dir = dir("buffered");
    let manifest = manifest(&dir, "memory", &[("counter", &role_path("counter"), "")]);
    let flags = ["--max-body-bytes", "1000", "--max-buffered-bytes", "1500", "--read-timeout-secs", "30"];
    let server = Server::start(&manifest, &flags);
    let patience = Duration::from_secs(30);
    let open = |head: &str| {
        let mut stream = connect(&server, patience);
        stream
            .write_all(format!("POST /roles/counter HTTP/1.1\r\nHost: x\r\n{head}Connection: close\r\n\r\n").as_bytes())
            .unwrap();
        stream
    };
    // Promises cost nothing: two bodies of 1000 promised and not sent
    // leave room for a third.
    let _promised = [open("Content-Length: 1000\r\n"), open("Content-Length: 1000\r\n")];
    let first = server.post("/roles/counter", &"a".repeat(1000));
    assert_eq!(first.0, 200, "{first:?}");
    // A body of 1000 of which 900 bytes have come holds at least 900.
    let mut slow = open("Content-Length: 1000\r\n");
    slow.write_all(&[b'b'; 900]).unwrap();
    let busy = |answer: &(u16, String, Option<String>)| {
        answer.0 == 503 && answer.1.contains(r#""error":"busy""#) && answer.2.as_deref() == Some("1")
    };
    // Once the server has read them (a request of 700 read at the same
    // time would instead leave too little for them).
    let start = Instant::now();
    while held(&server) < 900 {
        assert!(start.elapsed() < patience, "the slow body's 900 bytes were never counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    let answer = server.post("/roles/counter", &"c".repeat(700));
    assert!(busy(&answer), "700 bytes more are over the budget: {answer:?}");
    let calls_before = server.post("/roles/counter", &"d".repeat(400));
    assert_eq!(calls_before.0, 200, "a body within what is left is served: {calls_before:?}");
    // A chunked body is counted as its chunks arrive: 250 bytes fit, 400
    // more do not.
    let mut chunked = open("Transfer-Encoding: chunked\r\n");
    chunked.write_all(format!("fa\r\n{}\r\n", "e".repeat(250)).as_bytes()).unwrap();
    chunked.write_all(format!("190\r\n{}\r\n0\r\n\r\n", "f".repeat(400)).as_bytes()).unwrap();
    let answer = read_all(&mut chunked).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503") && answer.contains(r#""error":"busy""#), "{answer}");
    // The slow body arrives; its call runs, and its share comes back.
    slow.write_all(&[b'b'; 100]).unwrap();
    let answer = read_all(&mut slow).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (status, count, _) = server.post("/roles/counter", &"g".repeat(1000));
    assert_eq!(status, 200, "the whole budget is back: {count}");
    let count: u64 = count.parse().unwrap();
    let before: u64 = calls_before.1.parse().unwrap();
    assert_eq!(count, before + 2, "the refused requests did not call the role");
    assert_eq!(held(&server), 0, "no call runs: no body is held");
    // A budget smaller than one largest body is refused at start, and so
    // is a body limit past what the host counts, each naming its flag.
    let too_big = (1u64 << 62).to_string();
    for (flags, why) in [
        (["--max-body-bytes", "1000", "--max-buffered-bytes", "999"], "--max-buffered-bytes is 999: "),
        (
            ["--max-body-bytes", &too_big, "--max-buffered-bytes", &too_big],
            "--max-body-bytes is 4611686018427387904, more",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_rolehost"))
            .args(["serve", "--manifest", manifest.to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .args(flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(why), "{stderr}");
    }
}

#[test]
fn connections_past_the_cap_wait_for_one_to_close() {
    let dir = dir("connection-cap");
    let manifest = manifest(&dir, "memory", &[("counter", &role_path("counter"), "")]);
    let server = Server::start(&manifest, &["--max-connections", "2"]);
    let first = connect(&server, Duration::from_secs(30));
    let _second = connect(&server, Duration::from_secs(30));
    let mut third = connect(&server, Duration::from_millis(500));
    third
        .write_all(b"POST /roles/counter HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .unwrap();
    let waited = read_all(&mut third);
    assert!(matches!(waited, Err(ErrorKind::WouldBlock | ErrorKind::TimedOut)), "served past the cap: {waited:?}");
    drop(first);
    third.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let answer = read_all(&mut third).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn a_client_that_stops_reading_is_cut_off() {
    let dir = dir("stalled-reader");
    let manifest = manifest(&dir, "memory", &[("counter", &role_path("counter"), "")]);
    let server = Server::start(&manifest, &["--read-timeout-secs", "1", "--max-connections", "1"]);
    // Pipelined requests whose responses it never reads: once the socket
    // buffers are full the server's writes wait, and would for good.
    let stalled = connect(&server, Duration::from_secs(30));
    let mut writer = stalled.try_clone().unwrap();
    let requests = std::thread::spawn(move || {
        for _ in 0..500_000 {
            if writer.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").is_err() {
                break;
            }
        }
    });
    // The only connection the cap allows is that one, until it is cut off.
    let mut next = connect(&server, Duration::from_secs(30));
    next.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let answer = read_all(&mut next).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let _ = stalled.shutdown(std::net::Shutdown::Both);
    requests.join().unwrap();
}

#[test]
fn a_role_name_in_the_path_cannot_forge_log_lines() {
    let dir = dir("log-forgery");
    let manifest = manifest(&dir, "memory", &[("counter", &role_path("counter"), "")]);
    let log = dir.join("stderr.log");
    let server = Server::start_logging(&manifest, &[], "info", Stdio::from(std::fs::File::create(&log).unwrap()));
    let (status, _, _) = server.post("/roles/x%0AFORGED%20INFO%20reloaded%20role=counter", "");
    assert_eq!(status, 404);
    assert_eq!(server.post("/roles/counter", "").0, 200);
    // The unknown role's line is written (before the counter's), escaped.
    let start = Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains(r#"role="counter""#) || start.elapsed() > Duration::from_secs(30) {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(text.contains(r#"role="x\nFORGED INFO reloaded role=counter" status=404"#), "{text}");
    assert!(!text.lines().any(|l| l.starts_with("FORGED")), "{text}");
}
