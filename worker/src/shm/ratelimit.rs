//! Per-client rate limits (`limits.rate`): GCRA over a fixed-size table in shared memory that
//! every worker on the host uses, so a client's budget is the same whichever worker it reaches.
//!
//! Owns the table's layout (a memfd the master creates and hands to each worker, like the
//! scoreboard), the GCRA arithmetic and the choice of which client to forget when the table is
//! full. It knows nothing of HTTP: the request path (`request`) turns a client into a key and a
//! [`Decision`] into headers or a 429.
//!
//! Why hand-written: the rate-limit crates keep their state in one process's heap; this state
//! must be shared by processes, bounded in size whatever the number of clients, and safe when a
//! process dies at any instruction. So, as in the scoreboard, there is no lock, only atomics.
//!
//! Layout: a header, then `sets * ways` words. A client is a 64-bit keyed hash of its key
//! (SipHash-1-3, with a random key drawn by the master, so nobody can aim collisions at another
//! client); the hash picks a set of `WAYS` words, and one word holds the client: the top 24 bits
//! of the hash (its fingerprint) and its GCRA state, the theoretical arrival time (TAT), in units
//! of 10 µs since the table was created, modulo 2^40 (127 days). One word means one
//! compare-and-swap updates a client, whichever processes race. A client absent from its set
//! takes a free word, or one idle for `idle_ttl`, or else that of the set's client with the
//! smallest TAT, counted as an eviction: the one nearest to a full budget, so forgetting it costs
//! it least (mostly the least recently active), and a client being refused, whose TAT is far
//! ahead, is the last to go. The table never holds more than
//! `limits.max_active_instances` clients, and its size never changes.

#![allow(unsafe_code)]

use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use siphasher::sip::SipHasher13;

use crate::shm::shared_region::{Region, Shared};

const MAGIC: u64 = 0x5355_5056_5254_0001; // "SUPVRT" + layout version 1

/// Name of the memfd, visible in `/proc/PID/fd`; `supervisor status` finds the table by it.
pub const MEMFD_NAME: &str = "supervisor-rates";

/// Words per set: how many clients compete for a place when their set is full.
const WAYS: usize = 16;
/// One unit of TAT, in nanoseconds.
const UNIT_NS: u64 = 10_000;
const TAT_BITS: u32 = 40;
const TAT_MASK: u64 = (1 << TAT_BITS) - 1;
/// A compare-and-swap that keeps losing (many workers on one client at once) gives up after
/// this many tries and lets the request through rather than spin.
const MAX_TRIES: usize = 64;

/// The fastest rate a client can be given: one request per unit.
pub const MAX_RATE_PER_SECOND: u64 = 1_000_000_000 / UNIT_NS;
/// The longest a client's budget can take to refill (`burst` intervals): a quarter of the
/// TAT's range, so that a stale word can never pass for a live one.
pub const MAX_REFILL: Duration = Duration::from_nanos(UNIT_NS << (TAT_BITS - 2));

#[repr(C, align(64))]
struct Header {
    magic: AtomicU64,
    sets: AtomicU32,
    ways: AtomicU32,
    /// CLOCK_MONOTONIC ns when the table was created: TATs count from here.
    epoch_ns: AtomicU64,
    /// The SipHash key.
    k0: AtomicU64,
    k1: AtomicU64,
    /// Live clients pushed out to make room for a new one.
    evictions: AtomicU64,
    /// Requests refused (429).
    limited: AtomicU64,
    /// `limits.idle_ttl` in TAT units, as the master last set it: what `tracked` and `sweep`
    /// count by.
    idle: AtomicU64,
    /// 1 while `limits.rate` is set (for `supervisor status`).
    enabled: AtomicU32,
}

/// The shared table, mapped.
pub struct RateTable {
    region: Region,
    sets: usize,
    ways: usize,
}

// SAFETY: only atomics, in a `#[repr(C)]` struct: any bit pattern is valid.
unsafe impl Shared for Header {}

