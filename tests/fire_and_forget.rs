//! Fire-and-forget writes (`set-later`, `delete-later`): checked when
//! queued, sent after the handler returns, dropped when the call traps,
//! and a failed send is counted, not returned.

use std::sync::Arc;
use std::time::Duration;

use rolehost::backend::{Backend, RedisBackend, RedisOptions, Write};
use rolehost::{Access, Grants, RoleLimits};
use rolehost_tests::{free_port, host, host_with_limits, host_with_specs, on_all_backends, probe};
use serde_json::json;

on_all_backends!(
    write_all_keeps_order_across_batches,
    queued_writes_land_after_the_call,
    queued_writes_are_dropped_when_the_call_traps,
    queued_writes_are_checked_when_queued,
);

async fn write_all_keeps_order_across_batches(b: Arc<dyn Backend>, p: String) {
    let key = |k: &str| format!("{p}{k}");
    b.set(&key("gone"), b"old", None).await.unwrap();
    let ttl = Some(Duration::from_secs(60));
    let writes = [
        Write::Set { key: key("a"), value: b"1".to_vec(), ttl: None },
        Write::Set { key: key("a"), value: b"2".to_vec(), ttl: None },
        Write::Set { key: key("t"), value: b"x".to_vec(), ttl },
        Write::Delete { key: key("gone") },
        Write::Delete { key: key("t2") },
        Write::Set { key: key("t2"), value: b"y".to_vec(), ttl },
    ];
    b.write_all(&writes).await.unwrap();
    assert_eq!(b.get(&key("a"), None).await.unwrap(), Some(b"2".to_vec()), "the later of two sets wins");
    assert_eq!(b.get(&key("gone"), None).await.unwrap(), None);
    assert_eq!(
        b.get(&key("t2"), None).await.unwrap(),
        Some(b"y".to_vec()),
        "a set after a delete of the same key lands"
    );
    for k in ["t", "t2"] {
        match b.expiry(&key(k)).await.unwrap() {
            rolehost::backend::Expiry::ExpiresIn(left) => assert!(left <= Duration::from_secs(60)),
            other => panic!("{k} should expire, got {other:?}"),
        }
    }
    assert_eq!(b.expiry(&key("a")).await.unwrap(), rolehost::backend::Expiry::Persistent);
}

async fn queued_writes_land_after_the_call(b: Arc<dyn Backend>, p: String) {
    let host = host(b, &p, &[("r", "kvprobe")]);
    probe(&host, "r", json!({"op":"set","key":"old","value":"v"})).await.unwrap();
    let answer = probe(
        &host,
        "r",
        json!({"op":"batch","ops":[
            {"op":"set_later","key":"a","value":"1"},
            {"op":"set_later","key":"b","value":"2","ttl_ms":60000},
            {"op":"delete_later","key":"old"},
            {"op":"get","key":"a"},
            {"op":"get","key":"old"},
        ]}),
    )
    .await
    .unwrap();
    // Reads in the same call do not see queued writes.
    assert_eq!(answer, json!([{"ok":null},{"ok":null},{"ok":null},{"ok":null},{"ok":"v"}]));
    host.settle().await;
    assert_eq!(probe(&host, "r", json!({"op":"get","key":"a"})).await, Ok(json!("1")));
    assert_eq!(probe(&host, "r", json!({"op":"get","key":"b"})).await, Ok(json!("2")));
    assert_eq!(probe(&host, "r", json!({"op":"get","key":"old"})).await, Ok(json!(null)));
    let left = probe(&host, "r", json!({"op":"expiry","key":"b"})).await.unwrap();
    assert!(left.as_u64().is_some_and(|ms| ms > 0 && ms <= 60_000), "b keeps its TTL: {left}");
}

