//! Shared support for the integration tests: a real `redis-server` on a
//! free loopback port, the built role components, and small helpers.
//!
//! Without redis-server the Redis tests are skipped with a message, except
//! when `CI=true` or `ROLEHOST_REQUIRE_REDIS=1`, where they fail.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rolehost::backend::{Backend, MemoryBackend, RedisBackend, RedisOptions};
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
}

fn redis_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("ROLEHOST_REQUIRE_REDIS").is_ok_and(|v| v == "1")
}

/// A free loopback port (free when asked; the caller binds it soon after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl RedisServer {
    /// Starts a fresh server on a free port, or `None` when redis-server is
    /// not installed and not required.
    pub fn start() -> Option<Self> {
        Self::start_on(free_port(), &[])
    }

    /// Starts a server on `port` with extra arguments.
    pub fn start_on(port: u16, extra: &[&str]) -> Option<Self> {
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--databases", &DATABASES.to_string()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
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
                return None;
            }
            Err(e) => panic!("redis-server is required (CI) but cannot start: {e}"),
        };
        let server = Self { port, child: Some(child), next_db: AtomicU32::new(1) };
        server.wait_ready();
        Some(server)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                let ping = Command::new("redis-cli").args(["-p", &self.port.to_string(), "ping"]).output();
                match ping {
                    Ok(out) if String::from_utf8_lossy(&out.stdout).contains("PONG") => return,
                    Err(_) => return, // no redis-cli: the open port will do
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

    /// Kills the server now.
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

/// A backend for tests: `memory`, or `redis` on a fresh database of the
/// shared server (none when Redis is skipped).
pub fn backend(kind: &str) -> Option<Arc<dyn Backend>> {
    match kind {
        "memory" => Some(Arc::new(MemoryBackend::new())),
        "redis" => shared_redis().map(|server| server.backend(server.fresh_db())),
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

/// Generates one `#[tokio::test]` per backend for each listed async test
/// function taking `(Arc<dyn Backend>, String /* unique prefix */)`.
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