/// Sets and ways for at most `max_clients` words: sets of `WAYS`, or one smaller set.
fn shape(max_clients: u32) -> (usize, usize) {
    let n = max_clients.max(1) as usize;
    if n < WAYS {
        (1, n)
    } else {
        (n / WAYS, WAYS)
    }
}

fn region_len(sets: usize, ways: usize) -> usize {
    std::mem::size_of::<Header>() + sets * ways * std::mem::size_of::<AtomicU64>()
}

/// CLOCK_MONOTONIC in ns: the same clock in every process of the host.
fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

impl RateTable {
    /// Creates an empty table for at most `max_clients` clients (master side).
    pub fn create(max_clients: u32) -> io::Result<(RateTable, OwnedFd)> {
        let (sets, ways) = shape(max_clients);
        let (region, fd) = Region::create(MEMFD_NAME, region_len(sets, ways))?;
        let table = RateTable { region, sets, ways };
        let h = table.header();
        // Two independent random words from the standard library's per-process random keys.
        let random = || {
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        };
        h.sets.store(sets as u32, Ordering::Relaxed);
        h.ways.store(ways as u32, Ordering::Relaxed);
        h.epoch_ns.store(monotonic_ns(), Ordering::Relaxed);
        h.k0.store(random(), Ordering::Relaxed);
        h.k1.store(random(), Ordering::Relaxed);
        h.magic.store(MAGIC, Ordering::Release);
        Ok((table, fd))
    }

