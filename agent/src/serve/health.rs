//! Health, as kube-proxy reports it: `/healthz` and `/livez` on `--healthz-bind-address`
//! (`{"lastUpdated","currentTime","nodeEligible"}`, 200 or 503), served from the agent's first
//! moments and healthy while it starts, as kube-proxy's are; `/readyz` beside them for "the
//! dataplane serves" (the first sync is done); and one health-check NodePort
//! per service with `externalTrafficPolicy: Local` that tells load balancers whether this node
//! has endpoints of it (`{"service":{"namespace","name"},"localEndpoints":N,
//! "serviceProxyHealthy":bool}`, 200 or 503).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::task::JoinHandle;

use crate::{
    model::HealthCheck,
    serve::http::{self, Reply},
};

/// How long a change may wait for the dataplane before the agent reports itself unhealthy
/// (kube-proxy's default health timeout: twice its 30 s sync period).
const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct State {
    /// The dataplane is attached and the sources' first state is in it.
    ready: bool,
    /// When the oldest change not yet in the maps arrived.
    queued_since: Option<Instant>,
    /// When the maps last caught up with every change.
    last_updated: jiff::Timestamp,
    /// False while the Node is being deleted (or is about to be, by the autoscaler).
    node_eligible: bool,
}

/// The agent's health, shared by the reconciler (which updates it) and the endpoints.
#[derive(Debug)]
pub struct Health {
    state: Mutex<State>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                ready: false,
                queued_since: None,
                last_updated: jiff::Timestamp::now(),
                node_eligible: true,
            }),
        }
    }
}

impl Health {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("health lock is never poisoned")
    }

    /// The dataplane serves: programs attached, first state programmed.
    pub fn set_ready(&self) {
        self.state().ready = true;
    }

    /// A change arrived that the maps do not have yet.
    pub fn queued(&self) {
        let mut state = self.state();
        state.queued_since.get_or_insert_with(Instant::now);
    }

    /// A pass ran; `complete` when nothing failed (a failed entry stays queued, as kube-proxy
    /// keeps a failed sync queued).
    pub fn synced(&self, complete: bool) {
        let mut state = self.state();
        if complete {
            state.queued_since = None;
            state.last_updated = jiff::Timestamp::now();
        }
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.state().node_eligible = eligible;
    }

    /// Whether the dataplane is keeping up: no change waiting too long. An agent still
    /// starting is healthy, as kube-proxy is, so that a liveness probe does not restart every
    /// node whose API server or etcd is not answering yet at boot; [`Health::is_ready`] waits
    /// for the first sync.
    #[must_use]
    pub fn is_healthy(&self) -> bool {
        self.state()
            .queued_since
            .is_none_or(|t| t.elapsed() < HEALTH_TIMEOUT)
    }

    /// Whether the dataplane serves: its first sync is done and it is keeping up.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        let ready = self.state().ready;
        ready && self.is_healthy()
    }

    /// The reply to `probe`.
    #[must_use]
    pub fn reply(&self, probe: Probe) -> Reply {
        let state_ok = match probe {
            Probe::Healthz | Probe::Livez => self.is_healthy(),
            Probe::Readyz => self.is_ready(),
        };
        let with_node = probe == Probe::Healthz;
        let state = self.state();
        let eligible = state.node_eligible;
        let now = jiff::Timestamp::now();
        let ok = state_ok && (eligible || !with_node);
        // As kube-proxy: a healthy agent reports itself updated now.
        let last_updated = if ok { now } else { state.last_updated };
        let body = if with_node {
            format!(
                r#"{{"lastUpdated": "{last_updated}","currentTime": "{now}", "nodeEligible": {eligible}}}"#
            )
        } else {
            format!(r#"{{"lastUpdated": "{last_updated}","currentTime": "{now}"}}"#)
        };
        Reply::json(if ok { 200 } else { 503 }, body)
    }
}

/// What is asked of the agent's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// `/healthz`: keeping up, and the Node is not being deleted (what load balancers ask).
    Healthz,
    /// `/livez`: keeping up (what the liveness probe asks).
    Livez,
    /// `/readyz`: the first sync is done, and keeping up (what the readiness probe asks).
    Readyz,
}

/// The `/healthz`, `/livez` and `/readyz` handler.
#[must_use]
pub fn handler(health: Arc<Health>) -> http::Handler {
    Arc::new(move |path| match path {
        "/healthz" => health.reply(Probe::Healthz),
        "/livez" => health.reply(Probe::Livez),
        "/readyz" => health.reply(Probe::Readyz),
        _ => Reply::not_found(),
    })
}

