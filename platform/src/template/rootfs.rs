//! Root filesystems, built once and cached by content hash under `$THAW_CACHE/rootfs`.
//!
//! Two layers: the *base* (busybox, or Debian from debootstrap plus packages), keyed by the
//! base spec; and the template *layer* (files copied in, `setup` commands run), keyed by the
//! base key plus every input byte. A sandbox's root is an overlay of its private upper dir on
//! `layer/upper` on `base`. Publishing the same template again, or another template on the
//! same base, reuses what exists. Builds go to a `.tmp-*` directory that is renamed into
//! place, so a crash never leaves a half-built layer under its final name.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tracing::{info, info_span, Instrument};

use super::spec::{
    parse_file_mode, BaseSpec, TemplateSpec, TemplateSpecExt as _, MAX_BUILD_TIMEOUT_S,
};
use crate::cleanup::Scratch;
use crate::container::oci::{self, ContainerConfig, Network};
use crate::container::userns::{self, IdMap};
use crate::container::{mounts, runc::Runc, write_json};
use crate::error::{Error, IoContext, Result};
use crate::paths::Paths;
use crate::progress::Progress;

/// Bump to invalidate every cached rootfs (a change in how we build them).
const BUILD_FORMAT: &str = "thaw-rootfs-v1";

/// Bump to invalidate every cached template layer (not the bases, which no tenant command
/// touches). v2: layers built in a sandbox, scrubbed of setuid/setgid bits and devices.
const LAYER_FORMAT: &str = "thaw-layer-v2";

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
    h.update(LAYER_FORMAT.as_bytes());
    for (i, f) in spec.files.iter().enumerate() {
        h.update(format!("file\0{}\0{}\0{:?}\0", f.src, f.dest, f.mode).as_bytes());
        let src = TemplateSpec::file_source(dir, i, f)?;
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

/// Environment variable: a PEM bundle that template builds granted egress trust, for hosts
/// whose outbound HTTPS goes through a TLS-intercepting proxy of the operator's.
pub const BUILD_CA_ENV: &str = "THAW_BUILD_CA_BUNDLE";

/// Builds (or reuses) the base and the template layer.
pub async fn build(
    paths: &Paths,
    gateway: &thaw_gateway::Gateway,
    owner: &str,
    spec: &TemplateSpec,
    dir: &Path,
    ids: IdMap,
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
            build_layer(
                paths, gateway, owner, &cache, &lkey, &base, spec, dir, ids, progress,
            )
            .await?;
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

#[allow(clippy::too_many_arguments)]
async fn build_layer(
    paths: &Paths,
    gateway: &thaw_gateway::Gateway,
    owner: &str,
    cache: &Path,
    key: &str,
    base: &Path,
    spec: &TemplateSpec,
    dir: &Path,
    ids: IdMap,
    progress: &dyn Progress,
) -> Result<()> {
    let span = info_span!("rootfs.layer", key);
    async {
        let scratch = Scratch::new(cache, &format!("{key}-{}", std::process::id()))?;
        // Everything the build writes goes to a tmpfs of `[build] disk_mib`: the kernel
        // enforces the size, and a runaway build cannot fill the cache's disk. It is
        // copied to the cache only once the build has succeeded and been scrubbed.
        let disk = scratch.path.join("disk");
        mounts::mount_tmpfs(&disk, spec.build.disk_mib)?;
        let upper = disk.join("upper");
        let work = disk.join("work");
        // The build's root is mounted where the build's own range can reach it (runc mounts
        // it from inside the user namespace), as a sandbox's is: not in the cache (0700).
        let root = BuildRoot(crate::container::SandboxDir {
            root: paths.sandbox(&format!("build-{}", uuid::Uuid::new_v4().simple())),
        });
        root.0.create(ids)?;
        let merged = root.0.rootfs();
        // The build runs in the template's user namespace: its root is the range's first
        // uid, the base is seen through an idmapped mount, and what the build writes is
        // owned by range uids until it is shifted back below.
        mounts::mount_sandbox_root(&[base.to_path_buf()], &upper, &work, &merged, ids)?;
        for (i, f) in spec.files.iter().enumerate() {
            let src = TemplateSpec::file_source(dir, i, f)?;
            progress.detail(&format!("copy {} -> {}", f.src, f.dest));
            let dest = Path::new(&f.dest);
            copy_tree(&src, &merged, dest).map_err(|e| disk_full(e, &disk, spec))?;
            if let Some(m) = &f.mode {
                let mode = parse_file_mode(m).map_err(|why| Error::BadTemplate {
                    file: dir.join(super::spec::TEMPLATE_FILE),
                    message: format!("files[{i}] (dest {}): {why}", f.dest),
                })?;
                let target = resolve_in_root(&merged, dest)?;
                let meta = std::fs::symlink_metadata(&target).ctx("reading", &target)?;
                // A symlink's own mode means nothing, and chmod would follow it.
                if !meta.file_type().is_symlink() {
                    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
                        .ctx("chmod", &target)?;
                }
            }
        }
        // The template's files were copied in by host root: give them to the sandbox's root,
        // as if it had written them.
        userns::shift_owners(&upper, ids, true)?;
        if !spec.files.is_empty() {
            // The owners changed in the upper directory, behind the overlay's back, and the
            // overlay keeps the owners it cached at the copy: a directory the copy created
            // stays host root's to it, which the build's root cannot write ("Permission
            // denied" on mkdir in /app). A fresh mount sees the owners as they are.
            mounts::unmount(&merged)?;
            mounts::mount_sandbox_root(&[base.to_path_buf()], &upper, &work, &merged, ids)?;
        }
        for (i, cmd) in spec.setup.iter().enumerate() {
            progress.step(&format!("setup {}/{}: {cmd}", i + 1, spec.setup.len()));
            run_setup(
                paths,
                gateway,
                owner,
                &scratch.path,
                &disk,
                &merged,
                i + 1,
                cmd,
                spec,
                ids,
                progress,
            )
            .await?;
        }
        mounts::unmount(&merged)?;
        // Layers are stored with canonical owners (0 is root), shared by every template
        // whatever its range; each sandbox sees them through its own idmapped mount.
        userns::shift_owners(&upper, ids, false)?;
        for warning in scrub_layer(&upper)? {
            progress.step(&format!("warning: {warning}"));
        }
        // Off the tmpfs, onto the cache's disk: `cp -a` keeps what overlayfs needs of a
        // layer (whiteout devices, `trusted.overlay.*` xattrs, hard links, owners).
        let out = scratch.path.join("upper");
        let copy = tokio::process::Command::new("cp")
            .arg("-a")
            .arg(&upper)
            .arg(&out)
            .output()
            .await
            .ctx("running cp -a", &upper)?;
        if !copy.status.success() {
            return Err(Error::Other(format!(
                "copying the built layer to {}: {}",
                out.display(),
                crate::container::runc::tail(&copy.stderr, 400)
            )));
        }
        let final_dir = cache.join(key);
        std::fs::create_dir_all(&final_dir).ctx("creating layer", &final_dir)?;
        std::fs::rename(&out, final_dir.join("upper")).ctx("publishing layer", &final_dir)?;
        Ok(())
    }
    .instrument(span)
    .await
}

/// A build's root directory under `sandboxes/`, torn down (unmounted, removed) however the
/// build ends. It has a sandbox's owner record, so the crash sweep leaves it alone while its
/// thaw lives and removes it after.
struct BuildRoot(crate::container::SandboxDir);

impl Drop for BuildRoot {
    fn drop(&mut self) {
        let _ = mounts::teardown_dir(&self.0.root);
    }
}

/// An out-of-space error while copying `files` is the build's disk limit, said so.
fn disk_full(e: Error, disk: &Path, spec: &TemplateSpec) -> Error {
    if tmpfs_full(disk) {
        Error::BuildRefused(format!(
            "template files exceeded [build] disk_mib = {}; raise it (max 65536) or copy in less",
            spec.build.disk_mib
        ))
    } else {
        e
    }
}

/// Whether the build's tmpfs is (nearly) out of space or inodes.
fn tmpfs_full(disk: &Path) -> bool {
    match nix::sys::statvfs::statvfs(disk) {
        Ok(v) => {
            // fsblkcnt_t and c_ulong are u64 on the 64-bit targets thaw runs on.
            let block = v.fragment_size().max(1);
            v.blocks_available().saturating_mul(block) < (1 << 20)
                || (v.files() > 0 && v.files_available() == 0)
        }
        Err(_) => false,
    }
}

/// Runs one `setup` command in a build container rooted at the merged overlay: the same
/// confinement as a sandbox (no network but loopback, seccomp, no_new_privs, masked /proc,
/// cgroup limits from `[build]`), with a few file capabilities ([`oci::BUILD_CAPS`]) so a
/// package manager can act as root on the rootfs. `n` counts from 1 for messages.
#[allow(clippy::too_many_arguments)]
async fn run_setup(
    paths: &Paths,
    gateway: &thaw_gateway::Gateway,
    owner: &str,
    scratch: &Path,
    disk: &Path,
    merged: &Path,
    n: usize,
    cmd: &str,
    spec: &TemplateSpec,
    ids: IdMap,
    progress: &dyn Progress,
) -> Result<()> {
    let b = &spec.build;
    let id = format!("build-{}", uuid::Uuid::new_v4().simple());
    let span = info_span!("rootfs.setup", container = %id, step = n);
    async {
        let bundle = scratch.join("bundle");
        std::fs::create_dir_all(&bundle).ctx("creating bundle", &bundle)?;
        let mut envv = vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            "HOME=/root".to_string(),
            "DEBIAN_FRONTEND=noninteractive".to_string(),
        ];
        envv.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
        // Granted egress ([build] allow_out): a host-made namespace wired to the gateway,
        // kept until the container is gone.
        let net = crate::egress::BuildNetwork::open(gateway, owner, &id, b).await?;
        // Behind an operator's TLS-intercepting proxy, a build granted egress trusts the
        // operator's bundle too (the usual variables point every common client at it).
        let ca_bundle = match (&net, std::env::var_os(BUILD_CA_ENV)) {
            (Some(_), Some(p)) if !p.is_empty() => {
                let p = PathBuf::from(p);
                if !p.is_file() {
                    return Err(Error::MissingDependency {
                        what: format!("the CA bundle {} ({BUILD_CA_ENV})", p.display()),
                        fix: format!("point {BUILD_CA_ENV} at a PEM file, or unset it"),
                    });
                }
                for var in ["SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"] {
                    envv.push(format!("{var}={}", oci::CA_BUNDLE_PATH));
                }
                Some(p)
            }
            _ => None,
        };
        let cfg = ContainerConfig {
            rootfs: merged.to_path_buf(),
            hostname: "thaw-build".into(),
            args: vec!["/bin/sh".into(), "-c".into(), cmd.to_string()],
            env: envv,
            cwd: "/".into(),
            network: net
                .as_ref()
                .map_or(Network::Loopback, |n| Network::Path(n.path())),
            build_caps: true,
            // The tmpfs holding the build's writes is charged to the build's memory
            // cgroup, so the cgroup gets room for both.
            memory_bytes: Some((b.memory_mib + b.disk_mib) << 20),
            cpu_quota_us: Some(u64::from(b.vcpus) * 100_000),
            pids: Some(b.pids),
            ids,
            cgroup_view: false,
            guest_init: None,
            ca_bundle,
            cgroup_path: format!("/{}/{id}", crate::container::cgroups::PARENT),
            criu_config: None,
        };
        write_json(&bundle.join("config.json"), &oci::render(&cfg))?;
        let runc = Runc::new(paths.runc_root());
        let cap = usize::try_from(b.output_kib << 10).unwrap_or(usize::MAX);
        let run = runc
            .run_build(&id, &bundle, Duration::from_secs(b.timeout_s), cap)
            .await;
        // Read why it died while the stopped container still holds its cgroups.
        let oom = crate::engine::oom_kills(&id) > 0;
        let forks_refused = pids_max_events(&id) > 0;
        if let Err(e) = runc.delete(&id).await {
            tracing::warn!(error = %e, "deleting the build container");
        }
        let run = run?;
        let tail = crate::container::runc::tail(&run.output, 400);
        if run.dropped > 0 {
            progress.detail(&format!(
                "setup {n}: {} bytes of output over [build] output_kib = {} were dropped; kept the last {} KiB",
                run.dropped, b.output_kib, b.output_kib
            ));
        }
        let step = format!("setup command {n} `{cmd}`");
        let refused = |what: String| Err(Error::BuildRefused(format!("{what}; last output: {tail}")));
        if oom {
            return refused(format!(
                "{step} ran out of memory: exceeded [build] memory_mib = {}; raise it (max 65536) or use less memory",
                b.memory_mib
            ));
        }
        if forks_refused && (run.timed_out || !run.status.success()) {
            return refused(format!(
                "{step} hit [build] pids = {} (a fork was refused); raise it (max 65536) or start fewer processes",
                b.pids
            ));
        }
        if run.timed_out {
            return refused(format!(
                "{step} exceeded [build] timeout_s = {}; raise it (max {MAX_BUILD_TIMEOUT_S}) or make the step faster",
                b.timeout_s
            ));
        }
        if !run.status.success() {
            if tmpfs_full(disk) {
                return refused(format!(
                    "{step} exceeded [build] disk_mib = {}; raise it (max 65536) or write less",
                    b.disk_mib
                ));
            }
            return Err(Error::SetupFailed {
                command: cmd.to_string(),
                status: run.status.to_string(),
                tail,
            });
        }
        Ok(())
    }
    .instrument(span)
    .await
}

/// `max N` of a cgroup's pids.events: forks the pids limit refused (v1 and v2 alike).
fn pids_max_events(id: &str) -> u64 {
    let parent = crate::container::cgroups::PARENT;
    let candidates = [
        format!("/sys/fs/cgroup/pids/{parent}/{id}/pids.events"),
        format!("/sys/fs/cgroup/{parent}/{id}/pids.events"),
    ];
    candidates
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| l.strip_prefix("max ")?.trim().parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .max()
        .unwrap_or(0)
}

/// Checks a freshly built layer before it is published into the shared cache, where every
/// sandbox of the template (and any template with the same inputs) will mount it. A device
/// node is refused: no sandbox needs one in its image, and a device file is a direct line
/// to a driver. Overlay whiteouts (char 0:0) are how the layer records deletions and stay.
/// Setuid and setgid bits on files are stripped, not refused: package installs bring them
/// (`su`, `passwd`, ...) and refusing would make ordinary Debian packages unpublishable,
/// while stripped they are plain binaries (sandboxes run with no_new_privs anyway, so the
/// bits could never have worked). A setgid *directory* only chooses the group of new files
/// in it and keeps its bit. Returns one warning per stripped file.
fn scrub_layer(upper: &Path) -> Result<Vec<String>> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut warnings = Vec::new();
    for entry in walkdir::WalkDir::new(upper).follow_links(false) {
        let entry = entry.map_err(|e| Error::Other(format!("scanning the built layer: {e}")))?;
        let path = entry.path();
        let shown = Path::new("/").join(path.strip_prefix(upper).unwrap_or(path));
        let meta = std::fs::symlink_metadata(path).ctx("scanning the built layer", path)?;
        let ft = meta.file_type();
        if ft.is_char_device() && meta.rdev() == 0 {
            continue;
        }
        if ft.is_char_device() || ft.is_block_device() {
            let rdev = meta.rdev();
            return Err(Error::BuildRefused(format!(
                "the build left a device node at {} ({} {}:{}); thaw refuses device nodes in a template: remove it in setup",
                shown.display(),
                if ft.is_char_device() { "char" } else { "block" },
                libc::major(rdev),
                libc::minor(rdev)
            )));
        }
        let mode = meta.mode();
        if ft.is_file() && mode & 0o6000 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o1777))
                .ctx("stripping setuid/setgid", path)?;
            warnings.push(format!(
                "stripped the setuid/setgid bits of {} (mode {:o} -> {:o}); thaw publishes no setuid or setgid files",
                shown.display(),
                mode & 0o7777,
                mode & 0o1777
            ));
        }
    }
    Ok(warnings)
}

