//! Redis faults: a server killed with SIGKILL and restarted (AOF with
//! `appendfsync always`) keeps every write rolehost acknowledged; while
//! Redis is down calls fail with `unavailable` and the host stays up; when
//! it returns, calls succeed again by themselves, and a read waiting inside
//! its deadline is retried until it succeeds. A write waiting for a replica
//! that is gone (`wait-replicas`) holds up no read and keeps its
//! connection, and says it is on the primary even when the `WAIT` itself
//! goes unanswered; nor does a large
//! batch in flight hold up single commands. A connection that
//! stops answering, or whose login was refused, is replaced by itself. A
//! lock Redis took for a call that gave up before the answer is released.
//! A server busy with a script is waited for, transactions included.
//! Worker threads connect side by side, not one after another, and
//! connections made again and again leave no task behind.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rolehost::backend::{Backend, RedisBackend, RedisOptions};
use rolehost::StateError;
use rolehost_tests::{eventually, free_port, host, probe, scratch_dir, wait_until, RedisServer};
use serde_json::json;

fn backend(port: u16, op_timeout: Duration) -> Arc<dyn Backend> {
    let mut options = RedisOptions::new(format!("redis://127.0.0.1:{port}/0"));
    options.op_timeout = op_timeout;
    options.connect_timeout = Duration::from_millis(500);
    Arc::new(RedisBackend::new(&options).unwrap())
}

