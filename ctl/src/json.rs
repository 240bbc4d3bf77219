//! Faithful JSON renderings of the v1 protobuf messages the CLI prints with `-o json`.
//!
//! Every field of a message appears under its protobuf name (snake_case), so a script can rely
//! on the `.proto` documentation. Conventions: unset sub-messages and timestamps are `null`,
//! enums are their protobuf value names (e.g. `"ROLLOUT_STATE_RUNNING"`), timestamps are
//! RFC 3339 strings in UTC, and 64-bit integers are JSON numbers (not the strings of the
//! canonical proto3 JSON mapping, which `jq` arithmetic would trip over).

use llmchain_proto::pb;
use serde_json::{Value, json};

/// An optional message: `null` when unset.
fn opt<T>(v: Option<&T>, f: impl Fn(&T) -> Value) -> Value {
    v.map_or(Value::Null, f)
}

/// A repeated message field.
fn list<T>(v: &[T], f: impl Fn(&T) -> Value) -> Value {
    Value::Array(v.iter().map(f).collect())
}

/// A timestamp as RFC 3339 (UTC), `null` when unset.
pub fn timestamp(t: Option<&prost_types::Timestamp>) -> Value {
    opt(t, |t| Value::String(rfc3339(t)))
}

/// Formats a timestamp as `YYYY-MM-DDTHH:MM:SS[.fff]Z`.
pub fn rfc3339(t: &prost_types::Timestamp) -> String {
    let days = t.seconds.div_euclid(86_400);
    let secs = t.seconds.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let frac = match t.nanos {
        n if n <= 0 => String::new(),
        n if n % 1_000_000 == 0 => format!(".{:03}", n / 1_000_000),
        n if n % 1_000 == 0 => format!(".{:06}", n / 1_000),
        n => format!(".{n:09}"),
    };
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}{frac}Z")
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Name of an enum value, or its number when this CLI does not know it.
fn enum_name<E: TryFrom<i32>>(v: i32, name: impl Fn(E) -> &'static str) -> Value {
    E::try_from(v).map_or_else(|_| json!(v), |e| json!(name(e)))
}

pub fn model_ref(m: &pb::ModelRef) -> Value {
    json!({ "model": m.model, "version": m.version })
}

fn model_ref_opt(m: Option<&pb::ModelRef>) -> Value {
    opt(m, model_ref)
}

fn metric(m: &pb::Metric) -> Value {
    json!({ "name": m.name, "value": m.value })
}

fn label(l: &pb::Label) -> Value {
    json!({ "key": l.key, "value": l.value })
}

fn label_count(c: &pb::LabelCount) -> Value {
    json!({ "label": c.label, "count": c.count })
}

/// `ListModelsResponse`.
pub fn list_models(r: &pb::ListModelsResponse) -> Value {
    json!({ "models": list(&r.models, |m| json!({
        "model": m.model,
        "latest_version": m.latest_version,
        "version_count": m.version_count,
    })) })
}

/// `ListVersionsResponse`.
pub fn list_versions(r: &pb::ListVersionsResponse) -> Value {
    json!({ "versions": list(&r.versions, |v| json!({
        "version": v.version,
        "parent_version": v.parent_version,
        "mode": v.mode,
        "total_bytes": v.total_bytes,
        "delta_bytes": v.delta_bytes,
        "metrics": list(&v.metrics, metric),
        "published_at": timestamp(v.published_at.as_ref()),
        "key_id": v.key_id,
    })) })
}

fn agent_status(s: &pb::AgentStatus) -> Value {
    json!({
        "running": model_ref_opt(s.running.as_ref()),
        "pending": model_ref_opt(s.pending.as_ref()),
        "download_done_bytes": s.download_done_bytes,
        "download_total_bytes": s.download_total_bytes,
        "decisions_per_second": s.decisions_per_second,
        "raw_bytes": s.raw_bytes,
        "summary_bytes": s.summary_bytes,
        "last_error": s.last_error,
        "spool_depth": s.spool_depth,
    })
}

/// `AgentInfo`.
pub fn agent_info(a: &pb::AgentInfo) -> Value {
    json!({
        "agent_id": a.agent_id,
        "labels": list(&a.labels, label),
        "online": a.online,
        "last_heartbeat": timestamp(a.last_heartbeat.as_ref()),
        "status": opt(a.status.as_ref(), agent_status),
        "bytes_saved": a.bytes_saved,
        "revoked": a.revoked,
    })
}

/// `FleetStats`.
pub fn fleet_stats(s: &pb::FleetStats) -> Value {
    json!({
        "agents": s.agents,
        "online_agents": s.online_agents,
        "summaries": s.summaries,
        "raw_bytes": s.raw_bytes,
        "summary_bytes": s.summary_bytes,
        "bytes_saved": s.bytes_saved,
        "versions": list(&s.versions, |v| json!({
            "model": model_ref_opt(v.model.as_ref()),
            "summaries": v.summaries,
            "records": v.records,
            "bad_records": v.bad_records,
            "raw_bytes": v.raw_bytes,
            "summary_bytes": v.summary_bytes,
            "bytes_saved": v.bytes_saved,
            "decisions": list(&v.decisions, label_count),
        })),
    })
}

