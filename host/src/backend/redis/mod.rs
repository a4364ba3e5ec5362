//! The Redis backend: one shared, reconnecting multiplexed connection (one
//! per Cluster node), so concurrent calls pipeline on one socket. Atomics
//! are single commands or Lua scripts; batches go out as one MULTI/EXEC
//! pipeline. [`connection`] reaches standalone, Sentinel and Cluster
//! deployments, [`cluster`] holds what is particular to a Cluster;
//! [`coalesce`] gathers concurrent single commands into pipelines;
//! [`retry`] decides what is tried again.

mod cluster;
mod coalesce;
mod connection;
mod retry;
mod sentinel;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use futures_util::future::join_all;
use redis::{AsyncCommands, ErrorKind, RedisError, Script, ServerErrorKind, Value};

use self::cluster::Shard;
use self::connection::{Conn, Connector, Lane};
use self::retry::Op;
use super::{Backend, Expiry, Health, RateDecision, ScanPage};
use crate::error::{StateError, StateResult};
use crate::glob;

/// Keys asked of each SCAN step. Fixed, so a cursor replays the same batch.
const SCAN_COUNT: usize = 256;
/// SCAN steps one page may take before it returns what it has.
const SCAN_STEPS_PER_PAGE: usize = 64;

/// Batches of at least this many keys, or this many bytes of values, take
/// the bulk connection ([`Lane::Bulk`]). Below them a batch costs about
/// what a few single commands do.
const BULK_KEYS: usize = 64;
const BULK_BYTES: usize = 256 << 10;

/// The lane for a batch of `keys` keys and `bytes` bytes of values.
fn lane(keys: usize, bytes: usize) -> Lane {
    if keys >= BULK_KEYS || bytes >= BULK_BYTES {
        Lane::Bulk
    } else {
        Lane::Main
    }
}

/// Compare-and-swap. ARGV: has-expected, expected, has-new, new, ttl-ms ("" = none).
const CAS_SCRIPT: &str = r#"
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if current ~= ARGV[2] then return 0 end
elseif current then
  return 0
end
if ARGV[3] == '1' then
  if ARGV[5] ~= '' then
    redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[5])
  else
    redis.call('SET', KEYS[1], ARGV[4])
  end
else
  redis.call('DEL', KEYS[1])
end
return 1
"#;

/// PERSIST that reports whether the key exists (PERSIST alone says 0 for a
/// key that exists but has no TTL).
const PERSIST_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('PERSIST', KEYS[1])
return 1
"#;

/// Compare-and-set of a hash field. ARGV: field, has-expected, expected,
/// has-new, new, fallback ttl-ms ("" = none).
const HASH_CAS_SCRIPT: &str = r#"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '1' then
  if current ~= ARGV[3] then return 0 end
elseif current then
  return 0
end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
  if ARGV[6] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[6], 'NX') end
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
"#;

/// A float increment of a hash field in doubles, stored as the shortest of
/// `%.15g`, `%.16g` and `%.17g` that reads back as the same number: the
/// memory store's `format_float` to the character (HINCRBYFLOAT adds in
/// long double and prints 17 decimal places, which no f64 can match).
/// Refuses a current value that is not a finite decimal number and a
/// result out of the f64 range. ARGV: field, delta, fallback ttl-ms ("" =
/// none).
const HASH_INCR_FLOAT_SCRIPT: &str = r#"
local current = redis.call('HGET', KEYS[1], ARGV[1])
local n = 0
if current then
  n = tonumber(current)
  if n == nil or n ~= n or n == math.huge or n == -math.huge
     or string.find(current, '[%z%sxX]') then
    return redis.error_reply('ERR hash value is not a float')
  end
end
local sum = n + tonumber(ARGV[2])
if sum ~= sum or sum == math.huge or sum == -math.huge then
  return redis.error_reply('ERR increment would produce NaN or Infinity')
end
if sum == 0 then sum = 0 end
local text
for digits = 15, 17 do
  text = string.format('%.' .. digits .. 'g', sum)
  if tonumber(text) == sum then break end
end
redis.call('HSET', KEYS[1], ARGV[1], text)
if ARGV[3] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[3], 'NX') end
return text
"#;

/// INCRBY (ARGV[1] `key`) or HINCRBY of a field (`field`, any name, the
/// empty one included), then the fallback TTL if the key has none; a
/// failed increment sets nothing. ARGV: `key` or `field`, field, delta,
/// ttl-ms.
const INCR_WITH_TTL_SCRIPT: &str = r#"
local value
if ARGV[1] == 'key' then
  value = redis.call('INCRBY', KEYS[1], ARGV[3])
else
  value = redis.call('HINCRBY', KEYS[1], ARGV[2], ARGV[3])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4], 'NX')
return value
"#;

/// HGETALL, or only the size of the answer so far (an integer) once that
/// is over ARGV[1] bytes: an oversized hash is measured field by field
/// (HKEYS copies only the names), so its values are copied neither into
/// the script's memory nor off the server. (HSCAN would copy values too;
/// it gained NOVALUES only in Redis 7.4.)
const HASH_GET_ALL_SCRIPT: &str = r#"
local max = tonumber(ARGV[1])
local size = redis.call('HLEN', KEYS[1]) * tonumber(ARGV[2])
if size > max then return size end
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  size = size + #field + redis.call('HSTRLEN', KEYS[1], field)
  if size > max then return size end
end
return redis.call('HGETALL', KEYS[1])
"#;

/// MGET, or only the size of the answer (an integer) when the values come
/// to more than ARGV[1] bytes: oversized values never leave the server.
/// A key of another type counts as nil, as in MGET; any other error (say
/// an ACL refusal) is the answer.
const GET_WITHIN_SCRIPT: &str = r#"
local size = 0
for i = 1, #KEYS do
  local n = redis.pcall('STRLEN', KEYS[i])
  if type(n) == 'number' then
    size = size + n
  elseif not string.find(n.err, '^WRONGTYPE') then
    return n
  end
end
if size > tonumber(ARGV[1]) then return size end
return redis.call('MGET', unpack(KEYS))
"#;

/// GETDEL, or only the value's size (an integer) when it is over ARGV[1]
/// bytes, and then the key stays.
const GET_AND_DELETE_WITHIN_SCRIPT: &str = r#"
local size = redis.call('STRLEN', KEYS[1])
if size > tonumber(ARGV[1]) then return size end
return redis.call('GETDEL', KEYS[1])
"#;

/// HGET, or only the value's size (an integer) when it is over ARGV[2]
/// bytes. ARGV: field, max bytes.
const HASH_GET_WITHIN_SCRIPT: &str = r#"
local size = redis.call('HSTRLEN', KEYS[1], ARGV[1])
if size > tonumber(ARGV[2]) then return size end
return redis.call('HGET', KEYS[1], ARGV[1])
"#;

/// Most keys given to one script call: Lua's `unpack` takes a few thousand.
const SCRIPT_KEYS: usize = 1000;

