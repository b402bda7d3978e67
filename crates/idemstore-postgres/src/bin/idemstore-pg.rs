//! `idemstore-pg`: moves a dedupe window between an embedded store and PostgreSQL, and prints
//! the schema for an operator to apply.
//!
//! ```text
//! idemstore-pg import --from-store DIR --url URL [--table NAME]   embedded store -> PostgreSQL
//! idemstore-pg export --to-store DIR --url URL [--table NAME]     PostgreSQL -> embedded store
//! idemstore-pg schema [--table NAME] [--durability sync|periodic|none]
//! ```
//!
//! `import` reads the embedded store through a read-only view, so the store may be live (its
//! service keeps running; what it writes after the view opened is not carried). Each key keeps
//! its request hash, times, lease and last checkpoint or outcome; an in-flight claim arrives as
//! an orphan that the next claim of its key takes over at once with its checkpoint. A key that
//! is already live in the target is left as it is. `export` writes into a store directory that
//! no process has open.

use std::process::ExitCode;
use std::time::Duration;

use idemstore::{Durability, Options, Store};
use idemstore_postgres::{PgOptions, PgStore, schema_sql};

const USAGE: &str = "usage:
  idemstore-pg import --from-store DIR --url URL [--table NAME]   copy an embedded store's window into PostgreSQL
  idemstore-pg export --to-store DIR --url URL [--table NAME]     copy PostgreSQL's window into an embedded store
  idemstore-pg schema [--table NAME] [--durability sync|periodic|none]   print the schema's SQL";

struct Args {
    command: String,
    store: Option<String>,
    url: Option<String>,
    table: String,
    durability: Durability,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let command = args.next().ok_or("no command given")?;
    let mut parsed = Args { command, store: None, url: None, table: "idemstore".into(), durability: Durability::Sync };
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--from-store" | "--to-store" => parsed.store = Some(value()?),
            "--url" => parsed.url = Some(value()?),
            "--table" => parsed.table = value()?,
            "--durability" => {
                parsed.durability = match value()?.as_str() {
                    "sync" => Durability::Sync,
                    "periodic" => Durability::Periodic(Duration::from_secs(1)),
                    "none" => Durability::None,
                    other => return Err(format!("unknown durability {other:?}")),
                }
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(parsed)
}

fn run(args: Args) -> Result<String, String> {
    let pg_options = PgOptions { table: args.table.clone(), reap_interval: None, ..PgOptions::default() };
    match args.command.as_str() {
        "schema" => schema_sql(&args.table, args.durability).map_err(|e| e.to_string()),
        "import" => {
            let dir = args.store.ok_or("import needs --from-store DIR")?;
            let url = args.url.ok_or("import needs --url URL")?;
            Store::check_is_store(&dir).map_err(|e| e.to_string())?;
            let source = Store::open_read_only(&dir).map_err(|e| format!("opening {dir}: {e}"))?;
            let entries = source.export_entries().map_err(|e| format!("reading {dir}: {e}"))?;
            let target = PgStore::connect(&url, pg_options).map_err(|e| format!("connecting: {e}"))?;
            let mut written = 0;
            for entry in &entries {
                if target.import_entry(entry).map_err(|e| format!("importing: {e}"))? {
                    written += 1;
                }
            }
            target.close().map_err(|e| e.to_string())?;
            Ok(format!(
                "imported {written} of {} keys from {dir} into table {} ({} already live there or expired)",
                entries.len(),
                args.table,
                entries.len() - written
            ))
        }
        "export" => {
            let dir = args.store.ok_or("export needs --to-store DIR")?;
            let url = args.url.ok_or("export needs --url URL")?;
            let source = PgStore::connect(&url, pg_options).map_err(|e| format!("connecting: {e}"))?;
            let entries = source.export_entries().map_err(|e| format!("reading table {}: {e}", args.table))?;
            let target = Store::open(&dir, Options::default()).map_err(|e| format!("opening {dir}: {e}"))?;
            let mut written = 0;
            for entry in &entries {
                if target.import_entry(entry).map_err(|e| format!("importing: {e}"))? {
                    written += 1;
                }
            }
            target.close().map_err(|e| format!("closing {dir}: {e}"))?;
            source.close().map_err(|e| e.to_string())?;
            Ok(format!(
                "exported {written} of {} keys from table {} into {dir} ({} already live there or expired)",
                entries.len(),
                args.table,
                entries.len() - written
            ))
        }
        other => Err(format!("unknown command {other:?}")),
    }
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("idemstore-pg: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(message) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("idemstore-pg: {e}");
            ExitCode::FAILURE
        }
    }
}
