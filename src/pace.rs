//! Background work in short steps with rests between them.
//!
//! Dropping a bucket or sealing a segment runs beside claim threads. On a machine with as many
//! busy claim threads as CPUs, a background thread that only yields still holds its CPU for a
//! whole scheduler slice (milliseconds) whenever it is picked, and a claim preempted by it
//! waits that long. A background thread that sleeps after every ~`WORK` of running gives the
//! CPU back at once, so no claim waits for more than one step.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// Longest stretch of background work between rests.
const WORK: Duration = Duration::from_micros(200);
/// How long a rest lasts (the kernel's timer slack adds ~50 µs).
const REST: Duration = Duration::from_micros(100);

thread_local! {
    static STEP_STARTED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Call between small units of background work: after `WORK` of running since the last rest
/// (or since the first call on this thread), sleeps for `REST`.
pub fn breathe() {
    let now = Instant::now();
    STEP_STARTED.with(|started| match started.get() {
        Some(at) if now.duration_since(at) < WORK => {}
        Some(_) => {
            std::thread::sleep(REST);
            started.set(Some(Instant::now()));
        }
        None => started.set(Some(now)),
    });
}

/// Starts a fresh step: the next `WORK` of running needs no rest. Call when background work
/// begins after an idle spell, so time spent elsewhere is not counted as work.
pub fn start() {
    STEP_STARTED.with(|started| started.set(Some(Instant::now())));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breathe_rests_only_after_a_step_of_work() {
        start();
        let quick = Instant::now();
        breathe();
        assert!(quick.elapsed() < REST, "a call right after start rested");
        let busy_until = Instant::now() + WORK + Duration::from_micros(50);
        while Instant::now() < busy_until {}
        let rest = Instant::now();
        breathe();
        assert!(rest.elapsed() >= REST, "a call after a full step of work did not rest");
    }
}
