//! Failure reports to Sentry (cargo feature `sentry`): the client options the binary initialises
//! Sentry with, the scope that tags an in-process handler's panic, and the events the daemon
//! captures (a task's final failure, a dead letter, a pool whose workers keep dying, the error the
//! daemon stopped with). It never initialises Sentry: that is process-wide state, so `main`'s job.
//! Without a client bound to the hub every function here does nothing, and without the feature
//! they are empty, so callers need no `cfg`.
//!
//! Events are queued to the transport's own thread, never sent from the caller's, so capturing one
//! never blocks the foreman loop (a full queue drops the event instead).
//!
//! A task's args and kwargs may hold personal data: they go with an event only when the client's
//! `send_default_pii` is on, which `client_options` sets from `sentry_send_args`. Keying it to that
//! option, rather than to a filter in foreman's own options, keeps them out by default for a
//! program that embeds foreman and builds its own client too.

#[cfg(feature = "sentry")]
pub use reporting::*;

#[cfg(not(feature = "sentry"))]
pub use disabled::*;

#[cfg(feature = "sentry")]
mod reporting {
    use std::borrow::Cow;
    use std::sync::Arc;
    use std::time::Duration;

    use sentry::integrations::panic::PanicIntegration;
    use sentry::protocol::{Event, Level, Value};
    use sentry::types::Dsn;
    use sentry::{ClientOptions, Hub};

    use crate::config::SentryConfig;
    use crate::error::Error;
    use crate::outcome::PANIC_PREFIX;
    use crate::store::{Buried, RunState};
    use crate::task::Task;

    /// How long the binary waits at exit (and a panicking worker thread waits) for queued events to
    /// be sent: long enough for a reachable Sentry, short enough not to hold up a restart.
    pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

    /// The options to initialise Sentry with, or `None` without a DSN (no reporting). Sets the
    /// release (foreman's version), the environment, the server name (the host name) and
    /// `send_default_pii` (`send_args`); the rest are `sentry::apply_defaults`' (the blocking ureq
    /// transport, the panic integration). `Err` names a DSN that does not parse.
    pub fn client_options(config: &SentryConfig) -> Result<Option<ClientOptions>, String> {
        let Some(dsn) = config.dsn.as_deref().map(str::trim) else {
            return Ok(None);
        };
        let dsn: Dsn = dsn
            .parse()
            .map_err(|e| format!("sentry_dsn (or SENTRY_DSN) is not a valid DSN: {e}"))?;
        let mut options = ClientOptions::default();
        options.dsn = Some(dsn);
        options.release = Some(Cow::Borrowed(concat!(
            "foreman@",
            env!("CARGO_PKG_VERSION")
        )));
        options.environment = config.environment.clone().map(Cow::Owned);
        options.server_name = host_name().map(Cow::Owned);
        options.send_default_pii = config.send_args;
        options.shutdown_timeout = FLUSH_TIMEOUT;
        // Applied here, not left to `sentry::init`, so that a test binding its own client (with a
        // test transport) gets the same integrations as the daemon. Turning the defaults off
        // afterwards keeps `sentry::init` from adding them a second time.
        let mut options = sentry::apply_defaults(options);
        options.default_integrations = false;
        Ok(Some(options))
    }

    /// The Sentry settings when the config file could not be loaded: only `SENTRY_DSN`, so that the
    /// error saying why can still be reported.
    pub fn config_from_env() -> SentryConfig {
        SentryConfig::new(None, None, None)
    }

    fn host_name() -> Option<String> {
        Some(crate::sys::hostname()).filter(|name| !name.is_empty())
    }

