//! What deploy/ ships (issues 13, 23): Kubernetes manifests valid against the Kubernetes schemas
//! (offline, `kubernetes-validate`) as written and as `kubectl kustomize` renders them, no Secret
//! applied by a kustomization (the examples and the documented secretGenerator make the ones
//! the pods read), restricted containers with no CPU limit on the proxy, the edge's Redis
//! password in one Secret that Redis and the gateway (a mounted file the config names) both
//! read, PodMonitors valid against the Prometheus Operator's CRD, the TLS overlay's mounted files
//! served, the shipped configs and policies accepted by `toolgate check`, every file they name
//! mounted into the gateway's container, a dashboard whose queries parse, stay readable with
//! hundreds of tools and read only metrics, labels and values a live gateway exports, the binary
//! run the way the image runs it (its audit on stdout brought back out by the documented
//! filter), and ConfigMap updates (the kubelet's `..data` swap) reloaded.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn deploy() -> PathBuf {
    repo().join("deploy")
}

fn kubernetes_validate() -> PathBuf {
    let tool = repo().join(".toolgate-test/venv-k8s/bin/kubernetes-validate");
    assert!(
        tool.exists(),
        "kubernetes-validate is missing: run scripts/test-deps.sh"
    );
    tool
}

/// The YAML documents of a manifest file.
fn documents(path: &Path) -> Vec<serde_norway::Value> {
    parse_documents(&std::fs::read_to_string(path).unwrap())
}

fn parse_documents(text: &str) -> Vec<serde_norway::Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(text)
        .map(|d| serde_norway::Value::deserialize(d).unwrap())
        .filter(|d| !d.is_null())
        .collect()
}

/// The deployment shapes: each a kustomization applied as it is (`kubectl apply -k`).
const SHAPES: [&str; 2] = ["edge", "sidecar"];

/// Overlays of a shape (applied instead of it): their patches are partial objects, so only
/// what they render is validated.
const OVERLAYS: [&str; 1] = ["edge-tls"];

/// Every Secret that an example under deploy/kubernetes/ shows how to make, by name.
fn example_secrets() -> Vec<serde_norway::Value> {
    let root = deploy().join("kubernetes");
    let mut secrets = Vec::new();
    for dir in std::fs::read_dir(&root).unwrap() {
        let example = dir.unwrap().path().join("secret.example.yaml");
        if example.exists() {
            secrets.extend(documents(&example));
        }
    }
    assert!(secrets.iter().all(|s| s["kind"] == "Secret"));
    secrets
}

/// Files in a shape's folder that are deliberately not among its kustomization's resources:
/// the example Secrets (a re-apply must never overwrite the real ones with placeholders).
fn not_applied(name: &str) -> bool {
    name.ends_with(".example.yaml")
}

/// What `kubectl kustomize DIR` renders: the objects `kubectl apply -k DIR` would apply.
fn kustomize(dir: &Path) -> Vec<serde_norway::Value> {
    parse_documents(&kustomize_text(dir))
}

