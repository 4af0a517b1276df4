//! The choice of an app process (`pool`) over a real scoreboard, without processes: the records
//! are filled as app hosts and HTTP workers fill them.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::app::pool::AppPool;
use crate::shm::scoreboard::{Kind, Scoreboard};

/// A scoreboard with HTTP worker records 0 and 1 and app hosts (pids 101, 102, 103) in records
/// 2, 3 and 4, all open.
fn board() -> &'static Scoreboard {
    let (board, _fd) = Scoreboard::create(8, 100).unwrap();
    let board: &'static Scoreboard = Box::leak(Box::new(board));
    for (record, pid) in [(2, 101), (3, 102), (4, 103)] {
        let slot = board.slot(record);
        slot.kind.store(Kind::App as u32, Ordering::Relaxed);
        slot.worker_id.store(record as u32 - 1, Ordering::Relaxed);
        slot.pid.store(pid, Ordering::Relaxed);
        slot.app_init(pid);
        slot.app_set_open(true);
    }
    board.header().records_used.store(5, Ordering::Relaxed);
    board
}

fn pool(concurrency: u32, own: usize) -> &'static AppPool {
    packing(concurrency, own, Duration::ZERO)
}

/// A pool with `app.pack_window = window`.
fn packing(concurrency: u32, own: usize, window: Duration) -> &'static AppPool {
    Box::leak(Box::new(AppPool::new(
        concurrency,
        own,
        "/nonexistent".into(),
        window,
    )))
}

/// With `app.concurrency = 1`, one request in each of the three app processes.
async fn take_every_slot(
    pool: &'static AppPool,
    board: &'static Scoreboard,
) -> Vec<crate::app::pool::AppLease> {
    let mut leases = Vec::new();
    for _ in 0..3 {
        leases.push(pool.acquire(board).await.unwrap());
    }
    leases
}

/// The file name of the socket of the app process a lease names.
fn socket_of(lease: &crate::app::pool::AppLease) -> String {
    match lease.upstream() {
        crate::config::Upstream::Unix(path) => path.file_name().unwrap().to_string_lossy().into(),
        other => panic!("not a Unix socket: {other}"),
    }
}

fn inflight(board: &Scoreboard, record: usize) -> u32 {
    board.slot(record).app_load().inflight
}

#[tokio::test]
async fn the_least_busy_open_app_process_is_chosen() {
    let board = board();
    let pool = pool(0, 0);
    // Two requests in app 1 (record 2), one in app 3 (record 4): app 2 is the least busy.
    assert!(board.slot(2).app_take(101, 0) && board.slot(2).app_take(101, 0));
    assert!(board.slot(4).app_take(103, 0));
    let lease = pool.acquire(board).await.unwrap();
    assert_eq!(inflight(board, 3), 1, "app 2 took it");
    assert_eq!(socket_of(&lease), "app-2-102.sock");
    assert_eq!(board.slot(3).app_sent.load(Ordering::Relaxed), 1);
    // Given back when dropped.
    drop(lease);
    assert_eq!(inflight(board, 3), 0);
    // A closed app process is never chosen, however idle.
    board.slot(3).app_set_open(false);
    let lease = pool.acquire(board).await.unwrap();
    assert_eq!(inflight(board, 3), 0);
    assert_eq!(
        inflight(board, 4),
        2,
        "app 3 (one in flight) over app 1 (two)"
    );
    drop(lease);
}

