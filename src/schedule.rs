//! Recurring tasks: when each `[schedules.NAME]` fires next, firing it (task and state in one
//! transaction), and how an adaptive schedule's interval moves with its task's answers.

use std::time::Duration;

use chrono::{DateTime, Local};
use croner::Cron;

use crate::config::{ScheduleConfig, When};
use crate::cron::parse_cron;
use crate::error::{Error, Result};
use crate::store::{Fired, NewTask, ScheduleState, Store};

/// Seconds before a firing the DB refused is tried again (it stays due, so it is not lost).
const RETRY_AFTER_ERROR: f64 = 1.0;

/// What the stored state was computed from; a changed definition starts the schedule afresh.
fn spec(config: &ScheduleConfig) -> String {
    let when = match &config.when {
        When::Every(every) => format!("every {}s", every.as_secs_f64()),
        When::Cron(cron) => format!("cron {cron}"),
        When::Adaptive {
            start,
            min,
            max,
            factor,
        } => format!(
            "adaptive {}s in {}s..{}s x{factor}",
            start.as_secs_f64(),
            min.as_secs_f64(),
            max.as_secs_f64()
        ),
    };
    format!("{when}; task {}", config.task)
}

struct Entry {
    name: String,
    config: ScheduleConfig,
    /// Parsed once; only for cron schedules.
    cron: Option<Cron>,
    state: ScheduleState,
}

/// Every configured schedule with its state, as the foreman loop drives them.
pub struct Schedules {
    entries: Vec<Entry>,
}

impl Schedules {
    /// Reads the stored state of each configured schedule. A new schedule, or one whose definition
    /// changed, starts now (`every`, adaptive) or at its next cron time; the others keep the due
    /// time they had, so a restart neither repeats a firing nor skips one.
    pub fn load(
        configs: &std::collections::BTreeMap<String, ScheduleConfig>,
        store: &mut Store,
        now: f64,
    ) -> Result<Schedules> {
        Schedules::load_after(None, configs, store, now)
    }

    /// The schedules of a reloaded configuration: as `load`, except that one whose definition
    /// did not change keeps the state this daemon has for it (which a refused write may have left
    /// newer than the stored one), and its new args, kwargs, priority and jitter apply from its
    /// next firing.
    pub fn reconfigure(
        &self,
        configs: &std::collections::BTreeMap<String, ScheduleConfig>,
        store: &mut Store,
        now: f64,
    ) -> Result<Schedules> {
        Schedules::load_after(Some(self), configs, store, now)
    }

    fn load_after(
        previous: Option<&Schedules>,
        configs: &std::collections::BTreeMap<String, ScheduleConfig>,
        store: &mut Store,
        now: f64,
    ) -> Result<Schedules> {
        if configs.is_empty() {
            return Ok(Schedules {
                entries: Vec::new(),
            });
        }
        let mut stored: std::collections::HashMap<String, ScheduleState> =
            store.schedules()?.into_iter().collect();
        for entry in previous.map_or(&[][..], |p| &p.entries) {
            stored.insert(entry.name.clone(), entry.state.clone());
        }
        let mut entries = Vec::with_capacity(configs.len());
        for (name, config) in configs {
            let cron = match &config.when {
                When::Cron(pattern) => {
                    Some(parse_cron(pattern).map_err(crate::error::Error::Config)?)
                }
                _ => None,
            };
            let spec = spec(config);
            let state = match stored.get(name) {
                Some(state) if state.spec == spec => state.clone(),
                previous => {
                    let mut state = ScheduleState {
                        spec,
                        next_due: now,
                        last_fired: None,
                        // Kept across a changed definition, so that a task from before the change
                        // still queued or running is not joined by a second one.
                        last_task_id: previous.and_then(|p| p.last_task_id),
                        interval: None,
                    };
                    if let Some(cron) = &cron {
                        state.next_due = next_cron(cron, now);
                    }
                    if let When::Adaptive { start, .. } = config.when {
                        state.interval = Some(start.as_secs_f64());
                    }
                    state.next_due += jitter(config.jitter);
                    if store.save_schedule(name, &state, None)? {
                        state
                    } else {
                        // Another daemon stored the same definition meanwhile: its state wins.
                        stored_state(store, name)?.unwrap_or(state)
                    }
                }
            };
            entries.push(Entry {
                name: name.clone(),
                config: config.clone(),
                cron,
                state,
            });
        }
        Ok(Schedules { entries })
    }

