//! A test Kubernetes API server that speaks the real list/watch protocol for the three kinds
//! weft reads (Services, `discovery.k8s.io/v1` EndpointSlices, Nodes): JSON over HTTP/1.1,
//! resourceVersions, paginated lists (`limit`/`continue`), label and field selectors, watches
//! streamed as newline-delimited events from a resourceVersion, bookmarks, and `410 Gone` (an
//! `ERROR` event mid-stream, and for watches from a compacted resourceVersion).
//!
//! Nodes also take `PATCH` on their status subresource (strategic merge or JSON merge patches,
//! `status.conditions` merged by `type` as the API server merges them), which is how flannel's
//! kube subnet manager writes its lease annotations; a patch of the Node itself is refused, as
//! weft's RBAC (`patch` on `nodes/status` only) refuses it.
//!
//! It listens inside the namespaces tests give it (on their loopback), so agents in node
//! namespaces reach it at `127.0.0.1`, and it counts requests, so tests can tell a re-list from
//! a watch.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener as StdListener},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Frame, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use ipnet::Ipv4Net;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::netns::Netns;

/// The kinds served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/services" => Some(Self::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Self::EndpointSlice),
            "/api/v1/nodes" => Some(Self::Node),
            _ => None,
        }
    }

    fn of(object: &Value) -> Self {
        match object["kind"].as_str() {
            Some("Service") => Self::Service,
            Some("EndpointSlice") => Self::EndpointSlice,
            Some("Node") => Self::Node,
            other => panic!("the test API server holds no {other:?}"),
        }
    }

    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Self::Service => ("v1", "ServiceList"),
            Self::EndpointSlice => ("discovery.k8s.io/v1", "EndpointSliceList"),
            Self::Node => ("v1", "NodeList"),
        }
    }
}

/// Namespace (empty for Nodes) and name.
type Key = (Kind, String, String);

fn key_of(object: &Value) -> Key {
    (
        Kind::of(object),
        object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        object["metadata"]["name"]
            .as_str()
            .expect("objects have a name")
            .to_owned(),
    )
}

/// A label or field selector, as the API server parses the forms kube-proxy and weft use:
/// `key`, `!key`, `key=value`, `key!=value`, comma-separated.
#[derive(Clone, Debug, Default)]
struct Selector(Vec<Requirement>);

#[derive(Clone, Debug)]
enum Requirement {
    Exists(String),
    Absent(String),
    Equals(String, String),
    Differs(String, String),
}

impl Selector {
    fn parse(text: &str) -> Self {
        Self(
            text.split(',')
                .filter(|part| !part.is_empty())
                .map(|part| {
                    if let Some(key) = part.strip_prefix('!') {
                        Requirement::Absent(key.to_owned())
                    } else if let Some((key, value)) = part.split_once("!=") {
                        Requirement::Differs(key.to_owned(), value.to_owned())
                    } else if let Some((key, value)) = part.split_once('=') {
                        Requirement::Equals(
                            key.to_owned(),
                            value.trim_start_matches('=').to_owned(),
                        )
                    } else {
                        Requirement::Exists(part.to_owned())
                    }
                })
                .collect(),
        )
    }

    fn matches(&self, fields: impl Fn(&str) -> Option<String>) -> bool {
        self.0.iter().all(|requirement| match requirement {
            Requirement::Exists(key) => fields(key).is_some(),
            Requirement::Absent(key) => fields(key).is_none(),
            Requirement::Equals(key, value) => fields(key).as_deref() == Some(value.as_str()),
            Requirement::Differs(key, value) => fields(key).as_deref() != Some(value.as_str()),
        })
    }
}

/// What one list or watch asks for.
#[derive(Clone, Debug, Default)]
struct Query {
    labels: Selector,
    fields: Selector,
}

impl Query {
    fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        self.labels
            .matches(|key| labels.get(key).and_then(Value::as_str).map(str::to_owned))
            && self.fields.matches(|key| match key {
                "metadata.name" => object["metadata"]["name"].as_str().map(str::to_owned),
                "metadata.namespace" => object["metadata"]["namespace"].as_str().map(str::to_owned),
                _ => None,
            })
    }
}

