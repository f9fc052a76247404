//! `cargo xtask`: weft's project commands. Each one first runs `setup`, so on a fresh machine
//! the two commands README starts with do everything.
//!
//! - `cargo xtask setup`: install the toolchain and tools (idempotent).
//! - `cargo xtask test [host|prog|netns|vm]...`: formatting, lints (host and eBPF), and every
//!   test tier (or the tiers named).
//! - `cargo xtask demo [--keep | --clean]`: the seed's example on a node made of network
//!   namespaces.
//! - `cargo xtask bench [--quick]`: weft against kube-proxy and flannel's kernel VXLAN, side by
//!   side, into `docs/benchmarks.md`.
//! - `cargo xtask upgrade-object`: another build of the eBPF programs, for the upgrade test.
//! - `cargo xtask vm-test [--kernel SERIES]... [--all]`: the fixture tier and a namespace test
//!   on other kernels, under QEMU.

mod setup;
mod vm;

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "weft's build, test and demo commands")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing weft needs (Debian packages, bpf-linker, bpffs).
    Setup {
        /// Only what building needs: no BPF filesystem (an image build has none to mount).
        #[arg(long)]
        build_only: bool,
    },
    /// Check formatting and lints, then run every test tier (unit, BPF_PROG_TEST_RUN,
    /// namespaces, kernels under QEMU), or only the tiers named.
    Test {
        /// The tiers to run, in their order whatever the order given (default: all, as CI).
        #[arg(value_enum)]
        tiers: Vec<Tier>,
    },
    /// Build a node out of network namespaces and serve the seed's nginx Service on it.
    Demo {
        /// Leave the demo running and print how to clean it up.
        #[arg(long)]
        keep: bool,
        /// Remove a demo left running with --keep.
        #[arg(long, conflicts_with = "keep")]
        clean: bool,
    },
    /// Measure weft against kube-proxy (iptables, nftables) and the kernel's VXLAN, side by side;
    /// writes docs/benchmarks.md and its plot.
    Bench {
        /// A two-minute version (smaller scales, shorter runs), written to target/bench/.
        #[arg(long)]
        quick: bool,
    },
    /// Build the eBPF programs a second way (for another BPF CPU), for the test that
    /// upgrades agents under traffic; prints the object's path.
    UpgradeObject,
    /// Boot Debian kernels under QEMU and run the BPF_PROG_TEST_RUN fixtures and a namespace
    /// test in each (default: the oldest and the newest supported).
    VmTest {
        /// A kernel series ("5.10", "6.1", "6.12", ...) or "newest"; repeatable.
        #[arg(long = "kernel", value_name = "SERIES")]
        kernels: Vec<String>,
        /// Every supported kernel: 5.10, 6.1, 6.12 and the newest Debian has.
        #[arg(long, conflicts_with = "kernels")]
        all: bool,
        /// Run only this test module in each guest (run, run_overlay, fuzz, kernel, ...);
        /// repeatable.
        #[arg(long = "test", value_name = "NAME")]
        tests: Vec<String>,
    },
}

/// A test tier: what it needs grows from one to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
enum Tier {
    /// Formatting, clippy (host and eBPF), and the unit tests: no privilege needed.
    Host,
    /// The BPF_PROG_TEST_RUN fixture tables and the differential fuzzer (`tests/tests/prog/`):
    /// root and BPF.
    Prog,
    /// Network-namespace clusters, the deploy manifests and the bench as a smoke test
    /// (`tests/tests/netns/`): root, BPF, namespaces, etcd.
    Netns,
    /// The fixtures and a namespace test on the oldest and the newest kernel, under QEMU.
    Vm,
}

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Runs a command, echoing it, and fails if it fails.
pub(crate) fn run(command: &mut Command) -> anyhow::Result<()> {
    println!("$ {}", describe(command));
    let status = command
        .status()
        .with_context(|| format!("starting {}", describe(command)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(command));
    }
    Ok(())
}

/// Runs a command quietly and returns its trimmed stdout, or an error if it fails.
pub(crate) fn capture(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program).args(args).output()?;
    if !output.status.success() {
        bail!("{program} {} failed", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `cargo` in the workspace root, as the one that runs xtask.
fn cargo() -> Command {
    let mut command = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root());
    command
}

fn test(mut tiers: Vec<Tier>) -> anyhow::Result<()> {
    setup::setup(setup::Scope::BuildAndRun)?;
    if tiers.is_empty() {
        tiers = vec![Tier::Host, Tier::Prog, Tier::Netns, Tier::Vm];
    }
    tiers.sort_unstable();
    tiers.dedup();
    for tier in tiers {
        println!("== cargo xtask test: the {tier:?} tier");
        match tier {
            Tier::Host => host_tier()?,
            Tier::Prog => run(cargo().args(["test", "--workspace", "--locked", "--test", "prog"]))?,
            Tier::Netns => netns_tier()?,
            Tier::Vm => vm::vm_test(&series(vm::TEST_KERNELS), &[])?,
        }
    }
    Ok(())
}

fn host_tier() -> anyhow::Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The eBPF programs only exist for the BPF target; lint them with the toolchain that builds them.
    run(Command::new("rustup")
        .current_dir(root())
        .args([
            "run",
            "/usr",
            "cargo",
            "clippy",
            "-p",
            "weft-dataplane-ebpf",
            "--release",
        ])
        .args([
            "--target",
            "bpfel-unknown-none",
            "--locked",
            "--",
            "-D",
            "warnings",
        ])
        .env("RUSTC_BOOTSTRAP", "aya_ebpf"))?;
    // Workspace-wide (the same features as the other tiers, so nothing is built twice), the
    // privileged crate's integration tests left to their tiers.
    run(cargo().args(["test", "--workspace", "--lib", "--bins", "--locked"]))?;
    run(cargo().args(["test", "--workspace", "--doc", "--locked"]))
}

