//! Log lines on stderr, which the client redirects to `vmm.log`.

use std::time::{SystemTime, UNIX_EPOCH};

/// `log!("...", args)`: one timestamped line on stderr.
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log::line(format_args!($($arg)*))
    };
}

pub fn line(args: std::fmt::Arguments) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    eprintln!(
        "[{}.{:03}] fake-cloud-hypervisor: {args}",
        now.as_secs(),
        now.subsec_millis()
    );
}