    /// The earliest due time of any schedule.
    pub fn next_due(&self) -> Option<f64> {
        self.entries
            .iter()
            .map(|e| e.state.next_due)
            .min_by(f64::total_cmp)
    }

    /// Fires every schedule that is due. One whose previous task is still queued or running
    /// (`busy` says), or whose task is paused (`paused` says), skips this firing instead of
    /// piling a second one up. A missed window fires
    /// once, however many were missed: the next due time is computed from now. Returns the
    /// schedules whose firing (or skip) the DB refused to record, with the error, for the caller
    /// to log (a full disk refuses them all, every time); one not fired is tried again a second
    /// later.
    pub fn fire_due(
        &mut self,
        store: &mut Store,
        now: f64,
        busy: impl Fn(i64) -> bool,
        paused: impl Fn(&str) -> bool,
    ) -> Vec<(String, Error)> {
        let mut refused = Vec::new();
        for entry in &mut self.entries {
            if entry.state.next_due > now {
                continue;
            }
            let expected = entry.state.next_due;
            let mut state = entry.state.clone();
            state.next_due = following(entry, now);
            // A paused task's window passes without a firing, as if the daemon had been down:
            // a resume does not bring a pile of catch-up runs.
            if paused(&entry.config.task) {
                match store.save_schedule(&entry.name, &state, Some(expected)) {
                    Ok(true) => log::info!(
                        "schedule {}: task {} is paused; skipping this window",
                        entry.name,
                        entry.config.task
                    ),
                    Ok(false) => {
                        reload(store, entry, now);
                        continue;
                    }
                    Err(e) => refused.push((entry.name.clone(), e)),
                }
                entry.state = state;
                continue;
            }
            // When the DB cannot say, the firing is skipped: a late firing beats a doubled one.
            let previous = state
                .last_task_id
                .filter(|&id| busy(id) || store.is_queued(id).unwrap_or(true));
            if let Some(previous) = previous {
                match store.save_schedule(&entry.name, &state, Some(expected)) {
                    Ok(true) => log::info!(
                        "schedule {}: task {previous} from its last firing has not finished; skipping this one",
                        entry.name
                    ),
                    // Another daemon moved it first: its view of this window stands.
                    Ok(false) => {
                        reload(store, entry, now);
                        continue;
                    }
                    Err(e) => refused.push((entry.name.clone(), e)),
                }
                // Even unsaved: a restart may then skip once more, which is harmless.
                entry.state = state;
                continue;
            }
            state.last_fired = Some(now);
            let (args, kwargs) = (
                entry.config.args.to_string(),
                entry.config.kwargs.to_string(),
            );
            let origin = format!("schedule {}", entry.name);
            let task = NewTask {
                name: &entry.config.task,
                args: &args,
                kwargs: &kwargs,
                delay: 0.0,
                priority: entry.config.priority,
                origin: Some(&origin),
                unique_key: None,
            };
            match store.fire_schedule(&entry.name, &task, expected, &mut state) {
                Ok(Fired::Task(id)) => {
                    log::info!(
                        "schedule {}: enqueued task {id} {}",
                        entry.name,
                        entry.config.task
                    );
                    entry.state = state;
                }
                Ok(Fired::Elsewhere) => {
                    log::debug!("schedule {}: another daemon fired this window", entry.name);
                    reload(store, entry, now);
                }
                Err(e) => {
                    refused.push((entry.name.clone(), e));
                    entry.state.next_due = now + RETRY_AFTER_ERROR;
                }
            }
        }
        refused
    }

    /// An adaptive schedule's task reported whether it found something new: the interval shrinks
    /// (eventful) or grows (not), and the next due time moves with it.
    pub fn report(&mut self, store: &mut Store, task_id: i64, eventful: bool, now: f64) {
        let Some(entry) = self
            .entries
            .iter_mut()
            .find(|e| e.state.last_task_id == Some(task_id))
        else {
            return;
        };
        let When::Adaptive {
            start,
            min,
            max,
            factor,
        } = entry.config.when
        else {
            return;
        };
        let mut state = entry.state.clone();
        let current = state.interval.unwrap_or(start.as_secs_f64());
        let next = if eventful {
            current / factor
        } else {
            current * factor
        };
        let interval = next.clamp(min.as_secs_f64(), max.as_secs_f64());
        state.interval = Some(interval);
        let base = state.last_fired.unwrap_or(now);
        state.next_due = (base + interval).max(now) + jitter(entry.config.jitter);
        log::info!(
            "schedule {}: task {task_id} was {}; interval {:.0}s -> {interval:.0}s",
            entry.name,
            if eventful { "eventful" } else { "uneventful" },
            current
        );
        match store.save_schedule(&entry.name, &state, Some(entry.state.next_due)) {
            Ok(true) => entry.state = state,
            Ok(false) => reload(store, entry, now),
            Err(e) => log::error!("schedule {}: {e}", entry.name),
        }
    }
}

