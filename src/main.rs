use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = sockbroker::cli::Cli::parse();
    sockbroker::logging::init();
    match sockbroker::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sockbroker: {}", sockbroker::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
