//! How the Redis backend reaches its servers: one server (`redis://`,
//! `rediss://`), the primary a set of Sentinels names
//! (`redis+sentinel://`), or a Cluster (`redis+cluster://`). Every kind
//! connects lazily and again after failures, so Redis being down is an
//! error of the calls made meanwhile, never of the host.
//!
//! Each worker thread of `serve` (see `workers.rs`) gets connections of
//! its own. A server or Sentinel primary gets one multiplexed connection,
//! dropped after any failure that leaves it in doubt (lost, timed out,
//! refused login, now a replica) and made afresh by the next operation;
//! redis-rs's `ConnectionManager` would keep a connection whose login
//! failed, and never notices one that stopped answering. A Cluster gets
//! redis-rs's Cluster connection, which follows the Cluster by itself.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline,
    RedisConnectionInfo, RedisError, RedisFuture, RedisResult, TlsCertificates, Value,
};

use super::cluster::{ClusterConn, NodeConns, Shard};
use super::coalesce::Coalescing;
use super::sentinel::Sentinels;
use super::RedisOptions;
use crate::shards::{self, Sharded};
use crate::workers;

/// The URL schemes with TLS, for error messages.
const TLS_SCHEMES: &str = "rediss://, rediss+cluster:// or rediss+sentinel://";

/// Workers' connections of one kind kept at most (one per worker
/// thread): four times the most workers `serve` runs (`--threads` up to
/// 1024), plus the other threads'. Past it, some belong to workers long
/// gone.
const MAX_WORKER_CONNS: usize = 4 * 1024 + 1;

/// Default Sentinel port, for addresses that leave it out.
const SENTINEL_PORT: u16 = 26379;

/// Where the servers are, from the URL.
enum Endpoint {
    Single(ConnectionInfo),
    /// The nodes first asked (all with TLS, or none).
    Cluster(Vec<ConnectionInfo>),
    /// TLS to the Sentinels (their addresses say) means TLS to the primary.
    Sentinel {
        sentinels: Vec<ConnectionAddr>,
        master: String,
        db: i64,
        username: Option<String>,
    },
}

/// Settings a URL may carry in its query (`?ca=PATH&wait-replicas=N`).
#[derive(Debug, Default, PartialEq, Eq)]
struct UrlSettings {
    ca_file: Option<PathBuf>,
    wait_replicas: Option<u32>,
}

/// Splits off and reads the query settings rolehost knows; others are refused.
fn split_query(url: &str) -> Result<(&str, UrlSettings), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url, UrlSettings::default()));
    };
    let mut settings = UrlSettings::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("ca", path)) if !path.is_empty() => settings.ca_file = Some(PathBuf::from(path)),
            Some(("wait-replicas", n)) => {
                settings.wait_replicas =
                    Some(n.parse().map_err(|_| format!("wait-replicas must be a number, not {n:?}"))?)
            }
            _ => return Err(format!("unknown Redis URL setting {pair:?}: use ca=PATH or wait-replicas=N")),
        }
    }
    Ok((base, settings))
}

/// `[user@]rest`, refusing `user:password@`.
fn split_user(rest: &str) -> Result<(Option<String>, &str), String> {
    match rest.rsplit_once('@') {
        Some((user, _)) if user.contains(':') => Err(password_in_url()),
        Some((user, hosts)) => Ok((Some(user.to_owned()).filter(|u| !u.is_empty()), hosts)),
        None => Ok((None, rest)),
    }
}

fn password_in_url() -> String {
    "the Redis URL holds a password; set REDIS_PASSWORD instead".into()
}

/// `host:port` with a default port.
fn host_port(address: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let bad = || format!("invalid Redis address {address:?}: use host:port");
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => Ok((host.to_owned(), port.parse().map_err(|_| bad())?)),
        None if !address.is_empty() => Ok((address.to_owned(), default_port.ok_or_else(bad)?)),
        _ => Err(bad()),
    }
}

