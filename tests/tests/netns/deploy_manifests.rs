//! The manifests in `deploy/base` parse strictly into the Kubernetes API types (a misspelled or
//! misplaced field fails, as `kubectl apply --validate=strict` would), and they agree with each
//! other and with the agent: the binding grants the role to the DaemonSet's account, the role
//! only reads but for the one write flannel's kube subnet manager needs, every flag variable (also those config.yaml suggests in comments) is one the
//! agent declares, the liveness probe hits the health port the agent binds.

use std::{collections::BTreeSet, fs, path::Path, process::Command};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};
use serde_json::Value;
use weft_tests::cluster::weft_binary;

fn deploy_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy"))
}

/// Where the init container's `weft mount` puts the BPF filesystem and the cgroup v2
/// hierarchy, on the host.
const MOUNT_DEFAULTS: (&str, &str) = ("/sys/fs/bpf", "/run/weft/cgroupv2");

/// The kustomization files, which are no Kubernetes objects.
const KUSTOMIZATION: &str = "kustomization.yaml";

/// Every YAML document in `deploy/base`, with the file it came from.
fn documents() -> Vec<(String, Value)> {
    let mut files: Vec<_> = fs::read_dir(deploy_dir().join("base"))
        .expect("reading deploy/base")
        .map(|entry| entry.expect("a deploy/base entry").path())
        .filter(|path| {
            path.extension().is_some_and(|ext| ext == "yaml")
                && path.file_name().is_some_and(|name| name != KUSTOMIZATION)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in deploy/");
    let mut documents = Vec::new();
    for path in files {
        let text = fs::read_to_string(&path).expect("reading a manifest");
        documents.extend(parse_yaml(&path.display().to_string(), &text));
    }
    documents
}

/// The YAML documents in `text`, named after `source`.
fn parse_yaml(source: &str, text: &str) -> Vec<(String, Value)> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|document| {
            let value =
                Value::deserialize(document).unwrap_or_else(|e| panic!("{source}: not YAML: {e}"));
            (source.to_owned(), value)
        })
        .collect()
}

/// What `kubectl kustomize deploy/<dir>` renders.
fn rendered(dir: &str) -> Vec<(String, Value)> {
    let path = deploy_dir().join(dir);
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .expect("running kubectl kustomize");
    assert!(
        output.status.success(),
        "kubectl kustomize {}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    parse_yaml(
        &format!("kustomize {dir}"),
        &String::from_utf8_lossy(&output.stdout),
    )
}

/// `document` as a `T`, failing on anything `T` does not hold: the typed object, written back,
/// must be the document itself.
fn strict<T: DeserializeOwned + Serialize>(file: &str, document: &Value) -> T {
    let typed: T = serde_json::from_value(document.clone())
        .unwrap_or_else(|e| panic!("{file}: not a valid {}: {e}", document["kind"]));
    let written = serde_json::to_value(&typed).expect("serializing");
    assert_eq!(
        &written, document,
        "{file}: fields the {} type does not have (compare the two)",
        document["kind"]
    );
    typed
}

/// The deploy/ objects, one of each kind.
struct Deployment {
    account: ServiceAccount,
    role: ClusterRole,
    binding: ClusterRoleBinding,
    config: ConfigMap,
    daemon_set: DaemonSet,
}

fn deployment() -> Deployment {
    deployment_of(documents())
}

