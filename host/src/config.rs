//! Which backend to use and how to reach it. Precedence: command-line flag,
//! then environment (`ROLEHOST_STATE`, `REDIS_PASSWORD`,
//! `ROLEHOST_REDIS_CA`), then manifest. The URL itself is read by the Redis
//! backend (standalone, TLS, Sentinel, Cluster).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::backend::{Backend, MemoryBackend, RedisBackend, RedisOptions, MEMORY_DEFAULT_MAX_BYTES};
use crate::manifest::RedisSection;

/// Environment variable naming the state backend.
pub const STATE_ENV: &str = "ROLEHOST_STATE";
/// Environment variable holding the Redis password; the only place for it.
pub const PASSWORD_ENV: &str = "REDIS_PASSWORD";
/// Environment variable holding the Sentinels' password, if they ask for one.
pub const SENTINEL_PASSWORD_ENV: &str = "REDIS_SENTINEL_PASSWORD";
/// Environment variable naming a PEM file of CA certificates for TLS URLs
/// (`rediss://`, `rediss+cluster://`, `rediss+sentinel://`).
pub const CA_ENV: &str = "ROLEHOST_REDIS_CA";

/// The Redis URL forms, for error messages.
const REDIS_URLS: &str = "redis://[user@]host:port[/db], redis+cluster://host:port,host:port,… \
     or redis+sentinel://host:port,…/PRIMARY (rediss… for TLS)";

/// Environment variables that override the manifest's Redis server
/// (host, port, database), as twelve-factor deployments set them.
pub const REDIS_HOST_ENV: &str = "REDIS_HOST";
pub const REDIS_PORT_ENV: &str = "REDIS_PORT";
pub const REDIS_DB_ENV: &str = "REDIS_DB";

/// The manifest's state URL with `REDIS_HOST`, `REDIS_PORT` and `REDIS_DB`
/// (given as `host`, `port`, `db`) put in: they replace those parts of a
/// `redis://` or `rediss://` URL, or make `redis://HOST:6379/0` when the
/// manifest names no Redis (or `memory`). Other URLs do not take them.
/// Nothing happens without `REDIS_HOST`: Kubernetes and Docker links set
/// `REDIS_PORT=tcp://…` in containers that never asked for it.
pub fn with_redis_overrides(
    url: Option<&str>,
    host: Option<&str>,
    port: Option<&str>,
    db: Option<&str>,
) -> anyhow::Result<Option<String>> {
    let Some(host) = host else {
        return Ok(url.map(str::to_owned));
    };
    if host.is_empty() || host.contains(['/', '@', '?', '#', ' ']) {
        bail!("{REDIS_HOST_ENV} {host:?} is not a host name or address");
    }
    // An IPv6 address goes in brackets; a port belongs in REDIS_PORT.
    let bracketed;
    let host = if host.contains(':') && !host.starts_with('[') {
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            bail!("{REDIS_HOST_ENV} {host:?} is not a host name or address (set the port in {REDIS_PORT_ENV})");
        }
        bracketed = format!("[{host}]");
        bracketed.as_str()
    } else {
        host
    };
    // A link-style `tcp://address:port` gives its port.
    let port = port.map(|p| if p.starts_with("tcp://") { p.rsplit(':').next().unwrap_or(p) } else { p });
    if let Some(port) = port {
        port.parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .with_context(|| format!("{REDIS_PORT_ENV} {port:?} is not a port"))?;
    }
    if let Some(db) = db {
        db.parse::<u32>().with_context(|| format!("{REDIS_DB_ENV} {db:?} is not a database number"))?;
    }
    let url = url.filter(|url| *url != "memory" && !url.starts_with("memory?"));
    let Some(url) = url else {
        return Ok(Some(format!("redis://{host}:{}/{}", port.unwrap_or("6379"), db.unwrap_or("0"))));
    };
    let Some((scheme, rest)) = url.split_once("://").filter(|(scheme, _)| matches!(*scheme, "redis" | "rediss")) else {
        bail!(
            "{REDIS_HOST_ENV}, {REDIS_PORT_ENV} and {REDIS_DB_ENV} apply to a redis:// or rediss:// URL, not {url:?}"
        );
    };
    let (rest, query) = rest.split_once('?').map_or((rest, None), |(rest, query)| (rest, Some(query)));
    let (authority, old_db) = rest.split_once('/').map_or((rest, None), |(a, db)| (a, Some(db)));
    let (user, address) = authority.rsplit_once('@').map_or((None, authority), |(user, a)| (Some(user), a));
    // The host gives way to REDIS_HOST; the port stays unless REDIS_PORT is set.
    let old_port = address.rsplit_once(':').filter(|_| !address.ends_with(']')).map(|(_, port)| port);
    let mut out = format!("{scheme}://");
    if let Some(user) = user {
        out += &format!("{user}@");
    }
    out += host;
    if let Some(port) = port.or(old_port) {
        out += &format!(":{port}");
    }
    if let Some(db) = db.or(old_db.filter(|d| !d.is_empty())) {
        out += &format!("/{db}");
    }
    if let Some(query) = query {
        out += &format!("?{query}");
    }
    Ok(Some(out))
}