/// Resolves `path` (absolute, inside the rootfs at `root`) the way a process chrooted at
/// `root` would: symlinks on the way are followed, absolute targets taken relative to
/// `root`, and `..` stops at `root`. The host writes template files into the rootfs, whose
/// symlinks come from the base image and from the template itself; resolving them against
/// the host's `/` would let a link such as `/app -> /etc` send a host write outside the
/// rootfs. Nothing else writes to the rootfs meanwhile (setup runs afterwards), so the
/// answer holds when used.
fn resolve_in_root(root: &Path, path: &Path) -> Result<PathBuf> {
    use std::collections::VecDeque;
    use std::ffi::OsString;
    use std::path::Component;
    fn push_front(todo: &mut VecDeque<OsString>, p: &Path) {
        let parts: Vec<OsString> = p
            .components()
            .filter_map(|c| match c {
                Component::Normal(s) => Some(s.to_os_string()),
                Component::ParentDir => Some(OsString::from("..")),
                _ => None,
            })
            .collect();
        for part in parts.into_iter().rev() {
            todo.push_front(part);
        }
    }
    let mut todo: VecDeque<OsString> = VecDeque::new();
    push_front(&mut todo, path);
    let mut done: Vec<OsString> = Vec::new();
    let mut links = 0;
    while let Some(part) = todo.pop_front() {
        if part == ".." {
            done.pop();
            continue;
        }
        let here: PathBuf = root.join(done.iter().collect::<PathBuf>()).join(&part);
        match std::fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(Error::BadTemplate {
                        file: path.to_path_buf(),
                        message: "too many levels of symbolic links in the rootfs".into(),
                    });
                }
                let target = std::fs::read_link(&here).ctx("reading link", &here)?;
                if target.is_absolute() {
                    done.clear();
                }
                push_front(&mut todo, &target);
            }
            _ => done.push(part),
        }
    }
    Ok(root.join(done.iter().collect::<PathBuf>()))
}

