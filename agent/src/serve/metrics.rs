//! Prometheus metrics on `--metrics-bind-address` (`/metrics`), in the text exposition format:
//! the reconcile pass duration (kube-proxy's `sync_proxy_rules_duration_seconds`), what is
//! programmed, map pressure, entries that did not fit, and the datapath's drop counters by
//! reason (read from the pinned per-CPU map at scrape time).

use std::{
    fmt::Write as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use weft_common::maps::{CONNTRACK_MAP, ENDPOINTS_MAP, SERVICES_MAP};

use crate::{
    datapath::loader::MapLimits,
    datapath::maps::PinnedMaps,
    reconcile::Programmed,
    serve::http::{self, Reply},
};

/// Histogram bucket bounds in seconds: 1 ms doubling to 16 s, as kube-proxy's.
const BUCKETS: [f64; 15] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192, 16.384,
];

#[derive(Debug, Default)]
struct Values {
    /// Cumulative counts per bucket, then the sum and count of all observations.
    pass_buckets: [u64; BUCKETS.len()],
    pass_sum: f64,
    pass_count: u64,
    last_pass_unix: f64,
    programmed: Programmed,
    not_programmed: usize,
    conntrack_entries: Option<usize>,
}

/// The agent's metrics, updated by the reconciler and the conntrack collector.
#[derive(Debug)]
pub struct Metrics {
    values: Mutex<Values>,
    limits: MapLimits,
    pin_dir: PathBuf,
}

impl Metrics {
    #[must_use]
    pub fn new(limits: MapLimits, pin_dir: PathBuf) -> Self {
        Self {
            values: Mutex::default(),
            limits,
            pin_dir,
        }
    }

    fn values(&self) -> std::sync::MutexGuard<'_, Values> {
        self.values.lock().expect("metrics lock is never poisoned")
    }

    /// Records one reconcile pass.
    pub fn pass(&self, took: Duration, programmed: Programmed, not_programmed: usize) {
        let seconds = took.as_secs_f64();
        let mut values = self.values();
        for (count, bound) in values.pass_buckets.iter_mut().zip(BUCKETS) {
            if seconds <= bound {
                *count += 1;
            }
        }
        values.pass_sum += seconds;
        values.pass_count += 1;
        values.last_pass_unix = jiff::Timestamp::now().as_millisecond() as f64 / 1000.0;
        values.programmed = programmed;
        values.not_programmed = not_programmed;
    }

    /// Records the conntrack table's size, as the last sweep counted it.
    pub fn conntrack_entries(&self, entries: usize) {
        self.values().conntrack_entries = Some(entries);
    }

    /// The exposition text.
    #[must_use]
    pub fn render(&self) -> String {
        let values = self.values();
        let mut out = String::new();
        header(
            &mut out,
            "weft_sync_proxy_rules_duration_seconds",
            "histogram",
            "How long one reconcile pass took to bring the maps to the desired state.",
        );
        for (count, bound) in values.pass_buckets.iter().zip(BUCKETS) {
            let _ = writeln!(
                out,
                "weft_sync_proxy_rules_duration_seconds_bucket{{le=\"{bound}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "weft_sync_proxy_rules_duration_seconds_bucket{{le=\"+Inf\"}} {count}\n\
             weft_sync_proxy_rules_duration_seconds_sum {sum}\n\
             weft_sync_proxy_rules_duration_seconds_count {count}",
            count = values.pass_count,
            sum = values.pass_sum
        );
        let gauges = [
            (
                "weft_sync_proxy_rules_last_timestamp_seconds",
                "When the last reconcile pass ended (Unix time).",
                values.last_pass_unix,
            ),
            (
                "weft_programmed_service_ports",
                "Service ports in the maps.",
                values.programmed.service_ports as f64,
            ),
            (
                "weft_programmed_frontends",
                "Frontends (ClusterIP, NodePort, external and load-balancer address, port, protocol) in the maps.",
                values.programmed.frontends as f64,
            ),
            (
                "weft_programmed_endpoints",
                "Endpoint slots in the maps, over every endpoint set.",
                values.programmed.endpoint_slots as f64,
            ),
            (
                "weft_not_programmed_entries",
                "Service ports and overlay entries the maps refused (full); retried.",
                values.not_programmed as f64,
            ),
        ];
        for (name, help, value) in gauges {
            header(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {value}");
        }
        header(
            &mut out,
            "weft_map_entries",
            "gauge",
            "Entries in a map (conntrack: as of the last sweep).",
        );
        let mut pressure = vec![
            (SERVICES_MAP.spec, values.programmed.frontends),
            (ENDPOINTS_MAP.spec, values.programmed.endpoint_slots),
        ];
        if let Some(entries) = values.conntrack_entries {
            pressure.push((CONNTRACK_MAP.spec, entries));
        }
        for (map, entries) in &pressure {
            let name = map.name;
            let _ = writeln!(out, "weft_map_entries{{map=\"{name}\"}} {entries}");
        }
        header(
            &mut out,
            "weft_map_capacity",
            "gauge",
            "How many entries a map holds at most.",
        );
        for (map, _) in &pressure {
            let (name, capacity) = (map.name, self.limits.entries(map.capacity));
            let _ = writeln!(out, "weft_map_capacity{{map=\"{name}\"}} {capacity}");
        }
        drop(values);
        header(
            &mut out,
            "weft_drops_total",
            "counter",
            "Packets the datapath dropped, by reason (rejected connections count as no_endpoints).",
        );
        match PinnedMaps::new(&self.pin_dir).drop_counts() {
            Ok(drops) => {
                for (reason, packets) in drops {
                    let _ = writeln!(
                        out,
                        "weft_drops_total{{reason=\"{}\"}} {packets}",
                        reason.name()
                    );
                }
            }
            Err(e) => tracing::warn!("reading the drop counters for /metrics: {e}"),
        }
        out
    }
}

/// A metric's `HELP` and `TYPE` lines.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The `/metrics` handler.
#[must_use]
pub fn handler(metrics: Arc<Metrics>) -> http::Handler {
    Arc::new(move |path| match path {
        "/metrics" => Reply::text(200, "text/plain; version=0.0.4", metrics.render()),
        _ => Reply::not_found(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_lands_in_its_bucket_and_every_larger_one() {
        let metrics = Metrics::new(MapLimits::default(), PathBuf::from("/nonexistent"));
        metrics.pass(
            Duration::from_millis(3),
            Programmed {
                service_ports: 2,
                frontends: 3,
                endpoint_slots: 6,
            },
            1,
        );
        let text = metrics.render();
        assert!(text.contains("weft_sync_proxy_rules_duration_seconds_bucket{le=\"0.002\"} 0"));
        assert!(text.contains("weft_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1"));
        assert!(text.contains("weft_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 1"));
        assert!(text.contains("weft_sync_proxy_rules_duration_seconds_count 1"));
        assert!(text.contains("weft_programmed_endpoints 6"));
        assert!(text.contains("weft_not_programmed_entries 1"));
        assert!(text.contains("weft_map_entries{map=\"weft_svc_v2\"} 3"));
        assert!(text.contains("weft_map_capacity{map=\"weft_svc_v2\"} 65536"));
        // Every sample line is "name{labels} value".
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect("a value");
            value.parse::<f64>().expect("a number");
        }
    }
}
