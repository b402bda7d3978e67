//! Chaos retries: a simulated payment service whose handler runs in a child process (this test
//! binary re-executed) that fails retryably, times out, and crashes for real (SIGKILL, sent by
//! itself at chosen points and by the client at random instants), while a client delivers
//! every request several times in a shuffled order and retries with the same key until it gets
//! an answer. Checked at the end:
//!
//! - no duplicate effects: the effect log (append-only, written by the handler only while it
//!   holds the claim and before it completes) holds exactly one effect per request. The handler
//!   records an *intent* checkpoint before its effect; a holder that takes over a dead or timed
//!   out holder's claim reads that checkpoint, looks the effect up in the log, and does it only
//!   if it is not there, so the check can be exact;
//! - identical replayed bodies: every answer for a request carries the same outcome, naming the
//!   one holder whose effect it was;
//! - altered requests with a used key are refused (`Mismatch`);
//! - correct end state: the reopened store holds every request completed with that outcome and
//!   no orphans;
//! - the dedupe counters count every blocked duplicate: each answer moves exactly the matching
//!   counter of `stats()` by one (`InProgress` → `duplicates_in_progress_total`, `Completed` →
//!   `duplicates_replayed_total`, `Mismatch` → `mismatches_total`), and their sums equal the
//!   number of duplicate deliveries the client saw blocked.

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use idemstore::{Claim, Durability, Entry, ManualClock, Options, Store};

mod common;
use common::{Rng, START_MS};

/// Set in the child: the store directory. Its presence makes the test act as the service.
const CHILD_STORE_ENV: &str = "IDEMSTORE_CHAOS_CHILD_STORE";
/// Set in the child: the effect log.
const CHILD_EFFECTS_ENV: &str = "IDEMSTORE_CHAOS_CHILD_EFFECTS";
/// The name of the test, used to re-execute exactly it as the child.
const TEST_NAME: &str = "retried_deliveries_through_crashes_and_timeouts_have_one_effect_each";
/// Marks the child's answers among whatever else the test harness prints.
const ANSWER_PREFIX: &str = "CHAOS ";
const LEASE_MS: u64 = 1_000;
const REQUESTS: usize = 100;
/// A bound on deliveries, so a livelock fails instead of hanging.
const DELIVERIES_MAX: usize = 5_000;
/// How long the client waits for one answer before calling the service hung.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

fn service_options(clock: &std::sync::Arc<ManualClock>) -> Options {
    Options {
        durability: Durability::None,
        default_lease: Duration::from_millis(LEASE_MS),
        clock: clock.clone(),
        background: false,
        ..Options::default()
    }
}

/// What the client asks the handler to suffer on one delivery (besides random kills).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// A retryable failure before any effect: the handler releases the claim.
    Error,
    TimeoutBeforeEffect,
    TimeoutAfterEffect,
    CrashBeforeEffect,
    CrashAfterEffect,
    CrashAfterComplete,
}

impl Fault {
    const ALL: [Fault; 7] = [
        Fault::None,
        Fault::Error,
        Fault::TimeoutBeforeEffect,
        Fault::TimeoutAfterEffect,
        Fault::CrashBeforeEffect,
        Fault::CrashAfterEffect,
        Fault::CrashAfterComplete,
    ];
    fn name(self) -> String {
        format!("{self:?}")
    }
    fn parse(s: &str) -> Fault {
        Fault::ALL.into_iter().find(|f| f.name() == s).unwrap_or_else(|| panic!("unknown fault {s:?}"))
    }
}

// ---------------------------------------------------------------------------------------------
// The service (child process)
// ---------------------------------------------------------------------------------------------

#[allow(unsafe_code, reason = "SIGKILL to this process, with its SAFETY comment")]
fn crash_now() -> ! {
    // SAFETY: sending SIGKILL to our own process id has no memory-safety preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    unreachable!("SIGKILL returned")
}

fn effect_done_by(effects: &Path, key: &str, holder: u64) -> bool {
    let log = std::fs::read_to_string(effects).unwrap_or_default();
    log.lines().any(|line| line == format!("{key} {holder}"))
}

fn record_effect(effects: &Path, key: &str, holder: u64) {
    let mut log = OpenOptions::new().create(true).append(true).open(effects).expect("open the effect log");
    // One write of one short line to an O_APPEND file: whole or absent after a SIGKILL.
    log.write_all(format!("{key} {holder}\n").as_bytes()).expect("append to the effect log");
}

