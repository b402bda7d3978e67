//! Shared by the PostgreSQL tests: the server's URL (tests skip, saying so, without
//! `IDEMSTORE_PG_URL`), a table of each test's own, an admin connection, and dropping the table.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use idemstore::Claim;
use idemstore_postgres::{PgOptions, PgStore};

/// The server's URL from `IDEMSTORE_PG_URL`; `None` (after printing why) when unset, so the
/// test passes as skipped: `.ci/postgres.sh` starts a server and sets it.
pub fn pg_url(test: &str) -> Option<String> {
    match std::env::var("IDEMSTORE_PG_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            skipped(
                test,
                "IDEMSTORE_PG_URL is not set; run .ci/postgres.sh to run the PostgreSQL tests against a throwaway server",
            );
            None
        }
    }
}

/// Says that `test` is skipped and why, on the process's stderr itself: the test harness
/// captures `eprintln!` of passing tests, and a skip must not pass silently.
pub fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// A table name no other test uses.
pub fn unique_table(prefix: &str) -> String {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).expect("random bytes");
    let suffix: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}_{suffix}")
}

/// Options for a test store on `table`: no background reaper (tests reap by hand).
pub fn options(table: &str) -> PgOptions {
    PgOptions { table: table.to_owned(), reap_interval: None, pool_size: 4, ..PgOptions::default() }
}

pub fn connect(url: &str, table: &str) -> PgStore {
    PgStore::connect(url, options(table)).expect("connect to postgres")
}

/// A plain connection for the test's own SQL, driven on the current runtime.
pub async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("admin connection");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Drops `table` and what the store made beside it.
pub async fn drop_table(client: &tokio_postgres::Client, table: &str) {
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}, {table}_identity, {table}_migrations; DROP SEQUENCE IF EXISTS {table}_fence;
             DROP FUNCTION IF EXISTS {table}_claim; DROP FUNCTION IF EXISTS {table}_claim_batch; DROP TYPE IF EXISTS {table}_claim_result;"
        ))
        .await
        .expect("drop the test's table");
}

/// Ends the server session `pid` and waits until the server has let its locks go.
pub async fn terminate_backend(client: &tokio_postgres::Client, pid: i32) {
    client.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.expect("pg_terminate_backend");
    for _ in 0..500 {
        let gone: bool = client
            .query_one("SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)", &[&pid])
            .await
            .expect("pg_stat_activity")
            .get(0);
        let locks: i64 =
            client.query_one("SELECT count(*) FROM pg_locks WHERE pid = $1", &[&pid]).await.expect("pg_locks").get(0);
        if gone && locks == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("backend {pid} did not end");
}

pub fn acquired(claim: Claim) -> idemstore::ClaimToken {
    match claim {
        Claim::Acquired(token) => token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

/// The environment that tells a re-executed test binary which child it is.
pub const CHILD_ROLE_ENV: &str = "IDEMSTORE_PG_TEST_CHILD_ROLE";
pub const CHILD_TABLE_ENV: &str = "IDEMSTORE_PG_TEST_CHILD_TABLE";
pub const CHILD_INDEX_ENV: &str = "IDEMSTORE_PG_TEST_CHILD_INDEX";

/// A child process, SIGKILLed when dropped if still running.
pub struct ChildProcess(pub Child);

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// This test binary again, running only `test`, as the child `role` number `index` on `table`.
pub fn spawn_child(test: &str, role: &str, table: &str, index: usize) -> ChildProcess {
    let child = Command::new(std::env::current_exe().expect("test binary"))
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE_ENV, role)
        .env(CHILD_TABLE_ENV, table)
        .env(CHILD_INDEX_ENV, index.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    ChildProcess(child)
}

/// Waits for `line` on the child's stdout (the harness may print on the same line first).
pub fn wait_for_line(child: &mut ChildProcess, line: &str) -> String {
    let stdout = child.0.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    while let Some(got) = lines.next() {
        let got = got.expect("read child output");
        if let Some(at) = got.find(line) {
            // Keep reading what the child prints next, so its writes never meet a closed pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return got[at..].to_owned();
        }
    }
    panic!("the child ended without printing {line:?}");
}

/// `pg_ctl` and the data directory of the test server (`.ci/postgres.sh` sets them), for the
/// tests that restart it; `None` (after saying the test is skipped) otherwise.
pub fn pg_ctl_and_data(test: &str) -> Option<(String, String)> {
    match (std::env::var("IDEMSTORE_PG_CTL"), std::env::var("IDEMSTORE_PG_DATA")) {
        (Ok(pg_ctl), Ok(data)) => Some((pg_ctl, data)),
        _ => {
            skipped(test, "IDEMSTORE_PG_DATA and IDEMSTORE_PG_CTL are not set (.ci/postgres.sh sets them)");
            None
        }
    }
}

/// Crashes the server and starts it again: `pg_ctl restart -m immediate` (no shutdown
/// checkpoint: crash recovery from the WAL at start), as `IDEMSTORE_PG_RUN_AS` when set.
pub fn restart_server(pg_ctl: &str, data: &str) {
    let mut command = match std::env::var("IDEMSTORE_PG_RUN_AS") {
        Ok(user) if !user.is_empty() => {
            let mut c = Command::new("runuser");
            c.args(["-u", &user, "--", pg_ctl]);
            c
        }
        _ => Command::new(pg_ctl),
    };
    let status = command
        .args(["-D", data, "restart", "-m", "immediate", "-w", "-t", "60"])
        .stdout(Stdio::null())
        .status()
        .expect("run pg_ctl");
    assert!(status.success(), "pg_ctl restart failed: {status}");
}
