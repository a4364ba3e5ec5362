//! Roles in other languages: JavaScript (componentize-js), Python
//! (componentize-py) and C (clang + wit-bindgen + wasm-tools), built into
//! `target/roles/NAME-js.wasm`, `NAME-py.wasm` and `NAME-c.wasm` from `wit/`
//! as it is.
//!
//! The tools are installed locally with pinned versions: npm packages in
//! `examples/js/node_modules` (from `package-lock.json`), componentize-py in
//! a virtual environment under `target/tools/python` (from
//! `examples/python/requirements.txt`), wit-bindgen, wasm-tools and the WASI
//! preview1 adapter under `target/tools/c` (versions below). Each step is
//! skipped when its output is newer than its inputs. Without node, python3
//! or clang that language is skipped with a message, except under
//! `CI=true`, where it is an error.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::SystemTime;

use anyhow::{bail, Context as _};

/// Roles each language provides; the component is `NAME-js.wasm` / `NAME-py.wasm`.
const JS_ROLES: &[&str] = &["counter", "session-cache", "profile"];
const PY_ROLES: &[&str] = &["counter", "session-cache", "profile"];
const C_ROLES: &[&str] = &["counter"];

/// C tools, installed with `cargo install --locked --root target/tools/c`.
/// wit-bindgen matches the guest SDK's; the adapter matches wasmtime.
/// (crate, version, the one feature needed: the rest only costs build time).
const WIT_BINDGEN: (&str, &str, &str) = ("wit-bindgen-cli", "0.61.1", "c");
const WASM_TOOLS: (&str, &str, &str) = ("wasm-tools", "1.258.3", "component");
const ADAPTER: &str = "48.0.8";

/// Builds the JS and Python roles into `out_dir`.
pub fn build(root: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if have_tool("node", "Node.js 20 or newer (Debian: apt-get install nodejs npm)", ci)? {
        build_js(root, out_dir)?;
    }
    if have_tool("python3", "Python 3.10 or newer with venv (Debian: apt-get install python3-venv)", ci)? {
        build_python(root, out_dir)?;
    }
    if have_tool(
        "clang",
        "clang, lld and wasi-libc (Debian: apt-get install clang lld wasi-libc libclang-rt-dev-wasm32)",
        ci,
    )? {
        build_c(root, out_dir)?;
    }
    Ok(())
}

/// True when `program` runs; otherwise an error under CI, else false with a message.
fn have_tool(program: &str, install: &str, ci: bool) -> anyhow::Result<bool> {
    if Command::new(program).arg("--version").output().is_ok_and(|out| out.status.success()) {
        return Ok(true);
    }
    let message = format!("{program} is not installed; the roles written with it need {install}");
    if ci {
        bail!("{message}");
    }
    eprintln!("xtask: skipping: {message}");
    Ok(false)
}

fn build_js(root: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let project = root.join("examples/js");
    // The versions pinned in package-lock.json. `npm install` rather than
    // `npm ci`: some registries list optional binaries for other platforms
    // that the lock then lacks, and `npm ci` refuses such a lock. The stamp
    // remembers which lock node_modules was installed from.
    let lock_path = project.join("package-lock.json");
    let stamp = project.join("node_modules/.rolehost-lock");
    if std::fs::read(&stamp).ok() != std::fs::read(&lock_path).ok() {
        eprintln!("xtask: installing componentize-js (npm install in examples/js)");
        super::run(Command::new("npm").current_dir(&project).args(["install", "--no-audit", "--no-fund"]))?;
        std::fs::write(&stamp, std::fs::read(&lock_path).context("examples/js/package-lock.json")?)?;
    }
    let cli = project.join("node_modules/@bytecodealliance/componentize-js/src/cli.js");
    let mut shared = sources(&root.join("wit"), "wit")?;
    shared.extend(sources(&project.join("lib"), "js")?);
    shared.push(project.join("package-lock.json"));
    let builds = JS_ROLES.iter().map(|role| {
        let source = project.join(format!("{role}.js"));
        let inputs = shared.iter().cloned().chain([source.clone()]).collect();
        let mut command = Command::new("node");
        command
            .current_dir(&project)
            .arg(&cli)
            .arg(&source)
            .args(["--wit", "../../wit", "--world-name", "role"])
            // A role gets no wasi:http; the engine's fetch would import it.
            .args(["--disable", "http", "fetch-event"])
            .arg("--out");
        (out_dir.join(format!("{role}-js.wasm")), inputs, command)
    });
    build_all(builds.collect())
}

