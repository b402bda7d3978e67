//! Promise: after a kill -9 at any instant, `Store::open` succeeds and holds every operation
//! that `Durability::Sync` acknowledged (README, Guarantees: "Durability::Sync", "Crash recovery").
//!
//! The test binary re-executes itself as a writer child (this same test, selected with
//! `--exact`, told by an environment variable to be the writer). The child opens the store with
//! `Durability::Sync` and claims, completes, checkpoints and removes keys in a loop on two
//! threads (each key claimed on one and finished on the other, each thread with its own lane of
//! the log), printing one line per operation only after the call returned `Ok`. The parent
//! SIGKILLs it at a random instant, then reopens the same directory and checks every acknowledged operation, and that
//! nothing half-written shows. The directory is reused across kills, so state accumulates.
//!
//! `IDEMSTORE_CRASH_ROUNDS` (default 60, at least 50) sets the number of kills and
//! `IDEMSTORE_CRASH_SEED` the seed of the kill instants (printed on every run).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use idemstore::{Claim, ClaimToken, Durability, Entry, Options, Store};

const TEST_NAME: &str = "sigkill_at_random_instants_loses_no_acknowledged_operation";
const WRITER_DIR_ENV: &str = "IDEMSTORE_TEST_CRASH_WRITER_DIR";
const WRITER_ROUND_ENV: &str = "IDEMSTORE_TEST_CRASH_WRITER_ROUND";
const ACK: &str = "ACK ";
/// The writer stops on its own after this long, so it can never outlive a crashed parent.
const WRITER_LIFETIME_MAX: Duration = Duration::from_secs(30);

fn options() -> Options {
    Options {
        durability: Durability::Sync,
        background: false,
        segment_bytes_initial: 64 << 10,
        segment_bytes_max: 8 << 20,
        // Two lanes (a `Sync` store has one unless told): the two writer threads each write
        // through their own.
        log_lanes: 2,
        ..Default::default()
    }
}

/// What the writer does with key number `i` of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// claim, then complete.
    Complete,
    /// claim, then checkpoint; left in flight.
    Checkpoint,
    /// claim, complete, then remove.
    Remove,
}

fn plan(i: u64) -> Plan {
    if i % 7 == 6 {
        Plan::Remove
    } else if i % 3 == 2 {
        Plan::Checkpoint
    } else {
        Plan::Complete
    }
}

fn key(round: u64, i: u64) -> String {
    format!("r{round:03}-k{i:05}")
}

fn request(key: &str) -> String {
    format!("request of {key}")
}

fn outcome(key: &str, i: u64) -> Vec<u8> {
    format!("outcome of {key}: {}", "x".repeat((i % 40) as usize)).into_bytes()
}

fn phase(key: &str) -> Vec<u8> {
    format!("phase of {key}").into_bytes()
}

/// How far an operation on a key was acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Acked {
    Nothing,
    Claimed,
    Checkpointed,
    Completed,
    Removed,
}

