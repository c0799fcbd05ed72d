//! OCI runtime spec (`config.json`) for a sandbox, as runc consumes it.
//!
//! Deny by default: every capability dropped, no_new_privs, a seccomp filter, read-only /sys,
//! masked /proc paths, fresh user/pid/mount/network/ipc/uts/cgroup namespaces (root inside
//! is an unprivileged uid range outside; the network namespace holds only loopback), and
//! cgroup limits on memory, CPU and pids. Nothing of the host's is bound in but guest-init's
//! binary, read-only: guest-init is reached through an abstract socket in the sandbox's
//! network namespace, not through a host directory.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::seccomp;

/// Where a build finds the operator's CA bundle (`THAW_BUILD_CA_BUNDLE`).
pub const CA_BUNDLE_PATH: &str = "/etc/thaw/ca-bundle.crt";

/// Which network a container sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// A fresh network namespace with loopback only (every sandbox, and every template
    /// build: a build runs a tenant's commands, and the host's network would hand them
    /// the host's loopback services and its whole LAN).
    Loopback,
    /// A namespace the host made and wired to the egress gateway (a build granted
    /// `[build] allow_out`). Owned by the host's user namespace, so the build's root, whose
    /// capabilities are its own user namespace's, can change nothing in it. Never used for
    /// sandboxes that are checkpointed: CRIU refuses a namespace its user namespace does not
    /// own.
    Path(PathBuf),
}

#[derive(Debug, Clone)]
pub struct ContainerConfig {
    pub rootfs: PathBuf,
    pub hostname: String,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub network: Network,
    /// Build containers (template `setup`) get [`BUILD_CAPS`]; sandboxes get none.
    pub build_caps: bool,
    pub memory_bytes: Option<u64>,
    pub cpu_quota_us: Option<u64>,
    pub pids: Option<u64>,
    /// The user namespace's mapping: root inside is `ids.host_base` outside.
    pub ids: super::userns::IdMap,
    /// Mount the read-only `/sys/fs/cgroup` view (the template's `limits.cgroup_view`).
    pub cgroup_view: bool,
    /// The static guest-init binary, bind-mounted read-only at [`GUEST_INIT_PATH`].
    pub guest_init: Option<PathBuf>,
    /// A CA bundle bound read-only at [`CA_BUNDLE_PATH`] (a build's, behind an operator's
    /// TLS-intercepting proxy: `THAW_BUILD_CA_BUNDLE`).
    pub ca_bundle: Option<PathBuf>,
    /// cgroup path below each hierarchy root.
    pub cgroup_path: String,
    /// CRIU configuration file for runc's checkpoint and restore (annotation
    /// `org.criu.config`); see [`super::checkpoint::CRIU_CONFIG`].
    pub criu_config: Option<PathBuf>,
}

/// Where guest-init appears inside a container sandbox.
pub const GUEST_INIT_PATH: &str = "/.thaw/init";

/// What a template build's root keeps: what package managers acting as root on the
/// rootfs's own files need (dpkg chowns and chmods what it unpacks, keeps setgid bits,
/// reads root-only files, and apt drops to its `_apt` user), and nothing that reaches
/// beyond the build's files. Not CAP_MKNOD (device nodes), CAP_SETFCAP (file
/// capabilities), CAP_SETPCAP, CAP_KILL, CAP_SYS_* (chroot, admin, ptrace, ...), CAP_NET_*
/// or CAP_AUDIT_*. The setuid and setgid files these allow are stripped after the build.
pub const BUILD_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_SETGID",
    "CAP_SETUID",
];

/// True when the v1 memory controller accounts swap (memsw), so `memory.swap` may be set.
/// Setting it where swap accounting is off makes runc fail to start the container.
fn memsw_available() -> bool {
    Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists()
        || Path::new("/sys/fs/cgroup/memory.swap.max").exists()
}