fn deployment_of(documents: Vec<(String, Value)>) -> Deployment {
    let (mut account, mut role, mut binding, mut config, mut daemon_set) =
        (None, None, None, None, None);
    fn once<T>(slot: &mut Option<T>, file: &str, object: T) {
        assert!(slot.is_none(), "{file}: a second object of its kind");
        *slot = Some(object);
    }
    for (file, document) in documents {
        match (document["apiVersion"].as_str(), document["kind"].as_str()) {
            (Some("v1"), Some("ServiceAccount")) => {
                once(&mut account, &file, strict(&file, &document));
            }
            (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRole")) => {
                once(&mut role, &file, strict(&file, &document));
            }
            (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRoleBinding")) => {
                once(&mut binding, &file, strict(&file, &document));
            }
            (Some("v1"), Some("ConfigMap")) => once(&mut config, &file, strict(&file, &document)),
            (Some("apps/v1"), Some("DaemonSet")) => {
                once(&mut daemon_set, &file, strict(&file, &document));
            }
            other => panic!("{file}: unexpected object {other:?}"),
        }
    }
    Deployment {
        account: account.expect("a ServiceAccount"),
        role: role.expect("a ClusterRole"),
        binding: binding.expect("a ClusterRoleBinding"),
        config: config.expect("a ConfigMap"),
        daemon_set: daemon_set.expect("a DaemonSet"),
    }
}

/// The environment variables `weft agent` reads its flags from, as its help lists them.
fn agent_variables() -> BTreeSet<String> {
    let help = Command::new(weft_binary())
        .args(["agent", "--help"])
        .output()
        .expect("running weft agent --help");
    assert!(help.status.success(), "weft agent --help failed");
    String::from_utf8_lossy(&help.stdout)
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split_once('=').map(|(name, _)| name.to_owned()))
        .collect()
}

#[test]
fn every_manifest_parses_strictly_into_its_kubernetes_type() {
    let documents = documents();
    assert_eq!(documents.len(), 5, "{documents:#?}");
    // A field the types do not know is caught, not silently dropped.
    let (file, daemon_set) = documents
        .iter()
        .find(|(_, d)| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let mut misspelled = daemon_set.clone();
    misspelled["spec"]["template"]["spec"]["hostNetwrok"] = Value::Bool(true);
    let caught = std::panic::catch_unwind(|| strict::<DaemonSet>(file, &misspelled));
    assert!(caught.is_err(), "a misspelled field went through");
    deployment();
}

#[test]
fn the_role_reads_what_the_agent_watches_patches_only_node_status_and_is_bound_to_the_agent() {
    let Deployment {
        account,
        role,
        binding,
        daemon_set,
        ..
    } = deployment();
    let mut granted = BTreeSet::new();
    for rule in role.rules.expect("rules") {
        for group in rule.api_groups.expect("apiGroups") {
            for resource in rule.resources.clone().expect("resources") {
                for verb in &rule.verbs {
                    granted.insert(format!("{verb} {group}/{resource}"));
                }
            }
        }
    }
    // What kube-proxy reads, and the one write flannel's kube subnet manager makes (its lease
    // annotations and NetworkUnavailable condition, through the status subresource).
    let expected: BTreeSet<String> = ["/nodes", "/services", "discovery.k8s.io/endpointslices"]
        .into_iter()
        .flat_map(|resource| ["get", "list", "watch"].map(|verb| format!("{verb} {resource}")))
        .chain(["patch /nodes/status".to_owned()])
        .collect();
    assert_eq!(granted, expected);
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(binding.role_ref.name), role.metadata.name);
    let subjects = binding.subjects.expect("subjects");
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), account.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, account.metadata.namespace);
    let pod = daemon_set.spec.template.spec.expect("pod spec");
    assert_eq!(pod.service_account_name, account.metadata.name);
    assert_eq!(daemon_set.metadata.namespace, account.metadata.namespace);
}

