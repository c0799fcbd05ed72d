//! The sandbox seccomp filter (OCI `linux.seccomp`).
//!
//! Allow by default, deny the syscalls that reach kernel surface a sandboxed task never needs:
//! namespaces and mounts (the escape toolkit), kernel modules and kexec, keyrings, BPF and
//! perf, io_uring, clock setting, swap, reboot, ptrace and cross-process memory access, and
//! handle-based opens, sockets of the vsock family and of every netlink protocol but
//! NETLINK_ROUTE, and device-node mknod. The list follows Docker's default profile's intent in deny-list form,
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
    // Obsolete calls Docker's profile also refuses; runc skips a name the kernel's
    // architecture lacks, so listing 32-bit-only ones is harmless.
    "_sysctl",
    "query_module",
    "stime",
    "sysfs",
    "ustat",
    "vm86",
    "vm86old",
];

const CLONE_NEWUSER: u64 = 0x1000_0000;

/// `socket(2)` domains and netlink protocols (linux/socket.h, linux/netlink.h).
const AF_NETLINK: u64 = 16;
const AF_VSOCK: u64 = 40;
const NETLINK_ROUTE: u64 = 0;
/// `int` arguments arrive in 64-bit registers whose upper half the kernel ignores: compare
/// only the low 32 bits, or a caller could set a high bit to slip past an equality test.
const INT_MASK: u64 = 0xffff_ffff;
/// File type bits of a `mode_t`, and the two device types among them.
const S_IFMT: u64 = 0o170_000;
const S_IFCHR: u64 = 0o020_000;
const S_IFBLK: u64 = 0o060_000;

/// The filter of every sandbox and of every template build (`setup`): builds get the same
/// one, since a build runs a tenant's commands just as an invocation does.
pub fn profile() -> Value {
    let eperm = libc::EPERM;
    let mut rules = vec![
        json!({"names": DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": eperm}),
        // clone(CLONE_NEWUSER) would hand the task a user namespace with every capability.
        json!({"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": eperm,
         "args": [{"index": 0, "value": CLONE_NEWUSER, "valueTwo": CLONE_NEWUSER,
                   "op": "SCMP_CMP_MASKED_EQ"}]}),
        // clone3 passes flags in memory, out of seccomp's reach: answer ENOSYS so libc
        // falls back to clone, which the rule above can inspect.
        json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS}),
        // socketcall (32-bit x86 only) multiplexes socket(2) behind a pointer, out of reach
        // of the socket rules below; current 32-bit libcs call socket(2) directly.
        json!({"names": ["socketcall"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS}),
        // vsock reaches the hypervisor's host side (and its bugs); no task needs it. The
        // errno is the one a kernel without vsock gives, so probes degrade quietly.
        json!({"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EAFNOSUPPORT,
         "args": [{"index": 0, "value": AF_VSOCK, "valueTwo": INT_MASK,
                   "op": "SCMP_CMP_MASKED_EQ"}]}),
        // Netlink: only NETLINK_ROUTE, which `ip`, getifaddrs(3) and glibc's resolver use.
        // The others (audit, netfilter, xfrm, generic, uevent, ...) are kernel surface a task
        // does not need. EPROTONOSUPPORT is what a kernel without the protocol answers, and
        // the one libaudit treats as "no audit" (with EPERM, useradd and friends abort).
        json!({"names": ["socket"], "action": "SCMP_ACT_ERRNO",
         "errnoRet": libc::EPROTONOSUPPORT,
         "args": [{"index": 0, "value": AF_NETLINK, "valueTwo": INT_MASK,
                   "op": "SCMP_CMP_MASKED_EQ"},
                  {"index": 2, "value": NETLINK_ROUTE, "op": "SCMP_CMP_NE"}]}),
    ];
    // Device nodes: no sandbox or build holds CAP_MKNOD, so the kernel refuses these
    // already; the rule keeps refusing them if a capability set ever grows. (Overlay
    // whiteouts are made by the kernel, not through these calls.)
    for (name, mode_arg) in [("mknod", 1), ("mknodat", 2)] {
        for kind in [S_IFCHR, S_IFBLK] {
            rules.push(
                json!({"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": eperm,
                "args": [{"index": mode_arg, "value": kind, "valueTwo": S_IFMT,
                          "op": "SCMP_CMP_MASKED_EQ"}]}),
            );
        }
    }
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": rules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules_for(name: &str) -> Vec<Value> {
        profile()["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["names"] == json!([name]))
            .cloned()
            .collect()
    }

    #[test]
    fn sockets_of_vsock_and_of_netlink_but_route_are_refused() {
        let socket = rules_for("socket");
        let vsock = socket
            .iter()
            .find(|r| r["args"][0]["value"] == json!(AF_VSOCK))
            .unwrap();
        assert_eq!(vsock["errnoRet"], json!(libc::EAFNOSUPPORT));
        // The domain is an int: only its low 32 bits may count.
        assert_eq!(vsock["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
        assert_eq!(vsock["args"][0]["valueTwo"], json!(0xffff_ffffu64));
        let netlink = socket
            .iter()
            .find(|r| r["args"][0]["value"] == json!(AF_NETLINK))
            .unwrap();
        assert_eq!(netlink["errnoRet"], json!(libc::EPROTONOSUPPORT));
        assert_eq!(
            netlink["args"][1],
            json!({"index": 2, "value": 0, "op": "SCMP_CMP_NE"})
        );
    }

    #[test]
    fn device_mknod_is_refused_on_the_mode_argument() {
        let at = rules_for("mknodat");
        assert_eq!(at.len(), 2);
        for r in &at {
            assert_eq!(r["args"][0]["index"], json!(2));
            assert_eq!(r["args"][0]["valueTwo"], json!(0o170_000));
        }
        assert_eq!(rules_for("mknod")[0]["args"][0]["index"], json!(1));
    }
}
