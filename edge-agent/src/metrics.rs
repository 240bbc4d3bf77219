//! The agent's Prometheus metrics on `/metrics` (with `--metrics-listen`; names and labels in
//! `docs/metrics.md`).
//!
//! The agent already counts what it does in plain atomics that its heartbeats report too
//! ([`Stats`](crate::pipeline::Stats), [`SyncMetrics`](crate::sync::SyncMetrics), the spool,
//! the session's reconnects). Rather than count everything twice, a collector reads one
//! [`AgentSnapshot`] of them per scrape ([`Observe`]), so `/metrics` and the heartbeats never
//! disagree. Only the decision latency histogram is its own metric: the pipeline observes
//! each decision's latency in it ([`LatencyHistogram`], kept in the pipeline's stats).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use llmchain_proto::model::ModelRef;
use llmchain_task::Label;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        MetricType,
        counter::ConstCounter,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio_util::sync::CancellationToken;

use crate::{
    pipeline::StatsSnapshot,
    sync::{MetricsSnapshot, Progress},
};

/// Decision latency from a record's arrival to its decision, in a Prometheus histogram
/// (buckets from 1 ms to about 33 s, doubling).
#[derive(Debug, Clone)]
pub struct LatencyHistogram(Histogram);

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram(Histogram::new(exponential_buckets(0.001, 2.0, 16)))
    }
}

impl LatencyHistogram {
    /// Records one decision's latency.
    pub fn observe(&self, latency: Duration) {
        self.0.observe(latency.as_secs_f64());
    }

    /// The histogram, shared (for a registry).
    pub fn histogram(&self) -> Histogram {
        self.0.clone()
    }
}

/// Everything the agent's metrics report, read at one moment.
#[derive(Debug, Clone, Default)]
pub struct AgentSnapshot {
    /// The pipeline's counters.
    pub stats: StatsSnapshot,
    /// Summaries waiting in the spool.
    pub spool_depth: u64,
    /// Sessions to the coordinator that failed or closed and were reopened.
    pub reconnects: u64,
    /// The syncer's counters.
    pub sync: MetricsSnapshot,
    /// The current (or last) download.
    pub download: Option<Progress>,
    /// The version serving decisions.
    pub running: Option<ModelRef>,
}

/// A source of [`AgentSnapshot`]s: the running agent.
pub trait Observe: Send + Sync + 'static {
    /// The values now.
    fn observe(&self) -> AgentSnapshot;
}

/// Encodes a fresh snapshot on every scrape.
struct AgentCollector(Arc<dyn Observe>);

