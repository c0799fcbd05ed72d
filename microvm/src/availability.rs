//! Can this host run the microvm tier? Checks the Cloud Hypervisor binary, `/dev/kvm`, and
//! that KVM is backed by hardware virtualization: under PVM (nested virtualization without
//! VT-x/AMD-V) guests crawl and Cloud Hypervisor cannot snapshot (`KVM_GET_NESTED_STATE`
//! fails), so such a host is reported unavailable rather than half-working.

use std::path::PathBuf;
use std::process::Command;

/// Environment variable naming the Cloud Hypervisor binary (default: `cloud-hypervisor` on
/// `PATH`).
pub const BIN_ENV: &str = "THAW_CLOUD_HYPERVISOR";

/// Set to `1` only when [`BIN_ENV`] names a test double of Cloud Hypervisor that needs no
/// KVM (thaw's own `fake-cloud-hypervisor`): the `/dev/kvm` and hardware-virtualization
/// checks are skipped. Never set it with the real binary: under PVM guests crawl and
/// snapshots fail.
pub const TEST_DOUBLE_ENV: &str = "THAW_MICROVM_TEST_DOUBLE";

fn test_double() -> bool {
    std::env::var_os(TEST_DOUBLE_ENV).is_some_and(|v| v == "1")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    Available {
        binary: PathBuf,
        /// `cloud-hypervisor --version` output, e.g. `cloud-hypervisor v53.0`.
        version: String,
    },
    /// Every reason, each with its fix.
    Unavailable { reasons: Vec<String> },
}

impl Availability {
    pub fn is_available(&self) -> bool {
        matches!(self, Availability::Available { .. })
    }

    /// The reasons joined into one line (empty when available).
    pub fn reason(&self) -> String {
        match self {
            Availability::Available { .. } => String::new(),
            Availability::Unavailable { reasons } => reasons.join("; "),
        }
    }
}

/// The Cloud Hypervisor binary to use: `$THAW_CLOUD_HYPERVISOR`, else `cloud-hypervisor` on
/// `PATH`.
pub fn cloud_hypervisor_binary() -> Option<PathBuf> {
    match std::env::var_os(BIN_ENV) {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => crate::util::find_on_path("cloud-hypervisor"),
    }
}

/// Hardware virtualization as seen from `/proc/cpuinfo` flags: `Ok(())` when `vmx` or `svm`
/// is present, else the reason.
pub fn hardware_virtualization(cpuinfo: &str) -> Result<(), String> {
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect())
        .unwrap_or_default();
    if flags.iter().any(|f| *f == "vmx" || *f == "svm") {
        return Ok(());
    }
    if flags.contains(&"hypervisor") {
        Err("needs hardware virtualization: this host's /dev/kvm is PVM (or another software-backed KVM) inside a VM without nested VT-x/AMD-V; guests would crawl and snapshots fail (KVM_GET_NESTED_STATE); run on bare metal or a VM with nested virtualization enabled, or use the container tier".to_owned())
    } else {
        Err("needs hardware virtualization: the CPU shows no vmx/svm flag; enable VT-x/AMD-V in the firmware, or use the container tier".to_owned())
    }
}

/// Checks everything the microvm tier needs on this host.
pub fn cloud_hypervisor_available() -> Availability {
    let mut reasons = Vec::new();
    let mut found = None;
    match cloud_hypervisor_binary() {
        None => reasons.push(
            "cloud-hypervisor not found on PATH: install the Cloud Hypervisor v53 static binary (cloud-hypervisor-static) from the GitHub releases of cloud-hypervisor/cloud-hypervisor into /usr/local/bin, or set THAW_CLOUD_HYPERVISOR".to_owned(),
        ),
        Some(bin) => match Command::new(&bin).arg("--version").output() {
            Ok(out) if out.status.success() => {
                let v = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                found = Some((bin, v));
            }
            Ok(out) => reasons.push(format!(
                "{} --version failed ({}): {}; reinstall the static binary from the GitHub releases of cloud-hypervisor/cloud-hypervisor",
                bin.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => reasons.push(format!(
                "cannot run {}: {e}; install the Cloud Hypervisor static binary from the GitHub releases of cloud-hypervisor/cloud-hypervisor into /usr/local/bin",
                bin.display()
            )),
        },
    }
    if test_double() {
        return match (reasons.is_empty(), found) {
            (true, Some((binary, version))) => Availability::Available { binary, version },
            _ => Availability::Unavailable { reasons },
        };
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        reasons.push(match e.kind() {
            std::io::ErrorKind::NotFound => {
                "/dev/kvm does not exist: load kvm_intel or kvm_amd (modprobe) on a host with hardware virtualization".to_owned()
            }
            std::io::ErrorKind::PermissionDenied => {
                "/dev/kvm is not accessible: add this user to the kvm group (or run as root)".to_owned()
            }
            _ => format!("cannot open /dev/kvm: {e}"),
        });
    }
    match std::fs::read_to_string("/proc/cpuinfo") {
        Ok(cpuinfo) => {
            if let Err(r) = hardware_virtualization(&cpuinfo) {
                reasons.push(r);
            }
        }
        Err(e) => reasons.push(format!("cannot read /proc/cpuinfo: {e}")),
    }
    match (reasons.is_empty(), found) {
        (true, Some((binary, version))) => Availability::Available { binary, version },
        _ => Availability::Unavailable { reasons },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_guest_is_not_hardware_virtualization() {
        let pvm = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr pae hypervisor lahf_lm\n";
        let e = hardware_virtualization(pvm).unwrap_err();
        assert!(e.contains("PVM"), "{e}");
        let metal = "flags\t\t: fpu vme vmx ept\n";
        assert!(hardware_virtualization(metal).is_ok());
        let amd = "flags\t\t: fpu svm npt hypervisor\n";
        assert!(hardware_virtualization(amd).is_ok());
        assert!(hardware_virtualization("flags\t: fpu\n").is_err());
    }

    #[test]
    fn this_host_reports_a_reason_when_unavailable() {
        let a = cloud_hypervisor_available();
        if !a.is_available() {
            assert!(!a.reason().is_empty());
        }
    }
}
