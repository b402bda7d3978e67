//! The schema, its migrations, and the SQL of every operation.
//!
//! Times are milliseconds since the epoch read from the database's clock
//! (`statement_timestamp()`), plus the store's test offset (`$1` of every statement that reads
//! the time; 0 outside tests), so replicas whose clocks disagree still agree on leases and
//! expiry.

use idemstore::{Durability, Error, Result};

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: i32 = 3;

/// Checks that `table` is a plain lower-case SQL identifier (it is spliced into SQL text, so
/// nothing else is accepted), at most 40 bytes so that the derived names (`<table>_fence`,
/// `<table>_migrations`, the function `<table>_claim`, ...) stay under PostgreSQL's 63-byte limit.
pub(crate) fn check_table_name(table: &str) -> Result<()> {
    let mut chars = table.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !first_ok || !rest_ok || table.len() > 40 {
        return Err(Error::InvalidArgument(
            "table name must be 1-40 characters of a-z, 0-9 and _, not starting with a digit",
        ));
    }
    Ok(())
}

/// The SQL of each migration, in order: migration `i` brings the schema to version `i + 1`.
/// A migration's text never changes once released (a database that applied it keeps what it
/// made): a later change is a new migration.
pub(crate) fn migrations(table: &str, durability: Durability) -> Vec<String> {
    let unlogged = if durability == Durability::None { "UNLOGGED " } else { "" };
    vec![
        format!(
            "CREATE SEQUENCE IF NOT EXISTS {table}_fence;
CREATE {unlogged}TABLE IF NOT EXISTS {table} (
    key bytea PRIMARY KEY,
    request_hash bytea NOT NULL,
    completed boolean NOT NULL,
    fence bigint NOT NULL,
    incarnation bigint NOT NULL,
    recovered boolean NOT NULL,
    orphan_takeover boolean NOT NULL DEFAULT false,
    watched boolean NOT NULL DEFAULT false,
    claimed_at_ms bigint NOT NULL,
    lease_ms bigint NOT NULL,
    lease_until_ms bigint NOT NULL,
    expires_at_ms bigint NOT NULL,
    completed_at_ms bigint,
    value bytea
) WITH (fillfactor = 80);
CREATE INDEX IF NOT EXISTS {table}_expires ON {table} (expires_at_ms);
CREATE TABLE IF NOT EXISTS {table}_identity (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    store_id bigint NOT NULL
);
INSERT INTO {table}_identity (store_id)
    VALUES ((random() * 9.2e18)::bigint) ON CONFLICT DO NOTHING;"
        ),
        claim_function(table),
        claim_batch_function(table),
    ]
}

