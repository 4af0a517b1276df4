//! Replacing workers: the periodic checks that find one due (memory past `max_rss`, age past
//! `max_lifetime`, a stopped heartbeat), the queue of replacements bounded by `max_recycling`,
//! and the surge itself: a replacement that reports ready takes over its worker number
//! (`promote`), is released if it was held, and the old process is told to drain (`retire`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};
use worker::protocol;
use worker::scoreboard::{monotonic_ms, RecycleReason, SlotState};

use super::health::{self, Health};
use super::slots::{self, backoff, is_app, Shown};
use super::{Master, RATE_SWEEP_EVERY};
use crate::recycle::{self};
use crate::rss;

impl Master {
    /// Hung workers, memory samples, recycle triggers and drain deadlines.
    pub(super) fn check_workers(&mut self) {
        let now = Instant::now();
        let now_ms = monotonic_ms();
        let sample = now >= self.next_rss_sample;
        if sample {
            self.next_rss_sample = now + self.config.worker.rss_interval;
        }
        if now >= self.next_rate_sweep {
            self.next_rate_sweep = now + RATE_SWEEP_EVERY;
            let cleared = self.rates.sweep();
            if cleared > 0 {
                debug!(clients = cleared, "rate table: forgot idle clients");
            }
        }
        let mut due = Vec::new();
        for (pid, proc) in self.procs.iter_mut() {
            let rec = self.board.slot(proc.record);
            // A booting worker is timed from its spawn (the master sets its first heartbeat).
            let age = now_ms.saturating_sub(rec.heartbeat_ms.load(Ordering::Relaxed));
            let pulse = health::Pulse {
                heartbeat_age: Duration::from_millis(age),
                hung: proc.hung,
                retiring: proc.retiring,
                killed_by_us: proc.killed_by_us,
            };
            match health::check(&pulse, self.config.worker.timeout, now) {
                Health::Fine => {}
                Health::Draining => continue,
                Health::Hung => {
                    let doing: Vec<String> = rec
                        .requests_in_flight()
                        .into_iter()
                        .map(|(started, what)| {
                            format!("{what} ({}ms)", now_ms.saturating_sub(started))
                        })
                        .collect();
                    error!(
                        worker.id = %Shown(proc.id),
                        pid = pid.as_raw(),
                        heartbeat_age_ms = age,
                        requests.inflight = rec.inflight.load(Ordering::Relaxed),
                        requests = ?doing,
                        "worker hung: no heartbeat for longer than worker.timeout; killing it"
                    );
                    proc.hung = true;
                    proc.killed_by_us = true;
                    rec.recycle_reason
                        .store(RecycleReason::Hung as u32, Ordering::Relaxed);
                    let _ = kill(*pid, Signal::SIGKILL);
                    continue;
                }
                Health::DrainOverdue(reason) => {
                    warn!(
                        worker.id = %Shown(proc.id),
                        pid = pid.as_raw(),
                        reason = %reason.as_str(),
                        "worker still draining after server.graceful_timeout; killing it"
                    );
                    proc.killed_by_us = true;
                    let _ = kill(*pid, Signal::SIGKILL);
                    continue;
                }
            }
            if sample {
                let bytes = rss::tree_rss(pid.as_raw() as u32);
                rec.rss_bytes.store(bytes, Ordering::Relaxed);
                recycle::sample_rss(&self.config.worker, &mut proc.observed, bytes);
            }
            if proc.acked {
                if let Some(reason) = recycle::due(
                    &self.config.worker,
                    &proc.plan,
                    &proc.observed,
                    proc.started,
                    now,
                ) {
                    due.push((proc.id, *pid, reason));
                }
            }
        }
        for (id, pid, reason) in due {
            self.request_recycle(id, pid, reason, now);
        }
    }

    /// Asks for worker number `id`'s process `pid` to be replaced.
    pub(super) fn request_recycle(
        &mut self,
        id: u32,
        pid: Pid,
        reason: RecycleReason,
        not_before: Instant,
    ) {
        let Some(i) = self.slot_index(id) else { return };
        let slot = &mut self.slots[i];
        if slot.pid != Some(pid) || slot.recycle.is_some() || slot.successor.is_some() {
            return; // not its current process, or already being replaced
        }
        slot.recycle = Some((reason, not_before));
        self.recycle_queue.push_back(id);
        if let Some(p) = self.procs.get(&pid) {
            self.board
                .slot(p.record)
                .recycle_reason
                .store(reason as u32, Ordering::Relaxed);
        }
        debug!(worker.id = %Shown(id), pid = pid.as_raw(), reason = %reason.as_str(), "recycle requested");
    }

