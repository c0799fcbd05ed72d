//! Cloud Hypervisor's request bodies, checked as the real VMM checks them, from raw JSON
//! (deliberately not thaw's own types, so that a client mistake is caught here rather than
//! shared).

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

/// Cloud Hypervisor's default guest RAM when `memory` is absent.
const DEFAULT_MEMORY: u64 = 512 << 20;
/// Init path used when the kernel command line has no `thaw.init=`.
const DEFAULT_INIT: &str = "/sbin/thaw-init";
const CONSOLE_MODES: [&str; 6] = ["Off", "Pty", "Tty", "File", "Socket", "Null"];

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// Not the documented JSON shape (wrong type, missing required field): HTTP 400, as the
    /// real VMM fails to deserialize it.
    Shape(String),
    /// Well formed but refused by validation (missing file, reserved CID): HTTP 500.
    Rejected(String),
}

impl Invalid {
    pub fn message(self) -> String {
        match self {
            Invalid::Shape(m) | Invalid::Rejected(m) => m,
        }
    }
}

pub(crate) fn shape(msg: impl Into<String>) -> Invalid {
    Invalid::Shape(msg.into())
}

fn rejected(msg: impl Into<String>) -> Invalid {
    Invalid::Rejected(msg.into())
}

/// Where the guest's console output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serial {
    File(PathBuf),
    /// `Tty`: the VMM's own stdout.
    Inherit,
    /// `Off` and `Null`.
    Discard,
}

/// What booting the fake guest needs from a VmConfig.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSpec {
    pub disk: PathBuf,
    /// `disks[0]` as configured (`image_type`, `backing_files`: see `disk.rs`).
    pub disk_config: Value,
    pub disk_readonly: bool,
    /// The init's path inside the guest root.
    pub init: String,
    pub serial: Serial,
    pub vsock_socket: Option<PathBuf>,
}

pub(crate) fn object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>, Invalid> {
    v.as_object()
        .ok_or_else(|| shape(format!("{what} must be a JSON object")))
}

/// An optional field of `obj` that must be a string when present.
pub(crate) fn opt_str<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    what: &str,
) -> Result<Option<&'a str>, Invalid> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(shape(format!("{what}.{key} must be a string"))),
    }
}

fn opt_u64(obj: &Map<String, Value>, key: &str, what: &str) -> Result<Option<u64>, Invalid> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| shape(format!("{what}.{key} must be a non-negative integer"))),
    }
}

pub(crate) fn opt_bool(
    obj: &Map<String, Value>,
    key: &str,
    what: &str,
) -> Result<Option<bool>, Invalid> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(shape(format!("{what}.{key} must be a boolean"))),
    }
}

/// A path the VMM opens: it must exist (the real VMM fails to open it otherwise).
fn existing(path: &str, what: &str) -> Result<(), Invalid> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| rejected(format!("cannot access {what} {path}: {e}")))
}

/// Validates a `vm.create` body (or a snapshot's `config.json`) and returns the config in
/// effect: every field received, plus Cloud Hypervisor's defaults for cpus and memory.
pub fn validate(body: &Value) -> Result<Value, Invalid> {
    let top = object(body, "VmConfig")?;
    check_payload(top)?;
    check_cpus(top)?;
    check_memory(top)?;
    check_disks(top)?;
    check_vsock(top)?;
    for key in ["serial", "console"] {
        check_console(top, key)?;
    }
    check_rng(top)?;
    check_net(top)?;
    Ok(with_defaults(body.clone()))
}

/// Net devices are checked for shape only: the double's guest has no network device (its
/// processes see an empty network namespace), so a wired tap would carry nothing. The real
/// Cloud Hypervisor's taps are tested nested (`tests/microvm.rs`, `real_shell_*`).
fn check_net(top: &Map<String, Value>) -> Result<(), Invalid> {
    let Some(net) = top.get("net") else {
        return Ok(());
    };
    let net = net
        .as_array()
        .ok_or_else(|| shape("net must be an array"))?;
    for (i, n) in net.iter().enumerate() {
        let what = format!("net[{i}]");
        let n = object(n, &what)?;
        opt_str(n, "tap", &what)?;
        opt_str(n, "mac", &what)?;
    }
    Ok(())
}

fn check_payload(top: &Map<String, Value>) -> Result<(), Invalid> {
    let Some(payload) = top.get("payload") else {
        return Err(rejected("no payload: a kernel is required"));
    };
    let payload = object(payload, "payload")?;
    let kernel = opt_str(payload, "kernel", "payload")?
        .ok_or_else(|| rejected("payload.kernel is required"))?;
    existing(kernel, "kernel")?;
    if let Some(initramfs) = opt_str(payload, "initramfs", "payload")? {
        existing(initramfs, "initramfs")?;
    }
    opt_str(payload, "cmdline", "payload")?;
    Ok(())
}

