//! Progress reporting for long operations (publish). The CLI renders it as a progress bar;
//! the HTTP API and tests ignore it.

pub trait Progress: Send + Sync {
    /// A new phase began (e.g. "building base rootfs").
    fn step(&self, msg: &str);
    /// A line of detail within the phase (e.g. debootstrap output).
    fn detail(&self, _line: &str) {}
}

/// Discards progress.
pub struct Quiet;

impl Progress for Quiet {
    fn step(&self, _msg: &str) {}
}
