//! `weft`: an eBPF dataplane for Kubernetes that replaces kube-proxy and flannel's vxlan
//! backend. `weft agent` runs it on a node; `weft inspect` shows what it holds; `weft trace`
//! explains what it does to a flow; `weft cleanup` takes it off the node.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "weft", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the dataplane on this node: load and attach the eBPF programs, keep the maps in step
    /// with the services.
    Agent(Box<cli::agent::AgentArgs>),
    /// Print what the dataplane holds, read from its pinned maps.
    Inspect(cli::inspect::InspectArgs),
    /// Build a flow's first packet and run it through this node's loaded programs on their live
    /// maps: the service it matches, the backend chosen, NAT, mark, encapsulation, or the drop.
    Trace(cli::trace::TraceArgs),
    /// Take weft's dataplane off this node: its programs, pinned maps, nftables table and
    /// overlay route (the agent leaves them in place when it stops). Safe to run twice.
    Cleanup(cli::cleanup::CleanupArgs),
    /// Mount a BPF filesystem and a cgroup v2 hierarchy where the agent expects them, where the
    /// host has not (the DaemonSet's init container). Safe to run twice.
    Mount(cli::mount::MountArgs),
}

fn main() -> ExitCode {
    let Cli {
        log_format,
        command,
    } = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let outcome = match command {
        Command::Agent(args) => {
            limit_malloc_arenas();
            tokio::runtime::Runtime::new()
                .map_err(anyhow::Error::from)
                .and_then(|runtime| runtime.block_on(cli::agent::run(*args)))
        }
        Command::Inspect(args) => cli::inspect::run(&args),
        Command::Trace(args) => cli::trace::run(&args),
        // Before any thread starts: a process with several threads cannot enter a mount
        // namespace.
        Command::Mount(args) => cli::mount::run(&args),
        Command::Cleanup(args) => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(cli::cleanup::run(&args))),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

/// Prints an error and its causes, as `Result`'s `main` would, but with a backtrace only when
/// one is asked of errors (`RUST_LIB_BACKTRACE=1`): a `RUST_BACKTRACE` set for panics in a
/// user's environment should not turn every refused command into a page of frames.
fn report(e: &anyhow::Error) {
    eprintln!("Error: {e}");
    let causes: Vec<String> = e.chain().skip(1).map(ToString::to_string).collect();
    if !causes.is_empty() {
        eprintln!("\nCaused by:");
        for (i, cause) in causes.iter().enumerate() {
            eprintln!("    {i}: {cause}");
        }
    }
    if std::env::var_os("RUST_LIB_BACKTRACE").is_some_and(|value| value != "0") {
        eprintln!("\nStack backtrace:\n{}", e.backtrace());
    }
}

/// Two malloc arenas, not glibc's eight per core: the agent's threads (tokio's workers, the
/// blocking pool) allocate in bursts (a list of every Service and EndpointSlice) and then hold
/// little, and memory freed in an arena of its own stays resident. Measured at 10,000
/// services: 103 MiB resident with the default, 95 MiB with two. Before any thread starts.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: `mallopt` only sets a glibc tunable; called before the runtime starts its threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
