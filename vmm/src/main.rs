//! `ferrio` command-line entry point: parse, build the VM, run it, map the outcome to
//! an exit code. Errors are one line on stderr, never a panic or backtrace.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use ferrio_vmm::cli::{self, Cli, Command};
use ferrio_vmm::console::TerminalGuard;
use ferrio_vmm::exit::install_signal_handlers;
use ferrio_vmm::vm::Vm;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRIO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(cli.log_filter()));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    match cli.command {
        Command::Run(args) => match run(args) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("ferrio: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run(args: cli::RunArgs) -> Result<u8, ferrio_vmm::error::Error> {
    let config = cli::parse_config(args)?;
    let vm = Vm::start(&config)?;
    install_signal_handlers(vm.stop_signal()).map_err(|source| ferrio_vmm::error::Error::Io {
        what: "installing signal handlers",
        source,
    })?;
    let terminal = TerminalGuard::new();
    vm.confine_main_thread()?;
    let reason = vm.wait();
    drop(terminal);
    if let Some(msg) = reason.message() {
        eprintln!("ferrio: {msg}");
    }
    Ok(u8::try_from(reason.exit_code()).unwrap_or(1))
}