/// Takes a free lock and draws a fencing token in one step: the server's
/// microseconds, or the last token plus one if more (see `FENCE_TTL`).
/// KEYS: lock, fence counter. ARGV: owner, ttl-ms, fence-ttl-ms.
const LOCK_ACQUIRE_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local now = redis.call('TIME')
local token = tonumber(now[1]) * 1000000 + tonumber(now[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '')
if last and last >= token then token = last + 1 end
redis.call('SET', KEYS[2], string.format('%.0f', token), 'PX', ARGV[3])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return token
"#;

/// PEXPIRE only while the key holds ARGV[1].
const EXPIRE_IF_EQUAL_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// GCRA in integer microseconds on the server's clock; the same math as
/// `backend::gcra`. ARGV: limit, window-us, cost.
/// Returns {allowed, remaining, reset-after-us, retry-after-us}.
const RATE_SCRIPT: &str = r#"
local limit = tonumber(ARGV[1])
local cost = tonumber(ARGV[3])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local interval = math.max(math.ceil(tonumber(ARGV[2]) / limit), 1)
local span = limit * interval
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local new_tat = tat + cost * interval
if new_tat - now <= span then
  if cost > 0 then
    redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.max(math.ceil((new_tat - now) / 1000), 1))
  end
  return {1, math.floor((span - (new_tat - now)) / interval), new_tat - now, 0}
end
return {0, math.floor(math.max(span - (tat - now), 0) / interval), tat - now, new_tat - now - span}
"#;

/// How to reach Redis and how long to wait for it.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://[user@]host:port[/db]`, `rediss://…` (TLS),
    /// `redis+cluster://[user@]host:port,host:port,…` or
    /// `redis+sentinel://[user@]host:port,…/PRIMARY-NAME[/db]`, optionally
    /// with `?ca=PATH` and `?wait-replicas=N`; never a password.
    pub url: String,
    /// A PEM file of CA certificates to trust for `rediss://` (instead of
    /// the system's); the URL's `ca=` wins.
    pub ca_file: Option<PathBuf>,
    /// Replicas every write must reach (`WAIT`) before it is acknowledged;
    /// 0 acknowledges on the primary's answer. The URL's `wait-replicas=` wins.
    pub wait_replicas: u32,
    /// A user to log in as, overriding the URL's.
    pub username: Option<String>,
    /// The password, taken from `REDIS_PASSWORD` only.
    pub password: Option<String>,
    /// The Sentinels' own password (`requirepass` in their configuration),
    /// taken from `REDIS_SENTINEL_PASSWORD` only; none: they are asked
    /// without one.
    pub sentinel_password: Option<String>,
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
    /// Longest wait for any one operation, reconnecting included.
    pub op_timeout: Duration,
}

impl RedisOptions {
    /// Options for `url` with the default timeouts (1 s connect, 2 s per operation).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ca_file: None,
            wait_replicas: 0,
            username: None,
            password: None,
            sentinel_password: None,
            connect_timeout: Duration::from_secs(1),
            op_timeout: Duration::from_secs(2),
        }
    }
}

/// The Redis backend.
pub struct RedisBackend {
    connector: Connector,
    op_timeout: Duration,
    cas: Script,
    persist: Script,
    hash_cas: Script,
    hash_get_all: Script,
    get_within: Script,
    get_and_delete_within: Script,
    hash_get_within: Script,
    hash_incr_float: Script,
    incr_with_ttl: Script,
    lock_acquire: Script,
    expire_if_equal: Script,
    rate: Script,
}

impl RedisBackend {
    /// Prepares a connection to Redis. Connecting happens on first use and
    /// again after any failure, so a Redis that is down at start or goes
    /// away later is an `unavailable` error, not a dead host.
    pub fn new(options: &RedisOptions) -> Result<Self, String> {
        Ok(Self {
            connector: Connector::new(options)?,
            op_timeout: options.op_timeout,
            cas: Script::new(CAS_SCRIPT),
            persist: Script::new(PERSIST_SCRIPT),
            hash_cas: Script::new(HASH_CAS_SCRIPT),
            hash_get_all: Script::new(HASH_GET_ALL_SCRIPT),
            get_within: Script::new(GET_WITHIN_SCRIPT),
            get_and_delete_within: Script::new(GET_AND_DELETE_WITHIN_SCRIPT),
            hash_get_within: Script::new(HASH_GET_WITHIN_SCRIPT),
            hash_incr_float: Script::new(HASH_INCR_FLOAT_SCRIPT),
            incr_with_ttl: Script::new(INCR_WITH_TTL_SCRIPT),
            lock_acquire: Script::new(LOCK_ACQUIRE_SCRIPT),
            expire_if_equal: Script::new(EXPIRE_IF_EQUAL_SCRIPT),
            rate: Script::new(RATE_SCRIPT),
        })
    }

