//! `cargo xtask demo`: a readable tour of rolehost on the embedded backend
//! (or on Redis with `--state redis://…`).

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use rolehost::config::StateConfig;
use rolehost::manifest::{RedisSection, DEFAULT_GLOBAL_PREFIX};
use rolehost::{Host, RoleSpec};

pub fn run(root: &Path, state: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(scenario(root, state))
}

async fn call(host: &Host, role: &str, request: &str) -> anyhow::Result<String> {
    let response = host.call(role, request.as_bytes()).await?;
    let response = String::from_utf8_lossy(&response).into_owned();
    if request.is_empty() {
        println!("  {role} ← (empty) → {response}");
    } else {
        println!("  {role} ← {request}\n  {:width$} → {response}", "", width = role.len());
    }
    Ok(response)
}

async fn scenario(root: &Path, state: &str) -> anyhow::Result<()> {
    let backend = StateConfig::parse(state, &RedisSection::default())?.connect()?;
    let host = Host::new(backend.clone(), DEFAULT_GLOBAL_PREFIX)?;
    let roles = root.join("target/roles");
    for (name, file) in [
        ("counter", "counter"),
        ("visits", "counter"),
        ("session-cache", "session-cache"),
        ("notes", "notes"),
        ("profile", "profile"),
        ("rate-limiter", "rate-limiter"),
        ("worker", "worker"),
    ] {
        let mut spec = RoleSpec::from_path(roles.join(format!("{file}.wasm")))?;
        spec.name = name.to_owned();
        let role = host.load(&spec).with_context(|| format!("loading {name}"))?;
        println!("loaded role {:14} from {file}.wasm (sha256 {}…)", role.name(), &role.sha256()[..12]);
    }
    println!("state backend: {}\n", backend.kind());

    println!("1. counter increments its key `count` atomically:");
    for _ in 0..3 {
        call(&host, "counter", "").await?;
    }

    println!("\n2. `visits` runs the same component under another identity; its `count` is its own:");
    call(&host, "visits", "").await?;
    call(&host, "counter", "").await?;

    println!("\n3. session-cache keeps a session for 300 ms:");
    call(&host, "session-cache", r#"{"op":"put","id":"s1","session":{"user":"ada"},"ttl_ms":300}"#).await?;
    call(&host, "session-cache", r#"{"op":"get","id":"s1"}"#).await?;
    println!("  … waiting 400 ms …");
    tokio::time::sleep(Duration::from_millis(400)).await;
    call(&host, "session-cache", r#"{"op":"get","id":"s1"}"#).await?;

    println!("\n4. cache-aside: the first fetch loads from the origin, the second is a hit:");
    call(&host, "session-cache", r#"{"op":"fetch","id":"s2"}"#).await?;
    call(&host, "session-cache", r#"{"op":"fetch","id":"s2"}"#).await?;

    println!("\n5. notes: a batch write, a listing by prefix, a batch delete:");
    call(
        &host,
        "notes",
        r#"{"op":"put","notes":{"2024-01":{"t":"plan"},"2024-02":{"t":"ship"},"2025-01":{"t":"rest"}}}"#,
    )
    .await?;
    call(&host, "notes", r#"{"op":"list","prefix":"2024-"}"#).await?;
    call(&host, "notes", r#"{"op":"delete","ids":["2024-01","2024-02","2025-01"]}"#).await?;

    println!("\n6. profile records logins on the subject `user-u1` (an atomic increment, a buffered store):");
    call(&host, "profile", r#"{"user":"u1"}"#).await?;
    call(&host, "profile", r#"{"user":"u1"}"#).await?;

    println!("\n7. rate-limiter admits 3 calls a minute per client (GCRA, exact across hosts):");
    for _ in 0..4 {
        call(&host, "rate-limiter", r#"{"client":"c1","limit":3,"window_ms":60000}"#).await?;
    }

    println!("\n8. four workers at once take the lock `job`; each answers its fencing token:");
    let workers = (0..4).map(|_| host.call("worker", b""));
    let mut tokens = Vec::new();
    for result in futures_join(workers).await {
        tokens.push(String::from_utf8_lossy(&result?).into_owned());
    }
    println!("  worker × 4 → tokens {}", tokens.join(", "));

    println!("\n9. every key lives under its role's prefix `{DEFAULT_GLOBAL_PREFIX}{{role}}:{{space}}:`:");
    let mut cursor = None;
    loop {
        let page = backend.scan(&format!("{DEFAULT_GLOBAL_PREFIX}*"), cursor.as_deref(), 100).await?;
        for key in &page.keys {
            println!("  {key}");
        }
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    Ok(())
}

/// Awaits every future concurrently, keeping their order.
async fn futures_join<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in pinned.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(|o| o.expect("every future finished")).collect()
}
