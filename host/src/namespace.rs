//! Role identity → key prefix. The only place that builds full keys.
//!
//! Every key rolehost writes is `{global_prefix}{identity}:{space}:{key}`.
//! An identity is `[a-z0-9][a-z0-9_-]{0,62}`, so it never holds `:` and the
//! first `:` after the global prefix ends it: no two roles share a prefix.
//! Guest patterns are appended to the glob-escaped prefix, so they can only
//! match the role's own keys.

use crate::error::{shown, StateError, StateResult};
use crate::glob;
pub use crate::glob::escape as escape_glob;
use crate::limits::RoleLimits;

/// Longest global prefix, in bytes.
const MAX_GLOBAL_PREFIX_BYTES: usize = 64;
/// Longest identity, in bytes.
const MAX_IDENTITY_BYTES: usize = 63;

/// Which kind of state a key belongs to; each has its own part of the prefix
/// so kinds cannot collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// `kv` and `atomics` keys.
    Kv,
    /// Subject hashes (`subjects`).
    Subject,
    /// Lock keys (`locks`).
    Lock,
    /// Fencing-token counters of locks.
    Fence,
    /// Rate limiter state (`limits`).
    Rate,
}

impl Space {
    fn tag(self) -> &'static str {
        match self {
            Space::Kv => "kv",
            Space::Subject => "s",
            Space::Lock => "lock",
            Space::Fence => "fence",
            Space::Rate => "rate",
        }
    }
}

/// Checks a role identity: `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn validate_identity(identity: &str) -> Result<(), String> {
    let bytes = identity.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_IDENTITY_BYTES
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid role name {identity:?}: use 1 to {MAX_IDENTITY_BYTES} characters of a-z, 0-9, `_` and `-`, starting with a letter or digit"
        ))
    }
}

/// Checks a deployment's global prefix: at most 64 bytes, no control
/// characters, no whitespace, no braces (they would start a Redis Cluster
/// hash tag and decide every key's slot).
pub fn validate_global_prefix(prefix: &str) -> Result<(), String> {
    if prefix.len() > MAX_GLOBAL_PREFIX_BYTES
        || prefix.chars().any(|c| c.is_control() || c.is_whitespace() || c == '{' || c == '}')
    {
        return Err(format!(
            "invalid global prefix {prefix:?}: at most {MAX_GLOBAL_PREFIX_BYTES} bytes, no spaces, braces or control characters"
        ));
    }
    Ok(())
}

/// One role's part of the key space.
#[derive(Debug, Clone)]
pub struct Namespace {
    /// `{global_prefix}{identity}:`
    prefix: String,
    max_key_bytes: usize,
}

impl Namespace {
    /// The namespace of `identity` under `global_prefix`. Both must already
    /// be valid ([`validate_identity`], [`validate_global_prefix`]).
    pub fn new(global_prefix: &str, identity: &str, limits: &RoleLimits) -> Self {
        debug_assert!(validate_identity(identity).is_ok());
        Self { prefix: format!("{global_prefix}{identity}:"), max_key_bytes: limits.max_key_bytes }
    }

    /// The shared namespace `name` (same rule as identities), at
    /// `{global_prefix}@{name}:`. `@` never starts an identity, so shared
    /// data can never land under a role's prefix.
    pub fn shared(global_prefix: &str, name: &str, limits: &RoleLimits) -> Self {
        debug_assert!(validate_identity(name).is_ok());
        Self { prefix: format!("{global_prefix}@{name}:"), max_key_bytes: limits.max_key_bytes }
    }

    /// `{global_prefix}{identity}:` or `{global_prefix}@{name}:`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The prefix every key of `space` starts with.
    pub fn space_prefix(&self, space: Space) -> String {
        self.space_prefix_with_room(space, 0)
    }

    /// [`Self::space_prefix`] in a string with room for `more` bytes after
    /// it, built in one allocation: every state operation makes one.
    fn space_prefix_with_room(&self, space: Space, more: usize) -> String {
        let tag = space.tag();
        let mut prefix = String::with_capacity(self.prefix.len() + tag.len() + 1 + more);
        prefix.extend([self.prefix.as_str(), tag, ":"]);
        prefix
    }

