//! The REST API (`/api/v1/...`) and the VM state machine behind it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::{watch, Mutex};

use crate::config::{self, Invalid};
use crate::error::ChError;
use crate::guest::{self, Guest};
use crate::snapshot;

const GUEST_ROOT: &str = "fake-guest-root";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VmState {
    Created,
    Running,
    Paused,
    Shutdown,
}

impl VmState {
    fn name(self) -> &'static str {
        match self {
            VmState::Created => "Created",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Shutdown => "Shutdown",
        }
    }
}

struct Vm {
    config: Value,
    state: VmState,
    guest: Option<Guest>,
}

#[derive(Default)]
struct Vmm {
    vm: Option<Vm>,
    next_guest_id: u64,
}

/// Everything the handlers share. API calls are serialised by the one lock, as the real VMM
/// handles one request at a time.
pub struct App {
    vmm: Mutex<Vmm>,
    guest_root: PathBuf,
    private_mounts: bool,
    exit_tx: watch::Sender<bool>,
}

impl App {
    pub fn new(api_socket: &Path, private_mounts: bool) -> Self {
        let dir = api_socket.parent().unwrap_or(Path::new("/"));
        App {
            vmm: Mutex::new(Vmm::default()),
            guest_root: dir.join(GUEST_ROOT),
            private_mounts,
            exit_tx: watch::channel(false).0,
        }
    }

    /// Resolves when the process should exit: `vmm.shutdown`, the guest powered off, or
    /// SIGTERM/SIGINT.
    pub async fn wait_exit(&self) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut rx = self.exit_tx.subscribe();
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            let _ = rx.wait_for(|e| *e).await;
            return;
        };
        tokio::select! {
            _ = rx.wait_for(|e| *e) => {}
            _ = term.recv() => log!("SIGTERM"),
            _ = int.recv() => log!("SIGINT"),
        }
    }

    fn request_exit(&self) {
        self.exit_tx.send_replace(true);
    }

    /// Kills the guest, if any, before the process exits.
    pub async fn stop_everything(&self) {
        let mut vmm = self.vmm.lock().await;
        if let Some(g) = vmm.vm.as_mut().and_then(|vm| vm.guest.take()) {
            g.stop().await;
        }
    }
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/api/v1/vmm.ping", get(ping))
        .route("/api/v1/vmm.shutdown", put(vmm_shutdown))
        .route("/api/v1/vm.create", put(create))
        .route("/api/v1/vm.boot", put(boot))
        .route("/api/v1/vm.pause", put(pause))
        .route("/api/v1/vm.resume", put(resume))
        .route("/api/v1/vm.snapshot", put(snapshot))
        .route("/api/v1/vm.restore", put(restore))
        .route("/api/v1/vm.info", get(info))
        .route("/api/v1/vm.shutdown", put(shutdown))
        .route("/api/v1/vm.delete", put(delete))
        .with_state(app)
}

type Answer = Result<StatusCode, ChError>;

fn parse_body(body: &Bytes) -> Result<Value, ChError> {
    serde_json::from_slice(body).map_err(|e| ChError::bad_request(e.to_string()))
}

/// A refused body: shape errors are HTTP 400 (the VMM cannot deserialize it), the rest are
/// the action's failure.
fn invalid(what: &str, e: Invalid) -> ChError {
    match e {
        Invalid::Shape(m) => ChError::bad_request(m),
        Invalid::Rejected(m) => {
            ChError::api(what, vec!["Error validating configuration".into(), m])
        }
    }
}

async fn ping() -> Json<Value> {
    Json(json!({
        "build_version": crate::BUILD_VERSION,
        "version": crate::VERSION,
        "pid": std::process::id(),
        "features": [],
    }))
}

async fn vmm_shutdown(State(app): State<Arc<App>>) -> Answer {
    app.stop_everything().await;
    app.request_exit();
    Ok(StatusCode::NO_CONTENT)
}

