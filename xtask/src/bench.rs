//! `cargo xtask bench`: rolehost next to native baselines, measured in the
//! same run on the same machine. Prints one table (Markdown).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rolehost::backend::{Backend, MemoryBackend, RedisBackend, RedisOptions};
use rolehost::cache::CompileCache;
use rolehost::namespace::Space;
use rolehost::workers::Workers;
use rolehost::{Host, HostOptions, RoleSpec};

struct Row {
    case: String,
    rolehost: String,
    baseline: String,
    ratio: String,
}

impl Row {
    fn empty() -> Self {
        Row { case: String::new(), rolehost: "—".into(), baseline: "—".into(), ratio: "—".into() }
    }
}

/// Runs the rows named in `only` (letters `a`…`g`), or every row.
pub fn run(root: &Path, only: &[String]) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let wanted = |row: &str| only.is_empty() || only.iter().any(|o| o == row);
    let rows = runtime.block_on(measure(root, &wanted))?;
    println!("| case | rolehost | baseline | ratio |\n|---|---|---|---|");
    for row in rows {
        println!("| {} | {} | {} | {} |", row.case, row.rolehost, row.baseline, row.ratio);
    }
    Ok(())
}

fn spec(root: &Path) -> anyhow::Result<RoleSpec> {
    RoleSpec::from_path(root.join("target/roles/bench.wasm"))
}

fn host(root: &Path, backend: Arc<dyn Backend>, cache: Option<CompileCache>) -> anyhow::Result<Host> {
    host_for(root, backend, cache, 128, 0)
}

/// A host as `serve` makes it (pooling), for `concurrency` calls at once.
fn host_for(
    root: &Path,
    backend: Arc<dyn Backend>,
    cache: Option<CompileCache>,
    concurrency: usize,
    warm_instances: usize,
) -> anyhow::Result<Host> {
    let options = HostOptions { cache, pooling: true, max_concurrency: concurrency, ..HostOptions::default() };
    let host = Host::with_options(backend, "bench:", options)?;
    let mut spec = spec(root)?;
    spec.limits.max_concurrency = concurrency;
    spec.limits.warm_instances = warm_instances;
    host.load(&spec)?;
    Ok(host)
}

/// Median and calls per second of `n` sequential calls of `role`.
async fn sequential(host: &Host, role: &str, body: &[u8], n: usize) -> anyhow::Result<(Duration, f64)> {
    let mut times = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        host.call(role, body).await?;
        times.push(t.elapsed());
    }
    let total = start.elapsed();
    times.sort();
    Ok((times[n / 2], n as f64 / total.as_secs_f64()))
}

/// A row of 20 000 sequential calls with `body`, and their median.
async fn one_at_a_time(host: &Host, body: &[u8], case: &str, baseline: &str) -> anyhow::Result<(Row, Duration)> {
    let (median, rate) = sequential(host, "bench", body, 20_000).await?;
    let row = Row {
        case: case.into(),
        rolehost: format!("median {}, {}", micros(median), kilo(rate)),
        baseline: baseline.into(),
        ratio: "—".into(),
    };
    Ok((row, median))
}

/// Operations per second of `n` runs of `op`, `concurrency` at a time.
async fn concurrent<F, Fut>(n: usize, concurrency: usize, op: F) -> anyhow::Result<f64>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (op, next) = (op.clone(), next.clone());
        tasks.spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                op().await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

struct Redis(Child, u16);

impl Redis {
    fn pid(&self) -> String {
        self.0.id().to_string()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis() -> anyhow::Result<Redis> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start redis-server (install it: apt-get install redis-server)")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Redis(child, port))
}

/// `redis-benchmark` requests per second for SET and GET (in that order),
/// when it is installed.
fn redis_benchmark(port: u16, extra: &[&str]) -> Option<Vec<(String, f64)>> {
    let out = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-t", "set,get", "-n", "200000", "-c", "50", "-d", "100", "-q"])
        .args(extra)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let figures: Vec<(String, f64)> = text
        .split(['\r', '\n'])
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let rps = rest.split_whitespace().next()?.parse::<f64>().ok()?;
            Some((name.trim().to_owned(), rps))
        })
        .collect();
    (!figures.is_empty()).then_some(figures)
}

