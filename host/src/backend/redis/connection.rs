//! How the Redis backend reaches its servers: one server (`redis://`,
//! `rediss://`), the primary a set of Sentinels names
//! (`redis+sentinel://`), or a Cluster (`redis+cluster://`). Every kind
//! connects lazily and again after failures, so Redis being down is an
//! error of the calls made meanwhile, never of the host.
//!
//! A server or Sentinel primary gets one multiplexed connection, dropped
//! after any failure that leaves it in doubt (lost, timed out, refused
//! login, now a replica) and made afresh by the next operation; redis-rs's
//! `ConnectionManager` would keep a connection whose login failed, and
//! never notices one that stopped answering.

use std::path::PathBuf;
use std::sync::Mutex;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo, Pipeline,
    RedisError, RedisFuture, RedisResult, ServerErrorKind, TlsCertificates, TlsMode, Value,
};

use super::coalesce::Coalescing;
use super::RedisOptions;

/// The URL schemes with TLS, for error messages.
const TLS_SCHEMES: &str = "rediss://, rediss+cluster:// or rediss+sentinel://";

/// Default Sentinel port, for addresses that leave it out.
const SENTINEL_PORT: u16 = 26379;

/// Where the servers are, from the URL.
enum Endpoint {
    Single(ConnectionInfo),
    /// The nodes first asked; `tls` for all nodes.
    Cluster {
        nodes: Vec<ConnectionInfo>,
        tls: bool,
    },
    /// `tls` for the Sentinels and the primary alike.
    Sentinel {
        sentinels: Vec<ConnectionAddr>,
        master: String,
        db: i64,
        username: Option<String>,
        tls: bool,
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
        match self {
            Endpoint::Single(info) => matches!(info.addr(), ConnectionAddr::TcpTls { .. }),
            Endpoint::Cluster { tls, .. } | Endpoint::Sentinel { tls, .. } => *tls,
        }
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
            return Ok((Self::Cluster { nodes, tls }, settings));
        }
        if let "redis+sentinel" | "rediss+sentinel" = scheme {
            let (user, rest) = split_user(rest)?;
            let mut parts = rest.split('/');
            let address = |(host, port)| match tls {
                true => ConnectionAddr::TcpTls { host, port, insecure: false, tls_params: None },
                false => ConnectionAddr::Tcp(host, port),
            };
            let sentinels = parts
                .next()
                .unwrap_or_default()
                .split(',')
                .map(|s| host_port(s, Some(SENTINEL_PORT)).map(address))
                .collect::<Result<Vec<_>, _>>()?;
            let master = parts.next().filter(|m| !m.is_empty()).ok_or_else(|| {
                format!("invalid Redis URL {url:?}: name the primary, redis+sentinel://host:port,…/NAME")
            })?;
            let db = match parts.next().filter(|d| !d.is_empty()) {
                Some(db) => db.parse().map_err(|_| format!("invalid database {db:?} in {url:?}"))?,
                None => 0,
            };
            let sentinel = Self::Sentinel { sentinels, master: master.to_owned(), db, username: user, tls };
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
    Cluster(ClusterConnection),
}

/// One primary of a Cluster (`host`, `port`); none for the only server of
/// the other kinds.
pub(super) type Shard = Option<(String, u16)>;

impl Conn {
    /// The primaries whose keys together are the whole key space, in a
    /// stable order.
    pub(super) async fn shards(&mut self) -> RedisResult<Vec<Shard>> {
        let Conn::Cluster(cluster) = self else {
            return Ok(vec![None]);
        };
        let nodes: String = redis::from_redis_value(
            cluster
                .route_command(
                    redis::cmd("CLUSTER").arg("NODES").clone(),
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
                )
                .await?,
        )?;
        Ok(primaries(&nodes))
    }

