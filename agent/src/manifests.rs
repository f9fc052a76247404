//! The manifest source: a directory of Kubernetes `Service` and `discovery.k8s.io/v1`
//! `EndpointSlice` objects (YAML or JSON, several per file separated by `---`, or `kind: List`),
//! re-read whenever a file in it changes.
//!
//! Each scan yields the complete set of valid objects; the difference from the previous scan is
//! applied to the model, so a removed file removes its objects. An invalid object is reported
//! with its file and name and skipped; the rest of the file still counts.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use notify::Watcher as _;
use serde::Deserialize as _;

use crate::{
    model::Model,
    objects::{
        Checked, ObjectRef, ServiceSpec, SliceSpec, check_endpoint_slice, check_service, object_ref,
    },
    source::ModelHandle,
};

/// A valid object found in the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Service(ServiceSpec),
    EndpointSlice(SliceSpec),
}

/// Objects are keyed by kind and name: a Service and a slice may share a name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKey {
    Service(ObjectRef),
    EndpointSlice(ObjectRef),
}

/// The result of reading the directory once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    pub objects: BTreeMap<ObjectKey, Object>,
    /// Human-readable problems: `file: kind namespace/name: what is wrong`.
    pub problems: Vec<String>,
    /// Notes about valid objects (ignored services, unsupported ports).
    pub notes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot watch manifest directory {path}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let extension = path.extension().and_then(|e| e.to_str());
    !hidden && matches!(extension, Some("yaml" | "yml" | "json"))
}

/// Reads every manifest file of `dir` (not recursive; hidden files, such as a ConfigMap
/// volume's `..data`, are skipped).
pub fn scan_dir(dir: &Path) -> Result<Scan, ManifestError> {
    let read_dir = |source| ManifestError::ReadDir {
        path: dir.to_owned(),
        source,
    };
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(read_dir)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(read_dir)?;
    files.retain(|path| is_manifest(path));
    files.sort();
    let mut scan = Scan::default();
    for file in files {
        let label = file.display().to_string();
        match fs::read_to_string(&file) {
            Ok(text) => parse_into(&text, &label, &mut scan),
            // A file removed between listing and reading is simply gone.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => scan.problems.push(format!("{label}: cannot read: {e}")),
        }
    }
    Ok(scan)
}

/// Parses one file's documents into `scan`.
pub fn parse_into(text: &str, file: &str, scan: &mut Scan) {
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        match serde_json::Value::deserialize(document) {
            Ok(serde_json::Value::Null) => {}
            Ok(value) => add_document(value, file, scan),
            Err(e) => {
                scan.problems.push(format!(
                    "{file}: document {}: not YAML or JSON: {e}",
                    index + 1
                ));
                // The YAML stream cannot be resumed after a syntax error.
                break;
            }
        }
    }
}

fn add_document(value: serde_json::Value, file: &str, scan: &mut Scan) {
    let api_version = value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let kind = value
        .get("kind")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let name = value
        .pointer("/metadata/name")
        .and_then(|v| v.as_str())
        .unwrap_or("<no name>")
        .to_owned();
    let namespace = value
        .pointer("/metadata/namespace")
        .and_then(|v| v.as_str())
        .unwrap_or("default")
        .to_owned();
    let described = format!("{file}: {kind} {namespace}/{name}");
    match (api_version, kind) {
        ("v1", "List") => {
            if let Some(serde_json::Value::Array(items)) = value.get("items") {
                for item in items {
                    add_document(item.clone(), file, scan);
                }
            }
        }
        ("v1", "Service") => match serde_json::from_value::<Service>(value) {
            Ok(service) => add_service(&service, &described, scan),
            Err(e) => scan.problems.push(format!("{described}: {e}")),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            match serde_json::from_value::<EndpointSlice>(value) {
                Ok(slice) => add_slice(&slice, &described, scan),
                Err(e) => scan.problems.push(format!("{described}: {e}")),
            }
        }
        // Deployments and the like may share a file with the objects weft reads.
        _ => {}
    }
}

fn insert(scan: &mut Scan, key: ObjectKey, object: Object, described: &str) {
    if scan.objects.insert(key, object).is_some() {
        scan.problems.push(format!(
            "{described}: defined twice; the last definition wins"
        ));
    }
}

fn add_service(service: &Service, described: &str, scan: &mut Scan) {
    let checked =
        object_ref(&service.metadata).and_then(|name| Ok((name, check_service(service)?)));
    match checked {
        Ok((name, Checked::Serve(spec))) => {
            insert(
                scan,
                ObjectKey::Service(name),
                Object::Service(spec),
                described,
            );
        }
        Ok((_, Checked::Ignore(why))) => scan.notes.push(format!("{described}: ignored: {why}")),
        Err(e) => scan.problems.push(format!("{described}: {e}")),
    }
}

fn add_slice(slice: &EndpointSlice, described: &str, scan: &mut Scan) {
    let checked =
        object_ref(&slice.metadata).and_then(|name| Ok((name, check_endpoint_slice(slice)?)));
    match checked {
        Ok((name, Checked::Serve(spec))) => {
            insert(
                scan,
                ObjectKey::EndpointSlice(name),
                Object::EndpointSlice(spec),
                described,
            );
        }
        Ok((_, Checked::Ignore(why))) => scan.notes.push(format!("{described}: ignored: {why}")),
        Err(e) => scan.problems.push(format!("{described}: {e}")),
    }
}

