//! The mini case of the idempotency checklist: Signup -> welcome e-mail -> CRM -> billing, run
//! through injected timeouts, transient errors and crashes, with a client that retries.
//!
//! - **Signup**: the client sends `POST /signup` with an `Idempotency-Key` (a uuid); the
//!   service claims that key with the request body, creates the user (the database keeps a
//!   unique index on the e-mail), and stores the response, which every retry gets back.
//! - **Welcome e-mail**: sent under the key `welcome:<user_id>`; the recorded provider message
//!   id is returned to any repeat.
//! - **CRM**: the CRM delivers a `contact.created` webhook at least once (here 1 to 3 times, in
//!   shuffled order); the consumer claims `crm-inbox:<webhook_id>` so duplicates are no-ops.
//! - **Billing**: the card capture runs under `<user_id>:<plan>:<day>`; a late retry gets the
//!   same charge id back.
//!
//! A crash is simulated in process: the service drops its `Store` in the middle of a request
//! (the claim stays in flight, exactly as after a kill) and opens it again, so the claim is an
//! orphan of an earlier incarnation. The retry takes it over at once (`token.recovered()`) and
//! resumes from its checkpoint. For an external call, the checkpoint `calling` is written before
//! the call; a takeover that finds it asks the other side whether the call happened (the
//! provider's lookup by our reference, or the CRM table) instead of calling twice. That closes
//! the one gap no dedupe store closes on its own: a crash between an external effect and the
//! record of its outcome.
//!
//! Run it with `cargo run --example signup_flow` (set `SEED=<n>` for another run of the dice).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use idemstore::{Claim, Durability, Options, Stats, Store};

mod common;
use common::Rng;

const USERS: u64 = 24;
const DAY: &str = "2026-11-28";
const MAX_ATTEMPTS: u32 = 30;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seed = std::env::var("SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20_261_128);
    let dir = tempfile::tempdir()?;
    println!("signup flow: {USERS} users, seed {seed}, store in {}\n", dir.path().display());
    let mut service = Service::start(dir.path(), seed)?;
    let mut client_rng = Rng::new(seed ^ 0x5eed);
    let mut log = ClientLog::default();

    for n in 0..USERS {
        let signup = Signup {
            idempotency_key: uuid_like(&mut client_rng),
            email: format!("user{n}@example.com"),
            plan: if n % 3 == 0 { "pro" } else { "basic" },
        };
        let body = signup_until_done(&mut service, &signup, &mut log)?;
        // The user double-clicks sometimes: the same request again gets the same body.
        if client_rng.chance(30) {
            let again = signup_until_done(&mut service, &signup, &mut log)?;
            assert_eq!(again, body, "a repeat gets the original response");
            log.double_clicks += 1;
        }
        // A buggy client reuses a key for another request: refused, nothing runs.
        if n == 5 {
            let reused = Signup { email: "someone-else@example.com".into(), ..signup.clone() };
            assert_eq!(service.signup(&reused), Err(Failure::Conflict));
            log.conflicts += 1;
        }
        log.responses.push(body);
    }

    // The CRM delivers its webhooks at least once, late and out of order.
    let mut deliveries: Vec<String> = Vec::new();
    for user_id in service.world.users.values() {
        for _ in 0..1 + client_rng.below(3) {
            deliveries.push(format!("wh_{user_id}"));
        }
    }
    client_rng.shuffle(&mut deliveries);
    let mut delivery_attempts = 0;
    while let Some(webhook_id) = deliveries.pop() {
        delivery_attempts += 1;
        match service.crm_webhook(&webhook_id) {
            Ok(()) => {}
            Err(Failure::Crash) => {
                service.restart()?;
                deliveries.insert(0, webhook_id); // not acknowledged: the CRM redelivers it
            }
            Err(Failure::Transient) => deliveries.insert(0, webhook_id),
            Err(other) => return Err(format!("webhook {webhook_id}: {other:?}").into()),
        }
    }

    let totals = service.stop()?;
    report(&service.world, &log, delivery_attempts, &totals);
    println!(
        "{} takeovers found that the crashed holder had already made its call, and recorded the \
         provider's answer instead of calling again.",
        service.reconciled
    );
    check(&service.world, &log);
    assert!(service.reconciled >= 1, "the crash after the first external call was reconciled");
    println!("\nEvery effect happened exactly once.");
    Ok(())
}

