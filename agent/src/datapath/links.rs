//! Program attachments pinned on bpffs, as `<pin dir>/links/<program>@<target>`. A pinned link
//! keeps its program attached while no agent runs (a crash, a restart, an upgrade), and the next
//! agent swaps its own program in with `BPF_LINK_UPDATE`, atomically, rather than detaching and
//! attaching again, which would let packets through untranslated in between.

use std::{
    collections::BTreeSet,
    io,
    os::fd::BorrowedFd,
    path::{Path, PathBuf},
};

use aya::programs::links::FdLink;

use crate::host::sys;

/// The directory under the pin directory that holds the link pins.
pub const LINKS_DIR: &str = "links";

#[derive(Debug, thiserror::Error)]
pub enum LinkPinError {
    #[error("cannot create the link pin directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot pin the attachment as {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("cannot remove the attachment pin {path}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The pin name of `program` attached to `target` (an ifindex, or a cgroup).
#[must_use]
pub fn pin_name(program: &str, target: &str) -> String {
    format!("{program}@{target}")
}

/// The link pins of one pin directory, and which of them this agent placed or took over.
pub struct LinkPins {
    dir: PathBuf,
    placed: BTreeSet<String>,
}

impl LinkPins {
    /// Opens (creating, root-only) `<pin_dir>/links`.
    pub fn open(pin_dir: &Path) -> Result<Self, LinkPinError> {
        let dir = pin_dir.join(LINKS_DIR);
        crate::datapath::maps::create_pin_dir(&dir).map_err(|source| LinkPinError::Dir {
            path: dir.clone(),
            source,
        })?;
        Ok(Self {
            dir,
            placed: BTreeSet::new(),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Swaps `program` into the attachment pinned as `name`. Returns `false`, having removed
    /// the pin, when there is none that still attaches anything this program can take (its
    /// device or cgroup is gone, or it holds another kind of program): the caller attaches anew
    /// and pins the result with [`LinkPins::pin`].
    pub fn swap(&mut self, name: &str, program: BorrowedFd<'_>) -> Result<bool, LinkPinError> {
        let path = self.path(name);
        let swapped = sys::bpf_obj_get(&path)
            .and_then(|link| sys::bpf_link_update(std::os::fd::AsFd::as_fd(&link), program));
        match swapped {
            Ok(()) => {
                self.placed.insert(name.to_owned());
                return Ok(true);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            // The device or cgroup the link was attached to is gone.
            Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {}
            Err(e) => tracing::warn!(
                pin = %path.display(),
                "cannot swap the new program into the pinned attachment ({e}); attaching anew"
            ),
        }
        self.remove(name)?;
        Ok(false)
    }

    /// Pins a new attachment as `name`; from now on it outlives the agent.
    pub fn pin(&mut self, name: &str, link: FdLink) -> Result<(), LinkPinError> {
        let path = self.path(name);
        // Dropping the pinned handle only closes this process's fd; the pin holds the link.
        link.pin(&path)
            .map_err(|source| LinkPinError::Pin { path, source })?;
        self.placed.insert(name.to_owned());
        Ok(())
    }

    /// Whether an attachment is pinned as `name`.
    #[must_use]
    pub fn is_pinned(&self, name: &str) -> bool {
        self.path(name).exists()
    }

    /// Removes the pin `name`, which detaches its program unless something else holds the link.
    pub fn remove(&mut self, name: &str) -> Result<(), LinkPinError> {
        self.placed.remove(name);
        remove_pin(&self.path(name))
    }

    /// Removes the pins this agent neither placed nor took over: attachments to devices that
    /// went away while no agent ran, or that this configuration no longer wants. Returns their
    /// names.
    pub fn prune(&mut self) -> Result<Vec<String>, LinkPinError> {
        let stale: Vec<String> = crate::datapath::maps::pin_names(&self.dir)
            .into_iter()
            .filter(|name| !self.placed.contains(name))
            .collect();
        for name in &stale {
            remove_pin(&self.path(name))?;
        }
        Ok(stale)
    }
}

fn remove_pin(path: &Path) -> Result<(), LinkPinError> {
    crate::datapath::maps::remove_pin(path).map_err(|source| LinkPinError::Unpin {
        path: path.to_owned(),
        source,
    })
}

/// Removes every link pin under `pin_dir` (detaching their programs) and the links directory;
/// returns the names removed. Nothing there is no error.
pub fn remove_all(pin_dir: &Path) -> Result<Vec<String>, LinkPinError> {
    let dir = pin_dir.join(LINKS_DIR);
    crate::datapath::maps::remove_pin_dir(&dir)
        .map_err(|source| LinkPinError::Unpin { path: dir, source })
}