/// Applies the difference between two scans to the model; returns whether it changed.
pub fn apply(model: &mut Model, previous: &Scan, next: &Scan) -> bool {
    let mut changed = false;
    for key in previous
        .objects
        .keys()
        .filter(|k| !next.objects.contains_key(*k))
    {
        changed |= match key {
            ObjectKey::Service(name) => model.remove_service(name),
            ObjectKey::EndpointSlice(name) => model.remove_slice(name),
        };
    }
    for (key, object) in &next.objects {
        if previous.objects.get(key) == Some(object) {
            continue;
        }
        changed |= match (key, object) {
            (ObjectKey::Service(name), Object::Service(spec)) => {
                model.set_service(name.clone(), spec.clone())
            }
            (ObjectKey::EndpointSlice(name), Object::EndpointSlice(spec)) => {
                model.set_slice(name.clone(), spec.clone())
            }
            _ => unreachable!("scans pair each key with an object of its kind"),
        };
    }
    changed
}

/// Logs what a scan found wrong, unless the previous scan found exactly the same.
fn report(previous: &Scan, next: &Scan) {
    if next.problems != previous.problems {
        for problem in &next.problems {
            tracing::error!("invalid manifest, skipped: {problem}");
        }
    }
    if next.notes != previous.notes {
        for note in &next.notes {
            tracing::info!("{note}");
        }
    }
}

/// How long to wait for more file events before re-reading (editors write in several steps).
const SETTLE: Duration = Duration::from_millis(50);

/// A watched manifest directory. The watch is registered before the first read, so no change
/// can fall between the two.
pub struct ManifestWatch {
    dir: PathBuf,
    // Dropping the watcher ends the events.
    _watcher: notify::RecommendedWatcher,
    events: tokio::sync::mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    /// What the model last got from this directory.
    applied: Scan,
}

impl ManifestWatch {
    /// Watches `dir` and reads it into the model; the agent does this before its first
    /// reconcile, so a restart never removes services only because they were not read yet.
    pub fn start(dir: &Path, model: &ModelHandle) -> Result<Self, ManifestError> {
        Self::resume(dir, model, Scan::default())
    }

    /// Watches `dir` again after an interruption, applying what changed since `applied`.
    fn resume(dir: &Path, model: &ModelHandle, applied: Scan) -> Result<Self, ManifestError> {
        let watch_error = |source| ManifestError::Watch {
            path: dir.to_owned(),
            source,
        };
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |event| {
            // The receiver only goes away with this watch.
            let _ = events_tx.send(event);
        })
        .map_err(watch_error)?;
        watcher
            .watch(dir, notify::RecursiveMode::NonRecursive)
            .map_err(watch_error)?;
        let scan = scan_dir(dir)?;
        report(&applied, &scan);
        model.update(|m| apply(m, &applied, &scan));
        Ok(Self {
            dir: dir.to_owned(),
            _watcher: watcher,
            events,
            applied: scan,
        })
    }

    /// Re-reads the directory into the model whenever it changes, until the watch fails.
    async fn follow(&mut self, model: &ModelHandle) -> Result<(), ManifestError> {
        loop {
            // Wait for a change, then for the burst of events it comes with to settle.
            match self.events.recv().await {
                None => return Ok(()),
                Some(Err(source)) => {
                    return Err(ManifestError::Watch {
                        path: self.dir.clone(),
                        source,
                    });
                }
                Some(Ok(_)) => {}
            }
            while let Ok(Some(_)) = tokio::time::timeout(SETTLE, self.events.recv()).await {}
            let next = scan_dir(&self.dir)?;
            report(&self.applied, &next);
            model.update(|m| apply(m, &self.applied, &next));
            self.applied = next;
        }
    }
}

/// Follows the directory for as long as the agent runs. When the watch breaks (the directory
/// vanished, an inotify error), the last known services keep working while it is re-created
/// and re-read every second.
pub async fn follow(mut watch: ManifestWatch, model: Arc<ModelHandle>) {
    loop {
        if let Err(e) = watch.follow(&model).await {
            tracing::error!("manifest source interrupted: {e}; keeping the last known services");
        }
        watch = loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match ManifestWatch::resume(&watch.dir, &model, watch.applied.clone()) {
                Ok(resumed) => {
                    tracing::info!(dir = %watch.dir.display(), "manifest source back");
                    break resumed;
                }
                Err(e) => tracing::debug!("manifest source still unavailable: {e}"),
            }
        };
    }
}
#[cfg(test)]
mod tests {
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
            model.desired().ports.values().next().unwrap().sets
                [&weft_common::maps::endpoint_scope::CLUSTER]
                .len(),
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
    fn a_type_error_is_reported_with_the_object_name() {
        let scan = scan("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: 3}\n");
        assert!(scan.objects.is_empty());
        assert!(
            scan.problems[0].starts_with("seed.yaml: Service default/x: "),
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
}
