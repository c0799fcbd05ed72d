//! `thaw serve` as a child process on a loopback port, and the `thaw` CLI pointed at it
//! (`THAW_SERVER`): the CLI-over-HTTP path, and servers killed and restarted mid-test.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Home;

pub struct Server {
    pub child: Child,
    pub url: String,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Starts `thaw serve` on `127.0.0.1:port` for `home` and waits until it listens.
pub fn start_server(home: &Home, port: u16) -> Server {
    let mut child = home
        .cmd()
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn thaw serve");
    let url = format!("http://127.0.0.1:{port}");
    // Generous: under nested emulation (`make test-microvm`) opening the engine takes tens
    // of seconds; a server that listens returns at once.
    let started = Instant::now();
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("thaw serve exited ({status}) before listening; its log is above");
        }
        if started.elapsed() > Duration::from_secs(180) {
            let _ = child.kill();
            panic!("thaw serve did not listen within 180 s; its log is above");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("thaw serve listening after {:?}", started.elapsed());
    Server { child, url }
}

impl Server {
    /// SIGKILL: what a crash or an OOM kill of the server looks like.
    pub fn kill9(self) {
        // Drop does it.
    }
}

/// A test that panics must not leave its server running: it would hold the test's output
/// open (and its port and home) after the test binary ends.
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The CLI of one API key against one server.
pub struct Cli<'a> {
    pub home: &'a Home,
    pub url: String,
    pub key: String,
}

impl Cli<'_> {
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.home.cmd();
        c.env("THAW_SERVER", &self.url)
            .env("THAW_API_KEY", &self.key)
            .args(args)
            .stdin(Stdio::null());
        c
    }

    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().expect("run thaw");
        assert!(
            out.status.success(),
            "thaw {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).expect("json output")
    }

    pub fn state(&self, id: &str) -> String {
        self.json(&["session", "show", id])["state"]
            .as_str()
            .unwrap_or("?")
            .to_string()
    }
}