/// Handles one delivery; returns (verdict, recovered, skipped effect, outcome).
fn handle(store: &Store, effects: &Path, key: &str, body: &str, fault: Fault) -> (&'static str, bool, bool, String) {
    let claim = match store.claim(key, body) {
        Ok(claim) => claim,
        Err(e) => return ("FAIL", false, false, format!("claim: {e}")),
    };
    let token = match claim {
        Claim::Completed(done) => return ("REPLAY", false, false, String::from_utf8_lossy(&done.outcome).into()),
        Claim::InProgress { .. } => return ("BUSY", false, false, String::new()),
        Claim::Mismatch => return ("MISMATCH", false, false, String::new()),
        Claim::Acquired(token) => token,
    };
    // A holder before us may have done the effect: its intent checkpoint names it.
    let prior = token
        .checkpoint()
        .and_then(|c| std::str::from_utf8(c).ok())
        .and_then(|c| c.strip_prefix("intent "))
        .and_then(|id| id.parse::<u64>().ok())
        .filter(|&holder| effect_done_by(effects, key, holder));
    let effect_by = match prior {
        Some(holder) => holder,
        None => {
            if fault == Fault::Error {
                return match store.release(&token) {
                    Ok(()) => ("ERROR", token.recovered(), false, String::new()),
                    Err(e) => ("FAIL", false, false, format!("release: {e}")),
                };
            }
            if let Err(e) = store.checkpoint(&token, format!("intent {}", token.id())) {
                return ("FAIL", false, false, format!("checkpoint: {e}"));
            }
            match fault {
                Fault::TimeoutBeforeEffect => return ("TIMEOUT", token.recovered(), false, String::new()),
                Fault::CrashBeforeEffect => crash_now(),
                _ => {}
            }
            record_effect(effects, key, token.id());
            token.id()
        }
    };
    match fault {
        Fault::TimeoutAfterEffect => return ("TIMEOUT", token.recovered(), prior.is_some(), String::new()),
        Fault::CrashAfterEffect => crash_now(),
        _ => {}
    }
    let outcome = format!("{key} charged once, effect by holder {effect_by}");
    if let Err(e) = store.complete(&token, &outcome) {
        return ("FAIL", false, false, format!("complete: {e}"));
    }
    if fault == Fault::CrashAfterComplete {
        crash_now();
    }
    ("OK", token.recovered(), prior.is_some(), outcome)
}

/// The service loop: one request per stdin line (`now_ms fault key body`), one answer per
/// stdout line (`CHAOS verdict in_progress replayed mismatches recovered skipped outcome`).
fn run_service(store_dir: &str, effects: &str) {
    let clock = ManualClock::new(START_MS);
    let store = Store::open(store_dir, service_options(&clock)).expect("the service opens its store");
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.expect("read a request");
        let mut parts = line.splitn(4, ' ');
        let (Some(now), Some(fault), Some(key), Some(body)) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            panic!("malformed request {line:?}");
        };
        clock.set_ms(now.parse().expect("a time in ms"));
        let (verdict, recovered, skipped, outcome) = handle(&store, Path::new(effects), key, body, Fault::parse(fault));
        let stats = store.stats();
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{ANSWER_PREFIX}{verdict} {} {} {} {} {} {outcome}",
            stats.duplicates_in_progress_total,
            stats.duplicates_replayed_total,
            stats.mismatches_total,
            u8::from(recovered),
            u8::from(skipped),
        )
        .and_then(|()| out.flush())
        .expect("answer the client");
    }
    store.close().expect("the service closes its store");
}

// ---------------------------------------------------------------------------------------------
// The client (parent process)
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Answer {
    verdict: String,
    /// (in_progress, replayed, mismatches) of the service's store since it opened.
    counters: [u64; 3],
    recovered: bool,
    skipped: bool,
    outcome: String,
}

fn parse_answer(line: &str) -> Answer {
    let rest = line.strip_prefix(ANSWER_PREFIX).unwrap_or_else(|| panic!("not an answer: {line:?}"));
    let mut parts = rest.splitn(7, ' ');
    let mut next = || parts.next().unwrap_or_else(|| panic!("short answer {line:?}"));
    let verdict = next().to_owned();
    let mut number = || next().parse::<u64>().unwrap_or_else(|_| panic!("bad number in {line:?}"));
    let counters = [number(), number(), number()];
    let recovered = number() == 1;
    let skipped = number() == 1;
    let outcome = parts.next().unwrap_or_default().to_owned();
    Answer { verdict, counters, recovered, skipped, outcome }
}

/// One running service process, its request pipe and a channel of its answer lines.
struct Service {
    child: Child,
    stdin: ChildStdin,
    answers: mpsc::Receiver<String>,
    /// Its counters as of its last answer.
    counters: [u64; 3],
}

