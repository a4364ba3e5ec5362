//! The `rolehost` binary: real processes, real components, real redis-server.
//! Every failure is one clear `rolehost: …` line and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rolehost_tests::{role_path, shared_redis};
use serde_json::json;

/// Runs `rolehost ARGS` with no inherited state setting, failing the test
/// if it takes over 60 s (a hang).
fn rolehost(args: &[&str]) -> Output {
    rolehost_within(args, Duration::from_secs(60))
}

/// Like [`rolehost`], allowing `limit` before it counts as a hang.
fn rolehost_within(args: &[&str], limit: Duration) -> Output {
    rolehost_with(args, &[], b"", limit)
}

/// Like [`rolehost_within`], with `env` set and `stdin` on its standard input.
fn rolehost_with(args: &[&str], env: &[(&str, &str)], stdin: &[u8], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rolehost"))
        .args(args)
        .env_remove("ROLEHOST_STATE")
        .env_remove("ROLEHOST_PREFIX")
        .env_remove("REDIS_PASSWORD")
        .env_remove("REDIS_HOST")
        .env_remove("REDIS_PORT")
        .env_remove("REDIS_DB")
        .env_remove("REDIS_SENTINEL_PASSWORD")
        .env_remove("ROLEHOST_REDIS_CA")
        .env_remove("ROLEHOST_CACHE")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Written whole, then closed: the child reads to the end.
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin).unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().unwrap();
            panic!("rolehost {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Asserts a failure with a one-line `rolehost:` error containing `needle`.
fn assert_fails_with(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "expected failure, got success; stderr: {stderr}");
    let host_panic = stderr.lines().any(|l| l.contains("panicked at") && !l.contains("role="));
    assert!(!host_panic, "the host panicked: {stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("rolehost: "))
        .unwrap_or_else(|| panic!("no `rolehost:` error line in {stderr:?}"));
    assert!(line.contains(needle), "error line {line:?} does not mention {needle:?}");
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rolehost-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.to_str().unwrap().to_owned()
}

fn counter() -> String {
    role_path("counter").to_str().unwrap().to_owned()
}

#[test]
fn run_counts_on_redis_and_keys_carry_the_prefix() {
    let Some(server) = shared_redis() else { return };
    let db = server.fresh_db();
    let url = server.url(db);
    for expected in ["1", "2"] {
        let out = rolehost(&["run", &counter(), "--state", &url]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(stdout(&out), expected);
    }
    let out = rolehost(&["run", &counter(), "--name", "tally", "--state", &url]);
    assert_eq!(stdout(&out), "1", "another identity has its own count");
    let keys = server.all_keys(db);
    assert_eq!(keys, ["rolehost:counter:kv:count", "rolehost:tally:kv:count"]);
}

#[test]
fn redis_host_port_and_db_from_the_environment_override_the_manifest() {
    let Some(server) = shared_redis() else { return };
    let db = server.fresh_db();
    let dir = temp_dir("redis-env");
    // The manifest says memory (and then another database): the
    // environment wins, so the count lives in Redis across processes.
    for state in ["memory", &server.url(server.fresh_db())] {
        let manifest =
            write(&dir, "m.toml", format!("state = {state:?}\n[[roles]]\nname = \"c\"\nwasm = {:?}\n", counter()));
        let port = server.port.to_string();
        let db = db.to_string();
        let env = [("REDIS_HOST", "127.0.0.1"), ("REDIS_PORT", port.as_str()), ("REDIS_DB", db.as_str())];
        let out = rolehost_with(&["call", "--manifest", &manifest, "c"], &env, b"", Duration::from_secs(60));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(server.all_keys(db), ["rolehost:c:kv:count"]);
    assert_eq!(server.cli(&["-n", &db.to_string(), "get", "rolehost:c:kv:count"]).trim(), "2");
}

#[test]
fn counters_in_every_language_count_like_the_rust_one() {
    let Some(server) = shared_redis() else { return };
    let db = server.fresh_db();
    let url = server.url(db);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/roles");
    let mut names = Vec::new();
    for name in ["counter-js", "counter-py", "counter-c"] {
        let wasm = dir.join(format!("{name}.wasm"));
        if !wasm.exists() {
            assert!(!rolehost_tests::in_ci(), "{} is missing; `cargo xtask build` makes it", wasm.display());
            eprintln!("skipping {name}: not built (needs node, python3 or clang)");
            continue;
        }
        // The first run may compile a 10–20 MB component.
        for expected in ["1", "2"] {
            let out = rolehost_within(&["run", wasm.to_str().unwrap(), "--state", &url], Duration::from_secs(300));
            assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(stdout(&out), expected, "{name}");
        }
        let out = rolehost(&["run", wasm.to_str().unwrap(), "--repeat", "3"]);
        assert_eq!(stdout(&out), "1\n2\n3", "{name} on memory, three calls in one process");
        names.push(format!("rolehost:{name}:kv:count"));
    }
    names.sort();
    assert_eq!(server.all_keys(db), names, "each counter keeps its count under its own name");
}

#[test]
fn run_on_memory_starts_fresh_each_process() {
    for _ in 0..2 {
        let out = rolehost(&["run", &counter()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(stdout(&out), "1");
    }
}

#[test]
fn run_passes_the_body_and_prints_the_response() {
    let probe = role_path("kvprobe");
    let out = rolehost(&["run", probe.to_str().unwrap(), r#"{"op":"incr","key":"n","delta":41}"#]);
    assert_eq!(stdout(&out), r#"{"ok":41}"#);
}

#[test]
fn a_body_of_dash_is_read_from_stdin() {
    let probe = role_path("kvprobe");
    let body = br#"{"op":"incr","key":"n","delta":2}"#;
    let out = rolehost_with(&["run", probe.to_str().unwrap(), "-"], &[], body, Duration::from_secs(60));
    assert_eq!(stdout(&out), r#"{"ok":2}"#, "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_compile_cache_goes_where_rolehost_cache_says() {
    let home = temp_dir("cache-home");
    let home = home.to_str().unwrap();
    let run = |cache: Option<&str>| {
        let mut env = vec![("HOME", home), ("XDG_CACHE_HOME", "")];
        env.extend(cache.map(|dir| ("ROLEHOST_CACHE", dir)));
        let out = rolehost_with(&["run", &counter()], &env, b"", Duration::from_secs(60));
        assert_eq!(stdout(&out), "1", "{}", String::from_utf8_lossy(&out.stderr));
    };
    let entries = |dir: &Path| std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let default = Path::new(home).join(".cache/rolehost");
    run(Some("off"));
    assert!(!default.exists(), "off: nothing written");
    let chosen = temp_dir("cache-chosen");
    run(Some(chosen.to_str().unwrap()));
    assert_eq!(entries(&chosen), 1, "the compiled counter, in the directory named");
    assert!(!default.exists());
    run(None);
    assert_eq!(entries(&default), 1, "by default under ~/.cache/rolehost");
}

#[test]
fn a_full_in_memory_store_refuses_writes() {
    let probe = role_path("kvprobe");
    let set = |key: &str| json!({"op":"set","key":key,"len":5000});
    let batch = json!({"op":"batch","ops":[set("a"), set("b"), {"op":"get","key":"missing"}]}).to_string();
    let out = rolehost(&["run", probe.to_str().unwrap(), &batch, "--state", "memory?max-bytes=4000"]);
    let answers: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let answers = &answers["ok"];
    assert_eq!(answers[0], json!({"ok":null}), "the first write fits an empty store");
    assert_eq!(answers[1]["err"]["kind"], "quota-exceeded", "{answers}");
    assert!(answers[1]["err"]["message"].as_str().unwrap().contains("store is full"), "{answers}");
    assert_eq!(answers[2], json!({"ok":null}), "reads go on");
}

#[test]
fn call_and_keys_use_the_manifest() {
    let Some(server) = shared_redis() else { return };
    let url = server.url(server.fresh_db());
    let dir = temp_dir("manifest");
    let sha = sha256_of(&role_path("counter"));
    let manifest = write(
        &dir,
        "roles.toml",
        format!(
            "global-prefix = \"app:\"\nstate = \"{url}\"\n[[roles]]\nname = \"hits\"\nwasm = \"{}\"\nsha256 = \"{sha}\"\n",
            counter()
        ),
    );
    assert_eq!(stdout(&rolehost(&["call", "--manifest", &manifest, "hits"])), "1");
    assert_eq!(stdout(&rolehost(&["call", "--manifest", &manifest, "hits"])), "2");
    let keys = rolehost(&["keys", "--manifest", &manifest, "hits"]);
    assert_eq!(stdout(&keys), "count\tpersistent");
    assert_eq!(stdout(&rolehost(&["keys", "--manifest", &manifest, "hits", "nomatch*"])), "");
    assert_fails_with(&rolehost(&["call", "--manifest", &manifest, "nope"]), "no role `nope`");
    // The flag beats the manifest: memory starts at 1 again.
    assert_eq!(stdout(&rolehost(&["call", "--manifest", &manifest, "hits", "--state", "memory"])), "1");
}

#[test]
fn a_wrong_pin_is_refused() {
    let dir = temp_dir("pin");
    let manifest =
        write(&dir, "roles.toml", format!("[[roles]]\nwasm = \"{}\"\nsha256 = \"{}\"\n", counter(), "0".repeat(64)));
    assert_fails_with(&rolehost(&["call", "--manifest", &manifest, "counter"]), "pins role `counter`");
}

#[test]
fn bad_components_are_refused_clearly() {
    let dir = temp_dir("components");
    assert_fails_with(&rolehost(&["run", "/no/such/role.wasm"]), "cannot read role component");
    let junk = write(&dir, "junk.wasm", b"definitely not wasm");
    assert_fails_with(&rolehost(&["run", &junk]), "not a valid WebAssembly component");
    let module = write(&dir, "module.wasm", wat::parse_str("(module)").unwrap());
    assert_fails_with(&rolehost(&["run", &module]), "not a valid WebAssembly component");
    let other_world = write(&dir, "other.wasm", wat::parse_str("(component)").unwrap());
    assert_fails_with(&rolehost(&["run", &other_world]), "does not fit the rolehost:state/role world");
    let bad_name = write(&dir, "Bad Name.wasm", std::fs::read(role_path("counter")).unwrap());
    assert_fails_with(&rolehost(&["run", &bad_name]), "invalid role name");
}

#[test]
fn bad_manifests_are_refused_clearly() {
    let dir = temp_dir("manifests");
    let syntax = write(&dir, "syntax.toml", "[[roles]\nwasm = ");
    assert_fails_with(&rolehost(&["call", "--manifest", &syntax, "x"]), "bad manifest");
    let password = write(&dir, "password.toml", "[redis]\npassword = \"hunter2\"\n");
    assert_fails_with(&rolehost(&["call", "--manifest", &password, "x"]), "REDIS_PASSWORD");
    // A device that never ends is no manifest (nor checkpoint): refused,
    // not read until memory runs out.
    assert_fails_with(&rolehost(&["call", "--manifest", "/dev/zero", "x"]), "not a regular file");
    assert_fails_with(&rolehost(&["restore", "--manifest", &password, "x", "/dev/zero"]), "not a regular file");
    let missing = dir.join("missing.toml");
    assert_fails_with(&rolehost(&["call", "--manifest", missing.to_str().unwrap(), "x"]), "cannot read manifest");
    let url_password = rolehost(&["run", &counter(), "--state", "redis://:hunter2@127.0.0.1:1"]);
    assert_fails_with(&url_password, "REDIS_PASSWORD");
    assert_fails_with(&rolehost(&["run", &counter(), "--state", "mongodb://x"]), "unknown state backend");
    for bad in ["memory?max-bytes=0", "memory?max-bytes=lots", "memory?size=1"] {
        assert_fails_with(&rolehost(&["run", &counter(), "--state", bad]), "invalid state backend");
    }
    // Limits the host cannot honour are refused at load, not a panic later.
    let huge = format!(
        "[[roles]]\nname = \"c\"\nwasm = {:?}\nlimits = {{ max-concurrency = 9223372036854775807 }}\n",
        counter()
    );
    let huge = write(&dir, "huge.toml", huge);
    assert_fails_with(&rolehost(&["call", "--manifest", &huge, "c"]), "role `c`: bad limit: max-concurrency is");
    let ttl = format!(
        "[[roles]]\nname = \"c\"\nwasm = {:?}\nlimits = {{ default-ttl-ms = 18446744073709551615 }}\n",
        counter()
    );
    let ttl = write(&dir, "ttl.toml", ttl);
    assert_fails_with(&rolehost(&["call", "--manifest", &ttl, "c"]), "bad limit: default-ttl-ms is");
    let good = write(&dir, "good.toml", format!("[[roles]]\nname = \"c\"\nwasm = {:?}\n", counter()));
    assert_fails_with(&rolehost(&["serve", "--manifest", &good, "--max-concurrency", "0"]), "max concurrency is 0");
    // Every command that reads a manifest refuses what `serve` refuses: a
    // zero TTL limit would have `restore` write keys that expire at once,
    // and a granted namespace's name goes into ACL rules.
    let zero_ttl = format!("[[roles]]\nname = \"c\"\nwasm = {:?}\nlimits = {{ max-ttl-ms = 0 }}\n", counter());
    let zero_ttl = write(&dir, "zero-ttl.toml", zero_ttl);
    let checkpoint = dir.join("c.json").display().to_string();
    for command in
        [&["checkpoint", "--manifest", &zero_ttl, "c", &checkpoint][..], &["get", "--manifest", &zero_ttl, "c", "k"]]
    {
        assert_fails_with(&rolehost(command), "role `c`: bad limit: max-ttl-ms must be at least 1");
    }
    let grant = format!(
        "[[roles]]\nname = \"c\"\nwasm = {:?}\ngrants = {{ namespaces = {{ \"x allkeys ~\" = \"read\" }} }}\n",
        counter()
    );
    let grant = write(&dir, "grant.toml", grant);
    assert_fails_with(&rolehost(&["acl", "--manifest", &grant]), "role `c`: bad namespace grant");
    // A value in the wrong place says where it is.
    let negative = format!("[[roles]]\nname = \"c\"\nwasm = {:?}\nlimits = {{ deadline-ms = -5 }}\n", counter());
    let negative = write(&dir, "negative.toml", negative);
    assert_fails_with(&rolehost(&["call", "--manifest", &negative, "c"]), "line 4, column 26: invalid value");
    let timeout = format!(
        "state = \"redis://127.0.0.1:1\"\n[redis]\nop-timeout-ms = 0\n[[roles]]\nname = \"c\"\nwasm = {:?}\n",
        counter()
    );
    let timeout = write(&dir, "timeout.toml", timeout);
    assert_fails_with(&rolehost(&["call", "--manifest", &timeout, "c"]), "op-timeout-ms is 0; it must be 1 to");
}

#[test]
fn serve_and_call_flags_out_of_range_are_refused() {
    let dir = temp_dir("flags");
    let manifest = format!("[[roles]]\nname = \"c\"\nwasm = {:?}\n", counter());
    let manifest = write(&dir, "roles.toml", manifest);
    let serve = |flag: &str, value: &str| rolehost(&["serve", "--manifest", &manifest, flag, value]);
    // Each would panic, silently change, or fail later with a message that
    // names no flag.
    for (flag, value) in [
        ("--max-connections", "18446744073709551615"),
        ("--max-connections", "0"),
        ("--read-timeout-secs", "0"),
        ("--read-timeout-secs", "9223372036854775808"),
        ("--shutdown-grace-secs", "18446744073709551615"),
    ] {
        let out = serve(flag, value);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && !stderr.contains("panicked"), "{flag} {value}: {stderr}");
        assert!(stderr.contains(&format!("invalid value '{value}' for '{flag}")), "{stderr}");
    }
    assert_fails_with(
        &serve("--max-concurrency", "1000000"),
        "max concurrency is 1000000; it must be 1 to 65536 with the pooling allocator",
    );
    for args in [&["--repeat", "0"][..], &["--repeat", "2", "--concurrency", "0"]] {
        let out = rolehost(&[&["call", "--manifest", &manifest, "c"][..], args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && out.stdout.is_empty(), "{args:?} made a call");
        assert!(stderr.contains(&format!("invalid value '0' for '{}", args[args.len() - 2])), "{stderr}");
    }
    // More calls at once than a role's max-concurrency (256 by default): a
    // manifest's role says so before any call; `run` makes room for them.
    let out = rolehost(&["call", "--manifest", &manifest, "c", "--repeat", "2", "--concurrency", "300"]);
    assert_fails_with(&out, "--concurrency 300 is more than role `c`'s max-concurrency, 256");
    let out = rolehost(&["run", &counter(), "--repeat", "1200", "--concurrency", "1100"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut counts: Vec<u64> = stdout(&out).lines().map(|l| l.parse().unwrap()).collect();
    counts.sort_unstable();
    assert_eq!(counts, (1..=1200).collect::<Vec<u64>>(), "every call answered");
}

#[test]
fn unreachable_redis_and_traps_fail_the_call_not_the_host() {
    let port = rolehost_tests::free_port();
    let out = rolehost(&["run", &counter(), "--state", &format!("redis://127.0.0.1:{port}")]);
    assert_fails_with(&out, "unavailable");
    let probe = role_path("kvprobe");
    let out = rolehost(&["run", probe.to_str().unwrap(), r#"{"op":"panic"}"#]);
    assert_fails_with(&out, "trapped");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let logged = stderr.lines().find(|l| l.contains("kvprobe was asked to panic"));
    assert!(
        logged.is_some_and(|l| l.contains("role=\"kvprobe\"")),
        "the guest's stderr is logged with its role: {stderr}"
    );
}

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_owned()
}

#[test]
fn run_waits_for_fire_and_forget_writes_before_exiting() {
    let Some(server) = shared_redis() else { return };
    let db = server.fresh_db();
    let url = server.url(db);
    let probe = role_path("kvprobe");
    // Sets and deletes alternate, so the sends take 100 round trips: an
    // exit that did not wait would cut them short.
    let ops: Vec<String> = (0..50)
        .map(|i| format!(r#"{{"op":"set_later","key":"k{i}","value":"v"}},{{"op":"delete_later","key":"gone{i}"}}"#))
        .collect();
    let body = format!(r#"{{"op":"batch","ops":[{}]}}"#, ops.join(","));
    let out = rolehost(&["run", probe.to_str().unwrap(), &body, "--name", "later", "--state", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The process has exited: every queued write must already be in Redis.
    assert_eq!(server.all_keys(db).len(), 50, "{:?}", server.all_keys(db));
}

#[test]
fn the_redis_password_comes_from_the_environment() {
    let Some(tls) = rolehost_tests::TlsFiles::generate() else { return };
    let Some(server) = rolehost_tests::RedisServer::start_tls(&tls) else { return };
    assert!(server.cli(&["acl", "setuser", "app", "on", ">s3cret", "~rolehost:*", "+@all"]).contains("OK"));
    // Without a password a client would be the default user: switch it off.
    assert!(server.cli(&["acl", "setuser", "default", "off"]).contains("OK"));
    let url = format!("rediss://app@127.0.0.1:{}/0?ca={}", server.port, tls.ca.display());
    let run = |password: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_rolehost"));
        command.args(["run", &counter(), "--state", &url]).env_remove("ROLEHOST_STATE").env("RUST_LOG", "warn");
        match password {
            Some(password) => command.env("REDIS_PASSWORD", password),
            None => command.env_remove("REDIS_PASSWORD"),
        };
        command.output().unwrap()
    };
    let out = run(Some("s3cret"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout(&out), "1");
    assert_eq!(stdout(&run(Some("s3cret"))), "2");
    assert_fails_with(&run(Some("wrong")), "REDIS_PASSWORD");
    assert_fails_with(&run(None), "REDIS_PASSWORD");
}

#[test]
fn role_log_lines_are_budgeted_per_line_and_cannot_forge_others() {
    let dir = temp_dir("role-log");
    let probe = role_path("kvprobe");
    let run = |request: serde_json::Value| {
        let log = dir.join("stderr.log");
        let out = Command::new(env!("CARGO_BIN_EXE_rolehost"))
            .args(["run", probe.to_str().unwrap(), &request.to_string()])
            .env_remove("ROLEHOST_STATE")
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .output()
            .unwrap();
        assert!(out.status.success(), "{request}");
        std::fs::read_to_string(&log).unwrap()
    };
    // Empty lines cost their line all the same: the 64 KiB budget lets
    // through at most 1024 of the 20000, then says how much it dropped.
    let log = run(json!({"op":"log","message":"","times":20000}));
    let lines = log.lines().filter(|l| l.contains("role=\"kvprobe\"")).count();
    assert!((1000..=1025).contains(&lines), "{lines} role lines");
    assert!(log.contains("lines dropped"), "{log}");
    // A line break in a message, by `log` or on stdout, is escaped.
    for op in ["log", "print"] {
        let log = run(json!({"op":op,"message":"ok\nFORGED host line\r","times":1}));
        assert!(!log.lines().any(|l| l.starts_with("FORGED")), "{log}");
        let line = log.lines().find(|l| l.contains("role=\"kvprobe\"")).unwrap_or_else(|| panic!("{log}"));
        match op {
            "log" => assert!(line.contains(r"ok\nFORGED host line\r"), "{line}"),
            _ => assert!(log.contains("FORGED host line\\r"), "{log}"),
        }
    }
}
