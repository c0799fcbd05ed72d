//! The nested guest (L1): Debian's kernel with the KVM modules, a busybox initramfs, and the
//! script that runs the tests inside it.
//!
//! L1's root is the host's own root, exported read-only over virtio-9p and made writable by
//! an overlay whose upper half is a scratch ext4 disk. So every path the test binaries were
//! built with (their `CARGO_MANIFEST_DIR`, `thaw`, guest-init, Cloud Hypervisor, GNU tar,
//! mkfs.ext4 and their libraries) resolves inside L1 as it does on the host, with nothing
//! copied, and nothing L1 writes reaches the host. thaw's cache inside L1 is on the scratch
//! disk itself (ext4), because the template builds idmap their base layers and neither 9p nor
//! overlayfs supports idmapped mounts in this kernel.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use thaw_microvm::image::initramfs::{write_newc, Entry};
use thaw_microvm::image::{build_kernel, download_kernel_deb, ImageCache, Kernel};

use crate::cargo::TestBinary;

/// What L1 loads, in dependency order after resolution: KVM on AMD SVM (QEMU TCG's `-cpu max`
/// emulates SVM with nested paging), the virtio transports for its disk and the host's root,
/// 9p, overlayfs and ext4; and for the sandboxes' network, the taps Cloud Hypervisor makes
/// and the `nat` table the egress gateway installs (L1 has no modprobe for its own kernel:
/// nothing loads on demand).
pub const L1_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_rng",
    "virtio_console",
    "9pnet_virtio",
    "9p",
    "overlay",
    "ext4",
    "kvm_amd",
    "tun",
    "iptable_nat",
    "xt_REDIRECT",
    "xt_tcpudp",
];

/// Inside L1: where the scratch disk is mounted, and thaw's cache on it.
pub const SCRATCH: &str = "/scratch";
pub const L1_CACHE: &str = "/scratch/cache";
/// Where each test binary's full output is kept on the scratch disk.
pub const OUT_DIR: &str = "out";

/// Console markers the host reads (see [`crate::run`]).
pub const READY: &str = "THAW-L1-READY";
pub const BEGIN: &str = "THAW-L1-BEGIN";
pub const RESULT: &str = "THAW-L1-RESULT";
pub const DONE: &str = "THAW-L1-DONE";
pub const FATAL: &str = "THAW-L1-FATAL";
/// A heartbeat every [`HEARTBEAT_S`] seconds: L1's user space is running.
pub const ALIVE: &str = "THAW-L1-ALIVE";
/// A kernel message of warning level or worse (an oops, a hung task, a soft lockup).
pub const KERN: &str = "THAW-L1-KERN";
/// A job outlived its timeout and its kill: something in it cannot be killed.
pub const STUCK: &str = "THAW-L1-STUCK";
pub const HEARTBEAT_S: u64 = 60;

/// L1's kernel, built from the same Debian package as the microvm tier's guest kernel.
pub fn kernel(cache: &ImageCache) -> Result<Kernel> {
    let deb = download_kernel_deb(cache).context("downloading Debian's kernel package")?;
    build_kernel(cache, &deb, L1_MODULES).context("building L1's kernel and modules")
}

/// One thing L1 runs: a test binary, or a command such as `thaw bench`.
#[derive(Debug, Clone)]
pub struct Job {
    /// What the host calls it in its report, e.g. `thaw-e2e/microvm`.
    pub name: String,
    pub cwd: PathBuf,
    pub argv: Vec<String>,
}

impl Job {
    /// One `#[ignore]`d test of `b`, alone: each test is a job of its own, with its own
    /// timeout, and a job L1 did not finish can be run again by itself.
    pub fn test(b: &TestBinary, test: &str) -> Job {
        Job {
            name: format!("{}/{test}", b.name),
            cwd: b.cwd.clone(),
            argv: vec![
                b.path.to_string_lossy().into_owned(),
                "--ignored".into(),
                "--exact".into(),
                test.into(),
                "--test-threads".into(),
                "1".into(),
            ],
        }
    }
}

/// Everything the run script needs to know.
pub struct Plan<'a> {
    pub jobs: &'a [Job],
    pub env: &'a [(String, String)],
    /// Hard limit on each job, inside L1.
    pub job_timeout_s: u64,
}

