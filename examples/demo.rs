//! The engine at work, step by step: a claim and its effect, a retry that gets the replay, the
//! same key with a different request (`Mismatch`), a concurrent duplicate (one winner), expiry
//! (a manual clock moved past the TTL), and a crash (this program re-runs itself as a child,
//! which claims a key, checkpoints and is killed with SIGKILL; the parent reopens the store,
//! finds the orphan and finishes it). Every claim it prints is also `assert!`ed.
//!
//! Run it with `cargo run --example demo`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::time::{Duration, SystemTime};

use idemstore::{Claim, ClaimOptions, Durability, ManualClock, Options, Store, system_time_to_ms};

type DemoResult = Result<(), Box<dyn std::error::Error>>;

const CHILD_FLAG: &str = "--crash-child";

fn main() -> DemoResult {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() == Some(CHILD_FLAG) {
        let dir = args.next().ok_or("the child needs the store directory")?;
        return crash_child(&dir);
    }

    let dir = tempfile::tempdir()?;
    println!("idemstore demo: a dedupe store in {}\n", dir.path().display());
    // A manual clock (standing at the current time) lets step 5 move past a TTL at once.
    let clock = ManualClock::new(system_time_to_ms(SystemTime::now()));
    let options = Options { durability: Durability::Sync, clock: clock.clone(), ..Options::default() };
    let store = Arc::new(Store::open(dir.path(), options)?);

    claim_and_replay(&store)?;
    mismatch(&store)?;
    concurrent_duplicate(&store)?;
    expiry(&store, &clock)?;
    let stats = store.stats();
    println!(
        "Stats so far: {} claims acquired, {} duplicates blocked: {} replayed, {} replayed after waiting, \
         {} answered in progress, {} mismatched.\n",
        stats.claims_acquired_total,
        stats.duplicates_blocked_total(),
        stats.duplicates_replayed_total,
        stats.duplicates_waited_total,
        stats.duplicates_in_progress_total,
        stats.mismatches_total,
    );
    assert_eq!(stats.claims_acquired_total, 4);
    assert_eq!(stats.duplicates_blocked_total(), 4, "every duplicate above ran nothing");
    assert_eq!(stats.duplicates_replayed_total + stats.duplicates_waited_total, 2);
    drop(store);

    crash_and_reopen()?;
    println!("\nEvery step did what it said. Done.");
    Ok(())
}

/// 1 and 2: claim, do the effect, complete; a retry gets the stored outcome back.
fn claim_and_replay(store: &Store) -> DemoResult {
    let request = b"POST /charges {customer: 7, amount: 1000}";
    let mut charges_made = 0;

    println!("1. A client sends a charge with Idempotency-Key 'charge-7'.");
    let Claim::Acquired(token) = store.claim("charge-7", request)? else { panic!("a new key is acquired") };
    println!("   claim -> Acquired: this caller owns the key and does the effect.");
    charges_made += 1;
    let outcome = b"201 Created {charge: ch_1001}";
    store.complete(&token, outcome)?;
    println!("   The charge ran once; complete() stored the response: {:?}", String::from_utf8_lossy(outcome));

    println!("2. The client timed out and retries with the same key and request.");
    let Claim::Completed(done) = store.claim("charge-7", request)? else { panic!("a retry is a replay") };
    assert_eq!(done.outcome, outcome, "the replay carries the same bytes");
    println!(
        "   claim -> Completed: the same response comes back ({:?}), and no second charge.",
        String::from_utf8_lossy(&done.outcome)
    );
    assert_eq!(charges_made, 1);
    Ok(())
}

/// 3: the same key with a different request is refused.
fn mismatch(store: &Store) -> DemoResult {
    println!("3. A buggy client reuses 'charge-7' for a different request (amount 5000).");
    let answer = store.claim("charge-7", b"POST /charges {customer: 7, amount: 5000}")?;
    assert_eq!(answer, Claim::Mismatch);
    println!("   claim -> Mismatch: the service answers 422, nothing runs.");
    Ok(())
}

