//! A `LISTEN` connection: a connection of its own (notifications are read only inside a call on
//! the connection that listens). The daemon's listens on `foreman`, the producers' channel, and
//! `wake::listen` waits on it from a thread of its own; the dashboard's (`ui::live`) listens on
//! `foreman_changed` too, where the daemons say that they changed something. It only says that
//! something was notified; what, the claim (or the dashboard's read) finds out.

use std::time::Duration;

use postgres::Client;
use postgres::fallible_iterator::FallibleIterator;

use super::{Role, Target};
use crate::error::Result;

/// The producers' channel, which the daemons listen on (schema-postgres.sql documents it).
pub const CHANNEL: &str = "foreman";
/// The daemons' channel: a daemon notifies it, with its heartbeat, when it changed something
/// since its last one (started or ended tasks, buried some, recovered a daemon), and when it
/// starts and stops; dashboards listen (schema-postgres.sql documents it).
pub const CHANGED_CHANNEL: &str = "foreman_changed";
/// The payload that asks the daemons to read their control state (pauses, aborts) again.
pub const CONTROL_PAYLOAD: &str = "control";

/// What one wait heard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Heard {
    /// Notifications on the channel.
    pub notifications: usize,
    /// Notifications whose payload was `control` (the operator changed a pause or asked for an
    /// abort).
    pub control: usize,
    /// The connection had to be opened (again): whatever was notified while it was not
    /// listening was missed, so the caller should look at the queue.
    pub reconnected: bool,
}

pub struct Listener {
    target: Target,
    role: Role,
    /// The channels it listens on.
    channels: &'static [&'static str],
    client: Option<Client>,
}

impl Listener {
    /// The daemon's: the producers' channel.
    pub fn new(url: &str, label: &str) -> Result<Listener> {
        Ok(Listener {
            target: Target::parse(url, label)?,
            role: Role::Listener,
            channels: &[CHANNEL],
            client: None,
        })
    }

    /// The dashboard's, to the database `target` names: the producers' channel and the daemons'.
    pub fn watcher(target: Target) -> Listener {
        Listener {
            target,
            role: Role::Watcher,
            channels: &[CHANNEL, CHANGED_CHANNEL],
            client: None,
        }
    }

    /// Listens (connecting first if needed) and waits up to `timeout` for notifications. An
    /// error is a connection that could not be opened, broke, or refused `LISTEN`.
    ///
    /// Whoever holds a `Listener` must keep calling this, or drop it: the server sends each
    /// notification to the listening connection, and one that is never read fills its socket,
    /// stalls its backend and holds back the cluster's notification queue.
    pub fn wait(&mut self, timeout: Duration) -> Result<Heard> {
        let mut heard = Heard::default();
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            let mut client = self.target.connect(self.role)?;
            let listen: Vec<String> = self
                .channels
                .iter()
                .map(|c| format!("LISTEN {c}"))
                .collect();
            client
                .batch_execute(&listen.join("; "))
                .map_err(|e| self.target.error(&e))?;
            self.client = Some(client);
            // Said at once: the caller knows it listens, and looks for what it may have missed.
            heard.reconnected = true;
            return Ok(heard);
        }
        let Some(client) = self.client.as_mut() else {
            return Ok(heard);
        };
        let waited = count_notifications(client, timeout);
        let closed = client.is_closed();
        match waited {
            Ok((n, control)) if !closed => {
                heard.notifications += n;
                heard.control += control;
            }
            Ok(_) => {
                self.client = None;
                return Err(self.target.error_text("the listening connection closed"));
            }
            Err(e) => {
                self.client = None;
                return Err(self.target.error(&e));
            }
        }
        Ok(heard)
    }
}

/// Waits up to `timeout` for a notification, then takes those already there; returns how many,
/// and how many of them asked to read the control state again.
fn count_notifications(
    client: &mut Client,
    timeout: Duration,
) -> std::result::Result<(usize, usize), postgres::Error> {
    let mut notifications = client.notifications();
    let (mut n, mut control) = (0, 0);
    let mut heard = |note: &postgres::Notification| {
        n += 1;
        if note.payload() == CONTROL_PAYLOAD {
            control += 1;
        }
    };
    if let Some(note) = notifications.timeout_iter(timeout).next()? {
        heard(&note);
    }
    let mut pending = notifications.iter();
    while let Some(note) = pending.next()? {
        heard(&note);
    }
    Ok((n, control))
}
