//! Every example role, through the host, on both backends.

use std::sync::Arc;
use std::time::Duration;

use rolehost::backend::Backend;
use rolehost_tests::{call_json, host, on_all_backends};
use serde_json::json;

on_all_backends!(
    counter_counts_from_one,
    session_cache_put_get_expire_delete,
    session_cache_is_cache_aside,
    notes_batch_and_prefix_listing
);

async fn counter_counts_from_one(b: Arc<dyn Backend>, p: String) {
    let host = host(b.clone(), &p, &[("counter", "counter")]);
    for expected in 1..=5 {
        assert_eq!(host.call("counter", b"").await.unwrap(), expected.to_string().into_bytes());
    }
    // A new host on the same backend sees the same state: it lives in the backend.
    let again = rolehost_tests::host(b, &p, &[("counter", "counter")]);
    assert_eq!(again.call("counter", b"").await.unwrap(), b"6");
}

async fn session_cache_put_get_expire_delete(b: Arc<dyn Backend>, p: String) {
    let host = host(b, &p, &[("session-cache", "session-cache")]);
    let put = |id: &str, ttl: Option<u64>| json!({"op":"put","id":id,"session":{"user":id,"roles":["a"]},"ttl_ms":ttl});
    assert_eq!(call_json(&host, "session-cache", put("short", Some(1000))).await, json!({"stored":true}));
    assert_eq!(call_json(&host, "session-cache", put("long", None)).await, json!({"stored":true}));
    let get = |id: &str| json!({"op":"get","id":id});
    assert_eq!(
        call_json(&host, "session-cache", get("short")).await,
        json!({"session":{"user":"short","roles":["a"]}})
    );
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(call_json(&host, "session-cache", get("short")).await, json!({"session":null}));
    assert_eq!(call_json(&host, "session-cache", get("long")).await["session"]["user"], "long");
    assert_eq!(call_json(&host, "session-cache", json!({"op":"delete","id":"long"})).await, json!({"deleted":true}));
    assert_eq!(call_json(&host, "session-cache", json!({"op":"delete","id":"long"})).await, json!({"deleted":false}));
    assert_eq!(call_json(&host, "session-cache", get("long")).await, json!({"session":null}));
    // A malformed request is the role's error, not a trap.
    let err = host.call("session-cache", b"{not json").await.unwrap_err();
    assert_eq!(err.kind(), "role-error", "{err}");
}

async fn session_cache_is_cache_aside(b: Arc<dyn Backend>, p: String) {
    let host = host(b, &p, &[("session-cache", "session-cache")]);
    let fetch = json!({"op":"fetch","id":"s9"});
    let first = call_json(&host, "session-cache", fetch.clone()).await;
    assert_eq!(first["cached"], false);
    let second = call_json(&host, "session-cache", fetch).await;
    assert_eq!(second["cached"], true);
    assert_eq!(first["session"], second["session"]);
}

async fn notes_batch_and_prefix_listing(b: Arc<dyn Backend>, p: String) {
    let host = host(b, &p, &[("notes", "notes")]);
    let put =
        json!({"op":"put","notes":{"2024-01":{"t":"a"},"2024-02":{"t":"b"},"2025-01":{"t":"c"},"x*y":{"t":"glob"}}});
    assert_eq!(call_json(&host, "notes", put).await, json!({"stored":4}));
    assert_eq!(
        call_json(&host, "notes", json!({"op":"list","prefix":"2024-"})).await,
        json!({"notes":{"2024-01":{"t":"a"},"2024-02":{"t":"b"}}})
    );
    // A glob character in the prefix is taken literally.
    assert_eq!(
        call_json(&host, "notes", json!({"op":"list","prefix":"x*"})).await,
        json!({"notes":{"x*y":{"t":"glob"}}})
    );
    assert_eq!(
        call_json(&host, "notes", json!({"op":"list","prefix":"x"})).await["notes"].as_object().unwrap().len(),
        1
    );
    assert_eq!(
        call_json(&host, "notes", json!({"op":"get","ids":["2025-01","nope"]})).await,
        json!({"notes":[{"t":"c"},null]})
    );
    assert_eq!(
        call_json(&host, "notes", json!({"op":"delete","ids":["2024-01","2025-01","nope"]})).await,
        json!({"deleted":2})
    );
    assert_eq!(call_json(&host, "notes", json!({"op":"list"})).await["notes"].as_object().unwrap().len(), 2);
}
