//! Prometheus metrics at `/metrics`, served on the same port as gRPC
//! (HTTP/1.1 is accepted for it), in the text format 0.0.4 that
//! `promtool check metrics` and every Prometheus read.
//!
//! Two kinds of figures: what a server reads from the state it already
//! keeps (role, lag, stored bytes) is rendered afresh on each scrape into an
//! [`Exposition`]; what the process counts as it runs (calls by method and
//! their latency, refused calls, process figures, build info) lives in one
//! process-wide registry and is appended to every scrape.
//!
//! The `prometheus` crate is used rather than `prometheus-client` because
//! the latter writes only OpenMetrics (`foo_total` under `# TYPE foo
//! counter`), which promtool's `check metrics` rejects.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Renders the server's own figures on each scrape.
pub type MetricsFn = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Exposition> + Send>> + Send + Sync>;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How many distinct RPC methods get a latency series of their own; any
/// beyond share the `method="other"` series, so a caller naming made-up
/// methods cannot grow the label set.
const MAX_METHODS: usize = 128;

/// What the process counts as it runs.
struct Process {
    registry: Registry,
    rpc_duration: HistogramVec,
    in_flight: IntGaugeVec,
    methods: Mutex<HashSet<String>>,
    refused_calls: IntCounter,
    refused_handshakes: IntCounter,
}

static PROCESS: LazyLock<Process> = LazyLock::new(|| {
    let registry = Registry::new();
    let rpc_duration = HistogramVec::new(
        HistogramOpts::new(
            "duplex_rpc_duration_seconds",
            "Time from a call's arrival to its response headers (the whole call when unary), by method.",
        )
        .buckets(vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]),
        &["method"],
    )
    .expect("static histogram options are valid");
    let in_flight = IntGaugeVec::new(
        Opts::new(
            "duplex_rpc_in_flight_calls",
            "Calls that have arrived and are not yet answered (for a call that streams its request, until it ends), by method.",
        ),
        &["method"],
    )
    .expect("static gauge options are valid");
    let refused_calls = IntCounter::new(
        "duplex_auth_refused_calls_total",
        "Calls refused for a missing, unknown or insufficient credential.",
    )
    .expect("static counter options are valid");
    let refused_handshakes = IntCounter::new(
        "duplex_tls_refused_handshakes_total",
        "Connections refused in the TLS handshake (plaintext clients, foreign certificates).",
    )
    .expect("static counter options are valid");
    let build_info = GaugeVec::new(
        Opts::new(
            "duplex_build_info",
            "Always 1; the labels name the running build.",
        ),
        &["program", "version"],
    )
    .expect("static gauge options are valid");
    build_info
        .with_label_values(&[program().as_str(), env!("CARGO_PKG_VERSION")])
        .set(1.0);
    let collectors: Vec<Box<dyn Collector>> = vec![
        Box::new(rpc_duration.clone()),
        Box::new(in_flight.clone()),
        Box::new(refused_calls.clone()),
        Box::new(refused_handshakes.clone()),
        Box::new(build_info),
        Box::new(prometheus::process_collector::ProcessCollector::for_self()),
    ];
    for collector in collectors {
        if let Err(e) = registry.register(collector) {
            tracing::error!(error = %e, "cannot register a process metric");
        }
    }
    Process {
        registry,
        rpc_duration,
        in_flight,
        methods: Mutex::new(HashSet::new()),
        refused_calls,
        refused_handshakes,
    }
});

fn program() -> String {
    std::env::args()
        .next()
        .as_deref()
        .map(std::path::Path::new)
        .and_then(|p| p.file_name())
        .map_or_else(|| "unknown".to_owned(), |n| n.to_string_lossy().into_owned())
}

/// The label `method`'s series go under: its own name while fewer than
/// [`MAX_METHODS`] are known, else `other`.
fn method_label(method: &str) -> &str {
    let mut methods = PROCESS
        .methods
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let known =
        methods.contains(method) || (methods.len() < MAX_METHODS && methods.insert(method.to_owned()));
    if known { method } else { "other" }
}

/// Records how long a call to `method` took.
pub fn observe_rpc(method: &str, elapsed: Duration) {
    PROCESS
        .rpc_duration
        .with_label_values(&[method_label(method)])
        .observe(elapsed.as_secs_f64());
}

/// Counts a call to `method` as in flight until the returned guard is
/// dropped, which also covers a call whose future is dropped unanswered.
pub fn call_in_flight(method: &str) -> InFlight {
    let gauge = PROCESS.in_flight.with_label_values(&[method_label(method)]);
    gauge.inc();
    InFlight(gauge)
}