    /// Runs one operation on a clone of the shared connection, within the
    /// operation timeout (see [`RedisBackend::run_by`]).
    async fn run<T, F, Fut>(&self, op: Op, attempt: F) -> StateResult<T>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.run_by(self.deadline(), op, Lane::Main, attempt).await
    }

    /// [`RedisBackend::run`] for a batch of `keys` keys and `bytes` bytes
    /// of values: a large one goes on the bulk connection.
    async fn run_batch<T, F, Fut>(&self, op: Op, keys: usize, bytes: usize, attempt: F) -> StateResult<T>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.run_by(self.deadline(), op, lane(keys, bytes), attempt).await
    }

    /// When an operation starting now must be done.
    fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.op_timeout
    }

    /// [`RedisBackend::run`] for a write that may find nothing to do (a
    /// lock taken, a value not as expected): `wrote` says from its answer
    /// whether it wrote, and only a write waits for replicas.
    async fn run_maybe_writing<T, F, Fut>(&self, op: Op, attempt: F, wrote: fn(&T) -> bool) -> StateResult<T>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.run_when(self.deadline(), op, Lane::Main, attempt, wrote).await
    }

    /// Runs one step of an operation by `deadline` (an operation of several
    /// steps shares one). Transient failures are tried again with backoff
    /// as far as `op` allows; a write then waits for replicas when the
    /// deployment asks for it.
    async fn run_by<T, F, Fut>(&self, deadline: tokio::time::Instant, op: Op, lane: Lane, attempt: F) -> StateResult<T>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.run_when(deadline, op, lane, attempt, |_| true).await
    }

    /// [`RedisBackend::run_by`], waiting for replicas only after an answer
    /// `wrote` says was a write.
    async fn run_when<T, F, Fut>(
        &self,
        deadline: tokio::time::Instant,
        op: Op,
        lane: Lane,
        attempt: F,
        wrote: fn(&T) -> bool,
    ) -> StateResult<T>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        // Out of time: says why the earlier tries failed, too.
        let late = |before: Option<StateError>| {
            let before = before.map(|e| format!(" (before that: {e})")).unwrap_or_default();
            StateError::Unavailable(format!("Redis did not answer within {} ms{before}", self.op_timeout.as_millis()))
        };
        // A write that may have run: the role must know before it retries.
        let maybe_written = |error: StateError, certainly_not_run: bool| match error {
            StateError::Unavailable(message) if op == Op::Once && !certainly_not_run => StateError::Unavailable(
                format!("{message}; the write may or may not have been applied: read before trying it again"),
            ),
            other => other,
        };
        let mut before = None;
        for tries in 0.. {
            // Whether the command went out: a passing failure to connect
            // (refused, timed out, lost mid-handshake) sent nothing, so any
            // operation may be tried again.
            let sent = AtomicBool::new(false);
            let outcome = tokio::time::timeout_at(deadline, async {
                let conn = self.connector.get(op.writes(), lane).await?;
                sent.store(true, Ordering::Relaxed);
                let value = attempt(conn.clone()).await?;
                Ok((conn, value))
            })
            .await;
            let error = match outcome {
                Err(_) => {
                    self.connector.timed_out(op.writes(), lane);
                    return Err(maybe_written(late(before), !sent.load(Ordering::Relaxed)));
                }
                Ok(Ok((conn, value))) if op.writes() && self.connector.wait_replicas > 0 && wrote(&value) => {
                    return self.confirmed(conn, deadline, lane).await.map(|()| value);
                }
                Ok(Ok((_, value))) => return Ok(value),
                Ok(Err(error)) => error,
            };
            self.connector.failed(&error, op.writes(), lane);
            let pause = retry::backoff(tries);
            let unsent = !sent.load(Ordering::Relaxed);
            let not_run = unsent || retry::not_run(&error);
            let may_retry = retry::may_retry(op, &error) || (unsent && retry::is_transient(&error));
            if !may_retry || tokio::time::Instant::now() + pause >= deadline {
                return Err(maybe_written(map_error(error), not_run));
            }
            tokio::time::sleep(pause).await;
            before = Some(map_error(error));
        }
        unreachable!("the deadline ends the loop")
    }

    /// `WAIT`s until the configured number of replicas has every write this
    /// connection sent so far (so the write just made, too). The server
    /// stops waiting with a quarter of the time to `deadline` left, so its
    /// answer comes before the operation times out.
    ///
    /// Short of replicas, the write is on the primary but may not last: it
    /// is `unavailable` and not sent again (that would not help the
    /// replicas, and could undo a later write of another client). A lagging
    /// replica is no fault of the connection, so it is kept; one that failed
    /// during the `WAIT` is dropped.
    async fn confirmed(&self, mut conn: Conn, deadline: tokio::time::Instant, lane: Lane) -> StateResult<()> {
        let wanted = self.connector.wait_replicas;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        // At least 1: `WAIT n 0` would block for ever.
        let millis = (left.as_millis() as u64 * 3 / 4).max(1);
        let wait = redis::cmd("WAIT").arg(wanted).arg(millis).clone();
        match tokio::time::timeout_at(deadline, wait.query_async::<u32>(&mut conn)).await {
            Err(_) => {
                self.connector.timed_out(true, lane);
                Err(self.wait_unanswered())
            }
            Ok(Ok(reached)) if reached >= wanted => Ok(()),
            Ok(Ok(reached)) => Err(unconfirmed(format!("{reached} of {wanted} replicas have it"))),
            Ok(Err(error)) => {
                self.connector.failed(&error, true, lane);
                // redis-rs's own timer may end it before the deadline does.
                Err(if error.is_timeout() {
                    self.wait_unanswered()
                } else {
                    unconfirmed(format!("waiting for replicas failed ({})", map_error(error)))
                })
            }
        }
    }

    fn wait_unanswered(&self) -> StateError {
        unconfirmed(format!(
            "Redis did not answer WAIT before the operation timeout ({} ms)",
            self.op_timeout.as_millis()
        ))
    }

    /// The primaries to scan: every Cluster primary, or the one server.
    async fn shards(&self, deadline: tokio::time::Instant) -> StateResult<Vec<Shard>> {
        self.run_by(deadline, Op::Read, Lane::Main, |mut c| async move { c.shards().await }).await
    }

    /// One raw SCAN step on `shard`: the next cursor and the UTF-8 keys of
    /// this batch.
    async fn scan_step(
        &self,
        deadline: tokio::time::Instant,
        shard: &Shard,
        cursor: u64,
        pattern: &str,
        count: usize,
    ) -> StateResult<(u64, Vec<String>)> {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(count);
        let scan = &scan;
        let (next, raw): (u64, Vec<Vec<u8>>) = self
            .run_by(deadline, Op::Read, Lane::Main, |mut c| async move {
                redis::from_redis_value(c.on(shard, scan).await?).map_err(Into::into)
            })
            .await?;
        // Keys rolehost writes are UTF-8; anything else is not ours.
        let keys = raw.into_iter().filter_map(|k| String::from_utf8(k).ok()).collect();
        Ok((next, keys))
    }
}

fn ttl_ms(ttl: Duration) -> u64 {
    ttl.as_millis().clamp(1, u64::MAX as u128) as u64
}

/// A TTL as a script argument: milliseconds, or "" for none.
fn script_ttl(ttl: Option<Duration>) -> String {
    ttl.map(|t| ttl_ms(t).to_string()).unwrap_or_default()
}

/// Adds `PEXPIRE key ttl NX` (only if the key has no TTL) to a pipeline.
fn with_fallback_ttl(pipe: &mut redis::Pipeline, key: &str, ttl: Option<Duration>) {
    if let Some(ttl) = ttl {
        pipe.cmd("PEXPIRE").arg(key).arg(ttl_ms(ttl)).arg("NX").ignore();
    }
}

impl RedisBackend {
    /// The key patterns of the ACL user `name` (`ACL GETUSER`, as Redis
    /// prints them, space-separated) on each server that has one: the one
    /// server, or every Cluster primary (Redis does not share users between
    /// nodes).
    pub async fn acl_user_keys(&self, name: &str) -> StateResult<Vec<String>> {
        let getuser = redis::cmd("ACL").arg("GETUSER").arg(name).clone();
        let mut found = Vec::new();
        for shard in self.shards(self.deadline()).await? {
            let (getuser, shard) = (&getuser, &shard);
            let reply = self.run(Op::Read, |mut c| async move { c.on(shard, getuser).await }).await?;
            if reply != Value::Nil {
                found.push(field(&reply, "keys").and_then(text).unwrap_or_default().to_owned());
            }
        }
        Ok(found)
    }

    /// Sends `ACL SETUSER args…` (operator use, on an admin connection).
    pub async fn acl_setuser(&self, args: &[String]) -> StateResult<()> {
        let setuser = || redis::cmd("ACL").arg("SETUSER").arg(args).clone();
        self.run(Op::Idempotent, |mut c| async move { setuser().query_async::<()>(&mut c).await }).await?;
        // Redis does not replicate ACL users: each replica the Sentinels
        // may promote gets them too.
        let Some(sentinels) = self.connector.sentinels() else { return Ok(()) };
        let replicas = tokio::time::timeout_at(self.deadline(), sentinels.replicas()).await;
        let unavailable = |what: String| StateError::Unavailable(format!("cannot apply ACL users to {what}"));
        let replicas =
            replicas.map_err(|_| unavailable("the replicas: the Sentinels did not answer in time".into()))?;
        for (address, mut conn) in replicas.map_err(|e| unavailable(format!("the replicas: {e}")))? {
            let done = tokio::time::timeout(self.op_timeout, setuser().query_async::<()>(&mut conn)).await;
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(unavailable(format!("replica {address}: {e}"))),
                Err(_) => return Err(unavailable(format!("replica {address}: no answer in time"))),
            }
        }
        Ok(())
    }

    /// Runs a MULTI/EXEC of `entries` (grouped by Cluster slot when on a
    /// Cluster: a transaction cannot span slots).
    async fn set_in_transactions(&self, entries: &[(String, Vec<u8>)], ttl: Option<Duration>) -> StateResult<()> {
        let deadline = self.deadline();
        let lane = lane(entries.len(), entries.iter().map(|(_, value)| value.len()).sum());
        for group in self.slot_groups(entries.iter().map(|(key, _)| key.as_str())) {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for (key, value) in group.into_iter().map(|i| &entries[i]) {
                match ttl {
                    Some(ttl) => pipe.pset_ex(key, value, ttl_ms(ttl)).ignore(),
                    None => pipe.set(key, value).ignore(),
                };
            }
            let pipe = &pipe;
            self.run_by(deadline, Op::Idempotent, lane, |mut c| async move { pipe.query_async::<()>(&mut c).await })
                .await?;
        }
        Ok(())
    }

    /// The values of `keys` at the positions `part` (one Cluster slot) if
    /// they come to at most `max_bytes`, or else their size, measured by a
    /// read-only script on the server.
    async fn read_within(
        &self,
        deadline: tokio::time::Instant,
        lane: Lane,
        keys: &[String],
        part: &[usize],
        max_bytes: usize,
    ) -> StateResult<Result<Vec<Option<Vec<u8>>>, usize>> {
        let script = &self.get_within;
        let part_keys: Vec<&str> = part.iter().map(|&i| keys[i].as_str()).collect();
        let part_keys = &part_keys;
        let answer = self
            .run_by(deadline, Op::Read, lane, |mut c| async move {
                eval_read_only(&mut c, script, part_keys, max_bytes).await
            })
            .await?;
        measured(answer)
    }

    /// Positions of `keys` grouped by Cluster slot (off a Cluster, one
    /// group), so that each group can go in one transaction or script.
    fn slot_groups<'a>(&self, keys: impl Iterator<Item = &'a str>) -> Vec<Vec<usize>> {
        let mut groups: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        for (i, key) in keys.enumerate() {
            let slot = if self.connector.is_cluster() { cluster::slot(key) } else { 0 };
            groups.entry(slot).or_default().push(i);
        }
        groups.into_values().collect()
    }
}

