//! The etcd [`Store`] backend, for several coordinator replicas on Kubernetes.
//!
//! Invariants:
//! - Every key lives under one namespace prefix (e.g. `/llmchain/`) so several deployments can
//!   share a cluster; the prefix is added on the way in and stripped on the way out, callers
//!   never see it. Revisions are etcd's own, shared by the whole cluster.
//! - Watches start at `from_revision + 1` and report etcd's compaction as
//!   [`Error::Compacted`]; callers re-list.
//! - Transport failures and "no leader" map to [`Error::StoreUnavailable`] (retryable);
//!   "lease not found" maps to [`Error::LeaseExpired`].

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, KvClient, PutOptions, TxnOp, TxnOpResponse, WatchClient,
    WatchOptions,
};
use futures::StreamExt;
use tonic::Code;
use tracing::debug;

use super::{
    Compare, KeyValue, LeaseId, Listing, Op, OpResponse, Revision, Store, Txn, TxnResult, WatchEvent,
    WatchStream, validate_key,
};
use crate::error::{Error, Result};

/// The namespace used when a spec names none.
pub const DEFAULT_PREFIX: &str = "/llmchain/";

/// How long connecting to the cluster may take before `connect` gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 keep-alive, so a dead connection (and the watches on it) is noticed.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response accepted (tonic's default is 4 MiB): a listing of a big prefix arrives in
/// one message. Requests stay bounded by etcd's own `--max-request-bytes` (1.5 MiB by default),
/// which is why large payloads belong in the blob store, not here.
const MAX_RESPONSE_BYTES: usize = 256 << 20;
/// etcd's default `--max-txn-ops`: more ops in one transaction are refused.
const ETCD_MAX_TXN_OPS: usize = 128;

/// A [`Store`] on an etcd cluster, every key under a namespace prefix.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` and checks that it answers.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self> {
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true);
        let client = Client::connect(endpoints, Some(options)).await.map_err(etcd_err)?;
        let store = Self { client, prefix: prefix.to_owned() };
        // Fail at start-up rather than on the first request when the cluster is unreachable.
        let revision = store.current_revision().await?;
        debug!(?endpoints, prefix, revision, "connected to etcd");
        Ok(store)
    }

    /// The namespace prefix every key is stored under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn kv(&self) -> KvClient {
        self.client.kv_client().max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    fn watcher(&self) -> WatchClient {
        self.client.watch_client().max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn to_key_value(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue> {
        Ok(KeyValue {
            key: self.strip(kv.key())?,
            value: Bytes::copy_from_slice(kv.value()),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            version: kv.version(),
            lease: Some(kv.lease()).filter(|&l| l != 0).map(LeaseId),
        })
    }

    fn strip(&self, raw: &[u8]) -> Result<String> {
        let key =
            std::str::from_utf8(raw).map_err(|_| Error::Store("etcd returned a non-utf-8 key".into()))?;
        key.strip_prefix(self.prefix.as_str()).map(str::to_owned).ok_or_else(|| {
            Error::Store(format!("etcd returned key {key:?} outside prefix {:?}", self.prefix))
        })
    }

    fn txn_op(&self, op: Op) -> TxnOp {
        match op {
            Op::Put { key, value, lease } => TxnOp::put(
                self.full_key(&key),
                value.to_vec(),
                lease.map(|l| PutOptions::new().with_lease(l.0)),
            ),
            Op::Delete { key } => TxnOp::delete(self.full_key(&key), None),
            Op::Get { key } => TxnOp::get(self.full_key(&key), None),
        }
    }

    fn compare(&self, compare: Compare) -> etcd_client::Compare {
        use etcd_client::CompareOp::Equal;
        match compare {
            Compare::ModRevision(key, rev) => {
                etcd_client::Compare::mod_revision(self.full_key(&key), Equal, rev)
            }
            Compare::Version(key, version) => {
                etcd_client::Compare::version(self.full_key(&key), Equal, version)
            }
            Compare::Value(key, value) => {
                etcd_client::Compare::value(self.full_key(&key), Equal, value.to_vec())
            }
        }
    }
}

/// A watch in flight: etcd sends events in batches; they are handed out one by one, and the
/// stream ends right after the first error (etcd keeps a canceled watch's stream open, so
/// waiting for it to end would hang).
struct EtcdWatch {
    store: EtcdStore,
    stream: etcd_client::WatchStream,
    requested: Revision,
    pending: VecDeque<Result<WatchEvent>>,
    done: bool,
}

impl EtcdWatch {
    async fn next(mut self) -> Option<(Result<WatchEvent>, Self)> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                if item.is_err() {
                    self.done = true;
                    self.pending.clear();
                }
                return Some((item, self));
            }
            if self.done {
                return None;
            }
            match self.stream.next().await {
                None => self
                    .pending
                    .push_back(Err(Error::StoreUnavailable("etcd closed the watch stream".into()))),
                Some(Err(err)) => self.pending.push_back(Err(etcd_err(err))),
                Some(Ok(resp)) => self.absorb(&resp),
            }
        }
    }

    fn absorb(&mut self, resp: &etcd_client::WatchResponse) {
        if resp.compact_revision() > 0 {
            let compacted = resp.compact_revision();
            self.pending.push_back(Err(Error::Compacted { requested: self.requested, compacted }));
            return;
        }
        if resp.canceled() {
            let reason = format!("etcd canceled the watch: {}", resp.cancel_reason());
            self.pending.push_back(Err(Error::Store(reason)));
            return;
        }
        for event in resp.events() {
            let converted = match (event.kv(), event.event_type()) {
                (None, _) => Err(Error::Store("etcd watch event without kv".into())),
                (Some(kv), EventType::Put) => self.store.to_key_value(kv).map(WatchEvent::Put),
                (Some(kv), EventType::Delete) => self
                    .store
                    .strip(kv.key())
                    .map(|key| WatchEvent::Delete { key, revision: kv.mod_revision() }),
            };
            self.pending.push_back(converted);
        }
    }
}