    /// Maps a table the master created (worker side, or `supervisor status` read-only).
    pub fn open(fd: impl AsFd, writable: bool) -> io::Result<RateTable> {
        let bad = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "not a rate table of this version",
            )
        };
        let region = Region::open(fd, writable)?;
        if region.len() < std::mem::size_of::<Header>() {
            return Err(bad());
        }
        let h: &Header = region.get(0);
        let (sets, ways) = (
            h.sets.load(Ordering::Relaxed) as usize,
            h.ways.load(Ordering::Relaxed) as usize,
        );
        let fits = sets
            .checked_mul(ways)
            .and_then(|n| n.checked_mul(std::mem::size_of::<AtomicU64>()))
            .and_then(|n| n.checked_add(std::mem::size_of::<Header>()))
            == Some(region.len());
        if h.magic.load(Ordering::Acquire) != MAGIC
            || sets == 0
            || !(1..=WAYS).contains(&ways)
            || !fits
        {
            return Err(bad());
        }
        Ok(RateTable { region, sets, ways })
    }

    fn header(&self) -> &Header {
        self.region.get(0)
    }

    fn word(&self, index: usize) -> &AtomicU64 {
        assert!(
            index < self.sets * self.ways,
            "rate table word out of range"
        );
        self.region
            .get(std::mem::size_of::<Header>() + index * std::mem::size_of::<AtomicU64>())
    }

    /// How many clients the table can hold.
    pub fn capacity(&self) -> usize {
        self.sets * self.ways
    }

    /// Live clients pushed out to make room for new ones, since the table was created.
    pub fn evictions(&self) -> u64 {
        self.header().evictions.load(Ordering::Relaxed)
    }

    /// Counts a 429 decided elsewhere (Redis), so the host's figure includes it.
    pub fn count_limited(&self) {
        self.header().limited.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests refused with 429, since the table was created.
    pub fn limited(&self) -> u64 {
        self.header().limited.load(Ordering::Relaxed)
    }

    /// Now, in TAT units.
    pub fn now(&self) -> u64 {
        monotonic_ns().saturating_sub(self.header().epoch_ns.load(Ordering::Relaxed)) / UNIT_NS
    }

    /// The 64-bit keyed hash that stands for `key`.
    pub fn hash(&self, key: &[u8]) -> u64 {
        let h = self.header();
        let mut s =
            SipHasher13::new_with_keys(h.k0.load(Ordering::Relaxed), h.k1.load(Ordering::Relaxed));
        s.write(key);
        s.finish()
    }

    /// Records the configuration (master side): whether `limits.rate` is set, and the
    /// `limits.idle_ttl` that `tracked` and `sweep` count by.
    pub fn configure(&self, enabled: bool, idle_ttl: Duration) {
        self.header()
            .enabled
            .store(u32::from(enabled), Ordering::Relaxed);
        self.header().idle.store(units(idle_ttl), Ordering::Relaxed);
    }

    /// Whether `limits.rate` is set, as the master last recorded it.
    pub fn enabled(&self) -> bool {
        self.header().enabled.load(Ordering::Relaxed) != 0
    }

    /// Clients seen within `idle_ttl`: those the table still tracks.
    pub fn tracked(&self) -> usize {
        self.tracked_at(self.now())
    }

    fn tracked_at(&self, now: u64) -> usize {
        let idle = self.header().idle.load(Ordering::Relaxed);
        (0..self.capacity())
            .filter(|&i| live(self.word(i).load(Ordering::Relaxed), now, idle).is_some())
            .count()
    }

    /// Clears every word whose client was forgotten (idle past `idle_ttl`) (master side, once
    /// a minute). Without it, a word nobody reuses would, after 2^40 units (127 days), wrap
    /// around and pass for a live client again. Returns how many were cleared.
    pub fn sweep(&self) -> usize {
        self.sweep_at(self.now())
    }

    fn sweep_at(&self, now: u64) -> usize {
        let idle = self.header().idle.load(Ordering::Relaxed);
        (0..self.capacity())
            .filter(|&i| {
                let w = self.word(i);
                let word = w.load(Ordering::Relaxed);
                word != 0
                    && live(word, now, idle).is_none()
                    && w.compare_exchange(word, 0, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
            })
            .count()
    }

    /// Counts a request against the client whose hash is `hash`, at `now` (TAT units).
    pub fn check(&self, hash: u64, now: u64, gcra: &Gcra) -> Decision {
        let set = (hash % self.sets as u64) as usize;
        let fingerprint = (hash >> TAT_BITS).max(1);
        let base = set * self.ways;
        for _ in 0..MAX_TRIES {
            // The client's word, if it is in the set; else the word to take for it.
            let mut victim: Option<(usize, u64, Option<i64>)> = None;
            let mut own: Option<(usize, u64, i64)> = None;
            for i in base..base + self.ways {
                let word = self.word(i).load(Ordering::Acquire);
                let live = gcra.live(word, now);
                if word != 0 && word >> TAT_BITS == fingerprint {
                    // Its own word even if forgotten (then with a full budget): a client never
                    // leaves a stale copy of itself behind.
                    own = Some((i, word, live.unwrap_or(0)));
                    break;
                }
                match live {
                    // A free or forgotten word beats any live one.
                    None => {
                        if !matches!(victim, Some((_, _, None))) {
                            victim = Some((i, word, None));
                        }
                    }
                    Some(ahead) => {
                        let older = match victim {
                            None => true,
                            Some((_, _, None)) => false,
                            Some((_, _, Some(v))) => ahead < v,
                        };
                        if older {
                            victim = Some((i, word, Some(ahead)));
                        }
                    }
                }
            }
            let (index, old, ahead, evicting) = match own {
                Some((i, word, ahead)) => (i, word, ahead.max(0) as u64, false),
                None => {
                    let (i, word, live) = victim.expect("a set has at least one word");
                    (i, word, 0, live.is_some())
                }
            };
            let decision = gcra.decide(ahead);
            if !decision.allowed {
                self.header().limited.fetch_add(1, Ordering::Relaxed);
                return decision;
            }
            let tat = now.wrapping_add(ahead + gcra.interval) & TAT_MASK;
            let new = fingerprint << TAT_BITS | tat;
            if self
                .word(index)
                .compare_exchange(old, new, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                if evicting {
                    self.header().evictions.fetch_add(1, Ordering::Relaxed);
                }
                return decision;
            }
        }
        // Lost every race: let this one through unrecorded rather than spin.
        gcra.decide(0)
    }
}

/// `d` in TAT units.
fn units(d: Duration) -> u64 {
    u64::try_from(d.as_nanos() / u128::from(UNIT_NS)).unwrap_or(u64::MAX)
}

/// How far the TAT in `word` is ahead of `now`, in units (negative: behind), within half the
/// TAT's range either way.
fn ahead(word: u64, now: u64) -> i64 {
    let diff = (word & TAT_MASK).wrapping_sub(now) & TAT_MASK;
    if diff >= 1 << (TAT_BITS - 1) {
        diff as i64 - (1 << TAT_BITS)
    } else {
        diff as i64
    }
}

/// Whether `word` holds a client seen within `idle` units, and how far ahead its TAT is. The bound
/// ahead is the table's, not the current limit's: a client over budget under the limit before a
/// reload stays refused until its TAT comes, rather than look like a free word. (The master's
/// sweep clears every forgotten word long before a TAT could wrap around, see `sweep`.)
fn live(word: u64, now: u64, idle: u64) -> Option<i64> {
    if word == 0 {
        return None;
    }
    let a = ahead(word, now);
    (a > -(idle as i64) && a < MAX_AHEAD).then_some(a)
}

/// No client's TAT is this far ahead: the longest refill allowed (`MAX_REFILL`).
const MAX_AHEAD: i64 = 1 << (TAT_BITS - 2);

/// The limit, in TAT units: one request per `interval`, up to `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    interval: u64,
    /// How far ahead of now a client's TAT may be and its request still pass:
    /// `(burst - 1) * interval`.
    tolerance: u64,
    /// A client unseen this long (past its TAT) is forgotten.
    idle: u64,
    burst: u32,
}

