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
