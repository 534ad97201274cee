//! ficus integration tests: one binary, real sockets, real upstream servers on ephemeral ports.
//!
//! - `support`: the harness (ficus in-process or as a process, test upstreams, clients, and
//!   `mid_stream`: the kill-the-broker-mid-stream run every broker sink test makes)
//! - `forwarding`: the transparency table and header rules of SPEC §3
//! - `failures`: 502/504, idle timeout, client cancellation
//! - `limits`: 431, header read timeout, ambiguous framing
//! - `protocols`: h2c, h2 over TLS, WebSocket, `Expect: 100-continue`, chunked and trailers
//! - `pool`: upstream keep-alive reuse
//! - `admin`: `/healthz`, `/readyz`, `/metrics`
//! - `cli`: `ficus check`/`run` exit codes and messages, example configs, access log, demo
//! - `lifecycle`: SIGTERM drain
//! - `reload`: hot reload by ConfigMap swap, file replace and SIGHUP; refused configs; sinks kept
//! - `large`: 100 MiB bodies streamed both ways with flat memory
//! - `upstream_tls`: https upstreams with a configured CA and mTLS
//! - `routing`: takeover, split, sticky, fallback, shadow with comparison
//! - `asyncapi`: generated documents checked by the official AsyncAPI parser
//! - `events`: rules, CloudEvents (checked with the SDK), outbox, file and HTTP sinks
//! - `crash`: `kill -9` under load with sync durability loses nothing a client saw
//! - `disk_full`: a real full disk (tmpfs) under the outbox
//! - `brokers`: NATS JetStream, Redis Streams and RabbitMQ sinks against real brokers (started, killed)
//! - `kafka`: the Kafka sink against a real Kafka-protocol broker (tansu: started, killed)
//! - `deploy`: the configs deploy/kubernetes ships pass `ficus check` and their samples; the
//!   Grafana dashboard queries exactly the metrics ficus exports

mod admin;
mod asyncapi;
mod brokers;
mod cli;
mod crash;
mod deploy;
mod disk_full;
mod events;
mod failures;
mod forwarding;
mod kafka;
mod large;
mod lifecycle;
mod limits;
mod outbox;
mod pool;
mod protocols;
mod reload;
mod routing;
mod support;
mod upstream_tls;
