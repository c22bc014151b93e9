//! The daemon's `LISTEN foreman` connection: a connection of its own (notifications are read only
//! inside a call on the connection that listens), which `wake::listen` waits on from a thread of
//! its own. It only says that something was notified; what, the claim finds out.

use std::time::Duration;

use postgres::Client;
use postgres::fallible_iterator::FallibleIterator;

use super::{Role, Target};
use crate::error::Result;

/// The one channel foreman listens on (schema-postgres.sql documents it).
pub const CHANNEL: &str = "foreman";
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
    client: Option<Client>,
}

impl Listener {
    pub fn new(url: &str, label: &str) -> Result<Listener> {
        Ok(Listener {
            target: Target::parse(url, label)?,
            client: None,
        })
    }

    /// Listens (connecting first if needed) and waits up to `timeout` for notifications. An
    /// error is a connection that could not be opened, broke, or refused `LISTEN`.
    pub fn wait(&mut self, timeout: Duration) -> Result<Heard> {
        let mut heard = Heard::default();
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            let mut client = self.target.connect(Role::Listener)?;
            client
                .batch_execute(&format!("LISTEN {CHANNEL}"))
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
