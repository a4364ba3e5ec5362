//! Shared support for the integration tests: a real `redis-server` on a
//! free loopback port, the built role components, and small helpers.
//!
//! Without redis-server the Redis tests are skipped with a message, except
//! when `CI=true` or `ROLEHOST_REQUIRE_REDIS=1`, where they fail.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rolehost::backend::{Backend, MemoryBackend, RedisBackend, RedisOptions, ScanPage};
use rolehost::cache::CompileCache;
use rolehost::{Grants, Host, HostOptions, RoleLimits, RoleSpec};
use serde_json::Value;

/// Databases each test server offers; tests that need a keyspace of their
/// own take one with [`RedisServer::fresh_db`].
const DATABASES: u32 = 1000;

/// A redis-server child process, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    next_db: AtomicU32,
    /// What redis-cli needs besides the port (TLS settings).
    cli_args: Vec<String>,
}

fn redis_required() -> bool {
    in_ci() || std::env::var("ROLEHOST_REQUIRE_REDIS").is_ok_and(|v| v == "1")
}

/// Whether this is a CI run (`CI=true`), where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A free loopback port (free when asked; the caller binds it soon after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A free loopback port below Linux's ephemeral range (32768 and up), so
/// below every [`free_port`]: a node on it sorts before the others.
pub fn low_free_port() -> u16 {
    let start = 20_000 + (std::process::id() % 100) as u16 * 100;
    (start..32_000).find(|&port| TcpListener::bind(("127.0.0.1", port)).is_ok()).expect("a free port below 32000")
}

impl RedisServer {
    /// Starts a fresh server on a free port, or `None` when redis-server is
    /// not installed and not required.
    pub fn start() -> Option<Self> {
        Self::start_with(&[])
    }

    /// The same with extra arguments (see [`RedisServer::start_on`]).
    pub fn start_with(extra: &[&str]) -> Option<Self> {
        Self::on_free_port(|port| Self::try_start_on(port, extra))
    }

    /// `start(port)` on a free port. A server that exits at once (another
    /// socket took the port after it was found free) is started again on
    /// another one.
    fn on_free_port(start: impl Fn(u16) -> Result<Option<Self>, String>) -> Option<Self> {
        Self::on_port_from(free_port, start)
    }

    /// [`RedisServer::on_free_port`] with ports from `pick`.
    fn on_port_from(pick: fn() -> u16, start: impl Fn(u16) -> Result<Option<Self>, String>) -> Option<Self> {
        let mut failures = Vec::new();
        for _ in 0..5 {
            match start(pick()) {
                Ok(server) => return server,
                Err(failure) => failures.push(failure),
            }
        }
        panic!("redis-server did not start on 5 free ports: {failures:?}");
    }

    /// Starts a server on `port` with extra arguments (later arguments win,
    /// so `extra` may override the defaults, e.g. `--appendonly yes`).
    pub fn start_on(port: u16, extra: &[&str]) -> Option<Self> {
        Self::try_start_on(port, extra).unwrap_or_else(|failure| panic!("{failure}"))
    }

