//! `weft mount`, the DaemonSet's init step: a BPF filesystem and a cgroup v2 hierarchy mounted
//! in the namespaces it is pointed at (the host's, in a pod), once however often it runs. A
//! process in mount and cgroup namespaces of its own stands in for the host, so nothing is
//! mounted on the machine running the test.

use std::{
    fs,
    path::Path,
    process::{Child, Command},
    time::Duration,
};

use weft_tests::{cluster::weft_binary, netns::require_root, within};

/// A process in mount and cgroup namespaces of its own; killed on drop.
struct StandIn(Child);

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The file system types mounted at `path` in the mount namespace of `pid`.
fn mounted_at(pid: u32, path: &Path) -> Vec<String> {
    let mountinfo = fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    mountinfo
        .lines()
        .filter_map(|line| {
            let (fields, rest) = line.split_once(" - ")?;
            let mount_point = fields.split_whitespace().nth(4)?;
            (Path::new(mount_point) == path).then(|| rest.split_whitespace().next())?
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn weft_mount_mounts_bpffs_and_cgroup2_in_the_namespaces_it_enters_once() {
    require_root();
    let dir = tempfile::tempdir().expect("a directory");
    let (bpf, cgroup) = (dir.path().join("bpf"), dir.path().join("cgroupv2"));
    let host = StandIn(
        Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--cgroup",
                "sleep",
                "300",
            ])
            .spawn()
            .expect("starting the stand-in host"),
    );
    let pid = host.0.id();
    let ns = |pid: &str, name: &str| fs::read_link(format!("/proc/{pid}/ns/{name}")).ok();
    within(
        Duration::from_secs(5),
        "the stand-in has its own namespaces",
        || {
            let own = pid.to_string();
            ns(&own, "mnt").is_some_and(|mnt| Some(mnt) != ns("self", "mnt"))
                && ns(&own, "cgroup").is_some_and(|cg| Some(cg) != ns("self", "cgroup"))
        },
    );
    for round in 1..=2 {
        let output = Command::new(weft_binary())
            .arg("mount")
            .arg(format!("--bpffs={}", bpf.display()))
            .arg(format!("--cgroup2={}", cgroup.display()))
            .arg(format!("--host-namespaces=/proc/{pid}/ns"))
            .output()
            .expect("running weft mount");
        let log = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "round {round}: {log}");
        assert_eq!(mounted_at(pid, &bpf), ["bpf"], "round {round}");
        assert_eq!(mounted_at(pid, &cgroup), ["cgroup2"], "round {round}");
        if round == 2 {
            assert!(log.contains("mounted already"), "{log}");
        }
    }
    // Nothing reached the namespace weft was started in.
    let own = std::process::id();
    assert!(mounted_at(own, &bpf).is_empty() && mounted_at(own, &cgroup).is_empty());
    drop(host);
}
