//! `rolehost:state/limits`: GCRA rate limits at `{prefix}{identity}:rate:{key}`.

use std::time::Duration;

use super::CallCtx;
use crate::bindings::limits::{Decision, Host};
use crate::error::{StateError, StateResult};
use crate::namespace::Space;

/// Longest window: a year.
const MAX_WINDOW_MS: u64 = 365 * 24 * 3600 * 1000;

impl Host for CallCtx {
    async fn check(
        &mut self,
        namespace: String,
        key: String,
        limit: u64,
        window_ms: u64,
        cost: u64,
    ) -> StateResult<Decision> {
        self.charge(1)?;
        let key = self.namespace(&namespace, cost > 0)?.key(Space::Rate, &key)?;
        if limit == 0 || limit > u32::MAX as u64 {
            return Err(StateError::InvalidArgument(format!("limit must be 1 to {}", u32::MAX)));
        }
        if window_ms == 0 || window_ms > MAX_WINDOW_MS {
            return Err(StateError::InvalidArgument(format!("window must be 1 to {MAX_WINDOW_MS} ms")));
        }
        // A unit costs a whole number of microseconds, ceil(window / limit):
        // refused where that would make the rate more than 1 % slower.
        let window_us = window_ms * 1000;
        if window_us.div_ceil(limit) * limit > window_us + window_us / 100 {
            return Err(StateError::InvalidArgument(format!(
                "{limit} per {window_ms} ms is finer than rolehost counts (a unit takes a whole microsecond, \
                 so the rate would be more than 1 % off); use a longer window or larger units"
            )));
        }
        if cost > limit {
            return Err(StateError::InvalidArgument(format!(
                "cost {cost} is over the limit {limit}; it could never pass"
            )));
        }
        let decision = self.backend.rate_check(&key, limit, Duration::from_millis(window_ms), cost).await?;
        Ok(Decision {
            allowed: decision.allowed,
            remaining: decision.remaining,
            reset_after_ms: decision.reset_after.as_millis() as u64,
            retry_after_ms: decision.retry_after.as_millis().max(u128::from(!decision.allowed)) as u64,
        })
    }
}