/// `kubectl kustomize DIR`'s own text (kept as it is: re-serialized, a YAML 1.2 writer leaves
/// `yes` bare, which the validator's YAML 1.1 reads as a boolean).
fn kustomize_text(dir: &Path) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl (its built-in kustomize) is missing: run scripts/test-deps.sh");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs kubernetes-validate --strict on these files; returns whether it passed, and what it said.
fn validate(files: &[PathBuf]) -> (bool, String) {
    let out = Command::new(kubernetes_validate())
        .arg("--strict")
        .args(files)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let clean = out.status.success() && !said.contains("ERROR") && !said.contains("WARN");
    (clean, said)
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    for shape in SHAPES {
        let dir = deploy().join("kubernetes").join(shape);
        let kustomization = &documents(&dir.join("kustomization.yaml"))[0];
        let mut listed: Vec<String> = kustomization["resources"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect();
        let (mut present, examples): (Vec<String>, Vec<String>) = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
            .partition(|n| !not_applied(n));
        listed.sort();
        present.sort();
        assert_eq!(
            listed, present,
            "{shape}: the kustomization lists every manifest but the examples"
        );
        // The files as written, the examples too (they are applied by hand, so valid as well).
        let files: Vec<PathBuf> = listed
            .iter()
            .chain(&examples)
            .map(|f| dir.join(f))
            .collect();
        let (clean, said) = validate(&files);
        assert!(clean, "{shape}: {said}");
        // And what the kustomization renders, as `kubectl apply -k` would send it.
        let rendered = TempDir::new(&format!("k8s-{shape}-rendered"));
        let file = rendered.0.join("all.yaml");
        std::fs::write(&file, kustomize_text(&dir)).unwrap();
        let (clean, said) = validate(&[file]);
        assert!(clean, "{shape}, rendered: {said}");
    }
    for overlay in OVERLAYS {
        let dir = deploy().join("kubernetes").join(overlay);
        let rendered = TempDir::new(&format!("k8s-{overlay}-rendered"));
        let file = rendered.0.join("all.yaml");
        std::fs::write(&file, kustomize_text(&dir)).unwrap();
        let (clean, said) = validate(&[file, dir.join("secret.example.yaml")]);
        assert!(clean, "{overlay}: {said}");
    }
    // The validator can refuse: a misspelt field fails.
    let bad = TempDir::new("k8s-bad");
    let file = bad.0.join("service.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Service\nmetadata: { name: x }\nspec: { portz: [] }\n",
    )
    .unwrap();
    assert!(!validate(&[file]).0);
}

#[test]
fn a_reapply_never_overwrites_a_real_secret() {
    let examples: Vec<String> = example_secrets()
        .iter()
        .map(|s| s["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    for name in SHAPES.iter().chain(&OVERLAYS) {
        let objects = kustomize(&deploy().join("kubernetes").join(name));
        let kinds: Vec<&str> = objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        assert!(kinds.contains(&"Deployment"), "{name}: {kinds:?}");
        assert!(
            !kinds.contains(&"Secret"),
            "{name} applies a Secret: {kinds:?}"
        );
        // Every Secret the pods read is one an example shows how to make, with every key they
        // name.
        for secret in secrets_read(&objects) {
            assert!(
                examples.contains(&secret),
                "{name}: {secret} is in no example: {examples:?}"
            );
        }
        for (secret, key) in secret_keys_read(&objects) {
            let example = example_secrets()
                .into_iter()
                .find(|e| e["metadata"]["name"] == secret.as_str())
                .unwrap();
            assert!(
                !example["stringData"][key.as_str()].is_null(),
                "{name}: the example {secret} has no key {key}"
            );
        }
    }
    // The edge's config is no Secret: it holds none (the Redis password is a file it names).
    let edge = kustomize(&deploy().join("kubernetes/edge"));
    assert_eq!(
        secrets_read(&edge),
        ["toolgate-redis", "toolgate-secrets"],
        "the edge's Secrets"
    );
    let mounts = gateway_mounts(&edge);
    let config = mounts
        .iter()
        .find(|(at, _, _)| at == "/etc/toolgate/config")
        .map(|(_, volume, _)| volume["configMap"]["name"].as_str());
    assert_eq!(config, Some(Some("toolgate-config")));
}

/// The overlay a kustomization's comment shows for generating its Secrets: the lines that
/// start with `#   `, from `resources:` on.
fn documented_overlay(shape: &str) -> serde_norway::Value {
    let dir = deploy().join("kubernetes").join(shape);
    let text = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    let block: Vec<&str> = text
        .lines()
        .skip_while(|l| *l != "#   resources:")
        .take_while(|l| l.starts_with("#   "))
        .map(|l| &l[4..])
        .collect();
    assert!(!block.is_empty(), "{shape}: no overlay in the comment");
    serde_norway::from_str(&block.join("\n")).unwrap()
}

#[test]
fn the_documented_secret_generator_makes_the_secrets_the_pods_read() {
    for shape in SHAPES {
        // The overlay in a folder of its own, its `resources` pointing at the shape (kustomize
        // takes relative paths only), the files it names beside it.
        let dir = TempDir::new(&format!("overlay-{shape}"));
        let mut overlay = documented_overlay(shape);
        let up = "../".repeat(dir.0.components().count() - 1);
        let target = deploy().join("kubernetes").join(shape);
        let relative = format!("{up}{}", target.strip_prefix("/").unwrap().display());
        overlay["resources"] = serde_norway::Value::from(vec![relative]);
        for generator in overlay["secretGenerator"].as_sequence().unwrap() {
            for file in generator["files"].as_sequence().unwrap() {
                let file = file.as_str().unwrap();
                let name = file.split_once('=').map_or(file, |(_, f)| f);
                std::fs::write(dir.0.join(name), "from a safe place").unwrap();
            }
        }
        let text = serde_norway::to_string(&overlay).unwrap();
        std::fs::write(dir.0.join("kustomization.yaml"), text).unwrap();
        let objects = kustomize(&dir.0);
        let mut made: Vec<String> = objects
            .iter()
            .filter(|o| o["kind"] == "Secret")
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        made.sort();
        assert_eq!(
            made,
            secrets_read(&objects),
            "{shape}: the Secrets the pods read"
        );
        // With the keys the pods name (`password=redis.password` makes the key `password`).
        for (secret, key) in secret_keys_read(&objects) {
            let generated = objects
                .iter()
                .find(|o| o["kind"] == "Secret" && o["metadata"]["name"] == secret.as_str())
                .unwrap();
            assert!(
                !generated["data"][key.as_str()].is_null(),
                "{shape}: {secret} has no key {key}: {generated:?}"
            );
        }
        // Under their own names (no hash suffix): updated in place, and reloaded.
        let examples: Vec<String> = example_secrets()
            .iter()
            .map(|s| s["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        assert!(
            made.iter().all(|m| examples.contains(m)),
            "{shape}: {made:?}"
        );
    }
}

#[test]
fn the_gateway_and_redis_run_restricted_with_no_cpu_limit() {
    let mut seen = Vec::new();
    for shape in SHAPES {
        for object in kustomize(&deploy().join("kubernetes").join(shape)) {
            let spec = &object["spec"]["template"]["spec"];
            for container in containers(spec) {
                let name = container["name"].as_str().unwrap();
                if !["toolgate", "redis"].contains(&name) {
                    continue; // the example agent is the user's own
                }
                seen.push(format!("{shape}/{name}"));
                // The container's own setting, else the pod's.
                let set = |key: &str| match &container["securityContext"][key] {
                    serde_norway::Value::Null => spec["securityContext"][key].clone(),
                    own => own.clone(),
                };
                let at = format!("{shape}/{name}");
                assert_eq!(set("runAsNonRoot"), true, "{at}");
                assert_eq!(set("allowPrivilegeEscalation"), false, "{at}");
                assert_eq!(set("readOnlyRootFilesystem"), true, "{at}");
                assert_eq!(set("seccompProfile")["type"], "RuntimeDefault", "{at}");
                let drop = &set("capabilities")["drop"];
                assert_eq!(drop.as_sequence().map(Vec::len), Some(1), "{at}");
                assert_eq!(drop[0], "ALL", "{at}");
                let resources = &container["resources"];
                assert!(
                    resources["limits"]["memory"].is_string(),
                    "{at}: a memory limit"
                );
                assert!(
                    !resources["requests"]["cpu"].is_null(),
                    "{at}: a CPU request"
                );
                if name == "toolgate" {
                    // A CPU limit throttles the proxy for the rest of each CFS period: latency.
                    assert!(resources["limits"]["cpu"].is_null(), "{at}: a CPU limit");
                }
            }
        }
    }
    assert_eq!(seen, ["edge/toolgate", "edge/redis", "sidecar/toolgate"]);
}

/// The keys of Secrets the rendered workloads name one by one: (Secret, key), from an env
/// var's secretKeyRef or a volume's items.
fn secret_keys_read(objects: &[serde_norway::Value]) -> Vec<(String, String)> {
    let mut keys = Vec::new();
    let mut add = |name: &serde_norway::Value, key: &serde_norway::Value| {
        keys.push((
            name.as_str().unwrap().to_string(),
            key.as_str().unwrap().to_string(),
        ));
    };
    for spec in objects.iter().map(|o| &o["spec"]["template"]["spec"]) {
        for volume in spec["volumes"].as_sequence().into_iter().flatten() {
            let secret = &volume["secret"];
            for item in secret["items"].as_sequence().into_iter().flatten() {
                add(&secret["secretName"], &item["key"]);
            }
        }
        for container in containers(spec) {
            for env in container["env"].as_sequence().into_iter().flatten() {
                let from = &env["valueFrom"]["secretKeyRef"];
                if !from.is_null() {
                    add(&from["name"], &from["key"]);
                }
            }
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

/// The names of the Secrets the rendered workloads mount or read keys of.
fn secrets_read(objects: &[serde_norway::Value]) -> Vec<String> {
    let mut names = Vec::new();
    for spec in objects.iter().map(|o| &o["spec"]["template"]["spec"]) {
        for volume in spec["volumes"].as_sequence().into_iter().flatten() {
            if let Some(name) = volume["secret"]["secretName"].as_str() {
                names.push(name.to_string());
            }
        }
        for container in containers(spec) {
            for env in container["env"].as_sequence().into_iter().flatten() {
                if let Some(name) = env["valueFrom"]["secretKeyRef"]["name"].as_str() {
                    names.push(name.to_string());
                }
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// A pod spec's containers, init containers (native sidecars) included.
fn containers(spec: &serde_norway::Value) -> Vec<&serde_norway::Value> {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| spec[*k].as_sequence().into_iter().flatten())
        .collect()
}

/// The Prometheus Operator's PodMonitor CRD (tests/data/prometheus-operator, Apache-2.0).
fn podmonitor_crd() -> PathBuf {
    repo().join("tests/data/prometheus-operator/monitoring.coreos.com_podmonitors.yaml")
}

/// Validates the custom resources on stdin against a CRD's `openAPIV3Schema` (argv[1]), as
/// strictly as `kubectl apply --validate=strict`: a field the schema does not declare is an error
/// (the API server would prune it, silently).
const VALIDATE_CUSTOM_RESOURCES: &str = r#"
import sys, yaml, jsonschema
crd = yaml.safe_load(open(sys.argv[1]))
group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
schemas = {group + "/" + v["name"]: v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"]}
def strict(s):
    if isinstance(s, dict):
        if (s.get("type") == "object" and "properties" in s and "additionalProperties" not in s
                and not s.get("x-kubernetes-preserve-unknown-fields")):
            s["additionalProperties"] = False
        for v in s.values():
            strict(v)
    elif isinstance(s, list):
        for v in s:
            strict(v)
errors, count = 0, 0
for doc in yaml.safe_load_all(sys.stdin):
    if not doc:
        continue
    count += 1
    name = doc.get("metadata", {}).get("name")
    if doc.get("kind") != kind or doc.get("apiVersion") not in schemas:
        print(f"{name}: not a {kind} of {sorted(schemas)}")
        errors += 1
        continue
    schema = schemas[doc["apiVersion"]]
    strict(schema)
    for e in jsonschema.Draft7Validator(schema).iter_errors(doc):
        print(f"{name}: {'.'.join(map(str, e.absolute_path))}: {e.message}")
        errors += 1
print(f"{count} validated, {errors} errors")
sys.exit(1 if errors or not count else 0)
"#;

/// Runs VALIDATE_CUSTOM_RESOURCES on `text` against `crd`: whether it passed, what it said.
fn validate_custom_resources(crd: &Path, text: &str) -> (bool, String) {
    use std::io::Write;
    let python = repo().join(".toolgate-test/venv-k8s/bin/python");
    let mut child = Command::new(python)
        .arg("-c")
        .arg(VALIDATE_CUSTOM_RESOURCES)
        .arg(crd)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the venv of kubernetes-validate (jsonschema): run scripts/test-deps.sh");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

#[test]
fn the_pod_monitors_validate_against_the_prometheus_operator_crd() {
    for shape in SHAPES {
        let dir = deploy().join("kubernetes/monitoring").join(shape);
        let (clean, said) = validate_custom_resources(&podmonitor_crd(), &kustomize_text(&dir));
        assert!(clean, "{shape}: {said}");
        // It scrapes the shape's gateway: its namespace, its pods, the admin listener's port.
        let monitor = kustomize(&dir).remove(0);
        let workload = kustomize(&deploy().join("kubernetes").join(shape))
            .into_iter()
            .find(|o| o["kind"] == "Deployment")
            .unwrap();
        assert_eq!(
            monitor["metadata"]["namespace"],
            workload["metadata"]["namespace"]
        );
        let pod = &workload["spec"]["template"];
        for (key, value) in monitor["spec"]["selector"]["matchLabels"]
            .as_mapping()
            .unwrap()
        {
            assert_eq!(
                &pod["metadata"]["labels"][key], value,
                "{shape}: selects the pods"
            );
        }
        let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
        assert_eq!(endpoint["path"], "/metrics");
        let port = containers(&pod["spec"])
            .into_iter()
            .filter(|c| c["name"] == "toolgate")
            .flat_map(|c| c["ports"].as_sequence().unwrap())
            .find(|p| p["name"] == endpoint["port"])
            .unwrap_or_else(|| panic!("{shape}: no gateway port named {:?}", endpoint["port"]));
        let admin = shipped_config(shape)["admin_listen"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            admin.ends_with(&format!(":{}", port["containerPort"].as_u64().unwrap())),
            "{shape}: {admin}"
        );
    }
    // The check can refuse: a misspelt field, and a value of the wrong type.
    use serde_norway::Value as Y;
    let good = kustomize(&deploy().join("kubernetes/monitoring/edge")).remove(0);
    // (field, value): a field the CRD does not declare, and `port` (a name) as a number.
    for (field, value) in [("scrapeTimout", Y::from("10s")), ("port", Y::from(9090))] {
        let mut bad = good.clone();
        bad["spec"]["podMetricsEndpoints"][0][field] = value;
        let text = serde_norway::to_string(&bad).unwrap();
        let (clean, said) = validate_custom_resources(&podmonitor_crd(), &text);
        assert!(!clean && said.contains(field), "{text}\n{said}");
    }
}

/// A shape's config as its ConfigMap has it (it names no secret: those are files the config
/// names, mounted from Secrets).
fn shipped_config(shape: &str) -> serde_norway::Value {
    let dir = deploy().join("kubernetes").join(shape);
    config_in(&documents(&dir.join("configmap.yaml")))
}

/// The gateway's config in these objects: the key `toolgate.yaml` of their ConfigMap (the file
/// `serve --config` reads, as every_file_the_configs_name_is_mounted_into_the_gateway checks).
fn config_in(objects: &[serde_norway::Value]) -> serde_norway::Value {
    let text = objects
        .iter()
        .filter(|o| o["kind"] == "ConfigMap")
        .find_map(|o| o["data"]["toolgate.yaml"].as_str())
        .expect("a ConfigMap holding toolgate.yaml");
    serde_norway::from_str(text).unwrap()
}

/// The gateway container of the rendered workload and its pod spec.
fn gateway_container(
    objects: &[serde_norway::Value],
) -> (&serde_norway::Value, &serde_norway::Value) {
    let spec = objects
        .iter()
        .find(|o| o["kind"] == "Deployment")
        .map(|d| &d["spec"]["template"]["spec"])
        .expect("a Deployment");
    let container = containers(spec)
        .into_iter()
        .find(|c| c["name"] == "toolgate")
        .expect("the toolgate container");
    (container, spec)
}

/// What the gateway container sees under each of its mount paths: (mountPath, volume,
/// readOnly).
fn gateway_mounts(objects: &[serde_norway::Value]) -> Vec<(String, serde_norway::Value, bool)> {
    let (container, spec) = gateway_container(objects);
    container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| {
            let volume = spec["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|v| v["name"] == m["name"])
                .unwrap_or_else(|| panic!("no volume {:?}", m["name"]))
                .clone();
            let path = m["mountPath"].as_str().unwrap().to_string();
            (path, volume, m["readOnly"] == true)
        })
        .collect()
}

/// Where in the gateway container the key `key` of Secret `secret` is a file, if it is.
fn secret_key_path(objects: &[serde_norway::Value], secret: &str, key: &str) -> Option<String> {
    gateway_mounts(objects)
        .into_iter()
        .find_map(|(at, volume, _)| {
            let source = &volume["secret"];
            if source["secretName"] != secret {
                return None;
            }
            let file = match source["items"].as_sequence() {
                // With items, only the keys listed, each at its path.
                Some(items) => items
                    .iter()
                    .find(|i| i["key"] == key)
                    .map(|i| i["path"].as_str().unwrap().to_string())?,
                None => key.to_string(),
            };
            Some(format!("{at}/{file}"))
        })
}

/// Every string of a config that names a path under /etc/toolgate/.
fn container_paths(value: &serde_norway::Value, found: &mut Vec<String>) {
    use serde_norway::Value as Y;
    match value {
        Y::String(s) if s.starts_with("/etc/toolgate/") => found.push(s.clone()),
        Y::Sequence(items) => items.iter().for_each(|v| container_paths(v, found)),
        Y::Mapping(map) => map.iter().for_each(|(_, v)| container_paths(v, found)),
        _ => {}
    }
}

/// Lays a shape out in `root` as its pod mounts it under /etc/toolgate/: the ConfigMaps'
/// policies, the Secrets' files made for real (the Redis password too, where the config names
/// one), and the config with every /etc/toolgate/ path moved under `root`. Returns the config,
/// for the caller to amend and write.
fn lay_out(shape: &str, root: &Path) -> serde_norway::Value {
    let (policies, secrets) = (root.join("policies"), root.join("secrets"));
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::create_dir_all(&secrets).unwrap();
    let configmaps = deploy()
        .join("kubernetes")
        .join(shape)
        .join("configmap.yaml");
    for doc in documents(&configmaps) {
        for (name, text) in doc["data"].as_mapping().unwrap() {
            let (name, text) = (name.as_str().unwrap(), text.as_str().unwrap());
            if name != "toolgate.yaml" {
                std::fs::write(policies.join(name), text).unwrap();
            }
        }
    }
    let (_, signing) = toolgate_credential::SigningKey::generate().unwrap();
    std::fs::write(secrets.join("signing.pem"), signing).unwrap();
    std::fs::write(secrets.join("admin.token"), ADMIN_TOKEN).unwrap();
    std::fs::write(secrets.join("crm.key"), "crm-test-key").unwrap();
    let mut config = shipped_config(shape);
    relocate(&mut config, root);
    if let Some(file) = config["tasks"]["store_password_file"].as_str() {
        let file = Path::new(file);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, "0123456789abcdef").unwrap();
    }
    config
}

/// Every string value naming a path under /etc/toolgate/ names the same path under `root`.
fn relocate(value: &mut serde_norway::Value, root: &Path) {
    use serde_norway::Value as Y;
    match value {
        Y::String(s) => {
            if let Some(rest) = s.strip_prefix("/etc/toolgate/") {
                let moved = root.join(rest).display().to_string();
                *s = if rest.ends_with('/') {
                    moved + "/"
                } else {
                    moved
                };
            }
        }
        Y::Sequence(items) => items.iter_mut().for_each(|v| relocate(v, root)),
        Y::Mapping(map) => map.iter_mut().for_each(|(_, v)| relocate(v, root)),
        _ => {}
    }
}

fn toolgate_check(config: &serde_norway::Value, root: &Path) -> std::process::Output {
    let path = root.join("toolgate.yaml");
    std::fs::write(&path, serde_norway::to_string(config).unwrap()).unwrap();
    toolgate(&["check", "--config", path.to_str().unwrap()])
}

#[test]
fn the_shipped_configs_and_policies_pass_toolgate_check() {
    for shape in SHAPES {
        let dir = TempDir::new(&format!("k8s-{shape}"));
        let config = lay_out(shape, &dir.0);
        let out = toolgate_check(&config, &dir.0);
        assert!(
            out.status.success(),
            "{shape}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_file_the_configs_name_is_mounted_into_the_gateway() {
    let examples = example_secrets();
    for name in SHAPES.iter().chain(&OVERLAYS) {
        let objects = kustomize(&deploy().join("kubernetes").join(name));
        let (container, _) = gateway_container(&objects);
        // The config the gateway reads is the ConfigMap's, at the path `serve --config` names.
        let args: Vec<&str> = container["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let at = args.iter().position(|a| *a == "--config").unwrap();
        let mut paths = vec![args[at + 1].to_string()];
        container_paths(&config_in(&objects), &mut paths);
        assert!(paths.len() >= 5, "{name}: {paths:?}");
        let mounts = gateway_mounts(&objects);
        for path in &paths {
            // The mount it is under, and the name it has there.
            let (volume, rest) = mounts
                .iter()
                .find_map(|(at, volume, read_only)| {
                    let rest = path.strip_prefix(at.as_str())?;
                    let rest = rest.strip_prefix('/').or(rest.is_empty().then_some(rest))?;
                    assert!(read_only, "{name}: {at} is writable");
                    Some((volume, rest))
                })
                .unwrap_or_else(|| panic!("{name}: {path} is on no mount of the gateway"));
            if rest.is_empty() || rest.ends_with('/') {
                continue; // the directory itself (policies/)
            }
            if let Some(map) = volume["configMap"]["name"].as_str() {
                let data = objects
                    .iter()
                    .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == map)
                    .map(|o| &o["data"])
                    .unwrap_or_else(|| panic!("{name}: no ConfigMap {map}"));
                assert!(
                    !data[rest].is_null(),
                    "{name}: {path}: no key {rest} in {map}"
                );
                continue;
            }
            // A Secret's key (the item mounted at that name, or the key of that name) that its
            // example shows.
            let key = match volume["secret"]["items"].as_sequence() {
                Some(items) => items
                    .iter()
                    .find(|i| i["path"] == rest)
                    .and_then(|i| i["key"].as_str())
                    .unwrap_or_else(|| panic!("{name}: {path}: no item at {rest}")),
                None => rest,
            };
            let secret = volume["secret"]["secretName"].as_str().unwrap();
            let example = examples
                .iter()
                .find(|e| e["metadata"]["name"] == secret)
                .unwrap_or_else(|| panic!("{name}: no example of {secret}"));
            assert!(
                !example["stringData"][key].is_null(),
                "{name}: {path}: {secret} has no key {key}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_overlay_mounts_what_the_config_names() {
    // Where the overlay mounts the kubernetes.io/tls Secret in the gateway's container.
    let tls = example_secrets()
        .into_iter()
        .find(|s| s["type"] == "kubernetes.io/tls")
        .expect("an example TLS Secret");
    let objects = kustomize(&deploy().join("kubernetes/edge-tls"));
    let deployment = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
    let spec = &deployment["spec"]["template"]["spec"];
    let volume = spec["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["secret"]["secretName"] == tls["metadata"]["name"])
        .expect("the TLS Secret as a volume");
    let toolgate = containers(spec)
        .into_iter()
        .find(|c| c["name"] == "toolgate")
        .unwrap();
    let mount = toolgate["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("the TLS volume mounted in the gateway");
    assert_eq!(mount["readOnly"], true);
    let mount = mount["mountPath"].as_str().unwrap().to_string();
    let service = objects
        .iter()
        .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == "toolgate");
    assert_eq!(service.unwrap()["spec"]["ports"][0]["appProtocol"], "https");

    // The overlay's config is the edge's and a `tls:` block naming the Secret's files where
    // they are mounted; with it, the edge's config passes `toolgate check`.
    let mut config = config_in(&objects);
    let block = config
        .as_mapping_mut()
        .unwrap()
        .remove("tls")
        .expect("a tls: block in the overlay's config");
    assert_eq!(
        config,
        shipped_config("edge"),
        "the overlay's config but tls:"
    );
    let secret = tls["metadata"]["name"].as_str().unwrap();
    for (field, key) in [("cert", "tls.crt"), ("key", "tls.key")] {
        let file = secret_key_path(&objects, secret, key);
        assert_eq!(block[field].as_str(), file.as_deref(), "tls.{field}");
    }
    let dir = TempDir::new("k8s-edge-tls");
    let mut config = lay_out("edge", &dir.0);
    config["tls"] = block;
    relocate(&mut config, &dir.0);
    // Those files hold a certificate and key as a CA issues them (what the Secret's tls.crt
    // and tls.key become); `toolgate check` reads them.
    let files = dir.0.join(mount.strip_prefix("/etc/toolgate/").unwrap());
    std::fs::create_dir_all(&files).unwrap();
    let pki = Pki::new(&files);
    std::fs::copy(pki.dir.join("server.pem"), files.join("tls.crt")).unwrap();
    std::fs::copy(pki.dir.join("server.key"), files.join("tls.key")).unwrap();
    let out = toolgate_check(&config, &dir.0);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A gateway given those file names serves TLS with them.
    let upstream = Upstream::start().await;
    let gw = Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[],
        inbound: None,
        mcp: None,
        extra_config: &format!("tls: {}\n", serde_json::to_string(&config["tls"]).unwrap()),
    })
    .await;
    let url = format!("https://127.0.0.1:{}/.well-known/jwks.json", gw.addr.port());
    let ca = pki.dir.join("ca.pem");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(ca)
            .arg(url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The StatefulSet's Redis container, rendered.
fn edge_redis() -> serde_norway::Value {
    let objects = kustomize(&deploy().join("kubernetes/edge"));
    let set = objects
        .into_iter()
        .find(|o| o["kind"] == "StatefulSet" && o["metadata"]["name"] == "toolgate-redis")
        .expect("the Redis StatefulSet");
    set["spec"]["template"]["spec"]["containers"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_redis_asks_for_the_password_the_config_carries() {
    // Redis takes its password from the Secret, expanded by the kubelet into its arguments.
    let redis = edge_redis();
    let from_secret = redis["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "REDIS_PASSWORD")
        .map(|e| e["valueFrom"]["secretKeyRef"].clone())
        .expect("REDIS_PASSWORD from a Secret");
    let (secret, key) = (from_secret["name"].as_str(), from_secret["key"].as_str());
    assert_eq!((secret, key), (Some("toolgate-redis"), Some("password")));
    let args: Vec<String> = redis["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let at = args
        .iter()
        .position(|a| a == "--requirepass")
        .expect("--requirepass");
    assert_eq!(args[at + 1], "$(REDIS_PASSWORD)");
    // The gateway reads the same key of the same Secret, mounted read-only where the config's
    // store_password_file names it; the store URL names the Service and carries no password.
    let objects = kustomize(&deploy().join("kubernetes/edge"));
    let mounted = secret_key_path(&objects, "toolgate-redis", "password")
        .expect("the Secret's key `password` mounted in the gateway");
    let config = config_in(&objects);
    let tasks = &config["tasks"];
    assert_eq!(
        tasks["store_password_file"].as_str(),
        Some(mounted.as_str())
    );
    let store = tasks["store"].as_str().unwrap();
    assert_eq!(
        store, "redis://toolgate-redis.toolgate.svc.cluster.local:6379",
        "no password in the URL"
    );
    let read_only = gateway_mounts(&objects)
        .into_iter()
        .find(|(at, _, _)| mounted.starts_with(&format!("{at}/")))
        .map(|(_, _, read_only)| read_only);
    assert_eq!(read_only, Some(true), "{mounted}");

    // Run as the manifest runs it (the kubelet's expansion made here), then a gateway whose
    // config names its password file as the edge's does (the mount made here, under its own
    // folder): the right password is taken, a wrong one refused (fail closed).
    let password = "0123456789abcdef0123456789abcdef";
    let data = TempDir::new("redis-password");
    let manifest_args: Vec<String> = args
        .iter()
        .map(|a| a.replace("$(REDIS_PASSWORD)", password))
        .collect();
    let manifest_args: Vec<&str> = manifest_args.iter().map(String::as_str).collect();
    let (_redis, port) = start_redis(&data.0, &manifest_args).await;
    let upstream = Upstream::start().await;
    // A Secret's file as the kubelet writes it (the key's bytes as they are), and one ending
    // in a newline (a Secret made from a file): the gateway drops the newline.
    let given = [
        (password.to_string(), 201),
        (format!("{password}\n"), 201),
        ("not-the-password".to_string(), 503),
    ];
    for (n, (given, status)) in given.iter().enumerate() {
        let mount = TempDir::new(&format!("redis-secret-{n}"));
        let mut tasks = tasks.clone();
        relocate(&mut tasks, &mount.0);
        let file = PathBuf::from(tasks["store_password_file"].as_str().unwrap());
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, given).unwrap();
        tasks["store"] = format!("redis://127.0.0.1:{port}").into();
        let extra = format!("tasks: {}\n", serde_json::to_string(&tasks).unwrap());
        let gw = Gateway::start(GatewayOptions {
            upstream: upstream.addr,
            extra_policies: &[],
            inbound: None,
            mcp: None,
            extra_config: &extra,
        })
        .await;
        let body = br#"{"intent": "read invoice 1", "ttl_seconds": 60}"#;
        let auth = format!("Bearer {}", gw.idp.delegated());
        let headers = [
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ];
        let answer = send("POST", &gw.url("/v1/tasks"), &headers, body).await;
        let said = String::from_utf8_lossy(&answer.body).to_string();
        assert_eq!(answer.status, *status, "{given:?}: {said}");
        if *status == 503 {
            assert_eq!(answer.json()["error"], "task_store_unavailable");
            assert!(!said.contains(given.as_str()), "{said}");
        }
    }
}

/// The dashboard's panels (row panels hold none of their own when expanded).
fn dashboard() -> Value {
    serde_json::from_str(&std::fs::read_to_string(deploy().join("grafana/toolgate.json")).unwrap())
        .unwrap()
}

/// Every panel query: (panel title, PromQL as the dashboard writes it).
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard = dashboard();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap().to_string();
            queries.push((title, target["expr"].as_str().unwrap().to_string()));
        }
    }
    queries
}

/// A query as Grafana sends it: its variables given values (all instances, a 1 h range).
fn as_sent(expr: &str) -> String {
    expr.replace("$__rate_interval", "2m")
        .replace("$__range", "1h")
        .replace("$__interval", "30s")
        .replace("$instance", ".*")
}

/// The metric names a query reads (toolgate's own and the process collector's).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names: Vec<String> = ["toolgate_", "process_"]
        .iter()
        .flat_map(|prefix| expr.match_indices(prefix))
        .filter(|(at, _)| {
            // Not the tail of another identifier.
            !expr[..*at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(|(at, _)| identifier(&expr[at..]))
        .collect();
    names.sort();
    names.dedup();
    names
}

fn identifier(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// The label matchers of a query: (metric, label, operator, value).
fn matchers(expr: &str) -> Vec<(String, String, String, String)> {
    let mut found = Vec::new();
    for name in metric_names(expr) {
        for (at, _) in expr.match_indices(&format!("{name}{{")) {
            let inside = &expr[at + name.len() + 1..];
            let inside = &inside[..inside.find('}').unwrap()];
            for matcher in inside.split(',').filter(|m| !m.trim().is_empty()) {
                let label = identifier(matcher.trim());
                let rest = matcher.trim()[label.len()..].trim_start();
                let op: String = rest.chars().take_while(|c| "=!~".contains(*c)).collect();
                let value = rest[op.len()..].trim().trim_matches('"').to_string();
                found.push((name.clone(), label, op, value));
            }
        }
    }
    found
}

/// The labels a query groups or matches on: `by`, `without`, `on`, `ignoring` (...).
fn grouping_labels(expr: &str) -> Vec<String> {
    let mut labels = Vec::new();
    for keyword in ["by", "without", "on", "ignoring"] {
        for (at, _) in expr.match_indices(&format!("{keyword} (")) {
            let before = expr[..at].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let inside = &expr[at + keyword.len() + 2..];
            let inside = &inside[..inside.find(')').unwrap()];
            labels.extend(inside.split(',').map(|l| l.trim().to_string()));
        }
    }
    labels.sort();
    labels.dedup();
    labels
}

/// Labels Prometheus adds to every scraped series (the target's): never in /metrics itself.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// Labels with one value per tool, policy or method: hundreds of series on a real gateway.
const WIDE_LABELS: [&str; 3] = ["tool", "policy", "method"];

#[test]
fn the_dashboard_queries_parse_and_stay_readable() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 30, "{}", queries.len());
    // promtool parses every query (as a recording rule: `promtool check rules` parses its expr).
    let dir = TempDir::new("dashboard-rules");
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(n, (_, expr))| serde_json::json!({"record": format!("dashboard_query_{n}"), "expr": as_sent(expr)}))
        .collect();
    let file = dir.0.join("rules.yaml");
    let groups = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(&file, serde_json::to_string_pretty(&groups).unwrap()).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The check can refuse: a query that does not parse.
    std::fs::write(
        &file,
        r#"{"groups": [{"name": "x", "rules": [{"record": "x", "expr": "sum by (tool (rate(x[5m]))"}]}]}"#,
    )
    .unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());

    // With hundreds of tools (or shadow policies, or MCP methods), a per-tool graph stays
    // readable only as a top list.
    for (title, expr) in &queries {
        let wide = grouping_labels(expr)
            .into_iter()
            .any(|l| WIDE_LABELS.contains(&l.as_str()));
        assert!(!wide || expr.contains("topk("), "{title}: {expr}");
    }
    // Every query is over the chosen instances (but for the join that keeps the process_*
    // series of toolgate's own targets: `and on (instance, job) toolgate_build_info`).
    let join = "and on (instance, job) toolgate_build_info";
    for (title, expr) in &queries {
        let expr = &expr.replace(join, "");
        for name in &metric_names(expr) {
            let scoped = matchers(expr).iter().any(|(m, label, _, value)| {
                m == name && label == "instance" && value == "$instance"
            });
            assert!(
                scoped,
                "{title}: {name} is not filtered by $instance: {expr}"
            );
        }
    }
    // The panels do not overlap.
    let boxes: Vec<(String, [u64; 4])> = dashboard()["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let g = &p["gridPos"];
            let v = |k: &str| g[k].as_u64().unwrap();
            (
                p["title"].as_str().unwrap().to_string(),
                [v("x"), v("y"), v("w"), v("h")],
            )
        })
        .collect();
    for (i, (a, [ax, ay, aw, ah])) in boxes.iter().enumerate() {
        assert!(ax + aw <= 24, "{a}");
        for (b, [bx, by, bw, bh]) in &boxes[i + 1..] {
            let apart = ax + aw <= *bx || bx + bw <= *ax || ay + ah <= *by || by + bh <= *ay;
            assert!(apart, "{a} overlaps {b}");
        }
    }
}

/// A scrape's series: (name, labels).
fn scraped_series(scrape: &str) -> Vec<(String, Vec<(String, String)>)> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let name = identifier(line);
            let mut labels = Vec::new();
            if let Some(inside) = line[name.len()..].strip_prefix('{') {
                let inside = &inside[..inside.rfind('}').unwrap()];
                for pair in inside.split("\",").filter(|p| !p.is_empty()) {
                    let (label, value) = pair.split_once('=').unwrap();
                    labels.push((label.to_string(), value.trim_matches('"').to_string()));
                }
            }
            (name, labels)
        })
        .collect()
}

/// A gateway that has seen what the panels show: an allowed call that a shadow policy would
/// have refused, a denied call, an unauthenticated one, an upstream that is down (502), and
/// an MCP message.
async fn gateway_seen_by_the_panels(upstream: &Upstream) -> Gateway {
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let shadow = "@id(\"shadow-freeze\")\n@mode(\"shadow\")\nforbid (principal, action == Toolgate::Action::\"billing/get_invoice\", resource);\n";
    let down_schema = "namespace Toolgate { action \"down/get_invoice\" in [call] appliesTo { principal: Agent, resource: Tool, context: { user?: User, env: Env, args: { invoice_id: Long } } }; }";
    let down_policy =
        "permit (principal, action == Toolgate::Action::\"down/get_invoice\", resource);";
    let gw = Gateway::start_with_upstreams(
        GatewayOptions {
            upstream: upstream.addr,
            extra_policies: &[
                ("shadow.cedar", shadow),
                ("down.cedarschema", down_schema),
                ("down.cedar", down_policy),
            ],
            inbound: None,
            mcp: Some(format!("http://{}/mcp", upstream.addr)),
            extra_config: "",
        },
        &format!(
            "  - name: down\n    url: http://{down}\n    audience: https://down.internal\n    routes:\n      - {{ tool: get_invoice, method: GET, path: \"/invoices/{{invoice_id}}\" }}\n"
        ),
    )
    .await;
    let token = gw.idp.delegated();
    let auth = format!("Bearer {token}");
    let (allowed, down) = (gw.url("/billing/invoices/1"), gw.url("/down/invoices/1"));
    assert_eq!(get(&allowed, &token).await.status, 200);
    assert_eq!(get(&allowed, "not-a-token").await.status, 401);
    assert_eq!(get(&down, &token).await.status, 502);
    let record = gw.url("/records/patients/1/record");
    let denied = send("DELETE", &record, &[("authorization", &auth)], b"").await;
    assert_eq!(denied.status, 403);
    let ping = br#"{"jsonrpc": "2.0", "id": 1, "method": "ping"}"#;
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
    ];
    send("POST", &gw.url("/tools"), &headers, ping).await;
    gw
}

/// Whether a scraped series of `name` has each label, with the value where one is given.
fn labelled(
    series: &[(String, Vec<(String, String)>)],
    name: &str,
    wanted: &[(&str, Option<&str>)],
) -> bool {
    series.iter().any(|(n, labels)| {
        n == name
            && wanted.iter().all(|(label, value)| {
                labels
                    .iter()
                    .any(|(l, v)| l == label && value.is_none_or(|x| x == v))
            })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_queries_metrics_a_live_gateway_exports() {
    let upstream = Upstream::start().await;
    let gw = gateway_seen_by_the_panels(&upstream).await;
    let scrape = gw.metrics().await;
    let series = scraped_series(&scrape);
    let queries = dashboard_queries();
    let mut names: Vec<String> = queries.iter().flat_map(|(_, e)| metric_names(e)).collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 20, "{names:?}");
    for name in &names {
        assert!(
            labelled(&series, name, &[]),
            "the dashboard queries {name}, which /metrics does not export"
        );
    }
    // Every label a query matches or groups on is on the metric (or is a target's), and an
    // exact matcher's value is one the gateway exports.
    let own = |label: &str| !TARGET_LABELS.contains(&label);
    for (title, expr) in &queries {
        for (name, label, op, value) in matchers(expr).into_iter().filter(|m| own(&m.1)) {
            let exact = (op == "=").then_some(value.as_str());
            let found = labelled(&series, &name, &[(&label, exact)]);
            assert!(found, "{title}: {name}{{{label}{op}\"{value}\"}}");
        }
        for label in grouping_labels(expr).into_iter().filter(|l| own(l)) {
            for name in metric_names(expr) {
                let found = labelled(&series, &name, &[(&label, None)]);
                assert!(found, "{title}: {name} has no label {label}: {expr}");
            }
        }
    }
    // The panels' series are there: the 502 under its upstream, the shadow policy's flip.
    let bad_gateway = [("upstream", Some("down")), ("code", Some("502"))];
    assert!(labelled(&series, "toolgate_requests_total", &bad_gateway));
    let flip = [
        ("policy", Some("shadow-freeze")),
        ("flip", Some("allow_to_deny")),
    ];
    assert!(labelled(&series, "toolgate_shadow_flips_total", &flip));
    // The scrape is valid Prometheus text.
    let file = gw.dir.0.join("scrape.txt");
    std::fs::write(&file, &scrape).unwrap();
    let out = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The decision by tool is there, and build_info carries the binary's own version.
    assert_eq!(
        metric(&scrape, "toolgate_tool_calls_total{decision=\"allow\",tool=\"get_invoice\",upstream=\"billing\"}"),
        Some(1.0)
    );
    let version = String::from_utf8(toolgate(&["--version"]).stdout).unwrap();
    let version = version.trim().rsplit(' ').next().unwrap();
    assert!(
        scrape.contains(&format!("toolgate_build_info{{version=\"{version}\"}} 1")),
        "{version}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_as_the_image_runs_it() {
    // As deploy/Dockerfile runs it: uid 65532, the config from a read-only mounted directory,
    // logs in JSON on stderr, the audit on stdout, and `toolgate health` as the health check.
    let upstream = Upstream::start().await;
    let gw = Gateway::plain(&upstream).await;
    let mount = std::env::temp_dir().join(format!("toolgate-mount-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&mount);
    copy_dir(&gw.dir.0, &mount);
    let config = mount.join("toolgate.yaml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("path: audit.jsonl", "path: \"-\"");
    std::fs::write(&config, text + "log: { format: json }\n").unwrap();
    let root = current_uid() == 0;
    let mut command = if root {
        // Owned by root, readable by all, writable by none: what a read-only volume gives.
        Command::new("chmod")
            .args(["-R", "a+rX,a-w"])
            .arg(&mount)
            .status()
            .unwrap();
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65532", "--regid=65532", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_toolgate"));
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_toolgate"))
    };
    command
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = Killed(command.spawn().unwrap());
    let stdout = child.0.stdout.take().unwrap();
    let stderr = child.0.stderr.take().unwrap();
    // The announcement, then the audit lines (drained, so the gateway never blocks on them).
    let (announced_tx, announced_rx) = tokio::sync::oneshot::channel();
    let audit = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let _ = announced_tx.send(line);
        let mut audit = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut audit);
        audit
    });
    let logs = std::thread::spawn(move || {
        let mut logs = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::BufReader::new(stderr), &mut logs);
        logs
    });
    let line = tokio::time::timeout(Duration::from_secs(20), announced_rx)
        .await
        .unwrap()
        .unwrap();
    let announced: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("{line:?}"));
    let admin = announced["admin"].as_str().unwrap().to_string();
    let listen = announced["listen"].as_str().unwrap().to_string();
    if root {
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.0.id())).unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            uid.split_whitespace().skip(1).all(|u| u == "65532"),
            "{uid}"
        );
    }
    let health =
        |url: String| tokio::task::spawn_blocking(move || toolgate(&["health", "--url", &url]));
    let healthy = health(format!("http://{admin}/healthz")).await.unwrap();
    assert!(
        healthy.status.success(),
        "{}",
        String::from_utf8_lossy(&healthy.stderr)
    );
    let missing = health(format!("http://{admin}/nowhere")).await.unwrap();
    assert!(!missing.status.success());
    let call = get(
        &format!("http://{listen}/billing/invoices/3"),
        &gw.idp.delegated(),
    )
    .await;
    assert_eq!(call.status, 200);
    // JSON log lines on stderr.
    child.terminate_and_wait().await;
    let logs = tokio::task::spawn_blocking(move || logs.join().unwrap())
        .await
        .unwrap();
    let first = logs.lines().next().expect("a log line");
    let event: Value = serde_json::from_str(first).unwrap_or_else(|_| panic!("not JSON: {first}"));
    assert!(event["message"].is_string(), "{event}");
    // The audit on stdout, mixed with the logs as a container log has them, comes back out.
    let audit = tokio::task::spawn_blocking(move || audit.join().unwrap())
        .await
        .unwrap();
    the_audit_comes_back_out(&gw.dir.0, &audit, &logs);
    let _ = Command::new("chmod")
        .args(["-R", "u+w"])
        .arg(&mount)
        .status();
    let _ = std::fs::remove_dir_all(&mount);
}

/// The `jq` program docs/operations.md gives for getting the audit lines out of a container
/// log (its `kubectl logs ... | jq -cR '...'` line).
fn documented_audit_filter() -> String {
    let docs = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    let line = docs
        .lines()
        .find(|l| l.contains("| jq -cR '"))
        .expect("docs/operations.md: the jq line for the audit on stdout");
    let program = line.split("jq -cR '").nth(1).unwrap();
    program[..program.find('\'').unwrap()].to_string()
}

/// Runs the documented filter on stdout and stderr interleaved (as the container runtime keeps
/// them, plus a log event that carries a `decision_id` field): it keeps exactly the audit
/// lines, and `toolgate audit why` finds the call in what it kept.
fn the_audit_comes_back_out(dir: &Path, stdout: &str, stderr: &str) {
    let stray =
        r#"{"timestamp":"2026-01-01T00:00:00Z","level":"WARN","message":"x","decision_id":"0"}"#;
    let (mut out, mut err) = (stdout.lines(), stderr.lines().chain([stray]));
    let mut mixed = String::new();
    loop {
        let (a, b) = (out.next(), err.next());
        if a.is_none() && b.is_none() {
            break;
        }
        for line in [a, b].into_iter().flatten() {
            mixed += line;
            mixed.push('\n');
        }
    }
    let log = dir.join("container.log");
    std::fs::write(&log, mixed).unwrap();
    let kept = Command::new("jq")
        .arg("-cR")
        .arg(documented_audit_filter())
        .arg(&log)
        .output()
        .expect("jq (scripts/test-deps.sh installs it)");
    assert!(
        kept.status.success(),
        "{}",
        String::from_utf8_lossy(&kept.stderr)
    );
    let kept = String::from_utf8(kept.stdout).unwrap();
    let audit_lines = stdout
        .lines()
        .filter(|l| l.contains("\"decision_id\""))
        .count();
    assert!(audit_lines >= 1, "{stdout}");
    assert_eq!(kept.lines().count(), audit_lines, "{kept}");
    let records: Vec<Value> = kept
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let call = records
        .iter()
        .find(|r| r["action"] == "billing/get_invoice")
        .unwrap_or_else(|| panic!("{kept}"));
    let file = dir.join("audit-from-logs.jsonl");
    std::fs::write(&file, &kept).unwrap();
    let id = call["decision_id"].as_str().unwrap();
    let why = toolgate(&["audit", "why", id, "--audit", file.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&why.stdout);
    assert!(
        why.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&why.stderr)
    );
    assert!(said.contains("get_invoice"), "{said}");
}

/// The uid this test runs as (`id -u`).
fn current_uid() -> u32 {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_update_is_reloaded() {
    // The layout the kubelet gives a ConfigMap volume: files are links through `..data` to a
    // hidden, timestamped directory; an update writes a new one and renames `..data` onto it.
    let upstream = Upstream::start().await;
    let gw = Gateway::plain(&upstream).await;
    let volume = gw.dir.0.join("volume");
    // Each version is a whole copy of the policies; the second freezes everything (a forbid
    // added to a file that exists in both, so only the `..data` swap announces the change).
    let version = |name: &str, freeze: bool| {
        let dir = volume.join(name);
        copy_dir(&gw.dir.0.join("policies"), &dir);
        if freeze {
            let file = dir.join("billing.cedar");
            let text = std::fs::read_to_string(&file).unwrap();
            std::fs::write(
                file,
                text + "\n@id(\"freeze\")\nforbid (principal, action, resource);\n",
            )
            .unwrap();
        }
        dir
    };
    let first = version("..2026_12_04_10_00_00.1", false);
    std::os::unix::fs::symlink(first.file_name().unwrap(), volume.join("..data")).unwrap();
    for entry in std::fs::read_dir(&first).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        std::os::unix::fs::symlink(format!("..data/{name}"), volume.join(name)).unwrap();
    }
    let config = gw.edited_config("volume.yaml", |t| {
        t.replace("policies: policies/", "policies: volume/")
    });
    let (child, addr, admin) = spawn_serve(&config).await;
    let _child = Killed(child);
    let token = gw.idp.delegated();
    let url = format!("http://{addr}/billing/invoices/1");
    assert_eq!(get(&url, &token).await.status, 200);

    // The update, as the kubelet makes it.
    let second = version("..2026_12_04_10_05_00.2", true);
    std::os::unix::fs::symlink(second.file_name().unwrap(), volume.join("..data_tmp")).unwrap();
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();
    std::fs::remove_dir_all(&first).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if get(&url, &token).await.status == 403 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the swap was never reloaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let scrape = send("GET", &format!("http://{admin}/metrics"), &[], b"").await;
    let scrape = String::from_utf8_lossy(&scrape.body).to_string();
    assert!(metric(&scrape, "toolgate_policy_reloads_total{result=\"success\"}").unwrap() >= 1.0);
}
