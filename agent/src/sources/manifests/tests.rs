use std::collections::BTreeSet;

use super::*;

const SEED: &str = r"
apiVersion: v1
kind: Service
metadata: {name: nginx, namespace: default}
spec:
  clusterIP: 10.254.40.119
  ports: [{port: 4432, targetPort: 80, protocol: TCP}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: nginx}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: nginx-abc
  namespace: default
  labels: {kubernetes.io/service-name: nginx}
addressType: IPv4
ports: [{port: 80, protocol: TCP}]
endpoints:
- addresses: [172.30.20.6]
- addresses: [172.30.20.7]
- addresses: [172.30.20.8]
";

fn scan(text: &str) -> Scan {
    let mut scan = Scan::default();
    parse_into(text, "seed.yaml", &mut scan);
    scan
}

#[test]
fn the_seed_manifest_yields_its_service_and_slice() {
    let scan = scan(SEED);
    assert!(scan.problems.is_empty(), "{:?}", scan.problems);
    assert_eq!(scan.objects.len(), 2);
    let mut model = Model::default();
    assert!(apply(&mut model, &Scan::default(), &scan));
    assert_eq!(
        model.desired().ports.values().next().unwrap().sets[&crate::model::Scope::Cluster].len(),
        3
    );
}

#[test]
fn an_invalid_object_is_named_and_skipped_and_the_rest_kept() {
    let text = format!(
        "{SEED}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: broken, namespace: web}}\n\
             spec: {{clusterIP: 10.254.0.300, ports: [{{port: 80}}]}}\n"
    );
    let scan = scan(&text);
    assert_eq!(scan.objects.len(), 2);
    assert_eq!(scan.problems.len(), 1);
    assert!(
        scan.problems[0].starts_with("seed.yaml: Service web/broken: spec.clusterIP"),
        "{}",
        scan.problems[0]
    );
}

#[test]
fn a_type_error_is_reported_with_the_object_name_and_field() {
    let scan = scan("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: 3}\n");
    assert!(scan.objects.is_empty());
    assert!(
        scan.problems[0].starts_with("seed.yaml: Service default/x: spec.ports: "),
        "{:?}",
        scan.problems
    );
}

#[test]
fn json_and_lists_are_read() {
    let json = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},
             "spec":{"clusterIP":"10.254.0.1","ports":[{"port":53,"protocol":"UDP"}]}}]}"#;
    let scan = scan(json);
    assert!(scan.problems.is_empty(), "{:?}", scan.problems);
    assert_eq!(scan.objects.len(), 1);
}

#[test]
fn headless_services_are_noted_not_served() {
    let scan =
        scan("apiVersion: v1\nkind: Service\nmetadata: {name: h}\nspec: {clusterIP: None}\n");
    assert!(scan.objects.is_empty() && scan.problems.is_empty());
    assert_eq!(scan.notes.len(), 1);
}

#[test]
fn broken_yaml_is_a_problem_not_a_crash() {
    let scan = scan("apiVersion: v1\nkind: [unclosed\n");
    assert!(scan.objects.is_empty());
    assert_eq!(scan.problems.len(), 1);
}

#[test]
fn a_broken_document_costs_only_itself() {
    // A control character fails libyaml's whole stream, the documents before it included.
    let text = SEED.replacen("---", "---\nname: \u{e}\n---", 1);
    let scan = scan(&text);
    assert_eq!(scan.objects.len(), 2, "{:?}", scan.problems);
    assert_eq!(scan.problems.len(), 1);
    assert!(
        scan.problems[0].starts_with("seed.yaml: document 2 (from line 8): not YAML or JSON"),
        "{:?}",
        scan.problems
    );
}

#[test]
fn removing_a_file_removes_its_objects() {
    let full = scan(SEED);
    let mut model = Model::default();
    apply(&mut model, &Scan::default(), &full);
    assert!(apply(&mut model, &full, &Scan::default()));
    assert!(model.desired().ports.is_empty());
    assert!(!apply(&mut model, &Scan::default(), &Scan::default()));
}

