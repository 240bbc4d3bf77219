//! Telemetry: a `tracing` subscriber for logs, OpenTelemetry export when configured, and W3C
//! trace context carried in gRPC metadata.
//!
//! [`init`] always installs the W3C `traceparent` propagator and the OpenTelemetry layer, so
//! spans get trace ids and trace context flows through a process even when it exports nothing;
//! the OTLP exporter is added only when an endpoint is configured
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`). The returned [`TelemetryGuard`] flushes pending spans when
//! dropped: keep it alive until the end of `main` (binaries return from `main` on SIGTERM, so
//! the flush happens then too).
//!
//! Logs and spans are filtered apart: `RUST_LOG` only chooses what is printed, while
//! `LLMCHAIN_TRACE_FILTER` (default `info`) chooses which spans are traced, so a quiet log
//! level does not silence traces.
//!
//! Outgoing calls carry the current span's context through [`InjectContext`] (wrap a channel
//! once with [`traced`]); incoming calls adopt it with [`link_parent`]; messages that outlive
//! a call (assignments) carry it as strings ([`current_w3c`], [`set_remote_parent`]).

use std::collections::HashMap;

use opentelemetry::{
    global,
    propagation::{Extractor, Injector},
    trace::{TraceContextExt as _, TracerProvider as _},
};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tonic::service::interceptor::InterceptedService;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

use crate::{Error, Result};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable, one line per event.
    #[default]
    Text,
    /// One JSON object per event, for log collectors.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?} (expected text or json)")),
        }
    }
}

/// What [`init`] needs, read from the environment by the binary (in one place).
#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    /// `service.name` of exported spans.
    pub service_name: String,
    /// OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`; `None` exports nothing.
    pub otlp_endpoint: Option<String>,
    /// Log filter in `RUST_LOG` syntax; `None` means `info`.
    pub filter: Option<String>,
    /// Which spans are traced (exported, and given ids to propagate), in `RUST_LOG` syntax;
    /// `None` means [`DEFAULT_TRACE_FILTER`].
    pub trace_filter: Option<String>,
    /// Log format.
    pub log_format: LogFormat,
}

impl TelemetryConfig {
    /// Reads the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT`, `RUST_LOG`,
    /// `LLMCHAIN_TRACE_FILTER`, `LLMCHAIN_LOG_FORMAT` (`text` or `json`). The batch exporter
    /// reads the standard `OTEL_BSP_*` variables itself.
    pub fn from_env(service_name: &str) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        TelemetryConfig {
            service_name: service_name.to_string(),
            otlp_endpoint: var("OTEL_EXPORTER_OTLP_ENDPOINT"),
            filter: var("RUST_LOG"),
            trace_filter: var("LLMCHAIN_TRACE_FILTER"),
            log_format: var("LLMCHAIN_LOG_FORMAT").and_then(|f| f.parse().ok()).unwrap_or_default(),
        }
    }
}

/// Spans traced unless `LLMCHAIN_TRACE_FILTER` says otherwise: ours at `info` and above; the
/// transport crates' own spans (one per HTTP/2 frame or connection) stay out.
pub const DEFAULT_TRACE_FILTER: &str = "info,h2=off,hyper=off,hyper_util=off,tower=off,opentelemetry=off";

/// Flushes and shuts down span export when dropped.
#[must_use = "telemetry stops exporting when the guard is dropped"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.force_flush() {
                eprintln!("telemetry flush failed: {e}");
            }
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber, the W3C propagator and the OpenTelemetry layer; spans are
/// exported over OTLP/gRPC only when an endpoint is configured. Call it inside a tokio
/// runtime: the OTLP exporter's channel runs on it.
pub fn init(config: &TelemetryConfig) -> Result<TelemetryGuard> {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_new(config.filter.as_deref().unwrap_or("info"))
        .map_err(|e| Error::Telemetry(format!("bad log filter: {e}")))?;
    let trace_filter = EnvFilter::try_new(config.trace_filter.as_deref().unwrap_or(DEFAULT_TRACE_FILTER))
        .map_err(|e| Error::Telemetry(format!("bad trace filter: {e}")))?;
    let fmt = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).boxed(),
    };
    let resource = Resource::builder().with_service_name(config.service_name.clone()).build();
    let provider = match &config.otlp_endpoint {
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|e| Error::Telemetry(format!("otlp exporter: {e}")))?;
            SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build()
        }
        // No exporter: spans still get ids, so context read from a caller reaches the callees.
        None => SdkTracerProvider::builder().with_resource(resource).build(),
    };
    let tracer = provider.tracer(config.service_name.clone());
    global::set_tracer_provider(provider.clone());
    let otel = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(trace_filter);
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()
        .map_err(|e| Error::Telemetry(e.to_string()))?;
    Ok(TelemetryGuard { provider: Some(provider) })
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Writes the current span's trace context into outgoing gRPC metadata (client side).
pub fn inject_context(metadata: &mut tonic::metadata::MetadataMap) {
    let cx = tracing::Span::current().context();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MetadataInjector(metadata)));
}