/// `AssignResponse`.
pub fn assign_response(r: &pb::AssignResponse) -> Value {
    json!({ "agent_ids": r.agent_ids })
}

fn rollout_step(s: &pb::RolloutStep) -> Value {
    json!({
        "agents": s.agents,
        "percent": s.percent,
        "soak_seconds": s.soak_seconds,
        "soak_ms": s.soak_ms,
    })
}

fn rollout_gates(g: &pb::RolloutGates) -> Value {
    json!({
        "max_load_failures": g.max_load_failures,
        "max_bad_record_rate": g.max_bad_record_rate,
        "max_latency_p99_ms": g.max_latency_p99_ms,
        "max_decision_drift": g.max_decision_drift,
        "min_probe_accuracy": g.min_probe_accuracy,
        "min_decisions": g.min_decisions,
    })
}

/// `CreateRolloutRequest` (a rollout's spec).
pub fn create_rollout_request(r: &pb::CreateRolloutRequest) -> Value {
    json!({
        "target": model_ref_opt(r.target.as_ref()),
        "agent_ids": r.agent_ids,
        "selector": r.selector,
        "steps": list(&r.steps, rollout_step),
        "gates": opt(r.gates.as_ref(), rollout_gates),
        "prefetch": r.prefetch,
        "probe": list(&r.probe, |p| json!({ "record_json": p.record_json, "label": p.label })),
        "paused": r.paused,
    })
}

fn gate_result(g: &pb::GateResult) -> Value {
    json!({
        "name": g.name,
        "value": g.value,
        "threshold": g.threshold,
        "passed": g.passed,
        "judged": g.judged,
    })
}

fn step_status(s: &pb::RolloutStepStatus) -> Value {
    json!({
        "index": s.index,
        "step": opt(s.step.as_ref(), rollout_step),
        "state": enum_name(s.state, |e: pb::StepState| e.as_str_name()),
        "agent_ids": s.agent_ids,
        "started_at": timestamp(s.started_at.as_ref()),
        "finished_at": timestamp(s.finished_at.as_ref()),
        "gates": list(&s.gates, gate_result),
        "pending_agent_ids": s.pending_agent_ids,
        "soak_started_at": timestamp(s.soak_started_at.as_ref()),
    })
}

/// `Rollout`.
pub fn rollout(r: &pb::Rollout) -> Value {
    json!({
        "id": r.id,
        "spec": opt(r.spec.as_ref(), create_rollout_request),
        "state": enum_name(r.state, |e: pb::RolloutState| e.as_str_name()),
        "current_step": r.current_step,
        "steps": list(&r.steps, step_status),
        "previous": list(&r.previous, |p| json!({ "agent_id": p.agent_id, "version": p.version })),
        "history": list(&r.history, |e| json!({
            "at": timestamp(e.at.as_ref()),
            "message": e.message,
            "coordinator": e.coordinator,
        })),
        "created_at": timestamp(r.created_at.as_ref()),
    })
}

/// `ListRolloutsResponse`.
pub fn list_rollouts(r: &pb::ListRolloutsResponse) -> Value {
    json!({ "rollouts": list(&r.rollouts, rollout) })
}

/// `Summary`.
pub fn summary(s: &pb::Summary) -> Value {
    json!({
        "agent_id": s.agent_id,
        "seq": s.seq,
        "window_start": timestamp(s.window_start.as_ref()),
        "window_end": timestamp(s.window_end.as_ref()),
        "model": model_ref_opt(s.model.as_ref()),
        "label_counts": list(&s.label_counts, label_count),
        "confidence_histogram": s.confidence_histogram,
        "latency_p50_ms": s.latency_p50_ms,
        "latency_p95_ms": s.latency_p95_ms,
        "latency_p99_ms": s.latency_p99_ms,
        "records": s.records,
        "raw_bytes": s.raw_bytes,
        "bad_records": s.bad_records,
        "hard_examples": list(&s.hard_examples, |h| json!({
            "text": h.text,
            "decision": h.decision,
            "scores": list(&h.scores, |c| json!({
                "label": c.label,
                "logprob": c.logprob,
                "probability": c.probability,
            })),
        })),
        "spool_dropped": s.spool_dropped,
    })
}

/// `ListSummariesResponse`.
pub fn list_summaries(r: &pb::ListSummariesResponse) -> Value {
    json!({ "summaries": list(&r.summaries, summary) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc() {
        let t = |seconds, nanos| rfc3339(&prost_types::Timestamp { seconds, nanos });
        assert_eq!(t(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(t(951_782_400, 0), "2000-02-29T00:00:00Z");
        assert_eq!(t(1_700_000_000, 5_000_000), "2023-11-14T22:13:20.005Z");
        assert_eq!(t(-1, 0), "1969-12-31T23:59:59Z");
    }
}
