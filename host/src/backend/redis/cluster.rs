//! What is particular to a Redis Cluster: hash slots, the primaries a scan
//! visits, and redirects while a slot moves. redis-rs routes commands by
//! slot and follows `MOVED` after a refresh of its slot map (its own
//! retries are off, see `connection.rs`); `ASK` is followed here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::SingleNodeRoutingInfo;
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, Pipeline, RedisError, RedisFuture,
    RedisResult, ServerErrorKind, TlsCertificates, Value,
};

use super::connection::lock;
use super::{field, text};

/// One primary of a Cluster; none for the only server of the other kinds.
pub(super) type Shard = Option<Primary>;

/// A Cluster primary: where it is, its node id, and the hash slots it
/// owns (inclusive ranges), which stay with its part of the cluster when a
/// failover puts a replica in its place. Sorted by address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Primary {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) id: String,
    pub(super) slots: Vec<(u16, u16)>,
}

/// Connections of rolehost's own to single nodes of a Cluster: one set
/// to those `ASK` redirects name (a slot's importing primary), another to
/// the primaries a scan or health check visits. Not redis-rs's: a node
/// given its first slots is in no slot map of redis-rs until one has
/// moved, and asking redis-rs for a node it lacks fails or makes it
/// reconnect to the whole cluster. One per node, made on first need and
/// dropped after a failure.
pub(super) struct NodeConns {
    /// How to reach a node of the cluster (TLS, login); the address is
    /// replaced.
    template: ConnectionInfo,
    certificates: Option<TlsCertificates>,
    config: AsyncConnectionConfig,
    conns: Mutex<HashMap<(String, u16), MultiplexedConnection>>,
}

/// More nodes than this at once (more than a Cluster should have) and all
/// their connections are dropped, to be made again when needed.
const MAX_NODE_CONNS: usize = 1000;

impl NodeConns {
    pub(super) fn new(
        template: ConnectionInfo,
        certificates: Option<TlsCertificates>,
        config: AsyncConnectionConfig,
    ) -> Self {
        Self { template, certificates, config, conns: Mutex::new(HashMap::new()) }
    }

    /// Sends `pipe` to the node at `host:port`; `count` replies from `offset`.
    async fn send(
        &self,
        host: &str,
        port: u16,
        pipe: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let at = (host.to_owned(), port);
        let known = lock(&self.conns).get(&at).cloned();
        let mut conn = match known {
            Some(conn) => conn,
            None => {
                let addr = match self.template.addr() {
                    ConnectionAddr::TcpTls { insecure, .. } => {
                        ConnectionAddr::TcpTls { host: at.0.clone(), port, insecure: *insecure, tls_params: None }
                    }
                    _ => ConnectionAddr::Tcp(at.0.clone(), port),
                };
                let info = self.template.clone().set_addr(addr);
                let client = match &self.certificates {
                    Some(certificates) => Client::build_with_tls(info, certificates.clone())?,
                    None => Client::open(info)?,
                };
                let conn = client.get_multiplexed_async_connection_with_config(&self.config).await?;
                let mut conns = lock(&self.conns);
                if conns.len() >= MAX_NODE_CONNS {
                    conns.clear();
                }
                conns.insert(at.clone(), conn.clone());
                conn
            }
        };
        // Dropped for a failed connection, or one given up on before it
        // answered (the operation's deadline passed).
        let mut drop_conn = DropConnUnlessAnswered { conns: &self.conns, at: &at, answered: false };
        let replies = conn.req_packed_commands(pipe, offset, count).await;
        drop_conn.answered = match &replies {
            Err(error) => !(error.is_io_error() || error.is_connection_dropped() || error.is_timeout()),
            Ok(_) => true,
        };
        replies
    }

    /// Sends `cmd` to every node connected; errors are ignored.
    async fn broadcast(&self, cmd: &Cmd) {
        let conns: Vec<MultiplexedConnection> = lock(&self.conns).values().cloned().collect();
        for mut conn in conns {
            let _ = conn.req_packed_command(cmd).await;
        }
    }
}

struct DropConnUnlessAnswered<'a> {
    conns: &'a Mutex<HashMap<(String, u16), MultiplexedConnection>>,
    at: &'a (String, u16),
    answered: bool,
}

