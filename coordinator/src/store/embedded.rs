//! The embedded [`Store`] backend: one local redb file, for a single coordinator process.
//!
//! Invariants:
//! - Every change is committed with immediate durability before it is acknowledged, so a
//!   write acknowledged to the caller survives a crash. Writers are serialised by
//!   `write_lock` so that revision order, commit order and watch-history order are the same.
//! - Group commit: writers that arrive while a commit is in progress queue up, and the next
//!   one to take `write_lock` runs every queued change in one redb transaction, one revision
//!   per change as if each had committed alone, then commits (one fsync) and answers them
//!   all. A change that fails leaves no trace (its checks run before it writes anything); an
//!   I/O failure fails the whole group, none of which is then committed. Without this, every
//!   change paid its own fsync and a few thousand agents opening sessions queued behind them.
//! - The revision counter, lease table (TTL and wall-clock deadline) and lease→key index are in
//!   the file, so after a restart revisions continue and leases that expired while the process
//!   was down are reaped (their keys deleted) by the expiry task as soon as it starts.
//! - Watch history is in memory only and bounded (events and bytes): a watch from a revision
//!   older than what is kept — including any revision before the last restart — gets
//!   [`Error::Compacted`] and re-lists, exactly like an etcd client after compaction.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition,
    WriteTransaction,
};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    Compare, KeyValue, LeaseId, Listing, Op, OpResponse, Revision, Store, Txn, TxnResult, WatchEvent,
    WatchStream, validate_key,
};
use crate::error::{Error, Result};

/// key → encoded record (see [`encode_record`]).
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// Counters: [`META_REVISION`] and [`META_NEXT_LEASE`].
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
/// lease id → (ttl in ms, deadline in ms since the Unix epoch).
const LEASES: TableDefinition<i64, (i64, i64)> = TableDefinition::new("leases");
/// (lease id, key) for every key attached to a lease, so revoking one does not scan all keys.
const LEASE_KEYS: TableDefinition<(i64, &str), ()> = TableDefinition::new("lease_keys");

const META_REVISION: &str = "revision";
const META_NEXT_LEASE: &str = "next_lease";
/// Header of an encoded record: create revision, mod revision, version, lease (0 = none).
const RECORD_HEADER: usize = 32;
/// How long the expiry task waits after a failed pass before trying again.
const EXPIRY_RETRY: Duration = Duration::from_secs(1);
/// How long the expiry task sleeps when no lease exists (a grant wakes it earlier).
const EXPIRY_IDLE: Duration = Duration::from_secs(3600);

/// Tuning of the embedded backend.
#[derive(Clone, Debug)]
pub struct EmbeddedOptions {
    /// Most watch events kept in memory for watches that start in the past.
    pub history_events: usize,
    /// Most key and value bytes kept in the watch history.
    pub history_bytes: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self { history_events: 10_000, history_bytes: 64 << 20 }
    }
}

/// A [`Store`] in one local redb file.
pub struct EmbeddedStore {
    inner: Arc<Inner>,
    /// Stops the lease expiry task when the store is dropped.
    stop: CancellationToken,
    expiry: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").field("path", &self.inner.path).finish_non_exhaustive()
    }
}

