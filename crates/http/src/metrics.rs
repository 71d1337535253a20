//! Prometheus metrics of the node: request outcomes, tokens, queue depth, time to first token
//! and decode speed. Recorded on the request path with atomics only.

use std::sync::atomic::AtomicI64;

use lattice_engine::Load;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub(crate) endpoint: String,
    pub(crate) status: String,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    queue_depth: Gauge<i64, AtomicI64>,
    busy_slots: Gauge<i64, AtomicI64>,
    slots: Gauge<i64, AtomicI64>,
    ttft: Histogram,
    decode_tps: Histogram,
    duration: Histogram,
}

impl Metrics {
    pub fn new(prefix: &str) -> Self {
        let mut registry = Registry::with_prefix(prefix);
        let requests = Family::<RequestLabels, Counter>::default();
        let prompt_tokens = Counter::default();
        let completion_tokens = Counter::default();
        let queue_depth = Gauge::<i64, AtomicI64>::default();
        let busy_slots = Gauge::<i64, AtomicI64>::default();
        let slots = Gauge::<i64, AtomicI64>::default();
        let ttft = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let decode_tps = Histogram::new(exponential_buckets(1.0, 1.5, 16));
        let duration = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register(
            "requests",
            "Requests by endpoint and outcome",
            requests.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens processed",
            prompt_tokens.clone(),
        );
        registry.register(
            "completion_tokens",
            "Completion tokens generated",
            completion_tokens.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting for a slot",
            queue_depth.clone(),
        );
        registry.register(
            "busy_slots",
            "Slots generating or prefilling",
            busy_slots.clone(),
        );
        registry.register("slots", "Parallel decode slots", slots.clone());
        registry.register(
            "time_to_first_token_seconds",
            "Time from request arrival to the first generated text",
            ttft.clone(),
        );
        registry.register(
            "decode_tokens_per_second",
            "Per-request decode speed after the first token",
            decode_tps.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Whole request duration",
            duration.clone(),
        );
        Self {
            registry,
            requests,
            prompt_tokens,
            completion_tokens,
            queue_depth,
            busy_slots,
            slots,
            ttft,
            decode_tps,
            duration,
        }
    }

    pub(crate) fn request(&self, endpoint: &str, status: &str) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.to_owned(),
                status: status.to_owned(),
            })
            .inc();
    }

    pub(crate) fn first_token(&self, seconds: f64) {
        self.ttft.observe(seconds);
    }

    pub(crate) fn finished(
        &self,
        prompt: u32,
        completion: u32,
        decode_seconds: f64,
        total_seconds: f64,
    ) {
        self.prompt_tokens.inc_by(u64::from(prompt));
        self.completion_tokens.inc_by(u64::from(completion));
        if completion > 1 && decode_seconds > 0.0 {
            self.decode_tps
                .observe(f64::from(completion - 1) / decode_seconds);
        }
        self.duration.observe(total_seconds);
    }

    /// Renders the OpenMetrics text; gauges are read from the engine at scrape time.
    pub(crate) fn render(&self, load: Load) -> String {
        self.queue_depth
            .set(i64::try_from(load.queued).unwrap_or(i64::MAX));
        self.busy_slots
            .set(i64::try_from(load.busy_slots).unwrap_or(i64::MAX));
        self.slots
            .set(i64::try_from(load.slots).unwrap_or(i64::MAX));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
