//! Starting a command task's process without `fork()`: a `clone(CLONE_VM | CLONE_VFORK)` child,
//! as `posix_spawn` does, that also sets `PR_SET_PDEATHSIG` so the task never outlives the daemon.
//! std's `Command` can only do that with a `pre_exec` hook, which makes it copy the daemon's whole
//! address space with `fork()` for every task: a third of the spawn rate. The child runs only
//! async-signal-safe libc calls (`chdir` into the task's `cwd` among them) on its own stack, on
//! data prepared before the clone.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that started the child exits, not the process: only
//! call `spawn` from a thread that outlives the child (foreman's workers wait for their task's
//! process to exit, and live as long as the daemon).

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::process::ExitStatus;
use std::sync::OnceLock;

use crate::notify::DAEMON_ONLY_ENV;

/// The child's stack while it runs between the clone and its `execvpe` (PATH search included),
/// plus one pointer per argument: for a program without a `#!` line, `execvpe` copies argv onto
/// the stack to run it through `/bin/sh` (glibc's `posix_spawn` sizes its stack the same way).
const CHILD_STACK: usize = 128 * 1024;

thread_local! {
    static STACK: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; CHILD_STACK]);
}

/// A started command: its pid (also its process group id) and the daemon's ends of its pipes.
pub struct Spawned {
    pub pid: libc::pid_t,
    pub stdin: File,
    pub stdout: File,
    pub stderr: File,
}

/// What the child needs, all of it built before the clone: the child must not allocate.
struct ChildArgs {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// The child's ends of the stdin, stdout and stderr pipes.
    stdio: [libc::c_int; 3],
    /// The directory to run in (`cwd`), or null for the daemon's.
    cwd: *const libc::c_char,
    /// Set by the child before `errno` when what failed is the `chdir`, not the exec.
    chdir_failed: bool,
    /// Where the child leaves its errno if it cannot exec. The child shares our memory
    /// (`CLONE_VM`) and we resume only once it has exec'd or exited (`CLONE_VFORK`), so this
    /// replaces the usual close-on-exec report pipe, whose read waits for the exec'd child to close
    /// its copy: on this 2-core VM, often until `/bin/true` had exited.
    errno: libc::c_int,
    parent: libc::pid_t,
    /// The signal mask to restore in the child (the parent blocks every signal around the clone).
    mask: libc::sigset_t,
}

