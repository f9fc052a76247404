//! The one nftables rule weft needs: masquerade what the datapath marked, exactly as
//! kube-proxy's `KUBE-POSTROUTING` does (clear the mark so a packet that loops back is not
//! masqueraded twice, then `MASQUERADE --random-fully`). It lives in a table of its own.

use std::{
    io::{self, Write as _},
    process::{Command, Stdio},
};

use weft_common::MASQUERADE_MARK;

/// The nftables table weft owns in the node's network namespace.
pub const TABLE: &str = "weft";

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run `nft` (install the nftables package)")]
    Spawn(#[source] io::Error),
    #[error("`nft -f -` refused the ruleset: {stderr}")]
    Refused { stderr: String },
}

/// The ruleset, written so that loading it twice leaves one copy (add, delete, recreate).
#[must_use]
pub fn ruleset() -> String {
    format!(
        "add table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tmeta mark & {MASQUERADE_MARK:#010x} == {MASQUERADE_MARK:#010x} \
         meta mark set meta mark & {clear:#010x} masquerade fully-random\n\
         \t}}\n\
         }}\n",
        clear = !MASQUERADE_MARK,
    )
}

fn nft(script: &str) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .map_err(NftError::Spawn)?;
    let output = child.wait_with_output().map_err(NftError::Spawn)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NftError::Refused {
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Installs (or replaces) the masquerade table.
pub fn install() -> Result<(), NftError> {
    nft(&ruleset())
}

/// Removes the masquerade table; succeeds when it is already gone.
pub fn remove() -> Result<(), NftError> {
    nft(&format!("add table ip {TABLE}\ndelete table ip {TABLE}\n"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_rule_matches_and_clears_kube_proxys_mark() {
        let rules = super::ruleset();
        assert!(rules.contains(
            "meta mark & 0x00004000 == 0x00004000 meta mark set meta mark & 0xffffbfff masquerade fully-random"
        ), "{rules}");
        assert!(rules.contains("type nat hook postrouting priority srcnat"));
    }
}