    fn try_start_on(port: u16, extra: &[&str]) -> Result<Option<Self>, String> {
        let mut args: Vec<String> =
            ["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
                .iter()
                .map(|a| a.to_string())
                .collect();
        args.extend(["--databases".to_owned(), DATABASES.to_string()]);
        // Replicas and shutdowns write RDB files; keep them out of the source tree.
        args.extend(["--dir".to_owned(), scratch_dir("redis").display().to_string()]);
        args.extend(extra.iter().map(|a| a.to_string()));
        Self::try_spawn(port, &args, &[])
    }

    /// Starts a TLS-only server (`--port 0 --tls-port`) with the
    /// certificates in `tls`.
    pub fn start_tls(tls: &TlsFiles) -> Option<Self> {
        Self::on_free_port(|port| Self::try_start_tls_with(port, tls, &[]))
    }

    /// Starts a TLS-only server on `port` with extra arguments.
    fn try_start_tls_with(port: u16, tls: &TlsFiles, extra: &[&str]) -> Result<Option<Self>, String> {
        let pairs = [
            ("--port", "0".to_owned()),
            ("--tls-port", port.to_string()),
            ("--bind", "127.0.0.1".to_owned()),
            ("--save", String::new()),
            ("--appendonly", "no".to_owned()),
            ("--dir", scratch_dir("redis-tls").display().to_string()),
        ];
        let mut args: Vec<String> = pairs.into_iter().flat_map(|(name, value)| [name.to_owned(), value]).collect();
        args.extend(tls.server_settings().into_iter().flat_map(|(name, value)| [format!("--{name}"), value]));
        args.extend(extra.iter().map(|a| a.to_string()));
        Self::try_spawn(port, &args, &tls.cli_args())
    }

    /// Runs `redis-server args…` and waits until `redis-cli cli_args… -p
    /// port ping` answers.
    pub fn spawn(port: u16, args: &[String], cli_args: &[String]) -> Option<Self> {
        Self::try_spawn(port, args, cli_args).unwrap_or_else(|failure| panic!("{failure}"))
    }

    /// [`RedisServer::spawn`], or why the server exited before it was ready.
    fn try_spawn(port: u16, args: &[String], cli_args: &[String]) -> Result<Option<Self>, String> {
        let mut command = Command::new("redis-server");
        command.args(args).stdout(Stdio::null()).stderr(Stdio::null());
        // The server dies with the thread that started it, even if the test
        // process is killed.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = match command.spawn() {
            Ok(child) => child,
            Err(e) if !redis_required() => {
                eprintln!("skipping Redis test: cannot start redis-server ({e})");
                return Ok(None);
            }
            Err(e) => panic!("redis-server is required (CI) but cannot start: {e}"),
        };
        let mut server = Self { port, child: Some(child), next_db: AtomicU32::new(1), cli_args: cli_args.to_vec() };
        server.wait_ready()?;
        Ok(Some(server))
    }

    /// Runs `redis-cli -p PORT args…` against this server; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(&self.cli_args)
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli is needed next to redis-server");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the server answers; why not if it exited first.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|child| child.try_wait().ok().flatten()) {
                return Err(format!("redis-server for port {} exited at once ({status})", self.port));
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                let ping = Command::new("redis-cli")
                    .args(&self.cli_args)
                    .args(["-p", &self.port.to_string(), "ping"])
                    .output();
                match ping {
                    Ok(out) if String::from_utf8_lossy(&out.stdout).contains("PONG") => return Ok(()),
                    Err(_) => return Ok(()), // no redis-cli: the open port will do
                    _ => {}
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not start", self.port);
    }

    /// A database number no other test of this process uses.
    pub fn fresh_db(&self) -> u32 {
        let db = self.next_db.fetch_add(1, Ordering::Relaxed);
        assert!(db < DATABASES, "out of test databases");
        db
    }

    /// `redis://127.0.0.1:PORT/DB`
    pub fn url(&self, db: u32) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    /// A backend on database `db`.
    pub fn backend(&self, db: u32) -> Arc<dyn Backend> {
        Arc::new(RedisBackend::new(&RedisOptions::new(self.url(db))).unwrap())
    }

    /// Every key in database `db`, read with a raw client.
    pub fn all_keys(&self, db: u32) -> Vec<String> {
        let client = redis::Client::open(self.url(db)).unwrap();
        let mut conn = client.get_connection().unwrap();
        let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
        keys.sort();
        keys
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) the server: a stopped one keeps
    /// its sockets open and answers nothing, as a frozen machine would.
    pub fn freeze(&self, frozen: bool) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Kills the server now (SIGKILL: no shutdown, no final save).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The server shared by the tests of one process, started on first use on
/// a thread that lives as long as the process.
pub fn shared_redis() -> Option<&'static RedisServer> {
    static SERVER: OnceLock<Option<RedisServer>> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                tx.send(RedisServer::start()).unwrap();
                loop {
                    std::thread::park();
                }
            });
            rx.recv().unwrap()
        })
        .as_ref()
}

