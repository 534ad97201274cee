//! ficus: a sidecar reverse proxy for strangling a monolith.
//!
//! ficus sits beside a legacy monolith, forwards every request to it, and (in later versions)
//! publishes CloudEvents derived from the responses by route-to-event rules. The contract is
//! the project's SPEC: CLI, config, forwarding, events, metrics.
//!
//! # Layout
//!
//! The modules follow the data. The request path:
//!
//! - [`proxy`]: accept (plain or TLS; HTTP/1.1, h2c, h2), the tower stack, forwarding to a
//!   pooled upstream client, header rules, streamed bodies with idle timeouts.
//! - [`routing`]: which upstream serves a request, under which route name.
//!
//! Beside it:
//!
//! - [`config`]: YAML read into a located tree, validated into [`config::Config`], every
//!   error reported as `FILE:LINE:COLUMN: key.path: message`.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics` on their own listener.
//! - [`metrics`]: every metric in one struct, registered against an injected registry.
//! - [`app`]: wiring and lifecycle (bind, serve, drain on shutdown).
//! - [`demo`]: the sample shop behind `ficus demo`.

pub mod admin;
pub mod app;
pub mod config;
pub mod demo;
pub mod metrics;
pub mod proxy;
pub mod routing;

pub use app::{App, AppError, Listeners};
pub use config::Config;
