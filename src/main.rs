//! The `activekg` binary: parse the command line, load the configuration, hand over to `cli`.

use std::process::ExitCode;

use activekg::cli::{self, Cli, Command};
use activekg::config::Settings;
use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[allow(unsafe_code)]
fn main() -> ExitCode {
    // A sandboxed extraction (see `extract::sandbox`): no configuration, no runtime, no logging.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "extract-child")
    {
        return activekg::extract::sandbox::child_main();
    }
    // SAFETY: first thing in main, before the runtime or any other thread exists.
    unsafe { activekg::embedding::local::single_threaded_model_calls() };
    activekg::embedding::local::keep_freed_memory();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::Env = command {
        // Listing the variables must work when some of them are wrong: that is when one looks them up.
        println!("{}", activekg::config::vars::markdown());
        return ExitCode::SUCCESS;
    }
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("activekg: {err}");
            return ExitCode::from(78);
        }
    };
    init_logging(settings.log_json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("activekg: cannot start the async runtime: {err}");
            return ExitCode::from(70);
        }
    };
    match runtime.block_on(cli::execute(command, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            eprintln!("activekg: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,sqlx=warn,apalis=warn,apalis_core=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