impl Acked {
    fn parse(word: &str) -> Acked {
        match word {
            "claimed" => Acked::Claimed,
            "checkpointed" => Acked::Checkpointed,
            "completed" => Acked::Completed,
            "removed" => Acked::Removed,
            other => panic!("unknown ack {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The writer child.

/// Threads in the writer child. Each claims keys of its own and hands each token to the next
/// thread, which finishes the key: a key's records are written from two threads (each with
/// its own lane of the log).
const WRITERS: u64 = 2;

fn run_writer(dir: &Path, round: u64) {
    let store = Store::open(dir, options()).expect("writer: open after a crash must succeed");
    let started = Instant::now();
    let out = std::sync::Mutex::new(std::io::stdout());
    let ack = |what: &str, key: &str| {
        let mut out = out.lock().unwrap();
        writeln!(out, "{ACK}{what} {key}").unwrap();
        out.flush().unwrap();
    };
    let (senders, inboxes): (Vec<_>, Vec<_>) = (0..WRITERS).map(|_| mpsc::channel::<(u64, ClaimToken)>()).unzip();
    std::thread::scope(|scope| {
        for (t, inbox) in inboxes.into_iter().enumerate() {
            let next = senders[(t + 1) % senders.len()].clone();
            let (store, ack) = (&store, &ack);
            scope.spawn(move || {
                let mut i = t as u64;
                while started.elapsed() < WRITER_LIFETIME_MAX {
                    let key = key(round, i);
                    let Claim::Acquired(token) = store.claim(&key, request(&key)).unwrap() else {
                        panic!("writer: {key} is new and must be acquired")
                    };
                    ack("claimed", &key);
                    next.send((i, token)).unwrap();
                    for (j, token) in inbox.try_iter() {
                        finish(store, ack, round, j, &token);
                    }
                    i += WRITERS;
                }
            });
        }
    });
}

/// The rest of key `i`'s plan, once claimed.
fn finish(store: &Store, ack: &dyn Fn(&str, &str), round: u64, i: u64, token: &ClaimToken) {
    let key = key(round, i);
    match plan(i) {
        Plan::Checkpoint => {
            store.checkpoint(token, phase(&key)).unwrap();
            ack("checkpointed", &key);
        }
        Plan::Complete => {
            store.complete(token, outcome(&key, i)).unwrap();
            ack("completed", &key);
        }
        Plan::Remove => {
            store.complete(token, outcome(&key, i)).unwrap();
            ack("completed", &key);
            store.remove(&key).unwrap();
            ack("removed", &key);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The parent.

/// A writer child, SIGKILLed when dropped if still running.
struct Writer(Child);

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_writer(dir: &Path, round: u64) -> (Writer, mpsc::Receiver<String>, std::thread::JoinHandle<()>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(WRITER_DIR_ENV, dir)
        .env(WRITER_ROUND_ENV, round.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn writer");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // The harness may print "test <name> ... " on the same line as the first ack.
            if let Some(at) = line.find(ACK)
                && tx.send(line[at + ACK.len()..].to_owned()).is_err()
            {
                break;
            }
        }
    });
    (Writer(child), rx, reader)
}

/// A small xorshift generator: the kill instants need no more.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name} must be a number")))
}

/// Checks one key against what was acknowledged for it.
fn check_key(store: &Store, key: &str, i: u64, acked: Acked, context: &str) {
    let plan = plan(i);
    let entry = store.get(key).unwrap();
    let ok = match (&entry, acked) {
        (_, Acked::Removed) => entry.is_none(),
        (None, Acked::Nothing) => true,
        (None, Acked::Claimed | Acked::Completed) => plan == Plan::Remove,
        (None, Acked::Checkpointed) => false,
        (Some(Entry::Completed(done)), Acked::Nothing | Acked::Claimed | Acked::Completed) => {
            assert_eq!(done.outcome, outcome(key, i), "{context}: {key} replays a wrong outcome");
            plan != Plan::Checkpoint
        }
        (Some(Entry::Completed(_)), Acked::Checkpointed) => false,
        (Some(Entry::InFlight { checkpoint, orphaned, .. }), Acked::Nothing | Acked::Claimed) => {
            assert!(*orphaned, "{context}: {key} was claimed by a dead process");
            checkpoint.is_none() || (plan == Plan::Checkpoint && checkpoint.as_deref() == Some(&phase(key)[..]))
        }
        (Some(Entry::InFlight { checkpoint, .. }), Acked::Checkpointed) => {
            checkpoint.as_deref() == Some(&phase(key)[..])
        }
        (Some(Entry::InFlight { .. }), Acked::Completed) => false,
    };
    assert!(ok, "{context}: {key} (plan {plan:?}) was acknowledged as {acked:?} but reads {entry:?}");
    if acked == Acked::Completed && entry.is_some() {
        let Claim::Completed(done) = store.claim(key, request(key)).unwrap() else {
            panic!("{context}: {key} must replay")
        };
        assert_eq!(done.outcome, outcome(key, i));
    }
}

#[test]
fn sigkill_at_random_instants_loses_no_acknowledged_operation() {
    if let Some(dir) = std::env::var_os(WRITER_DIR_ENV) {
        let round = env_u64(WRITER_ROUND_ENV).expect("writer round");
        return run_writer(Path::new(&dir), round);
    }
    let rounds = env_u64("IDEMSTORE_CRASH_ROUNDS").unwrap_or(60).max(50);
    let seed = env_u64("IDEMSTORE_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("crash_sigkill: {rounds} rounds, IDEMSTORE_CRASH_SEED={seed}");
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    // Per round: the highest key number acknowledged at all, and per key its highest ack.
    let mut acked: BTreeMap<(u64, u64), Acked> = BTreeMap::new();
    let mut last_key_of_round: BTreeMap<u64, u64> = BTreeMap::new();
    let mut kills_while_writing = 0;

    for round in 0..rounds {
        let (mut writer, acks, reader) = spawn_writer(dir.path(), round);
        // Mostly kill while the writer writes; sometimes anywhere from its start (open, recovery).
        let while_writing = round % 8 != 7;
        if while_writing {
            let first = acks
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("round {round}: the writer acknowledged nothing ({e})"));
            record_ack(&mut acked, &mut last_key_of_round, round, &first);
            std::thread::sleep(Duration::from_micros(rng.below(40_000)));
        } else {
            std::thread::sleep(Duration::from_micros(rng.below(30_000)));
        }
        writer.0.kill().unwrap();
        let status = writer.0.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "round {round}: the writer ended on its own: {status}");
        reader.join().unwrap();
        // Acks after the first one: the writer was still writing when the kill came.
        let mut acks_this_round = 0u64;
        for line in acks.try_iter() {
            record_ack(&mut acked, &mut last_key_of_round, round, &line);
            acks_this_round += 1;
        }
        // Only rounds meant to kill mid-stream count toward the check below (a round that
        // kills anywhere from the start may also land mid-stream, by chance).
        if while_writing && acks_this_round > 0 {
            kills_while_writing += 1;
        }

        let context = format!("after kill {round} (seed {seed})");
        let store = Store::open(dir.path(), options()).unwrap_or_else(|e| panic!("{context}: open failed: {e}"));
        for (&(r, i), &how) in &acked {
            check_key(&store, &key(r, i), i, how, &context);
        }
        // The keys the writer's threads were on when it died: absent, or whatever they got
        // to, never torn.
        for (&r, &last) in &last_key_of_round {
            for next in last + 1..=last + WRITERS {
                check_key(&store, &key(r, next), next, Acked::Nothing, &context);
            }
        }
        if !last_key_of_round.contains_key(&round) {
            check_key(&store, &key(round, 0), 0, Acked::Nothing, &context);
        }
        store.close().unwrap();
    }
    let total: usize = acked.len();
    println!(
        "crash_sigkill: {rounds} kills, {kills_while_writing} of the mid-stream ones while writing, {total} keys acknowledged"
    );
    // A kill lands mid-stream when acks arrived after the first one; the sleep before it is
    // 0-40 ms against an ack every ~0.2 ms, so most writing rounds must show that.
    let writing_rounds = rounds - rounds / 8;
    assert!(
        kills_while_writing >= writing_rounds / 2,
        "only {kills_while_writing} of {writing_rounds} kills landed while the writer wrote"
    );
}

fn record_ack(acked: &mut BTreeMap<(u64, u64), Acked>, last: &mut BTreeMap<u64, u64>, round: u64, line: &str) {
    let (what, key) = line.split_once(' ').unwrap_or_else(|| panic!("bad ack line {line:?}"));
    let prefix = format!("r{round:03}-k");
    let i: u64 = key.strip_prefix(&prefix).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("bad key {key:?}"));
    let how = Acked::parse(what);
    let slot = acked.entry((round, i)).or_insert(Acked::Nothing);
    *slot = (*slot).max(how);
    let last_i = last.entry(round).or_insert(i);
    *last_i = (*last_i).max(i);
}