/// The answer of a script that measures before it reads: what it read,
/// or (an integer) the size it refused to send.
fn measured<T: redis::FromRedisValue>(answer: redis::Value) -> StateResult<Result<T, usize>> {
    match answer {
        redis::Value::Int(size) => Ok(Err(size as usize)),
        answer => redis::from_redis_value(answer).map(Ok).map_err(|e| map_error(e.into())),
    }
}

/// A single value from a script that measures it first.
fn value_within(answer: redis::Value, max: usize) -> StateResult<Option<Vec<u8>>> {
    measured(answer)?.map_err(|size| super::values_too_large(size, max))
}

/// Puts the answers for the positions `part` in `values`; their bytes.
fn place(values: &mut [Option<Vec<u8>>], part: &[usize], got: Vec<Option<Vec<u8>>>) -> usize {
    let mut bytes = 0;
    for (&i, value) in part.iter().zip(got) {
        bytes += value.as_ref().map_or(0, Vec::len);
        values[i] = value;
    }
    bytes
}

/// Runs a script that only reads with `EVALSHA_RO`, which Redis lets a
/// user with read-only access to the keys (a read-only grant's `%R~`) run;
/// after a `NOSCRIPT` it loads the script, as redis-rs's own invocation does.
async fn eval_read_only(
    c: &mut Conn,
    script: &Script,
    keys: &[&str],
    args: impl redis::ToRedisArgs,
) -> redis::RedisResult<redis::Value> {
    let mut cmd = redis::cmd("EVALSHA_RO");
    cmd.arg(script.get_hash()).arg(keys.len()).arg(keys).arg(args);
    match cmd.query_async(c).await {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            script.load_async(c).await?;
            cmd.query_async(c).await
        }
        answer => answer,
    }
}

/// Server facts from the `INFO` answers of every primary: counters summed
/// over them (`used_memory_peak` thus adds up peaks of different moments,
/// an upper bound), the last save as the oldest primary's, the rest as the
/// first says; and a `warning` when a primary may evict keys (locks and
/// fencing counters among them) when full.
fn health_details(infos: &[String]) -> BTreeMap<String, String> {
    const FIRST: &[&str] = &["redis_version", "maxmemory_policy"];
    const SUMMED: &[&str] = &[
        "used_memory",
        "used_memory_peak",
        "connected_clients",
        "keyspace_hits",
        "keyspace_misses",
        "expired_keys",
        "evicted_keys",
    ];
    let fields = |info: &str| -> BTreeMap<String, String> {
        info.lines()
            .filter_map(|line| line.trim().split_once(':'))
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect()
    };
    let all: Vec<BTreeMap<String, String>> = infos.iter().map(|info| fields(info)).collect();
    let mut details = BTreeMap::new();
    for name in FIRST {
        if let Some(value) = all.first().and_then(|f| f.get(*name)) {
            details.insert((*name).to_owned(), value.clone());
        }
    }
    for name in SUMMED {
        let values: Vec<u64> = all.iter().filter_map(|f| f.get(*name)?.parse().ok()).collect();
        if !values.is_empty() {
            details.insert((*name).to_owned(), values.iter().sum::<u64>().to_string());
        }
    }
    // The primary saved longest ago is the one with the most to lose.
    let saves = all.iter().filter_map(|f| f.get("rdb_last_save_time")?.parse::<u64>().ok());
    if let Some(oldest) = saves.min() {
        details.insert("rdb_last_save_time".into(), oldest.to_string());
    }
    if let Some(used) = details.get("used_memory").and_then(|u| u.parse::<u64>().ok()) {
        details.insert("used_memory_human".into(), human_bytes(used));
    }
    // The limit of them all, if each has one (0: unlimited, as in INFO).
    let limits: Option<Vec<u64>> = all.iter().map(|f| f.get("maxmemory")?.parse().ok()).collect();
    if let Some(limits) = limits.filter(|l| !l.is_empty()) {
        let total = if limits.contains(&0) { 0 } else { limits.iter().sum() };
        details.insert("maxmemory".into(), total.to_string());
    }
    let evicting = all.iter().find(|f| {
        let limited = f.get("maxmemory").is_some_and(|m| m != "0");
        limited && f.get("maxmemory_policy").is_some_and(|p| p != "noeviction")
    });
    if let Some(f) = evicting {
        details.insert(
            "warning".into(),
            format!(
                "maxmemory-policy {} may evict rolehost's keys (locks, fencing counters, state) when Redis is \
                 full; use noeviction",
                f["maxmemory_policy"]
            ),
        );
    }
    details
}

/// Bytes as Redis shows them: `1.50M`.
fn human_bytes(bytes: u64) -> String {
    let units = [("G", 1u64 << 30), ("M", 1 << 20), ("K", 1 << 10)];
    match units.iter().find(|(_, size)| bytes >= *size) {
        Some((unit, size)) => format!("{:.2}{unit}", bytes as f64 / *size as f64),
        None => format!("{bytes}B"),
    }
}

/// Whether Redis (or a Sentinel) refused the login, or wants one.
fn refused_login(error: &RedisError) -> bool {
    error.kind() == ErrorKind::AuthenticationFailed || matches!(error.code(), Some("NOAUTH" | "WRONGPASS"))
}

/// Sorts Redis failures into the state API's errors.
fn map_error(error: RedisError) -> StateError {
    let transient = retry::is_transient(&error);
    if transient {
        return StateError::Unavailable(format!("Redis: {error}"));
    }
    // Errors inside MULTI/EXEC come wrapped; look at the whole text.
    let detail = error.to_string();
    let in_transaction =
        |code| error.clone().into_server_errors().is_some_and(|e| e.iter().any(|(_, e)| e.code() == code));
    if error.code() == Some("OOM") || in_transaction("OOM") {
        return StateError::QuotaExceeded(format!(
            "Redis is full (maxmemory reached, no eviction); delete keys or give it more room: {error}"
        ));
    }
    if refused_login(&error) {
        return StateError::AccessDenied(format!(
            "Redis refused the login (check the user and REDIS_PASSWORD, or REDIS_SENTINEL_PASSWORD for \
             Sentinels): {error}"
        ));
    }
    // Refused in a transaction, or inside a script (which Redis reports as
    // a plain error: worded one way up to 7.0, another since 7.2).
    if error.kind() == ErrorKind::Server(ServerErrorKind::NoPerm)
        || in_transaction("NOPERM")
        || detail.contains("user executing the script can't run this command")
        || detail.contains("ACL failure in script")
    {
        return StateError::AccessDenied(format!("Redis refused: {error}"));
    }
    if detail.contains("not an integer")
        || detail.contains("overflow")
        || detail.contains("not a float")
        || detail.contains("not a valid float")
        || detail.contains("NaN or Infinity")
    {
        return StateError::InvalidArgument(error.detail().unwrap_or(&detail).to_owned());
    }
    StateError::Internal(format!("Redis: {error}"))
}

