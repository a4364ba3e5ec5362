//! rolehost behind Redis Sentinel: a primary, two replicas and three
//! Sentinels. The primary is killed; the Sentinels promote a replica;
//! rolehost finds the new primary by itself and loses no write it
//! acknowledged. Writes wait for one replica (`wait-replicas=1`); the
//! Sentinels promote the replica with the most data, so it has every write
//! any replica confirmed, and the other replica then confirms new writes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rolehost::backend::Backend;
use rolehost::config::StateConfig;
use rolehost::manifest::RedisSection;
use rolehost::StateError;
use rolehost_tests::{wait_until, RedisSentinels};

fn backend(url: &str) -> Arc<dyn Backend> {
    let mut section = RedisSection::default();
    section.op_timeout_ms = Some(2000);
    section.connect_timeout_ms = Some(500);
    StateConfig::parse(url, &section).unwrap().connect().unwrap()
}

/// Writes numbered keys one after another; the acknowledged ones, and the
/// failures (all must be `unavailable`).
async fn write(b: &dyn Backend, from: usize, acks: usize, acked: &mut BTreeSet<String>) -> usize {
    let (mut failures, mut i, start) = (0, from, Instant::now());
    let goal = acked.len() + acks;
    while acked.len() < goal {
        assert!(start.elapsed() < Duration::from_secs(180), "writes never succeeded again ({failures} failures)");
        let key = format!("k{i}");
        match b.set(&key, key.as_bytes(), None).await {
            Ok(()) => {
                acked.insert(key);
            }
            Err(StateError::Unavailable(_)) => failures += 1,
            Err(other) => panic!("a failover must look like `unavailable`, not {other:?}"),
        }
        i += 1;
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_the_replica_loses_no_acknowledged_write() {
    let Some(mut setup) = RedisSentinels::start(2) else { return };
    let b = backend(&setup.url("?wait-replicas=1"));
    assert_eq!(b.health().await.unwrap().details["topology"], "sentinel");
    let mut acked = BTreeSet::new();
    assert_eq!(write(&*b, 0, 200, &mut acked).await, 0, "no failures before the fault");
    let old_port = setup.primary.port;

    setup.primary.kill();
    let failures = write(&*b, 1_000_000, 200, &mut acked).await;
    // Each failed call waited up to the 2 s operation timeout; a failover
    // (1 s to notice, then an election) ends well within 30 of them.
    eprintln!("{failures} calls failed during the failover");
    assert!(failures <= 30, "{failures} calls failed during the failover");
    assert!(b.get("k0", None).await.is_ok(), "reads work again");
    wait_until("the Sentinels name a replica", Duration::from_secs(60), || {
        setup.primary_port().is_some_and(|port| port != old_port)
    });
    let new_port = setup.primary_port().unwrap();
    let promoted = setup.replicas.iter().find(|r| r.port == new_port).expect("a replica was promoted");

    // Every acknowledged write is on the new primary.
    let keys = promoted.cli(&["--scan", "--pattern", "k*"]);
    let present: BTreeSet<String> = keys.lines().map(str::to_owned).collect();
    let lost: Vec<_> = acked.difference(&present).collect();
    assert!(lost.is_empty(), "{} acknowledged writes lost: {:?}", lost.len(), &lost[..lost.len().min(10)]);
    for key in acked.iter().take(20) {
        assert_eq!(b.get(key, None).await.unwrap(), Some(key.as_bytes().to_vec()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_url_needs_the_primary_name() {
    let error = StateConfig::parse("redis+sentinel://127.0.0.1:26379", &RedisSection::default())
        .unwrap()
        .connect()
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("name the primary"), "{error}");
}

/// The Sentinels are asked side by side: one that stopped answering (here
/// frozen, first in the URL) costs nothing while another answers, even
/// with an operation timeout shorter than it takes to give up on it. The
/// primary's connections are cut again and again, so each write first
/// asks the Sentinels where the primary is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_sentinel_costs_nothing_while_another_answers() {
    let Some(setup) = RedisSentinels::start(0) else { return };
    setup.sentinels[0].freeze(true);
    let mut section = RedisSection::default();
    section.op_timeout_ms = Some(400);
    section.connect_timeout_ms = Some(400);
    let b = StateConfig::parse(&setup.url(""), &section).unwrap().connect().unwrap();
    for i in 0..5 {
        let value = format!("write {i}");
        b.set("k", value.as_bytes(), None).await.unwrap_or_else(|e| panic!("write {i}: {e}"));
        assert!(setup.primary.cli(&["get", "k"]).contains(&value), "the primary has write {i}");
        // Cut every client connection but redis-cli's own.
        setup.primary.cli(&["client", "kill", "type", "normal"]);
    }
    setup.sentinels[0].freeze(false);
}