#[tokio::test]
async fn with_every_slot_taken_a_request_waits_for_one_to_free() {
    let board = board();
    let pool = pool(1, 0);
    let leases = take_every_slot(pool, board).await;
    for record in 2..5 {
        assert_eq!(
            inflight(board, record),
            1,
            "one request each (app.concurrency = 1)"
        );
    }
    // A fourth waits, counted host-wide, until a slot is given back.
    let waiting = tokio::spawn(async move { pool.acquire(board).await.map(|l| socket_of(&l)) });
    let counted = async {
        while board.header().app_waiters.load(Ordering::Relaxed) != 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), counted)
        .await
        .expect("the waiter is counted host-wide");
    assert!(!waiting.is_finished());
    let mut leases = leases;
    drop(leases.remove(1)); // app 2's slot
    let took = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiter takes the freed slot")
        .unwrap();
    assert_eq!(took.unwrap(), "app-2-102.sock");
    assert_eq!(board.header().app_waiters.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn an_older_head_in_another_worker_goes_first() {
    let board = board();
    let pool = pool(1, 0);
    let leases = take_every_slot(pool, board).await;
    // HTTP worker 1 (record 1) has a request waiting since long ago.
    board.slot(1).app_wait_since_us.store(1, Ordering::Relaxed);
    board.header().app_waiters.fetch_add(1, Ordering::Relaxed);
    let waiting = tokio::spawn(async move { pool.acquire(board).await.is_ok() });
    drop(leases);
    // Every slot is free, but the older head elsewhere has not taken one: this one waits.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished(), "jumped ahead of an older waiter");
    // The other worker's head is served (it stops waiting): this one goes.
    board.slot(1).app_wait_since_us.store(0, Ordering::Relaxed);
    board.header().app_waiters.fetch_sub(1, Ordering::Relaxed);
    let took = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served once the older head is");
    assert!(took.unwrap());
}

#[test]
fn a_slot_given_back_after_its_app_host_was_replaced_changes_nothing() {
    let board = board();
    let slot = board.slot(2);
    assert!(slot.app_take(101, 0));
    // The host died and the record went to a new one (pid 201), which has a request of its own.
    board.reclaim(2);
    slot.app_init(201);
    slot.app_set_open(true);
    assert!(slot.app_take(201, 0));
    slot.app_give_back(101);
    assert_eq!(
        slot.app_load().inflight,
        1,
        "the old host's slot is not the new one's"
    );
    // A take for a pid that is not the record's fails.
    assert!(!slot.app_take(101, 0));
    // Closed: no take, but a give back still counts.
    slot.app_set_open(false);
    assert!(!slot.app_take(201, 0));
    slot.app_give_back(201);
    assert_eq!(slot.app_load().inflight, 0);
}

/// `app.pack_window`: a busy app process active within the window takes the next requests, up
/// to `PACK_DEPTH` in flight; without it, each request goes to an idle one. The window is an
/// hour here, so that no clock decides the test; the pool caps a configured one at a second.
#[tokio::test]
async fn with_a_pack_window_a_busy_active_app_takes_the_next_requests_up_to_the_depth() {
    use crate::app::pool::PACK_DEPTH;
    let board = board();
    let strict = pool(0, 0);
    let a = strict.acquire(board).await.unwrap();
    let b = strict.acquire(board).await.unwrap();
    assert_ne!(
        socket_of(&a),
        socket_of(&b),
        "off: an idle app process each"
    );
    drop((a, b));

    let board = self::board();
    let packed = packing(0, 0, Duration::from_secs(3600));
    let mut leases = Vec::new();
    for _ in 0..PACK_DEPTH {
        leases.push(packed.acquire(board).await.unwrap());
    }
    let first = socket_of(&leases[0]);
    assert!(
        leases.iter().all(|l| socket_of(l) == first),
        "all {PACK_DEPTH} packed into {first}"
    );
    // At the depth, the next goes to an idle app process.
    let next = packed.acquire(board).await.unwrap();
    assert_ne!(socket_of(&next), first);
    // With app.concurrency lower than the depth, that is the bound.
    let board = self::board();
    let two = packing(2, 0, Duration::from_secs(3600));
    let (x, y, z) = (
        two.acquire(board).await.unwrap(),
        two.acquire(board).await.unwrap(),
        two.acquire(board).await.unwrap(),
    );
    assert_eq!(socket_of(&x), socket_of(&y));
    assert_ne!(socket_of(&x), socket_of(&z));
}

/// A busy app process that has been still for longer than the window (a blocked one) is passed
/// over for an idle one, as without packing.
#[tokio::test]
async fn with_a_pack_window_a_busy_app_still_for_longer_is_passed_over() {
    let board = board();
    let packed = packing(0, 0, Duration::from_micros(1));
    let blocked = packed.acquire(board).await.unwrap();
    // Its last activity, long past (µs of CLOCK_MONOTONIC).
    let record = (2..5)
        .find(|&r| inflight(board, r) == 1)
        .expect("the record that took it");
    board.slot(record).app_moved_us.store(1, Ordering::Relaxed);
    let next = packed.acquire(board).await.unwrap();
    assert_ne!(socket_of(&next), socket_of(&blocked));
}
