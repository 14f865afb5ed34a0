//! Any path and method: classification answers, and what it classifies keeps its meaning
//! once re-encoded as the gateway forwards it.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use toolgate_gateway::config::{RouteConfig, UpstreamConfig, UpstreamKind};
use toolgate_gateway::routes::RouteTable;

static TABLE: LazyLock<RouteTable> = LazyLock::new(|| {
    let route = |tool: &str, method: &str, path: &str| RouteConfig {
        tool: tool.into(),
        method: method.into(),
        path: path.into(),
        require_task: false,
        arguments: None,
        dots_in_params: false,
        undeclared_arguments: None,
        header_arguments: Vec::new(),
        forward_headers: Vec::new(),
        retry: false,
    };
    RouteTable::new(&[UpstreamConfig {
        name: "billing".into(),
        command: None,
        env: Default::default(),
        process: Default::default(),
        url: "http://127.0.0.1:1".into(),
        audience: "a".into(),
        kind: UpstreamKind::Rest,
        routes: vec![
            route("get_invoice", "GET", "/invoices/{invoice_id}"),
            route("summary", "GET", "/invoices/summary"),
            route("refund", "POST", "/refunds"),
            route("line", "GET", "/invoices/{invoice_id}/lines/{line}"),
        ],
        timeout_seconds: 1,
        require_task: false,
        max_in_flight: None,
        response_idle_seconds: 300,
        credential: Default::default(),
        tls: None,
        undeclared_arguments: None,
        forward_headers: Vec::new(),
        urls: Vec::new(),
        balance: Default::default(),
        passive_health: Default::default(),
    }])
});

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    for method in [http::Method::GET, http::Method::POST] {
        let _ = TABLE.classify(&method, path);
    }
});