/// A backend for tests: `memory`, `redis` on a fresh database of the
/// shared server, or `cluster` on the shared cluster (none when Redis is
/// skipped; tests on the cluster keep apart by their unique prefixes).
pub fn backend(kind: &str) -> Option<Arc<dyn Backend>> {
    match kind {
        "memory" => Some(Arc::new(MemoryBackend::new())),
        "redis" => shared_redis().map(|server| server.backend(server.fresh_db())),
        "cluster" => shared_cluster().map(RedisCluster::backend),
        other => panic!("unknown backend {other}"),
    }
}

/// A key prefix no other test uses.
pub fn unique(name: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("t{}-{name}:", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The built component of a role (`cargo xtask build` puts it there).
pub fn role_path(file: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/roles").join(format!("{file}.wasm"));
    assert!(path.exists(), "{} is missing: run `cargo xtask build` first", path.display());
    path
}

/// A spec for role `name` loaded from the component `file`.
pub fn spec(name: &str, file: &str) -> RoleSpec {
    let mut spec = RoleSpec::from_path(role_path(file)).unwrap();
    spec.name = name.to_owned();
    spec
}

/// A host on `backend` with `roles` given as (name, component file).
pub fn host(backend: Arc<dyn Backend>, prefix: &str, roles: &[(&str, &str)]) -> Host {
    host_with_limits(backend, prefix, roles, RoleLimits::default())
}

/// Like [`host`], keeping compiled components in `target/test-compile-cache`,
/// so big roles (JS and Python components are 10–20 MB) compile once for
/// the whole suite.
pub fn cached_host(backend: Arc<dyn Backend>, prefix: &str, roles: &[(&str, &str)]) -> Host {
    let cache = CompileCache::new(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-compile-cache"));
    let host =
        Host::with_options(backend, prefix, HostOptions { cache: Some(cache), ..HostOptions::default() }).unwrap();
    for (name, file) in roles {
        host.load(&spec(name, file)).unwrap();
    }
    host
}

/// Like [`host`], with the same limits for every role.
pub fn host_with_limits(backend: Arc<dyn Backend>, prefix: &str, roles: &[(&str, &str)], limits: RoleLimits) -> Host {
    let host = Host::new(backend, prefix).unwrap();
    for (name, file) in roles {
        let mut spec = spec(name, file);
        spec.limits = limits.clone();
        host.load(&spec).unwrap();
    }
    host
}

/// A host on `backend` with fully specified roles: (name, component file,
/// limits, grants). Counts fuel, so roles may have a fuel limit.
pub fn host_with_specs(backend: Arc<dyn Backend>, prefix: &str, roles: Vec<(&str, &str, RoleLimits, Grants)>) -> Host {
    let host = Host::with_options(backend, prefix, HostOptions { fuel: true, ..HostOptions::default() }).unwrap();
    for (name, file, limits, grants) in roles {
        let mut spec = spec(name, file);
        spec.limits = limits;
        spec.grants = grants;
        host.load(&spec).unwrap();
    }
    host
}

/// Asserts that a command succeeded; its standard output, trimmed.
pub fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Calls a role with a JSON request and parses its JSON response.
pub async fn call_json(host: &Host, role: &str, request: Value) -> Value {
    let response = host
        .call(role, request.to_string().as_bytes())
        .await
        .unwrap_or_else(|e| panic!("call of {role} with {request} failed: {e}"));
    serde_json::from_slice(&response).unwrap_or_else(|e| panic!("{role} answered non-JSON ({e})"))
}

/// Runs one kvprobe operation: `Ok(value)` or `Err(error kind)`.
pub async fn probe(host: &Host, role: &str, op: Value) -> Result<Value, String> {
    let answer = call_json(host, role, op).await;
    match (answer.get("ok"), answer.get("err")) {
        (Some(ok), None) => Ok(ok.clone()),
        (None, Some(err)) => Err(err["kind"].as_str().unwrap().to_owned()),
        _ => panic!("unexpected probe answer {answer}"),
    }
}

/// Generates one `#[tokio::test]` per backend (memory and one Redis
/// server) for each listed async test function taking `(Arc<dyn Backend>,
/// String /* unique prefix */)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let backend = $crate::backend("memory").unwrap();
                    super::$test(backend, $crate::unique(stringify!($test))).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let Some(backend) = $crate::backend("redis") else { return };
                    super::$test(backend, $crate::unique(stringify!($test))).await;
                }
            )*
        }
    };
}

