//! Prometheus metrics named in CONTRACT.md, on one registry served by the admin listener.

use prometheus::{
    register_histogram_vec_with_registry, register_histogram_with_registry,
    register_int_counter_vec_with_registry, register_int_counter_with_registry,
    register_int_gauge_vec_with_registry, register_int_gauge_with_registry, Encoder, Histogram,
    HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub decisions: IntCounterVec,
    /// Decisions on calls to declared tools, by upstream, tool and decision.
    pub tool_calls: IntCounterVec,
    pub revoked: IntCounter,
    pub audit_backlog: IntGauge,
    pub authz_duration: Histogram,
    pub upstream_duration: HistogramVec,
    pub request_duration: HistogramVec,
    /// 401s: no or an invalid inbound token. Kept apart from the policy's decisions, so a
    /// scanner does not move the deny rate.
    pub unauthenticated: IntCounter,
    /// MCP messages by upstream and method (a method MCP defines, else `other`).
    pub mcp_messages: IntCounterVec,
    /// 1 while the config, policy and key files are watched for changes; 0 when watching is
    /// off or failed (reload then only by `POST /admin/reload`).
    pub watching: IntGauge,
    /// Tools whose live definition is not their pin: hidden from a listing, or a call refused.
    pub pin_refusals: IntCounterVec,
    /// Approvals of single calls by step (requested, approved, denied, used), and how long a
    /// person took to decide.
    pub approvals: IntCounterVec,
    /// Calls a `@rate_limit` policy denied, by the counter it read.
    pub rate_limited: IntCounterVec,
    pub approval_wait: Histogram,
    /// Calls tried again on another endpoint, ejections of endpoints that kept failing, and
    /// whether each endpoint takes calls now (set when scraped).
    pub upstream_retries: IntCounterVec,
    pub endpoint_ejections: IntCounterVec,
    pub endpoint_healthy: IntGaugeVec,
    /// Processes of `command:` upstreams running, and those started again after a crash.
    pub processes: IntGaugeVec,
    pub process_restarts: IntCounterVec,
    pub minted: IntCounter,
    pub reloads: IntCounterVec,
    pub reload_duration: Histogram,
    pub policies_loaded: IntGauge,
    pub tasks_active: IntGauge,
    pub audit_dropped: IntCounter,
    pub audit_write_errors: IntCounter,
    pub audit_refused: IntCounter,
    pub shed: IntCounter,
    pub connections_refused: IntCounter,
    pub token_cache: IntGauge,
    /// Trace spans sent to the collector, and those given up (queue full, export failed).
    pub trace_spans_exported: IntCounter,
    pub trace_spans_dropped: IntCounter,
    /// Decisions the `@mode("shadow")` policies would have turned, by the shadow policy
    /// responsible and the direction.
    pub shadow_flips: IntCounterVec,
}

