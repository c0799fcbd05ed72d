//! The sandbox seccomp filter (OCI `linux.seccomp`).
//!
//! Allow by default, deny the syscalls that reach kernel surface a sandboxed task never needs:
//! namespaces and mounts (the escape toolkit), kernel modules and kexec, keyrings, BPF and
//! perf, io_uring, clock setting, swap, reboot, ptrace and cross-process memory access, and
//! handle-based opens. The list follows Docker's default profile's intent in deny-list form,
//! which keeps it short enough to audit. Denied calls fail with EPERM, so programs that probe
//! for features degrade instead of dying.

use serde_json::{json, Value};

/// Denied for every sandbox task.
const DENIED: &[&str] = &[
    "acct",
    "add_key",
    "adjtimex",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "iopl",
    "ioperm",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "syslog",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "vhangup",
];

const CLONE_NEWUSER: u64 = 0x1000_0000;

/// Build containers (template `setup`) run package managers, which need a little more; they
/// still may not create namespaces or load modules.
const BUILD_ALLOWED: &[&str] = &["mount", "umount2"];

pub fn profile(build: bool) -> Value {
    let denied: Vec<&str> = DENIED
        .iter()
        .copied()
        .filter(|s| !(build && BUILD_ALLOWED.contains(s)))
        .collect();
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM},
            // clone(CLONE_NEWUSER) would hand the task a user namespace with every capability.
            {"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM,
             "args": [{"index": 0, "value": CLONE_NEWUSER, "valueTwo": CLONE_NEWUSER,
                       "op": "SCMP_CMP_MASKED_EQ"}]},
            // clone3 passes flags in memory, out of seccomp's reach: answer ENOSYS so libc
            // falls back to clone, which the rule above can inspect.
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS},
        ],
    })
}