/// Migration 2: the claim as a server-side function, `<table>_claim`, so that a claim is one
/// round trip whatever it finds, and a fresh key costs little more than a bare insert.
///
/// Its statements run one after another, each on a snapshot of its own (a volatile function in
/// READ COMMITTED), all with the time of the client's statement (`statement_timestamp()`):
///
/// 1. `INSERT .. ON CONFLICT (key) DO NOTHING RETURNING ..`: a key without a row is acquired
///    here. A row whose inserter has not committed yet is waited for; a conflict means that a
///    committed row exists, which every later statement's snapshot shows.
/// 2. On a conflict, a read of the key's row. A live row that is not open to a takeover
///    (completed, a live holder, another request) is the answer, and nothing more is written
///    (no row lock, no tuple): replays, `InProgress` and `Mismatch` are reads, apart from the
///    fencing number that step 1 drew. The sequence writes its WAL once every 32 numbers, and
///    such an answer commits with `synchronous_commit = off`: it has nothing to keep, and a
///    fencing number that a claim holds is made durable by that claim's own commit (WAL is
///    flushed in order), so no answer waits for a flush.
/// 3. Otherwise (expired, a lease that ended, an orphan, or no row any more) the full insert,
///    whose `ON CONFLICT .. DO UPDATE .. WHERE` decides again on the row's latest version under
///    its row lock: claims racing for a takeover are decided there. The one that loses (its
///    `WHERE` false, nothing returned) reads again at 2 with a new snapshot, which shows the
///    winner's row (the update waited for its commit).
///
/// It returns one `<table>_claim_result`: whether it acquired the key, the row's columns that
/// the client answers with, and the database's time; NULL after 20 tries, the key changing
/// under every one of them. A key acquired at step 1 returns only `acquired`, `fence` and
/// `now_ms`, the rest NULL: the row holds what the client sent (its request hash, the time
/// plus its lease and TTL), and the server sends no field it leaves NULL. The client calls the
/// function as a scalar (`SELECT <table>_claim(..)`) and decodes the composite value: a named
/// composite type and no `SETOF`/`OUT` parameters spare the server a tuple descriptor built and
/// a tuple store filled at every call.
///
/// $1 offset, $2 key, $3 request hash, $4 incarnation, $5 lease ms, $6 ttl ms, $7 whether
/// orphans are taken over at once. An in-flight row of another request hash is never taken
/// over; one of the same request is when its lease ended, or when its holder is an orphan: its
/// incarnation's session lock is free, so the try-lock (a transaction lock, let go at the
/// claim's commit) succeeds. Incarnation 0 (an imported claim) belongs to no process.
///
/// The table's name is written into the function's text (each table has its own function, so
/// the plans the server caches for it are of that table), the time is computed once (each
/// `date_part` costs a numeric conversion), and `FOUND` is read right after the statement it
/// reports on.
fn claim_function(t: &str) -> String {
    let one = OneKey { t, key: "p_key", hash: "p_hash", lease: "p_lease_ms", ttl: "p_ttl_ms" };
    let (insert, read, takeover) = (one.fresh_insert(4), one.read(8), one.takeover(8));
    format!(
        "DO $type$ BEGIN
    CREATE TYPE {t}_claim_result AS (acquired bool, fence int8, recovered bool, completed bool,
        request_hash bytea, claimed_at_ms int8, lease_until_ms int8, expires_at_ms int8,
        completed_at_ms int8, value bytea, orphan_takeover bool, now_ms int8);
EXCEPTION WHEN duplicate_object THEN NULL;
END $type$;
CREATE OR REPLACE FUNCTION {t}_claim(p_offset int8, p_key bytea, p_hash bytea, p_incarnation int8,
    p_lease_ms int8, p_ttl_ms int8, p_take_orphans bool)
RETURNS {t}_claim_result
LANGUAGE plpgsql VOLATILE AS $claim$
DECLARE
    v_now int8 := floor(date_part('epoch', statement_timestamp()) * 1000)::int8 + p_offset;
    v_fence int8;
    v_open bool;
    r {t}_claim_result;
BEGIN
{insert}
    IF FOUND THEN
        RETURN ROW(true, v_fence, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, v_now)::{t}_claim_result;
    END IF;
    FOR attempt IN 1..20 LOOP
{read}
        IF FOUND AND NOT v_open THEN
            SET LOCAL synchronous_commit = off;
            RETURN r;
        END IF;
{takeover}
        IF FOUND THEN
            RETURN r;
        END IF;
    END LOOP;
    RETURN NULL;
END
$claim$;"
    )
}

/// The statements that decide one key, which `<table>_claim` and `<table>_claim_batch` share
/// (written once, so the takeover rules cannot drift apart): `key`, `hash`, `lease` and `ttl`
/// name the PL/pgSQL values of the key, its request hash, its lease and its TTL in ms. Each
/// statement comes indented by `indent` spaces, as the function's text places it.
struct OneKey<'a> {
    t: &'a str,
    key: &'a str,
    hash: &'a str,
    lease: &'a str,
    ttl: &'a str,
}

