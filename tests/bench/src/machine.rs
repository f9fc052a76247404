//! Counters from `/proc`: CPU time (the whole machine's and one process's), and a network
//! namespace's TCP and netfilter conntrack counters (what `nstat` and `conntrack -S` print).

use std::{collections::BTreeMap, fs};

use anyhow::Context as _;

use weft_tests::netns::Netns;

/// Clock ticks per second, the unit of /proc's CPU times.
#[must_use]
pub fn ticks_per_second() -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "a small constant")]
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |ticks| ticks as f64)
}

/// The process's user + system CPU time, in clock ticks.
pub fn process_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("a /proc/PID/stat line")?
        .1
        .split_whitespace()
        .collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// Busy CPU time of the whole machine (all CPUs), in clock ticks, from /proc/stat.
pub fn busy_ticks() -> anyhow::Result<u64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("/proc/stat")?;
    let values: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal ...: all but idle and iowait.
    Ok(values.iter().sum::<u64>() - values[3] - values[4])
}

/// Named counters, summed where a file has one row per CPU.
pub type Counters = BTreeMap<String, u64>;

/// `after - before`, counter by counter (a counter missing before counts from 0).
#[must_use]
pub fn increase(before: &Counters, after: &Counters) -> Counters {
    after
        .iter()
        .map(|(name, value)| {
            let base = before.get(name).copied().unwrap_or(0);
            (name.clone(), value.saturating_sub(base))
        })
        .collect()
}

/// The `TcpExt` counters of `ns` (`nstat`'s `TcpExtListenOverflows`, `TcpExtTCPSynRetrans`...).
pub fn tcp_counters(ns: &Netns) -> anyhow::Result<Counters> {
    let text = ns.run(|| fs::read_to_string("/proc/thread-self/net/netstat"))?;
    Ok(tcp_ext(&text))
}

fn tcp_ext(netstat: &str) -> Counters {
    let rows: Vec<&str> = netstat
        .lines()
        .filter(|l| l.starts_with("TcpExt:"))
        .collect();
    let [names, values] = rows.as_slice() else {
        return Counters::new();
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .filter_map(|(name, value)| Some((name.to_owned(), value.parse().ok()?)))
        .collect()
}

/// The netfilter conntrack statistics of `ns` (what `conntrack -S` prints), summed over the
/// CPUs; empty where conntrack has never run.
pub fn conntrack_counters(ns: &Netns) -> Counters {
    ns.run(|| fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack"))
        .map(|text| per_cpu_hex(&text))
        .unwrap_or_default()
}

/// A `/proc/net/stat` file: a header of names, then a row of hex values per CPU.
fn per_cpu_hex(text: &str) -> Counters {
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return Counters::new();
    };
    let names: Vec<&str> = header.split_whitespace().collect();
    let mut sums = Counters::new();
    for line in lines {
        for (name, value) in names.iter().zip(line.split_whitespace()) {
            // The live entry count is the same global figure on every row.
            if *name == "entries" {
                continue;
            }
            if let Ok(value) = u64::from_str_radix(value, 16) {
                *sums.entry((*name).to_owned()).or_default() += value;
            }
        }
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_ext_pairs_names_with_values() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows TCPSynRetrans\n\
                       TcpExt: 0 3 7\n\
                       IpExt: InNoRoutes\nIpExt: 1\n";
        let counters = tcp_ext(netstat);
        assert_eq!(counters.get("ListenOverflows"), Some(&3));
        assert_eq!(counters.get("TCPSynRetrans"), Some(&7));
        assert_eq!(counters.get("InNoRoutes"), None);
    }

    #[test]
    fn per_cpu_rows_are_summed_and_increases_taken() {
        let before = per_cpu_hex(
            "entries clashres found drop\n0000000a 00000000 00000001 00000002\n0000000a 00000000 00000001 0000000f\n",
        );
        assert_eq!(before.get("drop"), Some(&17));
        assert_eq!(before.get("entries"), None);
        let after = per_cpu_hex(
            "entries clashres found drop\n0000000a 00000000 00000003 00000002\n0000000a 00000000 00000001 00000010\n",
        );
        let grown = increase(&before, &after);
        assert_eq!(grown.get("found"), Some(&2));
        assert_eq!(grown.get("drop"), Some(&1));
    }
}
