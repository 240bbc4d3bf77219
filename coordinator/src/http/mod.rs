//! The coordinator's HTTP side, next to the gRPC server in the same process: Prometheus
//! `/metrics`, `/healthz`, the operator dashboard on `/` and the JSON it reads.
//!
//! The dashboard is one HTML page (plain JS, inline CSS and SVG, embedded in the binary; no
//! build step) that polls the `/api/*` endpoints every few seconds. Those are read-only views
//! built from the same service APIs the gRPC adapters call ([`RegistryApi`], [`FleetApi`],
//! [`RolloutsApi`]), so the page shows exactly what `llmchainctl` shows:
//! - `/api/fleet`: every agent (state, version, download, last seen) and fleet totals;
//! - `/api/models`: models, their versions with training metrics, full and delta sizes, and
//!   the aggregates of their summaries;
//! - `/api/rollouts`: rollouts as stored (steps, gates, history);
//! - `/api/decisions`: decisions per label over time, bucketed from the last hour of
//!   summaries.
//!
//! Nothing here writes: operator actions stay on the authenticated gRPC API.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use llmchain_proto::{
    ApiError,
    model::{LabelSelector, SummaryQuery},
};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    fleet::FleetApi,
    metrics::Metrics,
    registry::RegistryApi,
    rollout::{Rollout, RolloutsApi},
};

/// The dashboard page, served as is.
const DASHBOARD: &str = include_str!("dashboard.html");
/// How far back `/api/decisions` looks.
const DECISIONS_SPAN: Duration = Duration::from_secs(3600);
/// Most summaries `/api/decisions` reads.
const DECISIONS_SUMMARIES: usize = 5000;
/// About how many time buckets `/api/decisions` returns.
const DECISIONS_BUCKETS: u64 = 60;

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    /// Models and versions.
    pub registry: Arc<dyn RegistryApi>,
    /// Agents, summaries, aggregates.
    pub fleet: Arc<dyn FleetApi>,
    /// Rollouts.
    pub rollouts: Arc<dyn RolloutsApi>,
    /// The metrics `/metrics` exposes.
    pub metrics: Arc<Metrics>,
}

/// Every route: `/`, `/healthz`, `/metrics` and `/api/*`.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(llmchain_runtime::metrics::healthz))
        .route("/metrics", get(metrics))
        .route("/api/fleet", get(fleet))
        .route("/api/models", get(models))
        .route("/api/rollouts", get(rollouts))
        .route("/api/decisions", get(decisions))
        .with_state(state)
}

/// Serves [`router`] on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: CancellationToken,
) -> crate::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "http serving the dashboard and /metrics");
    llmchain_runtime::metrics::serve(listener, router(state), shutdown).await?;
    Ok(())
}

/// Binds the HTTP listener; see [`llmchain_runtime::metrics::bind`].
pub async fn bind(addr: SocketAddr) -> crate::Result<TcpListener> {
    Ok(llmchain_runtime::metrics::bind(addr).await?)
}

/// A failed read, answered as JSON `{"error": …}` with a status that says whether to retry.
struct Failure(crate::Error);

impl From<crate::Error> for Failure {
    fn from(e: crate::Error) -> Self {
        Failure(e)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let api = ApiError::from(self.0);
        let status = match &api {
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        tracing::warn!(error = %api, "http read failed");
        (status, Json(serde_json::json!({ "error": api.to_string() }))).into_response()
    }
}

type Answer<T> = Result<Json<T>, Failure>;

async fn dashboard() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-cache")], Html(DASHBOARD))
}

async fn metrics(State(state): State<HttpState>) -> Response {
    match state.metrics.refresh(state.registry.as_ref(), state.fleet.as_ref(), state.rollouts.as_ref()).await
    {
        Ok(()) => llmchain_runtime::metrics::response(state.metrics.registry()),
        Err(e) => Failure(e).into_response(),
    }
}

fn ms(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis())
        .unwrap_or(u64::MAX)
}

/// One agent as the dashboard shows it.
#[derive(Debug, Serialize)]
pub struct AgentView {
    /// Identity.
    pub agent_id: String,
    /// Whether its session's lease is alive.
    pub online: bool,
    /// Labels, `key → value`.
    pub labels: BTreeMap<String, String>,
    /// Agent software version.
    pub agent_version: String,
    /// Model of the version it serves.
    pub running_model: Option<String>,
    /// The version it serves.
    pub running_version: Option<u64>,
    /// The version it fetches or loads, as `model:version`.
    pub pending: Option<String>,
    /// Bytes of the pending version downloaded.
    pub download_done_bytes: u64,
    /// Bytes of the pending version in all.
    pub download_total_bytes: u64,
    /// Decisions per second over its last window.
    pub decisions_per_second: f64,
    /// Summaries waiting in its spool.
    pub spool_depth: u64,
    /// Its last error.
    pub last_error: String,
    /// Its last Hello or heartbeat, ms since the Unix epoch.
    pub last_seen_ms: u64,
    /// Summaries stored from it.
    pub summaries: u64,
    /// Raw bytes those summaries describe (that stayed on the node).
    pub raw_bytes: u64,
    /// Bytes of those summaries.
    pub summary_bytes: u64,
    /// Its last assignment result: outcome and message.
    pub last_result: Option<String>,
}