impl OneKey<'_> {
    /// Acquires a key that has no row (`FOUND`, the fencing number in `v_fence`).
    fn fresh_insert(&self, indent: usize) -> String {
        let OneKey { t, key, hash, lease, ttl } = self;
        indented(
            indent,
            &format!(
                "INSERT INTO {t} AS e (key, request_hash, completed, fence, incarnation, recovered, watched,
                      claimed_at_ms, lease_ms, lease_until_ms, expires_at_ms)
VALUES ({key}, {hash}, false, nextval('{t}_fence'), p_incarnation, false, false,
        v_now, {lease}, v_now + {lease}, v_now + {ttl})
ON CONFLICT (key) DO NOTHING
RETURNING e.fence INTO v_fence;"
            ),
        )
    }

    /// Reads the key's row into `r`, and in `v_open` whether a takeover is due.
    fn read(&self, indent: usize) -> String {
        let OneKey { t, key, hash, .. } = self;
        indented(
            indent,
            &format!(
                "SELECT false, e.fence, e.recovered, e.completed, e.request_hash, e.claimed_at_ms, e.lease_until_ms,
       e.expires_at_ms, e.completed_at_ms, CASE WHEN e.completed THEN e.value END, false, v_now,
       e.expires_at_ms <= v_now
       OR (NOT e.completed AND e.request_hash = {hash}
           AND (e.lease_until_ms <= v_now
                OR (p_take_orphans AND (e.incarnation = 0
                    OR (e.incarnation <> p_incarnation AND pg_try_advisory_xact_lock(e.incarnation))))))
INTO r.acquired, r.fence, r.recovered, r.completed, r.request_hash, r.claimed_at_ms, r.lease_until_ms,
     r.expires_at_ms, r.completed_at_ms, r.value, r.orphan_takeover, r.now_ms, v_open
FROM {t} e WHERE e.key = {key};"
            ),
        )
    }

    /// Takes the key over (or inserts it, its row gone) when the takeover rules hold on the
    /// row's latest version, under its row lock (`FOUND`, the answer in `r`).
    fn takeover(&self, indent: usize) -> String {
        let OneKey { t, key, hash, lease, ttl } = self;
        indented(
            indent,
            &format!(
                "INSERT INTO {t} AS e (key, request_hash, completed, fence, incarnation, recovered, watched,
                      claimed_at_ms, lease_ms, lease_until_ms, expires_at_ms, completed_at_ms, value)
VALUES ({key}, {hash}, false, nextval('{t}_fence'), p_incarnation, false, false,
        v_now, {lease}, v_now + {lease}, v_now + {ttl}, NULL, NULL)
ON CONFLICT (key) DO UPDATE SET
    request_hash = excluded.request_hash,
    completed = false,
    fence = excluded.fence,
    incarnation = excluded.incarnation,
    recovered = e.expires_at_ms > excluded.claimed_at_ms,
    orphan_takeover = e.expires_at_ms > excluded.claimed_at_ms AND e.lease_until_ms > excluded.claimed_at_ms,
    watched = false,
    claimed_at_ms = excluded.claimed_at_ms,
    lease_ms = excluded.lease_ms,
    lease_until_ms = excluded.lease_until_ms,
    expires_at_ms = CASE WHEN e.expires_at_ms > excluded.claimed_at_ms
                         THEN GREATEST(e.expires_at_ms, excluded.expires_at_ms)
                         ELSE excluded.expires_at_ms END,
    completed_at_ms = NULL,
    value = CASE WHEN e.expires_at_ms > excluded.claimed_at_ms THEN e.value END
WHERE e.expires_at_ms <= excluded.claimed_at_ms
   OR (NOT e.completed AND e.request_hash = excluded.request_hash
       AND (e.lease_until_ms <= excluded.claimed_at_ms
            OR (p_take_orphans AND (e.incarnation = 0
                OR (e.incarnation <> p_incarnation AND pg_try_advisory_xact_lock(e.incarnation))))))
RETURNING true, e.fence, e.recovered, e.completed, e.request_hash, e.claimed_at_ms, e.lease_until_ms,
          e.expires_at_ms, e.completed_at_ms, e.value, e.orphan_takeover, v_now
INTO r;"
            ),
        )
    }
}

/// `text` with every line indented by `indent` spaces.
fn indented(indent: usize, text: &str) -> String {
    let pad = " ".repeat(indent);
    text.lines().map(|line| format!("{pad}{line}")).collect::<Vec<_>>().join("\n")
}