/// The client: retries the signup with the same key until it gets a response.
fn signup_until_done(service: &mut Service, signup: &Signup, log: &mut ClientLog) -> Result<String, String> {
    for _ in 0..MAX_ATTEMPTS {
        log.attempts += 1;
        match service.signup(signup) {
            Ok(body) if service.chaos.lose_response() => {
                // The service succeeded but the client timed out: it retries, same key.
                log.timeouts += 1;
                let _ = body;
            }
            Ok(body) => return Ok(body),
            Err(Failure::Crash) => {
                log.crashes += 1;
                service.restart().map_err(|e| e.to_string())?;
            }
            Err(Failure::Transient | Failure::Busy) => log.transient_errors += 1,
            Err(other) => return Err(format!("signup {}: {other:?}", signup.idempotency_key)),
        }
    }
    Err(format!("signup {} did not finish in {MAX_ATTEMPTS} attempts", signup.idempotency_key))
}

#[derive(Debug, Clone)]
struct Signup {
    idempotency_key: String,
    email: String,
    plan: &'static str,
}

impl Signup {
    fn body(&self) -> String {
        format!("{{\"email\":\"{}\",\"plan\":\"{}\"}}", self.email, self.plan)
    }
}

/// Why a request did not produce a response.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// The process died mid-request (simulated).
    Crash,
    /// A downstream call failed in a retryable way; the claim was released.
    Transient,
    /// Another holder has the key (a 409 the client retries).
    Busy,
    /// The key was used with a different request (a 422).
    Conflict,
    /// The store refused: a real error.
    Store(String),
}

impl From<idemstore::Error> for Failure {
    fn from(e: idemstore::Error) -> Self {
        Failure::Store(e.to_string())
    }
}

/// The world outside the service: it survives the service's crashes and counts every effect.
#[derive(Default)]
struct World {
    /// The users table: e-mail -> user id, with a unique index on the e-mail.
    users: BTreeMap<String, u64>,
    user_inserts: u32,
    /// The e-mail provider's log: our reference -> (recipient, provider message id).
    emails: HashMap<String, Vec<String>>,
    /// The CRM consumer's table: webhook id -> times applied.
    crm_applied: HashMap<String, u32>,
    /// The card processor: our capture reference -> charge ids captured.
    charges: HashMap<String, Vec<String>>,
}

impl World {
    /// `INSERT INTO users (email) ... ON CONFLICT (email) DO NOTHING RETURNING id`, then the id.
    fn insert_user(&mut self, email: &str) -> u64 {
        let next = self.users.len() as u64 + 1001;
        let id = *self.users.entry(email.to_string()).or_insert(next);
        if id == next {
            self.user_inserts += 1;
        }
        id
    }

    fn send_email(&mut self, reference: &str) -> String {
        let provider_id = format!("msg_{}", 7_000 + self.emails.values().map(Vec::len).sum::<usize>());
        self.emails.entry(reference.to_string()).or_default().push(provider_id.clone());
        provider_id
    }

    fn capture(&mut self, reference: &str) -> String {
        let charge_id = format!("ch_{}", 90_000 + self.charges.values().map(Vec::len).sum::<usize>());
        self.charges.entry(reference.to_string()).or_default().push(charge_id.clone());
        charge_id
    }
}

/// The service: handlers over one store, restarted after a crash.
struct Service {
    dir: std::path::PathBuf,
    store: Option<Store>,
    world: World,
    chaos: Chaos,
    totals: Totals,
    /// Takeovers that found their call already made and recorded its result instead.
    reconciled: u32,
}

/// Counters summed over every lifetime of the store (each open starts from zero).
#[derive(Default, Debug)]
struct Totals {
    lifetimes: u32,
    acquired: u64,
    replayed: u64,
    in_progress: u64,
    mismatches: u64,
    blocked: u64,
    orphan_takeovers: u64,
}

impl Totals {
    fn add(&mut self, stats: &Stats) {
        self.lifetimes += 1;
        self.acquired += stats.claims_acquired_total;
        self.replayed += stats.duplicates_replayed_total + stats.duplicates_waited_total;
        self.in_progress += stats.duplicates_in_progress_total;
        self.mismatches += stats.mismatches_total;
        self.blocked += stats.duplicates_blocked_total();
        self.orphan_takeovers += stats.orphan_takeovers_total;
    }
}

fn open(dir: &Path) -> idemstore::Result<Store> {
    // `None` durability survives a process crash, which is what this example simulates.
    Store::open(dir, Options { durability: Durability::None, ..Options::default() })
}

impl Service {
    fn start(dir: &Path, seed: u64) -> idemstore::Result<Service> {
        Ok(Service {
            dir: dir.to_path_buf(),
            store: Some(open(dir)?),
            world: World::default(),
            chaos: Chaos::new(seed),
            totals: Totals::default(),
            reconciled: 0,
        })
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("the store is open between requests")
    }

    /// The process died: its store goes away without completing anything, and comes back.
    fn restart(&mut self) -> idemstore::Result<()> {
        if let Some(store) = self.store.take() {
            self.totals.add(&store.stats());
        }
        self.store = Some(open(&self.dir)?);
        Ok(())
    }