/// Fleet-wide sums.
#[derive(Debug, Default, Serialize)]
pub struct Totals {
    /// Agents known.
    pub agents: u64,
    /// Agents online.
    pub online: u64,
    /// Summaries stored.
    pub summaries: u64,
    /// Records they describe.
    pub records: u64,
    /// Bad records among them.
    pub bad_records: u64,
    /// Raw bytes the agents kept.
    pub raw_bytes: u64,
    /// Summary bytes they sent.
    pub summary_bytes: u64,
    /// `raw_bytes - summary_bytes`.
    pub bytes_saved: u64,
    /// Decisions per label.
    pub decisions: BTreeMap<String, u64>,
}

/// `/api/fleet`.
#[derive(Debug, Serialize)]
pub struct FleetView {
    /// When the view was built, ms since the Unix epoch.
    pub now_ms: u64,
    /// Agents, sorted by id.
    pub agents: Vec<AgentView>,
    /// Sums.
    pub totals: Totals,
}

/// Builds `/api/fleet`.
pub async fn fleet_view(fleet: &dyn FleetApi) -> crate::Result<FleetView> {
    let everyone = LabelSelector::default();
    let (agents, stats) = tokio::try_join!(fleet.list_agents(&everyone), fleet.stats(None))?;
    let t = &stats.totals;
    let totals = Totals {
        agents: stats.agents,
        online: stats.online_agents,
        summaries: t.summaries,
        records: t.records,
        bad_records: t.bad_records,
        raw_bytes: t.raw_bytes,
        summary_bytes: t.summary_bytes,
        bytes_saved: t.raw_bytes.saturating_sub(t.summary_bytes),
        decisions: t.decisions.clone(),
    };
    let agents = agents
        .into_iter()
        .map(|a| {
            let s = &a.state.status;
            AgentView {
                agent_id: a.state.agent_id.to_string(),
                online: a.online,
                labels: a.state.labels.iter().map(|l| (l.key.clone(), l.value.clone())).collect(),
                agent_version: a.state.agent_version.clone(),
                running_model: s.running.as_ref().map(|r| r.model.to_string()),
                running_version: s.running.as_ref().map(|r| r.version),
                pending: s.pending.as_ref().map(ToString::to_string),
                download_done_bytes: s.download_done_bytes,
                download_total_bytes: s.download_total_bytes,
                decisions_per_second: s.decisions_per_second,
                spool_depth: s.spool_depth,
                last_error: s.last_error.clone(),
                last_seen_ms: ms(a.state.last_heartbeat),
                summaries: a.traffic.summaries,
                raw_bytes: a.traffic.raw_bytes,
                summary_bytes: a.traffic.summary_bytes,
                last_result: a
                    .state
                    .last_result
                    .as_ref()
                    .map(|(r, _)| format!("{}: {}", r.outcome.as_str(), r.message)),
            }
        })
        .collect();
    Ok(FleetView { now_ms: ms(SystemTime::now()), agents, totals })
}

async fn fleet(State(state): State<HttpState>) -> Answer<FleetView> {
    Ok(Json(fleet_view(state.fleet.as_ref()).await?))
}

/// One version as the dashboard shows it.
#[derive(Debug, Serialize)]
pub struct VersionView {
    /// Version number.
    pub version: u64,
    /// The version it was trained from (0: none).
    pub parent_version: u64,
    /// Training mode.
    pub mode: String,
    /// Training metrics, `name → value`.
    pub metrics: BTreeMap<String, f64>,
    /// Bytes of all its tensors.
    pub total_bytes: u64,
    /// Bytes of the tensors new since its parent: what an agent on the parent downloads.
    pub delta_bytes: u64,
    /// When it was published, ms since the Unix epoch.
    pub published_at_ms: u64,
    /// Signing key id.
    pub key_id: String,
    /// Online agents serving it.
    pub agents_running: u64,
    /// Summaries stored for it.
    pub summaries: u64,
    /// Records it decided or skipped.
    pub records: u64,
    /// Bad records.
    pub bad_records: u64,
    /// Decisions per label.
    pub decisions: BTreeMap<String, u64>,
}

/// One model as the dashboard shows it.
#[derive(Debug, Serialize)]
pub struct ModelView {
    /// Name.
    pub model: String,
    /// Highest version.
    pub latest_version: u64,
    /// Versions, oldest first.
    pub versions: Vec<VersionView>,
}

