//! Runs one command task: spawns its argv directly (never through a shell) in its own process group,
//! writes the task as JSON to its stdin, logs its output lines tagged with the task id (within a
//! `LineBudget`), and turns the exit status into an outcome, and the file named by
//! `FOREMAN_RESULT_FILE` into its result (`ResultFiles`). The child dies with the daemon, even on
//! `kill -9`.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::children::{Children, KILL_GRACE, kill_group};
use crate::duration::format_duration;
use crate::line_budget::LineBudget;
use crate::outcome::{MAX_RESULT_BYTES, Outcome, Reported, result_text, too_big};
use crate::registry::CommandSpec;
use crate::task::Task;

/// The environment variable naming the file where a command task may write its result (JSON).
pub const RESULT_FILE_ENV: &str = "FOREMAN_RESULT_FILE";

/// Where command tasks write their results: a private directory (mode 0700) made in the system's
/// temporary directory by the first command task, holding one file per attempt while it runs, and
/// removed with the daemon. A file of its own, not the command's stdout: output is the task's
/// log, and a result can never be mistaken for a line of it.
#[derive(Default)]
pub struct ResultFiles {
    dir: OnceLock<Option<PathBuf>>,
}

impl ResultFiles {
    /// The file for one attempt; `None` (logged once) when no directory could be made.
    fn path_for(&self, task: &Task) -> Option<PathBuf> {
        let dir = self.dir.get_or_init(|| {
            let base = std::env::temp_dir();
            let made = (0..8).find_map(|_| {
                let dir = base.join(format!(
                    "foreman-results-{}-{:08x}",
                    std::process::id(),
                    fastrand::u32(..)
                ));
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&dir)
                    .ok()
                    .map(|()| dir)
            });
            if made.is_none() {
                log::warn!(
                    "cannot make a directory for command results in {}: command tasks run without ${RESULT_FILE_ENV}",
                    base.display()
                );
            }
            made
        });
        Some(
            dir.as_ref()?
                .join(format!("{}.{}.json", task.id, task.attempt)),
        )
    }
}

impl ResultFiles {
    /// Removes the directory, if it was made: at the daemon's exit, when no task runs any more
    /// (or none will be waited for).
    pub fn remove(&self) {
        if let Some(Some(dir)) = self.dir.get() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The result a command wrote to its file (which is removed): `None` for no file or an empty one;
/// `Err` (the attempt's failure) for a file that is not JSON or is over the size limit.
fn take_result(path: &Path) -> Result<Option<String>, String> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read its ${RESULT_FILE_ENV}: {e}")),
    };
    let mut text = Vec::new();
    let read = file
        .take(MAX_RESULT_BYTES as u64 + 1)
        .read_to_end(&mut text);
    let size = std::fs::metadata(path).map_or(text.len(), |m| m.len() as usize);
    let _ = std::fs::remove_file(path);
    read.map_err(|e| format!("cannot read its ${RESULT_FILE_ENV}: {e}"))?;
    if size > MAX_RESULT_BYTES {
        return Err(too_big(size));
    }
    if text.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| format!("its ${RESULT_FILE_ENV} does not hold one JSON value: {e}"))?;
    result_text(&value)
}

/// The exit status by which a command says it succeeded but found nothing new (for adaptive
/// schedules); 0 means it did.
pub const EXIT_UNEVENTFUL: i32 = 75;

/// Lines of stderr quoted in a failure message.
const STDERR_TAIL_LINES: usize = 5;
/// A line longer than this is logged in pieces, so a child writing without newlines cannot make
/// the daemon buffer without bound.
const MAX_LINE_BYTES: usize = 8192;
/// After the child exits, output still readable (a grandchild may hold the pipes) is drained up to
/// this much, then the pipes are closed.
const MAX_DRAIN_AFTER_EXIT: usize = 1 << 20;

/// Runs the task's command to completion: exit 0 is done (eventful), `EXIT_UNEVENTFUL` done and
/// uneventful, anything else a failure with a one-line reason. Past `timeout`, the command's
/// process group gets SIGTERM, then SIGKILL after `KILL_GRACE`. A done command's result is what
/// it wrote to `$FOREMAN_RESULT_FILE`.
pub fn run(
    task: &Task,
    command: &CommandSpec,
    timeout: Option<Duration>,
    children: &Children,
    results: &ResultFiles,
) -> Reported {
    let result_file = results.path_for(task);
    let mut exit_code = None;
    let outcome = match run_command(
        task,
        command,
        timeout,
        children,
        result_file.as_deref(),
        &mut exit_code,
    ) {
        Ok(outcome) | Err(outcome) => outcome,
    };
    let Some(path) = result_file else {
        return Reported {
            outcome,
            result: None,
            exit_code,
        };
    };
    let taken = take_result(&path);
    match (outcome, taken) {
        (outcome @ Outcome::Done { .. }, Ok(result)) => Reported {
            outcome,
            result,
            exit_code,
        },
        (Outcome::Done { .. }, Err(why)) => Reported {
            outcome: Outcome::Failed(format!("command exited with status 0, but {why}")),
            result: None,
            exit_code,
        },
        // A failed command's result file is removed, not read.
        (outcome, _) => Reported {
            outcome,
            result: None,
            exit_code,
        },
    }
}

