//! OpenTelemetry traces: one trace per request row, from its insert to its stored
//! document, across every claim, process and restart.
//!
//! Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//! set; then spans go over OTLP/HTTP (protobuf) through a batching exporter, configured
//! by the standard `OTEL_*` variables (service name, resource attributes, headers,
//! timeout, sampler, batch sizes). Off costs nothing: no layer is installed, and the
//! spans of [`TARGET`] are disabled at their call sites.
//!
//! How one trace survives many processes: the row carries it. The first claim of a
//! worker that exports traces writes `trace_context` — a W3C traceparent naming the trace
//! (the application's, from the row's `traceparent`, or a new one) and the id of the
//! report's own span. Every claim's span, in any process, is a child of that report span;
//! the process that finishes the row exports the report span itself, with that id, from
//! the row's insert to now, as a child of the application's span when there is one. The
//! sampling decision is a function of the trace id and the application's flags, so every
//! process makes the same one.
//!
//! Spans carry the account, batch and report type, never a secret, a token or a signed
//! link: the upstream client's URLs are not recorded, and only this crate's own events
//! at `info` and above (written for logs, under the same rules) become span events.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, SdkTracer,
    SdkTracerProvider, ShouldSample,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{FilterFn, LevelFilter};
use tracing_subscriber::registry::LookupSpan;

/// The target of every span meant for traces (not for logs): `info_span!(target: TARGET,
/// …)`. The log output never shows them; the trace exporter takes only them (and the
/// events inside them).
pub const TARGET: &str = "report_worker::trace";

/// The standard variables `run` honours, beside those its flags read (docs/observability.md).
pub const VARIABLES: &[&str] = &[
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_TRACES_EXPORTER",
    "OTEL_SDK_DISABLED",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
];

/// The trace exporter of this process, once `init` installed it.
static TRACES: OnceLock<Traces> = OnceLock::new();

/// What the standard variables asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Where spans go (for messages; the exporter reads the variables itself).
    pub endpoint: String,
    pub sampler: SamplerChoice,
}

/// `OTEL_TRACES_SAMPLER` (and its `_ARG`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerChoice {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedRatio(f64),
}

impl SamplerChoice {
    fn sampler(self) -> Sampler {
        let parent = |root: Sampler| Sampler::ParentBased(Box::new(root));
        match self {
            SamplerChoice::AlwaysOn => Sampler::AlwaysOn,
            SamplerChoice::AlwaysOff => Sampler::AlwaysOff,
            SamplerChoice::Ratio(r) => Sampler::TraceIdRatioBased(r),
            SamplerChoice::ParentBasedAlwaysOn => parent(Sampler::AlwaysOn),
            SamplerChoice::ParentBasedAlwaysOff => parent(Sampler::AlwaysOff),
            SamplerChoice::ParentBasedRatio(r) => parent(Sampler::TraceIdRatioBased(r)),
        }
    }
}

/// Reads the standard `OTEL_*` variables through `var`. `Ok(None)`: traces are off (no
/// endpoint, `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`). A value this
/// process cannot honour is an error naming the variable, never a silent fallback.
pub fn settings(var: impl Fn(&str) -> Option<String>) -> Result<Option<Settings>, String> {
    let get = |name: &str| {
        var(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    if get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    match get("OTEL_TRACES_EXPORTER").as_deref() {
        None | Some("otlp") => {}
        Some("none") => return Ok(None),
        Some(other) => {
            return Err(format!(
                "OTEL_TRACES_EXPORTER={other}: report-worker exports traces over OTLP only (otlp, or none to turn them off)"
            ));
        }
    }
    let (name, endpoint) = match get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        Some(e) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", e),
        None => match get("OTEL_EXPORTER_OTLP_ENDPOINT") {
            Some(e) => ("OTEL_EXPORTER_OTLP_ENDPOINT", e),
            None => return Ok(None),
        },
    };
    match url::Url::parse(&endpoint) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => {}
        _ => {
            return Err(format!(
                "{name} must be an http:// or https:// URL (the collector's OTLP/HTTP address, e.g. http://localhost:4318), got {:?}",
                crate::config::redact_url(&endpoint)
            ));
        }
    }
    // The traces' own variable wins over the general one.
    let protocol = [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .into_iter()
    .find_map(|name| get(name).map(|p| (name, p)));
    if let Some((name, p)) = protocol
        && p != "http/protobuf"
    {
        return Err(format!(
            "{name}={p}: report-worker sends traces over OTLP/HTTP with protobuf only: set http/protobuf (the collector's port 4318) or leave it unset"
        ));
    }
    let ratio = || -> Result<f64, String> {
        match get("OTEL_TRACES_SAMPLER_ARG") {
            None => Ok(1.0),
            Some(arg) => arg
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| {
                    format!(
                        "OTEL_TRACES_SAMPLER_ARG must be a fraction from 0 to 1 (the share of reports traced), got {arg:?}"
                    )
                }),
        }
    };
    let sampler = match get("OTEL_TRACES_SAMPLER").as_deref() {
        None | Some("parentbased_always_on") => SamplerChoice::ParentBasedAlwaysOn,
        Some("always_on") => SamplerChoice::AlwaysOn,
        Some("always_off") => SamplerChoice::AlwaysOff,
        Some("traceidratio") => SamplerChoice::Ratio(ratio()?),
        Some("parentbased_always_off") => SamplerChoice::ParentBasedAlwaysOff,
        Some("parentbased_traceidratio") => SamplerChoice::ParentBasedRatio(ratio()?),
        Some(other) => {
            return Err(format!(
                "OTEL_TRACES_SAMPLER={other} is not supported: use always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
            ));
        }
    };
    Ok(Some(Settings {
        endpoint: crate::config::redact_url(&endpoint),
        sampler,
    }))
}

