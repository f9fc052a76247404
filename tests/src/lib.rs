//! Shared pieces of weft's privileged test tiers and of the demo: network namespaces
//! ([`netns`]), namespace clusters with real agents ([`cluster`]), pod workloads ([`apps`]), test
//! frames ([`packet`]), a reference model of the packet programs ([`reference`]), test
//! certificates ([`pki`]), the `BPF_PROG_TEST_RUN` harness ([`harness`]), and a test Kubernetes API
//! server ([`apiserver`]). The bench (`tests/bench/`) builds on them.
//!
//! Everything here needs root; tests call [`netns::require_root`] and fail with instructions
//! otherwise.

pub mod apiserver;
pub mod apps;
pub mod capture;
pub mod cluster;
pub mod harness;
pub mod netns;
pub mod overlay;
pub mod overlay_fixture;
pub mod packet;
pub mod pki;
pub mod reference;
pub mod seed;

use std::time::{Duration, Instant};

/// `limit` times `WEFT_TIME_SCALE` (default 1). Waits for something to come about (an agent
/// ready, etcd healthy, a service served) use it: `cargo xtask vm-test` sets it for guests that
/// run emulated, many times slower. Unset (1), every deadline keeps its meaning.
#[must_use]
pub fn scaled(limit: Duration) -> Duration {
    let scale = std::env::var("WEFT_TIME_SCALE")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(1);
    limit * scale.max(1)
}

/// Polls `check` every 20 ms until it holds; panics naming `what` after `limit` (scaled, see
/// [`scaled`]).
pub fn within(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let limit = scaled(limit);
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
