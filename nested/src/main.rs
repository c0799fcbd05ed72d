//! `thaw-nested`: runs thaw's real-Cloud-Hypervisor tests on real KVM.
//!
//! Those tests are `#[ignore]`d in a plain `cargo test` (they need hardware virtualization,
//! and this project's CI host has only a PVM `/dev/kvm`), so they show as ignored, never as
//! passed. This command runs exactly them (`--ignored`):
//!
//! * **natively**, where Cloud Hypervisor and hardware KVM work here;
//! * else **nested**: QEMU's software emulation (TCG) emulates AMD SVM with nested paging, so
//!   a Linux guest of it (L1) gets a real `/dev/kvm` and runs real Cloud Hypervisor, whose own
//!   guests (L2) are the sandboxes. Speeds inside mean nothing; behaviour is the real thing.
//!   See `guest.rs` for L1's layout and `scratch.rs` for what is pre-filled.
//! * where neither works (no QEMU), it says so and exits 0 having run nothing: "this host
//!   lacks X" is the only reason to skip.
//!
//! Each test is a job of its own with a hard timeout inside L1 (a task that outlives its
//! SIGKILL is reported with its kernel stack, and the run goes on), and the whole run has one
//! on the host. L1 prints a heartbeat every minute and its kernel's warnings; when both its
//! consoles stay silent for five minutes, L1 has stopped: the host prints what QEMU says of
//! it and its vCPUs' registers, kills it, and boots a fresh L1 for the jobs it had not
//! finished, up to twice. A retry is printed as such (`RETRIED`); a third freeze fails the
//! run.
//!
//! Two kinds of silence have been seen. A full host disk: QEMU's default for a failed write
//! is to pause the VM (`werror=enospc`), which looks exactly like a hung kernel; so the
//! scratch disk reports write errors to L1 instead, gives back what L1 deletes (discard), and
//! a boot is refused up front when the host's disk lacks the room a run needs. And a stop of
//! L1 itself (three in about ten runs here), a fault of nested SVM under TCG that no test
//! inside can cause or fix: either both vCPUs spinning at one kernel address while the kernel
//! prints soft-lockup reports on the serial port, or both vCPUs standing still (their
//! registers, timestamp counter values included, the same from one dump to the next). Only the
//! virtio console (user space, with its heartbeat) counts as L1 being alive. On any failure
//! the tails of L1's consoles, the failed tests' output and the sandboxes' console, VMM and
//! init logs are printed.

mod cargo;
mod guest;
mod run;
mod scratch;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use thaw_microvm::image::{build_guest_image, ImageCache, DEFAULT_GUEST_INIT_PATH};
use thaw_microvm::{cloud_hypervisor_available, Availability};

/// The real-Cloud-Hypervisor tests: (package, test targets).
const SUITES: &[(&str, &[&str])] = &[
    ("thaw-microvm", &["cloud_hypervisor"]),
    ("thaw-e2e", &["microvm"]),
];

/// Templates whose layers the tests deploy on the microvm tier.
const TEMPLATES: &[&str] = &["templates/shell", "templates/python"];