fn check_cpus(top: &Map<String, Value>) -> Result<(), Invalid> {
    let Some(cpus) = top.get("cpus") else {
        return Ok(());
    };
    let cpus = object(cpus, "cpus")?;
    let boot = opt_u64(cpus, "boot_vcpus", "cpus")?.unwrap_or(1);
    let max = opt_u64(cpus, "max_vcpus", "cpus")?.unwrap_or(boot);
    if boot == 0 || boot > 255 {
        return Err(rejected(format!(
            "cpus.boot_vcpus {boot} is not in 1..=255"
        )));
    }
    if max < boot {
        return Err(rejected(format!(
            "Max vCPUs ({max}) lower than boot vCPUs ({boot})"
        )));
    }
    Ok(())
}

fn check_memory(top: &Map<String, Value>) -> Result<(), Invalid> {
    let Some(memory) = top.get("memory") else {
        return Ok(());
    };
    let memory = object(memory, "memory")?;
    let size =
        opt_u64(memory, "size", "memory")?.ok_or_else(|| shape("memory.size is required"))?;
    if size == 0 || size % 4096 != 0 {
        return Err(rejected(format!(
            "memory.size {size} must be a non-zero multiple of the 4 KiB page size"
        )));
    }
    for key in ["shared", "hugepages", "prefault", "thp", "mergeable"] {
        opt_bool(memory, key, "memory")?;
    }
    Ok(())
}

fn check_disks(top: &Map<String, Value>) -> Result<(), Invalid> {
    let Some(disks) = top.get("disks") else {
        return Ok(());
    };
    let disks = disks
        .as_array()
        .ok_or_else(|| shape("disks must be an array"))?;
    for (i, disk) in disks.iter().enumerate() {
        let what = format!("disks[{i}]");
        let disk = object(disk, &what)?;
        let path = opt_str(disk, "path", &what)?
            .ok_or_else(|| rejected(format!("{what}.path is required")))?;
        opt_bool(disk, "readonly", &what)?;
        opt_bool(disk, "backing_files", &what)?;
        if let Some(t) = opt_str(disk, "image_type", &what)? {
            if !crate::disk::IMAGE_TYPES.contains(&t) {
                return Err(shape(format!(
                    "{what}.image_type {t:?} is not one of {:?}",
                    crate::disk::IMAGE_TYPES
                )));
            }
        }
        existing(path, "disk image")?;
    }
    Ok(())
}

fn check_vsock(top: &Map<String, Value>) -> Result<(), Invalid> {
    let Some(vsock) = top.get("vsock") else {
        return Ok(());
    };
    let vsock = object(vsock, "vsock")?;
    let cid = opt_u64(vsock, "cid", "vsock")?.ok_or_else(|| shape("vsock.cid is required"))?;
    let socket =
        opt_str(vsock, "socket", "vsock")?.ok_or_else(|| shape("vsock.socket is required"))?;
    if cid < 3 {
        return Err(rejected(format!(
            "Invalid vsock CID {cid}: CIDs 0-2 are reserved, guest CIDs start at 3"
        )));
    }
    if !Path::new(socket).is_absolute() {
        return Err(rejected(format!(
            "vsock.socket {socket} is not an absolute path"
        )));
    }
    Ok(())
}

fn check_console(top: &Map<String, Value>, key: &str) -> Result<(), Invalid> {
    let Some(c) = top.get(key) else {
        return Ok(());
    };
    let c = object(c, key)?;
    let mode = opt_str(c, "mode", key)?.ok_or_else(|| shape(format!("{key}.mode is required")))?;
    if !CONSOLE_MODES.contains(&mode) {
        return Err(shape(format!(
            "{key}.mode {mode:?} is not one of {CONSOLE_MODES:?}"
        )));
    }
    let file = opt_str(c, "file", key)?;
    if mode == "File" && file.is_none() {
        return Err(rejected(format!(
            "{key}.mode is File but {key}.file is missing"
        )));
    }
    Ok(())
}

fn check_rng(top: &Map<String, Value>) -> Result<(), Invalid> {
    let Some(rng) = top.get("rng") else {
        return Ok(());
    };
    let rng = object(rng, "rng")?;
    if let Some(src) = opt_str(rng, "src", "rng")? {
        existing(src, "entropy source")?;
    }
    Ok(())
}

/// Fills in what Cloud Hypervisor reports for absent sections, keeping every field received.
fn with_defaults(mut config: Value) -> Value {
    if let Some(top) = config.as_object_mut() {
        top.entry("cpus")
            .or_insert_with(|| json!({"boot_vcpus": 1, "max_vcpus": 1}));
        top.entry("memory")
            .or_insert_with(|| json!({"size": DEFAULT_MEMORY}));
        if let Some(disks) = top.get_mut("disks").and_then(Value::as_array_mut) {
            for d in disks.iter_mut().filter_map(Value::as_object_mut) {
                d.entry("readonly").or_insert(Value::Bool(false));
            }
        }
    }
    config
}

