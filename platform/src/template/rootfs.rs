//! Root filesystems, built once and cached by content hash under `$THAW_CACHE/rootfs`.
//!
//! Two layers: the *base* (busybox, or Debian from debootstrap plus packages), keyed by the
//! base spec; and the template *layer* (files copied in, `setup` commands run), keyed by the
//! base key plus every input byte. A sandbox's root is an overlay of its private upper dir on
//! `layer/upper` on `base`. Publishing the same template again, or another template on the
//! same base, reuses what exists. Builds go to a `.tmp-*` directory that is renamed into
//! place, so a crash never leaves a half-built layer under its final name.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tracing::{info, info_span, Instrument};

use super::spec::{BaseSpec, TemplateSpec};
use crate::cleanup::Scratch;
use crate::container::oci::{self, ContainerConfig, Network};
use crate::container::{mounts, runc::Runc, write_json};
use crate::error::{Error, IoContext, Result};
use crate::paths::Paths;
use crate::progress::Progress;

/// Bump to invalidate every cached rootfs (a change in how we build them).
const BUILD_FORMAT: &str = "thaw-rootfs-v1";

pub struct Built {
    /// Read-only layers, top first.
    pub layers: Vec<PathBuf>,
    pub key: String,
    pub reused_base: bool,
    pub reused_layer: bool,
}

fn hex(h: blake3::Hash) -> String {
    h.to_hex()[..32].to_string()
}

pub fn base_key(base: &BaseSpec) -> String {
    let mut h = blake3::Hasher::new();
    h.update(BUILD_FORMAT.as_bytes());
    match base {
        BaseSpec::Busybox => {
            h.update(b"busybox");
            // The busybox binary is an input: a new Debian busybox means a new base.
            if let Ok(meta) = std::fs::metadata(BUSYBOX) {
                h.update(&meta.len().to_le_bytes());
            }
        }
        BaseSpec::Debian { suite, packages } => {
            let mut p = packages.clone();
            p.sort();
            p.dedup();
            h.update(format!("debian\0{suite}\0{}", p.join(",")).as_bytes());
        }
    }
    format!("base-{}", hex(h.finalize()))
}

/// Hash of everything that determines the template layer.
pub fn layer_key(spec: &TemplateSpec, dir: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    h.update(BUILD_FORMAT.as_bytes());
    h.update(base_key(&spec.base).as_bytes());
    for f in &spec.files {
        h.update(format!("file\0{}\0{}\0{:?}\0", f.src, f.dest, f.mode).as_bytes());
        let src = TemplateSpec::file_source(dir, f);
        if !src.exists() {
            return Err(Error::BadTemplate {
                file: dir.join(super::spec::TEMPLATE_FILE),
                message: format!(
                    "field `files`: source `{}` does not exist in {}",
                    f.src,
                    dir.display()
                ),
            });
        }
        for entry in walkdir::WalkDir::new(&src).sort_by_file_name() {
            let entry =
                entry.map_err(|e| Error::Other(format!("reading {}: {e}", src.display())))?;
            let rel = entry.path().strip_prefix(&src).unwrap_or(entry.path());
            let meta = entry.metadata().map_err(|e| Error::Other(e.to_string()))?;
            h.update(format!("{}\0{:o}\0", rel.display(), meta.permissions().mode()).as_bytes());
            if meta.is_file() {
                let data =
                    std::fs::read(entry.path()).ctx("reading template file", entry.path())?;
                h.update(&data);
            }
        }
    }
    for s in &spec.setup {
        h.update(format!("setup\0{s}\0").as_bytes());
    }
    Ok(format!("layer-{}", hex(h.finalize())))
}

const BUSYBOX: &str = "/bin/busybox";

