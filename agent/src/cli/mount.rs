//! `weft mount`: the file systems the agent needs, mounted where it expects them when the host
//! has not mounted them (the DaemonSet's init container, as Cilium's `mount-bpf-fs` and
//! `mount-cgroup` are): a BPF filesystem for the pins, and a cgroup v2 hierarchy for the socket
//! hooks. With `--host-namespaces` it first enters the host's mount and cgroup namespaces
//! (`/hostproc/1/ns`, the host's /proc mounted in the pod), so the mounts are the host's and
//! outlive the pod, and the cgroup hierarchy's root is the host's, not the container's.

use std::{fs, path::PathBuf};

use anyhow::Context as _;
use nix::{
    mount::{MsFlags, mount},
    sched::{CloneFlags, setns},
    sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, FsType, statfs},
};
use tracing::info;

#[derive(clap::Args)]
pub struct MountArgs {
    /// Where the BPF filesystem goes (the agent's pins are under it).
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// Where a cgroup v2 hierarchy goes (the agent's --cgroup).
    #[arg(long, default_value = "/run/weft/cgroupv2")]
    cgroup2: PathBuf,
    /// A namespace directory (`/proc/<pid>/ns`) whose mount and cgroup namespaces are entered
    /// first: the host's init's, `/hostproc/1/ns`, in a pod that mounts the host's /proc at
    /// /hostproc.
    #[arg(long)]
    host_namespaces: Option<PathBuf>,
}

/// A file system the agent needs.
struct Needed {
    what: &'static str,
    fs_type: &'static str,
    magic: FsType,
}

const BPF: Needed = Needed {
    what: "a BPF filesystem",
    fs_type: "bpf",
    magic: BPF_FS_MAGIC,
};
const CGROUP2: Needed = Needed {
    what: "a cgroup v2 hierarchy",
    fs_type: "cgroup2",
    magic: CGROUP2_SUPER_MAGIC,
};

pub fn run(args: &MountArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.host_namespaces {
        // Both opened before either is entered: the mount namespace changes what paths mean.
        let open = |name: &str| {
            let path = dir.join(name);
            fs::File::open(&path).with_context(|| {
                format!(
                    "opening {} (mount the host's /proc in the pod, e.g. at /hostproc, and pass \
                     --host-namespaces=/hostproc/1/ns)",
                    path.display()
                )
            })
        };
        let (cgroup, mnt) = (open("cgroup")?, open("mnt")?);
        setns(cgroup, CloneFlags::CLONE_NEWCGROUP)
            .context("entering the host's cgroup namespace (needs a privileged container)")?;
        setns(mnt, CloneFlags::CLONE_NEWNS)
            .context("entering the host's mount namespace (needs a privileged container)")?;
    }
    mount_once(&args.bpffs, &BPF)?;
    mount_once(&args.cgroup2, &CGROUP2)
}

/// Mounts `needed` at `path` unless it is mounted there already.
fn mount_once(path: &PathBuf, needed: &Needed) -> anyhow::Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    let current =
        statfs(path).with_context(|| format!("reading {}'s file system", path.display()))?;
    if current.filesystem_type() == needed.magic {
        info!(path = %path.display(), "{} is mounted already", needed.what);
        return Ok(());
    }
    mount(
        Some(needed.fs_type),
        path,
        Some(needed.fs_type),
        MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting {} at {}", needed.what, path.display()))?;
    info!(path = %path.display(), "mounted {}", needed.what);
    Ok(())
}
