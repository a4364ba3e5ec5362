//! `cargo xtask build | demo [--state URL] | test`: the project's chores.

/// The `rolehost` binary's allocator, so the benchmark measures what ships.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

mod bench;
mod demo;
mod guests;

/// Guest crates built for wasm32-wasip2: examples, then test roles.
const ROLES: &[&str] = &["counter", "session-cache", "notes", "profile", "rate-limiter", "worker", "kvprobe", "bench"];
const WASM_TARGET: &str = "wasm32-wasip2";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    match args.first().map(String::as_str) {
        Some("build") => build(&root),
        Some("demo") => {
            build(&root)?;
            let state = match args.get(1).map(String::as_str) {
                None => "memory".to_owned(),
                Some("--state") => args.get(2).context("--state needs a URL")?.clone(),
                Some(other) => match other.strip_prefix("--state=") {
                    Some(url) => url.to_owned(),
                    None => bail!("unknown demo argument {other:?}; use --state URL"),
                },
            };
            demo::run(&root, &state)
        }
        Some("test") => test(&root, &args[1..]),
        Some("bench") => {
            build(&root)?;
            // Measure optimized code: run the benchmark itself in release.
            run(cargo()
                .current_dir(&root)
                .args(["run", "--release", "--quiet", "--package", "xtask", "--", "bench-run"])
                .args(&args[1..]))
        }
        Some("bench-run") => bench::run(&root, &args[1..]),
        _ => {
            eprintln!("usage: cargo xtask build | demo [--state memory|redis://…] | test [cargo test args] | bench [a b c d e f g]");
            std::process::exit(2);
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command.status().with_context(|| format!("cannot start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

/// Adds the wasm target with rustup when it is missing.
fn ensure_wasm_target() -> anyhow::Result<()> {
    let output = Command::new("rustup").args(["target", "list", "--installed"]).output();
    match output {
        Ok(out) if String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == WASM_TARGET) => Ok(()),
        Ok(_) => run(Command::new("rustup").args(["target", "add", WASM_TARGET])),
        Err(_) => {
            eprintln!("xtask: rustup not found; assuming the {WASM_TARGET} target is installed");
            Ok(())
        }
    }
}

/// Builds every role and copies the components to `target/roles/NAME.wasm`.
fn build(root: &Path) -> anyhow::Result<()> {
    ensure_wasm_target()?;
    let mut command = cargo();
    command.current_dir(root).args(["build", "--release", "--target", WASM_TARGET]);
    for role in ROLES {
        command.args(["-p", role]);
    }
    run(&mut command)?;
    let out_dir = root.join("target/roles");
    std::fs::create_dir_all(&out_dir)?;
    for role in ROLES {
        let built =
            root.join("target").join(WASM_TARGET).join("release").join(format!("{}.wasm", role.replace('-', "_")));
        let dest = out_dir.join(format!("{role}.wasm"));
        std::fs::copy(&built, &dest)
            .with_context(|| format!("cannot copy {} to {}", built.display(), dest.display()))?;
    }
    guests::build(root, &out_dir)?;
    eprintln!("xtask: roles are in {}", out_dir.display());
    Ok(())
}

/// Builds the roles and runs every test. The Redis tests start their own
/// redis-server, so one must be installed; here its absence is an error.
fn test(root: &Path, extra: &[String]) -> anyhow::Result<()> {
    build(root)?;
    if Command::new("redis-server").arg("--version").output().is_err() {
        bail!("redis-server is not installed; the Redis tests need it (Debian: apt-get install redis-server)");
    }
    run(cargo()
        .current_dir(root)
        .env("ROLEHOST_REQUIRE_REDIS", "1")
        .args(["test", "--workspace", "--exclude", "rolehost-guest"])
        .args(ROLES.iter().flat_map(|r| ["--exclude", r]))
        .args(extra))
}
