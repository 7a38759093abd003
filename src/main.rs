//! The `sluice` binary: parses the command line, loads the config, runs.

fn main() -> std::process::ExitCode {
    sluice::cli::main()
}