/// One call counted in `duplex_rpc_in_flight_calls`.
pub struct InFlight(IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts a call refused for its credential.
pub fn refused_call() {
    PROCESS.refused_calls.inc();
}

/// Counts a connection refused in the TLS handshake.
pub fn refused_handshake() {
    PROCESS.refused_handshakes.inc();
}

/// A server's own figures for one scrape. Each family is created on first
/// use with the label names of that use, so families are never interleaved
/// and a family's HELP and TYPE appear once.
#[derive(Default)]
pub struct Exposition {
    gauges: BTreeMap<String, GaugeVec>,
    counters: BTreeMap<String, CounterVec>,
}

impl Exposition {
    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        if let Some(g) = series(&mut self.gauges, GaugeVec::new, name, help, labels) {
            g.set(value);
        }
        self
    }

    /// A counter's running total, as the server keeps it (never negative).
    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], total: f64) -> &mut Self {
        if let Some(c) = series(&mut self.counters, CounterVec::new, name, help, labels) {
            c.inc_by(total.max(0.0));
        }
        self
    }

    /// The three lag gauges every replicated thing reports.
    pub fn lag(&mut self, labels: &[(&str, &str)], lag: &duplex_proto::v1::Lag) -> &mut Self {
        self.gauge(
            "duplex_lag_records",
            "Records behind the source.",
            labels,
            lag.records as f64,
        );
        self.gauge(
            "duplex_lag_bytes",
            "Bytes behind the source.",
            labels,
            lag.bytes as f64,
        );
        self.gauge(
            "duplex_lag_seconds",
            "Seconds behind the source.",
            labels,
            lag.seconds,
        )
    }

    fn families(&self) -> Vec<prometheus::proto::MetricFamily> {
        let gauges = self.gauges.values().flat_map(Collector::collect);
        let counters = self.counters.values().flat_map(Collector::collect);
        gauges.chain(counters).collect()
    }
}

/// The series `labels` names in family `name`, creating the family on
/// first use. Names and label sets are fixed in the code, so a mismatch is
/// a bug: it is logged and the sample dropped rather than failing a scrape.
fn series<B: MetricVecBuilder>(
    families: &mut BTreeMap<String, MetricVec<B>>,
    new: fn(Opts, &[&str]) -> prometheus::Result<MetricVec<B>>,
    name: &str,
    help: &str,
    labels: &[(&str, &str)],
) -> Option<B::M> {
    if !families.contains_key(name) {
        let names: Vec<&str> = labels.iter().map(|(k, _)| *k).collect();
        match new(Opts::new(name, help), &names) {
            Ok(family) => families.insert(name.to_owned(), family),
            Err(e) => {
                tracing::error!(metric = name, error = %e, "not a valid metric family");
                return None;
            }
        };
    }
    let family = families.get(name)?;
    family
        .get_metric_with_label_values(&values(labels))
        .inspect_err(|e| tracing::error!(metric = name, error = %e, "metric labels do not match the family"))
        .ok()
}

fn values<'a>(labels: &[(&'a str, &'a str)]) -> Vec<&'a str> {
    labels.iter().map(|(_, v)| *v).collect()
}

/// The whole scrape: the server's figures and the process's, sorted by
/// family name, in the text format.
pub fn render(exposition: &Exposition) -> String {
    let mut families = exposition.families();
    families.extend(PROCESS.registry.gather());
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_once_with_escaped_labels() {
        let mut e = Exposition::default();
        e.gauge("duplex_lag", "Lag.", &[("link", "a\"b")], 3.0);
        e.counter("duplex_things_total", "Things.", &[("kind", "x")], 5.0);
        e.gauge("duplex_lag", "Lag.", &[("link", "c")], 4.0);
        observe_rpc("/duplex.v1.Test/Call", Duration::from_millis(3));
        let text = render(&e);
        assert_eq!(text.matches("# TYPE duplex_lag gauge").count(), 1);
        assert!(text.contains("duplex_lag{link=\"a\\\"b\"} 3\n"), "{text}");
        assert!(text.contains("duplex_lag{link=\"c\"} 4\n"), "{text}");
        assert!(text.contains("duplex_things_total{kind=\"x\"} 5\n"), "{text}");
        // Another test may have filled the method set first: then it is "other".
        assert!(
            text.contains("duplex_rpc_duration_seconds_count{method="),
            "{text}"
        );
        assert!(text.contains("duplex_build_info{program="), "{text}");
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }

    #[test]
    fn a_call_is_in_flight_until_its_guard_is_dropped() {
        let count = || {
            render(&Exposition::default())
                .lines()
                .find_map(|l| l.strip_prefix("duplex_rpc_in_flight_calls{method=\"/duplex.v1.Test/Long\"} "))
                .map(|n| n.to_owned())
        };
        let first = call_in_flight("/duplex.v1.Test/Long");
        let second = call_in_flight("/duplex.v1.Test/Long");
        assert_eq!(count().as_deref(), Some("2"));
        drop(first);
        assert_eq!(count().as_deref(), Some("1"));
        drop(second);
        assert_eq!(count().as_deref(), Some("0"));
    }

    #[test]
    fn made_up_methods_share_one_series() {
        for i in 0..MAX_METHODS + 50 {
            observe_rpc(&format!("/made.up/M{i}"), Duration::from_millis(1));
        }
        let text = render(&Exposition::default());
        let series = text
            .lines()
            .filter(|l| l.starts_with("duplex_rpc_duration_seconds_count"))
            .count();
        assert!(series <= MAX_METHODS + 1, "{series} series");
        assert!(text.contains("duplex_rpc_duration_seconds_count{method=\"other\"}"));
    }
}
