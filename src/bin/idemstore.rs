//! `idemstore`: the command line for on-call people. It inspects a store directory (`stats`,
//! `get`, `list`, `dump`, `verify`) through the read-only open, so it works on a live store that
//! another process is writing, and removes a key (`remove`) through the writer, which needs the
//! store's lock.
//!
//! Keys are given as text, or as `hex:` followed by hex digits for binary keys; keys are shown
//! the same way (text when it is printable UTF-8 and does not itself start with `hex:`).
//!
//! Every command first checks that the path holds a store (`Store::check_is_store`: `META`, a
//! segment or table file, or `LOCK` and `TIME`), so a typo'd path is an error, never an empty
//! answer.
//!
//! `--json` (on `get`, `list`, `stats`) prints one JSON object per line. A byte string `x`
//! (key, outcome, checkpoint) is `"x_hex"`, always, plus `"x"` as text when it is valid UTF-8;
//! a time `t` is `"t_ms"` (ms since the Unix epoch) and `"t"` (RFC 3339, UTC).
//!
//! Exit codes: 0 success; 1 a negative answer (`get` of an absent key, `verify` that found a
//! problem); 2 an error, reported as one line on stderr (`error: ...`) — clap's own usage
//! errors also exit with 2.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Parser, Subcommand, ValueEnum};
use idemstore::{Entry, Error, FileAccess, Options, Stats, Store, system_time_to_ms};
use serde_json::{Map, Value, json};

/// Inspect an idemstore directory (an embedded idempotency-key store), or remove a key from it.
#[derive(Parser, Debug)]
#[command(
    name = "idemstore",
    version,
    after_help = "Keys are text, or hex:<digits> for binary keys. Every command but `remove` opens the store \
                  read-only, so it works on a live store; every command refuses a path that holds no store.\n\
                  --json: one object per line; bytes as \"x_hex\" (always) and \"x\" (text, when UTF-8); \
                  times as \"t_ms\" and \"t\" (RFC 3339).\nExit codes: 0 success; 1 key absent (get) or a \
                  problem found (verify); 2 error."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Sizes, recovery figures and counters of the store (read-only view).
    ///
    /// The `*_total` counters of a read-only view count only since the view was opened, so they
    /// are zero here: a running service serves its own counters through `Stats::to_prometheus`.
    Stats {
        /// The store directory.
        dir: PathBuf,
        /// Print the Prometheus text exposition format instead of a table.
        #[arg(long, conflicts_with = "json")]
        prometheus: bool,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// The store is meant to be readable by its directory's group (opened with
        /// `FileAccess::OwnerAndGroupRead`): group read access is not reported.
        #[arg(long)]
        group_readable: bool,
    },
    /// The state of one key: absent, in flight, orphaned or completed, with its outcome and times.
    ///
    /// Exit code 1 when the key is absent (never claimed, released, removed or expired).
    Get {
        /// The store directory.
        dir: PathBuf,
        /// The key, as text or as `hex:<hex digits>`.
        key: String,
        /// The namespace the key belongs to (`Store::namespace`).
        #[arg(long)]
        namespace: Option<String>,
        /// Show the outcome and checkpoint in hex even when they are UTF-8 text.
        #[arg(long)]
        hex: bool,
        /// Show times as milliseconds since the Unix epoch instead of UTC dates.
        #[arg(long)]
        ms: bool,
        /// Print one JSON object (the state, and for a present key its outcome or checkpoint
        /// and times).
        #[arg(long)]
        json: bool,
    },
    /// Every live key, one per line: key, state, expiry (tab-separated).
    ///
    /// Keys stream out in the store's scan order (its index's hash order, the same on every
    /// run), holding little in memory however large the store; `--sorted` sorts by key, which
    /// holds every key in memory first.
    List {
        /// The store directory.
        dir: PathBuf,
        /// Only the keys of this namespace (`Store::namespace`), shown without its prefix.
        #[arg(long)]
        namespace: Option<String>,
        /// Sort by key (holds the whole list in memory).
        #[arg(long)]
        sorted: bool,
        /// Only keys starting with this prefix (text or `hex:<hex digits>`).
        #[arg(long)]
        prefix: Option<String>,
        /// Only keys in this state.
        #[arg(long, value_enum)]
        state: Option<StateFilter>,
        /// Show times as milliseconds since the Unix epoch instead of UTC dates.
        #[arg(long)]
        ms: bool,
        /// Print one JSON object per key (key, state, expiry).
        #[arg(long)]
        json: bool,
    },
    /// Every live key with its full entry (outcome, checkpoint, times), in scan order (see
    /// `list`), streamed.
    Dump {
        /// The store directory.
        dir: PathBuf,
        /// Only the keys of this namespace, shown without its prefix.
        #[arg(long)]
        namespace: Option<String>,
        /// Print a JSON array (times in ms; byte strings as text when UTF-8, always also as hex).
        #[arg(long)]
        json: bool,
        /// Show outcomes and checkpoints in hex even when they are UTF-8 text (text output).
        #[arg(long)]
        hex: bool,
        /// Show times as milliseconds since the Unix epoch instead of UTC dates (text output).
        #[arg(long)]
        ms: bool,
    },
    /// Check every checksum of every segment file; say what is torn or corrupt. Changes nothing.
    ///
    /// Also warns when the store directory's mode lets its group or other users read (or
    /// write) it. Exit code 0 when no file has a problem (a torn tail, an unfinished last write
    /// that the next open truncates, is reported but is not a problem; so is a mode warning,
    /// unless others can write the directory, which a writer's open refuses), 1 otherwise.
    Verify {
        /// The store directory.
        dir: PathBuf,
        /// The store is meant to be readable by its directory's group (opened with
        /// `FileAccess::OwnerAndGroupRead`): group read access is not reported.
        #[arg(long)]
        group_readable: bool,
    },
    /// Remove one key (a tombstone). Needs the writer's lock: fails while a process has the
    /// store open.
    Remove {
        /// The store directory.
        dir: PathBuf,
        /// The key, as text or as `hex:<hex digits>`.
        key: String,
        /// Files the removal creates are readable by the directory's group, as those of a store
        /// opened with `FileAccess::OwnerAndGroupRead` (by default they are the owner's only).
        #[arg(long)]
        group_readable: bool,
    },
    /// Make a damaged store open again: keep every record that checks out, move damaged files
    /// to DIR/quarantine/, and report exactly what was lost (keys where they can still be
    /// read, counts and byte ranges). Needs the writer's lock: stop the service first. The
    /// store never does this by itself (see docs/operations.md).
    Salvage {
        /// The store directory.
        dir: PathBuf,
        /// Report what would be done and lost; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// The states `list --state` selects.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum StateFilter {
    /// Claimed, not completed, holder alive.
    InFlight,
    /// Completed: the outcome is stored.
    Completed,
    /// Claimed by a process that is gone (the next claim takes it over).
    Orphaned,
}

