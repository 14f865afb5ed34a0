//! `toolgate import openapi` (issue 14) on two real, public documents of different styles
//! (tests/fixtures/openapi: Swagger Petstore, OpenAPI 3.0; Redocly Museum, OpenAPI 3.1): each
//! imported, checked with the starter policies that permit nothing, then served by a running
//! gateway whose calls are classified to the right tool with typed arguments.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::{json, Value};
use toolgate_credential::SigningKey;

/// `toolgate import openapi` into `out`; its stdout.
fn import(spec: &Path, upstream: &str, url: Option<&str>, out: &Path) -> String {
    let mut args = vec![
        "import",
        "openapi",
        spec.to_str().unwrap(),
        "--upstream",
        upstream,
        "--out",
        out.to_str().unwrap(),
    ];
    if let Some(url) = url {
        args.extend(["--url", url]);
    }
    let output = toolgate(&args);
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// A gateway directory whose config's only upstream is the imported one, as written (the
/// list indented under `upstreams:`), with the example policies and the imported files.
struct Imported {
    dir: TempDir,
    idp: Idp,
}

impl Imported {
    fn new(upstream: &str, imported: &Path) -> Imported {
        let dir = TempDir::new("import");
        let idp = Idp::new(&dir.0);
        let policies = write_policies(&dir.0, &[]);
        for ext in ["cedarschema", "cedar"] {
            let name = format!("{upstream}.{ext}");
            std::fs::copy(imported.join(&name), policies.join(&name)).unwrap();
        }
        let (_, signing_pem) = SigningKey::generate().unwrap();
        std::fs::write(dir.0.join("signing.pem"), signing_pem).unwrap();
        let entry: String =
            std::fs::read_to_string(imported.join(format!("{upstream}.upstream.yaml")))
                .unwrap()
                .lines()
                .map(|l| format!("  {l}\n"))
                .collect();
        let config = format!(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nissuer: https://toolgate.test\npolicies: policies/\n\
             inbound:\n  jwt:\n    - issuer: {IDP}\n      jwks_file: idp.jwks.json\n      audiences: [{AUDIENCE}]\n\
             credentials:\n  signing_key: signing.pem\n  ttl_seconds: 60\naudit:\n  path: audit.jsonl\nupstreams:\n{entry}"
        );
        std::fs::write(dir.0.join("toolgate.yaml"), config).unwrap();
        Imported { dir, idp }
    }

    fn config(&self) -> PathBuf {
        self.dir.0.join("toolgate.yaml")
    }

    fn check(&self) -> std::process::Output {
        toolgate(&["check", "--config", self.config().to_str().unwrap()])
    }

    /// `new`, checked as written: with the starter policies that permit nothing.
    fn checked(upstream: &str, imported: &Path) -> Imported {
        let made = Imported::new(upstream, imported);
        let check = made.check();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
        made
    }

    fn permit(&self, upstream: &str, policies: &str) {
        std::fs::write(
            self.dir.0.join(format!("policies/{upstream}.cedar")),
            policies,
        )
        .unwrap();
        let check = self.check();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }

    async fn serve(&self) -> (Killed, std::net::SocketAddr) {
        let (child, addr, _) = spawn_serve(&self.config()).await;
        (Killed(child), addr)
    }

    /// The audit line of `decision_id` (bounded wait).
    async fn audit_line(&self, decision_id: &str) -> Value {
        for _ in 0..100 {
            let text = std::fs::read_to_string(self.dir.0.join("audit.jsonl")).unwrap_or_default();
            if let Some(line) = text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|l| l["decision_id"] == decision_id)
            {
                return line;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("no audit line {decision_id}");
    }
}

/// Calls through the gateway at `addr`; the answer and its audit line (from the decision id
/// in the minted credential the upstream got, or the 403 body).
async fn call(
    imported: &Imported,
    upstream: &Upstream,
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (Answer, Value) {
    let token = format!("Bearer {}", imported.idp.delegated());
    let mut headers = vec![("authorization", token.as_str())];
    if body.is_some() {
        headers.push(("content-type", "application/json"));
    }
    let before = upstream.requests().len();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let answer = send(
        method,
        &format!("http://{addr}{path}"),
        &headers,
        body.as_bytes(),
    )
    .await;
    let decision_id = if answer.status == 200 {
        assert_eq!(upstream.requests().len(), before + 1);
        let minted = upstream.requests().last().unwrap().headers["authorization"]
            .to_str()
            .unwrap()[7..]
            .to_string();
        claims_of(&minted)["decision_id"]
            .as_str()
            .unwrap()
            .to_string()
    } else {
        assert_eq!(upstream.requests().len(), before, "{:?}", answer.body);
        answer.json()["decision_id"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let line = imported.audit_line(&decision_id).await;
    (answer, line)
}

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/openapi").join(name)
}

#[tokio::test]
async fn petstore_3_0_is_imported_checked_and_served() {
    let upstream = Upstream::start().await;
    let out = TempDir::new("import-out");
    let url = format!("http://{}", upstream.addr);
    let said = import(
        &fixture("petstore-3.0.yaml"),
        "petstore",
        Some(&url),
        &out.0,
    );
    assert!(said.contains("imported 19 operations"), "{said}");
    for reported in [
        "uploadFile: a body of type application/octet-stream",
        "createUsersWithListInput: the JSON body is not an object",
        "deletePet: header parameter `api_key`: toolgate does not forward it",
    ] {
        assert!(said.contains(reported), "{reported} in {said}");
    }
    let schema = std::fs::read_to_string(out.0.join("petstore.cedarschema")).unwrap();
    for declared in [
        r#"action "petstore/getPetById" in [call]"#,
        "args: { petId: Long }",
        // operationId names the tool; the form's query arguments, with the path's.
        r#"action "petstore/updatePetWithForm" in [call]"#,
        "args: { petId: Long, name?: String, status?: String }",
        // The body's object, required fields kept, nested records and sets.
        "name: String, category?: { id?: Long, name?: String }, photoUrls: Set<String>",
        // A password is marked sensitive: the audit keeps a keyed hash of it.
        "args: { username?: String, @sensitive password?: String }",
        // A query array is a set.
        "args: { tags?: Set<String> }",
    ] {
        assert!(schema.contains(declared), "{declared} in {schema}");
    }
    let routes = std::fs::read_to_string(out.0.join("petstore.upstream.yaml")).unwrap();
    assert!(routes.contains("arguments: query"), "{routes}");
    assert!(!routes.contains("header_arguments"), "{routes}");

    // As written, with the starter policies that permit nothing, `toolgate check` passes.
    let imported = Imported::checked("petstore", &out.0);

    imported.permit(
        "petstore",
        r#"
@id("pets")
permit (principal, action, resource in Toolgate::Upstream::"petstore");

@id("no-big-ids")
forbid (principal, action == Toolgate::Action::"petstore/getPetById", resource)
when { context.args.petId > 100 };
"#,
    );
    let (_child, addr) = imported.serve().await;

    // The literal segment wins over the template beside it.
    let (answer, line) = call(
        &imported,
        &upstream,
        addr,
        "GET",
        "/petstore/pet/findByStatus?status=sold",
        None,
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(line["action"], "petstore/findPetsByStatus");
    // `explode: true`: one status a name, so a set.
    assert_eq!(line["args"], json!({"status": ["sold"]}));
    assert_eq!(
        upstream.requests().last().unwrap().uri,
        "/pet/findByStatus?status=sold"
    );

    let (answer, line) = call(&imported, &upstream, addr, "GET", "/petstore/pet/42", None).await;
    assert_eq!(answer.status, 200);
    assert_eq!(line["action"], "petstore/getPetById");
    assert_eq!(
        line["args"],
        json!({"petId": 42}),
        "typed as the Long it is"
    );
    let (answer, line) = call(&imported, &upstream, addr, "GET", "/petstore/pet/101", None).await;
    assert_eq!(answer.status, 403, "the policy compares the Long");
    assert_eq!(line["policies"], json!(["no-big-ids"]));

    let pet = json!({"name": "rex", "photoUrls": ["p.png"], "status": "available", "category": {"id": 1, "name": "dogs"}});
    let (answer, line) = call(
        &imported,
        &upstream,
        addr,
        "POST",
        "/petstore/pet",
        Some(pet.clone()),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(line["action"], "petstore/addPet");
    assert_eq!(line["args"], pet);
    // A required body field missing: the request does not fit the schema, so it is denied.
    let (answer, _) = call(
        &imported,
        &upstream,
        addr,
        "POST",
        "/petstore/pet",
        Some(json!({"name": "rex"})),
    )
    .await;
    assert_eq!(answer.status, 403);

    let (answer, line) = call(
        &imported,
        &upstream,
        addr,
        "GET",
        "/petstore/user/alice",
        None,
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(line["action"], "petstore/getUserByName");
    let (_, line) = call(
        &imported,
        &upstream,
        addr,
        "GET",
        "/petstore/user/login?username=a&password=hunter2",
        None,
    )
    .await;
    assert_eq!(line["action"], "petstore/loginUser");
    assert_eq!(line["args"]["username"], "a");
    let hashed = line["args"]["password"].as_str().unwrap();
    assert!(
        hashed.starts_with("hmac:") && !hashed.contains("hunter2"),
        "{line}"
    );
}

#[tokio::test]
async fn museum_3_1_is_imported_checked_and_served() {
    let upstream = Upstream::start().await;
    let out = TempDir::new("import-out");
    // The document's own server URL is taken when --url is not given.
    let said = import(&fixture("museum-3.1.yaml"), "museum", None, &out.0);
    assert!(said.contains("imported 8 operations"), "{said}");
    assert!(said.contains("webhook `publishNewEvent`"), "{said}");
    let routes = std::fs::read_to_string(out.0.join("museum.upstream.yaml")).unwrap();
    assert!(routes.contains("url: https://"), "{routes}");
    let schema = std::fs::read_to_string(out.0.join("museum.cedarschema")).unwrap();
    for declared in [
        // allOf merged, enums as String, required kept.
        "args: { email?: String, ticketId?: String, ticketDate: String, ticketType: String, eventId?: String }",
        // number as decimal; an array of dates as a Set.
        "dates: Set<String>, price: decimal",
        "args: { startDate?: String, page?: Long, limit?: Long }",
    ] {
        assert!(schema.contains(declared), "{declared} in {schema}");
    }
    // Served by the recording upstream instead of the museum's.
    let text = routes.replace(
        routes.lines().find(|l| l.contains("url: ")).unwrap(),
        &format!("  url: http://{}", upstream.addr),
    );
    std::fs::write(out.0.join("museum.upstream.yaml"), text).unwrap();
    let imported = Imported::checked("museum", &out.0);
    imported.permit(
        "museum",
        r#"
@id("museum")
permit (principal, action, resource in Toolgate::Upstream::"museum");

@id("no-dear-events")
forbid (principal, action == Toolgate::Action::"museum/createSpecialEvent", resource)
when { context.args.price.greaterThan(decimal("100.0")) };
"#,
    );
    let (_child, addr) = imported.serve().await;

    let event = json!({"name": "Night", "location": "Hall", "eventDescription": "Late", "dates": ["2026-12-24"], "price": 12.5});
    let (answer, line) = call(
        &imported,
        &upstream,
        addr,
        "POST",
        "/museum/special-events",
        Some(event.clone()),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(line["action"], "museum/createSpecialEvent");
    assert_eq!(line["args"], event);
    let dear = json!({"name": "Gala", "location": "Hall", "eventDescription": "Dear", "dates": ["2026-12-31"], "price": 150});
    let (answer, line) = call(
        &imported,
        &upstream,
        addr,
        "POST",
        "/museum/special-events",
        Some(dear),
    )
    .await;
    assert_eq!(answer.status, 403, "the policy compares the decimal");
    assert_eq!(line["policies"], json!(["no-dear-events"]));

    let id = "3be6453c-03eb-4357-ae5a-984a0e574a54";
    let (answer, line) = call(
        &imported,
        &upstream,
        addr,
        "PATCH",
        &format!("/museum/special-events/{id}"),
        Some(json!({"price": 20})),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(line["action"], "museum/updateSpecialEvent");
    assert_eq!(line["args"], json!({"eventId": id, "price": 20}));
    let ticket =
        json!({"ticketType": "general", "ticketDate": "2026-12-24", "email": "a@example.com"});
    let (answer, line) = call(
        &imported,
        &upstream,
        addr,
        "POST",
        "/museum/tickets",
        Some(ticket.clone()),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(line["action"], "museum/buyMuseumTickets");
    assert_eq!(line["args"], ticket);
    let (_, line) = call(
        &imported,
        &upstream,
        addr,
        "GET",
        "/museum/museum-hours?page=2",
        None,
    )
    .await;
    assert_eq!(line["action"], "museum/getMuseumHours");
    assert_eq!(line["args"], json!({"page": 2}));
}

#[test]
fn a_newer_document_is_reported_as_added_removed_and_changed() {
    let out = TempDir::new("import-rerun");
    let first = import(
        &fixture("petstore-3.0.yaml"),
        "petstore",
        Some("https://pets.example"),
        &out.0,
    );
    assert!(!first.contains("since the last import"), "{first}");
    // The team writes its policies; a re-import must keep them.
    let mine = "// mine\n";
    std::fs::write(out.0.join("petstore.cedar"), mine).unwrap();

    let text = std::fs::read_to_string(fixture("petstore-3.0.yaml")).unwrap();
    // A newer version: logout gone, login renamed, orderId typed as a string, a new operation.
    let newer = text
        .replacen("operationId: logoutUser", "operationId: signOut", 1)
        .replacen("/store/order/{orderId}:", "/store/orders/{orderId}:", 1)
        .replacen(
            "  /user/{username}:",
            "  /user/{username}/avatar:\n    get:\n      operationId: getAvatar\n      parameters:\n        - name: username\n          in: path\n          required: true\n          schema:\n            type: string\n      responses:\n        '200':\n          description: ok\n  /user/{username}:",
            1,
        );
    assert_ne!(newer, text);
    let spec = out.0.join("petstore-newer.yaml");
    std::fs::write(&spec, newer).unwrap();
    let second = import(&spec, "petstore", Some("https://pets.example"), &out.0);
    for change in [
        "added petstore/signOut (GET /user/logout)",
        "added petstore/getAvatar (GET /user/{username}/avatar)",
        "removed petstore/logoutUser",
        "changed petstore/getOrderById: GET /store/order/{orderId} is now GET /store/orders/{orderId}",
        "changed petstore/deleteOrder: DELETE /store/order/{orderId} is now DELETE /store/orders/{orderId}",
    ] {
        assert!(second.contains(change), "{change} in {second}");
    }
    assert!(second.contains("kept "), "{second}");
    assert_eq!(
        std::fs::read_to_string(out.0.join("petstore.cedar")).unwrap(),
        mine
    );
    // Each argument added, removed or retyped is named.
    let retyped = std::fs::read_to_string(&spec)
        .unwrap()
        .replacen("name: petId\n          in: path\n          description: ID of pet to return\n          required: true\n          schema:\n            type: integer", "name: petId\n          in: path\n          description: ID of pet to return\n          required: true\n          schema:\n            type: string", 1);
    let renamed = retyped.replacen(
        "- name: status\n          in: query\n          description: Status of pet that needs to be updated",
        "- name: state\n          in: query\n          description: Status of pet that needs to be updated",
        1,
    );
    std::fs::write(&spec, renamed).unwrap();
    let third = import(&spec, "petstore", Some("https://pets.example"), &out.0);
    for change in [
        "changed petstore/getPetById: argument `petId: Long` is now `petId: String`",
        "changed petstore/updatePetWithForm: argument `state?: String` added; argument `status` removed",
    ] {
        assert!(third.contains(change), "{change} in {third}");
    }
    assert!(!third.contains("added petstore/"), "{third}");
}

#[test]
fn what_cannot_be_imported_is_refused_by_name() {
    let out = TempDir::new("import-bad");
    let cases = [
        ("swagger.yaml", "swagger: '2.0'\ninfo: {title: t, version: '1'}\npaths: {}\n", "convert it first (e.g. `npx swagger2openapi"),
        ("relative.yaml", "openapi: 3.0.3\ninfo: {title: t, version: '1'}\nservers: [{url: /api}]\npaths:\n  /a:\n    get: {responses: {'200': {description: ok}}}\n", "give --url"),
        ("external.yaml", "openapi: 3.1.0\ninfo: {title: t, version: '1'}\nservers: [{url: 'https://x.example'}]\npaths:\n  /a:\n    get:\n      parameters: [{$ref: 'other.yaml#/p'}]\n      responses: {'200': {description: ok}}\n", "other.yaml: No such file"),
        ("url.yaml", "openapi: 3.1.0\ninfo: {title: t, version: '1'}\nservers: [{url: 'https://x.example'}]\npaths:\n  /a:\n    get:\n      parameters: [{$ref: 'https://x.example/p.yaml#/p'}]\n      responses: {'200': {description: ok}}\n", "does not fetch documents over the network"),
        ("partial.yaml", "openapi: 3.0.3\ninfo: {title: t, version: '1'}\nservers: [{url: 'https://x.example'}]\npaths:\n  /a/{id}.json:\n    get: {responses: {'200': {description: ok}}}\n", "no operations"),
    ];
    for (name, text, says) in cases {
        let spec = out.0.join(name);
        std::fs::write(&spec, text).unwrap();
        let output = toolgate(&[
            "import",
            "openapi",
            spec.to_str().unwrap(),
            "--upstream",
            "x",
            "--out",
            out.0.join("o").to_str().unwrap(),
        ]);
        assert!(!output.status.success(), "{name}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says), "{name}: {stderr}");
    }
}

/// A document imported with the recording upstream as its URL, checked, given `policies`
/// and served.
struct Served {
    upstream: Upstream,
    imported: Imported,
    addr: std::net::SocketAddr,
    _child: Killed,
    /// What the import said.
    said: String,
    /// The Cedar schema it wrote.
    schema: String,
}

impl Served {
    async fn start(spec: &Path, name: &str, policies: &str) -> Served {
        let upstream = Upstream::start().await;
        let out = TempDir::new("import-out");
        let url = format!("http://{}", upstream.addr);
        let said = import(spec, name, Some(&url), &out.0);
        let schema = std::fs::read_to_string(out.0.join(format!("{name}.cedarschema"))).unwrap();
        let imported = Imported::checked(name, &out.0);
        imported.permit(name, policies);
        let (_child, addr) = imported.serve().await;
        Served {
            upstream,
            imported,
            addr,
            _child,
            said,
            schema,
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (Answer, Value) {
        call(
            &self.imported,
            &self.upstream,
            self.addr,
            method,
            path,
            body,
        )
        .await
    }
}

#[tokio::test]
async fn a_multi_file_document_is_read_as_one_and_its_example_request_declared() {
    // DigitalOcean's document: operations, parameters, schemas and examples in files beside
    // the root, named by relative $refs (`parameters.yml#/tag_id`, `../../shared/...`).
    let served = Served::start(
        &fixture("digitalocean-multi-file/DigitalOcean-public.v2.yaml"),
        "do",
        r#"
@id("do")
permit (principal, action, resource in Toolgate::Upstream::"do");

@id("one-project")
forbid (principal, action == Toolgate::Action::"do/vpcnatgateways_create", resource)
unless { context.args has project_id && context.args.project_id == "9cc10173-e9ea-4176-9dbc-a4cee4c4ff30" };
"#,
    )
    .await;
    assert!(
        served.said.contains("imported 8 operations"),
        "{}",
        served.said
    );
    for declared in [
        // resources/tags/parameters.yml and models/tags_resource.yml.
        "args: { tag_id: String, resources: Set<{ resource_id?: String, resource_type?: String }> }",
        // ../../shared/parameters.yml and ./parameters.yml.
        "args: { per_page?: Long, page?: Long, state?: String, region?: String, type?: String, name?: String }",
        // `project_id` is in the example request (examples.yml), not the schema.
        "tcp_timeout_seconds?: Long, project_id?: String }",
    ] {
        assert!(served.schema.contains(declared), "{declared} in {}", served.schema);
    }
    let gateway = json!({"name": "nat", "type": "PUBLIC", "region": "tor1", "size": 1,
        "vpcs": [{"vpc_uuid": "0eb1752f-807b-4562-a077-8018e13ab1fb"}],
        "project_id": "9cc10173-e9ea-4176-9dbc-a4cee4c4ff30"});
    let (answer, line) = served
        .call("POST", "/do/v2/vpc_nat_gateways", Some(gateway.clone()))
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(line["action"], "do/vpcnatgateways_create");
    assert_eq!(line["args"], gateway);
    let mut elsewhere = gateway;
    elsewhere["project_id"] = json!("another-project");
    let (answer, line) = served
        .call("POST", "/do/v2/vpc_nat_gateways", Some(elsewhere))
        .await;
    assert_eq!(answer.status, 403, "the policy reads the example's field");
    assert_eq!(line["policies"], json!(["one-project"]));
    let (answer, line) = served
        .call(
            "GET",
            "/do/v2/vpc_nat_gateways?per_page=5&state=ACTIVE",
            None,
        )
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(line["args"], json!({"per_page": 5, "state": "ACTIVE"}));
}

#[tokio::test]
async fn read_only_references_and_nested_all_of_are_declared() {
    // Asana's task: allOf four deep, each reference's `gid` readOnly, and `memberships`
    // (readOnly, yet how a new task is put in a section) a set of references.
    let served = Served::start(
        &fixture("asana-tasks-excerpt.yaml"),
        "asana",
        r#"
@id("asana")
permit (principal, action, resource in Toolgate::Upstream::"asana");

@id("in-a-section")
forbid (principal, action == Toolgate::Action::"asana/createTask", resource)
unless { context.args has data && context.args.data has memberships };
"#,
    )
    .await;
    for declared in [
        "gid?: String, resource_type?: String, name?: String",
        "memberships?: Set<{ project?: { gid?: String, resource_type?: String, name?: String }, section?: { gid?: String, resource_type?: String, name?: String } }>",
        "notes?: String",
        "workspace?: String",
    ] {
        assert!(served.schema.contains(declared), "{declared} in {}", served.schema);
    }
    let task = json!({"data": {"name": "Buy catnip", "notes": "Humboldt", "workspace": "1100",
        "memberships": [{"project": {"gid": "1200"}, "section": {"gid": "1300"}}]}});
    let (answer, line) = served
        .call("POST", "/asana/tasks", Some(task.clone()))
        .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(line["action"], "asana/createTask");
    assert_eq!(line["args"], task);
    // Cedar cannot look inside a set of records with optional fields; it can see the set.
    let nowhere = json!({"data": {"name": "Buy catnip"}});
    let (answer, line) = served.call("POST", "/asana/tasks", Some(nowhere)).await;
    assert_eq!(answer.status, 403);
    assert_eq!(line["policies"], json!(["in-a-section"]));
}

#[tokio::test]
async fn an_undescribed_required_field_is_declared_and_fragment_paths_named() {
    // Box's invite: `actionable_by` requires an `id` its properties leave out; its
    // `/...schema#add` path is one of Box's #fragment variants.
    let served = Served::start(
        &fixture("box-invites-excerpt.json"),
        "box",
        r#"
@id("box")
permit (principal, action, resource in Toolgate::Upstream::"box");

@id("no-blocked-user")
forbid (principal, action == Toolgate::Action::"box/post_invites", resource)
when { context.args has actionable_by && context.args.actionable_by has id && context.args.actionable_by.id == "blocked" };
"#,
    )
    .await;
    for said in [
        "post_invites: body.actionable_by.id: required but not described: declared as an optional String",
        "path `/metadata_templates/enterprise/securityClassification-6VMVochwUWo/schema#add`: it has a #fragment",
    ] {
        assert!(served.said.contains(said), "{said} in {}", served.said);
    }
    assert!(
        served.said.contains("imported 1 operations"),
        "{}",
        served.said
    );
    let invite = json!({"enterprise": {"id": "1232234"}, "actionable_by": {"id": "42"}});
    let (answer, line) = served
        .call("POST", "/box/invites", Some(invite.clone()))
        .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(line["args"], invite);
    let blocked = json!({"enterprise": {"id": "1232234"}, "actionable_by": {"id": "blocked"}});
    let (answer, _) = served.call("POST", "/box/invites", Some(blocked)).await;
    assert_eq!(answer.status, 403);
}

/// PagerDuty's shape (its document carries no licence, so it is not vendored): `statuses[]`,
/// a scalar schema with `explode: true`, and Accept and Content-Type header parameters on
/// every operation.
const INCIDENTS: &str = r#"
openapi: 3.0.2
info: {title: incidents, version: '1'}
servers: [{url: 'https://api.example'}]
paths:
  /incidents:
    get:
      operationId: listIncidents
      parameters:
        - {name: Accept, in: header, required: true, schema: {type: string}}
        - {name: Content-Type, in: header, required: true, schema: {type: string}}
        - {name: 'statuses[]', in: query, explode: true, schema: {type: string, enum: [triggered, acknowledged, resolved]}}
        - {name: 'service_ids[]', in: query, explode: true, schema: {type: array, items: {type: string}}}
        - {name: limit, in: query, schema: {type: integer}}
      responses: {'200': {description: ok}}
"#;

#[tokio::test]
async fn repeated_query_parameters_are_sets() {
    let dir = TempDir::new("import-sets");
    let spec = dir.0.join("incidents.yaml");
    std::fs::write(&spec, INCIDENTS).unwrap();
    let served = Served::start(
        &spec,
        "pd",
        r#"
@id("pd")
permit (principal, action, resource in Toolgate::Upstream::"pd");

@id("open-only")
forbid (principal, action == Toolgate::Action::"pd/listIncidents", resource)
when { context.args has statuses && context.args.statuses.contains("resolved") };
"#,
    )
    .await;
    assert!(
        served
            .schema
            .contains("args: { statuses?: Set<String>, service_ids?: Set<String>, limit?: Long }"),
        "{}",
        served.schema
    );
    // Two standard headers: one summary line, no note each.
    assert!(
        served
            .said
            .contains("2 header parameters named Accept, Content-Type or Authorization"),
        "{}",
        served.said
    );
    assert!(!served.said.contains("`Accept`"), "{}", served.said);
    let (answer, line) = served
        .call(
            "GET",
            "/pd/incidents?statuses[]=triggered&statuses[]=acknowledged&limit=5",
            None,
        )
        .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(line["action"], "pd/listIncidents");
    assert_eq!(
        line["args"],
        json!({"statuses": ["triggered", "acknowledged"], "limit": 5})
    );
    let forwarded = served.upstream.requests().last().unwrap().uri.clone();
    let decoded = percent_encoding::percent_decode_str(&forwarded)
        .decode_utf8_lossy()
        .to_string();
    assert_eq!(
        decoded,
        "/incidents?statuses[]=triggered&statuses[]=acknowledged&limit=5"
    );
    // Repeated without brackets, the same set.
    let (_, line) = served
        .call(
            "GET",
            "/pd/incidents?statuses=triggered&statuses=resolved",
            None,
        )
        .await;
    assert_eq!(line["policies"], json!(["open-only"]));
}

#[tokio::test]
async fn hand_changes_survive_a_re_import_and_stale_ones_are_reported() {
    let upstream = Upstream::start().await;
    let out = TempDir::new("import-overrides");
    let url = format!("http://{}", upstream.addr);
    std::fs::write(
        out.0.join("petstore.overrides.yaml"),
        "tools:\n  findPetsByTags:\n    add:\n      limit?: Long\n  getPetById:\n    replace:\n      petId: String\n  loginUser:\n    remove: [password]\n  closeStore:\n    remove: [reason]\n",
    )
    .unwrap();
    let spec = fixture("petstore-3.0.yaml");
    import(&spec, "petstore", Some(&url), &out.0);
    // The next import applies them again: nothing changed, the stale one reported.
    let again = import(&spec, "petstore", Some(&url), &out.0);
    for said in [
        "no operation added, removed or changed",
        "tool `closeStore` is not in the document: its overrides are not applied",
    ] {
        assert!(again.contains(said), "{said} in {again}");
    }
    let schema = std::fs::read_to_string(out.0.join("petstore.cedarschema")).unwrap();
    for declared in [
        "args: { tags?: Set<String>, limit?: Long }",
        "args: { petId: String }",
        "args: { username?: String }",
    ] {
        assert!(schema.contains(declared), "{declared} in {schema}");
    }

    let imported = Imported::checked("petstore", &out.0);
    imported.permit(
        "petstore",
        "permit (principal, action, resource in Toolgate::Upstream::\"petstore\");\n",
    );
    let (_child, addr) = imported.serve().await;
    let (answer, line) = call(
        &imported,
        &upstream,
        addr,
        "GET",
        "/petstore/pet/findByTags?tags=a&limit=3",
        None,
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(line["args"], json!({"tags": ["a"], "limit": 3}));
    let (answer, line) = call(&imported, &upstream, addr, "GET", "/petstore/pet/rex", None).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(line["args"], json!({"petId": "rex"}));
    let login = "/petstore/user/login?username=a&password=b";
    let answer = send(
        "GET",
        &format!("http://{addr}{login}"),
        &[(
            "authorization",
            &format!("Bearer {}", imported.idp.delegated()),
        )],
        b"",
    )
    .await;
    assert_eq!(answer.status, 400, "the removed argument is undeclared");

    // The document catches up with an override: it can go.
    let text = std::fs::read_to_string(&spec).unwrap();
    let newer = text.replacen("name: petId\n          in: path\n          description: ID of pet to return\n          required: true\n          schema:\n            type: integer", "name: petId\n          in: path\n          description: ID of pet to return\n          required: true\n          schema:\n            type: string", 1);
    assert_ne!(newer, text);
    let newer_spec = out.0.join("petstore-newer.yaml");
    std::fs::write(&newer_spec, newer).unwrap();
    let third = import(&newer_spec, "petstore", Some(&url), &out.0);
    assert!(
        third.contains(
            "getPetById: replace `petId`: the document now declares it so: the override can go"
        ),
        "{third}"
    );
}