impl Metrics {
    /// Every shadow flip counted so far, over policies and directions.
    pub fn shadow_flips_total(&self) -> u64 {
        use prometheus::core::Collector;
        self.shadow_flips
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    #[allow(clippy::too_many_lines)] // start-up: one registration a few lines
    pub fn new() -> Self {
        let r = Registry::new();
        let trace_spans = register_int_counter_vec_with_registry!(
            "toolgate_trace_spans_total",
            "Trace spans, by outcome: exported to the collector, or dropped (queue full, export failed).",
            &["outcome"],
            r
        )
        .expect("metric");
        let m = Metrics {
            requests: register_int_counter_vec_with_registry!(
                "toolgate_requests_total",
                "Requests on the agent listener, by upstream and answer status.",
                &["upstream", "code"],
                r
            )
            .expect("metric"),
            decisions: register_int_counter_vec_with_registry!(
                "toolgate_authz_decisions_total",
                "Authorization decisions, by outcome.",
                &["decision"],
                r
            )
            .expect("metric"),
            tool_calls: register_int_counter_vec_with_registry!(
                "toolgate_tool_calls_total",
                "Decisions on calls to tools the schema declares, by upstream, tool and decision (none: anything else).",
                &["upstream", "tool", "decision"],
                r
            )
            .expect("metric"),
            revoked: register_int_counter_with_registry!(
                "toolgate_credentials_revoked_total",
                "Minted credentials revoked by the end of their task.",
                r
            )
            .expect("metric"),
            audit_backlog: register_int_gauge_with_registry!(
                "toolgate_audit_backlog",
                "Audit room taken: records queued for the writer and calls in flight holding room for theirs (at most audit.buffer).",
                r
            )
            .expect("metric"),
            authz_duration: register_histogram_with_registry!(
                "toolgate_authz_duration_seconds",
                "Time to build the Cedar request and decide.",
                vec![
                    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5,
                    0.005, 0.01, 0.05
                ],
                r
            )
            .expect("metric"),
            upstream_duration: register_histogram_vec_with_registry!(
                "toolgate_upstream_duration_seconds",
                "Time from forwarding a call to the upstream's response headers.",
                &["upstream"],
                vec![
                    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0, 30.0
                ],
                r
            )
            .expect("metric"),
            request_duration: register_histogram_vec_with_registry!(
                "toolgate_request_duration_seconds",
                "Time from a request's arrival on the agent listener to its answer's headers, by upstream (none: not routed).",
                &["upstream"],
                vec![
                    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0
                ],
                r
            )
            .expect("metric"),
            unauthenticated: register_int_counter_with_registry!(
                "toolgate_unauthenticated_total",
                "Requests answered 401: no or an invalid inbound token (not counted as authorization decisions).",
                r
            )
            .expect("metric"),
            mcp_messages: register_int_counter_vec_with_registry!(
                "toolgate_mcp_messages_total",
                "MCP JSON-RPC messages from agents, by upstream and method (other: a method MCP does not define).",
                &["upstream", "method"],
                r
            )
            .expect("metric"),
            watching: register_int_gauge_with_registry!(
                "toolgate_config_watch_active",
                "1 while config, policy and key files are watched for changes; 0 when watching is off or could not start.",
                r
            )
            .expect("metric"),
            pin_refusals: register_int_counter_vec_with_registry!(
                "toolgate_tool_pin_refusals_total",
                "Tools whose live definition is not their pin (tool_pins), by upstream, tool (unpinned: a tool with no pin) and where: hidden from a listing, or a call refused.",
                &["upstream", "tool", "where"],
                r
            )
            .expect("metric"),
            approvals: register_int_counter_vec_with_registry!(
                "toolgate_approvals_total",
                "Approvals of single calls by step: requested (a new pending one), approved, denied, used.",
                &["step"],
                r
            )
            .expect("metric"),
            rate_limited: register_int_counter_vec_with_registry!(
                "toolgate_rate_limited_total",
                "Calls a @rate_limit policy denied (429), by the first counter the call read.",
                &["counter"],
                r
            )
            .expect("metric"),
            approval_wait: register_histogram_with_registry!(
                "toolgate_approval_wait_seconds",
                "Time from an approval's request to a person's decision.",
                vec![10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 86400.0],
                r
            )
            .expect("metric"),
            upstream_retries: register_int_counter_vec_with_registry!(
                "toolgate_upstream_retries_total",
                "Calls tried again on another endpoint (nothing reached the one tried, or a retry route's 502/503), by upstream.",
                &["upstream"],
                r
            )
            .expect("metric"),
            endpoint_ejections: register_int_counter_vec_with_registry!(
                "toolgate_upstream_endpoint_ejections_total",
                "Endpoints set aside after failing passive_health.failures times in a row, by upstream and endpoint.",
                &["upstream", "endpoint"],
                r
            )
            .expect("metric"),
            endpoint_healthy: register_int_gauge_vec_with_registry!(
                "toolgate_upstream_endpoint_healthy",
                "1 while an upstream's endpoint takes calls, 0 while it is ejected.",
                &["upstream", "endpoint"],
                r
            )
            .expect("metric"),
            processes: register_int_gauge_vec_with_registry!(
                "toolgate_mcp_processes",
                "Processes of command: (stdio) MCP upstreams running, by upstream.",
                &["upstream"],
                r
            )
            .expect("metric"),
            process_restarts: register_int_counter_vec_with_registry!(
                "toolgate_mcp_process_restarts_total",
                "Processes of command: (stdio) MCP upstreams started again after they exited unasked, by upstream.",
                &["upstream"],
                r
            )
            .expect("metric"),
            minted: register_int_counter_with_registry!(
                "toolgate_credentials_minted_total",
                "Per-call credentials minted.",
                r
            )
            .expect("metric"),
            reloads: register_int_counter_vec_with_registry!(
                "toolgate_policy_reloads_total",
                "Policy reloads, by result.",
                &["result"],
                r
            )
            .expect("metric"),
            reload_duration: register_histogram_with_registry!(
                "toolgate_policy_reload_duration_seconds",
                "Time to load and validate a policy set.",
                vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
                r
            )
            .expect("metric"),
            policies_loaded: register_int_gauge_with_registry!(
                "toolgate_policies_loaded",
                "Policies in the active set.",
                r
            )
            .expect("metric"),
            tasks_active: register_int_gauge_with_registry!(
                "toolgate_tasks_active",
                "Tasks started and not yet ended.",
                r
            )
            .expect("metric"),
            audit_dropped: register_int_counter_with_registry!(
                "toolgate_audit_dropped_total",
                "Audit records of unforwarded calls dropped because the writer was behind.",
                r
            )
            .expect("metric"),
            token_cache: register_int_gauge_with_registry!(
                "toolgate_token_cache_entries",
                "Verified inbound tokens remembered (bounded by inbound.token_cache_size).",
                r
            )
            .expect("metric"),
            connections_refused: register_int_counter_with_registry!(
                "toolgate_connections_refused_total",
                "Connections closed at once because limits.max_connections were open.",
                r
            )
            .expect("metric"),
            shed: register_int_counter_with_registry!(
                "toolgate_requests_shed_total",
                "Requests answered 503 overloaded because limits.max_in_flight were in flight.",
                r
            )
            .expect("metric"),
            audit_refused: register_int_counter_with_registry!(
                "toolgate_audit_refused_total",
                "Requests refused (503 audit_unavailable) because the audit writer had no room.",
                r
            )
            .expect("metric"),
            audit_write_errors: register_int_counter_with_registry!(
                "toolgate_audit_write_errors_total",
                "Failed writes or reopens of the audit log (each is retried).",
                r
            )
            .expect("metric"),
            shadow_flips: register_int_counter_vec_with_registry!(
                "toolgate_shadow_flips_total",
                "Decisions a @mode(\"shadow\") policy would have turned (allow_to_deny, deny_to_allow), by that policy.",
                &["policy", "flip"],
                r
            )
            .expect("metric"),
            trace_spans_exported: trace_spans.with_label_values(&["exported"]),
            trace_spans_dropped: trace_spans.with_label_values(&["dropped"]),
            registry: r,
        };
        register_int_gauge_vec_with_registry!(
            "toolgate_build_info",
            "1, labelled with the running toolgate's version.",
            &["version"],
            m.registry
        )
        .expect("metric")
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
        #[cfg(target_os = "linux")]
        if let Err(e) = m.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        )) {
            tracing::warn!("process metrics unavailable: {e}");
        }
        // Make both outcomes visible from the start, so rate() queries have a series.
        for d in ["allow", "deny"] {
            m.decisions.with_label_values(&[d]);
        }
        for r in ["success", "error"] {
            m.reloads.with_label_values(&[r]);
        }
        m
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
