//! scamper as a tracer: the command text for a request, the process-per-trace backend, and
//! the shared daemon driven over its control socket.

pub mod control;
mod daemon;

pub use daemon::{DaemonOptions, ScamperDaemon, session};

use std::{ffi::OsString, sync::Arc};

use async_trait::async_trait;

use crate::{Method, NetNs, Probe, TraceError, TraceOutput, TraceRequest, Tracer, process_group};

/// The ETL rejects files over 90,000,000 bytes; scamper's part of a file is bounded below that
/// (both backends: a process's stdout, the daemon's DATA for one trace).
pub(crate) const MAX_OUTPUT: usize = 89_000_000;

/// How scamper is started.
#[derive(Debug, Clone)]
pub struct ScamperOptions {
    /// The scamper program (a name looked up in `PATH`, or a path).
    pub binary: OsString,
    /// Packets per second (`-p`); scamper's own default (20) when `None`.
    pub pps: Option<u32>,
}

impl Default for ScamperOptions {
    fn default() -> Self {
        Self {
            binary: "scamper".into(),
            pps: None,
        }
    }
}

/// The scamper command (as given to `-I` or written to the control socket) for one request.
///
/// Paris single path is `trace -P udp-paris|icmp-paris|tcp` (scamper's `tcp` keeps both ports
/// fixed, so it is Paris too); multipath is `tracelb -P udp-sport|icmp-echo|tcp-sport`, which
/// vary only the source port and keep the destination port a firewall expects.
///
/// Values are clamped into what scamper 20211212 accepts (it refuses the whole command
/// otherwise, exit 255 with nothing said): `-w` 1–10 s, `-q` 1–10 for `trace` and 1–5 for
/// `tracelb`, `-Q` 50–65535. The service allows more (`--probe-wait` up to 20 s, `--attempts`
/// up to 10, `--probe-budget` from 1) for the in-process engine.
pub fn command(request: &TraceRequest) -> String {
    let limits = &request.limits;
    let wait = limits.wait.as_secs().clamp(1, 10);
    let attempts = limits.attempts.clamp(1, 10);
    let sport = request
        .source_port
        .map_or_else(String::new, |port| format!("-s {port} "));
    match request.method {
        Method::Paris(probe) => {
            let method = match probe {
                Probe::Udp => "udp-paris",
                Probe::Icmp => "icmp-paris",
                Probe::Tcp => "tcp",
            };
            format!(
                "trace -P {method} -q {attempts} -w {wait} -m {} {sport}{}",
                limits.max_ttl.max(1),
                request.dst
            )
        }
        Method::Mda(probe) => {
            // scamper's default is 95.
            let confidence = match limits.confidence {
                crate::Confidence::P95 => "",
                crate::Confidence::P99 => "-c 99 ",
            };
            let method = match probe {
                Probe::Udp => "udp-sport",
                Probe::Icmp => "icmp-echo",
                Probe::Tcp => "tcp-sport",
            };
            format!(
                "tracelb -P {method} -q {} -w {wait} -Q {} {confidence}{sport}{}",
                attempts.min(5),
                limits.probe_budget.clamp(50, 65_535),
                request.dst
            )
        }
    }
}

/// Refuses what scamper 20211212 accepts but cannot do: `tracelb -P tcp-sport` to an IPv6
/// destination sends no probe at all (`probec` 0, checked in the lab), which would pass for an
/// empty trace.
pub fn supported(request: &TraceRequest) -> Result<(), TraceError> {
    match (request.method, request.dst) {
        (Method::Mda(Probe::Tcp), std::net::IpAddr::V6(_)) => Err(TraceError::Unsupported(
            "scamper's tracelb sends no TCP probe over IPv6 (use mda-udp or mda-icmp, or the \
             engine)"
                .to_owned(),
        )),
        _ => Ok(()),
    }
}

/// One `scamper` process per trace: `scamper -o- -O json -I "<command>"`.
///
/// The child runs in its own process group (scamper forks a privileged helper), inside the
/// configured network namespace when there is one; it is killed as a group at the deadline
/// and always reaped. Its JSON is kept byte for byte.
#[derive(Debug, Clone)]
pub struct ScamperProcess {
    options: ScamperOptions,
    netns: Option<Arc<NetNs>>,
}

impl ScamperProcess {
    /// A backend that starts `options.binary`, inside `netns` when given.
    pub fn new(options: ScamperOptions, netns: Option<Arc<NetNs>>) -> Self {
        Self { options, netns }
    }

    /// The arguments scamper gets for `request`.
    pub fn args(&self, request: &TraceRequest) -> Vec<String> {
        let mut args: Vec<String> = ["-o-", "-O", "json"].map(String::from).into();
        if let Some(pps) = self.options.pps {
            args.extend(["-p".to_owned(), pps.to_string()]);
        }
        args.extend(["-I".to_owned(), command(request)]);
        args
    }
}