#[test]
fn the_daemon_set_runs_on_the_hosts_network_with_only_the_capabilities_it_needs() {
    let Deployment {
        config, daemon_set, ..
    } = deployment();
    let spec = daemon_set.spec;
    let labels = spec.template.metadata.and_then(|m| m.labels);
    for (key, value) in spec.selector.match_labels.expect("matchLabels") {
        assert_eq!(
            labels.as_ref().and_then(|l| l.get(&key)),
            Some(&value),
            "the selector must match the pods"
        );
    }
    let pod = spec.template.spec.expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(
        pod.node_selector
            .as_ref()
            .and_then(|selector| selector.get("kubernetes.io/os"))
            .map(String::as_str),
        Some("linux")
    );
    let [container] = pod.containers.as_slice() else {
        panic!("one container");
    };
    let security = container.security_context.clone().expect("securityContext");
    assert_eq!(security.privileged, Some(false));
    let capabilities = security.capabilities.expect("capabilities");
    assert_eq!(capabilities.drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(
        capabilities.add,
        Some(
            ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"]
                .map(str::to_owned)
                .to_vec()
        )
    );

    // The node's name from the downward API.
    let env = container.env.clone().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|v| v.name == "NODE_NAME")
        .and_then(|v| v.value_from.as_ref())
        .and_then(|from| from.field_ref.as_ref())
        .map(|field| field.field_path.as_str());
    assert_eq!(node_name, Some("spec.nodeName"));

    // The pins, the host's cgroup root (passed as --cgroup), the pods' namespaces and flannel's
    // run directory.
    let mounts: Vec<(String, String)> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|mount| {
            let volume = pod
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == mount.name)
                .unwrap_or_else(|| panic!("no volume {}", mount.name));
            let host = volume
                .host_path
                .as_ref()
                .map_or_else(String::new, |h| h.path.clone());
            (host, mount.mount_path.clone())
        })
        .collect();
    let cgroup = env
        .iter()
        .find(|v| v.name == "WEFT_CGROUP")
        .and_then(|v| v.value.clone())
        .expect("WEFT_CGROUP");
    for expected in [
        (MOUNT_DEFAULTS.0, "/sys/fs/bpf"),
        (MOUNT_DEFAULTS.1, cgroup.as_str()),
        ("/run/netns", weft::sources::pods::NETNS_DIR),
        ("/run/flannel", "/run/flannel"),
    ] {
        assert!(
            mounts
                .iter()
                .any(|(host, path)| (host.as_str(), path.as_str()) == expected),
            "missing mount {expected:?} in {mounts:?}"
        );
    }

    // The init container mounts them on the host first, where `weft mount` puts them by
    // default, in the host's namespaces; it alone is privileged, and it runs the agent's image.
    let [init] = pod.init_containers.as_deref().unwrap_or_default() else {
        panic!("one init container");
    };
    assert_eq!(init.image, container.image);
    assert_eq!(
        init.args.as_deref(),
        Some(
            [
                "mount".to_owned(),
                "--host-namespaces=/hostproc/1/ns".to_owned()
            ]
            .as_slice()
        )
    );
    assert_eq!(
        init.security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );
    let hostproc = init
        .volume_mounts
        .iter()
        .flatten()
        .find(|mount| mount.mount_path == "/hostproc")
        .and_then(|mount| pod.volumes.iter().flatten().find(|v| v.name == mount.name))
        .and_then(|volume| volume.host_path.as_ref())
        .map(|host| host.path.as_str());
    assert_eq!(hostproc, Some("/proc"));
    let help = Command::new(weft_binary())
        .args(["mount", "--help"])
        .output()
        .expect("running weft mount --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for default in [MOUNT_DEFAULTS.0, MOUNT_DEFAULTS.1] {
        assert!(
            help.contains(&format!("[default: {default}]")),
            "weft mount's defaults are {MOUNT_DEFAULTS:?}: {help}"
        );
    }

    // Liveness and readiness on the port the agent serves health on.
    let data = config.data.expect("ConfigMap data");
    let healthz_port: i32 = data["WEFT_HEALTHZ_BIND_ADDRESS"]
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .expect("WEFT_HEALTHZ_BIND_ADDRESS is host:port");
    for (probe, path) in [
        (&container.liveness_probe, "/livez"),
        (&container.readiness_probe, "/readyz"),
    ] {
        let probe = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("an HTTP probe of {path}"));
        assert_eq!(probe.port, IntOrString::Int(healthz_port));
        assert_eq!(probe.path.as_deref(), Some(path));
    }

    // The flags come from the ConfigMap, and every variable there or in the pod is the agent's
    // (or the API address the in-cluster configuration reads).
    let from_config: Vec<_> = container
        .env_from
        .iter()
        .flatten()
        .filter_map(|source| source.config_map_ref.as_ref())
        .map(|reference| reference.name.clone())
        .collect();
    assert_eq!(from_config, [config.metadata.name.expect("a name")]);
    let known = agent_variables();
    assert!(known.contains("WEFT_CLUSTER_CIDR"), "{known:?}");
    for name in data.keys().chain(env.iter().map(|v| &v.name)) {
        assert!(
            known.contains(name) || name.starts_with("KUBERNETES_SERVICE_"),
            "{name} is not a variable `weft agent` reads ({known:?})"
        );
    }
    // So are the optional ones config.yaml suggests in comments (the overlay, etcd's TLS).
    let text = fs::read_to_string(deploy_dir().join("base/config.yaml")).expect("config.yaml");
    let suggested: Vec<&str> = text
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix('#'))
        .filter_map(|rest| rest.trim_start().split_once(':'))
        .map(|(name, _)| name)
        .filter(|name| name.starts_with("WEFT_"))
        .collect();
    assert!(suggested.contains(&"WEFT_ETCD_CAFILE"), "{suggested:?}");
    for name in suggested {
        assert!(
            known.contains(name),
            "config.yaml suggests {name}, which `weft agent` does not read ({known:?})"
        );
    }
}