#[test]
fn scanning_a_directory_skips_hidden_and_foreign_files() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("seed.yaml"), SEED).unwrap();
    fs::write(dir.path().join(".hidden.yaml"), "not: [valid").unwrap();
    fs::write(dir.path().join("README.md"), "# not a manifest").unwrap();
    let scan = scan_dir(dir.path()).unwrap();
    assert!(scan.problems.is_empty(), "{:?}", scan.problems);
    assert_eq!(scan.objects.len(), 2);
}

#[tokio::test]
async fn the_watch_follows_files_appearing_and_going() {
    let dir = tempfile::tempdir().unwrap();
    let model = Arc::new(ModelHandle::default());
    let watch = ManifestWatch::start(dir.path(), &model).unwrap();
    tokio::spawn(follow(watch, Arc::clone(&model)));
    let served = |model: &ModelHandle| !model.desired().ports.is_empty();
    fs::write(dir.path().join("seed.yaml"), SEED).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !served(&model) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new file was not read"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fs::remove_file(dir.path().join("seed.yaml")).unwrap();
    while served(&model) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the removed file's service stayed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` on the model every 20 ms for up to 5 s.
async fn eventually(model: &ModelHandle, what: &str, check: impl Fn(&ModelHandle) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !check(model) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within 5 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn endpoints(model: &ModelHandle) -> usize {
    model
        .desired()
        .ports
        .values()
        .flat_map(|port| port.sets.values())
        .map(BTreeSet::len)
        .sum()
}

/// A followed directory `manifests` inside a temporary one.
fn followed(files: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf, Arc<ModelHandle>) {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("manifests");
    fs::create_dir(&dir).unwrap();
    for (name, text) in files {
        fs::write(dir.join(name), text).unwrap();
    }
    let model = Arc::new(ModelHandle::default());
    let watch = ManifestWatch::start(&dir, &model).unwrap();
    tokio::spawn(follow(watch, Arc::clone(&model)));
    (parent, dir, model)
}

#[tokio::test]
async fn a_vanished_directory_keeps_the_services_and_its_return_is_read() {
    let (_parent, dir, model) = followed(&[("seed.yaml", SEED)]);
    assert_eq!(endpoints(&model), 3);
    fs::remove_dir_all(&dir).unwrap();
    // The watch breaks and the source retries every second: nothing is flushed meanwhile.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(endpoints(&model), 3, "the last known services stay");
    fs::create_dir(&dir).unwrap();
    fs::write(
        dir.join("seed.yaml"),
        SEED.replace("- addresses: [172.30.20.8]\n", ""),
    )
    .unwrap();
    eventually(&model, "the re-created directory is read", |m| {
        endpoints(m) == 2
    })
    .await;
    // And followed: the new directory's watch works.
    fs::remove_file(dir.join("seed.yaml")).unwrap();
    eventually(&model, "a removed file removes its objects", |m| {
        endpoints(m) == 0
    })
    .await;
}

#[tokio::test]
async fn a_directory_replaced_under_its_name_is_watched_anew() {
    let (parent, dir, model) = followed(&[("seed.yaml", SEED)]);
    let next = parent.path().join("next");
    fs::create_dir(&next).unwrap();
    fs::write(
        next.join("seed.yaml"),
        SEED.replace("- addresses: [172.30.20.8]\n", ""),
    )
    .unwrap();
    fs::rename(&dir, parent.path().join("old")).unwrap();
    fs::rename(&next, &dir).unwrap();
    eventually(&model, "the new directory is read", |m| endpoints(m) == 2).await;
    fs::write(dir.join("seed.yaml"), SEED).unwrap();
    eventually(&model, "the new directory is followed", |m| {
        endpoints(m) == 3
    })
    .await;
}

#[tokio::test]
async fn a_file_that_cannot_be_read_keeps_its_objects() {
    // A ConfigMap volume: the files are symlinks into a directory the kubelet swaps.
    let store = tempfile::tempdir().unwrap();
    fs::write(store.path().join("seed.yaml"), SEED).unwrap();
    let (_parent, dir, model) = followed(&[]);
    std::os::unix::fs::symlink(store.path().join("seed.yaml"), dir.join("seed.yaml")).unwrap();
    eventually(&model, "the linked file is read", |m| endpoints(m) == 3).await;
    fs::remove_file(store.path().join("seed.yaml")).unwrap();
    // Something else in the directory changes, so it is scanned with the link broken.
    fs::write(dir.join("other.yaml"), "").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(endpoints(&model), 3, "a broken link is not a removal");
    let scan = scan_dir(&dir).unwrap();
    assert!(
        scan.problems[0].contains("seed.yaml: cannot read: "),
        "{:?}",
        scan.problems
    );
    fs::write(
        store.path().join("seed.yaml"),
        SEED.replace("- addresses: [172.30.20.8]\n", ""),
    )
    .unwrap();
    fs::write(dir.join("other.yaml"), "# touched").unwrap();
    eventually(&model, "the link's new target is read", |m| {
        endpoints(m) == 2
    })
    .await;
    // Removing the link itself is a removal.
    fs::remove_file(dir.join("seed.yaml")).unwrap();
    eventually(&model, "the removed link's objects go", |m| {
        endpoints(m) == 0
    })
    .await;
}

#[test]
fn a_fifo_or_a_directory_is_skipped_not_read() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("seed.yaml"), SEED).unwrap();
    nix::unistd::mkfifo(&dir.path().join("pipe.yaml"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    fs::create_dir(dir.path().join("dir.yaml")).unwrap();
    // Reading the FIFO would block until a writer came.
    let scan = scan_dir(dir.path()).unwrap();
    assert_eq!(scan.objects.len(), 2);
    assert_eq!(scan.problems.len(), 2, "{:?}", scan.problems);
    assert!(
        scan.problems
            .iter()
            .all(|p| p.ends_with("not a regular file, skipped"))
    );
}

/// Properties over generated manifests: no file panics the parser (or the checks and the
/// model behind it), every problem names its file and object and what is wrong, and valid
/// objects read back as written. Inputs tried per run: 4 x 600 files (2,400).
mod properties {
    use std::net::Ipv4Addr;

    use ipnet::Ipv4Net;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;
    use crate::{
        sources::fuzz,
        sources::objects::{
            ObjectRef, ServicePort, SliceEndpoint, SlicePort, check_endpoint_slice, check_service,
        },
    };

    const CASES: u32 = 600;
    const FILE: &str = "fuzz.yaml";

    fn protocol(pick: u8) -> (&'static str, u8) {
        match pick % 3 {
            0 => ("TCP", weft_common::ip_proto::TCP),
            1 => ("UDP", weft_common::ip_proto::UDP),
            _ => ("SCTP", weft_common::ip_proto::SCTP),
        }
    }

    /// A Service the agent serves: its document, and what it must read back as.
    fn valid_service() -> impl Strategy<Value = (Value, ObjectKey, Object)> {
        (
            "[a-z][a-z0-9-]{0,12}",
            prop::option::of("[a-z][a-z0-9-]{0,8}"),
            any::<u32>(),
            prop::sample::select(vec!["ClusterIP", "NodePort", "LoadBalancer"]),
            prop::collection::btree_map((1u16.., any::<u8>()), 1u16.., 1..4),
            prop::collection::vec(any::<u32>(), 0..3),
            prop::collection::vec((any::<u32>(), 0u8..=32), 0..3),
            prop::option::of(prop::option::of(1i32..=86_400)),
            any::<(bool, bool)>(),
        )
            .prop_map(
                |(name, namespace, ip, kind, ports, external, ranges, affinity, local)| {
                    let node_ports = kind != "ClusterIP";
                    let declared: Vec<(u16, (&str, u8), u16)> = ports
                        .iter()
                        .map(|((port, pick), node_port)| (*port, protocol(*pick), *node_port))
                        .collect();
                    // Distinct (port, protocol) pairs: the map's key repeats no port/protocol
                    // only if the protocol picks differ, so keep the first of each.
                    let mut seen = std::collections::BTreeSet::new();
                    let declared: Vec<_> = declared
                        .into_iter()
                        .filter(|(port, (_, number), _)| seen.insert((*port, *number)))
                        .collect();
                    let many = declared.len() > 1;
                    let port_name = |i: usize| if many { format!("p{i}") } else { String::new() };
                    let mut doc = json!({
                        "apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": name},
                        "spec": {
                            "type": kind,
                            "clusterIP": Ipv4Addr::from(ip).to_string(),
                            "ports": declared.iter().enumerate().map(|(i, (port, (proto, _), node_port))| {
                                json!({"name": port_name(i), "port": port, "protocol": proto,
                                       "targetPort": 8080, "nodePort": node_port})
                            }).collect::<Vec<_>>(),
                            "externalIPs": external.iter().map(|ip| Ipv4Addr::from(*ip).to_string()).collect::<Vec<_>>(),
                            "loadBalancerSourceRanges": ranges.iter().map(|(ip, len)| format!("{}/{len}", Ipv4Addr::from(*ip))).collect::<Vec<_>>(),
                            "externalTrafficPolicy": if local.0 { "Local" } else { "Cluster" },
                            "internalTrafficPolicy": if local.1 { "Local" } else { "Cluster" },
                        }
                    });
                    if let Some(namespace) = &namespace {
                        doc["metadata"]["namespace"] = json!(namespace);
                    }
                    if let Some(timeout) = affinity {
                        doc["spec"]["sessionAffinity"] = json!("ClientIP");
                        if let Some(seconds) = timeout {
                            doc["spec"]["sessionAffinityConfig"] =
                                json!({"clientIP": {"timeoutSeconds": seconds}});
                        }
                    }
                    let spec = ServiceSpec {
                        cluster_ip: Ipv4Addr::from(ip),
                        ports: declared
                            .iter()
                            .enumerate()
                            .map(|(i, (port, (_, protocol), node_port))| ServicePort {
                                name: port_name(i),
                                port: *port,
                                protocol: *protocol,
                                node_port: node_ports.then_some(*node_port),
                            })
                            .collect(),
                        external_ips: external.iter().map(|ip| Ipv4Addr::from(*ip)).collect(),
                        source_ranges: ranges
                            .iter()
                            .map(|(ip, len)| Ipv4Net::new(Ipv4Addr::from(*ip), *len).expect("len <= 32").trunc())
                            .collect(),
                        affinity_timeout_s: affinity.map(|timeout| {
                            timeout.map_or(crate::sources::objects::DEFAULT_AFFINITY_TIMEOUT_S, |s| s as u32)
                        }),
                        external_local: local.0,
                        internal_local: local.1,
                        ..ServiceSpec::default()
                    };
                    let name = ObjectRef {
                        namespace: namespace.unwrap_or_else(|| "default".to_owned()),
                        name,
                    };
                    (doc, ObjectKey::Service(name), Object::Service(spec))
                },
            )
    }

    /// An EndpointSlice the agent serves: its document, and what it must read back as.
    fn valid_slice() -> impl Strategy<Value = (Value, ObjectKey, Object)> {
        let endpoint = (
            any::<u32>(),
            any::<[Option<bool>; 3]>(),
            prop::option::of("[a-z0-9-]{1,8}"),
            prop::collection::vec("[a-z0-9-]{1,8}", 0..2),
        );
        (
            "[a-z][a-z0-9-]{0,12}",
            "[a-z][a-z0-9-]{0,12}",
            prop::collection::vec((prop::option::of("[a-z]{1,6}"), 1u16.., any::<u8>()), 0..3),
            prop::collection::vec(endpoint, 0..5),
        )
            .prop_map(|(name, service, ports, endpoints)| {
                let doc = json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": name, "namespace": "web",
                                 "labels": {"kubernetes.io/service-name": service}},
                    "addressType": "IPv4",
                    "ports": ports.iter().map(|(name, port, pick)| {
                        json!({"name": name, "port": port, "protocol": protocol(*pick).0})
                    }).collect::<Vec<_>>(),
                    "endpoints": endpoints.iter().map(|(ip, [ready, serving, terminating], node, zones)| {
                        json!({"addresses": [Ipv4Addr::from(*ip).to_string()],
                               "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                               "nodeName": node,
                               "hints": {"forZones": zones.iter().map(|z| json!({"name": z})).collect::<Vec<_>>()}})
                    }).collect::<Vec<_>>(),
                });
                let spec = SliceSpec {
                    service: ObjectRef { namespace: "web".into(), name: service },
                    ports: ports
                        .iter()
                        .map(|(name, port, pick)| SlicePort {
                            name: name.clone().unwrap_or_default(),
                            port: *port,
                            protocol: protocol(*pick).1,
                        })
                        .collect(),
                    endpoints: endpoints
                        .iter()
                        .map(|(ip, [ready, serving, terminating], node, zones)| SliceEndpoint {
                            addr: Ipv4Addr::from(*ip),
                            ready: ready.unwrap_or(true),
                            serving: serving.unwrap_or(true),
                            terminating: terminating.unwrap_or(false),
                            node_name: node.clone(),
                            zone_hints: zones.clone(),
                            node_hints: Vec::new(),
                        })
                        .collect(),
                    trigger_time: None,
                };
                let name = ObjectRef { namespace: "web".into(), name };
                (doc, ObjectKey::EndpointSlice(name), Object::EndpointSlice(spec))
            })
    }

    /// Up to six valid objects with distinct names.
    fn valid_objects() -> impl Strategy<Value = Vec<(Value, ObjectKey, Object)>> {
        prop::collection::vec(prop_oneof![valid_service(), valid_slice()], 0..6).prop_map(
            |objects| {
                objects
                    .into_iter()
                    .enumerate()
                    .map(|(i, (mut doc, key, object))| {
                        let unique = |name: &ObjectRef| ObjectRef {
                            namespace: name.namespace.clone(),
                            name: format!("{}-{i}", name.name),
                        };
                        let key = match key {
                            ObjectKey::Service(name) => ObjectKey::Service(unique(&name)),
                            ObjectKey::EndpointSlice(name) => {
                                ObjectKey::EndpointSlice(unique(&name))
                            }
                        };
                        let suffixed =
                            format!("{}-{i}", doc["metadata"]["name"].as_str().expect("named"));
                        doc["metadata"]["name"] = json!(suffixed);
                        (doc, key, object)
                    })
                    .collect()
            },
        )
    }

    /// One document as JSON or as YAML.
    fn render(doc: &Value, yaml: bool) -> String {
        if yaml {
            serde_yaml_ng::to_string(doc).expect("a JSON value is YAML")
        } else {
            doc.to_string()
        }
    }

    /// Documents as one multi-document file.
    fn file(docs: &[String]) -> String {
        docs.iter().map(|doc| format!("---\n{doc}\n")).collect()
    }

    fn parse(text: &str) -> Scan {
        let mut scan = Scan::default();
        parse_into(text, FILE, &mut scan);
        scan
    }

    /// Fields an object error may name (a serde error names them in its path or in
    /// backquotes).
    const FIELDS: [&str; 9] = [
        "metadata",
        "spec",
        "status",
        "ports",
        "endpoints",
        "addressType",
        "apiVersion",
        "kind",
        "`",
    ];

    /// Every problem names the file, and the document or object, and what is wrong; and
    /// what was read goes into a model without trouble.
    fn check(scan: &Scan) {
        for problem in &scan.problems {
            let rest = problem
                .strip_prefix(&format!("{FILE}: "))
                .unwrap_or_else(|| panic!("{problem:?} does not name the file"));
            if let Some(rest) = rest.strip_prefix("document ") {
                assert!(rest.contains(": not YAML or JSON: "), "{problem:?}");
                continue;
            }
            let (_object, what) = rest
                .split_once(": ")
                .unwrap_or_else(|| panic!("{problem:?} names no object"));
            assert!(
                what.starts_with("defined twice") || FIELDS.iter().any(|f| what.contains(f)),
                "{problem:?} does not name a field"
            );
        }
        let mut model = Model::default();
        apply(&mut model, &Scan::default(), scan);
        let _ = model.desired();
    }

    /// What a Service or EndpointSlice check refuses is named by its field.
    fn check_object(doc: &Value) {
        let errors = match doc["kind"].as_str() {
            Some("Service") => serde_json::from_value::<Service>(doc.clone())
                .ok()
                .and_then(|service| check_service(&service).err()),
            Some("EndpointSlice") => serde_json::from_value::<EndpointSlice>(doc.clone())
                .ok()
                .and_then(|slice| check_endpoint_slice(&slice).err()),
            _ => None,
        };
        if let Some(error) = errors {
            let message = error.to_string();
            assert!(
                ["spec", "metadata.", "ports[", "endpoints["]
                    .iter()
                    .any(|field| message.starts_with(field)),
                "{message:?} does not start with the field"
            );
        }
    }

    proptest! {
        #![proptest_config(fuzz::config(CASES))]

        #[test]
        fn any_text_is_read_or_named_as_a_problem(text in fuzz::text()) {
            check(&parse(&text));
        }

        #[test]
        fn valid_objects_read_back_as_written(
            objects in valid_objects(),
            yaml in prop::collection::vec(any::<bool>(), 6),
            as_list in any::<bool>(),
        ) {
            let docs: Vec<Value> = objects.iter().map(|(doc, _, _)| doc.clone()).collect();
            let text = if as_list {
                json!({"apiVersion": "v1", "kind": "List", "items": docs}).to_string()
            } else {
                let mut rendered: Vec<String> =
                    docs.iter().zip(&yaml).map(|(doc, yaml)| render(doc, *yaml)).collect();
                // Objects weft does not read, and empty documents, change nothing.
                rendered.push("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}".into());
                rendered.insert(0, String::new());
                file(&rendered)
            };
            let scan = parse(&text);
            prop_assert!(scan.problems.is_empty(), "{:?}\n{text}", scan.problems);
            let expected: BTreeMap<ObjectKey, Object> =
                objects.into_iter().map(|(_, key, object)| (key, object)).collect();
            prop_assert_eq!(scan.objects, expected, "{}", text);
        }

        #[test]
        fn mutated_objects_are_read_or_refused_by_field(
            docs in valid_objects().prop_flat_map(|objects| {
                fuzz::mutated(Value::Array(objects.into_iter().map(|(doc, _, _)| doc).collect()))
            }),
            yaml in any::<bool>(),
        ) {
            let docs = match docs {
                Value::Array(docs) => docs,
                other => vec![other],
            };
            for doc in &docs {
                check_object(doc);
            }
            let rendered: Vec<String> = docs.iter().map(|doc| render(doc, yaml)).collect();
            check(&parse(&file(&rendered)));
        }

        #[test]
        fn garbage_documents_cost_only_themselves(
            objects in valid_objects(),
            garbage in prop::collection::vec((any::<prop::sample::Index>(), fuzz::text()), 1..3),
        ) {
            let mut docs: Vec<(Option<&ObjectKey>, String)> =
                objects.iter().map(|(doc, key, _)| (Some(key), render(doc, true))).collect();
            for (at, text) in &garbage {
                let at = at.index(docs.len() + 1);
                docs.insert(at, (None, text.clone()));
            }
            let text = file(&docs.iter().map(|(_, doc)| doc.clone()).collect::<Vec<_>>());
            let scan = parse(&text);
            check(&scan);
            // A broken document costs only itself.
            for (key, _) in &docs {
                if let Some(key) = key {
                    prop_assert!(scan.objects.contains_key(*key), "{key:?} lost:\n{text}\n{:?}", scan.problems);
                }
            }
        }
    }
}
