//! The simulated vLLM as a process of its own, for tests that kill a
//! replica outright (SIGKILL) and for trying sluice by hand:
//!
//!     sluice-simulator [--listen 127.0.0.1:0] [--token-delay-ms 20] [--model sim-llama]
//!                      [--max-num-seqs 0] [--load-slowdown 0]
//!
//! Prints `listening on http://ADDR` once it accepts connections.

use std::time::Duration;

use sluice_simulator::{Simulator, SimulatorConfig};

fn main() -> std::process::ExitCode {
    let mut config = SimulatorConfig::default();
    let mut listen = String::from("127.0.0.1:0");
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next();
        let parsed = match (flag.as_str(), value) {
            ("--listen", Some(v)) => {
                listen = v;
                Ok::<(), ()>(())
            }
            ("--token-delay-ms", Some(v)) => v
                .parse()
                .map(|ms| config.token_delay = Duration::from_millis(ms))
                .map_err(drop),
            ("--first-token-delay-ms", Some(v)) => v
                .parse()
                .map(|ms| config.first_token_delay = Duration::from_millis(ms))
                .map_err(drop),
            ("--max-num-seqs", Some(v)) => v.parse().map(|n| config.max_num_seqs = n).map_err(drop),
            ("--load-slowdown", Some(v)) => v
                .parse::<f64>()
                .map(|f| config.load_slowdown = f)
                .map_err(drop),
            ("--model", Some(v)) => {
                config.model = v;
                Ok(())
            }
            _ => {
                eprintln!(
                    "usage: sluice-simulator [--listen ADDR] [--token-delay-ms N] [--first-token-delay-ms N] [--max-num-seqs N] [--load-slowdown F] [--model NAME]"
                );
                return std::process::ExitCode::from(2);
            }
        };
        if parsed.is_err() {
            eprintln!("sluice-simulator: `{flag}` takes a number");
            return std::process::ExitCode::from(2);
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("sluice-simulator: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(&listen).await {
            Ok(listener) => listener,
            Err(err) => {
                eprintln!("sluice-simulator: cannot listen on {listen}: {err}");
                return std::process::ExitCode::FAILURE;
            }
        };
        let simulator = match Simulator::serve(config, listener) {
            Ok(simulator) => simulator,
            Err(err) => {
                eprintln!("sluice-simulator: {err}");
                return std::process::ExitCode::FAILURE;
            }
        };
        println!("listening on {}", simulator.url());
        std::future::pending::<()>().await;
        std::process::ExitCode::SUCCESS
    })
}