    /// Starts replacements for queued recycles, at most `max_recycling` at a time (see
    /// `slots::plan_replacements`).
    pub(super) fn start_replacements(&mut self) {
        if self.recycle_queue.is_empty() {
            return;
        }
        let now = Instant::now();
        let room = slots::Room {
            limit: self.config.worker.max_recycling as usize,
            extra_apps: self.extra_app_processes(),
            booting_http: self
                .slots
                .iter()
                .filter(|s| !is_app(s.id))
                .filter_map(|s| s.successor)
                .filter(|p| self.procs.get(p).is_some_and(|p| !p.acked))
                .count(),
            app_pool: self.config.app_pool(),
            reload_unproved: self.pending_reload.is_some(),
        };
        let queue = std::mem::take(&mut self.recycle_queue);
        let (start, mut waiting) =
            slots::plan_replacements(queue, &mut self.slots, room, is_app, now);
        for (i, hold) in start {
            let id = self.slots[i].id;
            let Some((reason, _)) = self.slots[i].recycle else {
                continue;
            };
            match self.spawn(id, hold) {
                Ok(pid) => {
                    info!(
                        worker.id = %Shown(id),
                        pid = pid.as_raw(),
                        reason = %reason.as_str(),
                        "starting a replacement"
                    );
                    self.slots[i].successor = Some(pid);
                }
                Err(e) => {
                    self.slots[i].failures += 1;
                    let delay = backoff(self.slots[i].failures);
                    self.slots[i].recycle = Some((reason, now + delay));
                    error!(worker.id = %Shown(id), retry_in = ?delay, "cannot start a replacement: {e:#}");
                    waiting.push_back(id);
                }
            }
        }
        self.recycle_queue = waiting;
    }

    /// A worker reported ready: a successor takes over (and the old process drains), and the
    /// master announces readiness once every worker number has a ready process.
    pub(super) fn on_ready(&mut self, id: u32, pid: Pid) {
        let Some(i) = self.slot_index(id) else { return };
        if let Some(l) = self.listeners.as_ref().filter(|_| !is_app(id)) {
            l.sync_backlog(id);
        }
        // Replacing a worker for max_requests: the old one serves up to its limit, sharing its
        // sockets with the ready replacement, and is drained when it reports the limit.
        let below_limit = self.slots[i]
            .pid
            .and_then(|old| self.procs.get(&old))
            .is_some_and(|old| !old.observed.max_requests_reached);
        if slots::takes_over_when_ready(&self.slots[i], pid, below_limit) {
            self.promote(i);
        }
        self.maybe_announce_ready();
    }

    /// The ready successor of slot `i` takes over; the process it replaces drains.
    pub(super) fn promote(&mut self, i: usize) {
        let Some(slots::Promotion { next, old, reason }) = slots::promote(&mut self.slots[i])
        else {
            return;
        };
        self.release(next);
        if let Some(old) = old {
            self.retire(old, reason);
        }
        // Started before a reload that came while it booted: replace it in turn.
        if self
            .procs
            .get(&next)
            .is_some_and(|p| p.config_gen < self.config_gen)
        {
            let id = self.slots[i].id;
            self.request_recycle(id, next, RecycleReason::Reload, Instant::now());
        }
    }

    /// Lets a held process start accepting. Its record says `serving` from this moment (the
    /// process starts its accept loops within a tick of the signal), so that the scoreboard
    /// never shows a gap between it and the worker it replaces, which drains from now on.
    pub(super) fn release(&mut self, pid: Pid) {
        if let Some(p) = self.procs.get_mut(&pid) {
            if p.held {
                p.held = false;
                self.board.slot(p.record).set_state(SlotState::Serving);
                let _ = kill(pid, protocol::RELEASE);
            }
        }
    }

    /// Tells a replaced process to drain; it is killed if still running after
    /// `server.graceful_timeout`.
    pub(super) fn retire(&mut self, pid: Pid, reason: RecycleReason) {
        let deadline = Instant::now() + self.config.server.graceful_timeout;
        if let Some(p) = self.procs.get_mut(&pid) {
            p.retiring = Some((reason, deadline));
            self.board
                .slot(p.record)
                .recycle_reason
                .store(reason as u32, Ordering::Relaxed);
            debug!(worker.id = %Shown(p.id), pid = pid.as_raw(), reason = %reason.as_str(), "draining the replaced worker");
        }
        let _ = kill(pid, protocol::DRAIN);
    }
}