/// Migration 3: `<table>_claim_batch`, the claims of several callers in one call (one
/// statement, one transaction, one commit), each decided as `<table>_claim` decides it. A store
/// with more claims in flight than `PgOptions::claim_batches` sends the rest together: a
/// statement's fixed cost on the server (the protocol, the executor, the commit and its WAL
/// flush) is then paid once for several claims. `<table>_claim` stays for replicas of an older
/// build during a rolling upgrade.
///
/// The client sorts the keys: two batches that share keys lock them in the same order, so they
/// wait for each other and never deadlock. A call of several keys waits at most 100 ms for a
/// row lock (`lock_timeout`): past that it fails, rolled back, and the client sends each of its
/// claims alone, so that a key held elsewhere holds up no other claim for long. A key twice in one batch is decided twice in turn:
/// the second sees the first's row (the same transaction) and answers from it. When nothing in
/// the batch was written (replays, `InProgress`, `Mismatch`), it commits with
/// `synchronous_commit = off`, as `<table>_claim` does for such an answer; one write and the
/// whole batch's commit waits for the flush.
///
/// $1 offset, $2 keys, $3 request hashes, $4 incarnation, $5 leases ms, $6 ttls ms, $7 whether
/// orphans are taken over at once. It returns one `<table>_claim_result` per key in order, as
/// `<table>_claim` returns it (NULL for a key that changed under each of 20 tries).
fn claim_batch_function(t: &str) -> String {
    let one = OneKey { t, key: "v_key", hash: "v_hash", lease: "v_lease", ttl: "v_ttl" };
    let (insert, read, takeover) = (one.fresh_insert(8), one.read(12), one.takeover(12));
    format!(
        "CREATE OR REPLACE FUNCTION {t}_claim_batch(p_offset int8, p_keys bytea[], p_hashes bytea[],
    p_incarnation int8, p_leases_ms int8[], p_ttls_ms int8[], p_take_orphans bool)
RETURNS {t}_claim_result[]
LANGUAGE plpgsql VOLATILE AS $claim$
DECLARE
    v_now int8 := floor(date_part('epoch', statement_timestamp()) * 1000)::int8 + p_offset;
    v_fence int8;
    v_open bool;
    v_decided bool;
    v_wrote bool := false;
    v_key bytea;
    v_hash bytea;
    v_lease int8;
    v_ttl int8;
    r {t}_claim_result;
    v_answers {t}_claim_result[] := '{{}}';
BEGIN
    -- A key whose row another transaction holds must not hold the call's other claims for
    -- long: past this, the call fails and the client sends its claims one by one.
    IF coalesce(array_length(p_keys, 1), 0) > 1 THEN
        SET LOCAL lock_timeout = '100ms';
    END IF;
    <<keys>>
    FOR i IN 1..coalesce(array_length(p_keys, 1), 0) LOOP
        v_key := p_keys[i];
        v_hash := p_hashes[i];
        v_lease := p_leases_ms[i];
        v_ttl := p_ttls_ms[i];
{insert}
        IF FOUND THEN
            v_wrote := true;
            v_answers := v_answers || ROW(true, v_fence, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, v_now)::{t}_claim_result;
            CONTINUE keys;
        END IF;
        v_decided := false;
        FOR attempt IN 1..20 LOOP
{read}
            IF FOUND AND NOT v_open THEN
                v_decided := true;
                EXIT;
            END IF;
{takeover}
            IF FOUND THEN
                v_wrote := true;
                v_decided := true;
                EXIT;
            END IF;
        END LOOP;
        IF v_decided THEN
            v_answers := v_answers || r;
        ELSE
            v_answers := v_answers || NULL::{t}_claim_result;
        END IF;
    END LOOP;
    IF NOT v_wrote THEN
        SET LOCAL synchronous_commit = off;
    END IF;
    RETURN v_answers;
END
$claim$;"
    )
}

/// The migration bookkeeping table: one row per applied version.
pub(crate) fn migrations_table(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table}_migrations (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);"
    )
}

/// The whole schema as one script, for an operator who applies it by hand
/// (`PgOptions::manage_schema = false`): the same statements the store runs, with the
/// migration rows recorded. It is idempotent: run again on a schema of an older version, it
/// upgrades it.
pub fn schema_sql(table: &str, durability: Durability) -> Result<String> {
    schema_sql_up_to(table, durability, SCHEMA_VERSION)
}

