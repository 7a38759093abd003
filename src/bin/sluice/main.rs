//! The `sluice` binary: parses the command line, loads the config, runs.

mod cli;
#[cfg(feature = "demo")]
mod demo;

fn main() -> std::process::ExitCode {
    cli::main()
}
