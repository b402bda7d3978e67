//! Promise: bad input and hostile surroundings get a clear `Error`, and nothing stored is lost
//! (README, Guarantees: "Bad input").
//!
//! Empty and over-long keys, over-long outcomes and checkpoints, zero TTLs and leases are
//! refused before anything is written; a directory that cannot be created fails at open; a
//! second opener of a directory, in this process or another one, gets `Error::Locked`; and a
//! wall clock stepped backwards never makes a lease or a window run backwards.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use idemstore::{Claim, ClaimOptions, Durability, Entry, Error, ManualClock, Options, Store, ms_to_system_time};

mod common;
use common::{START_MS, acquired, file_names, open, options};

#[test]
fn empty_key_is_refused_by_every_call_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let files = file_names(dir.path());
    let seq = store.stats().last_seq;
    assert!(matches!(store.claim("", b"r"), Err(Error::EmptyKey)));
    assert!(matches!(store.claim_with(b"", b"r", ClaimOptions::default()), Err(Error::EmptyKey)));
    assert!(matches!(store.get(""), Err(Error::EmptyKey)));
    assert!(matches!(store.remove(""), Err(Error::EmptyKey)));
    assert_eq!(store.stats().last_seq, seq, "nothing written");
    assert_eq!(file_names(dir.path()), files, "no segment created");
    assert!(!Error::EmptyKey.to_string().is_empty());
}

#[test]
fn key_over_max_key_len_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let token = acquired(store.claim("existing", b"r").unwrap());
    store.complete(&token, b"kept").unwrap();
    let seq = store.stats().last_seq;

    let long = vec![b'k'; 1025];
    for err in [store.claim(&long, b"r").unwrap_err(), store.get(&long).unwrap_err(), store.remove(&long).unwrap_err()]
    {
        assert!(matches!(err, Error::KeyTooLong { len: 1025, max: 1024 }), "got {err:?}");
        assert!(err.to_string().contains("1025"), "the message names the length: {err}");
    }
    assert_eq!(store.stats().last_seq, seq, "nothing written");
    let Some(Entry::Completed(done)) = store.get("existing").unwrap() else { panic!("existing key lost") };
    assert_eq!(done.outcome, b"kept");

    // Exactly at the limit is accepted.
    let at_limit = acquired(store.claim(vec![b'k'; 1024], b"r").unwrap());
    assert_eq!(at_limit.key().len(), 1024);
}

#[test]
fn a_custom_max_key_len_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = Store::open(dir.path(), Options { max_key_len: 8, ..options(&clock) }).unwrap();
    assert!(matches!(store.claim("123456789", b"r"), Err(Error::KeyTooLong { len: 9, max: 8 })));
    let _held = acquired(store.claim("12345678", b"r").unwrap());
}

#[test]
fn outcome_over_max_outcome_len_is_refused_and_the_claim_still_holds() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let token = acquired(store.claim("k", b"r").unwrap());
    let seq = store.stats().last_seq;
    let err = store.complete(&token, vec![0u8; (1 << 20) + 1]).unwrap_err();
    assert!(matches!(err, Error::OutcomeTooLong { len: 1_048_577, max: 1_048_576 }), "got {err:?}");
    let err = store.checkpoint(&token, vec![0u8; (1 << 20) + 1]).unwrap_err();
    assert!(matches!(err, Error::OutcomeTooLong { .. }), "got {err:?}");
    assert_eq!(store.stats().last_seq, seq, "nothing written");
    assert!(matches!(store.get("k").unwrap(), Some(Entry::InFlight { checkpoint: None, .. })));

    store.complete(&token, vec![9u8; 1 << 20]).unwrap();
    let Claim::Completed(done) = store.claim("k", b"r").unwrap() else { panic!("expected Completed") };
    assert_eq!(done.outcome.len(), 1 << 20);
}

