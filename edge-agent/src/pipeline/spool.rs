//! The spool: a durable, bounded on-disk queue of summaries waiting for the coordinator.
//!
//! Layout of the directory: one file per summary, `<seq, 20 digits>.summary` (the encoded
//! `pb::Summary`), and `state.json` with the last assigned sequence number, the drop count
//! not yet reported, and the floor below which entries are dropped. Every file is written as
//! `*.tmp`, fsynced, renamed into place, and the directory fsynced, so each file is either
//! old or new after a crash (even SIGKILL or power loss); leftover `*.tmp` files are removed
//! at open.
//!
//! `push` writes the entry first and the state second, so a crash between the two leaves an
//! entry newer than the state's counter, which `open` adopts: a sequence number is never
//! handed out twice, and never skipped. When the spool is full, the oldest entries are
//! dropped after the state recording the drop (its floor) is durable, and the count travels in
//! the new summary's `spool_dropped`; a crash in between neither resurrects nor recounts them.
//! Acknowledged entries are simply deleted: one that survives a crash is sent again, and the
//! coordinator deduplicates by sequence number.

use std::{
    collections::BTreeSet,
    fs::{self, File},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::Mutex,
};

use llmchain_proto::pb;
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::warn;

use super::{Error, Result};

const STATE: &str = "state.json";
const ENTRY_SUFFIX: &str = ".summary";
const TMP_SUFFIX: &str = ".tmp";

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct State {
    /// Last sequence number handed out (0: none yet).
    last_seq: u64,
    /// Entries dropped since the last summary pushed, reported in the next one.
    carry_dropped: u64,
    /// Entries below this sequence number are dropped (their files may linger after a crash).
    floor: u64,
    /// Entries dropped since the spool was created.
    dropped_total: u64,
}

struct Inner {
    state: State,
    entries: BTreeSet<u64>,
}

