//! `foreman reload`: checks the configuration as `check-config` does, then sends SIGHUP to the
//! daemon whose pid its PID file's lock names, and waits for the daemon's answer beside that file
//! (`reload_report`). The command and the daemon read the same file: the command's check tells the
//! operator at once why a configuration is refused, and the answer says what the daemon did.

use std::path::Path;
use std::time::{Duration, Instant};

use clap::Args;

use super::{DaemonArgs, Globals, print};
use crate::clock::unix_now;
use crate::duration::parse_duration;
use crate::error::{Error, Result};
use crate::pid_guard::DaemonState;
use crate::reload_report::ReloadReport;

// 3 is for a reload that applied but could not apply everything: a supervisor (systemctl reload)
// must not report success for a `db` that did not change, nor failure for the pools that did.
const EXIT_CODES: &str = "\
Exit codes:
  0  reloaded: the daemon applies the configuration
  1  no daemon holds the PID file's lock, it cannot be signalled, or it did not answer in time
     (see its log)
  2  the configuration is refused (by this command's check or by the daemon), which keeps the
     running one; or the database has no PID file to find the daemon by
  3  reloaded, except settings that change only at a restart (db, wakeup_dir, pid_file,
     sentry_*): they keep their running values

Under systemd: ExecReload=/usr/local/bin/foreman reload --config /etc/foreman/foreman.toml";

/// Tell the running daemon to read its configuration again, and wait until it has
///
/// The configuration is checked first, as `check-config` does: one that does not load, or names a
/// program or directory that is not there, is refused with the reason (exit 2) and nothing is
/// sent. Then SIGHUP goes to the daemon whose pid the PID file's lock names, and the command waits
/// for its answer.
///
/// The daemon reads the file again, with the flags and environment it was started with: changed
/// settings apply (workers, prefetch, timeouts, pools added, removed or changed, command tasks,
/// retries, schedules), each pool's processes are replaced one at a time, each after its current
/// task, and nothing queued or running is lost. Give this command the flags and environment `run`
/// was given (--config, --db, --workers…): they find the PID file and make the check read the
/// configuration as the daemon will; they change nothing in the daemon.
///
/// A database without a PID file (PostgreSQL, where daemons share it) has no daemon to find: send
/// SIGHUP to each daemon instead (`kill -HUP PID`; `systemctl reload`), which reloads it the same
/// way, without this check or an answer.
#[derive(Args, Debug, Default)]
#[command(after_help = EXIT_CODES)]
pub struct ReloadArgs {
    /// How long to wait for the daemon's answer
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    // The settings `run` was given on its command line (or in FOREMAN_WORKERS…), for the check.
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// How often the answer is looked for: a reload takes the daemon milliseconds.
const LOOK_EVERY: Duration = Duration::from_millis(10);

pub fn run(globals: &Globals, args: &ReloadArgs) -> Result<()> {
    let config = globals.load_config_with(&args.daemon)?;
    super::check_config::check(&config)?;
    let Some(pid_file) = config.pid_file.as_deref() else {
        return Err(Error::Config(format!(
            "database {} has no PID file to find the daemon by (daemons may share it): send SIGHUP to each daemon (kill -HUP PID, or systemctl reload)",
            config.db
        )));
    };
    let pid = match DaemonState::probe(pid_file)? {
        DaemonState::Running { pid: Some(pid) } => pid,
        DaemonState::Running { pid: None } => {
            return Err(Error::Environment(format!(
                "a daemon holds the lock on {}, but the file does not say its pid",
                pid_file.display()
            )));
        }
        DaemonState::NotRunning => {
            return Err(Error::Environment(format!(
                "foreman is not running: no daemon holds the lock on {}",
                pid_file.display()
            )));
        }
    };
    let sent_at = unix_now();
    signal_hup(pid)?;
    let report = wait_for_answer(pid_file, pid, sent_at, args.timeout)?;
    if !report.applied {
        return Err(Error::Config(format!(
            "foreman pid {pid} refused the configuration and keeps the running one: {}",
            report.message
        )));
    }
    print(&format!("foreman pid {pid} reloaded {}\n", report.message))?;
    if report.restart_needed.is_empty() {
        return Ok(());
    }
    Err(Error::Exit {
        code: 3,
        message: Some(report.restart_needed.join("; ")),
    })
}

fn signal_hup(pid: u32) -> Result<()> {
    let target = libc::pid_t::try_from(pid)
        .map_err(|_| Error::Environment(format!("the PID file names pid {pid}, out of range")))?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(target, libc::SIGHUP) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::Environment(format!(
            "cannot send SIGHUP to foreman pid {pid}: {e} (run this as the daemon's user, or root)"
        )));
    }
    Ok(())
}

/// The daemon's answer to the reload asked at `sent_at`: the first one it writes for a reload it
/// took after that.
fn wait_for_answer(
    pid_file: &Path,
    pid: u32,
    sent_at: f64,
    timeout: Duration,
) -> Result<ReloadReport> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(report) = crate::reload_report::read(pid_file)
            && report.pid == pid
            && report.requested_at >= sent_at
        {
            return Ok(report);
        }
        if Instant::now() >= deadline {
            return Err(Error::Environment(format!(
                "sent SIGHUP to foreman pid {pid}, which did not answer within {} in {}: see its log",
                crate::duration::format_duration(timeout),
                crate::reload_report::path(pid_file).display()
            )));
        }
        std::thread::sleep(LOOK_EVERY);
    }
}