/// Longest Redis timeout a manifest may set: an hour.
const MAX_TIMEOUT_MS: u64 = 3_600_000;

/// `ms` if it is a usable timeout: 0 would fail every operation at once.
fn checked_timeout(setting: &str, ms: u64) -> anyhow::Result<u64> {
    if !(1..=MAX_TIMEOUT_MS).contains(&ms) {
        bail!("[redis] {setting} is {ms}; it must be 1 to {MAX_TIMEOUT_MS} ms");
    }
    Ok(ms)
}

/// A state backend choice.
#[derive(Debug, Clone)]
pub enum StateConfig {
    /// The embedded in-memory store, refusing writes past `max_bytes`
    /// (`memory?max-bytes=N`; default [`MEMORY_DEFAULT_MAX_BYTES`]).
    Memory { max_bytes: usize },
    /// A Redis server.
    Redis(RedisOptions),
}

impl StateConfig {
    /// Parses `memory` or a Redis URL, taking the password and CA file
    /// from the environment and the rest from the manifest's `[redis]`.
    pub fn parse(url: &str, redis: &RedisSection) -> anyhow::Result<Self> {
        if let Some(rest) = url.strip_prefix("memory").filter(|rest| rest.is_empty() || rest.starts_with('?')) {
            let max_bytes = match rest.strip_prefix("?max-bytes=") {
                None if rest.is_empty() => MEMORY_DEFAULT_MAX_BYTES,
                Some(n) => n.parse().ok().filter(|&n| n > 0).with_context(|| {
                    format!("invalid state backend {url:?}: max-bytes must be a positive number of bytes")
                })?,
                None => bail!("invalid state backend {url:?}: `memory` takes only ?max-bytes=N"),
            };
            if *redis != RedisSection::default() {
                tracing::warn!("the manifest's [redis] settings do not apply to the memory state; ignored");
            }
            return Ok(Self::Memory { max_bytes });
        }
        let scheme = url.split("://").next().unwrap_or_default();
        if !["redis", "rediss", "redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel"]
            .contains(&scheme)
            || !url.contains("://")
        {
            bail!("unknown state backend {url:?}: use `memory`, {REDIS_URLS}");
        }
        let mut options = RedisOptions::new(url);
        options.password = std::env::var(PASSWORD_ENV).ok().filter(|p| !p.is_empty());
        options.sentinel_password = std::env::var(SENTINEL_PASSWORD_ENV).ok().filter(|p| !p.is_empty());
        options.ca_file = std::env::var_os(CA_ENV).filter(|p| !p.is_empty()).map(Into::into).or(redis.ca_file.clone());
        options.wait_replicas = redis.wait_replicas.unwrap_or(0);
        if let Some(ms) = redis.connect_timeout_ms {
            options.connect_timeout = Duration::from_millis(checked_timeout("connect-timeout-ms", ms)?);
        }
        if let Some(ms) = redis.op_timeout_ms {
            options.op_timeout = Duration::from_millis(checked_timeout("op-timeout-ms", ms)?);
        }
        Ok(Self::Redis(options))
    }