impl Endpoint {
    /// Whether the servers are reached over TLS.
    fn tls(&self) -> bool {
        let addr = match self {
            Endpoint::Single(info) => Some(info.addr()),
            Endpoint::Cluster(nodes) => nodes.first().map(ConnectionInfo::addr),
            Endpoint::Sentinel { sentinels, .. } => sentinels.first(),
        };
        matches!(addr, Some(ConnectionAddr::TcpTls { .. }))
    }

    fn parse(url: &str) -> Result<(Self, UrlSettings), String> {
        let (base, settings) = split_query(url)?;
        let invalid = |e: RedisError| format!("invalid Redis URL {url:?}: {e}");
        let (scheme, rest) = base.split_once("://").unwrap_or_default();
        let tls = scheme.starts_with("rediss");
        if let "redis+cluster" | "rediss+cluster" = scheme {
            let (user, hosts) = split_user(rest.trim_end_matches('/'))?;
            let user = user.map(|u| format!("{u}@")).unwrap_or_default();
            let node_scheme = if tls { "rediss" } else { "redis" };
            let nodes = hosts
                .split(',')
                .map(|node| {
                    let (host, port) = host_port(node, None)?;
                    format!("{node_scheme}://{user}{host}:{port}").into_connection_info().map_err(invalid)
                })
                .collect::<Result<Vec<_>, _>>()?;
            return Ok((Self::Cluster(nodes), settings));
        }
        if let "redis+sentinel" | "rediss+sentinel" = scheme {
            let (user, rest) = split_user(rest)?;
            let mut parts = rest.split('/');
            let sentinels = parts
                .next()
                .unwrap_or_default()
                .split(',')
                .map(|s| host_port(s, Some(SENTINEL_PORT)).map(|(host, port)| address(host, port, tls)))
                .collect::<Result<Vec<_>, _>>()?;
            let master = parts.next().filter(|m| !m.is_empty()).ok_or_else(|| {
                format!("invalid Redis URL {url:?}: name the primary, redis+sentinel://host:port,…/NAME")
            })?;
            let db = match parts.next().filter(|d| !d.is_empty()) {
                Some(db) => db.parse().map_err(|_| format!("invalid database {db:?} in {url:?}"))?,
                None => 0,
            };
            let sentinel = Self::Sentinel { sentinels, master: master.to_owned(), db, username: user };
            return Ok((sentinel, settings));
        }
        if !matches!(scheme, "redis" | "rediss") {
            return Err(format!(
                "unknown Redis URL {url:?}: use redis://, rediss://, redis+cluster://, rediss+cluster://, \
                 redis+sentinel:// or rediss+sentinel://"
            ));
        }
        let info = base.into_connection_info().map_err(invalid)?;
        if info.redis_settings().password().is_some() {
            return Err(password_in_url());
        }
        Ok((Self::Single(info), settings))
    }
}

/// A connection to hand to one operation; cheap to clone.
#[derive(Clone)]
pub(super) enum Conn {
    /// To the one server or the Sentinels' primary.
    Direct(Coalescing<MultiplexedConnection>),
    Cluster(ClusterConn),
}

impl Conn {
    /// The primaries whose keys together are the whole key space, in a
    /// stable order.
    pub(super) async fn shards(&mut self) -> RedisResult<Vec<Shard>> {
        match self {
            Conn::Cluster(cluster) => cluster.shards().await,
            Conn::Direct(_) => Ok(vec![None]),
        }
    }