async fn create(State(app): State<Arc<App>>, body: Bytes) -> Answer {
    const WHAT: &str = "The VM could not be created";
    let body = parse_body(&body)?;
    let mut vmm = app.vmm.lock().await;
    if vmm.vm.is_some() {
        return Err(ChError::api(WHAT, vec!["VM is already created".into()]));
    }
    let config = config::validate(&body).map_err(|e| invalid(WHAT, e))?;
    vmm.vm = Some(Vm {
        config,
        state: VmState::Created,
        guest: None,
    });
    log!("vm created");
    Ok(StatusCode::NO_CONTENT)
}

async fn boot(State(app): State<Arc<App>>) -> Answer {
    const WHAT: &str = "The VM could not be booted";
    let mut vmm = app.vmm.lock().await;
    let vmm = &mut *vmm;
    let Some(vm) = vmm.vm.as_mut() else {
        return Err(ChError::api(WHAT, vec!["VM is not created".into()]));
    };
    if matches!(vm.state, VmState::Running | VmState::Paused) {
        return Err(ChError::api(WHAT, vec!["VM is already booted".into()]));
    }
    vmm.next_guest_id += 1;
    let guest = start_guest(&app, &vm.config, vmm.next_guest_id, false)
        .await
        .map_err(|e| ChError::api(WHAT, vec![e]))?;
    vm.guest = Some(guest);
    vm.state = VmState::Running;
    Ok(StatusCode::NO_CONTENT)
}

/// Boots the guest described by `config` (left stopped when `paused`) and watches for it to
/// power off by itself.
async fn start_guest(
    app: &Arc<App>,
    config: &Value,
    id: u64,
    paused: bool,
) -> Result<Guest, String> {
    if !app.private_mounts {
        return Err("fake-cloud-hypervisor has no private mount namespace: run it as root".into());
    }
    let spec = config::boot_spec(config)?;
    let guest = guest::boot(&spec, &app.guest_root, id).await?;
    if paused {
        if let Err(e) = guest.pause().await {
            guest.stop().await;
            return Err(e);
        }
    }
    tokio::spawn(watch_power_off(app.clone(), id, guest.exited()));
    Ok(guest)
}

/// A guest whose init exits by itself has powered off: like Cloud Hypervisor on a
/// guest-initiated shutdown, clean up and end the process. A guest stopped through the API
/// is no longer the current one when this runs, so nothing happens.
async fn watch_power_off(app: Arc<App>, id: u64, mut exited: watch::Receiver<Option<String>>) {
    let status = match exited.wait_for(Option::is_some).await {
        Ok(s) => s.clone().unwrap_or_default(),
        Err(_) => return,
    };
    let mut vmm = app.vmm.lock().await;
    let Some(vm) = vmm.vm.as_mut() else { return };
    if vm.guest.as_ref().map(|g| g.id) != Some(id) {
        return;
    }
    log!("the guest's init exited by itself ({status}): guest powered off, exiting");
    if let Some(g) = vm.guest.take() {
        g.stop().await;
    }
    vm.state = VmState::Shutdown;
    app.request_exit();
}

fn transition(what: &str, from: VmState, to: VmState) -> ChError {
    ChError::api(
        what,
        vec![format!(
            "Invalid VM state transition: {} to {}",
            from.name(),
            to.name()
        )],
    )
}

async fn pause(State(app): State<Arc<App>>) -> Answer {
    const WHAT: &str = "The VM could not be paused";
    let mut vmm = app.vmm.lock().await;
    let vm = booted(&mut vmm, WHAT)?;
    if vm.state != VmState::Running {
        return Err(transition(WHAT, vm.state, VmState::Paused));
    }
    if let Some(g) = &vm.guest {
        g.pause().await.map_err(|e| ChError::api(WHAT, vec![e]))?;
    }
    vm.state = VmState::Paused;
    Ok(StatusCode::NO_CONTENT)
}

async fn resume(State(app): State<Arc<App>>) -> Answer {
    const WHAT: &str = "The VM could not be resumed";
    let mut vmm = app.vmm.lock().await;
    let vm = booted(&mut vmm, WHAT)?;
    if vm.state != VmState::Paused {
        return Err(transition(WHAT, vm.state, VmState::Running));
    }
    if let Some(g) = &vm.guest {
        g.resume();
    }
    vm.state = VmState::Running;
    Ok(StatusCode::NO_CONTENT)
}

