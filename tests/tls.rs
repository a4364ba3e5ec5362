//! `rediss://` against a TLS-only redis-server (`--port 0 --tls-port`),
//! with a CA and a server certificate the test generates.

use rolehost::backend::{Backend, RedisBackend, RedisOptions};
use rolehost::config::StateConfig;
use rolehost::manifest::RedisSection;
use rolehost::StateError;
use rolehost_tests::{RedisServer, TlsFiles};

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
    assert_eq!(backend.get("k").await.unwrap(), Some(b"over tls".to_vec()));
    assert!(server.cli(&["get", "k"]).contains("over tls"), "the server has it");

    // The CA from the manifest's [redis] ca-file.
    let backend = StateConfig::parse(&url, &redis_section(Some(tls.ca.clone()))).unwrap().connect().unwrap();
    assert_eq!(backend.get("k").await.unwrap(), Some(b"over tls".to_vec()));

    // A CA that did not sign the server's certificate.
    let backend = StateConfig::parse(&url, &redis_section(Some(tls.other_ca.clone()))).unwrap().connect().unwrap();
    let error = backend.get("k").await.unwrap_err();
    let StateError::Unavailable(message) = &error else { panic!("expected unavailable, got {error:?}") };
    assert!(message.contains("certificate") || message.contains("UnknownIssuer"), "unclear error: {message}");

    // Plain text to a TLS port gets nowhere, and says so.
    let plain = StateConfig::parse(&format!("redis://127.0.0.1:{}/0", server.port), &redis_section(None))
        .unwrap()
        .connect()
        .unwrap();
    assert!(matches!(plain.get("k").await, Err(StateError::Unavailable(_))));
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
    assert_eq!(app.get("app:k").await.unwrap(), Some(b"v".to_vec()));
    assert!(matches!(app.get("other:k").await, Err(StateError::AccessDenied(_))), "the ACL applies");
    assert!(login("wrong").get("app:k").await.is_err(), "a wrong password gets nowhere");
    let in_url = StateConfig::parse(&format!("rediss://app:s3cret@127.0.0.1:{}/0", server.port), &redis_section(None))
        .unwrap()
        .connect()
        .err()
        .unwrap()
        .to_string();
    assert!(in_url.contains("REDIS_PASSWORD"), "{in_url}");
}
