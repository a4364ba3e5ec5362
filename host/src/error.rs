//! The one error type of the state API, and how it maps to the WIT `error`.

use std::fmt;

/// Why a state operation failed.
///
/// Each variant says what happened; [`StateError::is_retryable`] says whether
/// trying again later may help. Messages name only the caller's own local
/// keys, never a full key or another role's data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The key or pattern is empty, too long, or has a control character.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// Another argument is wrong (zero TTL, bad cursor, not an integer).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A key, value, batch or response is over the role's limit.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The namespace is not granted, or granted only for reading.
    #[error("access denied: {0}")]
    AccessDenied(String),
    /// A quota is used up.
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// The backend cannot be reached or did not answer in time.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// An optimistic update lost to concurrent writers too often.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A bug in the host or an unexpected backend answer.
    #[error("internal error: {0}")]
    Internal(String),
}

impl StateError {
    /// True when the same call may succeed later without any change.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::QuotaExceeded(_) | Self::Conflict(_))
    }

    /// The same error, its message prefixed with what it concerns.
    pub fn context(self, what: &str) -> Self {
        let prefixed = |message: String| format!("{what}: {message}");
        match self {
            Self::InvalidKey(m) => Self::InvalidKey(prefixed(m)),
            Self::InvalidArgument(m) => Self::InvalidArgument(prefixed(m)),
            Self::TooLarge(m) => Self::TooLarge(prefixed(m)),
            Self::AccessDenied(m) => Self::AccessDenied(prefixed(m)),
            Self::QuotaExceeded(m) => Self::QuotaExceeded(prefixed(m)),
            Self::Unavailable(m) => Self::Unavailable(prefixed(m)),
            Self::Conflict(m) => Self::Conflict(prefixed(m)),
            Self::Internal(m) => Self::Internal(prefixed(m)),
        }
    }

    /// The short name of the variant, as in the WIT (`invalid-key`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidKey(_) => "invalid-key",
            Self::InvalidArgument(_) => "invalid-argument",
            Self::TooLarge(_) => "too-large",
            Self::AccessDenied(_) => "access-denied",
            Self::QuotaExceeded(_) => "quota-exceeded",
            Self::Unavailable(_) => "unavailable",
            Self::Conflict(_) => "conflict",
            Self::Internal(_) => "internal",
        }
    }
}

/// Shorthand for results of state operations.
pub type StateResult<T> = Result<T, StateError>;

/// How a role call failed, as seen by whoever called the role.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No role of that name is loaded.
    #[error("unknown role `{0}`")]
    UnknownRole(String),
    /// The role or the host is running as many calls as it may; try later.
    #[error("role `{role}` is busy: {limit}")]
    Busy {
        /// The role's name.
        role: String,
        /// Which limit was reached, to raise it if need be.
        limit: String,
    },
    /// The role's handler returned an error.
    #[error("role `{role}` returned an error: {error}")]
    Role {
        /// The role's name.
        role: String,
        /// What the handler returned.
        error: StateError,
    },
    /// The role ran past its deadline and was stopped.
    #[error("role `{role}` ran past its deadline of {millis} ms")]
    DeadlineExceeded {
        /// The role's name.
        role: String,
        /// The deadline.
        millis: u64,
    },
    /// The role burned its fuel budget.
    #[error("role `{role}` ran out of its {fuel} units of fuel")]
    OutOfFuel {
        /// The role's name.
        role: String,
        /// The budget.
        fuel: u64,
    },
    /// The role tried to grow its memory past its limit and trapped.
    #[error("role `{role}` ran out of memory (limit {bytes} bytes)")]
    OutOfMemory {
        /// The role's name.
        role: String,
        /// The limit.
        bytes: usize,
    },
    /// The role trapped (panic, stack overflow, out of bounds, unreachable…).
    #[error("role `{role}` trapped: {message}")]
    Trap {
        /// The role's name.
        role: String,
        /// The trap and its wasm backtrace.
        message: String,
    },
}

impl CallError {
    /// A short, stable name for the kind of failure (for logs and metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::UnknownRole(_) => "unknown-role",
            Self::Busy { .. } => "busy",
            Self::Role { .. } => "role-error",
            Self::DeadlineExceeded { .. } => "deadline",
            Self::OutOfFuel { .. } => "out-of-fuel",
            Self::OutOfMemory { .. } => "out-of-memory",
            Self::Trap { .. } => "trap",
        }
    }
}

/// Shortens a key for an error message so a huge key does not make a huge error.
pub(crate) fn shown(key: &str) -> impl fmt::Display + '_ {
    struct Shown<'a>(&'a str);
    impl fmt::Display for Shown<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            const MAX: usize = 64;
            if self.0.len() <= MAX {
                write!(f, "{:?}", self.0)
            } else {
                let mut end = MAX;
                while !self.0.is_char_boundary(end) {
                    end -= 1;
                }
                write!(f, "{:?}… ({} bytes)", &self.0[..end], self.0.len())
            }
        }
    }
    Shown(key)
}
