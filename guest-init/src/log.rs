//! Tiny stderr logger. In a container the host captures guest-init's stderr; in a VM it goes
//! to the console. A full tracing stack would cost binary size and startup time in every
//! sandbox for no benefit, so this is a prefix and a debug switch (`THAW_INIT_LOG=debug`).

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};

static DEBUG: AtomicBool = AtomicBool::new(false);

/// Reads `THAW_INIT_LOG` once at startup.
pub fn init() {
    let debug = std::env::var("THAW_INIT_LOG")
        .map(|v| v.eq_ignore_ascii_case("debug"))
        .unwrap_or(false);
    DEBUG.store(debug, Ordering::Relaxed);
}

pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Writes one line; errors are ignored on purpose (`eprintln!` would panic if stderr is a
/// broken pipe, and PID 1 must never die because nobody reads its log).
pub fn write(level: &str, args: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "guest-init: {level}{args}");
}

#[macro_export]
macro_rules! info {
    ($($t:tt)*) => { $crate::log::write("", format_args!($($t)*)) };
}

#[macro_export]
macro_rules! warn {
    ($($t:tt)*) => { $crate::log::write("warning: ", format_args!($($t)*)) };
}

#[macro_export]
macro_rules! debug {
    ($($t:tt)*) => {
        if $crate::log::debug_enabled() {
            $crate::log::write("debug: ", format_args!($($t)*))
        }
    };
}
