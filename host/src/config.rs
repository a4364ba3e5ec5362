//! Which backend to use and how to reach it. Precedence: command-line flag,
//! then environment (`ROLEHOST_STATE`, `REDIS_PASSWORD`), then manifest.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;

use crate::backend::{Backend, MemoryBackend, RedisBackend, RedisOptions};
use crate::manifest::RedisSection;

/// Environment variable naming the state backend.
pub const STATE_ENV: &str = "ROLEHOST_STATE";
/// Environment variable holding the Redis password; the only place for it.
pub const PASSWORD_ENV: &str = "REDIS_PASSWORD";

/// A state backend choice.
#[derive(Debug, Clone)]
pub enum StateConfig {
    /// The embedded in-memory store.
    Memory,
    /// A Redis server.
    Redis(RedisOptions),
}

impl StateConfig {
    /// Parses `memory` or `redis://…`, taking the password from the
    /// environment and timeouts from the manifest's `[redis]`.
    pub fn parse(url: &str, redis: &RedisSection) -> anyhow::Result<Self> {
        if url == "memory" {
            return Ok(Self::Memory);
        }
        if !url.starts_with("redis://") {
            bail!("unknown state backend {url:?}: use `memory` or `redis://[user@]host:port[/db]`");
        }
        let mut options = RedisOptions::new(url);
        options.password = std::env::var(PASSWORD_ENV).ok().filter(|p| !p.is_empty());
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
            Self::Memory => Arc::new(MemoryBackend::new()),
            Self::Redis(options) => Arc::new(RedisBackend::new(options).map_err(anyhow::Error::msg)?),
        })
    }
}
