//! `rediss://` against a TLS-only redis-server (`--port 0 --tls-port`),
//! with a CA and a server certificate the test generates; and
//! `rediss+cluster://` and `rediss+sentinel://` against a TLS-only Cluster
//! and a TLS-only Sentinel with its primary.

use rolehost::backend::{Backend, RedisBackend, RedisOptions};
use rolehost::config::StateConfig;
use rolehost::manifest::RedisSection;
use rolehost::StateError;
use rolehost_tests::{RedisCluster, RedisSentinels, RedisServer, TlsFiles, SENTINEL_PASSWORD};

fn redis_section(ca_file: Option<std::path::PathBuf>) -> RedisSection {
    let mut section = RedisSection::default();
    section.op_timeout_ms = Some(1000);
    section.ca_file = ca_file;
    section
}

#[tokio::test]
async fn rediss_with_the_right_ca_works_and_a_wrong_ca_is_refused_clearly() {
    let Some(tls) = TlsFiles::generate() else { return };
    let Some(server) = RedisServer::start_tls(&tls) else { return };
    let url = format!("rediss://127.0.0.1:{}/0", server.port);

    // The CA in the URL.
    let backend =
        StateConfig::parse(&format!("{url}?ca={}", tls.ca.display()), &redis_section(None)).unwrap().connect().unwrap();
    backend.set("k", b"over tls", None).await.unwrap();
    assert_eq!(backend.get("k", None).await.unwrap(), Some(b"over tls".to_vec()));
    assert!(server.cli(&["get", "k"]).contains("over tls"), "the server has it");

    // The CA from the manifest's [redis] ca-file.
    let backend = StateConfig::parse(&url, &redis_section(Some(tls.ca.clone()))).unwrap().connect().unwrap();
    assert_eq!(backend.get("k", None).await.unwrap(), Some(b"over tls".to_vec()));

    // A CA that did not sign the server's certificate.
    let backend = StateConfig::parse(&url, &redis_section(Some(tls.other_ca.clone()))).unwrap().connect().unwrap();
    let error = backend.get("k", None).await.unwrap_err();
    let StateError::Unavailable(message) = &error else { panic!("expected unavailable, got {error:?}") };
    assert!(message.contains("certificate") || message.contains("UnknownIssuer"), "unclear error: {message}");

    // Plain text to a TLS port gets nowhere, and says so.
    let plain = StateConfig::parse(&format!("redis://127.0.0.1:{}/0", server.port), &redis_section(None))
        .unwrap()
        .connect()
        .unwrap();
    assert!(matches!(plain.get("k", None).await, Err(StateError::Unavailable(_))));
}

#[test]
fn a_missing_ca_file_or_a_ca_without_tls_is_a_configuration_error() {
    let missing = StateConfig::parse("rediss://127.0.0.1:1/0?ca=/nonexistent/ca.pem", &RedisSection::default())
        .unwrap()
        .connect()
        .err()
        .unwrap()
        .to_string();
    assert!(missing.contains("cannot read the Redis CA certificate /nonexistent/ca.pem"), "{missing}");
    let plain = StateConfig::parse("redis://127.0.0.1:1/0?ca=/x.pem", &RedisSection::default())
        .unwrap()
        .connect()
        .err()
        .unwrap()
        .to_string();
    assert!(plain.contains("rediss://"), "{plain}");
}

#[tokio::test]
async fn an_acl_user_logs_in_over_tls_with_the_password_given_apart_from_the_url() {
    let Some(tls) = TlsFiles::generate() else { return };
    let Some(server) = RedisServer::start_tls(&tls) else { return };
    assert!(server.cli(&["acl", "setuser", "app", "on", ">s3cret", "~app:*", "+@all"]).contains("OK"));
    let url = format!("rediss://app@127.0.0.1:{}/0?ca={}", server.port, tls.ca.display());
    let login = |password: &str| {
        let mut options = RedisOptions::new(url.clone());
        options.password = Some(password.to_owned());
        options.op_timeout = std::time::Duration::from_secs(1);
        RedisBackend::new(&options).unwrap()
    };
    let app = login("s3cret");
    app.set("app:k", b"v", None).await.unwrap();
    assert_eq!(app.get("app:k", None).await.unwrap(), Some(b"v".to_vec()));
    assert!(matches!(app.get("other:k", None).await, Err(StateError::AccessDenied(_))), "the ACL applies");
    assert!(login("wrong").get("app:k", None).await.is_err(), "a wrong password gets nowhere");
    let in_url = StateConfig::parse(&format!("rediss://app:s3cret@127.0.0.1:{}/0", server.port), &redis_section(None))
        .unwrap()
        .connect()
        .err()
        .unwrap()
        .to_string();
    assert!(in_url.contains("REDIS_PASSWORD"), "{in_url}");
}

