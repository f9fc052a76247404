//! Empty on purpose: this library target exists only so the agent can name this crate as a
//! build-dependency, which makes cargo rebuild the agent (and so the eBPF object) when the
//! programs change. The programs are the `weft-dataplane` binary, built for `bpfel-unknown-none`.
#![no_std]
