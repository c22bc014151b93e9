//! How a `postgresql://` URL becomes a connection: the URL parsed by the driver, then what libpq
//! users expect from it filled in (`PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, the password from
//! `PGPASSWORD` or `~/.pgpass`, a Unix socket when no host is named), timeouts that notice a
//! server that went away, and each role's session settings in the startup packet. Errors are
//! said in one line; a password is never in one.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use postgres::config::Host;
use postgres::{Client, Config, NoTls};

use super::pgpass;
use crate::error::{Error, Result};

/// What a connection is for: each gets the session settings its statements need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The daemon's own connection: the hot statements, prepared once, with plans that never
    /// depend on the tables' statistics (see `DAEMON_SETTINGS`).
    Daemon,
    /// The daemon's `LISTEN` connection.
    Listener,
    /// The dashboard's `LISTEN` connection (`foreman ui`).
    Watcher,
    /// A command's connection (`init`, `enqueue`, `cancel`, `dead`…).
    Command,
    /// An operator's read (`status`, `health`…): every transaction read-only.
    ReadOnly,
}

/// The daemon's session settings, sent in the startup packet (no round trip). With them, each hot
/// statement has one possible plan, the due index walked in order, whatever the statistics say:
/// a table `ANALYZE`d while empty (autovacuum does that after every drain) would otherwise give a
/// generic plan that scans and sorts the whole queue. docs/design/postgres-store.md, rule 2.
pub const DAEMON_SETTINGS: [(&str, &str); 5] = [
    ("plan_cache_mode", "force_generic_plan"),
    ("enable_seqscan", "off"),
    ("enable_sort", "off"),
    ("enable_incremental_sort", "off"),
    ("jit", "off"),
];

/// How long a connection attempt may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long sent data may stay unacknowledged before the connection counts as broken: without
/// it, a statement sent into a cut network waits for the kernel's retransmissions (~15 minutes).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(15);
/// Keepalive probes on an idle connection: a server that vanished is noticed in under a minute.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;
/// Where libpq looks for the server's socket when no host is given (Debian's first).
const SOCKET_DIRS: [&str; 3] = ["/run/postgresql", "/var/run/postgresql", "/tmp"];

/// A parsed URL, with everything libpq would have filled in, ready to connect in any role.
#[derive(Clone)]
pub struct Target {
    config: Config,
    /// The URL as messages show it (no password).
    pub label: PathBuf,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the config: it holds the password.
        write!(f, "Target({})", self.label.display())
    }
}

impl Target {
    /// Parses `url` (shown as `label` in messages) and fills in what it leaves out.
    pub fn parse(url: &str, label: &str) -> Result<Target> {
        let config: Config = url.parse().map_err(|e| {
            Error::Config(format!(
                "{label}: not a PostgreSQL URL ({e}); e.g. postgresql://user@host:5432/dbname or postgresql:///dbname?host=/run/postgresql"
            ))
        })?;
        let mut target = Target {
            config,
            label: PathBuf::from(label),
        };
        target.fill_in(&|key| std::env::var(key).ok(), home().as_deref());
        Ok(target)
    }