/// One change, as watches replay it.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    /// The object before (None when created) and after (None when deleted).
    before: Option<Value>,
    after: Option<Value>,
}

impl Change {
    /// The key of the object changed.
    fn key(&self) -> Key {
        self.after
            .as_ref()
            .or(self.before.as_ref())
            .map(key_of)
            .expect("a change has an object")
    }
}

/// A live watch.
struct Watch {
    kind: Kind,
    query: Query,
    events: mpsc::UnboundedSender<Value>,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Changes at or below this resourceVersion are forgotten: watches from there get 410.
    compacted: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    watches: Vec<Watch>,
    /// Requests received: (kind, "list" or "watch") -> count.
    requests: BTreeMap<(Kind, &'static str), usize>,
    /// Gone away: every request fails (see [`ApiServer::go_down`]).
    down: bool,
}

/// The event a watch with `query` sees for `change`, if any: an object that starts or stops
/// matching is ADDED or DELETED for it, as the API server's watch cache does.
fn event_for(query: &Query, change: &Change) -> Option<Value> {
    let before = change.before.as_ref().filter(|o| query.matches(o));
    let after = change.after.as_ref().filter(|o| query.matches(o));
    let (kind, object) = match (before, after) {
        (None, Some(after)) => ("ADDED", after.clone()),
        (Some(_), Some(after)) => ("MODIFIED", after.clone()),
        (Some(before), None) => {
            let mut gone = change.after.clone().unwrap_or_else(|| before.clone());
            gone["metadata"]["resourceVersion"] = change.rv.to_string().into();
            ("DELETED", gone)
        }
        (None, None) => return None,
    };
    Some(json!({"type": kind, "object": object}))
}

fn gone_event() -> Value {
    json!({"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version", "reason": "Expired", "code": 410}})
}

