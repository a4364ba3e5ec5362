//! Keeps JSON notes and lists them by prefix. Requests are JSON:
//!
//! - `{"op":"put","notes":{"id":{…},…}}` → `{"stored":N}` (one atomic set-many)
//! - `{"op":"get","ids":["a","b"]}` → `{"notes":[{…},null]}` (get-many)
//! - `{"op":"list","prefix":"2024-"}` → `{"notes":{"2024-01":{…},…}}` (list-keys)
//! - `{"op":"delete","ids":["a"]}` → `{"deleted":N}` (delete-many)

use std::collections::BTreeMap;

use rolehost_guest::{export_role, from_json, to_json, Bucket, Error, Result, Role};
use serde::Deserialize;
use serde_json::{json, Value};

const NOTE: &str = "note:";

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
enum Request {
    Put {
        notes: BTreeMap<String, Value>,
    },
    Get {
        ids: Vec<String>,
    },
    List {
        #[serde(default)]
        prefix: String,
    },
    Delete {
        ids: Vec<String>,
    },
}

fn decode(bytes: Option<Vec<u8>>) -> Result<Value> {
    match bytes {
        None => Ok(Value::Null),
        Some(bytes) => {
            serde_json::from_slice(&bytes).map_err(|e| Error::Internal(format!("stored note is not JSON: {e}")))
        }
    }
}

struct Notes;

impl Role for Notes {
    fn handle(request: Vec<u8>) -> Result<Vec<u8>> {
        let bucket = Bucket::own()?;
        let response = match from_json(&request)? {
            Request::Put { notes } => {
                let entries: Vec<(String, Vec<u8>)> = notes
                    .iter()
                    .map(|(id, note)| Ok((format!("{NOTE}{id}"), to_json(note)?)))
                    .collect::<Result<_>>()?;
                bucket.set_many(&entries, None)?;
                json!({ "stored": entries.len() })
            }
            Request::Get { ids } => {
                let keys: Vec<String> = ids.iter().map(|id| format!("{NOTE}{id}")).collect();
                let notes = bucket.get_many(&keys)?.into_iter().map(decode).collect::<Result<Vec<_>>>()?;
                json!({ "notes": notes })
            }
            Request::List { prefix } => {
                let mut notes = serde_json::Map::new();
                for (key, value) in bucket.get_by_prefix(&format!("{NOTE}{prefix}"))? {
                    notes.insert(key[NOTE.len()..].to_owned(), decode(Some(value))?);
                }
                json!({ "notes": notes })
            }
            Request::Delete { ids } => {
                let keys: Vec<String> = ids.iter().map(|id| format!("{NOTE}{id}")).collect();
                json!({ "deleted": bucket.delete_many(&keys)? })
            }
        };
        to_json(&response)
    }
}

export_role!(Notes);
