//! Waiting for a condition with a deadline. Tests never sleep for a fixed
//! time to wait for something: they poll until it holds or time runs out.

use std::time::{Duration, Instant};

/// How often conditions are re-checked.
pub const INTERVAL: Duration = Duration::from_millis(20);

/// Polls `check` until it holds (returns `true`) or `timeout` passes (`false`).
pub fn eventually(timeout: Duration, check: impl FnMut() -> bool) -> bool {
    eventually_every(timeout, INTERVAL, check)
}

/// [`eventually`] with `interval` between the end of one check and the start
/// of the next: for a check that disturbs what it observes (a probe that
/// refreshes a timer must wait out that timer first).
pub fn eventually_every(
    timeout: Duration,
    interval: Duration,
    mut check: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(interval.min(deadline - now));
    }
}

/// [`eventually`], failing the test with `what` when time runs out.
pub fn wait_until(what: &str, timeout: Duration, check: impl FnMut() -> bool) {
    assert!(
        eventually(timeout, check),
        "timed out after {timeout:?} waiting for {what}"
    );
}

/// The async form of [`wait_until`], for tests on a tokio runtime: sleeps
/// on the runtime's clock between checks.
pub async fn poll_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(INTERVAL).await;
    }
}

/// Receives from `rx` until `want` accepts a message; fails the test with
/// `what` when `timeout` passes or the channel closes first.
pub async fn wait_for_message<T>(
    rx: &mut tokio::sync::mpsc::Receiver<T>,
    what: &str,
    timeout: Duration,
    mut want: impl FnMut(&T) -> bool,
) {
    let end = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout(
            end.saturating_duration_since(tokio::time::Instant::now()),
            rx.recv(),
        )
        .await
        {
            Ok(Some(m)) if want(&m) => return,
            Ok(Some(_)) => {}
            Ok(None) => panic!("channel closed waiting for {what}"),
            Err(_) => panic!("timed out after {timeout:?} waiting for {what}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventually_sees_a_condition_that_becomes_true_and_gives_up_on_one_that_never_does() {
        let mut n = 0;
        assert!(eventually(Duration::from_secs(5), || {
            n += 1;
            n == 3
        }));
        assert!(!eventually(Duration::from_millis(50), || false));
    }

    #[test]
    fn eventually_every_leaves_the_interval_between_checks_and_checks_once_more_at_the_deadline() {
        let mut at = Vec::new();
        let start = Instant::now();
        assert!(!eventually_every(
            Duration::from_millis(250),
            Duration::from_millis(100),
            || {
                at.push(start.elapsed());
                false
            }
        ));
        // Sleeps never end early: at most 0, 100, 200 and 250 ms; a slow
        // machine only makes fewer checks, and the last is at the deadline.
        assert!((2..=4).contains(&at.len()), "{at:?}");
        assert!(*at.last().unwrap() >= Duration::from_millis(250), "{at:?}");
    }
}
