//! The manifest: which roles to load, under which global prefix, on which
//! state backend. TOML; relative paths are relative to the manifest file.
//!
//! ```toml
//! global-prefix = "rolehost:"        # default "rolehost:"
//! state = "redis://127.0.0.1:6379"   # default "memory"
//!
//! [redis]                            # optional
//! connect-timeout-ms = 1000
//! op-timeout-ms = 2000
//! acl-users = false                  # connect as each role's ACL user
//! ca-file = "ca.pem"                 # CA certificates for rediss…://
//! wait-replicas = 1                  # writes wait for this many replicas
//!
//! [[roles]]
//! name = "counter"                   # default: the file stem
//! wasm = "../target/roles/counter.wasm"
//! sha256 = "…"                       # optional pin
//! limits = { max-value-bytes = 65536 }
//! grants = { namespaces = { catalog = "read" }, env = ["TZ"], dir = "data" }
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::Deserialize;

use crate::limits::{Grants, RoleLimits};
use crate::runtime::RoleSpec;

/// The global prefix when neither the manifest nor the command line sets one.
pub const DEFAULT_GLOBAL_PREFIX: &str = "rolehost:";

/// A parsed manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Manifest {
    /// Prefix of every key this deployment writes.
    #[serde(default = "default_global_prefix")]
    pub global_prefix: String,
    /// The state backend URL (`memory`, `redis://…`), if set here.
    pub state: Option<String>,
    /// Redis connection settings.
    #[serde(default)]
    pub redis: RedisSection,
    /// The roles, in load order.
    #[serde(default)]
    pub roles: Vec<RoleEntry>,
}

/// `[redis]`: connection settings. Never a password.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RedisSection {
    /// Longest wait for a connection, in ms.
    pub connect_timeout_ms: Option<u64>,
    /// Longest wait for one operation, in ms.
    pub op_timeout_ms: Option<u64>,
    /// Talk to Redis as each role's own ACL user (see `rolehost acl`).
    #[serde(default)]
    pub acl_users: bool,
    /// PEM file of CA certificates trusted for TLS URLs (`rediss…://`), relative to the
    /// manifest.
    pub ca_file: Option<PathBuf>,
    /// Replicas a write must reach (Redis `WAIT`) before it is acknowledged.
    pub wait_replicas: Option<u32>,
    /// Present only so a password here gets a clear refusal.
    password: Option<toml::Value>,
}

/// One `[[roles]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RoleEntry {
    /// The role's identity; defaults to the component's file stem.
    pub name: Option<String>,
    /// The component file.
    pub wasm: PathBuf,
    /// Optional sha256 pin (hex).
    pub sha256: Option<String>,
    /// Per-role limits.
    #[serde(default)]
    pub limits: RoleLimits,
    /// Shared namespaces, environment variables and a directory.
    #[serde(default)]
    pub grants: Grants,
}

/// Largest manifest read (a manifest is a few KB).
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

fn default_global_prefix() -> String {
    DEFAULT_GLOBAL_PREFIX.to_owned()
}