fn run_command(
    task: &Task,
    command: &CommandSpec,
    timeout: Option<Duration>,
    children: &Children,
    result_file: Option<&Path>,
    exit_code: &mut Option<i32>,
) -> Result<Outcome, Outcome> {
    let started = Instant::now();
    let argv = &command.argv;
    let (id, attempt) = (task.id.to_string(), task.attempt.to_string());
    // The configured ones first: the task's own come last, and `Config` keeps `env` from
    // setting them.
    let mut env: Vec<(&str, &OsStr)> = command
        .env
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_os_str()))
        .collect();
    env.extend([
        ("FOREMAN_TASK_ID", OsStr::new(&id)),
        ("FOREMAN_TASK_NAME", OsStr::new(&task.name)),
        ("FOREMAN_ATTEMPT", OsStr::new(&attempt)),
    ]);
    if let Some(path) = result_file {
        env.push((RESULT_FILE_ENV, path.as_os_str()));
    }
    let child = crate::spawn::spawn(argv, command.cwd.as_deref(), &env).map_err(|e| {
        let program = argv.first().map_or("", String::as_str);
        Outcome::Failed(format!("cannot start command {program:?}: {e}"))
    })?;
    let pid = child.pid;
    children.insert(task.id, pid);

    let mut pump = Pump::new(task, child);
    let timed_out = pump.run(timeout.and_then(|t| started.checked_add(t)), pid);
    let stderr_tail = pump.stderr.tail.take().unwrap_or_default();
    drop(pump);

    // Wait for the exit without reaping, so the pid cannot be recycled while the foreman loop may
    // still signal it; only then forget it and reap.
    wait_exited_no_reap(pid);
    if timed_out {
        // The leader may have exited on SIGTERM before the SIGKILL was due; what it started must
        // not outlive the timeout. Sent before the reap, while the zombie still holds the group id.
        kill_group(pid, libc::SIGKILL);
    }
    children.remove(task.id);
    let status = crate::spawn::reap(pid)
        .map_err(|e| Outcome::Failed(format!("waiting for command {:?}: {e}", argv[0])))?;
    *exit_code = status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal));
    if let Some(timeout) = timeout.filter(|_| timed_out) {
        return Err(Outcome::Timeout(format!(
            "timeout after {}",
            format_duration(timeout)
        )));
    }
    match status.code() {
        Some(0) => return Ok(Outcome::Done { eventful: true }),
        Some(EXIT_UNEVENTFUL) => return Ok(Outcome::Done { eventful: false }),
        _ => {}
    }
    let how = describe(status);
    if stderr_tail.is_empty() {
        Err(Outcome::Failed(format!("command {how}")))
    } else {
        let tail: Vec<String> = stderr_tail.into_iter().collect();
        Err(Outcome::Failed(format!(
            "command {how}; stderr: {}",
            tail.join(" | ")
        )))
    }
}