fn shown(figures: &[(String, f64)]) -> String {
    figures.iter().map(|(name, rps)| format!("{name} {}", kilo(*rps))).collect::<Vec<_>>().join(", ")
}

fn met(ok: bool) -> String {
    if ok { "met" } else { "missed" }.into()
}

/// Resident and peak resident memory of this process, bytes.
fn rss() -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status.lines().find(|l| l.starts_with(name)).with_context(|| format!("no {name} in /proc"))?;
        let kib: u64 = line.split_whitespace().nth(1).context("bad /proc line")?.parse()?;
        Ok(kib * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn kilo(per_second: f64) -> String {
    format!("{:.1}k/s", per_second / 1000.0)
}

async fn measure(root: &Path, wanted: &dyn Fn(&str) -> bool) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    // Kept to the end: the CPU use of a row counts the threads alive at
    // its end, and an exiting worker would take its share away.
    let workers = Workers::start(WORKERS)?;
    // (f) first, while the process's peak memory is still its own.
    if wanted("f") {
        rows.push(in_flight_memory(root).await?);
    }
    if wanted("e") {
        rows.push(load_times(root)?);
    }
    let memory: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    if wanted("a") || wanted("b") {
        // (a) empty call and (b) GET + SET on the memory backend, one at a time.
        let host_mem = host(root, memory.clone(), None)?;
        for _ in 0..2000 {
            host_mem.call("bench", b"").await?;
        }
        if wanted("a") {
            let goal = "goal: median ≤ 10 µs";
            let row = one_at_a_time(&host_mem, b"", "(a) empty call, memory, 1 at a time", goal).await?;
            rows.push(Row { ratio: met(row.1 <= Duration::from_micros(10)), ..row.0 });
            let warm = host_for(root, memory.clone(), None, 128, 1)?;
            warm.call("bench", b"").await?;
            let case = "(a) empty call, memory, reusing a warm instance";
            rows.push(one_at_a_time(&warm, b"", case, "`warm-instances = 1`: no instantiation").await?.0);
        }
        if wanted("b") {
            let case = "(b) GET + SET 100 B, memory, 1 at a time";
            let baseline = "plain wasmtime host, no pooling: ≈15k/s (issue figure)";
            rows.push(one_at_a_time(&host_mem, b"gs", case, baseline).await?.0);
        }
    }
    if wanted("c") || wanted("d") {
        let redis = start_redis()?;
        let url = format!("redis://127.0.0.1:{}/0", redis.1);
        let backend: Arc<dyn Backend> =
            Arc::new(RedisBackend::new(&RedisOptions::new(&url)).map_err(anyhow::Error::msg)?);
        let host_redis = Arc::new(host(root, backend.clone(), None)?);
        if wanted("c") {
            let backend_for_pairs = backend.clone();
            let warm = Arc::new(host_for(root, backend, None, 128, 64)?);
            rows.extend(redis_pairs(&host_redis, &warm, &url, &redis).await?);
            for (host, how) in [(&host_redis, ""), (&warm, ", warm instances")] {
                rows.push(worker_pairs(&workers, host, how, &url, &redis.pid()).await?);
            }
            rows.extend(backend_pairs(&backend_for_pairs, &redis.pid()).await?);
            rows.push(worker_backend_pairs(&workers, &backend_for_pairs, &redis.pid()).await?);
            rows.extend(redis_bound_pairs(root).await?);
        }
        if wanted("d") {
            rows.extend(redis_batches(&host_redis, redis.1).await?);
        }
    }
    // (g) last: the big JS and Python instances leave the process larger.
    if wanted("g") {
        rows.extend(languages(root, memory).await?);
    }
    Ok(rows)
}

