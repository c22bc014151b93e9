//! Reloading the configuration (SIGHUP, `foreman reload`): the file is read again and what
//! changed applies while the daemon runs, with nothing queued or running lost. A configuration
//! that does not load, or that this daemon cannot use, is refused and the running one stays. The
//! settings only a restart can change (the database, the wakeup dir, the PID file, Sentry) keep
//! their running values, which the log and the answer say. Each pool is replaced by a new
//! generation of processes, started one at a time while the previous generation's leave, each
//! after its current task (`advance_pools`): new task code loads, and a pool never has fewer
//! processes than it had. The answer goes beside the PID file (`reload_report`).

use std::collections::BTreeMap;

use super::stop::Phase;
use super::{Foreman, PoolGen, Role};
use crate::clock::unix_now;
use crate::config::Config;
use crate::duration::format_duration;
use crate::process_pool::ProcessPool;
use crate::reload_report::ReloadReport;
use crate::schedule::Schedules;

/// What a reload applied.
struct Applied {
    /// What changed, in one line.
    message: String,
    /// The settings kept at their running values until a restart.
    restart_needed: Vec<String>,
}

impl Foreman {
    /// Reads the configuration again and applies it, or refuses it; answers in the log and, when
    /// the daemon has a PID file, beside it for `foreman reload`.
    pub(super) fn reload(&mut self) {
        let requested_at = unix_now();
        // Not while stopping: READY=1 would take back the STOPPING=1 systemd was told.
        let running = matches!(self.stop.phase, Phase::Running);
        if running {
            self.figures.notifier.reloading();
        }
        let outcome = self.apply_reload();
        if running {
            let status = self.status_line();
            self.figures.notifier.ready(status);
        }
        let (applied, message, restart_needed) = match outcome {
            Ok(done) => {
                log::info!("reloaded: {}", done.message);
                (true, done.message, done.restart_needed)
            }
            Err(why) => {
                log::error!("reload refused, the running configuration stays: {why}");
                (false, why, Vec::new())
            }
        };
        let Some(pid_file) = &self.config.pid_file else {
            return;
        };
        let report = ReloadReport {
            pid: std::process::id(),
            requested_at,
            applied,
            message,
            restart_needed,
        };
        if let Err(e) = crate::reload_report::write(pid_file, &report) {
            log::warn!(
                "cannot write the reload's answer to {}: {e}",
                crate::reload_report::path(pid_file).display()
            );
        }
    }

    /// The reload itself: every check first, then what may fail to start, and only then the
    /// switch, which cannot fail. `Err` is why it was refused, with nothing changed.
    fn apply_reload(&mut self) -> Result<Applied, String> {
        if !matches!(self.stop.phase, Phase::Running) {
            return Err("the daemon is stopping".to_owned());
        }
        let mut new = self.config.reload().map_err(|e| e.to_string())?;
        let restart_needed = keep_restart_only(&self.config, &mut new);
        new.check_commands().map_err(|e| e.to_string())?;
        // Taken even if the reload is refused later: a generation started and stopped again
        // keeps its id until its drivers have ended.
        let first_pool_id = self.workers.next_pool_id;
        self.workers.next_pool_id += new.pools.len();
        let mut registry = self.base_registry.clone();
        registry
            .add_config(&new, first_pool_id)
            .map_err(|e| e.to_string())?;
        registry.check_schedules(&new).map_err(|e| e.to_string())?;
        let started = self.start_generations(&new, first_pool_id)?;
        let schedules = match self.resize_and_reschedule(&new) {
            Ok(schedules) => schedules,
            Err(why) => {
                for pool in started {
                    self.stop_generation(pool);
                }
                // Shrinking never fails: back to the running number of threads.
                let _ = self.workers.threads.resize(self.config.workers);
                return Err(why);
            }
        };
        let message = describe(&self.config, &new);
        for what in &restart_needed {
            log::warn!("reload: {what}");
        }
        self.replace_pools(started, &new, &mut registry);
        let tick_changed = new.tick != self.config.tick;
        let beat_changed = new.heartbeat != self.config.heartbeat;
        self.registry = registry;
        self.schedules = schedules;
        self.config = new;
        if beat_changed {
            self.figures.set_heartbeat(self.config.heartbeat);
        }
        if tick_changed || beat_changed {
            self.look.quiet_ticks = 0;
            self.schedule_tick();
        }
        self.advance_pools();
        self.plan_claims();
        self.write_beat();
        self.fill();
        Ok(Applied {
            message,
            restart_needed,
        })
    }