/// Fires schedule `name` now, outside its timetable (the dashboard's "run now"): its task is
/// enqueued the way a firing enqueues it, through `Store::fire_schedule`, with `origin` saying who
/// asked; its stored state records the firing and keeps its next due time. Unlike a timed firing
/// it does not skip when the previous task is still queued: someone asked for it. The caller
/// wakes the daemon.
#[cfg(feature = "ui")]
pub fn run_now(
    configs: &std::collections::BTreeMap<String, ScheduleConfig>,
    store: &mut Store,
    name: &str,
    origin: &str,
    now: f64,
) -> Result<i64> {
    let Some((name, config)) = configs.get_key_value(name) else {
        return Err(Error::Config(format!(
            "no schedule {name:?} in the configuration"
        )));
    };
    // Loading one schedule stores its state first if it has none yet (the daemon never ran it).
    let one = std::collections::BTreeMap::from([(name.clone(), config.clone())]);
    let (args, kwargs) = (config.args.to_string(), config.kwargs.to_string());
    let task = NewTask {
        name: &config.task,
        args: &args,
        kwargs: &kwargs,
        delay: 0.0,
        priority: config.priority,
        origin: Some(origin),
        unique_key: None,
    };
    // A daemon sharing the database (PostgreSQL) may fire it between the read and the firing,
    // which then refuses: read it again and fire after that one.
    let mut tries = 0;
    let id = loop {
        let mut schedules = Schedules::load(&one, store, now)?;
        let Some(entry) = schedules.entries.pop() else {
            return Err(Error::Config(format!("no schedule {name:?}")));
        };
        let expected = entry.state.next_due;
        let mut state = entry.state;
        state.last_fired = Some(now);
        match store.fire_schedule(name, &task, expected, &mut state)? {
            Fired::Task(id) => break id,
            Fired::Elsewhere if tries < 3 => tries += 1,
            Fired::Elsewhere => {
                return Err(Error::Config(format!(
                    "schedule {name:?} kept changing under this firing: try again"
                )));
            }
        }
    };
    log::info!(
        "schedule {name}: enqueued task {id} {} ({origin})",
        config.task
    );
    Ok(id)
}

impl Schedules {
    /// After the wall clock stepped back by `seconds`: an `every` or adaptive schedule's next due
    /// time was computed on the clock before the step, so it moves back as much (not before
    /// `now`), and the interval stays what was asked. A cron schedule keeps its wall-clock times:
    /// its next one is after its last firing, so a step back neither repeats a firing nor bunches
    /// them up.
    pub fn step_back(&mut self, store: &mut Store, seconds: f64, now: f64) {
        for entry in &mut self.entries {
            if entry.cron.is_some() || entry.state.next_due <= now {
                continue;
            }
            let mut state = entry.state.clone();
            state.next_due = (state.next_due - seconds).max(now);
            if let Err(e) = store.save_schedule(&entry.name, &state, Some(entry.state.next_due)) {
                log::error!("schedule {}: {e}", entry.name);
            }
            // Even unsaved: a restart reads the later time, which only makes one firing late.
            entry.state = state;
        }
    }
}

/// The stored state of schedule `name`, if there is one.
fn stored_state(store: &Store, name: &str) -> Result<Option<ScheduleState>> {
    Ok(store
        .schedules()?
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, state)| state))
}

