//! Metrics in the Prometheus text format: calls per role, state
//! operations per role and operation, backend latency, calls in flight.
//!
//! Every call counts several of them on whichever thread runs it. Were each
//! value one atomic, the threads would pass its cache line to and fro on
//! every count (on 2 cores, a sixth of a warm call on the memory store and a
//! tenth of one on Redis went to that). So each value is kept in shards, one
//! per thread up to twice the cores (`shards.rs`); a scrape adds them up.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::Health;
use crate::error::StateResult;
use crate::shards::Sharded;

/// Every metric rolehost exports.
pub struct Metrics {
    /// Calls by role and outcome (`ok` or a `CallError` kind).
    pub calls: Family<Counter>,
    /// Call latency by role.
    pub call_seconds: Family<Histogram>,
    /// Calls running now, by role.
    pub in_flight: Family<Gauge>,
    /// State operations by role and operation.
    pub ops: Family<Counter>,
    /// Reads that found a value, by role and operation.
    pub hits: Family<Counter>,
    /// Reads that found nothing, by role and operation.
    pub misses: Family<Counter>,
    /// Failed state operations by role, operation and error kind.
    pub op_errors: Family<Counter>,
    /// Value bytes read, by role.
    pub bytes_read: Family<Counter>,
    /// Value bytes written, by role.
    pub bytes_written: Family<Counter>,
    /// Backend latency by operation.
    pub backend_seconds: Family<Histogram>,
    /// Fire-and-forget writes by role and outcome (`sent` or `failed`).
    pub deferred_writes: Family<Counter>,
}

const CALL_BUCKETS: &[f64] = &[0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0];
const BACKEND_BUCKETS: &[f64] = &[0.00002, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.25, 1.0];
const _: () = assert!(CALL_BUCKETS.len() <= MAX_BOUNDS && BACKEND_BUCKETS.len() <= MAX_BOUNDS);

impl Metrics {
    /// Every metric, none counted yet.
    pub fn new() -> Self {
        let counter = |name, help, labels| Family::new(name, help, labels, Counter::default);
        let histogram = |name, help, labels, buckets: &'static [f64]| {
            Family::new(name, help, labels, move || Histogram::new(buckets))
        };
        Self {
            calls: counter("rolehost_calls_total", "Role calls by outcome", &["role", "outcome"]),
            call_seconds: histogram("rolehost_call_seconds", "Role call latency", &["role"], CALL_BUCKETS),
            in_flight: Family::new("rolehost_calls_in_flight", "Calls running now", &["role"], Gauge::default),
            ops: counter("rolehost_state_ops_total", "State operations", &["role", "op"]),
            hits: counter("rolehost_state_hits_total", "Reads that found a value", &["role", "op"]),
            misses: counter("rolehost_state_misses_total", "Reads that found nothing", &["role", "op"]),
            op_errors: counter("rolehost_state_errors_total", "Failed state operations", &["role", "op", "kind"]),
            bytes_read: counter("rolehost_state_read_bytes_total", "Value bytes read", &["role"]),
            bytes_written: counter("rolehost_state_written_bytes_total", "Value bytes written", &["role"]),
            backend_seconds: histogram("rolehost_backend_seconds", "Backend latency", &["op"], BACKEND_BUCKETS),
            deferred_writes: counter(
                "rolehost_deferred_writes_total",
                "Fire-and-forget writes sent after their call, by outcome",
                &["role", "outcome"],
            ),
        }
    }

    /// Everything in the Prometheus text format, families by name.
    pub fn render(&self) -> String {
        let mut families: [&dyn Render; 11] = [
            &self.calls,
            &self.call_seconds,
            &self.in_flight,
            &self.ops,
            &self.hits,
            &self.misses,
            &self.op_errors,
            &self.bytes_read,
            &self.bytes_written,
            &self.backend_seconds,
            &self.deferred_writes,
        ];
        families.sort_by_key(|family| family.name());
        let mut out = String::new();
        for family in families {
            family.render(&mut out);
        }
        out
    }
}

/// One metric by name, a value for each set of label values.
pub struct Family<M> {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    /// The labels' indices sorted by name: members are keyed, and their
    /// labels written, in that order, as Prometheus's own clients do.
    order: Vec<usize>,
    new: Box<dyn Fn() -> M + Send + Sync>,
    members: Mutex<BTreeMap<Vec<String>, M>>,
}