impl Drop for DropConnUnlessAnswered<'_> {
    fn drop(&mut self) {
        if !self.answered {
            lock(self.conns).remove(self.at);
        }
    }
}

/// A connection to a Cluster: redis-rs's, plus rolehost's own to the
/// nodes `ASK` names and to those a scan or health check visits (apart,
/// so that a script loaded is sent again only to the former).
#[derive(Clone)]
pub(super) struct ClusterConn {
    pub(super) conn: ClusterConnection,
    pub(super) ask_targets: Arc<NodeConns>,
    pub(super) primaries: Arc<NodeConns>,
}

impl ClusterConn {
    /// The primaries whose keys together are the whole key space, in a
    /// stable order.
    pub(super) async fn shards(&mut self) -> RedisResult<Vec<Shard>> {
        // Both asked of one node, so that they tell of the same nodes.
        let mut ask = redis::pipe();
        ask.cmd("CLUSTER").arg("NODES").cmd("CLUSTER").arg("SHARDS");
        let mut replies = self.conn.route_pipeline(ask, 0, 2, SingleNodeRoutingInfo::RandomPrimary).await?;
        // `CLUSTER SHARDS` is new in Redis 7; before it there were no
        // hostnames, and its error leaves every node at its address.
        let endpoints = replies.pop().map(|shards| endpoints(&shards)).unwrap_or_default();
        let nodes: String = redis::from_redis_value(replies.pop().unwrap_or(Value::Nil))?;
        Ok(primaries(&nodes, &endpoints))
    }

    /// Runs `cmd` on the primary at `host:port`, on a connection of
    /// rolehost's own (the primary may be new to redis-rs).
    pub(super) async fn on(&mut self, host: &str, port: u16, cmd: &Cmd) -> RedisResult<Value> {
        let mut pipe = redis::pipe();
        pipe.add_command(cmd.clone());
        let reply = self.primaries.send(host, port, &pipe, 0, 1).await?.pop();
        reply.ok_or_else(|| RedisError::from((ErrorKind::Client, "no reply"))).and_then(Value::extract_error)
    }

    /// Follows an ASK redirect: `cmd`'s slot is moving to another primary,
    /// which has its key already (or will create it), so `cmd` goes there
    /// once more, after `ASKING`. (redis-rs follows ASK only with its own
    /// retries on, which would also resend commands whose reply was lost.)
    /// A multi-key command whose keys span slots keeps the error, and
    /// `retry.rs` tries it again until the move is over.
    async fn follow_ask(&mut self, cmd: &Cmd, ask: RedisError) -> RedisResult<Value> {
        let Some((address, slot)) = ask.redirect_node() else { return Err(ask) };
        if !keys_in_slot(cmd, slot) {
            return Err(ask);
        }
        let Some(replies) = self.send_asking(address, [cmd.clone()], 0, 1).await else { return Err(ask) };
        match replies?.pop() {
            Some(reply) => reply.extract_error(),
            None => Err(RedisError::from((ErrorKind::Client, "no reply after ASKING"))),
        }
    }

