//! An axum payments service behind the `Idempotency-Key` layer: charges, refunds, and a
//! signup flow (welcome e-mail, CRM record, billing account) with a checkpoint between steps.
//!
//! ```text
//! cargo run -p idemstore-http --example payments -- [--addr 127.0.0.1:3000] [--dir DIR]
//! curl -i -X POST localhost:3000/charges -H 'Idempotency-Key: "order-1"' \
//!      -H 'Content-Type: application/json' -d '{"customer":"c1","amount_cents":1200}'
//! ```
//!
//! Send the same request again: the answer is replayed (`Idempotent-Replayed: true`) and the
//! ledger (`DIR/ledger.txt`) holds one charge. Change the body with the same key: 422.

mod app;

use std::path::PathBuf;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut addr = String::from("127.0.0.1:3000");
    let mut dir = std::env::temp_dir().join("idemstore-payments-example");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--addr", Some(value)) => addr = value,
            ("--dir", Some(value)) => dir = PathBuf::from(value),
            _ => return Err(format!("usage: payments [--addr HOST:PORT] [--dir DIR] (got {arg})").into()),
        }
    }
    std::fs::create_dir_all(&dir)?;
    let config = app::Config { store_dir: dir.join("store"), ledger: dir.join("ledger.txt"), pause_after: None };
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!(
        "payments service on http://{} (store {}, ledger {})",
        listener.local_addr()?,
        config.store_dir.display(),
        config.ledger.display()
    );
    app::serve(listener, &config).await
}
