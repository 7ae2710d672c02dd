//! The `hoptrace` binary: the service and its client subcommands.

use std::process::ExitCode;

use clap::Parser;
use hoptrace::{
    cli::{Cli, Command},
    client,
    config::{LogFormat, ServeArgs},
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

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

async fn serve(args: ServeArgs) -> ExitCode {
    if let Err(e) = args.validate() {
        eprintln!("hoptrace: {e}");
        return ExitCode::from(EX_USAGE);
    }
    init_logging(&args);
    match server::start(args).await {
        Ok(running) => {
            running.serve_until(shutdown_signal()).await;
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
}

#[tokio::main]
async fn main() -> ExitCode {
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
    let result = match cli.command {
        Command::Serve(args) => return serve(*args).await,
        Command::Trace(args) => client::trace(args).await,
        Command::Subscribe(args) => client::subscribe(args).await,
        Command::Report(args) => client::report(args).await,
        Command::Status(args) => client::status(args).await,
    };
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
