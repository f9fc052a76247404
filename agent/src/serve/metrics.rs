//! Prometheus metrics on `--metrics-bind-address` (`/metrics`), encoded by `prometheus-client`.
//! kube-proxy's names first, as its users' dashboards and alerts read them (kubernetes-mixin's
//! "Kubernetes / Proxy"): `kubeproxy_sync_proxy_rules_duration_seconds` (a reconcile pass),
//! `_last_timestamp_seconds`, `_service_changes_total`, `_endpoint_changes_total` and their
//! `_pending`, `_no_local_endpoints_total`, and `process_*`. weft's own beside them: what is
//! programmed, map pressure, entries that did not fit, and the datapath's drop counters by
//! reason (read from the pinned per-CPU map at scrape time).

use std::{
    fmt,
    path::PathBuf,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        counter::ConstCounter,
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use weft_common::maps::{CONNTRACK_MAP, ENDPOINTS_MAP, MapSpec, SERVICES_MAP};

use crate::{
    datapath::loader::MapLimits,
    datapath::maps::PinnedMaps,
    reconcile::Programmed,
    serve::http::{self, Reply},
    sources::ModelHandle,
};

/// One label, as every labelled family here has.
type Label = [(&'static str, &'static str); 1];

/// The agent's metrics, updated by the reconciler and the conntrack collector; the rest is
/// read at scrape time.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    network_programming: Histogram,
    last_sync: Gauge<f64, AtomicU64>,
    service_ports: Gauge,
    frontends: Gauge,
    endpoint_slots: Gauge,
    not_programmed: Gauge,
    map_entries: Family<Label, Gauge>,
}

impl Metrics {
    /// The metrics of an agent whose maps have `limits` and are pinned in `pin_dir`, with
    /// `model` for the changes it took.
    #[must_use]
    pub fn new(limits: MapLimits, pin_dir: PathBuf, model: Arc<ModelHandle>) -> Self {
        let mut registry = Registry::default();
        // 1 ms doubling to 16 s, as kube-proxy's.
        let sync_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "How long one reconcile pass took to bring the maps to the desired state.",
            sync_duration.clone(),
        );
        // kube-proxy's buckets: quarter seconds to 1 s, seconds to a minute, then coarser to 5 min.
        let network_programming = Histogram::new(
            [0.25, 0.5]
                .into_iter()
                .chain((1..60).map(f64::from))
                .chain((0..12).map(|i| 60.0 + 5.0 * f64::from(i)))
                .chain((0..7).map(|i| 120.0 + 30.0 * f64::from(i))),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "From an EndpointSlice change (its last-change-trigger-time) to the end of the pass that programmed it.",
            network_programming.clone(),
        );
        let last_sync = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "When the last reconcile pass ended (Unix time).",
            last_sync.clone(),
        );
        registry.register_collector(Box::new(ModelState(model)));
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let gauge = Gauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        let service_ports = gauge(
            &mut registry,
            "weft_programmed_service_ports",
            "Service ports in the maps.",
        );
        let frontends = gauge(
            &mut registry,
            "weft_programmed_frontends",
            "Frontends (ClusterIP, NodePort, external and load-balancer address, port, protocol) in the maps.",
        );
        let endpoint_slots = gauge(
            &mut registry,
            "weft_programmed_endpoints",
            "Endpoint slots in the maps, over every endpoint set.",
        );
        let not_programmed = gauge(
            &mut registry,
            "weft_not_programmed_entries",
            "Service ports and overlay entries the maps refused (full); retried.",
        );
        let map_entries = Family::<Label, Gauge>::default();
        registry.register(
            "weft_map_entries",
            "Entries in a map (conntrack: as of the last sweep).",
            map_entries.clone(),
        );
        let map_capacity = Family::<Label, Gauge>::default();
        registry.register(
            "weft_map_capacity",
            "How many entries a map holds at most.",
            map_capacity.clone(),
        );
        for map in [SERVICES_MAP.spec, ENDPOINTS_MAP.spec, CONNTRACK_MAP.spec] {
            map_capacity
                .get_or_create(&[("map", map.name)])
                .set(gauge_value(limits.entries(map.capacity)));
        }
        registry.register_collector(Box::new(Drops(pin_dir)));
        registry.register_collector(Box::new(Process));
        Self {
            registry,
            sync_duration,
            network_programming,
            last_sync,
            service_ports,
            frontends,
            endpoint_slots,
            not_programmed,
            map_entries,
        }
    }

    /// Records one reconcile pass.
    pub fn pass(&self, took: Duration, programmed: Programmed, not_programmed: usize) {
        self.sync_duration.observe(took.as_secs_f64());
        self.last_sync
            .set(jiff::Timestamp::now().as_millisecond() as f64 / 1000.0);
        self.service_ports
            .set(gauge_value(programmed.service_ports));
        self.frontends.set(gauge_value(programmed.frontends));
        self.endpoint_slots
            .set(gauge_value(programmed.endpoint_slots));
        self.not_programmed.set(gauge_value(not_programmed));
        self.set_entries(SERVICES_MAP.spec, programmed.frontends);
        self.set_entries(ENDPOINTS_MAP.spec, programmed.endpoint_slots);
    }

    /// Records that the EndpointSlice changes of `trigger_times` are programmed now.
    pub fn network_programmed(&self, trigger_times: &[jiff::Timestamp]) {
        let now = jiff::Timestamp::now();
        for time in trigger_times {
            let took = now.duration_since(*time).as_secs_f64().max(0.0);
            self.network_programming.observe(took);
        }
    }

    /// Records the conntrack table's size, as the last sweep counted it.
    pub fn conntrack_entries(&self, entries: usize) {
        self.set_entries(CONNTRACK_MAP.spec, entries);
    }

    fn set_entries(&self, map: MapSpec, entries: usize) {
        self.map_entries
            .get_or_create(&[("map", map.name)])
            .set(gauge_value(entries));
    }

    /// The exposition text (OpenMetrics).
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }
}

