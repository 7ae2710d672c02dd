//! The `hoptrace` binary: the service and its client subcommands.

use std::process::ExitCode;

use clap::Parser;
use hoptrace::{
    cli::{Cli, Command},
    client,
    config::{LogFormat, ServeArgs},
    privileges::{self, Opened},
    server::{self, StartError},
};

/// Exit status for a bad command line or configuration (sysexits' EX_USAGE).
const EX_USAGE: u8 = 64;

fn init_logging(args: &ServeArgs) {
    let filter = tracing_subscriber::EnvFilter::new(&args.log);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves at SIGTERM or SIGINT. The handlers are installed when this is called, not when it
/// is first polled, so a signal that comes as soon as the server logs that it serves is not
/// fatal.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot watch SIGTERM and SIGINT; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("shutting down");
    }
}

/// Opens what needs a capability, drops them all when the engine is the backend, and only
/// then builds the runtime: capabilities belong to threads, and every thread the runtime
/// starts inherits the main thread's.
fn serve(args: ServeArgs) -> ExitCode {
    if let Err(e) = args.validate() {
        eprintln!("hoptrace: {e}");
        return ExitCode::from(EX_USAGE);
    }
    init_logging(&args);
    let mut opened = match Opened::open(&args) {
        Ok(opened) => opened,
        Err(e) => {
            eprintln!("hoptrace: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if opened.engine_chosen() {
        match opened.drop_capabilities() {
            Ok(dropped) => tracing::info!(
                dropped = %privileges::names(dropped.permitted).join(","),
                bounding_set_emptied = dropped.bounding_emptied,
                "capabilities dropped: the engine's sockets are open, no thread keeps any"
            ),
            Err(e) => {
                eprintln!("hoptrace: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        tracing::info!(
            "capabilities kept: the scamper backends start scamper (inside --netns) for every trace"
        );
    }
    let runtime = match runtime(args.worker_threads) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("hoptrace: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let signal = shutdown_signal();
        match server::start_opened(args, opened).await {
            Ok(running) => {
                running.serve_until(signal).await;
                ExitCode::SUCCESS
            }
            Err(e @ StartError::Config(_)) => {
                eprintln!("hoptrace: {e}");
                ExitCode::from(EX_USAGE)
            }
            Err(e) => {
                eprintln!("hoptrace: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// The runtime, with `workers` worker threads (tokio's default, one per CPU, when `None`).
fn runtime(workers: Option<u16>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = workers {
        builder.worker_threads(usize::from(workers));
    }
    builder.enable_all().build()
}

async fn client(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(_) => unreachable!("serve runs before the runtime exists"),
        Command::Trace(args) => client::trace(args).await,
        Command::Subscribe(args) => client::subscribe(args).await,
        Command::Report(args) => client::report(args).await,
        Command::Status(args) => client::status(args).await,
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let command = match cli.command {
        Command::Serve(args) => return serve(*args),
        command => command,
    };
    let result = runtime(None)
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(client(command)));
    let broken_pipe = |e: &anyhow::Error| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`| head`): a normal end for a command-line tool.
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hoptrace: {e:#}");
            ExitCode::FAILURE
        }
    }
}
