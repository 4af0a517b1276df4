//! When a worker should be replaced: the recycle triggers of `[worker]` applied to what the
//! master knows about one worker process. Pure decisions, no processes or clocks of its own, so
//! every rule is tested here; the master acts on the answer.

use std::time::{Duration, Instant};

use worker::config::WorkerConfig;
use worker::scoreboard::RecycleReason;

/// Per-process numbers drawn at spawn: each worker gets its own jitter so that workers started
/// together do not all recycle together.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Requests after which the worker asks to be recycled (0: never).
    pub max_requests: u64,
    /// When it is due by age, if ever.
    pub lifetime_end: Option<Instant>,
}

impl Plan {
    pub fn draw(cfg: &WorkerConfig, started: Instant) -> Plan {
        let max_requests = match cfg.max_requests {
            0 => 0,
            n => n.saturating_add(fastrand::u64(0..=cfg.max_requests_jitter)),
        };
        // Checked although the config bounds both durations (3650d): a lifetime past what an
        // Instant can hold is no lifetime limit, not a panic.
        let lifetime_end = (!cfg.max_lifetime.is_zero())
            .then(|| {
                let jitter_ms = fastrand::u64(0..=cfg.max_lifetime_jitter.as_millis() as u64);
                started
                    .checked_add(cfg.max_lifetime)?
                    .checked_add(Duration::from_millis(jitter_ms))
            })
            .flatten();
        Plan {
            max_requests,
            lifetime_end,
        }
    }
}

/// What the master has observed of one serving worker.
#[derive(Clone, Copy, Debug, Default)]
pub struct Observed {
    /// The worker reported it nears its `max_requests`: time to prepare the replacement.
    pub max_requests_soon: bool,
    /// The worker reported it has served its `max_requests`: the replacement takes over as
    /// soon as it is ready.
    pub max_requests_reached: bool,
    /// Consecutive memory samples above `max_rss`.
    pub rss_over: u32,
}

/// Updates the count of consecutive samples over the limit with a new sample.
pub fn sample_rss(cfg: &WorkerConfig, observed: &mut Observed, rss: u64) {
    if cfg.max_rss.bytes() > 0 && rss > cfg.max_rss.bytes() {
        observed.rss_over = observed.rss_over.saturating_add(1);
    } else {
        observed.rss_over = 0;
    }
}

/// The reason to recycle the worker now, if any. Nothing is due before `min_lifetime`.
pub fn due(
    cfg: &WorkerConfig,
    plan: &Plan,
    observed: &Observed,
    started: Instant,
    now: Instant,
) -> Option<RecycleReason> {
    if now.saturating_duration_since(started) < cfg.min_lifetime {
        return None;
    }
    if observed.max_requests_soon || observed.max_requests_reached {
        return Some(RecycleReason::MaxRequests);
    }
    if cfg.max_rss.bytes() > 0 && observed.rss_over >= cfg.rss_samples {
        return Some(RecycleReason::MaxRss);
    }
    if plan.lifetime_end.is_some_and(|end| now >= end) {
        return Some(RecycleReason::MaxLifetime);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lifetime_past_what_an_instant_holds_is_no_limit() {
        let c = WorkerConfig {
            max_lifetime: Duration::MAX,
            max_lifetime_jitter: Duration::from_secs(10),
            ..Default::default()
        };
        assert!(Plan::draw(&c, Instant::now()).lifetime_end.is_none());
    }
    use worker::config::ByteSize;

    fn cfg() -> WorkerConfig {
        WorkerConfig::default()
    }

    #[test]
    fn nothing_is_due_by_default() {
        let t0 = Instant::now();
        let plan = Plan::draw(&cfg(), t0);
        assert_eq!(plan.max_requests, 0);
        assert!(plan.lifetime_end.is_none());
        let later = t0 + Duration::from_secs(86_400);
        assert_eq!(due(&cfg(), &plan, &Observed::default(), t0, later), None);
    }

    #[test]
    fn jitter_stays_within_its_bounds_and_varies() {
        let mut c = cfg();
        c.max_requests = 100;
        c.max_requests_jitter = 50;
        c.max_lifetime = Duration::from_secs(60);
        c.max_lifetime_jitter = Duration::from_secs(10);
        let t0 = Instant::now();
        let plans: Vec<Plan> = (0..200).map(|_| Plan::draw(&c, t0)).collect();
        assert!(plans.iter().all(|p| (100..=150).contains(&p.max_requests)));
        assert!(plans
            .iter()
            .any(|p| p.max_requests != plans[0].max_requests));
        for p in &plans {
            let end = p.lifetime_end.unwrap();
            assert!(end >= t0 + Duration::from_secs(60) && end <= t0 + Duration::from_secs(70));
        }
    }

    #[test]
    fn memory_needs_consecutive_samples_over_the_limit() {
        let mut c = cfg();
        c.max_rss = ByteSize(100);
        c.rss_samples = 3;
        let t0 = Instant::now();
        let plan = Plan::draw(&c, t0);
        let mut o = Observed::default();
        for rss in [150, 150, 50, 150, 150] {
            sample_rss(&c, &mut o, rss);
        }
        assert_eq!(due(&c, &plan, &o, t0, t0), None, "a dip resets the count");
        sample_rss(&c, &mut o, 150);
        assert_eq!(due(&c, &plan, &o, t0, t0), Some(RecycleReason::MaxRss));
    }

    #[test]
    fn min_lifetime_holds_every_trigger_back() {
        let mut c = cfg();
        c.min_lifetime = Duration::from_secs(10);
        c.max_lifetime = Duration::from_secs(1);
        let t0 = Instant::now();
        let plan = Plan::draw(&c, t0);
        let o = Observed {
            max_requests_soon: true,
            ..Observed::default()
        };
        assert_eq!(due(&c, &plan, &o, t0, t0 + Duration::from_secs(5)), None);
        assert_eq!(
            due(&c, &plan, &o, t0, t0 + Duration::from_secs(10)),
            Some(RecycleReason::MaxRequests)
        );
        let aged = Observed::default();
        assert_eq!(
            due(&c, &plan, &aged, t0, t0 + Duration::from_secs(10)),
            Some(RecycleReason::MaxLifetime)
        );
    }
}