/// Like [`on_both_backends!`], plus a Redis Cluster of three primaries
/// (shared by the tests of the binary, apart by their unique prefixes).
#[macro_export]
macro_rules! on_all_backends {
    ($($test:ident),* $(,)?) => {
        $crate::on_both_backends!($($test),*);
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let Some(backend) = $crate::backend("cluster") else { return };
                    super::$test(backend, $crate::unique(stringify!($test))).await;
                }
            )*
        }
    };
}

/// Whether the test must fail (CI) rather than skip when `what` is missing.
pub fn skip_or_fail(what: &str) -> Option<std::convert::Infallible> {
    if redis_required() {
        panic!("{what} is required (CI) but missing");
    }
    eprintln!("skipping: {what} is missing");
    None
}

/// A fresh scratch directory for this process. (Those of test processes
/// that have ended are removed on the first call.)
pub fn scratch_dir(name: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(remove_dead_scratch_dirs);
    let dir = std::env::temp_dir().join(format!(
        "rolehost-{}-{}-{name}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Removes the scratch directories (`rolehost-{pid}-{n}-{name}`) of
/// processes no longer running: a server the harness started leaves its
/// directory behind, and a killed test run all of them.
fn remove_dead_scratch_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let mut parts = name.to_str().unwrap_or("").splitn(4, '-');
        let (Some("rolehost"), Some(pid), Some(n), Some(_)) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if numeric(pid) && numeric(n) && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Waits until `ready` holds, at most `limit`; panics with `what` otherwise.
pub fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < limit, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The async [`wait_until`]: polls `ready` every 10 ms, failing with
/// `what` after `limit`.
pub async fn eventually(what: &str, limit: Duration, mut ready: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !ready().await {
        assert!(start.elapsed() < limit, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Pages through the keys matching `pattern`, `limit` a page, handing each
/// page to `each` before the next is asked for; fails if the scan does not
/// end.
pub async fn scan_pages(b: &dyn Backend, pattern: &str, limit: usize, mut each: impl AsyncFnMut(ScanPage)) {
    let (mut cursor, mut pages) = (None, 0);
    loop {
        let page = b.scan(pattern, cursor.as_deref(), limit).await.unwrap();
        let next = page.cursor.clone();
        each(page).await;
        pages += 1;
        match next {
            Some(next) => cursor = Some(next),
            None => return,
        }
        assert!(pages < 10_000, "scan does not end");
    }
}

fn have_redis_cli() -> bool {
    Command::new("redis-cli").arg("--version").output().is_ok()
}

/// A Redis Cluster of primaries without replicas, made with
/// `redis-server --cluster-enabled yes` and `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    /// The CA file when the nodes speak only TLS (cluster bus included).
    tls_ca: Option<PathBuf>,
    /// What the nodes are called in the URL: 127.0.0.1, or the hostname
    /// they announce.
    host: &'static str,
}

impl RedisCluster {
    /// Starts `primaries` nodes and joins them; `None` when Redis is
    /// skipped.
    pub fn start(primaries: usize) -> Option<Self> {
        Self::start_with(primaries, None, None)
    }

    /// The same with TLS only, clients and cluster bus alike.
    pub fn start_tls(primaries: usize, tls: &TlsFiles) -> Option<Self> {
        Self::start_with(primaries, Some(tls), None)
    }

    /// A TLS cluster whose nodes announce the hostname `localhost` and
    /// tell clients to use it (`cluster-preferred-endpoint-type
    /// hostname`), as a cluster does whose certificates name hosts rather
    /// than addresses.
    pub fn start_tls_by_hostname(primaries: usize, tls: &TlsFiles) -> Option<Self> {
        Self::start_with(primaries, Some(tls), Some("localhost"))
    }

    fn start_with(primaries: usize, tls: Option<&TlsFiles>, hostname: Option<&'static str>) -> Option<Self> {
        if !have_redis_cli() {
            skip_or_fail("redis-cli")?;
        }
        let nodes = (0..primaries).map(|_| Some(Self::start_node(tls, hostname)?.0)).collect::<Option<Vec<_>>>()?;
        let addresses: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .args(tls.map(TlsFiles::cli_args).unwrap_or_default())
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(out.status.success(), "cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        for node in &nodes {
            wait_until("every node sees a whole cluster", Duration::from_secs(60), || {
                let info = node.cli(&["cluster", "info"]);
                let masters = node.cli(&["cluster", "nodes"]).lines().filter(|l| l.contains("master")).count();
                info.contains("cluster_state:ok") && masters == primaries
            });
        }
        Some(Self { nodes, tls_ca: tls.map(|tls| tls.ca.clone()), host: hostname.unwrap_or("127.0.0.1") })
    }

    /// A cluster-enabled server that belongs to no cluster yet, and its
    /// cluster bus port.
    fn start_node(tls: Option<&TlsFiles>, hostname: Option<&str>) -> Option<(RedisServer, String)> {
        Self::start_node_on(free_port, tls, hostname)
    }

    /// [`RedisCluster::start_node`] on a port from `pick`.
    fn start_node_on(
        pick: fn() -> u16,
        tls: Option<&TlsFiles>,
        hostname: Option<&str>,
    ) -> Option<(RedisServer, String)> {
        let bus = std::cell::RefCell::new(String::new());
        let node = RedisServer::on_port_from(pick, |port| {
            let config = scratch_dir("cluster").join(format!("nodes-{port}.conf")).display().to_string();
            *bus.borrow_mut() = free_port().to_string();
            let bus = bus.borrow().clone();
            let mut args = vec!["--cluster-enabled", "yes", "--cluster-port", &bus, "--cluster-config-file", &config];
            if let Some(hostname) = hostname {
                args.extend(["--cluster-announce-hostname", hostname, "--cluster-preferred-endpoint-type", "hostname"]);
            }
            match tls {
                Some(tls) => {
                    RedisServer::try_start_tls_with(port, tls, &[&args[..], &["--tls-cluster", "yes"]].concat())
                }
                None => RedisServer::try_start_on(port, &args),
            }
        })?;
        Some((node, bus.into_inner()))
    }

    /// Adds a primary that owns no slot yet (as before a resharding onto
    /// a new node) and waits until every node knows it; its index.
    pub fn add_empty_primary(&mut self) -> Option<usize> {
        assert!(self.tls_ca.is_none(), "plain clusters only");
        let (node, bus) = Self::start_node(None, None)?;
        let meet = self.nodes[0].cli(&["cluster", "meet", "127.0.0.1", &node.port.to_string(), &bus]);
        assert_eq!(meet.trim(), "OK", "CLUSTER MEET: {meet}");
        self.nodes.push(node);
        let count = self.nodes.len();
        for node in &self.nodes {
            wait_until("every node knows the new one", Duration::from_secs(60), || {
                let nodes = node.cli(&["cluster", "nodes"]);
                let known = nodes.lines().filter(|l| l.contains("master") && l.contains(" connected")).count();
                known == count && node.cli(&["cluster", "info"]).contains("cluster_state:ok")
            });
        }
        Some(count - 1)
    }

    /// Adds a replica of node `primary` on a port below those of the
    /// nodes started before (so that its address sorts first) and waits
    /// until it is in sync and every node knows it; its index.
    pub fn add_low_replica(&mut self, primary: usize) -> Option<usize> {
        assert!(self.tls_ca.is_none(), "plain clusters only");
        let (node, bus) = Self::start_node_on(low_free_port, None, None)?;
        let meet = self.nodes[0].cli(&["cluster", "meet", "127.0.0.1", &node.port.to_string(), &bus]);
        assert_eq!(meet.trim(), "OK", "CLUSTER MEET: {meet}");
        let primary_id = self.node_id(primary);
        wait_until("the new node knows the primary", Duration::from_secs(60), || {
            node.cli(&["cluster", "nodes"]).contains(&primary_id)
        });
        let replicate = node.cli(&["cluster", "replicate", &primary_id]);
        assert_eq!(replicate.trim(), "OK", "CLUSTER REPLICATE: {replicate}");
        wait_until("the replica is in sync", Duration::from_secs(60), || {
            node.cli(&["info", "replication"]).contains("master_link_status:up")
        });
        self.nodes.push(node);
        let id = self.node_id(self.nodes.len() - 1);
        for node in &self.nodes {
            wait_until("every node knows the replica", Duration::from_secs(60), || {
                let nodes = node.cli(&["cluster", "nodes"]);
                nodes.lines().any(|l| l.starts_with(&id) && l.contains("slave") && l.contains(&primary_id))
            });
        }
        Some(self.nodes.len() - 1)
    }

    /// Makes node `replica` the primary of its part of the cluster
    /// (`CLUSTER FAILOVER`: it first catches up with the primary) and waits
    /// until every node sees it so.
    pub fn failover(&self, replica: usize) {
        let answer = self.nodes[replica].cli(&["cluster", "failover"]);
        assert_eq!(answer.trim(), "OK", "CLUSTER FAILOVER: {answer}");
        let id = self.node_id(replica);
        for node in &self.nodes {
            wait_until("every node sees the new primary", Duration::from_secs(60), || {
                let nodes = node.cli(&["cluster", "nodes"]);
                let promoted = nodes.lines().any(|l| l.starts_with(&id) && l.contains("master"));
                promoted && node.cli(&["cluster", "info"]).contains("cluster_state:ok")
            });
        }
    }

    /// The cluster node id of node `index`.
    pub fn node_id(&self, index: usize) -> String {
        self.nodes[index].cli(&["cluster", "myid"]).trim().to_owned()
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,…`, or with TLS
    /// `rediss+cluster://…?ca=CA` (with the hostname the nodes announce,
    /// if they do).
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self.nodes.iter().map(|n| format!("{}:{}", self.host, n.port)).collect();
        match &self.tls_ca {
            Some(ca) => format!("rediss+cluster://{}?ca={}", nodes.join(","), ca.display()),
            None => format!("redis+cluster://{}", nodes.join(",")),
        }
    }

    /// A backend on the cluster.
    pub fn backend(&self) -> Arc<dyn Backend> {
        Arc::new(RedisBackend::new(&RedisOptions::new(self.url())).unwrap())
    }

    /// The number of keys each node holds, in node order.
    pub fn keys_per_node(&self, pattern: &str) -> Vec<usize> {
        self.nodes.iter().map(|n| n.cli(&["--scan", "--pattern", pattern]).lines().count()).collect()
    }
}

/// The cluster shared by the tests of one process (three primaries),
/// started on first use on a thread that lives as long as the process.
pub fn shared_cluster() -> Option<&'static RedisCluster> {
    static CLUSTER: OnceLock<Option<RedisCluster>> = OnceLock::new();
    CLUSTER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                tx.send(RedisCluster::start(3)).unwrap();
                loop {
                    std::thread::park();
                }
            });
            rx.recv().unwrap()
        })
        .as_ref()
}