    /// Runs `cmd` on `shard` (a Cluster primary) or on the only server.
    pub(super) async fn on(&mut self, shard: &Shard, cmd: &Cmd) -> RedisResult<Value> {
        match (self, shard) {
            (Conn::Cluster(cluster), Some((host, port))) => {
                let at = SingleNodeRoutingInfo::ByAddress { host: host.clone(), port: *port };
                cluster.route_command(cmd.clone(), RoutingInfo::SingleNode(at)).await
            }
            (conn, _) => cmd.query_async(conn).await,
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Direct(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => Box::pin(async move {
                match c.req_packed_command(cmd).await {
                    Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::Ask) => {
                        follow_ask(c, cmd, error).await
                    }
                    other => other,
                }
            }),
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
            Conn::Cluster(c) => Box::pin(async move {
                match c.req_packed_commands(pipeline, offset, count).await {
                    Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::ExecAbort) => {
                        follow_transaction_ask(c, pipeline, offset, count, error).await
                    }
                    other => other,
                }
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Direct(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Hands out connections, making them when needed.
pub(super) struct Connector {
    /// The connection for every operation, but for writes that wait for
    /// replicas.
    kind: Kind,
    /// With `wait-replicas`, the connection for writes and their `WAIT`s.
    acked_writes: Option<Kind>,
    /// Replicas each write waits for (`WAIT`); 0 for none.
    pub(super) wait_replicas: u32,
    /// `single`, `cluster` or `sentinel`.
    topology: &'static str,
}

enum Kind {
    /// One server or the Sentinels' primary: the connection, made on first
    /// use and again after a failure; one caller at a time connects.
    Direct {
        source: tokio::sync::Mutex<Source>,
        config: AsyncConnectionConfig,
        conn: Mutex<Option<Coalescing<MultiplexedConnection>>>,
    },
    /// Made on first use; it then follows slot moves and node failures itself.
    Cluster { client: ClusterClient, conn: tokio::sync::Mutex<Option<ClusterConnection>> },
}

/// Where a direct connection goes.
enum Source {
    Server(Client),
    /// The current primary, asked of the Sentinels at every connect.
    Sentinels(SentinelClient),
}

impl Kind {
    /// One connection of the kind `endpoint` names; connects nothing yet.
    fn new(
        endpoint: &Endpoint,
        options: &RedisOptions,
        certificates: Option<&TlsCertificates>,
    ) -> Result<Self, String> {
        let invalid = |e: RedisError| format!("invalid Redis settings for {:?}: {e}", options.url);
        Ok(match endpoint {
            Endpoint::Single(info) => {
                let mut info = info.clone();
                let mut settings = info.redis_settings().clone();
                if let Some(username) = &options.username {
                    settings = settings.set_username(username);
                }
                if let Some(password) = &options.password {
                    settings = settings.set_password(password);
                }
                info = info.set_redis_settings(settings);
                let client = match certificates {
                    Some(certs) => Client::build_with_tls(info, certs.clone()),
                    None => Client::open(info),
                }
                .map_err(invalid)?;
                Kind::direct(Source::Server(client), options)
            }
            Endpoint::Cluster { nodes, .. } => {
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
                Kind::Cluster { client: builder.build().map_err(invalid)?, conn: tokio::sync::Mutex::new(None) }
            }
            Endpoint::Sentinel { sentinels, master, db, username, tls } => {
                let mut builder =
                    SentinelClientBuilder::new(sentinels.clone(), master.clone(), SentinelServerType::Master)
                        .map_err(invalid)?
                        .set_client_to_redis_db(*db);
                if let Some(username) = options.username.as_ref().or(username.as_ref()) {
                    builder = builder.set_client_to_redis_username(username);
                }
                if let Some(password) = &options.password {
                    builder = builder.set_client_to_redis_password(password);
                }
                if *tls {
                    builder = builder
                        .set_client_to_redis_tls_mode(TlsMode::Secure)
                        .set_client_to_sentinel_tls_mode(TlsMode::Secure);
                }
                if let Some(certificates) = certificates {
                    builder = builder
                        .set_client_to_redis_certificates(certificates.clone())
                        .set_client_to_sentinel_certificates(certificates.clone());
                }
                Kind::direct(Source::Sentinels(builder.build().map_err(invalid)?), options)
            }
        })
    }

    fn direct(source: Source, options: &RedisOptions) -> Self {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.op_timeout));
        Kind::Direct { source: tokio::sync::Mutex::new(source), config, conn: Mutex::new(None) }
    }

    /// A connection, made now if there is none.
    async fn get(&self) -> RedisResult<Conn> {
        match self {
            Kind::Cluster { client, conn } => {
                let mut slot = conn.lock().await;
                if let Some(conn) = slot.as_ref() {
                    return Ok(Conn::Cluster(conn.clone()));
                }
                let fresh = client.get_async_connection().await?;
                *slot = Some(fresh.clone());
                Ok(Conn::Cluster(fresh))
            }
            Kind::Direct { source, config, conn } => {
                if let Some(conn) = lock(conn).as_ref() {
                    return Ok(Conn::Direct(conn.clone()));
                }
                // One caller at a time connects; the others then find its
                // connection.
                let mut source = source.lock().await;
                if let Some(conn) = lock(conn).as_ref() {
                    return Ok(Conn::Direct(conn.clone()));
                }
                let fresh = Coalescing::new(match &mut *source {
                    Source::Server(client) => client.get_multiplexed_async_connection_with_config(config).await?,
                    Source::Sentinels(client) => client.get_async_connection_with_config(config).await?,
                });
                *lock(conn) = Some(fresh.clone());
                Ok(Conn::Direct(fresh))
            }
        }
    }

    /// Notes a failed operation: a direct connection that lost its server,
    /// stopped answering, was refused its login, or whose server is no
    /// longer the primary is dropped, so the next operation connects again
    /// (for Sentinels: to where the primary is now). Operations still
    /// running on it finish on their own clone.
    fn failed(&self, error: &RedisError) {
        if let Kind::Direct { conn, .. } = self {
            let gone = error.is_io_error()
                || error.is_connection_dropped()
                || error.is_timeout()
                || error.is_unrecoverable_error()
                || matches!(
                    error.kind(),
                    ErrorKind::Server(ServerErrorKind::ReadOnly) | ErrorKind::AuthenticationFailed
                );
            if gone {
                *lock(conn) = None;
            }
        }
    }

    /// Notes an operation that ran out of time: its connection may be dead
    /// without knowing it (a server cut off the network), so it is dropped.
    fn timed_out(&self) {
        if let Kind::Direct { conn, .. } = self {
            *lock(conn) = None;
        }
    }
}

/// The connection slot, even after a panic elsewhere while it was held.
fn lock<T>(slot: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
        if wait_replicas > 0 && matches!(endpoint, Endpoint::Cluster { .. }) {
            return Err("wait-replicas is supported for redis:// and redis+sentinel:// only".into());
        }
        let kind = Kind::new(&endpoint, options, certificates.as_ref())?;
        // `WAIT` blocks the connection it is sent on until the replicas
        // answer; reads must not queue behind it, so acknowledged writes
        // get a connection of their own.
        let acked_writes =
            if wait_replicas > 0 { Some(Kind::new(&endpoint, options, certificates.as_ref())?) } else { None };
        let topology = match endpoint {
            Endpoint::Single(_) => "single",
            Endpoint::Cluster { .. } => "cluster",
            Endpoint::Sentinel { .. } => "sentinel",
        };
        Ok(Self { kind, acked_writes, wait_replicas, topology })
    }

    /// A connection for an operation; `writes` when it writes (and so
    /// may wait for replicas).
    pub(super) async fn get(&self, writes: bool) -> RedisResult<Conn> {
        match (&self.acked_writes, writes) {
            (Some(acked_writes), true) => acked_writes.get().await,
            _ => self.kind.get().await,
        }
    }

    /// Notes a failed operation (see [`Kind::failed`]). Both connections
    /// go to the same primary, so what one learns about it holds for both.
    pub(super) fn failed(&self, error: &RedisError) {
        self.kind.failed(error);
        if let Some(acked_writes) = &self.acked_writes {
            acked_writes.failed(error);
        }
    }

    /// Notes an operation that ran out of time (see [`Kind::timed_out`]).
    pub(super) fn timed_out(&self) {
        self.kind.timed_out();
        if let Some(acked_writes) = &self.acked_writes {
            acked_writes.timed_out();
        }
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster { .. })
    }

    /// `single`, `cluster` or `sentinel`, for health reports.
    pub(super) fn topology(&self) -> &'static str {
        self.topology
    }
}

/// The primaries owning slots in a `CLUSTER NODES` answer, sorted. Lines
/// are `id address flags primary ping pong epoch link slot…`; a primary
/// with slots holds keys whether reachable or not (an unreachable one makes
/// a scan fail rather than skip its keys).
fn primaries(nodes: &str) -> Vec<Shard> {
    let mut primaries: Vec<Shard> = nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let (address, flags) = (fields.get(1)?, fields.get(2)?);
            if !flags.split(',').any(|f| f == "master") || fields.len() <= 8 {
                return None;
            }
            let address = address.split(['@', ',']).next()?;
            let (host, port) = address.rsplit_once(':')?;
            Some(Some((host.to_owned(), port.parse().ok()?)))
        })
        .collect();
    primaries.sort();
    primaries
}

