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
            options.connect_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = redis.op_timeout_ms {
            options.op_timeout = Duration::from_millis(ms);
        }
        Ok(Self::Redis(options))
    }

    /// The same backend, logged in as `role`'s ACL user with the password
    /// derived from `ROLEHOST_ACL_SECRET`.
    pub fn as_role(&self, role: &str) -> anyhow::Result<Self> {
        let Self::Redis(options) = self else {
            bail!("ACL users need a Redis backend");
        };
        let secret = std::env::var(crate::acl::SECRET_ENV)
            .map_err(|_| anyhow::anyhow!("ACL users need the secret in {}", crate::acl::SECRET_ENV))?;
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