/// A durable, bounded queue of summaries; every method is blocking (file I/O with fsync).
pub struct Spool {
    dir: PathBuf,
    max_entries: usize,
    inner: Mutex<Inner>,
    pushed: watch::Sender<u64>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("dir", &self.dir).field("max_entries", &self.max_entries).finish()
    }
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error + use<> {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

fn entry_name(seq: u64) -> String {
    format!("{seq:020}{ENTRY_SUFFIX}")
}

/// Writes `name` in `dir` atomically and durably: tmp file, fsync, rename, fsync directory.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn remove(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl Spool {
    /// Opens (creating it if needed) the spool in `dir`, holding at most `max_entries`
    /// summaries (at least 1), and recovers from whatever a crash left behind.
    pub fn open(dir: impl Into<PathBuf>, max_entries: usize) -> Result<Spool> {
        let dir = dir.into();
        let max_entries = max_entries.max(1);
        fs::create_dir_all(&dir).map_err(io_error("cannot create spool directory", &dir))?;
        let mut entries = BTreeSet::new();
        for item in fs::read_dir(&dir).map_err(io_error("cannot list spool directory", &dir))? {
            let item = item.map_err(io_error("cannot list spool directory", &dir))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(TMP_SUFFIX) {
                // An interrupted write; the file it was replacing is intact.
                remove(&item.path()).map_err(io_error("cannot remove", &item.path()))?;
            } else if let Some(seq) = name.strip_suffix(ENTRY_SUFFIX).and_then(|s| s.parse::<u64>().ok()) {
                entries.insert(seq);
            }
        }
        let state_path = dir.join(STATE);
        let mut state = match fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice::<State>(&bytes)
                .map_err(|e| Error::Corrupt { path: state_path.clone(), reason: e.to_string() })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(io_error("cannot read", &state_path)(e)),
        };
        let before = state;
        let spool = Spool {
            dir,
            max_entries,
            inner: Mutex::new(Inner { state, entries: BTreeSet::new() }),
            pushed: watch::channel(0).0,
        };
        // Entries the state already counts as dropped, left by a crash before their removal.
        let (below, mut entries): (BTreeSet<u64>, BTreeSet<u64>) =
            entries.into_iter().partition(|&s| s < state.floor);
        let newest = entries.last().copied().unwrap_or(0);
        let victims: Vec<u64> =
            entries.iter().copied().take(entries.len().saturating_sub(max_entries)).collect();
        if newest > state.last_seq {
            // A crash after an entry was written and before the state was: adopt it. It
            // already reports the carried drops, and those of its own push still on disk.
            state.last_seq = newest;
            state.carry_dropped = 0;
        } else {
            // The bound shrank since the last run: the excess is reported next time.
            state.carry_dropped += victims.len() as u64;
        }
        if let Some(&v) = victims.last() {
            state.floor = v + 1;
            state.dropped_total += victims.len() as u64;
        }
        for v in &victims {
            entries.remove(v);
        }
        if state != before {
            spool.write_state(&state)?;
        }
        // Only now that the floor is durable may what fell below it go.
        spool.remove_entries(&below.into_iter().chain(victims).collect::<Vec<_>>())?;
        {
            let mut inner = spool.lock();
            inner.state = state;
            inner.entries = entries;
        }
        spool.pushed.send_replace(state.last_seq);
        Ok(spool)
    }

    fn write_state(&self, state: &State) -> Result<()> {
        let bytes = serde_json::to_vec(state).expect("the state always serialises");
        write_atomic(&self.dir, STATE, &bytes).map_err(io_error("cannot write", &self.dir.join(STATE)))
    }

    fn remove_entries(&self, seqs: &[u64]) -> Result<()> {
        for &seq in seqs {
            let path = self.dir.join(entry_name(seq));
            remove(&path).map_err(io_error("cannot remove", &path))?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the on-disk state consistent by design.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `summary` durably under the next sequence number, which it returns (and writes
    /// into the summary). When full, the oldest entries are dropped and counted in this
    /// summary's `spool_dropped`.
    pub fn push(&self, mut summary: pb::Summary) -> Result<u64> {
        let mut inner = self.lock();
        let excess = (inner.entries.len() + 1).saturating_sub(self.max_entries);
        let victims: Vec<u64> = inner.entries.iter().copied().take(excess).collect();
        let seq = inner.state.last_seq + 1;
        summary.seq = seq;
        summary.spool_dropped = inner.state.carry_dropped + victims.len() as u64;
        let name = entry_name(seq);
        write_atomic(&self.dir, &name, &summary.encode_to_vec())
            .map_err(io_error("cannot write", &self.dir.join(&name)))?;
        let state = State {
            last_seq: seq,
            carry_dropped: 0,
            floor: victims.last().map_or(inner.state.floor, |v| v + 1),
            dropped_total: inner.state.dropped_total + victims.len() as u64,
        };
        if let Err(e) = self.write_state(&state) {
            // Undo, so the number is handed out again rather than skipped.
            let _ = remove(&self.dir.join(&name));
            return Err(e);
        }
        inner.state = state;
        inner.entries.insert(seq);
        for v in &victims {
            inner.entries.remove(v);
        }
        if !victims.is_empty() {
            warn!(dropped = victims.len(), first = victims[0], "summary spool full; oldest dropped");
        }
        // The floor is durable: a failed removal only leaves a file `open` removes later.
        if let Err(e) = self.remove_entries(&victims) {
            warn!(error = %e, "cannot remove dropped summaries");
        }
        drop(inner);
        self.pushed.send_replace(seq);
        Ok(seq)
    }

    /// Up to `limit` unacknowledged summaries, oldest first. An entry that cannot be read is
    /// dropped (logged, and counted in the next summary) rather than blocking the queue.
    pub fn pending(&self, limit: usize) -> Result<Vec<pb::Summary>> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        let mut unreadable = Vec::new();
        for &seq in inner.entries.iter() {
            if out.len() >= limit {
                break;
            }
            let path = self.dir.join(entry_name(seq));
            let decoded = fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| pb::Summary::decode(b.as_slice()).map_err(|e| e.to_string()));
            match decoded {
                Ok(s) if s.seq == seq => out.push(s),
                Ok(s) => {
                    warn!(path = %path.display(), seq = s.seq, "spool entry holds another sequence number; dropped");
                    unreadable.push(seq);
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "unreadable spool entry; dropped");
                    unreadable.push(seq);
                }
            }
        }
        if !unreadable.is_empty() {
            let mut state = inner.state;
            state.carry_dropped += unreadable.len() as u64;
            state.dropped_total += unreadable.len() as u64;
            self.write_state(&state)?;
            inner.state = state;
            for seq in &unreadable {
                inner.entries.remove(seq);
                let _ = remove(&self.dir.join(entry_name(*seq)));
            }
        }
        Ok(out)
    }

    /// Deletes the acknowledged summaries; unknown numbers are ignored. Returns how many were
    /// deleted.
    pub fn ack(&self, seqs: &[u64]) -> Result<usize> {
        let mut inner = self.lock();
        let mut n = 0;
        for &seq in seqs {
            if inner.entries.remove(&seq) {
                let path = self.dir.join(entry_name(seq));
                remove(&path).map_err(io_error("cannot remove", &path))?;
                n += 1;
            }
        }
        if n > 0 {
            // Not needed for safety (a resurrected entry is deduplicated upstream), but keeps
            // resends after a crash rare.
            sync_dir(&self.dir).map_err(io_error("cannot sync", &self.dir))?;
        }
        Ok(n)
    }

    /// Summaries waiting for acknowledgement.
    pub fn depth(&self) -> usize {
        self.lock().entries.len()
    }

    /// The last sequence number handed out (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.lock().state.last_seq
    }

    /// Summaries dropped because the spool was full (or unreadable), since it was created.
    pub fn dropped_total(&self) -> u64 {
        self.lock().state.dropped_total
    }

    /// Watches the last sequence number pushed: the session wakes on a change to report.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.pushed.subscribe()
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(records: u64) -> pb::Summary {
        pb::Summary { agent_id: "a".into(), records, ..Default::default() }
    }

    #[test]
    fn adopts_an_entry_written_before_a_crash_and_keeps_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), 2).unwrap();
            spool.push(summary(1)).unwrap();
            spool.push(summary(2)).unwrap();
        }
        // Crash after writing entry 3 (which dropped entry 1) but before the state.
        let mut s3 = summary(3);
        s3.seq = 3;
        s3.spool_dropped = 1;
        fs::write(dir.path().join(entry_name(3)), s3.encode_to_vec()).unwrap();
        let spool = Spool::open(dir.path(), 2).unwrap();
        assert_eq!(spool.last_seq(), 3);
        assert_eq!(spool.pending(10).unwrap().iter().map(|s| s.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(spool.dropped_total(), 1);
        // The drop was already reported in entry 3: not again.
        assert_eq!(spool.push(summary(4)).unwrap(), 4);
        assert_eq!(spool.pending(10).unwrap().last().unwrap().spool_dropped, 1, "only entry 2's drop");
        drop(spool);

        // Crash after the state moved the floor but before the victim was removed.
        let mut s2 = summary(2);
        s2.seq = 2;
        fs::write(dir.path().join(entry_name(2)), s2.encode_to_vec()).unwrap();
        let spool = Spool::open(dir.path(), 2).unwrap();
        assert_eq!(spool.pending(10).unwrap().iter().map(|s| s.seq).collect::<Vec<_>>(), vec![3, 4]);
        assert!(!dir.path().join(entry_name(2)).exists());
        assert_eq!(spool.push(summary(5)).unwrap(), 5);
        assert_eq!(spool.pending(10).unwrap().last().unwrap().spool_dropped, 1);
    }

    #[test]
    fn an_unreadable_entry_is_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 10).unwrap();
        spool.push(summary(1)).unwrap();
        spool.push(summary(2)).unwrap();
        fs::write(dir.path().join(entry_name(1)), b"\xff\xff\xff").unwrap();
        assert_eq!(spool.pending(10).unwrap().iter().map(|s| s.seq).collect::<Vec<_>>(), vec![2]);
        assert_eq!(spool.depth(), 1);
        spool.push(summary(3)).unwrap();
        assert_eq!(spool.pending(10).unwrap().last().unwrap().spool_dropped, 1);
    }
}
