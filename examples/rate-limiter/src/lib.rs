//! Seed 000's API rate limiter on the `limits` interface. A call with
//! `{"client":"c1"}` (optionally `"limit"`, default 10, and `"window_ms"`,
//! default 60000) answers `{"result":"allowed","remaining":9,…}` or
//! `{"result":"denied","remaining":0,"retry_after_ms":…}`.

use std::time::Duration;

use rolehost_guest::{export_role, from_json, rate_limit, to_json, Result, Role};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct Request {
    client: String,
    #[serde(default = "default_limit")]
    limit: u64,
    #[serde(default = "default_window")]
    window_ms: u64,
}

fn default_limit() -> u64 {
    10
}

fn default_window() -> u64 {
    60_000
}

struct RateLimiter;

impl Role for RateLimiter {
    fn handle(request: Vec<u8>) -> Result<Vec<u8>> {
        let request: Request = from_json(&request)?;
        let decision =
            rate_limit(&format!("api:{}", request.client), request.limit, Duration::from_millis(request.window_ms), 1)?;
        to_json(&json!({
            "result": if decision.allowed { "allowed" } else { "denied" },
            "remaining": decision.remaining,
            "retry_after_ms": decision.retry_after.as_millis() as u64,
            "reset_after_ms": decision.reset_after.as_millis() as u64,
        }))
    }
}

export_role!(RateLimiter);
