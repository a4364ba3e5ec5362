//! Which failed Redis operations are tried again, and how long to pause
//! between tries: exponential backoff with jitter, always inside the
//! operation's deadline (the caller checks it).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};

/// The first pause; doubled after each try.
const BASE: Duration = Duration::from_millis(5);
/// The longest pause, so a Redis that comes back is noticed quickly.
const CAP: Duration = Duration::from_millis(250);

/// How an operation may be repeated after a transient failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    /// Reads (GET, MGET, EXISTS, PTTL, HGET, HGETALL, SCAN, INFO): retried.
    Read,
    /// Writes whose repetition leaves the same state (SET with a value,
    /// MULTI/EXEC of SETs, HSET/HDEL, DEL, PEXPIRE, persist): retried.
    Idempotent,
    /// Writes whose repetition would change the outcome (INCRBY, HINCRBY,
    /// GETDEL, SET NX, compare-and-swap, lock acquire, rate checks): retried
    /// only when Redis certainly did not run them.
    Once,
}

impl Op {
    /// Whether the operation writes (and so waits for replicas when asked).
    pub(super) fn writes(self) -> bool {
        self != Op::Read
    }
}

/// Whether `error` is worth another try of an `op`.
pub(super) fn may_retry(op: Op, error: &RedisError) -> bool {
    match op {
        Op::Read | Op::Idempotent => is_transient(error),
        Op::Once => not_run(error),
    }
}

/// Whether `error` may pass by itself: the command did not run, or its
/// reply was lost on the way. Such errors are `unavailable`.
pub(super) fn is_transient(error: &RedisError) -> bool {
    // Lost on the way: the command may or may not have run.
    not_run(error) || error.is_io_error() || error.is_timeout() || error.is_connection_dropped()
}

/// Whether Redis certainly did not run the command.
pub(super) fn not_run(error: &RedisError) -> bool {
    // Refused before running: no connection, no primary known yet, the
    // server said so, or a Cluster node sent it elsewhere (the slot moved).
    // A transaction is refused whole (EXECABORT) when each of its commands
    // was.
    let kind = match error.kind() {
        ErrorKind::Server(kind) => Some(kind),
        _ => None,
    };
    error.is_connection_refusal()
        || matches!(error.kind(), ErrorKind::MasterNameNotFoundBySentinel | ErrorKind::ClusterConnectionNotFound)
        || server_refused(kind, error.code())
        || error.clone().into_server_errors().is_some_and(|errors| {
            !errors.is_empty() && errors.iter().all(|(_, e)| server_refused(e.kind(), Some(e.code())))
        })
}

/// Whether a server error says the command was not run and may pass: the
/// server is loading its data, busy with a script (`BUSY`), unable to
/// persist (`MISCONF`) or short of replicas (`NOREPLICAS`), not the primary
/// (any more), or a Cluster slot is elsewhere or down.
fn server_refused(kind: Option<ServerErrorKind>, code: Option<&str>) -> bool {
    matches!(
        kind,
        Some(
            ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly
                | ServerErrorKind::Moved
                | ServerErrorKind::Ask
        )
    ) || matches!(code, Some("BUSY" | "MISCONF" | "NOREPLICAS"))
}

/// Whether the server (or any command of a transaction) said it is no
/// longer the primary: its connection should be made again.
pub(super) fn not_primary(error: &RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
        || error
            .clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, e)| e.kind() == Some(ServerErrorKind::ReadOnly)))
}

/// The pause before try number `attempt + 2`: a random point in the upper
/// half of `min(CAP, BASE * 2^attempt)`, so hosts retrying together spread out.
pub(super) fn backoff(attempt: u32) -> Duration {
    let ceiling = BASE.saturating_mul(1 << attempt.min(16)).min(CAP);
    let half = ceiling / 2;
    half + half.mul_f64(unit_random())
}

/// A number in [0, 1): `RandomState` is seeded afresh for each call, which
/// is random enough for jitter and needs no extra dependency.
fn unit_random() -> f64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u8(0);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        for attempt in 0..20 {
            let ceiling = BASE.saturating_mul(1 << attempt.min(16)).min(CAP);
            let pause = backoff(attempt);
            assert!(pause >= ceiling / 2 && pause <= ceiling, "attempt {attempt}: {pause:?}");
        }
        let pauses: std::collections::HashSet<_> = (0..50).map(|_| backoff(10)).collect();
        assert!(pauses.len() > 1, "no jitter");
    }

    #[test]
    fn only_safe_operations_are_retried_after_a_lost_reply() {
        let lost = RedisError::from(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"));
        let refused = RedisError::from(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"));
        let loading = RedisError::from((ErrorKind::Server(ServerErrorKind::BusyLoading), "loading"));
        let wrong_type = RedisError::from((ErrorKind::Server(ServerErrorKind::ResponseError), "WRONGTYPE"));
        for op in [Op::Read, Op::Idempotent] {
            assert!(may_retry(op, &lost) && may_retry(op, &refused) && may_retry(op, &loading));
            assert!(!may_retry(op, &wrong_type));
        }
        assert!(!may_retry(Op::Once, &lost), "an increment whose reply was lost must not run twice");
        assert!(may_retry(Op::Once, &refused) && may_retry(Op::Once, &loading));
        let moved =
            RedisError::from((ErrorKind::Server(ServerErrorKind::Moved), "MOVED", "3999 127.0.0.1:7001".into()));
        assert!(may_retry(Op::Once, &moved), "a redirected command did not run");
        assert!(!may_retry(Op::Once, &wrong_type));
    }
}
