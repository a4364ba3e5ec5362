//! Operator commands that work on a role's state directly: roles, get,
//! clear, checkpoint and restore, on a real redis-server; and checkpoints
//! moving between backends.

use std::process::{Command, Output};
use std::sync::Arc;

use rolehost::backend::{Backend, Expiry, MemoryBackend};
use rolehost::checkpoint;
use rolehost::namespace::Namespace;
use rolehost::RoleLimits;
use rolehost_tests::{host, ok, probe, role_path, shared_redis};
use serde_json::json;

fn rolehost(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rolehost"))
        .args(args)
        .env_remove("ROLEHOST_STATE")
        .env_remove("REDIS_HOST")
        .env_remove("REDIS_PORT")
        .env_remove("REDIS_DB")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn fails(out: Output, needle: &str) {
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
}

#[test]
fn roles_get_clear_checkpoint_restore_on_redis() {
    let Some(server) = shared_redis() else { return };
    let dir = std::env::temp_dir().join(format!("rolehost-admin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write_manifest = |name: &str, db: u32| {
        let path = dir.join(name);
        let text = format!(
            "state = \"{}\"\n[[roles]]\nname = \"app\"\nwasm = \"{probe}\"\n[[roles]]\nname = \"other\"\nwasm = \"{probe}\"\n",
            server.url(db),
            probe = role_path("kvprobe").display()
        );
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let source = write_manifest("source.toml", server.fresh_db());
    let target = write_manifest("target.toml", server.fresh_db());
    let call = |manifest: &str, role: &str, body: &str| ok(rolehost(&["call", "--manifest", manifest, role, body]));
    call(&source, "app", r#"{"op":"set","key":"greeting","value":"hello"}"#);
    call(&source, "app", r#"{"op":"set","key":"session","value":"s","ttl_ms":600000}"#);
    call(&source, "app", r#"{"op":"subject_store","subject":"u1","set":{"n":1},"extended":{"seen":true}}"#);
    call(&source, "other", r#"{"op":"set","key":"greeting","value":"not app's"}"#);
    // A lock taken and released: its last fencing token stays.
    let lock = r#"{"op":"lock_hold","name":"job","ttl_ms":60000,"wait_ms":0}"#;
    let token = |answer: String| serde_json::from_str::<serde_json::Value>(&answer).unwrap()["ok"].as_u64();
    let first = token(call(&source, "app", lock)).expect("the lock is taken");

    let roles = ok(rolehost(&["roles", "--manifest", &source]));
    assert!(roles.contains("app\n  prefix  rolehost:app:"), "{roles}");
    assert!(roles.contains("sha256  "), "{roles}");
    assert!(roles.contains("max-value-bytes"), "{roles}");
    assert_eq!(ok(rolehost(&["get", "--manifest", &source, "app", "greeting"])), "hello");
    fails(rolehost(&["get", "--manifest", &source, "app", "nope"]), "no key");

    let file = dir.join("app.json");
    let file = file.to_str().unwrap();
    // Over an older file, which it replaces whole; readable by its owner
    // alone (it holds the role's whole state).
    std::fs::write(file, "an older checkpoint, longer than the new one will be ".repeat(100)).unwrap();
    let checkpointed_at = std::time::Instant::now();
    ok(rolehost(&["checkpoint", "--manifest", &source, "app", file]));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    assert_eq!(saved["format"], "rolehost-checkpoint/1");
    assert_eq!(saved["kv"].as_array().unwrap().len(), 2, "only app's keys: {saved}");
    // To standard output (`-`): the JSON alone, its count on stderr.
    let out = rolehost(&["checkpoint", "--manifest", &source, "app", "-"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let piped: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let values = |cp: &serde_json::Value| -> Vec<(String, String)> {
        let kv = cp["kv"].as_array().unwrap().iter();
        kv.map(|e| (e["key"].to_string(), e["value_base64"].to_string())).collect()
    };
    assert_eq!((values(&piped), &piped["subjects"]), (values(&saved), &saved["subjects"]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 kv keys and 1 subjects"), "{out:?}");
    fails(rolehost(&["restore", "--manifest", &target, "other", file]), "--rename");
    ok(rolehost(&["restore", "--manifest", &target, "app", file]));
    assert_eq!(ok(rolehost(&["get", "--manifest", &target, "app", "greeting"])), "hello");
    let session = call(&target, "app", r#"{"op":"expiry","key":"session"}"#);
    assert!(session.contains(r#""ok":5"#) || session.contains(r#""ok":6"#), "TTL kept: {session}");
    let subject = call(&target, "app", r#"{"op":"subject_load","subject":"u1"}"#);
    assert_eq!(subject, r#"{"ok":{"default":{"n":1},"extended":{"seen":true}}}"#);
    ok(rolehost(&["restore", "--manifest", &target, "other", file, "--rename"]));
    assert_eq!(ok(rolehost(&["get", "--manifest", &target, "other", "greeting"])), "hello");

    // checkpoint → clear → restore round-trips values and TTLs.
    let saved_ttl = saved["kv"].as_array().unwrap().iter().find(|e| e["key"] == "session").unwrap()["ttl_ms"].as_u64();
    fails(rolehost(&["clear", "--manifest", &source, "app"]), "--yes");
    assert!(ok(rolehost(&["clear", "--manifest", &source, "app", "--yes"])).contains("deleted 3 keys"));
    fails(rolehost(&["get", "--manifest", &source, "app", "greeting"]), "no key");
    ok(rolehost(&["restore", "--manifest", &source, "app", file]));
    assert_eq!(ok(rolehost(&["get", "--manifest", &source, "app", "greeting"])), "hello");
    let second = token(call(&source, "app", lock)).expect("the lock is taken");
    assert!(second > first, "fencing tokens go on increasing after a clear: {first} then {second}");
    let after = call(&source, "app", r#"{"op":"expiry","key":"session"}"#);
    let ms = |answer: &str| serde_json::from_str::<serde_json::Value>(answer).unwrap()["ok"].as_u64().unwrap();
    // The restored TTL is the saved one, less the time since the
    // checkpoint was taken (within a second).
    let (saved_ttl, after_ms) = (saved_ttl.unwrap(), ms(&after));
    let since = checkpointed_at.elapsed().as_millis() as u64;
    assert!(
        after_ms <= saved_ttl && saved_ttl - after_ms <= since + 1000,
        "TTL {saved_ttl} saved, {after_ms} {since} ms after the checkpoint began"
    );

    assert!(ok(rolehost(&["clear", "--manifest", &source, "app", "--yes"])).contains("deleted 3 keys"));
    assert_eq!(ok(rolehost(&["get", "--manifest", &source, "other", "greeting"])), "not app's");
}

/// A checkpoint taken on one backend restores into the other, both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_move_between_memory_and_redis() {
    let Some(server) = shared_redis() else { return };
    let memory: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let redis = server.backend(server.fresh_db());
    let namespace = Namespace::new("rolehost:", "app", &RoleLimits::default());
    let on_memory = host(memory.clone(), "rolehost:", &[("app", "kvprobe")]);
    probe(&on_memory, "app", json!({"op":"set","key":"bin","value":"\u{0}\u{ff}text"})).await.unwrap();
    probe(&on_memory, "app", json!({"op":"set","key":"short","value":"v","ttl_ms":600000})).await.unwrap();
    probe(&on_memory, "app", json!({"op":"subject_store","subject":"s","set":{"a":[1,2]}})).await.unwrap();
    let first = checkpoint::take(memory.as_ref(), &namespace, "app").await.unwrap();
    checkpoint::restore(redis.as_ref(), &namespace, &RoleLimits::default(), &first).await.unwrap();
    let on_redis = host(redis.clone(), "rolehost:", &[("app", "kvprobe")]);
    assert_eq!(probe(&on_redis, "app", json!({"op":"get","key":"bin"})).await, Ok(json!("\u{0}\u{ff}text")));
    assert!(probe(&on_redis, "app", json!({"op":"expiry","key":"short"})).await.unwrap().as_u64().unwrap() > 590_000);
    let second = checkpoint::take(redis.as_ref(), &namespace, "app").await.unwrap();
    let back: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    checkpoint::restore(back.as_ref(), &namespace, &RoleLimits::default(), &second).await.unwrap();
    let third = checkpoint::take(back.as_ref(), &namespace, "app").await.unwrap();
    let strip = |c: &checkpoint::Checkpoint| {
        let mut c = c.clone();
        c.created_unix_ms = 0;
        c.kv.iter_mut().for_each(|e| e.ttl_ms = e.ttl_ms.map(|_| 1));
        c.kv.sort_by(|a, b| a.key.cmp(&b.key));
        c
    };
    assert_eq!(strip(&first), strip(&third), "memory → redis → memory keeps everything");
}

/// A checkpoint with a bad entry restores nothing and names the entry; the
/// operator commands refuse a bad prefix and the in-memory store.
#[test]
fn bad_checkpoints_and_settings_are_refused_before_anything_is_written() {
    let Some(server) = shared_redis() else { return };
    let dir = std::env::temp_dir().join(format!("rolehost-admin-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let role = format!("[[roles]]\nname = \"app\"\nwasm = \"{}\"\n", role_path("kvprobe").display());
    let manifest = write("redis.toml", format!("state = \"{}\"\n{role}", server.url(server.fresh_db())));
    let good = r#"{"key":"good","value_base64":"aGk=","ttl_ms":null}"#;
    let bad_entries = [
        (r#"{"key":"late","value_base64":"aGk=","ttl_ms":0}"#, "key \"late\": a TTL of 0 ms"),
        (r#"{"key":"","value_base64":"aGk=","ttl_ms":null}"#, "key \"\""),
        (r#"{"key":"b64","value_base64":"not base64!","ttl_ms":null}"#, "key \"b64\": bad base64"),
    ];
    for (i, (bad, needle)) in bad_entries.into_iter().enumerate() {
        let checkpoint = format!(
            r#"{{"format":"rolehost-checkpoint/1","role":"app","created_unix_ms":0,"kv":[{good},{bad}],"subjects":[]}}"#
        );
        let file = write(&format!("bad{i}.json"), checkpoint);
        fails(rolehost(&["restore", "--manifest", &manifest, "app", &file]), needle);
        fails(rolehost(&["get", "--manifest", &manifest, "app", "good"]), "no key");
    }
    let big = format!("{{\"key\":\"big\",\"value_base64\":\"{}\",\"ttl_ms\":null}}", "QUFB".repeat(400_000));
    let file = write(
        "big.json",
        format!(r#"{{"format":"rolehost-checkpoint/1","role":"app","created_unix_ms":0,"kv":[{big}],"subjects":[]}}"#),
    );
    fails(rolehost(&["restore", "--manifest", &manifest, "app", &file]), "over the role's limit");

    fails(rolehost(&["keys", "--manifest", &manifest, "app", "--prefix", "a b"]), "prefix");
    fails(rolehost(&["roles", "--manifest", &manifest, "--prefix", "x{y}"]), "prefix");
    let memory = write("memory.toml", format!("state = \"memory\"\n{role}"));
    for command in [&["keys", "--manifest", &memory, "app"][..], &["checkpoint", "--manifest", &memory, "app", &file]] {
        fails(rolehost(command), "in-memory store");
    }
}

/// TTLs in a checkpoint count from when it was taken (what expired since
/// is left out), and the target role's TTL policy applies as to its own
/// writes: a persistent key gets its default TTL, a longer TTL than its
/// maximum is refused (naming the key) and nothing is written.
#[tokio::test]
async fn restores_count_ttls_from_the_checkpoint_and_follow_the_roles_policy() {
    let entry = |key: &str, ttl_ms: Option<u64>| checkpoint::KvEntry {
        key: key.to_owned(),
        value_base64: "dg==".to_owned(), // "v"
        ttl_ms,
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let minutes = |n: u64| n * 60_000;
    let old = checkpoint::Checkpoint {
        format: checkpoint::FORMAT.to_owned(),
        role: "app".to_owned(),
        created_unix_ms: now - minutes(10),
        kv: vec![entry("gone", Some(minutes(5))), entry("left", Some(minutes(20))), entry("kept", None)],
        subjects: Vec::new(),
    };
    let backend = MemoryBackend::new();
    let namespace = Namespace::new("rolehost:", "app", &RoleLimits::default());
    let restored = checkpoint::restore(&backend, &namespace, &RoleLimits::default(), &old).await.unwrap();
    assert_eq!((restored.kv, restored.expired), (2, 1));
    assert_eq!(backend.get("rolehost:app:kv:gone", None).await.unwrap(), None, "expired 5 minutes ago");
    let ms = |expiry| match expiry {
        Expiry::ExpiresIn(left) => left.as_millis() as u64,
        other => panic!("expected a TTL, got {other:?}"),
    };
    let left = ms(backend.expiry("rolehost:app:kv:left").await.unwrap());
    assert!(left <= minutes(10) && left > minutes(10) - 5_000, "20 minutes less the 10 since: {left} ms");
    assert_eq!(backend.expiry("rolehost:app:kv:kept").await.unwrap(), Expiry::Persistent);

    // A role whose keys live at most 15 minutes (default: that maximum).
    let capped = RoleLimits { max_ttl_ms: Some(minutes(15)), ..RoleLimits::default() };
    let backend = MemoryBackend::new();
    let restored = checkpoint::restore(&backend, &namespace, &capped, &old).await.unwrap();
    assert_eq!((restored.kv, restored.expired), (2, 1));
    assert!(ms(backend.expiry("rolehost:app:kv:kept").await.unwrap()) > minutes(15) - 5_000, "the role's default");
    let fresh = checkpoint::Checkpoint { created_unix_ms: now, ..old.clone() };
    let error = checkpoint::restore(&backend, &namespace, &capped, &fresh).await.unwrap_err().to_string();
    assert!(error.contains("key \"left\"") && error.contains("maximum"), "{error}");
    let empty = MemoryBackend::new();
    assert!(checkpoint::restore(&empty, &namespace, &capped, &fresh).await.is_err());
    assert_eq!(empty.get("rolehost:app:kv:kept", None).await.unwrap(), None, "nothing written");
}

/// The operator commands work on a shared namespace (`@name`) as on a
/// role: its keys, one value, checkpoint, clear and restore; a namespace
/// no role is granted is refused.
#[test]
fn operator_commands_reach_shared_namespaces() {
    let Some(server) = shared_redis() else { return };
    let dir = std::env::temp_dir().join(format!("rolehost-admin-shared-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = dir.join("shared.toml");
    std::fs::write(
        &manifest,
        format!(
            "state = \"{}\"\n[[roles]]\nname = \"bob\"\nwasm = \"{}\"\ngrants = {{ namespaces = {{ catalog = \"read-write\" }} }}\n",
            server.url(server.fresh_db()),
            role_path("kvprobe").display()
        ),
    )
    .unwrap();
    let manifest = manifest.to_str().unwrap();
    let call = |body: &str| ok(rolehost(&["call", "--manifest", manifest, "bob", body]));
    call(r#"{"op":"set","ns":"catalog","key":"sku-1","value":"lamp"}"#);
    call(r#"{"op":"set","key":"own","value":"bob's"}"#);
    assert_eq!(ok(rolehost(&["get", "--manifest", manifest, "@catalog", "sku-1"])), "lamp");
    assert!(ok(rolehost(&["keys", "--manifest", manifest, "@catalog"])).contains("sku-1"));
    let file = dir.join("catalog.json");
    let file = file.to_str().unwrap();
    ok(rolehost(&["checkpoint", "--manifest", manifest, "@catalog", file]));
    assert!(ok(rolehost(&["clear", "--manifest", manifest, "@catalog", "--yes"])).contains("deleted 1 keys"));
    fails(rolehost(&["get", "--manifest", manifest, "@catalog", "sku-1"]), "no key");
    assert_eq!(ok(rolehost(&["get", "--manifest", manifest, "bob", "own"])), "bob's", "bob's own keys stay");
    ok(rolehost(&["restore", "--manifest", manifest, "@catalog", file]));
    assert_eq!(call(r#"{"op":"get","ns":"catalog","key":"sku-1"}"#), r#"{"ok":"lamp"}"#);
    fails(rolehost(&["keys", "--manifest", manifest, "@nobody"]), "granted the shared namespace `nobody`");
}
