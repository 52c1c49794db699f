//! Counters behind `GET /metrics`, written out in the Prometheus text format 0.0.4 by hand: a
//! dozen series do not need a metrics crate.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Upper bounds of `paligemma_request_duration_seconds`, in seconds.
const DURATION_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Where a job was when its client went away.
#[derive(Debug, Clone, Copy)]
pub enum CancelledAt {
    /// Dropped from the queue without running.
    Queued,
    /// Its row stopped inside a running batch.
    Running,
}

pub struct Metrics {
    /// Jobs waiting in the queue.
    pub queue_depth: AtomicI64,
    /// Slots holding a request that is decoding.
    pub slots_in_use: AtomicI64,
    /// `--max-batch` (or the model's own limit, if lower).
    slots: usize,
    counters: Mutex<Counters>,
}

struct Counters {
    /// (endpoint, status code) -> answers.
    requests: BTreeMap<(&'static str, u16), u64>,
    durations: BTreeMap<&'static str, Histogram>,
    /// Rows of each decoder step.
    batch_sizes: Histogram,
    queue_wait: Histogram,
    generated_tokens: u64,
    decode_tokens_per_second: f64,
    cancelled_queued: u64,
    cancelled_running: u64,
    client_disconnects: u64,
}

struct Histogram {
    bounds: Vec<f64>,
    /// Observations per bucket (not cumulative; summed when written).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: Vec<f64>) -> Histogram {
        let counts = vec![0; bounds.len()];
        Histogram {
            bounds,
            counts,
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| value <= b) {
            self.counts[i] += 1;
        }
        self.sum += value;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

impl Metrics {
    /// Metrics of a server with `slots` slots.
    pub fn new(slots: usize) -> Metrics {
        Metrics {
            queue_depth: AtomicI64::new(0),
            slots_in_use: AtomicI64::new(0),
            slots,
            counters: Mutex::new(Counters {
                requests: BTreeMap::new(),
                durations: BTreeMap::new(),
                batch_sizes: Histogram::new((1..=slots).map(|n| n as f64).collect()),
                queue_wait: Histogram::new(DURATION_BUCKETS.to_vec()),
                generated_tokens: 0,
                decode_tokens_per_second: 0.0,
                cancelled_queued: 0,
                cancelled_running: 0,
                client_disconnects: 0,
            }),
        }
    }

    /// A panic elsewhere must not take the metrics down with it: the counters stay usable.
    fn counters(&self) -> MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn record_request(&self, endpoint: &'static str, code: u16, duration: Duration) {
        let mut c = self.counters();
        *c.requests.entry((endpoint, code)).or_default() += 1;
        c.durations
            .entry(endpoint)
            .or_insert_with(|| Histogram::new(DURATION_BUCKETS.to_vec()))
            .observe(duration.as_secs_f64());
    }

    /// One decoder step of the worker: its rows and how long it took.
    pub fn record_step(&self, rows: usize, took: Duration) {
        let mut c = self.counters();
        c.batch_sizes.observe(rows as f64);
        let seconds = took.as_secs_f64();
        if seconds > 0.0 {
            c.decode_tokens_per_second = rows as f64 / seconds;
        }
    }

    /// An answer of `tokens` generated tokens was sent.
    pub fn record_generated(&self, tokens: usize) {
        self.counters().generated_tokens += tokens as u64;
    }

    /// A job left the queue for a slot after `waited`.
    pub fn record_queued(&self, waited: Duration) {
        self.counters().queue_wait.observe(waited.as_secs_f64());
    }

    pub fn record_cancelled(&self, at: CancelledAt) {
        let mut c = self.counters();
        match at {
            CancelledAt::Queued => c.cancelled_queued += 1,
            CancelledAt::Running => c.cancelled_running += 1,
        }
    }

    pub fn record_client_disconnect(&self) {
        self.counters().client_disconnects += 1;
    }