fn spawn_service(store_dir: &Path, effects: &Path) -> Service {
    let mut child = Command::new(std::env::current_exe().expect("the test binary's path"))
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_STORE_ENV, store_dir)
        .env(CHILD_EFFECTS_ENV, effects)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the service process");
    let stdin = child.stdin.take().expect("the service's stdin");
    let stdout = child.stdout.take().expect("the service's stdout");
    let (tx, answers) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // The harness prints "test <name> ... " before the first answer, on the same line.
            if let Some(at) = line.find(ANSWER_PREFIX)
                && tx.send(line[at..].to_owned()).is_err()
            {
                return;
            }
        }
    });
    Service { child, stdin, answers, counters: [0; 3] }
}

#[derive(Debug, Clone, Copy)]
struct Delivery {
    request: usize,
    altered: bool,
}

#[derive(Default)]
struct Tally {
    deliveries: usize,
    crashes: usize,
    blocked_seen: u64,
    counted_by_services: [u64; 3],
    recovered_completions: usize,
    skipped_effects: usize,
    timeouts: usize,
    errors: usize,
}

/// Sends one delivery; `None` when the service died before answering (it is then reaped).
fn deliver(
    service: &mut Option<Service>,
    dirs: (&Path, &Path),
    line: &str,
    kill_after: Option<Duration>,
    tally: &mut Tally,
) -> Option<Answer> {
    let running = service.get_or_insert_with(|| spawn_service(dirs.0, dirs.1));
    let sent = running.stdin.write_all(line.as_bytes()).and_then(|()| running.stdin.flush());
    if let Some(delay) = kill_after {
        std::thread::sleep(delay); // only to land the SIGKILL at a random instant, not to pass time
        let _ = running.child.kill();
    }
    let answer = match sent {
        Ok(()) => match running.answers.recv_timeout(ANSWER_TIMEOUT) {
            Ok(line) => Some(parse_answer(&line)),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the service hung on {line:?}"),
        },
        Err(_) => None,
    };
    if let Some(answer) = &answer {
        let delta: Vec<u64> = answer.counters.iter().zip(running.counters).map(|(now, before)| now - before).collect();
        let expected = match answer.verdict.as_str() {
            "BUSY" => [1, 0, 0],
            "REPLAY" => [0, 1, 0],
            "MISMATCH" => [0, 0, 1],
            _ => [0, 0, 0],
        };
        assert_eq!(delta, expected, "the counters (in_progress, replayed, mismatches) moved wrongly for {answer:?}");
        running.counters = answer.counters;
        tally.blocked_seen += expected.iter().sum::<u64>();
    }
    if answer.is_none() || kill_after.is_some() {
        let mut dead = service.take().expect("the service was running");
        let _ = dead.child.kill();
        dead.child.wait().expect("reap the service");
        for (total, counted) in tally.counted_by_services.iter_mut().zip(dead.counters) {
            *total += counted;
        }
        tally.crashes += 1;
    }
    answer
}

fn run_client(store_dir: &Path, effects: &Path) -> (HashMap<usize, String>, Tally) {
    let mut rng = Rng(0x5EED_CA05);
    let key = |i: usize| format!("order-{i:03}");
    let body =
        |i: usize, altered: bool| format!("POST /charge amount={}{}", 100 + i, if altered { "-edited" } else { "" });
    let mut queue: Vec<Delivery> = (0..REQUESTS)
        .flat_map(|request| std::iter::repeat_n(Delivery { request, altered: false }, 1 + request % 3))
        .collect();
    let mut answered: HashMap<usize, String> = HashMap::new();
    let mut extra_sent: HashSet<usize> = HashSet::new();
    let mut service: Option<Service> = None;
    let mut tally = Tally::default();
    let mut now_ms = START_MS;
    while !queue.is_empty() {
        tally.deliveries += 1;
        assert!(tally.deliveries <= DELIVERIES_MAX, "the client did not finish within {DELIVERIES_MAX} deliveries");
        // Shuffled, out-of-order delivery: take any pending one.
        let delivery = queue.swap_remove(rng.below(queue.len() as u64) as usize);
        now_ms += rng.below(400);
        let fault = match rng.below(100) {
            0..=54 => Fault::None,
            55..=64 => Fault::Error,
            65..=71 => Fault::TimeoutBeforeEffect,
            72..=78 => Fault::TimeoutAfterEffect,
            79..=85 => Fault::CrashBeforeEffect,
            86..=92 => Fault::CrashAfterEffect,
            _ => Fault::CrashAfterComplete,
        };
        let kill_after = (rng.below(100) < 8).then(|| Duration::from_micros(rng.below(1_500)));
        let (i, altered) = (delivery.request, delivery.altered);
        let line = format!("{now_ms} {} {} {}\n", fault.name(), key(i), body(i, altered));
        let Some(answer) = deliver(&mut service, (store_dir, effects), &line, kill_after, &mut tally) else {
            queue.push(delivery); // no answer: the client retries with the same key
            continue;
        };
        match answer.verdict.as_str() {
            "OK" | "REPLAY" => {
                assert!(!altered, "an altered request for {} was answered {answer:?}", key(i));
                if let Some(first) = answered.get(&i) {
                    assert_eq!(&answer.outcome, first, "{}: a repeat got a different body", key(i));
                } else {
                    answered.insert(i, answer.outcome.clone());
                }
                tally.recovered_completions += usize::from(answer.recovered && answer.verdict == "OK");
                tally.skipped_effects += usize::from(answer.skipped);
                // Later duplicates: one more copy, and one altered copy, of some answered requests.
                if extra_sent.insert(i) {
                    if rng.below(2) == 0 {
                        queue.push(Delivery { request: i, altered: false });
                    }
                    if rng.below(2) == 0 {
                        queue.push(Delivery { request: i, altered: true });
                    }
                }
            }
            "MISMATCH" => assert!(altered, "{}: the original request was refused as a mismatch", key(i)),
            "BUSY" => queue.push(delivery),
            "TIMEOUT" => {
                tally.timeouts += 1;
                queue.push(delivery);
            }
            "ERROR" => {
                tally.errors += 1;
                queue.push(delivery);
            }
            _ => panic!("the service failed: {answer:?}"),
        }
    }
    if let Some(mut last) = service.take() {
        drop(last.stdin);
        let status = last.child.wait().expect("reap the service");
        assert!(status.success(), "the service exited with {status}");
        for (total, counted) in tally.counted_by_services.iter_mut().zip(last.counters) {
            *total += counted;
        }
    }
    assert_eq!(answered.len(), REQUESTS, "every request gets an answer in the end");
    (answered, tally)
}