impl<M: Metric> Family<M> {
    fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        new: impl Fn() -> M + Send + Sync + 'static,
    ) -> Self {
        let mut order: Vec<usize> = (0..labels.len()).collect();
        order.sort_by_key(|&i| labels[i]);
        Self { name, help, labels, order, new: Box::new(new), members: Mutex::default() }
    }

    /// The value for these label values (in the order the family names its
    /// labels), made at first use. Takes a lock: look a value up once and
    /// keep it where it is counted often.
    pub fn with_label_values(&self, values: &[&str]) -> M {
        assert_eq!(values.len(), self.labels.len(), "{}: label values", self.name);
        let key: Vec<String> = self.order.iter().map(|&i| values[i].to_owned()).collect();
        let mut members = self.members.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        members.entry(key).or_insert_with(|| (self.new)()).clone()
    }
}

/// A family as text.
trait Render {
    fn name(&self) -> &'static str;
    fn render(&self, out: &mut String);
}

impl<M: Metric> Render for Family<M> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn render(&self, out: &mut String) {
        let members = self.members.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        if members.is_empty() {
            return;
        }
        let (name, help, kind) = (self.name, self.help, M::KIND);
        header(out, name, help, kind);
        for (values, metric) in &members {
            let labels: Vec<String> = self
                .order
                .iter()
                .zip(values)
                .map(|(&i, value)| format!("{}=\"{}\"", self.labels[i], escape(value)))
                .collect();
            metric.write(out, name, &labels);
        }
    }
}

/// A label value as the text format quotes it.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// `{a="1",b="2"}` of `labels` and `more`, or nothing for none.
fn braced(labels: &[String], more: Option<&str>) -> String {
    let all: Vec<&str> = labels.iter().map(String::as_str).chain(more).collect();
    match all.is_empty() {
        true => String::new(),
        false => format!("{{{}}}", all.join(",")),
    }
}

/// What a family holds for each set of label values.
pub trait Metric: Clone + Send + 'static {
    /// The word on the family's `# TYPE` line.
    const KIND: &'static str;
    /// This value's lines, for `name` and `labels` (each written `a="1"`).
    fn write(&self, out: &mut String, name: &str, labels: &[String]);
}

/// A count that only goes up.
#[derive(Clone, Default)]
pub struct Counter(Arc<Sharded<AtomicU64>>);

impl Counter {
    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, n: u64) {
        self.0.mine().fetch_add(n, Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.all().map(|count| count.load(Relaxed)).sum()
    }
}

impl Metric for Counter {
    const KIND: &'static str = "counter";

    fn write(&self, out: &mut String, name: &str, labels: &[String]) {
        write_sample(out, name, labels, self.get());
    }
}

/// One line: `name{labels} value`.
fn write_sample(out: &mut String, name: &str, labels: &[String], value: impl std::fmt::Display) {
    let _ = writeln!(out, "{name}{} {value}", braced(labels, None));
}

/// A count of things there are now (calls in flight), up and down. A
/// thread may count one down that another counted up: only the sum of the
/// shards means anything, and read while both change it may be one below
/// what it was, so it is read as at least 0.
#[derive(Clone, Default)]
pub struct Gauge(Arc<Sharded<AtomicI64>>);

impl Gauge {
    pub fn inc(&self) {
        self.0.mine().fetch_add(1, Relaxed);
    }

    pub fn dec(&self) {
        self.0.mine().fetch_sub(1, Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.all().map(|count| count.load(Relaxed)).sum::<i64>().max(0)
    }
}

impl Metric for Gauge {
    const KIND: &'static str = "gauge";