    /// Runs `cmd` on `shard` (a Cluster primary) or on the only server.
    pub(super) async fn on(&mut self, shard: &Shard, cmd: &Cmd) -> RedisResult<Value> {
        match (self, shard) {
            (Conn::Cluster(cluster), Some(primary)) => cluster.on(&primary.host, primary.port, cmd).await,
            (conn, _) => cmd.query_async(conn).await,
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Direct(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Direct(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Direct(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Which connection an operation wants: large batches travel apart, so a
/// role moving a gigabyte never holds up another role's single `GET`
/// queued behind it on the same socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lane {
    /// Single commands and small batches.
    Main,
    /// Batches of many keys or bytes.
    Bulk,
}

/// Hands out connections, making them when needed.
pub(super) struct Connector {
    /// The connection for every operation but large batches and writes
    /// that wait for replicas.
    kind: Kind,
    /// The connection for large batches, made on the first one.
    bulk: Kind,
    /// With `wait-replicas`, the connection for writes and their `WAIT`s.
    acked_writes: Option<Kind>,
    /// Replicas each write waits for (`WAIT`); 0 for none.
    pub(super) wait_replicas: u32,
    /// `single`, `cluster` or `sentinel`.
    topology: &'static str,
}

/// One connection per worker thread (by [`workers::current`]), so that
/// its driver runs where its callers do; other threads share one. Each is
/// made on first use, and again after a failure that leaves it in doubt
/// or once the runtime it was made on has stopped.
struct Kind {
    /// Where connections go.
    source: Source,
    /// The workers' connections, in shards by worker, so that workers
    /// finding theirs take no lock another worker takes.
    workers: Sharded<Mutex<HashMap<u64, Worker>>>,
}

/// One worker's connection. Workers connect side by side, but within a
/// worker one caller at a time (its `turn`), the others then find its
/// connection.
#[derive(Default)]
struct Worker {
    conn: Option<(Conn, RuntimeAlive)>,
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl Worker {
    /// The connection, if there is one whose runtime still runs.
    fn live(&mut self) -> Option<Conn> {
        let (conn, alive) = self.conn.as_mut()?;
        alive.still().then(|| conn.clone())
    }
}

/// Where a connection goes.
enum Source {
    Server(Client, AsyncConnectionConfig),
    /// The current primary, asked of the Sentinels at every connect.
    Sentinels(Sentinels),
    /// Every worker's Cluster connection shares rolehost's own connections
    /// to single nodes: they serve only scans, health checks and `ASK`s.
    Cluster {
        client: ClusterClient,
        ask_targets: Arc<NodeConns>,
        primaries: Arc<NodeConns>,
    },
}

impl Source {
    async fn connect(&self) -> RedisResult<Conn> {
        Ok(match self {
            Source::Server(client, config) => {
                Conn::Direct(Coalescing::new(client.get_multiplexed_async_connection_with_config(config).await?))
            }
            Source::Sentinels(sentinels) => Conn::Direct(Coalescing::new(sentinels.primary().await?)),
            Source::Cluster { client, ask_targets, primaries } => Conn::Cluster(ClusterConn {
                conn: client.get_async_connection().await?,
                ask_targets: ask_targets.clone(),
                primaries: primaries.clone(),
            }),
        })
    }
}

impl Kind {
    /// One connection of the kind `endpoint` names; connects nothing yet.
    fn new(
        endpoint: &Endpoint,
        options: &RedisOptions,
        certificates: Option<&TlsCertificates>,
    ) -> Result<Self, String> {
        let invalid = |e: RedisError| format!("invalid Redis settings for {:?}: {e}", options.url);
        let source = match endpoint {
            Endpoint::Single(info) => {
                let client = client(with_login(info, options), certificates).map_err(invalid)?;
                Source::Server(client, Kind::config(options))
            }
            Endpoint::Cluster(nodes) => {
                // No retries inside redis-rs: it would resend any command
                // whose reply was lost, increments included. `retry.rs`
                // decides instead; redis-rs still refreshes its slot map and
                // reconnects after the failures that call for it.
                let mut builder = ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(options.connect_timeout)
                    .response_timeout(options.op_timeout)
                    .retries(0);
                if let Some(username) = &options.username {
                    builder = builder.username(username);
                }
                if let Some(password) = &options.password {
                    builder = builder.password(password.clone());
                }
                if let Some(certificates) = certificates {
                    builder = builder.certs(certificates.clone());
                }
                let template = with_login(&nodes[0], options);
                let node_conns =
                    || Arc::new(NodeConns::new(template.clone(), certificates.cloned(), Kind::config(options)));
                Source::Cluster {
                    client: builder.build().map_err(invalid)?,
                    ask_targets: node_conns(),
                    primaries: node_conns(),
                }
            }
            Endpoint::Sentinel { sentinels, master, db, username } => {
                let mut login = RedisConnectionInfo::default().set_db(*db);
                if let Some(username) = options.username.as_ref().or(username.as_ref()) {
                    login = login.set_username(username);
                }
                if let Some(password) = &options.password {
                    login = login.set_password(password);
                }
                let password = options.sentinel_password.as_deref();
                let config = Kind::config(options);
                Source::Sentinels(
                    Sentinels::new(sentinels, master, login, password, certificates, config).map_err(invalid)?,
                )
            }
        };
        Ok(Kind { source, workers: Sharded::default() })
    }

    /// A Cluster connection follows slot moves and node failures itself
    /// (only a timeout drops it); a direct one is dropped after failures.
    fn is_cluster(&self) -> bool {
        matches!(self.source, Source::Cluster { .. })
    }

    /// A direct connection's timeouts.
    fn config(options: &RedisOptions) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.op_timeout))
    }

    /// This worker's connection, if it has a live one, else its turn to
    /// connect.
    fn known(&self, worker: u64) -> Result<Conn, Arc<tokio::sync::Mutex<()>>> {
        let mut workers = lock(self.workers.of(worker));
        let most = MAX_WORKER_CONNS.div_ceil(shards::count());
        if workers.len() >= most && !workers.contains_key(&worker) {
            // Those of workers gone have seen their runtimes stop.
            workers.retain(|_, worker| worker.live().is_some());
            if workers.len() >= most {
                workers.clear();
            }
        }
        let entry = workers.entry(worker).or_default();
        entry.live().ok_or_else(|| entry.turn.clone())
    }

    /// A connection, made now if there is none.
    async fn get(&self) -> RedisResult<Conn> {
        let worker = workers::current();
        let turn = match self.known(worker) {
            Ok(conn) => return Ok(conn),
            Err(turn) => turn,
        };
        let _turn = turn.lock().await;
        if let Ok(conn) = self.known(worker) {
            return Ok(conn);
        }
        let fresh = self.source.connect().await?;
        lock(self.workers.of(worker)).entry(worker).or_default().conn = Some((fresh.clone(), RuntimeAlive::here()));
        Ok(fresh)
    }

    /// Notes a failed operation: a direct connection that lost its server,
    /// stopped answering, was refused its login, or whose server is no
    /// longer the primary is dropped, so the next operation connects again
    /// (for Sentinels: to where the primary is now). Operations still
    /// running on it finish on their own clone.
    fn failed(&self, error: &RedisError) {
        let gone = error.is_io_error()
            || error.is_connection_dropped()
            || error.is_timeout()
            || error.is_unrecoverable_error()
            || super::retry::not_primary(error)
            || super::refused_login(error);
        // What one connection learnt of the server holds for every
        // worker's: had the others been kept, the next write on a dead one
        // could not tell "never sent" from "lost".
        if gone && !self.is_cluster() {
            for shard in self.workers.all() {
                lock(shard).values_mut().for_each(|worker| worker.conn = None);
            }
        }
    }

    /// Notes an operation that ran out of time: its connection may be dead
    /// without knowing it (a server cut off the network), so it is dropped.
    /// A Cluster connection too: made again, it learns the slot map afresh,
    /// so a primary that froze and was failed over is left behind.
    fn timed_out(&self) {
        let worker = workers::current();
        if let Some(worker) = lock(self.workers.of(worker)).get_mut(&worker) {
            worker.conn = None;
        }
    }
}

/// Whether the async runtime something was made on still runs. A
/// connection's driver is a task of that runtime and stops with it,
/// failing every command after: the backend may outlive it (a short-lived
/// runtime, a stopped worker) and must then connect again.
struct RuntimeAlive(tokio::sync::oneshot::Receiver<()>);

impl RuntimeAlive {
    /// For the current runtime: a task of it holds the sender, dropped
    /// when the runtime drops its tasks (or when this is dropped, so that
    /// connections made again and again leave no task behind).
    fn here() -> Self {
        let (mut sender, receiver) = tokio::sync::oneshot::channel();
        tokio::spawn(async move { sender.closed().await });
        Self(receiver)
    }

    fn still(&mut self) -> bool {
        self.0.try_recv() == Err(tokio::sync::oneshot::error::TryRecvError::Empty)
    }
}

/// `info` with the user and password of `options`, when set.
fn with_login(info: &ConnectionInfo, options: &RedisOptions) -> ConnectionInfo {
    let mut settings = info.redis_settings().clone();
    if let Some(username) = &options.username {
        settings = settings.set_username(username);
    }
    if let Some(password) = &options.password {
        settings = settings.set_password(password);
    }
    info.clone().set_redis_settings(settings)
}

/// The address of `host:port`, over TLS or not.
pub(super) fn address(host: String, port: u16, tls: bool) -> ConnectionAddr {
    match tls {
        true => ConnectionAddr::TcpTls { host, port, insecure: false, tls_params: None },
        false => ConnectionAddr::Tcp(host, port),
    }
}

/// A client for `info`, trusting `certificates` when given.
pub(super) fn client(info: ConnectionInfo, certificates: Option<&TlsCertificates>) -> RedisResult<Client> {
    match certificates {
        Some(certificates) => Client::build_with_tls(info, certificates.clone()),
        None => Client::open(info),
    }
}

/// A mutex's value, even after a panic elsewhere while it was held.
pub(super) fn lock<T>(slot: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Connector {
    /// Reads the URL and the CA file; connects nothing yet.
    pub(super) fn new(options: &RedisOptions) -> Result<Self, String> {
        let (endpoint, settings) = Endpoint::parse(&options.url)?;
        let ca_file = settings.ca_file.or_else(|| options.ca_file.clone());
        if ca_file.is_some() && !endpoint.tls() {
            return Err(format!("a CA certificate needs a TLS URL ({TLS_SCHEMES}), not {:?}", options.url));
        }
        let certificates = match &ca_file {
            Some(path) => Some(TlsCertificates {
                client_tls: None,
                root_cert: Some(
                    std::fs::read(path)
                        .map_err(|e| format!("cannot read the Redis CA certificate {}: {e}", path.display()))?,
                ),
            }),
            None => None,
        };
        let wait_replicas = settings.wait_replicas.unwrap_or(options.wait_replicas);
        if wait_replicas > 0 && matches!(endpoint, Endpoint::Cluster(_)) {
            return Err("wait-replicas is supported for redis:// and redis+sentinel:// only".into());
        }
        let kind = Kind::new(&endpoint, options, certificates.as_ref())?;
        let bulk = Kind::new(&endpoint, options, certificates.as_ref())?;
        // `WAIT` blocks the connection it is sent on until the replicas
        // answer; reads must not queue behind it, so acknowledged writes
        // get a connection of their own.
        let acked_writes =
            if wait_replicas > 0 { Some(Kind::new(&endpoint, options, certificates.as_ref())?) } else { None };
        let topology = match endpoint {
            Endpoint::Single(_) => "single",
            Endpoint::Cluster(_) => "cluster",
            Endpoint::Sentinel { .. } => "sentinel",
        };
        Ok(Self { kind, bulk, acked_writes, wait_replicas, topology })
    }

    /// The connection for an operation on `lane`; `writes` when it writes
    /// (and so may wait for replicas: then its `WAIT` must follow it on
    /// the same connection, whatever its size).
    fn pick(&self, writes: bool, lane: Lane) -> &Kind {
        match (&self.acked_writes, writes, lane) {
            (Some(acked_writes), true, _) => acked_writes,
            (_, _, Lane::Bulk) => &self.bulk,
            _ => &self.kind,
        }
    }

    /// A connection for an operation (see [`Connector::pick`]).
    pub(super) async fn get(&self, writes: bool, lane: Lane) -> RedisResult<Conn> {
        self.pick(writes, lane).get().await
    }

    /// Notes a failed operation (see [`Kind::failed`]). All connections
    /// go to the same primary, so what one learns about it holds for all;
    /// but a timeout, like [`Connector::timed_out`], puts only the
    /// operation's own connection in doubt.
    pub(super) fn failed(&self, error: &RedisError, writes: bool, lane: Lane) {
        if error.is_timeout() {
            return self.timed_out(writes, lane);
        }
        for kind in [Some(&self.kind), Some(&self.bulk), self.acked_writes.as_ref()].into_iter().flatten() {
            kind.failed(error);
        }
    }

    /// Notes an operation that ran out of time (see [`Kind::timed_out`]):
    /// only its own connection is in doubt, as a large batch may simply
    /// be slow.
    pub(super) fn timed_out(&self, writes: bool, lane: Lane) {
        self.pick(writes, lane).timed_out();
    }

    pub(super) fn is_cluster(&self) -> bool {
        self.kind.is_cluster()
    }

    /// The Sentinels, when they name the primary.
    pub(super) fn sentinels(&self) -> Option<&Sentinels> {
        match &self.kind.source {
            Source::Sentinels(sentinels) => Some(sentinels),
            _ => None,
        }
    }

    /// `single`, `cluster` or `sentinel`, for health reports.
    pub(super) fn topology(&self) -> &'static str {
        self.topology
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_topology() {
        let (plain, _) = Endpoint::parse("redis+cluster://a:7000,b:7001").unwrap();
        assert!(!plain.tls(), "not a plain cluster");
        let Endpoint::Cluster(nodes) = plain else { panic!("not a plain cluster") };
        assert_eq!(nodes.len(), 2);
        let (secure, _) = Endpoint::parse("rediss+cluster://a:7000").unwrap();
        assert!(secure.tls(), "not a TLS cluster");
        let Endpoint::Cluster(nodes) = secure else { panic!("not a TLS cluster") };
        assert!(
            matches!(nodes[0].addr(), ConnectionAddr::TcpTls { host, port: 7000, insecure: false, .. } if host == "a")
        );
        let (endpoint, settings) = Endpoint::parse("redis+sentinel://s1:5000,s2/mymaster/3?wait-replicas=1").unwrap();
        let Endpoint::Sentinel { sentinels, master, db, .. } = endpoint else { panic!("not sentinel") };
        assert_eq!(sentinels, [ConnectionAddr::Tcp("s1".into(), 5000), ConnectionAddr::Tcp("s2".into(), 26379)]);
        assert_eq!((master.as_str(), db, settings.wait_replicas), ("mymaster", 3, Some(1)));
        let (secure, _) = Endpoint::parse("rediss+sentinel://s1/m").unwrap();
        assert!(secure.tls(), "not a TLS sentinel");
        let Endpoint::Sentinel { sentinels, .. } = secure else { panic!("not a TLS sentinel") };
        assert!(matches!(&sentinels[0], ConnectionAddr::TcpTls { port: 26379, insecure: false, .. }));
        let (_, settings) = Endpoint::parse("rediss://h:6380/0?ca=/etc/ca.pem").unwrap();
        assert_eq!(settings.ca_file, Some(PathBuf::from("/etc/ca.pem")));
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        let error = |url| Endpoint::parse(url).err().unwrap();
        assert!(error("redis+cluster://u:secret@a:1").contains("REDIS_PASSWORD"));
        assert!(error("redis://:secret@a:1").contains("REDIS_PASSWORD"));
        assert!(error("redis+sentinel://s:1").contains("name the primary"));
        assert!(error("redis+cluster://a").contains("host:port"));
        assert!(error("redis://a:1?tls=1").contains("unknown Redis URL setting"));
        assert!(error("memcached://a").contains("unknown Redis URL"));
    }

    #[test]
    fn settings_a_topology_cannot_honour_are_refused() {
        let refused = |url: &str| Connector::new(&RedisOptions::new(url)).err().unwrap();
        assert!(refused("redis+cluster://a:1?wait-replicas=1").contains("wait-replicas"));
        for plain in ["redis://a:1?ca=/x", "redis+sentinel://s:1/p?ca=/dev/null", "redis+cluster://a:1?ca=/x"] {
            assert!(refused(plain).contains("a CA certificate needs a TLS URL (rediss://"), "{plain}");
        }
        let mut ca_from_config = RedisOptions::new("redis+cluster://a:1");
        ca_from_config.ca_file = Some("/x".into());
        assert!(Connector::new(&ca_from_config).err().unwrap().contains("needs a TLS URL"));
        assert!(Connector::new(&RedisOptions::new("redis+sentinel://s:1/p?wait-replicas=1")).is_ok());
    }
}
