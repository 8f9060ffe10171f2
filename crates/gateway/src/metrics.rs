//! Prometheus metrics (`GET /metrics`). One set of names for every
//! consumer of the generation path: what a request measures depends on its
//! kind ([`crate::Endpoint::streams`]), not on which handler served it.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub ttft: HistogramVec,
    pub inter_token: HistogramVec,
    pub duration: HistogramVec,
    pub tokens: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    pub active: IntGaugeVec,
    pub kv_tokens: IntGaugeVec,
    pub prefix_pool_tokens: IntGaugeVec,
    pub kv_bytes: IntGaugeVec,
    /// Prompt lookup's guesses checked and kept, since the model loaded.
    pub lookup_proposed: IntGaugeVec,
    pub lookup_accepted: IntGaugeVec,
    /// The draft model's guesses checked and kept.
    pub draft_proposed: IntGaugeVec,
    pub draft_accepted: IntGaugeVec,
    pub draft_caught_up: IntGaugeVec,
    /// Upstream servers (models served elsewhere), by model and node.
    pub upstream_requests: IntCounterVec,
    pub upstream_ttft: HistogramVec,
    pub upstream_tokens: IntCounterVec,
    pub upstream_outstanding: IntGaugeVec,
    pub upstream_healthy: IntGaugeVec,
    pub upstream_failed_attempts: IntGaugeVec,
}

fn buckets() -> Vec<f64> {
    vec![
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ]
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("hanlin".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "HTTP API requests by endpoint and status"),
            &["endpoint", "status"],
        )?;
        let ttft = HistogramVec::new(
            HistogramOpts::new("time_to_first_token_seconds", "Time to first token")
                .buckets(buckets()),
            &["model"],
        )?;
        let inter_token = HistogramVec::new(
            HistogramOpts::new(
                "inter_token_latency_seconds",
                "Time between streamed tokens",
            )
            .buckets(buckets()),
            &["model"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "request_duration_seconds",
                "Time from a request's arrival to its end, by endpoint and model",
            )
            .buckets(buckets()),
            &["endpoint", "model"],
        )?;
        let tokens = IntCounterVec::new(
            Opts::new(
                "tokens_total",
                "Tokens by key, model and kind (prompt, cached, completion)",
            ),
            &["key", "model", "kind"],
        )?;
        let gauge = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["model"]);
        let queue_depth = gauge("queue_depth", "Requests waiting for a batch slot")?;
        let active = gauge("active_sequences", "Sequences in the running batch")?;
        let kv_tokens = gauge(
            "kv_cache_tokens",
            "KV cache positions held by running sequences",
        )?;
        let prefix_pool_tokens =
            gauge("prefix_cache_tokens", "KV positions kept for prefix reuse")?;
        let kv_bytes = gauge(
            "kv_cache_bytes",
            "Bytes of KV cache blocks alive (shared prefix blocks counted once)",
        )?;
        let lookup_proposed = gauge(
            "lookup_proposed_tokens",
            "Prompt lookup's guesses checked since the model loaded",
        )?;
        let lookup_accepted = gauge(
            "lookup_accepted_tokens",
            "Prompt lookup's guesses the model agreed with (acceptance rate: accepted / proposed)",
        )?;
        let draft_proposed = gauge(
            "draft_proposed_tokens",
            "The draft model's guesses checked since the model loaded",
        )?;
        let draft_accepted = gauge(
            "draft_accepted_tokens",
            "The draft model's guesses the model agreed with (acceptance rate: accepted / proposed)",
        )?;
        let draft_caught_up = gauge(
            "draft_caught_up_tokens",
            "Tokens the draft model ran to catch up with its target (a prefix found with its draft cache is not run again)",
        )?;
        let upstream_requests = IntCounterVec::new(
            Opts::new(
                "upstream_requests_total",
                "Requests to upstream servers by model, node and outcome (ok, refused, failed, broken)",
            ),
            &["model", "node", "outcome"],
        )?;
        let upstream_ttft = HistogramVec::new(
            HistogramOpts::new(
                "upstream_first_event_seconds",
                "Time from sending a request upstream to its first event or its answer",
            )
            .buckets(buckets()),
            &["model", "node"],
        )?;
        let upstream_tokens = IntCounterVec::new(
            Opts::new(
                "upstream_tokens_total",
                "Tokens metered from upstream servers by model, node and kind",
            ),
            &["model", "node", "kind"],
        )?;
        let node_gauge =
            |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["model", "node"]);
        let upstream_outstanding = node_gauge(
            "upstream_outstanding",
            "Requests in flight on an upstream node",
        )?;
        let upstream_healthy = node_gauge(
            "upstream_healthy",
            "1 while an upstream node takes requests, 0 while it is taken out",
        )?;
        let upstream_failed_attempts = node_gauge(
            "upstream_failed_attempts",
            "Attempts that failed on an upstream node since start (retried on another node, or the request failed)",
        )?;
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(upstream_failed_attempts.clone()),
            Box::new(upstream_requests.clone()),
            Box::new(upstream_ttft.clone()),
            Box::new(upstream_tokens.clone()),
            Box::new(upstream_outstanding.clone()),
            Box::new(upstream_healthy.clone()),
            Box::new(ttft.clone()),
            Box::new(inter_token.clone()),
            Box::new(duration.clone()),
            Box::new(tokens.clone()),
            Box::new(queue_depth.clone()),
            Box::new(active.clone()),
            Box::new(kv_tokens.clone()),
            Box::new(prefix_pool_tokens.clone()),
            Box::new(kv_bytes.clone()),
            Box::new(lookup_proposed.clone()),
            Box::new(lookup_accepted.clone()),
            Box::new(draft_proposed.clone()),
            Box::new(draft_accepted.clone()),
            Box::new(draft_caught_up.clone()),
        ] {
            registry.register(c)?;
        }
        Ok(Self {
            registry,
            requests,
            ttft,
            inter_token,
            duration,
            tokens,
            queue_depth,
            active,
            kv_tokens,
            prefix_pool_tokens,
            kv_bytes,
            lookup_proposed,
            lookup_accepted,
            draft_proposed,
            draft_accepted,
            draft_caught_up,
            upstream_requests,
            upstream_ttft,
            upstream_tokens,
            upstream_outstanding,
            upstream_healthy,
            upstream_failed_attempts,
        })
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!("encoding metrics: {e}");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}
