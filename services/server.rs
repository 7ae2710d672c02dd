//! `hoptrace serve`: assembles the pipeline, the gRPC API (with health and reflection) and
//! the admin HTTP server, and shuts them down in order.

use std::{
    net::SocketAddr,
    num::NonZeroUsize,
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{Router, routing::get};
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic::transport::server::TcpIncoming;
use tower::ServiceBuilder;

use crate::{
    config::{ConfigError, ServeArgs},
    conn_id::ConnectionIds,
    event::{InvalidEvent, Source},
    grpc::HoptraceService,
    hub::{Hub, HubConfig},
    metrics::{Metrics, render},
    pipeline::{Pipeline, PipelineConfig, failure_reasons},
    policy::{Policy, Refusal, interface_addresses},
    privileges::{InNamespace, Opened},
    proto::{self, hoptrace_server::HoptraceServer},
    sources::{
        host_sockets::{self, HostSockets, HostSocketsConfig},
        tcpinfo::{TcpInfoConfig, TcpInfoSource},
    },
    store::TraceStore,
};

/// How often this host's addresses are re-read and the cache swept.
const HOUSEKEEPING: Duration = Duration::from_secs(30);

/// Largest response (a record holds a whole trace file, at most the ETL's 90 MB).
const MAX_RESPONSE_BYTES: usize = 96 * 1024 * 1024;

/// gRPC requests served at once across all connections; beyond it they wait.
const MAX_CONCURRENT_REQUESTS: usize = 4096;

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting cannot work (exit status 64).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// A started server.
#[derive(Debug)]
pub struct Running {
    /// Where the gRPC API listens.
    pub grpc_addr: SocketAddr,
    /// Where the admin HTTP server listens.
    pub admin_addr: SocketAddr,
    /// The pipeline (for tests and status).
    pub pipeline: Arc<Pipeline>,
    stop: watch::Sender<bool>,
    /// Turns true once every accepted trace has settled: then subscriptions end.
    drained: watch::Sender<bool>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    workers: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
}

/// The addresses of this host (and of the probe namespace), which are never traced.
fn own_addresses(inside: Option<&InNamespace>) -> Vec<std::net::IpAddr> {
    let mut addrs = interface_addresses();
    if let Some(ns) = inside {
        addrs.extend(ns.run(interface_addresses).unwrap_or_default());
    }
    addrs
}

fn on_demand_prefix(started: SystemTime) -> String {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let secs = started
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("trace-{host}_{secs}")
}

/// Checks the settings, opens everything they name, binds both listeners and starts serving.
/// Everything that can be wrong with the configuration is reported before anything binds.
pub async fn start(args: ServeArgs) -> Result<Running, StartError> {
    args.validate()?;
    let opened = Opened::open(&args).map_err(ConfigError)?;
    start_opened(args, opened).await
}

/// [`start`] with what needs a capability already opened ([`Opened::open`]), perhaps with the
/// capabilities dropped since.
pub async fn start_opened(args: ServeArgs, opened: Opened) -> Result<Running, StartError> {
    args.validate()?;
    let config_err = |e: String| StartError::Config(ConfigError(e));
    let Opened {
        netns,
        sockets,
        host_socket,
        inside,
    } = opened;
    let chosen = crate::backend::choose(&args, netns.clone(), sockets).map_err(config_err)?;
    let tracer = chosen.tracer;
    let store = Arc::new(
        TraceStore::open(&args.output_dir, args.version_tag.clone())
            .map_err(|e| config_err(format!("--output-dir: {e}")))?,
    );
    let ids = ConnectionIds::new(&args.conn_id_pattern)
        .map_err(|e| config_err(format!("--conn-id-pattern: {e}")))?;

    let sources: Vec<_> = Source::ALL.iter().map(|s| s.label()).collect();
    let refusals: Vec<_> = Refusal::ALL.iter().map(|r| r.label()).collect();
    let failures: Vec<_> = failure_reasons().collect();
    let (metrics, registry) = Metrics::new(&sources, &refusals, &failures, &InvalidEvent::LABELS);
    let metrics = Arc::new(metrics);

    let policy = Arc::new(Policy::new(
        args.allow_private,
        args.deny.clone(),
        args.local_addr.clone(),
    ));
    policy.set_own_addresses(own_addresses(inside.as_ref()));

    let started = SystemTime::now();
    let run = started
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let hub = Arc::new(Hub::new(
        run,
        HubConfig {
            queue: args.subscriber_queue,
            retention: args.retention,
            max_subscribers: args.max_subscribers,
        },
        metrics.hub.clone(),
    ));
    let (pipeline, queue) = Pipeline::new(
        tracer,
        Arc::clone(&policy),
        ids,
        Arc::clone(&store),
        Arc::clone(&hub),
        Arc::clone(&metrics),
        PipelineConfig {
            method: args.method,
            limits: args.limits(),
            source_port: args.source_port,
            cache: args.cache(),
            queue_capacity: args.queue_capacity,
            concurrency: args.concurrency,
            cached_writes: 64,
            on_demand_prefix: on_demand_prefix(started),
            lookup_days: 31,
        },
    );

    let grpc_listener =
        TcpListener::bind(args.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: args.listen,
                source,
            })?;
    let admin_listener = TcpListener::bind(args.admin_listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: args.admin_listen,
            source,
        })?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: args.listen,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: args.admin_listen,
            source,
        })?;

    let (stop, stopped) = watch::channel(false);
    let (drained, drained_rx) = watch::channel(false);
    let workers = tokio::spawn(Arc::clone(&pipeline).run_workers(
        queue,
        stopped.clone(),
        args.shutdown_grace,
    ));

    let policy_for_sources = Arc::clone(&policy);
    let housekeeping = {
        let (pipeline, policy, mut stopped) = (Arc::clone(&pipeline), policy, stopped.clone());
        let inside = inside.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HOUSEKEEPING);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.wait_for(|s| *s) => return,
                }
                pipeline.sweep_cache();
                let ns = inside.clone();
                if let Ok(addrs) =
                    tokio::task::spawn_blocking(move || own_addresses(ns.as_ref())).await
                {
                    policy.set_own_addresses(addrs);
                }
            }
        })
    };

    let admin = tokio::spawn(serve_admin(admin_listener, registry, stopped.clone()));
    let mut tasks = vec![housekeeping, admin];
    if let Some(engine) = chosen.engine {
        tasks.push(tokio::spawn(crate::backend::export_engine_stats(
            engine,
            metrics.engine.clone(),
            stopped.clone(),
        )));
    }
    if let Some(fd) = host_socket {
        match fd {
            Ok(fd) => {
                let watcher = HostSockets::new(
                    HostSocketsConfig {
                        exclude_local_ports: args.watch_exclude_ports.clone(),
                        exclude_remote: args.watch_exclude_remote.clone(),
                        queue: args.queue_capacity.max(1024),
                    },
                    metrics.host_sockets.clone(),
                    host_sockets::id_prefix(),
                );
                let (pipeline, stopped) = (Arc::clone(&pipeline), stopped.clone());
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = watcher.run(fd, pipeline, stopped).await {
                        tracing::error!(error = %e, "host socket watcher stopped");
                    }
                }));
            }
            // On by default, so a host that refuses it still gets a working service.
            Err(e) => {
                tracing::warn!(error = %e, "not watching this host's sockets; events come from the API and tcp-info only")
            }
        }
    }
    if let Some(path) = &args.tcpinfo_eventsocket {
        let source = TcpInfoSource::new(
            TcpInfoConfig {
                path: path.clone(),
                max_opens: NonZeroUsize::new(args.tcpinfo_max_opens).unwrap_or(NonZeroUsize::MIN),
                open_ttl: args.tcpinfo_open_ttl,
                queue: args.queue_capacity.max(1024),
                backoff: (Duration::from_millis(100), Duration::from_secs(5)),
            },
            metrics.tcpinfo.clone(),
            Arc::clone(&policy_for_sources),
        );
        tasks.push(tokio::spawn(
            source.run(Arc::clone(&pipeline), stopped.clone()),
        ));
    }

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<HoptraceServer<HoptraceService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| config_err(format!("reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| config_err(format!("reflection: {e}")))?;
    let api = HoptraceServer::new(HoptraceService::new(
        Arc::clone(&pipeline),
        args.version_tag.clone(),
    ))
    .max_decoding_message_size(args.max_request_bytes)
    .max_encoding_message_size(MAX_RESPONSE_BYTES);

    let grpc = {
        let mut drained = drained_rx;
        let hub = Arc::clone(&hub);
        tokio::spawn(
            tonic::transport::Server::builder()
                .layer(
                    ServiceBuilder::new()
                        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                            MAX_CONCURRENT_REQUESTS,
                        ))
                        .into_inner(),
                )
                .add_service(health)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .add_service(api)
                // Nagle off: with it, every small response waited for the client's delayed
                // ACK (about 40 ms per on-demand trace; tonic's own `tcp_nodelay` does not
                // apply to an incoming stream it is handed).
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
                    async move {
                        // Serving on until the traces of the shutdown grace are published,
                        // so subscribers get them; subscriptions never end on their own: end
                        // them so the server's graceful shutdown can finish.
                        let _ = drained.wait_for(|d| *d).await;
                        hub.close();
                    },
                ),
        )
    };
    tracing::info!(%grpc_addr, %admin_addr, backend = pipeline.backend(), output = %store.root().display(), "hoptrace serving");
    Ok(Running {
        grpc_addr,
        admin_addr,
        pipeline,
        stop,
        drained,
        grpc,
        workers,
        tasks,
    })
}

