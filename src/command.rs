//! Runs one command task: spawns its argv directly (never through a shell) in its own process group,
//! writes the task as JSON to its stdin, logs its output lines tagged with the task id, and turns the
//! exit status into an outcome. The child dies with the daemon, even on `kill -9`.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};

use crate::children::Children;
use crate::task::Task;

/// Lines of stderr quoted in a failure message.
const STDERR_TAIL_LINES: usize = 5;
/// A line longer than this is logged in pieces, so a child writing without newlines cannot make
/// the daemon buffer without bound.
const MAX_LINE_BYTES: usize = 8192;
/// After the child exits, output still readable (a grandchild may hold the pipes) is drained up to
/// this much, then the pipes are closed.
const MAX_DRAIN_AFTER_EXIT: usize = 1 << 20;

/// Runs the task's command to completion; `Err` carries the one-line failure reason.
pub fn run(task: &Task, argv: &[String], children: &Children) -> Result<(), String> {
    let (program, program_args) = argv.split_first().ok_or("the task's command is empty")?;
    let mut command = Command::new(program);
    command
        .args(program_args)
        .env("FOREMAN_TASK_ID", task.id.to_string())
        .env("FOREMAN_TASK_NAME", &task.name)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so that a shutdown signal reaches the whole tree it started.
        .process_group(0);
    // SAFETY: getpid is async-signal-safe; read before fork, compared after.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure only calls async-signal-safe functions (prctl, getppid) and allocates nothing.
    unsafe {
        command.pre_exec(move || die_with_parent(parent));
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start command {program:?}: {e}"))?;
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return Err(format!("child pid {} out of range", child.id()));
    };
    children.insert(task.id, pid);

    let mut pump = Pump::new(task, &mut child, pid);
    pump.run();
    let stderr_tail = pump.stderr.tail.take().unwrap_or_default();
    drop(pump);

    // Wait for the exit without reaping, so the pid cannot be recycled while the foreman loop may
    // still signal it; only then forget it and reap.
    wait_exited_no_reap(pid);
    children.remove(task.id);
    let status = child
        .wait()
        .map_err(|e| format!("waiting for command {program:?}: {e}"))?;
    if status.success() {
        return Ok(());
    }
    let how = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => format!("ended with {status}"),
    };
    if stderr_tail.is_empty() {
        Err(format!("command {how}"))
    } else {
        let tail: Vec<String> = stderr_tail.into_iter().collect();
        Err(format!("command {how}; stderr: {}", tail.join(" | ")))
    }
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

fn wait_exited_no_reap(pid: libc::pid_t) {
    loop {
        // SAFETY: siginfo_t is plain data; waitid writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        #[allow(clippy::cast_sign_loss)] // pid is positive: it came from a successful spawn.
        let id = pid as libc::id_t;
        // SAFETY: valid pointer to a zeroed siginfo_t.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                id,
                &raw mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// Moves bytes between the daemon and one child: the task JSON in, output lines out to the log.
struct Pump<'t> {
    stdin: Option<File>,
    input: Vec<u8>,
    written: usize,
    stdout: Stream<'t>,
    stderr: Stream<'t>,
    /// Readable once the child has exited (Linux ≥ 5.3); without it, EOF on both pipes ends the pump.
    pidfd: Option<OwnedFd>,
}

struct Stream<'t> {
    pipe: Option<File>,
    partial: Vec<u8>,
    label: &'static str,
    task: &'t Task,
    tail: Option<VecDeque<String>>,
}

impl<'t> Pump<'t> {
    fn new(task: &'t Task, child: &mut std::process::Child, pid: libc::pid_t) -> Self {
        let stdin = child.stdin.take().map(|s| File::from(OwnedFd::from(s)));
        if let Some(stdin) = &stdin {
            set_nonblocking(stdin.as_raw_fd());
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let pidfd = RawFd::try_from(raw).ok().filter(|fd| *fd >= 0).map(|fd| {
            // SAFETY: the syscall just returned this fd to us and nothing else owns it.
            unsafe { OwnedFd::from_raw_fd(fd) }
        });
        Pump {
            stdin,
            input: task.to_json_line().into_bytes(),
            written: 0,
            stdout: Stream::new(
                child.stdout.take().map(|s| File::from(OwnedFd::from(s))),
                "stdout",
                task,
                false,
            ),
            stderr: Stream::new(
                child.stderr.take().map(|s| File::from(OwnedFd::from(s))),
                "stderr",
                task,
                true,
            ),
            pidfd,
        }
    }

    fn run(&mut self) {
        let mut exited = false;
        let mut drained_after_exit = 0;
        let mut buf = [0u8; 8192];
        while self.stdout.pipe.is_some() || self.stderr.pipe.is_some() {
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
                    f.map_or(
                        libc::pollfd {
                            fd: -1,
                            events: 0,
                            revents: 0,
                        },
                        |(fd, events)| libc::pollfd {
                            fd,
                            events,
                            revents: 0,
                        },
                    )
                })
                .collect();
            let timeout = if exited { 0 } else { -1 };
            // SAFETY: `polled` is a valid array of pollfd of the given length; fd -1 entries are ignored.
            let ready =
                unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, timeout) };
            if ready < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            if ready == 0 || drained_after_exit > MAX_DRAIN_AFTER_EXIT {
                break;
            }
            if polled[0].revents != 0 {
                self.feed_stdin();
            }
            for (index, stream) in [(1, &mut self.stdout), (2, &mut self.stderr)] {
                if polled[index].revents != 0 {
                    drained_after_exit += stream.read_some(&mut buf);
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
        self.stdout.flush();
        self.stderr.flush();
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

impl<'t> Stream<'t> {
    fn new(pipe: Option<File>, label: &'static str, task: &'t Task, keep_tail: bool) -> Self {
        Stream {
            pipe,
            partial: Vec::new(),
            label,
            task,
            tail: keep_tail.then(VecDeque::new),
        }
    }

    /// Reads what is available; returns the number of bytes read (0 at EOF, which closes the pipe).
    fn read_some(&mut self, buf: &mut [u8]) -> usize {
        let Some(pipe) = self.pipe.as_mut() else {
            return 0;
        };
        match pipe.read(buf) {
            Ok(0) | Err(_) => {
                self.pipe = None;
                0
            }
            Ok(n) => {
                self.feed(&buf[..n]);
                n
            }
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&data[..pos]);
            self.emit();
            data = &data[pos + 1..];
        }
        self.partial.extend_from_slice(data);
        if self.partial.len() >= MAX_LINE_BYTES {
            self.emit();
        }
    }

    fn flush(&mut self) {
        if !self.partial.is_empty() {
            self.emit();
        }
    }

    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.partial);
        let line = text.trim_end_matches('\r');
        log::info!(
            "task {} {} {}: {line}",
            self.task.id,
            self.task.name,
            self.label
        );
        if let Some(tail) = self.tail.as_mut() {
            if tail.len() == STDERR_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line.chars().take(500).collect());
        }
        self.partial.clear();
    }
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}