/// What the writer saw: keys acknowledged, the last acknowledged counter
/// value, increments tried, and failures.
#[derive(Default)]
struct Log {
    acked: BTreeSet<String>,
    last_count: i64,
    increments: i64,
    failures: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_aof_always_keeps_every_acknowledged_write() {
    let dir = scratch_dir("aof");
    let dir = dir.display().to_string();
    let aof = ["--appendonly", "yes", "--appendfsync", "always", "--dir", dir.as_str()];
    let port = free_port();
    let Some(mut server) = RedisServer::start_on(port, &aof) else { return };
    let b = backend(port, Duration::from_millis(500));
    let log = Arc::new(Mutex::new(Log::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (b, log, stop) = (b.clone(), log.clone(), stop.clone());
        tokio::spawn(async move {
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let key = format!("k{i}");
                let set = b.set(&key, key.as_bytes(), None).await;
                log.lock().unwrap().increments += 1;
                let count = b.increment("count", 1, None).await;
                let mut log = log.lock().unwrap();
                if set.is_ok() {
                    log.acked.insert(key);
                }
                if let Ok(count) = count {
                    log.last_count = count;
                }
                for error in [set.err(), count.err()].into_iter().flatten() {
                    assert!(matches!(error, StateError::Unavailable(_)), "{error:?}");
                    log.failures += 1;
                }
            }
        })
    };
    let acked = || log.lock().unwrap().acked.len();
    wait_until("writes before the kill", Duration::from_secs(60), || acked() >= 300);

    server.kill(); // SIGKILL mid-stream
    wait_until("the writer notices", Duration::from_secs(60), || log.lock().unwrap().failures > 0);
    let before_restart = acked();
    let Some(_server) = RedisServer::start_on(port, &aof) else { return };
    wait_until("writes after the restart", Duration::from_secs(60), || acked() >= before_restart + 300);
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();

    let log = std::mem::take(&mut *log.lock().unwrap());
    let check = backend(port, Duration::from_secs(5));
    let keys: Vec<String> = log.acked.iter().cloned().collect();
    let values = check.get_many(&keys, None).await.unwrap();
    let lost: Vec<&String> = keys.iter().zip(&values).filter(|(_, v)| v.is_none()).map(|(k, _)| k).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged keys lost: {:?}",
        lost.len(),
        keys.len(),
        &lost[..lost.len().min(10)]
    );
    let count: i64 = String::from_utf8(check.get("count", None).await.unwrap().unwrap()).unwrap().parse().unwrap();
    assert!(count >= log.last_count, "acknowledged count {} but {count} survived", log.last_count);
    assert!(count <= log.increments, "an increment ran twice: {count} > {} tried", log.increments);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_unavailable_and_the_host_recovers_by_itself() {
    let port = free_port();
    let Some(mut server) = RedisServer::start_on(port, &[]) else { return };
    let host = host(backend(port, Duration::from_millis(300)), "rolehost:", &[("alice", "kvprobe")]);
    let set = json!({"op":"set","key":"k","value":"v"});
    assert_eq!(probe(&host, "alice", set.clone()).await, Ok(json!(null)));

    server.kill();
    for op in [json!({"op":"get","key":"k"}), set.clone(), json!({"op":"incr","key":"n","delta":1})] {
        assert_eq!(probe(&host, "alice", op).await, Err("unavailable".to_owned()));
    }
    // The host itself is fine: a call that needs no state still answers.
    assert_eq!(probe(&host, "alice", json!({"op":"recurse","depth":3})).await, Ok(json!(2)));

    // A read started while Redis is down, with a deadline long enough,
    // is retried (with backoff) until Redis is back, and succeeds.
    // Without retries it would fail at once (connection refused).
    let patient = backend(port, Duration::from_secs(60));
    let mut waiting = Box::pin(patient.get("rolehost:alice:kv:k", None));
    assert!(tokio::time::timeout(Duration::from_secs(1), &mut waiting).await.is_err(), "still retrying");
    let Some(_server) = RedisServer::start_on(port, &[]) else { return };
    assert_eq!(waiting.await, Ok(None), "the server restarted empty; the read was retried, not failed");

    // The host's own connection comes back without help: two seconds
    // after Redis is back (the promise), a call succeeds within its 300 ms
    // operation timeout (a few tries, for a slow machine).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut answer = probe(&host, "alice", set.clone()).await;
    for _ in 0..4 {
        if answer.is_ok() {
            break;
        }
        answer = probe(&host, "alice", set.clone()).await;
    }
    assert_eq!(answer, Ok(json!(null)), "recovered within two seconds");
    assert_eq!(probe(&host, "alice", json!({"op":"get","key":"k"})).await, Ok(json!("v")));
}

/// A connection made on a runtime that has stopped since (its reader task
/// went with it) is noticed and made again: a backend outlives the runtime
/// that connected it, on one server, a Cluster and Sentinels alike.
#[test]
fn a_backend_outlives_the_runtime_that_connected_it() {
    let Some(server) = rolehost_tests::shared_redis() else { return };
    let Some(cluster) = rolehost_tests::shared_cluster() else { return };
    let Some(sentinels) = rolehost_tests::RedisSentinels::start(1) else { return };
    let key = rolehost_tests::unique("outlived");
    let backends = [
        ("one server", server.backend(server.fresh_db())),
        ("cluster", cluster.backend()),
        ("sentinel", Arc::new(RedisBackend::new(&RedisOptions::new(sentinels.url(""))).unwrap()) as Arc<dyn Backend>),
    ];
    for (kind, backend) in backends {
        let runtime = || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime().block_on(backend.set(&key, b"v", None)).unwrap();
        let read = runtime().block_on(backend.get(&key, None));
        assert_eq!(read, Ok(Some(b"v".to_vec())), "{kind}");
    }
}

/// Worker threads connect side by side: while one waits for a server slow
/// to answer its handshake, the others make their connections too, rather
/// than queueing behind it (each here would then run out of time).
#[test]
fn workers_connect_side_by_side() {
    let Some(server) = RedisServer::start() else { return };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let handshake = Duration::from_millis(700);
    let proxy = runtime.block_on(FreezingProxy::start_slow(server.port, handshake));
    let mut options = RedisOptions::new(format!("redis://127.0.0.1:{}/0", proxy.port));
    options.connect_timeout = 3 * handshake;
    // Room for three slow connects and a half, not four in a row.
    options.op_timeout = handshake * 7 / 2;
    let backend: Arc<dyn Backend> = Arc::new(RedisBackend::new(&options).unwrap());
    const WORKERS: usize = 4;
    let workers = rolehost::workers::Workers::start(WORKERS).unwrap();
    let (done, results) = std::sync::mpsc::channel();
    for _ in 0..WORKERS {
        let (backend, done) = (backend.clone(), done.clone());
        workers.spawn(move || async move {
            let _ = done.send(backend.get("k", None).await);
        });
    }
    for _ in 0..WORKERS {
        let result = results.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(result, Ok(None), "every worker connects in time");
    }
    assert_eq!(proxy.connections.load(Ordering::SeqCst), WORKERS, "a connection per worker");
}

/// A connection made again and again (here the server closes it every
/// time) leaves nothing running behind on the runtime.
#[test]
fn reconnecting_again_and_again_leaves_no_task_behind() {
    let Some(server) = RedisServer::start() else { return };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let tasks = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
        let backend = backend(server.port, Duration::from_secs(2));
        backend.set("k", b"v", None).await.unwrap();
        let before = tasks();
        for _ in 0..20 {
            // Every client but redis-cli itself: rolehost's connection.
            assert_eq!(server.cli(&["client", "kill", "type", "normal"]).trim(), "1");
            // Read on the dead connection, then again on a new one.
            assert_eq!(backend.get("k", None).await, Ok(Some(b"v".to_vec())));
        }
        let start = std::time::Instant::now();
        while tasks() > before {
            assert!(start.elapsed() < Duration::from_secs(10), "{} tasks, {before} before", tasks());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// A primary and a replica in sync with it.
fn primary_and_replica() -> Option<(RedisServer, RedisServer)> {
    let primary = RedisServer::start()?;
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()])?;
    wait_until("the replica is in sync", Duration::from_secs(30), || {
        primary.cli(&["info", "replication"]).contains("state=online")
    });
    Some((primary, replica))
}

/// A backend writing through `port` to `primary` with `wait-replicas=1`,
/// once `replica` confirmed a write, and a write (`k2`) whose WAIT blocks
/// since the replica is killed.
async fn write_waiting_for_a_lost_replica(
    primary: &RedisServer,
    mut replica: RedisServer,
    port: u16,
) -> (Arc<dyn Backend>, tokio::task::JoinHandle<Result<(), StateError>>) {
    let mut options = RedisOptions::new(format!("redis://127.0.0.1:{port}/0?wait-replicas=1"));
    options.op_timeout = Duration::from_secs(3);
    let b: Arc<dyn Backend> = Arc::new(RedisBackend::new(&options).unwrap());
    b.set("k", b"v", None).await.expect("the replica confirms the write");
    replica.kill();
    let writer = b.clone();
    let write = tokio::spawn(async move { writer.set("k2", b"v2", None).await });
    wait_until("the write waits for the replica", Duration::from_secs(10), || blocked_clients(primary) == 1);
    (b, write)
}

/// `INFO clients`' count of clients blocked in a command such as `WAIT`.
fn blocked_clients(server: &RedisServer) -> usize {
    let info = server.cli(&["info", "clients"]);
    let line = info.lines().find_map(|l| l.trim().strip_prefix("blocked_clients:"));
    line.and_then(|n| n.parse().ok()).expect("INFO clients has blocked_clients")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waiting_for_a_lost_replica_holds_up_no_read_and_keeps_its_connection() {
    let Some((primary, replica)) = primary_and_replica() else { return };
    // The replica is gone: the next write's WAIT holds its connection
    // until the operation timeout.
    let (b, write) = write_waiting_for_a_lost_replica(&primary, replica, primary.port).await;

    // A read meanwhile answers at once, not after the WAIT: the WAIT is
    // still blocked when the read has its value.
    assert_eq!(b.get("k", None).await, Ok(Some(b"v".to_vec())));
    assert_eq!(blocked_clients(&primary), 1, "the read was answered only after the WAIT ended");

    let unconfirmed = |outcome: Result<(), StateError>| match outcome {
        Err(StateError::Unavailable(message)) => assert!(message.contains("not confirmed"), "{message}"),
        other => panic!("an unconfirmed write is `unavailable`, not {other:?}"),
    };
    unconfirmed(write.await.unwrap());

    // An unconfirmed write is on the primary: it is sent once (sending it
    // again would not help the replicas, and an increment would count
    // twice). A lagging replica is no fault of the connection, so later
    // writes go out on the same one.
    let (connections, sets) = (connections_received(&primary), command_calls(&primary, "set"));
    unconfirmed(b.set("k3", b"v3", None).await);
    unconfirmed(b.increment("n", 1, None).await.map(drop));
    assert_eq!(command_calls(&primary, "set"), sets + 1, "an unconfirmed SET was sent again");
    assert_eq!(b.get("n", None).await, Ok(Some(b"1".to_vec())), "an unconfirmed increment ran more than once");
    // + 3: redis-cli's own connections since.
    assert_eq!(connections_received(&primary), connections + 3, "an unconfirmed write dropped its connection");
}

/// Writes that find nothing to do (a lock taken, a value not as expected,
/// a rate spent) wrote nothing, so they do not wait for replicas: with the
/// replica gone they answer rather than fail as unconfirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_write_nothing_do_not_wait_for_replicas() {
    let Some((primary, mut replica)) = primary_and_replica() else { return };
    let mut options = RedisOptions::new(format!("redis://127.0.0.1:{}/0?wait-replicas=1", primary.port));
    options.op_timeout = Duration::from_secs(3);
    let b = RedisBackend::new(&options).unwrap();
    let minute = Duration::from_secs(60);
    b.set("k", b"v", None).await.expect("the replica confirms the write");
    assert!(b.lock_acquire("lock", "fence", "me", minute).await.unwrap().is_some());
    assert!(b.rate_check("rate", 1, minute, 1).await.unwrap().allowed);
    replica.kill();
    assert_eq!(b.set_if_absent("k", b"w", None).await, Ok(false));
    assert_eq!(b.compare_and_swap("k", Some(b"other"), Some(b"w"), None).await, Ok(false));
    assert_eq!(b.lock_acquire("lock", "fence", "you", minute).await, Ok(None));
    assert!(!b.rate_check("rate", 1, minute, 1).await.unwrap().allowed);
    // One that writes still waits, and says it went unconfirmed.
    let written = b.set_if_absent("new", b"v", None).await;
    assert!(matches!(&written, Err(StateError::Unavailable(m)) if m.contains("not confirmed")), "{written:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_wait_goes_unanswered_says_it_is_on_the_primary() {
    let Some((primary, replica)) = primary_and_replica() else { return };
    let proxy = FreezingProxy::start(primary.port).await;
    // An idempotent write is done and its WAIT blocked; then no answer
    // comes back at all, so the operation times out during the WAIT.
    let (_, write) = write_waiting_for_a_lost_replica(&primary, replica, proxy.port).await;
    proxy.mute_open_connections().await;
    match write.await.unwrap() {
        Err(StateError::Unavailable(message)) => {
            assert!(message.contains("not confirmed: Redis did not answer WAIT"), "{message}");
            assert!(message.contains("it is on the primary"), "{message}");
        }
        other => panic!("a write whose WAIT timed out is `unavailable`, not {other:?}"),
    }
    assert_eq!(primary.cli(&["get", "k2"]).trim(), "v2", "the write is on the primary");
}

/// `INFO commandstats`' count of calls of `command`.
fn command_calls(server: &RedisServer, command: &str) -> usize {
    let info = server.cli(&["info", "commandstats"]);
    let stats = info.lines().find_map(|l| l.trim().strip_prefix(&format!("cmdstat_{command}:"))).unwrap_or("calls=0");
    stats.strip_prefix("calls=").and_then(|rest| rest.split(',').next()?.parse().ok()).expect("calls=N")
}

/// `INFO stats`' count of connections the server has accepted.
fn connections_received(server: &RedisServer) -> usize {
    let info = server.cli(&["info", "stats"]);
    let line = info.lines().find_map(|l| l.trim().strip_prefix("total_connections_received:"));
    line.and_then(|n| n.parse().ok()).expect("INFO stats has total_connections_received")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_in_flight_does_not_hold_up_single_commands() {
    let Some(server) = RedisServer::start() else { return };
    let proxy = FreezingProxy::start(server.port).await;
    let b = backend(proxy.port, Duration::from_secs(8));
    let entries: Vec<(String, Vec<u8>)> = (0..100).map(|i| (format!("big:{i}"), vec![b'x'; 1000])).collect();
    let keys: Vec<String> = entries.iter().map(|(key, _)| key.clone()).collect();
    // The only connection so far is the one large batches take.
    b.set_many(&entries, None).await.unwrap();
    // It now carries nothing, as if busy moving a huge batch.
    proxy.freeze_open_connections().await;
    let reader = b.clone();
    let read_keys = keys.clone();
    let batch = tokio::spawn(async move { reader.get_many(&read_keys, None).await });

    // Single commands and small batches meanwhile are answered at once,
    // on a connection of their own.
    b.set("small", b"v", None).await.unwrap();
    assert_eq!(b.get("small", None).await, Ok(Some(b"v".to_vec())));
    assert_eq!(b.get_many(&keys[..3], None).await.unwrap(), vec![Some(vec![b'x'; 1000]); 3]);
    assert!(!batch.is_finished(), "the stuck batch ended before the single commands were answered");

    // The stuck batch runs out of time (redis-rs's timer or ours, both
    // set to the operation timeout); the next one connects afresh.
    let stuck = batch.await.unwrap();
    assert!(matches!(stuck, Err(StateError::Unavailable(_))), "a frozen batch is `unavailable`, not {stuck:?}");
    assert_eq!(b.get_many(&keys, None).await.unwrap(), vec![Some(vec![b'x'; 1000]); 100]);
}

/// A TCP proxy to `target` whose connections open so far can be frozen
/// (they stay open but carry nothing more, like a server cut off the
/// network) or muted (requests still reach the server, its replies never
/// come back). Connections made after that are forwarded normally.
struct FreezingProxy {
    port: u16,
    /// Bumped to freeze, or to mute, the connections open so far.
    freeze: Arc<Sender<u64>>,
    mute: Arc<Sender<u64>>,
    /// Directions still forwarding: requests, replies. A freeze or mute
    /// waits until those it stops are all stopped.
    requests: Arc<Sender<u64>>,
    replies: Arc<Sender<u64>>,
    /// Connections accepted so far.
    connections: Arc<AtomicUsize>,
}

type Sender<T> = tokio::sync::watch::Sender<T>;

impl FreezingProxy {
    async fn start(target: u16) -> Self {
        Self::start_slow(target, Duration::ZERO).await
    }

    /// The same, but every new connection carries nothing for `delay`, as
    /// a server far away or busy would answer a handshake late.
    async fn start_slow(target: u16, delay: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let counter = || Arc::new(tokio::sync::watch::channel(0).0);
        let connections = Arc::new(AtomicUsize::new(0));
        let proxy =
            Self { port, freeze: counter(), mute: counter(), requests: counter(), replies: counter(), connections };
        let (freeze, mute, requests, replies, connections) = (
            proxy.freeze.clone(),
            proxy.mute.clone(),
            proxy.requests.clone(),
            proxy.replies.clone(),
            proxy.connections.clone(),
        );
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                // Freezes and mutes from now on reach this connection.
                let (requests_cut, replies_cut) = (bumped(&freeze), (bumped(&freeze), bumped(&mute)));
                let (requests, replies) = (requests.clone(), replies.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { return };
                    let (client_in, client_out) = client.into_split();
                    let (server_in, server_out) = server.into_split();
                    forward(client_in, server_out, requests_cut, requests);
                    let replies_cut = async move {
                        tokio::select! {
                            () = replies_cut.0 => {}
                            () = replies_cut.1 => {}
                        }
                    };
                    forward(server_in, client_out, replies_cut, replies);
                });
            }
        });
        proxy
    }

    /// Freezes every open connection and returns once none of them
    /// forwards anything any more; without the wait, a request sent right
    /// after could still slip through before its connection saw the freeze.
    async fn freeze_open_connections(&self) {
        self.freeze.send_modify(|n| *n += 1);
        self.requests.subscribe().wait_for(|&n| n == 0).await.unwrap();
        self.replies.subscribe().wait_for(|&n| n == 0).await.unwrap();
    }

    /// Mutes every open connection: from now on Redis gets its requests
    /// and runs them, but no answer comes back.
    async fn mute_open_connections(&self) {
        self.mute.send_modify(|n| *n += 1);
        self.replies.subscribe().wait_for(|&n| n == 0).await.unwrap();
    }
}