#[derive(Parser, Debug)]
#[command(
    about = "Run thaw's real Cloud Hypervisor tests on real KVM (nested under QEMU TCG where needed)"
)]
struct Args {
    /// The Cloud Hypervisor binary (`scripts/build-cloud-hypervisor.sh` prints one).
    #[arg(long, env = "THAW_CLOUD_HYPERVISOR")]
    cloud_hypervisor: PathBuf,
    /// A static guest-init (`make guest-init`).
    #[arg(long, env = "THAW_GUEST_INIT")]
    guest_init: PathBuf,
    /// The `thaw` binary the end-to-end tests run (built with the test binaries' profile).
    #[arg(long, default_value = "target/debug/thaw")]
    thaw: PathBuf,
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Working directory for L1's kernel, initramfs, scratch disk and console log.
    #[arg(long, default_value = "target/nested")]
    workdir: PathBuf,
    /// Hard limit on the whole nested run (every L1 boot), in minutes. One L1 takes about 30
    /// here; the rest is room for one more after a freeze.
    #[arg(long, default_value_t = 60)]
    timeout_min: u64,
    /// Hard limit on each test binary, in seconds.
    /// (The python test, the longest, took 1047 to 1308 s in today's runs.)
    #[arg(long, default_value_t = 2100)]
    binary_timeout_s: u64,
    /// L1's memory.
    #[arg(long, default_value_t = 8192)]
    memory_mib: u64,
    /// L1's vCPUs (QEMU runs one host thread per vCPU).
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Silence on L1's consoles (which carry a heartbeat a minute) after which L1 is taken
    /// as frozen: it is killed, and the jobs it did not finish run again in a fresh L1.
    #[arg(long, default_value_t = run::SILENCE.as_secs())]
    silence_s: u64,
    /// Only tests whose name contains this (passed to each test binary).
    #[arg(long)]
    filter: Option<String>,
    /// Instead of the tests: `thaw bench` of templates/shell on the microvm tier, inside L1
    /// (`make bench-microvm`). Its figures are an emulator's, not real hardware's.
    #[arg(long)]
    bench: bool,
    /// `thaw bench --iterations` in bench mode.
    #[arg(long, default_value_t = 5)]
    bench_iterations: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("[nested] error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: &Args) -> Result<bool> {
    let workspace = std::env::current_dir().context("current directory")?;
    if !workspace.join("Cargo.toml").is_file() {
        bail!("run thaw-nested from the workspace root (make test-microvm does)");
    }
    let ch = absolute(&args.cloud_hypervisor)?;
    let guest_init = absolute(&args.guest_init)?;
    let thaw = absolute(&args.thaw)?;
    for (what, p) in [
        ("Cloud Hypervisor", &ch),
        ("guest-init", &guest_init),
        ("thaw", &thaw),
    ] {
        if !p.is_file() {
            bail!(
                "{what} not found at {}: build it first (make test-microvm does)",
                p.display()
            );
        }
    }
    let jobs = if args.bench {
        vec![bench_job(&workspace, &thaw, args.bench_iterations)]
    } else {
        let mut jobs = Vec::new();
        for (package, tests) in SUITES {
            for b in cargo::build_tests(&workspace, package, tests)? {
                for t in cargo::ignored_tests(&b, args.filter.as_deref())? {
                    jobs.push(guest::Job::test(&b, &t));
                }
            }
        }
        run_last(&mut jobs);
        jobs
    };

    // Natively where this host runs VMs for real.
    std::env::set_var(thaw_microvm::availability::BIN_ENV, &ch);
    if let Availability::Available { version, .. } = cloud_hypervisor_available() {
        eprintln!("[nested] this host runs VMs ({version}): running natively");
        return native(&jobs, &ch, &guest_init, args);
    }
    if thaw_microvm::util::find_on_path(&args.qemu).is_none() {
        println!(
            "skipped: the real Cloud Hypervisor tests ({} jobs): this host has no hardware virtualization and no {} to nest it in (apt-get install qemu-system-x86)",
            jobs.len(),
            args.qemu
        );
        return Ok(true);
    }
    nested(&workspace, &jobs, &ch, &guest_init, &thaw, args)
}

/// `thaw bench` of the shell template on the microvm tier, in a home of its own. At most 4
/// sandboxes run at once and 8 idle ones are kept: 16 running VMs crashed L1's kernel in
/// kvm_amd (`__svm_vcpu_run`, a fault in an interrupt), an emulated-SVM limit, not thaw's.
fn bench_job(workspace: &Path, thaw: &Path, iterations: usize) -> guest::Job {
    let thaw = thaw.to_string_lossy();
    let script = format!(
        "set -e; export THAW_HOME=/tmp/thaw-bench THAW_TIER=microvm; \
         '{thaw}' deploy templates/shell; \
         '{thaw}' bench --template shell --iterations {iterations} --clones 8 --max-concurrency 4"
    );
    guest::Job {
        name: "bench/shell-microvm".into(),
        cwd: workspace.to_path_buf(),
        argv: vec!["/bin/bash".into(), "-c".into(), script],
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

fn native(jobs: &[guest::Job], ch: &Path, guest_init: &Path, args: &Args) -> Result<bool> {
    let mut ok = true;
    for b in jobs {
        eprintln!("[nested] ---- {}", b.name);
        let Some((program, rest)) = b.argv.split_first() else {
            continue;
        };
        let mut child = Command::new(program)
            .args(rest)
            .current_dir(&b.cwd)
            .env("THAW_CLOUD_HYPERVISOR", ch)
            .env("THAW_GUEST_INIT", guest_init)
            .spawn()
            .with_context(|| format!("running {program}"))?;
        let deadline = Instant::now() + Duration::from_secs(args.binary_timeout_s);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        match status {
            Some(s) if s.success() => {}
            Some(s) => {
                eprintln!("[nested] {} failed: {s}", b.name);
                ok = false;
            }
            None => {
                eprintln!(
                    "[nested] {} killed after {} s",
                    b.name, args.binary_timeout_s
                );
                ok = false;
            }
        }
    }
    Ok(ok)
}

fn nested(
    workspace: &Path,
    jobs: &[guest::Job],
    ch: &Path,
    guest_init: &Path,
    thaw: &Path,
    args: &Args,
) -> Result<bool> {
    let t0 = Instant::now();
    let workdir = workspace.join(&args.workdir);
    std::fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
    let host_cache = thaw_platform::Paths::from_env().cache;
    let images = ImageCache::new(host_cache.join("images")).context("the host's image cache")?;

    eprintln!("[nested] preparing: L1 kernel, the sandboxes' guest image, template layers");
    let l1_kernel = guest::kernel(&images)?;
    build_guest_image(&images, &guest::busybox(), DEFAULT_GUEST_INIT_PATH)
        .context("building the microvm guest image on the host")?;
    let templates: Vec<PathBuf> = TEMPLATES.iter().map(|t| workspace.join(t)).collect();
    let entries = scratch::entries_of(&templates)?;
    let rootfs = host_cache.join("rootfs");
    if !entries.iter().all(|e| rootfs.join(e).is_dir()) {
        scratch::build_layers(thaw, &host_cache, &templates)?;
    }

    let env: Vec<(String, String)> = vec![
        ("THAW_CLOUD_HYPERVISOR".into(), ch.to_string_lossy().into()),
        (
            "THAW_GUEST_INIT".into(),
            guest_init.to_string_lossy().into(),
        ),
        ("THAW_CACHE".into(), guest::L1_CACHE.into()),
        (
            "THAW_IMAGE_CACHE".into(),
            format!("{}/images", guest::L1_CACHE),
        ),
        // Tests may lengthen their waits: every instruction here is emulated, twice over.
        ("THAW_NESTED".into(), "1".into()),
        // Cloud Hypervisor's own steps (loading a kernel at vm.boot, a snapshot) take many
        // times their hardware time here: thaw's VMM timeouts are at least this.
        (thaw_microvm::api::PATIENCE_ENV.into(), "300".into()),
        ("RUST_BACKTRACE".into(), "1".into()),
        // What thaw logs reaches a failed test's output (or the console, for `thaw serve`).
        ("THAW_LOG".into(), "info".into()),
    ];
    let staging = host_cache.with_file_name("thaw-nested-staging");
    let deadline = Instant::now() + Duration::from_secs(args.timeout_min * 60);
    let mut attempts: Vec<Attempt> = Vec::new();
    let mut pending: Vec<guest::Job> = jobs.to_vec();
    loop {
        let n = attempts.len() + 1;
        let suffix = if n == 1 {
            String::new()
        } else {
            format!("-{n}")
        };
        let files = AttemptFiles {
            scratch: workdir.join(format!("scratch{suffix}.img")),
            console: workdir.join(format!("console{suffix}.log")),
            channel: workdir.join(format!("channel{suffix}.log")),
        };
        // A fresh scratch disk each time: a frozen L1 leaves its disk as it stood.
        if let Err(e) = scratch::make(&files.scratch, 48, &host_cache, &entries, &staging) {
            if attempts.is_empty() {
                return Err(e.context("making L1's scratch disk"));
            }
            // The first boot's results are reported, with why the second never started.
            eprintln!("[nested] the retry could not start: {e:#}");
            break;
        }
        let plan = guest::Plan {
            jobs: &pending,
            env: &env,
            job_timeout_s: args.binary_timeout_s,
        };
        let initramfs = workdir.join("l1-initramfs.cpio.zst");
        guest::write_initramfs(&l1_kernel, &guest::busybox(), &plan, &initramfs)?;
        let left = deadline.saturating_duration_since(Instant::now());
        eprintln!(
            "[nested] prepared in {} s; booting L1 (QEMU TCG, {} MiB, {} vCPUs, {} jobs, {} min left of {})",
            t0.elapsed().as_secs(),
            args.memory_mib,
            args.cpus,
            pending.len(),
            left.as_secs() / 60,
            args.timeout_min
        );
        let qemu = run::Qemu {
            binary: args.qemu.clone(),
            kernel: l1_kernel.bz_image.clone(),
            initramfs,
            scratch: files.scratch.clone(),
            console: files.console.clone(),
            channel: files.channel.clone(),
            monitor: workdir.join("monitor.sock"),
            memory_mib: args.memory_mib,
            cpus: args.cpus,
            timeout: left,
            silence: Duration::from_secs(args.silence_s),
        };
        let outcome = qemu.run()?;
        let retry = match &outcome.frozen {
            // L1's kernel (or the emulator under it) stopped, which no test inside it can
            // cause or fix: up to MAX_RETRIES fresh L1s; one freeze more fails the run. Each job that finished
            // keeps its result; the one L1 froze in runs again from its start.
            // A full host disk pauses nothing now (werror=report), but an L1 that QEMU
            // paused for an I/O error would only pause again: no retry.
            Some(job) if n <= MAX_RETRIES && !paused_for_io(&outcome) => {
                let unfinished: Vec<guest::Job> = pending
                    .iter()
                    .filter(|j| !outcome.results.iter().any(|r| r.name == j.name))
                    .cloned()
                    .collect();
                let left = deadline.saturating_duration_since(Instant::now());
                let console_text = std::fs::read_to_string(&files.console).unwrap_or_default();
                eprintln!(
                    "[nested] L1 froze during {job}; the tail of its serial console:\n{}",
                    run::tail(&console_text, 30)
                );
                if left > MIN_RETRY {
                    eprintln!(
                        "[nested] RETRY {n} of {MAX_RETRIES}: booting a fresh L1 for the {} jobs it did not finish ({} min left)",
                        unfinished.len(),
                        left.as_secs() / 60
                    );
                    Some(unfinished)
                } else {
                    None
                }
            }
            _ => None,
        };
        attempts.push(Attempt { files, outcome });
        match retry {
            Some(next) => pending = next,
            None => break,
        }
    }
    report(args, jobs, &attempts)
}

/// Tests during which L1 froze more often than elsewhere: two of the three freezes seen
/// (2026-11-28 and -29) came while this one SIGKILLed a running VMM. Run last, a freeze in it
/// costs a retry of it alone, not of the half-hour python test after it.
const RUN_LAST: &[&str] = &["real_killed_vmm_and_killed_thaw_are_cleaned_up"];

/// Moves the jobs of [`RUN_LAST`] to the end, keeping every other job's order.
fn run_last(jobs: &mut [guest::Job]) {
    jobs.sort_by_key(|j| RUN_LAST.iter().any(|t| j.name.ends_with(t)));
}

/// QEMU paused L1 because its scratch disk could not be written (the host's disk is full).
fn paused_for_io(o: &run::Outcome) -> bool {
    o.frozen_status
        .as_deref()
        .is_some_and(|s| s.contains("io-error"))
}

/// Fresh L1s booted after a freeze, at most. Freezes have come in three of about ten runs
/// here, each in an L1 of its own, so two retries make a run failed by freezes alone rare;
/// a retry is booted only when [`MIN_RETRY`] is left.
const MAX_RETRIES: usize = 2;

/// A retry's L1 gets at least this long, or is not booted.
const MIN_RETRY: Duration = Duration::from_secs(10 * 60);

/// Where one L1 boot kept its disk and consoles.
struct AttemptFiles {
    scratch: PathBuf,
    console: PathBuf,
    channel: PathBuf,
}

/// One L1 boot and what came of it.
struct Attempt {
    files: AttemptFiles,
    outcome: run::Outcome,
}

/// A job that did not pass: why, and the boot whose disk has its output.
struct Failed<'a> {
    name: &'a str,
    why: String,
    attempt: &'a Attempt,
}

/// Prints the run's summary and, on failure, what explains it. True when every job passed.
fn report(args: &Args, jobs: &[guest::Job], attempts: &[Attempt]) -> Result<bool> {
    let Some(last) = attempts.last() else {
        bail!("L1 was never booted");
    };
    let o = &last.outcome;
    // The result of each job, from the last boot that finished it.
    let result_of = |name: &str| {
        attempts.iter().rev().find_map(|a| {
            a.outcome
                .results
                .iter()
                .find(|r| r.name == name)
                .map(|r| (a, r))
        })
    };
    let failed: Vec<Failed<'_>> = jobs
        .iter()
        .filter_map(|j| match result_of(&j.name) {
            Some((_, r)) if r.rc == 0 => None,
            Some((a, r)) => Some(Failed {
                name: &j.name,
                why: format!("exit {}", r.rc),
                attempt: a,
            }),
            None => Some(Failed {
                name: &j.name,
                why: "did not finish".into(),
                attempt: last,
            }),
        })
        .collect();
    let ok = o.done && !o.timed_out && o.frozen.is_none() && o.fatal.is_none() && failed.is_empty();
    let wall: u64 = attempts.iter().map(|a| a.outcome.wall.as_secs()).sum();
    println!("== real Cloud Hypervisor, nested under QEMU TCG (L1 wall {wall} s; speeds inside are an emulator's, not real hardware's)");
    for pair in attempts.windows(2) {
        println!(
            "== RETRIED: L1 froze during {} and a fresh L1 ran the jobs it had not finished",
            pair[0].outcome.frozen.as_deref().unwrap_or("?"),
        );
    }
    if args.bench {
        for j in jobs {
            if let Some(log) = guest::read_scratch(
                &last.files.scratch,
                &format!("{}/{}", guest::OUT_DIR, guest::log_name(&j.name)),
            ) {
                println!("== {} (every instruction emulated, twice over: compare ratios, not milliseconds)", j.name);
                println!("{log}");
            }
        }
    }
    for a in attempts {
        for s in &a.outcome.summaries {
            println!("{s}");
        }
    }
    for j in jobs {
        if let Some((_, r)) = result_of(&j.name) {
            println!("{}: exit {} in {} s", r.name, r.rc, r.secs);
        }
    }
    if !ok {
        let why = if o.timed_out {
            " (L1 timed out)".to_string()
        } else if let Some(job) = &o.frozen {
            let status = o.frozen_status.as_deref().unwrap_or("unknown");
            if paused_for_io(o) {
                format!(
                    " (L1 paused during {job}: QEMU could not write its scratch disk, {status}; {} free there now)",
                    scratch::free_space_text(&last.files.scratch)
                )
            } else {
                format!(" (L1 froze during {job}: its consoles went silent; QEMU: {status})")
            }
        } else if let Some(f) = &o.fatal {
            format!(" (L1: {f})")
        } else {
            String::new()
        };
        let names: Vec<(&str, &str)> = failed.iter().map(|f| (f.name, f.why.as_str())).collect();
        println!("== FAILED: {names:?}{why}");
        for (what, path) in [
            ("L1's serial console", &last.files.console),
            ("L1's virtio console", &last.files.channel),
        ] {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            println!("== tail of {what} ({})", path.display());
            println!("{}", run::tail(&text, 60));
        }
        for Failed { name, attempt, .. } in &failed {
            if let Some(log) = guest::read_scratch(
                &attempt.files.scratch,
                &format!("{}/{}", guest::OUT_DIR, guest::log_name(name)),
            ) {
                println!("== tail of {name}'s output");
                println!("{}", run::tail(&log, 120));
            }
            if let Some(logs) = guest::read_scratch(
                &attempt.files.scratch,
                &format!("{}/{}", guest::OUT_DIR, guest::sandbox_logs_name(name)),
            ) {
                println!("== sandbox console, VMM and init logs left by {name}");
                println!("{}", run::tail(&logs, 200));
            }
        }
    }
    Ok(ok)
}

#[cfg(test)]
mod order_tests {
    use super::*;

    fn job(name: &str) -> guest::Job {
        guest::Job {
            name: name.into(),
            cwd: PathBuf::from("/"),
            argv: Vec::new(),
        }
    }

    #[test]
    fn the_freeze_prone_test_runs_last_and_the_rest_keep_their_order() {
        let mut jobs = vec![
            job("thaw-e2e/microvm/real_hung_guest_times_out_with_its_console_tail"),
            job("thaw-e2e/microvm/real_killed_vmm_and_killed_thaw_are_cleaned_up"),
            job("thaw-e2e/microvm/real_python_warm_state_and_session_memory_survive_a_serve_restart"),
            job("thaw-e2e/microvm/real_shell_template_publishes_and_its_clones_are_isolated"),
        ];
        run_last(&mut jobs);
        let names: Vec<&str> = jobs
            .iter()
            .map(|j| j.name.rsplit('/').next().unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            [
                "real_hung_guest_times_out_with_its_console_tail",
                "real_python_warm_state_and_session_memory_survive_a_serve_restart",
                "real_shell_template_publishes_and_its_clones_are_isolated",
                "real_killed_vmm_and_killed_thaw_are_cleaned_up",
            ]
        );
    }
}