/// What one health-check NodePort answers.
#[must_use]
pub fn check_reply(check: &HealthCheck, proxy_healthy: bool) -> Reply {
    let count = check.local_endpoints;
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\
         \"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
        serde_json::Value::from(check.service.namespace.as_str()),
        serde_json::Value::from(check.service.name.as_str()),
    );
    let mut reply = Reply::json(if count > 0 && proxy_healthy { 200 } else { 503 }, body);
    reply
        .headers
        .push(("X-Load-Balancing-Endpoint-Weight", count.to_string()));
    reply
}

/// The health-check NodePort servers, one per port the model asks for.
pub struct HealthCheckServers {
    health: Arc<Health>,
    checks: Arc<Mutex<BTreeMap<u16, HealthCheck>>>,
    servers: BTreeMap<u16, JoinHandle<Infallible>>,
}

impl HealthCheckServers {
    #[must_use]
    pub fn new(health: Arc<Health>) -> Self {
        Self {
            health,
            checks: Arc::default(),
            servers: BTreeMap::new(),
        }
    }

    /// Serves exactly `wanted`: new ports are opened (a port that cannot be bound is logged
    /// and tried again on the next change), gone ones closed, counts updated.
    pub async fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        self.checks
            .lock()
            .expect("health check lock is never poisoned")
            .clone_from(wanted);
        self.servers.retain(|port, server| {
            let keep = wanted.contains_key(port);
            if !keep {
                server.abort();
            }
            keep
        });
        for (port, check) in wanted {
            if self.servers.contains_key(port) {
                continue;
            }
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, *port));
            match http::bind(addr).await {
                Ok(listener) => {
                    let (checks, health, port) =
                        (Arc::clone(&self.checks), Arc::clone(&self.health), *port);
                    let handler: http::Handler = Arc::new(move |_path| {
                        let checks = checks.lock().expect("health check lock is never poisoned");
                        match checks.get(&port) {
                            Some(check) => check_reply(check, health.is_healthy()),
                            None => Reply::not_found(),
                        }
                    });
                    self.servers
                        .insert(port, tokio::spawn(http::serve(listener, handler)));
                }
                Err(e) => tracing::warn!(
                    service = %check.service,
                    "health-check NodePort not served: {e}"
                ),
            }
        }
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::objects::ObjectRef;

    fn check(local_endpoints: usize) -> HealthCheck {
        HealthCheck {
            service: ObjectRef {
                namespace: "shop".into(),
                name: "web".into(),
            },
            local_endpoints,
        }
    }

    #[test]
    fn a_health_check_reports_local_endpoints_as_kube_proxy_does() {
        let reply = check_reply(&check(2), true);
        assert_eq!(reply.status, 200);
        let body: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"service": {"namespace": "shop", "name": "web"},
                               "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        assert!(
            reply
                .headers
                .contains(&("X-Load-Balancing-Endpoint-Weight", "2".into()))
        );
        assert_eq!(check_reply(&check(0), true).status, 503);
        assert_eq!(check_reply(&check(3), false).status, 503);
    }

    #[test]
    fn healthz_follows_readiness_queued_changes_and_node_eligibility() {
        let health = Health::default();
        assert_eq!(
            health.reply(Probe::Livez).status,
            200,
            "healthy while starting"
        );
        assert_eq!(
            health.reply(Probe::Healthz).status,
            200,
            "healthy while starting"
        );
        assert_eq!(health.reply(Probe::Readyz).status, 503, "not ready yet");
        health.set_ready();
        assert_eq!(health.reply(Probe::Readyz).status, 200);
        health.queued();
        assert_eq!(
            health.reply(Probe::Healthz).status,
            200,
            "a fresh change is fine"
        );
        health.synced(true);
        let body: serde_json::Value =
            serde_json::from_str(&health.reply(Probe::Healthz).body).unwrap();
        assert_eq!(body["nodeEligible"], true);
        assert!(body["lastUpdated"].as_str().unwrap().ends_with('Z'));
        health.set_node_eligible(false);
        assert_eq!(health.reply(Probe::Healthz).status, 503);
        assert_eq!(
            health.reply(Probe::Livez).status,
            200,
            "/livez ignores the node"
        );
        health.state().queued_since = Some(Instant::now() - HEALTH_TIMEOUT);
        assert_eq!(
            health.reply(Probe::Livez).status,
            503,
            "a change stuck too long"
        );
        assert_eq!(
            health.reply(Probe::Readyz).status,
            503,
            "a change stuck too long"
        );
    }
}
