//! Clusters made of network namespaces: a node with a pod bridge, pods on veth pairs, and a
//! real `weft agent` process per node. Everything is torn down on drop, in reverse order of
//! creation (declare the agent after the node and its pods).

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::Duration,
};

use ipnet::Ipv4Net;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::netns::{Netns, run, unique};

/// The bridge name weft uses by default, as flannel's CNI does.
pub const BRIDGE: &str = "cni0";

/// A node: a namespace with the pod bridge (as a CNI plugin would have made it).
pub struct Node {
    pub ns: Netns,
    pub subnet: Ipv4Net,
    pods: Mutex<u32>,
}

impl Node {
    /// A node whose pods live in `subnet`; the bridge gets the subnet's first address.
    pub fn new(tag: &str, subnet: Ipv4Net) -> Self {
        let ns = Netns::create(&unique(tag)).expect("creating the node namespace");
        let gateway = format!("{}/{}", subnet.hosts().next().expect("subnet has hosts"), subnet.prefix_len());
        ns.ip(&["link", "add", "name", BRIDGE, "type", "bridge"]).expect("creating the bridge");
        ns.ip(&["addr", "add", &gateway, "dev", BRIDGE]).expect("addressing the bridge");
        ns.ip(&["link", "set", BRIDGE, "up"]).expect("bringing up the bridge");
        Self {
            ns,
            subnet,
            pods: Mutex::new(0),
        }
    }

    /// Turns netfilter hooks on bridged traffic (`br_netfilter`'s `bridge-nf-call-iptables`) on
    /// or off in this node. Kubernetes nodes run with it on; the module is loaded when needed.
    pub fn set_bridge_netfilter(&self, on: bool) {
        const KEY: &str = "net.bridge.bridge-nf-call-iptables";
        if on && self.ns.exec("sysctl", &["-n", KEY]).is_err() {
            run("modprobe", &["br_netfilter"]).expect("loading br_netfilter");
        }
        let setting = format!("{KEY}={}", u8::from(on));
        if let Err(e) = self.ns.exec("sysctl", &["-w", &setting]) {
            // Without the module there are no bridge hooks to turn off.
            assert!(!on, "enabling bridge netfilter: {e}");
        }
    }

    /// The bridge's address: the pods' default gateway.
    #[must_use]
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.hosts().next().expect("subnet has hosts")
    }

    /// A pod with address `addr`, on a veth pair whose node side joins the bridge.
    pub fn add_pod(&self, addr: Ipv4Addr) -> Pod {
        let index = {
            let mut pods = self.pods.lock().expect("pod counter");
            *pods += 1;
            *pods
        };
        let ns = Netns::create(&format!("{}p{index}", self.ns.name())).expect("creating the pod namespace");
        let host_side = format!("veth{index}");
        self.ns
            .ip(&["link", "add", "name", &host_side, "type", "veth", "peer", "name", "eth0", "netns", ns.name()])
            .expect("creating the pod's veth pair");
        self.ns.ip(&["link", "set", &host_side, "master", BRIDGE, "up"]).expect("enslaving the veth");
        let cidr = format!("{addr}/{}", self.subnet.prefix_len());
        ns.ip(&["addr", "add", &cidr, "dev", "eth0"]).expect("addressing the pod");
        ns.ip(&["link", "set", "eth0", "up"]).expect("bringing up the pod's eth0");
        ns.ip(&["route", "add", "default", "via", &self.gateway().to_string()]).expect("routing the pod");
        Pod { ns, addr }
    }
}

/// A pod: a namespace with one address.
pub struct Pod {
    pub ns: Netns,
    pub addr: Ipv4Addr,
}

/// Options for one agent.
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    pub cluster_cidr: Option<Ipv4Net>,
    /// Extra command-line arguments.
    pub extra_args: Vec<String>,
}

