//! The `rolehost` command: thin over the library.

/// mimalloc, as the benchmark measures it: glibc malloc contends across the
/// worker threads on the call path.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use rolehost::backend::Backend;
use rolehost::backend::Expiry;
use rolehost::cache::CompileCache;
use rolehost::config::{with_redis_overrides, StateConfig, REDIS_DB_ENV, REDIS_HOST_ENV, REDIS_PORT_ENV, STATE_ENV};
use rolehost::logs::Logs;
use rolehost::manifest::{Manifest, DEFAULT_GLOBAL_PREFIX};
use rolehost::namespace::{validate_global_prefix, validate_identity, Namespace, Space};
use rolehost::serve::{serve, ManifestSource, ServeOptions, ADMIN_TOKEN_ENV};
use rolehost::{acl, checkpoint, Host, HostOptions, RoleSpec};

#[derive(Parser)]
#[command(name = "rolehost", version, about = "Run WebAssembly roles with private, prefixed state")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Common {
    /// State backend: `memory`, `redis://[user@]host:port[/db]`, `redis+cluster://h:p,h:p,…` or
    /// `redis+sentinel://h:p,…/PRIMARY`; `rediss…` for TLS (password from REDIS_PASSWORD).
    #[arg(long, global = true, env = STATE_ENV)]
    state: Option<String>,
    /// Prefix of every key (default from the manifest, else `rolehost:`).
    #[arg(long, global = true, env = "ROLEHOST_PREFIX")]
    prefix: Option<String>,
}

#[derive(Args, Clone, Copy)]
struct Repeat {
    /// Call this many times (each response on its own line).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    repeat: u64,
    /// With --repeat: this many calls in flight at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
}