pub fn render(c: &ContainerConfig) -> Value {
    let caps: Vec<&str> = if c.build_caps {
        BUILD_CAPS.to_vec()
    } else {
        Vec::new()
    };
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
    ];
    // sysfs can be mounted only by a user namespace that owns the network namespace; a
    // build in a host-made namespace ([`Network::Path`]) gets an empty, read-only /sys
    // instead (binding the host's would show it the host's devices).
    mounts.push(match c.network {
        Network::Loopback => json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
        Network::Path(_) => json!({"destination": "/sys", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "noexec", "nodev", "ro", "size=4k"]}),
    });
    if c.cgroup_view {
        mounts.push(
            json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
               "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
        );
    }
    if let Some(ca) = &c.ca_bundle {
        mounts.push(json!({"destination": CA_BUNDLE_PATH, "type": "bind",
            "source": ca, "options": ["bind", "ro", "nosuid", "nodev", "noexec"]}));
    }
    if let Some(init) = &c.guest_init {
        mounts.push(json!({"destination": GUEST_INIT_PATH, "type": "bind",
            "source": init, "options": ["bind", "ro", "nosuid", "nodev"]}));
    }
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
        json!({"type": "cgroup"}),
        json!({"type": "user"}),
    ];
    match &c.network {
        Network::Loopback => namespaces.push(json!({"type": "network"})),
        Network::Path(p) => namespaces.push(json!({"type": "network", "path": p})),
    }

    let mut resources = json!({"devices": [{"allow": false, "access": "rwm"}]});
    if let Some(mem) = c.memory_bytes {
        let mut m = json!({"limit": mem});
        if memsw_available() {
            // No swap: memory+swap equals memory, so the limit is a hard one.
            m["swap"] = json!(mem);
        }
        resources["memory"] = m;
    }
    if let Some(q) = c.cpu_quota_us {
        resources["cpu"] = json!({"quota": q, "period": 100_000});
    }
    if let Some(p) = c.pids {
        resources["pids"] = json!({"limit": p});
    }

    let mut linux = json!({
        "namespaces": namespaces,
        "resources": resources,
        "cgroupsPath": c.cgroup_path,
        "uidMappings": [{"containerID": 0, "hostID": c.ids.host_base, "size": c.ids.size}],
        "gidMappings": [{"containerID": 0, "hostID": c.ids.host_base, "size": c.ids.size}],
        "maskedPaths": [
            "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
            "/proc/scsi", "/sys/kernel/debug"
        ],
        "readonlyPaths": [
            "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
        ],
    });
    linux["seccomp"] = seccomp::profile();

    let annotations = match &c.criu_config {
        Some(p) => json!({"org.criu.config": p}),
        None => json!({}),
    };
    json!({
        "ociVersion": "1.0.2",
        "annotations": annotations,
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": c.args,
            "env": c.env,
            "cwd": c.cwd,
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
                "inheritable": [], "ambient": []
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096u64, "soft": 4096u64}],
            "noNewPrivileges": true,
        },
        "root": {"path": c.rootfs, "readonly": false},
        "hostname": c.hostname,
        "mounts": mounts,
        "linux": linux,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ContainerConfig {
        ContainerConfig {
            rootfs: "/r".into(),
            hostname: "h".into(),
            args: vec!["/.thaw/init".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            network: Network::Loopback,
            build_caps: false,
            memory_bytes: Some(64 << 20),
            cpu_quota_us: Some(100_000),
            pids: Some(64),
            ids: crate::container::userns::IdMap::range(3),
            cgroup_view: false,
            guest_init: Some("/gi".into()),
            ca_bundle: None,
            cgroup_path: "/thaw/x".into(),
            criu_config: Some("/c.conf".into()),
        }
    }

    #[test]
    fn sandbox_drops_every_capability_and_isolates_network() {
        let v = render(&cfg());
        assert_eq!(v["process"]["capabilities"]["bounding"], json!([]));
        assert_eq!(v["process"]["noNewPrivileges"], json!(true));
        let ns: Vec<_> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap().to_string())
            .collect();
        for want in ["pid", "mount", "network", "ipc", "uts", "user"] {
            assert!(ns.contains(&want.to_string()), "{ns:?}");
        }
        // Root inside is the range's first uid outside, never host root.
        let base = crate::container::userns::IdMap::range(3).host_base;
        for m in ["uidMappings", "gidMappings"] {
            assert_eq!(
                v["linux"][m],
                json!([{"containerID": 0, "hostID": base, "size": 65536}])
            );
        }
        // No host directory is bound in: only guest-init's binary, read-only.
        let binds: Vec<&Value> = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["type"] == "bind")
            .collect();
        assert_eq!(binds.len(), 1, "{binds:?}");
        assert_eq!(binds[0]["destination"], GUEST_INIT_PATH);
        assert!(binds[0]["options"]
            .as_array()
            .unwrap()
            .contains(&json!("ro")));
        assert_eq!(v["linux"]["resources"]["pids"]["limit"], json!(64));
        assert_eq!(
            v["linux"]["resources"]["memory"]["limit"],
            json!(64u64 << 20)
        );
        // runc hands this file to CRIU: it is how the network lock is skipped.
        assert_eq!(v["annotations"]["org.criu.config"], json!("/c.conf"));
        let rules = v["linux"]["seccomp"]["syscalls"].as_array().unwrap();
        let denied: Vec<&str> = rules[0]["names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        for s in [
            "mount",
            "unshare",
            "setns",
            "ptrace",
            "bpf",
            "init_module",
            "keyctl",
        ] {
            assert!(denied.contains(&s), "{s} not denied");
        }
        assert!(rules
            .iter()
            .any(|r| r["names"] == json!(["clone"]) && r["args"][0]["op"] == "SCMP_CMP_MASKED_EQ"));
    }

    #[test]
    fn the_cgroup_view_is_mounted_only_when_the_template_asks() {
        let has_view = |v: &Value| {
            v["mounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["destination"] == "/sys/fs/cgroup")
        };
        let mut c = cfg();
        assert!(!has_view(&render(&c)));
        c.cgroup_view = true;
        let v = render(&c);
        assert!(has_view(&v));
        let view = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/sys/fs/cgroup")
            .unwrap();
        assert!(view["options"].as_array().unwrap().contains(&json!("ro")));
    }

    #[test]
    fn build_container_keeps_a_few_file_capabilities_and_no_network() {
        let mut c = cfg();
        c.build_caps = true;
        let v = render(&c);
        assert!(v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["type"] == "network"));
        let caps = v["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert!(caps.contains(&json!("CAP_CHOWN")), "{caps:?}");
        for never in ["CAP_MKNOD", "CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SETFCAP"] {
            assert!(!caps.contains(&json!(never)), "{never} in {caps:?}");
        }
        assert_eq!(v["process"]["noNewPrivileges"], json!(true));
        assert_eq!(v["linux"]["seccomp"], seccomp::profile());
        assert!(!v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["destination"] == "/etc/resolv.conf"));
    }
}
