//! OpenTelemetry traces (issue 13): a call yields one span per pipeline step, carrying its
//! decision, sent over OTLP/HTTP (JSON) to a collector, and the upstream continues the trace
//! through `traceparent`. The collector is the harness's recording HTTP server read as an OTLP
//! receiver (`common::received_spans`).

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// A caller's trace context: trace id, its span, sampled.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn nanos(span: &Value, field: &str) -> u128 {
    span[field]
        .as_str()
        .expect("a decimal string")
        .parse()
        .unwrap()
}

async fn traced_gateway(upstream: &Upstream, otlp_endpoint: &str) -> Gateway {
    let config = format!(
        "traces:\n  otlp_endpoint: {otlp_endpoint}\n  service_name: toolgate-under-test\n  headers:\n    x-collector-key: k-123\n"
    );
    Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[],
        inbound: None,
        mcp: None,
        extra_config: &config,
    })
    .await
}

#[tokio::test]
async fn a_call_is_a_trace_of_its_steps_with_its_decision_continued_upstream() {
    let upstream = Upstream::start().await;
    let collector = Upstream::start().await;
    let gw = traced_gateway(&upstream, &format!("http://{}", collector.addr)).await;
    let auth = format!("Bearer {}", gw.idp.delegated());

    // An allowed call, inside the caller's sampled trace.
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    let allowed = send(
        "GET",
        &gw.url("/billing/invoices/42"),
        &[
            ("authorization", &auth),
            ("traceparent", &traceparent),
            ("tracestate", "vendor=opaque"),
        ],
        b"",
    )
    .await;
    assert_eq!(allowed.status, 200);
    let audit = gw
        .audit_line(|l| l["action"] == "billing/get_invoice")
        .await;

    let spans = trace_of(&collector, TRACE_ID).await;
    let mut names: Vec<&str> = spans.iter().map(|s| s["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "authenticate",
            "authorize",
            "classify",
            "credential",
            "forward",
            "read_arguments",
            "record",
            "request"
        ]
    );
    let request = named(&spans, "request");
    assert_eq!(
        request["parentSpanId"], CALLER_SPAN,
        "continues the caller's span"
    );
    assert_eq!(request["kind"], 2, "server");
    assert_eq!(request["service"], "toolgate-under-test");
    assert_eq!(attribute(request, "http.response.status_code"), "200");
    assert_eq!(attribute(request, "agent"), "assistant");
    let mut ids = std::collections::HashSet::new();
    for span in &spans {
        let id = span["spanId"].as_str().unwrap();
        assert!(id.len() == 16 && id != "0000000000000000", "{span}");
        assert!(ids.insert(id.to_string()), "span ids are unique");
        assert!(nanos(span, "startTimeUnixNano") <= nanos(span, "endTimeUnixNano"));
        if span["name"] != "request" {
            assert_eq!(span["parentSpanId"], request["spanId"], "{span}");
            assert!(nanos(span, "startTimeUnixNano") >= nanos(request, "startTimeUnixNano"));
        }
    }
    // The decision, as the audit line has it, on the authorize span and the request's.
    for span in [named(&spans, "authorize"), request] {
        assert_eq!(attribute(span, "decision_id"), audit["decision_id"]);
        assert_eq!(attribute(span, "action"), "billing/get_invoice");
        assert_eq!(attribute(span, "decision"), "allow");
    }
    assert_eq!(
        attribute(named(&spans, "credential"), "credential_mode"),
        "mint"
    );
    let forward = named(&spans, "forward");
    assert_eq!(forward["kind"], 3, "client");
    assert_eq!(attribute(forward, "http.response.status_code"), "200");

    // The upstream works under the forward span, in the caller's trace; tracestate is the
    // caller's, passed on.
    let seen = upstream.requests();
    let headers = &seen.last().unwrap().headers;
    assert_eq!(
        headers["traceparent"],
        format!("00-{TRACE_ID}-{}-01", forward["spanId"].as_str().unwrap()).as_str()
    );
    assert_eq!(headers["tracestate"], "vendor=opaque");

    // No traceparent (or two of them): the trace starts here, and the upstream continues it;
    // the caller's tracestate belongs to no trace it sees, and is dropped.
    let bogus = format!("00-{}-{CALLER_SPAN}-01", "2".repeat(32));
    let fresh = send(
        "GET",
        &gw.url("/billing/invoices/45"),
        &[
            ("authorization", &auth),
            ("traceparent", &traceparent),
            ("traceparent", &bogus),
            ("tracestate", "vendor=opaque"),
        ],
        b"",
    )
    .await;
    assert_eq!(fresh.status, 200);
    let headers = upstream.requests().last().unwrap().headers.clone();
    assert!(headers.get("tracestate").is_none(), "{headers:?}");
    let sent = headers["traceparent"].to_str().unwrap().to_string();
    let (fresh_trace, fresh_span) = (&sent[3..35], &sent[36..52]);
    assert!(
        fresh_trace != TRACE_ID && fresh_trace != "2".repeat(32),
        "{sent}"
    );
    let spans = trace_of(&collector, fresh_trace).await;
    assert!(named(&spans, "request").get("parentSpanId").is_none());
    assert_eq!(named(&spans, "forward")["spanId"], fresh_span);

    // A denied call, no traceparent: a trace of its own, the deny on it, nothing forwarded.
    let denied = send(
        "DELETE",
        &gw.url("/records/patients/p-100/record"),
        &[("authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(denied.status, 403);
    let denied_id = denied.json()["decision_id"].clone();
    let denied_trace = loop_until_trace_with(&collector, &denied_id).await;
    let spans = trace_of(&collector, &denied_trace).await;
    let request = named(&spans, "request");
    assert!(request.get("parentSpanId").is_none(), "a new trace");
    assert_eq!(attribute(request, "http.response.status_code"), "403");
    let authorize = named(&spans, "authorize");
    assert_eq!(attribute(authorize, "decision"), "deny");
    assert_eq!(
        attribute(authorize, "action"),
        "records/delete_patient_record"
    );
    assert!(
        !spans
            .iter()
            .any(|s| s["name"] == "forward" || s["name"] == "credential"),
        "a denied call is never forwarded"
    );

    // A caller's trace that does not record: no spans, and its traceparent passes unchanged.
    let unsampled_id = "0af7651916cd43dd8448eb211c80319c";
    let unsampled = format!("00-{unsampled_id}-b7ad6b7169203331-00");
    let answer = send(
        "GET",
        &gw.url("/billing/invoices/43"),
        &[("authorization", &auth), ("traceparent", &unsampled)],
        b"",
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        upstream.requests().last().unwrap().headers["traceparent"],
        unsampled.as_str()
    );
    // Exports arrive in order: once a later trace is in, the unsampled one would be too.
    let later = "11111111111111111111111111111111";
    send(
        "GET",
        &gw.url("/billing/invoices/44"),
        &[
            ("authorization", &auth),
            ("traceparent", &format!("00-{later}-{CALLER_SPAN}-01")),
        ],
        b"",
    )
    .await;
    trace_of(&collector, later).await;
    assert!(received_spans(&collector)
        .iter()
        .all(|s| s["traceId"] != unsampled_id));

    assert!(
        collector
            .requests()
            .iter()
            .all(|export| export.headers["x-collector-key"] == "k-123"),
        "the configured headers go with every export"
    );
    // A caller with no valid token does not choose its trace: its traceparent is set aside.
    let intruder = "22222222222222222222222222222222";
    let unauthenticated = send(
        "GET",
        &gw.url("/billing/invoices/1"),
        &[("traceparent", &format!("00-{intruder}-{CALLER_SPAN}-01"))],
        b"",
    )
    .await;
    assert_eq!(unauthenticated.status, 401);
    let refused_id = unauthenticated.json()["decision_id"].clone();
    let refused_trace = loop_until_trace_with(&collector, &refused_id).await;
    assert_ne!(refused_trace, intruder);
    let metrics = gw.metrics().await;
    let exported = metric(&metrics, "toolgate_trace_spans_total{outcome=\"exported\"}");
    assert!(exported.unwrap() >= 8.0, "{metrics}");
}

/// The trace id of the request span whose decision id is `decision_id` (bounded wait).
async fn loop_until_trace_with(collector: &Upstream, decision_id: &Value) -> String {
    for _ in 0..100 {
        if let Some(span) = received_spans(collector)
            .into_iter()
            .find(|s| s["name"] == "request" && attribute(s, "decision_id") == *decision_id)
        {
            return span["traceId"].as_str().unwrap().to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no request span for decision {decision_id} within 5 s");
}

#[tokio::test]
async fn traces_are_off_by_default_and_a_dead_collector_costs_no_call() {
    // Off: the caller's traceparent reaches the upstream as it was sent, nothing is exported.
    let upstream = Upstream::start().await;
    let gw = Gateway::plain(&upstream).await;
    let token = gw.idp.delegated();
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    let answer = send(
        "GET",
        &gw.url("/billing/invoices/1"),
        &[
            ("authorization", &format!("Bearer {token}")),
            ("traceparent", &traceparent),
        ],
        b"",
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        upstream.requests()[0].headers["traceparent"],
        traceparent.as_str()
    );

    // A traces section that cannot work is refused before anything starts.
    for (section, complaint) in [
        ("traces:\n  otlp_endpoint: ftp://collector\n", "traces.otlp_endpoint"),
        (
            "traces:\n  otlp_endpoint: http://127.0.0.1:4318\n  sample_ratio: 1.5\n",
            "traces.sample_ratio",
        ),
        (
            "traces:\n  otlp_endpoint: http://127.0.0.1:4318\n  headers:\n    \"bad header\": x\n",
            "traces.headers",
        ),
        (
            "traces:\n  otlp_endpoint: https://127.0.0.1:4318\n  tls: { client_cert: c.pem }\n",
            "client_key go together",
        ),
        (
            "traces:\n  otlp_endpoint: https://127.0.0.1:4318\n  tls: { ca_file: missing-ca.pem }\n",
            "missing-ca.pem",
        ),
        (
            "traces:\n  otlp_endpoint: http://collector.example:4318\n  headers: { x-key: secret-value }\n",
            "traces.headers need an https://",
        ),
        (
            "traces:\n  otlp_endpoint: https://user:secret-value@collector.example\n",
            "no user info",
        ),
    ] {
        let config = gw.edited_config("bad.yaml", |t| format!("{t}{section}"));
        let out = toolgate(&["check", "--config", config.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{section}");
        assert!(text.contains(complaint), "{section}: {text}");
        assert!(!text.contains("secret-value"), "{text}");
    }

    // A collector that is not there: calls pass, the spans are counted as dropped.
    // (Port 1, tcpmux, listens nowhere here: connections are refused at once.)
    let traced = traced_gateway(&upstream, "http://127.0.0.1:1").await;
    let token = traced.idp.delegated();
    for _ in 0..3 {
        assert_eq!(
            get(&traced.url("/billing/invoices/1"), &token).await.status,
            200
        );
    }
    for _ in 0..100 {
        let metrics = traced.metrics().await;
        if metric(&metrics, "toolgate_trace_spans_total{outcome=\"dropped\"}") >= Some(24.0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the spans of three calls were not counted as dropped within 5 s");
}