    /// Follows ASK redirects for a transaction (`pipeline` packed as
    /// MULTI, commands, EXEC) that Redis aborted because every command in
    /// it was redirected to one node: none of its keys is left on the old
    /// primary, so the whole transaction goes to the new one after `ASKING`
    /// (which holds until EXEC). If only some were redirected, the keys are
    /// split between the two primaries: nothing ran, and the transaction
    /// must wait for the move, so the abort becomes `TRYAGAIN` (which
    /// `retry.rs` tries again). So does one sent to the slot's old primary
    /// after the move (MOVED).
    async fn follow_transaction_ask(
        &mut self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
        aborted: RedisError,
    ) -> RedisResult<Vec<Value>> {
        let Some(errors) = aborted.clone().into_server_errors() else { return Err(aborted) };
        let redirected =
            |kind| matches!(kind, Some(ServerErrorKind::Ask | ServerErrorKind::Moved | ServerErrorKind::TryAgain));
        if !pipeline.is_transaction() || !errors.iter().all(|(_, e)| redirected(e.kind())) {
            return Err(aborted);
        }
        let try_again = || {
            let detail = format!("a transaction's slot is moving or moved ({aborted})");
            Err(RedisError::from((ErrorKind::Server(ServerErrorKind::TryAgain), "TRYAGAIN", detail)))
        };
        if errors.iter().any(|(_, e)| e.kind() == Some(ServerErrorKind::Moved)) {
            // The slot has moved. redis-rs refreshes its slot map after a
            // MOVED it sees itself, not one inside a transaction: show it
            // one (all keys of a transaction share a slot).
            if let Some(key) = pipeline.cmd_iter().next().and_then(|cmd| arguments(cmd).nth(1)) {
                let _ = self.conn.req_packed_command(redis::cmd("EXISTS").arg(key)).await;
            }
            return try_again();
        }
        let mut targets = errors.iter().map(|(_, e)| (e.kind() == Some(ServerErrorKind::Ask)).then(|| e.details()));
        let Some(Some(Some(target))) = targets.next() else { return try_again() };
        let commands = pipeline.cmd_iter().count();
        if errors.len() != commands || !targets.all(|t| t == Some(Some(target))) {
            return try_again();
        }
        let Some(address) = target.split_ascii_whitespace().nth(1) else { return Err(aborted) };
        let transaction =
            std::iter::once(redis::cmd("MULTI")).chain(pipeline.cmd_iter().cloned()).chain([redis::cmd("EXEC")]);
        self.send_asking(address, transaction, offset, count).await.unwrap_or(Err(aborted))
    }

    /// Sends `ASKING` and then `commands` to the primary at `address`
    /// (`host:port`), in one pipeline so that nothing else on the
    /// connection comes between; `count` replies from `offset` (counted in
    /// `commands`). `None` if `address` is not one.
    async fn send_asking(
        &mut self,
        address: &str,
        commands: impl IntoIterator<Item = Cmd>,
        offset: usize,
        count: usize,
    ) -> Option<RedisResult<Vec<Value>>> {
        let (host, port) = address.rsplit_once(':')?;
        let port = port.parse().ok()?;
        let mut pipe = redis::pipe();
        pipe.cmd("ASKING");
        for cmd in commands {
            pipe.add_command(cmd);
        }
        Some(self.ask_targets.send(host, port, &pipe, offset + 1, count).await)
    }
}

impl ConnectionLike for ClusterConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            match self.conn.req_packed_command(cmd).await {
                Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::Ask) => {
                    self.follow_ask(cmd, error).await
                }
                // redis-rs loads a script on the primaries it knows, after
                // a NOSCRIPT; a node an EVALSHA was sent to after ASK (maybe
                // new) needs it too.
                Ok(hash) if is_script_load(cmd) => {
                    self.ask_targets.broadcast(cmd).await;
                    Ok(hash)
                }
                other => other,
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            match self.conn.req_packed_commands(pipeline, offset, count).await {
                Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::ExecAbort) => {
                    self.follow_transaction_ask(pipeline, offset, count, error).await
                }
                other => other,
            }
        })
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

/// The primaries that may hold keys, from a `CLUSTER NODES` answer,
/// sorted, each named by its endpoint in `endpoints` (by node id) or else
/// by its address. Lines are `id address flags primary ping pong epoch
/// link slot…`, where a slot entry is `a-b`, `a`, or in brackets a slot
/// moving in or out. A primary with slots holds keys whether reachable or
/// not (an unreachable one makes a scan fail rather than skip its keys).
/// One without slots may too: while a slot moves to a primary that had
/// none, only that primary lists it (as importing), yet the keys moved so
/// far are there. So those count as well while connected and not marked
/// failing.
fn primaries(nodes: &str, endpoints: &HashMap<String, String>) -> Vec<Shard> {
    let mut primaries: Vec<Shard> = nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_ascii_whitespace().collect();
            let (id, address, flags) = (fields.first()?, fields.get(1)?, fields.get(2)?);
            let flag = |name: &str| flags.split(',').any(|f| f == name);
            let healthy =
                fields.get(7) == Some(&"connected") && !["fail", "fail?", "noaddr", "handshake"].into_iter().any(flag);
            if !flag("master") || (fields.len() <= 8 && !healthy) {
                return None;
            }
            let address = address.split(['@', ',']).next()?;
            let (ip, port) = address.rsplit_once(':')?;
            let host = endpoints.get(*id).map_or(ip, String::as_str);
            // Slots it cannot read leave it counted as one without: it is
            // still scanned, and then known done by its id.
            let slots = fields.iter().skip(8).filter(|entry| !entry.starts_with('[')).map(|entry| {
                let (first, last) = entry.split_once('-').unwrap_or((entry, entry));
                let (first, last): (u16, u16) = (first.parse().ok()?, last.parse().ok()?);
                (first <= last && last < 16384).then_some((first, last))
            });
            let slots = slots.collect::<Option<_>>().unwrap_or_default();
            Some(Some(Primary { host: host.to_owned(), port: port.parse().ok()?, id: id.to_string(), slots }))
        })
        .collect();
    primaries.sort();
    primaries
}