/// Copies a file or directory tree from the template directory to `dest` inside the rootfs
/// at `root`. Symlinks in the source are copied as symlinks, never followed (so none leads
/// out of the template directory); device nodes, FIFOs and sockets are refused. Modes are
/// kept without setuid, setgid and sticky bits, which a template may not ship.
fn copy_tree(src: &Path, root: &Path, dest: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(src).ctx("reading", src)?;
    let ft = meta.file_type();
    let plain_mode = std::fs::Permissions::from_mode(meta.permissions().mode() & 0o777);
    if ft.is_dir() {
        let target = resolve_in_root(root, dest)?;
        std::fs::create_dir_all(&target).ctx("creating", &target)?;
        std::fs::set_permissions(&target, plain_mode).ctx("chmod", &target)?;
        for entry in std::fs::read_dir(src).ctx("listing", src)? {
            let entry = entry.ctx("listing", src)?;
            copy_tree(&entry.path(), root, &dest.join(entry.file_name()))?;
        }
    } else if ft.is_symlink() {
        let link = std::fs::read_link(src).ctx("reading link", src)?;
        let parent = resolve_in_root(root, dest.parent().unwrap_or(Path::new("/")))?;
        std::fs::create_dir_all(&parent).ctx("creating", &parent)?;
        let at = parent.join(dest.file_name().unwrap_or_default());
        // Replace whatever is there without following it.
        if std::fs::symlink_metadata(&at).is_ok_and(|m| !m.is_dir()) {
            std::fs::remove_file(&at).ctx("replacing", &at)?;
        }
        std::os::unix::fs::symlink(link, &at).ctx("creating link", &at)?;
    } else if ft.is_file() {
        let parent = resolve_in_root(root, dest.parent().unwrap_or(Path::new("/")))?;
        std::fs::create_dir_all(&parent).ctx("creating", &parent)?;
        let target = resolve_in_root(root, dest)?;
        std::fs::copy(src, &target).ctx("copying", &target)?;
        std::fs::set_permissions(&target, plain_mode).ctx("chmod", &target)?;
    } else {
        let what = if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "a device node"
        };
        return Err(Error::BadTemplate {
            file: src.to_path_buf(),
            message: format!("is {what}; templates may hold only files, directories and symlinks"),
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolving_in_the_rootfs_never_leaves_it() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("app")).unwrap();
        std::os::unix::fs::symlink("../../../../..", root.join("up")).unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        let r = |p: &str| resolve_in_root(&root, Path::new(p)).unwrap();
        assert_eq!(r("/app/x"), root.join("etc/x"));
        assert_eq!(r("/up/etc/passwd"), root.join("etc/passwd"));
        assert_eq!(r("/../../x"), root.join("x"));
        assert_eq!(r("/bin/sh"), root.join("usr/bin/sh"));
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert!(resolve_in_root(&root, Path::new("/loop/x")).is_err());
    }

    #[test]
    fn copy_tree_refuses_fifos_and_strips_special_bits() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        let root = t.path().join("root");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        let f = src.join("f");
        std::fs::write(&f, "x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o4755)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("l")).unwrap();
        copy_tree(&src, &root, Path::new("/app")).unwrap();
        let mode = std::fs::metadata(root.join("app/f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
        assert_eq!(
            std::fs::read_link(root.join("app/l")).unwrap(),
            Path::new("/etc/passwd")
        );
        nix::unistd::mkfifo(
            &src.join("p"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let err = copy_tree(&src, &root, Path::new("/app"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("FIFO") && err.contains("/p"), "{err}");
    }

    #[test]
    fn scrub_strips_setuid_keeps_whiteouts_and_refuses_devices() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let up = t.path();
        let su = up.join("su");
        std::fs::write(&su, "x").unwrap();
        std::fs::set_permissions(&su, std::fs::Permissions::from_mode(0o6755)).unwrap();
        let wh = up.join("gone");
        nix::sys::stat::mknod(
            &wh,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
        let warnings = scrub_layer(up).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("/su"), "{warnings:?}");
        assert_eq!(std::fs::metadata(&su).unwrap().mode() & 0o7777, 0o755);
        assert!(wh.exists());
        nix::sys::stat::mknod(
            &up.join("null"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
        let err = scrub_layer(up).unwrap_err().to_string();
        assert!(err.contains("device node at /null (char 1:3)"), "{err}");
    }
}