/// (e) loading a role: cold compile, then from the compile cache.
fn load_times(root: &Path) -> anyhow::Result<Row> {
    let memory: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let cache_dir = std::env::temp_dir().join(format!("rolehost-bench-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache_dir);
    let t = Instant::now();
    host(root, memory.clone(), Some(CompileCache::new(&cache_dir)))?;
    let cold = t.elapsed();
    let t = Instant::now();
    let cached_host = host(root, memory, Some(CompileCache::new(&cache_dir)))?;
    let cached = t.elapsed();
    anyhow::ensure!(cached_host.role("bench").is_some_and(|r| r.from_cache()), "cache not used");
    let _ = std::fs::remove_dir_all(&cache_dir);
    Ok(Row {
        case: "(e) load a role: cold / from cache".into(),
        rolehost: format!("{:.1} ms / {:.1} ms", cold.as_secs_f64() * 1e3, cached.as_secs_f64() * 1e3),
        baseline: "goal: cached ≤ 20 ms".into(),
        ratio: met(cached <= Duration::from_millis(20)),
    })
}

/// Rounds of each side in row (c), run alternately so that a change in the
/// machine's speed during the run (shared cores) hits both sides alike.
const ROUNDS: usize = 5;

/// (c) GET + SET on Redis, next to native redis-rs pairs and redis-benchmark.
/// `warm` is the same role with `warm-instances`, measured at the highest
/// concurrency to show what instantiation costs there.
async fn redis_pairs(host: &Arc<Host>, warm: &Arc<Host>, url: &str, redis: &Redis) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let native = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
    for (concurrency, host) in [(1, host), (16, host), (64, host), (64, warm)] {
        let n = if concurrency == 1 { 5_000 } else { 30_000 };
        let (ours, theirs) = pair_rounds(host, &native, n, concurrency, &redis.pid()).await?;
        let how = if Arc::ptr_eq(host, warm) { ", warm instances" } else { "" };
        rows.push(pairs_row(format!("Redis, concurrency {concurrency}{how}"), &ours, &theirs, concurrency == 64));
    }
    if let Some(figures) = redis_benchmark(redis.1, &[]) {
        rows.push(Row {
            case: "(c) redis-benchmark -c 50 -d 100".into(),
            rolehost: "—".into(),
            baseline: shown(&figures),
            ratio: "—".into(),
        });
    }
    Ok(rows)
}

/// `ROUNDS` rounds of `n` GET + SET calls of `host` and, alternating with
/// them, of the same pairs straight on `native`, `concurrency` at a time.
async fn pair_rounds(
    host: &Arc<Host>,
    native: &redis::aio::MultiplexedConnection,
    n: usize,
    concurrency: usize,
    redis_pid: &str,
) -> anyhow::Result<(Rounds, Rounds)> {
    let (mut ours, mut theirs) = (Rounds::default(), Rounds::default());
    for _ in 0..ROUNDS {
        let h = host.clone();
        let cpu = CpuUse::start(redis_pid);
        let rate = concurrent(n, concurrency, move || {
            let h = h.clone();
            async move {
                h.call("bench", b"gs").await?;
                Ok(())
            }
        })
        .await?;
        ours.add(rate, cpu.per_op(n));
        let conn = native.clone();
        let cpu = CpuUse::start(redis_pid);
        let rate = concurrent(n, concurrency, move || native_pair(conn.clone())).await?;
        theirs.add(rate, cpu.per_op(n));
    }
    Ok((ours, theirs))
}

/// The GET + SET pair the bench role makes, straight on the backend.
async fn backend_pair(b: &dyn Backend) -> anyhow::Result<()> {
    b.get("bench:bench:kv:k", None).await.map_err(anyhow::Error::msg)?;
    b.set("bench:bench:kv:k", &[b'v'; 100], None).await.map_err(anyhow::Error::msg)?;
    Ok(())
}

/// The GET + SET pair the bench role makes, straight on redis-rs.
async fn native_pair(mut conn: redis::aio::MultiplexedConnection) -> anyhow::Result<()> {
    let _: Option<Vec<u8>> = redis::cmd("GET").arg("bench:bench:kv:k").query_async(&mut conn).await?;
    let () = redis::cmd("SET").arg("bench:bench:kv:k").arg(&[b'v'; 100][..]).query_async(&mut conn).await?;
    Ok(())
}

/// Worker threads of the thread-per-core row.
const WORKERS: usize = 2;

/// (c) at concurrency 64 as `serve` runs calls: on 2 worker threads of
/// their own (`host/src/workers.rs`), 32 calls on each, every worker with
/// its own Redis connection; redis-rs likewise, a connection per worker.
async fn worker_pairs(
    workers: &Workers,
    host: &Arc<Host>,
    how: &str,
    url: &str,
    redis_pid: &str,
) -> anyhow::Result<Row> {
    let (n, mut ours, mut theirs) = (30_000, Rounds::default(), Rounds::default());
    for _ in 0..ROUNDS {
        let h = host.clone();
        let cpu = CpuUse::start(redis_pid);
        let rate = on_workers(workers, n, 64, move || {
            let h = h.clone();
            async move {
                h.call("bench", b"gs").await?;
                Ok(move || {
                    let h = h.clone();
                    async move { h.call("bench", b"gs").await.map(drop).map_err(Into::into) }
                })
            }
        })
        .await?;
        ours.add(rate, cpu.per_op(n));
        let url = url.to_owned();
        let cpu = CpuUse::start(redis_pid);
        let rate = on_workers(workers, n, 64, move || {
            let url = url.clone();
            async move {
                let conn = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
                native_pair(conn.clone()).await?;
                Ok(move || native_pair(conn.clone()))
            }
        })
        .await?;
        theirs.add(rate, cpu.per_op(n));
    }
    let how = format!("Redis, concurrency 64 on {WORKERS} worker threads (as `serve` runs calls){how}");
    Ok(pairs_row(how, &ours, &theirs, true))
}

/// The worker row broken down: the same pairs straight on the Redis
/// backend (a connection per worker), without wasm.
async fn worker_backend_pairs(workers: &Workers, backend: &Arc<dyn Backend>, redis_pid: &str) -> anyhow::Result<Row> {
    let (n, b) = (30_000, backend.clone());
    let cpu = CpuUse::start(redis_pid);
    let rate = on_workers(workers, n, 64, move || {
        let b = b.clone();
        async move {
            let pair = move || {
                let b = b.clone();
                async move { backend_pair(&*b).await }
            };
            pair().await?;
            Ok(pair)
        }
    })
    .await?;
    Ok(Row {
        case: format!("(c) breakdown: Redis backend alone (no wasm), concurrency 64 on {WORKERS} worker threads"),
        rolehost: format!("{} pairs; CPU per pair: {}", kilo(rate), cpu.per_op(n)),
        ..Row::empty()
    })
}

/// Operations per second of `n` runs, `concurrency` at a time, split
/// evenly over the `WORKERS` workers. Each worker first makes its operation
/// with `setup` (and so, say, a connection of its own), untimed.
async fn on_workers<S, SetUp, F, Fut>(workers: &Workers, n: usize, concurrency: usize, setup: S) -> anyhow::Result<f64>
where
    S: Fn() -> SetUp + Send + Sync + Clone + 'static,
    SetUp: std::future::Future<Output = anyhow::Result<F>> + Send,
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let ready = Arc::new(tokio::sync::Barrier::new(WORKERS + 1));
    let mut finished = Vec::new();
    // Each goes to the least busy worker: one each.
    for _ in 0..WORKERS {
        let (setup, ready, (done, finish)) = (setup.clone(), ready.clone(), tokio::sync::oneshot::channel());
        workers.spawn(move || async move {
            let op = setup().await;
            ready.wait().await;
            let result = match op {
                Ok(op) => concurrent(n / WORKERS, concurrency / WORKERS, op).await.map(|_| Instant::now()),
                Err(error) => Err(error),
            };
            let _ = done.send(result);
        });
        finished.push(finish);
    }
    ready.wait().await;
    let start = Instant::now();
    let mut last = start;
    for finish in finished {
        last = last.max(finish.await??);
    }
    Ok((n / WORKERS * WORKERS) as f64 / (last - start).as_secs_f64())
}