async fn queued_writes_are_dropped_when_the_call_traps(b: Arc<dyn Backend>, p: String) {
    let host = host(b, &p, &[("r", "kvprobe")]);
    let trapped = host
        .call(
            "r",
            json!({"op":"batch","ops":[{"op":"set_later","key":"x","value":"1"},{"op":"panic"}]})
                .to_string()
                .as_bytes(),
        )
        .await;
    assert!(matches!(trapped, Err(rolehost::CallError::Trap { .. })), "{trapped:?}");
    // A role error (not a trap) still sends: the handler returned.
    let refused = probe(
        &host,
        "r",
        json!({"op":"batch","ops":[{"op":"set_later","key":"y","value":"1"},{"op":"set","key":"","value":"v"}]}),
    )
    .await
    .unwrap();
    assert_eq!(refused[1]["err"]["kind"], "invalid-key");
    host.settle().await;
    assert_eq!(probe(&host, "r", json!({"op":"get","key":"x"})).await, Ok(json!(null)));
    assert_eq!(probe(&host, "r", json!({"op":"get","key":"y"})).await, Ok(json!("1")));
}

async fn queued_writes_are_checked_when_queued(b: Arc<dyn Backend>, p: String) {
    let limits =
        RoleLimits { max_value_bytes: 10, max_batch_entries: 3, max_ttl_ms: Some(1000), ..RoleLimits::default() };
    let host = host_with_limits(b.clone(), &p, &[("r", "kvprobe")], limits);
    let err = |op| async { probe(&host, "r", op).await.unwrap_err() };
    assert_eq!(err(json!({"op":"set_later","key":"a","len":11})).await, "too-large");
    assert_eq!(err(json!({"op":"set_later","key":"","value":"v"})).await, "invalid-key");
    assert_eq!(err(json!({"op":"set_later","key":"a","value":"v","ttl_ms":2000})).await, "invalid-argument");
    assert_eq!(err(json!({"op":"delete_later","key":"a\u{0}b"})).await, "invalid-key");
    let four: Vec<_> = (0..4).map(|i| json!({"op":"set_later","key":format!("k{i}"),"value":"v"})).collect();
    let answer = probe(&host, "r", json!({"op":"batch","ops":four})).await.unwrap();
    assert_eq!(answer[3]["err"]["kind"], "too-large", "a fourth queued write is over the batch limit: {answer}");
    host.settle().await;
    let keys = probe(&host, "r", json!({"op":"list_all"})).await.unwrap();
    assert_eq!(keys, json!(["k0", "k1", "k2"]), "the three accepted writes land, nothing else");

    // A read-only grant refuses queued writes like any other write.
    let reader = host_with_specs(
        b,
        &p,
        vec![(
            "reader",
            "kvprobe",
            RoleLimits::default(),
            Grants { namespaces: [("shared".to_owned(), Access::Read)].into(), ..Grants::default() },
        )],
    );
    let op = json!({"ns":"shared","op":"set_later","key":"k","value":"v"});
    assert_eq!(probe(&reader, "reader", op).await, Err("access-denied".into()));
}

/// Redis is unreachable: the call still answers, and the lost write is
/// counted in the metrics instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sends_are_counted_not_returned() {
    let mut options = RedisOptions::new(format!("redis://127.0.0.1:{}/0", free_port()));
    options.connect_timeout = Duration::from_millis(200);
    options.op_timeout = Duration::from_millis(500);
    let backend: Arc<dyn Backend> = Arc::new(RedisBackend::new(&options).unwrap());
    let host = host(backend, "ff:", &[("r", "kvprobe")]);
    let answer = probe(&host, "r", json!({"op":"set_later","key":"a","value":"1"})).await;
    assert_eq!(answer, Ok(json!(null)), "the call does not wait for its queued writes");
    host.settle().await;
    let failed = host
        .metrics()
        .render()
        .lines()
        .find(|l| l.starts_with("rolehost_deferred_writes_total{") && l.contains("outcome=\"failed\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert_eq!(failed, Some(1), "{}", host.metrics().render());
}

/// Queued writes go out a run at a time; when a later run fails (here the
/// memory store is full for the sets), those sent before it count as sent
/// and the rest as failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_sent_before_a_failed_run_count_as_sent() {
    let store = Arc::new(rolehost::backend::MemoryBackend::with_max_bytes(4096));
    store.set("ff:r:kv:old", b"1", None).await.unwrap();
    store.set("ff:filler", &[b'x'; 8192], None).await.unwrap();
    let host = host(store.clone(), "ff:", &[("r", "kvprobe")]);
    let queue = [
        json!({"op":"delete_later","key":"old"}),
        json!({"op":"set_later","key":"a","value":"1"}),
        json!({"op":"set_later","key":"b","value":"2"}),
    ];
    probe(&host, "r", json!({"op":"batch","ops":queue})).await.unwrap();
    host.settle().await;
    assert_eq!(store.get("ff:r:kv:old", None).await, Ok(None), "the delete went out");
    let metrics = host.metrics().render();
    let count = |outcome: &str| {
        let wanted = format!("outcome=\"{outcome}\"");
        let line = metrics.lines().find(|l| l.starts_with("rolehost_deferred_writes_total{") && l.contains(&wanted));
        line.and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
    };
    assert_eq!((count("sent"), count("failed")), (Some(1), Some(2)), "{metrics}");
}