impl std::fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentCollector")
    }
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> std::fmt::Result {
    ConstCounter::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> std::fmt::Result {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for AgentCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = self.0.observe();
        let st = &s.stats;
        counter(
            &mut e,
            "llmchain_agent_records",
            "Records received from the sources (good and bad)",
            st.records,
        )?;
        counter(&mut e, "llmchain_agent_raw_bytes", "Bytes of the records received", st.raw_bytes)?;
        counter(
            &mut e,
            "llmchain_agent_bad_records",
            "Records that failed to parse and were skipped",
            st.bad_records,
        )?;
        {
            let mut family = e.encode_descriptor(
                "llmchain_agent_decisions",
                "Decisions made, by label",
                None,
                MetricType::Counter,
            )?;
            for (label, count) in Label::ALL.iter().zip(st.decisions) {
                let labels = [("label", label.as_str())];
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }
        counter(
            &mut e,
            "llmchain_agent_decide_errors",
            "Records the model failed on (neither decided nor bad)",
            st.decide_errors,
        )?;
        counter(
            &mut e,
            "llmchain_agent_executor_failures",
            "Executor actions that failed or timed out",
            st.executor_failures,
        )?;
        counter(&mut e, "llmchain_agent_summaries", "Summary windows closed into the spool", st.summaries)?;
        gauge(
            &mut e,
            "llmchain_agent_spool_depth",
            "Summaries waiting in the spool for the coordinator",
            int(s.spool_depth),
        )?;
        counter(
            &mut e,
            "llmchain_agent_reconnects",
            "Sessions to the coordinator reopened after a failure or close",
            s.reconnects,
        )?;
        counter(
            &mut e,
            "llmchain_agent_download_bytes",
            "Blob bytes received from FetchBlob",
            s.sync.received_bytes,
        )?;
        counter(
            &mut e,
            "llmchain_agent_blobs_fetched",
            "Blobs downloaded, verified and moved into the cache",
            s.sync.blobs_fetched,
        )?;
        counter(
            &mut e,
            "llmchain_agent_blob_cache_hits",
            "Blobs of fetched versions already in the cache",
            s.sync.cache_hits,
        )?;
        counter(
            &mut e,
            "llmchain_agent_blob_cache_misses",
            "Blobs of fetched versions the cache lacked",
            s.sync.cache_misses,
        )?;
        counter(
            &mut e,
            "llmchain_agent_download_resumes",
            "Blob downloads resumed past offset 0",
            s.sync.resumes,
        )?;
        counter(
            &mut e,
            "llmchain_agent_download_retries",
            "Download attempts retried after a transient failure",
            s.sync.retries,
        )?;
        counter(
            &mut e,
            "llmchain_agent_download_corrupt_blobs",
            "Blob transfers refused because the bytes did not match the manifest",
            s.sync.corrupt_blobs,
        )?;
        let (done, total) = s.download.as_ref().map_or((0, 0), |p| (p.done_bytes, p.total_bytes));
        gauge(
            &mut e,
            "llmchain_agent_download_done_bytes",
            "Bytes of the current (or last) download in place",
            int(done),
        )?;
        gauge(
            &mut e,
            "llmchain_agent_download_total_bytes",
            "Bytes of the current (or last) download in all",
            int(total),
        )?;
        {
            let mut family = e.encode_descriptor(
                "llmchain_agent_model_version",
                "Version number of the model serving decisions, by model (absent before the first)",
                None,
                MetricType::Gauge,
            )?;
            if let Some(running) = &s.running {
                let labels = [("model", running.model.to_string())];
                ConstGauge::new(int(running.version)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// A registry with every agent metric: the snapshot collector over `source` and `latency`.
pub fn registry(source: Arc<dyn Observe>, latency: &LatencyHistogram) -> Registry {
    let mut registry = Registry::default();
    registry.register(
        "llmchain_agent_decision_latency_seconds",
        "Seconds from a record's arrival to its decision",
        latency.histogram(),
    );
    registry.register_collector(Box::new(AgentCollector(source)));
    registry
}

/// Binds `addr`, prints `metrics listening on ADDR` (tests and scripts read it) and serves
/// `/metrics` and `/healthz` on a task until `shutdown` fires.
pub async fn spawn(
    addr: SocketAddr,
    registry: Registry,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = llmchain_runtime::metrics::bind(addr).await?;
    println!("metrics listening on {}", listener.local_addr()?);
    let router = llmchain_runtime::metrics::router(Arc::new(registry));
    Ok(tokio::spawn(async move {
        if let Err(e) = llmchain_runtime::metrics::serve(listener, router, shutdown).await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use llmchain_proto::model::ModelName;

    use super::*;

    struct Fixed(AgentSnapshot);

    impl Observe for Fixed {
        fn observe(&self) -> AgentSnapshot {
            self.0.clone()
        }
    }

    #[test]
    fn a_snapshot_encodes_as_prometheus_text() {
        let mut snapshot = AgentSnapshot::default();
        snapshot.stats.records = 12;
        snapshot.stats.bad_records = 2;
        snapshot.stats.decisions[Label::Shutdown.index()] = 4;
        snapshot.spool_depth = 3;
        snapshot.reconnects = 1;
        snapshot.sync.cache_hits = 5;
        snapshot.running = Some(ModelRef { model: ModelName::parse("m", "tiny").unwrap(), version: 7 });
        let latency = LatencyHistogram::default();
        latency.observe(Duration::from_millis(3));
        latency.observe(Duration::from_millis(40));
        let text = llmchain_runtime::metrics::encode(&registry(Arc::new(Fixed(snapshot)), &latency)).unwrap();
        for line in [
            "llmchain_agent_records_total 12",
            "llmchain_agent_bad_records_total 2",
            "llmchain_agent_decisions_total{label=\"shutdown\"} 4",
            "llmchain_agent_decisions_total{label=\"normal\"} 0",
            "llmchain_agent_spool_depth 3",
            "llmchain_agent_reconnects_total 1",
            "llmchain_agent_blob_cache_hits_total 5",
            "llmchain_agent_model_version{model=\"tiny\"} 7",
            "llmchain_agent_decision_latency_seconds_count 2",
            "llmchain_agent_decision_latency_seconds_bucket{le=\"0.004\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