/// A `Command` for `argv` with piped stdio, in its own process group (so a signal reaches the
/// whole tree it starts) and set to die with the daemon, even on `kill -9`. The child inherits the
/// daemon's environment (less systemd's notification variables) and working directory.
pub(crate) fn piped_command(argv: &[String]) -> Result<Command, String> {
    let (program, program_args) = argv.split_first().ok_or("the command is empty")?;
    let mut command = Command::new(program);
    command
        .args(program_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for name in crate::notify::DAEMON_ONLY_ENV {
        command.env_remove(name);
    }
    // SAFETY: getpid is async-signal-safe; read before fork, compared after.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure only calls async-signal-safe functions (prctl, getppid) and allocates nothing.
    unsafe {
        command.pre_exec(move || die_with_parent(parent));
    }
    Ok(command)
}

/// Spawns `command` and returns it with its pid (which is also its process group id).
pub(crate) fn spawn(
    command: &mut Command,
    argv: &[String],
) -> Result<(Child, libc::pid_t), String> {
    let program = argv.first().map_or("", String::as_str);
    let child = command
        .spawn()
        .map_err(|e| format!("cannot start command {program:?}: {e}"))?;
    match libc::pid_t::try_from(child.id()) {
        Ok(pid) => Ok((child, pid)),
        Err(_) => Err(format!("child pid {} out of range", child.id())),
    }
}

/// How a process ended, for messages: "exited with status 3", "killed by signal 9".
pub(crate) fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// A pidfd for the child (Linux ≥ 5.3): readable once it has exited. `None` on older kernels.
pub(crate) fn pidfd_open(pid: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    RawFd::try_from(raw).ok().filter(|fd| *fd >= 0).map(|fd| {
        // SAFETY: the syscall just returned this fd to us and nothing else owns it.
        unsafe { OwnedFd::from_raw_fd(fd) }
    })
}

fn die_with_parent(parent: libc::pid_t) -> io::Result<()> {
    // SAFETY: plain syscalls without pointers.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(io::Error::last_os_error());
        }
        // The daemon may have died between fork and prctl; then no signal would ever come.
        if libc::getppid() != parent {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
    }
    Ok(())
}

