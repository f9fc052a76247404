//! The test API server checked against the real client: kubectl (client-go) lists it in pages,
//! watches it from a resourceVersion with bookmarks until `timeoutSeconds`, meets its `410
//! Gone`, and follows a watch through it, so the server the agents' watchers are tested against
//! behaves as client-go expects, not only as weft's own client reads it.

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;
use weft_tests::{
    apiserver::{self, ApiServer},
    netns::{Netns, require_root, unique},
};

/// A namespace the API server listens in, with a kubeconfig and kubectl's cache directory.
struct Client {
    ns: Netns,
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

impl Client {
    fn new(api: &ApiServer) -> Self {
        require_root();
        let ns = Netns::create(&unique("wctl")).expect("a namespace for kubectl");
        let dir = tempfile::tempdir().expect("a directory for kubectl");
        let kubeconfig = api.listen_in(&ns, dir.path());
        Self {
            ns,
            kubeconfig,
            dir,
        }
    }

    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<String> {
        let mut full = vec![
            format!("--kubeconfig={}", self.kubeconfig.display()),
            format!("--cache-dir={}", self.dir.path().join("cache").display()),
        ];
        full.extend(args.iter().map(|arg| (*arg).to_owned()));
        full
    }

    /// Runs kubectl to its end; its standard output, or an error with its standard error.
    fn try_run(&self, args: &[&str]) -> std::io::Result<String> {
        let full = self.args(args);
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        self.ns.exec("kubectl", &full)
    }

    fn run(&self, args: &[&str]) -> String {
        self.try_run(args)
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
    }

    /// `kubectl get --raw <path>` read as JSON documents, one per line for a watch.
    fn raw(&self, path: &str) -> Vec<Value> {
        let output = self.run(&["get", "--raw", path]);
        serde_json::Deserializer::from_str(&output)
            .into_iter::<Value>()
            .map(|document| document.unwrap_or_else(|e| panic!("{path}: not JSON: {e}")))
            .collect()
    }
}

fn services(api: &ApiServer, names: &[&str]) {
    for (host, name) in (10u8..).zip(names) {
        api.apply(apiserver::service(
            "default",
            name,
            Ipv4Addr::new(10, 96, 0, host),
            80,
            8080,
        ));
    }
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| {
            item["metadata"]["name"]
                .as_str()
                .expect("a name")
                .to_owned()
        })
        .collect()
}

#[test]
fn kubectl_lists_the_test_api_server_in_pages_as_client_go_pages() {
    let api = ApiServer::new();
    let client = Client::new(&api);
    services(&api, &["a", "b", "c"]);
    let first = &client.raw("/api/v1/services?limit=2")[0];
    assert_eq!(names(first), ["a", "b"]);
    let token = first["metadata"]["continue"]
        .as_str()
        .expect("a continue token");
    assert!(!token.is_empty());
    // A change after the first page is not in the second: pages are of one snapshot.
    services(&api, &["d"]);
    let second = &client.raw(&format!("/api/v1/services?limit=2&continue={token}"))[0];
    assert_eq!(names(second), ["c"]);
    assert_eq!(second["metadata"]["continue"], "");
    assert_eq!(
        second["metadata"]["resourceVersion"], first["metadata"]["resourceVersion"],
        "every page carries the first page's resourceVersion"
    );
    // Once that snapshot is compacted away, the token has expired, as etcd's compaction
    // expires the API server's.
    api.gone_after(|_| {});
    let expired = client
        .try_run(&[
            "get",
            "--raw",
            &format!("/api/v1/services?limit=2&continue={token}"),
        ])
        .expect_err("an expired continue token");
    assert!(expired.to_string().contains("Expired"), "{expired}");
    // client-go's own pager, through discovery, one object per page.
    let listed = client.run(&["get", "services", "-A", "--chunk-size=1", "-o", "name"]);
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        ["service/a", "service/b", "service/c", "service/d"]
    );
    assert!(api.requests(apiserver::Kind::Service, "list") >= 6);
}

#[test]
fn kubectl_watches_from_a_resource_version_with_bookmarks_and_meets_410_gone() {
    let api = ApiServer::new();
    let client = Client::new(&api);
    services(&api, &["a"]);
    let listed = &client.raw("/api/v1/services")[0];
    let rv = listed["metadata"]["resourceVersion"]
        .as_str()
        .expect("a resourceVersion")
        .to_owned();
    services(&api, &["b"]);
    api.delete(apiserver::Kind::Service, "default", "a");
    // A watch from the list's resourceVersion replays what changed since; a bookmark arrives
    // while it is open; `timeoutSeconds` ends it.
    let watching = std::thread::scope(|scope| {
        let watch = scope.spawn(|| {
            client.raw(&format!(
                "/api/v1/services?watch=1&allowWatchBookmarks=true&resourceVersion={rv}&timeoutSeconds=2"
            ))
        });
        std::thread::sleep(Duration::from_millis(700));
        api.bookmark();
        watch.join().expect("the watch")
    });
    let events: Vec<(String, String)> = watching
        .iter()
        .map(|event| {
            (
                event["type"].as_str().expect("a type").to_owned(),
                event["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(
        events,
        [
            ("ADDED".to_owned(), "b".to_owned()),
            ("DELETED".to_owned(), "a".to_owned()),
            ("BOOKMARK".to_owned(), String::new()),
        ]
    );
    let bookmark = &watching[2]["object"]["metadata"]["resourceVersion"];
    assert!(bookmark.as_str().is_some_and(|rv| !rv.is_empty()));

    // After a compaction, a watch from the old resourceVersion gets a 410 in the stream, as
    // the API server's watch cache answers (the status is 200; the error is the event).
    api.gone_after(|api| services(api, &["c"]));
    let gone = client.raw(&format!("/api/v1/services?watch=1&resourceVersion={rv}"));
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert_eq!(gone[0]["type"], "ERROR");
    assert_eq!(gone[0]["object"]["code"], 410);
    assert_eq!(gone[0]["object"]["reason"], "Expired");
}

#[test]
fn kubectl_get_watch_follows_the_test_api_server() {
    let api = ApiServer::new();
    let client = Client::new(&api);
    services(&api, &["a"]);
    let args = client.args(&["get", "services", "-A", "--watch", "-o", "name"]);
    let mut watch = Command::new("ip")
        .args(["netns", "exec", client.ns.name(), "kubectl"])
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting kubectl get --watch");
    let (lines, received) = mpsc::channel();
    let stdout = watch.stdout.take().expect("kubectl's output");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let next = || {
        received
            .recv_timeout(Duration::from_secs(10))
            .expect("kubectl printed a line")
    };
    assert_eq!(next(), "service/a", "the list");
    services(&api, &["a", "b"]);
    let mut changed = vec![next(), next()];
    changed.sort();
    assert_eq!(changed, ["service/a", "service/b"], "the watch's events");
    watch.kill().expect("stopping kubectl");
    watch.wait().expect("reaping kubectl");
    reader.join().expect("the reader");
}