/// The outcome of one request, with what the `RateLimit` header reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests the client may still send at once.
    pub remaining: u32,
    /// Until the client's whole budget is back.
    pub reset: Duration,
    /// When refused: until one more request would pass.
    pub retry_after: Duration,
}

impl Gcra {
    /// `count` requests per `period`, up to `burst` at once (`burst >= 1`); clients idle for
    /// `idle_ttl` are forgotten. The caller has checked the bounds (`MAX_RATE_PER_SECOND`,
    /// `MAX_REFILL`).
    pub fn new(count: u32, period: Duration, burst: u32, idle_ttl: Duration) -> Gcra {
        // Rounded up: a limit never lets more through than it says.
        let interval = (period.as_nanos() / u128::from(count.max(1)))
            .div_ceil(u128::from(UNIT_NS))
            .max(1) as u64;
        let burst = burst.max(1);
        Gcra {
            interval,
            tolerance: interval * u64::from(burst - 1),
            idle: units(idle_ttl),
            burst,
        }
    }

    /// The interval between requests, in µs (what Redis counts in).
    pub fn interval_us(&self) -> u64 {
        self.interval * (UNIT_NS / 1000)
    }

    /// How far ahead of now a TAT may be and a request still pass, in µs.
    pub fn tolerance_us(&self) -> u64 {
        self.tolerance * (UNIT_NS / 1000)
    }

    /// The decision Redis made (`cluster`): whether the request passed, and how far ahead of
    /// now its client's TAT is, in µs (after the request if it passed, before it if not).
    pub fn from_redis(&self, passed: bool, ahead_us: u64) -> Decision {
        let ahead = ahead_us / (UNIT_NS / 1000);
        if passed {
            self.decide(ahead.saturating_sub(self.interval).min(self.tolerance))
        } else {
            self.decide(ahead.max(self.tolerance + 1))
        }
    }

    /// How far the TAT in `word` is ahead of `now` (negative: behind), if the word holds a live
    /// client: not free and not idle for `idle_ttl`.
    fn live(&self, word: u64, now: u64) -> Option<i64> {
        live(word, now, self.idle)
    }

