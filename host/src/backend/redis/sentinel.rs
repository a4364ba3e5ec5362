//! Finding the primary a set of Sentinels names, as Redis's guidelines
//! for Sentinel clients describe: ask a Sentinel for the primary's
//! address, then ask that server whether it is the primary (`ROLE`).
//!
//! The Sentinels are asked side by side, each within the backend's own
//! connect and operation timeouts, so one that is down or silent costs
//! nothing while another answers. (redis-rs's `SentinelClient` asks them
//! in turn with fixed timeouts of its own: a silent first Sentinel cost a
//! second at every reconnect, more than a short operation timeout allows,
//! so such a backend never connected again.)

use std::collections::HashMap;

use futures_util::stream::{FuturesUnordered, StreamExt};
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ErrorKind, FromRedisValue, IntoConnectionInfo, RedisConnectionInfo,
    RedisError, RedisResult, Role, TlsCertificates,
};

use super::connection::{address, client};

/// The Sentinels of one primary, and how to reach that primary.
pub(super) struct Sentinels {
    /// One client per Sentinel, in the URL's order.
    sentinels: Vec<Client>,
    /// The primary's name in the Sentinels' configuration.
    name: String,
    /// How to log in to the primary: database, user, password.
    login: RedisConnectionInfo,
    /// Whether the primary speaks TLS (when its Sentinels do).
    tls: bool,
    certificates: Option<TlsCertificates>,
    /// Timeouts for every connection here, to Sentinels and primary alike.
    config: AsyncConnectionConfig,
}

impl Sentinels {
    /// Checks the settings; connects nothing yet.
    pub(super) fn new(
        addresses: &[ConnectionAddr],
        name: &str,
        login: RedisConnectionInfo,
        sentinel_password: Option<&str>,
        certificates: Option<&TlsCertificates>,
        config: AsyncConnectionConfig,
    ) -> RedisResult<Self> {
        let mut sentinel_login = RedisConnectionInfo::default();
        if let Some(password) = sentinel_password {
            sentinel_login = sentinel_login.set_password(password);
        }
        let sentinels = addresses
            .iter()
            .map(|address| {
                let info = address.clone().into_connection_info()?.set_redis_settings(sentinel_login.clone());
                client(info, certificates)
            })
            .collect::<RedisResult<_>>()?;
        let tls = matches!(addresses.first(), Some(ConnectionAddr::TcpTls { .. }));
        let certificates = certificates.cloned();
        Ok(Self { sentinels, name: name.to_owned(), login, tls, certificates, config })
    }

    /// A connection to the current primary. Every Sentinel is asked at
    /// once; each address named is tried in the order the answers come,
    /// until one is the primary. Fails with the most telling of the
    /// errors met: a refused login, then a primary unknown or not (yet)
    /// the primary, then any other.
    pub(super) async fn primary(&self) -> RedisResult<MultiplexedConnection> {
        let mut answers: FuturesUnordered<_> = self.sentinels.iter().map(|s| self.ask(s)).collect();
        let (mut tried, mut worst) = (Vec::new(), None::<RedisError>);
        while let Some(answer) = answers.next().await {
            let outcome = match answer {
                Ok(address) if tried.contains(&address) => continue,
                Ok(address) => {
                    tried.push(address.clone());
                    self.connect_if_primary(address).await
                }
                Err(error) => Err(error),
            };
            match outcome {
                Ok(conn) => return Ok(conn),
                Err(error) if worst.as_ref().is_none_or(|w| telling(&error) > telling(w)) => worst = Some(error),
                Err(_) => {}
            }
        }
        Err(worst.unwrap_or_else(no_sentinel))
    }

    /// Connections to the primary's replicas that the first Sentinel to
    /// answer knows and does not see as down, with their addresses.
    pub(super) async fn replicas(&self) -> RedisResult<Vec<(String, MultiplexedConnection)>> {
        let mut answers: FuturesUnordered<_> = self.sentinels.iter().map(|s| self.ask_replicas(s)).collect();
        let mut error = None;
        let addresses = loop {
            match answers.next().await {
                Some(Ok(addresses)) => break addresses,
                Some(Err(e)) => error = Some(e),
                None => return Err(error.unwrap_or_else(no_sentinel)),
            }
        };
        drop(answers);
        let mut replicas = Vec::new();
        for (host, port) in addresses {
            let shown = format!("{host}:{port}");
            replicas.push((shown, self.connect(host, port).await?));
        }
        Ok(replicas)
    }

    /// `SENTINEL question NAME`, asked of `sentinel`.
    async fn query<T: FromRedisValue>(&self, sentinel: &Client, question: &str) -> RedisResult<T> {
        let mut conn = sentinel.get_multiplexed_async_connection_with_config(&self.config).await?;
        redis::cmd("SENTINEL").arg(question).arg(&self.name).query_async(&mut conn).await
    }

    /// The replicas `sentinel` knows of and does not see as down.
    async fn ask_replicas(&self, sentinel: &Client) -> RedisResult<Vec<(String, u16)>> {
        let replicas: Vec<HashMap<String, String>> = self.query(sentinel, "REPLICAS").await?;
        Ok(replicas
            .into_iter()
            .filter(|r| r.get("flags").is_some_and(|f| !f.contains("down") && !f.contains("disconnected")))
            .filter_map(|r| Some((r.get("ip")?.clone(), r.get("port")?.parse().ok()?)))
            .collect())
    }

    /// The primary's address as `sentinel` knows it.
    async fn ask(&self, sentinel: &Client) -> RedisResult<(String, u16)> {
        let address: Option<(String, u16)> = self.query(sentinel, "GET-MASTER-ADDR-BY-NAME").await?;
        address.ok_or_else(|| {
            RedisError::from((
                ErrorKind::MasterNameNotFoundBySentinel,
                "a Sentinel does not know the primary",
                self.name.clone(),
            ))
        })
    }

    /// A connection to `(host, port)` if that server is the primary now.
    async fn connect_if_primary(&self, (host, port): (String, u16)) -> RedisResult<MultiplexedConnection> {
        let shown = format!("{host}:{port}");
        let mut conn = self.connect(host, port).await?;
        match redis::cmd("ROLE").query_async(&mut conn).await? {
            Role::Primary { .. } => Ok(conn),
            // Mid-failover, or a Sentinel cut off from the others.
            _ => Err(RedisError::from((
                ErrorKind::MasterNameNotFoundBySentinel,
                "a Sentinel names a server that is not the primary",
                format!("{shown} (primary {})", self.name),
            ))),
        }
    }

    /// A connection to a server of the primary's set (the primary or a
    /// replica), logged in as for the primary.
    async fn connect(&self, host: String, port: u16) -> RedisResult<MultiplexedConnection> {
        let info = address(host, port, self.tls).into_connection_info()?.set_redis_settings(self.login.clone());
        client(info, self.certificates.as_ref())?.get_multiplexed_async_connection_with_config(&self.config).await
    }
}

fn no_sentinel() -> RedisError {
    RedisError::from((ErrorKind::InvalidClientConfig, "no Sentinel given"))
}

/// How much an error says about why no primary was reached.
fn telling(error: &RedisError) -> u8 {
    if super::refused_login(error) {
        2
    } else if error.kind() == ErrorKind::MasterNameNotFoundBySentinel {
        1
    } else {
        0
    }
}
