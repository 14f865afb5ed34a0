//! Classification of REST calls: `/<upstream>/<path>` + method → the upstream's tool and
//! its path parameters.

use std::collections::HashMap;

use percent_encoding::percent_decode_str;
use toolgate_mcp::json::fold_key;

use crate::args::Undeclared;
use crate::config::{ArgumentsIn, UpstreamConfig};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

/// A path template such as `/invoices/{invoice_id}`: each `{name}` is one whole segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    segments: Vec<Segment>,
}

impl Template {
    pub fn parse(path: &str) -> Result<Template, String> {
        let rest = path
            .strip_prefix('/')
            .ok_or_else(|| format!("path `{path}` must start with /"))?;
        let mut segments = Vec::new();
        let mut seen = Vec::new();
        for seg in rest.split('/').filter(|s| !s.is_empty()) {
            if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Err(format!("path `{path}`: bad parameter `{seg}`"));
                }
                if seen.contains(&name) {
                    return Err(format!("path `{path}`: parameter `{name}` appears twice"));
                }
                seen.push(name);
                segments.push(Segment::Param(name.to_string()));
            } else if seg.contains(['{', '}']) {
                return Err(format!(
                    "path `{path}`: a parameter must be a whole segment"
                ));
            } else {
                segments.push(Segment::Literal(seg.to_string()));
            }
        }
        Ok(Template { segments })
    }

    /// For each segment, the parameter it is (`None`: a literal).
    fn param_names(&self) -> Vec<Option<String>> {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Param(name) => Some(name.clone()),
                Segment::Literal(_) => None,
            })
            .collect()
    }

    /// Matches decoded segments; returns the parameters.
    fn matches(&self, segments: &[String]) -> Option<HashMap<String, String>> {
        if segments.len() != self.segments.len() {
            return None;
        }
        let mut params = HashMap::new();
        for (template, actual) in self.segments.iter().zip(segments) {
            match template {
                Segment::Literal(lit) if lit == actual => {}
                Segment::Literal(_) => return None,
                Segment::Param(name) => {
                    params.insert(name.clone(), actual.clone());
                }
            }
        }
        Some(params)
    }

    /// A segment at the place of one of this template's literals that a case-insensitive
    /// router takes for it, although it is spelled otherwise.
    fn misspells_a_literal(&self, segments: &[String]) -> bool {
        segments.len() == self.segments.len()
            && self.segments.iter().zip(segments).any(|(template, actual)| {
                matches!(template, Segment::Literal(lit) if lit != actual && fold_key(lit) == fold_key(actual))
            })
    }

    fn literal_count(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count()
    }
}

#[derive(Debug, Clone)]
struct Route {
    tool: String,
    method: http::Method,
    template: Template,
    require_task: bool,
    arguments: ArgumentsIn,
    dots_in_params: bool,
    undeclared: Undeclared,
    header_arguments: Vec<String>,
    forward_headers: Vec<String>,
    retry: bool,
}

/// A classified REST call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    pub upstream: usize,
    pub tool: String,
    pub params: HashMap<String, String>,
    /// The decoded path segments below `/<upstream>`: what the template matched, and what
    /// the forwarded path is re-encoded from.
    pub segments: Vec<String>,
    /// The call must run in a task.
    pub require_task: bool,
    /// Where the upstream reads the other arguments.
    pub arguments: ArgumentsIn,
    /// For each of `segments`, the parameter it holds (`None`: a literal).
    pub param_at: Vec<Option<String>>,
    pub undeclared: Undeclared,
    /// Headers read as arguments, by argument name.
    pub header_arguments: Vec<String>,
    /// Non-standard agent headers let through on this route (besides the upstream's).
    pub forward_headers: Vec<String>,
    /// A 502/503 answer is tried again on another endpoint (an idempotent route).
    pub retry: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    #[error("tool_not_found")]
    NotFound,
    #[error("bad path: {0}")]
    BadPath(&'static str),
}

/// All routes, by upstream name.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    upstreams: HashMap<String, (usize, Vec<Route>)>,
}