/// Guest RAM in bytes, as `vm.info` reports it.
pub fn memory_size(config: &Value) -> u64 {
    config
        .pointer("/memory/size")
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_MEMORY)
}

/// The `thaw.init=PATH` token of a kernel command line (what the initramfs would exec).
pub fn init_from_cmdline(cmdline: &str) -> String {
    cmdline
        .split_whitespace()
        .find_map(|t| t.strip_prefix("thaw.init="))
        .filter(|p| !p.is_empty())
        .unwrap_or(DEFAULT_INIT)
        .to_owned()
}

/// What the fake needs to boot from a config already passed through [`validate`].
pub fn boot_spec(config: &Value) -> Result<BootSpec, String> {
    let disk = config
        .pointer("/disks/0")
        .ok_or("no disk configured: fake-cloud-hypervisor boots the guest from disks[0]")?;
    let path = disk
        .get("path")
        .and_then(Value::as_str)
        .ok_or("disks[0].path is missing")?;
    let cmdline = config
        .pointer("/payload/cmdline")
        .and_then(Value::as_str)
        .unwrap_or("");
    Ok(BootSpec {
        disk: PathBuf::from(path),
        disk_config: disk.clone(),
        disk_readonly: disk
            .get("readonly")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        init: init_from_cmdline(cmdline),
        serial: serial(config)?,
        vsock_socket: config
            .pointer("/vsock/socket")
            .and_then(Value::as_str)
            .map(PathBuf::from),
    })
}

/// Cloud Hypervisor's serial port defaults to `Null`.
fn serial(config: &Value) -> Result<Serial, String> {
    let mode = config
        .pointer("/serial/mode")
        .and_then(Value::as_str)
        .unwrap_or("Null");
    match mode {
        "Off" | "Null" => Ok(Serial::Discard),
        "Tty" => Ok(Serial::Inherit),
        "File" => config
            .pointer("/serial/file")
            .and_then(Value::as_str)
            .map(|f| Serial::File(PathBuf::from(f)))
            .ok_or_else(|| "serial.mode is File but serial.file is missing".to_owned()),
        other => Err(format!(
            "serial mode {other} is not supported by fake-cloud-hypervisor (use File, Tty, Null \
             or Off)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> Value {
        let f = dir.join("f");
        std::fs::write(&f, b"x").unwrap();
        let f = f.to_str().unwrap();
        json!({
            "payload": {"kernel": f, "cmdline": "console=ttyS0 thaw.init=/init", "initramfs": f},
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
            "memory": {"size": 536870912u64, "thp": true},
            "disks": [{"path": f}],
            "vsock": {"cid": 3, "socket": "/w/vsock.sock"},
            "serial": {"mode": "File", "file": "/w/console.log"},
            "console": {"mode": "Off"},
            "rng": {"src": "/dev/urandom"}
        })
    }

    #[test]
    fn accepts_the_documented_shape_and_keeps_fields() {
        let d = tempfile::tempdir().unwrap();
        let body = sample(d.path());
        let cfg = validate(&body).unwrap();
        assert_eq!(cfg["disks"][0]["readonly"], false);
        assert_eq!(cfg["vsock"], body["vsock"]);
        let spec = boot_spec(&cfg).unwrap();
        assert_eq!(spec.init, "/init");
        assert_eq!(spec.serial, Serial::File("/w/console.log".into()));
        assert_eq!(memory_size(&cfg), 512 << 20);
        assert_eq!(init_from_cmdline("quiet"), DEFAULT_INIT);
    }

    #[test]
    fn rejects_client_mistakes() {
        let d = tempfile::tempdir().unwrap();
        let mut b = sample(d.path());
        b["vsock"]["cid"] = json!(2);
        assert!(matches!(validate(&b), Err(Invalid::Rejected(_))));
        let mut b = sample(d.path());
        b["memory"]["size"] = json!("512M");
        assert!(matches!(validate(&b), Err(Invalid::Shape(_))));
        let mut b = sample(d.path());
        b["disks"][0]["path"] = json!("/nonexistent/disk");
        assert!(matches!(validate(&b), Err(Invalid::Rejected(_))));
        let mut b = sample(d.path());
        b["serial"]["mode"] = json!("file");
        assert!(matches!(validate(&b), Err(Invalid::Shape(_))));
        let mut b = sample(d.path());
        b["cpus"]["max_vcpus"] = json!(1);
        assert!(matches!(validate(&b), Err(Invalid::Rejected(_))));
    }
}