    fn write(&self, out: &mut String, name: &str, labels: &[String]) {
        write_sample(out, name, labels, self.get());
    }
}

/// Most bounds a histogram may have.
const MAX_BOUNDS: usize = 15;

/// Durations counted by the first of `bounds` (seconds) they are within.
#[derive(Clone)]
pub struct Histogram(Arc<HistogramCells>);

struct HistogramCells {
    bounds: &'static [f64],
    tallies: Sharded<Tally>,
}

/// One shard of a histogram: a count per bound and one past the last, and
/// the nanoseconds observed.
#[derive(Default)]
struct Tally {
    counts: [AtomicU64; MAX_BOUNDS + 1],
    nanos: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        assert!(bounds.len() <= MAX_BOUNDS, "at most {MAX_BOUNDS} bounds");
        Self(Arc::new(HistogramCells { bounds, tallies: Sharded::default() }))
    }

    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = self.0.bounds.iter().position(|&bound| seconds <= bound).unwrap_or(self.0.bounds.len());
        let tally = self.0.tallies.mine();
        tally.counts[bucket].fetch_add(1, Relaxed);
        tally.nanos.fetch_add(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }
}

impl Metric for Histogram {
    const KIND: &'static str = "histogram";

    fn write(&self, out: &mut String, name: &str, labels: &[String]) {
        let (bounds, tallies) = (self.0.bounds, &self.0.tallies);
        let le = |bound: &str| braced(labels, Some(&format!("le=\"{bound}\"")));
        let plain = braced(labels, None);
        let count = |bucket: usize| -> u64 { tallies.all().map(|tally| tally.counts[bucket].load(Relaxed)).sum() };
        let mut total = 0;
        for (bucket, bound) in bounds.iter().enumerate() {
            total += count(bucket);
            let _ = writeln!(out, "{name}_bucket{} {total}", le(&bound.to_string()));
        }
        total += count(bounds.len());
        let nanos: u64 = tallies.all().map(|tally| tally.nanos.load(Relaxed)).fold(0, u64::saturating_add);
        let _ = writeln!(out, "{name}_bucket{} {total}", le("+Inf"));
        let _ = writeln!(out, "{name}_sum{plain} {}", nanos as f64 / 1e9);
        let _ = writeln!(out, "{name}_count{plain} {total}");
    }
}

/// A metric family's `# HELP` and `# TYPE` lines.
fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
}

/// A gauge without labels, header and value.
fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, help, "gauge");
    let _ = writeln!(out, "{name} {value}");
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
    let mut out = String::new();
    gauge(&mut out, "rolehost_backend_up", "Whether the state backend answered", u8::from(health.is_ok()).into());
    if let Ok(health) = health {
        for (detail, metric, kind, help) in FIGURES {
            let value = health.details.get(*detail).and_then(|v| v.parse::<u64>().ok());
            // Redis's maxmemory 0 means no limit: nothing to show.
            if let Some(value) = value.filter(|&v| v > 0 || *detail != "maxmemory") {
                header(&mut out, metric, help, kind);
                let _ = writeln!(out, "{metric} {value}");
            }
        }
    }
    out
}

/// Request body bytes `serve` holds now, being read or for calls running
/// (`rolehost_request_body_bytes`), and the most it may
/// (`rolehost_request_body_max_bytes`), as Prometheus text.
pub fn render_request_bodies(held: usize, max: usize) -> String {
    let mut out = String::new();
    let held_help = "Request body bytes held now (being read or for calls running)";
    gauge(&mut out, "rolehost_request_body_bytes", held_help, held as u64);
    let max_help = "Request body bytes that may be held at once (--max-buffered-bytes)";
    gauge(&mut out, "rolehost_request_body_max_bytes", max_help, max as u64);
    out
}

/// The connections each of `serve`'s worker threads serves now
/// (`rolehost_worker_connections`, by worker index), as Prometheus text.
pub fn render_workers(connections: &[usize]) -> String {
    let metric = "rolehost_worker_connections";
    let mut out = String::new();
    header(&mut out, metric, "Connections each worker thread serves now", "gauge");
    for (worker, count) in connections.iter().enumerate() {
        out += &format!("{metric}{{worker=\"{worker}\"}} {count}\n");
    }
    out
}

