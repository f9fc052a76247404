//! Running the node's own tools (`nft`, `iptables-save`, `iptables-restore`), with a script on
//! their standard input where they take one.

use std::{
    io::{self, Write as _},
    process::{Command, Stdio},
};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot run `{program}`")]
    Spawn {
        program: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("`{program}` failed: {stderr}")]
    Failed {
        program: &'static str,
        stderr: String,
    },
}

/// Runs `program` with `args`, `input` on its standard input; its standard output.
pub(crate) fn run(
    program: &'static str,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, CommandError> {
    let spawn = |source| CommandError::Spawn { program, source };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let Some(input) = input {
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(input.as_bytes())
            .map_err(spawn)?;
    }
    let output = child.wait_with_output().map_err(spawn)?;
    if !output.status.success() {
        return Err(CommandError::Failed {
            program,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
