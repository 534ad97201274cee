//! Every metric ficus exports, in one struct registered against an injected [`Registry`] so
//! that each test (and each `App`) has its own counters. Labels come only from config names
//! (`route`, `upstream`) or closed sets (`method`, `code`, `kind`): never from a raw path.

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Why ficus, not the upstream, failed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// The upstream refused the connection or could not be reached in `connect_timeout`.
    Connect,
    /// No response headers within `timeout`.
    Timeout,
    /// The upstream closed or reset the connection before a complete response.
    Reset,
    /// No body bytes in either direction for `idle_timeout`.
    Idle,
    /// The upstream answered something that is not HTTP/1.1.
    Protocol,
}

impl UpstreamErrorKind {
    pub const ALL: [UpstreamErrorKind; 5] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Reset,
        UpstreamErrorKind::Idle,
        UpstreamErrorKind::Protocol,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::Idle => "idle_timeout",
            UpstreamErrorKind::Protocol => "protocol",
        }
    }
}

#[derive(Clone)]
pub struct Metrics {
    pub requests_total: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_request_duration: HistogramVec,
    pub upstream_errors_total: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub events_emitted_total: IntCounterVec,
    pub events_delivered_total: IntCounterVec,
    pub event_delivery_failures_total: IntCounterVec,
    pub events_dead_lettered_total: IntCounterVec,
    pub events_dropped_total: IntCounterVec,
    pub outbox_pending_events: IntGaugeVec,
    pub outbox_bytes: prometheus::IntGauge,
    pub outbox_unflushed_events: prometheus::IntGauge,
    pub event_delivery_lag_seconds: prometheus::GaugeVec,
    pub route_fallbacks_total: IntCounterVec,
    pub shadow_comparisons_total: IntCounterVec,
    pub shadow_dropped_total: IntCounterVec,
    /// `ficus_config_reloads_total{result}`: `ok` and `error` exist from the start.
    pub config_reloads_total: IntCounterVec,
    /// Every family above, for [`render`] to declare those that have no series yet.
    pub families: std::sync::Arc<[Family]>,
}

/// A metric family's name, help and type: what `# HELP` and `# TYPE` say.
#[derive(Debug, Clone)]
pub struct Family {
    name: String,
    help: String,
    kind: &'static str,
}

impl Family {
    fn of(collector: &dyn prometheus::core::Collector, kind: &'static str) -> Vec<Family> {
        collector
            .desc()
            .into_iter()
            .map(|d| Family {
                name: d.fq_name.clone(),
                help: d.help.replace('\\', "\\\\").replace('\n', "\\n"),
                kind,
            })
            .collect()
    }
}

/// Why an event that a rule produced (or would have) did not reach the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// `when_full: drop` and the outbox had no room.
    OutboxFull,
    /// The outbox could not write (disk error).
    OutboxError,
    /// The rule's `if` failed to evaluate.
    ConditionError,
    /// The rule's `type` evaluated to nothing.
    MissingType,
}

impl DropReason {
    pub const ALL: [DropReason; 4] = [
        DropReason::OutboxFull,
        DropReason::OutboxError,
        DropReason::ConditionError,
        DropReason::MissingType,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::OutboxFull => "outbox_full",
            DropReason::OutboxError => "outbox_error",
            DropReason::ConditionError => "condition_error",
            DropReason::MissingType => "missing_type",
        }
    }
}

