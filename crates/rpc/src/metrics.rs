//! Prometheus text exposition at `/metrics`, served on the same port as
//! gRPC (HTTP/1.1 is accepted for it). Each server renders its own
//! figures from the status it already keeps.

use std::fmt::Write;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Renders the server's metrics on each scrape.
pub type MetricsFn = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// Calls and handshakes this process refused, appended to every server's
/// `/metrics`.
pub fn auth_metrics() -> String {
    let mut e = Exposition::default();
    e.counter(
        "duplex_auth_refused_calls_total",
        "Calls refused for a missing, unknown or insufficient credential.",
        &[],
        crate::auth::refused_calls() as f64,
    );
    e.counter(
        "duplex_tls_refused_handshakes_total",
        "Connections refused in the TLS handshake (plaintext clients, foreign certificates).",
        &[],
        crate::auth::refused_handshakes() as f64,
    );
    e.finish()
}

/// Builds the text format, one family at a time.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// Adds one sample (with its family's HELP and TYPE on first use).
    pub fn sample(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        labels: &[(&str, &str)],
        value: f64,
    ) -> &mut Self {
        let header = format!("# TYPE {name} {kind}\n");
        if !self.out.contains(&header) {
            let _ = write!(self.out, "# HELP {name} {help}\n{header}");
        }
        self.out.push_str(name);
        if !labels.is_empty() {
            let rendered: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
                .collect();
            let _ = write!(self.out, "{{{}}}", rendered.join(","));
        }
        let _ = writeln!(self.out, " {value}");
        self
    }

    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.sample(name, "gauge", help, labels, value)
    }

    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.sample(name, "counter", help, labels, value)
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

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_once_with_escaped_labels() {
        let mut e = Exposition::default();
        e.gauge("duplex_lag", "Lag.", &[("link", "a\"b")], 3.0);
        e.gauge("duplex_lag", "Lag.", &[("link", "c")], 4.0);
        let text = e.finish();
        assert_eq!(text.matches("# TYPE duplex_lag gauge").count(), 1);
        assert!(text.contains("duplex_lag{link=\"a\\\"b\"} 3\n"));
        assert!(text.contains("duplex_lag{link=\"c\"} 4\n"));
    }
}