/// Blocks until the child has exited, leaving it unreaped.
pub(crate) fn wait_exited_no_reap(pid: libc::pid_t) {
    while let Err(e) = waitid_no_reap(pid, 0) {
        if e.kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// Whether the child has exited, without waiting and without reaping it.
pub(crate) fn has_exited(pid: libc::pid_t) -> bool {
    waitid_no_reap(pid, libc::WNOHANG).unwrap_or(false)
}

/// `waitid(WEXITED | WNOWAIT | extra)`: the zombie stays in place, so its pid (and process group
/// id) cannot be reused until it is reaped. `Ok(true)` when the child has exited.
fn waitid_no_reap(pid: libc::pid_t, extra: libc::c_int) -> io::Result<bool> {
    // SAFETY: siginfo_t is plain data that waitid fills in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    #[allow(clippy::cast_sign_loss)] // A pid from a successful spawn is positive.
    let id = pid as libc::id_t;
    // SAFETY: a valid pointer to a zeroed siginfo_t.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            id,
            &raw mut info,
            libc::WEXITED | libc::WNOWAIT | extra,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid succeeded, so si_pid is initialised (0 when WNOHANG found no exited child).
    Ok(unsafe { info.si_pid() } != 0)
}

/// Moves bytes between the daemon and one child: the task JSON in, output lines out to the log.
struct Pump {
    stdin: Option<File>,
    input: Vec<u8>,
    written: usize,
    stdout: Stream,
    stderr: Stream,
    /// Readable once the child has exited (Linux ≥ 5.3); without it, EOF on both pipes ends the pump.
    pidfd: Option<OwnedFd>,
    /// `task 42 myapp.x`: what its log lines start with.
    who: String,
    /// The task's log lines, stdout and stderr together.
    budget: LineBudget,
}

struct Stream {
    pipe: Option<File>,
    partial: Vec<u8>,
    label: &'static str,
    tail: Option<VecDeque<String>>,
}

impl Pump {
    fn new(task: &Task, child: crate::spawn::Spawned) -> Self {
        set_nonblocking(child.stdin.as_raw_fd());
        let pidfd = pidfd_open(child.pid);
        Pump {
            stdin: Some(child.stdin),
            input: task.to_json_line().into_bytes(),
            written: 0,
            stdout: Stream::new(Some(child.stdout), "stdout", false),
            stderr: Stream::new(Some(child.stderr), "stderr", true),
            pidfd,
            who: format!("task {} {}", task.id, task.name),
            budget: LineBudget::new(),
        }
    }

    /// Pumps until the child has exited and its output is drained. Past `deadline`, signals the
    /// child's group (SIGTERM, then SIGKILL after `KILL_GRACE`); returns whether it had to.
    fn run(&mut self, deadline: Option<Instant>, group: libc::pid_t) -> bool {
        let mut exited = false;
        let mut drained_after_exit = 0;
        let mut buf = [0u8; 8192];
        let mut next_signal = deadline.map(|at| (at, libc::SIGTERM));
        let mut timed_out = false;
        // A child that closed its pipes may still run: with a pidfd, wait for its exit here, where
        // the deadline still applies.
        while self.stdout.pipe.is_some()
            || self.stderr.pipe.is_some()
            || (!exited && self.pidfd.is_some())
        {
            let fds = [
                self.stdin.as_ref().map(|f| (f.as_raw_fd(), libc::POLLOUT)),
                self.stdout
                    .pipe
                    .as_ref()
                    .map(|f| (f.as_raw_fd(), libc::POLLIN)),
                self.stderr
                    .pipe
                    .as_ref()
                    .map(|f| (f.as_raw_fd(), libc::POLLIN)),
                self.pidfd
                    .as_ref()
                    .filter(|_| !exited)
                    .map(|f| (f.as_raw_fd(), libc::POLLIN)),
            ];
            let mut polled: Vec<libc::pollfd> = fds
                .iter()
                .map(|f| {
                    // fd -1: poll ignores the entry, which keeps the indexes fixed.
                    f.map_or(pollfd(-1, 0), |(fd, events)| pollfd(fd, events))
                })
                .collect();
            let timeout = if exited {
                Some(Duration::ZERO)
            } else {
                next_signal.map(|(at, _)| at.saturating_duration_since(Instant::now()))
            };
            let ready = match poll(&mut polled, timeout) {
                Ok(ready) => ready,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            if ready == 0 && !exited {
                if let Some((_, signal)) = next_signal {
                    kill_group(group, signal);
                    timed_out = true;
                    next_signal = (signal == libc::SIGTERM)
                        .then(|| (Instant::now() + KILL_GRACE, libc::SIGKILL));
                }
                continue;
            }
            if ready == 0 || drained_after_exit > MAX_DRAIN_AFTER_EXIT {
                break;
            }
            if polled[0].revents != 0 {
                self.feed_stdin();
            }
            for (index, stream) in [(1, &mut self.stdout), (2, &mut self.stderr)] {
                if polled[index].revents != 0 {
                    drained_after_exit += stream.read_some(&mut buf, &mut self.budget, &self.who);
                }
            }
            if polled[3].revents != 0 {
                exited = true;
                self.stdin = None;
            }
            if !exited {
                drained_after_exit = 0;
            }
        }
        self.stdout.flush(&mut self.budget, &self.who);
        self.stderr.flush(&mut self.budget, &self.who);
        self.budget.finish(&self.who);
        timed_out
    }

    fn feed_stdin(&mut self) {
        let Some(stdin) = self.stdin.as_mut() else {
            return;
        };
        match stdin.write(&self.input[self.written..]) {
            Ok(n) => {
                self.written += n;
                if self.written >= self.input.len() {
                    self.stdin = None; // EOF tells the child the document is complete.
                }
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            // Most often EPIPE: the command does not read its stdin, which is allowed.
            Err(_) => self.stdin = None,
        }
    }
}

impl Stream {
    fn new(pipe: Option<File>, label: &'static str, keep_tail: bool) -> Self {
        Stream {
            pipe,
            partial: Vec::new(),
            label,
            tail: keep_tail.then(VecDeque::new),
        }
    }

    /// Reads what is available; returns the number of bytes read (0 at EOF, which closes the pipe).
    fn read_some(&mut self, buf: &mut [u8], budget: &mut LineBudget, who: &str) -> usize {
        let Some(pipe) = self.pipe.as_mut() else {
            return 0;
        };
        match pipe.read(buf) {
            Ok(0) | Err(_) => {
                self.pipe = None;
                0
            }
            Ok(n) => {
                self.feed(&buf[..n], budget, who);
                n
            }
        }
    }

    fn feed(&mut self, mut data: &[u8], budget: &mut LineBudget, who: &str) {
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&data[..pos]);
            self.emit(budget, who);
            data = &data[pos + 1..];
        }
        self.partial.extend_from_slice(data);
        if self.partial.len() >= MAX_LINE_BYTES {
            self.emit(budget, who);
        }
    }

    fn flush(&mut self, budget: &mut LineBudget, who: &str) {
        if !self.partial.is_empty() {
            self.emit(budget, who);
        }
    }

    fn emit(&mut self, budget: &mut LineBudget, who: &str) {
        let text = String::from_utf8_lossy(&self.partial);
        let line = text.trim_end_matches('\r');
        budget.log(who, self.label, line);
        if let Some(tail) = self.tail.as_mut() {
            if tail.len() == STDERR_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line.chars().take(500).collect());
        }
        self.partial.clear();
    }
}

/// A `pollfd` entry waiting for `events` on `fd`.
pub(crate) fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// `poll(2)` with an optional timeout (`None` waits forever), rounded up to whole milliseconds so
/// a deadline is never reported early.
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = timeout.map_or(-1, |t| {
        let ms = t.as_micros().div_ceil(1000);
        libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
    });
    // SAFETY: `fds` is a valid array of pollfd of the given length; fd -1 entries are ignored.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    usize::try_from(ready).map_err(|_| io::Error::last_os_error())
}

pub(crate) fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}