#[test]
fn zero_ttl_or_lease_is_an_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let zero_ttl = ClaimOptions { ttl: Some(Duration::ZERO), ..Default::default() };
    let zero_lease = ClaimOptions { lease: Some(Duration::ZERO), ..Default::default() };
    let seq = store.stats().last_seq;
    assert!(matches!(store.claim_with("k", b"r", zero_ttl), Err(Error::InvalidArgument(_))));
    assert!(matches!(store.claim_with("k", b"r", zero_lease), Err(Error::InvalidArgument(_))));
    assert_eq!(store.stats().last_seq, seq, "nothing written");
    assert_eq!(store.get("k").unwrap(), None);
    drop(store);
    let bad = Options { max_key_len: 0, ..options(&clock) };
    assert!(matches!(Store::open(dir.path(), bad), Err(Error::InvalidArgument(_))));
}

#[test]
fn open_at_or_under_a_regular_file_is_not_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, b"plain file").unwrap();
    let clock = ManualClock::new(START_MS);

    let store_dir = file.join("store");
    let err = Store::open(&store_dir, options(&clock)).unwrap_err();
    match &err {
        Error::NotAStore { path, .. } => assert!(path.starts_with(&file), "error names {path:?}"),
        other => panic!("expected Error::NotAStore, got {other:?}"),
    }
    assert!(err.to_string().contains("not-a-directory"), "message names the path: {err}");

    // The store directory itself being a regular file fails the same way.
    assert!(matches!(Store::open(&file, options(&clock)), Err(Error::NotAStore { .. })));
    assert_eq!(std::fs::read(&file).unwrap(), b"plain file", "the file is untouched");
}

#[test]
fn second_open_in_the_same_process_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let first = open(dir.path(), &clock);
    let _held = acquired(first.claim("k", b"r").unwrap());
    match Store::open(dir.path(), options(&clock)) {
        Err(Error::Locked { dir: locked }) => assert_eq!(locked, dir.path()),
        other => panic!("expected Locked, got {other:?}"),
    }
    // The refused opener changed nothing; the first store goes on.
    assert!(matches!(first.claim("k", b"r").unwrap(), Claim::InProgress { .. }));
    drop(first);
    let second = open(dir.path(), &clock);
    assert!(matches!(second.get("k").unwrap(), Some(Entry::InFlight { .. })));
}

const LOCK_HOLDER_ENV: &str = "IDEMSTORE_TEST_LOCK_HOLDER_DIR";
const HOLDING: &str = "LOCK-HOLDER: holding";

/// A child copy of this test binary that opens the store and holds it until stdin closes.
/// Killed when dropped, so a failing assertion never leaves it behind.
struct LockHolder {
    child: std::process::Child,
    /// The child's stdout, kept open (and drained at the end) so its harness can report.
    stdout: BufReader<std::process::ChildStdout>,
}

impl LockHolder {
    fn spawn(dir: &Path) -> LockHolder {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["second_open_from_another_process_is_locked", "--exact", "--nocapture", "--test-threads=1"])
            .env(LOCK_HOLDER_ENV, dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn lock holder");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut holder = LockHolder { child, stdout };
        // The harness prints "test <name> ... " without a newline before the test runs, so the
        // marker may share its line.
        let holding = (&mut holder.stdout).lines().any(|line| line.unwrap().contains(HOLDING));
        assert!(holding, "lock holder exited without holding the store");
        holder
    }

    /// Closes the child's stdin and waits for it to exit on its own.
    fn release(mut self) -> std::process::ExitStatus {
        drop(self.child.stdin.take());
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut rest).unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for LockHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn be_the_lock_holder(dir: PathBuf) {
    let store = Store::open(&dir, Options { durability: Durability::None, ..Default::default() }).unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "{HOLDING}").unwrap();
    out.flush().unwrap();
    drop(out);
    let mut sink = String::new();
    while std::io::stdin().read_line(&mut sink).unwrap() > 0 {}
    drop(store);
}

