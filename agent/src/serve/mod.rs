//! What the agent answers over HTTP: [`health`] (`/healthz`, `/livez`, health-check NodePorts)
//! and [`metrics`] (Prometheus), on [`http`]'s small server.

pub mod health;
pub mod http;
pub mod metrics;