/// Starts `argv` in `cwd` (or the daemon's working directory) with the daemon's environment (less
/// `DAEMON_ONLY_ENV`) plus `extra_env`, in a new process group, with piped stdio, dying with the
/// daemon. `Err` says why it could not start, in the words std's `Command::spawn` would use (or
/// that it could not enter `cwd`).
pub fn spawn(
    argv: &[String],
    cwd: Option<&Path>,
    extra_env: &[(&str, &OsStr)],
) -> io::Result<Spawned> {
    let cstring = |bytes: &[u8]| {
        CString::new(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let words: Vec<CString> = argv
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<io::Result<_>>()?;
    let Some(program) = words.first() else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    let mut extra = Vec::with_capacity(extra_env.len());
    let envp_ptrs = environment(extra_env, &mut extra)?;
    let argv_ptrs = null_terminated(&words);
    let cwd_c = cwd
        .map(|dir| cstring(dir.as_os_str().as_bytes()))
        .transpose()?;

    let (stdin_read, stdin_write) = pipe()?;
    let (stdout_read, stdout_write) = pipe()?;
    let (stderr_read, stderr_write) = pipe()?;
    let mut child = ChildArgs {
        program: program.as_ptr(),
        argv: argv_ptrs.as_ptr(),
        envp: envp_ptrs.as_ptr(),
        stdio: [
            stdin_read.as_raw_fd(),
            stdout_write.as_raw_fd(),
            stderr_write.as_raw_fd(),
        ],
        cwd: cwd_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        chdir_failed: false,
        errno: 0,
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
        // SAFETY: plain data, filled in below.
        mask: unsafe { std::mem::zeroed() },
    };
    // One stack per spawning thread, kept: a fresh 128 KiB buffer would be an mmap, munmap and
    // page faults per task.
    let needed = CHILD_STACK + argv_ptrs.len() * std::mem::size_of::<*const libc::c_char>();
    let pid = STACK.with_borrow_mut(|stack| {
        if stack.len() < needed {
            stack.resize(needed, 0);
        }
        clone_child(&mut child, stack)
    })?;
    // The child has exec'd or exited by now (CLONE_VFORK); its ends are its own copies.
    drop((stdin_read, stdout_write, stderr_write));
    // SAFETY: the child, which wrote it if at all, has exec'd or exited; volatile because the
    // write happened behind the compiler's back.
    let errno = unsafe { std::ptr::read_volatile(&raw const child.errno) };
    if errno != 0 {
        // exec (or chdir) failed; the child exited with 127. Reap it before saying why.
        let _ = reap(pid);
        let error = io::Error::from_raw_os_error(errno);
        // SAFETY: as for `errno`, written (if at all) before it.
        if unsafe { std::ptr::read_volatile(&raw const child.chdir_failed) }
            && let Some(dir) = cwd
        {
            return Err(io::Error::new(
                error.kind(),
                format!("cannot enter its cwd {}: {error}", dir.display()),
            ));
        }
        return Err(error);
    }
    Ok(Spawned {
        pid,
        stdin: File::from(stdin_write),
        stdout: File::from(stdout_read),
        stderr: File::from(stderr_read),
    })
}

/// Waits for the child to exit and reaps it.
pub fn reap(pid: libc::pid_t) -> io::Result<ExitStatus> {
    let mut status = 0;
    loop {
        // SAFETY: a valid pointer to an int.
        let rc = unsafe { libc::waitpid(pid, &raw mut status, 0) };
        if rc == pid {
            return Ok(std::os::unix::process::ExitStatusExt::from_raw(status));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn clone_child(args: &mut ChildArgs, stack: &mut [u8]) -> io::Result<libc::pid_t> {
    // Every signal blocked across the clone, so that no handler of the daemon's runs in the child
    // (which shares its memory) before the child has reset them.
    // SAFETY: sigset_t is plain data initialised by sigfillset; pthread_sigmask only reads `all`
    // and writes `args.mask`.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigfillset(&raw mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &raw const all, &raw mut args.mask);
    }
    // The stack grows down from its end, 16-byte aligned as the ABI wants.
    let top = (stack.as_mut_ptr() as usize + stack.len()) & !15;
    // SAFETY: the child runs `child_main` on its own stack with `args`, which outlive it: with
    // CLONE_VFORK this thread is suspended until the child has exec'd or exited.
    let pid = unsafe {
        libc::clone(
            child_main,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::from_mut(args).cast(),
        )
    };
    let error = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(
            libc::SIG_SETMASK,
            &raw const args.mask,
            std::ptr::null_mut(),
        );
    }
    if pid < 0 { Err(error) } else { Ok(pid) }
}

/// The child, between the clone and the exec: async-signal-safe calls only, no allocation.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` the parent passed, alive while the parent waits for us;
    // only `errno` is written, and only by us until we exec or exit.
    let args = unsafe { &mut *arg.cast::<ChildArgs>() };
    // SAFETY: every call below is async-signal-safe and takes pointers prepared by the parent.
    unsafe {
        // Signals the daemon handles go back to their default action, and SIGPIPE, which Rust
        // ignores, too (as std's spawn does); ignoring others is inherited on purpose.
        let mut action: libc::sigaction = std::mem::zeroed();
        for signal in 1..libc::SIGRTMAX() {
            if libc::sigaction(signal, std::ptr::null(), &raw mut action) == 0
                && (action.sa_sigaction != libc::SIG_IGN || signal == libc::SIGPIPE)
                && action.sa_sigaction != libc::SIG_DFL
            {
                action.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(signal, &raw const action, std::ptr::null_mut());
            }
        }
        libc::pthread_sigmask(
            libc::SIG_SETMASK,
            &raw const args.mask,
            std::ptr::null_mut(),
        );
        if libc::setpgid(0, 0) != 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            fail(&raw mut args.errno);
        }
        // The daemon may have died before the prctl; then no signal would ever come.
        if libc::getppid() != args.parent {
            libc::_exit(127);
        }
        for (target, fd) in (0..).zip(args.stdio) {
            // dup2 leaves the new descriptor without close-on-exec, the pipe's own end keeps it;
            // a pipe that already has the target's number only needs its flag cleared.
            let moved = if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, target)
            };
            if moved < 0 {
                fail(&raw mut args.errno);
            }
        }
        if !args.cwd.is_null() && libc::chdir(args.cwd) != 0 {
            std::ptr::write_volatile(&raw mut args.chdir_failed, true);
            fail(&raw mut args.errno);
        }
        libc::execvpe(args.program, args.argv, args.envp);
        fail(&raw mut args.errno)
    }
}

