//! ficus: a sidecar reverse proxy for strangling a monolith.
//!
//! ficus sits beside a legacy monolith, forwards every request to it, and publishes CloudEvents
//! derived from the responses by route-to-event rules, through a durable outbox. The contract is
//! the project's SPEC: CLI, config, forwarding, events, metrics.
//!
//! # Layout
//!
//! The modules follow the data. The request path:
//!
//! - [`proxy`]: accept (plain or TLS; HTTP/1.1, h2c, h2), the tower stack, forwarding to a
//!   pooled upstream client, header rules, streamed bodies with idle timeouts, the smuggling
//!   guard, and the event tap ([`proxy::events`]) that captures what rules need.
//! - [`routing`]: which upstream serves a request, under which route name.
//!
//! The event path:
//!
//! - [`rules`]: route-to-event rules (path templates, expressions, CEL conditions), pure.
//! - [`events`]: the CloudEvents model, the outbox envelope, protocol-binding encodings.
//! - [`outbox`]: the crash-safe segmented log with group commit, cursors and dead letters.
//! - [`dispatch`]: one delivery loop per sink, with backoff and dead-lettering.
//! - [`sinks`]: the `Sink` trait and the file, stdout, HTTP, NATS, Redis and RabbitMQ sinks.
//!
//! Beside them:
//!
//! - [`config`]: YAML read into a located tree, validated into [`config::Config`], every
//!   error reported as `FILE:LINE:COLUMN: key.path: message`.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`, `/events/tail`, `/asyncapi`.
//! - [`metrics`]: every metric in one struct, registered against an injected registry.
//! - [`app`]: wiring and lifecycle (bind, serve, reload, drain, flush, deliver, stop).
//! - [`reload`]: noticing config changes (inotify on the directory, a poll, SIGHUP) and which
//!   sections only a restart applies.
//! - [`asyncapi`], [`samples`]: the rule authors' tools behind `ficus asyncapi` and
//!   `ficus rules test`.
//! - [`demo`]: the sample shop behind `ficus demo`.

pub mod admin;
pub mod app;
pub mod asyncapi;
pub mod config;
pub mod demo;
pub mod dispatch;
pub mod events;
pub mod metrics;
pub mod outbox;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod rules;
pub mod samples;
pub mod sinks;

pub use app::{App, AppError, Listeners};
pub use config::Config;

/// Writes to stdout for the commands' output. When the reader went away (`ficus check | head`)
/// the output ends quietly, where `print!` would panic; any other failure is said on stderr.
pub fn print_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(error) = out.write_fmt(args).and_then(|()| out.flush()) {
        if error.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("ficus: cannot write to stdout: {error}");
        }
    }
}
