//! Cross-language conformance: the Rust, JavaScript and Python versions of
//! `counter`, `session-cache` and `profile` (and the C `counter`) get the
//! same requests on the same backend and must give the same responses, leave
//! the same keys (under their own prefixes), the same stored bytes and the
//! same kinds of TTL.
//!
//! Each language's role is loaded under its own name (`counter-rust`,
//! `counter-js`, …), so each has its own prefix; key sets are compared with
//! the prefix stripped. Without node, python3 or clang (`cargo xtask build`
//! then skips those roles) a language is skipped with a message, except
//! under `CI=true`, where its missing component fails the test.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rolehost::backend::{Backend, Expiry, MemoryBackend};
use rolehost::{CallError, Host};
use rolehost_tests::{cached_host, in_ci, shared_redis, unique, RedisServer};
use serde_json::{json, Value};

/// Languages: name, component suffix, and the roles written in it. Rust is
/// the reference.
const LANGUAGES: &[(&str, &str, &[&str])] =
    &[("rust", "", ROLES), ("js", "-js", ROLES), ("py", "-py", ROLES), ("c", "-c", &["counter"])];
const ROLES: &[&str] = &["counter", "session-cache", "profile"];

/// For each role, the languages whose component is built: (language, component file).
fn built() -> Vec<(&'static str, Vec<(&'static str, String)>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/roles");
    ROLES
        .iter()
        .map(|role| {
            let langs = LANGUAGES
                .iter()
                .filter(|(_, _, roles)| roles.contains(role))
                .filter_map(|(lang, suffix, _)| {
                    let file = format!("{role}{suffix}");
                    if dir.join(format!("{file}.wasm")).exists() {
                        return Some((*lang, file));
                    }
                    let message =
                        format!("{file}.wasm is missing; run `cargo xtask build` (needs node, python3, clang)");
                    assert!(!in_ci() && *lang != "rust", "{message}");
                    eprintln!("skipping {lang}: {message}");
                    None
                })
                .collect();
            (*role, langs)
        })
        .collect()
}

/// One request: a JSON body, or raw bytes when it is not valid JSON on purpose.
enum Body {
    Json(Value),
    Raw(&'static str),
}

impl Body {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Body::Json(value) => value.to_string().into_bytes(),
            Body::Raw(text) => text.as_bytes().to_vec(),
        }
    }
}