/// A CA that did not sign the servers' certificates fails clearly.
async fn wrong_ca_is_refused(url_with_ca: &str, tls: &TlsFiles) {
    let url = url_with_ca.replace(&tls.ca.display().to_string(), &tls.other_ca.display().to_string());
    assert_ne!(url, url_with_ca);
    let error =
        StateConfig::parse(&url, &redis_section(None)).unwrap().connect().unwrap().get("k", None).await.unwrap_err();
    let StateError::Unavailable(message) = &error else { panic!("expected unavailable, got {error:?}") };
    assert!(message.contains("certificate") || message.contains("UnknownIssuer"), "unclear error: {message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_is_reached_with_a_rediss_cluster_url() {
    let Some(tls) = TlsFiles::generate() else { return };
    let Some(cluster) = RedisCluster::start_tls(3, &tls) else { return };
    every_primary_is_reached_over_tls(&cluster, &tls).await;
}

/// Nodes whose certificates name only a host, which the cluster tells
/// clients to use: rolehost's own connections (listing, health) must go by
/// that name too, not by the address, or TLS refuses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_that_names_its_nodes_by_hostname_is_reached_by_hostname() {
    let Some(tls) = TlsFiles::generate_for("DNS:localhost") else { return };
    let Some(cluster) = RedisCluster::start_tls_by_hostname(3, &tls) else { return };
    every_primary_is_reached_over_tls(&cluster, &tls).await;
}

/// Writes and reads keys on every primary of `cluster`, lists them, asks
/// for health, and checks that a wrong CA is refused.
async fn every_primary_is_reached_over_tls(cluster: &RedisCluster, tls: &TlsFiles) {
    let url = cluster.url();
    assert!(url.starts_with("rediss+cluster://"), "{url}");
    let backend = StateConfig::parse(&url, &redis_section(None)).unwrap().connect().unwrap();
    let entries: Vec<(String, Vec<u8>)> = (0..60).map(|i| (format!("tls:{i}"), vec![b'v'; i])).collect();
    backend.set_many(&entries, None).await.unwrap();
    let keys: Vec<String> = entries.iter().map(|(k, _)| k.clone()).collect();
    let values: Vec<Vec<u8>> = backend.get_many(&keys, None).await.unwrap().into_iter().map(Option::unwrap).collect();
    assert_eq!(values, entries.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>());
    let per_node = cluster.keys_per_node("tls:*");
    assert!(per_node.iter().all(|&n| n > 0), "keys on every primary, each reached over TLS: {per_node:?}");
    // Listing visits every primary (routed to each by address).
    assert_eq!(backend.delete_matching("tls:*").await.unwrap(), 60);
    assert_eq!(backend.health().await.unwrap().details["topology"], "cluster");
    wrong_ca_is_refused(&url, tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_sentinel_and_its_primary_are_reached_with_a_rediss_sentinel_url() {
    let Some(tls) = TlsFiles::generate() else { return };
    let Some(setup) = RedisSentinels::start_tls(&tls) else { return };
    let url = setup.url("");
    assert!(url.starts_with("rediss+sentinel://"), "{url}");
    let StateConfig::Redis(mut options) = StateConfig::parse(&url, &redis_section(None)).unwrap() else {
        panic!("a Redis URL")
    };
    // The Sentinel wants a password: without it, no primary is found.
    let error = RedisBackend::new(&options).unwrap().get("k", None).await.unwrap_err();
    assert!(
        matches!(&error, StateError::AccessDenied(m) if m.contains("REDIS_SENTINEL_PASSWORD")),
        "the login refusal says what to set: {error:?}"
    );
    options.sentinel_password = Some(SENTINEL_PASSWORD.to_owned());
    let backend = RedisBackend::new(&options).unwrap();
    backend.set("k", b"through a TLS sentinel", None).await.unwrap();
    assert_eq!(backend.get("k", None).await.unwrap(), Some(b"through a TLS sentinel".to_vec()));
    assert!(setup.primary.cli(&["get", "k"]).contains("through a TLS sentinel"), "the primary has it");
    assert_eq!(backend.health().await.unwrap().details["topology"], "sentinel");
    wrong_ca_is_refused(&url, &tls).await;
}