    /// The full key for a guest's local `key`, after checking it: not empty,
    /// at most the role's key limit, no control characters.
    pub fn key(&self, space: Space, key: &str) -> StateResult<String> {
        self.check_name("key", key)?;
        // One script changes a lock and its fencing counter, so on a Redis
        // Cluster both must hash to one slot: the name in braces is their
        // hash tag. Everything after the first `{` is the same in both keys,
        // so they share a slot whatever the name holds, unless the tag is
        // empty (a name starting with `}`).
        let braced = matches!(space, Space::Lock | Space::Fence);
        if braced && key.starts_with('}') {
            return Err(StateError::InvalidKey(format!("lock name {} starts with `}}`", shown(key))));
        }
        let mut full = self.space_prefix_with_room(space, key.len() + 2);
        match braced {
            true => full.extend(["{", key, "}"]),
            false => full.push_str(key),
        }
        Ok(full)
    }

    /// Checks a guest-given name (a key, a subject property): not empty, at
    /// most the role's key limit, no control characters.
    pub fn check_name(&self, what: &str, name: &str) -> StateResult<()> {
        if name.is_empty() {
            return Err(StateError::InvalidKey(format!("empty {what}")));
        }
        if name.len() > self.max_key_bytes {
            return Err(StateError::InvalidKey(format!(
                "{what} {} is longer than {} bytes",
                shown(name),
                self.max_key_bytes
            )));
        }
        if name.chars().any(char::is_control) {
            return Err(StateError::InvalidKey(format!("{what} {} contains a control character", shown(name))));
        }
        Ok(())
    }

    /// A glob pattern confined to the space: the escaped prefix followed by
    /// the guest's pattern over local keys (none: every key).
    pub fn pattern(&self, space: Space, local: Option<&str>) -> StateResult<String> {
        let local = local.unwrap_or("*");
        // Room for any key with its glob characters escaped, then a `*`
        // (a prefix search for the longest key).
        let most = 2 * self.max_key_bytes + 1;
        if local.len() > most {
            return Err(StateError::InvalidKey(format!(
                "pattern is longer than {most} bytes (twice max-key-bytes and one)"
            )));
        }
        glob::validate(local)?;
        Ok(format!("{}{local}", glob::escape(&self.space_prefix(space))))
    }