/// The value of `name` in a map (RESP3) or a flat list of names and values
/// (RESP2).
pub(super) fn field<'v>(map: &'v Value, name: &str) -> Option<&'v Value> {
    let is_name = |key: &Value| text(key) == Some(name);
    match map {
        Value::Map(pairs) => pairs.iter().find(|(key, _)| is_name(key)).map(|(_, value)| value),
        Value::Array(items) => items.chunks_exact(2).find(|pair| is_name(&pair[0])).map(|pair| &pair[1]),
        _ => None,
    }
}

pub(super) fn text(value: &Value) -> Option<&str> {
    match value {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(text) => Some(text),
        _ => None,
    }
}

/// Longest cursor accepted back from a guest.
const MAX_CURSOR_BYTES: usize = 1 << 20;

/// A scan's position: `scan-cursor:carried:primary:done`. `carried` holds
/// the keys a SCAN batch returned past the end of the last page (their
/// part after the pattern's literal prefix, so a cursor never shows a
/// role's prefix; base64 of a JSON list, empty for none). `primary` names
/// the Cluster primary the SCAN cursor belongs to by (the start of) its
/// node id (empty for the one server of the other kinds and before the
/// first, `-` past the last). `done` says what has been scanned to the end,
/// comma-separated: the hash slots of the primaries done (`a-b` ranges),
/// and `@id` for a primary done that owned none (it may be importing one).
///
/// Slots, not places in the list or addresses: a primary joining, leaving
/// or failing over mid-listing (its slots go with the part of the cluster,
/// to the replica taking over) leaves nothing skipped, and a primary done
/// that gains a slot is scanned again. (A failover of the primary being
/// scanned starts its keys again on the new one: some are listed twice.)
struct ScanCursor {
    primary: Position,
    scan: u64,
    carried: Vec<String>,
    done: Done,
}

#[derive(Debug, PartialEq)]
enum Position {
    At(Option<String>),
    End,
}

/// The part of a node id a cursor keeps: 64 random bits name a node well
/// enough and keep cursors short.
fn short_id(id: &str) -> &str {
    id.get(..16).unwrap_or(id)
}

/// How a cursor names `shard`'s primary.
fn shard_id(shard: &Shard) -> Option<&str> {
    shard.as_ref().map(|primary| short_id(&primary.id))
}

/// What a Cluster listing has scanned to the end: hash slots, and the
/// primaries without slots.
#[derive(Default)]
struct Done {
    slots: Vec<bool>,
    slotless: BTreeSet<String>,
}

impl Done {
    const SLOTS: usize = 16384;

    fn has(&self, slot: u16) -> bool {
        self.slots.get(usize::from(slot)).copied().unwrap_or(false)
    }

    /// Marks `first..=last` done (slots past the last there is are
    /// ignored; `primaries` never gives them).
    fn add_slots(&mut self, (first, last): (u16, u16)) {
        self.slots.resize(Self::SLOTS, false);
        let last = usize::from(last).min(Self::SLOTS - 1);
        if let Some(range) = self.slots.get_mut(usize::from(first)..=last) {
            range.fill(true);
        }
    }

    /// Whether `shard` needs no more scanning: every slot it owns now is
    /// done, or, owning none, it was done.
    fn covers(&self, shard: &Shard) -> bool {
        let Some(primary) = shard else { return false };
        match primary.slots.is_empty() {
            true => self.slotless.contains(short_id(&primary.id)),
            false => primary.slots.iter().all(|&(first, last)| (first..=last).all(|slot| self.has(slot))),
        }
    }

    fn add(&mut self, primary: &cluster::Primary) {
        if primary.slots.is_empty() {
            self.slotless.insert(short_id(&primary.id).to_owned());
        }
        primary.slots.iter().for_each(|&range| self.add_slots(range));
    }

    /// The slots as `render` writes them: ranges in ascending order, apart
    /// (so a forged list costs at most one pass over the slots).
    fn parse(text: &str) -> Option<Self> {
        let mut done = Self::default();
        let mut next_free = 0;
        for item in text.split(',').filter(|item| !item.is_empty()) {
            if let Some(id) = item.strip_prefix('@') {
                done.slotless.insert(id.to_owned());
                continue;
            }
            let (first, last) = item.split_once('-').unwrap_or((item, item));
            let (first, last): (u16, u16) = (first.parse().ok()?, last.parse().ok()?);
            if first < next_free || first > last || usize::from(last) >= Self::SLOTS {
                return None;
            }
            next_free = last + 1;
            done.add_slots((first, last));
        }
        Some(done)
    }

    fn render(&self) -> String {
        let mut items = Vec::new();
        let mut slot = 0;
        while slot < self.slots.len() {
            if !self.slots[slot] {
                slot += 1;
                continue;
            }
            let first = slot;
            while slot < self.slots.len() && self.slots[slot] {
                slot += 1;
            }
            items.push(match slot - 1 == first {
                true => first.to_string(),
                false => format!("{first}-{}", slot - 1),
            });
        }
        items.extend(self.slotless.iter().map(|id| format!("@{id}")));
        items.join(",")
    }
}

impl ScanCursor {
    fn parse(cursor: Option<&str>, pattern: &str) -> StateResult<Self> {
        let Some(cursor) = cursor else {
            return Ok(Self { primary: Position::At(None), scan: 0, carried: Vec::new(), done: Done::default() });
        };
        let invalid = || StateError::InvalidArgument("invalid cursor".into());
        if cursor.len() > MAX_CURSOR_BYTES {
            return Err(invalid());
        }
        let mut parts = cursor.splitn(4, ':');
        let (Some(scan), Some(carried), Some(primary)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(invalid());
        };
        let carried: Vec<String> = match carried {
            "" => Vec::new(),
            text => {
                let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).map_err(|_| invalid())?;
                serde_json::from_slice(&json).map_err(|_| invalid())?
            }
        };
        let primary = match primary {
            "" => Position::At(None),
            "-" => Position::End,
            id => Position::At(Some(id.to_owned())),
        };
        // A list this version did not write (an older one's, or a forged
        // one) starts the listing over: keys come twice, none is missed.
        let (primary, done) = match Done::parse(parts.next().unwrap_or_default()) {
            Some(done) => (primary, done),
            None => (Position::At(None), Done::default()),
        };
        // A cursor comes back from the guest, which can put any names in
        // it: they still land under the pattern's literal prefix, which
        // holds the role's namespace, so a forged cursor names only keys
        // of the role's own (it may name keys that do not exist). A forged
        // node id or slot only ever picks among the primaries.
        let literal = glob::literal_prefix(pattern);
        let carried = carried.into_iter().map(|rest| format!("{literal}{rest}")).collect();
        Ok(Self { primary, scan: scan.parse().map_err(|_| invalid())?, carried, done })
    }

    /// The first of `shards` (sorted) still to scan, from its start.
    fn first_pending(&mut self, shards: &[Shard]) -> usize {
        self.scan = 0;
        shards.iter().position(|shard| !self.done.covers(shard)).unwrap_or(shards.len())
    }

    /// Where in `shards` the scan goes on: at the primary its SCAN cursor
    /// belongs to if that is still one, or else at the first still to scan.
    fn place_in(&mut self, shards: &[Shard]) -> usize {
        let Position::At(current) = &self.primary else { return shards.len() };
        match shards.iter().position(|shard| shard_id(shard) == current.as_deref() && !self.done.covers(shard)) {
            Some(place) => place,
            None => self.first_pending(shards),
        }
    }

    /// Past the end of `shards[place]`: the next place to scan.
    fn finished(&mut self, shards: &[Shard], place: usize) -> usize {
        match &shards[place] {
            Some(primary) => {
                self.done.add(primary);
                self.first_pending(shards)
            }
            None => shards.len(),
        }
    }

    fn render(&self, pattern: &str) -> String {
        let carried = if self.carried.is_empty() {
            String::new()
        } else {
            let literal = glob::literal_prefix(pattern);
            let rest: Vec<&str> = self.carried.iter().map(|key| key.get(literal.len()..).unwrap_or_default()).collect();
            let json = serde_json::to_vec(&rest).unwrap_or_default();
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        };
        let primary = match &self.primary {
            Position::At(id) => id.as_deref().unwrap_or_default(),
            Position::End => "-",
        };
        format!("{}:{carried}:{primary}:{}", self.scan, self.done.render())
    }
}

