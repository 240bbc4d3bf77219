//! Summary ingestion with group commit.
//!
//! Every summary changes its version's aggregate, so when each report ran its own
//! compare-and-swap transaction, thousands of agents raced on a few aggregate keys and each
//! winner paid a fsync: at 2,000 agents most reports timed out. Here one writer task takes
//! every report queued meanwhile and stores them in as few transactions as the backend allows
//! (etcd: 128 ops), each one durable before any of its reports is acknowledged, so nothing
//! acknowledged is lost in a crash.
//!
//! Invariants kept: a summary is stored once per (agent, seq) — each transaction puts a summary
//! only if its key is absent — and the aggregate and traffic counters change in the same
//! transaction as the summaries they count, compared against the revision they were read at,
//! so another writer (a second replica) makes the transaction fail and the writer re-reads.

use std::collections::{BTreeMap, HashMap, HashSet};

use llmchain_proto::{ApiError, model::Summary, pb};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::{
    add_summary,
    records::{AggregateRecord, TrafficRecord, aggregate_key, summary_key, traffic_key},
};
use crate::{
    Error, Result,
    store::{Compare, Op, OpResponse, Revision, Store, Txn},
};

/// Attempts of one batch's transaction before its reports are refused as contended.
const ATTEMPTS: usize = 16;
/// Reports waiting for the writer before reporters wait to queue.
const QUEUE: usize = 4096;
/// Most summary bytes in one transaction (etcd refuses requests over 1.5 MiB by default).
const MAX_TXN_BYTES: usize = 1 << 20;

/// One queued report: its summaries (distinct seqs) and where to answer.
struct Job {
    summaries: Vec<Summary>,
    reply: oneshot::Sender<Result<Vec<bool>>>,
}

/// The queue to the writer task.
pub(super) struct Ingest {
    tx: mpsc::Sender<Job>,
}

impl Ingest {
    /// Starts the writer task on `store`; it ends when the [`Ingest`] is dropped.
    pub(super) fn start(store: std::sync::Arc<dyn Store>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, rx));
        Ingest { tx }
    }

    /// Stores each summary unless already stored; returns per summary whether it was new,
    /// once every new one is durable.
    pub(super) async fn store(&self, summaries: Vec<Summary>) -> Result<Vec<bool>> {
        let (reply, answer) = oneshot::channel();
        let closed = || Error::from(ApiError::Unavailable("summary writer stopped; retry".into()));
        self.tx.send(Job { summaries, reply }).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

/// Counters as last read or written, with the revision to compare against.
#[derive(Default)]
struct Counters {
    aggregates: HashMap<String, (AggregateRecord, Revision)>,
    traffic: HashMap<String, (TrafficRecord, Revision)>,
}

/// A summary ready to store.
struct Item {
    key: String,
    agg_key: String,
    traffic_key: String,
    bytes: Vec<u8>,
    summary: Summary,
}

async fn run(store: std::sync::Arc<dyn Store>, mut rx: mpsc::Receiver<Job>) {
    let mut counters = Counters::default();
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while let Ok(job) = rx.try_recv() {
            jobs.push(job);
        }
        let items: Vec<Item> = jobs
            .iter()
            .flat_map(|j| &j.summaries)
            .map(|s| {
                let bytes = pb::Summary::from(s.clone()).encode_to_vec();
                Item {
                    key: summary_key(&s.agent_id, s.seq),
                    agg_key: aggregate_key(&s.model),
                    traffic_key: traffic_key(&s.agent_id),
                    bytes,
                    summary: s.clone(),
                }
            })
            .collect();
        let outcome = store_items(store.as_ref(), &mut counters, &items).await;
        let mut offset = 0;
        for job in jobs {
            let n = job.summaries.len();
            let answer = match &outcome {
                Ok(stored) => Ok(stored[offset..offset + n].to_vec()),
                Err(e) => Err(copy_error(e)),
            };
            offset += n;
            let _ = job.reply.send(answer);
        }
    }
}

/// The same error for each waiter of a failed batch.
fn copy_error(e: &Error) -> Error {
    match e {
        Error::StoreUnavailable(m) => Error::StoreUnavailable(m.clone()),
        Error::Api(a) => Error::Api(a.clone()),
        other => Error::Store(other.to_string()),
    }
}