/// Node id → the endpoint the cluster tells clients to reach it by (its
/// address or, with `cluster-preferred-endpoint-type hostname`, its
/// hostname, which TLS certificates may name instead of the address), from
/// a `CLUSTER SHARDS` answer. The placeholders for none (`""`, `"?"`) are
/// left out.
fn endpoints(shards: &Value) -> HashMap<String, String> {
    let Value::Array(shards) = shards else { return HashMap::new() };
    let nodes = shards.iter().filter_map(|shard| match field(shard, "nodes")? {
        Value::Array(nodes) => Some(nodes),
        _ => None,
    });
    nodes
        .flatten()
        .filter_map(|node| Some((text(field(node, "id")?)?, text(field(node, "endpoint")?)?)))
        .filter(|(_, endpoint)| !endpoint.is_empty() && *endpoint != "?")
        .map(|(id, endpoint)| (id.to_owned(), endpoint.to_owned()))
        .collect()
}

/// Whether every key of `cmd` lies in `slot`. Only the multi-key commands
/// rolehost sends can span slots (redis-rs splits them by slot); the
/// server answers ASK to any other command only when all its keys are in
/// the moving slot.
fn keys_in_slot(cmd: &Cmd, slot: u16) -> bool {
    let mut args = arguments(cmd);
    let Some(name) = args.next() else { return false };
    if [&b"MGET"[..], b"DEL", b"EXISTS", b"UNLINK", b"TOUCH"].iter().any(|multi| name.eq_ignore_ascii_case(multi)) {
        return args.all(|key| self::slot(key) == slot);
    }
    true
}

/// `cmd`'s words, its name first.
fn arguments(cmd: &Cmd) -> impl Iterator<Item = &[u8]> {
    cmd.args_iter().filter_map(|arg| match arg {
        redis::Arg::Simple(bytes) => Some(bytes),
        _ => None,
    })
}

/// Whether `cmd` is `SCRIPT LOAD`.
fn is_script_load(cmd: &Cmd) -> bool {
    let mut args = arguments(cmd);
    let mut next_is = |word: &[u8]| args.next().is_some_and(|arg| arg.eq_ignore_ascii_case(word));
    next_is(b"SCRIPT") && next_is(b"LOAD")
}