    /// The text format 0.0.4 body.
    pub fn render(&self) -> String {
        let c = self.counters();
        let mut out = String::new();
        let header = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        header(
            &mut out,
            "paligemma_requests_total",
            "counter",
            "HTTP requests answered, by endpoint and status code.",
        );
        for ((endpoint, code), n) in &c.requests {
            let _ = writeln!(out, "paligemma_requests_total{{endpoint=\"{endpoint}\",code=\"{code}\"}} {n}");
        }
        let single = [
            (
                "paligemma_queue_depth",
                "gauge",
                "Requests waiting for the model.",
                self.queue_depth.load(Ordering::Relaxed).to_string(),
            ),
            (
                "paligemma_slots",
                "gauge",
                "Requests the model decodes at most at once (--max-batch).",
                self.slots.to_string(),
            ),
            (
                "paligemma_slots_in_use",
                "gauge",
                "Slots holding a request that is decoding.",
                self.slots_in_use.load(Ordering::Relaxed).to_string(),
            ),
            (
                "paligemma_generated_tokens_total",
                "counter",
                "Tokens generated for answered requests.",
                c.generated_tokens.to_string(),
            ),
            (
                "paligemma_decode_tokens_per_second",
                "gauge",
                "Decode speed of the last decoder step: its rows / its time.",
                c.decode_tokens_per_second.to_string(),
            ),
            (
                "paligemma_client_disconnects_total",
                "counter",
                "Clients that went away before their answer was complete.",
                c.client_disconnects.to_string(),
            ),
        ];
        for (name, kind, help, value) in single {
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
        header(
            &mut out,
            "paligemma_cancelled_total",
            "counter",
            "Requests whose client went away: skipped in the queue, or stopped in their slot.",
        );
        let _ = writeln!(out, "paligemma_cancelled_total{{stage=\"queued\"}} {}", c.cancelled_queued);
        let _ = writeln!(out, "paligemma_cancelled_total{{stage=\"running\"}} {}", c.cancelled_running);
        header(
            &mut out,
            "paligemma_batch_size",
            "histogram",
            "Rows of each decoder step: requests decoding together.",
        );
        c.batch_sizes.write(&mut out, "paligemma_batch_size", "");
        header(
            &mut out,
            "paligemma_queue_wait_seconds",
            "histogram",
            "Time from a request's arrival in the queue to its slot.",
        );
        c.queue_wait.write(&mut out, "paligemma_queue_wait_seconds", "");
        header(
            &mut out,
            "paligemma_request_duration_seconds",
            "histogram",
            "Time from request to the end of the answer's headers (SSE: to the first byte), by endpoint.",
        );
        for (endpoint, histogram) in &c.durations {
            histogram.write(&mut out, "paligemma_request_duration_seconds", &format!("endpoint=\"{endpoint}\""));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        let m = Metrics::new(3);
        m.record_step(1, Duration::from_millis(100));
        m.record_step(3, Duration::from_millis(300));
        m.record_generated(5);
        m.record_generated(7);
        let text = m.render();
        for line in [
            "paligemma_batch_size_bucket{le=\"1\"} 1",
            "paligemma_batch_size_bucket{le=\"2\"} 1",
            "paligemma_batch_size_bucket{le=\"3\"} 2",
            "paligemma_batch_size_bucket{le=\"+Inf\"} 2",
            "paligemma_batch_size_sum 4",
            "paligemma_batch_size_count 2",
            "paligemma_generated_tokens_total 12",
            "paligemma_decode_tokens_per_second 10",
            "paligemma_slots 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing in\n{text}");
        }
    }

    #[test]
    fn requests_are_counted_by_endpoint_and_code() {
        let m = Metrics::new(1);
        m.record_request("/health", 200, Duration::from_millis(2));
        m.record_request("/health", 200, Duration::from_millis(3));
        m.record_request("/v1/generate", 400, Duration::from_millis(1));
        let text = m.render();
        assert!(
            text.contains("paligemma_requests_total{endpoint=\"/health\",code=\"200\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("paligemma_requests_total{endpoint=\"/v1/generate\",code=\"400\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("paligemma_request_duration_seconds_count{endpoint=\"/health\"} 2\n"),
            "{text}"
        );
    }
}
