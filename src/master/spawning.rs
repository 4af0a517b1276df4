//! Starting worker processes: every worker number that has no process and whose backoff has
//! passed, each in a free scoreboard record, with its listeners, its pipe to the master and the
//! settings it is handed (`spawn::SpawnRequest`).

use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use nix::unistd::Pid;
use tracing::{debug, error};
use worker::scoreboard::{monotonic_ms, Kind, SlotState};

use super::slots::{backoff, is_app, Shown, APP_IDS};
use super::{Master, Proc, SCOREBOARD_CAPACITY};
use crate::recycle::{Observed, Plan};
use crate::spawn::{self, SpawnRequest};

impl Master {
    /// Starts every worker number that has no process and whose backoff (if any) has passed.
    pub(super) fn spawn_due(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            if slot.pid.is_some() || slot.respawn_at.is_some_and(|t| t > now) {
                continue;
            }
            match self.spawn(slot.id, false) {
                Ok(pid) => {
                    self.slots[i].pid = Some(pid);
                    self.slots[i].respawn_at = None;
                }
                Err(e) => {
                    self.slots[i].failures += 1;
                    let (id, failures) = (self.slots[i].id, self.slots[i].failures);
                    let delay = self.schedule_respawn(i, backoff(failures));
                    error!(worker.id = %Shown(id), retry_in = ?delay, "cannot start worker: {e:#}");
                    if self.boot_failures_fatal(id, failures) {
                        return;
                    }
                }
            }
        }
    }

    /// Starts a process for worker number `id` (its slot's generation advances). The caller
    /// decides whether it is the slot's process or a successor.
    pub(super) fn spawn(&mut self, id: u32, hold: bool) -> Result<Pid> {
        let Some(record) = self.free_record() else {
            bail!("scoreboard full ({SCOREBOARD_CAPACITY} records)");
        };
        let index = self.slot_index(id).context("no such worker number")?;
        let generation = self.slots[index].generation;
        let app_host = is_app(id);
        let listen_fds = if app_host {
            Vec::new()
        } else {
            self.listeners
                .as_mut()
                .context("listeners are closed")?
                .fds_for(id)?
        };
        let started = Instant::now();
        let mut plan = Plan::draw(&self.config.worker, started);
        if self.config.app_pool() && !app_host {
            // `max_requests` is the app's (gunicorn's meaning): an HTTP worker in front of app
            // processes leaks nothing by serving, and at thousands of requests a second its own
            // count would recycle it several times a second.
            plan.max_requests = 0;
        }
        // Identity first, pid after the fork: the worker only ever moves the state forward from
        // Booting, so the master must not write the state once the worker may be running.
        let rec = self.board.slot(record);
        let number = if app_host { id - APP_IDS } else { id };
        let kind = if app_host { Kind::App } else { Kind::Http };
        rec.kind.store(kind as u32, Ordering::Relaxed);
        rec.worker_id.store(number, Ordering::Relaxed);
        self.board
            .header()
            .records_used
            .fetch_max(record as u32 + 1, Ordering::AcqRel);
        rec.generation.store(generation, Ordering::Relaxed);
        rec.started_ms.store(monotonic_ms(), Ordering::Relaxed);
        rec.heartbeat_ms.store(monotonic_ms(), Ordering::Relaxed);
        rec.set_state(SlotState::Booting);
        let spawned = spawn::spawn_worker(SpawnRequest {
            id: number,
            app_host,
            slot: record,
            listen_fds: &listen_fds,
            scoreboard: &self.board_fd,
            rates: &self.rates_fd,
            config: &self.config_fd,
            max_requests: plan.max_requests,
            hold,
            runtime_dir: self.runtime_dir.apps(),
        });
        let spawned = match spawned {
            Ok(s) => s,
            Err(e) => {
                self.board.reclaim(record);
                return Err(e);
            }
        };
        rec.pid
            .store(spawned.pid.as_raw() as u32, Ordering::Release);
        debug!(
            worker.id = %Shown(id),
            pid = spawned.pid.as_raw(),
            generation,
            "worker spawned"
        );
        self.slots[index].generation += 1;
        self.procs.insert(
            spawned.pid,
            Proc {
                id,
                record,
                pipe: Some(spawned.pipe),
                acked: false,
                started,
                config_gen: self.config_gen,
                plan,
                observed: Observed::default(),
                killed_by_us: false,
                hung: false,
                held: hold,
                retiring: None,
            },
        );
        Ok(spawned.pid)
    }

    /// A scoreboard record that no live process uses.
    pub(super) fn free_record(&self) -> Option<usize> {
        (0..self.board.capacity()).find(|&r| {
            self.board.slot(r).state() == SlotState::Free
                && !self.procs.values().any(|p| p.record == r)
        })
    }
}