/// The `weft` binary this test run was built with: `WEFT_BIN`, or `target/<profile>/weft` beside
/// the test executable.
#[must_use]
pub fn weft_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WEFT_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let binary = profile_dir.join("weft");
    assert!(
        binary.exists(),
        "{} is missing: build it first (`cargo build -p weft`; `cargo xtask test` does)",
        binary.display()
    );
    binary
}

/// A running `weft agent` in a node's namespace, with its own pin directory and manifest
/// directory. Dropping it stops the agent (SIGTERM) and removes its pins.
pub struct Agent {
    child: Child,
    pin_dir: PathBuf,
    manifests: tempfile::TempDir,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    /// Starts an agent on `node` serving `manifests` (file name, content) and waits until it
    /// reports ready.
    pub fn start(node: &Node, manifests: &[(&str, &str)], options: &AgentOptions) -> Self {
        let manifest_dir = tempfile::tempdir().expect("manifest directory");
        for (file, text) in manifests {
            fs::write(manifest_dir.path().join(file), text).expect("writing a manifest");
        }
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(format!("weft-{}", node.ns.name()));
        let mut args: Vec<String> = vec![
            format!("--net={}", node.ns.path().display()),
            weft_binary().display().to_string(),
            "--log-format=json".into(),
            "agent".into(),
            format!("--pin-dir={}", pin_dir.display()),
            format!("--manifests={}", manifest_dir.path().display()),
            format!("--pod-subnet={}", node.subnet),
        ];
        if let Some(cidr) = options.cluster_cidr {
            args.push(format!("--cluster-cidr={cidr}"));
        }
        args.extend(options.extra_args.iter().cloned());
        // nsenter, unlike `ip netns exec`, keeps the host's /sys, where bpffs is mounted.
        let mut child = Command::new("nsenter")
            .args(&args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting weft agent");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr is piped");
        let sink = Arc::clone(&logs);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let ready = serde_json::from_str::<serde_json::Value>(&line)
                    .is_ok_and(|v| v.pointer("/fields/message").and_then(|m| m.as_str()) == Some("ready"));
                sink.lock().expect("log sink").push(line);
                if ready {
                    let _ = ready_tx.send(());
                }
            }
        });
        let mut agent = Self {
            child,
            pin_dir,
            manifests: manifest_dir,
            logs,
        };
        if ready_rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let status = agent.child.try_wait().ok().flatten();
            panic!("weft agent did not become ready (exit status {status:?}); its log:\n{}", agent.log());
        }
        agent
    }

    /// Everything the agent logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        self.logs.lock().expect("log sink").join("\n")
    }

    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Writes (or replaces) a manifest file atomically, as a ConfigMap update would.
    pub fn write_manifest(&self, file: &str, text: &str) {
        let staged = self.manifests.path().join(format!(".{file}.tmp"));
        fs::write(&staged, text).expect("staging a manifest");
        fs::rename(&staged, self.manifests.path().join(file)).expect("replacing a manifest");
    }

    /// Deletes a manifest file.
    pub fn remove_manifest(&self, file: &str) {
        fs::remove_file(self.manifests.path().join(file)).expect("removing a manifest");
    }

    /// `weft inspect <table>` against this agent's pins.
    #[must_use]
    pub fn inspect(&self, table: &str) -> String {
        let pin_dir = format!("--pin-dir={}", self.pin_dir.display());
        run(&weft_binary().display().to_string(), &["inspect", table, &pin_dir]).expect("weft inspect")
    }
}

impl Agent {
    /// Stops the agent with SIGTERM (SIGKILL after 5 s) and returns how it exited. Its pins stay
    /// until the agent is dropped.
    pub fn stop(&mut self) -> ExitStatus {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status;
        }
        // nsenter execs the agent, so the child's pid is the agent's.
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        for _ in 0..100 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        self.child.wait().expect("reaping the agent")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        if let Err(e) = fs::remove_dir_all(&self.pin_dir) {
            eprintln!("cleanup: removing {}: {e}", self.pin_dir.display());
        }
    }
}