    fn stop(&mut self) -> idemstore::Result<Totals> {
        if let Some(store) = self.store.take() {
            self.totals.add(&store.stats());
            store.close()?;
        }
        Ok(std::mem::take(&mut self.totals))
    }

    /// `POST /signup`.
    fn signup(&mut self, signup: &Signup) -> Result<String, Failure> {
        let token = match self.store().claim(&signup.idempotency_key, signup.body())? {
            Claim::Completed(done) => return Ok(String::from_utf8_lossy(&done.outcome).into_owned()),
            Claim::InProgress { .. } => return Err(Failure::Busy),
            Claim::Mismatch => return Err(Failure::Conflict),
            Claim::Acquired(token) => token,
        };
        // A takeover resumes from the user id its checkpoint recorded.
        let resumed = token.checkpoint().and_then(|c| std::str::from_utf8(c).ok()?.strip_prefix("user:")?.parse().ok());
        let user_id = match resumed {
            Some(id) => id,
            None => {
                let struck = self.chaos.strike(Point::BeforeCall);
                self.release_on_transient(&token, struck)?;
                let id = self.world.insert_user(&signup.email);
                self.chaos.strike(Point::AfterCall)?;
                self.store().checkpoint(&token, format!("user:{id}"))?;
                id
            }
        };
        let welcome_key = format!("welcome:{user_id}");
        let message_id = self.once(
            &welcome_key,
            &signup.email,
            |w| w.send_email(&welcome_key),
            |w| w.emails.get(&welcome_key).and_then(|ids| ids.first().cloned()),
        );
        let message_id = self.release_on_transient(&token, message_id)?;
        let capture_key = format!("{user_id}:{}:{DAY}", signup.plan);
        let charge_id = self.once(
            &capture_key,
            signup.plan,
            |w| w.capture(&capture_key),
            |w| w.charges.get(&capture_key).and_then(|ids| ids.first().cloned()),
        );
        let charge_id = self.release_on_transient(&token, charge_id)?;
        let body = format!(
            "200 {{\"user_id\":{user_id},\"email\":\"{}\",\"welcome\":\"{message_id}\",\"charge\":\"{charge_id}\"}}",
            signup.email
        );
        self.chaos.strike(Point::BeforeComplete)?;
        self.store().complete(&token, &body)?;
        Ok(body)
    }

    /// A transient failure of a step gives the signup's claim up too, so the retry can run.
    fn release_on_transient<T>(&self, token: &idemstore::ClaimToken, step: Result<T, Failure>) -> Result<T, Failure> {
        if matches!(step, Err(Failure::Transient)) {
            self.store().release(token)?;
        }
        step
    }

    /// The CRM's `contact.created` webhook: the inbox pattern.
    fn crm_webhook(&mut self, webhook_id: &str) -> Result<(), Failure> {
        let inbox_key = format!("crm-inbox:{webhook_id}");
        let id = webhook_id.to_string();
        self.once(
            &inbox_key,
            webhook_id,
            |w| {
                *w.crm_applied.entry(id.clone()).or_default() += 1;
                "applied".to_string()
            },
            |w| w.crm_applied.contains_key(webhook_id).then(|| "applied".to_string()),
        )
        .map(|_| ())
    }

    /// One external effect under `key`, at most once: a repeat gets the recorded result; a
    /// takeover of a claim that may have made the call asks `reconcile` before calling again.
    fn once(
        &mut self,
        key: &str,
        request: &str,
        call: impl FnOnce(&mut World) -> String,
        reconcile: impl FnOnce(&World) -> Option<String>,
    ) -> Result<String, Failure> {
        let token = match self.store().claim(key, request)? {
            Claim::Completed(done) => return Ok(String::from_utf8_lossy(&done.outcome).into_owned()),
            Claim::InProgress { .. } => return Err(Failure::Busy),
            Claim::Mismatch => return Err(Failure::Conflict),
            Claim::Acquired(token) => token,
        };
        if token.recovered()
            && token.checkpoint() == Some(b"calling")
            && let Some(result) = reconcile(&self.world)
        {
            self.store().complete(&token, &result)?;
            self.reconciled += 1;
            return Ok(result);
        }
        if let Err(failure) = self.chaos.strike(Point::BeforeCall) {
            if failure == Failure::Transient {
                self.store().release(&token)?;
            }
            return Err(failure);
        }
        self.store().checkpoint(&token, "calling")?;
        let result = call(&mut self.world);
        self.chaos.strike(Point::AfterExternalCall)?;
        self.store().complete(&token, &result)?;
        Ok(result)
    }
}

