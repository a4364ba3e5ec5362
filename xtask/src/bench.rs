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
use rolehost::{Host, HostOptions, RoleSpec};

struct Row {
    case: String,
    rolehost: String,
    baseline: String,
    ratio: String,
}

pub fn run(root: &Path) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let rows = runtime.block_on(measure(root))?;
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
    let options = HostOptions { cache, pooling: true, max_concurrency: 128, ..HostOptions::default() };
    let host = Host::with_options(backend, "bench:", options)?;
    host.load(&spec(root)?)?;
    Ok(host)
}

/// Median and calls per second of `n` sequential calls.
async fn sequential(host: &Host, body: &[u8], n: usize) -> anyhow::Result<(Duration, f64)> {
    let mut times = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        host.call("bench", body).await?;
        times.push(t.elapsed());
    }
    let total = start.elapsed();
    times.sort();
    Ok((times[n / 2], n as f64 / total.as_secs_f64()))
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

/// `redis-benchmark` requests per second for GET and SET, when installed.
fn redis_benchmark(port: u16, extra: &[&str]) -> Option<String> {
    let out = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-t", "get,set", "-n", "200000", "-c", "50", "-d", "100", "-q"])
        .args(extra)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let figures: Vec<String> = text
        .split(['\r', '\n'])
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let rps = rest.split_whitespace().next()?.parse::<f64>().ok()?;
            Some(format!("{} {}", name.trim(), kilo(rps)))
        })
        .collect();
    (!figures.is_empty()).then(|| figures.join(", "))
}

fn kilo(per_second: f64) -> String {
    format!("{:.1}k/s", per_second / 1000.0)
}

async fn measure(root: &Path) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let memory: Arc<dyn Backend> = Arc::new(MemoryBackend::new());

    // (e) load: cold compile, then from the compile cache.
    let cache_dir = std::env::temp_dir().join(format!("rolehost-bench-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache_dir);
    let t = Instant::now();
    host(root, memory.clone(), Some(CompileCache::new(&cache_dir)))?;
    let cold = t.elapsed();
    let t = Instant::now();
    let cached_host = host(root, memory.clone(), Some(CompileCache::new(&cache_dir)))?;
    let cached = t.elapsed();
    anyhow::ensure!(cached_host.role("bench").is_some_and(|r| r.from_cache()), "cache not used");
    let _ = std::fs::remove_dir_all(&cache_dir);
    rows.push(Row {
        case: "(e) load a role: cold / from cache".into(),
        rolehost: format!("{:.1} ms / {:.1} ms", cold.as_secs_f64() * 1e3, cached.as_secs_f64() * 1e3),
        baseline: "goal: cached ≤ 20 ms".into(),
        ratio: if cached <= Duration::from_millis(20) { "met".into() } else { "missed".into() },
    });

    // (a) empty call and (b) GET + SET on the memory backend, one at a time.
    let host_mem = host(root, memory.clone(), None)?;
    for _ in 0..2000 {
        host_mem.call("bench", b"").await?;
    }
    let (median, rate) = sequential(&host_mem, b"", 20_000).await?;
    rows.push(Row {
        case: "(a) empty call, memory, 1 at a time".into(),
        rolehost: format!("median {:.1} µs, {}", median.as_secs_f64() * 1e6, kilo(rate)),
        baseline: "goal: median ≤ 10 µs".into(),
        ratio: if median <= Duration::from_micros(10) { "met".into() } else { "missed".into() },
    });
    let (median, rate) = sequential(&host_mem, b"gs", 20_000).await?;
    rows.push(Row {
        case: "(b) GET + SET 100 B, memory, 1 at a time".into(),
        rolehost: format!("median {:.1} µs, {}", median.as_secs_f64() * 1e6, kilo(rate)),
        baseline: "plain wasmtime host, no pooling: ≈15k/s (issue figure)".into(),
        ratio: "—".into(),
    });

    // (c) GET + SET on Redis, next to native redis-rs pairs.
    let redis = start_redis()?;
    let url = format!("redis://127.0.0.1:{}/0", redis.1);
    let backend: Arc<dyn Backend> = Arc::new(RedisBackend::new(&RedisOptions::new(&url)).map_err(anyhow::Error::msg)?);
    let host_redis = Arc::new(host(root, backend, None)?);
    let client = redis::Client::open(url.as_str())?;
    let native = client.get_multiplexed_async_connection().await?;
    for concurrency in [1, 16, 64] {
        let n = 20_000;
        let h = host_redis.clone();
        let ours = concurrent(n, concurrency, move || {
            let h = h.clone();
            async move {
                h.call("bench", b"gs").await?;
                Ok(())
            }
        })
        .await?;
        let conn = native.clone();
        let theirs = concurrent(n, concurrency, move || {
            let mut conn = conn.clone();
            async move {
                let _: Option<Vec<u8>> = redis::cmd("GET").arg("bench:bench:kv:k").query_async(&mut conn).await?;
                let () = redis::cmd("SET").arg("bench:bench:kv:k").arg(&[b'v'; 100][..]).query_async(&mut conn).await?;
                Ok(())
            }
        })
        .await?;
        rows.push(Row {
            case: format!("(c) GET + SET 100 B, Redis, concurrency {concurrency}"),
            rolehost: format!("{} calls", kilo(ours)),
            baseline: format!("redis-rs: {} pairs", kilo(theirs)),
            ratio: format!("{:.2}{}", ours / theirs, if concurrency == 64 { " (goal ≥ 0.90)" } else { "" }),
        });
    }
    if let Some(figures) = redis_benchmark(redis.1, &[]) {
        rows.push(Row {
            case: "(c) redis-benchmark -c 50 -d 100".into(),
            rolehost: "—".into(),
            baseline: figures,
            ratio: "—".into(),
        });
    }
    Ok(rows)
}