/// The password of the TLS Sentinel ([`RedisSentinels::start_tls`]).
pub const SENTINEL_PASSWORD: &str = "sentinel-secret-for-tests";

/// The primary name the Sentinel setup monitors.
pub const SENTINEL_PRIMARY: &str = "rolehost";

/// A primary, its replicas and three Sentinels (quorum 2) watching them.
pub struct RedisSentinels {
    pub primary: RedisServer,
    pub replicas: Vec<RedisServer>,
    pub sentinels: Vec<RedisServer>,
    /// The CA file when every server speaks only TLS.
    tls_ca: Option<PathBuf>,
}

impl RedisSentinels {
    /// Starts everything and waits until the Sentinels know each other and
    /// the replica; `None` when Redis is skipped.
    pub fn start(replicas: usize) -> Option<Self> {
        Self::start_with(replicas, 3, None)
    }

    /// A TLS-only primary and one TLS-only Sentinel watching it (over
    /// TLS) that asks its clients for [`SENTINEL_PASSWORD`].
    pub fn start_tls(tls: &TlsFiles) -> Option<Self> {
        Self::start_with(0, 1, Some(tls))
    }

    fn start_with(replicas: usize, count: usize, tls: Option<&TlsFiles>) -> Option<Self> {
        if !have_redis_cli() {
            skip_or_fail("redis-cli")?;
        }
        let dir = scratch_dir("sentinel");
        let primary = match tls {
            Some(tls) => RedisServer::start_tls(tls)?,
            None => RedisServer::start()?,
        };
        let primary_port = primary.port.to_string();
        let replicas = (0..replicas)
            .map(|_| RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary_port]))
            .collect::<Option<Vec<_>>>()?;
        wait_until("the replicas are in sync", Duration::from_secs(30), || {
            primary.cli(&["info", "replication"]).matches("state=online").count() == replicas.len()
        });
        let mut sentinels = Vec::new();
        for _ in 0..count {
            let sentinel = RedisServer::on_free_port(|port| {
                let config = dir.join(format!("sentinel-{port}.conf"));
                let (listen, cli_args) = match tls {
                    // `tls-replication` makes the Sentinel use TLS to the
                    // servers. It also wants a password (a single Sentinel:
                    // no other one needs to know it).
                    Some(tls) => {
                        let settings =
                            tls.server_settings().into_iter().map(|(name, value)| format!("{name} {value}\n"));
                        let listen = format!(
                            "port 0\ntls-port {port}\ntls-replication yes\nrequirepass {SENTINEL_PASSWORD}\n{}",
                            settings.collect::<String>()
                        );
                        let password = ["-a", SENTINEL_PASSWORD, "--no-auth-warning"].map(String::from);
                        (listen, [tls.cli_args(), password.to_vec()].concat())
                    }
                    None => (format!("port {port}\n"), Vec::new()),
                };
                std::fs::write(
                    &config,
                    format!(
                        "{listen}bind 127.0.0.1\ndir {dir}\n\
                     sentinel monitor {SENTINEL_PRIMARY} 127.0.0.1 {primary_port} {quorum}\n\
                     sentinel down-after-milliseconds {SENTINEL_PRIMARY} 1000\n\
                     sentinel failover-timeout {SENTINEL_PRIMARY} 10000\n",
                        dir = dir.display(),
                        quorum = count.min(2),
                    ),
                )
                .unwrap();
                let args = [config.display().to_string(), "--sentinel".to_owned()];
                RedisServer::try_spawn(port, &args, &cli_args)
            });
            sentinels.push(sentinel?);
        }
        for sentinel in &sentinels {
            wait_until("the Sentinels know each other and the replica", Duration::from_secs(60), || {
                let master = sentinel.cli(&["sentinel", "master", SENTINEL_PRIMARY]);
                let field = |name: &str| {
                    let mut lines = master.lines();
                    while let Some(line) = lines.next() {
                        if line == name {
                            return lines.next().unwrap_or_default().to_owned();
                        }
                    }
                    String::new()
                };
                field("num-other-sentinels") == (count - 1).to_string()
                    && field("num-slaves") == replicas.len().to_string()
                    && field("flags") == "master"
            });
        }
        Some(Self { primary, replicas, sentinels, tls_ca: tls.map(|tls| tls.ca.clone()) })
    }

    /// `redis+sentinel://127.0.0.1:S1,…/rolehost` plus `query` (`?…` or
    /// ""); with TLS `rediss+sentinel://…?ca=CA` (then `query` must start
    /// with `&`).
    pub fn url(&self, query: &str) -> String {
        let nodes: Vec<String> = self.sentinels.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        match &self.tls_ca {
            Some(ca) => format!("rediss+sentinel://{}/{SENTINEL_PRIMARY}?ca={}{query}", nodes.join(","), ca.display()),
            None => format!("redis+sentinel://{}/{SENTINEL_PRIMARY}{query}", nodes.join(",")),
        }
    }

    /// The port of the server the Sentinels currently call the primary.
    pub fn primary_port(&self) -> Option<u16> {
        let answer = self.sentinels[0].cli(&["sentinel", "get-master-addr-by-name", SENTINEL_PRIMARY]);
        answer.lines().nth(1)?.trim().parse().ok()
    }
}