/// Where a fault may be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Point {
    /// Before an effect: a crash or a transient error.
    BeforeCall,
    /// After a database write, before its checkpoint: a crash.
    AfterCall,
    /// After an external call (e-mail, capture, CRM apply), before its outcome is recorded: a
    /// crash, the case a takeover must reconcile.
    AfterExternalCall,
    /// After every step, before the signup's response is stored: a crash.
    BeforeComplete,
}

/// The chaos monkey, seeded. Whatever the dice say, the first external call crashes right
/// after it is made and the first response is lost, so every run shows both.
struct Chaos {
    rng: Rng,
    crashes: u32,
    external_call_crashes: u32,
    lost_responses: u32,
}

impl Chaos {
    fn new(seed: u64) -> Chaos {
        Chaos { rng: Rng::new(seed), crashes: 0, external_call_crashes: 0, lost_responses: 0 }
    }

    fn strike(&mut self, point: Point) -> Result<(), Failure> {
        if point == Point::AfterExternalCall && self.external_call_crashes == 0 {
            self.external_call_crashes += 1;
            self.crashes += 1;
            return Err(Failure::Crash);
        }
        // A bounded number of crashes keeps every request able to finish.
        if self.crashes < 40 && self.rng.chance(6) {
            self.crashes += 1;
            return Err(Failure::Crash);
        }
        if point == Point::BeforeCall && self.rng.chance(8) {
            return Err(Failure::Transient);
        }
        Ok(())
    }

    fn lose_response(&mut self) -> bool {
        let lose = self.lost_responses == 0 || self.rng.chance(15);
        self.lost_responses += u32::from(lose);
        lose
    }
}

#[derive(Default)]
struct ClientLog {
    attempts: u32,
    timeouts: u32,
    crashes: u32,
    transient_errors: u32,
    double_clicks: u32,
    conflicts: u32,
    responses: Vec<String>,
}

fn report(world: &World, log: &ClientLog, delivery_attempts: u32, totals: &Totals) {
    let sends: usize = world.emails.values().map(Vec::len).sum();
    let captures: usize = world.charges.values().map(Vec::len).sum();
    let applied: u32 = world.crm_applied.values().sum();
    println!("The client sent {} signup requests for {USERS} signups:", log.attempts);
    println!("  {} timed out after the service had succeeded (and were retried),", log.timeouts);
    println!("  {} hit a crash of the service (restarted, then retried),", log.crashes);
    println!("  {} hit a transient downstream error (retried),", log.transient_errors);
    println!("  {} were double clicks that got the original response back;", log.double_clicks);
    println!("  and {} more reused a key for a different request: refused with 422, nothing ran.", log.conflicts);
    println!("The CRM made {delivery_attempts} webhook deliveries for {} webhooks.\n", world.crm_applied.len());
    println!("{:<22}{:>8}{:>10}", "effect", "ran", "expected");
    println!("{:<22}{:>8}{:>10}", "user rows inserted", world.user_inserts, USERS);
    println!("{:<22}{:>8}{:>10}", "welcome e-mails sent", sends, USERS);
    println!("{:<22}{:>8}{:>10}", "CRM webhooks applied", applied, USERS);
    println!("{:<22}{:>8}{:>10}", "cards captured", captures, USERS);
    println!(
        "\nThe store, over {} lifetimes ({} crashes): {} claims acquired, {} duplicates blocked \
         ({} replayed, {} in progress, {} mismatched), {} orphans taken over after a crash.",
        totals.lifetimes,
        totals.lifetimes - 1,
        totals.acquired,
        totals.blocked,
        totals.replayed,
        totals.in_progress,
        totals.mismatches,
        totals.orphan_takeovers
    );
}

fn check(world: &World, log: &ClientLog) {
    assert_eq!(world.users.len() as u64, USERS);
    assert_eq!(u64::from(world.user_inserts), USERS, "each user row inserted once");
    for (reference, ids) in &world.emails {
        assert_eq!(ids.len(), 1, "{reference} sent {} times", ids.len());
    }
    assert_eq!(world.emails.len() as u64, USERS, "one welcome e-mail per user");
    for (webhook, times) in &world.crm_applied {
        assert_eq!(*times, 1, "{webhook} applied {times} times");
    }
    assert_eq!(world.crm_applied.len() as u64, USERS, "one CRM webhook applied per user");
    for (reference, ids) in &world.charges {
        assert_eq!(ids.len(), 1, "{reference} captured {} times", ids.len());
    }
    assert_eq!(world.charges.len() as u64, USERS, "one capture per user");
    assert_eq!(log.responses.len() as u64, USERS);
    assert!(log.crashes > 0 && log.timeouts > 0, "the run injected crashes and timeouts");
}

/// A uuid-shaped Idempotency-Key.
fn uuid_like(rng: &mut Rng) -> String {
    let (a, b) = (rng.next(), rng.next());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (b >> 48) & 0x3fff | 0x8000,
        b & 0xffff_ffff_ffff
    )
}