    /// Starts a generation of every pool of `new`: all its processes for a new pool, the first
    /// one for a pool that replaces a running one (`advance_pools` starts the others). `Err`
    /// (with the ones started stopped again) when a driver thread cannot start.
    fn start_generations(
        &mut self,
        new: &Config,
        first_pool_id: usize,
    ) -> Result<Vec<ProcessPool>, String> {
        let mut started: Vec<ProcessPool> = Vec::with_capacity(new.pools.len());
        for (position, (name, pool)) in new.pools.iter().enumerate() {
            let replaces = self
                .workers
                .pools
                .iter()
                .any(|g| matches!(g.role, Role::Current { .. }) && *g.pool.name == **name);
            let processes = if replaces { 1 } else { pool.processes };
            let generation = ProcessPool::start(
                first_pool_id + position,
                name,
                pool,
                new.launch_env(&pool.command),
                processes,
                &self.workers.pool_events,
                &self.workers.finished,
                &self.workers.children,
            );
            match generation {
                Ok(generation) => started.push(generation),
                Err(e) => {
                    for pool in started {
                        self.stop_generation(pool);
                    }
                    return Err(format!("pool {name}: {e}"));
                }
            }
        }
        Ok(started)
    }

    /// The worker threads for `new.workers`, and `new`'s schedules with their state.
    fn resize_and_reschedule(&mut self, new: &Config) -> Result<Schedules, String> {
        self.workers
            .threads
            .resize(new.workers)
            .map_err(|e| e.to_string())?;
        self.schedules
            .reconfigure(&new.schedules, &mut self.store, unix_now())
            .map_err(|e| format!("schedules: {e}"))
    }

    /// A generation started for a reload that was refused after all.
    fn stop_generation(&mut self, mut pool: ProcessPool) {
        pool.request_stop();
        self.workers.pools.push(PoolGen {
            pool,
            role: Role::Stopping,
        });
    }

    /// Switches to the generations `started` for `new`: each replaces the current generation
    /// of its pool, if there is one, which keeps serving until it is replaced; a pool `new` has
    /// no more drains. The names the replaced generation's workers announced keep their route, to
    /// the new generation.
    fn replace_pools(
        &mut self,
        started: Vec<ProcessPool>,
        new: &Config,
        registry: &mut crate::registry::Registry,
    ) {
        let mut replaced: BTreeMap<String, usize> = BTreeMap::new();
        let mut draining = Vec::new();
        for generation in &self.workers.pools {
            let Role::Current { previous } = generation.role else {
                continue;
            };
            // Replaced before its own replacement was done: the oldest one goes at once.
            draining.extend(previous);
            if new.pools.contains_key(&*generation.pool.name) {
                replaced.insert(generation.pool.name.to_string(), generation.pool.id);
            } else {
                log::info!(
                    "pool {}: removed by the reload; its processes stop as they finish their tasks",
                    generation.pool.name
                );
                draining.push(generation.pool.id);
            }
        }
        for generation in &mut self.workers.pools {
            if draining.contains(&generation.pool.id) {
                generation.role = Role::Draining;
            } else if replaced.values().any(|id| *id == generation.pool.id) {
                generation.role = Role::Previous;
            }
        }
        for pool in started {
            let previous = replaced.get(&*pool.name).copied();
            if let Some(previous) = previous.and_then(|id| self.workers.find(id)) {
                let before = &self.workers.pools[previous].pool;
                if let Some(served) = before.served() {
                    let served = served.clone();
                    registry.add_pool_tasks(pool.id, &served, new);
                }
                log::info!(
                    "pool {}: replacing its {} process(es) one at a time, each after its current task",
                    pool.name,
                    before.alive()
                );
            } else if !replaced.contains_key(&*pool.name) {
                log::info!("pool {}: added by the reload", pool.name);
            }
            self.workers.pools.push(PoolGen {
                pool,
                role: Role::Current { previous },
            });
        }
    }

    /// Whether some pool generation is on its way in or out.
    pub(super) fn replacing_pools(&self) -> bool {
        self.workers
            .pools
            .iter()
            .any(|g| g.role != Role::Current { previous: None })
    }