/// Follows an ASK redirect: `cmd`'s slot is moving to another primary,
/// which has its key already (or will create it), so `cmd` goes there
/// once more, after `ASKING`. (redis-rs follows ASK only with its own
/// retries on, which would also resend commands whose reply was lost.) A
/// multi-key command whose keys span slots keeps the error, and `retry.rs`
/// tries it again until the move is over.
async fn follow_ask(cluster: &mut ClusterConnection, cmd: &Cmd, ask: RedisError) -> RedisResult<Value> {
    let Some((address, slot)) = ask.redirect_node() else { return Err(ask) };
    if !keys_in_slot(cmd, slot) {
        return Err(ask);
    }
    let Some(replies) = send_asking(cluster, address, [cmd.clone()], 0, 1).await else { return Err(ask) };
    match replies?.pop() {
        Some(reply) => reply.extract_error(),
        None => Err(RedisError::from((ErrorKind::Client, "no reply after ASKING"))),
    }
}

/// Follows ASK redirects for a transaction (`pipeline` packed as
/// MULTI, commands, EXEC) that Redis aborted because every command in it
/// was redirected to one node: none of its keys is left on the old primary,
/// so the whole transaction goes to the new one after `ASKING` (which
/// holds until EXEC). If only some were redirected, the keys are split
/// between the two primaries and the transaction waits for the move (the
/// abort is tried again by `retry.rs`).
async fn follow_transaction_ask(
    cluster: &mut ClusterConnection,
    pipeline: &Pipeline,
    offset: usize,
    count: usize,
    aborted: RedisError,
) -> RedisResult<Vec<Value>> {
    let Some(errors) = aborted.clone().into_server_errors() else { return Err(aborted) };
    let mut targets = errors.iter().map(|(_, e)| (e.kind() == Some(ServerErrorKind::Ask)).then(|| e.details()));
    let Some(Some(Some(target))) = targets.next() else { return Err(aborted) };
    let commands = pipeline.cmd_iter().count();
    if !pipeline.is_transaction() || errors.len() != commands || !targets.all(|t| t == Some(Some(target))) {
        return Err(aborted);
    }
    let Some(address) = target.split_ascii_whitespace().nth(1) else { return Err(aborted) };
    let transaction =
        std::iter::once(redis::cmd("MULTI")).chain(pipeline.cmd_iter().cloned()).chain([redis::cmd("EXEC")]);
    send_asking(cluster, address, transaction, offset, count).await.unwrap_or(Err(aborted))
}