impl Manifest {
    /// Reads and checks a manifest file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = crate::files::read_regular(path, MAX_MANIFEST_BYTES)
            .and_then(|bytes| String::from_utf8(bytes).map_err(std::io::Error::other))
            .with_context(|| format!("cannot read manifest {}", path.display()))?;
        let mut manifest = Self::parse(&text).with_context(|| format!("bad manifest {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let roles =
            manifest.roles.iter_mut().flat_map(|role| std::iter::once(&mut role.wasm).chain(role.grants.dir.as_mut()));
        for path in roles.chain(manifest.redis.ca_file.as_mut()) {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
        Ok(manifest)
    }

    /// Parses manifest text; paths stay as written.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| {
            let at = e.span().and_then(|span| text.get(..span.start)).map(|before| {
                let line_start = before.rfind('\n').map_or(0, |i| i + 1);
                let (line, column) = (before.matches('\n').count() + 1, before[line_start..].chars().count() + 1);
                format!("line {line}, column {column}: ")
            });
            anyhow::anyhow!("{}{}", at.unwrap_or_default(), e.message())
        })?;
        if manifest.redis.password.is_some() {
            bail!("a Redis password in the manifest is refused; set the REDIS_PASSWORD environment variable instead");
        }
        let mut names = std::collections::BTreeSet::new();
        for spec in manifest.role_specs()? {
            if !names.insert(spec.name.clone()) {
                bail!("role `{}` appears twice; role names must be unique", spec.name);
            }
        }
        Ok(manifest)
    }

    /// The roles as load specs.
    pub fn role_specs(&self) -> anyhow::Result<Vec<RoleSpec>> {
        self.roles
            .iter()
            .map(|entry| {
                let mut spec = RoleSpec::from_path(&entry.wasm)?;
                if let Some(name) = &entry.name {
                    spec.name = name.clone();
                }
                spec.sha256 = entry.sha256.clone();
                spec.limits = entry.limits.clone();
                spec.grants = entry.grants.clone();
                spec.validate()?;
                Ok(spec)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_roles_with_defaults() {
        let manifest = Manifest::parse(
            r#"
            [[roles]]
            wasm = "roles/counter.wasm"
            [[roles]]
            name = "cache"
            wasm = "roles/session-cache.wasm"
            limits = { max-value-bytes = 10 }
            "#,
        )
        .unwrap();
        assert_eq!(manifest.global_prefix, "rolehost:");
        let specs = manifest.role_specs().unwrap();
        assert_eq!(specs[0].name, "counter");
        assert_eq!(specs[1].name, "cache");
        assert_eq!(specs[1].limits.max_value_bytes, 10);
        assert_eq!(specs[1].limits.max_key_bytes, RoleLimits::default().max_key_bytes);
    }

    #[test]
    fn a_bad_value_is_named_with_its_line_and_column() {
        let text = "[[roles]]\nwasm = \"a.wasm\"\nlimits = { deadline-ms = -5 }\n";
        let error = Manifest::parse(text).unwrap_err().to_string();
        assert!(error.starts_with("line 3, column 26: "), "{error}");
        assert!(error.contains("-5"), "{error}");
        let error = Manifest::parse("[[roles]]\nname = \"é\"\n").unwrap_err().to_string();
        assert!(error.starts_with("line 1, column 1: ") && error.contains("wasm"), "{error}");
    }

    #[test]
    fn the_redis_ca_file_is_relative_to_the_manifest() {
        let dir = std::env::temp_dir().join(format!("rolehost-manifest-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("roles.toml");
        std::fs::write(&path, "[redis]\nca-file = \"certs/ca.pem\"\nwait-replicas = 1\n").unwrap();
        let manifest = Manifest::load(&path).unwrap();
        assert_eq!(manifest.redis.ca_file, Some(dir.join("certs/ca.pem")));
        assert_eq!(manifest.redis.wait_replicas, Some(1));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_a_password_in_the_file() {
        let err = Manifest::parse("[redis]\npassword = \"hunter2\"\n").unwrap_err();
        assert!(err.to_string().contains("REDIS_PASSWORD"), "{err}");
    }

    #[test]
    fn refuses_duplicate_and_bad_names() {
        let dup = "[[roles]]\nwasm = \"a.wasm\"\n[[roles]]\nwasm = \"x/a.wasm\"\n";
        assert!(Manifest::parse(dup).unwrap_err().to_string().contains("twice"));
        let bad = "[[roles]]\nname = \"Bad:Name\"\nwasm = \"a.wasm\"\n";
        assert!(Manifest::parse(bad).unwrap_err().to_string().contains("invalid role name"));
        assert!(Manifest::parse("unknown = 1").is_err());
        // The host's own secrets are no role's to read.
        for secret in ["REDIS_PASSWORD", "ROLEHOST_ACL_SECRET", "ROLEHOST_ADMIN_TOKEN"] {
            let text = format!("[[roles]]\nwasm = \"a.wasm\"\ngrants = {{ env = [\"TZ\", \"{secret}\"] }}\n");
            let error = Manifest::parse(&text).unwrap_err().to_string();
            assert!(error.contains(&format!("{secret} is the host's own secret")), "{error}");
        }
    }
}
