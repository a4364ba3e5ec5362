//! rolehost on a real Redis Cluster of three primaries. Every interface
//! also runs there through `on_all_backends!` (conformance, isolation,
//! coordination, grants, examples); these tests check what
//! is particular to a cluster: keys spread over the primaries, and listing
//! and clearing reach every one of them, and operations follow a slot while
//! and after it moves to another primary.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use rolehost::backend::{Backend, RedisBackend, RedisOptions};
use rolehost::StateError;

use rolehost::config::StateConfig;
use rolehost::manifest::RedisSection;
use rolehost_tests::{host, probe, shared_cluster, unique, RedisCluster, RedisServer};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_spread_over_every_primary_and_listing_and_clear_reach_them_all() {
    let Some(cluster) = shared_cluster() else { return };
    let prefix = unique("spread");
    let host = host(cluster.backend(), &prefix, &[("alice", "kvprobe")]);
    // One set-many across many slots writes every entry.
    assert_eq!(probe(&host, "alice", json!({"op":"set_many","entries":{},"count":300})).await, Ok(Value::Null));
    let pattern = format!("{prefix}alice:kv:*");
    let per_node = cluster.keys_per_node(&pattern);
    assert_eq!(per_node.iter().sum::<usize>(), 300, "{per_node:?}");
    assert!(per_node.iter().all(|&n| n > 0), "every primary holds some keys: {per_node:?}");

    let expected: BTreeSet<String> = (0..300).map(|i| format!("bulk:{i}")).collect();
    let (mut listed, mut cursor, mut pages) = (BTreeSet::new(), Value::Null, 0);
    loop {
        let page =
            probe(&host, "alice", json!({"op":"list","pattern":"bulk:*","cursor":cursor,"limit":40})).await.unwrap();
        pages += 1;
        for key in page["keys"].as_array().unwrap() {
            listed.insert(key.as_str().unwrap().to_owned());
        }
        cursor = page["cursor"].clone();
        if cursor.is_null() {
            break;
        }
    }
    assert_eq!(listed, expected, "paging visits every primary");
    assert!(pages >= 8, "pages of 40 for 300 keys: {pages}");
    let got = probe(&host, "alice", json!({"op":"get_many","keys":["bulk:0","bulk:299","nope","bulk:7"]})).await;
    assert_eq!(got, Ok(json!(["0", "299", null, "7"])), "get-many across slots answers in order");

    assert_eq!(probe(&host, "alice", json!({"op":"clear"})).await, Ok(json!(300)));
    assert_eq!(cluster.keys_per_node(&pattern), vec![0; cluster.nodes.len()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_subjects_and_limits_work_wherever_their_keys_land() {
    let Some(cluster) = shared_cluster() else { return };
    let prefix = unique("coord");
    let host = host(cluster.backend(), &prefix, &[("alice", "kvprobe")]);
    // Lock names that hash all over the key space; each lock and its fence
    // counter share one slot, so the acquire script runs.
    for name in ["a", "b", "job-17", "x{y}z", "{}"] {
        let hold = json!({"op":"lock_hold","name":name,"ttl_ms":5000,"wait_ms":0});
        let first = probe(&host, "alice", hold.clone()).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        let second = probe(&host, "alice", hold).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(second.as_u64() > first.as_u64(), "{name}: fencing tokens increase: {first} then {second}");
    }
    let empty_tag = json!({"op":"lock_hold","name":"}x","ttl_ms":5000,"wait_ms":0});
    assert_eq!(probe(&host, "alice", empty_tag).await, Err("invalid-key".to_owned()));
    let incr = json!({"op":"subject_incr","subject":"s","prop":"n","delta":2,"times":3});
    assert_eq!(probe(&host, "alice", incr).await, Ok(json!(6)));
    let check = json!({"op":"rate_check","key":"api","limit":2,"window_ms":60000,"cost":2});
    assert_eq!(probe(&host, "alice", check.clone()).await.unwrap()["allowed"], true);
    assert_eq!(probe(&host, "alice", check).await.unwrap()["allowed"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_url_configures_a_cluster_backend() {
    let Some(cluster) = shared_cluster() else { return };
    let config = StateConfig::parse(&cluster.url(), &RedisSection::default()).unwrap();
    let backend = config.connect().unwrap();
    let health = backend.health().await.unwrap();
    assert_eq!(health.details["topology"], "cluster");
    assert_eq!(health.details["primaries"], "3");
    assert!(health.details["redis_version"].starts_with(|c: char| c.is_ascii_digit()), "{health:?}");
    // Counted over every primary: this backend has a connection to each.
    let clients: usize = health.details["connected_clients"].parse().unwrap();
    assert!(clients >= 3, "{health:?}");
    assert!(!health.details.contains_key("warning"), "no memory limit, nothing evicted: {health:?}");
    let key = format!("{}k", unique("url"));
    backend.set(&key, b"v", None).await.unwrap();
    assert_eq!(backend.get(&key, None).await.unwrap(), Some(b"v".to_vec()));
}

/// The node id of the primary at `port`, from any node's `CLUSTER NODES`.
/// The ids of the clients connected to `node` (redis-cli's own left out).
fn client_ids(node: &RedisServer) -> BTreeSet<String> {
    let list = node.cli(&["client", "list"]);
    let clients = list.lines().filter(|line| !line.contains("cmd=client"));
    clients.filter_map(|line| line.split(' ').next()?.strip_prefix("id=").map(str::to_owned)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_follow_a_slot_while_and_after_it_moves_to_a_new_primary() {
    // A cluster of its own: moving a slot must not disturb other tests.
    let Some(mut cluster) = RedisCluster::start(3) else { return };
    let prefix = unique("moved");
    // Operations may wait for the move below; give them time enough.
    let mut options = RedisOptions::new(cluster.url());
    options.op_timeout = Duration::from_secs(8);
    let host = Arc::new(host(Arc::new(RedisBackend::new(&options).unwrap()), &prefix, &[("alice", "kvprobe")]));
    // Keys with one hash tag share a slot.
    let key = |name: &str| format!("{prefix}alice:kv:{name}{{t}}");
    let put = |name: &str, value: &str| json!({"op":"set","key":format!("{name}{{t}}"),"value":value});
    let get = |name: &str| json!({"op":"get","key":format!("{name}{{t}}")});
    let incr = json!({"op":"incr","key":"n{t}","delta":5});
    assert_eq!(probe(&host, "alice", incr.clone()).await, Ok(json!(5)));
    assert_eq!(probe(&host, "alice", put("a", "A")).await, Ok(json!(null)));
    assert_eq!(probe(&host, "alice", put("b", "B")).await, Ok(json!(null)));
    // The backend now knows which primary serves the slot.
    let slot = cluster.nodes[0].cli(&["cluster", "keyslot", &key("n")]).trim().to_owned();
    let owner =
        cluster.nodes.iter().position(|n| n.cli(&["get", &key("n")]).trim() == "5").expect("a primary holds it");
    // A listing under way when that node joins goes on where it was: its
    // cursor names a primary, not a place in the list, which the new node
    // may shift.
    assert_eq!(probe(&host, "alice", json!({"op":"set_many","entries":{},"count":60})).await, Ok(Value::Null));
    let page = |cursor: Value| json!({"op":"list","pattern":"bulk:*","cursor":cursor,"limit":7});
    let mut listed = Vec::new();
    let mut list_page = |page: Value| {
        listed.extend(page["keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_owned()));
        page["cursor"].clone()
    };
    let mut cursor = list_page(probe(&host, "alice", page(Value::Null)).await.unwrap());
    // The slot goes to a node that joins now and owns no slot yet, as
    // when a cluster grows: the backend has never talked to it.
    let Some(target) = cluster.add_empty_primary() else { return };
    while !cursor.is_null() {
        cursor = list_page(probe(&host, "alice", page(cursor)).await.unwrap());
    }
    listed.sort_by_key(|key| key[5..].parse::<u32>().unwrap());
    assert_eq!(listed, (0..60).map(|i| format!("bulk:{i}")).collect::<Vec<_>>(), "each key listed once");
    let (from, to) = (&cluster.nodes[owner], &cluster.nodes[target]);
    let (from_id, to_id) = (cluster.node_id(owner), cluster.node_id(target));
    let migrate = |from: &RedisServer, to: &RedisServer, name: &str| {
        let moved = from.cli(&["migrate", "127.0.0.1", &to.port.to_string(), "", "0", "5000", "keys", &key(name)]);
        assert_eq!(moved.trim(), "OK", "MIGRATE {name}: {moved}");
    };
    let start_move = |from: &RedisServer, to: &RedisServer, from_id: &str, to_id: &str| {
        to.cli(&["cluster", "setslot", &slot, "importing", from_id]);
        from.cli(&["cluster", "setslot", &slot, "migrating", to_id]);
    };
    let end_move = |to_id: &str| {
        for node in &cluster.nodes {
            node.cli(&["cluster", "setslot", &slot, "node", to_id]);
        }
    };

    // Mid-migration: `n` and `a` have moved, `b` has not. The old primary
    // answers ASK for the moved keys (and for new ones); each such
    // command is sent once more to the new primary, after ASKING.
    start_move(from, to, &from_id, &to_id);
    migrate(from, to, "n");
    migrate(from, to, "a");
    assert_eq!(probe(&host, "alice", get("a")).await, Ok(json!("A")), "a moved key is read where it went");
    assert_eq!(probe(&host, "alice", get("b")).await, Ok(json!("B")), "a key not yet moved is read where it is");
    assert_eq!(probe(&host, "alice", incr.clone()).await, Ok(json!(10)), "an increment runs once, on the new primary");
    assert_eq!(probe(&host, "alice", put("c", "C")).await, Ok(json!(null)));
    let count = |node: &RedisServer| node.cli(&["cluster", "countkeysinslot", &slot]).trim().to_owned();
    assert_eq!((count(from), count(to)), ("1".into(), "3".into()), "a new key is written where the slot is going");
    // Listing visits the new primary too (it holds keys now), without
    // making redis-rs reconnect to the whole cluster: every connection the
    // other primaries had stays.
    let others: Vec<&RedisServer> = cluster.nodes.iter().filter(|n| n.port != to.port).collect();
    let before: Vec<BTreeSet<String>> = others.iter().map(|n| client_ids(n)).collect();
    let list = json!({"op":"list","pattern":"?{t}","cursor":null,"limit":100});
    let page = probe(&host, "alice", list).await.unwrap();
    let listed: BTreeSet<&str> = page["keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(listed, ["a{t}", "b{t}", "c{t}", "n{t}"].into(), "{page}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (node, before) in others.iter().zip(before) {
        let after = client_ids(node);
        assert!(before.is_subset(&after), "port {}: connections {before:?} were dropped: {after:?}", node.port);
    }
    // So does a transaction whose keys have all moved.
    let moved_only = json!({"op":"set_many","entries":{"a{t}":"A2","c{t}":"C2"}});
    assert_eq!(probe(&host, "alice", moved_only).await, Ok(json!(null)), "a transaction of moved keys");
    // And a script (PERSIST that reports existence), loaded on the new
    // primary when that one lacks it.
    let persist = json!({"op":"expire","key":"a{t}"});
    assert_eq!(probe(&host, "alice", persist).await, Ok(json!(true)));

    // One with keys on both primaries cannot run until the move ends: it
    // is tried again until then.
    let mixed = {
        let host = host.clone();
        let both = json!({"op":"set_many","entries":{"a{t}":"A3","b{t}":"B3"}});
        tokio::spawn(async move { probe(&host, "alice", both).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!mixed.is_finished(), "a split transaction waits for the move: {:?}", mixed.await);

    migrate(from, to, "b");
    end_move(&to_id);
    assert_eq!(mixed.await.unwrap(), Ok(json!(null)), "and runs once it is over");
    assert_eq!(to.cli(&["get", &key("n")]).trim(), "10", "the key moved");
    assert_eq!(to.cli(&["get", &key("c")]).trim(), "C2");
    // The old primary now answers MOVED; the increment is sent again to
    // the new one (it did not run) and counts exactly once.
    assert_eq!(probe(&host, "alice", incr.clone()).await, Ok(json!(15)));
    assert_eq!(probe(&host, "alice", json!({"op":"get","key":"n{t}"})).await, Ok(json!("15")));
    assert_eq!(to.cli(&["get", &key("n")]).trim(), "15");
    let all = json!({"op":"get_many","keys":["a{t}","b{t}","c{t}"]});
    assert_eq!(probe(&host, "alice", all.clone()).await, Ok(json!(["A3", "B3", "C2"])));

    // The slot moves back, to a primary the backend already talks to.
    start_move(to, from, &to_id, &from_id);
    migrate(to, from, "n");
    assert_eq!(probe(&host, "alice", json!({"op":"get","key":"n{t}"})).await, Ok(json!("15")));
    assert_eq!(probe(&host, "alice", incr).await, Ok(json!(20)));
    for name in ["a", "b", "c"] {
        migrate(to, from, name);
    }
    end_move(&from_id);
    assert_eq!(from.cli(&["get", &key("n")]).trim(), "20");
    assert_eq!(probe(&host, "alice", all).await, Ok(json!(["A3", "B3", "C2"])));
}

/// A listing goes on past failovers: of the primary it is scanning (whose
/// keys it lists again from the new one) and of one it has not reached yet,
/// whose new primary's address sorts before the one it is at. Its cursor
/// keeps what is done by hash slots, which a failover leaves with the
/// part of the cluster, where a cursor naming a primary by address would
/// skip both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_goes_on_past_failovers_of_the_primary_it_scans_and_of_one_ahead() {
    let Some(mut cluster) = RedisCluster::start(3) else { return };
    let by_address = by_address(&cluster);
    let (first, last) = (by_address[0], by_address[2]);
    let (Some(first_replica), Some(last_replica)) = (cluster.add_low_replica(first), cluster.add_low_replica(last))
    else {
        return;
    };
    let backend = cluster.backend();
    let keys: BTreeSet<String> = (0..300).map(|i| format!("listed:{i}")).collect();
    for key in &keys {
        backend.set(key, b"v", None).await.unwrap();
    }
    let page = backend.scan("listed:*", None, 10).await.unwrap();
    let mut listed: BTreeSet<String> = page.keys.into_iter().collect();
    // The listing is inside the primary with the lowest address.
    assert_eq!(listed.len(), 10);
    assert!(listed.iter().all(|key| cluster.nodes[first].cli(&["get", key]).trim() == "v"), "{listed:?}");
    cluster.failover(first_replica);
    cluster.failover(last_replica);
    list_the_rest(&*backend, "listed:*", page.cursor, &mut listed).await;
    assert_every_key_listed(&listed, &keys);
}

/// The nodes' indexes, by address (all on one host: by port).
fn by_address(cluster: &RedisCluster) -> Vec<usize> {
    let mut nodes: Vec<usize> = (0..cluster.nodes.len()).collect();
    nodes.sort_by_key(|&node| cluster.nodes[node].port);
    nodes
}

/// Lists what matches `pattern` from `cursor` to the end, into `listed`,
/// 10 keys a page.
async fn list_the_rest(
    backend: &dyn Backend,
    pattern: &str,
    mut cursor: Option<String>,
    listed: &mut BTreeSet<String>,
) {
    while let Some(at) = cursor {
        let page = backend.scan(pattern, Some(&at), 10).await.unwrap();
        listed.extend(page.keys);
        cursor = page.cursor;
    }
}

fn assert_every_key_listed(listed: &BTreeSet<String>, keys: &BTreeSet<String>) {
    assert_eq!(listed.len(), keys.len(), "missing: {:?}", keys.difference(listed).collect::<Vec<_>>());
    assert_eq!(listed, keys);
}

/// A slot that moves, keys and all, from a primary a listing has not
/// reached to one it has finished, is listed all the same: the finished
/// primary owns a slot not done now, so it is scanned again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_finds_keys_moved_to_a_primary_it_has_finished() {
    let Some(cluster) = RedisCluster::start(3) else { return };
    let by_address = by_address(&cluster);
    let (first, last) = (by_address[0], by_address[2]);
    let backend = cluster.backend();
    let keys: BTreeSet<String> = (0..300).map(|i| format!("moving:{i}")).collect();
    for key in &keys {
        backend.set(key, b"v", None).await.unwrap();
    }
    let on = |node: usize| -> BTreeSet<String> {
        cluster.nodes[node].cli(&["--scan", "--pattern", "moving:*"]).lines().map(str::to_owned).collect()
    };
    // Pages until the first primary's keys are all listed (it is done).
    let (mut listed, mut cursor) = (BTreeSet::new(), None);
    while !on(first).is_subset(&listed) {
        let page = backend.scan("moving:*", cursor.as_deref(), 10).await.unwrap();
        listed.extend(page.keys);
        cursor = Some(page.cursor.expect("more to list"));
    }
    // A slot of the last primary's, with its keys, moves to the first.
    let key = on(last).into_iter().next().unwrap();
    let slot = cluster.nodes[last].cli(&["cluster", "keyslot", &key]).trim().to_owned();
    let (from, to) = (&cluster.nodes[last], &cluster.nodes[first]);
    let (from_id, to_id) = (cluster.node_id(last), cluster.node_id(first));
    to.cli(&["cluster", "setslot", &slot, "importing", &from_id]);
    from.cli(&["cluster", "setslot", &slot, "migrating", &to_id]);
    let moving = from.cli(&["cluster", "getkeysinslot", &slot, "1000"]);
    let moving: Vec<&str> = moving.lines().collect();
    let port = to.port.to_string();
    let migrate = [&["migrate", "127.0.0.1", &port, "", "0", "5000", "keys"][..], &moving].concat();
    assert_eq!(from.cli(&migrate).trim(), "OK");
    for node in &cluster.nodes {
        node.cli(&["cluster", "setslot", &slot, "node", &to_id]);
    }
    assert!(to.cli(&["get", &key]).trim() == "v", "{key} moved");
    list_the_rest(&*backend, "moving:*", cursor, &mut listed).await;
    assert_every_key_listed(&listed, &keys);
}

/// A primary that stops answering but keeps its sockets open (a frozen
/// machine, a partition) costs the operations sent to it their timeout,
/// and then the worker's Cluster connection is made again, which learns
/// the slot map afresh: after a failover, the new primary. (Without that,
/// every later operation on its slots would wait on the old sockets.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_stops_answering_gets_the_cluster_connection_made_again() {
    let Some(cluster) = RedisCluster::start(3) else { return };
    let mut options = RedisOptions::new(cluster.url());
    options.op_timeout = Duration::from_millis(500);
    let backend = RedisBackend::new(&options).unwrap();
    // A key on each primary, so the connection reaches all three.
    let owner_of = |key: &str| cluster.nodes.iter().position(|n| n.cli(&["get", key]).trim() == "v").unwrap();
    let mut keys = BTreeMap::new();
    for i in 0.. {
        let key = format!("k{i}");
        backend.set(&key, b"v", None).await.unwrap();
        keys.entry(owner_of(&key)).or_insert(key);
        if keys.len() == 3 {
            break;
        }
    }
    let (frozen, healthy) = (&cluster.nodes[0], &cluster.nodes[1]);
    let before = client_ids(healthy);
    frozen.freeze(true);
    let answer = backend.get(&keys[&0], None).await;
    frozen.freeze(false);
    assert!(matches!(answer, Err(StateError::Unavailable(_))), "{answer:?}");
    // The next operation, on another primary, goes out on a new connection.
    assert_eq!(backend.get(&keys[&1], None).await, Ok(Some(b"v".to_vec())));
    let after = client_ids(healthy);
    assert!(after.difference(&before).count() > 0, "still the old connection: {before:?} → {after:?}");
    assert_eq!(backend.get(&keys[&0], None).await, Ok(Some(b"v".to_vec())));
}
