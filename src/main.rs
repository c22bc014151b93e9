//! The `foreman` binary: parse the command line, set up logging, run the command, map errors to exit
//! codes. Everything else lives in the library.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;
use foreman::cli::{Cli, execute};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.globals.log_level);
    let sentry = init_sentry(&cli);
    let code = match execute(&cli, foreman::forward_shutdown_signals) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Does nothing unless Sentry was initialised, which only `run` does.
            foreman::alert::startup_error(&e);
            // Empty for a command that printed its answer and only has a status to add.
            let message = e.to_string();
            if !message.is_empty() {
                log::error!("{message}");
            }
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    };
    close_sentry(sentry);
    code
}

/// Sends what is queued for Sentry, within `FLUSH_TIMEOUT`. The guard is not dropped: its drop
/// joins the transport's thread, which waits for a request in flight without a time limit (a
/// Sentry host that accepts the connection but never answers would hold the exit forever). The
/// process exits with the thread still running.
#[cfg(feature = "sentry")]
fn close_sentry(guard: Option<sentry::ClientInitGuard>) {
    if let Some(guard) = guard {
        if !guard.flush(Some(foreman::alert::FLUSH_TIMEOUT)) {
            log::warn!(
                "Sentry did not take the queued reports within {:?}; they are dropped",
                foreman::alert::FLUSH_TIMEOUT
            );
        }
        std::mem::forget(guard);
    }
}

#[cfg(not(feature = "sentry"))]
fn close_sentry(_guard: Option<std::convert::Infallible>) {}

/// Sentry for `run` only: the other commands have a person watching their output. A config that
/// does not load is still reported, if `SENTRY_DSN` says where (`run` then fails with its error).
#[cfg(feature = "sentry")]
fn init_sentry(cli: &Cli) -> Option<sentry::ClientInitGuard> {
    let sentry = match cli.run_config()? {
        Ok(config) => config.sentry,
        Err(_) => foreman::alert::config_from_env(),
    };
    match foreman::alert::client_options(&sentry) {
        Ok(Some(options)) => {
            if let Some(dsn) = &options.dsn {
                log::info!("reporting failures to Sentry at {}", dsn.host());
            }
            Some(sentry::init(options))
        }
        Ok(None) => None,
        Err(e) => {
            log::error!("{e}; failures are not reported to Sentry");
            None
        }
    }
}

/// Built without the `sentry` feature: nothing to initialise.
#[cfg(not(feature = "sentry"))]
fn init_sentry(_cli: &Cli) -> Option<std::convert::Infallible> {
    None
}

/// `--log-level` wins over `RUST_LOG`; default info. Under systemd (`JOURNAL_STREAM` set) lines carry
/// `<N>` syslog priorities and no timestamp, since the journal adds its own.
fn init_logging(level: Option<log::LevelFilter>) {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(log::LevelFilter::Info);
    // The PostgreSQL driver logs every statement with its parameters (tasks' args) at debug:
    // only when RUST_LOG names it.
    for driver in ["postgres", "tokio_postgres"] {
        builder.filter_module(driver, log::LevelFilter::Warn);
    }
    if let Ok(spec) = std::env::var("RUST_LOG") {
        builder.parse_filters(&spec);
    }
    if let Some(level) = level {
        builder.filter_level(level);
        for driver in ["postgres", "tokio_postgres"] {
            builder.filter_module(driver, level.min(log::LevelFilter::Warn));
        }
    }
    if stderr_is_journal() {
        builder.format(|buf, record| {
            let priority = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(buf, "<{priority}>{}", record.args())
        });
    } else {
        builder.format_target(false);
    }
    builder.init();
}

/// systemd sets `JOURNAL_STREAM=<dev>:<inode>` of the stream it connected; it is ours only if
/// stderr is still that stream (children and redirections inherit the variable, not the stream).
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|meta| {
        std::os::unix::fs::MetadataExt::dev(&meta) == dev
            && std::os::unix::fs::MetadataExt::ino(&meta) == ino
    })
}