/// While Redis does not answer, the writes finished calls left unsent are
/// held up to the host's `max_unsent_bytes`; those of calls past it are
/// dropped at once and counted as failed, rather than pile up in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsent_writes_are_held_only_up_to_the_hosts_limit() {
    // A server that takes connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut options = RedisOptions::new(format!("redis://127.0.0.1:{}/0", silent.local_addr().unwrap().port()));
    options.op_timeout = Duration::from_secs(2);
    let backend: Arc<dyn Backend> = Arc::new(RedisBackend::new(&options).unwrap());
    let host_options = rolehost::HostOptions { max_unsent_bytes: 1 << 20, ..Default::default() };
    let host = rolehost::Host::with_options(backend, "ff:", host_options).unwrap();
    host.load(&rolehost_tests::spec("r", "kvprobe")).unwrap();
    let failed = || {
        let metrics = host.metrics().render();
        let line = metrics.lines().find(|l| l.starts_with("rolehost_deferred_writes_total{") && l.contains("failed"));
        line.and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).unwrap_or(0)
    };
    let queue = |key: &str| json!({"op":"set_later","key":key,"len":400_000});
    // Two of 400 kB wait for Redis; a third would be over 1 MiB.
    for key in ["a", "b", "c"] {
        assert_eq!(probe(&host, "r", queue(key)).await, Ok(json!(null)), "the call answers either way");
    }
    assert_eq!(failed(), 1, "the third call's write is dropped at once");
    // Once the waiting ones have failed, there is room again.
    host.settle().await;
    assert_eq!(failed(), 3);
    assert_eq!(probe(&host, "r", queue("d")).await, Ok(json!(null)));
    assert_eq!(failed(), 3, "taken, not dropped");
    host.settle().await;
    assert_eq!(failed(), 4);
}

/// The handler returned with writes queued and a lock still held; its
/// caller goes away while the host releases that lock (here Redis holds
/// writes back for a while). The queued writes are still sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_writes_are_sent_when_the_caller_leaves_during_the_last_release() {
    // A server of its own: the pause below holds up every client.
    let Some(server) = rolehost_tests::RedisServer::start() else { return };
    let db = server.fresh_db();
    let host = host(server.backend(db), "ff:", &[("r", "kvprobe")]);
    let ops = json!({"op":"batch","ops":[
        {"op":"set_later","key":"queued","value":"1"},
        {"op":"hoard","locks":true,"count":1,"name_len":4,"keep":true,"sleep_ms":1000},
    ]});
    let lock = "ff:r:lock:{0000}";
    let db_arg = db.to_string();
    let held = || server.cli(&["-n", &db_arg, "exists", lock]).trim() == "1";
    let call = probe(&host, "r", ops);
    let paused = async {
        while !held() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Writes (and scripts) wait until let go: the lock's release too.
        server.cli(&["client", "pause", "60000", "write"]);
        // The caller gives up while the release waits.
        tokio::time::sleep(Duration::from_millis(1300)).await;
    };
    tokio::select! {
        answer = call => panic!("the call ended before its caller left: {answer:?}"),
        () = paused => {}
    }
    server.cli(&["client", "unpause"]);
    host.settle().await;
    let queued = server.backend(db).get("ff:r:kv:queued", None).await;
    assert_eq!(queued, Ok(Some(b"1".to_vec())), "{}", host.metrics().render());
}
