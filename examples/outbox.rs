//! An outbound send ledger: every e-mail is sent under a send key (`order-confirmation:<order>`,
//! `password-reset:<request>`); a repeat of the same send is suppressed and gets the provider
//! message id recorded by the first one; a provider failure gives the claim back (`release`) so
//! the relay's retry can send; the same key with another message is refused.
//!
//! The order service here emits its "send the confirmation" intents at least once (1 to 3
//! times, shuffled), and the e-mail provider rejects a quarter of the calls.
//!
//! Run it with `cargo run --example outbox` (set `SEED=<n>` for another run of the dice).

use std::collections::HashMap;

use idemstore::{Claim, Durability, Entry, Options, Store, system_time_to_ms};

mod common;
use common::Rng;

const ORDERS: u32 = 16;
const SEND_ATTEMPTS: u32 = 10;

/// What the ledger answered for one send request.
#[derive(Debug, PartialEq, Eq)]
enum Sent {
    /// Sent now; the provider's message id.
    Now(String),
    /// Sent before; the provider's message id recorded then. Nothing was sent again.
    Already(String),
    /// This send key was used for another message: not sent (a bug upstream).
    Conflict,
    /// Another relay is sending it right now; ask again later.
    InProgress,
    /// The provider rejected every attempt; the key is free, a later run retries.
    GaveUp,
}

/// The e-mail provider: accepts or rejects a call, and keeps what it delivered.
struct Provider {
    rng: Rng,
    delivered: Vec<(String, String)>,
    rejected: u32,
}

impl Provider {
    fn send(&mut self, to: &str, body: &str) -> Result<String, String> {
        if self.rng.below(4) == 0 {
            self.rejected += 1;
            return Err("503 Service Unavailable".into());
        }
        let message_id = format!("pm_{:06}", 310_000 + self.delivered.len());
        self.delivered.push((to.to_string(), body.to_string()));
        Ok(message_id)
    }
}

/// Sends `body` to `to` once per `send_key`, through the ledger.
fn send_once(store: &Store, provider: &mut Provider, send_key: &str, to: &str, body: &str) -> idemstore::Result<Sent> {
    let request = format!("to={to}\n{body}");
    for _ in 0..SEND_ATTEMPTS {
        let token = match store.claim(send_key, &request)? {
            Claim::Completed(done) => return Ok(Sent::Already(String::from_utf8_lossy(&done.outcome).into_owned())),
            Claim::Mismatch => return Ok(Sent::Conflict),
            Claim::InProgress { .. } => return Ok(Sent::InProgress),
            Claim::Acquired(token) => token,
        };
        match provider.send(to, body) {
            Ok(message_id) => {
                store.complete(&token, &message_id)?;
                return Ok(Sent::Now(message_id));
            }
            // Not sent: give the key back so the retry can send.
            Err(_) => store.release(&token)?,
        }
    }
    Ok(Sent::GaveUp)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seed = std::env::var("SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(42);
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path(), Options { durability: Durability::Sync, ..Options::default() })?;
    let mut provider = Provider { rng: Rng::new(seed ^ 0xabc), delivered: Vec::new(), rejected: 0 };

    // The order service's intents, each emitted 1 to 3 times, in a shuffled order.
    let mut intents: Vec<(String, String, String)> = Vec::new();
    for order in 0..ORDERS {
        let intent = (
            format!("order-confirmation:{}", 5000 + order),
            format!("buyer{order}@example.com"),
            format!("Your order {} is confirmed.", 5000 + order),
        );
        for _ in 0..1 + rng.below(3) {
            intents.push(intent.clone());
        }
    }
    rng.shuffle(&mut intents);
    println!("outbox: {} send requests for {ORDERS} order confirmations\n", intents.len());

    let mut first_ids: HashMap<String, String> = HashMap::new();
    let mut suppressed = 0u32;
    for (send_key, to, body) in &intents {
        match send_once(&store, &mut provider, send_key, to, body)? {
            Sent::Now(id) => {
                println!("{send_key:<30} sent now          provider id {id}");
                assert!(first_ids.insert(send_key.clone(), id).is_none(), "{send_key} sent twice");
            }
            Sent::Already(id) => {
                println!("{send_key:<30} duplicate: not sent, recorded provider id {id}");
                assert_eq!(first_ids.get(send_key), Some(&id), "the recorded id is the first send's");
                suppressed += 1;
            }
            other => panic!("{send_key}: unexpected {other:?}"),
        }
    }

    // A password reset clicked twice, then the same key reused with another message.
    let reset = ("password-reset:r-77", "buyer3@example.com", "Reset link: https://example.com/r/77");
    let Sent::Now(reset_id) = send_once(&store, &mut provider, reset.0, reset.1, reset.2)? else {
        panic!("a new send key is sent")
    };
    let again = send_once(&store, &mut provider, reset.0, reset.1, reset.2)?;
    assert_eq!(again, Sent::Already(reset_id.clone()));
    suppressed += 1;
    println!("\n{:<30} sent once, the second click got {reset_id} back", reset.0);
    let reused = send_once(&store, &mut provider, reset.0, reset.1, "Reset link: https://example.com/r/78")?;
    assert_eq!(reused, Sent::Conflict);
    println!("{:<30} reused for another message: refused, not sent", reset.0);

    // The ledger answers "was this sent, and as what?" for support.
    let Some(Entry::Completed(done)) = store.get(reset.0)? else { panic!("the ledger holds the reset") };
    println!(
        "{:<30} ledger: provider id {}, sent at {} ms since the epoch",
        reset.0,
        String::from_utf8_lossy(&done.outcome),
        system_time_to_ms(done.completed_at)
    );

    let stats = store.stats();
    println!("\nprovider calls rejected (then retried): {}", provider.rejected);
    println!("e-mails delivered by the provider:      {}", provider.delivered.len());
    println!("duplicate sends suppressed:             {suppressed}");
    println!(
        "store stats: {} claims acquired, {} released after a provider failure, {} duplicates blocked",
        stats.claims_acquired_total,
        stats.releases_total,
        stats.duplicates_blocked_total()
    );

    assert_eq!(provider.delivered.len() as u32, ORDERS + 1, "one e-mail per send key");
    let mut recipients: Vec<&(String, String)> = provider.delivered.iter().collect();
    recipients.sort();
    recipients.dedup();
    assert_eq!(recipients.len(), provider.delivered.len(), "no message delivered twice");
    assert_eq!(stats.releases_total, u64::from(provider.rejected));
    assert_eq!(u64::from(suppressed) + 1, stats.duplicates_blocked_total(), "suppressed sends plus the reused key");
    println!("\nEvery message went out exactly once.");
    store.close()?;
    Ok(())
}
