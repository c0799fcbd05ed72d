//! Clone hygiene after a restore: identity, entropy and the wall clock.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;

use thaw_protocol::{EntropyMethod, ErrorCode, Response};

use crate::error::ApiError;

/// `_IOW('R', 0x03, int[2])` from linux/random.h.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)` from linux/random.h.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Sets the hostname. In the container tier the runtime sets it from outside (we have no
/// CAP_SYS_ADMIN): EPERM is fine when the name already matches.
pub fn set_hostname(hostname: &str) -> Result<(), ApiError> {
    if hostname.is_empty() || hostname.len() > 64 {
        return Err(ApiError::bad_request(format!(
            "hostname {hostname:?} must be 1 to 64 bytes"
        )));
    }
    match nix::unistd::sethostname(hostname) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EPERM) => {
            let current = nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default();
            if current == hostname {
                Ok(())
            } else {
                Err(ApiError::new(
                    ErrorCode::PermissionDenied,
                    format!(
                        "cannot set hostname to {hostname:?} (it is {current:?}): guest-init \
                         lacks CAP_SYS_ADMIN in its UTS namespace; the container runtime must \
                         set the hostname"
                    ),
                ))
            }
        }
        Err(e) => Err(ApiError::new(
            ErrorCode::Io,
            format!("sethostname({hostname:?}): {e}"),
        )),
    }
}

/// Credits entropy with RNDADDENTROPY and reseeds; without CAP_SYS_ADMIN, mixes it in by
/// writing to /dev/urandom (no credit, but the pool's state still changes).
pub fn add_entropy(data: &[u8]) -> Result<Response, ApiError> {
    let path = std::path::Path::new("/dev/urandom");
    let mut dev = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| ApiError::io("cannot open", path, &e))?;
    let bytes = data.len() as u64;
    match credit(dev.as_raw_fd(), data) {
        Ok(()) => Ok(Response::Entropy {
            method: EntropyMethod::Credited,
            bytes,
        }),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            dev.write_all(data)
                .map_err(|e| ApiError::io("cannot write", path, &e))?;
            Ok(Response::Entropy {
                method: EntropyMethod::Mixed,
                bytes,
            })
        }
        Err(e) => Err(ApiError::new(
            ErrorCode::Io,
            format!("RNDADDENTROPY on /dev/urandom: {e}"),
        )),
    }
}

fn credit(fd: i32, data: &[u8]) -> std::io::Result<()> {
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let too_big = || std::io::Error::from_raw_os_error(libc::EINVAL);
    let len = i32::try_from(data.len()).map_err(|_| too_big())?;
    let bits = len.checked_mul(8).ok_or_else(too_big)?;
    // u32 storage keeps the struct correctly aligned for the kernel's int fields.
    let mut info = vec![0u32; 2 + data.len().div_ceil(4)];
    info[0] = bits as u32;
    info[1] = len as u32;
    // SAFETY: `info` has room for the header plus `data.len()` bytes after it.
    unsafe {
        std::ptr::copy_nonoverlapping(
            data.as_ptr(),
            info.as_mut_ptr().add(2).cast::<u8>(),
            data.len(),
        );
        if libc::ioctl(fd, RNDADDENTROPY, info.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::ioctl(fd, RNDRESEEDCRNG) != 0 {
            let err = std::io::Error::last_os_error();
            // Kernels before 4.17 have no RNDRESEEDCRNG; the credited entropy still counts.
            if err.raw_os_error() != Some(libc::EINVAL) && err.raw_os_error() != Some(libc::ENOTTY)
            {
                return Err(err);
            }
        }
    }
    Ok(())
}

/// Sets CLOCK_REALTIME. The container tier shares the host's clock: EPERM means there is
/// nothing to fix, not a failure.
pub fn set_clock(unix_nanos: i64) -> Result<Response, ApiError> {
    let ts = libc::timespec {
        tv_sec: unix_nanos.div_euclid(1_000_000_000),
        tv_nsec: unix_nanos.rem_euclid(1_000_000_000),
    };
    if ts.tv_sec < 0 {
        return Err(ApiError::bad_request("unix_nanos is before 1970"));
    }
    // SAFETY: valid pointer to a timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } == 0 {
        return Ok(Response::Clock { applied: true });
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EPERM) {
        Ok(Response::Clock { applied: false })
    } else {
        Err(ApiError::new(
            ErrorCode::Io,
            format!("clock_settime: {err}"),
        ))
    }
}
