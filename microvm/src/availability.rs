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

/// The oldest Cloud Hypervisor release thaw drives: `vm.restore` takes
/// `memory_restore_mode: "OnDemand"` and `resume` from v52 on, and an older VMM would ignore
/// both silently (it accepts unknown fields), restoring with a full copy into a paused VM.
pub const MIN_VERSION: (u32, u32) = (52, 0);

/// `(major, minor)` from what Cloud Hypervisor reports about itself: `vmm.ping`'s `version`
/// (its crate version, `53.0.0` for v53.0) or `cloud-hypervisor --version`
/// (`cloud-hypervisor v53.0`, or `git describe` output such as `v53.0-12-gabcdef-dirty`).
pub fn parse_version(text: &str) -> Option<(u32, u32)> {
    text.split_whitespace().find_map(|token| {
        let token = token.rsplit('/').next().unwrap_or(token);
        let token = token.strip_prefix('v').unwrap_or(token);
        let mut parts = token.splitn(3, '.');
        let major = parts.next()?.parse().ok()?;
        let minor: String = parts
            .next()?
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        Some((major, minor.parse().ok()?))
    })
}

/// `Ok` when `reported` (see [`parse_version`]) is at least [`MIN_VERSION`], else a one-line
/// reason naming the version found and the one needed.
pub fn check_version(reported: &str) -> Result<(), String> {
    let (maj, min) = MIN_VERSION;
    match parse_version(reported) {
        Some(v) if v >= MIN_VERSION => Ok(()),
        Some((a, b)) => Err(format!(
            "Cloud Hypervisor v{a}.{b} is too old: thaw needs v{maj}.{min} or newer (vm.restore with memory_restore_mode OnDemand and resume); install the v53 static binary from the GitHub releases of cloud-hypervisor/cloud-hypervisor"
        )),
        None => Err(format!(
            "cannot tell the Cloud Hypervisor version from {reported:?}: thaw needs v{maj}.{min} or newer; install the v53 static binary from the GitHub releases of cloud-hypervisor/cloud-hypervisor"
        )),
    }
}

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
                // A build whose --version says nothing parseable is left to the check of
                // vmm.ping's version at VMM start (always a crate version there).
                match check_version(&v) {
                    Err(why) if parse_version(&v).is_some() => reasons.push(why),
                    _ => found = Some((bin, v)),
                }
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
    // Every VM's network device is a tap the VMM makes (the egress gateway wires it).
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        reasons.push(format!(
            "cannot open /dev/net/tun ({e}): load the tun module (modprobe tun); every VM's network device is a tap"
        ));
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
    fn versions_parse_from_ping_and_version_output() {
        assert_eq!(parse_version("53.0.0"), Some((53, 0)));
        assert_eq!(parse_version("cloud-hypervisor v53.0"), Some((53, 0)));
        assert_eq!(
            parse_version("cloud-hypervisor v53.0-12-gabcdef-dirty"),
            Some((53, 0))
        );
        assert_eq!(
            parse_version("cloud-hypervisor v52.1-thaw-fake"),
            Some((52, 1))
        );
        assert_eq!(
            parse_version("cloud-hypervisor msft/v38.0.72"),
            Some((38, 0))
        );
        assert_eq!(parse_version("v40.0"), Some((40, 0)));
        assert_eq!(parse_version("cloud-hypervisor"), None);
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("cloud-hypervisor vX.Y"), None);

        check_version("53.0.0").unwrap();
        check_version("cloud-hypervisor v52.0").unwrap();
        check_version("100.0.0").unwrap();
        let e = check_version("cloud-hypervisor v51.1").unwrap_err();
        assert!(e.contains("v51.1 is too old") && e.contains("v52.0"), "{e}");
        assert!(!e.contains('\n'));
        let e = check_version("garbage").unwrap_err();
        assert!(e.contains("\"garbage\"") && e.contains("v52.0"), "{e}");
    }

    #[test]
    fn this_host_reports_a_reason_when_unavailable() {
        let a = cloud_hypervisor_available();
        if !a.is_available() {
            assert!(!a.reason().is_empty());
        }
    }
}
