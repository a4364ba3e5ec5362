//! Records logins on user subjects (seed 002). A call with `{"user":"u1"}`
//! increments the default property `login_count` of subject `user-u1`
//! atomically, sets the extended property `last_login` (seconds since the
//! epoch) and answers with the new count as decimal digits.

use std::time::{SystemTime, UNIX_EPOCH};

use rolehost_guest::{export_role, from_json, Error, Kind, Result, Role, Subject};
use serde::Deserialize;

#[derive(Deserialize)]
struct Login {
    user: String,
}

struct Profile;

impl Role for Profile {
    fn handle(request: Vec<u8>) -> Result<Vec<u8>> {
        let login: Login = from_json(&request)?;
        if login.user.is_empty() {
            return Err(Error::InvalidArgument("user must not be empty".into()));
        }
        let subject = Subject::open(&format!("user-{}", login.user))?;
        let count = subject.increment(Kind::Default, "login_count", 1)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        subject.set_extended("last_login", &now)?;
        subject.store()?;
        Ok(count.to_string().into_bytes())
    }
}

export_role!(Profile);