/// This process's exporter: the provider (flushed at shutdown), its tracer, and the
/// sampler, asked again for each report span's decision.
struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    sampler: Sampler,
}

/// Installs the exporter for `settings` and returns the `tracing` layer that feeds it:
/// spans of [`TARGET`], and events at `info` and above inside them. Must run within a
/// tokio runtime or not, either works (the exporter sends from its own thread).
pub fn init<S>(settings: &Settings) -> anyhow::Result<impl Layer<S> + Send + Sync + 'static>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    // The exporter's HTTP client (rustls) needs the process's crypto provider.
    crate::config::install_crypto_provider();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| {
            // Its message may repeat the endpoint as given, password and all.
            let mut message = e.to_string();
            for name in [
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ] {
                if let Ok(raw) = std::env::var(name)
                    && !raw.trim().is_empty()
                {
                    message = message.replace(&raw, &crate::config::redact_url(&raw));
                }
            }
            anyhow::anyhow!("cannot set up the OTLP trace exporter: {message}")
        })?;
    // Defaults for what the standard variables (read by the builder) leave unsaid.
    let given = std::env::var("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
    let says = |key: &str| {
        given
            .split(',')
            .any(|kv| kv.split('=').next().is_some_and(|k| k.trim() == key))
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() && !says("service.name") {
        resource = resource.with_service_name("report-worker");
    }
    if !says("service.version") {
        resource =
            resource.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    }
    let resource = resource.build();
    // The provider samples with it; `RowTrace::of` asks it the report span's decision.
    let sampler = settings.sampler.sampler();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(exporter).build())
        .with_sampler(sampler.clone())
        .with_id_generator(RowIds::default())
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("report-worker");
    let traces = Traces {
        provider,
        tracer: tracer.clone(),
        sampler,
    };
    if TRACES.set(traces).is_err() {
        anyhow::bail!("the trace exporter is installed already");
    }
    let ours = FilterFn::new(|meta| {
        if meta.is_span() {
            meta.target() == TARGET
        } else {
            // Only this crate's own log lines: no other crate's text (nor the exporter's
            // own messages, which would loop back) becomes a span event.
            *meta.level() <= tracing::Level::INFO && meta.target().starts_with("report_worker")
        }
    })
    .with_max_level_hint(LevelFilter::INFO);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_filter(ours);
    Ok(layer)
}

/// Whether this process exports traces.
pub fn enabled() -> bool {
    TRACES.get().is_some()
}

/// Sends what is batched and stops the exporter (at the end of `run` and `bench`): spans
/// of the last claims reach the collector before the process exits. At most 10 s.
pub async fn shutdown() {
    if TRACES.get().is_none() {
        return;
    }
    // The exporter blocks on its HTTP client: not on a runtime thread.
    let done = tokio::task::spawn_blocking(|| {
        if let Some(t) = TRACES.get()
            && let Err(e) = t.provider.shutdown_with_timeout(Duration::from_secs(10))
        {
            tracing::warn!(error = %e, "could not send the last spans to the trace collector");
        }
    });
    let _ = done.await;
}

/// The trace one row's work belongs to, from its `trace_context` and `traceparent`.
#[derive(Debug, Clone)]
pub struct RowTrace {
    /// The report's own span (remote: another process may have begun it).
    report: SpanContext,
    /// The application's span, when the row named one.
    parent: Option<SpanContext>,
}