/// A (c) row: rolehost's calls next to redis-rs's pairs; with `goal`, the
/// ratio checked against the goal (0.9).
fn pairs_row(how: String, ours: &Rounds, theirs: &Rounds, goal: bool) -> Row {
    let ratio = ours.median().0 / theirs.median().0;
    let goal = if goal { format!(" (goal ≥ 0.90): {}", met(ratio >= 0.9)) } else { String::new() };
    Row {
        case: format!("(c) GET + SET 100 B, {how}"),
        rolehost: format!("{} calls; CPU per call: {}", ours.shown(), ours.median().1),
        baseline: format!("redis-rs: {} pairs; CPU per pair: {}", theirs.shown(), theirs.median().1),
        ratio: format!("{ratio:.2}{goal}"),
    }
}

/// (c) again with Redis as the bottleneck, as when one Redis serves many
/// hosts or runs on a smaller machine than they do: a redis-server of its
/// own held to a tenth of one core by a cgroup CPU quota, so throughput
/// follows the server's CPU per pair rather than the client's. Skipped
/// where the process may not make cgroups.
async fn redis_bound_pairs(root: &Path) -> anyhow::Result<Vec<Row>> {
    const SHARE: u32 = 10;
    let case = format!("Redis held to {SHARE} % of one core, concurrency 64");
    let redis = start_redis()?;
    let _limit = match CpuLimit::apply(&redis.pid(), SHARE) {
        Ok(limit) => limit,
        Err(why) => {
            let skipped = format!("skipped: cannot limit redis-server's CPU ({why})");
            return Ok(vec![Row { case: format!("(c) GET + SET 100 B, {case}"), rolehost: skipped, ..Row::empty() }]);
        }
    };
    let url = format!("redis://127.0.0.1:{}/0", redis.1);
    let backend: Arc<dyn Backend> = Arc::new(RedisBackend::new(&RedisOptions::new(&url)).map_err(anyhow::Error::msg)?);
    let native = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
    let mut rows = Vec::new();
    for (warm_instances, how) in [(0, ""), (64, ", warm instances")] {
        let host = Arc::new(host_for(root, backend.clone(), None, 128, warm_instances)?);
        let (ours, theirs) = pair_rounds(&host, &native, 20_000, 64, &redis.pid()).await?;
        rows.push(pairs_row(format!("{case}{how}"), &ours, &theirs, true));
    }
    Ok(rows)
}

