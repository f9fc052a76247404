//! Shared pieces of weft's privileged test tiers and of the demo: network namespaces
//! ([`netns`]), namespace clusters with real agents ([`cluster`]), pod workloads ([`apps`]), test
//! frames ([`packet`]) and the `BPF_PROG_TEST_RUN` harness ([`harness`]).
//!
//! Everything here needs root; tests call [`netns::require_root`] and fail with instructions
//! otherwise.

pub mod apps;
pub mod capture;
pub mod cluster;
pub mod harness;
pub mod netns;
pub mod overlay;
pub mod packet;
pub mod seed;
