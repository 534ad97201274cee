//! The `ficus` command: argument parsing, logging, signals and exit codes. Everything else is
//! in the library.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ficus::config::{Config, LoadError, LogFormat};
use ficus::{App, Listeners};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::filter::LevelFilter;

/// `print!`/`println!` through [`ficus::print_out`]: a closed stdout ends the output quietly.
macro_rules! out {
    ($($arg:tt)*) => { ficus::print_out(format_args!($($arg)*)) };
}
macro_rules! outln {
    ($($arg:tt)*) => { ficus::print_out(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Exit status for an invalid config, as `ficus check` and `ficus run` promise.
const EXIT_INVALID_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "ficus",
    version,
    about = "Sidecar reverse proxy for strangling monoliths"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Config file.
    #[arg(short, long, env = "FICUS_CONFIG", default_value = "config/ficus.yaml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run(ConfigArg),
    /// Validate the config and print a summary; exit 2 when it is invalid.
    Check(ConfigArg),
    /// Run a sample legacy shop on loopback with ficus in front of it, printing its events.
    Demo,
    /// Print an AsyncAPI 3.0 document of every event the rules can emit.
    Asyncapi(ConfigArg),
    /// Tools for rule authors.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Inspect the outbox, or send dead letters back for delivery (works while ficus runs).
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Run the rules over recorded request/response samples and print the events, or why none.
    Test {
        #[command(flatten)]
        config: ConfigArg,
        /// A YAML or JSON file with a list of samples.
        samples: PathBuf,
    },
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Pending and dead-lettered events per sink.
    Status(ConfigArg),
    /// Move dead letters back for delivery.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this sink's dead letters (default: every sink's).
        #[arg(long)]
        sink: Option<String>,
    },
}

fn main() -> ExitCode {
    // An empty `FICUS_CONFIG` (a manifest's `value: ""`) means unset, as for most tools, not
    // "a value is required". Removed before any thread exists.
    if std::env::var_os("FICUS_CONFIG").is_some_and(|v| v.is_empty()) {
        std::env::remove_var("FICUS_CONFIG");
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Check(arg) => match Config::load(&arg.config) {
            Ok(config) => {
                for warning in &config.warnings {
                    eprintln!("warning: {warning}");
                }
                out!("{}: ok\n{}", arg.config.display(), config.summary());
                ExitCode::SUCCESS
            }
            Err(error) => config_error(&error, &arg.config, ""),
        },
        Command::Run(arg) => match Config::load(&arg.config) {
            Ok(config) => run_async(run(config, arg.config.clone())),
            Err(error) => config_error(&error, &arg.config, "; ficus did not start"),
        },
        Command::Demo => run_async(demo()),
        Command::Asyncapi(arg) => match Config::load(&arg.config) {
            Ok(config) => {
                outln!("{}", ficus::asyncapi::document(&config));
                ExitCode::SUCCESS
            }
            Err(error) => config_error(&error, &arg.config, "; no document was printed"),
        },
        Command::Rules {
            command: RulesCommand::Test { config, samples },
        } => rules_test(&config.config, &samples),
        Command::Outbox { command } => outbox_command(command),
    }
}

fn rules_test(config_path: &std::path::Path, samples: &std::path::Path) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(error) => return config_error(&error, config_path, "; no sample was run"),
    };
    let file = samples.display().to_string();
    let text = match std::fs::read_to_string(samples) {
        Ok(t) => t,
        Err(error) => {
            eprintln!("{file}: cannot read: {error}");
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    let samples = match ficus::samples::load(&text, &file) {
        Ok(s) => s,
        Err(error) => {
            eprintln!("{error}");
            if let LoadError::Invalid(list) = &error {
                eprintln!(
                    "{} error(s) in the samples file {file}; no sample was run",
                    list.len()
                );
            }
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    let (report, _) = ficus::samples::run(&config, samples);
    out!("{report}");
    ExitCode::SUCCESS
}

fn outbox_command(command: OutboxCommand) -> ExitCode {
    let (arg, replay) = match command {
        OutboxCommand::Status(arg) => (arg, None),
        OutboxCommand::Replay { config, sink } => (config, Some(sink)),
    };
    let config = match Config::load(&arg.config) {
        Ok(c) => c,
        // The outbox's directory is in the config.
        Err(error) => return config_error(&error, &arg.config, "; the outbox was not opened"),
    };
    let dir = &config.outbox.dir;
    let configured: Vec<&str> = config.sinks.iter().map(|s| s.name.as_str()).collect();
    if let Some(sink) = replay {
        let status = match ficus::outbox::status(dir, &configured) {
            Ok(status) => status,
            Err(error) => {
                eprintln!("ficus outbox replay: {error}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(name) = sink.as_deref() {
            // A sink removed from the config keeps its dead letters, and may replay them.
            if !status.sinks.iter().any(|s| s.sink == name) {
                let known: Vec<&str> = status.sinks.iter().map(|s| s.sink.as_str()).collect();
                eprintln!(
                    "ficus outbox replay: no sink named `{name}` in {} or in the outbox {}; known: {}",
                    arg.config.display(),
                    dir.display(),
                    known.join(", ")
                );
                return ExitCode::from(EXIT_INVALID_CONFIG);
            }
        }
        if !status.created {
            outln!(
                "outbox {}: not created yet (ficus makes it when it starts with this config); nothing to replay",
                dir.display()
            );
            return ExitCode::SUCCESS;
        }
        return match ficus::outbox::replay(dir, sink.as_deref()) {
            Ok(n) => {
                outln!("{n} dead letter(s) queued for delivery again");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("ficus outbox replay: {error}");
                ExitCode::FAILURE
            }
        };
    }
    match ficus::outbox::status(dir, &configured) {
        Ok(status) => {
            if status.created {
                outln!(
                    "outbox {}: {} bytes in {} segment(s), events {}..{}",
                    status.dir.display(),
                    status.bytes,
                    status.segments,
                    status.first_seq,
                    status.end_seq
                );
            } else {
                outln!(
                    "outbox {}: not created yet (ficus makes it when it starts with this config); nothing pending",
                    status.dir.display()
                );
            }
            outln!(
                "{:<20} {:>10} {:>10} {:>12} {:>10}",
                "sink",
                "cursor",
                "pending",
                "dead letters",
                "replaying"
            );
            for s in status.sinks {
                let configured = if configured.contains(&s.sink.as_str()) {
                    ""
                } else {
                    " (not in config)"
                };
                outln!(
                    "{:<20} {:>10} {:>10} {:>12} {:>10}{configured}",
                    s.sink,
                    s.cursor,
                    s.pending,
                    s.dead_letters,
                    s.replaying
                );
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("ficus outbox status: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the errors of an invalid config, then how many and what the command did not do
/// because of them (`consequence`, e.g. "; ficus did not start"; `check` only reports).
fn config_error(error: &LoadError, file: &std::path::Path, consequence: &str) -> ExitCode {
    eprintln!("{error}");
    if let LoadError::Invalid(list) = error {
        eprintln!("{} error(s) in {}{consequence}", list.len(), file.display());
    }
    ExitCode::from(EXIT_INVALID_CONFIG)
}

fn run_async(main: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match runtime_builder().enable_all().build() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("ficus: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let message = causes(&error);
            tracing::error!(error = %message, "ficus stopped");
            eprintln!("ficus: {message}");
            match error.downcast_ref::<ficus::AppError>() {
                Some(e) if e.is_config_material() => ExitCode::from(EXIT_INVALID_CONFIG),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// The error and its causes, each said once: library errors often quote their source in
/// their own message already (`cannot create directory X: Permission denied`).
fn causes(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

/// One CPU (a sidecar's usual limit, or `taskset`): the single-threaded scheduler, which does
/// the same work without the cross-thread queues and wakeups of a one-worker multi-threaded
/// one. More CPUs: a worker per CPU. `FICUS_RUNTIME=multi|single` overrides, for comparisons.
fn runtime_builder() -> tokio::runtime::Builder {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let single = match std::env::var("FICUS_RUNTIME").as_deref() {
        Ok("single") => true,
        Ok("multi") => false,
        _ => cpus == 1,
    };
    if single {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
}

fn init_logging(config: &Config) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| config.log.level.clone());
    let filter = tracing_subscriber::EnvFilter::try_new(log_filter(&filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_filter("info")));
    // Colours only for a person at a terminal: a file or a log collector would get the escape
    // codes as text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Libraries whose own logs are held at a level unless the filter names them. rskafka logs
/// each retry inside a call while a broker is away — `backing off` at info and `Failed to
/// connect to broker` at warn, about four lines a second — and the Kafka sink already logs
/// and counts each failed delivery once. Its errors (a request it gives up on) still show.
const QUIETED: &[(&str, LevelFilter)] = &[("rskafka", LevelFilter::ERROR)];

/// The filter `spec` (`log.level` or `RUST_LOG`) with [`QUIETED`] targets held at their
/// level. A directive that names such a target, `info,rskafka=debug`, is the user asking for
/// more and wins; a default level already as quiet is left alone (adding the directive would
/// make the target louder than the rest).
fn log_filter(spec: &str) -> String {
    let directives = split_directives(spec);
    let default = directives
        .iter()
        .filter_map(|d| d.parse::<LevelFilter>().ok())
        .max();
    let mut filter = directives.join(",");
    for (quieted, level) in QUIETED {
        let named = directives.iter().any(|d| {
            let target = d.split(['[', '=']).next().unwrap_or_default().trim();
            target == *quieted
                || target
                    .strip_prefix(quieted)
                    .is_some_and(|rest| rest.starts_with("::"))
        });
        if !named && default.is_some_and(|default| default > *level) {
            filter.push_str(&format!(",{quieted}={level}"));
        }
    }
    filter
}

/// The comma-separated directives of a filter; a comma inside a span's field list
/// (`target[span{a=1,b=2}]=debug`) does not end one.
fn split_directives(spec: &str) -> Vec<&str> {
    let mut directives = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in spec.char_indices() {
        match c {
            '[' | '{' => depth += 1,
            ']' | '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                directives.push(spec[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    directives.push(spec[start..].trim());
    directives.retain(|d| !d.is_empty());
    directives
}

/// Resolves on SIGTERM or SIGINT.
fn shutdown_signal() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let token = CancellationToken::new();
    let fire = token.clone();
    tokio::spawn(async move {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = which, "shutting down");
        fire.cancel();
    });
    Ok(token)
}

async fn run(config: Config, path: std::path::PathBuf) -> anyhow::Result<()> {
    init_logging(&config);
    for warning in &config.warnings {
        tracing::warn!(warning = %warning, "config");
    }
    let shutdown = shutdown_signal()?;
    let app = App::new(config.clone(), prometheus::Registry::new())?.reload_from(path);
    let listeners = Listeners::bind(&config).await?;
    tracing::info!(
        listen = %listeners.proxy_addr(),
        admin = %listeners.admin_addr(),
        upstreams = config.upstreams.len(),
        "listening"
    );
    app.run(listeners, shutdown.cancelled_owned()).await?;
    Ok(())
}

async fn demo() -> anyhow::Result<()> {
    let shop_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the demo shop")?;
    let shop = shop_listener.local_addr()?;
    let shop_url = format!("http://{shop}");
    // Each demo run gets its own outbox and events file, so runs never mix.
    let demo_dir = std::env::temp_dir().join(format!("ficus-demo-{}", std::process::id()));
    let demo_dir_text = demo_dir.display().to_string();
    let env = |name: &str| match name {
        "FICUS_DEMO_SHOP" => Some(shop_url.clone()),
        "FICUS_DEMO_DIR" => Some(demo_dir_text.clone()),
        other => std::env::var(other).ok(),
    };
    let mut config = Config::from_str_with_env(ficus::demo::DEMO_CONFIG, "demo.yaml", &env)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    init_logging(&config);
    let shutdown = shutdown_signal()?;
    let listeners = match Listeners::bind(&config).await {
        Ok(l) => l,
        Err(error) => {
            // 8080 or 9090 taken: the demo still runs, on ports the system picks.
            tracing::info!(%error, "default demo ports busy; using free ones");
            config.listen.address.set_port(0);
            config.admin.address.set_port(0);
            Listeners::bind(&config).await?
        }
    };
    let app = App::new(config, prometheus::Registry::new())?;
    tokio::spawn(ficus::demo::serve_shop(shop_listener, shutdown.clone()));
    tokio::spawn(ficus::demo::print_events(app.tail()));
    outln!(
        "{}",
        ficus::demo::banner(
            listeners.proxy_addr(),
            listeners.admin_addr(),
            shop,
            &demo_dir
        )
    );
    app.run(listeners, shutdown.cancelled_owned()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn rskafka_is_held_at_error_unless_the_filter_names_it() {
        assert_eq!(log_filter("info"), "info,rskafka=error");
        assert_eq!(log_filter("debug"), "debug,rskafka=error");
        assert_eq!(log_filter("warn"), "warn,rskafka=error");
        assert_eq!(
            log_filter("info,ficus::proxy=debug"),
            "info,ficus::proxy=debug,rskafka=error"
        );
        // The user asked for rskafka's logs: theirs is the only rskafka directive.
        assert_eq!(log_filter("info,rskafka=debug"), "info,rskafka=debug");
        assert_eq!(
            log_filter("info,rskafka::connection=info"),
            "info,rskafka::connection=info"
        );
        // As quiet already, or nothing enabled by default: nothing added that would make
        // rskafka louder than the rest.
        assert_eq!(log_filter("error"), "error");
        assert_eq!(log_filter(" info, "), "info,rskafka=error");
        assert_eq!(log_filter("off"), "off");
        assert_eq!(log_filter("ficus=debug"), "ficus=debug");
        // A target that only starts with the same letters is not rskafka.
        assert_eq!(
            log_filter("info,rskafkaesque=debug"),
            "info,rskafkaesque=debug,rskafka=error"
        );
        assert_eq!(
            log_filter("info,ficus[req{a=1,b=2}]=debug"),
            "info,ficus[req{a=1,b=2}]=debug,rskafka=error"
        );
    }

    /// The filter built from the default level really drops rskafka's retry lines and keeps
    /// its errors and ficus's own info lines.
    #[test]
    fn the_default_filter_drops_rskafka_retries_and_keeps_its_errors_and_ficus_info() {
        use tracing::Level;
        use tracing_subscriber::layer::SubscriberExt;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let writer = {
            let seen = seen.clone();
            move || Line(seen.clone())
        };
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new(log_filter("info")))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .with_ansi(false),
            );
        tracing::subscriber::with_default(subscriber, || {
            tracing::event!(target: "rskafka::backoff", Level::INFO, "backing off");
            tracing::event!(target: "rskafka::connection", Level::WARN, "failed to connect");
            tracing::event!(target: "rskafka::client", Level::ERROR, "fatal error");
            tracing::event!(target: "ficus::sinks::kafka", Level::INFO, "connected to Kafka");
        });
        let text = seen.lock().map(|l| l.concat()).unwrap_or_default();
        assert!(!text.contains("backing off"), "{text}");
        assert!(!text.contains("failed to connect"), "{text}");
        assert!(text.contains("fatal error"), "{text}");
        assert!(text.contains("connected to Kafka"), "{text}");
    }

    struct Line(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

    impl std::io::Write for Line {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut lines) = self.0.lock() {
                lines.push(String::from_utf8_lossy(buf).into_owned());
            }
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
