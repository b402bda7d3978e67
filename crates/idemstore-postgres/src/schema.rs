//! The schema, its migrations, and the SQL of every operation.
//!
//! Times are milliseconds since the epoch read from the database's clock
//! (`statement_timestamp()`), plus the store's test offset (`$1` of every statement that reads
//! the time; 0 outside tests), so replicas whose clocks disagree still agree on leases and
//! expiry.

use idemstore::{Durability, Error, Result};

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: i32 = 1;

/// Checks that `table` is a plain lower-case SQL identifier (it is spliced into SQL text, so
/// nothing else is accepted), at most 40 bytes so that the derived names (`<table>_fence`,
/// `<table>_migrations`, ...) stay under PostgreSQL's 63-byte limit.
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
pub(crate) fn migrations(table: &str, durability: Durability) -> Vec<String> {
    let unlogged = if durability == Durability::None { "UNLOGGED " } else { "" };
    vec![format!(
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
    )]
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
/// migration rows recorded.
pub fn schema_sql(table: &str, durability: Durability) -> Result<String> {
    check_table_name(table)?;
    let mut sql = String::from("BEGIN;\n");
    sql.push_str(&migrations_table(table));
    sql.push('\n');
    for (i, migration) in migrations(table, durability).iter().enumerate() {
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
    pub claim_fresh: String,
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
        // $7 whether orphans are taken over at once.
        // The INSERT runs only when the key is absent, expired or open to a takeover as the
        // statement's snapshot shows it (`cur`): a replay, an `InProgress` or a `Mismatch`
        // answer is then a plain read, with no row lock, no transaction id and no WAL flush at
        // commit. When it runs, `ON CONFLICT .. WHERE` decides again on the latest version of
        // the row, so a claim racing with another is still decided by the row lock.
        let takeover = |row: &str| {
            format!(
                "(NOT {row}.completed AND {row}.request_hash = $3::bytea AND ({row}.lease_until_ms <= now.ms \
                 OR ($7::bool AND {orphan})))",
                orphan = orphan(&format!("{row}.incarnation"), "$4::int8"),
            )
        };
        let claim = format!(
            "WITH now AS (SELECT {NOW} AS ms),
cur AS (
    SELECT e.fence, e.recovered, e.completed, e.request_hash, e.claimed_at_ms, e.lease_until_ms, e.expires_at_ms,
           e.completed_at_ms, CASE WHEN e.completed THEN e.value END AS value, e.incarnation
    FROM {t} e WHERE e.key = $2::bytea
),
up AS (
    INSERT INTO {t} AS e (key, request_hash, completed, fence, incarnation, recovered, watched,
                          claimed_at_ms, lease_ms, lease_until_ms, expires_at_ms, completed_at_ms, value)
    SELECT $2::bytea, $3::bytea, false, nextval('{t}_fence'), $4::int8, false, false,
           now.ms, $5::int8, now.ms + $5::int8, now.ms + $6::int8, NULL, NULL FROM now
    WHERE NOT EXISTS (SELECT 1 FROM cur WHERE cur.expires_at_ms > now.ms AND NOT {takeover_cur})
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
           AND (e.lease_until_ms <= excluded.claimed_at_ms OR ($7::bool AND {orphan_e})))
    RETURNING e.fence, e.recovered, e.completed, e.request_hash, e.claimed_at_ms, e.lease_until_ms,
              e.expires_at_ms, e.completed_at_ms, e.value, e.incarnation, e.orphan_takeover
)
SELECT true AS acquired, up.*, now.ms AS now_ms FROM up, now
UNION ALL
SELECT false, cur.fence, cur.recovered, cur.completed, cur.request_hash, cur.claimed_at_ms, cur.lease_until_ms,
       cur.expires_at_ms, cur.completed_at_ms, cur.value, cur.incarnation, false,
       now.ms
FROM cur, now WHERE NOT EXISTS (SELECT 1 FROM up)",
            orphan_e = orphan("e.incarnation", "$4::int8"),
            takeover_cur = takeover("cur"),
        );
        // The fast path of `PgOptions::fresh_key_fast_path`: the cheapest claim PostgreSQL has,
        // for a key that has no row; a conflict inserts nothing and falls back to `claim`.
        // $1 offset, $2 key, $3 request hash, $4 incarnation, $5 lease ms, $6 ttl ms.
        let claim_fresh = format!(
            "INSERT INTO {t} AS e (key, request_hash, completed, fence, incarnation, recovered, watched,
                      claimed_at_ms, lease_ms, lease_until_ms, expires_at_ms)
VALUES ($2::bytea, $3::bytea, false, nextval('{t}_fence'), $4::int8, false, false,
        {NOW}, $5::int8, {NOW} + $5::int8, {NOW} + $6::int8)
ON CONFLICT (key) DO NOTHING
RETURNING e.fence, e.claimed_at_ms, e.lease_until_ms, e.expires_at_ms"
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
            claim_fresh,
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