/// One role's call metrics, looked up once when the role is loaded rather
/// than by label on every call.
pub struct RoleMetrics {
    /// Calls running now.
    pub in_flight: Gauge,
    /// Call latency.
    pub call_seconds: Histogram,
    /// Calls that succeeded.
    pub calls_ok: Counter,
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
    fn counts_from_many_threads_add_up() {
        let metrics = Metrics::new();
        let (ops, in_flight) =
            (metrics.ops.with_label_values(&["r", "get"]), metrics.in_flight.with_label_values(&["r"]));
        let seconds = metrics.call_seconds.with_label_values(&["r"]);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        ops.inc();
                        in_flight.inc();
                        seconds.observe(Duration::from_millis(2));
                    }
                });
            }
        });
        // Counted down on other threads than counted it up.
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| (0..2000).for_each(|_| in_flight.dec()));
            }
        });
        assert_eq!(ops.get(), 8000);
        assert_eq!(in_flight.get(), 0);
        let text = metrics.render();
        for line in [
            r#"rolehost_state_ops_total{op="get",role="r"} 8000"#,
            r#"rolehost_calls_in_flight{role="r"} 0"#,
            r#"rolehost_call_seconds_bucket{role="r",le="0.001"} 0"#,
            r#"rolehost_call_seconds_bucket{role="r",le="0.005"} 8000"#,
            r#"rolehost_call_seconds_bucket{role="r",le="+Inf"} 8000"#,
            r#"rolehost_call_seconds_sum{role="r"} 16"#,
            r#"rolehost_call_seconds_count{role="r"} 8000"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from {text}");
        }
    }

    #[test]
    fn lines_go_by_label_values_in_the_labels_name_order() {
        let metrics = Metrics::new();
        for (role, outcome) in [("b", "ok"), ("a", "trap"), ("a", "ok")] {
            metrics.calls.with_label_values(&[role, outcome]).inc();
        }
        let text = metrics.render();
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("rolehost_calls_total{")).collect();
        let expected = [
            r#"rolehost_calls_total{outcome="ok",role="a"} 1"#,
            r#"rolehost_calls_total{outcome="ok",role="b"} 1"#,
            r#"rolehost_calls_total{outcome="trap",role="a"} 1"#,
        ];
        assert_eq!(lines, expected);
    }

    #[test]
    fn a_family_without_labels_writes_no_braces_but_le() {
        let (mut out, buckets) = (String::new(), &[0.5, 1.0][..]);
        let counter = Family::new("x_total", "X", &[], Counter::default);
        counter.with_label_values(&[]).inc_by(2);
        counter.render(&mut out);
        let histogram = Family::new("x_seconds", "X", &[], move || Histogram::new(buckets));
        histogram.with_label_values(&[]).observe(Duration::from_millis(750));
        histogram.render(&mut out);
        for line in [
            "x_total 2",
            r#"x_seconds_bucket{le="0.5"} 0"#,
            r#"x_seconds_bucket{le="1"} 1"#,
            r#"x_seconds_bucket{le="+Inf"} 1"#,
            "x_seconds_sum 0.75",
            "x_seconds_count 1",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing from {out}");
        }
    }

    #[test]
    fn the_text_names_each_family_once_and_buckets_add_up() {
        let metrics = Metrics::new();
        let backend = |op| metrics.backend_seconds.with_label_values(&[op]);
        backend("get").observe(Duration::from_micros(10));
        backend("get").observe(Duration::from_micros(300));
        backend("get").observe(Duration::from_secs(2));
        backend("set").observe(Duration::from_micros(50));
        metrics.calls.with_label_values(&["a\"b", "ok"]).inc_by(3);
        let text = metrics.render();
        assert_eq!(text.matches("# TYPE rolehost_backend_seconds histogram").count(), 1, "{text}");
        assert_eq!(text.matches("# TYPE").count(), 2, "families counted nothing are left out: {text}");
        let buckets: Vec<&str> =
            text.lines().filter(|l| l.starts_with(r#"rolehost_backend_seconds_bucket{op="get""#)).collect();
        let counts: Vec<u64> = buckets.iter().map(|l| l.rsplit(' ').next().unwrap().parse().unwrap()).collect();
        assert_eq!(counts, [1, 1, 2, 2, 2, 2, 2, 2, 2, 3], "{text}");
        assert!(text.contains(r#"rolehost_backend_seconds_count{op="set"} 1"#), "{text}");
        assert!(text.contains(r#"rolehost_calls_total{outcome="ok",role="a\"b"} 3"#), "label values quoted: {text}");
        let calls = text.find("rolehost_calls_total").unwrap();
        assert!(text.find("rolehost_backend_seconds").unwrap() < calls, "families by name");
    }

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