fn build_python(root: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let project = root.join("examples/python");
    let venv = root.join("target/tools/python");
    let requirements = std::fs::read(project.join("requirements.txt")).context("examples/python/requirements.txt")?;
    let stamp = venv.join(".rolehost-requirements");
    if std::fs::read(&stamp).ok().as_deref() != Some(&requirements[..]) {
        eprintln!("xtask: installing componentize-py into {}", venv.display());
        super::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .context("cannot create a Python virtual environment (Debian: apt-get install python3-venv)")?;
        super::run(
            Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
                .arg(project.join("requirements.txt")),
        )?;
        std::fs::write(&stamp, &requirements)?;
    }
    let mut shared = sources(&root.join("wit"), "wit")?;
    shared.extend(sources(&project.join("lib"), "py")?);
    shared.push(project.join("requirements.txt"));
    let builds = PY_ROLES.iter().map(|role| {
        let dir = project.join(role);
        let inputs = shared.iter().cloned().chain(sources(&dir, "py").unwrap_or_default()).collect();
        let mut command = Command::new(venv.join("bin/componentize-py"));
        command
            .current_dir(&project)
            .args(["--quiet", "--wit-path", "../../wit", "--world", "role", "componentize", "app"])
            .args(["--python-path", role, "--python-path", "lib", "--output"]);
        (out_dir.join(format!("{role}-py.wasm")), inputs, command)
    });
    build_all(builds.collect())
}

fn build_c(root: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let tools = root.join("target/tools/c");
    let wit_bindgen = cargo_install(&tools, WIT_BINDGEN, "wit-bindgen")?;
    let wasm_tools = cargo_install(&tools, WASM_TOOLS, "wasm-tools")?;
    let adapter = preview1_adapter(&tools)?;
    let project = root.join("examples/c");
    let wit = sources(&root.join("wit"), "wit")?;
    // Bindings are generated from wit/ as it is, into the tool dir.
    let bindings = tools.join("bindings");
    let header = bindings.join("role.h");
    if !is_fresh(&header, &wit) {
        let _ = std::fs::remove_dir_all(&bindings);
        super::run(
            Command::new(&wit_bindgen)
                .arg("c")
                .arg(root.join("wit"))
                .args(["--world", "role", "--out-dir"])
                .arg(&bindings),
        )?;
    }
    for role in C_ROLES {
        let source = project.join(format!("{role}.c"));
        let out = out_dir.join(format!("{role}-c.wasm"));
        let mut inputs = wit.clone();
        inputs.extend([source.clone(), adapter.clone()]);
        if is_fresh(&out, &inputs) {
            continue;
        }
        eprintln!("xtask: building {}", out.display());
        let core = tools.join(format!("{role}.core.wasm"));
        super::run(
            Command::new("clang")
                .args(["--target=wasm32-wasi", "-O2", "-mexec-model=reactor", "-Wall", "-Werror"])
                .arg("-I")
                .arg(&bindings)
                .arg(&source)
                .arg(bindings.join("role.c"))
                .arg(bindings.join("role_component_type.o"))
                .arg("-o")
                .arg(&core),
        )
        .context(
            "cannot compile C for wasm32-wasi (Debian: apt-get install clang lld wasi-libc libclang-rt-dev-wasm32)",
        )?;
        let partial = out.with_extension("wasm.partial");
        super::run(
            Command::new(&wasm_tools)
                .args(["component", "new"])
                .arg(&core)
                .arg("--adapt")
                .arg(format!("wasi_snapshot_preview1={}", adapter.display()))
                .arg("-o")
                .arg(&partial),
        )?;
        std::fs::rename(&partial, &out)?;
    }
    Ok(())
}