/// Maps a client error: transport trouble and a cluster without leader are retryable.
fn etcd_err(err: etcd_client::Error) -> Error {
    use etcd_client::Error as E;
    match err {
        E::GRpcStatus(status) => match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
                if !status.message().contains("lease not found") =>
            {
                Error::StoreUnavailable(format!("etcd: {}", status.message()))
            }
            code => Error::Store(format!("etcd: {code:?}: {}", status.message())),
        },
        E::TransportError(e) => Error::StoreUnavailable(format!("etcd transport: {e}")),
        E::IoError(e) => Error::StoreUnavailable(format!("etcd i/o: {e}")),
        other => Error::Store(format!("etcd: {other}")),
    }
}

/// Like [`etcd_err`], but "lease not found" becomes [`Error::LeaseExpired`].
fn lease_err(lease: i64) -> impl Fn(etcd_client::Error) -> Error {
    move |err| {
        let not_found = match &err {
            etcd_client::Error::GRpcStatus(status) => status.message().contains("lease not found"),
            etcd_client::Error::LeaseKeepAliveError(msg) => msg.contains("lease not found"),
            _ => false,
        };
        if not_found { Error::LeaseExpired(lease) } else { etcd_err(err) }
    }
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<Revision> {
    header.map(|h| h.revision()).ok_or_else(|| Error::Store("etcd response without header".into()))
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        validate_key(key)?;
        let resp = self.kv().get(self.full_key(key), None).await.map_err(etcd_err)?;
        resp.kvs().first().map(|kv| self.to_key_value(kv)).transpose()
    }

    async fn put(&self, key: &str, value: Bytes, lease: Option<LeaseId>) -> Result<Revision> {
        validate_key(key)?;
        let options = lease.map(|l| PutOptions::new().with_lease(l.0));
        let resp = self
            .client
            .kv_client()
            .put(self.full_key(key), value.to_vec(), options)
            .await
            .map_err(lease_err(lease.map_or(0, |l| l.0)))?;
        header_revision(resp.header())
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        validate_key(key)?;
        let resp = self.kv().delete(self.full_key(key), None).await.map_err(etcd_err)?;
        Ok(resp.deleted() > 0)
    }

    async fn list(&self, prefix: &str) -> Result<Listing> {
        let options = GetOptions::new().with_prefix();
        let resp = self.kv().get(self.full_key(prefix), Some(options)).await.map_err(etcd_err)?;
        // etcd returns a range sorted by key already.
        let kvs = resp.kvs().iter().map(|kv| self.to_key_value(kv)).collect::<Result<_>>()?;
        Ok(Listing { kvs, revision: header_revision(resp.header())? })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        txn.validate()?;
        let lease = txn
            .success
            .iter()
            .chain(&txn.failure)
            .find_map(|op| match op {
                Op::Put { lease: Some(l), .. } => Some(l.0),
                _ => None,
            })
            .unwrap_or(0);
        let request = etcd_client::Txn::new()
            .when(txn.compares.into_iter().map(|c| self.compare(c)).collect::<Vec<_>>())
            .and_then(txn.success.into_iter().map(|op| self.txn_op(op)).collect::<Vec<_>>())
            .or_else(txn.failure.into_iter().map(|op| self.txn_op(op)).collect::<Vec<_>>());
        let resp = self.kv().txn(request).await.map_err(lease_err(lease))?;
        let responses = resp
            .op_responses()
            .into_iter()
            .map(|r| {
                Ok(match r {
                    TxnOpResponse::Put(_) => OpResponse::Put,
                    TxnOpResponse::Delete(d) => OpResponse::Delete { deleted: d.deleted() > 0 },
                    TxnOpResponse::Get(g) => {
                        OpResponse::Get(g.kvs().first().map(|kv| self.to_key_value(kv)).transpose()?)
                    }
                    TxnOpResponse::Txn(_) => return Err(Error::Store("etcd returned a nested txn".into())),
                })
            })
            .collect::<Result<_>>()?;
        Ok(TxnResult { succeeded: resp.succeeded(), revision: header_revision(resp.header())?, responses })
    }

    async fn watch(&self, prefix: &str, from_revision: Revision) -> Result<WatchStream> {
        let options = WatchOptions::new().with_prefix().with_start_revision(from_revision.max(0) + 1);
        let stream = self.watcher().watch(self.full_key(prefix), Some(options)).await.map_err(etcd_err)?;
        let state = EtcdWatch {
            store: self.clone(),
            stream,
            requested: from_revision.max(0) + 1,
            pending: VecDeque::new(),
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(state, EtcdWatch::next)))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        // etcd counts whole seconds; round up so a lease never lives shorter than asked.
        let secs = i64::try_from(ttl.as_millis().div_ceil(1000)).unwrap_or(i64::MAX).max(1);
        let resp = self.client.lease_client().grant(secs, None).await.map_err(etcd_err)?;
        if !resp.error().is_empty() {
            return Err(Error::Store(format!("etcd lease grant: {}", resp.error())));
        }
        Ok(LeaseId(resp.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let (mut keeper, mut responses) =
            self.client.lease_client().keep_alive(lease.0).await.map_err(lease_err(lease.0))?;
        // The client consumed the first answer to check the lease exists; ask once more to
        // learn the TTL the server now counts down from.
        keeper.keep_alive().await.map_err(lease_err(lease.0))?;
        let resp = responses
            .message()
            .await
            .map_err(lease_err(lease.0))?
            .ok_or_else(|| Error::StoreUnavailable("etcd closed the keep-alive stream".into()))?;
        if resp.ttl() <= 0 {
            return Err(Error::LeaseExpired(lease.0));
        }
        Ok(Duration::from_secs(u64::try_from(resp.ttl()).unwrap_or(0)))
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.client.lease_client().revoke(lease.0).await.map_err(lease_err(lease.0))?;
        Ok(())
    }

    fn max_txn_ops(&self) -> usize {
        ETCD_MAX_TXN_OPS
    }

    async fn current_revision(&self) -> Result<Revision> {
        let options = GetOptions::new().with_count_only();
        let resp = self.kv().get(self.prefix.clone(), Some(options)).await.map_err(etcd_err)?;
        header_revision(resp.header())
    }
}
