//! Guest kernel: Debian's `linux-image-amd64`.
//!
//! Cloud Hypervisor boots an uncompressed ELF `vmlinux` through its PVH entry point; Debian
//! ships only the compressed `vmlinuz` (a bzImage). The bzImage's setup header says where its
//! compressed payload is; that payload decompresses to the ELF `vmlinux`. QEMU boots the
//! bzImage itself, so both are kept. The modules the initramfs needs (and their dependencies,
//! read from each module's `.modinfo` because the package ships no `modules.dep`: depmod runs
//! at install time) are copied out decompressed, since busybox `insmod` may not handle
//! compressed modules.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use tracing::{info, info_span, warn};

use super::cache::{hash_file, key_of, ImageCache};
use super::elf::Elf;
use super::ImageError;
use crate::util::run;

/// Modules the guest needs before it can reach its rootfs and the host. Their dependencies
/// are added automatically.
pub const DEFAULT_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_rng",
    // The guest's network device (a tap in its VMM's namespace, wired by the egress gateway).
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport",
    "ext4",
];

/// Debian's metapackage that always depends on the current kernel build.
pub const KERNEL_METAPACKAGE: &str = "linux-image-amd64";

/// File names inside a kernel cache entry.
pub const VMLINUX: &str = "vmlinux";
pub const BZIMAGE: &str = "bzImage";
pub const MODULES_DIR: &str = "modules";
/// One module name per line, dependencies first.
pub const LOAD_ORDER: &str = "load-order";

/// A built guest kernel (a cache entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    pub dir: PathBuf,
    /// Uncompressed ELF with a PVH entry point: what Cloud Hypervisor boots.
    pub vmlinux: PathBuf,
    /// The package's `vmlinuz`: what QEMU boots.
    pub bz_image: PathBuf,
    /// `<name>.ko` files plus [`LOAD_ORDER`].
    pub modules_dir: PathBuf,
    /// Kernel release (`6.1.0-NN-amd64`).
    pub release: String,
}

impl Kernel {
    fn from_dir(dir: PathBuf) -> Result<Self, ImageError> {
        let release = std::fs::read_to_string(dir.join("release"))
            .map_err(|e| ImageError::io(&dir.join("release"), e))?
            .trim()
            .to_owned();
        Ok(Kernel {
            vmlinux: dir.join(VMLINUX),
            bz_image: dir.join(BZIMAGE),
            modules_dir: dir.join(MODULES_DIR),
            release,
            dir,
        })
    }
}

/// Downloads the current `linux-image-<release>-amd64` .deb (the dependency of
/// `linux-image-amd64`) into `<cache>/debs/` and returns its path. Reuses a file already there.
///
/// Needs apt lists: `scripts/install-deps.sh` runs `apt-get update`; if the lists are missing
/// this runs it once and retries.
pub fn download_kernel_deb(cache: &ImageCache) -> Result<PathBuf, ImageError> {
    let _span = info_span!("kernel_download").entered();
    let debs = cache.root().join("debs");
    std::fs::create_dir_all(&debs).map_err(|e| ImageError::io(&debs, e))?;
    let meta = apt_download(&debs, KERNEL_METAPACKAGE)?;
    let depends = run(
        Command::new("dpkg-deb").arg("-f").arg(&meta).arg("Depends"),
        "read the kernel metapackage",
    )?;
    let depends = String::from_utf8_lossy(&depends.stdout);
    let versioned = depends
        .split(',')
        .map(|d| d.trim().split([' ', '(']).next().unwrap_or("").to_owned())
        .find(|d| d.starts_with("linux-image-") && d != KERNEL_METAPACKAGE)
        .ok_or_else(|| ImageError::UnexpectedPackage {
            what: format!("{KERNEL_METAPACKAGE} depends on no linux-image-* package: {depends}"),
        })?;
    apt_download(&debs, &versioned)
}

fn apt_download(dir: &Path, package: &str) -> Result<PathBuf, ImageError> {
    let find = || -> Option<PathBuf> {
        let prefix = format!("{package}_");
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
            })
            .collect();
        found.sort();
        found.pop()
    };
    let mut cmd = Command::new("apt-get");
    cmd.arg("download").arg(package).current_dir(dir);
    let result = run(&mut cmd, "download the guest kernel package");
    if let Err(e) = result {
        // Without apt lists apt-get cannot locate the package: update once and retry.
        if e.to_string().contains("Unable to locate package")
            || e.to_string().contains("has no installation candidate")
        {
            warn!("apt lists missing; running apt-get update once");
            run(
                Command::new("apt-get").arg("update"),
                "refresh apt package lists",
            )?;
            run(&mut cmd, "download the guest kernel package")?;
        } else {
            // Offline, but a previous download is still here: use it.
            return find().ok_or(e.into());
        }
    }
    find().ok_or_else(|| ImageError::UnexpectedPackage {
        what: format!(
            "apt-get download {package} produced no .deb in {}",
            dir.display()
        ),
    })
}

