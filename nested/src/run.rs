//! Boots L1 under QEMU TCG, follows its console, and reads the results.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::guest::{BEGIN, DONE, FATAL, READY, RESULT};

pub struct Qemu {
    pub binary: String,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub scratch: PathBuf,
    pub console: PathBuf,
    pub memory_mib: u64,
    pub cpus: u32,
    pub timeout: Duration,
}

/// One test binary's outcome, from its [`RESULT`] line.
#[derive(Debug, Clone)]
pub struct BinaryResult {
    pub name: String,
    pub rc: i32,
    pub secs: u64,
}

/// What the run produced.
pub struct Outcome {
    pub results: Vec<BinaryResult>,
    /// L1 printed [`DONE`]: every binary ran to its end.
    pub done: bool,
    /// Why L1 stopped early, if it said ([`FATAL`]).
    pub fatal: Option<String>,
    pub timed_out: bool,
    pub wall: Duration,
    /// Every `test result:` line, prefixed by its binary.
    pub summaries: Vec<String>,
}

impl Qemu {
    fn command(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.args(["-accel", "tcg,thread=multi", "-cpu", "max"])
            .args(["-m", &self.memory_mib.to_string()])
            .args(["-smp", &self.cpus.to_string()])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initramfs)
            .args([
                "-append",
                "console=ttyS0 panic=-1 rdinit=/init loglevel=4 mitigations=off",
            ])
            .args(["-serial", &format!("file:{}", self.console.display())])
            // The host's root, read-only: L1 sees every path the binaries were built with.
            // multidevs=remap: the export spans several host file systems (/proc and /sys both
            // have inode 1); without it 9p hands L1 one inode for both, and a mount on one
            // lands on the other.
            .args([
                "-virtfs",
                "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap,id=hostroot",
            ])
            .args([
                "-drive",
                &format!(
                    "file={},if=virtio,format=raw,cache=unsafe,discard=unmap",
                    self.scratch.display()
                ),
            ])
            .args(["-device", "virtio-rng-pci"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // L1 dies with this harness (killed by CI's timeout, or by hand): an orphaned QEMU
        // would spin two emulated CPUs for as long as its guest runs.
        // SAFETY: prctl with constant arguments is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut c, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        c
    }

    /// Runs L1 to its end or its timeout, echoing progress lines of its console as they come.
    pub fn run(&self) -> Result<Outcome> {
        let _ = std::fs::remove_file(&self.console);
        std::fs::write(&self.console, b"").context("creating the console log")?;
        let start = Instant::now();
        let mut child = self.command().spawn().with_context(|| {
            format!("starting {} (apt-get install qemu-system-x86)", self.binary)
        })?;
        let mut follower = Follower::new(&self.console)?;
        let mut outcome = Outcome {
            results: Vec::new(),
            done: false,
            fatal: None,
            timed_out: false,
            wall: Duration::ZERO,
            summaries: Vec::new(),
        };
        let mut current = String::from("L1");
        loop {
            for line in follower.new_lines()? {
                observe(&line, &mut current, &mut outcome);
            }
            if let Some(status) = child.try_wait().context("waiting for QEMU")? {
                for line in follower.new_lines()? {
                    observe(&line, &mut current, &mut outcome);
                }
                if !status.success() && !outcome.done {
                    let err = read_pipe(&mut child);
                    eprintln!("[nested] QEMU exited with {status}: {}", err.trim());
                }
                break;
            }
            if start.elapsed() > self.timeout {
                outcome.timed_out = true;
                eprintln!(
                    "[nested] L1 still running after {} s: killed (hard timeout)",
                    self.timeout.as_secs()
                );
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        outcome.wall = start.elapsed();
        Ok(outcome)
    }
}

fn read_pipe(child: &mut Child) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// Echoes what matters of one console line and records results.
fn observe(line: &str, current: &mut String, out: &mut Outcome) {
    let line = line.trim_end_matches(['\r', '\n']);
    if let Some(rest) = line.strip_prefix(READY) {
        eprintln!("[nested] L1 up:{rest}");
    } else if let Some(name) = line.strip_prefix(BEGIN) {
        *current = name.trim().to_string();
        eprintln!("[nested] ---- {current}");
    } else if let Some(rest) = line.strip_prefix(RESULT) {
        if let Some(r) = parse_result(rest) {
            eprintln!("[nested] {} exited {} after {} s", r.name, r.rc, r.secs);
            out.results.push(r);
        }
    } else if line.starts_with(DONE) {
        out.done = true;
    } else if let Some(rest) = line.strip_prefix(FATAL) {
        let why = rest.trim_start_matches(':').trim().to_string();
        eprintln!("[nested] L1 failed: {why}");
        out.fatal = Some(why);
    } else if line.starts_with("test result:") {
        eprintln!("[nested] {current}: {line}");
        out.summaries.push(format!("{current}: {line}"));
    } else if line.starts_with("test ")
        || line.starts_with("running ")
        || line.contains("panicked at")
    {
        eprintln!("[nested]   {line}");
    }
}

/// Parses `<name> rc=<n> secs=<s>`.
pub fn parse_result(rest: &str) -> Option<BinaryResult> {
    let mut parts = rest.split_whitespace();
    let name = parts.next()?.to_string();
    let mut rc = None;
    let mut secs = 0;
    for p in parts {
        if let Some(v) = p.strip_prefix("rc=") {
            rc = v.parse().ok();
        } else if let Some(v) = p.strip_prefix("secs=") {
            secs = v.parse().unwrap_or(0);
        }
    }
    Some(BinaryResult {
        name,
        rc: rc?,
        secs,
    })
}

/// Reads a growing file line by line.
struct Follower {
    reader: BufReader<std::fs::File>,
    partial: String,
}

impl Follower {
    fn new(path: &Path) -> Result<Follower> {
        let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Follower {
            reader: BufReader::new(f),
            partial: String::new(),
        })
    }

    fn new_lines(&mut self) -> Result<Vec<String>> {
        let mut lines = Vec::new();
        loop {
            let mut buf = Vec::new();
            let n = self
                .reader
                .read_until(b'\n', &mut buf)
                .context("reading the console log")?;
            if n == 0 {
                break;
            }
            self.partial.push_str(&String::from_utf8_lossy(&buf));
            if self.partial.ends_with('\n') {
                lines.push(std::mem::take(&mut self.partial));
            }
        }
        // At EOF: keep reading from here next time (the file grows).
        let pos = self
            .reader
            .stream_position()
            .context("console log position")?;
        self.reader
            .seek(SeekFrom::Start(pos))
            .context("console log seek")?;
        Ok(lines)
    }
}

/// The last `n` lines of a text.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_parse() {
        let r = parse_result(" thaw-e2e/microvm rc=101 secs=42").unwrap();
        assert_eq!(
            (r.name.as_str(), r.rc, r.secs),
            ("thaw-e2e/microvm", 101, 42)
        );
        assert!(parse_result(" x secs=1").is_none(), "no rc: not a result");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