    /// The local part of a full key of this space; none for a key outside it.
    pub fn local<'a>(&self, space: Space, full: &'a str) -> Option<&'a str> {
        let local = full.strip_prefix(&self.prefix)?.strip_prefix(space.tag())?.strip_prefix(':')?;
        match space {
            Space::Lock | Space::Fence => local.strip_prefix('{')?.strip_suffix('}'),
            Space::Kv | Space::Subject | Space::Rate => Some(local),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(identity: &str) -> Namespace {
        Namespace::new("app[1]:", identity, &RoleLimits::default())
    }

    #[test]
    fn keys_carry_the_documented_prefix() {
        assert_eq!(ns("counter").key(Space::Kv, "count").unwrap(), "app[1]:counter:kv:count");
        let full = ns("counter").key(Space::Kv, "a:b*").unwrap();
        assert_eq!(ns("counter").local(Space::Kv, &full), Some("a:b*"));
        assert_eq!(ns("other").local(Space::Kv, &full), None);
    }

    #[test]
    fn patterns_stay_inside_the_prefix() {
        let a = ns("a");
        for local in ["*", "*:*", "[a-z]*", "\\*", "..", "b:kv:*"] {
            let pattern = a.pattern(Space::Kv, Some(local)).unwrap();
            assert!(pattern.starts_with("app\\[1\\]:a:kv:"), "{pattern}");
            assert!(!glob::matches(&pattern, "app[1]:b:kv:x"));
            assert!(!glob::matches(&pattern, "app1:a:kv:x"));
        }
        assert!(glob::matches(&a.pattern(Space::Kv, None).unwrap(), "app[1]:a:kv:x"));
    }

    /// A prefix search for the longest key, every character of it a glob
    /// character to escape, fits; longer patterns do not.
    #[test]
    fn a_pattern_has_room_for_an_escaped_key_and_a_star() {
        let limits = RoleLimits { max_key_bytes: 8, ..RoleLimits::default() };
        let a = Namespace::new("t:", "a", &limits);
        let longest = format!("{}*", glob::escape("********"));
        assert_eq!(longest.len(), 17);
        assert!(a.pattern(Space::Kv, Some(&longest)).is_ok());
        let error = a.pattern(Space::Kv, Some(&format!("{longest}x"))).unwrap_err();
        assert_eq!(error.kind(), "invalid-key", "{error}");
    }

    #[test]
    fn a_lock_and_its_fence_share_a_hash_tag() {
        let a = ns("a");
        for name in ["job", "a}b", "{x}", "{}", "*"] {
            let (lock, fence) = (a.key(Space::Lock, name).unwrap(), a.key(Space::Fence, name).unwrap());
            assert_eq!(lock, format!("app[1]:a:lock:{{{name}}}"));
            let tag = |key: &str| key[key.find('{').unwrap()..].split('}').next().unwrap().to_owned();
            assert_eq!(tag(&lock), tag(&fence), "{name}");
            assert_eq!(a.local(Space::Lock, &lock), Some(name));
            assert_eq!(a.local(Space::Fence, &fence), Some(name));
        }
        assert!(matches!(a.key(Space::Lock, "}{"), Err(StateError::InvalidKey(_))), "an empty hash tag");
        assert!(validate_global_prefix("app{1}:").is_err());
    }

    #[test]
    fn bad_keys_are_refused() {
        let a = ns("a");
        assert!(matches!(a.key(Space::Kv, ""), Err(StateError::InvalidKey(_))));
        assert!(matches!(a.key(Space::Kv, "x\ny"), Err(StateError::InvalidKey(_))));
        let long = "k".repeat(1 << 20);
        let err = a.key(Space::Kv, &long).unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
    }

    #[test]
    fn identities_follow_the_rule() {
        for good in ["a", "counter", "session-cache", "r2_d2", "0abc"] {
            validate_identity(good).unwrap();
        }
        for bad in ["", "Counter", "-a", "a:b", "a*", "a.b", &"a".repeat(64)] {
            assert!(validate_identity(bad).is_err(), "{bad:?}");
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Strings rich in glob metacharacters, separators and odd bytes.
        fn nasty() -> impl Strategy<Value = String> {
            prop::string::string_regex("[a-c*?\\[\\]\\\\:^!@./ \u{0}-\u{2}é-]{0,24}").unwrap()
        }

        proptest! {
            #[test]
            fn a_key_never_leaves_its_prefix(key in nasty(), other in "[a-z][a-z0-9_-]{0,8}") {
                let a = ns("alice");
                if let Ok(full) = a.key(Space::Kv, &key) {
                    prop_assert!(full.starts_with("app[1]:alice:kv:"));
                    prop_assert_eq!(a.local(Space::Kv, &full), Some(key.as_str()));
                    if other != "alice" {
                        prop_assert_eq!(ns(&other).local(Space::Kv, &full), None);
                    }
                }
            }

            #[test]
            fn a_pattern_never_matches_outside_its_prefix(
                pattern in nasty(),
                other in "[a-z][a-z0-9_-]{0,8}",
                rest in nasty(),
                stray in nasty(),
            ) {
                let a = ns("alice");
                if let Ok(full) = a.pattern(Space::Kv, Some(&pattern)) {
                    prop_assert!(glob::literal_prefix(&full).starts_with("app[1]:alice:kv:"));
                    if other != "alice" {
                        let foreign = format!("app[1]:{other}:kv:{rest}");
                        prop_assert!(!glob::matches(&full, &foreign), "{} matched {}", full, foreign);
                    }
                    for space in [Space::Subject, Space::Lock, Space::Fence, Space::Rate] {
                        let elsewhere = a.space_prefix(space) + &rest;
                        prop_assert!(!glob::matches(&full, &elsewhere));
                    }
                    if !stray.starts_with("app[1]:alice:kv:") {
                        prop_assert!(!glob::matches(&full, &stray));
                    }
                    let shared = Namespace::shared("app[1]:", "alice", &RoleLimits::default());
                    let shared_key = format!("{}kv:{rest}", shared.prefix());
                    prop_assert!(!glob::matches(&full, &shared_key));
                }
            }
        }
    }
}