fn netns_tier() -> anyhow::Result<()> {
    // The namespace tests start the `weft` binary, which `cargo test` alone does not build.
    run(cargo().args(["build", "--workspace", "--bins", "--locked"]))?;
    let upgrade = upgrade_object()?;
    // One test at a time: each runs real agents (debug builds), etcd and traffic, and some bound
    // how soon something must happen (a watch resumed 15 s after etcd is back); beside a 128 MiB
    // transfer on two cores, such a bound would measure the neighbour.
    let one_at_a_time = ["--", "--test-threads=1"];
    run(cargo()
        .args(["test", "--workspace", "--locked", "--test", "netns"])
        .args(one_at_a_time)
        .env("WEFT_BIN", root().join("target/debug/weft"))
        .env("WEFT_UPGRADE_OBJECT", upgrade))?;
    // The sig-network e2e set again with pods' service traffic translated per packet, as nodes
    // with `--socket-lb=host-only` (service meshes) run it; the agents read the variable.
    run(cargo()
        .args(["test", "--workspace", "--locked", "--test", "netns"])
        .args(one_at_a_time)
        .arg("e2e::")
        .env("WEFT_BIN", root().join("target/debug/weft"))
        .env("WEFT_SOCKET_LB", "host-only"))?;
    // The bench's quick run as a smoke test (debug builds, already built; no figure is judged).
    run_bench("debug", &root().join("target/bench/smoke.md"), true)
}

fn series(kernels: &[&str]) -> Vec<String> {
    kernels.iter().map(|&k| k.to_owned()).collect()
}

/// Builds the eBPF crate as `agent/build.rs` does through aya-build (same toolchain, target
/// and flags), but for BPF CPU v2 (the `<`/`<=` jumps, Linux 4.14+) rather than the generic CPU,
/// into a target directory of its own: a different build of the same programs, the packet
/// programs' instruction streams changed (the four small socket hooks compile the same either
/// way). v3 is not used: LLVM 22 emits a read of a call-clobbered register in `tc_from_pods` for
/// it, which the verifier rejects. Returns the object.
fn upgrade_object() -> anyhow::Result<PathBuf> {
    let target_dir = root().join("target/upgrade-object");
    let rustflags = [
        &format!("--cfg=bpf_target_arch=\"{}\"", env::consts::ARCH),
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
        "-Ctarget-cpu=v2",
    ]
    .join("\x1f");
    run(Command::new("rustup")
        .current_dir(root())
        .args(["run", "/usr", "cargo", "build", "-p", "weft-dataplane-ebpf"])
        .args([
            "--bins",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "--locked",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC_BOOTSTRAP", "aya_ebpf")
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags))?;
    Ok(target_dir.join("bpfel-unknown-none/release/weft-dataplane"))
}

/// Builds the agent and the bench in release and runs the bench.
fn bench(quick: bool) -> anyhow::Result<()> {
    setup::setup(setup::Scope::BuildAndRun)?;
    build_agent_and_tools(true)?;
    let out = if quick {
        root().join("target/bench/quick.md")
    } else {
        root().join("docs/benchmarks.md")
    };
    run_bench("release", &out, quick)
}

/// Builds the agent, the demo and the bench (with its load generator), in release or debug.
fn build_agent_and_tools(release: bool) -> anyhow::Result<()> {
    let mut build = cargo();
    build.arg("build");
    if release {
        build.arg("--release");
    }
    run(build.args([
        "-p",
        "weft",
        "-p",
        "weft-tests",
        "-p",
        "weft-bench",
        "--bins",
        "--locked",
    ]))
}

/// Runs the bench binary of `profile` (already built) into `out`.
fn run_bench(profile: &str, out: &Path, quick: bool) -> anyhow::Result<()> {
    let dir = out.parent().context("the report's directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut bench = Command::new(root().join("target").join(profile).join("weft-bench"));
    bench
        .current_dir(root())
        .env("WEFT_BIN", root().join("target").join(profile).join("weft"))
        .arg("--out")
        .arg(out);
    if quick {
        bench.arg("--quick");
    }
    run(&mut bench)
}

fn demo(keep: bool, clean: bool) -> anyhow::Result<()> {
    setup::setup(setup::Scope::BuildAndRun)?;
    build_agent_and_tools(false)?;
    let mut demo = Command::new(root().join("target/debug/weft-demo"));
    demo.env("WEFT_BIN", root().join("target/debug/weft"));
    if keep {
        demo.arg("--keep");
    }
    if clean {
        demo.arg("--clean");
    }
    run(&mut demo)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup { build_only } => setup::setup(if build_only {
            setup::Scope::Build
        } else {
            setup::Scope::BuildAndRun
        }),
        Task::Test { tiers } => test(tiers),
        Task::Demo { keep, clean } => demo(keep, clean),
        Task::Bench { quick } => bench(quick),
        Task::VmTest {
            kernels,
            all,
            tests,
        } => {
            setup::setup(setup::Scope::BuildAndRun)?;
            vm::vm_test(
                &if all {
                    series(vm::ALL_KERNELS)
                } else if kernels.is_empty() {
                    series(vm::TEST_KERNELS)
                } else {
                    kernels
                },
                &tests,
            )
        }
        Task::UpgradeObject => {
            setup::setup(setup::Scope::Build)?;
            println!("{}", upgrade_object()?.display());
            Ok(())
        }
    }
}
