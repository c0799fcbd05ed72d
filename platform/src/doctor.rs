//! `thaw doctor`: every system dependency, whether it is usable, and the fix when it is not;
//! plus which isolation tier `auto` picks and why.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::paths::{guest_init_binary, is_static_elf};

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    /// What was found (a version, a path) or what is wrong.
    pub detail: String,
    /// How to fix it; empty when ok.
    pub fix: String,
    /// Whether the container tier needs it (false: optional or microvm-only).
    pub required: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    pub tier: String,
    pub tier_reason: String,
    pub ok: bool,
}

fn check(name: &str, required: bool, r: Result<String, (String, String)>) -> Check {
    match r {
        Ok(detail) => Check {
            name: name.into(),
            ok: true,
            detail,
            fix: String::new(),
            required,
        },
        Err((detail, fix)) => Check {
            name: name.into(),
            ok: false,
            detail,
            fix,
            required,
        },
    }
}

fn version_of(bin: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .map_err(|e| format!("`{bin}` not found ({e})"))?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

pub fn criu_major() -> Option<u32> {
    let out = Command::new("criu").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text
        .lines()
        .find_map(|l| l.strip_prefix("Version:"))?
        .trim();
    v.split('.').next()?.parse().ok()
}

/// Whether hardware-backed KVM and Cloud Hypervisor are usable, with the reasons if not
/// (the microvm crate owns the check: binary on PATH, /dev/kvm usable, vmx/svm present).
pub fn microvm_availability() -> Result<String, String> {
    match thaw_microvm::cloud_hypervisor_available() {
        thaw_microvm::Availability::Available { version, binary } => Ok(format!(
            "{version} ({}){}",
            binary.display(),
            if std::env::var_os(thaw_microvm::availability::TEST_DOUBLE_ENV)
                .is_some_and(|v| v == "1")
            {
                "; TEST DOUBLE mode: KVM checks skipped"
            } else {
                " with hardware KVM"
            }
        )),
        other => Err(other.reason()),
    }
}

pub fn run() -> Report {
    let mut checks = Vec::new();
    let root = nix::unistd::geteuid().is_root();
    checks.push(check(
        "root",
        true,
        if root {
            Ok("running as root".into())
        } else {
            Err((
                "not root: mounts, namespaces and cgroups need it".into(),
                "run thaw as root (sudo)".into(),
            ))
        },
    ));
    checks.push(check(
        "runc",
        true,
        version_of("runc", &["--version"])
            .map_err(|e| (e, "run `make deps` or `apt-get install runc`".into())),
    ));
    checks.push(check(
        "criu",
        true,
        match criu_major() {
            Some(v) if v >= 4 => version_of("criu", &["--version"])
                .map(|s| s.replace("Version: ", "criu "))
                .map_err(|e| (e, String::new())),
            Some(v) => Err((
                format!("criu {v}.x is too old (its vDSO check fails on current kernels)"),
                "run `make deps` (builds CRIU 4.1.1 into /usr/local/sbin)".into(),
            )),
            None => Err((
                "criu not found".into(),
                "run `make deps` (builds CRIU 4.1.1 into /usr/local/sbin)".into(),
            )),
        },
    ));
    checks.push(check(
        "egress",
        false,
        match (
            version_of("ip", &["-V"]),
            version_of("iptables-legacy-restore", &["--version"]),
            version_of("iptables-restore", &["--version"]),
        ) {
            (Ok(_), Ok(v), _) => Ok(format!(
                "sandboxes granted egress are wired in about 2 ms ({v}: the nat table is installed with one setsockopt)"
            )),
            (Ok(_), Err(_), Ok(v)) => Ok(format!(
                "sandboxes granted egress are wired by running {v} each (about 10 ms; iptables-legacy-restore is faster)"
            )),
            _ => Err((
                "ip or iptables-restore missing: a sandbox granted egress cannot be wired".into(),
                "run `make deps` (apt-get install iproute2 iptables)".into(),
            )),
        },
    ));
    let criu_features = crate::container::criu::features_uncached();
    checks.push(check(
        "criu mmap-pages",
        false,
        match criu_features {
            Some(f) if f.mmap_pages => Ok("clones map the snapshot's memory copy-on-write".into()),
            Some(_) => Err((
                "this criu lacks thaw's mmap-pages patch: every clone copies the snapshot's \
                 memory (slower restores, no pages shared between clones)"
                    .into(),
                "run `make deps` (builds CRIU with scripts/criu-patches)".into(),
            )),
            None => Err(("criu not found".into(), "run `make deps`".into())),
        },
    ));
    checks.push(check(
        "criu restore-gate",
        false,
        match criu_features {
            Some(f) if f.restore_gate => {
                Ok("prepared sandboxes start CRIU before anyone asks for them".into())
            }
            Some(_) => Err((
                "this criu lacks thaw's restore-gate patch: every restore pays CRIU's start \
                 and preparation (about 5 ms)"
                    .into(),
                "run `make deps` (builds CRIU with scripts/criu-patches)".into(),
            )),
            None => Err(("criu not found".into(), "run `make deps`".into())),
        },
    ));
    checks.push(check(
        "busybox-static",
        true,
        if Path::new("/bin/busybox").exists() {
            Ok("/bin/busybox".into())
        } else {
            Err((
                "/bin/busybox missing (the busybox base)".into(),
                "run `make deps` or `apt-get install busybox-static`".into(),
            ))
        },
    ));
    checks.push(check(
        "debootstrap",
        false,
        if Path::new("/usr/sbin/debootstrap").exists() {
            Ok("/usr/sbin/debootstrap".into())
        } else {
            Err((
                "debootstrap missing (needed by templates on a Debian base)".into(),
                "run `make deps` or `apt-get install debootstrap`".into(),
            ))
        },
    ));
    checks.push(check(
        "user namespaces",
        true,
        crate::container::userns::probe().map_err(|e| {
            (
                format!("sandboxes cannot run in user namespaces: {e}"),
                "use Linux 5.19 or later with user namespaces enabled \
                 (sysctl user.max_user_namespaces > 0), and run thaw as root"
                    .into(),
            )
        }),
    ));
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    checks.push(check(
        "overlayfs",
        true,
        if fs.contains("overlay") {
            Ok("available".into())
        } else {
            Err(("kernel has no overlayfs".into(), "modprobe overlay".into()))
        },
    ));
    let cg = if Path::new("/sys/fs/cgroup/memory").is_dir() {
        Ok("cgroup v1 (memory, cpu, pids controllers)".to_string())
    } else if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        Ok("cgroup v2".to_string())
    } else {
        Err((
            "no cgroup hierarchy mounted at /sys/fs/cgroup".to_string(),
            "mount cgroup2 on /sys/fs/cgroup".to_string(),
        ))
    };
    checks.push(check("cgroups", true, cg));
    checks.push(check(
        "guest-init",
        true,
        match guest_init_binary() {
            Ok(p) => match is_static_elf(&p) {
                Ok(true) => Ok(format!("{} (static)", p.display())),
                _ => Err((
                    format!("{} is not a static executable", p.display()),
                    "run `make build`".into(),
                )),
            },
            Err(e) => Err((e.to_string(), "run `make build`".into())),
        },
    ));
    let micro = microvm_availability();
    checks.push(check(
        "microvm tier",
        false,
        micro
            .clone()
            .map_err(|e| (e, "see README: Running on a KVM host".into())),
    ));
    let env = std::env::var(crate::tier::TIER_ENV).ok();
    let chosen = crate::tier::resolve(crate::tier::TierChoice::Auto, env.as_deref(), || {
        micro.clone().map(|_| ())
    });
    let (tier, tier_reason) = match (chosen, &micro) {
        (Ok(t), _) if env.as_deref().is_some_and(|e| !e.is_empty() && e != "auto") => (
            t.as_str().to_string(),
            format!("{}={} (templates may still ask for a tier in template.toml)", crate::tier::TIER_ENV, env.unwrap_or_default()),
        ),
        (Ok(t), Ok(v)) => (
            t.as_str().to_string(),
            format!("templates with `tier = \"auto\"` (the default) run as microVMs: {v}"),
        ),
        (Ok(t), Err(why)) => (
            t.as_str().to_string(),
            format!("templates with `tier = \"auto\"` (the default) run in containers; microvm unavailable: {why}"),
        ),
        (Err(e), _) => ("container".to_string(), e.to_string()),
    };
    let ok = checks.iter().all(|c| c.ok || !c.required);
    Report {
        checks,
        tier,
        tier_reason,
        ok,
    }
}
