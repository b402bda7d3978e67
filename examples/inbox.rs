//! The inbox pattern: a message consumer that applies each message once however often the
//! broker delivers it. Deliveries come duplicated and shuffled, to two consumer threads at once;
//! each consumer polls up to 8 deliveries at a time and claims them with one `claim_many` call
//! (key `inbox:<message id>`, request the message body; under `Durability::Sync` the whole poll
//! waits for one fsync). For each delivery:
//!
//! - `Acquired`: apply the message (credit an account); the poll's applied messages are then
//!   completed together with one `complete_many` call (one more fsync), then acknowledged;
//! - `Completed`: a redelivery of an applied message: acknowledge, apply nothing;
//! - `InProgress`: the message is being applied right now (by the other consumer, or earlier in
//!   this same poll): put it back (a nack), it will come again and then be `Completed`;
//! - `Mismatch`: the same message id with another body, a producer bug: dead-letter it.
//!
//! Run it with `cargo run --example inbox` (set `SEED=<n>` for another shuffle).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemstore::{Claim, ClaimOptions, ClaimToken, Durability, Options, Store};

mod common;
use common::Rng;

const MESSAGES: u32 = 60;
const CONSUMERS: usize = 2;
/// Deliveries a consumer takes from the broker at once.
const POLL: usize = 8;

/// A message as the broker carries it.
#[derive(Debug, Clone)]
struct Message {
    id: String,
    account: String,
    amount_cents: i64,
}

impl Message {
    fn body(&self) -> String {
        format!("credit {} {}", self.account, self.amount_cents)
    }
}

/// What the consumers did, summed over both.
#[derive(Debug, Default)]
struct Counts {
    deliveries: u32,
    applied: u32,
    redeliveries_skipped: u32,
    requeued_in_progress: u32,
    dead_lettered: u32,
}

/// The consumers' database: balances, and how often each message was applied.
#[derive(Debug, Default)]
struct Ledger {
    balances: HashMap<String, i64>,
    applied: HashMap<String, u32>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seed = std::env::var("SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir()?;
    let store = Arc::new(Store::open(dir.path(), Options { durability: Durability::Sync, ..Options::default() })?);

    let messages: Vec<Message> = (0..MESSAGES)
        .map(|n| Message {
            id: format!("msg-{n:04}"),
            account: format!("acct-{}", n % 7),
            amount_cents: 100 + i64::from(n) * 25,
        })
        .collect();
    // At-least-once delivery: every message one to four times, in a shuffled order.
    let mut deliveries: Vec<Message> = Vec::new();
    for message in &messages {
        for _ in 0..1 + rng.below(4) {
            deliveries.push(message.clone());
        }
    }
    rng.shuffle(&mut deliveries);
    let delivered = deliveries.len();
    println!("inbox: {MESSAGES} messages, {delivered} deliveries (duplicated and shuffled), {CONSUMERS} consumers");
    println!("(then one late delivery of msg-0003 with another body: a producer bug)\n");

    let queue = Arc::new(Mutex::new(VecDeque::from(deliveries)));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let counts = Arc::new(Mutex::new(Counts::default()));
    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|_| {
            let (store, queue, ledger, counts) = (store.clone(), queue.clone(), ledger.clone(), counts.clone());
            std::thread::spawn(move || consume(&store, &queue, &ledger, &counts))
        })
        .collect();
    for consumer in consumers {
        consumer.join().map_err(|_| "a consumer panicked")??;
    }
    // Later, a producer bug: a message id reused for a different body.
    let poison = Message { amount_cents: 999_999, ..messages[3].clone() };
    queue.lock().map_err(|_| "poisoned")?.push_back(poison);
    consume(&store, &queue, &ledger, &counts)?;

    let counts = counts.lock().map_err(|_| "poisoned")?;
    let ledger = ledger.lock().map_err(|_| "poisoned")?;
    let stats = store.stats();
    println!("deliveries handled:          {}", counts.deliveries);
    println!("messages applied:            {}", counts.applied);
    println!("redeliveries skipped:        {}", counts.redeliveries_skipped);
    println!("put back while in progress:  {}", counts.requeued_in_progress);
    println!("dead-lettered (id reused):   {}", counts.dead_lettered);
    println!(
        "store stats: {} claims acquired, {} duplicates blocked ({} replayed, {} in progress, {} mismatched)",
        stats.claims_acquired_total,
        stats.duplicates_blocked_total(),
        stats.duplicates_replayed_total,
        stats.duplicates_in_progress_total,
        stats.mismatches_total
    );
    println!(
        "fsyncs: {} for {} claims and completes",
        stats.syncs_total,
        stats.claims_acquired_total + stats.duplicates_blocked_total() + stats.completes_total
    );

