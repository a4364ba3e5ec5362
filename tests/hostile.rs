//! A hostile role (the kvprobe, loaded as `mallory`) attacks the host next
//! to a victim role and `counter`. Every attempt gets its documented error,
//! the host keeps serving, the victim's data is intact, and the store holds
//! no key outside the roles' documented prefixes.

use std::sync::Arc;

use rolehost::backend::Backend;
use rolehost::{Access, CallError, Grants, RoleLimits};
use rolehost_tests::{host_with_specs, on_both_backends, probe, unique, RedisServer};
use serde_json::{json, Value};

on_both_backends!(
    a_hostile_role_changes_nothing_it_does_not_own,
    host_memory_held_for_a_role_is_bounded,
    handles_kept_open_count_against_the_memory_limit
);

async fn a_hostile_role_changes_nothing_it_does_not_own(b: Arc<dyn Backend>, p: String) {
    let public = |access| Grants { namespaces: [("public".to_owned(), access)].into(), ..Grants::default() };
    let mallory_limits = RoleLimits { max_memory_bytes: 256 << 20, deadline_ms: 3_000, ..RoleLimits::default() };
    let host = host_with_specs(
        b.clone(),
        &p,
        vec![
            ("counter", "counter", RoleLimits::default(), Grants::default()),
            ("victim", "kvprobe", RoleLimits::default(), public(Access::ReadWrite)),
            ("mallory", "kvprobe", mallory_limits, public(Access::Read)),
        ],
    );
    let victim = |op: Value| probe(&host, "victim", op);
    victim(json!({"op":"set","key":"secret","value":"victim's secret"})).await.unwrap();
    victim(json!({"op":"subject_store","subject":"account","set":{"balance":100}})).await.unwrap();
    victim(json!({"op":"set","key":"notice","value":"read me","ns":"public"})).await.unwrap();
    assert_eq!(host.call("counter", b"").await.unwrap(), b"1");

    let mallory = |op: Value| probe(&host, "mallory", op);
    let expect = |op: Value, kind: &'static str| {
        let mallory = &mallory;
        async move { assert_eq!(mallory(op.clone()).await, Err(kind.to_owned()), "{op}") }
    };
    // Key and pattern escapes: refused, or confined to mallory's own keys.
    for key in ["", &"k".repeat(2000), "a\u{0}b", "x\u{7f}"] {
        expect(json!({"op":"get","key":key}), "invalid-key").await;
        expect(json!({"op":"set","key":key,"value":"x"}), "invalid-key").await;
    }
    let other_keys = [
        "secret",
        "victim:kv:secret",
        "../victim/kv/secret",
        format!("{p}victim:kv:secret").leak(),
        "*",
        "@public:kv:notice",
    ];
    for key in other_keys {
        assert_eq!(mallory(json!({"op":"get","key":key})).await, Ok(json!(null)), "{key}");
        assert_eq!(mallory(json!({"op":"delete","key":key})).await, Ok(json!(false)), "{key}");
        assert_eq!(mallory(json!({"op":"subject_exists","subject":key})).await, Ok(json!(false)), "{key}");
    }
    for pattern in ["*", "*:*", "[a-z]*", "\\*", "..", "victim*", "*secret*", format!("{p}*").leak(), "@public*"] {
        assert_eq!(mallory(json!({"op":"list_all","pattern":pattern})).await, Ok(json!([])), "{pattern}");
        assert_eq!(mallory(json!({"op":"subject_list","pattern":pattern})).await, Ok(json!([])), "{pattern}");
    }
    for pattern in ["[abc", "abc\\", "*a*b*c*d*e*f*g*h*i*"] {
        expect(json!({"op":"list","pattern":pattern,"limit":10}), "invalid-key").await;
    }
    // Namespaces: ungranted ones are closed, the read-only one refuses writes.
    for ns in ["victim", "counter", "private", "@public"] {
        expect(json!({"op":"get","key":"secret","ns":ns}), "access-denied").await;
    }
    assert_eq!(mallory(json!({"op":"get","key":"notice","ns":"public"})).await, Ok(json!("read me")));
    expect(json!({"op":"set","key":"notice","value":"defaced","ns":"public"}), "access-denied").await;
    expect(json!({"op":"clear","ns":"public"}), "access-denied").await;
    expect(json!({"op":"lock_hold","name":"x","ttl_ms":1000,"wait_ms":0,"ns":"public"}), "access-denied").await;
    // Size attacks.
    expect(json!({"op":"set","key":"big","len":100_000_000}), "too-large").await;
    expect(json!({"op":"set_many","entries":{},"count":1_000_000}), "too-large").await;
    let err = host.call("mallory", br#"{"op":"respond","len":20000000}"#).await.unwrap_err();
    assert!(matches!(&err, CallError::Role { error, .. } if error.kind() == "too-large"), "{err}");
    // Resource attacks fail only the attacking call.
    let err = host.call("mallory", br#"{"op":"spin"}"#).await.unwrap_err();
    assert!(matches!(err, CallError::DeadlineExceeded { .. }), "{err}");
    let err = host.call("mallory", br#"{"op":"grow"}"#).await.unwrap_err();
    assert!(matches!(err, CallError::OutOfMemory { .. }), "{err}");
    let err = host.call("mallory", br#"{"op":"recurse","depth":100000000}"#).await.unwrap_err();
    assert!(matches!(err, CallError::Trap { .. }), "{err}");
    let err = host.call("mallory", br#"{"op":"panic"}"#).await.unwrap_err();
    assert!(matches!(err, CallError::Trap { .. }), "{err}");
    assert_eq!(mallory(json!({"op":"print","message":"spam","times":20000})).await, Ok(json!(null)));
    // WASI: no environment, no files, no network.
    assert_eq!(mallory(json!({"op":"list_env"})).await, Ok(json!([])));
    assert_eq!(mallory(json!({"op":"read_env","name":"PATH"})).await, Ok(json!(null)));
    for path in ["/etc/passwd", "/proc/self/environ", ".", "/"] {
        expect(json!({"op":"read_file","path":path}), "access-denied").await;
        expect(json!({"op":"list_dir","path":path}), "access-denied").await;
    }
    expect(json!({"op":"connect","addr":"127.0.0.1:6379"}), "access-denied").await;
    expect(json!({"op":"connect","addr":"1.1.1.1:80"}), "access-denied").await;

    // Afterwards: the host serves, the victim's data and counter's count are intact.
    assert_eq!(host.call("counter", b"").await.unwrap(), b"2");
    assert_eq!(victim(json!({"op":"get","key":"secret"})).await, Ok(json!("victim's secret")));
    assert_eq!(victim(json!({"op":"subject_get","subject":"account","prop":"balance"})).await, Ok(json!("100")));
    assert_eq!(victim(json!({"op":"get","key":"notice","ns":"public"})).await, Ok(json!("read me")));
    // A key named like the victim's lands in mallory's own namespace.
    mallory(json!({"op":"set","key":"victim:kv:secret","value":"forged"})).await.unwrap();
    assert_eq!(victim(json!({"op":"get","key":"secret"})).await, Ok(json!("victim's secret")));
    // Every key in the store is under a documented prefix.
    let page = b.scan("*", None, 10_000).await.unwrap();
    assert!(page.cursor.is_none());
    let prefixes = ["counter:", "victim:", "mallory:", "@public:"].map(|r| format!("{p}{r}"));
    for key in &page.keys {
        assert!(prefixes.iter().any(|prefix| key.starts_with(prefix)), "stray key {key:?}");
    }
    let forged = format!("{p}mallory:kv:victim:kv:secret");
    assert!(page.keys.contains(&forged), "{:?}", page.keys);
}

/// Buffered subject writes and queued fire-and-forget writes live in host
/// memory; together they may hold at most the role's memory limit. A
/// get-many reads no more than that limit either.
async fn host_memory_held_for_a_role_is_bounded(b: Arc<dyn Backend>, p: String) {
    let limits = RoleLimits { max_memory_bytes: 8 << 20, ..RoleLimits::default() };
    let shared = Grants { namespaces: [("shared".to_owned(), Access::ReadWrite)].into(), ..Grants::default() };
    let host = host_with_specs(b.clone(), &p, vec![("mallory", "kvprobe", limits, shared)]);
    let mallory = |op: Value| probe(&host, "mallory", op);
    // Within the limit: 4 subjects × 100 writes of 10 kB.
    assert_eq!(mallory(json!({"op":"subject_fill","subjects":4,"props":100,"len":10_000})).await, Ok(json!(4)));
    // 100 subjects × 1000 writes of 100 kB would be 10 GB.
    let fill = json!({"op":"subject_fill","subjects":100,"props":1000,"len":100_000});
    assert_eq!(mallory(fill).await, Err("too-large".into()));
    // Tiny writes count their buffer's entries too: 90 subjects × 1000
    // strings of 10 bytes are 1.4 MB of names and values, but 10 MB held.
    let tiny = json!({"op":"subject_fill","subjects":90,"props":1000,"len":10});
    assert_eq!(mallory(tiny).await, Err("too-large".into()));
    // Queued writes count too: 9 × 1 MiB is over 8 MiB.
    let queue: Vec<Value> = (0..9).map(|i| json!({"op":"set_later","key":format!("q{i}"),"len":1 << 20})).collect();
    let answers = mallory(json!({"op":"batch","ops":queue})).await.unwrap();
    let refused: Vec<bool> = answers.as_array().unwrap().iter().map(|a| a.get("err").is_some()).collect();
    assert!(refused.first() == Some(&false) && refused.last() == Some(&true), "{answers}");
    let first_refused = &answers[refused.iter().position(|&r| r).unwrap()]["err"];
    assert_eq!(first_refused["kind"], "too-large", "{answers}");
    assert!(first_refused["message"].as_str().unwrap().contains("memory limit"), "{answers}");
    // Each call starts with nothing held: the same fill fits again.
    assert_eq!(mallory(json!({"op":"subject_fill","subjects":4,"props":100,"len":10_000})).await, Ok(json!(4)));

    // Reads too: values the role's memory could not hold (9 × 1 MiB) are
    // refused, not read whole into the host (and then trap the guest).
    let big: Vec<String> = (0..9).map(|i| format!("big{i}")).collect();
    for key in &big {
        mallory(json!({"op":"set","key":key,"len":1 << 20})).await.unwrap();
    }
    assert_eq!(mallory(json!({"op":"get_many","keys":big})).await, Err("too-large".into()));
    // Reading in chunks (8 MiB / 1 MiB: 8 keys each) still answers every
    // key, in order.
    assert_eq!(mallory(json!({"op":"set_many","entries":{},"count":20})).await, Ok(Value::Null));
    let keys: Vec<String> = (0..20).rev().map(|i| format!("bulk:{i}")).chain(["nope".into()]).collect();
    let expected: Vec<Value> = (0..20).rev().map(|i| json!(i.to_string())).chain([Value::Null]).collect();
    assert_eq!(mallory(json!({"op":"get_many","keys":keys})).await, Ok(Value::Array(expected)));

    // A shared namespace holds values no limit of this role bounded (here
    // 5 MiB each, written from outside): the store measures them first, so
    // values over the memory limit are refused without being read at all.
    let read_bytes = || {
        let metrics = host.metrics().render();
        let line = metrics.lines().find(|l| l.starts_with("rolehost_state_read_bytes_total") && l.contains("mallory"));
        line.and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).unwrap_or(0)
    };
    let wide: Vec<String> = (0..2).map(|i| format!("wide{i}")).collect();
    for key in &wide {
        b.set(&format!("{p}@shared:kv:{key}"), &vec![b'w'; 5 << 20], None).await.unwrap();
    }
    b.set(&format!("{p}@shared:kv:huge"), &vec![b'h'; 9 << 20], None).await.unwrap();
    b.set(&format!("{p}@shared:kv:small"), b"fits", None).await.unwrap();
    b.set(&format!("{p}@shared:kv:mid"), &vec![b'm'; 3 << 19], None).await.unwrap();
    let before = read_bytes();
    assert_eq!(mallory(json!({"op":"get_many","keys":wide,"ns":"shared"})).await, Err("too-large".into()));
    assert_eq!(mallory(json!({"op":"get","key":"huge","ns":"shared"})).await, Err("too-large".into()));
    assert_eq!(mallory(json!({"op":"get_and_delete","key":"huge","ns":"shared"})).await, Err("too-large".into()));
    assert!(b.exists(&format!("{p}@shared:kv:huge")).await.unwrap(), "a refused get-and-delete deletes nothing");
    let field = (String::from("pbig"), vec![b'x'; 9 << 20]);
    b.hash_apply(&format!("{p}@shared:s:wide"), &[field], &[], None).await.unwrap();
    let big_prop = json!({"op":"subject_get","subject":"wide","prop":"big","ns":"shared"});
    assert_eq!(mallory(big_prop).await, Err("too-large".into()));
    assert_eq!(read_bytes(), before, "refused reads count no bytes read");
    // Within the limit they are read, larger than this role's own
    // max-value-bytes (1 MiB) or not.
    let some = json!({"op":"get_many","keys":["small","nope","mid"],"ns":"shared"});
    let answer = mallory(some).await.unwrap();
    assert_eq!(
        (&answer[0], &answer[1], answer[2].as_str().map(str::len)),
        (&json!("fits"), &Value::Null, Some(3 << 19))
    );
    assert_eq!(mallory(json!({"op":"get","key":"small","ns":"shared"})).await, Ok(json!("fits")));
    assert_eq!(read_bytes(), before + 4 + (3 << 19) + 4);

    // A subject grown past the memory limit (9 properties of 1 MiB) is
    // refused whole; its properties one at a time are still readable.
    let huge = format!("{p}mallory:s:huge");
    let value = format!("\"{}\"", "x".repeat(1 << 20));
    let props: Vec<(String, Vec<u8>)> = (0..9).map(|i| (format!("p{i}"), value.clone().into_bytes())).collect();
    b.hash_apply(&huge, &props, &[], None).await.unwrap();
    assert_eq!(mallory(json!({"op":"subject_load","subject":"huge"})).await, Err("too-large".into()));
    let one = mallory(json!({"op":"subject_get","subject":"huge","prop":"3"})).await.unwrap();
    assert_eq!(one.as_str().map(str::len), Some((1 << 20) + 2), "the raw JSON string, quotes included");
    // So is one of many tiny properties (200 000 of 8 bytes: 1.6 MB of
    // names and values, many times that as strings in the host and guest).
    let many = format!("{p}mallory:s:many");
    let props: Vec<(String, Vec<u8>)> = (0..200_000).map(|i| (format!("p{i:06}"), b"1".to_vec())).collect();
    b.hash_apply(&many, &props, &[], None).await.unwrap();
    assert_eq!(mallory(json!({"op":"subject_load","subject":"many"})).await, Err("too-large".into()));
}

/// The host keeps what a subject's or a lock's handle names (about 2 kB
/// each with 1 kB names) for as long as the guest keeps it open, across
/// the calls of a warm instance too: that counts against the memory limit.
async fn handles_kept_open_count_against_the_memory_limit(b: Arc<dyn Backend>, p: String) {
    let limits = RoleLimits { max_memory_bytes: 8 << 20, warm_instances: 1, ..RoleLimits::default() };
    let host = host_with_specs(b, &p, vec![("mallory", "kvprobe", limits, Grants::default())]);
    let mallory = |op: Value| probe(&host, "mallory", op);
    // 100 000 of them would be 200 MB of host memory.
    for locks in [false, true] {
        let hoard = json!({"op":"hoard","locks":locks,"count":100_000,"name_len":1000});
        assert_eq!(mallory(hoard).await, Err("too-large".into()), "locks: {locks}");
    }
    // Dropped when the call ends: as many as fit open again.
    for locks in [false, true] {
        let hoard = json!({"op":"hoard","locks":locks,"count":1000,"name_len":1000});
        assert_eq!(mallory(hoard).await, Ok(json!(1000)), "locks: {locks}");
    }
    // Kept open by the warm instance, they add up across its calls.
    let keep = json!({"op":"hoard","count":1500,"name_len":1000,"keep":true});
    assert_eq!(mallory(keep.clone()).await, Ok(json!(1500)));
    assert_eq!(mallory(keep.clone()).await, Ok(json!(1500)));
    assert_eq!(mallory(keep).await, Err("too-large".into()));
}

/// On Redis, values a role may not read are measured and refused by the
/// server itself: they never cross the network, as the server's own count
/// of the bytes it sent shows, nor enter the memory of its scripts (a server of its own, so no other test adds
/// to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_shared_reads_never_leave_redis() {
    let Some(server) = RedisServer::start() else { return };
    let (b, p) = (server.backend(0), unique("refused"));
    let limits = RoleLimits { max_memory_bytes: 8 << 20, ..RoleLimits::default() };
    let shared = Grants { namespaces: [("shared".to_owned(), Access::ReadWrite)].into(), ..Grants::default() };
    let host = host_with_specs(b.clone(), &p, vec![("mallory", "kvprobe", limits, shared)]);
    let mallory = |op: Value| probe(&host, "mallory", op);
    for (key, len) in [("wide0", 5 << 20), ("wide1", 5 << 20), ("huge", 9 << 20), ("mid", 3 << 19)] {
        b.set(&format!("{p}@shared:kv:{key}"), &vec![b'v'; len], None).await.unwrap();
    }
    b.hash_apply(&format!("{p}@shared:s:wide"), &[("pbig".to_owned(), vec![b'x'; 9 << 20])], &[], None).await.unwrap();
    let sent = || -> u64 {
        let info = server.cli(&["INFO", "stats"]);
        let line = info.lines().find_map(|l| l.trim().strip_prefix("total_net_output_bytes:"));
        line.and_then(|n| n.parse().ok()).expect("INFO stats has total_net_output_bytes")
    };
    let lua_memory = || -> u64 {
        let info = server.cli(&["INFO", "memory"]);
        let line = info.lines().find_map(|l| l.trim().strip_prefix("used_memory_lua:"));
        line.and_then(|n| n.parse().ok()).expect("INFO memory has used_memory_lua")
    };
    let (before, lua_before) = (sent(), lua_memory());
    let refused = [
        json!({"op":"get_many","keys":["wide0","wide1"],"ns":"shared"}),
        json!({"op":"get","key":"huge","ns":"shared"}),
        json!({"op":"get_and_delete","key":"huge","ns":"shared"}),
        json!({"op":"subject_get","subject":"wide","prop":"big","ns":"shared"}),
        json!({"op":"subject_load","subject":"wide","ns":"shared"}),
    ];
    for op in refused {
        assert_eq!(mallory(op.clone()).await, Err("too-large".into()), "{op}");
    }
    let after = sent();
    assert!(after - before < 64 << 10, "{} bytes sent for refused reads of 37 MiB", after - before);
    // Nor are they copied into the measuring scripts' memory (which Lua
    // frees only at its next collection).
    let copied = lua_memory().saturating_sub(lua_before);
    assert!(copied < 1 << 20, "the measuring scripts took {copied} bytes of Lua memory");
    // The count is not blind: a value that fits (1.5 MiB) is sent.
    let mid = mallory(json!({"op":"get","key":"mid","ns":"shared"})).await.unwrap();
    assert_eq!(mid.as_str().map(str::len), Some(3 << 19));
    assert!(sent() - after >= 3 << 19);
}

/// Lock attempts that fail outright (here: the store is full) took
/// nothing, so the call does not keep them to release at its end: a guest
/// trying again and again leaves no list of them behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_lock_attempts_leave_nothing_to_release() {
    let store = Arc::new(rolehost::backend::MemoryBackend::with_max_bytes(4096));
    store.set("t:filler", &[b'x'; 8192], None).await.unwrap();
    let host = host_with_specs(store, "t:", vec![("mallory", "kvprobe", RoleLimits::default(), Grants::default())]);
    let tries: Vec<Value> =
        (0..200).map(|i| json!({"op":"lock_hold","name":format!("l{i}"),"ttl_ms":1000,"wait_ms":0})).collect();
    let answers = probe(&host, "mallory", json!({"op":"batch","ops":tries})).await.unwrap();
    assert!(answers.as_array().unwrap().iter().all(|a| a["err"]["kind"] == "quota-exceeded"), "{answers}");
    let metrics = host.metrics().render();
    let releases =
        metrics.lines().find(|l| l.starts_with("rolehost_state_ops_total") && l.contains("compare_and_swap"));
    assert_eq!(releases, None, "released {releases:?} locks never taken");
}
