//! Redis ACL users per role: defence in depth. Each role gets a Redis user
//! that may touch only keys under its own prefix (and its granted shared
//! namespaces, read-only where the grant is), so Redis itself refuses
//! cross-role access even if the host had a bug.
//!
//! Passwords are never stored: each is derived from one operator secret
//! (`ROLEHOST_ACL_SECRET`) and the role's name with HMAC-SHA256, and Redis
//! is given only the password's SHA-256.

use sha2::{Digest, Sha256};

use crate::glob;
use crate::limits::{Access, Grants};

/// Environment variable holding the secret that role passwords derive from.
pub const SECRET_ENV: &str = "ROLEHOST_ACL_SECRET";

/// Commands the state API sends (scripts run with the caller's rights, so
/// the commands they call are listed too).
const COMMANDS: &[&str] = &[
    "ping",
    "info",
    "select",
    "get",
    "set",
    "psetex",
    "hmset",
    "del",
    "exists",
    "mget",
    "strlen",
    "hstrlen",
    "pttl",
    "pexpire",
    "persist",
    "incrby",
    "incr",
    "getdel",
    "hget",
    "hgetall",
    "hkeys",
    "hlen",
    "hset",
    "hdel",
    "hincrby",
    "eval",
    "evalsha",
    "eval_ro",
    "evalsha_ro",
    "script|load",
    "scan",
    "multi",
    "exec",
    "time",
    // Cluster routing (slot map, primaries to scan, hostnames, and
    // `ASKING` to follow a slot being migrated) and `wait-replicas`.
    "cluster|slots",
    "cluster|nodes",
    "cluster|shards",
    "asking",
    "wait",
    // Sentinel: is the server the Sentinels name the primary?
    "role",
];

/// Fewest bytes the secret may have: every role's password derives from
/// it, and role names are public (`GET /health` lists them).
pub const MIN_SECRET_BYTES: usize = 16;

/// The secret from `ROLEHOST_ACL_SECRET`; refused when unset, empty (as an
/// undefined variable in a compose file leaves it) or shorter than
/// [`MIN_SECRET_BYTES`], since anyone could then work out the passwords.
pub fn secret() -> anyhow::Result<String> {
    let secret = std::env::var(SECRET_ENV)
        .map_err(|_| anyhow::anyhow!("ACL users need the secret role passwords derive from in {SECRET_ENV}"))?;
    checked_secret(secret)
}

fn checked_secret(secret: String) -> anyhow::Result<String> {
    if secret.len() < MIN_SECRET_BYTES {
        anyhow::bail!(
            "{SECRET_ENV} has {} bytes; it must have at least {MIN_SECRET_BYTES} (a random string), \
             as every role's Redis password derives from it",
            secret.len()
        );
    }
    Ok(secret)
}

/// The Redis user name of a role.
pub fn user(role: &str) -> String {
    format!("rolehost-{role}")
}

/// The password of a role's user: HMAC-SHA256(secret, role), in hex.
pub fn password(secret: &str, role: &str) -> String {
    hex(&hmac_sha256(secret.as_bytes(), role.as_bytes()))
}

/// The ACL key pattern of a role's own keys, `~{prefix}{role}:*`.
pub fn own_keys(global_prefix: &str, role: &str) -> String {
    format!("~{}*", glob::escape(&format!("{global_prefix}{role}:")))
}

/// The arguments of `ACL SETUSER` for a role: reset, enable, set the
/// password hash, allow its own keys and granted namespaces, and only the
/// state API's commands.
pub fn setuser_args(global_prefix: &str, role: &str, grants: &Grants, secret: &str) -> Vec<String> {
    let mut args = vec![user(role), "reset".into(), "on".into()];
    args.push(format!("#{}", hex(&Sha256::digest(password(secret, role)))));
    args.push(own_keys(global_prefix, role));
    for (name, access) in &grants.namespaces {
        let keys = format!("{}*", glob::escape(&format!("{global_prefix}@{name}:")));
        args.push(match access {
            Access::Read => format!("%R~{keys}"),
            Access::ReadWrite => format!("~{keys}"),
        });
    }
    args.push("resetchannels".into());
    args.push("-@all".into());
    args.extend(COMMANDS.iter().map(|c| format!("+{c}")));
    args
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block = [0u8; BLOCK];
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of `bytes` in lower-case hex, as role pins are written.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // RFC 4231, test case 2.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(hex(&mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn short_or_empty_secrets_are_refused() {
        for short in ["", "s3cret", "fifteen bytes.."] {
            let error = checked_secret(short.into()).unwrap_err().to_string();
            assert!(error.contains(&format!("has {} bytes", short.len())), "{error}");
        }
        assert_eq!(checked_secret("sixteen bytes..!".into()).unwrap(), "sixteen bytes..!");
    }

    #[test]
    fn rules_confine_each_role() {
        let grants = Grants {
            namespaces: [("public".to_owned(), Access::Read), ("jobs".to_owned(), Access::ReadWrite)].into(),
            ..Grants::default()
        };
        let args = setuser_args("app[1]:", "counter", &grants, "s3cret");
        assert_eq!(args[0], "rolehost-counter");
        assert!(args.contains(&"~app\\[1\\]:counter:*".to_owned()), "{args:?}");
        assert!(args.contains(&"%R~app\\[1\\]:@public:*".to_owned()), "{args:?}");
        assert!(args.contains(&"~app\\[1\\]:@jobs:*".to_owned()), "{args:?}");
        assert!(!args.iter().any(|a| a.contains(&password("s3cret", "counter"))), "no plain password");
        assert_ne!(password("s3cret", "counter"), password("s3cret", "other"));
    }
}