/// A count as a gauge's value (gauges are `i64`; no count here comes near its limit).
fn gauge_value(count: impl TryInto<i64>) -> i64 {
    count.try_into().unwrap_or(i64::MAX)
}

/// What the model holds, read at scrape time (not per pass, which a large cluster's ports
/// would slow): the changes it took, and the service ports without local endpoints.
struct ModelState(Arc<ModelHandle>);

impl fmt::Debug for ModelState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ModelState")
    }
}

impl Collector for ModelState {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let (internal, external) = self.0.desired().no_local_endpoints();
        let mut family = encoder.encode_descriptor(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Service ports with a Local traffic policy and no endpoint on this node.",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (policy, count) in [("internal", internal), ("external", external)] {
            ConstGauge::new(gauge_value(count))
                .encode(family.encode_family(&[("traffic_policy", policy)])?)?;
        }
        let counts = self.0.change_counts();
        for (kind, total, pending) in [
            ("service", counts.services, counts.services_pending),
            ("endpoint", counts.endpoints, counts.endpoints_pending),
        ] {
            let counter = ConstCounter::new(total);
            counter.encode(encoder.encode_descriptor(
                &format!("kubeproxy_sync_proxy_rules_{kind}_changes"),
                &format!("{kind} changes (Services or EndpointSlices) the agent took in."),
                None,
                counter.metric_type(),
            )?)?;
            let gauge = ConstGauge::new(gauge_value(pending));
            gauge.encode(encoder.encode_descriptor(
                &format!("kubeproxy_sync_proxy_rules_{kind}_changes_pending"),
                &format!("{kind} changes not yet in a reconcile pass."),
                None,
                gauge.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// The datapath's drop counters, summed over CPUs, read from the pinned map at scrape time.
#[derive(Debug)]
struct Drops(PathBuf);

impl Collector for Drops {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let drops = match PinnedMaps::new(&self.0).drop_counts() {
            Ok(drops) => drops,
            Err(e) => {
                tracing::warn!("reading the drop counters for /metrics: {e}");
                return Ok(());
            }
        };
        let mut family = encoder.encode_descriptor(
            "weft_drops",
            "Packets the datapath dropped, by reason (rejected connections count as no_endpoints).",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, packets) in drops {
            ConstCounter::new(packets)
                .encode(family.encode_family(&[("reason", reason.name())])?)?;
        }
        Ok(())
    }
}

/// The agent process's own figures, as every Prometheus client exports them (`process_*`),
/// from `/proc/self`.
#[derive(Debug)]
struct Process;

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let Some(figures) = ProcessFigures::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(figures.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            cpu.metric_type(),
        )?)?;
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                figures.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                figures.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                figures.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                figures.max_fds,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds.",
                figures.start_time_seconds,
            ),
        ] {
            let gauge = ConstGauge::new(gauge_value(value));
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct ProcessFigures {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    open_fds: u64,
    max_fds: u64,
    start_time_seconds: u64,
}

impl ProcessFigures {
    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
        // proc(5): utime, stime (14, 15), starttime (22), vsize (23), rss (24), counting the
        // pid as field 1; `fields` starts at field 3 (the state).
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        let ticks =
            u64::try_from(nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??).ok()?;
        let page =
            u64::try_from(nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()??).ok()?;
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|line| line.strip_prefix("btime ")?.trim().parse::<u64>().ok())?;
        let (max_fds, _) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok()?;
        Some(Self {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks as f64,
            resident_bytes: field(24)? * page,
            virtual_bytes: field(23)?,
            open_fds: std::fs::read_dir("/proc/self/fd").ok()?.count() as u64,
            max_fds,
            start_time_seconds: boot_time + field(22)? / ticks,
        })
    }
}