    /// Moves every replacement along after something changed (a hello, a process gone, a task
    /// finished): the next process of a new generation starts, a previous one leaves, a drained
    /// generation stops, and one whose drivers have all ended is dropped.
    pub(super) fn advance_pools(&mut self) {
        // Stopping: every generation is stopped together once the running tasks are done.
        if !matches!(self.stop.phase, Phase::Running) {
            return;
        }
        let roles_before = self.pool_roles();
        let replacements: Vec<(usize, usize)> = self
            .workers
            .pools
            .iter()
            .filter_map(|g| match g.role {
                Role::Current {
                    previous: Some(previous),
                } => Some((g.pool.id, previous)),
                _ => None,
            })
            .collect();
        for (current, previous) in replacements {
            self.advance_replacement(current, previous);
        }
        for generation in &mut self.workers.pools {
            if generation.role != Role::Draining {
                continue;
            }
            while generation.pool.retire_one() {}
            // Once its last task is done and its ready processes took their leave: the ones left
            // (starting, or failing to) are stopped.
            if generation.pool.in_flight() == 0 && generation.pool.up() == 0 {
                generation.pool.request_stop();
                generation.role = Role::Stopping;
            }
        }
        let (gone, kept): (Vec<PoolGen>, Vec<PoolGen>) = std::mem::take(&mut self.workers.pools)
            .into_iter()
            .partition(|g| g.role == Role::Stopping && g.pool.ended());
        self.workers.pools = kept;
        for generation in gone {
            log::debug!(
                "pool {}: a replaced generation's drivers have all ended",
                generation.pool.name
            );
            generation.pool.join();
        }
        // What the claims may take follows the generations' roles.
        if self.pool_roles() != roles_before {
            self.plan_claims();
        }
    }

    fn pool_roles(&self) -> Vec<(usize, Role)> {
        self.workers
            .pools
            .iter()
            .map(|g| (g.pool.id, g.role))
            .collect()
    }

    /// One step of the replacement of generation `previous` by `current`.
    fn advance_replacement(&mut self, current: usize, previous: usize) {
        let (Some(c), Some(p)) = (self.workers.find(current), self.workers.find(previous)) else {
            if let Some(c) = self.workers.find(current) {
                self.workers.pools[c].role = Role::Current { previous: None };
            }
            return;
        };
        let (new, old) = two_mut(&mut self.workers.pools, c, p);
        let name = new.pool.name.clone();
        // The new workers cannot start (an import error in the new code, say): the previous
        // ones, which nothing has retired yet, keep serving.
        if new.pool.served().is_none() && new.pool.is_down() {
            log::error!(
                "pool {name}: the reloaded workers cannot start ({}); the previous ones keep serving: fix it and reload again",
                new.pool.last_error()
            );
            new.pool.request_stop();
            new.role = Role::Stopping;
            old.role = Role::Current { previous: None };
            self.registry.repoint_pool(current, previous);
            return;
        }
        // One previous process leaves for each new one that is up.
        let (old_target, new_target) = (old.pool.target(), new.pool.target());
        let wanted = old_target.min(new_target).saturating_sub(new.pool.up());
        while old.pool.processes() > wanted && old.pool.retire_one() {}
        // The next new one starts once the last said hello, and never makes the pool more than
        // one process over what it had. (Old ones failing to start have no process to count: a
        // reload that fixes a pool that is down starts all its new ones, one after the other.)
        if new.pool.started() < new_target
            && !new.pool.starting()
            && old.pool.running() + new.pool.running() <= old_target.max(new_target)
            && let Err(e) = new.pool.start_process()
        {
            log::error!("pool {name}: cannot start a worker's driver: {e}");
        }
        if new.pool.started() >= new_target && old.pool.processes() == 0 {
            log::info!(
                "pool {name}: replaced: its {new_target} new process(es) are started; the previous ones leave as they finish their tasks"
            );
            new.role = Role::Current { previous: None };
            old.role = Role::Draining;
        }
    }
}

/// Mutable references to two different elements.
fn two_mut<T>(items: &mut [T], a: usize, b: usize) -> (&mut T, &mut T) {
    assert_ne!(a, b, "two_mut needs two different elements");
    if a < b {
        let (left, right) = items.split_at_mut(b);
        (&mut left[a], &mut right[0])
    } else {
        let (left, right) = items.split_at_mut(a);
        (&mut right[0], &mut left[b])
    }
}