    /// libpq's defaults for what the URL leaves out, from `env` and the pgpass file.
    fn fill_in(&mut self, env: &dyn Fn(&str) -> Option<String>, home: Option<&Path>) {
        let config = &mut self.config;
        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            match env("PGHOST").filter(|h| !h.is_empty()) {
                Some(host) if host.starts_with('/') => {
                    config.host_path(host);
                }
                Some(host) => {
                    config.host(&host);
                }
                None => {
                    let dir = SOCKET_DIRS
                        .iter()
                        .find(|dir| Path::new(dir).is_dir())
                        .unwrap_or(&SOCKET_DIRS[2]);
                    config.host_path(dir);
                }
            }
        }
        if config.get_ports().is_empty()
            && let Some(port) = env("PGPORT").and_then(|p| p.trim().parse().ok())
        {
            config.port(port);
        }
        if config.get_user().is_none()
            && let Some(user) = env("PGUSER").filter(|u| !u.is_empty())
        {
            config.user(&user);
        }
        if config.get_dbname().is_none()
            && let Some(db) = env("PGDATABASE").filter(|d| !d.is_empty())
        {
            config.dbname(&db);
        }
        if config.get_password().is_none() {
            if let Some(password) = env("PGPASSWORD") {
                config.password(password);
            } else if let Some(password) = self.pgpass(env, home) {
                self.config.password(password);
            }
        }
        let config = &mut self.config;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        // The driver's default idle time is two hours: only a URL that chose its own is kept.
        if config.get_keepalives_idle() == Duration::from_hours(2) {
            config.keepalives_idle(KEEPALIVE_IDLE);
        }
        if config.get_keepalives_interval().is_none() {
            config.keepalives_interval(KEEPALIVE_INTERVAL);
        }
        if config.get_keepalives_retries().is_none() {
            config.keepalives_retries(KEEPALIVE_RETRIES);
        }
    }

    /// The password the pgpass file (`PGPASSFILE`, else `~/.pgpass`) gives this connection.
    fn pgpass(&self, env: &dyn Fn(&str) -> Option<String>, home: Option<&Path>) -> Option<String> {
        let file = env("PGPASSFILE")
            .map(PathBuf::from)
            .or_else(|| home.map(|h| h.join(".pgpass")))?;
        let text = pgpass::read(&file)?;
        // libpq matches a Unix socket as `localhost`.
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            Some(Host::Unix(_)) | None => "localhost".to_owned(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let user = self.user();
        let db = self
            .config
            .get_dbname()
            .map_or_else(|| user.clone(), str::to_owned);
        pgpass::lookup(&text, &host, port, &db, &user)
    }

    /// The user the connection authenticates as: the URL's, else the process's.
    fn user(&self) -> String {
        self.config.get_user().map_or_else(
            || std::env::var("USER").unwrap_or_else(|_| "postgres".to_owned()),
            str::to_owned,
        )
    }

    /// The socket directory or host name the connection goes to, for messages.
    pub fn host(&self) -> String {
        match self.config.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            Some(Host::Unix(path)) => path.display().to_string(),
            None => String::new(),
        }
    }

    /// The connection settings for `role`: its session settings added to the URL's `options`,
    /// and an application name that says which foreman it is.
    fn config_for(&self, role: Role, with_settings: bool) -> Config {
        let mut config = self.config.clone();
        let settings: Vec<String> = match role {
            Role::Daemon if with_settings => DAEMON_SETTINGS
                .iter()
                .map(|(key, value)| format!("-c {key}={value}"))
                .collect(),
            Role::ReadOnly if with_settings => vec!["-c default_transaction_read_only=on".into()],
            _ => Vec::new(),
        };
        if !settings.is_empty() {
            let options = match config.get_options() {
                Some(given) if !given.trim().is_empty() => {
                    format!("{given} {}", settings.join(" "))
                }
                _ => settings.join(" "),
            };
            config.options(&options);
        }
        if config.get_application_name().is_none() {
            config.application_name(match role {
                Role::Daemon => "foreman run",
                Role::Listener => "foreman run (listen)",
                Role::Watcher => "foreman ui (listen)",
                Role::Command | Role::ReadOnly => "foreman",
            });
        }
        config
    }

    /// Connects in `role`. A server (or a pooler) that refuses the startup `options` is asked
    /// again without them; the daemon then warns that its settings are not in force.
    pub fn connect(&self, role: Role) -> Result<Client> {
        let mut client = self.connect_with_settings(role)?;
        if role == Role::Daemon {
            self.durable_commits(&mut client)?;
        }
        Ok(client)
    }

    /// The daemon's commits wait for the WAL's flush whatever the server's default says: a claim
    /// that a crash of the server forgot would put its rows back in the queue, and their tasks,
    /// started already, would run again. A server (or role) with `synchronous_commit = off` gets
    /// `on` in the daemon's session, once per connection, said once per process; any other value
    /// (`local`, `remote_write`, `remote_apply`) is the operator's choice about standbys and stays.
    fn durable_commits(&self, client: &mut Client) -> Result<()> {
        static SAID: std::sync::Once = std::sync::Once::new();
        let rows = client
            .simple_query("SHOW synchronous_commit")
            .map_err(|e| self.error(&e))?;
        let off = rows.iter().any(|message| {
            matches!(message, postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some("off"))
        });
        if off {
            client
                .batch_execute("SET synchronous_commit = on")
                .map_err(|e| self.error(&e))?;
            SAID.call_once(|| {
                log::warn!(
                    "{}: synchronous_commit is off for this role or server; the daemon's own session uses on, since a claim that a server crash forgot would run its tasks again (producers may keep off)",
                    self.label.display()
                );
            });
        }
        Ok(())
    }

    fn connect_with_settings(&self, role: Role) -> Result<Client> {
        match self.config_for(role, true).connect(NoTls) {
            Ok(client) => Ok(client),
            Err(e) if refuses_options(&e) => {
                let client = self
                    .config_for(role, false)
                    .connect(NoTls)
                    .map_err(|e| self.error(&e))?;
                if role == Role::Daemon {
                    log::warn!(
                        "{}: the server (or a pooler such as PgBouncer) refused session settings in the connection's options ({}); set them on the daemons' role instead: {}",
                        self.label.display(),
                        describe(&e),
                        DAEMON_SETTINGS
                            .iter()
                            .map(|(k, v)| format!("ALTER ROLE … SET {k} = {v}"))
                            .collect::<Vec<_>>()
                            .join("; ")
                    );
                }
                Ok(client)
            }
            Err(e) => Err(self.error(&e)),
        }
    }

    /// A message as foreman's error, naming the (password-free) URL.
    pub fn error_text(&self, message: &str) -> Error {
        Error::db(self.label.clone(), message)
    }

    /// A driver error as foreman's, naming the (password-free) URL.
    pub fn error(&self, e: &postgres::Error) -> Error {
        Error::db(self.label.clone(), describe(e))
    }
}