/// The `/metrics` handler.
#[must_use]
pub fn handler(metrics: Arc<Metrics>) -> http::Handler {
    Arc::new(move |path| match path {
        "/metrics" => Reply::text(
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        _ => Reply::not_found(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::tests::{nginx_service, object},
        sources::objects::ServiceSpec,
    };

    fn metrics() -> (Metrics, Arc<ModelHandle>) {
        let model = Arc::new(ModelHandle::default());
        let metrics = Metrics::new(
            MapLimits::default(),
            PathBuf::from("/nonexistent"),
            Arc::clone(&model),
        );
        (metrics, model)
    }

    #[test]
    fn a_pass_is_exposed_under_kube_proxys_names_and_weft_s_own() {
        let (metrics, model) = metrics();
        // One service port confined to this node by each policy, with no endpoint here.
        let local = |name: &str, change: fn(&mut ServiceSpec)| {
            let mut spec = nginx_service();
            change(&mut spec);
            model.update(|m| m.set_service(object("default", name), spec));
        };
        local("internal", |spec| spec.internal_local = true);
        local("external", |spec| {
            spec.cluster_ip = std::net::Ipv4Addr::new(10, 254, 40, 120);
            spec.external_local = true;
            spec.external_ips = vec![std::net::Ipv4Addr::new(192, 0, 2, 10)];
        });
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
        for sample in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.002\"} 0",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_count 1",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"} 1",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"} 1",
            "kubeproxy_sync_proxy_rules_service_changes_total 2",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending 0",
            "weft_programmed_endpoints 6",
            "weft_not_programmed_entries 1",
            "weft_map_entries{map=\"weft_svc_v2\"} 3",
            "weft_map_capacity{map=\"weft_svc_v2\"} 65536",
            "weft_map_capacity{map=\"weft_ct4_v1\"} 524288",
        ] {
            assert!(
                text.lines().any(|line| line == sample),
                "{sample} in:\n{text}"
            );
        }
        assert!(
            text.lines()
                .any(|line| line.starts_with("process_resident_memory_bytes ")),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
        // Every sample line is "name{labels} value".
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect("a value");
            value.parse::<f64>().expect("a number");
        }
    }

    #[test]
    fn a_slice_change_is_timed_from_its_trigger_to_the_pass_that_programs_it() {
        let (metrics, model) = metrics();
        let mut slice = crate::model::tests::nginx_slice(Vec::new());
        slice.trigger_time = jiff::Timestamp::now()
            .checked_sub(jiff::SignedDuration::from_secs(2))
            .ok();
        model.update(|m| m.set_slice(crate::model::tests::object("default", "nginx-1"), slice));
        let changes = model.take_changes();
        assert_eq!(changes.trigger_times.len(), 1);
        metrics.network_programmed(&changes.trigger_times);
        assert!(model.take_changes().trigger_times.is_empty(), "taken once");
        let text = metrics.render();
        let sample = |name: &str| {
            text.lines()
                .find_map(|line| {
                    line.strip_prefix(name)?
                        .strip_prefix(' ')?
                        .parse::<f64>()
                        .ok()
                })
                .unwrap_or_else(|| panic!("{name} in:\n{text}"))
        };
        assert_eq!(
            sample("kubeproxy_network_programming_duration_seconds_count"),
            1.0
        );
        let took = sample("kubeproxy_network_programming_duration_seconds_sum");
        assert!((2.0..3.0).contains(&took), "{took}");
    }

    #[test]
    fn changes_are_counted_in_all_and_pending_until_a_pass_takes_them() {
        let (metrics, model) = metrics();
        let service = crate::model::tests::nginx_service();
        let name = crate::model::tests::object("default", "nginx");
        model.update(|m| m.set_service(name.clone(), service.clone()));
        model.update(|m| m.set_service(name.clone(), service.clone()));
        model.update(|m| m.remove_service(&name));
        let text = metrics.render();
        assert!(
            text.contains("kubeproxy_sync_proxy_rules_service_changes_total 2\n"),
            "{text}"
        );
        assert!(
            text.contains("kubeproxy_sync_proxy_rules_service_changes_pending 2\n"),
            "{text}"
        );
        let _ = model.take_changes();
        let text = metrics.render();
        assert!(
            text.contains("kubeproxy_sync_proxy_rules_service_changes_total 2\n"),
            "{text}"
        );
        assert!(
            text.contains("kubeproxy_sync_proxy_rules_service_changes_pending 0\n"),
            "{text}"
        );
    }
}