/// Writes L1's initramfs (zstd newc cpio) to `out`.
pub fn write_initramfs(kernel: &Kernel, busybox: &Path, plan: &Plan<'_>, out: &Path) -> Result<()> {
    let order = std::fs::read_to_string(kernel.modules_dir.join("load-order"))
        .context("reading L1's module load order")?;
    let modules: Vec<&str> = order.lines().filter(|l| !l.is_empty()).collect();
    let busybox_bytes =
        std::fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
    let names: Vec<String> = modules
        .iter()
        .map(|m| format!("lib/modules/{m}.ko"))
        .collect();
    let mut entries = vec![
        Entry::Dir("bin"),
        Entry::Dir("dev"),
        Entry::CharDev("dev/console", 5, 1),
        Entry::Dir("proc"),
        Entry::Dir("sys"),
        Entry::Dir("host"),
        Entry::Dir("scratch"),
        Entry::Dir("newroot"),
        Entry::Dir("lib"),
        Entry::Dir("lib/modules"),
        Entry::File("bin/busybox", 0o755, busybox_bytes),
        Entry::Symlink("bin/sh", "busybox"),
        Entry::File("init", 0o755, init_script().into_bytes()),
        Entry::File("run.sh", 0o755, run_script(plan).into_bytes()),
        Entry::File("lib/modules/load-order", 0o644, order.as_bytes().to_vec()),
    ];
    for (m, name) in modules.iter().zip(&names) {
        let ko = kernel.modules_dir.join(format!("{m}.ko"));
        let bytes = std::fs::read(&ko).with_context(|| format!("reading {}", ko.display()))?;
        entries.push(Entry::File(name, 0o644, bytes));
    }
    let cpio = write_newc(&entries);
    // Level 3: the archive is rebuilt every run (its script names this run's binaries).
    let z = zstd::encode_all(&cpio[..], 3).context("compressing L1's initramfs")?;
    std::fs::write(out, z).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// L1's `/init`: modules, the host's root over 9p, the scratch disk, the overlay, then the run
/// script as PID 1 of the new root. Any failure prints [`FATAL`] and powers off, so the host
/// sees why at once instead of waiting for its timeout.
fn init_script() -> String {
    format!(
        r#"#!/bin/sh
export PATH=/bin
fail() {{ echo "{FATAL}: $*"; echo o > /proc/sysrq-trigger; sleep 5; exit 1; }}
/bin/busybox --install -s /bin
mount -t proc proc /proc || fail "mount proc"
mount -t sysfs sysfs /sys || fail "mount sysfs"
mount -t devtmpfs devtmpfs /dev || fail "mount devtmpfs"
echo 1 > /proc/sys/kernel/sysrq
while read -r m; do
  [ -n "$m" ] && {{ insmod "/lib/modules/$m.ko" || fail "insmod $m"; }}
done < /lib/modules/load-order
# cache=loose: the export is read-only and nothing changes it while L1 runs.
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /host \
  || fail "mount the host's root over 9p"
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
# discard: blocks the tests free are punched out of the host's sparse image file.
mount -t ext4 -o discard /dev/vda {SCRATCH} || fail "mount the scratch disk /dev/vda"
mkdir -p {SCRATCH}/upper {SCRATCH}/work
mount -t overlay -o lowerdir=/host,upperdir={SCRATCH}/upper,workdir={SCRATCH}/work overlay /newroot \
  || fail "overlay over the host's root"
mount --move {SCRATCH} /newroot{SCRATCH} 2>/dev/null || {{
  mkdir -p /newroot{SCRATCH} && mount --move {SCRATCH} /newroot{SCRATCH}; }} || fail "move {SCRATCH}"
# The kernel file systems of the new root, mounted here by busybox (the run script's first
# commands need /proc), on top of the host's directories of those names.
mount -t proc proc /newroot/proc || fail "proc in the new root"
mount -t sysfs sysfs /newroot/sys || fail "sysfs in the new root"
mount -t devtmpfs devtmpfs /newroot/dev || fail "devtmpfs in the new root"
mount -t tmpfs -o mode=0755 tmpfs /newroot/run || fail "tmpfs /run"
mkdir -p /newroot/run/thaw-l1 && cp /run.sh /newroot/run/thaw-l1/run.sh || fail "copy run.sh"
umount /proc /sys 2>/dev/null
exec switch_root /newroot /bin/bash /run/thaw-l1/run.sh
fail "switch_root"
"#
    )
}

/// Quotes a string for bash.
fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn qp(p: &Path) -> String {
    q(&p.to_string_lossy())
}

/// The run script: PID 1 of L1 after `switch_root`. Mounts what a Linux host has, checks KVM,
/// runs each job under `timeout`, prints a [`RESULT`] line per job and [`DONE`],
/// then powers off.
fn run_script(plan: &Plan<'_>) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r#"#!/bin/bash
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
fatal() {{ echo "{FATAL}: $*"; sync; echo o > /proc/sysrq-trigger; sleep 5; }}
mkdir -p /dev/pts /dev/shm /dev/mqueue
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t mqueue mqueue /dev/mqueue
# What this script and its jobs print goes to a virtio console (hvc0), the kernel's own
# messages to the serial port: L1 has gone silent mid-run when the emulated UART was its
# only channel, and a virtio queue takes the UART out of the suspects.
i=0; while [ ! -c /dev/hvc0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
[ -c /dev/hvc0 ] && exec > /dev/hvc0 2>&1
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo '+cpu +memory +pids +io' > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
hostname thaw-l1
# The serial port gets the kernel's warnings and worse (kvm's "Unhandled WRMSR" of every L2
# boot among them): when L1's kernel locks up and nothing else runs, its soft-lockup reports
# and their stack traces are all there is to see, and they are printed at warning level.
dmesg -n 5 2>/dev/null
ip link set lo up 2>/dev/null
ulimit -n 65536
[ -r /proc/meminfo ] || fatal "no /proc in L1"
[ -c /dev/kvm ] || fatal "no /dev/kvm in L1: kvm_amd did not load (does QEMU's -cpu max emulate SVM here?)"
echo "{READY} $(uname -r) cpus=$(nproc) mem=$(awk '/MemTotal/{{print $2}}' /proc/meminfo)kB flags=$(grep -m1 -o -w -e svm -e npt /proc/cpuinfo | tr '\n' ' ')"
mkdir -p {L1_CACHE} {SCRATCH}/{OUT_DIR}
# A heartbeat, so the host can tell a frozen L1 from a slow test; and L1's kernel trouble
# (an oops, a hung task, a lockup) on the virtio console, beside the jobs' output.
( while :; do sleep {HEARTBEAT_S}; echo "{ALIVE} up=$(cut -d' ' -f1 /proc/uptime)s load=$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' /) avail=$(awk '/MemAvailable/{{print $2}}' /proc/meminfo)kB"; done ) &
echo 120 > /proc/sys/kernel/hung_task_timeout_secs 2>/dev/null
( dmesg -W -l emerg,alert,crit,err,warn 2>/dev/null | grep --line-buffered -v -i -e msr -e 'ignored' | sed -u 's/^/{KERN} /' ) &
# What a job that cannot be killed is blocked on: its processes, their kernel stacks.
stuck_report() {{
  ps -eo pid,ppid,stat,wchan:32,etimes,args --sort=pid | grep -v ' \[' | sed 's/^/{STUCK}   /' | head -n 60
  for t in /proc/[0-9]*/task/[0-9]*; do
    [ "$(awk '{{print $3}}' "$t/stat" 2>/dev/null)" = D ] || continue
    echo "{STUCK}   D: $t $(cat "$t/comm" 2>/dev/null)"
    sed 's/^/{STUCK}     /' "$t/stack" 2>/dev/null | head -n 25
  done
}}
"#
    );
    for (k, v) in plan.env {
        let _ = writeln!(s, "export {k}={}", q(v));
    }
    let _ = write!(
        s,
        r#"run_one() {{
  local name=$1 dir=$2 log="{SCRATCH}/{OUT_DIR}/$(echo "$1" | tr / _).log"
  shift 2
  echo "{BEGIN} $name"
  local t0=$(date +%s)
  # Into a file, followed until the job ends: a process it leaked (a server, a VMM) may keep
  # its output open, and must not keep this script waiting on a pipe.
  (cd "$dir" && exec timeout -k 20 {timeout} "$@") > "$log" 2>&1 &
  local pid=$!
  tail -n +1 -s 0.5 -f "$log" &
  local tailpid=$! rc=
  # `timeout` waits for what it killed; a task stuck in the kernel never dies, so this
  # script gives up on it itself, says what it is blocked on, and goes on.
  while kill -0 $pid 2>/dev/null; do
    if [ $(( $(date +%s) - t0 )) -gt $(( {timeout} + 90 )) ]; then
      echo "{STUCK} $name: still running after its timeout and SIGKILL"
      stuck_report
      rc=125
      break
    fi
    sleep 2
  done
  [ -n "$rc" ] || {{ wait $pid; rc=$?; }}
  sleep 1; kill $tailpid 2>/dev/null; wait $tailpid 2>/dev/null
  echo "{RESULT} $name rc=$rc secs=$(( $(date +%s) - t0 ))"
  if [ "$rc" != 0 ]; then
    # The sandboxes' own logs, for the host to print: consoles and VMM logs still on disk.
    # Only what L1 itself wrote (the overlay's upper half): walking the host's /tmp over 9p
    # under emulation takes hours.
    find {SCRATCH}/upper/tmp {SCRATCH}/upper/var/lib/thaw \( -name console.log -o -name 'vmm*.log' -o -name init.log \) \
      2>/dev/null | head -n 20 | while read -r f; do
        echo "== tail of $f"; tail -n 30 "$f"; done > "{SCRATCH}/{OUT_DIR}/$(echo "$name" | tr / _).sandbox-logs" 2>&1
  fi
}}
"#,
        timeout = plan.job_timeout_s,
    );
    for j in plan.jobs {
        let argv: Vec<String> = j.argv.iter().map(|a| q(a)).collect();
        let _ = writeln!(
            s,
            "run_one {} {} {}",
            q(&j.name),
            qp(&j.cwd),
            argv.join(" ")
        );
    }
    let _ = write!(
        s,
        r#"echo "{DONE}"
sync
echo o > /proc/sysrq-trigger
sleep 10
"#
    );
    s
}

/// The scratch disk's file name for a binary's log (as the run script names it).
pub fn log_name(binary: &str) -> String {
    format!("{}.log", binary.replace('/', "_"))
}

pub fn sandbox_logs_name(binary: &str) -> String {
    format!("{}.sandbox-logs", binary.replace('/', "_"))
}

/// A file of the scratch disk, read without mounting it (`debugfs`).
pub fn read_scratch(image: &Path, rel: &str) -> Option<String> {
    let out = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat /{rel}"))
        .arg(image)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if out.status.success() && !out.stdout.is_empty() {
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        None
    }
}

pub fn busybox() -> PathBuf {
    PathBuf::from("/bin/busybox")
}
