//! The payments service behind `examples/payments/main.rs`, shared with the tests (which
//! include this file) so that they drive exactly the code the example runs.
//!
//! Every effect (a charge, a refund, a welcome e-mail, a CRM record, a billing account) is a
//! line appended to a ledger file: the stand-in for a payment provider or a mail server, and
//! what the tests count to prove an effect ran once.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use idemstore::{Durability, Options, Store};
use idemstore_http::{IdempotencyContext, IdempotencyLayer, Metrics};
use serde::{Deserialize, Serialize};

/// How the service is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// The store directory.
    pub store_dir: PathBuf,
    /// The ledger file the effects are appended to.
    pub ledger: PathBuf,
    /// A step after which a handler stops and waits forever (a test sends SIGKILL then):
    /// `charge`, `email`, `crm` or `billing`.
    pub pause_after: Option<String>,
}

/// The append-only ledger of effects.
pub struct Ledger {
    file: Mutex<File>,
}

impl Ledger {
    /// Opens (or creates) the ledger at `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<Ledger> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Ledger { file: Mutex::new(file) })
    }

    /// Appends one line: one write, so a kill leaves whole lines only.
    fn record(&self, line: &str) -> std::io::Result<()> {
        let mut file = self.file.lock().map_err(|_| std::io::Error::other("ledger lock poisoned"))?;
        file.write_all(format!("{line}\n").as_bytes())
    }
}

struct App {
    ledger: Ledger,
    pause_after: Option<String>,
}

impl App {
    /// The crash window a test opens: after the effect and its checkpoint, before the
    /// response is stored.
    async fn pause_if(&self, step: &str) {
        if self.pause_after.as_deref() == Some(step) {
            println!("PAUSED {step}");
            loop {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        }
    }
}

/// Opens the store (`Durability::Sync`: an answer acknowledged is on disk) and builds the
/// router; the layer's counters come back with it.
pub fn router(config: &Config) -> Result<(Router, Arc<Metrics>), Box<dyn std::error::Error>> {
    let store = Store::open(&config.store_dir, Options { durability: Durability::Sync, ..Options::default() })?;
    let app = Arc::new(App { ledger: Ledger::open(&config.ledger)?, pause_after: config.pause_after.clone() });
    let layer = IdempotencyLayer::new(store)
        .require_key(true)
        .lease(Duration::from_secs(30))
        .ttl(Duration::from_secs(24 * 3600))
        // Keys are per account: two accounts that pick the same key never share a response.
        .scope(|parts| parts.headers.get("x-account").map(|value| value.as_bytes().to_vec()).unwrap_or_default());
    let metrics = layer.metrics();
    let router = Router::new()
        .route("/charges", post(charge))
        .route("/refunds", post(refund))
        .route("/signups", post(signup))
        .with_state(app)
        .layer(layer);
    Ok((router, metrics))
}

/// Serves on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, config: &Config) -> Result<(), Box<dyn std::error::Error>> {
    let (router, _metrics) = router(config)?;
    axum::serve(listener, router).await?;
    Ok(())
}

/// An effect or a checkpoint failed: 500, which the layer does not store, so the client's
/// retry runs again and resumes from the last checkpoint.
struct Failed(String);

impl IntoResponse for Failed {
    fn into_response(self) -> Response {
        (StatusCode::INTERNAL_SERVER_ERROR, self.0).into_response()
    }
}

impl<E: std::fmt::Display> From<E> for Failed {
    fn from(error: E) -> Self {
        Failed(error.to_string())
    }
}

#[derive(Deserialize)]
struct ChargeRequest {
    customer: String,
    amount_cents: u64,
}

#[derive(Serialize)]
struct Charge {
    id: String,
    customer: String,
    amount_cents: u64,
    /// True when this request resumed a charge made by an earlier, interrupted attempt.
    resumed: bool,
}

/// POST /charges: charges once per key. The charge's id derives from the key, so a resumed
/// attempt answers with the same id.
async fn charge(
    State(app): State<Arc<App>>,
    Extension(claim): Extension<IdempotencyContext>,
    Json(request): Json<ChargeRequest>,
) -> Result<(StatusCode, Json<Charge>), Failed> {
    let id = format!("ch_{:016x}", xxhash_rust::xxh3::xxh3_64(claim.client_key()));
    let resumed = claim.last_checkpoint().as_deref() == Some(b"charged".as_slice());
    if !resumed {
        // A real provider would get `claim.client_key()` as its own idempotency key, which
        // also covers a crash between this call and the checkpoint below.
        app.ledger.record(&format!("charge {id} {} {}", request.customer, request.amount_cents))?;
        claim.checkpoint(b"charged").await?;
        app.pause_if("charge").await;
    }
    let charge = Charge { id, customer: request.customer, amount_cents: request.amount_cents, resumed };
    Ok((StatusCode::CREATED, Json(charge)))
}

#[derive(Deserialize)]
struct RefundRequest {
    charge_id: String,
    amount_cents: u64,
}

/// POST /refunds: refunds once per key; a zero amount is refused (400, stored like any 4xx).
async fn refund(State(app): State<Arc<App>>, Json(request): Json<RefundRequest>) -> Result<Response, Failed> {
    if request.amount_cents == 0 {
        return Ok((StatusCode::BAD_REQUEST, "a refund needs a positive amount").into_response());
    }
    app.ledger.record(&format!("refund {} {}", request.charge_id, request.amount_cents))?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "refunded_cents": request.amount_cents }))).into_response())
}

#[derive(Deserialize)]
struct SignupRequest {
    email: String,
    plan: String,
}

/// The steps of a signup, in order; the checkpoint after each is its name.
const SIGNUP_STEPS: [&str; 3] = ["email", "crm", "billing"];

/// POST /signups: welcome e-mail, then a CRM record, then a billing account, with a
/// checkpoint after each, so an attempt interrupted by a crash resumes after its last step.
async fn signup(
    State(app): State<Arc<App>>,
    Extension(claim): Extension<IdempotencyContext>,
    Json(request): Json<SignupRequest>,
) -> Result<(StatusCode, Json<serde_json::Value>), Failed> {
    let done = claim.last_checkpoint();
    let first_to_run = match done.as_deref() {
        None => 0,
        Some(last) => SIGNUP_STEPS.iter().position(|step| step.as_bytes() == last).map_or(0, |at| at + 1),
    };
    for step in &SIGNUP_STEPS[first_to_run..] {
        let line = match *step {
            "email" => format!("email {}", request.email),
            "crm" => format!("crm {}", request.email),
            _ => format!("billing {} {}", request.email, request.plan),
        };
        app.ledger.record(&line)?;
        claim.checkpoint(step.as_bytes()).await?;
        app.pause_if(step).await;
    }
    let body = serde_json::json!({
        "email": request.email,
        "plan": request.plan,
        "resumed_after": done.map(|last| String::from_utf8_lossy(&last).into_owned()),
    });
    Ok((StatusCode::CREATED, Json(body)))
}