/// A process held to a share of one core: a cgroup of its own (v1 `cpu`
/// controller or v2 `cpu.max`). Dropping it moves the process back to
/// the root cgroup and removes the one made.
struct CpuLimit {
    dir: std::path::PathBuf,
    /// The root cgroup's process list, and the process.
    back: (std::path::PathBuf, String),
}

impl CpuLimit {
    fn apply(pid: &str, percent: u32) -> Result<Self, String> {
        const PERIOD_US: u32 = 10_000;
        let quota = PERIOD_US * percent / 100;
        let v1 = Path::new("/sys/fs/cgroup/cpu");
        let v2 = Path::new("/sys/fs/cgroup");
        let write = |file: std::path::PathBuf, text: String| {
            std::fs::write(&file, text).map_err(|e| format!("{}: {e}", file.display()))
        };
        let (root, settings) = if v1.join("cpu.cfs_quota_us").exists() {
            let settings = vec![
                ("cpu.cfs_period_us", PERIOD_US.to_string()),
                ("cpu.cfs_quota_us", quota.to_string()),
                // cgroup.procs moves every thread of the process.
                ("cgroup.procs", pid.to_owned()),
            ];
            (v1, settings)
        } else if std::fs::read_to_string(v2.join("cgroup.controllers")).is_ok_and(|c| c.contains("cpu")) {
            write(v2.join("cgroup.subtree_control"), "+cpu".into())?;
            (v2, vec![("cpu.max", format!("{quota} {PERIOD_US}")), ("cgroup.procs", pid.to_owned())])
        } else {
            return Err("no cgroup cpu controller".into());
        };
        let dir = root.join(format!("rolehost-bench-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let limit = Self { dir, back: (root.join("cgroup.procs"), pid.to_owned()) };
        for (file, text) in settings {
            write(limit.dir.join(file), text)?;
        }
        Ok(limit)
    }
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.back.0, &self.back.1);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// (c) broken down: the same GET + SET pairs straight on the Redis
/// backend, without wasm, to tell the backend's cost from the guest's.
async fn backend_pairs(backend: &Arc<dyn Backend>, redis_pid: &str) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for concurrency in [1, 64] {
        let b = backend.clone();
        let cpu = CpuUse::start(redis_pid);
        let rate = concurrent(20_000, concurrency, move || {
            let b = b.clone();
            async move { backend_pair(&*b).await }
        })
        .await?;
        rows.push(Row {
            case: format!("(c) breakdown: Redis backend alone (no wasm), concurrency {concurrency}"),
            rolehost: format!("{} pairs; CPU per pair: {}", kilo(rate), cpu.per_op(20_000)),
            baseline: "—".into(),
            ratio: "—".into(),
        });
    }
    Ok(rows)
}

/// (d) set-many and get-many of 1000 keys on Redis: keys per second, next
/// to `redis-benchmark -P 16`.
async fn redis_batches(host: &Arc<Host>, port: u16) -> anyhow::Result<Vec<Row>> {
    const KEYS: f64 = 1000.0;
    let reference = redis_benchmark(port, &["-P", "16"]);
    let mut rows = Vec::new();
    for (request, name, reference_name) in [(&b"sm"[..], "set-many", "SET"), (&b"gm"[..], "get-many", "GET")] {
        let h = host.clone();
        let calls = concurrent(400, 8, move || {
            let h = h.clone();
            async move {
                let response = h.call("bench", request).await?;
                anyhow::ensure!(request != b"gm" || response == b"1000", "get-many found {response:?} keys");
                Ok(())
            }
        })
        .await?;
        let keys = calls * KEYS;
        let theirs = reference.as_ref().and_then(|f| f.iter().find(|(n, _)| n == reference_name)).map(|(_, r)| *r);
        rows.push(Row {
            case: format!("(d) {name} of 1000 keys × 100 B, Redis, concurrency 8"),
            rolehost: format!("{} keys", kilo(keys)),
            baseline: theirs.map_or("redis-benchmark not installed".into(), |r| {
                format!("redis-benchmark -P 16 -c 50: {reference_name} {}", kilo(r))
            }),
            ratio: theirs.map_or("—".into(), |r| format!("{:.2} (goal ≥ 0.50): {}", keys / r, met(keys / r >= 0.5))),
        });
    }
    Ok(rows)
}

/// (f) resident memory with 1000 calls in flight, per call. Every call
/// waits inside the host for a lock the benchmark holds.
async fn in_flight_memory(root: &Path) -> anyhow::Result<Row> {
    const CALLS: usize = 1000;
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let host = Arc::new(host_for(root, backend.clone(), None, CALLS + 24, 0)?);
    let namespace = host.role("bench").context("bench role")?.namespace().clone();
    let key = namespace.key(Space::Lock, "gate").map_err(anyhow::Error::msg)?;
    let fence = namespace.key(Space::Fence, "gate").map_err(anyhow::Error::msg)?;
    backend.lock_acquire(&key, &fence, "bench", Duration::from_secs(30)).await.map_err(anyhow::Error::msg)?;
    // Warm up: one call, so what is built once is not counted per call.
    host.call("bench", b"").await?;
    let (before, _) = rss()?;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..CALLS {
        let host = host.clone();
        calls.spawn(async move { host.call("bench", b"hold").await });
    }
    let in_flight = host.metrics().in_flight.with_label_values(&["bench"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while in_flight.get() < CALLS as i64 {
        anyhow::ensure!(Instant::now() < deadline, "only {} calls got in flight", in_flight.get());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (during, _) = rss()?;
    while let Some(result) = calls.join_next().await {
        result??;
    }
    let per_call = during.saturating_sub(before) as f64 / CALLS as f64;
    Ok(Row {
        case: "(f) resident memory, 1000 calls in flight".into(),
        rolehost: format!(
            "{:.0} KiB per call ({:.0} MiB in all)",
            per_call / 1024.0,
            (during - before) as f64 / 1048576.0
        ),
        baseline: "goal: ≤ 2 MiB per call".into(),
        ratio: met(per_call <= 2.0 * 1048576.0),
    })
}

/// (g) the counter role in each language, memory backend, one call at a
/// time: a fresh instance per call, and reusing a warm instance.
async fn languages(root: &Path, backend: Arc<dyn Backend>) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let cache = CompileCache::new(root.join("target/bench-compile-cache"));
    for (language, file) in
        [("Rust", "counter"), ("JavaScript", "counter-js"), ("Python", "counter-py"), ("C", "counter-c")]
    {
        let wasm = root.join(format!("target/roles/{file}.wasm"));
        if !wasm.exists() {
            eprintln!("bench: skipping {file}: not built");
            continue;
        }
        let mut medians = Vec::new();
        for warm_instances in [0, 1] {
            let options =
                HostOptions { cache: Some(cache.clone()), pooling: true, max_concurrency: 4, ..HostOptions::default() };
            let host = Host::with_options(backend.clone(), "bench:", options)?;
            let mut spec = RoleSpec::from_path(&wasm)?;
            spec.name = format!("{file}-{warm_instances}");
            spec.limits.warm_instances = warm_instances;
            host.load(&spec)?;
            for _ in 0..20 {
                host.call(&spec.name, b"").await?;
            }
            let n = if file == "counter" || file == "counter-c" { 5000 } else { 500 };
            medians.push(sequential(&host, &spec.name, b"", n).await?.0);
        }
        let bytes = std::fs::metadata(&wasm)?.len();
        rows.push(Row {
            case: format!("(g) counter in {language} ({:.1} MB), memory, 1 at a time", bytes as f64 / 1e6),
            rolehost: format!("fresh instance: median {}", micros(medians[0])),
            baseline: format!("warm instance: median {}", micros(medians[1])),
            ratio: format!("{:.1}× per call for isolation", medians[0].as_secs_f64() / medians[1].as_secs_f64()),
        });
    }
    Ok(rows)
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// Rates (per second) and CPU use of the rounds of one side of a row.
#[derive(Default)]
struct Rounds(Vec<(f64, Cpu)>);

impl Rounds {
    fn add(&mut self, rate: f64, cpu: Cpu) {
        self.0.push((rate, cpu));
        self.0.sort_by(|a, b| a.0.total_cmp(&b.0));
    }

    /// The median round: its rate and its CPU use.
    fn median(&self) -> (f64, Cpu) {
        self.0[self.0.len() / 2]
    }

    /// "median (lowest–highest)".
    fn shown(&self) -> String {
        let (low, high) = (self.0[0].0, self.0[self.0.len() - 1].0);
        format!("{} ({:.0}–{:.0}k)", kilo(self.median().0), low / 1000.0, high / 1000.0)
    }
}

/// CPU microseconds per operation: this process, the Redis server.
#[derive(Clone, Copy)]
struct Cpu(f64, f64);

impl std::fmt::Display for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "client {:.1} µs + redis-server {:.1} µs", self.0, self.1)
    }
}

/// CPU time used by this process and by the Redis server over a stretch of
/// the benchmark, from the kernel's per-thread run times
/// (`/proc/PID/task/*/schedstat`, nanoseconds, user and system together).
struct CpuUse {
    redis_pid: String,
    ours: u64,
    redis: u64,
}

impl CpuUse {
    fn start(redis_pid: &str) -> Self {
        Self { redis_pid: redis_pid.to_owned(), ours: cpu_ns("self"), redis: cpu_ns(redis_pid) }
    }

    /// CPU per operation since `start`.
    fn per_op(&self, n: usize) -> Cpu {
        let per = |ns: u64| ns as f64 / n as f64 / 1000.0;
        Cpu(per(cpu_ns("self").saturating_sub(self.ours)), per(cpu_ns(&self.redis_pid).saturating_sub(self.redis)))
    }
}

/// Nanoseconds on CPU of every thread of process `pid` (0 if unreadable).
fn cpu_ns(pid: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}
