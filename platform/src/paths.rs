//! Where thaw keeps things on the host.
//!
//! `THAW_HOME` (default `/var/lib/thaw`) holds this installation's state: metadata, snapshot
//! store, live sandboxes. `THAW_CACHE` (default `/var/cache/thaw`) holds build artifacts that
//! are pure functions of their inputs (root filesystems keyed by content hash), so several
//! homes (tests, users) can share them safely.

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

#[derive(Debug, Clone)]
pub struct Paths {
    pub home: PathBuf,
    pub cache: PathBuf,
}

impl Paths {
    pub fn from_env() -> Paths {
        let home = std::env::var_os("THAW_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/thaw"));
        let cache = std::env::var_os("THAW_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/thaw"));
        Paths { home, cache }
    }

    pub fn new(home: impl Into<PathBuf>, cache: impl Into<PathBuf>) -> Paths {
        Paths {
            home: home.into(),
            cache: cache.into(),
        }
    }

    pub fn ensure(&self) -> Result<()> {
        for d in [
            self.home.clone(),
            self.sandboxes(),
            self.runc_root(),
            self.snapshots(),
            self.checkpoints(),
            self.cache.clone(),
            self.rootfs_cache(),
            self.meta_db(),
        ] {
            std::fs::create_dir_all(&d).ctx("creating directory", &d)?;
        }
        // Snapshots hold tenants' memory, sandbox directories their files and the cache
        // their layers: no other host user may read or list any of it, whatever mode the
        // parent directory or an older thaw gave them. Home and `sandboxes/` only let
        // others *through* (0711, as Docker's root is with user namespaces): a sandbox's
        // root, host uid `R` in its user namespace, must reach its rootfs for runc to mount
        // it, and each sandbox directory admits only its own range's group (0710 root:R).
        use std::os::unix::fs::PermissionsExt;
        for (d, mode) in [
            (&self.home, 0o711),
            (&self.sandboxes(), 0o711),
            (&self.runc_root(), 0o700),
            (&self.snapshots(), 0o700),
            (&self.checkpoints(), 0o700),
            (&self.meta_db(), 0o700),
            (&self.cache, 0o700),
        ] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))
                .ctx("setting the mode of", d)?;
        }
        use crate::container::checkpoint::{CRIU_CONFIG, CRIU_CONFIG_SHARED};
        for (conf, text) in [
            (self.criu_config(), CRIU_CONFIG),
            (self.criu_config_shared(), CRIU_CONFIG_SHARED),
        ] {
            if std::fs::read_to_string(&conf).ok().as_deref() != Some(text) {
                let tmp = conf.with_extension("tmp");
                std::fs::write(&tmp, text).ctx("writing CRIU configuration", &tmp)?;
                std::fs::rename(&tmp, &conf).ctx("writing CRIU configuration", &conf)?;
            }
        }
        Ok(())
    }

    /// The audit log's segment files (the thaw-audit crate; 0700, made when it opens).
    pub fn audit(&self) -> PathBuf {
        self.home.join("audit")
    }
    pub fn meta_db(&self) -> PathBuf {
        self.home.join("meta.sled")
    }
    pub fn sandboxes(&self) -> PathBuf {
        self.home.join("sandboxes")
    }
    pub fn sandbox(&self, id: &str) -> PathBuf {
        self.sandboxes().join(id)
    }
    /// runc's state directory (`runc --root`): ours alone, so cleanup never touches other
    /// users' containers.
    pub fn runc_root(&self) -> PathBuf {
        self.home.join("runc")
    }
    /// The content-addressed snapshot store (snapshotter crate).
    pub fn snapshots(&self) -> PathBuf {
        self.home.join("snapshots")
    }
    /// CRIU options for our checkpoints and copying restores (written by [`Paths::ensure`]).
    pub fn criu_config(&self) -> PathBuf {
        self.home.join("criu.conf")
    }
    /// CRIU options for restoring a clone whose memory is mapped copy-on-write.
    pub fn criu_config_shared(&self) -> PathBuf {
        self.home.join("criu-shared.conf")
    }
    /// What the installed CRIU supports, cached per binary (container::criu).
    pub fn criu_features(&self) -> PathBuf {
        self.home.join("criu-features")
    }
    /// Scratch space for checkpoints on their way into the store.
    pub fn checkpoints(&self) -> PathBuf {
        self.home.join("checkpoints")
    }
    pub fn rootfs_cache(&self) -> PathBuf {
        self.cache.join("rootfs")
    }
    /// microvm guest images: kernel, initramfs, ext4 rootfs images (thaw-microvm's cache).
    pub fn image_cache(&self) -> PathBuf {
        self.cache.join("images")
    }
}

/// Finds the static guest-init binary: `$THAW_GUEST_INIT`, else `thaw-guest-init` beside the
/// running executable (where `make build` puts it), else on PATH.
pub fn guest_init_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("THAW_GUEST_INIT") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(missing_guest_init(&format!(
                "THAW_GUEST_INIT points at {}, which is not a file",
                p.display()
            )))
        };
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("thaw-guest-init"));
            // Test binaries live in target/<profile>/deps.
            if let Some(up) = dir.parent() {
                candidates.push(up.join("thaw-guest-init"));
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("thaw-guest-init")));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| missing_guest_init("no thaw-guest-init beside the thaw binary or on PATH"))
}

fn missing_guest_init(why: &str) -> Error {
    Error::MissingDependency {
        what: format!("static guest-init binary ({why})"),
        fix: "run `make build` (it builds target/release/thaw-guest-init), or set THAW_GUEST_INIT"
            .into(),
    }
}

/// Checks that `path` is a statically linked ELF (no PT_INTERP), so it runs in any rootfs.
pub fn is_static_elf(path: &Path) -> Result<bool> {
    let data = std::fs::read(path).ctx("reading", path)?;
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return Ok(false);
    }
    let rd16 = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let rd64 = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&data[o..o + 8]);
        u64::from_le_bytes(b) as usize
    };
    let phoff = rd64(0x20);
    let phentsize = rd16(0x36);
    let phnum = rd16(0x38);
    for i in 0..phnum {
        let off = phoff + i * phentsize;
        if off + 4 > data.len() {
            return Ok(false);
        }
        let ptype = u32::from_le_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]]);
        if ptype == 3 {
            // PT_INTERP: needs a dynamic loader.
            return Ok(false);
        }
    }
    Ok(true)
}