/// Resolves once `signal` is bumped past its value now.
fn bumped(signal: &Sender<u64>) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut watched = signal.subscribe();
    let now = *watched.borrow_and_update();
    async move {
        let _ = watched.wait_for(|&n| n > now).await;
    }
}

/// Copies `from` to `to` until `cut` (checked first, so nothing passes
/// once it is seen); then holds both open, silent, for ever. `flowing`
/// counts the directions still copying.
fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: impl std::future::Future<Output = ()> + Send + 'static,
    flowing: Arc<Sender<u64>>,
) {
    flowing.send_modify(|n| *n += 1);
    tokio::spawn(async move {
        let cut = tokio::select! {
            biased;
            () = cut => true,
            _ = tokio::io::copy(&mut from, &mut to) => false,
        };
        flowing.send_modify(|n| *n -= 1);
        if cut {
            std::future::pending::<()>().await;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_stops_answering_is_replaced() {
    let Some(server) = RedisServer::start() else { return };
    let proxy = FreezingProxy::start(server.port).await;
    let backend = backend(proxy.port, Duration::from_secs(1));
    backend.set("k", b"v", None).await.unwrap();
    proxy.freeze_open_connections().await;
    let error = backend.get("k", None).await.unwrap_err();
    assert!(matches!(error, StateError::Unavailable(_)), "{error}");
    assert!(!error.to_string().contains("may or may not"), "a read changes nothing: {error}");
    // The timed-out connection is dropped; the next operation connects
    // again and is answered.
    assert_eq!(backend.get("k", None).await, Ok(Some(b"v".to_vec())));
    // An increment lost the same way may have happened: the error says so.
    proxy.freeze_open_connections().await;
    let error = backend.increment("n", 1, None).await.unwrap_err();
    assert!(error.to_string().contains("may or may not have been applied"), "{error}");
    assert!(backend.get("k", None).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_is_tried_again_once_the_server_accepts_it() {
    let Some(server) = RedisServer::start() else { return };
    let mut options = RedisOptions::new(server.url(0));
    options.password = Some("s3cret-for-tests".into());
    options.op_timeout = Duration::from_secs(2);
    let backend = RedisBackend::new(&options).unwrap();
    // The server has no password yet: the login fails.
    assert!(backend.get("k", None).await.is_err());
    server.cli(&["CONFIG", "SET", "requirepass", "s3cret-for-tests"]);
    // Now it would succeed: the next operation logs in afresh.
    let answered = backend.get("k", None).await;
    server.cli(&["-a", "s3cret-for-tests", "--no-auth-warning", "CONFIG", "SET", "requirepass", ""]);
    assert_eq!(answered, Ok(None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_taken_for_a_call_dropped_before_the_answer_came_is_released() {
    let Some(server) = RedisServer::start() else { return };
    let proxy = FreezingProxy::start(server.port).await;
    let host = host(backend(proxy.port, Duration::from_secs(5)), "rolehost:", &[("alice", "kvprobe")]);
    // Connected, and the lock scripts loaded (a NOSCRIPT answer would be
    // lost, too): a lock taken and released.
    let warm_up = json!({"op":"lock_hold","name":"warm-up","ttl_ms":60000,"wait_ms":0});
    let token = probe(&host, "alice", warm_up).await;
    assert!(token.as_ref().is_ok_and(serde_json::Value::is_u64), "{token:?}");
    proxy.mute_open_connections().await;
    let lock_key = "rolehost:alice:lock:{job}";
    let exists = || server.cli(&["exists", lock_key]).trim() == "1";
    let hold = json!({"op":"lock_hold","name":"job","ttl_ms":60000,"wait_ms":0,"sleep_ms":30000});
    let mut call = Box::pin(probe(&host, "alice", hold));
    let taken = eventually("Redis never took the lock", Duration::from_secs(30), async || exists());
    tokio::select! {
        answer = &mut call => panic!("the call ended though Redis's answer was held back: {answer:?}"),
        () = taken => {}
    }
    // Redis took the lock for the call, which never heard so; its caller
    // gives up. The lock is released (the release reaches Redis; only its
    // answer is lost), long before its 60 s TTL.
    drop(call);
    eventually("the dropped call's lock is still held", Duration::from_secs(20), async || !exists()).await;
}

/// Locks a call leaves held are released side by side when it ends: with
/// Redis frozen, the call's answer waits about one operation timeout for
/// their releases, not one per lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_left_at_the_end_of_a_call_are_released_side_by_side() {
    let Some(server) = RedisServer::start() else { return };
    let timeout = Duration::from_millis(500);
    let host = host(backend(server.port, timeout), "rolehost:", &[("alice", "kvprobe")]);
    const LOCKS: u32 = 16;
    // Takes the locks, keeps them past the call's end, sleeps a second.
    let hoard = json!({"op":"hoard","locks":true,"count":LOCKS,"name_len":4,"keep":true,"sleep_ms":1000});
    let call = tokio::spawn(async move { probe(&host, "alice", hoard).await });
    let held = || server.cli(&["keys", "rolehost:alice:lock:*"]).lines().count() == LOCKS as usize;
    eventually("the locks were never taken", Duration::from_secs(30), async || held()).await;
    server.freeze(true);
    let frozen = std::time::Instant::now();
    let answer = call.await.unwrap();
    let waited = frozen.elapsed();
    server.freeze(false);
    assert_eq!(answer, Ok(json!(LOCKS)));
    // One by one they would take LOCKS timeouts (8 s); side by side, the
    // rest of the sleep and one timeout.
    assert!(waited < timeout * LOCKS / 2, "the releases took {waited:?}");
}

/// A lock whose release failed (here its connection froze: the release
/// never reached Redis) stays on the call's list, so the release at the
/// end of the call, on a new connection, frees it rather than leaving it
/// taken until its TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_whose_release_failed_is_released_when_the_call_ends() {
    let Some(server) = RedisServer::start() else { return };
    let proxy = FreezingProxy::start(server.port).await;
    let host = host(backend(proxy.port, Duration::from_millis(300)), "rolehost:", &[("alice", "kvprobe")]);
    // Takes the lock, releases it a second later, returns a second after.
    let op = json!({"op":"lock_release_fails","name":"job","before_ms":1000,"after_ms":1000});
    let call = tokio::spawn(async move { probe(&host, "alice", op).await });
    let held = || server.cli(&["exists", "rolehost:alice:lock:{job}"]).trim() == "1";
    eventually("the lock was never taken", Duration::from_secs(30), async || held()).await;
    proxy.freeze_open_connections().await;
    let answer = call.await.unwrap().unwrap();
    assert!(answer.as_str().is_some_and(|e| e.contains("Unavailable")), "the release failed: {answer}");
    assert!(!held(), "the lock is still held after the call");
}

/// A write whose connection could not be made (here the server never
/// finishes the handshake) was never sent: it is tried again until the
/// operation timeout, and its error does not say it may have been applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_could_not_connect_is_retried_and_known_unsent() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut options = RedisOptions::new(format!("redis://127.0.0.1:{}/0", silent.local_addr().unwrap().port()));
    options.connect_timeout = Duration::from_millis(100);
    options.op_timeout = Duration::from_millis(1500);
    let backend = RedisBackend::new(&options).unwrap();
    let start = std::time::Instant::now();
    let error = backend.increment("n", 1, None).await.unwrap_err();
    let waited = start.elapsed();
    assert!(matches!(&error, StateError::Unavailable(_)), "{error:?}");
    assert!(!error.to_string().contains("may or may not"), "{error}");
    // Several connects of 100 ms, not one.
    assert!(waited >= Duration::from_millis(1000), "gave up after {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_warns_when_redis_may_evict_keys() {
    let evicting = ["--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru"];
    let Some(server) = RedisServer::start_with(&evicting) else { return };
    let health = backend(server.port, Duration::from_secs(2)).health().await.unwrap();
    assert!(health.details["warning"].contains("allkeys-lru may evict"), "{health:?}");
    assert_eq!(health.details["maxmemory"], (100u64 << 20).to_string());
    server.cli(&["config", "set", "maxmemory-policy", "noeviction"]);
    let health = backend(server.port, Duration::from_secs(2)).health().await.unwrap();
    assert!(!health.details.contains_key("warning"), "{health:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_refuses_writes_as_quota_exceeded() {
    let Some(server) = RedisServer::start_with(&["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"]) else {
        return;
    };
    let b = backend(server.port, Duration::from_secs(2));
    b.set("keep", b"v", None).await.unwrap();
    b.lock_acquire("held", "fence", "me", Duration::from_secs(60)).await.unwrap();
    b.rate_check("spent", 1, Duration::from_secs(60), 1).await.unwrap();
    let value = vec![7u8; 100_000];
    let mut i = 0;
    let error = loop {
        match b.set(&format!("k{i}"), &value, None).await {
            Ok(()) => i += 1,
            Err(error) => break error,
        }
        assert!(i < 100, "never full");
    };
    assert!(matches!(&error, StateError::QuotaExceeded(m) if m.contains("Redis is full")), "{error:?}");
    let batch = b.set_many(&[("m1".to_owned(), value.clone()), ("m2".to_owned(), value)], None).await;
    assert!(matches!(batch, Err(StateError::QuotaExceeded(_))), "{batch:?}");
    assert_eq!(b.get("keep", None).await, Ok(Some(b"v".to_vec())), "reads go on");
    // What would write nothing answers (a script is refused only at its
    // first write), as on the memory store.
    assert_eq!(b.lock_acquire("held", "fence", "other", Duration::from_secs(1)).await, Ok(None));
    assert_eq!(b.compare_and_swap("keep", Some(b"no"), Some(b"new"), None).await, Ok(false));
    assert_eq!(b.hash_compare_and_set("h", "f", Some(b"no"), Some(b"new"), None).await, Ok(false));
    assert!(!b.rate_check("spent", 1, Duration::from_secs(60), 1).await.unwrap().allowed);
    assert_eq!(b.set_many(&[], None).await, Ok(()));
    assert_eq!(b.delete_many(&["keep".to_owned()]).await, Ok(1), "and deletes");
}

/// A script running past `busy-reply-threshold` makes Redis answer every
/// other command `BUSY` (not run): single commands, transactions and
/// increments alike are `unavailable` within their timeout, not `internal`,
/// and are tried again, so they go through once the script is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_server_is_unavailable_and_waited_for() {
    let port = free_port();
    let Some(server) = RedisServer::start_on(port, &["--busy-reply-threshold", "50"]) else { return };
    let client = redis::Client::open(server.url(0)).unwrap();
    let spin = {
        let client = client.clone();
        std::thread::spawn(move || {
            let mut conn = client.get_connection().unwrap();
            redis::cmd("EVAL").arg("while true do end").arg(0).query::<()>(&mut conn).unwrap_err()
        })
    };
    let mut admin = client.get_connection().unwrap();
    wait_until("the script to make the server busy", Duration::from_secs(10), || {
        redis::cmd("PING").query::<String>(&mut admin).is_err_and(|e| e.code() == Some("BUSY"))
    });
    let impatient = backend(port, Duration::from_millis(300));
    let entries = [("t:a".to_owned(), b"1".to_vec()), ("t:b".to_owned(), b"2".to_vec())];
    assert!(matches!(impatient.set("t:k", b"v", None).await, Err(StateError::Unavailable(_))));
    assert!(matches!(impatient.set_many(&entries, None).await, Err(StateError::Unavailable(_))));
    let increment = impatient.increment("t:n", 1, None).await;
    assert!(matches!(&increment, Err(StateError::Unavailable(_))), "{increment:?}");
    // Patient ones wait it out.
    let patient = backend(port, Duration::from_secs(20));
    let writes = tokio::spawn(async move {
        patient.set("t:k", b"v", None).await?;
        patient.set_many(&entries, None).await?;
        patient.increment("t:n", 1, None).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis::cmd("SCRIPT").arg("KILL").query::<()>(&mut admin).unwrap();
    assert!(spin.join().unwrap().to_string().contains("killed"));
    assert_eq!(writes.await.unwrap(), Ok(1), "the increment ran once");
    let values: Vec<Option<String>> = redis::cmd("MGET").arg(&["t:k", "t:a", "t:b"][..]).query(&mut admin).unwrap();
    assert_eq!(values, [Some("v".to_owned()), Some("1".to_owned()), Some("2".to_owned())]);
}