/// Another daemon fired or moved the schedule first: takes its stored state. One stored with
/// another definition (daemons configured differently) is left to them: this daemon looks again
/// a little later rather than fight over it.
fn reload(store: &Store, entry: &mut Entry, now: f64) {
    match stored_state(store, &entry.name) {
        Ok(Some(stored)) if stored.spec == entry.state.spec => entry.state = stored,
        Ok(stored) => {
            log::warn!(
                "schedule {}: another daemon stores it as {:?}, not {:?}: configure it the same on every daemon",
                entry.name,
                stored.map(|s| s.spec).unwrap_or_default(),
                entry.state.spec
            );
            entry.state.next_due = now + RETRY_AFTER_ERROR * 60.0;
        }
        Err(e) => {
            log::error!("schedule {}: {e}", entry.name);
            entry.state.next_due = now + RETRY_AFTER_ERROR;
        }
    }
}

/// The due time after a firing (or a skipped one) at `now`.
fn following(entry: &Entry, now: f64) -> f64 {
    let base = match (&entry.config.when, &entry.cron) {
        (_, Some(cron)) => next_cron(cron, now),
        (When::Every(every), None) => now + every.as_secs_f64(),
        (When::Adaptive { start, .. }, None) => {
            now + entry.state.interval.unwrap_or(start.as_secs_f64())
        }
        (When::Cron(_), None) => now + 60.0,
    };
    base + jitter(entry.config.jitter)
}

/// The first cron time strictly after `now`, in the local time zone. A pattern with no future
/// time (e.g. a 30 February) comes back in a year, which is as good as never, loudly.
fn next_cron(cron: &Cron, now: f64) -> f64 {
    let secs = now.floor() as i64;
    let at = DateTime::from_timestamp(secs, 0).map(|t| t.with_timezone(&Local));
    if let Some(Ok(next)) = at.map(|t| cron.find_next_occurrence(&t, false)) {
        // Milliseconds since 1970 fit a double exactly until the year 287,396.
        #[allow(clippy::cast_precision_loss)]
        let millis = next.timestamp_millis() as f64;
        return millis / 1000.0;
    }
    log::error!(
        "cron pattern {} never matches; checking again in a year",
        cron.pattern
    );
    now + 365.0 * 86_400.0
}

fn jitter(jitter: Option<Duration>) -> f64 {
    jitter.map_or(0.0, |j| j.as_secs_f64() * fastrand::f64())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::Access;

    fn schedule(when: When) -> ScheduleConfig {
        ScheduleConfig {
            task: "t".to_owned(),
            args: serde_json::json!([]),
            kwargs: serde_json::json!({}),
            priority: 0,
            when,
            jitter: None,
        }
    }

    #[test]
    #[allow(clippy::float_cmp)] // The values compared are exact.
    fn a_step_back_keeps_every_intervals_and_cron_times() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::database::Database::Sqlite(dir.path().join("q.db"));
        let mut queue = Store::open(&db, Access::Create).unwrap();
        queue.ensure_schema().unwrap();
        let configs = BTreeMap::from([
            (
                "every".to_owned(),
                schedule(When::Every(Duration::from_mins(10))),
            ),
            (
                "cron".to_owned(),
                schedule(When::Cron("0 * * * *".to_owned())),
            ),
        ]);
        // Loaded an hour before a step back of an hour: the every schedule is due at once.
        let before = 1_800_000_000.0;
        let mut schedules = Schedules::load(&configs, &mut queue, before).unwrap();
        let fired = |s: &mut Schedules, q: &mut Store, now| {
            s.fire_due(q, now, |_| false, |_| false);
            s.entries
                .iter()
                .map(|e| e.state.next_due)
                .collect::<Vec<f64>>()
        };
        // Entries are in name order: cron, every.
        let due = fired(&mut schedules, &mut queue, before);
        assert_eq!(due[1], before + 600.0);
        let cron_due = due[0];
        assert!(cron_due > before && cron_due <= before + 3600.0);
        // The clock steps back an hour, a minute after the firing.
        let now = before + 60.0 - 3600.0;
        schedules.step_back(&mut queue, 3600.0, now);
        let due: Vec<f64> = schedules.entries.iter().map(|e| e.state.next_due).collect();
        assert_eq!(
            due[1],
            now + 540.0,
            "every: nine more minutes, as before the step"
        );
        assert_eq!(due[0], cron_due, "cron: the same wall-clock time");
        let stored: BTreeMap<String, ScheduleState> =
            queue.schedules().unwrap().into_iter().collect();
        assert_eq!(stored["every"].next_due, now + 540.0, "saved");
        // Nothing fires before its time on the new clock: no burst, no repeat.
        assert_eq!(fired(&mut schedules, &mut queue, now + 500.0), due);
    }
}