    /// The same backend, logged in as `role`'s ACL user with the password
    /// derived from `ROLEHOST_ACL_SECRET`.
    pub fn as_role(&self, role: &str) -> anyhow::Result<Self> {
        let Self::Redis(options) = self else {
            bail!("ACL users need a Redis backend");
        };
        let secret = crate::acl::secret()?;
        let mut options = options.clone();
        options.username = Some(crate::acl::user(role));
        options.password = Some(crate::acl::password(&secret, role));
        Ok(Self::Redis(options))
    }

    /// Builds the backend. Redis connects lazily, on first use.
    pub fn connect(&self) -> anyhow::Result<Arc<dyn Backend>> {
        Ok(match self {
            Self::Memory { max_bytes } => Arc::new(MemoryBackend::with_max_bytes(*max_bytes)),
            Self::Redis(options) => Arc::new(RedisBackend::new(options).map_err(anyhow::Error::msg)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_redis_timeouts_are_refused() {
        for (setting, ms) in [("op-timeout-ms", 0), ("connect-timeout-ms", 0), ("op-timeout-ms", u64::MAX)] {
            let manifest = crate::manifest::Manifest::parse(&format!("[redis]\n{setting} = {ms}\n")).unwrap();
            let error = StateConfig::parse("redis://h", &manifest.redis).err().unwrap().to_string();
            assert!(error.contains(&format!("{setting} is {ms}")), "{error}");
        }
        let manifest = crate::manifest::Manifest::parse("[redis]\nop-timeout-ms = 250\n").unwrap();
        let Ok(StateConfig::Redis(options)) = StateConfig::parse("redis://h", &manifest.redis) else { panic!() };
        assert_eq!(options.op_timeout, Duration::from_millis(250));
    }

    #[test]
    fn redis_host_port_and_db_override_the_manifests_server() {
        let o = |url, host, port, db| with_redis_overrides(url, host, port, db).map_err(|e| e.to_string());
        assert_eq!(o(Some("memory"), None, None, None), Ok(Some("memory".into())), "nothing set: as it was");
        let k8s = o(Some("memory"), None, Some("tcp://10.0.0.7:6379"), None);
        assert_eq!(k8s, Ok(Some("memory".into())), "a port without a host changes nothing");
        assert_eq!(o(None, Some("cache"), None, None), Ok(Some("redis://cache:6379/0".into())));
        let linked = o(None, Some("cache"), Some("tcp://10.0.0.7:6380"), None);
        assert_eq!(linked, Ok(Some("redis://cache:6380/0".into())));
        assert_eq!(o(None, Some("::1"), None, None), Ok(Some("redis://[::1]:6379/0".into())));
        assert!(o(None, Some("cache:6380"), None, None).unwrap_err().contains("REDIS_PORT"));
        assert!(o(None, Some("evil/x"), None, None).unwrap_err().contains("not a host"));
        assert_eq!(o(Some("memory"), Some("cache"), Some("6380"), Some("2")), Ok(Some("redis://cache:6380/2".into())));
        let url = Some("rediss://app@old:7000/1?ca=/etc/ca.pem");
        assert_eq!(o(url, Some("new"), None, None), Ok(Some("rediss://app@new:7000/1?ca=/etc/ca.pem".into())));
        let moved = o(url, Some("old"), Some("7001"), Some("3"));
        assert_eq!(moved, Ok(Some("rediss://app@old:7001/3?ca=/etc/ca.pem".into())));
        assert_eq!(o(Some("redis://h"), Some("h"), Some("1"), None), Ok(Some("redis://h:1".into())));
        assert_eq!(o(Some("redis://[::1]"), Some("h"), None, None), Ok(Some("redis://h".into())));
        assert!(o(Some("redis+cluster://a:1"), Some("b"), None, None).unwrap_err().contains("redis:// or rediss://"));
        assert!(o(None, Some("h"), Some("http"), None).unwrap_err().contains("not a port"));
        assert!(o(None, Some("h"), None, Some("x")).unwrap_err().contains("not a database"));
    }
}
