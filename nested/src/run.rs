//! Boots L1 under QEMU TCG, follows its console, and reads the results.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::guest::{ALIVE, BEGIN, DONE, FATAL, HEARTBEAT_S, KERN, READY, RESULT, STUCK};

/// With a heartbeat every minute, this much silence on both consoles means L1 has stopped.
pub const SILENCE: Duration = Duration::from_secs(HEARTBEAT_S * 5);

pub struct Qemu {
    pub binary: String,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub scratch: PathBuf,
    pub console: PathBuf,
    /// L1's virtio console (hvc0), where its run script and jobs print.
    pub channel: PathBuf,
    /// QEMU's human monitor, a Unix socket: how a frozen L1's vCPUs are inspected.
    pub monitor: PathBuf,
    pub memory_mib: u64,
    pub cpus: u32,
    pub timeout: Duration,
    /// Silence on both consoles for this long: L1 is taken as frozen and killed.
    pub silence: Duration,
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
    /// L1 went silent (no heartbeat) for [`Qemu::silence`] during this job: it stopped, and
    /// was killed.
    pub frozen: Option<String>,
    /// What QEMU's monitor said of L1 when it went silent (`info status`): "running" is a
    /// stopped kernel; "paused (io-error)" a host disk that filled.
    pub frozen_status: Option<String>,
    /// Jobs L1 gave up on because they could not be killed ([`STUCK`]).
    pub stuck: Vec<String>,
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
            .args(["-display", "none", "-no-reboot"])
            .args([
                "-monitor",
                &format!("unix:{},server=on,wait=off", self.monitor.display()),
            ])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initramfs)
            .args([
                "-append",
                // rcu_normal: no expedited RCU grace periods, which interrupt every other
                // CPU. L1's kernel has locked up with both vCPUs spinning at one address, as
                // when each waits on an interrupt to the other that never arrived (QEMU
                // TCG's emulated SVM), and every VM's network namespace torn down asks for
                // such grace periods.
                "console=ttyS0 panic=-1 rdinit=/init loglevel=4 mitigations=off rcupdate.rcu_normal=1",
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
                    // werror/rerror=report: a full host disk is an I/O error L1's kernel
                    // prints (a THAW-L1-KERN line), not QEMU's default of pausing L1
                    // (werror=enospc), which looks from here exactly like a frozen kernel.
                    // discard=unmap with L1's `-o discard` mount: what the tests delete
                    // is given back to the host's disk.
                    "file={},if=virtio,format=raw,cache=unsafe,discard=unmap,werror=report,rerror=report",
                    self.scratch.display()
                ),
            ])
            .args(["-device", "virtio-rng-pci"])
            .args(["-device", "virtio-serial-pci"])
            .args([
                "-chardev",
                &format!("file,id=channel,path={}", self.channel.display()),
            ])
            .args(["-device", "virtconsole,chardev=channel"])
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
        let _ = std::fs::remove_file(&self.monitor);
        for f in [&self.console, &self.channel] {
            let _ = std::fs::remove_file(f);
            std::fs::write(f, b"").with_context(|| format!("creating {}", f.display()))?;
        }
        let start = Instant::now();
        let mut child = self.command().spawn().with_context(|| {
            format!("starting {} (apt-get install qemu-system-x86)", self.binary)
        })?;
        // Both: the serial port has the kernel's messages and anything printed before the
        // virtio console is up, the virtio console everything after.
        let mut followers = [Follower::new(&self.console)?, Follower::new(&self.channel)?];
        const CHANNEL: usize = 1;
        let mut outcome = Outcome {
            results: Vec::new(),
            done: false,
            fatal: None,
            timed_out: false,
            frozen: None,
            frozen_status: None,
            stuck: Vec::new(),
            wall: Duration::ZERO,
            summaries: Vec::new(),
        };
        let mut current = String::from("L1");
        // Only the virtio console, where L1's user space prints (its heartbeat among it),
        // counts as L1 being alive: a kernel whose CPUs are locked up goes on printing its
        // soft-lockup reports on the serial port, minute after minute, while nothing else
        // runs (seen: both vCPUs spinning at one address, user space stopped, for as long as
        // the host let it).
        let mut heard = Instant::now();
        loop {
            for (i, follower) in followers.iter_mut().enumerate() {
                for line in follower.new_lines()? {
                    if i == CHANNEL {
                        heard = Instant::now();
                    } else if line.contains("soft lockup") || line.contains("hard LOCKUP") {
                        eprintln!("[nested] L1's kernel: {}", line.trim_end());
                    }
                    observe(&line, &mut current, &mut outcome);
                }
            }
            if heard.elapsed() > self.silence {
                outcome.frozen = Some(current.clone());
                let status = self
                    .ask_monitor("info status")
                    .map(|s| {
                        s.lines()
                            .find_map(|l| l.trim().strip_prefix("VM status: "))
                            .unwrap_or("unknown")
                            .to_string()
                    })
                    .unwrap_or_else(|e| format!("unknown ({e:#})"));
                eprintln!(
                    "[nested] L1's user space silent for {} s during {current} (no heartbeat); QEMU says L1 is {status}; {} free on the scratch disk's file system; its vCPUs:",
                    heard.elapsed().as_secs(),
                    crate::scratch::free_space_text(&self.scratch),
                );
                outcome.frozen_status = Some(status);
                for sample in 0..2 {
                    if sample > 0 {
                        std::thread::sleep(Duration::from_secs(5));
                    }
                    match self.ask_monitor("info registers -a") {
                        Ok(regs) => {
                            for l in regs.lines().filter(|l| {
                                l.starts_with("CPU#")
                                    || l.starts_with("RAX")
                                    || l.starts_with("RIP")
                                    || l.starts_with("RSI")
                                    || l.starts_with("CR0")
                            }) {
                                eprintln!("[nested]   {}", l.trim_end());
                            }
                        }
                        Err(e) => eprintln!("[nested]   (QEMU's monitor: {e:#})"),
                    }
                }
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            if let Some(status) = child.try_wait().context("waiting for QEMU")? {
                for follower in &mut followers {
                    for line in follower.new_lines()? {
                        observe(&line, &mut current, &mut outcome);
                    }
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

impl Qemu {
    /// One command to QEMU's human monitor, and what it printed within a few seconds.
    fn ask_monitor(&self, command: &str) -> Result<String> {
        use std::io::{Read, Write};
        let mut sock = std::os::unix::net::UnixStream::connect(&self.monitor)
            .with_context(|| format!("connecting to {}", self.monitor.display()))?;
        sock.set_read_timeout(Some(Duration::from_secs(3)))?;
        sock.write_all(format!("{command}\n").as_bytes())?;
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        let until = Instant::now() + Duration::from_secs(6);
        while Instant::now() < until {
            match sock.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    break
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(String::from_utf8_lossy(&out).replace('\r', ""))
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
    } else if line.starts_with(ALIVE) || line.starts_with(KERN) {
        eprintln!("[nested] {line}");
    } else if let Some(rest) = line.strip_prefix(STUCK) {
        eprintln!("[nested] {line}");
        if let Some((name, _)) = rest.trim_start().split_once(": ") {
            out.stuck.push(name.to_string());
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