struct Inner {
    db: Database,
    path: PathBuf,
    write_lock: Mutex<()>,
    /// Changes waiting for the next group commit.
    queue: Mutex<Vec<Job>>,
    history: Mutex<History>,
    /// The latest committed revision; watches wait on it.
    revisions: watch::Sender<Revision>,
    /// Wakes the expiry task when a lease may expire earlier than it planned for.
    expiry_wakeup: Arc<Notify>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path` with default options.
    pub async fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, EmbeddedOptions::default()).await
    }

    /// Opens (or creates) the store file at `path`. Must run inside a tokio runtime: it starts
    /// the lease expiry task.
    pub async fn open_with(path: &Path, options: EmbeddedOptions) -> Result<Self> {
        let path = path.to_path_buf();
        let (db, revision) = {
            let path = path.clone();
            blocking(move || open_database(&path)).await?
        };
        debug!(path = %path.display(), revision, "embedded store opened");
        let inner = Arc::new(Inner {
            db,
            path,
            write_lock: Mutex::new(()),
            queue: Mutex::default(),
            history: Mutex::new(History::new(revision, options)),
            revisions: watch::Sender::new(revision),
            expiry_wakeup: Arc::new(Notify::new()),
        });
        let stop = CancellationToken::new();
        let expiry =
            tokio::spawn(run_expiry(Arc::downgrade(&inner), Arc::clone(&inner.expiry_wakeup), stop.clone()));
        Ok(Self { inner, stop, expiry: Mutex::new(Some(expiry)) })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Forgets watch history up to `revision`: later watches from before it get
    /// [`Error::Compacted`], as after an etcd compaction.
    pub fn compact_history(&self, revision: Revision) {
        lock(&self.inner.history).compact(revision);
    }

    /// Stops the lease expiry task and closes the file once every in-flight request is done,
    /// so the same file can be opened again right away (redb allows one opener at a time).
    pub async fn close(self) {
        self.stop.cancel();
        let task = lock(&self.expiry).take();
        if let Some(task) = task
            && let Err(error) = task.await
        {
            warn!(%error, "embedded lease expiry task failed");
        }
    }

    async fn with_inner<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = Arc::clone(&self.inner);
        blocking(move || f(&inner)).await
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn open_database(path: &Path) -> Result<(Database, Revision)> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let db = Database::create(path).map_err(|err| match err {
        DatabaseError::DatabaseAlreadyOpen => Error::Store(format!(
            "embedded store file {} is already open (one process, one store per file; use etcd for replicas)",
            path.display()
        )),
        other => db_err(other),
    })?;
    let wtxn = db.begin_write().map_err(db_err)?;
    let revision = {
        // Creating every table up front lets read transactions open them unconditionally.
        wtxn.open_table(KV).map_err(db_err)?;
        wtxn.open_table(LEASES).map_err(db_err)?;
        wtxn.open_table(LEASE_KEYS).map_err(db_err)?;
        let meta = wtxn.open_table(META).map_err(db_err)?;
        meta.get(META_REVISION).map_err(db_err)?.map_or(0, |g| g.value())
    };
    wtxn.commit().map_err(db_err)?;
    Ok((db, revision))
}

/// Runs blocking redb work off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Store(format!("embedded store task failed: {e}")))?
}

fn db_err(err: impl Into<redb::Error>) -> Error {
    Error::Store(format!("embedded store: {}", err.into()))
}

fn now_ms() -> i64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn encode_record(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_HEADER + kv.value.len());
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.to_le_bytes());
    out.extend_from_slice(&kv.version.to_le_bytes());
    out.extend_from_slice(&kv.lease.map_or(0, |l| l.0).to_le_bytes());
    out.extend_from_slice(&kv.value);
    out
}

fn decode_record(key: &str, bytes: &[u8]) -> Result<KeyValue> {
    if bytes.len() < RECORD_HEADER {
        return Err(Error::Store(format!("embedded store: record of key {key:?} is truncated")));
    }
    let field = |i: usize| {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
        i64::from_le_bytes(raw)
    };
    Ok(KeyValue {
        key: key.to_owned(),
        value: Bytes::copy_from_slice(&bytes[RECORD_HEADER..]),
        create_revision: field(0),
        mod_revision: field(1),
        version: field(2),
        lease: Some(field(3)).filter(|&l| l != 0).map(LeaseId),
    })
}

/// One change queued for a group commit: runs on the group's [`Writer`] and reports whether
/// it succeeded (its output goes to its caller directly); `done` receives the revision after
/// it, or the group's failure.
struct Job {
    run: Box<dyn FnOnce(&mut Writer<'_>) -> bool + Send>,
    done: Done,
}

/// Where a group commit leaves one change's outcome: the revision after it, or the failure.
type Done = Arc<Mutex<Option<Result<Revision>>>>;

/// The tables of one write transaction and the changes it made so far.
struct Writer<'t> {
    kv: Table<'t, &'static str, &'static [u8]>,
    meta: Table<'t, &'static str, i64>,
    leases: Table<'t, i64, (i64, i64)>,
    lease_keys: Table<'t, (i64, &'static str), ()>,
    /// The revision the current change's events get if it changes any key.
    revision: Revision,
    events: Vec<WatchEvent>,
    /// True when something (a key or lease) changed and the transaction must be committed.
    dirty: bool,
    /// False when losing the change in a crash is harmless (a keep-alive): skips the fsync.
    durable: bool,
}

impl<'t> Writer<'t> {
    fn new(wtxn: &'t WriteTransaction) -> Result<Self> {
        let meta = wtxn.open_table(META).map_err(db_err)?;
        let current = meta.get(META_REVISION).map_err(db_err)?.map_or(0, |g| g.value());
        Ok(Self {
            kv: wtxn.open_table(KV).map_err(db_err)?,
            meta,
            leases: wtxn.open_table(LEASES).map_err(db_err)?,
            lease_keys: wtxn.open_table(LEASE_KEYS).map_err(db_err)?,
            revision: current + 1,
            events: Vec::new(),
            dirty: false,
            durable: true,
        })
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        match self.kv.get(key).map_err(db_err)? {
            Some(raw) => decode_record(key, raw.value()).map(Some),
            None => Ok(None),
        }
    }

    fn compare(&self, compare: &Compare) -> Result<bool> {
        let current = self.get(compare.key())?;
        Ok(match compare {
            Compare::ModRevision(_, rev) => current.map_or(0, |kv| kv.mod_revision) == *rev,
            Compare::Version(_, version) => current.map_or(0, |kv| kv.version) == *version,
            Compare::Value(_, value) => current.is_some_and(|kv| kv.value == *value),
        })
    }

    fn lease_alive(&self, lease: LeaseId, now: i64) -> Result<Option<(i64, i64)>> {
        let entry = self.leases.get(lease.0).map_err(db_err)?.map(|g| g.value());
        Ok(entry.filter(|&(_, deadline)| deadline > now))
    }

    fn put(&mut self, key: &str, value: Bytes, lease: Option<LeaseId>) -> Result<()> {
        if let Some(lease) = lease
            && self.lease_alive(lease, now_ms())?.is_none()
        {
            return Err(Error::LeaseExpired(lease.0));
        }
        let old = self.get(key)?;
        if let Some(old_lease) = old.as_ref().and_then(|kv| kv.lease) {
            self.lease_keys.remove((old_lease.0, key)).map_err(db_err)?;
        }
        let kv = KeyValue {
            key: key.to_owned(),
            value,
            create_revision: old.as_ref().map_or(self.revision, |kv| kv.create_revision),
            mod_revision: self.revision,
            version: old.as_ref().map_or(0, |kv| kv.version) + 1,
            lease,
        };
        self.kv.insert(key, encode_record(&kv).as_slice()).map_err(db_err)?;
        if let Some(lease) = lease {
            self.lease_keys.insert((lease.0, key), ()).map_err(db_err)?;
        }
        self.events.push(WatchEvent::Put(kv));
        self.dirty = true;
        Ok(())
    }

    fn delete(&mut self, key: &str) -> Result<bool> {
        let Some(old) = self.get(key)? else { return Ok(false) };
        self.kv.remove(key).map_err(db_err)?;
        if let Some(lease) = old.lease {
            self.lease_keys.remove((lease.0, key)).map_err(db_err)?;
        }
        self.events.push(WatchEvent::Delete { key: key.to_owned(), revision: self.revision });
        self.dirty = true;
        Ok(true)
    }

    /// Removes a lease and deletes its keys; false when the lease did not exist.
    fn revoke(&mut self, lease: LeaseId) -> Result<bool> {
        if self.leases.remove(lease.0).map_err(db_err)?.is_none() {
            return Ok(false);
        }
        self.dirty = true;
        let mut keys = Vec::new();
        for entry in self.lease_keys.range((lease.0, "")..).map_err(db_err)? {
            let (entry, _) = entry.map_err(db_err)?;
            let (id, key) = entry.value();
            if id != lease.0 {
                break;
            }
            keys.push(key.to_owned());
        }
        for key in keys {
            self.delete(&key)?;
        }
        Ok(true)
    }

    fn next_lease_id(&mut self) -> Result<LeaseId> {
        let next = self.meta.get(META_NEXT_LEASE).map_err(db_err)?.map_or(1, |g| g.value());
        self.meta.insert(META_NEXT_LEASE, next + 1).map_err(db_err)?;
        Ok(LeaseId(next))
    }
}

impl Inner {
    /// Runs `f` as one change (one revision if it changes a key) in the next group commit;
    /// returns `f`'s output with the store revision after the change once it is committed
    /// and its watch events are published.
    fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Writer<'_>) -> Result<T> + Send + 'static,
    ) -> Result<(T, Revision)> {
        let out: Arc<Mutex<Option<Result<T>>>> = Arc::default();
        let done: Done = Arc::default();
        let job = Job {
            run: Box::new({
                let out = Arc::clone(&out);
                move |w| {
                    let result = f(w);
                    let ok = result.is_ok();
                    *lock(&out) = Some(result);
                    ok
                }
            }),
            done: Arc::clone(&done),
        };
        lock(&self.queue).push(job);
        {
            let _serial = lock(&self.write_lock);
            // A writer that held the lock meanwhile may have committed this change already.
            if lock(&done).is_none() {
                let jobs = std::mem::take(&mut *lock(&self.queue));
                self.commit_group(jobs);
            }
        }
        let status = lock(&done).take();
        match (lock(&out).take(), status) {
            (Some(Err(e)), _) => Err(e),
            (_, Some(Err(e))) => Err(e),
            (Some(Ok(value)), Some(Ok(revision))) => Ok((value, revision)),
            _ => Err(Error::Store("embedded store: a write was not run".into())),
        }
    }

    /// Runs `jobs` in one write transaction and commits it if anything changed (durably
    /// unless every change said it need not be); answers each job. Called with `write_lock`.
    fn commit_group(&self, jobs: Vec<Job>) {
        let (runs, dones): (Vec<_>, Vec<_>) = jobs.into_iter().map(|j| (j.run, j.done)).unzip();
        let jobs = dones;
        let fail_all = |jobs: &[Done], e: &Error| {
            for done in jobs {
                *lock(done) = Some(Err(Error::Store(e.to_string())));
            }
        };
        let mut wtxn = match self.db.begin_write() {
            Ok(t) => t,
            Err(e) => return fail_all(&jobs, &db_err(e)),
        };
        let group = (|| {
            let mut writer = Writer::new(&wtxn)?;
            let mut revisions = Vec::with_capacity(jobs.len());
            let (mut dirty, mut durable) = (false, false);
            for run in runs {
                let before = writer.events.len();
                writer.dirty = false;
                writer.durable = true;
                let ok = run(&mut writer);
                let changed = writer.events.len() > before;
                if !ok && (changed || writer.dirty) {
                    // Changes are checked before they write; only an I/O error gets here.
                    return Err(Error::Store(
                        "embedded store: a change failed half-way; write group aborted".into(),
                    ));
                }
                if writer.dirty {
                    dirty = true;
                    durable |= writer.durable;
                }
                if changed {
                    revisions.push(writer.revision);
                    writer.revision += 1;
                } else {
                    revisions.push(writer.revision - 1);
                }
            }
            let last = writer.revision - 1;
            if !writer.events.is_empty() {
                writer.meta.insert(META_REVISION, last).map_err(db_err)?;
            }
            Ok((revisions, std::mem::take(&mut writer.events), last, dirty, durable))
        })();
        let (revisions, events, last, dirty, durable) = match group {
            Ok(g) => g,
            Err(e) => {
                let _ = wtxn.abort();
                return fail_all(&jobs, &e);
            }
        };
        if dirty {
            if !durable && let Err(e) = wtxn.set_durability(Durability::None) {
                let _ = wtxn.abort();
                return fail_all(&jobs, &Error::Store(format!("embedded store: {e}")));
            }
            if let Err(e) = wtxn.commit() {
                return fail_all(&jobs, &db_err(e));
            }
        } else if let Err(e) = wtxn.abort() {
            return fail_all(&jobs, &db_err(e));
        }
        if !events.is_empty() {
            lock(&self.history).append(events);
            self.revisions.send_replace(last);
        }
        for (done, revision) in jobs.iter().zip(revisions) {
            *lock(done) = Some(Ok(revision));
        }
    }

    /// Revokes every lease past its deadline; returns the earliest deadline still pending.
    fn expire_due(&self) -> Result<Option<i64>> {
        let now = now_ms();
        let (next, _) = self.write(move |w| {
            let mut due = Vec::new();
            let mut next: Option<i64> = None;
            for entry in w.leases.iter().map_err(db_err)? {
                let (id, lease) = entry.map_err(db_err)?;
                let (_, deadline) = lease.value();
                if deadline <= now {
                    due.push(LeaseId(id.value()));
                } else {
                    next = Some(next.map_or(deadline, |n| n.min(deadline)));
                }
            }
            for lease in due {
                debug!(lease = %lease, "embedded lease expired");
                w.revoke(lease)?;
            }
            Ok(next)
        })?;
        Ok(next)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave redb inconsistent (its transaction is
    // aborted), and the history is append-only, so a poisoned lock is safe to reuse.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reaps expired leases until the store is dropped.
async fn run_expiry(inner: Weak<Inner>, wakeup: Arc<Notify>, stop: CancellationToken) {
    loop {
        let Some(strong) = inner.upgrade() else { return };
        let wait = match blocking(move || strong.expire_due()).await {
            Ok(Some(deadline)) => Duration::from_millis(u64::try_from(deadline - now_ms()).unwrap_or(0)),
            Ok(None) => EXPIRY_IDLE,
            Err(error) => {
                warn!(%error, "embedded lease expiry pass failed");
                EXPIRY_RETRY
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = wakeup.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Recent watch events, oldest first, bounded in count and bytes.
struct History {
    events: VecDeque<WatchEvent>,
    bytes: usize,
    /// Every change at or below this revision is no longer in `events`.
    compacted: Revision,
    options: EmbeddedOptions,
}

impl History {
    fn new(revision: Revision, options: EmbeddedOptions) -> Self {
        Self { events: VecDeque::new(), bytes: 0, compacted: revision, options }
    }

    fn event_bytes(event: &WatchEvent) -> usize {
        match event {
            WatchEvent::Put(kv) => kv.key.len() + kv.value.len(),
            WatchEvent::Delete { key, .. } => key.len(),
        }
    }

    fn append(&mut self, events: Vec<WatchEvent>) {
        for event in events {
            self.bytes += Self::event_bytes(&event);
            self.events.push_back(event);
        }
        while self.events.len() > self.options.history_events || self.bytes > self.options.history_bytes {
            // Drop whole revisions so `compacted` is exact.
            let Some(oldest) = self.events.front().map(WatchEvent::revision) else { break };
            self.compact(oldest);
        }
    }

    fn compact(&mut self, revision: Revision) {
        while let Some(event) = self.events.front().filter(|e| e.revision() <= revision) {
            self.bytes -= Self::event_bytes(event);
            self.events.pop_front();
        }
        self.compacted = self.compacted.max(revision);
    }

    /// Every kept event after `cursor`, or the compaction point if some are gone.
    fn since(&self, cursor: Revision) -> Result<Vec<WatchEvent>, Revision> {
        if cursor < self.compacted {
            return Err(self.compacted);
        }
        let start = self.events.partition_point(|e| e.revision() <= cursor);
        Ok(self.events.range(start..).cloned().collect())
    }
}

struct WatchState {
    inner: Weak<Inner>,
    revisions: watch::Receiver<Revision>,
    prefix: String,
    /// Every event up to this revision has been delivered (or filtered out).
    cursor: Revision,
    pending: VecDeque<WatchEvent>,
    done: bool,
}

impl WatchState {
    async fn next(mut self) -> Option<(Result<WatchEvent>, Self)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some((Ok(event), self));
            }
            if self.done {
                return None;
            }
            // Mark the current revision seen before reading history, so a commit that lands
            // after the read wakes `changed()` below.
            self.revisions.borrow_and_update();
            let Some(inner) = self.inner.upgrade() else { return self.fail(closed()) };
            let since = lock(&inner.history).since(self.cursor);
            drop(inner);
            match since {
                Err(compacted) => {
                    let requested = self.cursor + 1;
                    return self.fail(Error::Compacted { requested, compacted });
                }
                Ok(events) => {
                    for event in events {
                        self.cursor = event.revision();
                        if event.key().starts_with(&self.prefix) {
                            self.pending.push_back(event);
                        }
                    }
                }
            }
            if self.pending.is_empty() && self.revisions.changed().await.is_err() {
                return self.fail(closed());
            }
        }
    }

    fn fail(mut self, err: Error) -> Option<(Result<WatchEvent>, Self)> {
        self.done = true;
        Some((Err(err), self))
    }
}

fn closed() -> Error {
    Error::StoreUnavailable("embedded store closed".into())
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        validate_key(key)?;
        let key = key.to_owned();
        self.with_inner(move |inner| {
            let rtxn = inner.db.begin_read().map_err(db_err)?;
            let kv = rtxn.open_table(KV).map_err(db_err)?;
            match kv.get(key.as_str()).map_err(db_err)? {
                Some(raw) => decode_record(&key, raw.value()).map(Some),
                None => Ok(None),
            }
        })
        .await
    }

    async fn put(&self, key: &str, value: Bytes, lease: Option<LeaseId>) -> Result<Revision> {
        validate_key(key)?;
        let key = key.to_owned();
        self.with_inner(move |inner| Ok(inner.write(move |w| w.put(&key, value, lease))?.1)).await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        validate_key(key)?;
        let key = key.to_owned();
        self.with_inner(move |inner| Ok(inner.write(move |w| w.delete(&key))?.0)).await
    }

    async fn list(&self, prefix: &str) -> Result<Listing> {
        let prefix = prefix.to_owned();
        self.with_inner(move |inner| {
            let rtxn = inner.db.begin_read().map_err(db_err)?;
            let meta = rtxn.open_table(META).map_err(db_err)?;
            let revision = meta.get(META_REVISION).map_err(db_err)?.map_or(0, |g| g.value());
            let table = rtxn.open_table(KV).map_err(db_err)?;
            let mut kvs = Vec::new();
            for entry in table.range(prefix.as_str()..).map_err(db_err)? {
                let (key, raw) = entry.map_err(db_err)?;
                let key = key.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                kvs.push(decode_record(key, raw.value())?);
            }
            Ok(Listing { kvs, revision })
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        txn.validate()?;
        self.with_inner(move |inner| {
            let ((succeeded, responses), revision) = inner.write(move |w| {
                let mut succeeded = true;
                for compare in &txn.compares {
                    succeeded &= w.compare(compare)?;
                }
                let ops = if succeeded { txn.success } else { txn.failure };
                // Every check before the first write: a failing change must leave no trace
                // (it may share its redb transaction with others, see `Inner::write`).
                let now = now_ms();
                for op in &ops {
                    if let Op::Put { lease: Some(lease), .. } = op
                        && w.lease_alive(*lease, now)?.is_none()
                    {
                        return Err(Error::LeaseExpired(lease.0));
                    }
                }
                let mut responses = Vec::with_capacity(ops.len());
                for op in ops {
                    responses.push(match op {
                        Op::Put { key, value, lease } => {
                            w.put(&key, value, lease)?;
                            OpResponse::Put
                        }
                        Op::Delete { key } => OpResponse::Delete { deleted: w.delete(&key)? },
                        Op::Get { key } => OpResponse::Get(w.get(&key)?),
                    });
                }
                Ok((succeeded, responses))
            })?;
            Ok(TxnResult { succeeded, revision, responses })
        })
        .await
    }

    async fn watch(&self, prefix: &str, from_revision: Revision) -> Result<WatchStream> {
        let state = WatchState {
            inner: Arc::downgrade(&self.inner),
            revisions: self.inner.revisions.subscribe(),
            prefix: prefix.to_owned(),
            cursor: from_revision.max(0),
            pending: VecDeque::new(),
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(state, WatchState::next)))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let ttl_ms = duration_ms(ttl).max(1);
        let (lease, _) = self
            .with_inner(move |inner| {
                inner.write(move |w| {
                    let lease = w.next_lease_id()?;
                    w.leases.insert(lease.0, (ttl_ms, now_ms() + ttl_ms)).map_err(db_err)?;
                    w.dirty = true;
                    Ok(lease)
                })
            })
            .await?;
        self.inner.expiry_wakeup.notify_one();
        Ok(lease)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let result = self
            .with_inner(move |inner| {
                inner.write(move |w| {
                    let Some((ttl_ms, _)) = w.lease_alive(lease, now_ms())? else {
                        return Err(Error::LeaseExpired(lease.0));
                    };
                    w.leases.insert(lease.0, (ttl_ms, now_ms() + ttl_ms)).map_err(db_err)?;
                    w.dirty = true;
                    // A renewal lost in a crash only makes the lease expire earlier after the
                    // restart, and its holder (this process) is gone by then anyway.
                    w.durable = false;
                    Ok(Duration::from_millis(u64::try_from(ttl_ms).unwrap_or(0)))
                })
            })
            .await;
        if matches!(result, Err(Error::LeaseExpired(_))) {
            // It may be past its deadline but not reaped yet: reap it now.
            self.inner.expiry_wakeup.notify_one();
        }
        Ok(result?.0)
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let (existed, _) = self.with_inner(move |inner| inner.write(move |w| w.revoke(lease))).await?;
        if existed { Ok(()) } else { Err(Error::LeaseExpired(lease.0)) }
    }

    async fn current_revision(&self) -> Result<Revision> {
        Ok(*self.inner.revisions.borrow())
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    /// Changes queued behind a commit in progress go into one redb transaction: each keeps
    /// its own revision and watch events, and the one that fails leaves no trace.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_commit_keeps_each_change_apart() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("state.redb")).await.unwrap();
        let dead = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        store.revoke_lease(dead).await.unwrap();
        let start = store.current_revision().await.unwrap();
        let mut watch = store.watch("", start).await.unwrap();

        // Hold the write lock, as a commit in progress does, while eight changes queue up.
        let inner = Arc::clone(&store.inner);
        let held = lock(&inner.write_lock);
        let writers: Vec<_> = (0..8u8)
            .map(|i| {
                let inner = Arc::clone(&inner);
                std::thread::spawn(move || {
                    inner.write(move |w| {
                        if i == 3 {
                            w.put("x/3", Bytes::new(), Some(dead))?;
                        }
                        w.put(&format!("a/{i}"), Bytes::from(vec![i]), None)?;
                        w.put(&format!("b/{i}"), Bytes::from(vec![i]), None)?;
                        Ok(i)
                    })
                })
            })
            .collect();
        while lock(&inner.queue).len() < 8 {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(held);
        let results: Vec<_> = writers.into_iter().map(|t| t.join().unwrap()).collect();

        let mut revisions = Vec::new();
        for (i, result) in results.into_iter().enumerate() {
            if i == 3 {
                assert!(matches!(result, Err(Error::LeaseExpired(_))), "{result:?}");
                continue;
            }
            let (out, revision) = result.unwrap();
            assert_eq!(usize::from(out), i);
            for key in [format!("a/{i}"), format!("b/{i}")] {
                assert_eq!(store.get(&key).await.unwrap().unwrap().mod_revision, revision, "{key}");
            }
            revisions.push(revision);
        }
        revisions.sort_unstable();
        assert_eq!(revisions, (start + 1..=start + 7).collect::<Vec<_>>(), "one revision per change");
        assert!(store.get("x/3").await.unwrap().is_none() && store.get("a/3").await.unwrap().is_none());
        assert_eq!(store.current_revision().await.unwrap(), start + 7);

        let mut seen = Vec::new();
        for _ in 0..14 {
            let event = watch.next().await.unwrap().unwrap();
            seen.push((event.revision(), event.key().split('/').nth(1).unwrap().to_string()));
        }
        assert!(seen.windows(2).all(|p| p[0].0 <= p[1].0), "events in revision order: {seen:?}");
        assert!(seen.chunks(2).all(|c| c[0] == c[1]), "a change's two events share its revision: {seen:?}");
    }
}