/// Whether the server refused the startup packet's `options` (PgBouncer: "unsupported startup
/// parameter: options").
fn refuses_options(e: &postgres::Error) -> bool {
    let text = describe(e);
    text.contains("unsupported startup parameter") && text.contains("options")
}

/// A driver error in one line: the server's message with its detail and hint, or what the
/// connection ran into, with its cause.
pub fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = format!("{}: {}", db.severity(), db.message());
        if let Some(detail) = db.detail() {
            let _ = write!(text, " ({detail})");
        }
        if let Some(hint) = db.hint() {
            let _ = write!(text, "; hint: {hint}");
        }
        return text.replace('\n', " ");
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.replace('\n', " ")
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str, env: &[(&str, &str)], home: Option<&Path>) -> Target {
        let mut target = Target {
            config: url.parse().unwrap(),
            label: PathBuf::from("x"),
        };
        let lookup = |key: &str| {
            env.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| (*v).to_owned())
        };
        target.fill_in(&lookup, home);
        target
    }

    #[test]
    fn what_the_url_leaves_out_comes_from_the_environment() {
        let t = target(
            "postgresql:///app",
            &[
                ("PGHOST", "db.internal"),
                ("PGPORT", "6543"),
                ("PGUSER", "worker"),
                ("PGPASSWORD", "s3cret"),
            ],
            None,
        );
        assert_eq!(t.host(), "db.internal");
        assert_eq!(t.config.get_ports(), [6543]);
        assert_eq!(t.config.get_user(), Some("worker"));
        assert_eq!(t.config.get_dbname(), Some("app"));
        assert_eq!(t.config.get_password(), Some(&b"s3cret"[..]));
        // The URL wins.
        let t = target(
            "postgresql://app:own@h:1/d",
            &[("PGHOST", "other"), ("PGPASSWORD", "env")],
            None,
        );
        assert_eq!(t.host(), "h");
        assert_eq!(t.config.get_password(), Some(&b"own"[..]));
    }

    #[test]
    fn a_socket_directory_is_a_host_and_no_host_means_a_local_socket() {
        let t = target("postgresql:///app?host=/tmp/sock&port=5433", &[], None);
        assert_eq!(t.host(), "/tmp/sock");
        let t = target("postgresql:///app", &[], None);
        assert!(t.host().starts_with('/'), "{}", t.host());
    }

    #[test]
    fn the_password_comes_from_pgpass_when_nowhere_else() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(".pgpass");
        std::fs::write(&file, "db:5432:app:worker:fromfile\n").unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let t = target("postgresql://worker@db/app", &[], Some(dir.path()));
        assert_eq!(t.config.get_password(), Some(&b"fromfile"[..]));
        let other = target("postgresql://worker@db/other", &[], Some(dir.path()));
        assert_eq!(other.config.get_password(), None);
    }

    #[test]
    fn the_daemon_sends_its_settings_after_the_urls_options() {
        let t = target("postgresql://h/app?options=-c%20search_path%3Dq", &[], None);
        let daemon = t.config_for(Role::Daemon, true);
        let options = daemon.get_options().unwrap();
        assert!(
            options.starts_with("-c search_path=q -c plan_cache_mode="),
            "{options}"
        );
        assert_eq!(
            t.config_for(Role::Command, true).get_options(),
            Some("-c search_path=q")
        );
        assert_eq!(daemon.get_application_name(), Some("foreman run"));
    }

    #[test]
    fn the_debug_form_holds_no_password() {
        let t = Target::parse("postgresql://u:pw@h/d", "postgresql://u:***@h/d").unwrap();
        assert!(!format!("{t:?}").contains("pw@"));
    }
}
