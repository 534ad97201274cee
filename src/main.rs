//! The `ficus` command: argument parsing, logging, signals and exit codes. Everything else is
//! in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ficus::config::{Config, LoadError, LogFormat};
use ficus::{App, Listeners};
use tokio_util::sync::CancellationToken;

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
    let cli = Cli::parse();
    match cli.command {
        Command::Check(arg) => match Config::load(&arg.config) {
            Ok(config) => {
                for warning in &config.warnings {
                    eprintln!("warning: {warning}");
                }
                print!("{}: ok\n{}", arg.config.display(), config.summary());
                ExitCode::SUCCESS
            }
            Err(error) => config_error(&error),
        },
        Command::Run(arg) => match Config::load(&arg.config) {
            Ok(config) => run_async(run(config, arg.config.clone())),
            Err(error) => config_error(&error),
        },
        Command::Demo => run_async(demo()),
        Command::Asyncapi(arg) => match Config::load(&arg.config) {
            Ok(config) => {
                println!("{}", ficus::asyncapi::document(&config));
                ExitCode::SUCCESS
            }
            Err(error) => config_error(&error),
        },
        Command::Rules {
            command: RulesCommand::Test { config, samples },
        } => rules_test(&config.config, &samples),
        Command::Outbox { command } => outbox_command(command),
    }
}

fn rules_test(config: &std::path::Path, samples: &std::path::Path) -> ExitCode {
    let config = match Config::load(config) {
        Ok(c) => c,
        Err(error) => return config_error(&error),
    };
    let file = samples.display().to_string();
    let text = match std::fs::read_to_string(samples) {
        Ok(t) => t,
        Err(error) => {
            eprintln!("{file}: cannot read: {error}");
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    let data = match Config::data_file(&text, &file) {
        Ok(d) => d,
        Err(error) => return config_error(&error),
    };
    match ficus::samples::run(&config, &data) {
        Ok((report, _)) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{file}: {error}");
            ExitCode::from(EXIT_INVALID_CONFIG)
        }
    }
}

fn outbox_command(command: OutboxCommand) -> ExitCode {
    let (arg, replay) = match command {
        OutboxCommand::Status(arg) => (arg, None),
        OutboxCommand::Replay { config, sink } => (config, Some(sink)),
    };
    let config = match Config::load(&arg.config) {
        Ok(c) => c,
        Err(error) => return config_error(&error),
    };
    let dir = &config.outbox.dir;
    if let Some(sink) = replay {
        return match ficus::outbox::replay(dir, sink.as_deref()) {
            Ok(n) => {
                println!("{n} dead letter(s) queued for delivery again");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("ficus outbox replay: {error}");
                ExitCode::FAILURE
            }
        };
    }
    match ficus::outbox::status(dir) {
        Ok(status) => {
            println!(
                "outbox {}: {} bytes in {} segment(s), events {}..{}",
                status.dir.display(),
                status.bytes,
                status.segments,
                status.first_seq,
                status.end_seq
            );
            println!(
                "{:<20} {:>10} {:>10} {:>12} {:>10}",
                "sink", "cursor", "pending", "dead letters", "replaying"
            );
            for s in status.sinks {
                let configured = if config.sinks.iter().any(|c| c.name == s.sink) {
                    ""
                } else {
                    " (not in config)"
                };
                println!(
                    "{:<20} {:>10} {:>10} {:>12} {:>10}{configured}",
                    s.sink, s.cursor, s.pending, s.dead_letters, s.replaying
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

fn config_error(error: &LoadError) -> ExitCode {
    eprintln!("{error}");
    if let LoadError::Invalid(list) = error {
        eprintln!("{} error(s); the config was not applied", list.len());
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
            ExitCode::FAILURE
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
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
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
    println!(
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
