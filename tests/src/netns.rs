//! Network namespaces for test nodes and pods: unique names, commands run inside them, code
//! run inside them on a thread, and removal on drop (also when a test fails).

use std::{
    fs::File,
    io,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    thread,
};

use nix::sched::{CloneFlags, setns};

/// Panics with instructions unless the process runs as root (namespaces, BPF, nftables).
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (network namespaces, BPF programs, nftables): run `cargo xtask test`"
    );
}

/// A name no other test of any concurrent run uses: `{prefix}{pid}x{counter}`.
#[must_use]
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command; an error carries the command line and its stderr.
pub fn run(program: &str, args: &[&str]) -> io::Result<String> {
    let output = Command::new(program).args(args).output()?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// An interface's counters, as `ip -s link` shows them (a GSO packet counts once).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Dropped on receive and on transmit.
    pub dropped: u64,
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace with its loopback up.
    pub fn create(name: &str) -> io::Result<Self> {
        run("ip", &["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's file, for `setns` and `nsenter --net=`.
    #[must_use]
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Leaves the namespace in place when this value goes away (the demo's `--keep`).
    pub fn keep(self) {
        std::mem::forget(self);
    }

    /// Runs `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Creates a veth pair: `name` here, `peer_name` in `peer`.
    pub fn add_veth(&self, name: &str, peer: &Self, peer_name: &str) -> io::Result<String> {
        self.ip(&[
            "link",
            "add",
            "name",
            name,
            "type",
            "veth",
            "peer",
            "name",
            peer_name,
            "netns",
            peer.name(),
        ])
    }

    /// Runs any command inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> io::Result<String> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// The `ip -s` counters of `interface` in the namespace.
    pub fn link_stats(&self, interface: &str) -> io::Result<LinkStats> {
        let json = self.ip(&["-j", "-s", "link", "show", "dev", interface])?;
        let links: serde_json::Value = serde_json::from_str(&json).map_err(io::Error::other)?;
        let stats = &links[0]["stats64"];
        let field = |dir: &str, name: &str| {
            stats[dir][name].as_u64().ok_or_else(|| {
                io::Error::other(format!("no {dir} {name} for {interface} in {json}"))
            })
        };
        Ok(LinkStats {
            rx_packets: field("rx", "packets")?,
            tx_packets: field("tx", "packets")?,
            tx_bytes: field("tx", "bytes")?,
            dropped: field("rx", "dropped")? + field("tx", "dropped")?,
        })
    }

    /// Moves the calling thread into the namespace. Sockets it creates afterwards belong there.
    pub fn enter(&self) -> io::Result<()> {
        let file = File::open(self.path())?;
        setns(file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
    }

    /// Runs `f` on a thread inside the namespace and returns its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.enter().expect("entering the test namespace");
                    f()
                })
                .join()
                .expect("the thread inside the namespace panicked")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Interfaces inside go with it; a failure leaves a name the next run does not reuse.
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}