/// The test API server. Cloning shares it.
#[derive(Clone)]
pub struct ApiServer {
    state: Arc<Mutex<State>>,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl Default for ApiServer {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiServer {
    #[must_use]
    pub fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the test API server");
        Self {
            state: Arc::default(),
            runtime: Arc::new(runtime),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("API server state")
    }

    /// Listens on `127.0.0.1` inside `ns` and writes a kubeconfig for it into `dir`; returns
    /// the kubeconfig's path.
    pub fn listen_in(&self, ns: &Netns, dir: &Path) -> PathBuf {
        let listener = ns.run(|| {
            let listener = StdListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
                .expect("binding the test API server");
            listener.set_nonblocking(true).expect("non-blocking");
            listener
        });
        let port = listener.local_addr().expect("bound").port();
        let state = Arc::clone(&self.state);
        self.runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                        let state = Arc::clone(&state);
                        async move {
                            let (parts, body) = request.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(http_body_util::Collected::to_bytes)
                                .unwrap_or_default();
                            // No answer closes the connection: what a client sees of a server
                            // that went away mid-request.
                            handle(&state, &Request::from_parts(parts, body))
                                .ok_or("the API server is down")
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let path = dir.join("kubeconfig");
        fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\n\
                 clusters: [{{name: test, cluster: {{server: \"http://127.0.0.1:{port}\"}}}}]\n\
                 users: [{{name: test, user: {{}}}}]\n\
                 contexts: [{{name: test, context: {{cluster: test, user: test}}}}]\n\
                 current-context: test\n"
            ),
        )
        .expect("writing the kubeconfig");
        path
    }

    /// Creates or replaces an object (its `kind` says which), assigning a resourceVersion;
    /// live watches see it.
    pub fn apply(&self, object: Value) {
        let mut state = self.state();
        let change = object_change(&state, Some(object), None);
        record(&mut state, change, true);
    }

    /// Deletes an object; live watches see it.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut state = self.state();
        let key = (kind, namespace.to_owned(), name.to_owned());
        let change = object_change(&state, None, Some(key));
        record(&mut state, change, true);
    }

    /// Sends a BOOKMARK with the current resourceVersion to every live watch.
    pub fn bookmark(&self) {
        let state = self.state();
        for watch in &state.watches {
            let (api_version, _) = watch.kind.list_kind();
            let kind = format!("{:?}", watch.kind);
            let _ = watch.events.send(json!({"type": "BOOKMARK", "object": {
                "kind": kind, "apiVersion": api_version,
                "metadata": {"resourceVersion": state.rv.to_string()}}}));
        }
    }

    /// Makes `changes` while no watch hears of them, then compacts the history and ends every
    /// live watch with a `410 Gone` ERROR event: only a fresh list can see what changed.
    pub fn gone_after(&self, changes: impl FnOnce(&Self)) {
        let silent: Vec<Watch> = std::mem::take(&mut self.state().watches);
        changes(self);
        let mut state = self.state();
        state.compacted = state.rv;
        state.history.clear();
        for watch in silent {
            let _ = watch.events.send(gone_event());
        }
    }

    /// Goes away: from now on every request, on new and open connections alike, is cut off
    /// unanswered, and every live watch ends with `410 Gone` first, so what a client tries
    /// next is a fresh list, which fails until [`ApiServer::come_back`].
    pub fn go_down(&self) {
        let mut state = self.state();
        state.down = true;
        state.compacted = state.rv;
        state.history.clear();
        for watch in std::mem::take(&mut state.watches) {
            let _ = watch.events.send(gone_event());
        }
    }

    /// Answers again, with every change made while it was down.
    pub fn come_back(&self) {
        self.state().down = false;
    }

    /// The object `kind`/`namespace`/`name` as the server holds it now.
    #[must_use]
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.state()
            .objects
            .get(&(kind, namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// How many lists (`"list"`), watches (`"watch"`), gets (`"get"`) or patches (`"patch"`)
    /// of `kind` were requested (also while down).
    #[must_use]
    pub fn requests(&self, kind: Kind, verb: &'static str) -> usize {
        self.state()
            .requests
            .get(&(kind, verb))
            .copied()
            .unwrap_or_default()
    }
}

/// The change that sets `object` (or deletes `deleted`).
fn object_change(state: &State, object: Option<Value>, deleted: Option<Key>) -> Change {
    let key = object
        .as_ref()
        .map_or_else(|| deleted.clone().expect("an object or a key"), key_of);
    Change {
        rv: state.rv + 1,
        kind: key.0,
        before: state.objects.get(&key).cloned(),
        after: object,
    }
}

fn record(state: &mut State, mut change: Change, notify: bool) {
    state.rv = change.rv;
    let key = change.key();
    match &mut change.after {
        Some(object) => {
            object["metadata"]["resourceVersion"] = change.rv.to_string().into();
            state.objects.insert(key, object.clone());
        }
        None => {
            state.objects.remove(&key);
        }
    }
    if notify {
        state.watches.retain(|watch| {
            watch.kind != change.kind
                || event_for(&watch.query, &change)
                    .is_none_or(|event| watch.events.send(event).is_ok())
        });
    }
    state.history.push(change);
}

type Body = BoxBody<Bytes, Infallible>;

fn reply(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("a valid response")
}

fn not_found() -> Response<Body> {
    status(StatusCode::NOT_FOUND, "NotFound", "not found")
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    reply(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": reason, "message": message, "code": code.as_u16()}),
    )
}

/// Applies `patch` to `target`: a JSON merge patch (RFC 7386), or a strategic merge patch as
/// the API server applies one to a Node (the same, but for lists with a merge key: conditions
/// merge by `type`).
fn merge_patch(target: &mut Value, patch: &Value, strategic: bool, field: Option<&str>) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let object = target.as_object_mut().expect("an object");
            for (key, value) in fields {
                if value.is_null() {
                    object.remove(key);
                } else {
                    merge_patch(
                        object.entry(key.clone()).or_insert(Value::Null),
                        value,
                        strategic,
                        Some(key),
                    );
                }
            }
        }
        Value::Array(items) if strategic && field == Some("conditions") => {
            if !target.is_array() {
                *target = json!([]);
            }
            let list = target.as_array_mut().expect("an array");
            for item in items {
                match list.iter_mut().find(|old| old["type"] == item["type"]) {
                    Some(old) => merge_patch(old, item, strategic, None),
                    None => list.push(item.clone()),
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// A `PATCH` of Node `name`: its status subresource (`path` `status`) takes metadata and
/// status, and keeps the spec, as the API server's node status strategy does.
fn patch_node(
    state: &mut State,
    name: &str,
    subresource: Option<&str>,
    request: &Request<Bytes>,
) -> Response<Body> {
    if subresource != Some("status") {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!("nodes \"{name}\" is forbidden: cannot patch resource \"nodes\""),
        );
    }
    let content_type = request
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let strategic = match content_type {
        "application/strategic-merge-patch+json" => true,
        "application/merge-patch+json" => false,
        other => {
            return status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                &format!("the server does not take {other:?} patches here"),
            );
        }
    };
    let Ok(patch) = serde_json::from_slice::<Value>(request.body()) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the patch is not JSON",
        );
    };
    let key = (Kind::Node, String::new(), name.to_owned());
    let Some(before) = state.objects.get(&key).cloned() else {
        return not_found();
    };
    let mut after = before.clone();
    merge_patch(&mut after, &patch, strategic, None);
    if let Some(object) = after.as_object_mut() {
        match before.get("spec") {
            Some(spec) => object.insert("spec".to_owned(), spec.clone()),
            None => object.remove("spec"),
        };
    }
    // A patch that changes nothing is no change: no new resourceVersion, no MODIFIED event.
    if after == before {
        return reply(StatusCode::OK, &before);
    }
    let change = object_change(state, Some(after), None);
    record(state, change, true);
    reply(StatusCode::OK, &state.objects[&key])
}

/// The answer to `request`; `None` while the server is down.
fn handle(state: &Mutex<State>, request: &Request<Bytes>) -> Option<Response<Body>> {
    // One Node by name (the agent reads its own for its podCIDR), or a patch of one.
    if let Some(path) = request.uri().path().strip_prefix("/api/v1/nodes/") {
        let (name, subresource) = match path.split_once('/') {
            Some((name, subresource)) => (name, Some(subresource)),
            None => (path, None),
        };
        let mut state = state.lock().expect("API server state");
        let patch = request.method() == hyper::Method::PATCH;
        *state
            .requests
            .entry((Kind::Node, if patch { "patch" } else { "get" }))
            .or_default() += 1;
        if state.down {
            return None;
        }
        if patch {
            return Some(patch_node(&mut state, name, subresource, request));
        }
        return Some(
            match state
                .objects
                .get(&(Kind::Node, String::new(), name.to_owned()))
            {
                Some(node) => reply(StatusCode::OK, node),
                None => not_found(),
            },
        );
    }
    if let Some(document) = discovery(request.uri().path()) {
        return Some(reply(StatusCode::OK, &document));
    }
    let Some(kind) = Kind::from_path(request.uri().path()) else {
        return Some(not_found());
    };
    let params: BTreeMap<String, String> = request
        .uri()
        .query()
        .map(|query| {
            url_decode(query)
                .split('&')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let query = Query {
        labels: Selector::parse(params.get("labelSelector").map_or("", String::as_str)),
        fields: Selector::parse(params.get("fieldSelector").map_or("", String::as_str)),
    };
    let mut state = state.lock().expect("API server state");
    let watch = params.get("watch").is_some_and(|w| w == "true" || w == "1");
    *state
        .requests
        .entry((kind, if watch { "watch" } else { "list" }))
        .or_default() += 1;
    if state.down {
        return None;
    }
    if watch {
        let from: u64 = params
            .get("resourceVersion")
            .and_then(|rv| rv.parse().ok())
            .unwrap_or(state.rv);
        let (events, received) = mpsc::unbounded_channel();
        if from < state.compacted {
            let _ = events.send(gone_event());
        } else {
            for change in state
                .history
                .iter()
                .filter(|c| c.rv > from && c.kind == kind)
            {
                if let Some(event) = event_for(&query, change) {
                    let _ = events.send(event);
                }
            }
            state.watches.push(Watch {
                kind,
                query,
                events,
            });
        }
        // The API server ends a watch after `timeoutSeconds` (client-go's reflectors ask for
        // a few minutes), with no event: the client watches again from where it was.
        let timeout = params
            .get("timeoutSeconds")
            .and_then(|seconds| seconds.parse().ok())
            .map_or(std::time::Duration::MAX, std::time::Duration::from_secs);
        let stream = tokio_stream_of(received)
            .take_until(tokio::time::sleep(timeout))
            .map(|event| Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{event}\n")))));
        return Some(
            Response::builder()
                .status(StatusCode::OK)
                .header("Content-Type", "application/json")
                .body(http_body_util::BodyExt::boxed(StreamBody::new(stream)))
                .expect("a valid response"),
        );
    }
    // A continue token is "<resourceVersion of the first page>:<offset>": every page is of the
    // first page's snapshot, as the API server serves them from etcd at that revision.
    let (list_rv, offset) = params
        .get("continue")
        .and_then(|token| token.split_once(':'))
        .and_then(|(rv, offset)| Some((rv.parse().ok()?, offset.parse().ok()?)))
        .unwrap_or((state.rv, 0usize));
    let Some(snapshot) = objects_at(&state, list_rv) else {
        return Some(status(
            StatusCode::GONE,
            "Expired",
            "the provided continue parameter is too old; list again without it",
        ));
    };
    let limit = params
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l: &usize| *l > 0)
        .unwrap_or(usize::MAX);
    let matching: Vec<&Value> = snapshot
        .iter()
        .filter(|((k, _, _), object)| *k == kind && query.matches(object))
        .map(|(_, object)| object)
        .collect();
    let page: Vec<&Value> = matching.iter().skip(offset).take(limit).copied().collect();
    let next = offset + page.len();
    let continue_token = if next < matching.len() {
        format!("{list_rv}:{next}")
    } else {
        String::new()
    };
    let (api_version, list_kind) = kind.list_kind();
    Some(reply(
        StatusCode::OK,
        &json!({"apiVersion": api_version, "kind": list_kind,
                "metadata": {"resourceVersion": list_rv.to_string(), "continue": continue_token},
                "items": page}),
    ))
}

/// The objects as they were at resourceVersion `rv`: now's, with every later change undone;
/// `None` once the history of that time is compacted.
fn objects_at(state: &State, rv: u64) -> Option<BTreeMap<Key, Value>> {
    if rv < state.compacted {
        return None;
    }
    let mut objects = state.objects.clone();
    for change in state
        .history
        .iter()
        .rev()
        .take_while(|change| change.rv > rv)
    {
        let key = change.key();
        match &change.before {
            Some(before) => objects.insert(key, before.clone()),
            None => objects.remove(&key),
        };
    }
    Some(objects)
}

/// The legacy discovery documents for what the server serves, so that clients which map kinds
/// to paths through discovery (kubectl) find them: `/api`, `/apis` and the two group versions.
fn discovery(path: &str) -> Option<Value> {
    let resource = |name: &str, kind: &str, namespaced: bool| {
        json!({"name": name, "singularName": "", "namespaced": namespaced, "kind": kind,
               "verbs": ["get", "list", "watch"]})
    };
    Some(match path {
        "/api" => json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}),
        "/apis" => json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
            "name": "discovery.k8s.io",
            "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
            "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"}}]}),
        "/api/v1" => json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1",
            "resources": [resource("services", "Service", true), resource("nodes", "Node", false),
                {"name": "nodes/status", "singularName": "", "namespaced": false, "kind": "Node",
                 "verbs": ["get", "patch"]}]}),
        "/apis/discovery.k8s.io/v1" => json!({"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": "discovery.k8s.io/v1",
            "resources": [resource("endpointslices", "EndpointSlice", true)]}),
        _ => return None,
    })
}