/// Sends `ASKING` and then `commands` to the primary at `address`
/// (`host:port`), in one pipeline so that nothing else on the shared
/// connection comes between; `count` replies from `offset` (counted in
/// `commands`). `None` if `address` is not one.
async fn send_asking(
    cluster: &mut ClusterConnection,
    address: &str,
    commands: impl IntoIterator<Item = Cmd>,
    offset: usize,
    count: usize,
) -> Option<RedisResult<Vec<Value>>> {
    let (host, port) = address.rsplit_once(':')?;
    let at = SingleNodeRoutingInfo::ByAddress { host: host.to_owned(), port: port.parse().ok()? };
    let mut pipe = redis::pipe();
    pipe.cmd("ASKING");
    for cmd in commands {
        pipe.add_command(cmd);
    }
    Some(cluster.route_pipeline(pipe, offset + 1, count, at).await)
}

/// Whether every key of `cmd` lies in `slot`. Only the multi-key commands
/// rolehost sends can span slots (redis-rs splits them by slot); the
/// server answers ASK to any other command only when all its keys are in
/// the moving slot.
fn keys_in_slot(cmd: &Cmd, slot: u16) -> bool {
    let mut args = cmd.args_iter().filter_map(|arg| match arg {
        redis::Arg::Simple(bytes) => Some(bytes),
        _ => None,
    });
    let Some(name) = args.next() else { return false };
    if [&b"MGET"[..], b"DEL", b"EXISTS", b"UNLINK", b"TOUCH"].iter().any(|multi| name.eq_ignore_ascii_case(multi)) {
        return args.all(|key| self::slot(key) == slot);
    }
    true
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
    fn urls_name_their_topology() {
        let (Endpoint::Cluster { nodes, tls: false }, _) = Endpoint::parse("redis+cluster://a:7000,b:7001").unwrap()
        else {
            panic!("not a plain cluster")
        };
        assert_eq!(nodes.len(), 2);
        let (Endpoint::Cluster { nodes, tls: true }, _) = Endpoint::parse("rediss+cluster://a:7000").unwrap() else {
            panic!("not a TLS cluster")
        };
        assert!(
            matches!(nodes[0].addr(), ConnectionAddr::TcpTls { host, port: 7000, insecure: false, .. } if host == "a")
        );
        let (endpoint, settings) = Endpoint::parse("redis+sentinel://s1:5000,s2/mymaster/3?wait-replicas=1").unwrap();
        let Endpoint::Sentinel { sentinels, master, db, .. } = endpoint else { panic!("not sentinel") };
        assert_eq!(sentinels, [ConnectionAddr::Tcp("s1".into(), 5000), ConnectionAddr::Tcp("s2".into(), 26379)]);
        assert_eq!((master.as_str(), db, settings.wait_replicas), ("mymaster", 3, Some(1)));
        let (Endpoint::Sentinel { sentinels, tls: true, .. }, _) = Endpoint::parse("rediss+sentinel://s1/m").unwrap()
        else {
            panic!("not a TLS sentinel")
        };
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

    #[test]
    fn primaries_are_the_masters_owning_slots() {
        let nodes = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7002@17002,host2 master,fail? - 0 0 2 connected 5461-10922
c3 127.0.0.1:7003@17003 master,fail - 0 0 3 disconnected
d4 127.0.0.1:7004@17004 slave a1 0 0 1 connected
e5 127.0.0.1:7000@17000 master - 0 0 4 connected 10923-16383
";
        let expected: Vec<Shard> = [7000, 7001, 7002].map(|port| Some(("127.0.0.1".to_owned(), port))).into();
        assert_eq!(primaries(nodes), expected);
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
