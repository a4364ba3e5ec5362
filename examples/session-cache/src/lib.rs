//! A session cache (cache-aside, as in seed 001). Requests are JSON:
//!
//! - `{"op":"put","id":"s1","session":{…},"ttl_ms":60000}` → `{"stored":true}`
//! - `{"op":"get","id":"s1"}` → `{"session":{…}}` or `{"session":null}`
//! - `{"op":"delete","id":"s1"}` → `{"deleted":true}`
//! - `{"op":"fetch","id":"s1"}` → the cached session, or one "loaded from the
//!   origin" and cached for 5 minutes: `{"session":{…},"cached":false}`

use std::time::Duration;

use rolehost_guest::{export_role, from_json, log, to_json, Bucket, Result, Role};
use serde::Deserialize;
use serde_json::{json, Value};

const ORIGIN_TTL: Duration = Duration::from_secs(300);

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
enum Request {
    Put { id: String, session: Value, ttl_ms: Option<u64> },
    Get { id: String },
    Delete { id: String },
    Fetch { id: String },
}

fn key(id: &str) -> String {
    format!("session:{id}")
}

struct SessionCache;

impl Role for SessionCache {
    fn handle(request: Vec<u8>) -> Result<Vec<u8>> {
        let bucket = Bucket::own()?;
        let response = match from_json(&request)? {
            Request::Put { id, session, ttl_ms } => {
                bucket.set_json(&key(&id), &session, ttl_ms.map(Duration::from_millis))?;
                json!({ "stored": true })
            }
            Request::Get { id } => json!({ "session": bucket.get_json::<Value>(&key(&id))? }),
            Request::Delete { id } => json!({ "deleted": bucket.delete(&key(&id))? }),
            Request::Fetch { id } => match bucket.get_json::<Value>(&key(&id))? {
                Some(session) => json!({ "session": session, "cached": true }),
                None => {
                    log::info(&format!("cache miss for session {id}; loading from origin"));
                    let session = json!({ "id": id, "user": format!("user-of-{id}") });
                    bucket.set_json(&key(&id), &session, Some(ORIGIN_TTL))?;
                    json!({ "session": session, "cached": false })
                }
            },
        };
        to_json(&response)
    }
}

export_role!(SessionCache);
