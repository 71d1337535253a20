//! Pluggable reporting of pull progress and user notices.
//! The library never prints on its own: the CLI plugs in a terminal bar, the node a logger, tests nothing.

use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Receives progress of byte transfers and notices the user must see.
///
/// Every method has a do-nothing default so an implementation picks what it cares about.
pub trait Progress: Send + Sync {
    /// A transfer of `total` bytes (when known) begins.
    fn start(&self, _label: &str, _total: Option<u64>) {}
    /// `bytes` more were written.
    fn advance(&self, _bytes: u64) {}
    /// The current transfer ended, successfully or not.
    fn finish(&self) {}
    /// A message the user has to read, such as licence terms or a corrupt file being replaced.
    fn notice(&self, _text: &str) {}
    /// Whether helper processes (pip) may draw their own output on the terminal.
    fn interactive(&self) -> bool {
        false
    }
}

/// Reports nothing: for tests and callers that only want the result.
#[derive(Debug, Default, Clone, Copy)]
pub struct Quiet;

impl Progress for Quiet {}

/// Reports through `tracing`, for the node where nobody watches a terminal.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogProgress;

impl Progress for LogProgress {
    fn start(&self, label: &str, total: Option<u64>) {
        tracing::info!(label, total, "model transfer started");
    }
    fn notice(&self, text: &str) {
        tracing::warn!("{text}");
    }
}

/// An indicatif byte bar on stderr; hidden when stderr is not a terminal, notices still printed.
#[derive(Debug, Default)]
pub struct TerminalProgress {
    bar: Mutex<Option<ProgressBar>>,
}

impl TerminalProgress {
    pub fn new() -> Self {
        Self::default()
    }

    fn current(&self) -> Option<ProgressBar> {
        // A poisoned lock only means another thread panicked mid-update; the bar is still usable.
        match self.bar.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, bar: Option<ProgressBar>) -> Option<ProgressBar> {
        match self.bar.lock() {
            Ok(mut guard) => std::mem::replace(&mut *guard, bar),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), bar),
        }
    }
}

impl Progress for TerminalProgress {
    fn start(&self, label: &str, total: Option<u64>) {
        let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
        let template = if total.is_some() {
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
        } else {
            "{msg} {bytes} {bytes_per_sec}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(label.to_owned());
        if let Some(old) = self.replace(Some(bar)) {
            old.finish_and_clear();
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(bar) = self.current() {
            bar.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.replace(None) {
            bar.finish_and_clear();
        }
    }

    fn notice(&self, text: &str) {
        match self.current() {
            Some(bar) if !bar.is_hidden() => bar.suspend(|| eprintln!("{text}")),
            _ => eprintln!("{text}"),
        }
    }

    fn interactive(&self) -> bool {
        std::io::stderr().is_terminal()
    }
}