/// Builds `/api/models`.
pub async fn models_view(registry: &dyn RegistryApi, fleet: &dyn FleetApi) -> crate::Result<Vec<ModelView>> {
    let everyone = LabelSelector::default();
    let (models, stats, agents) =
        tokio::try_join!(registry.list_models(), fleet.stats(None), fleet.list_agents(&everyone))?;
    let aggregates: BTreeMap<(String, u64), _> = stats
        .versions
        .into_iter()
        .map(|v| ((v.model.model.to_string(), v.model.version), v.aggregate))
        .collect();
    let mut running: BTreeMap<(String, u64), u64> = BTreeMap::new();
    for a in agents.iter().filter(|a| a.online) {
        if let Some(r) = &a.state.status.running {
            *running.entry((r.model.to_string(), r.version)).or_default() += 1;
        }
    }
    let mut out = Vec::new();
    for m in models {
        let name = m.model.to_string();
        let versions = registry
            .list_versions(&m.model)
            .await?
            .into_iter()
            .map(|v| {
                let key = (name.clone(), v.manifest.id.version);
                let agg = aggregates.get(&key).cloned().unwrap_or_default();
                let training = &v.manifest.training;
                VersionView {
                    version: v.manifest.id.version,
                    parent_version: v.manifest.parent_version,
                    mode: training.mode.clone(),
                    metrics: training.metrics.iter().map(|m| (m.name.clone(), m.value)).collect(),
                    total_bytes: v.total_bytes,
                    delta_bytes: v.delta_bytes,
                    published_at_ms: ms(v.published_at),
                    key_id: v.signed.key_id.clone(),
                    agents_running: running.get(&key).copied().unwrap_or(0),
                    summaries: agg.summaries,
                    records: agg.records,
                    bad_records: agg.bad_records,
                    decisions: agg.decisions,
                }
            })
            .collect();
        out.push(ModelView { model: name, latest_version: m.latest_version, versions });
    }
    Ok(out)
}

async fn models(State(state): State<HttpState>) -> Answer<Vec<ModelView>> {
    Ok(Json(models_view(state.registry.as_ref(), state.fleet.as_ref()).await?))
}

async fn rollouts(State(state): State<HttpState>) -> Answer<Vec<Rollout>> {
    Ok(Json(state.rollouts.list(None).await?))
}

/// Decisions of one time bucket.
#[derive(Debug, Serialize)]
pub struct DecisionPoint {
    /// Bucket start, ms since the Unix epoch.
    pub t_ms: u64,
    /// Decisions per label in windows that ended in the bucket.
    pub counts: BTreeMap<String, u64>,
    /// Bad records in those windows.
    pub bad_records: u64,
}

/// `/api/decisions`.
#[derive(Debug, Serialize)]
pub struct DecisionsView {
    /// Width of a bucket in milliseconds.
    pub bucket_ms: u64,
    /// Every label seen, sorted.
    pub labels: Vec<String>,
    /// Buckets with at least one summary, oldest first.
    pub points: Vec<DecisionPoint>,
}

/// Builds `/api/decisions` from the summaries whose window ended in the last hour.
pub async fn decisions_view(fleet: &dyn FleetApi) -> crate::Result<DecisionsView> {
    let now = SystemTime::now();
    let query = SummaryQuery {
        agent_id: None,
        model: None,
        version: None,
        window_start: Some(now - DECISIONS_SPAN),
        window_end: None,
        limit: DECISIONS_SUMMARIES,
    };
    let summaries = fleet.list_summaries(query).await?;
    let ends: Vec<u64> = summaries.iter().map(|s| ms(s.window_end)).collect();
    let span = match (ends.iter().min(), ends.iter().max()) {
        (Some(lo), Some(hi)) => hi - lo,
        _ => 0,
    };
    // Whole seconds, about DECISIONS_BUCKETS of them over the span the summaries cover.
    let bucket_ms = (span / DECISIONS_BUCKETS).div_ceil(1000).max(1) * 1000;
    let mut labels = BTreeSet::new();
    let mut buckets: BTreeMap<u64, DecisionPoint> = BTreeMap::new();
    for (s, end) in summaries.iter().zip(ends) {
        let t_ms = end / bucket_ms * bucket_ms;
        let point = buckets.entry(t_ms).or_insert_with(|| DecisionPoint {
            t_ms,
            counts: BTreeMap::new(),
            bad_records: 0,
        });
        point.bad_records += s.bad_records;
        for (label, n) in &s.label_counts {
            labels.insert(label.clone());
            *point.counts.entry(label.clone()).or_default() += n;
        }
    }
    Ok(DecisionsView {
        bucket_ms,
        labels: labels.into_iter().collect(),
        points: buckets.into_values().collect(),
    })
}

async fn decisions(State(state): State<HttpState>) -> Answer<DecisionsView> {
    Ok(Json(decisions_view(state.fleet.as_ref()).await?))
}

#[cfg(test)]
mod tests;
