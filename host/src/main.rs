//! The `rolehost` command: thin over the library.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use rolehost::backend::Expiry;
use rolehost::config::{StateConfig, STATE_ENV};
use rolehost::manifest::{Manifest, DEFAULT_GLOBAL_PREFIX};
use rolehost::namespace::{Namespace, Space};
use rolehost::{Host, RoleSpec};

#[derive(Parser)]
#[command(
    name = "rolehost",
    version,
    about = "Run WebAssembly roles with private, prefixed state"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Common {
    /// State backend: `memory` or `redis://[user@]host:port[/db]` (password from REDIS_PASSWORD).
    #[arg(long, global = true, env = STATE_ENV)]
    state: Option<String>,
    /// Prefix of every key (default from the manifest, else `rolehost:`).
    #[arg(long, global = true, env = "ROLEHOST_PREFIX")]
    prefix: Option<String>,
}

#[derive(Subcommand)]
enum Command {
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
        common: Common,
    },
    /// Call one role of a manifest once.
    Call {
        #[arg(long)]
        manifest: PathBuf,
        /// The role's name.
        role: String,
        /// Request body; `-` reads standard input.
        body: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// List one role's keys with their expiry (operator view).
    Keys {
        #[arg(long)]
        manifest: PathBuf,
        /// The role's name.
        role: String,
        /// Glob pattern over the role's local key names.
        pattern: Option<String>,
        #[command(flatten)]
        common: Common,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("rolehost: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rolehost: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run {
            wasm,
            body,
            name,
            common,
        } => {
            let mut spec = RoleSpec::from_path(wasm)?;
            if let Some(name) = name {
                spec.name = name;
            }
            let host = host(&common, None, &[spec.clone()])?;
            call(&host, &spec.name, body).await
        }
        Command::Call {
            manifest,
            role,
            body,
            common,
        } => {
            let manifest = Manifest::load(&manifest)?;
            let specs: Vec<RoleSpec> = manifest
                .role_specs()?
                .into_iter()
                .filter(|s| s.name == role)
                .collect();
            if specs.is_empty() {
                bail!("the manifest has no role `{role}`");
            }
            let host = host(&common, Some(&manifest), &specs)?;
            call(&host, &role, body).await
        }
        Command::Keys {
            manifest,
            role,
            pattern,
            common,
        } => {
            let manifest = Manifest::load(&manifest)?;
            let spec = manifest
                .role_specs()?
                .into_iter()
                .find(|s| s.name == role)
                .with_context(|| format!("the manifest has no role `{role}`"))?;
            let backend = state(&common, Some(&manifest))?.connect()?;
            let prefix = common
                .prefix
                .clone()
                .unwrap_or(manifest.global_prefix.clone());
            let namespace = Namespace::new(&prefix, &spec.name, &spec.limits);
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

fn state(common: &Common, manifest: Option<&Manifest>) -> anyhow::Result<StateConfig> {
    let url = common
        .state
        .clone()
        .or_else(|| manifest.and_then(|m| m.state.clone()))
        .unwrap_or_else(|| "memory".to_owned());
    let redis = manifest.map(|m| m.redis.clone()).unwrap_or_default();
    StateConfig::parse(&url, &redis)
}

fn host(common: &Common, manifest: Option<&Manifest>, specs: &[RoleSpec]) -> anyhow::Result<Host> {
    let backend = state(common, manifest)?.connect()?;
    let prefix = common
        .prefix
        .clone()
        .or_else(|| manifest.map(|m| m.global_prefix.clone()))
        .unwrap_or_else(|| DEFAULT_GLOBAL_PREFIX.to_owned());
    let mut host = Host::new(backend, &prefix)?;
    for spec in specs {
        host.load(spec)?;
    }
    Ok(host)
}

async fn call(host: &Host, role: &str, body: Option<String>) -> anyhow::Result<()> {
    let request = match body.as_deref() {
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("cannot read the request from stdin")?;
            buf
        }
        Some(body) => body.as_bytes().to_vec(),
        None => Vec::new(),
    };
    let response = host.call(role, &request).await?;
    let mut out = std::io::stdout().lock();
    out.write_all(&response)?;
    if !response.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    Ok(())
}