/// The VM, if it has a running or paused guest.
fn booted<'a>(vmm: &'a mut Vmm, what: &str) -> Result<&'a mut Vm, ChError> {
    match vmm.vm.as_mut() {
        Some(vm) if vm.guest.is_some() => Ok(vm),
        _ => Err(ChError::api(what, vec!["VM is not running".into()])),
    }
}

async fn snapshot(State(app): State<Arc<App>>, body: Bytes) -> Answer {
    const WHAT: &str = "The VM could not be snapshotted";
    let body = parse_body(&body)?;
    let dir = snapshot::parse_request(&body).map_err(|e| match e {
        Invalid::Shape(m) => ChError::bad_request(m),
        Invalid::Rejected(m) => ChError::api(WHAT, vec![m]),
    })?;
    let mut vmm = app.vmm.lock().await;
    let vm = booted(&mut vmm, WHAT)?;
    if vm.state != VmState::Paused {
        return Err(ChError::api(WHAT, vec!["VM is not paused".into()]));
    }
    snapshot::write(&dir, &vm.config).map_err(|e| ChError::api(WHAT, vec![e]))?;
    log!(
        "snapshot written to {} (no guest memory: test double)",
        dir.display()
    );
    Ok(StatusCode::NO_CONTENT)
}

async fn restore(State(app): State<Arc<App>>, body: Bytes) -> Answer {
    const WHAT: &str = "The VM could not be restored";
    let body = parse_body(&body)?;
    let req = snapshot::parse_restore(&body).map_err(|e| match e {
        Invalid::Shape(m) => ChError::bad_request(m),
        Invalid::Rejected(m) => ChError::api(WHAT, vec![m]),
    })?;
    let mut vmm = app.vmm.lock().await;
    if vmm.vm.is_some() {
        return Err(ChError::api(WHAT, vec!["VM is already created".into()]));
    }
    let config = snapshot::read(&req.dir).map_err(|e| ChError::api(WHAT, e))?;
    vmm.next_guest_id += 1;
    let guest = start_guest(&app, &config, vmm.next_guest_id, !req.resume)
        .await
        .map_err(|e| ChError::api(WHAT, vec![e]))?;
    let state = if req.resume {
        VmState::Running
    } else {
        VmState::Paused
    };
    log!(
        "restored from {} ({}; booted afresh from the disk)",
        req.dir.display(),
        state.name()
    );
    vmm.vm = Some(Vm {
        config,
        state,
        guest: Some(guest),
    });
    Ok(StatusCode::NO_CONTENT)
}

async fn info(State(app): State<Arc<App>>) -> Result<Json<Value>, ChError> {
    let vmm = app.vmm.lock().await;
    let Some(vm) = vmm.vm.as_ref() else {
        return Err(ChError::api(
            "The VM information could not be retrieved",
            vec!["VM is not created".into()],
        ));
    };
    Ok(Json(json!({
        "config": vm.config,
        "state": vm.state.name(),
        "memory_actual_size": config::memory_size(&vm.config),
    })))
}

async fn shutdown(State(app): State<Arc<App>>) -> Answer {
    const WHAT: &str = "The VM could not be shut down";
    let mut vmm = app.vmm.lock().await;
    let vm = booted(&mut vmm, WHAT)?;
    if let Some(g) = vm.guest.take() {
        g.stop().await;
    }
    vm.state = VmState::Shutdown;
    Ok(StatusCode::NO_CONTENT)
}

/// Deleting nothing succeeds, as in Cloud Hypervisor.
async fn delete(State(app): State<Arc<App>>) -> Answer {
    let mut vmm = app.vmm.lock().await;
    if let Some(mut vm) = vmm.vm.take() {
        if let Some(g) = vm.guest.take() {
            g.stop().await;
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_root_sits_next_to_the_api_socket() {
        let app = App::new(Path::new("/w/vm1/api.sock"), true);
        assert_eq!(app.guest_root, Path::new("/w/vm1").join(GUEST_ROOT));
    }
}
