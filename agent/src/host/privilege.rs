//! The capabilities the agent needs, checked before it touches anything, so a missing one is
//! named up front rather than surfacing as an EPERM from deep inside a load or a netlink call.

use std::io;

/// Capability numbers (`linux/capability.h`).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What the agent needs (and `deploy/base/daemonset.yaml` grants): BPF to load programs and maps,
/// NET_ADMIN to attach them and change links, routes and nftables, PERFMON for the verifier to
/// accept packet-pointer arithmetic. Kernels before 5.8 have neither BPF nor PERFMON; SYS_ADMIN
/// stands in for both there.
const NEEDED: [(u32, &str); 3] = [
    (CAP_BPF, "CAP_BPF"),
    (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    (CAP_PERFMON, "CAP_PERFMON"),
];

/// The needed capabilities missing from the effective set `effective` (a bit per capability).
#[must_use]
pub fn missing(effective: u64) -> Vec<&'static str> {
    let has = |cap: u32| effective & (1 << cap) != 0;
    // SYS_ADMIN covers BPF and PERFMON, never NET_ADMIN.
    let covered = |cap: u32| has(cap) || (cap != CAP_NET_ADMIN && has(CAP_SYS_ADMIN));
    NEEDED
        .iter()
        .filter(|(cap, _)| !covered(*cap))
        .map(|(_, name)| *name)
        .collect()
}

/// Whether `effective` lets the agent enter pods' network namespaces (`setns` needs
/// CAP_SYS_ADMIN), to find them for socket load balancing. Without it, weft runs, and pods'
/// service traffic is translated per packet.
#[must_use]
pub fn can_enter_namespaces(effective: u64) -> bool {
    effective & (1 << CAP_SYS_ADMIN) != 0
}

/// This process's effective capability set, from `/proc/self/status`.
pub fn effective() -> io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| io::Error::other("no CapEff line in /proc/self/status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_THREE: u64 = 1 << CAP_BPF | 1 << CAP_NET_ADMIN | 1 << CAP_PERFMON;

    #[test]
    fn the_three_or_sys_admin_with_net_admin_suffice() {
        assert!(missing(ALL_THREE).is_empty());
        assert!(missing(u64::MAX).is_empty(), "root");
        assert!(missing(1 << CAP_SYS_ADMIN | 1 << CAP_NET_ADMIN).is_empty());
        assert_eq!(missing(ALL_THREE & !(1 << CAP_PERFMON)), ["CAP_PERFMON"]);
        assert_eq!(missing(1 << CAP_SYS_ADMIN), ["CAP_NET_ADMIN"]);
        assert_eq!(missing(0), ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]);
    }

    #[test]
    fn this_process_has_an_effective_set() {
        effective().expect("CapEff is readable");
    }
}
