//! The real `rolehost` binary on Redis's distributed and secured
//! deployments: `serve` on a Cluster and through a Sentinel failover, `call`
//! over TLS with the CA from `ROLEHOST_REDIS_CA`, ACL users on a Cluster.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

use std::time::{Duration, Instant};

use rolehost_tests::{ok, role_path, scratch_dir, shared_cluster, wait_until, RedisSentinels, RedisServer, TlsFiles};

fn counter_manifest(name: &str, state: &str) -> std::path::PathBuf {
    let path = scratch_dir(name).join("roles.toml");
    let text =
        format!("state = \"{state}\"\n[[roles]]\nname = \"counter\"\nwasm = \"{}\"\n", role_path("counter").display());
    std::fs::write(&path, text).unwrap();
    path
}

fn call(manifest: &std::path::Path, ca: Option<&std::path::Path>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rolehost"));
    command.args(["call", "--manifest", manifest.to_str().unwrap(), "counter"]).env_remove("ROLEHOST_STATE");
    match ca {
        Some(ca) => command.env("ROLEHOST_REDIS_CA", ca),
        None => command.env_remove("ROLEHOST_REDIS_CA"),
    };
    command.output().unwrap()
}

#[test]
fn call_over_tls_trusts_the_ca_from_the_environment_and_refuses_another() {
    let Some(tls) = TlsFiles::generate() else { return };
    let Some(server) = RedisServer::start_tls(&tls) else { return };
    let manifest = counter_manifest("tls", &format!("rediss://127.0.0.1:{}/0", server.port));
    assert_eq!(ok(call(&manifest, Some(&tls.ca))), "1");
    assert_eq!(ok(call(&manifest, Some(&tls.ca))), "2");
    let refused = call(&manifest, Some(&tls.other_ca));
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("certificate") || stderr.contains("UnknownIssuer"), "unclear error: {stderr}");
}

/// `rolehost serve` on `manifest`, killed on drop.
struct Serve {
    child: std::process::Child,
    base: String,
    agent: ureq::Agent,
}

impl Serve {
    fn start(manifest: &std::path::Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rolehost"))
            .args(["serve", "--manifest", manifest.to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .env_remove("ROLEHOST_STATE")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let base =
            line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected: {line:?}")).to_owned();
        let agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        Self { child, base, agent }
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut response = self.agent.get(format!("{}{path}", self.base)).call().unwrap();
        (response.status().as_u16(), response.body_mut().read_to_string().unwrap())
    }

    fn post(&self, path: &str) -> (u16, String) {
        let mut response = self.agent.post(format!("{}{path}", self.base)).send("").unwrap();
        (response.status().as_u16(), response.body_mut().read_to_string().unwrap())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serve_on_a_cluster_is_ready_and_reports_the_topology() {
    let Some(cluster) = shared_cluster() else { return };
    let server = Serve::start(&counter_manifest("serve-cluster", &cluster.url()));
    assert_eq!(server.get("/readyz").0, 200);
    let health: serde_json::Value = serde_json::from_str(&server.get("/health").1).unwrap();
    assert_eq!(health["backend"]["details"]["topology"], "cluster", "{health}");
    assert_eq!(health["backend"]["details"]["primaries"], "3", "{health}");
    assert_eq!(server.post("/roles/counter"), (200, "1".into()));
}

#[test]
fn serve_rides_out_a_sentinel_failover_without_losing_an_acknowledged_increment() {
    let Some(mut setup) = RedisSentinels::start(2) else { return };
    let server = Serve::start(&counter_manifest("serve-sentinel", &setup.url("?wait-replicas=1")));
    assert_eq!(server.get("/readyz").0, 200);
    let mut last = 0;
    for _ in 0..50 {
        let (status, body) = server.post("/roles/counter");
        assert_eq!(status, 200, "{body}");
        last = body.parse().unwrap();
    }
    let old = setup.primary.port;
    setup.primary.kill();
    let (start, mut failed) = (Instant::now(), 0);
    let next: u64 = loop {
        assert!(start.elapsed() < Duration::from_secs(120), "never served again");
        match server.post("/roles/counter") {
            (200, body) => break body.parse().unwrap(),
            (503, _) => failed += 1,
            (status, body) => panic!("a failover must look like 503, not {status} {body}"),
        }
    };
    assert!(next > last, "acknowledged {last}, then counted {next}: an acknowledged increment was lost");
    assert!(failed <= 30, "{failed} calls failed during the failover");
    wait_until("the Sentinels name a new primary", Duration::from_secs(60), || {
        setup.primary_port().is_some_and(|port| port != old)
    });
    assert_eq!(server.get("/readyz").0, 200);
}

#[test]
fn acl_users_work_on_a_cluster() {
    let Some(cluster) = shared_cluster() else { return };
    acl_users_work(&cluster.url(), "cluster-acl", &cluster.nodes.iter().collect::<Vec<_>>());
}

/// Through Sentinels too: the users go to the replicas as well (Redis
/// does not replicate them, and a replica may be promoted), and the role's
/// user may ask the server the Sentinels name whether it is the primary
/// (`ROLE`).
#[test]
fn acl_users_work_through_sentinels() {
    let Some(setup) = RedisSentinels::start(1) else { return };
    acl_users_work(&setup.url(""), "sentinel-acl", &[&setup.primary, &setup.replicas[0]]);
}

/// `acl --apply` makes the role's user on every one of `servers`; a role
/// then reads, writes, lists, locks and clears as that user.
fn acl_users_work(url: &str, name: &str, servers: &[&RedisServer]) {
    let rolehost = |manifest: &std::path::Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_rolehost"))
            .args(args)
            .arg("--manifest")
            .arg(manifest)
            .env_remove("ROLEHOST_STATE")
            .env_remove("REDIS_PASSWORD")
            .env("ROLEHOST_ACL_SECRET", "deployment-secret-for-tests")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let dir = scratch_dir(name);
    let manifest = dir.join("roles.toml");
    let roles = |acl_users: bool| {
        format!(
            "global-prefix = \"acl:\"\nstate = \"{url}\"\n[redis]\nacl-users = {acl_users}\n\
             [[roles]]\nname = \"probe\"\nwasm = \"{probe}\"\n",
            probe = role_path("kvprobe").display(),
        )
    };
    std::fs::write(&manifest, roles(false)).unwrap();
    ok(rolehost(&manifest, &["acl", "--apply"]));
    for server in servers {
        assert!(server.cli(&["acl", "list"]).contains("user rolehost-probe on"), "every server has the user");
    }
    std::fs::write(&manifest, roles(true)).unwrap();
    let call = |body: &str| ok(rolehost(&manifest, &["call", "probe", body]));
    // Keys and locks (on every primary of a Cluster), listing across
    // them, as the role's user.
    let set_many = r#"{"op":"set_many","entries":{},"count":50}"#;
    assert_eq!(call(set_many), r#"{"ok":null}"#);
    assert_eq!(call(r#"{"op":"list_all","pattern":"bulk:4?"}"#).matches("bulk:").count(), 10);
    assert!(call(r#"{"op":"lock_takeover","name":"l"}"#).contains(r#""owner_release":true"#));
    assert_eq!(call(r#"{"op":"clear"}"#), r#"{"ok":50}"#);
}
