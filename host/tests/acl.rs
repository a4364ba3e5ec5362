//! Per-role Redis ACL users against a real redis-server: `rolehost acl`
//! prints and applies them, the host can run each role as its own user, and
//! Redis itself then refuses any access outside the role's keys.

use std::process::{Command, Output};

use rolehost_tests::{ok, role_path, RedisServer};

const SECRET: &str = "test-secret-of-24-bytes!";

fn rolehost(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rolehost"))
        .args(args)
        .env_remove("ROLEHOST_STATE")
        .env_remove("REDIS_PASSWORD")
        .env("ROLEHOST_ACL_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// A raw connection as `user`; the result of one command.
fn as_user(port: u16, user: &str, password: &str, cmd: &mut redis::Cmd) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(format!("redis://{user}:{password}@127.0.0.1:{port}/0"))?;
    let mut conn = client.get_connection()?;
    cmd.query(&mut conn)
}

#[test]
fn acl_users_confine_each_role_inside_redis() {
    // An own server: the test changes its users.
    let Some(server) = RedisServer::start() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("rolehost-acl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = dir.join("roles.toml");
    let roles = |acl_users: bool| {
        format!(
            "state = \"redis://127.0.0.1:{port}/0\"\n[redis]\nacl-users = {acl_users}\n\
             [[roles]]\nwasm = \"{counter}\"\n\
             [[roles]]\nname = \"writer\"\nwasm = \"{probe}\"\ngrants = {{ namespaces = {{ public = \"read-write\" }} }}\n\
             [[roles]]\nname = \"reader\"\nwasm = \"{probe}\"\ngrants = {{ namespaces = {{ public = \"read\" }} }}\n",
            port = server.port,
            counter = role_path("counter").display(),
            probe = role_path("kvprobe").display(),
        )
    };
    std::fs::write(&manifest, roles(false)).unwrap();
    let manifest = manifest.to_str().unwrap();

    let printed = ok(rolehost(&["acl", "--manifest", manifest]));
    assert!(printed.contains("ACL SETUSER rolehost-counter reset on #"), "{printed}");
    assert!(printed.contains("~rolehost:counter:*"), "{printed}");
    assert!(printed.contains("%R~rolehost:@public:*"), "{printed}");
    assert!(!printed.contains(&rolehost::acl::password(SECRET, "counter")), "the password itself is never printed");
    ok(rolehost(&["acl", "--manifest", manifest, "--apply"]));

    // The host now talks to Redis as each role's user.
    std::fs::write(dir.join("roles.toml"), roles(true)).unwrap();
    assert_eq!(ok(rolehost(&["call", "--manifest", manifest, "counter"])), "1");
    assert_eq!(ok(rolehost(&["call", "--manifest", manifest, "counter"])), "2");
    let set_public = r#"{"op":"set","key":"notice","value":"hi","ns":"public"}"#;
    assert_eq!(ok(rolehost(&["call", "--manifest", manifest, "writer", set_public])), r#"{"ok":null}"#);
    let get_public = r#"{"op":"get","key":"notice","ns":"public"}"#;
    assert_eq!(ok(rolehost(&["call", "--manifest", manifest, "reader", get_public])), r#"{"ok":"hi"}"#);
    // Reads of a shared namespace are measured by read-only scripts first,
    // which a read-only grant's user may run.
    let get_many_public = r#"{"op":"get_many","keys":["notice","nope"],"ns":"public"}"#;
    assert_eq!(ok(rolehost(&["call", "--manifest", manifest, "reader", get_many_public])), r#"{"ok":["hi",null]}"#);
    let store_public = r#"{"op":"subject_store","subject":"s","set":{"a":1},"ns":"public"}"#;
    assert!(ok(rolehost(&["call", "--manifest", manifest, "writer", store_public])).starts_with(r#"{"ok":"#));
    let load_public = r#"{"op":"subject_load","subject":"s","ns":"public"}"#;
    let loaded = ok(rolehost(&["call", "--manifest", manifest, "reader", load_public]));
    assert!(loaded.starts_with(r#"{"ok":"#) && loaded.contains(r#""a""#), "{loaded}");
    let get_prop = r#"{"op":"subject_get","subject":"s","prop":"a","ns":"public"}"#;
    assert_eq!(ok(rolehost(&["call", "--manifest", manifest, "reader", get_prop])), r#"{"ok":"1"}"#);
    let take = r#"{"op":"get_and_delete","key":"notice","ns":"public"}"#;
    assert_eq!(ok(rolehost(&["call", "--manifest", manifest, "writer", take])), r#"{"ok":"hi"}"#);
    let subject = r#"{"op":"subject_store","subject":"s","set":{"a":1}}"#;
    assert!(ok(rolehost(&["call", "--manifest", manifest, "writer", subject])).starts_with(r#"{"ok":"#));
    let with_ttl = r#"{"op":"set","key":"t","value":"v","ttl_ms":60000}"#;
    assert_eq!(ok(rolehost(&["call", "--manifest", manifest, "writer", with_ttl])), r#"{"ok":null}"#);
    let lock = r#"{"op":"lock_takeover","name":"l"}"#;
    assert!(ok(rolehost(&["call", "--manifest", manifest, "writer", lock])).contains(r#""owner_release":true"#));
    let rate = r#"{"op":"rate_check","key":"api","limit":2,"window_ms":60000}"#;
    assert!(ok(rolehost(&["call", "--manifest", manifest, "writer", rate])).contains(r#""allowed":true"#));
    // A shared limit's state, read without taking from it: what a read
    // grant allows (a read-only script).
    let shared_rate = r#"{"op":"rate_check","key":"api","limit":2,"window_ms":60000,"ns":"public"}"#;
    assert!(ok(rolehost(&["call", "--manifest", manifest, "writer", shared_rate])).contains(r#""remaining":1"#));
    let peek = r#"{"op":"rate_check","key":"api","limit":2,"window_ms":60000,"cost":0,"ns":"public"}"#;
    assert!(ok(rolehost(&["call", "--manifest", manifest, "reader", peek])).contains(r#""remaining":1"#));
    let float = r#"{"op":"subject_incr_float","subject":"s","prop":"f","delta":0.5}"#;
    assert_eq!(ok(rolehost(&["call", "--manifest", manifest, "writer", float])), r#"{"ok":0.5}"#);

    // The calls above ran as the role users: with another secret they fail.
    let wrong = Command::new(env!("CARGO_BIN_EXE_rolehost"))
        .args(["call", "--manifest", manifest, "counter"])
        .env("ROLEHOST_ACL_SECRET", "another secret, as long")
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).to_lowercase().contains("pass"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );

    // What a Cluster connection sends besides the state API's commands
    // (following a slot in migration, learning the nodes' hostnames) is
    // allowed; here, on a server without cluster mode, it fails for that.
    let counter_password = rolehost::acl::password(SECRET, "counter");
    for command in [redis::cmd("ASKING"), redis::cmd("CLUSTER").arg("SHARDS").clone()] {
        let answer = as_user(server.port, "rolehost-counter", &counter_password, &mut command.clone());
        assert!(answer.as_ref().is_err_and(|e| !e.to_string().contains("NOPERM")), "{answer:?}");
    }

    // Redis itself refuses what the host would never send.
    let port = server.port;
    let counter_pw = rolehost::acl::password(SECRET, "counter");
    let reader_pw = rolehost::acl::password(SECRET, "reader");
    let get = |key: &str| redis::cmd("GET").arg(key).clone();
    assert!(as_user(port, "rolehost-counter", &counter_pw, &mut get("rolehost:counter:kv:count")).is_ok());
    for key in ["rolehost:writer:kv:x", "rolehost:@public:kv:notice", "other"] {
        let err = as_user(port, "rolehost-counter", &counter_pw, &mut get(key)).unwrap_err();
        assert!(err.to_string().to_lowercase().contains("noperm"), "{key}: {err}");
    }
    assert!(as_user(port, "rolehost-reader", &reader_pw, &mut get("rolehost:@public:kv:notice")).is_ok());
    let write = as_user(
        port,
        "rolehost-reader",
        &reader_pw,
        &mut redis::cmd("SET").arg("rolehost:@public:kv:notice").arg("defaced").clone(),
    );
    assert!(write.unwrap_err().to_string().to_lowercase().contains("noperm"));
    let flush = as_user(port, "rolehost-counter", &counter_pw, &mut redis::cmd("FLUSHALL").clone());
    assert!(flush.unwrap_err().to_string().to_lowercase().contains("noperm"));
    assert!(as_user(port, "rolehost-counter", "wrong password", &mut get("rolehost:counter:kv:count")).is_err());

    // Through the backend, a refusal is `access-denied`, whether of a
    // single command, a transaction's or a script's.
    let mut options = rolehost::backend::RedisOptions::new(format!("redis://127.0.0.1:{port}/0"));
    (options.username, options.password) = (Some("rolehost-counter".into()), Some(counter_pw.clone()));
    let backend = rolehost::backend::RedisBackend::new(&options).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    use rolehost::backend::Backend as _;
    let other = "rolehost:writer:kv:x".to_owned();
    let refusals = runtime.block_on(async {
        [
            backend.set(&other, b"v", None).await.map(drop),
            backend.set_many(&[(other.clone(), b"v".to_vec())], None).await,
            backend.compare_and_swap(&other, None, Some(b"v"), None).await.map(drop),
        ]
    });
    for refusal in refusals {
        assert!(matches!(&refusal, Err(rolehost::StateError::AccessDenied(_))), "{refusal:?}");
    }
    // A command refused inside a script too (a user made before this
    // version, without HLEN, loading a subject).
    server.cli(&["ACL", "SETUSER", "old-user", "on", ">old-password", "~*", "+@all", "-hlen"]);
    (options.username, options.password) = (Some("old-user".into()), Some("old-password".into()));
    let backend = rolehost::backend::RedisBackend::new(&options).unwrap();
    let load = runtime.block_on(backend.hash_get_all("rolehost:counter:s:user", 1 << 20));
    assert!(matches!(&load, Err(rolehost::StateError::AccessDenied(_))), "{load:?}");
}

#[test]
fn an_empty_or_short_acl_secret_is_refused() {
    let dir = std::env::temp_dir().join(format!("rolehost-acl-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = dir.join("roles.toml");
    let roles = format!("[[roles]]\nname = \"counter\"\nwasm = \"{}\"\n", role_path("counter").display());
    std::fs::write(&manifest, roles).unwrap();
    for secret in ["", "short"] {
        let out = Command::new(env!("CARGO_BIN_EXE_rolehost"))
            .args(["acl", "--manifest", manifest.to_str().unwrap()])
            .env("ROLEHOST_ACL_SECRET", secret)
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted {secret:?}: {}", String::from_utf8_lossy(&out.stdout));
        assert!(stderr.contains("must have at least 16"), "{stderr}");
        assert!(out.stdout.is_empty(), "printed users for {secret:?}");
    }
    // Long enough: the users are printed.
    let printed = ok(rolehost(&["acl", "--manifest", manifest.to_str().unwrap()]));
    assert!(printed.contains("ACL SETUSER rolehost-counter"), "{printed}");
}

/// Two deployments (global prefixes) on one Redis with a role of the same
/// name: applying the second's users would reset the first's user to the
/// second's keys, locking the first's role out. It is refused, naming the
/// user, and changes nothing.
#[test]
fn applying_refuses_to_take_over_another_deployments_user() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("rolehost-acl-shared-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let deployment = |prefix: &str| {
        let manifest = dir.join(format!("{}.toml", prefix.trim_end_matches(':')));
        let text = format!(
            "state = \"redis://127.0.0.1:{}/0\"\nglobal-prefix = \"{prefix}\"\n[[roles]]\nwasm = \"{}\"\n",
            server.port,
            role_path("counter").display()
        );
        std::fs::write(&manifest, text).unwrap();
        manifest.to_str().unwrap().to_owned()
    };
    let (first, second) = (deployment("a:"), deployment("b:"));
    ok(rolehost(&["acl", "--manifest", &first, "--apply"]));
    let keys = || server.cli(&["acl", "getuser", "rolehost-counter"]);
    assert!(keys().contains("~a:counter:*"), "{}", keys());
    let refused = rolehost(&["acl", "--manifest", &second, "--apply"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "applied over another deployment's user");
    assert!(stderr.contains("already has a user `rolehost-counter` for other keys (~a:counter:*)"), "{stderr}");
    assert!(keys().contains("~a:counter:*") && !keys().contains("~b:"), "{}", keys());
    // The first deployment applies again as often as it likes.
    ok(rolehost(&["acl", "--manifest", &first, "--apply"]));
}
