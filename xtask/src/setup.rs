//! `cargo xtask setup`: everything a fresh Debian 12 machine needs to build and test weft,
//! installed idempotently (a second run changes nothing and takes no time):
//! - Debian packages: the `rustc-web` toolchain with its prebuilt BPF `core` (builds the eBPF
//!   crate without nightly), its clippy, LLVM 22 for bpf-linker, and the network tools the tests
//!   and the agent use;
//! - `bpf-linker` 0.13.0 built against LLVM 22 (the LLVM of `rustc-web`);
//! - a BPF filesystem at `/sys/fs/bpf`.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail, ensure};

use crate::{capture, run};

/// Debian packages weft's build, tests and demo need.
const PACKAGES: &[&str] = &[
    // The eBPF toolchain: Debian's rustc 1.96 with LLVM 22 and a prebuilt core for bpfel.
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "rust-web-clippy",
    // bpf-linker links against this LLVM.
    "llvm-22-dev",
    // The etcd client crate compiles its gRPC definitions with protoc.
    "protobuf-compiler",
    "libprotobuf-dev",
    // What the agent runs (nft) and what the tests drive (ip, bridge, nsenter, sysctl, modprobe,
    // bpftool), and the etcd the overlay tests and the demo start.
    "iproute2",
    "nftables",
    "util-linux",
    "procps",
    "kmod",
    "bpftool",
    "etcd-server",
    "etcd-client",
    // The bench's peers: kube-proxy's iptables rules, and iperf3 for throughput; ethtool
    // turns the underlay's offloads off for its MTU-frame case; conntrack empties netfilter's
    // table between connection-rate runs.
    "iptables",
    "iperf3",
    "ethtool",
    "conntrack",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_MAJOR: &str = "22";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";

fn is_installed(package: &str) -> bool {
    capture("dpkg-query", &["-W", "-f=${Status}", package])
        .is_ok_and(|status| status == "install ok installed")
}

fn install_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The eBPF crate needs Debian's rustc 1.96 (LLVM 22); an older `rustc-web` lacks the BPF `core`.
fn check_debian_rustc() -> anyhow::Result<()> {
    let version = capture(DEBIAN_RUSTC, &["-vV"]).context("running Debian's rustc")?;
    ensure!(
        version.contains("release: 1.96")
            && version.contains(&format!("LLVM version: {LLVM_MAJOR}.")),
        "{DEBIAN_RUSTC} is not rustc 1.96 with LLVM {LLVM_MAJOR}:\n{version}\n\
         update the rustc-web package (`apt-get install rustc-web`)"
    );
    Ok(())
}

fn bpf_linker_is_current() -> bool {
    let Ok(version) = capture("bpf-linker", &["--version"]) else {
        return false;
    };
    let Ok(path) = capture("sh", &["-c", "command -v bpf-linker"]) else {
        return false;
    };
    version == format!("bpf-linker {BPF_LINKER_VERSION}")
        && capture("ldd", &[&path])
            .is_ok_and(|libs| libs.contains(&format!("libLLVM.so.{LLVM_MAJOR}")))
}

fn install_bpf_linker() -> anyhow::Result<()> {
    if bpf_linker_is_current() {
        return Ok(());
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (about 2 minutes)"
    );
    run(Command::new("cargo")
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{LLVM_MAJOR}"),
        ])
        // Without it, bpf-linker finds /usr/bin/llvm-config, an older LLVM.
        .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM_MAJOR}")))?;
    ensure!(
        bpf_linker_is_current(),
        "bpf-linker {BPF_LINKER_VERSION} was installed but is not on PATH (add ~/.cargo/bin to PATH)"
    );
    Ok(())
}

/// kubectl, which the namespace tier drives the test API server with: any that is on PATH (a
/// cloud SDK's, kubernetes.io's), else Debian's.
fn install_kubectl() -> anyhow::Result<()> {
    if capture("sh", &["-c", "command -v kubectl"]).is_ok() {
        return Ok(());
    }
    println!("setup: installing kubernetes-client (kubectl)");
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "kubernetes-client",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn mount_bpffs() -> anyhow::Result<()> {
    if capture("mountpoint", &["-q", "/sys/fs/bpf"]).is_ok() {
        return Ok(());
    }
    println!("setup: mounting a BPF filesystem at /sys/fs/bpf");
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

/// Whether the process runs as root (`/proc/self/status` has the effective uid).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// What a setup prepares the machine for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Building only, as in a container image build.
    Build,
    /// Building, testing and running the demo.
    BuildAndRun,
}

/// Installs what is missing; a no-op when everything is there.
pub fn setup(scope: Scope) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "setup installs packages and mounts bpffs, and the tests create network namespaces: run as root"
        );
    }
    ensure!(
        Path::new("/usr/bin/apt-get").exists(),
        "weft's setup expects Debian 12 (apt-get not found)"
    );
    install_packages()?;
    check_debian_rustc()?;
    install_bpf_linker()?;
    if scope == Scope::BuildAndRun {
        install_kubectl()?;
        mount_bpffs()?;
    }
    Ok(())
}
