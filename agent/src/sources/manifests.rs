//! The manifest source: a directory of Kubernetes `Service` and `discovery.k8s.io/v1`
//! `EndpointSlice` objects (YAML or JSON, several per file separated by `---`, or `kind: List`),
//! re-read whenever a file in it changes.
//!
//! Each scan yields the complete set of valid objects; the difference from the previous scan is
//! applied to the model, so a removed file removes its objects. An invalid object is reported
//! with its file and name and skipped; the rest of the file still counts. What the source
//! cannot read is not taken for removed: a listed file that cannot be read (a broken symlink, an
//! I/O error) keeps its last known objects, and while the directory itself is gone or unreadable
//! the model keeps everything.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use notify::Watcher as _;
use serde::Deserialize as _;

use crate::{
    model::Model,
    sources::objects::{Kind, ObjectRef, ServiceSpec, SliceSpec, Triage, triage},
    sources::{ModelHandle, reset, with_causes},
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
    /// The file each object came from.
    pub origins: BTreeMap<ObjectKey, String>,
    /// Files listed but not read.
    pub unreadable: Vec<String>,
}

impl Scan {
    /// Takes over what `previous` read from the files this scan could not read.
    fn keep_unreadable(&mut self, previous: &Self) {
        for (key, file) in &previous.origins {
            if self.unreadable.contains(file)
                && !self.objects.contains_key(key)
                && let Some(object) = previous.objects.get(key)
            {
                self.objects.insert(key.clone(), object.clone());
                self.origins.insert(key.clone(), file.clone());
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("manifest directory {path} was replaced; watching the new one")]
    Replaced { path: PathBuf },
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
        // Symlinks are followed (a ConfigMap volume's files are symlinks into `..data`).
        match fs::metadata(&file).and_then(|meta| {
            // A FIFO would block the read for good; a directory cannot be read as text.
            if meta.is_file() {
                fs::read_to_string(&file).map(Some)
            } else {
                Ok(None)
            }
        }) {
            Ok(Some(text)) => parse_into(&text, &label, &mut scan),
            Ok(None) => scan
                .problems
                .push(format!("{label}: not a regular file, skipped")),
            // Not UTF-8: the content is broken, as with a YAML syntax error.
            Err(e) if e.kind() == io::ErrorKind::InvalidData => scan
                .problems
                .push(format!("{label}: not YAML or JSON: {e}")),
            // Removed between listing and reading: simply gone.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound && fs::symlink_metadata(&file).is_err() => {}
            // Listed but unreadable (a symlink whose target is gone, an I/O error): not a
            // removal, so its objects stay as they were.
            Err(e) => {
                scan.problems.push(format!(
                    "{label}: cannot read: {e}; keeping what it held before"
                ));
                scan.unreadable.push(label);
            }
        }
    }
    Ok(scan)
}

/// Parses one file's documents into `scan`.
pub fn parse_into(text: &str, file: &str, scan: &mut Scan) {
    // The whole stream at once, so a valid file gets YAML's exact semantics.
    if let Ok(values) = documents(text) {
        for value in values {
            add_document(value, file, scan);
        }
        return;
    }
    // libyaml reads ahead, so one broken document can fail the documents before it too: read
    // each on its own (a `---` line at the start of a line always separates documents), so a
    // broken one costs only itself.
    let mut line = 1;
    let mut number = 0;
    for chunk in split_documents(text) {
        let start = line;
        line += chunk.lines().count();
        if number == 0 && chunk.trim().is_empty() {
            // What precedes a file's first `---` is no document.
            continue;
        }
        number += 1;
        match documents(chunk) {
            Ok(values) => {
                for value in values {
                    add_document(value, file, scan);
                }
            }
            Err(e) => scan.problems.push(format!(
                "{file}: document {number} (from line {start}): not YAML or JSON: {e}"
            )),
        }
    }
}

/// Every non-empty document of a YAML stream, or the first syntax error.
fn documents(text: &str) -> Result<Vec<serde_json::Value>, serde_yaml_ng::Error> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(serde_json::Value::deserialize)
        .filter(|value| !matches!(value, Ok(serde_json::Value::Null)))
        .collect()
}

/// `text` cut before each document marker line (`---`, alone or followed by a space).
fn split_documents(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut at = 0;
        let cut = loop {
            let line_end = rest[at..].find('\n').map_or(rest.len(), |i| at + i + 1);
            if line_end == rest.len() {
                break rest.len();
            }
            let next = &rest[line_end..];
            if next.starts_with("---") && next[3..].chars().next().is_none_or(char::is_whitespace) {
                break line_end;
            }
            at = line_end;
        };
        let (chunk, tail) = rest.split_at(cut);
        rest = tail;
        Some(chunk)
    })
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
        // The path names the field a type error is in (`spec.ports[0].port: invalid type`).
        ("v1", "Service") => match serde_path_to_error::deserialize::<_, Service>(value) {
            Ok(service) => add(&service, wrap_service, file, &described, scan),
            Err(e) => scan.problems.push(format!("{described}: {e}")),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            match serde_path_to_error::deserialize::<_, EndpointSlice>(value) {
                Ok(slice) => add(&slice, wrap_slice, file, &described, scan),
                Err(e) => scan.problems.push(format!("{described}: {e}")),
            }
        }
        // Deployments and the like may share a file with the objects weft reads.
        _ => {}
    }
}