/// Test seam: the script of the schema as it was at `version` (the migrations up to it), to
/// check that a database made by an older build is upgraded.
#[cfg(feature = "test-seams")]
pub fn schema_sql_at(table: &str, durability: Durability, version: i32) -> Result<String> {
    schema_sql_up_to(table, durability, version)
}

fn schema_sql_up_to(table: &str, durability: Durability, version: i32) -> Result<String> {
    check_table_name(table)?;
    let mut sql = String::from("BEGIN;\n");
    sql.push_str(&migrations_table(table));
    sql.push('\n');
    for (i, migration) in migrations(table, durability).iter().enumerate().take(usize::try_from(version).unwrap_or(0)) {
        sql.push_str(migration);
        sql.push_str(&format!(
            "\nINSERT INTO {table}_migrations (version) VALUES ({}) ON CONFLICT DO NOTHING;\n",
            i + 1
        ));
    }
    sql.push_str("COMMIT;\n");
    Ok(sql)
}

/// The database's time in ms since the epoch plus the test offset `$1`. `date_part` gives a
/// double (microsecond resolution for centuries to come), cheaper than `extract`'s numeric.
const NOW: &str = "(floor(date_part('epoch', statement_timestamp()) * 1000)::int8 + $1::int8)";

/// The statements of a store on `table`, formatted once at open.
pub(crate) struct Sql {
    pub claim: String,
    pub claim_batch: String,
    pub watch: String,
    pub complete: String,
    pub checkpoint: String,
    pub release: String,
    pub remove: String,
    pub get: String,
    pub orphans: String,
    pub export: String,
    pub import: String,
    pub reap: String,
    pub channel: String,
}