/// Stores `items` in as few transactions as the store takes; per item whether it was new.
async fn store_items(store: &dyn Store, counters: &mut Counters, items: &[Item]) -> Result<Vec<bool>> {
    let max_ops = store.max_txn_ops().max(4);
    let mut stored = vec![false; items.len()];
    let mut seen = HashSet::new();
    let mut start = 0;
    while start < items.len() {
        // A chunk: its summaries, aggregates and agents fit in one transaction's ops.
        let (mut keys, mut aggs, mut agents, mut bytes) = (0, HashSet::new(), HashSet::new(), 0);
        let mut end = start;
        while end < items.len() {
            let it = &items[end];
            let ops = keys
                + 1
                + aggs.len()
                + usize::from(!aggs.contains(it.agg_key.as_str()))
                + agents.len()
                + usize::from(!agents.contains(it.traffic_key.as_str()));
            if end > start && (ops > max_ops || bytes + it.bytes.len() > MAX_TXN_BYTES) {
                break;
            }
            keys += 1;
            bytes += it.bytes.len();
            aggs.insert(it.agg_key.as_str());
            agents.insert(it.traffic_key.as_str());
            end += 1;
        }
        // The same summary twice in a batch (a retried report racing its first try) is a
        // duplicate of the first.
        let chunk: Vec<usize> = (start..end).filter(|&i| seen.insert(items[i].key.as_str())).collect();
        for i in store_chunk(store, counters, items, chunk).await? {
            stored[i] = true;
        }
        start = end;
    }
    Ok(stored)
}

/// Stores the items `chunk` of `items` in one transaction (retried on conflicts); returns the
/// ones that were new.
async fn store_chunk(
    store: &dyn Store,
    counters: &mut Counters,
    items: &[Item],
    mut chunk: Vec<usize>,
) -> Result<Vec<usize>> {
    load_missing(store, counters, items, &chunk).await?;
    for _ in 0..ATTEMPTS {
        if chunk.is_empty() {
            return Ok(chunk);
        }
        let mut aggs: BTreeMap<&str, (AggregateRecord, Revision)> = BTreeMap::new();
        let mut traffic: BTreeMap<&str, (TrafficRecord, Revision)> = BTreeMap::new();
        for &i in &chunk {
            let it = &items[i];
            let agg = aggs
                .entry(it.agg_key.as_str())
                .or_insert_with(|| counters.aggregates.get(&it.agg_key).cloned().unwrap_or_default());
            let size = it.bytes.len() as u64;
            add_summary(&mut agg.0, &it.summary, size);
            let t = traffic
                .entry(it.traffic_key.as_str())
                .or_insert_with(|| counters.traffic.get(&it.traffic_key).copied().unwrap_or_default());
            t.0.summaries += 1;
            t.0.raw_bytes += it.summary.raw_bytes;
            t.0.summary_bytes += size;
        }
        let compares = chunk
            .iter()
            .map(|&i| Compare::absent(items[i].key.clone()))
            .chain(aggs.iter().map(|(k, (_, rev))| Compare::ModRevision((*k).to_string(), *rev)))
            .chain(traffic.iter().map(|(k, (_, rev))| Compare::ModRevision((*k).to_string(), *rev)));
        let puts = chunk
            .iter()
            .map(|&i| Op::put(items[i].key.clone(), items[i].bytes.clone()))
            .chain(aggs.iter().map(|(k, (a, _))| Op::put(*k, a.encode())))
            .chain(traffic.iter().map(|(k, (t, _))| Op::put(*k, t.encode())));
        let gets = chunk
            .iter()
            .map(|&i| Op::get(items[i].key.clone()))
            .chain(aggs.keys().map(|k| Op::get(*k)))
            .chain(traffic.keys().map(|k| Op::get(*k)));
        let result = store.txn(Txn::new().when(compares).and_then(puts).or_else(gets)).await?;
        if result.succeeded {
            for (k, (a, _)) in aggs {
                counters.aggregates.insert(k.to_string(), (a, result.revision));
            }
            for (k, (t, _)) in traffic {
                counters.traffic.insert(k.to_string(), (t, result.revision));
            }
            debug!(summaries = chunk.len(), revision = result.revision, "summaries stored");
            return Ok(chunk);
        }
        // Learn which summaries exist already and the counters' current values, then retry
        // with the new ones only.
        let mut responses = result.responses.into_iter().map(|r| match r {
            OpResponse::Get(kv) => Ok(kv),
            other => Err(Error::Store(format!("unexpected transaction response {other:?}"))),
        });
        let mut fresh = Vec::with_capacity(chunk.len());
        for &i in &chunk {
            if responses.next().transpose()?.flatten().is_none() {
                fresh.push(i);
            }
        }
        for k in aggs.keys() {
            let value = match responses.next().transpose()?.flatten() {
                Some(kv) => (AggregateRecord::decode(k, &kv.value)?, kv.mod_revision),
                None => Default::default(),
            };
            counters.aggregates.insert((*k).to_string(), value);
        }
        for k in traffic.keys() {
            let value = match responses.next().transpose()?.flatten() {
                Some(kv) => (TrafficRecord::decode(k, &kv.value)?, kv.mod_revision),
                None => Default::default(),
            };
            counters.traffic.insert((*k).to_string(), value);
        }
        chunk = fresh;
    }
    warn!(summaries = chunk.len(), "summaries lost every compare-and-swap race");
    Err(ApiError::Unavailable("summary counters are contended; retry the report".into()).into())
}