#[test]
fn retried_deliveries_through_crashes_and_timeouts_have_one_effect_each() {
    if let (Ok(store_dir), Ok(effects)) = (std::env::var(CHILD_STORE_ENV), std::env::var(CHILD_EFFECTS_ENV)) {
        run_service(&store_dir, &effects);
        return;
    }
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let store_dir = dir.path().join("store");
    let effects: PathBuf = dir.path().join("effects.log");
    let (answered, tally) = run_client(&store_dir, &effects);

    // Exactly one effect per request, by the holder every answer names.
    let log = std::fs::read_to_string(&effects).expect("read the effect log");
    let mut effects_by_key: HashMap<&str, Vec<&str>> = HashMap::new();
    for line in log.lines() {
        let (key, holder) = line.split_once(' ').unwrap_or_else(|| panic!("malformed effect line {line:?}"));
        effects_by_key.entry(key).or_default().push(holder);
    }
    for (i, outcome) in &answered {
        let key = format!("order-{i:03}");
        let holders = effects_by_key.get(key.as_str()).cloned().unwrap_or_default();
        assert_eq!(holders.len(), 1, "{key}: effects by holders {holders:?}, expected exactly one");
        assert_eq!(
            outcome,
            &format!("{key} charged once, effect by holder {}", holders[0]),
            "{key}: the answer does not name the holder whose effect is in the log"
        );
    }
    assert_eq!(effects_by_key.len(), REQUESTS, "effects for keys nobody requested");

    // The end state, read back by a fresh open.
    let clock = ManualClock::new(START_MS + 3_600_000);
    let store = Store::open(&store_dir, service_options(&clock)).expect("reopen the service's store");
    for (i, outcome) in &answered {
        let key = format!("order-{i:03}");
        match store.get(&key).expect("get") {
            Some(Entry::Completed(done)) => assert_eq!(done.outcome, outcome.as_bytes(), "{key}: stored outcome"),
            other => panic!("{key} should be completed, found {other:?}"),
        }
    }
    assert!(store.orphans().expect("orphans").is_empty(), "a completed workload leaves no orphans");

    eprintln!(
        "chaos: {} deliveries, {} service processes killed, {} timeouts, {} retryable errors, \
         {} completions by a takeover, {} effects found already done, {} blocked duplicates",
        tally.deliveries,
        tally.crashes,
        tally.timeouts,
        tally.errors,
        tally.recovered_completions,
        tally.skipped_effects,
        tally.blocked_seen
    );
    // Every blocked duplicate was counted; the chaos really happened.
    assert_eq!(
        tally.counted_by_services.iter().sum::<u64>(),
        tally.blocked_seen,
        "duplicates_in_progress + replayed + mismatches over all service processes"
    );
    assert!(tally.crashes >= 10, "only {} crashes: the chaos did not happen", tally.crashes);
    assert!(tally.timeouts > 0 && tally.errors > 0, "timeouts and errors should have been injected");
    assert!(tally.recovered_completions > 0, "no completion by a holder that took over a claim");
    assert!(tally.skipped_effects > 0, "no takeover found its predecessor's effect already done");
}