/// Parses a W3C traceparent header value (`None` when it is not a valid one).
fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let carrier = HashMap::from([("traceparent".to_string(), value.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

impl RowTrace {
    /// The row's trace, when this process exports traces and the row has its context
    /// (every row this process claims does: the claim writes it).
    pub fn of(trace_context: Option<&str>, traceparent: Option<&str>) -> Option<RowTrace> {
        let traces = TRACES.get()?;
        let own = parse_traceparent(trace_context?)?;
        let parent = traceparent.and_then(parse_traceparent);
        // The same decision the SDK will make for the report span itself, in any process.
        let parent_cx = parent
            .clone()
            .map(|p| Context::new().with_remote_span_context(p));
        let decision = traces.sampler.should_sample(
            parent_cx.as_ref(),
            own.trace_id(),
            "report",
            &SpanKind::Internal,
            &[],
            &[],
        );
        let flags = match decision.decision {
            SamplingDecision::RecordAndSample => TraceFlags::SAMPLED,
            _ => TraceFlags::default(),
        };
        let report = SpanContext::new(
            own.trace_id(),
            own.span_id(),
            flags,
            true,
            TraceState::default(),
        );
        Some(RowTrace { report, parent })
    }

    /// The trace id, as trace tools show it.
    pub fn trace_id(&self) -> String {
        self.report.trace_id().to_string()
    }

    /// Makes `span` a child of the report's span (a span of [`TARGET`], not yet entered).
    pub fn adopt(&self, span: &tracing::Span) {
        let cx = Context::new().with_remote_span_context(self.report.clone());
        let _ = span.set_parent(cx);
    }

    /// The W3C traceparent of `span`, for an outgoing request (a webhook) to continue
    /// the trace; `None` when the span is not exported.
    pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
        let sc = span.context().span().span_context().clone();
        sc.is_valid().then(|| {
            format!(
                "00-{}-{}-{:02x}",
                sc.trace_id(),
                sc.span_id(),
                sc.trace_flags().to_u8()
            )
        })
    }

    /// Exports the report's own span, from `created_at` (the insert) to now: called by
    /// the process that finishes the row. `attributes` say how it ended.
    pub fn finish(&self, created_at: DateTime<Utc>, attributes: Vec<KeyValue>) {
        let Some(traces) = TRACES.get() else { return };
        let parent_cx = match &self.parent {
            Some(p) => Context::new().with_remote_span_context(p.clone()),
            None => Context::new(),
        };
        // The insert's time is the database's clock, the end this host's: never before it.
        let start = SystemTime::from(created_at);
        let end = SystemTime::now().max(start);
        let builder = traces
            .tracer
            .span_builder("report")
            .with_kind(SpanKind::Internal)
            .with_start_time(start)
            .with_attributes(attributes);
        // The span must have the id every claim's span already names as its parent (and,
        // when it is a root, the row's trace id): handed to the id generator for this one
        // span, on this thread.
        NEXT_IDS.with(|next| next.set(Some((self.report.trace_id(), self.report.span_id()))));
        let mut span = traces.tracer.build_with_context(builder, &parent_cx);
        NEXT_IDS.with(|next| next.set(None));
        opentelemetry::trace::Span::end_with_timestamp(&mut span, end);
    }
}

thread_local! {
    /// The ids the next span built on this thread must have (see `RowTrace::finish`).
    static NEXT_IDS: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// Random ids, except for a report span, whose ids were chosen when the row was first
/// claimed (`NEXT_IDS`).
#[derive(Debug, Default)]
struct RowIds(RandomIdGenerator);

impl IdGenerator for RowIds {
    fn new_trace_id(&self) -> TraceId {
        match NEXT_IDS.with(Cell::get) {
            Some((trace, _)) => trace,
            None => self.0.new_trace_id(),
        }
    }

    fn new_span_id(&self) -> SpanId {
        match NEXT_IDS.with(Cell::get) {
            Some((_, span)) => span,
            None => self.0.new_span_id(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn traces_are_off_unless_an_endpoint_is_set() {
        assert_eq!(settings(env(&[])), Ok(None));
        assert_eq!(
            settings(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "  ")])),
            Ok(None)
        );
        let on = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")];
        assert_eq!(
            settings(env(&on)),
            Ok(Some(Settings {
                endpoint: "http://collector:4318".into(),
                sampler: SamplerChoice::ParentBasedAlwaysOn
            }))
        );
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            assert_eq!(settings(env(&[on[0], off])), Ok(None), "{off:?}");
        }
        let traces_only = [(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "https://otlp.example/v1/traces",
        )];
        assert!(settings(env(&traces_only)).unwrap().is_some());
    }

    #[test]
    fn a_setting_it_cannot_honour_is_one_line_naming_the_variable() {
        let on = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        let cases = [
            (
                vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")],
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                vec![on, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc",
            ),
            (
                vec![on, ("OTEL_TRACES_EXPORTER", "jaeger")],
                "OTEL_TRACES_EXPORTER=jaeger",
            ),
            (
                vec![on, ("OTEL_TRACES_SAMPLER", "sometimes")],
                "OTEL_TRACES_SAMPLER=sometimes",
            ),
            (
                vec![
                    on,
                    ("OTEL_TRACES_SAMPLER", "traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "2"),
                ],
                "OTEL_TRACES_SAMPLER_ARG",
            ),
        ];
        for (vars, names) in cases {
            let e = settings(env(&vars)).unwrap_err();
            assert!(e.contains(names), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let traces_wins = [
            on,
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
        ];
        assert!(settings(env(&traces_wins)).unwrap().is_some());
        let ratio = [
            on,
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ];
        assert_eq!(
            settings(env(&ratio)).unwrap().unwrap().sampler,
            SamplerChoice::ParentBasedRatio(0.25)
        );
    }

    #[test]
    fn a_password_in_the_endpoint_is_not_repeated() {
        let e = settings(env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "ftp://user:hunter2@collector",
        )]))
        .unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn only_a_valid_w3c_traceparent_names_a_parent() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(good).unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(sc.is_sampled());
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "4bf92f3577b34da6a3ce929d0e0e4736",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }
}