/// 4: two threads claim one key at once; exactly one runs the effect.
fn concurrent_duplicate(store: &Arc<Store>) -> DemoResult {
    println!("4. A double click: two threads claim 'order-9' at the same instant (each willing to wait).");
    let effects = Arc::new(AtomicU32::new(0));
    let start = Arc::new(Barrier::new(2));
    let (acquired_tx, acquired_rx) = mpsc::channel::<&'static str>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Arc::new(std::sync::Mutex::new(go_rx));
    let request = b"POST /orders {sku: 9}";
    let waited_before = store.stats().duplicates_waited_total;
    let outcome = b"201 Created {order: 9}";

    let handles: Vec<_> = ["thread A", "thread B"]
        .into_iter()
        .map(|name| {
            let (store, effects, start) = (store.clone(), effects.clone(), start.clone());
            let (acquired_tx, go_rx) = (acquired_tx.clone(), go_rx.clone());
            std::thread::spawn(move || -> Result<(&'static str, Claim), idemstore::Error> {
                start.wait();
                let wait = ClaimOptions { wait: Some(Duration::from_secs(10)), ..ClaimOptions::default() };
                let answer = store.claim_with("order-9", request, wait)?;
                if let Claim::Acquired(token) = &answer {
                    let _ = acquired_tx.send(name);
                    // Hold the claim until the main thread has looked at it.
                    let _ = go_rx.lock().map(|rx| rx.recv());
                    effects.fetch_add(1, Ordering::SeqCst);
                    store.complete(token, outcome)?;
                }
                Ok((name, answer))
            })
        })
        .collect();

    let winner = acquired_rx.recv()?;
    println!("   {winner} got Acquired and is placing the order.");
    let meanwhile = store.claim("order-9", request)?;
    let Claim::InProgress { lease_expires_at, .. } = meanwhile else { panic!("the key is held: {meanwhile:?}") };
    let lease_left = lease_expires_at.duration_since(SystemTime::now()).unwrap_or_default();
    println!(
        "   A third request without waiting gets InProgress (the holder's lease has about {}s left): answer 409, retry later.",
        lease_left.as_secs()
    );
    go_tx.send(())?;

    let mut acquired = 0;
    for handle in handles {
        let (name, answer) = handle.join().map_err(|_| "a claiming thread panicked")??;
        match answer {
            Claim::Acquired(_) => acquired += 1,
            Claim::Completed(done) => {
                assert_eq!(done.outcome, outcome);
                let how = if store.stats().duplicates_waited_total > waited_before {
                    "waited for the winner and then got"
                } else {
                    "arrived after the winner finished and got"
                };
                println!("   {name} {how} its outcome: {:?}", String::from_utf8_lossy(&done.outcome));
            }
            other => panic!("{name}: unexpected {other:?}"),
        }
    }
    assert_eq!(acquired, 1, "exactly one thread wins");
    assert_eq!(effects.load(Ordering::SeqCst), 1, "the order was placed once");
    println!("   One winner, one order placed.");
    Ok(())
}

/// 5: a key lives for its TTL; after that it is gone and can be claimed again.
fn expiry(store: &Store, clock: &ManualClock) -> DemoResult {
    println!("5. A monthly newsletter send is claimed with a 1 hour TTL and completed.");
    let ttl = ClaimOptions { ttl: Some(Duration::from_secs(3600)), ..ClaimOptions::default() };
    let Claim::Acquired(token) = store.claim_with("newsletter:2026-11", "send", ttl.clone())? else {
        panic!("a new key is acquired")
    };
    store.complete(&token, "sent to 1,204 readers")?;
    assert!(store.get("newsletter:2026-11")?.is_some());
    clock.advance(Duration::from_secs(3601));
    println!("   The clock moves 1 hour and 1 second forward.");
    assert_eq!(store.get("newsletter:2026-11")?, None, "an expired key is absent");
    println!("   get -> None: the key left the dedupe window.");
    let Claim::Acquired(again) = store.claim_with("newsletter:2026-11", "send", ttl)? else {
        panic!("an expired key can be claimed again")
    };
    store.release(&again)?;
    println!("   claim -> Acquired again (released here: we do not send twice in a demo).");
    Ok(())
}

/// 6: a process claims a key, checkpoints, and dies by SIGKILL; the next process takes the
/// orphan over at once and resumes from the checkpoint.
fn crash_and_reopen() -> DemoResult {
    let dir = tempfile::tempdir()?;
    println!("6. A child process opens a store in {}, claims 'payout-42',", dir.path().display());
    println!("   debits the account, checkpoints 'debited', and is then killed with SIGKILL.");
    let mut child =
        Command::new(std::env::current_exe()?).arg(CHILD_FLAG).arg(dir.path()).stdout(Stdio::piped()).spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("child stdout")?).read_line(&mut line)?;
    assert_eq!(line.trim(), "checkpointed", "the child reached its checkpoint");
    child.kill()?; // SIGKILL on Unix: no destructor, no close, no flush runs in the child.
    let status = child.wait()?;
    println!("   The child is dead ({status}).");

    let store = Store::open(dir.path(), Options { durability: Durability::Sync, ..Options::default() })?;
    let orphans = store.orphans()?;
    assert_eq!(orphans.len(), 1);
    assert_eq!(orphans[0].key, b"payout-42");
    assert_eq!(orphans[0].checkpoint.as_deref(), Some(&b"debited"[..]));
    println!("   The parent reopens the store: orphans() lists 'payout-42' with checkpoint 'debited'.");

    let Claim::Acquired(token) = store.claim("payout-42", "pay 42 to acct 9")? else {
        panic!("an orphan is taken over at once")
    };
    assert!(token.recovered());
    assert_eq!(token.checkpoint(), Some(&b"debited"[..]));
    println!("   claim -> Acquired at once (no 30 s lease wait), token.recovered() = true,");
    println!("   checkpoint 'debited': skip the debit, do only the credit, and complete.");
    store.complete(&token, "paid: debit+credit")?;
    let Claim::Completed(done) = store.claim("payout-42", "pay 42 to acct 9")? else { panic!("completed") };
    assert_eq!(done.outcome, b"paid: debit+credit");
    assert_eq!(store.stats().orphan_takeovers_total, 1);
    println!("   A retry now replays {:?}.", String::from_utf8_lossy(&done.outcome));
    store.close()?;
    Ok(())
}

/// The child of step 6: claim, checkpoint, say so, then wait to be killed.
fn crash_child(dir: &str) -> DemoResult {
    let store = Store::open(dir, Options { durability: Durability::Sync, ..Options::default() })?;
    let Claim::Acquired(token) = store.claim("payout-42", "pay 42 to acct 9")? else { panic!("acquired") };
    store.checkpoint(&token, "debited")?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "checkpointed")?;
    stdout.flush()?;
    // The parent kills us here; never return on our own.
    loop {
        std::thread::park();
    }
}