/// Builds (or finds in the cache) the guest kernel from a Debian kernel .deb.
pub fn build_kernel(
    cache: &ImageCache,
    deb: &Path,
    modules: &[&str],
) -> Result<Kernel, ImageError> {
    let deb_hash = hash_file(deb)?;
    let key = key_of(&[
        b"kernel-v2",
        deb_hash.as_bytes(),
        modules.join(",").as_bytes(),
    ]);
    let dir = cache.get_or_build("kernel", &key, |out| build_into(deb, modules, out))?;
    Kernel::from_dir(dir)
}

fn build_into(deb: &Path, modules: &[&str], out: &Path) -> Result<(), ImageError> {
    let scratch = tempfile::Builder::new()
        .prefix(".kernel-extract-")
        .tempdir_in(out.parent().unwrap_or(out))
        .map_err(|e| ImageError::io(out, e))?;
    run(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb)
            .arg(scratch.path()),
        "unpack the kernel package",
    )?;
    let boot = scratch.path().join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(|e| ImageError::io(&boot, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or_else(|| ImageError::NoKernelInPackage {
            deb: deb.to_owned(),
        })?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_owned();
    let bz = std::fs::read(&vmlinuz).map_err(|e| ImageError::io(&vmlinuz, e))?;
    let vmlinux = extract_vmlinux(&bz)?;
    check_pvh(&vmlinux)?;
    write(&out.join(VMLINUX), &vmlinux)?;
    write(&out.join(BZIMAGE), &bz)?;
    write(&out.join("release"), release.as_bytes())?;

    let tree = scratch.path().join("lib/modules").join(&release);
    let tree = if tree.is_dir() {
        tree
    } else {
        // usr-merged packages (trixie and later) ship modules under /usr/lib.
        scratch.path().join("usr/lib/modules").join(&release)
    };
    let index = ModuleIndex::scan(&tree)?;
    let order = index.resolve(modules)?;
    let mdir = out.join(MODULES_DIR);
    std::fs::create_dir_all(&mdir).map_err(|e| ImageError::io(&mdir, e))?;
    for name in &order {
        let src = &index.paths[name];
        write(&mdir.join(format!("{name}.ko")), &read_module(src)?)?;
    }
    let mut list = order.join("\n");
    list.push('\n');
    write(&mdir.join(LOAD_ORDER), list.as_bytes())?;
    info!(%release, modules = order.len(), "guest kernel built");
    Ok(())
}

fn write(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    std::fs::write(path, data).map_err(|e| ImageError::io(path, e))
}

/// Compression of a bzImage payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Xz,
    Zstd,
}

const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";
const ZSTD_MAGIC: &[u8] = b"\x28\xb5\x2f\xfd";

/// Locates the compressed payload of a bzImage: from the setup header (boot protocol >= 2.08:
/// `payload_offset`/`payload_length`), falling back to a scan for the XZ/ZSTD magic.
pub fn find_payload(bz: &[u8]) -> Result<(Compression, &[u8]), ImageError> {
    let from_header = || -> Option<&[u8]> {
        if bz.get(0x202..0x206)? != b"HdrS" {
            return None;
        }
        let version = u16::from_le_bytes([*bz.get(0x206)?, *bz.get(0x207)?]);
        if version < 0x0208 {
            return None;
        }
        let setup_sects = match *bz.get(0x1f1)? {
            0 => 4,
            n => n as usize,
        };
        let pm_start = (setup_sects + 1) * 512;
        let u32_at = |o: usize| -> Option<usize> {
            let b = bz.get(o..o + 4)?;
            Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        };
        let off = pm_start.checked_add(u32_at(0x248)?)?;
        let len = u32_at(0x24c)?;
        bz.get(off..off.checked_add(len)?)
    };
    let classify = |p: &[u8]| {
        if p.starts_with(XZ_MAGIC) {
            Some(Compression::Xz)
        } else if p.starts_with(ZSTD_MAGIC) {
            Some(Compression::Zstd)
        } else {
            None
        }
    };
    if let Some(p) = from_header() {
        if let Some(c) = classify(p) {
            return Ok((c, p));
        }
    }
    for (magic, c) in [(XZ_MAGIC, Compression::Xz), (ZSTD_MAGIC, Compression::Zstd)] {
        if let Some(pos) = bz.windows(magic.len()).position(|w| w == magic) {
            return Ok((c, &bz[pos..]));
        }
    }
    Err(ImageError::UnsupportedKernelCompression)
}