/// Builds (or reuses) the base and the template layer.
pub async fn build(
    paths: &Paths,
    spec: &TemplateSpec,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<Built> {
    let cache = paths.rootfs_cache();
    std::fs::create_dir_all(&cache).ctx("creating rootfs cache", &cache)?;
    let bkey = base_key(&spec.base);
    let base = cache.join(&bkey);
    let reused_base = base.exists();
    if !reused_base {
        progress.step(&format!("building base rootfs ({bkey})"));
        let _lock = FileLock::acquire(&cache.join(format!(".{bkey}.lock")))?;
        if !base.exists() {
            build_base(&cache, &bkey, &spec.base, progress).await?;
        }
    } else {
        progress.step("base rootfs cached");
    }
    let lkey = layer_key(spec, dir)?;
    let layer = cache.join(&lkey);
    let reused_layer = layer.exists();
    if !reused_layer {
        progress.step(&format!("building template layer ({lkey})"));
        let _lock = FileLock::acquire(&cache.join(format!(".{lkey}.lock")))?;
        if !layer.exists() {
            build_layer(paths, &cache, &lkey, &base, spec, dir, progress).await?;
        }
    } else {
        progress.step("template layer cached");
    }
    Ok(Built {
        layers: vec![layer.join("upper"), base],
        key: lkey,
        reused_base,
        reused_layer,
    })
}

async fn build_base(
    cache: &Path,
    key: &str,
    base: &BaseSpec,
    progress: &dyn Progress,
) -> Result<()> {
    let span = info_span!("rootfs.base", key);
    async {
        let scratch = Scratch::new(cache, &format!("{key}-{}", std::process::id()))?;
        let root = scratch.path.join("root");
        std::fs::create_dir_all(&root).ctx("creating rootfs", &root)?;
        match base {
            BaseSpec::Busybox => busybox_base(&root)?,
            BaseSpec::Debian { suite, packages } => {
                debian_base(&root, suite, packages, progress).await?
            }
        }
        common_dirs(&root)?;
        let final_path = cache.join(key);
        std::fs::rename(&root, &final_path).ctx("publishing base rootfs", &final_path)?;
        info!("base rootfs built");
        Ok(())
    }
    .instrument(span)
    .await
}

fn busybox_base(root: &Path) -> Result<()> {
    if !Path::new(BUSYBOX).exists() {
        return Err(Error::MissingDependency {
            what: format!("busybox-static ({BUSYBOX})"),
            fix: "run `make deps` or `apt-get install busybox-static`".into(),
        });
    }
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "app"] {
        std::fs::create_dir_all(root.join(d)).ctx("creating", root.join(d))?;
    }
    let bb = root.join("bin/busybox");
    std::fs::copy(BUSYBOX, &bb).ctx("copying busybox", &bb)?;
    let list = std::process::Command::new(BUSYBOX)
        .arg("--list-full")
        .output()
        .ctx("running busybox --list-full", BUSYBOX)?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "bin/busybox" {
            continue;
        }
        let link = root.join(applet);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).ctx("creating", parent)?;
        }
        if !link.exists() {
            std::os::unix::fs::symlink("/bin/busybox", &link).ctx("linking applet", &link)?;
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .ctx("writing", root.join("etc/passwd"))?;
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")
        .ctx("writing", root.join("etc/group"))?;
    Ok(())
}

async fn debian_base(
    root: &Path,
    suite: &str,
    packages: &[String],
    progress: &dyn Progress,
) -> Result<()> {
    let mirror = std::env::var("THAW_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".to_string());
    let mut cmd = tokio::process::Command::new("debootstrap");
    cmd.arg("--variant=minbase");
    if !packages.is_empty() {
        cmd.arg(format!("--include={}", packages.join(",")));
    }
    cmd.arg(suite).arg(root).arg(&mirror);
    progress.step(&format!(
        "debootstrap {suite} with {} package(s) (a few minutes, once; cached afterwards)",
        packages.len()
    ));
    let lines = run_streaming(cmd, "debootstrap", progress, Duration::from_secs(1800)).await?;
    if !lines.0.success() {
        return Err(Error::SetupFailed {
            command: format!("debootstrap {suite}"),
            status: lines.0.to_string(),
            tail: lines.1,
        });
    }
    // Package caches are dead weight in every snapshot and clone.
    for d in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let p = root.join(d);
        if let Ok(rd) = std::fs::read_dir(&p) {
            for e in rd.flatten() {
                if e.path().is_file() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    Ok(())
}

/// Runs a host command, feeding its output lines to the progress display; returns its status
/// and the tail of its output.
async fn run_streaming(
    mut cmd: tokio::process::Command,
    what: &str,
    progress: &dyn Progress,
    timeout: Duration,
) -> Result<(std::process::ExitStatus, String)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::MissingDependency {
                what: what.to_string(),
                fix: format!("run `make deps` or `apt-get install {what}`"),
            }
        } else {
            Error::Other(format!("starting {what}: {e}"))
        }
    })?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = tx.send(l);
            }
        });
    }
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = tx.send(l);
            }
        });
    }
    drop(tx);
    let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let work = async {
        // The channel closes when both streams have ended.
        while let Some(l) = rx.recv().await {
            progress.detail(&l);
            tail.push_back(l);
            if tail.len() > 8 {
                tail.pop_front();
            }
        }
        child.wait().await
    };
    let status = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| {
            Error::Other(format!(
                "{what} did not finish within {} s",
                timeout.as_secs()
            ))
        })?
        .map_err(|e| Error::Other(format!("waiting for {what}: {e}")))?;
    Ok((status, tail.into_iter().collect::<Vec<_>>().join(" | ")))
}

fn common_dirs(root: &Path) -> Result<()> {
    for (d, mode) in [
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("var/tmp", 0o1777),
        (".thaw", 0o755),
    ] {
        let p = root.join(d);
        std::fs::create_dir_all(&p).ctx("creating", &p)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).ctx("chmod", &p)?;
    }
    let init = root.join(".thaw/init");
    if !init.exists() {
        std::fs::write(&init, b"").ctx("creating guest-init mountpoint", &init)?;
    }
    Ok(())
}