/// A failure of the command: printed as one line, or nothing when the reader went away.
struct Failure {
    message: String,
    reader_gone: bool,
}

impl Failure {
    fn new(message: impl Into<String>) -> Failure {
        Failure { message: message.into(), reader_gone: false }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::new(e.to_string())
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure { reader_gone: e.kind() == io::ErrorKind::BrokenPipe, message: format!("writing output: {e}") }
    }
}

type CliResult = Result<ExitCode, Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut out = io::BufWriter::new(io::stdout().lock());
    let result = run(cli.command, &mut out).and_then(|code| out.flush().map(|()| code).map_err(Failure::from));
    match result {
        Ok(code) => code,
        // A reader that went away (`idemstore list DIR | head`) is not an error.
        Err(Failure { reader_gone: true, .. }) => ExitCode::SUCCESS,
        Err(Failure { message, .. }) => {
            let one_line = message.replace('\n', " ");
            eprintln!("error: {one_line}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command, out: &mut impl Write) -> CliResult {
    match command {
        Command::Stats { dir, prometheus, json, group_readable } => {
            let format = if json {
                StatsFormat::Json
            } else if prometheus {
                StatsFormat::Prometheus
            } else {
                StatsFormat::Table
            };
            stats(&dir, format, access(group_readable), out)
        }
        Command::Get { dir, key, namespace, hex, ms, json } => {
            get(&dir, &key, namespace.as_deref(), Show { hex, ms }, json, out)
        }
        Command::List { dir, namespace, sorted, prefix, state, ms, json } => {
            let filter = ListFilter { namespace: namespace.as_deref(), prefix: prefix.as_deref(), state, sorted };
            list(&dir, &filter, ms, json, out)
        }
        Command::Dump { dir, namespace, json, hex, ms } => {
            dump(&dir, namespace.as_deref(), json, Show { hex, ms }, out)
        }
        Command::Verify { dir, group_readable } => verify(&dir, access(group_readable), out),
        Command::Remove { dir, key, group_readable } => remove(&dir, &key, access(group_readable), out),
        Command::Salvage { dir, dry_run } => salvage(&dir, dry_run, out),
    }
}

/// How byte strings and times are shown.
#[derive(Clone, Copy)]
struct Show {
    hex: bool,
    ms: bool,
}

fn open_view(dir: &Path) -> Result<Store, Failure> {
    require_store_dir(dir)?;
    Ok(Store::open_read_only(dir)?)
}

/// Who the store is meant to be readable by, as `--group-readable` says.
fn access(group_readable: bool) -> FileAccess {
    if group_readable { FileAccess::OwnerAndGroupRead } else { FileAccess::Owner }
}

/// The warnings, one line each, in the same words for `stats` and `verify`.
fn write_warnings(warnings: &[String], out: &mut impl Write) -> io::Result<()> {
    for warning in warnings {
        writeln!(out, "warning: {warning}")?;
    }
    Ok(())
}

/// Refuses a path that holds no store (missing, a file, an empty directory or one of other
/// files), so that a typo is an error and not an empty answer. One rule for every command,
/// the same as the writer's `open`.
fn require_store_dir(dir: &Path) -> Result<(), Failure> {
    Ok(Store::check_is_store(dir)?)
}

/// How `stats` prints.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StatsFormat {
    Table,
    Prometheus,
    Json,
}

fn stats(dir: &Path, format: StatsFormat, access: FileAccess, out: &mut impl Write) -> CliResult {
    require_store_dir(dir)?;
    let store = Store::open_read_only_with(dir, Options { file_access: access, ..Options::default() })?;
    let stats = store.stats();
    match format {
        StatsFormat::Prometheus => {
            out.write_all(stats.to_prometheus().as_bytes())?;
            return Ok(ExitCode::SUCCESS);
        }
        StatsFormat::Json => {
            writeln!(out, "{}", stats_json(dir, &stats))?;
            return Ok(ExitCode::SUCCESS);
        }
        StatsFormat::Table => {}
    }
    let r = &stats.recovery;
    let rows: [(&str, String); 25] = [
        ("store", dir.display().to_string()),
        ("index_entries", stats.index_entries.to_string()),
        ("sealed_tables", stats.sealed_tables.to_string()),
        ("sealed_entries", stats.sealed_entries.to_string()),
        ("sealed_filter_bytes", stats.sealed_filter_bytes.to_string()),
        ("segments", stats.segments.to_string()),
        ("disk_bytes", stats.disk_bytes.to_string()),
        ("last_seq", stats.last_seq.to_string()),
        ("recovery_duration_us", r.duration_us.to_string()),
        ("recovery_records", r.records.to_string()),
        ("recovery_segments", r.segments.to_string()),
        ("recovery_torn_tails", r.torn_tails.to_string()),
        ("recovery_torn_bytes", r.torn_bytes_truncated.to_string()),
        ("recovery_tables_loaded", r.tables_loaded.to_string()),
        ("recovery_tables_rebuilt", r.tables_rebuilt.to_string()),
        // Why segments were scanned rather than mapped: each reason, then the scan's cost.
        ("recovery_scanned_no_table", r.segments_scanned_no_table.to_string()),
        ("recovery_scanned_unsealed", r.segments_scanned_unsealed_tail.to_string()),
        ("recovery_scanned_damaged", r.tables_rebuilt.to_string()),
        ("recovery_scanned_bytes", r.bytes_scanned.to_string()),
        ("recovery_scan_us", r.scan_us.to_string()),
        ("claims_acquired_total", stats.claims_acquired_total.to_string()),
        ("duplicates_blocked_total", stats.duplicates_blocked_total().to_string()),
        ("mismatches_total", stats.mismatches_total.to_string()),
        ("completes_total", stats.completes_total.to_string()),
        ("poisoned", stats.poisoned.clone().unwrap_or_else(|| "no".into())),
    ];
    for (name, value) in rows {
        writeln!(out, "{name:<26}{value}")?;
    }
    write_warnings(&stats.warnings, out)?;
    writeln!(out, "(a read-only view: *_total counters count since this view opened; a service serves its own)")?;
    Ok(ExitCode::SUCCESS)
}

fn get(dir: &Path, key_arg: &str, namespace: Option<&str>, show: Show, json: bool, out: &mut impl Write) -> CliResult {
    let key = parse_key(key_arg)?;
    let stored_key = match namespace {
        Some(name) => idemstore::namespaced_key(name, &key)?,
        None => key.clone(),
    };
    let store = open_view(dir)?;
    let entry = store.get(&stored_key)?;
    if json {
        let mut obj = Map::new();
        bytes_fields(&mut obj, "key", &key);
        match &entry {
            Some(entry) => entry_fields(&mut obj, entry),
            None => {
                obj.insert("state".into(), "absent".into());
            }
        }
        writeln!(out, "{}", Value::Object(obj))?;
        return Ok(if entry.is_some() { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    let Some(entry) = entry else {
        writeln!(out, "key         {}", display_key(&key))?;
        writeln!(out, "state       absent")?;
        return Ok(ExitCode::from(1));
    };
    writeln!(out, "key         {}", display_key(&key))?;
    writeln!(out, "state       {}", state_name(&entry))?;
    match &entry {
        Entry::Completed(done) => {
            writeln!(out, "outcome     {}", display_bytes(&done.outcome, show.hex))?;
            writeln!(out, "claimed_at  {}", display_time(done.claimed_at, show.ms))?;
            writeln!(out, "completed_at {}", display_time(done.completed_at, show.ms))?;
            writeln!(out, "expires_at  {}", display_time(done.expires_at, show.ms))?;
            if let Some(history) = store.history(&stored_key)? {
                writeln!(out, "replays     {} (as the writer last saved them)", history.replays_served)?;
            }
        }
        Entry::InFlight { claimed_at, lease_expires_at, expires_at, checkpoint, .. } => {
            let checkpoint = checkpoint.as_deref().map_or_else(|| "(none)".to_string(), |c| display_bytes(c, show.hex));
            writeln!(out, "checkpoint  {checkpoint}")?;
            writeln!(out, "claimed_at  {}", display_time(*claimed_at, show.ms))?;
            writeln!(out, "lease_until {}", display_time(*lease_expires_at, show.ms))?;
            writeln!(out, "expires_at  {}", display_time(*expires_at, show.ms))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `list` shows: a namespace's keys, a prefix, a state, and in what order.
struct ListFilter<'a> {
    namespace: Option<&'a str>,
    prefix: Option<&'a str>,
    state: Option<StateFilter>,
    sorted: bool,
}

/// The scan prefix of a namespace's keys (empty without one), and how many bytes of each key
/// it is (stripped when shown).
fn namespace_prefix(namespace: Option<&str>) -> Result<Vec<u8>, Failure> {
    Ok(match namespace {
        Some(name) => idemstore::namespaced_key(name, b"")?,
        None => Vec::new(),
    })
}

/// Every live key of the namespace beginning with `prefix`, streamed in scan order.
fn scan_keys<'a>(
    store: &'a Store,
    namespace: Option<&str>,
    prefix: &[u8],
) -> Result<impl Iterator<Item = idemstore::Result<(Vec<u8>, Entry)>> + 'a, Failure> {
    let mut full = namespace_prefix(namespace)?;
    let strip = full.len();
    full.extend_from_slice(prefix);
    Ok(store.scan(full).map(move |item| item.map(|(key, entry)| (key[strip..].to_vec(), entry))))
}

fn list(dir: &Path, filter: &ListFilter<'_>, ms: bool, json: bool, out: &mut impl Write) -> CliResult {
    let prefix = filter.prefix.map(parse_prefix).transpose()?.unwrap_or_default();
    let store = open_view(dir)?;
    let mut show = |key: &[u8], entry: &Entry| -> CliResult {
        if filter.state.is_some_and(|wanted| state_of(entry) != wanted) {
            return Ok(ExitCode::SUCCESS);
        }
        if json {
            let mut obj = Map::new();
            bytes_fields(&mut obj, "key", key);
            obj.insert("state".into(), state_name(entry).into());
            time_fields(&mut obj, "expires_at", expires_at(entry));
            writeln!(out, "{}", Value::Object(obj))?;
        } else {
            writeln!(out, "{}\t{}\t{}", display_key(key), state_name(entry), display_time(expires_at(entry), ms))?;
        }
        Ok(ExitCode::SUCCESS)
    };
    let keys = scan_keys(&store, filter.namespace, &prefix)?;
    if filter.sorted {
        let mut all = keys.collect::<idemstore::Result<Vec<_>>>()?;
        all.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, entry) in &all {
            show(key, entry)?;
        }
    } else {
        for item in keys {
            let (key, entry) = item?;
            show(&key, &entry)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn dump(dir: &Path, namespace: Option<&str>, json: bool, show: Show, out: &mut impl Write) -> CliResult {
    let store = open_view(dir)?;
    let mut count = 0u64;
    if json {
        writeln!(out, "[")?;
        for item in scan_keys(&store, namespace, b"")? {
            let (key, entry) = item?;
            let comma = if count == 0 { "" } else { "," };
            // The separator goes before each entry after the first: the stream's last entry is
            // not known until it has been written.
            write!(out, "{comma}\n{}", json_entry(&key, &entry))?;
            count += 1;
        }
        writeln!(out, "{}]", if count == 0 { "" } else { "\n" })?;
        return Ok(ExitCode::SUCCESS);
    }
    for item in scan_keys(&store, namespace, b"")? {
        let (key, entry) = item?;
        let mut line = format!("{} {}", display_key(&key), state_name(&entry));
        match &entry {
            Entry::Completed(done) => {
                let _ = write!(
                    line,
                    " claimed_at={} completed_at={} expires_at={} outcome={}",
                    display_time(done.claimed_at, show.ms),
                    display_time(done.completed_at, show.ms),
                    display_time(done.expires_at, show.ms),
                    display_bytes(&done.outcome, show.hex)
                );
            }
            Entry::InFlight { claimed_at, lease_expires_at, expires_at, checkpoint, .. } => {
                let _ = write!(
                    line,
                    " claimed_at={} lease_until={} expires_at={}",
                    display_time(*claimed_at, show.ms),
                    display_time(*lease_expires_at, show.ms),
                    display_time(*expires_at, show.ms)
                );
                if let Some(checkpoint) = checkpoint {
                    let _ = write!(line, " checkpoint={}", display_bytes(checkpoint, show.hex));
                }
            }
        }
        writeln!(out, "{line}")?;
        count += 1;
    }
    writeln!(out, "{count} live keys")?;
    Ok(ExitCode::SUCCESS)
}

fn verify(dir: &Path, access: FileAccess, out: &mut impl Write) -> CliResult {
    require_store_dir(dir)?;
    // Before the checksums: a directory others can read is worth knowing even when a damaged
    // file makes the check below fail.
    let warnings = Store::permission_warnings(dir, access);
    write_warnings(&warnings, out)?;
    let others_can_write = std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o002 != 0);
    let report = Store::verify(dir)?;
    let mut records = 0u64;
    let mut torn = 0usize;
    let mut bad = 0usize;
    let name_of =
        |path: &Path| path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into());
    for file in &report.files {
        let name = name_of(&file.path);
        records += file.records;
        match &file.problem {
            Some((offset, reason)) => {
                bad += 1;
                writeln!(
                    out,
                    "{name}: CORRUPT at offset {offset}: {reason} ({} valid records before it)",
                    file.records
                )?;
            }
            None if file.torn_bytes > 0 => {
                torn += 1;
                writeln!(
                    out,
                    "{name}: ok, {} records; torn tail of {} bytes (an unfinished write, dropped at the next open)",
                    file.records, file.torn_bytes
                )?;
            }
            None => writeln!(out, "{name}: ok, {} records", file.records)?,
        }
        if let Some(remedy) = &file.remedy {
            writeln!(out, "  remedy: {remedy}")?;
        }
    }
    // Tables, META, TIME, LOCK, MARKS: one line each, with what to do when damaged.
    for file in &report.other_files {
        let name = name_of(&file.path);
        match &file.problem {
            Some((offset, reason)) => {
                bad += 1;
                writeln!(out, "{name}: DAMAGED at offset {offset}: {reason}")?;
            }
            None => match &file.note {
                Some(note) => writeln!(out, "{name}: ok ({note})")?,
                None => writeln!(out, "{name}: ok")?,
            },
        }
        if let Some(remedy) = &file.remedy {
            writeln!(out, "  remedy: {remedy}")?;
        }
    }
    let verdict = if report.is_clean() { "clean" } else { "NOT clean" };
    writeln!(
        out,
        "{verdict}: {} files, {records} records, {torn} torn tails, {bad} files with problems ({} other files checked)",
        report.files.len(),
        report.other_files.len()
    )?;
    if others_can_write {
        // The data may be intact, but a writer's open refuses this directory: a problem.
        writeln!(out, "UNSAFE: other users can write {}; a writer's open refuses it", dir.display())?;
    }
    Ok(if report.is_clean() && !others_can_write { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn salvage(dir: &Path, dry_run: bool, out: &mut impl Write) -> CliResult {
    require_store_dir(dir)?;
    let report = match idemstore::salvage(dir, &idemstore::SalvageOptions { dry_run }) {
        Err(Error::Locked { .. }) => {
            return Err(Failure::new(format!(
                "cannot salvage: store {} is open in another process; stop it first",
                dir.display()
            )));
        }
        other => other?,
    };
    let would = if dry_run { "would be " } else { "" };
    if report.files.is_empty() {
        writeln!(out, "nothing to salvage: every file checks out")?;
        return Ok(ExitCode::SUCCESS);
    }
    for file in &report.files {
        let name =
            file.path.file_name().map_or_else(|| file.path.display().to_string(), |n| n.to_string_lossy().into());
        writeln!(out, "{name}: {would}{}", file.action)?;
        if let Some(moved) = &file.quarantined {
            writeln!(out, "  original {would}moved to {}", moved.display())?;
        }
        if file.kind == idemstore::FileKind::Segment {
            writeln!(out, "  records kept: {}, records lost: {}", file.records_kept, file.records_lost)?;
            for (start, end) in &file.lost_ranges {
                writeln!(out, "  lost bytes {start}..{end} ({} bytes)", end - start)?;
            }
            for lost in &file.lost_records {
                writeln!(
                    out,
                    "  lost record at offset {}: {} of key {} (seq {}; key bytes unverified)",
                    lost.offset,
                    lost.kind,
                    display_key(&lost.key),
                    lost.seq
                )?;
            }
        }
    }
    writeln!(out, "{}{} records lost in all", if dry_run { "dry run: " } else { "" }, report.records_lost())?;
    Ok(ExitCode::SUCCESS)
}

fn remove(dir: &Path, key_arg: &str, access: FileAccess, out: &mut impl Write) -> CliResult {
    let key = parse_key(key_arg)?;
    require_store_dir(dir)?;
    // Never a new store: a path that holds none was refused above, and `open` refuses it too.
    let options = Options { background: false, file_access: access, create_if_missing: false, ..Options::default() };
    let store = match Store::open(dir, options) {
        Ok(store) => store,
        Err(Error::Locked { .. }) => {
            return Err(Failure::new(format!(
                "cannot remove: store {} is open in another process, which holds its writer lock; \
                 remove the key through that process or stop it first",
                dir.display()
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let before = store.get(&key)?;
    store.remove(&key)?;
    store.close()?;
    match before {
        Some(entry) => writeln!(out, "removed {} (it was {})", display_key(&key), state_name(&entry))?,
        None => writeln!(out, "{} was absent; nothing to remove", display_key(&key))?,
    }
    Ok(ExitCode::SUCCESS)
}

fn state_of(entry: &Entry) -> StateFilter {
    match entry {
        Entry::Completed(_) => StateFilter::Completed,
        Entry::InFlight { orphaned: true, .. } => StateFilter::Orphaned,
        Entry::InFlight { orphaned: false, .. } => StateFilter::InFlight,
    }
}

fn state_name(entry: &Entry) -> &'static str {
    match state_of(entry) {
        StateFilter::InFlight => "in-flight",
        StateFilter::Completed => "completed",
        StateFilter::Orphaned => "orphaned",
    }
}

fn expires_at(entry: &Entry) -> SystemTime {
    match entry {
        Entry::Completed(done) => done.expires_at,
        Entry::InFlight { expires_at, .. } => *expires_at,
    }
}

/// A key from the command line: `hex:<digits>` or the text's bytes.
fn parse_key(arg: &str) -> Result<Vec<u8>, Failure> {
    let key = parse_prefix(arg)?;
    if key.is_empty() {
        return Err(Failure::new("the key is empty"));
    }
    Ok(key)
}

fn parse_prefix(arg: &str) -> Result<Vec<u8>, Failure> {
    match arg.strip_prefix("hex:") {
        Some(digits) => hex::decode(digits).map_err(|_| {
            Failure::new(format!("{arg:?} is not valid hex: give an even number of digits 0-9, a-f after `hex:`"))
        }),
        None => Ok(arg.as_bytes().to_vec()),
    }
}

/// A key as the command line takes it back: text when printable and unambiguous, else `hex:`.
fn display_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) if !text.starts_with("hex:") && !text.chars().any(char::is_control) => text.to_string(),
        _ => format!("hex:{}", hex::encode(key)),
    }
}

/// An outcome or checkpoint: text (quoted, escaped) when UTF-8, else `hex:...`.
fn display_bytes(bytes: &[u8], force_hex: bool) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) if !force_hex => format!("{text:?}"),
        _ => format!("hex:{}", hex::encode(bytes)),
    }
}

/// A time as UTC `YYYY-MM-DDTHH:MM:SS.mmmZ`, or as milliseconds since the epoch.
fn display_time(t: SystemTime, ms: bool) -> String {
    if ms { system_time_to_ms(t).to_string() } else { rfc3339_utc(t) }
}

/// RFC 3339, UTC, with milliseconds (`2023-11-14T22:13:20.000Z`). A time RFC 3339 cannot write
/// (past the year 9999: only a damaged record can hold one) is shown as its milliseconds since
/// the epoch instead of failing the command.
fn rfc3339_utc(t: SystemTime) -> String {
    let mut text = String::new();
    match write!(text, "{}", humantime::format_rfc3339_millis(t)) {
        Ok(()) => text,
        Err(_) => system_time_to_ms(t).to_string(),
    }
}

/// Sets `"<name>_hex"`, and `"<name>"` when the bytes are UTF-8 text (JSON strings hold text
/// only; hex is always there so a consumer has one field that never goes missing).
fn bytes_fields(obj: &mut Map<String, Value>, name: &str, bytes: &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        obj.insert(name.into(), text.into());
    }
    obj.insert(format!("{name}_hex"), hex::encode(bytes).into());
}

/// Sets `"<name>_ms"` (ms since the Unix epoch) and `"<name>"` (RFC 3339, UTC).
fn time_fields(obj: &mut Map<String, Value>, name: &str, t: SystemTime) {
    obj.insert(format!("{name}_ms"), system_time_to_ms(t).into());
    obj.insert(name.into(), rfc3339_utc(t).into());
}

/// A present key's state, outcome or checkpoint, and times.
fn entry_fields(obj: &mut Map<String, Value>, entry: &Entry) {
    obj.insert("state".into(), state_name(entry).into());
    match entry {
        Entry::Completed(done) => {
            bytes_fields(obj, "outcome", &done.outcome);
            time_fields(obj, "claimed_at", done.claimed_at);
            time_fields(obj, "completed_at", done.completed_at);
            time_fields(obj, "expires_at", done.expires_at);
        }
        Entry::InFlight { claimed_at, lease_expires_at, expires_at, checkpoint, orphaned } => {
            match checkpoint {
                Some(checkpoint) => bytes_fields(obj, "checkpoint", checkpoint),
                None => {
                    obj.insert("checkpoint".into(), Value::Null);
                }
            }
            obj.insert("orphaned".into(), (*orphaned).into());
            time_fields(obj, "claimed_at", *claimed_at);
            time_fields(obj, "lease_until", *lease_expires_at);
            time_fields(obj, "expires_at", *expires_at);
        }
    }
}

/// `stats` as one JSON object: the figures under their `Stats` names, `read_only` (always
/// true here: the counters are this view's, not the writer's) and the store's path.
fn stats_json(dir: &Path, stats: &Stats) -> Value {
    let r = &stats.recovery;
    json!({
        "store": dir.display().to_string(),
        "read_only": stats.read_only,
        "index_entries": stats.index_entries,
        "sealed_tables": stats.sealed_tables,
        "sealed_entries": stats.sealed_entries,
        "sealed_filter_bytes": stats.sealed_filter_bytes,
        "segments": stats.segments,
        "disk_bytes": stats.disk_bytes,
        "live_bytes": stats.live_bytes,
        "dead_bytes": stats.dead_bytes,
        "last_seq": stats.last_seq,
        "recovery": {
            "duration_us": r.duration_us,
            "records": r.records,
            "segments": r.segments,
            "torn_tails": r.torn_tails,
            "torn_bytes_truncated": r.torn_bytes_truncated,
            "tables_loaded": r.tables_loaded,
            "tables_rebuilt": r.tables_rebuilt,
            "segments_scanned_no_table": r.segments_scanned_no_table,
            "segments_scanned_unsealed_tail": r.segments_scanned_unsealed_tail,
            "bytes_scanned": r.bytes_scanned,
            "scan_us": r.scan_us,
        },
        "claims_acquired_total": stats.claims_acquired_total,
        "duplicates_blocked_total": stats.duplicates_blocked_total(),
        "mismatches_total": stats.mismatches_total,
        "completes_total": stats.completes_total,
        "warnings": stats.warnings,
        "poisoned": stats.poisoned,
    })
}

/// One key's entry as a JSON object for `dump --json`: byte strings as `"<name>_hex"` always
/// and as `"<name>"` text when they are UTF-8, times in ms only.
fn json_entry(key: &[u8], entry: &Entry) -> String {
    let mut obj = Map::new();
    bytes_fields(&mut obj, "key", key);
    obj.insert("state".into(), state_name(entry).into());
    match entry {
        Entry::Completed(done) => {
            obj.insert("claimed_at_ms".into(), system_time_to_ms(done.claimed_at).into());
            obj.insert("completed_at_ms".into(), system_time_to_ms(done.completed_at).into());
            obj.insert("expires_at_ms".into(), system_time_to_ms(done.expires_at).into());
            bytes_fields(&mut obj, "outcome", &done.outcome);
        }
        Entry::InFlight { claimed_at, lease_expires_at, expires_at, checkpoint, orphaned } => {
            obj.insert("claimed_at_ms".into(), system_time_to_ms(*claimed_at).into());
            obj.insert("lease_until_ms".into(), system_time_to_ms(*lease_expires_at).into());
            obj.insert("expires_at_ms".into(), system_time_to_ms(*expires_at).into());
            obj.insert("orphaned".into(), (*orphaned).into());
            match checkpoint {
                Some(checkpoint) => bytes_fields(&mut obj, "checkpoint", checkpoint),
                None => {
                    obj.insert("checkpoint".into(), Value::Null);
                }
            }
        }
    }
    Value::Object(obj).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_civil_dates() {
        let at = idemstore::ms_to_system_time;
        assert_eq!(rfc3339_utc(at(0)), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (a leap day) 12:34:56.789 UTC.
        assert_eq!(rfc3339_utc(at(951_827_696_789)), "2000-02-29T12:34:56.789Z");
        assert_eq!(rfc3339_utc(at(1_700_000_000_000)), "2023-11-14T22:13:20.000Z");
        // Past the year 9999 (a damaged record): milliseconds, not a failed command.
        assert_eq!(rfc3339_utc(at(253_402_300_800_000)), "253402300800000");
    }

    #[test]
    fn hex_keys_round_trip_and_bad_hex_is_refused() {
        assert_eq!(parse_key("hex:00ff10").ok(), Some(vec![0, 255, 16]));
        assert_eq!(parse_key("hex:ABcd").ok(), Some(vec![0xab, 0xcd]));
        assert!(parse_key("hex:abc").is_err());
        assert!(parse_key("hex:zz").is_err());
        assert!(parse_key("").is_err());
        assert_eq!(display_key(&[0, 255]), "hex:00ff");
        assert_eq!(display_key(b"hex:ab"), "hex:6865783a6162");
        assert_eq!(parse_key(&display_key(b"hex:ab")).ok(), Some(b"hex:ab".to_vec()));
        assert_eq!(display_key(b"order-42"), "order-42");
    }

    #[test]
    fn json_strings_escape_quotes_backslashes_and_controls() {
        let entry = Entry::InFlight {
            claimed_at: SystemTime::UNIX_EPOCH,
            lease_expires_at: SystemTime::UNIX_EPOCH,
            expires_at: SystemTime::UNIX_EPOCH,
            checkpoint: None,
            orphaned: false,
        };
        let line = json_entry("a\"b\\c\nd\u{1}é".as_bytes(), &entry);
        assert!(line.contains(r#""key":"a\"b\\c\nd\u0001é""#), "{line}");
        let parsed: Value = serde_json::from_str(&line).expect("valid JSON");
        assert_eq!(parsed["key"], "a\"b\\c\nd\u{1}é");
    }
}
