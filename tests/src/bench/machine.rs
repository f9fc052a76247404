//! CPU time from `/proc`: the whole machine's and one process's.

use std::fs;

use anyhow::Context as _;

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
