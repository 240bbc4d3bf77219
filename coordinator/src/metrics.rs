//! The coordinator's Prometheus metrics (names, labels and meaning in `docs/metrics.md`).
//!
//! Two kinds, kept apart on purpose:
//! - **event counters** (`*_total`) count what this process did: bytes `FetchBlob` served,
//!   summaries it ingested, sessions it opened. The registry, the fleet and the rollouts
//!   count them where they happen, through the [`Metrics`] handle they were given;
//! - **state gauges** describe the fleet as the store holds it (agents online, versions,
//!   rollout steps, per-version decision totals, bytes saved). They are recomputed from the
//!   store on each scrape ([`Metrics::refresh`]), so every replica reports the same figures
//!   and they survive restarts.
//!
//! A component built without a handle gets a private one that nobody scrapes, so tests and
//! tools that do not care about metrics need not pass one.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicI64, AtomicU64},
};

use llmchain_proto::model::{LabelSelector, Summary};
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    Result,
    fleet::{FleetApi, FleetStats},
    registry::RegistryApi,
    rollout::RolloutsApi,
};

/// Label pairs of one series.
pub type Labels = Vec<(&'static str, String)>;

type Counters = Family<Labels, Counter>;
type Gauges = Family<Labels, Gauge<i64, AtomicI64>>;

/// Every metric the coordinator exposes, registered in one [`Registry`].
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    fetch_blob_bytes: Counter<u64, AtomicU64>,
    fetch_blob_requests: Counter<u64, AtomicU64>,
    upload_blob_bytes: Counter<u64, AtomicU64>,
    versions_published: Counters,
    summaries_ingested: Counters,
    records_ingested: Counters,
    bad_records_ingested: Counters,
    decisions_ingested: Counters,
    sessions_opened: Counter<u64, AtomicU64>,
    sessions_ended: Counters,
    reconnects: Counter<u64, AtomicU64>,
    rollout_actions: Counters,
    agents: Gauges,
    agents_running: Gauges,
    model_versions: Gauges,
    model_latest_version: Gauges,
    version_bytes: Gauges,
    rollout_state: Gauges,
    rollout_step: Gauges,
    rollout_steps: Gauges,
    rollout_step_state: Gauges,
    fleet_summaries: Gauges,
    fleet_records: Gauges,
    fleet_bad_records: Gauges,
    fleet_decisions: Gauges,
    fleet_raw_bytes: Gauge<i64, AtomicI64>,
    fleet_summary_bytes: Gauge<i64, AtomicI64>,
    fleet_bytes_saved: Gauge<i64, AtomicI64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    /// Every metric at zero, registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let mut m = Metrics {
            registry: Registry::default(),
            fetch_blob_bytes: Counter::default(),
            fetch_blob_requests: Counter::default(),
            upload_blob_bytes: Counter::default(),
            versions_published: Family::default(),
            summaries_ingested: Family::default(),
            records_ingested: Family::default(),
            bad_records_ingested: Family::default(),
            decisions_ingested: Family::default(),
            sessions_opened: Counter::default(),
            sessions_ended: Family::default(),
            reconnects: Counter::default(),
            rollout_actions: Family::default(),
            agents: Family::default(),
            agents_running: Family::default(),
            model_versions: Family::default(),
            model_latest_version: Family::default(),
            version_bytes: Family::default(),
            rollout_state: Family::default(),
            rollout_step: Family::default(),
            rollout_steps: Family::default(),
            rollout_step_state: Family::default(),
            fleet_summaries: Family::default(),
            fleet_records: Family::default(),
            fleet_bad_records: Family::default(),
            fleet_decisions: Family::default(),
            fleet_raw_bytes: Gauge::default(),
            fleet_summary_bytes: Gauge::default(),
            fleet_bytes_saved: Gauge::default(),
        };
        let r = &mut registry;
        // Event counters of this process (prometheus-client appends `_total`).
        r.register("llmchain_fetch_blob_bytes", "Blob bytes sent by FetchBlob", m.fetch_blob_bytes.clone());
        r.register("llmchain_fetch_blob_requests", "FetchBlob calls answered", m.fetch_blob_requests.clone());
        r.register(
            "llmchain_upload_blob_bytes",
            "Blob bytes stored by UploadBlob (uploads of blobs already present excluded)",
            m.upload_blob_bytes.clone(),
        );
        r.register(
            "llmchain_versions_published",
            "Versions published, by model",
            m.versions_published.clone(),
        );
        r.register(
            "llmchain_summaries_ingested",
            "Summaries received, by outcome (stored, or duplicate of one already stored)",
            m.summaries_ingested.clone(),
        );
        r.register(
            "llmchain_records_ingested",
            "Records described by newly stored summaries, by model",
            m.records_ingested.clone(),
        );
        r.register(
            "llmchain_bad_records_ingested",
            "Bad records reported by newly stored summaries, by model",
            m.bad_records_ingested.clone(),
        );
        r.register(
            "llmchain_decisions_ingested",
            "Decisions reported by newly stored summaries, by model and label",
            m.decisions_ingested.clone(),
        );
        r.register("llmchain_agent_sessions_opened", "Agent sessions opened", m.sessions_opened.clone());
        r.register(
            "llmchain_agent_sessions_ended",
            "Agent sessions ended, by outcome (closed by the agent, or ended with an error)",
            m.sessions_ended.clone(),
        );
        r.register(
            "llmchain_agent_reconnects",
            "Sessions opened by agents the store already knew (a reconnect or a restart)",
            m.reconnects.clone(),
        );
        r.register(
            "llmchain_rollout_actions",
            "Rollout API actions that succeeded, by action",
            m.rollout_actions.clone(),
        );
        // State gauges, recomputed from the store on each scrape.
        r.register("llmchain_agents", "Known agents, by state (online or offline)", m.agents.clone());
        r.register(
            "llmchain_agents_running",
            "Agents running a version, by model and version",
            m.agents_running.clone(),
        );
        r.register("llmchain_model_versions", "Published versions, by model", m.model_versions.clone());
        r.register(
            "llmchain_model_latest_version",
            "Highest published version, by model",
            m.model_latest_version.clone(),
        );
        r.register(
            "llmchain_model_version_bytes",
            "Bytes of a version: all its tensors (kind=total) or those new since its parent (kind=delta)",
            m.version_bytes.clone(),
        );
        r.register("llmchain_rollout_state", "1 for the state each rollout is in", m.rollout_state.clone());
        r.register(
            "llmchain_rollout_step",
            "Index (from 0) of each rollout's current step",
            m.rollout_step.clone(),
        );
        r.register("llmchain_rollout_steps", "Steps of each rollout", m.rollout_steps.clone());
        r.register(
            "llmchain_rollout_step_state",
            "1 for the state each step of each rollout is in",
            m.rollout_step_state.clone(),
        );
        r.register(
            "llmchain_fleet_summaries",
            "Stored summaries, by model and version",
            m.fleet_summaries.clone(),
        );
        r.register(
            "llmchain_fleet_records",
            "Records decided or skipped, by model and version",
            m.fleet_records.clone(),
        );
        r.register(
            "llmchain_fleet_bad_records",
            "Bad records, by model and version",
            m.fleet_bad_records.clone(),
        );
        r.register(
            "llmchain_fleet_decisions",
            "Decisions in stored summaries, by model, version and label",
            m.fleet_decisions.clone(),
        );
        r.register(
            "llmchain_fleet_raw_bytes",
            "Raw record bytes the agents kept local",
            m.fleet_raw_bytes.clone(),
        );
        r.register(
            "llmchain_fleet_summary_bytes",
            "Summary bytes the agents sent instead",
            m.fleet_summary_bytes.clone(),
        );
        r.register(
            "llmchain_fleet_bytes_saved",
            "Raw bytes minus summary bytes: what shipping raw records would have cost more",
            m.fleet_bytes_saved.clone(),
        );
        m.registry = registry;
        m
    }

    /// The registry to encode (see `llmchain_runtime::metrics`).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts bytes of one `FetchBlob` chunk sent.
    pub fn fetch_blob_bytes(&self, bytes: u64) {
        self.fetch_blob_bytes.inc_by(bytes);
    }

    /// Counts one `FetchBlob` call answered.
    pub fn fetch_blob_request(&self) {
        self.fetch_blob_requests.inc();
    }

    /// Counts a blob newly stored by an upload.
    pub fn blob_uploaded(&self, bytes: u64) {
        self.upload_blob_bytes.inc_by(bytes);
    }

    /// Counts a published version.
    pub fn version_published(&self, model: &str) {
        self.versions_published.get_or_create(&vec![("model", model.to_string())]).inc();
    }

    /// Counts a received summary: `stored` when it was new, else a duplicate of a retry.
    pub fn summary_ingested(&self, s: &Summary, stored: bool) {
        let outcome = if stored { "stored" } else { "duplicate" };
        self.summaries_ingested.get_or_create(&vec![("outcome", outcome.to_string())]).inc();
        if !stored {
            return;
        }
        let model = s.model.model.to_string();
        self.records_ingested.get_or_create(&vec![("model", model.clone())]).inc_by(s.records);
        self.bad_records_ingested.get_or_create(&vec![("model", model.clone())]).inc_by(s.bad_records);
        for (label, count) in &s.label_counts {
            self.decisions_ingested
                .get_or_create(&vec![("model", model.clone()), ("label", label.clone())])
                .inc_by(*count);
        }
    }

    /// Counts an opened session; `known` when the store knew the agent already.
    pub fn session_opened(&self, known: bool) {
        self.sessions_opened.inc();
        if known {
            self.reconnects.inc();
        }
    }

    /// Counts an ended session.
    pub fn session_ended(&self, error: bool) {
        let outcome = if error { "error" } else { "closed" };
        self.sessions_ended.get_or_create(&vec![("outcome", outcome.to_string())]).inc();
    }

    /// Counts a rollout action (`create`, `pause`, `resume`, `rollback`).
    pub fn rollout_action(&self, action: &'static str) {
        self.rollout_actions.get_or_create(&vec![("action", action.to_string())]).inc();
    }

    /// Recomputes the state gauges from the store through the service APIs. Series of things
    /// that disappeared (a deleted rollout, a version no agent runs) are dropped.
    pub async fn refresh(
        &self,
        registry: &dyn RegistryApi,
        fleet: &dyn FleetApi,
        rollouts: &dyn RolloutsApi,
    ) -> Result<()> {
        let agents = fleet.list_agents(&LabelSelector::default()).await?;
        let stats = fleet.stats(None).await?;
        let models = registry.list_models().await?;
        let mut versions = Vec::new();
        for m in &models {
            versions.push((m.model.to_string(), registry.list_versions(&m.model).await?));
        }
        let rollouts = rollouts.list(None).await?;

        let online = agents.iter().filter(|a| a.online).count() as i64;
        self.agents.clear();
        self.agents.get_or_create(&vec![("state", "online".into())]).set(online);
        self.agents.get_or_create(&vec![("state", "offline".into())]).set(agents.len() as i64 - online);
        let mut running: BTreeMap<(String, u64), i64> = BTreeMap::new();
        for a in agents.iter().filter(|a| a.online) {
            if let Some(r) = &a.state.status.running {
                *running.entry((r.model.to_string(), r.version)).or_default() += 1;
            }
        }
        self.agents_running.clear();
        for ((model, version), n) in running {
            self.agents_running
                .get_or_create(&vec![("model", model), ("version", version.to_string())])
                .set(n);
        }

        self.model_versions.clear();
        self.model_latest_version.clear();
        for m in &models {
            let model = vec![("model", m.model.to_string())];
            self.model_versions.get_or_create(&model).set(gauge(m.version_count));
            self.model_latest_version.get_or_create(&model).set(gauge(m.latest_version));
        }
        self.version_bytes.clear();
        for (model, list) in &versions {
            for v in list {
                let labels = |kind: &str| {
                    vec![
                        ("model", model.clone()),
                        ("version", v.manifest.id.version.to_string()),
                        ("kind", kind.to_string()),
                    ]
                };
                self.version_bytes.get_or_create(&labels("total")).set(gauge(v.total_bytes));
                self.version_bytes.get_or_create(&labels("delta")).set(gauge(v.delta_bytes));
            }
        }

        self.rollout_state.clear();
        self.rollout_step.clear();
        self.rollout_steps.clear();
        self.rollout_step_state.clear();
        for r in &rollouts {
            let base = vec![
                ("rollout", r.id.clone()),
                ("model", r.spec.target.model.clone()),
                ("version", r.spec.target.version.to_string()),
            ];
            let mut with_state = base.clone();
            with_state.push(("state", r.state.as_str().to_string()));
            self.rollout_state.get_or_create(&with_state).set(1);
            self.rollout_step.get_or_create(&base).set(i64::from(r.current_step));
            self.rollout_steps.get_or_create(&base).set(r.steps.len() as i64);
            for step in &r.steps {
                let state = serde_json::to_value(step.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                let labels =
                    vec![("rollout", r.id.clone()), ("step", step.index.to_string()), ("state", state)];
                self.rollout_step_state.get_or_create(&labels).set(1);
            }
        }

        self.set_fleet_totals(&stats);
        Ok(())
    }

    fn set_fleet_totals(&self, stats: &FleetStats) {
        self.fleet_summaries.clear();
        self.fleet_records.clear();
        self.fleet_bad_records.clear();
        self.fleet_decisions.clear();
        for v in &stats.versions {
            let labels = vec![("model", v.model.model.to_string()), ("version", v.model.version.to_string())];
            let a = &v.aggregate;
            self.fleet_summaries.get_or_create(&labels).set(gauge(a.summaries));
            self.fleet_records.get_or_create(&labels).set(gauge(a.records));
            self.fleet_bad_records.get_or_create(&labels).set(gauge(a.bad_records));
            for (label, count) in &a.decisions {
                let mut with_label = labels.clone();
                with_label.push(("label", label.clone()));
                self.fleet_decisions.get_or_create(&with_label).set(gauge(*count));
            }
        }
        let t = &stats.totals;
        self.fleet_raw_bytes.set(gauge(t.raw_bytes));
        self.fleet_summary_bytes.set(gauge(t.summary_bytes));
        self.fleet_bytes_saved.set(gauge(t.raw_bytes.saturating_sub(t.summary_bytes)));
    }
}