/// Decompresses a bzImage's payload into the ELF `vmlinux`.
pub fn extract_vmlinux(bz: &[u8]) -> Result<Vec<u8>, ImageError> {
    let (compression, payload) = find_payload(bz)?;
    let out = match compression {
        // `--single-stream`: the payload is followed by its 4-byte size (and, on the scan
        // path, the rest of the image), which xz would otherwise reject as garbage.
        Compression::Xz => decompress_xz(payload, true)?,
        Compression::Zstd => {
            // `single_frame`: ignore whatever follows the first frame, for the same reason.
            let mut d = zstd::stream::read::Decoder::new(payload)
                .map_err(|e| ImageError::Decompress(e.to_string()))?
                .single_frame();
            let mut v = Vec::new();
            d.read_to_end(&mut v)
                .map_err(|e| ImageError::Decompress(e.to_string()))?;
            v
        }
    };
    if !out.starts_with(b"\x7fELF") {
        return Err(ImageError::Decompress(format!(
            "{compression:?} payload did not decompress to an ELF vmlinux"
        )));
    }
    Ok(out)
}

fn decompress_xz(data: &[u8], single_stream: bool) -> Result<Vec<u8>, ImageError> {
    use std::io::Write;
    use std::process::Stdio;
    let mut cmd = Command::new("xz");
    cmd.arg("-dc");
    if single_stream {
        cmd.arg("--single-stream");
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ImageError::Decompress(format!("cannot run xz (install xz-utils): {e}")))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| ImageError::Decompress("xz stdin unavailable".into()))?;
    // Feed stdin from a thread so a large output cannot deadlock against a full pipe.
    let input = data.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child
        .wait_with_output()
        .map_err(|e| ImageError::Decompress(e.to_string()))?;
    let _ = feeder.join();
    if !out.status.success() {
        return Err(ImageError::Decompress(format!(
            "xz: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

/// Xen's ELF note type for the 32-bit PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY).
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Cloud Hypervisor boots `vmlinux` through its PVH entry point, advertised by a Xen ELF note.
pub fn check_pvh(vmlinux: &[u8]) -> Result<(), ImageError> {
    let elf = Elf::parse(vmlinux).map_err(|e| ImageError::Decompress(e.to_string()))?;
    let notes = elf
        .notes()
        .map_err(|e| ImageError::Decompress(e.to_string()))?;
    if notes
        .iter()
        .any(|n| n.name == b"Xen" && n.kind == XEN_ELFNOTE_PHYS32_ENTRY)
    {
        Ok(())
    } else {
        Err(ImageError::NoPvhEntry)
    }
}

/// Kernel modules of one kernel tree, by name (dashes normalised to underscores).
struct ModuleIndex {
    paths: BTreeMap<String, PathBuf>,
}

fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| file.strip_suffix(".ko.xz"))
        .or_else(|| file.strip_suffix(".ko.zst"))
        .or_else(|| file.strip_suffix(".ko.gz"))?;
    Some(stem.replace('-', "_"))
}

/// Reads a module, decompressing `.ko.xz`/`.ko.zst`.
fn read_module(path: &Path) -> Result<Vec<u8>, ImageError> {
    let raw = std::fs::read(path).map_err(|e| ImageError::io(path, e))?;
    let name = path.to_string_lossy();
    if name.ends_with(".ko.xz") {
        decompress_xz(&raw, false)
    } else if name.ends_with(".ko.zst") {
        zstd::decode_all(&raw[..]).map_err(|e| ImageError::Decompress(format!("{name}: {e}")))
    } else if name.ends_with(".ko.gz") {
        Err(ImageError::Decompress(format!(
            "{name}: gzip-compressed modules are not supported"
        )))
    } else {
        Ok(raw)
    }
}

/// `.modinfo` key=value strings of a module.
fn modinfo(data: &[u8]) -> Result<Vec<(String, String)>, ImageError> {
    let elf = Elf::parse(data).map_err(|e| ImageError::Decompress(e.to_string()))?;
    let Some(sec) = elf
        .section(".modinfo")
        .map_err(|e| ImageError::Decompress(e.to_string()))?
    else {
        return Ok(Vec::new());
    };
    Ok(sec
        .split(|&b| b == 0)
        .filter_map(|kv| {
            let s = std::str::from_utf8(kv).ok()?;
            let (k, v) = s.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect())
}

impl ModuleIndex {
    fn scan(tree: &Path) -> Result<Self, ImageError> {
        let mut paths = BTreeMap::new();
        let mut stack = vec![tree.to_owned()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).map_err(|e| ImageError::io(&dir, e))? {
                let e = e.map_err(|e| ImageError::io(&dir, e))?;
                let p = e.path();
                let ft = e.file_type().map_err(|e| ImageError::io(&p, e))?;
                if ft.is_dir() {
                    stack.push(p);
                } else if let Some(n) = module_name(&p) {
                    paths.insert(n, p);
                }
            }
        }
        Ok(ModuleIndex { paths })
    }

    /// Alias providers (`alias=crc32c` in `crc32c_generic`) for soft dependencies, which name
    /// algorithms rather than modules. Only crypto/ and lib/ are scanned: that is where such
    /// providers live, and reading every module's .modinfo would cost seconds.
    fn alias_providers(&self, alias: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (name, path) in &self.paths {
            let p = path.to_string_lossy();
            if !(p.contains("/kernel/crypto/") || p.contains("/kernel/arch/x86/crypto/")) {
                continue;
            }
            let Ok(data) = read_module(path) else {
                continue;
            };
            let Ok(info) = modinfo(&data) else { continue };
            if info.iter().any(|(k, v)| k == "alias" && v == alias) {
                out.push(name.clone());
            }
        }
        out
    }

    /// Dependency closure of `wanted`, dependencies first. Soft dependencies (`softdep=pre:`)
    /// are included when they resolve; the initramfs treats a failed load of any module as a
    /// warning (e.g. an accelerated crc32c on a CPU without SSE4.2) and fails later, clearly,
    /// if the rootfs cannot be mounted.
    fn resolve(&self, wanted: &[&str]) -> Result<Vec<String>, ImageError> {
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        for w in wanted {
            self.visit(w, true, &mut done, &mut order, 0)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        required: bool,
        done: &mut BTreeSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> Result<(), ImageError> {
        // Module names use `_`, aliases keep their dashes (`crypto-crc32c`).
        let module = name.replace('-', "_");
        if done.contains(name) || done.contains(&module) || depth > 64 {
            return Ok(());
        }
        done.insert(name.to_owned());
        done.insert(module.clone());
        let Some(path) = self.paths.get(&module) else {
            if required {
                return Err(ImageError::MissingModule { module });
            }
            // A soft dependency naming an algorithm: load its providers instead.
            for provider in self.alias_providers(name) {
                self.visit(&provider, false, done, order, depth + 1)?;
            }
            return Ok(());
        };
        let info = modinfo(&read_module(path)?)?;
        for (k, v) in &info {
            if k == "depends" {
                for d in v.split(',').filter(|d| !d.is_empty()) {
                    self.visit(d, true, done, order, depth + 1)?;
                }
            } else if k == "softdep" {
                // "pre: a b post: c": pre-dependencies must load first; post ones don't matter
                // for mounting a filesystem.
                let mut pre = false;
                for tok in v.split_whitespace() {
                    match tok {
                        "pre:" => pre = true,
                        "post:" => pre = false,
                        m if pre => self.visit(m, false, done, order, depth + 1)?,
                        _ => {}
                    }
                }
            }
        }
        order.push(module);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::elf::tests::{elf_with_note_segment, note};
    use super::*;

    #[test]
    fn pvh_note_is_detected() {
        let elf = elf_with_note_segment(&note(b"Xen", 18, &0x100_0000u32.to_le_bytes()));
        check_pvh(&elf).unwrap();
        let elf = elf_with_note_segment(&note(b"GNU", 3, b"abcd"));
        let e = check_pvh(&elf).unwrap_err();
        assert!(e.to_string().contains("no PVH entry point"), "{e}");
    }

    #[test]
    fn payload_is_found_by_header_then_by_scan() {
        let elf = elf_with_note_segment(&note(b"Xen", 18, b"1234"));
        let mut xz = std::process::Command::new("xz")
            .arg("-c")
            .arg("--check=crc32")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("xz is installed");
        {
            use std::io::Write;
            xz.stdin.take().unwrap().write_all(&elf).unwrap();
        }
        let payload = xz.wait_with_output().unwrap().stdout;
        // A fake bzImage: setup_sects=1, so protected-mode code starts at 1024.
        let mut bz = vec![0u8; 1024];
        bz[0x1f1] = 1;
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        bz[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        bz[0x24c..0x250].copy_from_slice(&((payload.len() + 4) as u32).to_le_bytes());
        bz.extend_from_slice(&[0u8; 16]);
        bz.extend_from_slice(&payload);
        bz.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        bz.extend_from_slice(b"trailing junk");
        assert_eq!(extract_vmlinux(&bz).unwrap(), elf);
        // Header that does not point at a payload: the scan still finds it.
        bz[0x248..0x24c].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(extract_vmlinux(&bz).unwrap(), elf);
        // zstd payload.
        let z = zstd::encode_all(&elf[..], 3).unwrap();
        let mut bz2 = vec![0u8; 600];
        bz2.extend_from_slice(&z);
        bz2.extend_from_slice(b"junk after the frame");
        assert_eq!(extract_vmlinux(&bz2).unwrap(), elf);
        assert!(matches!(
            extract_vmlinux(&[0u8; 2048]),
            Err(ImageError::UnsupportedKernelCompression)
        ));
    }
}