#[async_trait]
impl Backend for RedisBackend {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn health(&self) -> StateResult<Health> {
        let deadline = self.deadline();
        let shards = self.shards(deadline).await?;
        if shards.is_empty() {
            return Err(StateError::Unavailable("no Redis Cluster primary is up".into()));
        }
        let mut infos = Vec::with_capacity(shards.len());
        for shard in &shards {
            let info: String = self
                .run_by(deadline, Op::Read, Lane::Main, |mut c| async move {
                    redis::from_redis_value(c.on(shard, &redis::cmd("INFO")).await?).map_err(Into::into)
                })
                .await?;
            infos.push(info);
        }
        let mut details = health_details(&infos);
        details.insert("topology".into(), self.connector.topology().into());
        details.insert("primaries".into(), shards.len().to_string());
        Ok(Health { kind: "redis", details })
    }

    async fn get(&self, key: &str, max_bytes: Option<usize>) -> StateResult<Option<Vec<u8>>> {
        if max_bytes.is_some() {
            return Ok(self.get_many(&[key.to_owned()], max_bytes).await?.pop().flatten());
        }
        self.run(Op::Read, |mut c| async move { c.get(key).await }).await
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StateResult<()> {
        self.run_batch(Op::Idempotent, 1, value.len(), |mut c| async move {
            match ttl {
                Some(ttl) => c.pset_ex(key, value, ttl_ms(ttl)).await,
                None => c.set(key, value).await,
            }
        })
        .await
    }

    async fn exists(&self, key: &str) -> StateResult<bool> {
        self.run(Op::Read, |mut c| async move { c.exists(key).await }).await
    }

    async fn get_many(&self, keys: &[String], max_bytes: Option<usize>) -> StateResult<Vec<Option<Vec<u8>>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let Some(max_bytes) = max_bytes else {
            // On a Cluster, redis-rs splits MGET by slot and merges the answers in order.
            return self
                .run_batch(Op::Read, keys.len(), 0, |mut c| async move {
                    redis::cmd("MGET").arg(keys).query_async(&mut c).await
                })
                .await;
        };
        let deadline = self.deadline();
        let groups = self.slot_groups(keys.iter().map(String::as_str));
        let parts: Vec<&[usize]> = groups.iter().flat_map(|group| group.chunks(SCRIPT_KEYS)).collect();
        let mut values = vec![None; keys.len()];
        let mut read = 0;
        // Each Cluster slot (and each thousand keys) is a script of its
        // own. First they run at once, each within an equal share of the
        // budget (of at most a large batch's bytes on the main connection);
        // then the parts over their share run at once on the bulk
        // connection, each within its measured size and an equal share of
        // what is left; a part that grew in between is read last, alone.
        let (mut round_lane, first_budget) = match lane(keys.len(), 0) {
            Lane::Main => (Lane::Main, max_bytes.min(BULK_BYTES)),
            Lane::Bulk => (Lane::Bulk, max_bytes),
        };
        let share = first_budget / parts.len().max(1);
        let mut pending: Vec<(&[usize], usize)> = parts.into_iter().map(|part| (part, share)).collect();
        for _ in 0..2 {
            if pending.is_empty() {
                break;
            }
            let reads =
                pending.iter().map(|&(part, budget)| self.read_within(deadline, round_lane, keys, part, budget));
            let answers = join_all(reads).await;
            let mut refused = Vec::new();
            for (&(part, _), answer) in pending.iter().zip(answers) {
                match answer? {
                    Ok(got) => read += place(&mut values, part, got),
                    Err(size) => refused.push((part, size)),
                }
            }
            let sizes: usize = refused.iter().map(|(_, size)| size).sum();
            if read + sizes > max_bytes {
                return Err(super::values_too_large(read + sizes, max_bytes));
            }
            let slack = (max_bytes - read - sizes) / refused.len().max(1);
            pending = refused.into_iter().map(|(part, size)| (part, size + slack)).collect();
            round_lane = Lane::Bulk;
        }
        for (part, _) in pending {
            match self.read_within(deadline, Lane::Bulk, keys, part, max_bytes - read).await? {
                Ok(got) => read += place(&mut values, part, got),
                Err(size) => return Err(super::values_too_large(read + size, max_bytes)),
            }
        }
        Ok(values)
    }

    async fn set_many(&self, entries: &[(String, Vec<u8>)], ttl: Option<Duration>) -> StateResult<()> {
        if entries.is_empty() {
            return Ok(());
        }
        self.set_in_transactions(entries, ttl).await
    }

