//! The environment containers and hosts hand foreman: a database directory, database file or
//! wakeup dir it may not write, a read-only mount (which stops root too), a PID file left behind
//! by a container restart. Each refusal is one line naming the path, the cause and the fix, with
//! exit code 1.
//!
//! Mode bits do not stop root, so when the tests run as root they run foreman as `nobody` (65534).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::Stdio;

use crate::support::{Env, Unprivileged, chmod, finish, is_root, wait_child};

#[test]
fn a_db_directory_it_cannot_write_stops_run_init_and_enqueue() {
    let t = Unprivileged::new();
    let refusal = |mode: &str| {
        format!(
            "cannot write {}: its directory {} is not writable by uid {uid} (owner uid {uid}, mode {mode}; \
             SQLite needs to create q.sqlite3-wal and -shm next to it); {}",
            t.env.db.display(),
            t.data.display(),
            t.give_access(&t.data),
            uid = t.uid,
        )
    };
    chmod(&t.data, 0o555);
    t.expect_refusal(&["run"], &refusal("0555"));
    t.expect_refusal(&["init"], &refusal("0555"));
    // An existing database: SQLite removed its -wal and -shm when the last connection closed, and
    // the next writer must create them again.
    chmod(&t.data, 0o755);
    t.init();
    chmod(&t.data, 0o555);
    t.expect_refusal(&["enqueue", "foreman.echo"], &refusal("0555"));
    t.expect_refusal(&["run"], &refusal("0555"));
}

#[test]
fn a_db_file_it_cannot_write_stops_run_and_enqueue() {
    let t = Unprivileged::new();
    t.init();
    chmod(&t.env.db, 0o444);
    let refusal = format!(
        "cannot write {}: the file is not writable by uid {uid} (owner uid {uid}, mode 0444); {}",
        t.env.db.display(),
        t.give_access(&t.env.db),
        uid = t.uid,
    );
    t.expect_refusal(&["run"], &refusal);
    t.expect_refusal(&["enqueue", "foreman.echo"], &refusal);
    chmod(&t.env.db, 0o644);
    let (code, err) = finish(t.command(&["enqueue", "foreman.echo"]), &t.env);
    assert_eq!(code, Some(0), "writable again: {err}");
}

#[test]
fn a_wakeup_dir_it_cannot_write_or_that_is_a_file_stops_run_and_init() {
    let t = Unprivileged::new();
    t.init();
    chmod(&t.env.wakeup, 0o500);
    let refusal = format!(
        "wakeup dir {} is not writable by uid {uid} (owner uid {uid}, mode 0500; producers create \
         files there and the daemon removes them); {}",
        t.env.wakeup.display(),
        t.give_access(&t.env.wakeup),
        uid = t.uid,
    );
    t.expect_refusal(&["run"], &refusal);
    t.expect_refusal(&["init"], &refusal);
    chmod(&t.env.wakeup, 0o700);
    std::fs::remove_dir(&t.env.wakeup).unwrap();
    std::fs::write(&t.env.wakeup, b"").unwrap();
    t.expect_refusal(
        &["run"],
        &format!(
            "wakeup dir {} is not a directory; remove it, or set wakeup_dir (FOREMAN_WAKEUP_DIR) to a directory",
            t.env.wakeup.display()
        ),
    );
}

#[test]
fn a_read_only_mount_stops_even_root() {
    if !is_root() {
        eprintln!("skipped: needs root to make a read-only bind mount");
        return;
    }
    let mut env = Env::new();
    let data = env.path("data");
    std::fs::create_dir(&data).unwrap();
    chmod(&data, 0o777);
    env.db = data.join("q.sqlite3");
    let db = env.db.clone();
    let mut cmd = env.command(&["run"]);
    // In a mount namespace of the child's own, so nothing outlives it: what Kubernetes'
    // readOnlyRootFilesystem or systemd's ProtectSystem= does.
    let dir = CString::new(data.as_os_str().as_bytes()).unwrap();
    // SAFETY: only raw system calls between fork and exec; `dir` was allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let none = std::ptr::null();
            let root = c"/".as_ptr();
            let ok = libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    none,
                    root,
                    none,
                    libc::MS_REC | libc::MS_PRIVATE,
                    none.cast(),
                ) == 0
                && libc::mount(dir.as_ptr(), dir.as_ptr(), none, libc::MS_BIND, none.cast()) == 0
                && libc::mount(
                    none,
                    dir.as_ptr(),
                    none,
                    libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                    none.cast(),
                ) == 0;
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let err_path = env.path("stderr.txt");
    let spawned = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn();
    let child = match spawned {
        Ok(child) => child,
        Err(e) => {
            eprintln!("skipped: cannot make a read-only mount here: {e}");
            return;
        }
    };
    let (code, err) = wait_child(child, &err_path);
    assert_eq!(code, Some(1), "{err}");
    let expected = format!(
        "cannot write {}: its directory {} is on a read-only file system (SQLite needs to create \
         q.sqlite3-wal and -shm next to it); mount a writable volume there (Kubernetes \
         readOnlyRootFilesystem: use an emptyDir or a PVC)",
        db.display(),
        data.display()
    );
    assert!(err.contains(&expected), "{err}");
    assert!(!db.exists(), "nothing may have been created");
}

#[test]
fn a_pid_file_left_by_a_container_restart_is_taken_over() {
    // In a container the previous run's pid is often a live process of the new run (pid 1, or
    // whatever now has that number); or the file holds anything at all after a crash mid-write.
    let live_pid = format!("{}\n", std::process::id());
    let contents: [&[u8]; 3] = [live_pid.as_bytes(), b"1\n", b"\xff\x00not a pid\n\n12 34"];
    for stale in contents {
        let env = Env::new();
        let pid_file = env.path("q.sqlite3.pid");
        std::fs::write(&pid_file, stale).unwrap();
        let daemon = env.daemon(&[]);
        assert_eq!(
            std::fs::read_to_string(&pid_file).unwrap(),
            format!("{}\n", daemon.pid()),
            "left {stale:?}"
        );
        let status: serde_json::Value =
            serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
        assert_eq!(status["daemon"]["pid"], daemon.pid(), "{status}");
        assert_eq!(status["daemon"]["running"], true, "{status}");
        // The temp dir is on a local disk: no warning about inotify or the WAL.
        assert!(!daemon.has_log("is on "), "{}", daemon.log());
        let log = daemon.stop();
        assert!(!log.contains("ERROR"), "{log}");
    }
}
