//! Choosing the tracer backend at start-up, and exporting the engine's counters.
//!
//! `--backend auto` (the default) takes the in-process engine when this process can open raw
//! sockets, and otherwise says why and falls back to one scamper process per trace, if scamper
//! is installed; with neither it refuses to start and says what to do.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hoptrace_backends::engine::{Engine, EngineOptions, EngineStats, ProbeSockets};
use hoptrace_backends::{
    DaemonOptions, NetNs, ScamperDaemon, ScamperOptions, ScamperProcess, Tracer,
};
use tokio::sync::watch;

use crate::config::{BackendKind, ServeArgs};
use crate::metrics::EngineMetrics;

/// How often the engine's counters are copied into the metrics.
const ENGINE_METRICS_EVERY: Duration = Duration::from_secs(1);

/// The backend chosen, and the engine when it is the engine (for its counters).
#[derive(Debug)]
pub struct Chosen {
    /// What traces run on.
    pub tracer: Arc<dyn Tracer>,
    /// The engine, when chosen.
    pub engine: Option<Arc<Engine>>,
}

/// Opens the engine's raw sockets (in `netns` when given) when `args` may choose the engine
/// (`--backend engine` or `auto`): the one step of the engine that needs CAP_NET_RAW, done
/// before the capabilities are dropped. The error says why they could not be opened.
pub fn open_sockets(
    args: &ServeArgs,
    netns: Option<&NetNs>,
) -> Option<Result<ProbeSockets, String>> {
    if !matches!(args.backend, BackendKind::Engine | BackendKind::Auto) {
        return None;
    }
    let opened = match netns {
        Some(ns) => ProbeSockets::open_in(ns),
        None => ProbeSockets::open(),
    };
    Some(opened.map_err(|e| e.to_string()))
}

/// The message `--backend engine` exits with when its sockets cannot be opened.
pub fn engine_refused(why: &str) -> String {
    format!(
        "--backend engine: {why} (the engine needs CAP_NET_RAW: run as root or \
         `setcap cap_net_raw+ep` the binary, see the README)"
    )
}

fn start_engine(args: &ServeArgs, sockets: ProbeSockets) -> Result<Arc<Engine>, String> {
    let options = EngineOptions {
        pps: args.engine_pps,
        ..EngineOptions::default()
    };
    Engine::start(sockets, options)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

fn scamper_process(args: &ServeArgs, netns: Option<Arc<NetNs>>) -> Arc<dyn Tracer> {
    Arc::new(ScamperProcess::new(
        ScamperOptions {
            binary: args.scamper_bin.clone().into_os_string(),
            pps: args.scamper_pps,
        },
        netns,
    ))
}

/// Whether `program` names an executable file: a path, or a name found in `PATH`.
pub fn installed(program: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.components().count() > 1 {
        return executable(program);
    }
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| executable(&dir.join(program)))
    })
}

/// Starts the backend `args` asks for; the error is the message to exit with. `sockets` are
/// the engine's, from [`open_sockets`] (opened here when `None`).
pub fn choose(
    args: &ServeArgs,
    netns: Option<Arc<NetNs>>,
    sockets: Option<Result<ProbeSockets, String>>,
) -> Result<Chosen, String> {
    let only = |tracer: Arc<dyn Tracer>| Chosen {
        tracer,
        engine: None,
    };
    let engine = |engine: Arc<Engine>| Chosen {
        tracer: Arc::clone(&engine) as Arc<dyn Tracer>,
        engine: Some(engine),
    };
    let sockets = sockets.or_else(|| open_sockets(args, netns.as_deref()));
    match args.backend {
        BackendKind::Engine => sockets
            .unwrap_or_else(|| Err("no sockets".into()))
            .and_then(|s| start_engine(args, s))
            .map(engine)
            .map_err(|e| engine_refused(&e)),
        BackendKind::Scamper => Ok(only(scamper_process(args, netns))),
        BackendKind::ScamperDaemon => ScamperDaemon::start(
            DaemonOptions {
                binary: args.scamper_bin.clone().into_os_string(),
                pps: args.scamper_pps.unwrap_or(1000),
                window: args.scamper_window,
                socket: args.scamper_socket.clone(),
                ..DaemonOptions::default()
            },
            netns,
        )
        .map(|d| only(Arc::new(d)))
        .map_err(|e| format!("--backend scamper-daemon: {e}")),
        BackendKind::Auto => {
            let opened = sockets
                .unwrap_or_else(|| Err("no sockets".into()))
                .and_then(|s| start_engine(args, s));
            let why = match opened {
                Ok(e) => {
                    tracing::info!("backend: engine (raw sockets)");
                    return Ok(engine(e));
                }
                Err(e) => format!("the engine cannot open raw sockets: {e}"),
            };
            if !installed(&args.scamper_bin) {
                return Err(format!(
                    "--backend auto: {why}, and {} is not installed (apt-get install -y \
                     scamper); give hoptrace CAP_NET_RAW or install scamper",
                    args.scamper_bin.display()
                ));
            }
            tracing::warn!(reason = %why, "backend: falling back to one scamper process per trace");
            Ok(only(scamper_process(args, netns)))
        }
    }
}

/// Copies the engine's counters into `metrics` every second until `stopped`.
pub async fn export_engine_stats(
    engine: Arc<Engine>,
    metrics: EngineMetrics,
    mut stopped: watch::Receiver<bool>,
) {
    let mut last = EngineStats::default();
    let mut tick = tokio::time::interval(ENGINE_METRICS_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        let now = engine.stats();
        metrics.add(&last, &now);
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_finds_programs_by_path_and_by_name() {
        assert!(installed(Path::new("/bin/sh")));
        assert!(installed(Path::new("sh")));
        assert!(!installed(Path::new("/nonexistent/scamper")));
        assert!(!installed(Path::new("hoptrace-no-such-program")));
        // A directory or a file without execute bits is not a program.
        assert!(!installed(Path::new("/")));
        let plain = tempfile::NamedTempFile::new().expect("temp file");
        assert!(!installed(plain.path()));
    }
}
