//! Installing the redirect rules in a sandbox's namespace with one `setsockopt`, instead of
//! running `iptables-restore` for every sandbox.
//!
//! Why: `iptables-restore` is a process start and, with the nf_tables backend, a netlink
//! conversation: ~10 ms per sandbox here, which a restore with networking on would pay
//! (its target is 50 ms in all). The rules are the same for every sandbox, so thaw has
//! `iptables-legacy-restore` build the `nat` table once, in a scratch namespace, reads the
//! kernel's binary form of it back (`IPT_SO_GET_INFO`/`IPT_SO_GET_ENTRIES`), and replaces each
//! sandbox's `nat` table with that blob (`IPT_SO_SET_REPLACE`). The blob holds no absolute
//! addresses (jumps are offsets, matches and targets are named), so it is valid in any
//! namespace. Where `iptables-legacy-restore` is missing, [`Template::capture`] fails and
//! the caller falls back to running `iptables-restore` per sandbox.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const IPT_SO_SET_REPLACE: libc::c_int = 64;
const IPT_SO_GET_INFO: libc::c_int = 64;
const IPT_SO_GET_ENTRIES: libc::c_int = 65;
const NF_INET_NUMHOOKS: usize = 5;
const TABLE: &[u8] = b"nat";

/// `struct ipt_getinfo`.
#[repr(C)]
#[derive(Clone, Copy)]
struct GetInfo {
    name: [u8; 32],
    valid_hooks: u32,
    hook_entry: [u32; NF_INET_NUMHOOKS],
    underflow: [u32; NF_INET_NUMHOOKS],
    num_entries: u32,
    size: u32,
}

/// The `nat` table as the kernel holds it, ready to install anywhere.
#[derive(Clone)]
pub struct Template {
    info: GetInfo,
    entries: Vec<u8>,
}

fn table_name() -> [u8; 32] {
    let mut n = [0u8; 32];
    n[..TABLE.len()].copy_from_slice(TABLE);
    n
}

fn raw_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The calling thread's namespace's `nat` table info.
fn get_info(s: &OwnedFd) -> std::io::Result<GetInfo> {
    let mut info = GetInfo {
        name: table_name(),
        valid_hooks: 0,
        hook_entry: [0; NF_INET_NUMHOOKS],
        underflow: [0; NF_INET_NUMHOOKS],
        num_entries: 0,
        size: 0,
    };
    let mut len = std::mem::size_of::<GetInfo>() as libc::socklen_t;
    // SAFETY: info is a valid ipt_getinfo of len bytes.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            IPT_SO_GET_INFO,
            (&mut info as *mut GetInfo).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info)
}

impl Template {
    /// Reads the `nat` table of the calling thread's namespace (which
    /// `iptables-legacy-restore` just filled).
    pub fn read_current() -> std::io::Result<Template> {
        let s = raw_socket()?;
        let info = get_info(&s)?;
        // struct ipt_get_entries: name[32], size (u32), then the entries at offset 40
        // (8-byte aligned: an entry starts with counters of u64).
        const HEAD: usize = 40;
        let mut buf = vec![0u8; HEAD + info.size as usize];
        buf[..32].copy_from_slice(&table_name());
        buf[32..36].copy_from_slice(&info.size.to_ne_bytes());
        let mut len = buf.len() as libc::socklen_t;
        // SAFETY: buf is len bytes long and starts with the ipt_get_entries header.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                IPT_SO_GET_ENTRIES,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Template {
            info,
            entries: buf[HEAD..].to_vec(),
        })
    }

    /// Builds the table once: `iptables-legacy-restore` of `rules` in a scratch namespace of
    /// a thread of its own, then read back.
    pub fn capture(rules: &str) -> std::io::Result<Template> {
        let rules = rules.to_string();
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
            let mut child = std::process::Command::new("iptables-legacy-restore")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()?;
            if let Some(mut i) = child.stdin.take() {
                std::io::Write::write_all(&mut i, rules.as_bytes())?;
            }
            let out = child.wait_with_output()?;
            if !out.status.success() {
                return Err(std::io::Error::other(format!(
                    "iptables-legacy-restore: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            Template::read_current()
        })
        .join()
        .map_err(|_| std::io::Error::other("capture thread panicked"))?
    }

    /// Replaces the calling thread's namespace's `nat` table with this one.
    pub fn install(&self) -> std::io::Result<()> {
        let s = raw_socket()?;
        let now = get_info(&s)?;
        // struct ipt_replace: name[32], valid_hooks, num_entries, size, hook_entry[5],
        // underflow[5], num_counters (offset 84), 4 bytes of padding, counters pointer (88),
        // then the entries (96).
        const HEAD: usize = 96;
        let mut counters = vec![0u8; 16 * now.num_entries.max(1) as usize];
        let mut buf = vec![0u8; HEAD + self.entries.len()];
        buf[..32].copy_from_slice(&table_name());
        let put =
            |buf: &mut [u8], at: usize, v: u32| buf[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        put(&mut buf, 32, self.info.valid_hooks);
        put(&mut buf, 36, self.info.num_entries);
        put(&mut buf, 40, self.info.size);
        for h in 0..NF_INET_NUMHOOKS {
            put(&mut buf, 44 + 4 * h, self.info.hook_entry[h]);
            put(&mut buf, 64 + 4 * h, self.info.underflow[h]);
        }
        put(&mut buf, 84, now.num_entries);
        let ptr = counters.as_mut_ptr() as usize as u64;
        buf[88..96].copy_from_slice(&ptr.to_ne_bytes());
        buf[HEAD..].copy_from_slice(&self.entries);
        // SAFETY: buf is a complete ipt_replace; counters outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                IPT_SO_SET_REPLACE,
                buf.as_ptr().cast(),
                buf.len() as libc::socklen_t,
            )
        };
        drop(counters);
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}
