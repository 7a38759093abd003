//! Stand-ins for separate processes: a gateway edge or Kafka worker on a
//! runtime of its own (killed as a process is, dropping every task and client
//! at once), and the simulated vLLM as a real process to SIGKILL.

use std::sync::Arc;

use sluice::backends::store::Store;
use sluice::config::Config;

use super::capture_logs;

/// A separate tokio runtime, as if it were another process: killing it drops
/// every task and client it owns at once.
pub struct Isolated {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Isolated {
    pub fn new(name: &str) -> Self {
        capture_logs();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(name)
            .enable_all()
            .build()
            .expect("runtime");
        Self {
            runtime: Some(runtime),
        }
    }

    /// Runs `future` on this runtime and waits for its result.
    pub async fn run<F, T>(&self, future: F) -> T
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        self.runtime
            .as_ref()
            .expect("alive")
            .spawn(future)
            .await
            .expect("task")
    }

    /// Starts a gateway edge on this runtime; returns its base URL and store.
    pub async fn start_edge(&self, config: Config) -> (String, Arc<dyn Store>) {
        self.run(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let gateway = sluice::Gateway::start(config).await.expect("edge starts");
            let store = gateway.store();
            tokio::spawn(gateway.serve(listener, std::future::pending()));
            (format!("http://{addr}"), store)
        })
        .await
    }

    /// Starts a standalone Kafka worker on this runtime; returns its metrics.
    pub async fn start_worker(
        &self,
        config: Config,
    ) -> Arc<sluice::observe::metrics::MetricsRegistry> {
        self.run(async move {
            let worker = sluice::app::StandaloneWorker::start(&config)
                .await
                .expect("worker starts");
            let metrics = worker.metrics.clone();
            // Runs until the runtime is killed, which drops it with its Kafka
            // clients (as a killed process loses them).
            tokio::spawn(async move {
                let _worker = worker;
                std::future::pending::<()>().await
            });
            metrics
        })
        .await
    }

    /// Stops the runtime abruptly, like a killed process.
    pub fn kill(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The simulated vLLM as a process of its own (the `sluice-simulator`
/// binary, which `cargo test --workspace` builds beside the tests), killed
/// with SIGKILL by [`SimulatorProcess::kill`] or when dropped.
pub struct SimulatorProcess {
    child: std::process::Child,
    pub url: String,
}

impl SimulatorProcess {
    pub fn start(args: &[&str]) -> Self {
        use std::io::BufRead;
        let exe = std::env::current_exe().unwrap();
        let binary = exe
            .parent()
            .and_then(std::path::Path::parent)
            .map(|dir| dir.join("sluice-simulator"))
            .filter(|path| path.exists())
            .expect("the sluice-simulator binary beside the tests: run `cargo test --workspace` (scripts/test.sh does)");
        let mut child = std::process::Command::new(binary)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("the simulator said {line:?}"))
            .to_string();
        Self { child, url }
    }

    /// SIGKILL: the replica dies as a crashed one does, mid-answer.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SimulatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