/// Reads the counters of `chunk` not in `counters` yet, in one read-only transaction.
async fn load_missing(
    store: &dyn Store,
    counters: &mut Counters,
    items: &[Item],
    chunk: &[usize],
) -> Result<()> {
    let mut aggs: Vec<&str> = Vec::new();
    let mut agents: Vec<&str> = Vec::new();
    let mut wanted = HashSet::new();
    for &i in chunk {
        let it = &items[i];
        if !counters.aggregates.contains_key(&it.agg_key) && wanted.insert(it.agg_key.as_str()) {
            aggs.push(&it.agg_key);
        }
        if !counters.traffic.contains_key(&it.traffic_key) && wanted.insert(it.traffic_key.as_str()) {
            agents.push(&it.traffic_key);
        }
    }
    if aggs.is_empty() && agents.is_empty() {
        return Ok(());
    }
    let gets = aggs.iter().chain(&agents).map(|k| Op::get(*k));
    let result = store.txn(Txn::new().and_then(gets)).await?;
    let mut responses = result.responses.into_iter();
    for k in aggs {
        let value = match responses.next() {
            Some(OpResponse::Get(Some(kv))) => (AggregateRecord::decode(k, &kv.value)?, kv.mod_revision),
            _ => Default::default(),
        };
        counters.aggregates.insert(k.to_string(), value);
    }
    for k in agents {
        let value = match responses.next() {
            Some(OpResponse::Get(Some(kv))) => (TrafficRecord::decode(k, &kv.value)?, kv.mod_revision),
            _ => Default::default(),
        };
        counters.traffic.insert(k.to_string(), value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        sync::Arc,
        time::{Duration, SystemTime},
    };

    use llmchain_proto::model::{AgentId, CONFIDENCE_BUCKETS, ModelName, ModelRef};

    use super::*;
    use crate::{fleet::version_aggregate, store::embedded::EmbeddedStore};

    fn model() -> ModelRef {
        ModelRef { model: ModelName::parse("model", "smol").unwrap(), version: 1 }
    }

    fn summary(agent: &str, seq: u64) -> Summary {
        let now = SystemTime::now();
        Summary {
            agent_id: AgentId::parse("agent_id", agent).unwrap(),
            seq,
            window_start: now - Duration::from_secs(60),
            window_end: now,
            model: model(),
            label_counts: vec![("normal".into(), 3)],
            confidence_histogram: vec![0; CONFIDENCE_BUCKETS],
            latency_ms: [1.0, 2.0, 3.0],
            records: 3,
            raw_bytes: 100,
            bad_records: 0,
            hard_examples: Vec::new(),
            spool_dropped: 0,
        }
    }

    /// Reports that arrive together share transactions (a report larger than one transaction
    /// spans several), and each summary still counts once, a retry racing its first try too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reports_count_each_summary_once() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).await.unwrap());
        let ingest = Arc::new(Ingest::start(Arc::clone(&store)));
        let mut reports = Vec::new();
        for agent in 0..20 {
            for seq in 1..=5 {
                for _try in 0..2 {
                    let ingest = Arc::clone(&ingest);
                    let s = summary(&format!("edge-{agent}"), seq);
                    reports.push(tokio::spawn(async move { ingest.store(vec![s]).await }));
                }
            }
        }
        let bulk: Vec<Summary> = (1..=1100).map(|seq| summary("edge-bulk", seq)).collect();
        let bulk = {
            let ingest = Arc::clone(&ingest);
            tokio::spawn(async move { ingest.store(bulk).await })
        };
        let mut new = 0;
        for report in reports {
            let stored = report.await.unwrap().unwrap();
            assert_eq!(stored.len(), 1);
            new += usize::from(stored[0]);
        }
        assert_eq!(new, 100, "each of 20 agents × 5 summaries stored once");
        assert!(bulk.await.unwrap().unwrap().iter().all(|&s| s));

        let aggregate = version_aggregate(store.as_ref(), &model()).await.unwrap().unwrap();
        assert_eq!((aggregate.summaries, aggregate.records), (1200, 3600));
        assert_eq!(aggregate.decisions.get("normal"), Some(&3600));
        let traffic =
            store.get(&traffic_key(&AgentId::parse("a", "edge-7").unwrap())).await.unwrap().unwrap();
        let traffic = TrafficRecord::decode(&traffic.key, &traffic.value).unwrap();
        assert_eq!((traffic.summaries, traffic.raw_bytes), (5, 500));
        assert_eq!(
            store.list("fleet/summaries/edge-bulk/").await.unwrap().kvs.len(),
            1100,
            "every summary of the large report stored"
        );

        // A later retry of a stored summary is a duplicate; the new one beside it is stored.
        let stored = ingest.store(vec![summary("edge-0", 1), summary("edge-0", 6)]).await.unwrap();
        assert_eq!(stored, [false, true]);
        let aggregate = version_aggregate(store.as_ref(), &model()).await.unwrap().unwrap();
        assert_eq!(aggregate.summaries, 1201);
    }
}
