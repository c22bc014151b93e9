//! Small facts about this machine and its processes that the daemon records and the operator
//! commands compare: the host name and a process's start time. A leaf over libc and /proc.

/// This machine's name (empty if it has none), which the daemon row records so that the CLI only
/// looks a pid up in /proc on the same host.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer outlives the call, which writes at most its length.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The start time of process `pid` in clock ticks since boot (field 22 of /proc/PID/stat), which
/// with the pid names one process for as long as the machine runs.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or ')': skip past the last.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}