fn requests(role: &str) -> Vec<Body> {
    use Body::{Json, Raw};
    match role {
        "counter" => vec![Raw(""), Raw(""), Raw("anything"), Raw("")],
        "session-cache" => vec![
            Raw(
                r#"{"op":"put","id":"s1","session":{"name":"Ada","tags":["x","y"],"n":1.0,"big":12345678901234567890,"z":null,"é":"ü","a":{"b":[true,false]}},"ttl_ms":60000}"#,
            ),
            Json(json!({"op":"get","id":"s1"})),
            // Numbers and strings must be stored and printed as serde_json does.
            Raw(
                r#"{"op":"put","id":"s2","session":[1e21,0.1,-0.0,1e-7,100,1E2,0.00001,123456789012345678901,-9223372036854775809,"q\"b\\n\n\u0001é😀",0.9999999999999999,2.2250738585072014e-308,-0],"ttl_ms":null}"#,
            ),
            Json(json!({"op":"get","id":"s2"})),
            Json(json!({"op":"fetch","id":"s3"})),
            Json(json!({"op":"fetch","id":"s3"})),
            // A stored JSON null is a value, not a miss.
            Json(json!({"op":"put","id":"s6","session":null})),
            Json(json!({"op":"fetch","id":"s6"})),
            Json(json!({"op":"fetch","id":"s1"})),
            Json(json!(["get", "s3"])),
            Json(json!({"op":"put","id":"s4","session":{"k":"v"},"extra":"ignored"})),
            Json(json!({"op":"delete","id":"s2"})),
            Json(json!({"op":"delete","id":"s2"})),
            Json(json!({"op":"get","id":"s2"})),
            // Errors: from the host (same message) and from parsing the request.
            Json(json!({"op":"put","id":"s5","session":1,"ttl_ms":0})),
            Json(json!({"op":"get","id":"bad\u{1}id"})),
            Json(json!({"op":"put","id":"s5","session":1,"ttl_ms":1.5})),
            Json(json!({"op":"put","id":"s5","session":1,"ttl_ms":-1})),
            Json(json!({"op":"put","id":"s5"})),
            Json(json!({"op":"nope","id":"s5"})),
            Json(json!({"id":"s5"})),
            Json(json!({"op":"get","id":5})),
            Raw(r#"{"op":"get","id":"s1","id":"s2"}"#),
            Raw(r#"{"op":"get","id":"s1"} trailing"#),
            Raw(r#"{"op":"put","id":"s5","session":1e400}"#),
            Raw("not json"),
            Raw(""),
        ],
        "profile" => vec![
            Json(json!({"user":"u1"})),
            Json(json!({"user":"u1"})),
            Json(json!({"user":"u2","extra":true})),
            Json(json!(["u1"])),
            Json(json!({"user":""})),
            Json(json!({"user":"a\u{0}b"})),
            Json(json!({"user":5})),
            Json(json!({})),
            Json(json!("u1")),
            Raw("{"),
        ],
        other => panic!("no requests for {other}"),
    }
}

/// A response reduced to what must agree across languages. Messages of
/// request-parsing errors are each parser's own; only their kind and the
/// `bad JSON:` marker must agree.
fn outcome(role: &str, result: Result<Vec<u8>, CallError>) -> String {
    match result {
        Ok(body) => format!("ok {}", String::from_utf8(body).expect("UTF-8 response")),
        Err(CallError::Role { error, .. }) => {
            let text = error.to_string();
            if text.contains("bad JSON:") {
                format!("error {} bad JSON", error.kind())
            } else {
                format!("error {} {text}", error.kind())
            }
        }
        Err(other) => panic!("{role} failed outside its handler: {other}"),
    }
}

/// Every key of `role`, local part only, with its type of lifetime, and its
/// bytes for plain values.
#[derive(Debug, PartialEq)]
struct KeyState {
    lifetime: &'static str,
    value: Option<Vec<u8>>,
    fields: Vec<String>,
}

/// The TTL a role gave a key, rounded to the kind of expiry the role asked
/// for (timing makes exact remaining times differ).
fn lifetime(expiry: Expiry) -> &'static str {
    match expiry {
        Expiry::Missing => "missing",
        Expiry::Persistent => "persistent",
        Expiry::ExpiresIn(left) if left <= Duration::from_secs(60) => "expires within 60 s",
        Expiry::ExpiresIn(left) if left <= Duration::from_secs(300) => "expires within 300 s",
        Expiry::ExpiresIn(_) => "expires later",
    }
}

async fn key_states(backend: &Arc<dyn Backend>, full_keys: Vec<String>, prefix: &str) -> BTreeMap<String, KeyState> {
    let mut states = BTreeMap::new();
    for full in full_keys {
        let local = full.strip_prefix(prefix).expect("filtered by prefix").to_owned();
        let lifetime = lifetime(backend.expiry(&full).await.unwrap());
        // A subject is a hash; `last_login` holds the clock, so only field names compare.
        let (value, fields) = match backend.get(&full, None).await {
            Ok(value) => (value, Vec::new()),
            Err(_) => {
                let mut fields: Vec<String> = backend
                    .hash_get_all(&full, usize::MAX)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|(field, _)| field)
                    .collect();
                fields.sort();
                (None, fields)
            }
        };
        states.insert(local, KeyState { lifetime, value, fields });
    }
    states
}

/// Where the keys are read from: the backend's own listing (memory), or a
/// raw client on the real Redis database. Either holds only this test's keys.
enum Keys<'a> {
    Memory,
    Redis(&'a RedisServer, u32),
}

impl Keys<'_> {
    async fn all(&self, backend: &Arc<dyn Backend>) -> Vec<String> {
        match self {
            Keys::Memory => {
                let mut keys = Vec::new();
                let mut cursor = None;
                loop {
                    let page = backend.scan("*", cursor.as_deref(), 1000).await.unwrap();
                    keys.extend(page.keys);
                    match page.cursor {
                        Some(next) => cursor = Some(next),
                        None => return keys,
                    }
                }
            }
            Keys::Redis(server, db) => server.all_keys(*db),
        }
    }
}

/// Loading the big JS and Python components: one test at a time, so the
/// first fills the compile cache and the other reads it.
static LOADING: Mutex<()> = Mutex::new(());