/// Tells the parent why the child could not exec, and exits.
unsafe fn fail(report: *mut libc::c_int) -> ! {
    // SAFETY: errno's location is valid in this thread; `report` points into the parent's
    // `ChildArgs`, which outlives us; _exit is async-signal-safe.
    unsafe {
        // A failure without errno must still read as one.
        let errno = (*libc::__errno_location()).max(1);
        std::ptr::write_volatile(report, errno);
        libc::_exit(127)
    }
}

/// The daemon's environment without its systemd variables, as `KEY=value` strings: read once,
/// since nothing in foreman changes it after start, and copying it per task was a twentieth of the
/// daemon's CPU on a command drain. A variable that is not valid as a C string (impossible from
/// `execve`) is left out.
fn inherited() -> &'static [CString] {
    static INHERITED: OnceLock<Vec<CString>> = OnceLock::new();
    INHERITED.get_or_init(|| {
        std::env::vars_os()
            .filter(|(key, _)| !DAEMON_ONLY_ENV.iter().any(|k| key == OsStr::new(k)))
            .filter_map(|(key, value)| {
                let mut pair = OsString::with_capacity(key.len() + value.len() + 1);
                pair.push(&key);
                pair.push("=");
                pair.push(&value);
                CString::new(pair.into_vec()).ok()
            })
            .collect()
    })
}

/// `envp` for the child: the inherited variables (less those `extra` sets) and `extra`'s, whose
/// strings are built into `owned`.
fn environment(
    extra: &[(&str, &OsStr)],
    owned: &mut Vec<CString>,
) -> io::Result<Vec<*const libc::c_char>> {
    for (key, value) in extra {
        let mut pair = Vec::with_capacity(key.len() + 1 + value.len());
        pair.extend_from_slice(key.as_bytes());
        pair.push(b'=');
        pair.extend_from_slice(value.as_bytes());
        owned.push(CString::new(pair).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?);
    }
    let overridden = |pair: &CString| {
        let bytes = pair.as_bytes();
        extra.iter().any(|(key, _)| {
            bytes.len() > key.len() && bytes.starts_with(key.as_bytes()) && bytes[key.len()] == b'='
        })
    };
    let inherited = inherited();
    let mut envp = Vec::with_capacity(inherited.len() + owned.len() + 1);
    envp.extend(
        inherited
            .iter()
            .filter(|pair| !overridden(pair))
            .map(|pair| pair.as_ptr()),
    );
    envp.extend(owned.iter().map(|pair| pair.as_ptr()));
    envp.push(std::ptr::null());
    Ok(envp)
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: a valid pointer to two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these fds and nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_without_a_shebang_and_a_long_argv_runs_through_sh() {
        // execvpe's ENOEXEC fallback copies argv onto the child's stack.
        let dir = std::env::temp_dir().join(format!("foreman-spawn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("no-shebang");
        std::fs::write(&script, "exit 7\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let mut argv = vec![script.display().to_string()];
        argv.extend((0..40_000).map(|i| i.to_string()));
        let child = spawn(&argv, None, &[]).unwrap();
        drop(child.stdin);
        let status = reap(child.pid).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(status.code(), Some(7), "{status:?}");
    }

    #[test]
    fn a_missing_program_is_an_error_naming_the_cause() {
        let err = spawn(&["/nonexistent/foreman-test".to_owned()], None, &[])
            .err()
            .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn the_child_runs_in_its_cwd_with_its_env_and_a_missing_cwd_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!(
            "pwd > {}; echo \"$GREETING\" >> {}",
            out.display(),
            out.display()
        );
        let argv = ["sh".to_owned(), "-c".to_owned(), script];
        let child = spawn(&argv, Some(dir.path()), &[("GREETING", OsStr::new("hi"))]).unwrap();
        drop(child.stdin);
        assert_eq!(reap(child.pid).unwrap().code(), Some(0));
        let said = std::fs::read_to_string(&out).unwrap();
        let here = dir.path().canonicalize().unwrap();
        assert_eq!(said, format!("{}\nhi\n", here.display()));
        let missing = dir.path().join("gone");
        let err = spawn(&argv, Some(&missing), &[]).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("cannot enter its cwd"), "{err}");
    }
}