    // Every message applied exactly once, and the balances are what one pass would give.
    for message in &messages {
        assert_eq!(ledger.applied.get(&message.id), Some(&1), "{} applied once", message.id);
    }
    let mut expected: HashMap<String, i64> = HashMap::new();
    for message in &messages {
        *expected.entry(message.account.clone()).or_default() += message.amount_cents;
    }
    assert_eq!(ledger.balances, expected);
    assert_eq!(counts.applied, MESSAGES);
    assert_eq!(counts.dead_lettered, 1);
    assert_eq!(counts.deliveries as usize, delivered + 1 + counts.requeued_in_progress as usize);
    assert_eq!(counts.redeliveries_skipped as usize, delivered - MESSAGES as usize);
    assert_eq!(u64::from(counts.applied), stats.claims_acquired_total);
    println!("\nEach of the {MESSAGES} messages was applied exactly once; the balances are right.");
    Ok(())
}

/// One consumer: polls deliveries until the queue is empty.
fn consume(
    store: &Store,
    queue: &Mutex<VecDeque<Message>>,
    ledger: &Mutex<Ledger>,
    counts: &Mutex<Counts>,
) -> Result<(), String> {
    loop {
        let poll: Vec<Message> = {
            let mut queue = queue.lock().map_err(poisoned)?;
            let n = queue.len().min(POLL);
            queue.drain(..n).collect()
        };
        if poll.is_empty() {
            return Ok(());
        }
        counts.lock().map_err(poisoned)?.deliveries += poll.len() as u32;
        let claims: Vec<(String, String)> = poll.iter().map(|m| (format!("inbox:{}", m.id), m.body())).collect();
        let answers = store.claim_many(&claims, ClaimOptions::default());
        let mut applied = Vec::new();
        for (message, answer) in poll.into_iter().zip(answers) {
            applied.extend(handle(queue, ledger, counts, message, answer.map_err(|e| e.to_string())?)?);
        }
        // The poll's outcomes are recorded together too: one more fsync, before the broker
        // gets its acknowledgements.
        let completes: Vec<(&ClaimToken, &str)> = applied.iter().map(|token| (token, "applied")).collect();
        for done in store.complete_many(&completes) {
            done.map_err(|e| e.to_string())?;
        }
        counts.lock().map_err(poisoned)?.applied += applied.len() as u32;
    }
}

/// What a consumer does with one delivery, given its claim's answer; returns the token of a
/// message it applied, to complete with the rest of the poll.
fn handle(
    queue: &Mutex<VecDeque<Message>>,
    ledger: &Mutex<Ledger>,
    counts: &Mutex<Counts>,
    message: Message,
    answer: Claim,
) -> Result<Option<ClaimToken>, String> {
    match answer {
        Claim::Acquired(token) => {
            // Applying takes a moment (a database write), so the other consumer may see the
            // same message in progress meanwhile.
            std::thread::sleep(Duration::from_millis(1));
            {
                let mut ledger = ledger.lock().map_err(poisoned)?;
                *ledger.balances.entry(message.account.clone()).or_default() += message.amount_cents;
                *ledger.applied.entry(message.id.clone()).or_default() += 1;
            }
            return Ok(Some(token));
        }
        Claim::Completed(_) => counts.lock().map_err(poisoned)?.redeliveries_skipped += 1,
        Claim::InProgress { .. } => {
            counts.lock().map_err(poisoned)?.requeued_in_progress += 1;
            queue.lock().map_err(poisoned)?.push_back(message);
            // The broker redelivers a nacked message after a short delay.
            std::thread::sleep(Duration::from_millis(1));
        }
        Claim::Mismatch => {
            println!("dead letter: {} arrived with another body ({:?})", message.id, message.body());
            counts.lock().map_err(poisoned)?.dead_lettered += 1;
        }
    }
    Ok(None)
}

fn poisoned<T>(_: T) -> String {
    "a lock was poisoned by a panicking consumer".to_string()
}
