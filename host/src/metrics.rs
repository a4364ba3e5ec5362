//! Prometheus metrics: calls per role, state operations per role and
//! operation, backend latency, instances in flight.

use crate::backend::Health;
use crate::error::StateResult;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Every metric rolehost exports, in one registry.
pub struct Metrics {
    registry: Registry,
    /// Calls by role and outcome (`ok` or a `CallError` kind).
    pub calls: IntCounterVec,
    /// Call latency by role, seconds.
    pub call_seconds: HistogramVec,
    /// Calls running now, by role.
    pub in_flight: IntGaugeVec,
    /// State operations by role and operation.
    pub ops: IntCounterVec,
    /// Reads that found a value, by role and operation.
    pub hits: IntCounterVec,
    /// Reads that found nothing, by role and operation.
    pub misses: IntCounterVec,
    /// Failed state operations by role, operation and error kind.
    pub op_errors: IntCounterVec,
    /// Value bytes read, by role.
    pub bytes_read: IntCounterVec,
    /// Value bytes written, by role.
    pub bytes_written: IntCounterVec,
    /// Backend latency by operation, seconds.
    pub backend_seconds: HistogramVec,
    /// Fire-and-forget writes by role and outcome (`sent` or `failed`).
    pub deferred_writes: IntCounterVec,
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let metric =
                HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };
        let call_buckets = vec![0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0];
        let backend_buckets = vec![0.00002, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.25, 1.0];
        let in_flight = IntGaugeVec::new(Opts::new("rolehost_calls_in_flight", "Calls running now"), &["role"])
            .expect("valid metric");
        registry.register(Box::new(in_flight.clone())).expect("unique metric");
        Self {
            calls: counter("rolehost_calls_total", "Role calls by outcome", &["role", "outcome"]),
            call_seconds: histogram("rolehost_call_seconds", "Role call latency", &["role"], call_buckets),
            in_flight,
            ops: counter("rolehost_state_ops_total", "State operations", &["role", "op"]),
            hits: counter("rolehost_state_hits_total", "Reads that found a value", &["role", "op"]),
            misses: counter("rolehost_state_misses_total", "Reads that found nothing", &["role", "op"]),
            op_errors: counter("rolehost_state_errors_total", "Failed state operations", &["role", "op", "kind"]),
            bytes_read: counter("rolehost_state_read_bytes_total", "Value bytes read", &["role"]),
            bytes_written: counter("rolehost_state_written_bytes_total", "Value bytes written", &["role"]),
            deferred_writes: counter(
                "rolehost_deferred_writes_total",
                "Fire-and-forget writes sent after their call, by outcome",
                &["role", "outcome"],
            ),
            backend_seconds: histogram("rolehost_backend_seconds", "Backend latency", &["op"], backend_buckets),
            registry,
        }
    }

    /// Everything in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding our own well-formed metrics into memory cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// What a backend's health report says, as Prometheus text: whether it
/// answered (`rolehost_backend_up`) and its server figures (memory,
/// clients, keyspace hits and misses, expired and evicted keys), read
/// afresh at each scrape.
pub fn render_backend(health: &StateResult<Health>) -> String {
    // (detail, metric, type, help); the memory store and Redis name some alike.
    const FIGURES: &[(&str, &str, &str, &str)] = &[
        ("used_memory", "rolehost_backend_used_memory_bytes", "gauge", "Memory the store uses"),
        ("used_bytes", "rolehost_backend_used_memory_bytes", "gauge", "Memory the store uses"),
        ("max_bytes", "rolehost_backend_max_memory_bytes", "gauge", "The store's size limit"),
        ("maxmemory", "rolehost_backend_max_memory_bytes", "gauge", "The store's size limit"),
        ("keys", "rolehost_backend_keys", "gauge", "Keys in the store"),
        ("connected_clients", "rolehost_backend_connected_clients", "gauge", "Clients connected to Redis"),
        ("keyspace_hits", "rolehost_backend_keyspace_hits_total", "counter", "Redis lookups that found a key"),
        ("keyspace_misses", "rolehost_backend_keyspace_misses_total", "counter", "Redis lookups that found none"),
        ("expired_keys", "rolehost_backend_expired_keys_total", "counter", "Keys Redis expired"),
        ("evicted_keys", "rolehost_backend_evicted_keys_total", "counter", "Keys Redis evicted for memory"),
    ];
    let mut out = String::from(
        "# HELP rolehost_backend_up Whether the state backend answered\n# TYPE rolehost_backend_up gauge\n",
    );
    out += &format!("rolehost_backend_up {}\n", u8::from(health.is_ok()));
    if let Ok(health) = health {
        for (detail, metric, kind, help) in FIGURES {
            let value = health.details.get(*detail).and_then(|v| v.parse::<u64>().ok());
            // Redis's maxmemory 0 means no limit: nothing to show.
            if let Some(value) = value.filter(|&v| v > 0 || *detail != "maxmemory") {
                out += &format!("# HELP {metric} {help}\n# TYPE {metric} {kind}\n{metric} {value}\n");
            }
        }
    }
    out
}

/// The connections each of `serve`'s worker threads serves now
/// (`rolehost_worker_connections`, by worker index), as Prometheus text.
pub fn render_workers(connections: &[usize]) -> String {
    let metric = "rolehost_worker_connections";
    let mut out = format!("# HELP {metric} Connections each worker thread serves now\n# TYPE {metric} gauge\n");
    for (worker, count) in connections.iter().enumerate() {
        out += &format!("{metric}{{worker=\"{worker}\"}} {count}\n");
    }
    out
}

/// One role's call metrics, looked up once when the role is loaded rather
/// than by label on every call.
pub struct RoleMetrics {
    /// Calls running now.
    pub in_flight: IntGauge,
    /// Call latency, seconds.
    pub call_seconds: Histogram,
    /// Calls that succeeded.
    pub calls_ok: IntCounter,
}

impl Metrics {
    /// The call metrics of `role`.
    pub fn role(&self, role: &str) -> RoleMetrics {
        RoleMetrics {
            in_flight: self.in_flight.with_label_values(&[role]),
            call_seconds: self.call_seconds.with_label_values(&[role]),
            calls_ok: self.calls.with_label_values(&[role, "ok"]),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::StateError;

    #[test]
    fn backend_figures_become_metrics() {
        let details = [("keys", "3"), ("used_bytes", "300"), ("max_bytes", "1000"), ("topology", "single")];
        let health = Health { kind: "memory", details: details.map(|(k, v)| (k.to_owned(), v.to_owned())).into() };
        let text = render_backend(&Ok(health));
        for line in [
            "rolehost_backend_up 1",
            "rolehost_backend_keys 3",
            "rolehost_backend_used_memory_bytes 300",
            "rolehost_backend_max_memory_bytes 1000",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from {text}");
        }
        assert!(!text.contains("topology"), "only numbers");
        let down = render_backend(&Err(StateError::Unavailable("gone".into())));
        assert!(down.lines().any(|l| l == "rolehost_backend_up 0"), "{down}");
    }
}
