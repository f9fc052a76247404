//! The `weft` binary's subcommands.

pub mod agent;
pub mod cleanup;
pub mod inspect;
pub mod mount;
pub mod trace;