/// Puts back in `new` the running values of the settings only a restart changes; returns what
/// each one would have become, as the log and `foreman reload` say it.
fn keep_restart_only(old: &Config, new: &mut Config) -> Vec<String> {
    let mut kept = Vec::new();
    let mut say = |key: &str, running: String, asked: String| {
        kept.push(format!(
            "`{key}` changes only at a restart: it stays {running} (the configuration now says {asked})"
        ));
    };
    let path = |p: &Option<std::path::PathBuf>| {
        p.as_ref()
            .map_or_else(|| "none".to_owned(), |p| p.display().to_string())
    };
    if new.db != old.db {
        say("db", old.db.to_string(), new.db.to_string());
        new.db = old.db.clone();
    }
    if new.wakeup_dir != old.wakeup_dir {
        say("wakeup_dir", path(&old.wakeup_dir), path(&new.wakeup_dir));
        new.wakeup_dir.clone_from(&old.wakeup_dir);
    }
    if new.pid_file != old.pid_file {
        say("pid_file", path(&old.pid_file), path(&new.pid_file));
        new.pid_file.clone_from(&old.pid_file);
    }
    // Sentry is set up once, by the binary, before the daemon starts.
    if new.sentry != old.sentry {
        let what = |s: &crate::config::SentryConfig| {
            format!(
                "{} reporting{}",
                if s.dsn.is_some() { "with" } else { "without" },
                if s.send_args { ", args sent" } else { "" }
            )
        };
        say("sentry_*", what(&old.sentry), what(&new.sentry));
        new.sentry = old.sentry.clone();
    }
    kept
}

/// What a reload changes, in one line: `workers 4 -> 8; pools replaced: py (changed); …`.
fn describe(old: &Config, new: &Config) -> String {
    let mut parts = Vec::new();
    for (key, before, after) in [
        ("workers", old.workers, new.workers),
        ("prefetch", old.prefetch, new.prefetch),
    ] {
        if before != after {
            parts.push(format!("{key} {before} -> {after}"));
        }
    }
    for (key, before, after) in [
        (
            "graceful_timeout",
            old.graceful_timeout,
            new.graceful_timeout,
        ),
        ("tick", old.tick, new.tick),
        ("heartbeat", old.heartbeat, new.heartbeat),
        (
            "history_retention",
            old.history_retention,
            new.history_retention,
        ),
        ("stats_retention", old.stats_retention, new.stats_retention),
    ] {
        if before != after {
            parts.push(format!(
                "{key} {} -> {}",
                format_duration(before),
                format_duration(after)
            ));
        }
    }
    let replaced: Vec<String> = new
        .pools
        .iter()
        .filter_map(|(name, pool)| {
            let before = old.pools.get(name)?;
            Some(if before == pool {
                name.clone()
            } else {
                format!("{name} (changed)")
            })
        })
        .collect();
    if !replaced.is_empty() {
        parts.push(format!("pools replaced: {}", replaced.join(", ")));
    }
    parts.extend(changes("pools", &old.pools, &new.pools, false));
    parts.extend(changes("tasks", &old.tasks, &new.tasks, true));
    parts.extend(changes("schedules", &old.schedules, &new.schedules, true));
    let file = new.file.as_ref().map_or_else(
        || "built-in defaults".to_owned(),
        |f| f.display().to_string(),
    );
    if parts.is_empty() {
        format!("{file}: no setting changed")
    } else {
        format!("{file}: {}", parts.join("; "))
    }
}

/// `tasks added: a, b`, `tasks removed: c` and (with `changed`) `tasks changed: d`.
fn changes<T: PartialEq>(
    what: &str,
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
    changed: bool,
) -> Vec<String> {
    let list = |names: Vec<&String>| {
        names
            .into_iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let added: Vec<&String> = new.keys().filter(|k| !old.contains_key(*k)).collect();
    let removed: Vec<&String> = old.keys().filter(|k| !new.contains_key(*k)).collect();
    let altered: Vec<&String> = new
        .iter()
        .filter(|(k, v)| old.get(*k).is_some_and(|o| o != *v))
        .map(|(k, _)| k)
        .collect();
    let mut parts = Vec::new();
    if !added.is_empty() {
        parts.push(format!("{what} added: {}", list(added)));
    }
    if !removed.is_empty() {
        parts.push(format!("{what} removed: {}", list(removed)));
    }
    if changed && !altered.is_empty() {
        parts.push(format!("{what} changed: {}", list(altered)));
    }
    parts
}