/// The Cluster hash slot of `key`: CRC16 of its hash tag (the part between
/// the first `{` and the next `}`, when not empty) or of the whole key.
pub(super) fn slot(key: impl AsRef<[u8]>) -> u16 {
    let bytes = key.as_ref();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(bytes)) % 16384
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primaries_are_the_masters_with_slots_and_the_healthy_ones_without() {
        let nodes = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5459 5460 [5461-<-b2]
b2 127.0.0.1:7002@17002,host2 master,fail? - 0 0 2 connected 5461-10922
c3 127.0.0.1:7003@17003 master,fail - 0 0 3 disconnected
d4 127.0.0.1:7004@17004 slave a1 0 0 1 connected
e5 127.0.0.1:7000@17000 master - 0 0 4 connected 10923-16383
f6 127.0.0.1:7005@17005 master - 0 0 5 connected
g7 127.0.0.1:7006@17006 master,fail? - 0 0 6 connected
h8 127.0.0.1:7007@17007 master - 0 0 7 disconnected
j9 127.0.0.1:7009@17009  master - 0 0 8 connected 16384 \r
";
        let primary = |host: &str, port, id: &str, slots: &[(u16, u16)]| {
            Some(Primary { host: host.to_owned(), port, id: id.to_owned(), slots: slots.to_vec() })
        };
        let expected = vec![
            primary("127.0.0.1", 7000, "e5", &[(10923, 16383)]),
            primary("127.0.0.1", 7001, "a1", &[(0, 5459), (5460, 5460)]),
            primary("127.0.0.1", 7002, "b2", &[(5461, 10922)]),
            primary("127.0.0.1", 7005, "f6", &[]),
            // Slots it cannot read: scanned as one without.
            primary("127.0.0.1", 7009, "j9", &[]),
        ];
        assert_eq!(primaries(nodes, &HashMap::new()), expected);
        // Named by the endpoint the cluster gives, where it gives one.
        let endpoints = HashMap::from([("b2".to_owned(), "host2".to_owned()), ("d4".to_owned(), "host4".to_owned())]);
        let mut expected = expected;
        expected[2] = primary("host2", 7002, "b2", &[(5461, 10922)]);
        expected.sort();
        assert_eq!(primaries(nodes, &endpoints), expected);
    }

    #[test]
    fn endpoints_come_from_cluster_shards_in_either_protocol() {
        let bulk = |text: &str| Value::BulkString(text.as_bytes().to_vec());
        let node = |id: &str, endpoint: &str| {
            [("id", id), ("port", "7000"), ("ip", "10.0.0.1"), ("endpoint", endpoint), ("role", "master")]
                .map(|(name, value)| (bulk(name), bulk(value)))
        };
        // RESP2: flat lists of names and values.
        let flat = |pairs: [(Value, Value); 5]| Value::Array(pairs.into_iter().flat_map(|(k, v)| [k, v]).collect());
        let shard = |nodes: Vec<Value>| {
            Value::Array(vec![bulk("slots"), Value::Array(vec![]), bulk("nodes"), Value::Array(nodes)])
        };
        let resp2 = Value::Array(vec![
            shard(vec![flat(node("a1", "redis-a.example")), flat(node("a2", "10.0.0.2"))]),
            shard(vec![flat(node("b1", "?")), flat(node("c1", ""))]),
        ]);
        let expected =
            HashMap::from([("a1".to_owned(), "redis-a.example".to_owned()), ("a2".to_owned(), "10.0.0.2".to_owned())]);
        assert_eq!(endpoints(&resp2), expected);
        // RESP3: maps.
        let map = |pairs: [(Value, Value); 5]| Value::Map(pairs.into());
        let resp3 = Value::Array(vec![Value::Map(vec![
            (bulk("slots"), Value::Array(vec![])),
            (bulk("nodes"), Value::Array(vec![map(node("a1", "redis-a.example")), map(node("a2", "10.0.0.2"))])),
        ])]);
        assert_eq!(endpoints(&resp3), expected);
        // An error (Redis 6 has no CLUSTER SHARDS) names none.
        assert!(endpoints(&Value::Nil).is_empty());
    }

    #[test]
    fn slots_follow_hash_tags() {
        // Reference values from CLUSTER KEYSLOT.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("a{}b"), crc16::State::<crc16::XMODEM>::calculate(b"a{}b") % 16384);
        assert_eq!(slot("x{tag}y"), slot("tag"));
    }

    #[test]
    fn only_commands_whose_keys_share_the_slot_follow_an_ask() {
        let tagged = slot("{t}");
        let mget = |keys: &[&str]| redis::cmd("MGET").arg(keys).clone();
        assert!(keys_in_slot(&mget(&["a{t}", "b{t}"]), tagged));
        assert!(!keys_in_slot(&mget(&["a{t}", "b"]), tagged), "split by redis-rs across slots");
        assert!(!keys_in_slot(&redis::cmd("del").arg("a{t}").arg("x").clone(), tagged));
        // Single-key commands and scripts: the server already checked.
        assert!(keys_in_slot(&redis::cmd("SET").arg("a{t}").arg("any value").clone(), tagged));
        assert!(keys_in_slot(&redis::cmd("EVALSHA").arg("sha").arg(2).arg("a{t}").arg("b{t}").clone(), tagged));
    }
}
