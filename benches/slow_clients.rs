//! Slow clients against a gateway that cannot raise its descriptor limit:
//! starts `sluice demo` with a soft and hard open-file limit of 1,024, opens
//! 1,100 connections that send half a request and then nothing (reconnecting
//! whenever the gateway closes one, as a slowloris attack does), and
//! meanwhile measures ordinary clients: a fresh connection and a
//! `GET /health` every 50 ms. It reports what they got and how long they
//! waited.
//!
//!     cargo bench --bench slow_clients [-- --slow N --seconds S]

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GATEWAY_FILE_LIMIT: u64 = 1024;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One slow client: half a request, then silence until the gateway closes
/// the connection; then again.
async fn slow_client(addr: String, open: Arc<AtomicU64>, closed: Arc<AtomicU64>) {
    loop {
        let Ok(mut stream) = TcpStream::connect(&addr).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .await
            .is_err()
        {
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 512];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
        open.fetch_sub(1, Ordering::Relaxed);
        closed.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An ordinary client's request on a fresh connection: its status and how long it took.
async fn health(addr: &str) -> (String, Duration) {
    let started = Instant::now();
    let outcome = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let head = String::from_utf8_lossy(&response);
        head.split_whitespace().nth(1).map(str::to_string)
    };
    let status = tokio::time::timeout(Duration::from_secs(10), outcome)
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| "no answer".into());
    (status, started.elapsed())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let slow = arg("--slow", 1100);
    let seconds = arg("--seconds", 10);
    // This process holds every slow connection's socket.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .args(["demo", "--listen", &addr])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child before exec.
    #[allow(unsafe_code)]
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            rlimit::setrlimit(
                rlimit::Resource::NOFILE,
                GATEWAY_FILE_LIMIT,
                GATEWAY_FILE_LIMIT,
            )
        });
    }
    let mut gateway = command.spawn().expect("sluice demo starts");

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let up = async {
            while health(&addr).await.0 != "200" {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), up)
            .await
            .expect("the gateway answers /health");
        let (open, closed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        for _ in 0..slow {
            tokio::spawn(slow_client(addr.clone(), open.clone(), closed.clone()));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;

        let mut latencies = Vec::new();
        let mut statuses = std::collections::BTreeMap::<String, u64>::new();
        let until = Instant::now() + Duration::from_secs(seconds);
        while Instant::now() < until {
            let (status, took) = health(&addr).await;
            *statuses.entry(status).or_default() += 1;
            latencies.push(took);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        latencies.sort();
        println!(
            "sluice demo with an open-file limit of {GATEWAY_FILE_LIMIT}; {slow} slow clients \
             (half a request, then silence; reconnecting when closed)"
        );
        println!(
            "slow connections open at the end: {}; closed by the gateway over {seconds} s: {}",
            open.load(Ordering::Relaxed),
            closed.load(Ordering::Relaxed)
        );
        println!("\n| ordinary clients | answers | p50 | p99 | max |");
        println!("|---|---|---|---|---|");
        println!(
            "| {} fresh connections, `GET /health` | {} | {:.1} ms | {:.1} ms | {:.1} ms |",
            latencies.len(),
            statuses
                .iter()
                .map(|(status, n)| format!("{n} × {status}"))
                .collect::<Vec<_>>()
                .join(", "),
            percentile(&latencies, 0.5).as_secs_f64() * 1000.0,
            percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
            latencies.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
        );
    });
    let _ = gateway.kill();
    let _ = gateway.wait();
}