/// The binary `bin` of crate `name@version`, installed under `tools` unless
/// that version is there already.
fn cargo_install(tools: &Path, (name, version, feature): (&str, &str, &str), bin: &str) -> anyhow::Result<PathBuf> {
    let path = tools.join("bin").join(bin);
    let installed = Command::new(&path).arg("--version").output();
    if installed.is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(version)) {
        return Ok(path);
    }
    eprintln!("xtask: installing {name} {version} into {}", tools.display());
    super::run(
        super::cargo()
            .args(["install", "--locked", "--quiet", "--no-default-features", "--features", feature, "--root"])
            .arg(tools)
            .arg(format!("{name}@{version}")),
    )?;
    Ok(path)
}

/// The WASI preview1 reactor adapter, taken from its crate
/// (wasi-preview1-component-adapter-provider) by a two-line program.
fn preview1_adapter(tools: &Path) -> anyhow::Result<PathBuf> {
    let out = tools.join(format!("wasi_snapshot_preview1.reactor-{ADAPTER}.wasm"));
    if out.exists() {
        return Ok(out);
    }
    let project = tools.join("adapter");
    std::fs::create_dir_all(project.join("src"))?;
    // `[workspace]`: its own workspace, not a member of ours.
    std::fs::write(
        project.join("Cargo.toml"),
        format!(
            "[package]\nname = \"adapter\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n[workspace]\n\n\
             [dependencies]\nwasi-preview1-component-adapter-provider = \"={ADAPTER}\"\n"
        ),
    )?;
    std::fs::write(
        project.join("src/main.rs"),
        "fn main() {\n    let out = std::env::args().nth(1).unwrap();\n    \
         std::fs::write(out, wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER).unwrap();\n}\n",
    )?;
    let partial = out.with_extension("wasm.partial");
    super::run(
        super::cargo()
            .current_dir(&project)
            .args(["run", "--quiet", "--target-dir"])
            .arg(tools.join("adapter-target"))
            .arg("--")
            .arg(&partial),
    )?;
    std::fs::rename(&partial, &out)?;
    Ok(out)
}

/// Runs the stale builds at once (each command gets its output path
/// appended), then moves the finished components into place, so a failed
/// build never leaves a component that looks up to date.
fn build_all(builds: Vec<(PathBuf, Vec<PathBuf>, Command)>) -> anyhow::Result<()> {
    let mut running: Vec<(PathBuf, PathBuf, Child)> = Vec::new();
    for (out, inputs, mut command) in builds {
        if is_fresh(&out, &inputs) {
            continue;
        }
        let partial = out.with_extension("wasm.partial");
        eprintln!("xtask: building {}", out.display());
        let child = command.arg(&partial).spawn().with_context(|| format!("cannot start {command:?}"))?;
        running.push((out, partial, child));
    }
    let mut failed = Vec::new();
    for (out, partial, mut child) in running {
        let status = child.wait()?;
        if status.success() && partial.exists() {
            std::fs::rename(&partial, &out)?;
        } else {
            let _ = std::fs::remove_file(&partial);
            failed.push(out.display().to_string());
        }
    }
    if !failed.is_empty() {
        bail!("building {} failed (see the output above)", failed.join(", "));
    }
    Ok(())
}

/// The files with extension `ext` directly in `dir`.
fn sources(dir: &Path, ext: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == ext) {
            files.push(path);
        }
    }
    Ok(files)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// True when `out` exists and is newer than every input.
fn is_fresh(out: &Path, inputs: &[PathBuf]) -> bool {
    let Some(built) = modified(out) else { return false };
    inputs.iter().all(|input| modified(input).is_some_and(|m| m < built))
}