fn tokio_stream_of(
    mut received: mpsc::UnboundedReceiver<Value>,
) -> impl futures::Stream<Item = Value> {
    futures::stream::poll_fn(move |cx| received.poll_recv(cx))
}

/// Decodes `%XX` escapes (selectors arrive percent-encoded).
fn url_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = text.get(i + 1..i + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A Service object for the server.
#[must_use]
pub fn service(namespace: &str, name: &str, cluster_ip: Ipv4Addr, port: u16, target: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": namespace},
           "spec": {"type": "ClusterIP", "clusterIP": cluster_ip.to_string(),
                    "ports": [{"port": port, "targetPort": target, "protocol": "TCP"}]}})
}

/// A Node object `name` with the pod subnet `pod_cidr` (what the controller manager allocates).
#[must_use]
pub fn node(name: &str, pod_cidr: Ipv4Net) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
           "spec": {"podCIDR": pod_cidr.to_string(), "podCIDRs": [pod_cidr.to_string()]}})
}

/// An EndpointSlice object for service `name` with ready `endpoints` on `port`.
#[must_use]
pub fn endpoint_slice(namespace: &str, name: &str, port: u16, endpoints: &[Ipv4Addr]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{name}-1"), "namespace": namespace,
                        "labels": {"kubernetes.io/service-name": name}},
           "addressType": "IPv4", "ports": [{"port": port, "protocol": "TCP"}],
           "endpoints": endpoints})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_merge_as_the_api_server_merges_them_into_a_node() {
        let mut node = json!({"metadata": {"name": "n1", "annotations": {"a": "1", "b": "2"}},
            "status": {"conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"}]}});
        let patch = json!({"metadata": {"annotations": {"b": null, "c": "3"}},
            "status": {"conditions": [
                {"type": "NetworkUnavailable", "status": "False", "reason": "WeftIsUp"}]}});
        let mut strategic = node.clone();
        merge_patch(&mut strategic, &patch, true, None);
        assert_eq!(
            strategic["metadata"]["annotations"],
            json!({"a": "1", "c": "3"})
        );
        assert_eq!(
            strategic["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"},
                   {"type": "NetworkUnavailable", "status": "False", "reason": "WeftIsUp"}])
        );
        // A JSON merge patch replaces lists whole.
        merge_patch(&mut node, &patch, false, None);
        assert_eq!(node["status"]["conditions"], patch["status"]["conditions"]);
    }

    #[test]
    fn selectors_match_as_the_api_server_does() {
        let object = json!({"metadata": {"name": "a", "labels": {"app": "web"}}});
        let query = |labels: &str, fields: &str| Query {
            labels: Selector::parse(labels),
            fields: Selector::parse(fields),
        };
        assert!(query("app=web,!service.kubernetes.io/headless", "").matches(&object));
        assert!(!query("!app", "").matches(&object));
        assert!(!query("app!=web", "").matches(&object));
        assert!(query("", "metadata.name=a").matches(&object));
        assert!(!query("", "metadata.name=b").matches(&object));
        assert_eq!(url_decode("a%3Db%2C%21c"), "a=b,!c");
    }

    #[test]
    fn an_object_that_stops_matching_is_deleted_for_the_watch() {
        let query = Query {
            labels: Selector::parse("!skip"),
            fields: Selector::default(),
        };
        let plain = json!({"kind": "Service", "metadata": {"name": "a"}});
        let skipped = json!({"kind": "Service", "metadata": {"name": "a", "labels": {"skip": ""}}});
        let change = Change {
            rv: 7,
            kind: Kind::Service,
            before: Some(plain),
            after: Some(skipped),
        };
        let event = event_for(&query, &change).expect("an event");
        assert_eq!(event["type"], "DELETED");
        assert_eq!(event["object"]["metadata"]["resourceVersion"], "7");
    }
}
