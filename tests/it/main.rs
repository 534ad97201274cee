//! ficus integration tests: one binary, real sockets, real upstream servers on ephemeral ports.
//!
//! - `support`: the harness (ficus in-process or as a process, test upstreams, clients)
//! - `forwarding`: the transparency table and header rules of SPEC §3
//! - `failures`: 502/504, idle timeout, client cancellation
//! - `limits`: 431, header read timeout, ambiguous framing
//! - `protocols`: h2c, h2 over TLS, WebSocket, `Expect: 100-continue`, chunked and trailers
//! - `pool`: upstream keep-alive reuse
//! - `admin`: `/healthz`, `/readyz`, `/metrics`
//! - `cli`: `ficus check`/`run` exit codes and messages, example configs, access log, demo
//! - `lifecycle`: SIGTERM drain
//! - `large`: 100 MiB bodies streamed both ways with flat memory
//! - `upstream_tls`: https upstreams with a configured CA and mTLS

mod admin;
mod cli;
mod failures;
mod forwarding;
mod large;
mod lifecycle;
mod limits;
mod pool;
mod protocols;
mod support;
mod upstream_tls;
