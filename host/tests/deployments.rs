//! The real `rolehost` binary on Redis's distributed and secured
//! deployments: `serve` on a Cluster, `call` over TLS with the CA from
//! `ROLEHOST_REDIS_CA`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

use rolehost_tests::{ok, role_path, scratch_dir, shared_cluster, RedisServer, TlsFiles};

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

#[test]
fn serve_on_a_cluster_is_ready_and_reports_the_topology() {
    let Some(cluster) = shared_cluster() else { return };
    let manifest = counter_manifest("serve-cluster", &cluster.url());
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
    let base = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected: {line:?}")).to_owned();
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let get = |path: &str| {
        let mut response = agent.get(format!("{base}{path}")).call().unwrap();
        (response.status().as_u16(), response.body_mut().read_to_string().unwrap())
    };
    assert_eq!(get("/readyz").0, 200);
    let health: serde_json::Value = serde_json::from_str(&get("/health").1).unwrap();
    assert_eq!(health["backend"]["details"]["topology"], "cluster", "{health}");
    assert_eq!(health["backend"]["details"]["primaries"], "3", "{health}");
    let mut response = agent.post(format!("{base}/roles/counter")).send("").unwrap();
    assert_eq!((response.status().as_u16(), response.body_mut().read_to_string().unwrap()), (200, "1".into()));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn acl_users_work_on_a_cluster() {
    let Some(cluster) = shared_cluster() else { return };
    let rolehost = |manifest: &std::path::Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_rolehost"))
            .args(args)
            .arg("--manifest")
            .arg(manifest)
            .env_remove("ROLEHOST_STATE")
            .env_remove("REDIS_PASSWORD")
            .env("ROLEHOST_ACL_SECRET", "cluster-secret")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let dir = scratch_dir("cluster-acl");
    let manifest = dir.join("roles.toml");
    let roles = |acl_users: bool| {
        format!(
            "global-prefix = \"acl:\"\nstate = \"{url}\"\n[redis]\nacl-users = {acl_users}\n\
             [[roles]]\nname = \"probe\"\nwasm = \"{probe}\"\n",
            url = cluster.url(),
            probe = role_path("kvprobe").display(),
        )
    };
    std::fs::write(&manifest, roles(false)).unwrap();
    ok(rolehost(&manifest, &["acl", "--apply"]));
    for node in &cluster.nodes {
        assert!(node.cli(&["acl", "list"]).contains("user rolehost-probe on"), "every node has the user");
    }
    std::fs::write(&manifest, roles(true)).unwrap();
    let call = |body: &str| ok(rolehost(&manifest, &["call", "probe", body]));
    // Keys and locks on every primary, listing across them, as the role's user.
    let set_many = r#"{"op":"set_many","entries":{},"count":50}"#;
    assert_eq!(call(set_many), r#"{"ok":null}"#);
    assert_eq!(call(r#"{"op":"list_all","pattern":"bulk:4?"}"#).matches("bulk:").count(), 10);
    assert!(call(r#"{"op":"lock_takeover","name":"l"}"#).contains(r#""owner_release":true"#));
    assert_eq!(call(r#"{"op":"clear"}"#), r#"{"ok":50}"#);
}