async fn serve_admin(
    listener: TcpListener,
    registry: Registry,
    mut stopped: watch::Receiver<bool>,
) {
    let registry = Arc::new(registry);
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = Arc::clone(&registry);
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        render(&registry),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stopped.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "admin server failed");
    }
}

impl Running {
    /// Stops the service: queued traces and new requests aborted, running traces given the
    /// shutdown grace (then stopped), their records and cached copies published; then the
    /// subscriptions end and the API stops.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.workers.await;
        self.pipeline.drain().await;
        let _ = self.drained.send(true);
        self.pipeline.shutdown_backend().await;
        let mut grpc = self.grpc;
        match tokio::time::timeout(Duration::from_secs(5), &mut grpc).await {
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "gRPC server failed"),
            Ok(_) => {}
            Err(_) => {
                tracing::warn!("gRPC connections still open after 5s; closing them");
                grpc.abort();
            }
        }
        for task in self.tasks {
            let _ = task.await;
        }
        tracing::info!("hoptrace stopped");
    }

    /// Serves until `signal` completes, then shuts down.
    pub async fn serve_until(self, signal: impl std::future::Future<Output = ()>) {
        tokio::select! {
            _ = signal => {}
            _ = self.stop.closed() => {}
        }
        self.shutdown().await;
    }
}