/// Latency buckets from 0.5 ms to about 65 s: a sidecar adds well under a millisecond, and an
/// upstream may take its whole `timeout`.
fn latency_buckets() -> Vec<f64> {
    // 0.0005 * 2^17 = 65.5 s; constant inputs, so this cannot fail.
    exponential_buckets(0.0005, 2.0, 18).unwrap_or_else(|_| vec![0.001, 0.01, 0.1, 1.0, 10.0])
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Metrics, prometheus::Error> {
        let requests_total = IntCounterVec::new(
            Opts::new(
                "ficus_requests_total",
                "Requests answered, by route, method and status code.",
            ),
            &["route", "method", "code"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "ficus_request_duration_seconds",
                "Time from request head received to response body finished, by route.",
            )
            .buckets(latency_buckets()),
            &["route"],
        )?;
        let upstream_request_duration = HistogramVec::new(
            HistogramOpts::new(
                "ficus_upstream_request_duration_seconds",
                "Time from forwarding a request to the upstream's response headers, by upstream.",
            )
            .buckets(latency_buckets()),
            &["upstream"],
        )?;
        let upstream_errors_total = IntCounterVec::new(
            Opts::new(
                "ficus_upstream_errors_total",
                "Requests ficus failed because of the upstream, by upstream and kind.",
            ),
            &["upstream", "kind"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "ficus_build_info",
                "Always 1; the version of this ficus build.",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let events_emitted_total = IntCounterVec::new(
            Opts::new(
                "ficus_events_emitted_total",
                "Events rules produced and the outbox accepted, by rule.",
            ),
            &["rule"],
        )?;
        let events_delivered_total = IntCounterVec::new(
            Opts::new(
                "ficus_events_delivered_total",
                "Events a sink accepted, by sink.",
            ),
            &["sink"],
        )?;
        let event_delivery_failures_total = IntCounterVec::new(
            Opts::new(
                "ficus_event_delivery_failures_total",
                "Failed delivery attempts, by sink.",
            ),
            &["sink"],
        )?;
        let events_dead_lettered_total = IntCounterVec::new(
            Opts::new(
                "ficus_events_dead_lettered_total",
                "Events a sink refused for good, moved to its dead letters.",
            ),
            &["sink"],
        )?;
        let events_dropped_total = IntCounterVec::new(
            Opts::new(
                "ficus_events_dropped_total",
                "Events not written to the outbox, by reason.",
            ),
            &["reason"],
        )?;
        for reason in DropReason::ALL {
            events_dropped_total.with_label_values(&[reason.as_str()]);
        }
        let outbox_pending_events = IntGaugeVec::new(
            Opts::new(
                "ficus_outbox_pending_events",
                "Events in the outbox not yet passed by the sink's cursor.",
            ),
            &["sink"],
        )?;
        let outbox_bytes =
            prometheus::IntGauge::new("ficus_outbox_bytes", "Bytes of outbox segments on disk.")?;
        let outbox_unflushed_events = prometheus::IntGauge::new(
            "ficus_outbox_unflushed_events",
            "Events accepted but not yet fsynced: what a crash now could lose in async durability.",
        )?;
        let event_delivery_lag_seconds = prometheus::GaugeVec::new(
            Opts::new(
                "ficus_event_delivery_lag_seconds",
                "Age of the oldest event the sink has not yet taken.",
            ),
            &["sink"],
        )?;
        registry.register(Box::new(requests_total.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(upstream_request_duration.clone()))?;
        registry.register(Box::new(upstream_errors_total.clone()))?;
        registry.register(Box::new(build_info.clone()))?;
        let route_fallbacks_total = IntCounterVec::new(
            Opts::new(
                "ficus_route_fallbacks_total",
                "Requests sent again to the route's fallback upstream.",
            ),
            &["route"],
        )?;
        let shadow_comparisons_total = IntCounterVec::new(
            Opts::new(
                "ficus_shadow_comparisons_total",
                "Shadow responses compared with the primary's, by route and result; error: a sampled copy that gave no comparison (not sent, failed or timed out), with or without compare.",
            ),
            &["route", "result"],
        )?;
        let shadow_dropped_total = IntCounterVec::new(
            Opts::new(
                "ficus_shadow_dropped_total",
                "Shadow copies sampled but not sent: the route's max_in_flight was reached, the request body was too long to keep (over 64 KiB) or could not be read, or the primary gave no response.",
            ),
            &["route"],
        )?;
        let config_reloads_total = IntCounterVec::new(
            Opts::new(
                "ficus_config_reloads_total",
                "Config reloads (file change or SIGHUP), by result: ok, or error when the new config was refused.",
            ),
            &["result"],
        )?;
        for result in ["ok", "error"] {
            config_reloads_total.with_label_values(&[result]);
        }
        registry.register(Box::new(config_reloads_total.clone()))?;
        registry.register(Box::new(route_fallbacks_total.clone()))?;
        registry.register(Box::new(shadow_comparisons_total.clone()))?;
        registry.register(Box::new(shadow_dropped_total.clone()))?;
        registry.register(Box::new(events_emitted_total.clone()))?;
        registry.register(Box::new(events_delivered_total.clone()))?;
        registry.register(Box::new(event_delivery_failures_total.clone()))?;
        registry.register(Box::new(events_dead_lettered_total.clone()))?;
        registry.register(Box::new(events_dropped_total.clone()))?;
        registry.register(Box::new(outbox_pending_events.clone()))?;
        registry.register(Box::new(outbox_bytes.clone()))?;
        registry.register(Box::new(outbox_unflushed_events.clone()))?;
        registry.register(Box::new(event_delivery_lag_seconds.clone()))?;
        let families: Vec<Family> = [
            Family::of(&requests_total, "counter"),
            Family::of(&request_duration, "histogram"),
            Family::of(&upstream_request_duration, "histogram"),
            Family::of(&upstream_errors_total, "counter"),
            Family::of(&build_info, "gauge"),
            Family::of(&events_emitted_total, "counter"),
            Family::of(&events_delivered_total, "counter"),
            Family::of(&event_delivery_failures_total, "counter"),
            Family::of(&events_dead_lettered_total, "counter"),
            Family::of(&events_dropped_total, "counter"),
            Family::of(&outbox_pending_events, "gauge"),
            Family::of(&outbox_bytes, "gauge"),
            Family::of(&outbox_unflushed_events, "gauge"),
            Family::of(&event_delivery_lag_seconds, "gauge"),
            Family::of(&route_fallbacks_total, "counter"),
            Family::of(&shadow_comparisons_total, "counter"),
            Family::of(&shadow_dropped_total, "counter"),
            Family::of(&config_reloads_total, "counter"),
        ]
        .concat();
        Ok(Metrics {
            requests_total,
            request_duration,
            upstream_request_duration,
            upstream_errors_total,
            build_info,
            events_emitted_total,
            events_delivered_total,
            event_delivery_failures_total,
            events_dead_lettered_total,
            events_dropped_total,
            outbox_pending_events,
            outbox_bytes,
            outbox_unflushed_events,
            event_delivery_lag_seconds,
            route_fallbacks_total,
            shadow_comparisons_total,
            shadow_dropped_total,
            config_reloads_total,
            families: families.into(),
        })
    }

    /// Creates every labelled series of an upstream at zero, so that dashboards and alerts see
    /// the series before the first error.
    pub fn for_upstream(&self, upstream: &str) -> UpstreamMetrics {
        let errors = UpstreamErrorKind::ALL.map(|k| {
            self.upstream_errors_total
                .with_label_values(&[upstream, k.as_str()])
        });
        UpstreamMetrics {
            duration: self
                .upstream_request_duration
                .with_label_values(&[upstream]),
            errors,
        }
    }
}

impl Metrics {
    pub fn dropped(&self, reason: DropReason, n: u64) {
        self.events_dropped_total
            .with_label_values(&[reason.as_str()])
            .inc_by(n);
    }

    /// Drops the gauge series of a sink that left the config. Nothing updates them once its
    /// dispatcher has stopped, and a gauge keeps its last value: a removed sink would show a
    /// backlog and a lag frozen in time. Its counters stay, as Prometheus counters do; all of
    /// its series come back with [`Metrics::for_sink`] when a sink of that name returns.
    pub fn forget_sink(&self, sink: &str) {
        // An error only means the series did not exist.
        let _ = self.outbox_pending_events.remove_label_values(&[sink]);
        let _ = self.event_delivery_lag_seconds.remove_label_values(&[sink]);
    }

    /// A sink's series, resolved once and created at zero.
    pub fn for_sink(&self, sink: &str) -> crate::dispatch::SinkMetrics {
        crate::dispatch::SinkMetrics {
            delivered: self.events_delivered_total.with_label_values(&[sink]),
            failures: self
                .event_delivery_failures_total
                .with_label_values(&[sink]),
            dead_lettered: self.events_dead_lettered_total.with_label_values(&[sink]),
            pending: self.outbox_pending_events.with_label_values(&[sink]),
            lag_seconds: self.event_delivery_lag_seconds.with_label_values(&[sink]),
        }
    }
}

/// One upstream's series, resolved once so that the request path does no label lookup.
#[derive(Clone)]
pub struct UpstreamMetrics {
    pub duration: Histogram,
    errors: [prometheus::IntCounter; 5],
}

impl UpstreamMetrics {
    pub fn error(&self, kind: UpstreamErrorKind) {
        self.counter(kind).inc();
    }

    pub fn counter(&self, kind: UpstreamErrorKind) -> &prometheus::IntCounter {
        let i = UpstreamErrorKind::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(0);
        &self.errors[i]
    }
}

/// The Prometheus text exposition of `registry`.
pub fn render(registry: &Registry, families: &[Family]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(8 * 1024);
    let encoder = TextEncoder::new();
    let gathered = registry.gather();
    if let Err(e) = encoder.encode(&gathered, &mut buf) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    // A family with no series yet (no request so far, no route with a fallback or a shadow)
    // is left out by the encoder; its HELP and TYPE lines say that ficus has it.
    for family in families {
        if !gathered.iter().any(|g| g.name() == family.name) {
            let Family { name, help, kind } = family;
            buf.extend_from_slice(
                format!("# HELP {name} {help}\n# TYPE {name} {kind}\n").as_bytes(),
            );
        }
    }
    buf
}