    /// Runs an in-process handler in a scope tagged with its task, so that the event the panic
    /// integration captures if it panics (and any event the handler captures itself) names the
    /// task.
    pub fn in_task_scope<R>(task: &Task, handler: impl FnOnce() -> R) -> R {
        // Asked outside the scope's setup, which must not reach back into the hub.
        let send_args = sends_args(&Hub::current());
        // `with_scope` only pushes a scope when a client is bound.
        sentry::with_scope(
            |scope| {
                scope.set_tag("task_name", &task.name);
                scope.set_tag("task_id", task.id);
                scope.set_tag("attempt", task.attempt);
                if send_args {
                    scope.set_extra("args", Value::from(task.args.clone()));
                    scope.set_extra("kwargs", Value::from(task.kwargs.clone()));
                }
            },
            handler,
        )
    }

    /// A task failed for good: its last attempt failed or timed out and no retry is left (earlier
    /// attempts are not reported). Not reported when the last attempt was a panic the panic
    /// integration already reported, so that one panic makes one event.
    pub fn task_failed(task: &Task, state: RunState, headline: &str, reason: &str) {
        Hub::with_active(|hub| {
            if reason.starts_with(PANIC_PREFIX) && hub.with_integration(|_: &PanicIntegration| true)
            {
                return;
            }
            let mut event = task_event(hub, task, format!("{}: {headline}", task.name));
            event.tags.insert("kind".into(), "task_failed".into());
            event.tags.insert("state".into(), state.as_str().into());
            event.extra.insert("error".into(), reason.into());
            hub.capture_event(event);
        });
    }

    /// A row moved to `foreman_dead` before it could run (unknown name, bad JSON…): its name may
    /// be unreadable, so only the id is tagged; the reason says what was wrong.
    pub fn row_buried(buried: &Buried) {
        Hub::with_active(|hub| {
            let mut event = Event {
                message: Some(format!("task moved to foreman_dead: {}", buried.reason)),
                level: Level::Error,
                logger: Some("foreman".into()),
                ..Event::default()
            };
            event.tags.insert("kind".into(), "dead_letter".into());
            event
                .tags
                .insert("task_id".into(), buried.task_id.to_string());
            if let Some(name) = &buried.task_name {
                event.tags.insert("task_name".into(), name.clone());
            }
            hub.capture_event(event);
        });
    }

    /// A decoded task moved to `foreman_dead` without running (its pool went down).
    pub fn task_buried(task: &Task, reason: &str) {
        Hub::with_active(|hub| {
            let mut event = task_event(hub, task, format!("task moved to foreman_dead: {reason}"));
            // The reason quotes the pool's last error, which names a pid: grouped by task instead.
            event.fingerprint = Cow::Owned(vec!["dead_letter".into(), task.name.clone().into()]);
            event.tags.insert("kind".into(), "dead_letter".into());
            hub.capture_event(event);
        });
    }

    /// A pool's workers keep dying: `down` when none can start any more (its tasks go to
    /// `foreman_dead`), else when a first worker has failed to start several times in a row. Once
    /// per streak: the pool reports again only after a worker has come back up.
    pub fn pool_failing(pool: &str, down: bool, failures: u32, reason: &str) {
        Hub::with_active(|hub| {
            let (what, level, kind) = if down {
                ("no worker can start", Level::Error, "pool_down")
            } else {
                ("a worker keeps dying", Level::Warning, "pool_failing")
            };
            let mut event = Event {
                message: Some(format!("pool {pool}: {what}: {reason}")),
                level,
                logger: Some("foreman".into()),
                // The reason names a pid: grouped by pool, not by message, it stays one issue.
                fingerprint: Cow::Owned(vec![kind.into(), pool.to_owned().into()]),
                ..Event::default()
            };
            event.tags.insert("kind".into(), kind.into());
            event.tags.insert("pool".into(), pool.to_owned());
            event.extra.insert("failures".into(), failures.into());
            hub.capture_event(event);
        });
    }