/// `(kind, name)` of a document, to put renderings in one order.
fn sorted(mut documents: Vec<(String, Value)>) -> Vec<Value> {
    documents.sort_by_key(|(_, d)| (d["kind"].to_string(), d["metadata"]["name"].to_string()));
    documents
        .into_iter()
        .map(|(_, document)| document)
        .collect()
}

#[test]
fn the_kustomize_base_is_the_manifests_and_its_kube_flannel_overlay_replaces_flannel_too() {
    // The base renders the manifests, every one and nothing else, unchanged.
    assert_eq!(sorted(rendered("base")), sorted(documents()));

    // The overlay is still a strictly valid deployment, with flannel's kube subnet manager on,
    // the cluster CIDR left to net-conf.json's Network, and kube-flannel's ConfigMap mounted
    // where the agent reads net-conf.json by default.
    let Deployment {
        config, daemon_set, ..
    } = deployment_of(rendered("kube-flannel"));
    let data = config.data.expect("ConfigMap data");
    assert_eq!(data["WEFT_KUBE_SUBNET_MGR"], "true");
    assert_eq!(data["WEFT_IP_MASQ"], "true");
    assert!(!data.contains_key("WEFT_CLUSTER_CIDR"), "{data:?}");
    let known = agent_variables();
    for name in data.keys() {
        assert!(
            known.contains(name) || name.starts_with("KUBERNETES_SERVICE_"),
            "{name} is not a variable `weft agent` reads"
        );
    }
    let pod = daemon_set.spec.template.spec.expect("pod spec");
    let mount = pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|mount| mount.name == "flannel-cfg")
        .expect("the flannel-cfg mount");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|volume| volume.name == "flannel-cfg")
        .expect("the flannel-cfg volume");
    assert_eq!(
        volume.config_map.as_ref().map(|c| c.name.as_str()),
        Some("kube-flannel-cfg")
    );
    let help = Command::new(weft_binary())
        .args(["agent", "--help"])
        .output()
        .expect("running weft agent --help");
    let default = format!("[default: {}/net-conf.json]", mount.mount_path);
    assert!(
        String::from_utf8_lossy(&help.stdout).contains(&default),
        "the agent reads net-conf.json from the mount by default ({default})"
    );
}
