//! indicatif rendering of publish progress (stderr, so stdout stays scriptable).

use indicatif::{ProgressBar, ProgressStyle};
use std::time::Duration;
use thaw_platform::progress::Progress;

pub struct Spinner {
    bar: ProgressBar,
}

impl Spinner {
    pub fn new(enabled: bool) -> Spinner {
        let bar = if enabled {
            ProgressBar::new_spinner()
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix}: {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        Spinner { bar }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Progress for Spinner {
    fn step(&self, msg: &str) {
        self.bar.set_prefix(msg.to_string());
        self.bar.set_message("");
        if self.bar.is_hidden() {
            return;
        }
        self.bar.println(format!("  - {msg}"));
    }

    fn detail(&self, line: &str) {
        let line: String = line.chars().take(120).collect();
        self.bar.set_message(line);
    }
}
