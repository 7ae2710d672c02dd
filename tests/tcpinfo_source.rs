//! tcp-info's event socket as an event source, end to end: a fake tcp-info server (a unix
//! socket writing tcp-info's real line format) drives the service, which traces in the lab.
//! Needs root (namespaces); fails in CI when it cannot run.

mod common;

use std::time::Duration;

use common::{
    lab::{Lab, require_root},
    server::{assert_accounted, lab_server, outcomes},
};
use tokio::{io::AsyncWriteExt, net::UnixListener};

const LIMIT: Duration = Duration::from_secs(60);

fn open(uuid: &str, src: &str, sport: u16, dst: &str, dport: u16) -> String {
    format!(
        r#"{{"Event":0,"Timestamp":"2026-11-22T04:00:00.123456789Z","UUID":"{uuid}","ID":{{"SPort":{sport},"DPort":{dport},"SrcIP":"{src}","DstIP":"{dst}","Interface":0,"Cookie":-42}}}}"#
    ) + "\n"
}

fn close(uuid: &str) -> String {
    format!(
        r#"{{"Event":1,"Timestamp":"2026-11-22T04:00:01.000000001Z","UUID":"{uuid}","ID":null}}"#
    ) + "\n"
}

/// Accepts one client of the fake tcp-info socket (bounded wait).
async fn accept(listener: &UnixListener) -> tokio::net::UnixStream {
    tokio::time::timeout(LIMIT, listener.accept())
        .await
        .expect("hoptrace connects to tcp-info")
        .expect("accept")
        .0
}

async fn metric(addr: std::net::SocketAddr, name: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("admin");
    conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .expect("send");
    let mut body = String::new();
    conn.read_to_string(&mut body).await.expect("read");
    body.lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("{name} not in metrics"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcpinfo_closes_become_traces_through_malformed_lines_and_a_restart() {
    if !require_root("tcpinfo_closes_become_traces_through_malformed_lines_and_a_restart") {
        return;
    }
    let lab = Lab::up();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("tcpevents.sock");
    // The socket is not there yet when hoptrace starts: it keeps trying.
    let socket_arg = socket.to_str().expect("utf-8").to_owned();
    let (mut s, _tools) = lab_server(&lab, &["--tcpinfo-eventsocket", &socket_arg]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let listener = UnixListener::bind(&socket).expect("bind fake tcp-info");
    let mut conn = accept(&listener).await;
    let lines = [
        open(
            "ti_1_A",
            "10.77.1.1",
            443,
            &lab.dst_v4(31).to_string(),
            50001,
        ),
        "this is not json\n".to_owned(),
        // Over-long (several read buffers' worth): skipped whole, counted once.
        "x".repeat(240 * 1024) + "\n",
        r#"{"Event":5,"UUID":"ti_1_X","ID":null}"#.to_owned() + "\n",
        close("ti_1_A"),
        // Opened before hoptrace connected: a close with no open.
        close("ti_1_B"),
        // The other orientation: the local side is the destination of the tuple.
        open(
            "ti_1_C",
            &lab.dst_v4(32).to_string(),
            50002,
            "10.77.1.1",
            443,
        ),
        close("ti_1_C"),
        // A loopback connection is refused, never traced.
        open("ti_1_D", "127.0.0.1", 443, "127.0.0.1", 50003),
        close("ti_1_D"),
    ];
    // Written in awkward pieces: lines split across writes.
    let all = lines.concat();
    for piece in all.as_bytes().chunks(37) {
        conn.write_all(piece).await.expect("write");
    }
    s.wait_status(LIMIT, |st| {
        outcomes(st).traced == 2 && outcomes(st).refused == 1
    })
    .await;

    // tcp-info restarts: the socket goes away and comes back; hoptrace reconnects.
    drop(conn);
    drop(listener);
    std::fs::remove_file(&socket).expect("remove socket");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let listener = UnixListener::bind(&socket).expect("rebind fake tcp-info");
    let mut conn = accept(&listener).await;
    conn.write_all(
        [
            open(
                "ti_1_E",
                "10.77.1.1",
                443,
                &lab.dst_v4(33).to_string(),
                50004,
            ),
            close("ti_1_E"),
        ]
        .concat()
        .as_bytes(),
    )
    .await
    .expect("write");
    let status = s.wait_status(LIMIT, |st| outcomes(st).traced == 3).await;
    assert_eq!(
        status.events_by_source.get("tcpinfo"),
        Some(&4),
        "{status:?}"
    );
    assert_eq!(status.refused_by_reason.get("loopback"), Some(&1));
    assert_accounted(&status);

    for (id, dst) in [("ti_1_A", 31), ("ti_1_C", 32), ("ti_1_E", 33)] {
        let record = s.get(id).await;
        assert_eq!(record.destination, lab.dst_v4(dst).to_string(), "{id}");
    }
    let files = s.files();
    assert_eq!(files.len(), 3, "{files:?}");
    assert!(
        files.iter().all(|f| !f.contains("ti_1_D")),
        "no file for the refused one"
    );

    let admin = s.running.admin_addr;
    for (kind, n) in [
        ("not_json", 1),
        ("too_long", 1),
        ("unknown_event", 1),
        ("close_without_open", 1),
        ("open", 4),
        ("close", 5),
    ] {
        let line = metric(
            admin,
            &format!("hoptrace_tcpinfo_lines_total{{reason=\"{kind}\"}}"),
        )
        .await;
        assert!(line.ends_with(&format!(" {n}")), "{line}");
    }
    let connects = metric(admin, "hoptrace_tcpinfo_connects_total").await;
    assert!(connects.ends_with(" 2"), "{connects}");
    s.stop().await;
}
