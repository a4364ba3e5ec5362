//! The wasmtime side: one engine, one `InstancePre` per role, a fresh
//! `Store` per call with the role's limits and an empty WASI context.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, Store, StoreLimitsBuilder, Trap};
use wasmtime_wasi::WasiCtxBuilder;

use crate::backend::Backend;
use crate::bindings::{Role as RoleWorld, RolePre};
use crate::error::CallError;
use crate::limits::RoleLimits;
use crate::namespace::{validate_global_prefix, validate_identity, Namespace};
use crate::state::log::{CallLog, Stream};
use crate::state::{CallCtx, RoleInfo};

/// How often the engine's epoch advances; the granularity of deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// A role to load: its identity, its component, and how it may run.
#[derive(Debug, Clone)]
pub struct RoleSpec {
    /// The identity: `[a-z0-9][a-z0-9_-]{0,62}`, unique among loaded roles.
    pub name: String,
    /// Path of the component file.
    pub wasm: PathBuf,
    /// If set, the file's sha256 (hex) must be this.
    pub sha256: Option<String>,
    /// Per-role limits.
    pub limits: RoleLimits,
}

impl RoleSpec {
    /// A role named after the file stem of `wasm`, with default limits.
    pub fn from_path(wasm: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let wasm = wasm.into();
        let name = wasm
            .file_stem()
            .and_then(|s| s.to_str())
            .with_context(|| format!("cannot name a role after {}", wasm.display()))?
            .to_owned();
        Ok(Self {
            name,
            wasm,
            sha256: None,
            limits: RoleLimits::default(),
        })
    }
}

/// A loaded role, ready to be called.
pub struct Role {
    info: Arc<RoleInfo>,
    pre: RolePre<CallCtx>,
    sha256: String,
}

impl Role {
    /// The role's identity.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// The sha256 of the component it was loaded from.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Its limits.
    pub fn limits(&self) -> &RoleLimits {
        &self.info.limits
    }

    /// Its namespace.
    pub fn namespace(&self) -> &Namespace {
        &self.info.namespace
    }
}

/// Roles loaded into one engine, sharing one backend.
pub struct Host {
    engine: Engine,
    linker: Linker<CallCtx>,
    backend: Arc<dyn Backend>,
    global_prefix: String,
    roles: BTreeMap<String, Role>,
    ticker_stop: Arc<AtomicBool>,
}

impl Host {
    /// A host with no roles yet, storing state in `backend` under `global_prefix`.
    pub fn new(backend: Arc<dyn Backend>, global_prefix: &str) -> anyhow::Result<Self> {
        validate_global_prefix(global_prefix).map_err(anyhow::Error::msg)?;
        let mut config = Config::new();
        config.wasm_component_model(true).epoch_interruption(true);
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        RoleWorld::add_to_linker::<_, HasSelf<_>>(&mut linker, |ctx| ctx)?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        spawn_epoch_ticker(engine.clone(), ticker_stop.clone())?;
        Ok(Self {
            engine,
            linker,
            backend,
            global_prefix: global_prefix.to_owned(),
            roles: BTreeMap::new(),
            ticker_stop,
        })
    }

    /// The backend every role's state lives in.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The loaded roles, by name.
    pub fn roles(&self) -> impl Iterator<Item = &Role> {
        self.roles.values()
    }