    /// The error `foreman run` stopped with: every one but a second signal's happens before the
    /// loop starts (bad config, DB, lock, pools). The binary flushes the event before it exits.
    pub fn startup_error(error: &Error) {
        if matches!(error, Error::Interrupted { .. }) {
            return; // Someone asked for it.
        }
        Hub::with_active(|hub| {
            let mut event = Event {
                message: Some(error.to_string()),
                level: Level::Fatal,
                logger: Some("foreman".into()),
                ..Event::default()
            };
            event.tags.insert("kind".into(), "startup".into());
            hub.capture_event(event);
        });
    }

    fn sends_args(hub: &Arc<Hub>) -> bool {
        hub.client().is_some_and(|c| c.options().send_default_pii)
    }

    /// An error event tagged with the task (and carrying its arguments if allowed).
    fn task_event(hub: &Arc<Hub>, task: &Task, message: String) -> Event<'static> {
        let mut event = Event {
            message: Some(message),
            level: Level::Error,
            logger: Some("foreman".into()),
            ..Event::default()
        };
        event.tags.insert("task_name".into(), task.name.clone());
        event.tags.insert("task_id".into(), task.id.to_string());
        event
            .tags
            .insert("attempt".into(), task.attempt.to_string());
        if sends_args(hub) {
            event
                .extra
                .insert("args".into(), Value::from(task.args.clone()));
            event
                .extra
                .insert("kwargs".into(), Value::from(task.kwargs.clone()));
        }
        event
    }
}

#[cfg(all(test, feature = "sentry"))]
mod tests {
    use super::*;
    use crate::config::SentryConfig;

    fn config(dsn: Option<&str>) -> SentryConfig {
        SentryConfig {
            dsn: dsn.map(str::to_owned),
            environment: Some("staging".to_owned()),
            send_args: true,
        }
    }

    #[test]
    fn no_dsn_no_options() {
        assert!(matches!(client_options(&config(None)), Ok(None)));
    }

    #[test]
    fn a_bad_dsn_is_an_error_naming_the_key() {
        let err = client_options(&config(Some("not a dsn"))).unwrap_err();
        assert!(
            err.starts_with("sentry_dsn (or SENTRY_DSN) is not a valid DSN"),
            "{err}"
        );
    }

    #[test]
    fn options_carry_release_environment_and_send_args() {
        let options = client_options(&config(Some(" https://key@sentry.example/7 ")))
            .unwrap()
            .unwrap();
        assert_eq!(
            options.dsn.as_ref().map(sentry::types::Dsn::host),
            Some("sentry.example")
        );
        assert_eq!(
            options.release.as_deref(),
            Some(concat!("foreman@", env!("CARGO_PKG_VERSION")))
        );
        assert_eq!(options.environment.as_deref(), Some("staging"));
        assert!(options.send_default_pii);
        assert_eq!(options.shutdown_timeout, FLUSH_TIMEOUT);
        let names: Vec<&str> = options.integrations.iter().map(|i| i.name()).collect();
        assert!(names.contains(&"panic"), "{names:?}");
        // So that `sentry::init` does not add the integrations a second time.
        assert!(!options.default_integrations);
        let again = sentry::apply_defaults(options);
        assert_eq!(
            again
                .integrations
                .iter()
                .filter(|i| i.name() == "panic")
                .count(),
            1
        );
    }
}

/// Built without the `sentry` feature: nothing is reported.
#[cfg(not(feature = "sentry"))]
mod disabled {
    use crate::error::Error;
    use crate::store::{Buried, RunState};
    use crate::task::Task;

    pub fn in_task_scope<R>(_task: &Task, handler: impl FnOnce() -> R) -> R {
        handler()
    }

    pub fn task_failed(_task: &Task, _state: RunState, _headline: &str, _reason: &str) {}

    pub fn row_buried(_buried: &Buried) {}

    pub fn task_buried(_task: &Task, _reason: &str) {}

    pub fn pool_failing(_pool: &str, _down: bool, _failures: u32, _reason: &str) {}

    pub fn startup_error(_error: &Error) {}
}