fn wrap_service(name: ObjectRef, spec: ServiceSpec) -> (ObjectKey, Object) {
    (ObjectKey::Service(name), Object::Service(spec))
}

fn wrap_slice(name: ObjectRef, spec: SliceSpec) -> (ObjectKey, Object) {
    (ObjectKey::EndpointSlice(name), Object::EndpointSlice(spec))
}

fn insert(scan: &mut Scan, key: ObjectKey, object: Object, file: &str, described: &str) {
    scan.origins.insert(key.clone(), file.to_owned());
    if scan.objects.insert(key, object).is_some() {
        scan.problems.push(format!(
            "{described}: defined twice; the last definition wins"
        ));
    }
}

/// Triages one object into the scan: served objects (`wrap`ped into the scan's form), notes for
/// ignored ones, problems for invalid ones.
fn add<K: Kind>(
    object: &K,
    wrap: fn(ObjectRef, K::Spec) -> (ObjectKey, Object),
    file: &str,
    described: &str,
    scan: &mut Scan,
) {
    match triage(object) {
        Triage::Serve(name, spec) => {
            let (key, object) = wrap(name, spec);
            insert(scan, key, object, file, described);
        }
        Triage::Ignore(_, why) => scan.notes.push(format!("{described}: ignored: {why}")),
        Triage::Reject(_, e) => scan.problems.push(format!("{described}: {e}")),
    }
}

impl Scan {
    fn services(&self) -> BTreeMap<ObjectRef, ServiceSpec> {
        self.objects
            .iter()
            .filter_map(|(key, object)| match (key, object) {
                (ObjectKey::Service(name), Object::Service(spec)) => {
                    Some((name.clone(), spec.clone()))
                }
                _ => None,
            })
            .collect()
    }

    fn slices(&self) -> BTreeMap<ObjectRef, SliceSpec> {
        self.objects
            .iter()
            .filter_map(|(key, object)| match (key, object) {
                (ObjectKey::EndpointSlice(name), Object::EndpointSlice(spec)) => {
                    Some((name.clone(), spec.clone()))
                }
                _ => None,
            })
            .collect()
    }
}

/// Brings the model from one scan to the next; returns whether it changed.
pub fn apply(model: &mut Model, previous: &Scan, next: &Scan) -> bool {
    let services = reset::<Service>(model, previous.services().keys(), next.services());
    let slices = reset::<EndpointSlice>(model, previous.slices().keys(), next.slices());
    services | slices
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
    /// The watched directory's device and inode: a directory replaced under the same path (a
    /// `mv` of a new one into place) needs a new watch.
    identity: (u64, u64),
    /// What the model last got from this directory.
    applied: Scan,
}

fn identity(dir: &Path) -> Result<(u64, u64), ManifestError> {
    let meta = fs::metadata(dir).map_err(|source| ManifestError::ReadDir {
        path: dir.to_owned(),
        source,
    })?;
    Ok((meta.dev(), meta.ino()))
}

/// Reads `dir`, keeping what `previous` had from files that could not be read now.
fn rescan(dir: &Path, previous: &Scan) -> Result<Scan, ManifestError> {
    let mut scan = scan_dir(dir)?;
    scan.keep_unreadable(previous);
    Ok(scan)
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
        let identity = identity(dir)?;
        let scan = rescan(dir, &applied)?;
        report(&applied, &scan);
        model.update(|m| apply(m, &applied, &scan));
        Ok(Self {
            dir: dir.to_owned(),
            _watcher: watcher,
            events,
            identity,
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
            if identity(&self.dir)? != self.identity {
                return Err(ManifestError::Replaced {
                    path: self.dir.clone(),
                });
            }
            let next = rescan(&self.dir, &self.applied)?;
            report(&self.applied, &next);
            model.update(|m| apply(m, &self.applied, &next));
            self.applied = next;
        }
    }
}

/// Follows the directory for as long as the agent runs. When the watch breaks (the directory
/// vanished, an inotify error), the last known services keep working while it is re-created
/// and re-read every second.
pub async fn follow(mut watch: ManifestWatch, model: Arc<ModelHandle>) -> Infallible {
    loop {
        if let Err(e) = watch.follow(&model).await {
            tracing::error!(
                "manifest source interrupted: {}; keeping the last known services",
                with_causes(&e)
            );
        }
        watch = loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match ManifestWatch::resume(&watch.dir, &model, watch.applied.clone()) {
                Ok(resumed) => {
                    tracing::info!(dir = %watch.dir.display(), "manifest source back");
                    break resumed;
                }
                Err(e) => tracing::debug!("manifest source still unavailable: {}", with_causes(&e)),
            }
        };
    }
}
#[cfg(test)]
mod tests;