/// A CA, a server certificate it signed for 127.0.0.1 and localhost, and
/// an unrelated CA, made with the openssl command-line tool.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub other_ca: PathBuf,
}

impl TlsFiles {
    /// A TLS server's settings (name, value) with these files; clients
    /// need no certificate.
    pub fn server_settings(&self) -> Vec<(&'static str, String)> {
        let path = |p: &PathBuf| p.display().to_string();
        vec![
            ("tls-cert-file", path(&self.server_cert)),
            ("tls-key-file", path(&self.server_key)),
            ("tls-ca-cert-file", path(&self.ca)),
            ("tls-auth-clients", "no".to_owned()),
        ]
    }

    /// What redis-cli needs to talk TLS with such a server.
    pub fn cli_args(&self) -> Vec<String> {
        vec!["--tls".to_owned(), "--cacert".to_owned(), self.ca.display().to_string()]
    }

    /// Generates the files, the server's certificate valid for 127.0.0.1
    /// and localhost; `None` when openssl is missing and not required.
    pub fn generate() -> Option<Self> {
        Self::generate_for("IP:127.0.0.1,DNS:localhost")
    }

    /// The same with a server certificate valid only for `names` (an
    /// X.509 `subjectAltName` value).
    pub fn generate_for(names: &str) -> Option<Self> {
        if Command::new("openssl").arg("version").output().is_err() {
            skip_or_fail("openssl")?;
        }
        let dir = scratch_dir("tls");
        let file = |name: &str| dir.join(name).display().to_string();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl").args(args).output().unwrap();
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"];
        for (ca, key) in [("ca.crt", "ca.key"), ("other-ca.crt", "other-ca.key")] {
            let (subject, key, ca) = (format!("/CN=rolehost test {ca}"), file(key), file(ca));
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &ca, "-subj", &subject]);
            openssl(&args);
        }
        let (key, csr) = (file("server.key"), file("server.csr"));
        let mut args = vec!["req"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=localhost"]);
        openssl(&args);
        std::fs::write(dir.join("ext.cnf"), format!("subjectAltName={names}\n")).unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            &file("server.csr"),
            "-CA",
            &file("ca.crt"),
            "-CAkey",
            &file("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &file("ext.cnf"),
            "-out",
            &file("server.crt"),
        ]);
        Some(Self {
            ca: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            other_ca: dir.join("other-ca.crt"),
        })
    }
}
