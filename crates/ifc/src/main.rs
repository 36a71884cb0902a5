//! The `ifc` binary: parses the command line, sets up logging, runs the command on a tokio
//! runtime and turns its result into a documented exit code (see `ifc --help`).

mod agent;
mod cli;
mod cmd;
mod coordinator;
mod exit;
mod history;
mod metrics;
mod output;
mod settings;
mod ui;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(agent::SHIM) {
        return agent::shim(&args[2..]);
    }
    let cli = cli::parse();
    // An agent logs its claims and releases by default; the one-shot commands only warnings.
    let default_level = if matches!(cli.command, cli::Command::Agent(_)) {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        // A closed stderr (`ifc agent 2>&1 | head -1`) loses the log, never the agent: an
        // unwritable event is not reported on the same stderr (which panicked, exit 101).
        .log_internal_errors(false);
    match cli.log_format {
        cli::LogFormat::Json => logs.json().init(),
        cli::LogFormat::Human => logs.init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say(&format!("error: cannot start the async runtime: {e}"));
            return ExitCode::from(exit::INFRA);
        }
    };
    let result = runtime.block_on(cmd::run(&cli.global, &cli.command));
    // The command is done (an agent has released its leases and flushed its git mirror): a
    // blocking store call still in flight in a background task does not hold up the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(code) => ExitCode::from(code),
        // The reader of the output went away (`ifc status | head -3`): it had what it wanted,
        // as ripgrep and friends see it, nothing to report.
        Err(err) if closed_stdout(&err) => ExitCode::SUCCESS,
        Err(err) => {
            // One line per problem (a board's every malformed row), each made printable.
            let text = format!("{err:#}");
            let lines: Vec<String> = text.lines().map(output::printable).collect();
            say(&format!("error: {}", lines.join("\n")));
            ExitCode::from(exit::code(&err))
        }
    }
}

/// Whether `err` is a write to a pipe whose reader closed it.
fn closed_stdout(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Writes a line to stderr, ignoring a closed stderr (the exit code still says what happened).
fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}