async fn languages_agree(backend: Arc<dyn Backend>, keys: Keys<'_>) {
    let built = built();
    let global = unique("conformance");
    let specs: Vec<(String, String)> = built
        .iter()
        .flat_map(|(role, langs)| langs.iter().map(move |(lang, file)| (format!("{role}-{lang}"), file.clone())))
        .collect();
    let host: Host = {
        let _one_at_a_time = LOADING.lock().unwrap_or_else(|e| e.into_inner());
        let roles: Vec<(&str, &str)> = specs.iter().map(|(name, file)| (name.as_str(), file.as_str())).collect();
        cached_host(backend.clone(), &global, &roles)
    };

    for (role, langs) in &built {
        let mut reference: Option<(Vec<String>, BTreeMap<String, KeyState>)> = None;
        for (lang, _) in langs {
            let name = format!("{role}-{lang}");
            let mut outcomes = Vec::new();
            for request in requests(role) {
                outcomes.push(outcome(&name, host.call(&name, &request.bytes()).await));
            }
            let prefix = format!("{global}{name}:");
            let mine = keys.all(&backend).await.into_iter().filter(|k| k.starts_with(&prefix)).collect();
            let states = key_states(&backend, mine, &prefix).await;
            assert!(!states.is_empty(), "{name} left no keys");
            match &reference {
                None => {
                    // The reference itself must do its job, or agreeing proves nothing.
                    let expected: &[&str] = match *role {
                        "counter" => &["ok 1", "ok 2", "ok 3", "ok 4"],
                        "session-cache" => &["ok {\"stored\":true}"],
                        _ => &["ok 1", "ok 2", "ok 1", "ok 3"],
                    };
                    assert_eq!(&outcomes[..expected.len()], expected, "{name}");
                    reference = Some((outcomes, states));
                }
                Some((want_outcomes, want_states)) => {
                    assert_eq!(outcomes.len(), want_outcomes.len());
                    for (i, (got, want)) in outcomes.iter().zip(want_outcomes).enumerate() {
                        assert_eq!(got, want, "{name}: response {i} differs from the Rust role's");
                    }
                    assert_eq!(&states, want_states, "{name}: keys differ from the Rust role's");
                }
            }
        }
    }
    // Isolation: no role wrote anywhere but under its own prefix.
    let prefixes: Vec<String> = specs.iter().map(|(name, _)| format!("{global}{name}:")).collect();
    for key in keys.all(&backend).await {
        assert!(prefixes.iter().any(|p| key.starts_with(p.as_str())), "{key} is outside every role's prefix");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn languages_agree_on_memory() {
    languages_agree(Arc::new(MemoryBackend::new()), Keys::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn languages_agree_on_redis() {
    let Some(server) = shared_redis() else { return };
    let db = server.fresh_db();
    languages_agree(server.backend(db), Keys::Redis(server, db)).await;
}

/// What no request can carry (JSON has no NaN or infinities) but a role can
/// compute: the JavaScript and Python helpers write them as serde_json does
/// (`null`), and read `-0` as serde_json does (the float -0.0).
#[test]
fn js_and_python_json_helpers_match_serde_json_where_requests_cannot_reach() {
    let expected = serde_json::to_string(&json!([f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1.5])).unwrap();
    assert_eq!(expected, "[null,null,null,1.5]");
    let minus_zero = serde_json::to_string(&serde_json::from_str::<Value>("-0").unwrap()).unwrap();
    assert_eq!(minus_zero, "-0.0");
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let js = format!(
        "import {{ stringify, parse, JsonFloat }} from '{}';\n\
         const f = (x) => new JsonFloat(x);\n\
         console.log(stringify([f(NaN), f(Infinity), f(-Infinity), 1.5]));\n\
         console.log(stringify(parse(new TextEncoder().encode('-0'))));",
        examples.join("js/lib/json.js").display()
    );
    // The Python helper's imports of the guest bindings, stubbed.
    let py = format!(
        "import sys, types\n\
         class Stub(types.ModuleType):\n\
         \x20   def __getattr__(self, name): return Stub(name)\n\
         \x20   def __call__(self, *args): return Exception(*args)\n\
         for name in ['componentize_py_types', 'wit_world', 'wit_world.imports']:\n\
         \x20   sys.modules[name] = Stub(name)\n\
         sys.path.insert(0, '{}')\n\
         import rolehost_role as r\n\
         print(r.dumps([float('nan'), float('inf'), float('-inf'), 1.5]))\n\
         print(r.dumps(r.parse(b'-0')))",
        examples.join("python/lib").display()
    );
    for (tool, args) in [("node", &["--input-type=module", "-e", js.as_str()][..]), ("python3", &["-c", py.as_str()])] {
        let output = match std::process::Command::new(tool).args(args).output() {
            Ok(output) => output,
            Err(e) if !in_ci() => {
                eprintln!("skipping {tool}: {e}");
                continue;
            }
            Err(e) => panic!("{tool}: {e}"),
        };
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{tool}: {}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(stdout.lines().collect::<Vec<_>>(), [expected.as_str(), minus_zero.as_str()], "{tool}");
    }
}