/// Makes `span` a child of the trace context found in incoming gRPC metadata (server side).
pub fn link_parent(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    let parent = global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(metadata)));
    let _ = span.set_parent(parent);
}

/// The current span's W3C context as `(traceparent, tracestate)`, for a message that outlives
/// the call (an assignment); `None` when the current span is not traced.
pub fn current_w3c() -> Option<(String, String)> {
    let cx = tracing::Span::current().context();
    let mut carrier = HashMap::new();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    let traceparent = carrier.remove("traceparent")?;
    Some((traceparent, carrier.remove("tracestate").unwrap_or_default()))
}

/// Makes `span` a child of a W3C context carried in a message; call it before the span is
/// entered. An empty or malformed `traceparent` leaves the span a root.
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str, tracestate: &str) {
    if traceparent.is_empty() {
        return;
    }
    let mut carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    if !tracestate.is_empty() {
        carrier.insert("tracestate".to_string(), tracestate.to_string());
    }
    let parent = global::get_text_map_propagator(|p| p.extract(&carrier));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// A tonic client interceptor that injects the current trace context into every request.
#[derive(Debug, Clone, Copy, Default)]
pub struct InjectContext;

impl tonic::service::Interceptor for InjectContext {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        inject_context(req.metadata_mut());
        Ok(req)
    }
}

/// A channel whose every call carries the caller's trace context.
pub type TracedChannel = InterceptedService<tonic::transport::Channel, InjectContext>;

/// Wraps `channel` (or any gRPC client service) so that every call made through it carries
/// the current span's trace context: the one place clients add propagation.
pub fn traced<S>(channel: S) -> InterceptedService<S, InjectContext> {
    InterceptedService::new(channel, InjectContext)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_format_parses_known_values_only() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!("xml".parse::<LogFormat>().is_err());
    }

    #[test]
    fn trace_context_round_trips_through_metadata() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
        global::set_text_map_propagator(TraceContextPropagator::new());
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(sc);
        let mut md = tonic::metadata::MetadataMap::new();
        global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MetadataInjector(&mut md)));
        assert_eq!(
            md.get("traceparent").unwrap().to_str().unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let back = global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(&md)));
        assert_eq!(back.span().span_context().trace_id(), cx.span().span_context().trace_id());
    }

    #[test]
    fn a_remote_parent_from_a_message_joins_its_trace() {
        use opentelemetry::trace::TraceContextExt;
        global::set_text_map_propagator(TraceContextPropagator::new());
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")));
        tracing::subscriber::with_default(subscriber, || {
            let trace_of = |tp: &str| tp.split('-').nth(1).unwrap().to_string();
            let sender = tracing::info_span!("sender");
            let (traceparent, _) = sender.in_scope(current_w3c).expect("a traced span has a context");

            let receiver = tracing::info_span!("receiver");
            set_remote_parent(&receiver, &traceparent, "");
            let (inner, _) = receiver.in_scope(current_w3c).unwrap();
            assert_eq!(trace_of(&inner), trace_of(&traceparent));
            assert_ne!(inner, traceparent, "the receiver is a span of its own");
            assert_eq!(
                receiver.context().span().span_context().trace_id().to_string(),
                trace_of(&traceparent)
            );

            let orphan = tracing::info_span!("orphan");
            set_remote_parent(&orphan, "not-a-traceparent", "");
            let (other, _) = orphan.in_scope(current_w3c).unwrap();
            assert_ne!(trace_of(&other), trace_of(&traceparent), "a malformed context leaves a root");
        });
        assert!(tracing::info_span!("untraced").in_scope(current_w3c).is_none());
    }
}
