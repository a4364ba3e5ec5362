//! `rolehost:state/types`: the WIT error is our [`StateError`].

use crate::bindings::types::{self, Error};
use crate::error::StateError;
use crate::state::CallCtx;

impl types::Host for CallCtx {
    fn convert_error(&mut self, error: StateError) -> wasmtime::Result<Error> {
        Ok(error.into())
    }
}

impl From<StateError> for Error {
    fn from(error: StateError) -> Self {
        match error {
            StateError::InvalidKey(m) => Error::InvalidKey(m),
            StateError::InvalidArgument(m) => Error::InvalidArgument(m),
            StateError::TooLarge(m) => Error::TooLarge(m),
            StateError::AccessDenied(m) => Error::AccessDenied(m),
            StateError::QuotaExceeded(m) => Error::QuotaExceeded(m),
            StateError::Unavailable(m) => Error::Unavailable(m),
            StateError::Conflict(m) => Error::Conflict(m),
            StateError::Internal(m) => Error::Internal(m),
        }
    }
}

impl From<Error> for StateError {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidKey(m) => StateError::InvalidKey(m),
            Error::InvalidArgument(m) => StateError::InvalidArgument(m),
            Error::TooLarge(m) => StateError::TooLarge(m),
            Error::AccessDenied(m) => StateError::AccessDenied(m),
            Error::QuotaExceeded(m) => StateError::QuotaExceeded(m),
            Error::Unavailable(m) => StateError::Unavailable(m),
            Error::Conflict(m) => StateError::Conflict(m),
            Error::Internal(m) => StateError::Internal(m),
        }
    }
}
