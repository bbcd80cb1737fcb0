use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = sockbroker::cli::parse();
    sockbroker::logging::init();
    match sockbroker::cli::run(cli) {
        Ok(code) => code,
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sockbroker: {}", sockbroker::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
