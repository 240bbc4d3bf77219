//! Download progress: a `watch` value the session reports in heartbeats, and its display
//! (an indicatif bar on a terminal, otherwise a log line every few seconds or tenth).

use std::{
    io::IsTerminal,
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressStyle};
use llmchain_proto::model::ModelRef;
use tokio::{sync::watch, task::JoinHandle};
use tracing::info;

/// How far the download of a version has come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The version being fetched.
    pub target: ModelRef,
    /// Bytes of its missing blobs in place so far (resumed part files included).
    pub done_bytes: u64,
    /// Bytes of its missing blobs in all (0 when nothing was missing).
    pub total_bytes: u64,
}

impl Progress {
    /// Whether every missing byte is in place.
    pub fn is_done(&self) -> bool {
        self.done_bytes >= self.total_bytes
    }
}

/// Log at most this often when not on a terminal...
const LOG_EVERY: Duration = Duration::from_secs(5);
/// ...or when this fraction more is done.
const LOG_STEP: f64 = 0.1;

/// Shows progress until the sender is dropped: a bar when stderr is a terminal, otherwise an
/// info line every 5 s or 10%.
pub fn spawn_progress_display(rx: watch::Receiver<Option<Progress>>) -> JoinHandle<()> {
    if std::io::stderr().is_terminal() { tokio::spawn(show_bar(rx)) } else { tokio::spawn(show_log(rx)) }
}

async fn show_bar(mut rx: watch::Receiver<Option<Progress>>) {
    let style =
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    let mut bar: Option<(ModelRef, ProgressBar)> = None;
    while rx.changed().await.is_ok() {
        let Some(p) = rx.borrow_and_update().clone() else { continue };
        if bar.as_ref().is_none_or(|(t, _)| *t != p.target) {
            if let Some((_, old)) = bar.take() {
                old.abandon();
            }
            let b =
                ProgressBar::new(p.total_bytes).with_style(style.clone()).with_message(p.target.to_string());
            bar = Some((p.target.clone(), b));
        }
        if let Some((_, b)) = &bar {
            b.set_length(p.total_bytes);
            b.set_position(p.done_bytes);
            if p.is_done() {
                b.finish();
            }
        }
    }
}

async fn show_log(mut rx: watch::Receiver<Option<Progress>>) {
    let mut last: Option<(ModelRef, Instant, f64)> = None;
    while rx.changed().await.is_ok() {
        let Some(p) = rx.borrow_and_update().clone() else { continue };
        let fraction = if p.total_bytes == 0 { 1.0 } else { p.done_bytes as f64 / p.total_bytes as f64 };
        let due = match &last {
            Some((t, at, f)) if *t == p.target => {
                (p.is_done() && *f < 1.0) || at.elapsed() >= LOG_EVERY || fraction - f >= LOG_STEP
            }
            _ => true,
        };
        if due {
            info!(
                target_version = %p.target,
                done_bytes = p.done_bytes,
                total_bytes = p.total_bytes,
                percent = format_args!("{:.0}", fraction * 100.0),
                "model download"
            );
            last = Some((p.target, Instant::now(), fraction));
        }
    }
}