    /// The decision for a client whose TAT is `ahead` units ahead of now (0 if behind).
    fn decide(&self, ahead: u64) -> Decision {
        let units = |u: u64| Duration::from_nanos(u.saturating_mul(UNIT_NS));
        if ahead > self.tolerance {
            return Decision {
                allowed: false,
                remaining: 0,
                reset: units(ahead),
                retry_after: units(ahead - self.tolerance),
            };
        }
        let after = ahead + self.interval;
        let remaining = if after > self.tolerance {
            0
        } else {
            ((self.tolerance - after) / self.interval + 1).min(u64::from(self.burst)) as u32
        };
        Decision {
            allowed: true,
            remaining,
            reset: units(after),
            retry_after: Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn per_second(count: u32, burst: u32) -> Gcra {
        Gcra::new(
            count,
            Duration::from_secs(1),
            burst,
            Duration::from_secs(1800),
        )
    }

    #[test]
    fn a_burst_passes_at_once_then_one_per_interval() {
        let (t, _fd) = RateTable::create(100).unwrap();
        let g = per_second(10, 5); // one per 100 ms = 10_000 units
        let k = t.hash(b"client");
        let now = 1_000_000;
        let passed: Vec<bool> = (0..8).map(|_| t.check(k, now, &g).allowed).collect();
        assert_eq!(passed, [true, true, true, true, true, false, false, false]);
        let refused = t.check(k, now, &g);
        assert_eq!(refused.retry_after, Duration::from_millis(100));
        // One interval later, exactly one more.
        assert!(t.check(k, now + 10_000, &g).allowed);
        assert!(!t.check(k, now + 10_000, &g).allowed);
        assert_eq!(t.limited(), 5);
        // Another client is untouched.
        assert!(t.check(t.hash(b"other"), now, &g).allowed);
    }

    #[test]
    fn remaining_and_reset_count_down() {
        let (t, _fd) = RateTable::create(100).unwrap();
        let g = per_second(10, 3);
        let k = t.hash(b"c");
        let d: Vec<(u32, Duration)> = (0..3)
            .map(|_| {
                let d = t.check(k, 500, &g);
                (d.remaining, d.reset)
            })
            .collect();
        let ms = Duration::from_millis;
        assert_eq!(d, [(2, ms(100)), (1, ms(200)), (0, ms(300))]);
    }

    #[test]
    fn the_table_never_holds_more_than_its_size_and_forgets_the_least_active() {
        let (t, _fd) = RateTable::create(16).unwrap(); // one set of 16
        t.configure(true, Duration::from_secs(1800));
        assert_eq!(t.capacity(), 16);
        let g = per_second(1, 2);
        let now = 1_000_000;
        // 16 clients fill it; the first is the least recently active.
        for i in 0..16u32 {
            assert!(
                t.check(t.hash(&i.to_le_bytes()), now + u64::from(i), &g)
                    .allowed
            );
        }
        assert_eq!(t.tracked_at(now + 30), 16);
        assert_eq!(t.evictions(), 0);
        // Client 1 spends its burst: it is the most active now.
        let one = t.hash(&1u32.to_le_bytes());
        assert!(t.check(one, now + 20, &g).allowed);
        assert!(!t.check(one, now + 21, &g).allowed);
        // A 17th client pushes out client 0, not client 1, whose limit still holds.
        assert!(t.check(t.hash(b"new"), now + 22, &g).allowed);
        assert_eq!(t.evictions(), 1);
        assert_eq!(t.tracked_at(now + 30), 16);
        assert!(!t.check(one, now + 23, &g).allowed);
    }

    #[test]
    fn idle_clients_are_forgotten_without_an_eviction() {
        let (t, _fd) = RateTable::create(4).unwrap();
        t.configure(true, Duration::from_secs(1));
        let g = Gcra::new(1, Duration::from_secs(1), 1, Duration::from_secs(1));
        for i in 0..4u32 {
            t.check(t.hash(&i.to_le_bytes()), 1_000, &g);
        }
        assert_eq!(t.tracked_at(1_000), 4);
        // Two seconds on (1 s interval + 1 s idle_ttl), all are idle: a new client takes a
        // place without pushing anyone out.
        let later = 1_000 + 300_000;
        assert!(t.check(t.hash(b"late"), later, &g).allowed);
        assert_eq!(t.evictions(), 0);
    }

    #[test]
    fn a_word_from_long_ago_is_not_mistaken_for_a_limited_client() {
        let g = per_second(10, 5); // live clients are at most 5 intervals (50_000 units) ahead
        let now = 5_000;
        let word = |tat: u64| (1 << TAT_BITS) | (tat & TAT_MASK);
        assert_eq!(g.live(word(now + 100), now), Some(100));
        // A TAT far ahead can only be an old one that wrapped around: not a live client, so
        // its slot is free and nobody is refused for it.
        assert_eq!(g.live(word(now + (1 << 38)), now), None);
        // One that wrapped to just behind now is a client with a full budget: harmless.
        assert_eq!(g.live(word(now.wrapping_sub(10)), now), Some(-10));
        // Behind by more than idle_ttl: forgotten.
        assert_eq!(g.live(word(now.wrapping_sub(200_000_000)), now), None);
    }

    #[test]
    fn a_forgotten_client_comes_back_to_its_own_word_and_the_sweep_clears_the_rest() {
        let (t, _fd) = RateTable::create(16).unwrap();
        t.configure(true, Duration::from_secs(1)); // 100_000 units
        let g = Gcra::new(1, Duration::from_secs(1), 1, Duration::from_secs(1));
        let (a, b) = (t.hash(b"a"), t.hash(b"b"));
        assert!(t.check(a, 1_000, &g).allowed);
        assert!(t.check(b, 1_000, &g).allowed);
        // Long after: both forgotten. `a` returns and takes its own word back, with a full
        // budget, instead of leaving a stale copy of itself.
        let later = 1_000_000;
        assert!(t.check(a, later, &g).allowed);
        let words = |fp: u64| {
            (0..t.capacity())
                .filter(|&i| t.word(i).load(Ordering::Relaxed) >> TAT_BITS == fp)
                .count()
        };
        assert_eq!(words((a >> TAT_BITS).max(1)), 1);
        assert_eq!(t.tracked_at(later), 1);
        // The sweep clears `b`'s word, so it can never wrap around into a live-looking one.
        assert_eq!(t.sweep_at(later), 1);
        assert_eq!(words((b >> TAT_BITS).max(1)), 0);
        assert_eq!(t.tracked_at(later), 1);
    }

    #[test]
    fn a_tighter_limit_after_a_reload_keeps_an_overspent_client_refused() {
        let (t, _fd) = RateTable::create(16).unwrap();
        let loose = Gcra::new(600, Duration::from_secs(60), 600, Duration::from_secs(1800));
        let tight = per_second(10, 10);
        let k = t.hash(b"k");
        assert_eq!(
            (0..600).filter(|_| t.check(k, 50, &loose).allowed).count(),
            600
        );
        assert!(!t.check(k, 50, &tight).allowed);
    }

    #[test]
    fn the_interval_is_rounded_up_never_letting_more_through() {
        // 60000/s is 16.67 µs apart: rounded up to 20 µs, 50000/s.
        let g = Gcra::new(60_000, Duration::from_secs(1), 1, Duration::from_secs(1));
        assert_eq!(g.interval, 2);
    }

    #[test]
    fn workers_sharing_the_table_see_one_budget() {
        let (t, fd) = RateTable::create(64).unwrap();
        let other = RateTable::open(&fd, true).unwrap();
        let g = per_second(100, 10);
        let k = t.hash(b"shared");
        assert_eq!(k, other.hash(b"shared"));
        let now = 77;
        let passed = (0..20)
            .filter(|i| {
                let table = if i % 2 == 0 { &t } else { &other };
                table.check(k, now, &g).allowed
            })
            .count();
        assert_eq!(passed, 10);
    }
}