#[test]
fn second_open_from_another_process_is_locked() {
    if let Some(dir) = std::env::var_os(LOCK_HOLDER_ENV) {
        return be_the_lock_holder(PathBuf::from(dir));
    }
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);

    // A holder that exits cleanly when told to.
    let holder = LockHolder::spawn(dir.path());
    assert!(matches!(Store::open(dir.path(), options(&clock)), Err(Error::Locked { .. })));
    let status = holder.release();
    assert!(status.success(), "lock holder failed: {status}");
    drop(open(dir.path(), &clock));

    // A holder that is killed: the lock dies with it.
    let mut holder = LockHolder::spawn(dir.path());
    assert!(matches!(Store::open(dir.path(), options(&clock)), Err(Error::Locked { .. })));
    holder.child.kill().unwrap();
    holder.child.wait().unwrap();
    drop(open(dir.path(), &clock));
}

#[test]
fn clock_stepped_back_does_not_revive_an_expired_lease() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let lease = ClaimOptions { lease: Some(Duration::from_secs(10)), ..Default::default() };
    let old = acquired(store.claim_with("k", b"r", lease.clone()).unwrap());
    clock.set_ms(START_MS + 20_000);
    assert!(store.get("k").unwrap().is_some()); // the store has now seen +20 s
    clock.set_ms(START_MS); // the wall clock steps back 20 s
    let taker = acquired(store.claim_with("k", b"r", lease).unwrap());
    assert!(taker.recovered(), "the lease had ended and stays ended");
    assert_eq!(taker.lease_expires_at(), ms_to_system_time(START_MS + 30_000), "new lease counts from +20 s");
    assert!(matches!(store.complete(&old, b"x"), Err(Error::StaleToken)));
}

/// Claims `key` with a 60 s TTL (request `r`) and completes it with "old outcome".
fn complete_with_a_minute_to_live(store: &Store, key: &str) {
    let ttl = ClaimOptions { ttl: Some(Duration::from_secs(60)), ..Default::default() };
    let token = acquired(store.claim_with(key, b"r", ttl).unwrap());
    store.complete(&token, b"old outcome").unwrap();
}

#[test]
fn clock_stepped_back_does_not_bring_an_expired_key_back() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    complete_with_a_minute_to_live(&store, "k");
    clock.set_ms(START_MS + 120_000);
    assert_eq!(store.get("k").unwrap(), None);
    clock.set_ms(START_MS);
    assert_eq!(store.get("k").unwrap(), None, "an expired key stays expired");
    let fresh = acquired(store.claim("k", b"another request").unwrap());
    assert!(!fresh.recovered());
    let Some(Entry::InFlight { claimed_at, .. }) = store.get("k").unwrap() else { panic!("in flight") };
    assert_eq!(claimed_at, ms_to_system_time(START_MS + 120_000), "records use the store's latest time");
}

#[test]
fn clock_stepped_back_across_a_reopen_does_not_bring_an_expired_key_back() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    {
        let store = open(dir.path(), &clock);
        complete_with_a_minute_to_live(&store, "expired");
        clock.set_ms(START_MS + 120_000);
        let _held = acquired(store.claim("written later", b"r").unwrap());
        store.close().unwrap();
    }
    clock.set_ms(START_MS);
    let store = open(dir.path(), &clock);
    assert_eq!(store.get("expired").unwrap(), None, "the store's time does not go back across a reopen");
    assert!(!acquired(store.claim("expired", b"r").unwrap()).recovered());
}

/// The store saw a later time only through reads, then closed cleanly; the wall clock is then
/// stepped back before the next open. A key that was expired must not come back.
#[test]
fn clock_stepped_back_after_a_clean_close_does_not_bring_an_expired_key_back() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    {
        let store = open(dir.path(), &clock);
        complete_with_a_minute_to_live(&store, "k");
        clock.set_ms(START_MS + 120_000);
        assert_eq!(store.get("k").unwrap(), None, "expired, and the caller acted on that");
        store.close().unwrap();
    }
    clock.set_ms(START_MS + 1_000);
    let store = open(dir.path(), &clock);
    assert_eq!(store.get("k").unwrap(), None, "an expired key came back after a reopen with the clock stepped back");
}