#[async_trait]
impl Tracer for ScamperProcess {
    fn name(&self) -> &'static str {
        "scamper"
    }

    async fn trace(&self, request: &TraceRequest) -> Result<TraceOutput, TraceError> {
        supported(request)?;
        let done = process_group::run(
            &self.options.binary,
            &self.args(request),
            self.netns.as_deref(),
            request.limits.deadline,
            MAX_OUTPUT,
        )
        .await?;
        let exited = |stderr| TraceError::Exited {
            program: self.options.binary.to_string_lossy().into_owned(),
            status: done.status,
            stderr,
        };
        // An invalid command makes scamper exit 255 with no output: both are checked.
        if !done.status.success() || done.stdout.is_empty() {
            return Err(exited(done.stderr));
        }
        match TraceOutput::from_lines(done.stdout) {
            Ok(output) => Ok(output),
            // A trace scamper could not start (no route to the destination, say) ends cleanly
            // with only the cycle lines, the reason on stderr: that reason is the error.
            Err(_) if !done.stderr.trim().is_empty() => Err(exited(done.stderr)),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, time::Duration};

    use super::*;
    use crate::Limits;

    fn request(method: Method) -> TraceRequest {
        TraceRequest {
            dst: "192.0.2.7".parse::<IpAddr>().expect("addr"),
            method,
            limits: Limits {
                max_ttl: 16,
                attempts: 3,
                wait: Duration::from_secs(1),
                probe_budget: 500,
                confidence: crate::Confidence::P95,
                deadline: Duration::from_secs(30),
            },
            source_port: None,
        }
    }

    #[test]
    fn commands_name_scamper_methods() {
        assert_eq!(
            command(&request(Method::Paris(Probe::Udp))),
            "trace -P udp-paris -q 3 -w 1 -m 16 192.0.2.7"
        );
        assert_eq!(
            command(&request(Method::Paris(Probe::Tcp))),
            "trace -P tcp -q 3 -w 1 -m 16 192.0.2.7"
        );
        assert_eq!(
            command(&request(Method::Mda(Probe::Icmp))),
            "tracelb -P icmp-echo -q 3 -w 1 -Q 500 192.0.2.7"
        );
        assert_eq!(
            command(&request(Method::Mda(Probe::Udp))),
            "tracelb -P udp-sport -q 3 -w 1 -Q 500 192.0.2.7"
        );
        let mut fixed = TraceRequest {
            source_port: Some(40000),
            ..request(Method::Mda(Probe::Tcp))
        };
        fixed.limits.confidence = crate::Confidence::P99;
        assert_eq!(
            command(&fixed),
            "tracelb -P tcp-sport -q 3 -w 1 -Q 500 -c 99 -s 40000 192.0.2.7"
        );
    }

    /// Limits the service allows for the engine but scamper refuses are brought into its range.
    #[test]
    fn limits_are_clamped_to_what_scamper_accepts() {
        let mut wide = request(Method::Mda(Probe::Udp));
        wide.limits.wait = Duration::from_secs(20);
        wide.limits.attempts = 10;
        wide.limits.probe_budget = 1;
        assert_eq!(
            command(&wide),
            "tracelb -P udp-sport -q 5 -w 10 -Q 50 192.0.2.7"
        );
        wide.method = Method::Paris(Probe::Udp);
        assert_eq!(
            command(&wide),
            "trace -P udp-paris -q 10 -w 10 -m 16 192.0.2.7"
        );
    }

    #[test]
    fn tracelb_tcp_to_ipv6_is_refused_before_scamper_runs() {
        let mut tcp6 = request(Method::Mda(Probe::Tcp));
        tcp6.dst = "2001:db8::7".parse().expect("v6");
        let err = supported(&tcp6).expect_err("refused");
        assert_eq!(err.kind(), "unsupported");
        for ok in [Method::Mda(Probe::Udp), Method::Paris(Probe::Tcp)] {
            assert!(
                supported(&TraceRequest { method: ok, ..tcp6 }).is_ok(),
                "{ok:?}"
            );
        }
        assert!(supported(&request(Method::Mda(Probe::Tcp))).is_ok(), "IPv4");
    }

    #[test]
    fn args_put_the_command_after_dash_i() {
        let backend = ScamperProcess::new(
            ScamperOptions {
                binary: "scamper".into(),
                pps: Some(500),
            },
            None,
        );
        let args = backend.args(&request(Method::Paris(Probe::Icmp)));
        assert_eq!(
            args,
            [
                "-o-",
                "-O",
                "json",
                "-p",
                "500",
                "-I",
                "trace -P icmp-paris -q 3 -w 1 -m 16 192.0.2.7"
            ]
        );
    }

    #[tokio::test]
    async fn a_failing_program_reports_status_and_stderr() {
        let backend = ScamperProcess::new(
            ScamperOptions {
                binary: "false".into(),
                pps: None,
            },
            None,
        );
        let err = backend
            .trace(&request(Method::Paris(Probe::Udp)))
            .await
            .expect_err("false fails");
        assert!(matches!(err, TraceError::Exited { .. }), "{err}");
    }
}