impl RouteTable {
    /// Built from already checked config.
    pub fn new(upstreams: &[UpstreamConfig]) -> RouteTable {
        let mut table = RouteTable::default();
        for (index, up) in upstreams.iter().enumerate() {
            let mut routes: Vec<Route> = up
                .routes
                .iter()
                .filter_map(|r| {
                    Some(Route {
                        tool: r.tool.clone(),
                        method: r.method.parse().ok()?,
                        template: Template::parse(&r.path).ok()?,
                        require_task: r.require_task || up.require_task,
                        arguments: r.arguments_in(),
                        dots_in_params: r.dots_in_params,
                        undeclared: r
                            .undeclared_arguments
                            .or(up.undeclared_arguments)
                            .unwrap_or_default(),
                        header_arguments: r.header_arguments.clone(),
                        forward_headers: r.forward_headers.clone(),
                        retry: r.retry,
                    })
                })
                .collect();
            // Most literal segments first: `/invoices/summary` wins over `/invoices/{id}`.
            routes.sort_by_key(|r| std::cmp::Reverse(r.template.literal_count()));
            table.upstreams.insert(up.name.clone(), (index, routes));
        }
        table
    }

    /// The upstream named by the first path segment, and the path below it.
    pub fn upstream<'p>(&self, path: &'p str) -> Option<(usize, &'p str)> {
        let rest = path.strip_prefix('/')?;
        let (name, below) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        self.upstreams.get(name).map(|(index, _)| (*index, below))
    }

    /// Finds the tool for a REST call. Dot segments, empty segments and parameters that
    /// decode to a `/` are refused: the upstream could read them as a different path.
    pub fn classify(&self, method: &http::Method, path: &str) -> Result<Classified, ClassifyError> {
        let (index, rest) = self.upstream(path).ok_or(ClassifyError::NotFound)?;
        let name = path[1..].split('/').next().unwrap_or_default();
        let (_, routes) = &self.upstreams[name];
        let mut segments = Vec::new();
        for raw in rest.split('/').skip(1) {
            let decoded = percent_decode_str(raw)
                .decode_utf8()
                .map_err(|_| ClassifyError::BadPath("segment is not UTF-8"))?;
            if decoded.is_empty() || decoded == "." || decoded == ".." {
                return Err(ClassifyError::BadPath("empty or dot segment"));
            }
            if decoded.contains('/') || decoded.contains('\\') {
                return Err(ClassifyError::BadPath("encoded slash in segment"));
            }
            if decoded.chars().any(char::is_control) {
                return Err(ClassifyError::BadPath("control character in segment"));
            }
            segments.push(decoded.into_owned());
        }
        if routes
            .iter()
            .any(|r| r.template.misspells_a_literal(&segments))
        {
            // Case-insensitive routers (Express's default, ASP.NET) would take
            // `/invoices/EXPORT` for `/invoices/export`, not for `/invoices/{id}`.
            return Err(ClassifyError::BadPath(
                "segment differs from a route's literal only in letter case",
            ));
        }
        let (route, params) = routes
            .iter()
            .filter(|r| r.method == method)
            .find_map(|r| Some((r, r.template.matches(&segments)?)))
            .ok_or(ClassifyError::NotFound)?;
        if !route.dots_in_params && params.values().any(|v| v.contains('.')) {
            // Rails and Spring (suffix matching) read `42.json` as 42 in JSON format.
            return Err(ClassifyError::BadPath(
                "a `.` in a path parameter (the upstream may read a format suffix): set `dots_in_params: true` on the route if it does not",
            ));
        }
        Ok(Classified {
            upstream: index,
            tool: route.tool.clone(),
            params,
            segments,
            require_task: route.require_task,
            arguments: route.arguments,
            param_at: route.template.param_names(),
            undeclared: route.undeclared,
            header_arguments: route.header_arguments.clone(),
            forward_headers: route.forward_headers.clone(),
            retry: route.retry,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RouteConfig, UpstreamKind};

    fn table() -> RouteTable {
        let route = |tool: &str, method: &str, path: &str| RouteConfig {
            tool: tool.into(),
            method: method.into(),
            path: path.into(),
            require_task: false,
            arguments: None,
            dots_in_params: tool == "file",
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
                route("file", "GET", "/files/{name}"),
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
    }

    #[test]
    fn matches_method_and_template() {
        let t = table();
        let c = t
            .classify(&http::Method::GET, "/billing/invoices/42")
            .unwrap();
        assert_eq!(
            (c.upstream, c.tool.as_str(), c.segments.clone()),
            (
                0,
                "get_invoice",
                vec!["invoices".to_string(), "42".to_string()]
            )
        );
        assert_eq!(c.params["invoice_id"], "42");
        let c = t
            .classify(&http::Method::GET, "/billing/invoices/7/lines/a%20b")
            .unwrap();
        assert_eq!(
            (c.tool.as_str(), c.params["line"].as_str()),
            ("line", "a b")
        );
        assert_eq!(
            t.classify(&http::Method::POST, "/billing/refunds")
                .unwrap()
                .tool,
            "refund"
        );
    }

    #[test]
    fn literal_beats_parameter() {
        assert_eq!(
            table()
                .classify(&http::Method::GET, "/billing/invoices/summary")
                .unwrap()
                .tool,
            "summary"
        );
    }

    #[test]
    fn unmatched_is_not_found() {
        let t = table();
        for (m, p) in [
            (http::Method::POST, "/billing/invoices/42"),
            (http::Method::GET, "/billing/invoices"),
            (http::Method::GET, "/billing/invoices/42/extra/x/y"),
            (http::Method::GET, "/other/invoices/42"),
            (http::Method::GET, "/"),
            (http::Method::GET, "/billing"),
        ] {
            assert_eq!(t.classify(&m, p), Err(ClassifyError::NotFound), "{m} {p}");
        }
    }

    #[test]
    fn confusing_paths_are_refused() {
        let t = table();
        for p in [
            "/billing/invoices/..",
            "/billing/invoices/%2e%2e",
            "/billing/invoices/a%2Fb",
            "/billing/invoices//",
            "/billing/invoices/%ff",
            "/billing/invoices/4%002",
            "/billing/invoices/%0d%0a",
            // Case-insensitive routers read these as the literal routes.
            "/billing/invoices/SUMMARY",
            "/billing/Invoices/42",
            "/billing/invoices/%53ummary",
            // Rails reads a suffix as a format: 42 (or the summary route) in JSON.
            "/billing/invoices/42.json",
            "/billing/invoices/summary.json",
        ] {
            assert!(
                matches!(
                    t.classify(&http::Method::GET, p),
                    Err(ClassifyError::BadPath(_))
                ),
                "{p}"
            );
        }
    }

    #[test]
    fn dots_pass_where_the_route_allows_them() {
        let c = table()
            .classify(&http::Method::GET, "/billing/files/report.v2.pdf")
            .unwrap();
        assert_eq!(c.params["name"], "report.v2.pdf");
        assert_eq!(c.arguments, ArgumentsIn::Query);
        let c = table()
            .classify(&http::Method::POST, "/billing/refunds")
            .unwrap();
        assert_eq!(c.arguments, ArgumentsIn::Body);
    }

    proptest::proptest! {
        /// Any path: classification answers without panicking, and a classified path, rebuilt
        /// as it is forwarded (segments re-encoded), classifies as the same call.
        #[test]
        fn classification_is_total_and_survives_re_encoding(
            path in "(/(invoices|INVOICES|summary|files|lines|x|%2[eEfF]|%00|%[0-9a-f]{2}|\\.|[a-z0-9._~ -]{0,6})){0,5}",
            post in proptest::prelude::any::<bool>(),
        ) {
            let t = table();
            let method = if post { http::Method::POST } else { http::Method::GET };
            let path = format!("/billing{path}");
            if let Ok(first) = t.classify(&method, &path) {
                let rebuilt = format!("/billing{}", crate::rest::canonical_path(&first.segments));
                let again = t.classify(&method, &rebuilt).expect("the forwarded form classifies");
                proptest::prop_assert_eq!(again, first);
            }
        }
    }

    #[test]
    fn bad_templates_are_rejected() {
        for p in ["invoices", "/a/{}", "/a/x{id}", "/a/{id}/{id}", "/a/{i-d}"] {
            assert!(Template::parse(p).is_err(), "{p}");
        }
    }
}