    /// Loads a role: checks its name and pin, compiles it and links it
    /// against the `role` world.
    pub fn load(&mut self, spec: &RoleSpec) -> anyhow::Result<&Role> {
        validate_identity(&spec.name).map_err(anyhow::Error::msg)?;
        if self.roles.contains_key(&spec.name) {
            bail!(
                "role `{}` is loaded twice; role names must be unique",
                spec.name
            );
        }
        let bytes = read_component(&spec.wasm)?;
        let sha256 = hex(&Sha256::digest(&bytes));
        if let Some(pin) = &spec.sha256 {
            if !pin.eq_ignore_ascii_case(&sha256) {
                bail!(
                    "{} has sha256 {sha256}, but the manifest pins role `{}` to {pin}; refusing to load it",
                    spec.wasm.display(),
                    spec.name
                );
            }
        }
        let component = Component::from_binary(&self.engine, &bytes).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a valid WebAssembly component: {e}",
                spec.wasm.display()
            )
        })?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .and_then(RolePre::new)
            .map_err(|e| {
                anyhow::anyhow!(
                    "{} does not fit the rolehost:state/role world: {e:#}",
                    spec.wasm.display()
                )
            })?;
        let info = Arc::new(RoleInfo {
            name: spec.name.clone(),
            namespace: Arc::new(Namespace::new(
                &self.global_prefix,
                &spec.name,
                &spec.limits,
            )),
            limits: spec.limits.clone(),
        });
        let role = Role { info, pre, sha256 };
        Ok(self.roles.entry(spec.name.clone()).or_insert(role))
    }

    /// Looks up a loaded role.
    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.get(name)
    }

    /// Calls `role`'s handler once with `request` in a fresh instance.
    pub async fn call(&self, role: &str, request: &[u8]) -> Result<Vec<u8>, CallError> {
        let role = self
            .role(role)
            .ok_or_else(|| CallError::UnknownRole(role.to_owned()))?;
        let limits = &role.info.limits;
        let log = CallLog::new(&role.info.name, limits.max_log_bytes);
        let wasi = WasiCtxBuilder::new()
            .stdout(log.sink(Stream::Stdout))
            .stderr(log.sink(Stream::Stderr))
            .build();
        let limiter = StoreLimitsBuilder::new()
            .memory_size(limits.max_memory_bytes)
            .build();
        let ctx = CallCtx::new(
            role.info.clone(),
            self.backend.clone(),
            limiter,
            log.clone(),
            wasi,
        );
        let mut store = Store::new(&self.engine, ctx);
        store.limiter(|ctx| &mut ctx.limiter);
        let deadline = Duration::from_millis(limits.deadline_ms);
        store.set_epoch_deadline(deadline.as_millis().div_ceil(EPOCH_TICK.as_millis()) as u64 + 1);
        store.epoch_deadline_trap();

        let run = async {
            let instance = role.pre.instantiate_async(&mut store).await?;
            instance
                .rolehost_state_handler()
                .call_handle(&mut store, request)
                .await
        };
        let outcome = tokio::time::timeout(deadline + EPOCH_TICK * 2, run).await;
        store.data_mut().release_held_locks().await;
        log.finish();
        let deadline_exceeded = || CallError::DeadlineExceeded {
            role: role.info.name.clone(),
            millis: limits.deadline_ms,
        };
        let response = match outcome {
            Err(_) => return Err(deadline_exceeded()),
            Ok(Err(trap)) if trap.downcast_ref::<Trap>() == Some(&Trap::Interrupt) => {
                return Err(deadline_exceeded())
            }
            Ok(Err(trap)) => {
                tracing::debug!(role = %role.info.name, "trap: {trap:?}");
                return Err(CallError::Trap {
                    role: role.info.name.clone(),
                    message: trap_summary(&trap),
                });
            }
            Ok(Ok(Err(error))) => {
                return Err(CallError::Role {
                    role: role.info.name.clone(),
                    error: error.into(),
                })
            }
            Ok(Ok(Ok(response))) => response,
        };
        if response.len() > limits.max_response_bytes {
            return Err(CallError::Role {
                role: role.info.name.clone(),
                error: crate::error::StateError::TooLarge(format!(
                    "response of {} bytes is over the limit of {} bytes",
                    response.len(),
                    limits.max_response_bytes
                )),
            });
        }
        Ok(response)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

fn spawn_epoch_ticker(engine: Engine, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("rolehost-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        })
        .context("cannot start the epoch thread")?;
    Ok(())
}

/// One line saying why a call trapped; the backtrace goes to the debug log.
fn trap_summary(error: &wasmtime::Error) -> String {
    match error.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{error:#}")
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
    }
}

fn read_component(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read role component {}", path.display()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