    async fn delete_many(&self, keys: &[String]) -> StateResult<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        // A retried DEL leaves the same state but may count fewer keys.
        self.run_batch(Op::Idempotent, keys.len(), 0, |mut c| async move { c.del(keys).await }).await
    }

    async fn expiry(&self, key: &str) -> StateResult<Expiry> {
        let ms: i64 = self.run(Op::Read, |mut c| async move { c.pttl(key).await }).await?;
        Ok(match ms {
            -2 => Expiry::Missing,
            -1 => Expiry::Persistent,
            ms => Expiry::ExpiresIn(Duration::from_millis(ms.max(0) as u64)),
        })
    }

    async fn expire(&self, key: &str, ttl: Option<Duration>) -> StateResult<bool> {
        match ttl {
            Some(ttl) => {
                let ms = ttl_ms(ttl) as i64;
                self.run(Op::Idempotent, |mut c| async move { c.pexpire(key, ms).await }).await
            }
            None => {
                let script = &self.persist;
                self.run(Op::Idempotent, |mut c| async move { script.key(key).invoke_async(&mut c).await }).await
            }
        }
    }

    async fn scan(&self, pattern: &str, cursor: Option<&str>, limit: usize) -> StateResult<ScanPage> {
        // Each SCAN asks for about as many keys as the page has room for;
        // the few a batch returns past that are carried in the cursor to
        // the next page, so no batch is ever replayed (a replay after
        // deletes would skip keys). A Cluster is scanned one primary after
        // another. The page's steps share one operation timeout; once half
        // of it is gone, the page ends where it got to.
        let mut at = ScanCursor::parse(cursor, pattern)?;
        let take = at.carried.len().min(limit);
        let mut keys: Vec<String> = at.carried.drain(..take).collect();
        let deadline = self.deadline();
        let shards = self.shards(deadline).await?;
        let mut place = at.place_in(&shards);
        for step in 0..SCAN_STEPS_PER_PAGE {
            let room = limit - keys.len();
            if room == 0 || !at.carried.is_empty() {
                break;
            }
            let Some(node) = shards.get(place) else { break };
            if step > 0 && deadline.saturating_duration_since(tokio::time::Instant::now()) < self.op_timeout / 2 {
                break;
            }
            // At least a few per SCAN, so sparse matches still move along.
            let count = room.clamp(16, SCAN_COUNT);
            let (next, mut batch) = self.scan_step(deadline, node, at.scan, pattern, count).await?;
            at.carried = batch.split_off(room.min(batch.len()));
            keys.append(&mut batch);
            at.scan = next;
            if next == 0 {
                place = at.finished(&shards, place);
            }
        }
        at.primary = shards.get(place).map_or(Position::End, |shard| Position::At(shard_id(shard).map(str::to_owned)));
        let done = at.carried.is_empty() && place >= shards.len();
        Ok(ScanPage { keys, cursor: (!done).then(|| at.render(pattern)) })
    }

    async fn increment(&self, key: &str, delta: i64, fallback_ttl: Option<Duration>) -> StateResult<i64> {
        if fallback_ttl.is_none() {
            return self.run(Op::Once, |mut c| async move { c.incr(key, delta).await }).await;
        }
        let (script, ttl) = (&self.incr_with_ttl, &script_ttl(fallback_ttl));
        self.run(Op::Once, |mut c| async move {
            script.key(key).arg("key").arg("").arg(delta).arg(ttl).invoke_async(&mut c).await
        })
        .await
    }

    async fn set_if_absent(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StateResult<bool> {
        let set = |mut c: Conn| async move {
            let mut cmd = redis::cmd("SET");
            cmd.arg(key).arg(value).arg("NX");
            if let Some(ttl) = ttl {
                cmd.arg("PX").arg(ttl_ms(ttl));
            }
            let reply: Option<String> = cmd.query_async(&mut c).await?;
            Ok(reply.is_some())
        };
        self.run_maybe_writing(Op::Once, set, |&set| set).await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> StateResult<bool> {
        let script = &self.cas;
        let swap = |mut c: Conn| async move {
            let mut invocation = script.key(key);
            invocation
                .arg(if expected.is_some() { "1" } else { "0" })
                .arg(expected.unwrap_or_default())
                .arg(if new.is_some() { "1" } else { "0" })
                .arg(new.unwrap_or_default())
                .arg(script_ttl(ttl));
            invocation.invoke_async(&mut c).await
        };
        self.run_maybe_writing(Op::Once, swap, |&swapped| swapped).await
    }

    async fn get_and_delete(&self, key: &str, max_bytes: Option<usize>) -> StateResult<Option<Vec<u8>>> {
        let Some(max) = max_bytes else {
            return self.run(Op::Once, |mut c| async move { c.get_del(key).await }).await;
        };
        let script = &self.get_and_delete_within;
        let answer =
            self.run(Op::Once, |mut c| async move { script.key(key).arg(max).invoke_async(&mut c).await }).await?;
        value_within(answer, max)
    }

    async fn hash_get(&self, key: &str, field: &str, max_bytes: Option<usize>) -> StateResult<Option<Vec<u8>>> {
        let Some(max) = max_bytes else {
            return self.run(Op::Read, |mut c| async move { c.hget(key, field).await }).await;
        };
        let script = &self.hash_get_within;
        let answer = self
            .run(Op::Read, |mut c| async move { eval_read_only(&mut c, script, &[key], (field, max)).await })
            .await?;
        value_within(answer, max)
    }

    async fn hash_get_all(&self, key: &str, max_bytes: usize) -> StateResult<Vec<(String, Vec<u8>)>> {
        let script = &self.hash_get_all;
        let read =
            |mut c| async move { eval_read_only(&mut c, script, &[key], (max_bytes, super::READ_FIELD_COST)).await };
        let answer = self.run(Op::Read, read).await?;
        measured(answer)?.map_err(|size| super::hash_too_large(size, max_bytes))
    }

    async fn hash_apply(
        &self,
        key: &str,
        set: &[(String, Vec<u8>)],
        remove: &[String],
        fallback_ttl: Option<Duration>,
    ) -> StateResult<()> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        if !set.is_empty() {
            pipe.hset_multiple(key, set).ignore();
        }
        if !remove.is_empty() {
            pipe.hdel(key, remove).ignore();
        }
        if set.is_empty() && remove.is_empty() {
            return Ok(());
        }
        with_fallback_ttl(&mut pipe, key, fallback_ttl);
        let pipe = &pipe;
        self.run(Op::Idempotent, |mut c| async move { pipe.query_async(&mut c).await }).await
    }

    async fn hash_increment(
        &self,
        key: &str,
        field: &str,
        delta: i64,
        fallback_ttl: Option<Duration>,
    ) -> StateResult<i64> {
        if fallback_ttl.is_none() {
            return self.run(Op::Once, |mut c| async move { c.hincr(key, field, delta).await }).await;
        }
        let (script, ttl) = (&self.incr_with_ttl, &script_ttl(fallback_ttl));
        self.run(Op::Once, |mut c| async move {
            script.key(key).arg("field").arg(field).arg(delta).arg(ttl).invoke_async(&mut c).await
        })
        .await
    }

    async fn hash_increment_float(
        &self,
        key: &str,
        field: &str,
        delta: f64,
        fallback_ttl: Option<Duration>,
    ) -> StateResult<f64> {
        let script = &self.hash_incr_float;
        self.run(Op::Once, |mut c| async move {
            script.key(key).arg(field).arg(delta).arg(script_ttl(fallback_ttl)).invoke_async(&mut c).await
        })
        .await
    }

    async fn hash_compare_and_set(
        &self,
        key: &str,
        field: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        fallback_ttl: Option<Duration>,
    ) -> StateResult<bool> {
        let script = &self.hash_cas;
        let swap = |mut c: Conn| async move {
            let mut invocation = script.key(key);
            invocation
                .arg(field)
                .arg(if expected.is_some() { "1" } else { "0" })
                .arg(expected.unwrap_or_default())
                .arg(if new.is_some() { "1" } else { "0" })
                .arg(new.unwrap_or_default())
                .arg(script_ttl(fallback_ttl));
            invocation.invoke_async(&mut c).await
        };
        self.run_maybe_writing(Op::Once, swap, |&swapped| swapped).await
    }

    async fn lock_acquire(&self, key: &str, fence_key: &str, owner: &str, ttl: Duration) -> StateResult<Option<u64>> {
        let script = &self.lock_acquire;
        let acquire = |mut c: Conn| async move {
            let fence_ttl = ttl_ms(crate::backend::FENCE_TTL);
            script.key(key).key(fence_key).arg(owner).arg(ttl_ms(ttl)).arg(fence_ttl).invoke_async(&mut c).await
        };
        self.run_maybe_writing(Op::Once, acquire, Option::is_some).await
    }

    async fn expire_if_equal(&self, key: &str, value: &[u8], ttl: Duration) -> StateResult<bool> {
        let script = &self.expire_if_equal;
        let expire =
            |mut c: Conn| async move { script.key(key).arg(value).arg(ttl_ms(ttl)).invoke_async(&mut c).await };
        self.run_maybe_writing(Op::Idempotent, expire, |&expired| expired).await
    }

    async fn rate_check(&self, key: &str, limit: u64, window: Duration, cost: u64) -> StateResult<RateDecision> {
        let script = &self.rate;
        let window_us = window.as_micros() as u64;
        // With no cost it only reads: as a read-only script, which a role
        // granted the namespace for reading may run as its ACL user.
        let (allowed, remaining, reset_us, retry_us): (i64, u64, u64, u64) = match cost {
            0 => {
                self.run(Op::Read, |mut c| async move {
                    let answer = eval_read_only(&mut c, script, &[key], (limit, window_us, cost)).await?;
                    redis::from_redis_value(answer).map_err(Into::into)
                })
                .await?
            }
            // Units are taken (written) only when allowed.
            _ => {
                let check = |mut c: Conn| async move {
                    script.key(key).arg(limit).arg(window_us).arg(cost).invoke_async(&mut c).await
                };
                self.run_maybe_writing(Op::Once, check, |&(allowed, ..): &(i64, u64, u64, u64)| allowed == 1).await?
            }
        };
        Ok(RateDecision {
            allowed: allowed == 1,
            remaining,
            reset_after: Duration::from_micros(reset_us),
            retry_after: Duration::from_micros(retry_us),
        })
    }

    async fn delete_matching(&self, pattern: &str) -> StateResult<u64> {
        // Raw SCAN cursors here, on every primary, each step an operation
        // of its own: a clear of many keys takes as long as it takes, and
        // stops at the call's deadline.
        let mut deleted = 0;
        for shard in self.shards(self.deadline()).await? {
            let mut cursor = 0;
            loop {
                let (next, keys) = self.scan_step(self.deadline(), &shard, cursor, pattern, SCAN_COUNT).await?;
                deleted += self.delete_many(&keys).await?;
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(deleted)
    }
}

/// A write that is on the primary but that too few replicas confirmed.
fn unconfirmed(why: String) -> StateError {
    StateError::Unavailable(format!("write not confirmed: {why}; it is on the primary but may not last"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_sums_counters_over_primaries_and_warns_of_eviction() {
        let info = |clients: u64, memory: u64, policy: &str, max: &str| {
            format!(
                "# Server\r\nredis_version:7.0.15\r\n# Clients\r\nconnected_clients:{clients}\r\n\
                 # Memory\r\nused_memory:{memory}\r\nmaxmemory:{max}\r\nmaxmemory_policy:{policy}\r\n\
                 # Persistence\r\nrdb_last_save_time:{}\r\n# Stats\r\nevicted_keys:0\r\nkeyspace_hits:5\r\n",
                1_700_000_000 + memory
            )
        };
        let safe = health_details(&[info(2, 1 << 20, "noeviction", "0"), info(3, 1 << 20, "noeviction", "0")]);
        assert_eq!(safe["connected_clients"], "5");
        assert_eq!(safe["used_memory"], (2u64 << 20).to_string());
        assert_eq!(safe["used_memory_human"], "2.00M");
        assert_eq!(safe["keyspace_hits"], "10");
        assert_eq!(safe["redis_version"], "7.0.15");
        assert_eq!(safe["maxmemory"], "0", "one without a limit: unlimited");
        assert!(!safe.contains_key("warning"));
        let saved = health_details(&[info(1, 300, "noeviction", "0"), info(1, 20, "noeviction", "0")]);
        assert_eq!(saved["rdb_last_save_time"], "1700000020", "the primary saved longest ago");
        // An eviction policy matters only with a memory limit.
        let unlimited = health_details(&[info(1, 10, "allkeys-lru", "0")]);
        assert!(!unlimited.contains_key("warning"));
        let risky = health_details(&[info(1, 10, "noeviction", "0"), info(1, 10, "volatile-lru", "104857600")]);
        assert!(risky["warning"].contains("maxmemory-policy volatile-lru may evict"), "{risky:?}");
        let limited = health_details(&[info(1, 10, "noeviction", "100"), info(1, 10, "noeviction", "50")]);
        assert_eq!(limited["maxmemory"], "150");
        assert_eq!(human_bytes(512), "512B");
    }

    #[test]
    fn a_scan_cursor_keeps_what_is_done_by_slots_across_failovers_and_moves() {
        let primary = |port, id: &str, slots: &[(u16, u16)]| {
            let id = format!("{id}-node-id-of-forty-characters");
            Some(cluster::Primary { host: "127.0.0.1".into(), port, id, slots: slots.to_vec() })
        };
        let a = primary(7001, "a", &[(0, 5000)]);
        let b = primary(7002, "b", &[(5001, 10000)]);
        let c = primary(7003, "c", &[(10001, 16383)]);
        let mut at = ScanCursor::parse(None, "*").unwrap();
        assert_eq!(at.place_in(&[a.clone(), b.clone(), c.clone()]), 0);
        at.primary = Position::At(shard_id(&a).map(str::to_owned));
        at.scan = 42;
        let mut at = ScanCursor::parse(Some(&at.render("*")), "*").unwrap();
        // c's part, not reached yet, fails over to an address before a's:
        // a goes on where it was, then that part comes, then b.
        let shards = [primary(7000, "rc", &[(10001, 16383)]), a.clone(), b.clone()];
        assert_eq!((at.place_in(&shards), at.scan), (1, 42));
        assert_eq!(at.finished(&shards, 1), 0);
        assert_eq!(at.finished(&shards, 0), 2);
        // From the cursor, with b's scan under way: b fails over (its scan
        // starts again on the new primary), and a slot of b's moves to a,
        // so a is scanned again; c's part is still done.
        at.primary = Position::At(shard_id(&b).map(str::to_owned));
        at.scan = 7;
        let cursor = at.render("*");
        assert!(cursor.ends_with(":0-5000,10001-16383"), "{cursor}");
        let mut at = ScanCursor::parse(Some(&cursor), "*").unwrap();
        let shards = [
            primary(7000, "rc", &[(10001, 16383)]),
            primary(7001, "a", &[(0, 5000), (10000, 10000)]),
            primary(7004, "rb", &[(5001, 9999)]),
        ];
        assert_eq!((at.place_in(&shards), at.scan), (1, 0));
        assert_eq!(at.finished(&shards, 1), 2);
        assert_eq!(at.finished(&shards, 2), 3);
        // A primary without slots (importing one) is done by its id.
        let empty = primary(7005, "e", &[]);
        let alone = std::slice::from_ref(&empty);
        assert_eq!(at.place_in(alone), 0);
        assert_eq!(at.finished(alone, 0), 1);
        let at = ScanCursor::parse(Some(&at.render("*")), "*").unwrap();
        assert!(at.done.covers(&empty));
        // The one server of the other kinds: the old three-part cursor
        // still reads.
        let mut at = ScanCursor::parse(Some("9::"), "*").unwrap();
        assert_eq!((at.place_in(&[None]), at.scan), (0, 9));
        assert_eq!(at.finished(&[None], 0), 1);
        // A list of slots this version would not write (out of range,
        // backwards, overlapping, an older version's) starts the listing
        // over.
        let shards = [a.clone(), b.clone()];
        for other in ["16384", "9-3", "0-100,50-60", "x", "0-100,@a,0-5"] {
            let mut at = ScanCursor::parse(Some(&format!("5::{}:{other}", shard_id(&b).unwrap())), "*").unwrap();
            assert_eq!((at.place_in(&shards), at.scan), (0, 0), "{other}");
        }
        let mut at = ScanCursor::parse(Some("5::127.0.0.1:7002"), "*").unwrap();
        assert_eq!((at.place_in(&shards), at.scan), (0, 0), "a cursor naming a primary by address");
    }
}