impl Sql {
    pub(crate) fn new(table: &str) -> Sql {
        let t = table;
        // An in-flight row is an orphan when its incarnation's session lock is free: nobody
        // holds it, so the try-lock (a transaction lock, let go at the statement's commit)
        // succeeds. Incarnation 0 (an imported claim) belongs to no process.
        let orphan =
            |inc: &str, me: &str| format!("({inc} = 0 OR ({inc} <> {me} AND pg_try_advisory_xact_lock({inc})))");
        // $1 offset, $2 key, $3 request hash, $4 incarnation, $5 lease ms, $6 ttl ms,
        // $7 whether orphans are taken over at once: the claim function of migration 2, for a
        // claim alone in its statement (it costs the server less than a batch of one).
        let claim = format!("SELECT {t}_claim($1::int8, $2::bytea, $3::bytea, $4::int8, $5::int8, $6::int8, $7::bool)");
        // The same with arrays of keys, request hashes, leases and ttls: the batch function of
        // migration 3.
        let claim_batch = format!(
            "SELECT {t}_claim_batch($1::int8, $2::bytea[], $3::bytea[], $4::int8, $5::int8[], $6::int8[], $7::bool)"
        );
        // $1 offset, $2 key, $3 fence: a waiter asks the holder's complete or release to notify.
        let watch = format!(
            "UPDATE {t} e SET watched = true
WHERE e.key = $2 AND e.fence = $3 AND NOT e.completed AND e.expires_at_ms > {NOW}"
        );
        // $1 offset, $2 key, $3 fence, $4 outcome, $5 the key's notification payload.
        let complete = format!(
            "WITH now AS (SELECT {NOW} AS ms),
u AS (
    UPDATE {t} e SET completed = true, completed_at_ms = now.ms, value = $4
    FROM now
    WHERE e.key = $2 AND e.fence = $3 AND NOT e.completed AND e.expires_at_ms > now.ms
    RETURNING e.watched, e.claimed_at_ms, e.expires_at_ms, e.completed_at_ms, e.request_hash
)
SELECT u.claimed_at_ms, u.expires_at_ms, u.completed_at_ms, u.request_hash, now.ms,
       CASE WHEN u.watched THEN (SELECT 1 FROM pg_notify('{t}_changed', $5::text)) END
FROM u, now"
        );
        // $1 offset, $2 key, $3 fence, $4 phase.
        let checkpoint = format!(
            "UPDATE {t} e SET value = $4, lease_until_ms = {NOW} + e.lease_ms
WHERE e.key = $2 AND e.fence = $3 AND NOT e.completed AND e.expires_at_ms > {NOW}
RETURNING e.lease_until_ms"
        );
        // $1 offset, $2 key, $3 fence, $4 payload.
        let release = format!(
            "WITH d AS (
    DELETE FROM {t} e
    WHERE e.key = $2 AND e.fence = $3 AND NOT e.completed AND e.expires_at_ms > {NOW}
    RETURNING e.watched
)
SELECT CASE WHEN d.watched THEN (SELECT 1 FROM pg_notify('{t}_changed', $4::text)) END FROM d"
        );
        // $1 key, $2 payload.
        let remove = format!(
            "WITH d AS (DELETE FROM {t} e WHERE e.key = $1 RETURNING e.watched)
SELECT CASE WHEN d.watched THEN (SELECT 1 FROM pg_notify('{t}_changed', $2::text)) END FROM d"
        );
        // $1 offset, $2 key, $3 incarnation.
        let get = format!(
            "SELECT e.completed, e.claimed_at_ms, e.lease_until_ms, e.expires_at_ms, e.completed_at_ms, e.value,
       (NOT e.completed AND {orphan_e}) AS orphaned, e.request_hash
FROM {t} e WHERE e.key = $2 AND e.expires_at_ms > {NOW}",
            orphan_e = orphan("e.incarnation", "$3"),
        );
        // $1 offset, $2 incarnation.
        let orphans = format!(
            "SELECT e.key, e.claimed_at_ms, e.lease_until_ms, e.value
FROM {t} e WHERE NOT e.completed AND e.expires_at_ms > {NOW} AND {orphan_e}
ORDER BY e.key",
            orphan_e = orphan("e.incarnation", "$2"),
        );
        // $1 offset, $2 incarnation.
        let export = format!(
            "SELECT e.key, e.request_hash, e.completed, e.claimed_at_ms, e.lease_until_ms, e.expires_at_ms,
       e.completed_at_ms, e.value, (NOT e.completed AND {orphan_e}) AS orphaned
FROM {t} e WHERE e.expires_at_ms > {NOW} ORDER BY e.key",
            orphan_e = orphan("e.incarnation", "$2"),
        );
        // $1 offset, $2 key, $3 hash, $4 completed, $5 claimed_at, $6 lease_ms, $7 lease_until,
        // $8 expires_at, $9 completed_at, $10 value. Incarnation 0: an orphan of every process.
        let import = format!(
            "WITH now AS (SELECT {NOW} AS ms)
INSERT INTO {t} AS e (key, request_hash, completed, fence, incarnation, recovered, watched,
                      claimed_at_ms, lease_ms, lease_until_ms, expires_at_ms, completed_at_ms, value)
SELECT $2::bytea, $3::bytea, $4::bool, nextval('{t}_fence'), 0, false, false, $5::int8, $6::int8, $7::int8,
       $8::int8, $9::int8, $10::bytea FROM now
WHERE $8::int8 > now.ms
ON CONFLICT (key) DO UPDATE SET
    request_hash = excluded.request_hash, completed = excluded.completed, fence = excluded.fence,
    incarnation = 0, recovered = false, watched = false, claimed_at_ms = excluded.claimed_at_ms,
    lease_ms = excluded.lease_ms, lease_until_ms = excluded.lease_until_ms,
    expires_at_ms = excluded.expires_at_ms, completed_at_ms = excluded.completed_at_ms,
    value = excluded.value
WHERE e.expires_at_ms <= (SELECT ms FROM now)
RETURNING 1"
        );
        // $1 offset, $2 batch size. SKIP LOCKED lets the replicas' reapers share the work.
        let reap = format!(
            "DELETE FROM {t} WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM {t} WHERE expires_at_ms <= {NOW} LIMIT $2 FOR UPDATE SKIP LOCKED))"
        );
        Sql {
            claim,
            claim_batch,
            watch,
            complete,
            checkpoint,
            release,
            remove,
            get,
            orphans,
            export,
            import,
            reap,
            channel: format!("{t}_changed"),
        }
    }
}