#[derive(Subcommand)]
enum Command {
    /// Serve every role of a manifest over HTTP until SIGINT/SIGTERM.
    Serve {
        #[arg(long)]
        manifest: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Largest request body in bytes (past it: 413).
        #[arg(long, default_value_t = 1 << 20)]
        max_body_bytes: usize,
        /// Request bodies held at once over all requests, in bytes (past it:
        /// 503); at least --max-body-bytes [default: 256 MiB, or
        /// --max-body-bytes if more].
        #[arg(long)]
        max_buffered_bytes: Option<usize>,
        /// Seconds a client has to send a request's headers (also how long
        /// an idle connection stays open), and again its body (past it:
        /// 408); a connection whose response makes no progress that long
        /// is closed.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        read_timeout_secs: u64,
        /// Connections open at once; past it, new ones wait to be accepted.
        #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
        max_connections: u32,
        /// Seconds calls in flight and unsent fire-and-forget writes may take
        /// after a shutdown signal, in all; a second signal stops at once.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=86_400))]
        shutdown_grace_secs: u64,
        /// Watch role files and the manifest, and reload what changed.
        #[arg(long)]
        watch: bool,
        /// Calls at once across all roles (past it: 503).
        #[arg(long, default_value_t = 1024)]
        max_concurrency: usize,
        /// Worker threads serving connections, each with a runtime (and a
        /// Redis connection) of its own (default: one per core).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
        threads: Option<u16>,
        #[command(flatten)]
        common: Common,
    },
    /// List the manifest's roles: identity, prefix, digest, limits, grants.
    Roles {
        #[arg(long)]
        manifest: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Print one kv value of a role.
    Get {
        #[arg(long)]
        manifest: PathBuf,
        /// A role's name, or `@NAME` for a shared namespace.
        role: String,
        key: String,
        #[command(flatten)]
        common: Common,
    },
    /// Delete every key of a role (kv, subjects, locks, limits).
    Clear {
        #[arg(long)]
        manifest: PathBuf,
        /// A role's name, or `@NAME` for a shared namespace.
        role: String,
        /// Really delete.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Write a role's kv keys and subjects, with TTLs, to a JSON file.
    Checkpoint {
        #[arg(long)]
        manifest: PathBuf,
        /// A role's name, or `@NAME` for a shared namespace.
        role: String,
        file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Restore a checkpoint file into a role.
    Restore {
        #[arg(long)]
        manifest: PathBuf,
        /// A role's name, or `@NAME` for a shared namespace.
        role: String,
        file: PathBuf,
        /// Restore a checkpoint taken from another role.
        #[arg(long)]
        rename: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Load one component as a role and call its handler once.
    Run {
        /// The component file.
        wasm: PathBuf,
        /// Request body; `-` reads standard input.
        body: Option<String>,
        /// The role's name (default: the file stem).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        repeat: Repeat,
        #[command(flatten)]
        common: Common,
    },
    /// Call one role of a manifest once.
    Call {
        #[arg(long)]
        manifest: PathBuf,
        /// The role to call.
        role: String,
        /// Request body; `-` reads standard input.
        body: Option<String>,
        #[command(flatten)]
        repeat: Repeat,
        #[command(flatten)]
        common: Common,
    },
    /// Print (or apply) a Redis ACL user per role, confined to its keys.
    Acl {
        #[arg(long)]
        manifest: PathBuf,
        /// Send the rules to Redis instead of printing them.
        #[arg(long)]
        apply: bool,
        #[command(flatten)]
        common: Common,
    },
    /// List one role's keys with their expiry (operator view).
    Keys {
        #[arg(long)]
        manifest: PathBuf,
        /// A role's name, or `@NAME` for a shared namespace.
        role: String,
        /// Glob pattern over the role's local key names.
        pattern: Option<String>,
        #[command(flatten)]
        common: Common,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (logs, flush_logs) = match Logs::start(std::io::stderr()) {
        Ok(logs) => logs,
        Err(e) => {
            eprintln!("rolehost: cannot start the log thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(logs)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("rolehost: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli.command));
    // The log's last lines (the runtime's, too) before the final word. A
    // reload still compiling when `serve` stopped gets a moment, not an
    // unbounded wait past the grace period.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    drop(flush_logs);
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rolehost: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { wasm, body, name, repeat, common } => {
            let mut spec = RoleSpec::from_path(wasm)?;
            if let Some(name) = name {
                spec.name = name;
            }
            // No manifest sets its limit: as many at once as asked for.
            let limit = &mut spec.limits.max_concurrency;
            *limit = (*limit).max(repeat.concurrency.into());
            let host = host(&common, None, &[spec.clone()], repeat)?;
            call(host, &spec.name, body, repeat).await
        }
        Command::Call { manifest, role, body, repeat, common } => {
            let manifest = Manifest::load(&manifest)?;
            let specs: Vec<RoleSpec> = manifest.role_specs()?.into_iter().filter(|s| s.name == role).collect();
            if specs.is_empty() {
                bail!("the manifest has no role `{role}`");
            }
            let most = specs[0].limits.max_concurrency;
            if usize::from(repeat.concurrency) > most {
                bail!("--concurrency {} is more than role `{role}`'s max-concurrency, {most}", repeat.concurrency);
            }
            let host = host(&common, Some(&manifest), &specs, repeat)?;
            call(host, &role, body, repeat).await
        }
        Command::Acl { manifest, apply, common } => acl(&common, &Manifest::load(&manifest)?, apply).await,
        Command::Serve {
            manifest,
            listen,
            max_body_bytes,
            max_buffered_bytes,
            read_timeout_secs,
            max_connections,
            shutdown_grace_secs,
            watch,
            max_concurrency,
            threads,
            common,
        } => {
            let path = manifest;
            let manifest = Manifest::load(&path)?;
            let specs = manifest.role_specs()?;
            let acl_state = match manifest.redis.acl_users {
                true => Some(state(&common, Some(&manifest))?),
                false => None,
            };
            let started = manifest.clone();
            let options = ServeOptions {
                listen,
                max_body_bytes,
                max_buffered_bytes: max_buffered_bytes.unwrap_or(max_body_bytes.max(256 << 20)),
                read_timeout: std::time::Duration::from_secs(read_timeout_secs),
                max_connections: max_connections as usize,
                shutdown_grace: std::time::Duration::from_secs(shutdown_grace_secs),
                watch: watch.then_some(std::time::Duration::from_secs(1)),
                admin_token: std::env::var(ADMIN_TOKEN_ENV).ok().filter(|t| !t.is_empty()),
                manifest: Some(ManifestSource { path, started, overridden: overridden(&common), acl_state }),
                threads: threads.map_or_else(
                    || std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
                    usize::from,
                ),
            };
            // Before the roles compile, which can take a while.
            options.check()?;
            let host = host_with(&common, Some(&manifest), &specs, max_concurrency, true)?;
            serve(host, options, |address| println!("listening on http://{address}")).await
        }
        Command::Roles { manifest, common } => {
            let manifest = Manifest::load(&manifest)?;
            let prefix = prefix(&common, Some(&manifest))?;
            for spec in manifest.role_specs()? {
                let digest = match rolehost::files::read_component(&spec.wasm) {
                    Ok(bytes) => rolehost::acl::sha256_hex(&bytes),
                    Err(e) => format!("unreadable ({e})"),
                };
                let namespace = Namespace::new(&prefix, &spec.name, &spec.limits);
                println!(
                    "{}\n  prefix  {}\n  wasm    {}\n  sha256  {digest}",
                    spec.name,
                    namespace.prefix(),
                    spec.wasm.display()
                );
                if let Some(pin) = &spec.sha256 {
                    println!("  pinned  {pin}");
                }
                println!("  limits  {}", serde_json::to_string(&spec.limits)?);
                println!("  grants  {}", serde_json::to_string(&spec.grants)?);
            }
            Ok(())
        }
        Command::Get { manifest, role, key, common } => {
            let (backend, namespace, _) = role_state(&common, &manifest, &role)?;
            match backend.get(&namespace.key(Space::Kv, &key)?, None).await? {
                Some(value) => print_response(&value),
                None => bail!("role `{role}` has no key {key:?}"),
            }
        }
        Command::Clear { manifest, role, yes, common } => {
            if !yes {
                bail!("this deletes every key of role `{role}`; add --yes to do it");
            }
            let (backend, namespace, _) = role_state(&common, &manifest, &role)?;
            // Fencing counters stay: a lock's tokens must keep increasing,
            // or a holder from before the clear could outrank the next one.
            let mut deleted = 0;
            for space in [Space::Kv, Space::Subject, Space::Lock, Space::Rate] {
                deleted += backend.delete_matching(&namespace.pattern(space, None)?).await?;
            }
            println!("deleted {deleted} keys of role `{role}` (its locks' fencing counters are kept)");
            Ok(())
        }
        Command::Checkpoint { manifest, role, file, common } => {
            let (backend, namespace, _) = role_state(&common, &manifest, &role)?;
            let checkpoint = checkpoint::take(backend.as_ref(), &namespace, &role).await?;
            let json = serde_json::to_vec_pretty(&checkpoint)?;
            // `-` or /dev/stdout: straight to standard output, whatever it is
            // (a file opened for appending is added to, not replaced).
            if file == Path::new("-") || file == Path::new("/dev/stdout") {
                let mut out = std::io::stdout().lock();
                out.write_all(&json).and_then(|()| out.flush()).context("cannot write the checkpoint")?;
            } else {
                // Readable by its owner alone: it holds the role's whole state.
                rolehost::files::write_private(&file, &json)
                    .with_context(|| format!("cannot write {}", file.display()))?;
            }
            // On stderr: standard output may be the checkpoint itself.
            eprintln!(
                "{} kv keys and {} subjects of role `{role}` written to {}",
                checkpoint.kv.len(),
                checkpoint.subjects.len(),
                file.display()
            );
            Ok(())
        }
        Command::Restore { manifest, role, file, rename, common } => {
            // Any size a regular file may have: restore checks every entry
            // before it writes one, so it holds them all.
            let text = rolehost::files::read_regular(&file, 1 << 40)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let checkpoint: checkpoint::Checkpoint =
                serde_json::from_slice(&text).with_context(|| format!("{} is not a checkpoint", file.display()))?;
            if checkpoint.role != role && !rename {
                bail!(
                    "{} holds role `{}`, not `{role}`; add --rename to restore it into `{role}`",
                    file.display(),
                    checkpoint.role
                );
            }
            let (backend, namespace, spec) = role_state(&common, &manifest, &role)?;
            let restored = checkpoint::restore(backend.as_ref(), &namespace, &spec.limits, &checkpoint)
                .await
                .with_context(|| format!("cannot restore {} into role `{role}`", file.display()))?;
            println!(
                "restored {} kv keys and {} subjects into role `{role}` ({} expired since the checkpoint)",
                restored.kv, restored.subjects, restored.expired
            );
            Ok(())
        }
        Command::Keys { manifest, role, pattern, common } => {
            let (backend, namespace, _) = role_state(&common, &manifest, &role)?;
            let pattern = namespace.pattern(Space::Kv, pattern.as_deref())?;
            let mut out = std::io::stdout().lock();
            let mut cursor = None;
            loop {
                let page = backend.scan(&pattern, cursor.as_deref(), 500).await?;
                for full in &page.keys {
                    let Some(local) = namespace.local(Space::Kv, full) else {
                        continue;
                    };
                    let expiry = match backend.expiry(full).await? {
                        Expiry::Missing => continue,
                        Expiry::Persistent => "persistent".to_owned(),
                        Expiry::ExpiresIn(left) => format!("expires in {} ms", left.as_millis()),
                    };
                    writeln!(out, "{local}\t{expiry}")?;
                }
                match page.cursor {
                    Some(next) => cursor = Some(next),
                    None => return Ok(()),
                }
            }
        }
    }
}

/// The manifest settings that flags or environment variables replace.
fn overridden(common: &Common) -> Vec<&'static str> {
    let redis_host = std::env::var(REDIS_HOST_ENV).is_ok_and(|v| !v.is_empty());
    let mut settings = Vec::new();
    if common.prefix.is_some() {
        settings.push("global-prefix");
    }
    if common.state.is_some() || redis_host {
        settings.push("state");
    }
    settings
}

fn state(common: &Common, manifest: Option<&Manifest>) -> anyhow::Result<StateConfig> {
    // `--state` (or ROLEHOST_STATE) wins; REDIS_HOST, REDIS_PORT and
    // REDIS_DB override the manifest's.
    let env = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
    let (host, port, db) = (env(REDIS_HOST_ENV), env(REDIS_PORT_ENV), env(REDIS_DB_ENV));
    let url = match common.state.clone() {
        Some(url) => url,
        None => with_redis_overrides(
            manifest.and_then(|m| m.state.as_deref()),
            host.as_deref(),
            port.as_deref(),
            db.as_deref(),
        )?
        .unwrap_or_else(|| "memory".to_owned()),
    };
    let redis = manifest.map(|m| m.redis.clone()).unwrap_or_default();
    StateConfig::parse(&url, &redis)
}

/// The compile cache: `ROLEHOST_CACHE` names its directory, or `off`;
/// by default `~/.cache/rolehost`.
fn cache() -> Option<CompileCache> {
    match std::env::var("ROLEHOST_CACHE") {
        Ok(value) if value == "off" => None,
        Ok(dir) if !dir.is_empty() => Some(CompileCache::new(dir)),
        _ => CompileCache::default_dir().map(CompileCache::new),
    }
}

/// The global prefix: flag or environment, then manifest, then default;
/// checked like the host checks it.
fn prefix(common: &Common, manifest: Option<&Manifest>) -> anyhow::Result<String> {
    let prefix = common
        .prefix
        .clone()
        .or_else(|| manifest.map(|m| m.global_prefix.clone()))
        .unwrap_or_else(|| DEFAULT_GLOBAL_PREFIX.to_owned());
    validate_global_prefix(&prefix).map_err(anyhow::Error::msg)?;
    Ok(prefix)
}

/// A host for `repeat`'s calls: room for as many at once.
fn host(common: &Common, manifest: Option<&Manifest>, specs: &[RoleSpec], repeat: Repeat) -> anyhow::Result<Host> {
    let most = HostOptions::default().max_concurrency.max(repeat.concurrency.into());
    host_with(common, manifest, specs, most, false)
}

/// The backend and namespace of one role of a manifest, for the operator
/// commands that work on state directly.
/// The state of `role`, or of the shared namespace `@name` (with the
/// limits of the first role granted it), and the backend holding it.
fn role_state(common: &Common, manifest: &Path, role: &str) -> anyhow::Result<(Arc<dyn Backend>, Namespace, RoleSpec)> {
    let manifest = Manifest::load(manifest)?;
    let shared = role.strip_prefix('@');
    if let Some(name) = shared {
        validate_identity(name).map_err(|e| anyhow::anyhow!("invalid shared namespace `{name}`: {e}"))?;
    }
    let spec = manifest
        .role_specs()?
        .into_iter()
        .find(|s| match shared {
            Some(name) => s.grants.namespaces.contains_key(name),
            None => s.name == role,
        })
        .with_context(|| match shared {
            Some(name) => format!("no role of the manifest is granted the shared namespace `{name}`"),
            None => format!("the manifest has no role `{role}`"),
        })?;
    let state = state(common, Some(&manifest))?;
    if matches!(state, StateConfig::Memory { .. }) {
        bail!(
            "the state is the in-memory store, which starts empty in every process and so holds nothing to \
             work on here; name the Redis that holds the role's state (--state redis://… or the manifest's state)"
        );
    }
    let prefix = prefix(common, Some(&manifest))?;
    let namespace = match shared {
        Some(name) => Namespace::shared(&prefix, name, &spec.limits),
        None => Namespace::new(&prefix, &spec.name, &spec.limits),
    };
    let backend = state.connect()?;
    Ok((backend, namespace, spec))
}

fn host_with(
    common: &Common,
    manifest: Option<&Manifest>,
    specs: &[RoleSpec],
    max_concurrency: usize,
    pooling: bool,
) -> anyhow::Result<Host> {
    let state = state(common, manifest)?;
    let options = HostOptions {
        fuel: specs.iter().any(|s| s.limits.fuel.is_some()),
        max_concurrency,
        cache: cache(),
        pooling,
        ..HostOptions::default()
    };
    let host = Host::with_options(state.connect()?, &prefix(common, manifest)?, options)?;
    let acl_users = manifest.is_some_and(|m| m.redis.acl_users);
    for spec in specs {
        if acl_users {
            host.load_with_backend(spec, state.as_role(&spec.name)?.connect()?)?;
        } else {
            host.load(spec)?;
        }
    }
    Ok(host)
}

/// Prints, or applies with the admin connection, each role's ACL user.
async fn acl(common: &Common, manifest: &Manifest, apply: bool) -> anyhow::Result<()> {
    let secret = acl::secret()?;
    let prefix = prefix(common, Some(manifest))?;
    let mut commands = Vec::new();
    for spec in manifest.role_specs()? {
        commands.push(acl::setuser_args(&prefix, &spec.name, &spec.grants, &secret));
    }
    if !apply {
        for args in &commands {
            println!("ACL SETUSER {}", args.join(" "));
        }
        return Ok(());
    }
    let StateConfig::Redis(options) = state(common, Some(manifest))? else {
        bail!("--apply needs a Redis backend (--state redis://…)");
    };
    let admin = rolehost::backend::RedisBackend::new(&options).map_err(anyhow::Error::msg)?;
    // A user of the same name with other keys belongs to another
    // deployment on this Redis (another global prefix): resetting it would
    // lock that one's role out.
    for spec in manifest.role_specs()? {
        let (user, own) = (acl::user(&spec.name), acl::own_keys(&prefix, &spec.name));
        for keys in admin.acl_user_keys(&user).await? {
            if !keys.split(' ').any(|pattern| pattern == own) {
                bail!(
                    "Redis already has a user `{user}` for other keys ({keys}), not `{own}`: another deployment \
                     (another global prefix) has a role `{}` on this Redis. Give this role another name, or, if \
                     the user is this deployment's from before a change of prefix, delete it first (ACL DELUSER \
                     {user}); nothing was applied",
                    spec.name
                );
            }
        }
    }
    for args in &commands {
        admin.acl_setuser(args).await?;
        println!("applied ACL user {}", args[0]);
    }
    Ok(())
}

/// Calls `role` once, or `--repeat` times with `--concurrency` in flight,
/// printing each response on its own line. Failed calls are reported on
/// stderr as they happen; any failure fails the command.
async fn call(host: Host, role: &str, body: Option<String>, repeat: Repeat) -> anyhow::Result<()> {
    let host = Arc::new(host);
    let result = call_repeatedly(host.clone(), role, body, repeat).await;
    host.settle().await;
    result
}

async fn call_repeatedly(host: Arc<Host>, role: &str, body: Option<String>, repeat: Repeat) -> anyhow::Result<()> {
    let request: Arc<[u8]> = match body.as_deref() {
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf).context("cannot read the request from stdin")?;
            buf.into()
        }
        Some(body) => body.as_bytes().into(),
        None => Arc::from(&[][..]),
    };
    if repeat.repeat <= 1 {
        return print_response(&host.call(role, &request).await?);
    }
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..u64::from(repeat.concurrency).min(repeat.repeat) {
        let (host, next, failed, request, role) =
            (host.clone(), next.clone(), failed.clone(), request.clone(), role.to_owned());
        workers.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < repeat.repeat {
                match host.call(&role, &request).await {
                    Ok(response) => print_response(&response)?,
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("rolehost: {e}");
                    }
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = workers.join_next().await {
        result??;
    }
    match failed.load(Ordering::Relaxed) {
        0 => Ok(()),
        n => bail!("{n} of {} calls failed", repeat.repeat),
    }
}

fn print_response(response: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(response)?;
    if !response.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    Ok(())
}