async fn build_layer(
    paths: &Paths,
    cache: &Path,
    key: &str,
    base: &Path,
    spec: &TemplateSpec,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<()> {
    let span = info_span!("rootfs.layer", key);
    async {
        let scratch = Scratch::new(cache, &format!("{key}-{}", std::process::id()))?;
        let upper = scratch.path.join("upper");
        let work = scratch.path.join("work");
        let merged = scratch.path.join("merged");
        mounts::mount_overlay(&[base.to_path_buf()], &upper, &work, &merged)?;
        for f in &spec.files {
            let src = TemplateSpec::file_source(dir, f);
            let dest = merged.join(f.dest.trim_start_matches('/'));
            progress.detail(&format!("copy {} -> {}", f.src, f.dest));
            copy_tree(&src, &dest)?;
            if let Some(m) = &f.mode {
                let mode = u32::from_str_radix(m.trim_start_matches("0o"), 8).unwrap_or(0o644);
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))
                    .ctx("chmod", &dest)?;
            }
        }
        for (i, cmd) in spec.setup.iter().enumerate() {
            progress.step(&format!("setup {}/{}: {cmd}", i + 1, spec.setup.len()));
            run_setup(paths, &scratch.path, &merged, cmd, &spec.env).await?;
        }
        mounts::unmount(&merged)?;
        let final_dir = cache.join(key);
        std::fs::create_dir_all(&final_dir).ctx("creating layer", &final_dir)?;
        std::fs::rename(&upper, final_dir.join("upper")).ctx("publishing layer", &final_dir)?;
        Ok(())
    }
    .instrument(span)
    .await
}

/// Runs one `setup` command in a build container rooted at the merged overlay.
async fn run_setup(
    paths: &Paths,
    scratch: &Path,
    merged: &Path,
    cmd: &str,
    env: &BTreeMap<String, String>,
) -> Result<()> {
    let id = format!("build-{}", uuid::Uuid::new_v4().simple());
    let bundle = scratch.join("bundle");
    std::fs::create_dir_all(&bundle).ctx("creating bundle", &bundle)?;
    let mut envv = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        "HOME=/root".to_string(),
        "DEBIAN_FRONTEND=noninteractive".to_string(),
    ];
    envv.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    let cfg = ContainerConfig {
        rootfs: merged.to_path_buf(),
        hostname: "thaw-build".into(),
        args: vec!["/bin/sh".into(), "-c".into(), cmd.to_string()],
        env: envv,
        cwd: "/".into(),
        network: Network::Host,
        privileged_build: true,
        memory_bytes: None,
        cpu_quota_us: None,
        pids: None,
        agent_dir: None,
        guest_init: None,
        cgroup_path: format!("/thaw/{id}"),
        criu_config: None,
    };
    write_json(&bundle.join("config.json"), &oci::render(&cfg))?;
    let runc = Runc::new(paths.runc_root());
    let out = runc
        .run_foreground(&id, &bundle, Duration::from_secs(3600))
        .await?;
    let _ = runc.delete(&id).await;
    if !out.status.success() {
        let mut all = out.stdout;
        all.extend_from_slice(&out.stderr);
        return Err(Error::SetupFailed {
            command: cmd.to_string(),
            status: out.status.to_string(),
            tail: crate::container::runc::tail(&all, 400),
        });
    }
    Ok(())
}

/// Copies a file or directory tree, preserving modes and symlinks.
fn copy_tree(src: &Path, dest: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(src).ctx("reading", src)?;
    if meta.is_dir() {
        std::fs::create_dir_all(dest).ctx("creating", dest)?;
        std::fs::set_permissions(dest, meta.permissions()).ctx("chmod", dest)?;
        for entry in std::fs::read_dir(src).ctx("listing", src)? {
            let entry = entry.ctx("listing", src)?;
            copy_tree(&entry.path(), &dest.join(entry.file_name()))?;
        }
    } else if meta.file_type().is_symlink() {
        let target = std::fs::read_link(src).ctx("reading link", src)?;
        let _ = std::fs::remove_file(dest);
        std::os::unix::fs::symlink(target, dest).ctx("creating link", dest)?;
    } else {
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).ctx("creating", parent)?;
        }
        std::fs::copy(src, dest).ctx("copying", dest)?;
    }
    Ok(())
}

/// An exclusive flock, released on drop: two publishes of one base build it once.
pub struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    pub fn acquire(path: &Path) -> Result<FileLock> {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .ctx("opening lock file", path)?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(Error::io("locking", path, std::io::Error::last_os_error()));
        }
        Ok(FileLock { _file: file })
    }
}
