//! The payments example as a real process: replays survive a restart, and a SIGKILL between
//! an effect and its stored response does not make the retry repeat the effect (it resumes
//! from the checkpoint).
//!
//! The test binary re-executes itself as the server (the test `SERVER_ENTRY`, selected with
//! `--exact`, told by environment variables to serve instead), running the example's own
//! code (`examples/payments/app.rs`). The server prints `LISTENING <addr>` once it serves and
//! `PAUSED <step>` when a handler reaches the step it was told to stop after; the test kills
//! it with SIGKILL there.

#[path = "../examples/payments/app.rs"]
mod app;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const SERVER_ENTRY: &str = "a_replay_survives_a_restart_of_the_process";
const DIR_ENV: &str = "IDEMSTORE_HTTP_TEST_SERVER_DIR";
const PAUSE_ENV: &str = "IDEMSTORE_HTTP_TEST_SERVER_PAUSE";
/// The server exits on its own after this long, so it never outlives a crashed test.
const SERVER_LIFETIME_MAX: Duration = Duration::from_secs(60);
const LINE_WAIT_MAX: Duration = Duration::from_secs(30);

/// In the child: serve the example until killed. Returns false in the test process itself.
fn serve_if_child() -> bool {
    let Ok(dir) = std::env::var(DIR_ENV) else { return false };
    std::thread::spawn(|| {
        std::thread::sleep(SERVER_LIFETIME_MAX);
        std::process::exit(3);
    });
    let dir = PathBuf::from(dir);
    let config = app::Config {
        store_dir: dir.join("store"),
        ledger: dir.join("ledger.txt"),
        pause_after: std::env::var(PAUSE_ENV).ok(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("LISTENING {}", listener.local_addr().unwrap());
        app::serve(listener, &config).await.unwrap();
    });
    true
}

struct ServerProcess {
    child: Child,
    url: String,
    lines: mpsc::Receiver<String>,
}

impl ServerProcess {
    fn start(dir: &Path, pause_after: Option<&str>) -> ServerProcess {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args([SERVER_ENTRY, "--exact", "--nocapture", "--test-threads=1"])
            .env(DIR_ENV, dir)
            .env_remove(PAUSE_ENV)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(step) = pause_after {
            command.env(PAUSE_ENV, step);
        }
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = ServerProcess { child, url: String::new(), lines };
        let addr = server.wait_for_line("LISTENING ");
        server.url = format!("http://{addr}");
        server
    }

    /// Waits for a line starting with `prefix` and returns the rest of it.
    fn wait_for_line(&mut self, prefix: &str) -> String {
        loop {
            match self.lines.recv_timeout(LINE_WAIT_MAX) {
                Ok(line) => {
                    // libtest may have printed `test NAME ... ` on the same line first.
                    if let Some(at) = line.find(prefix) {
                        return line[at + prefix.len()..].trim().to_string();
                    }
                }
                Err(error) => panic!("the server printed no {prefix:?} line: {error}"),
            }
        }
    }

    fn sigkill(mut self) {
        // SAFETY: kill(2) with the pid of a child this test spawned and has not reaped yet.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
        assert_eq!(rc, 0, "kill failed");
        let status = self.child.wait().unwrap();
        assert!(!status.success());
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ledger(dir: &Path) -> HashMap<String, usize> {
    let text = std::fs::read_to_string(dir.join("ledger.txt")).unwrap_or_default();
    let mut counts = HashMap::new();
    for line in text.lines() {
        let kind = line.split(' ').next().unwrap_or_default().to_string();
        *counts.entry(kind).or_insert(0) += 1;
    }
    counts
}

fn count(ledger: &HashMap<String, usize>, kind: &str) -> usize {
    ledger.get(kind).copied().unwrap_or(0)
}

async fn post(url: &str, path: &str, key: &str, body: &'static str) -> (u16, bool, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(body)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
    let text = response.text().await.unwrap();
    (status, replayed, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

const CHARGE: &str = r#"{"customer":"c-7","amount_cents":1250}"#;
const SIGNUP: &str = r#"{"email":"ada@example.com","plan":"pro"}"#;

#[test]
fn a_replay_survives_a_restart_of_the_process() {
    if serve_if_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = ServerProcess::start(dir.path(), None);
    let (status, replayed, first) = runtime.block_on(post(&server.url, "/charges", "\"restart-1\"", CHARGE));
    assert_eq!((status, replayed), (201, false), "{first}");
    // The answer was acknowledged under `Durability::Sync`: a kill cannot lose it.
    server.sigkill();

    let server = ServerProcess::start(dir.path(), None);
    let (status, replayed, again) = runtime.block_on(post(&server.url, "/charges", "\"restart-1\"", CHARGE));
    assert_eq!((status, replayed), (201, true));
    assert_eq!(again, first);
    let (status, _, _) =
        runtime.block_on(post(&server.url, "/charges", "\"restart-1\"", r#"{"customer":"c-7","amount_cents":9}"#));
    assert_eq!(status, 422);
    assert_eq!(count(&ledger(dir.path()), "charge"), 1);
}

#[test]
fn a_sigkill_after_the_charge_and_before_the_stored_response_does_not_charge_twice() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut server = ServerProcess::start(dir.path(), Some("charge"));
    let url = server.url.clone();
    let pending = runtime.spawn(async move { post(&url, "/charges", "kill-1", CHARGE).await });
    server.wait_for_line("PAUSED charge");
    assert_eq!(count(&ledger(dir.path()), "charge"), 1, "the charge ran before the kill");
    server.sigkill();
    assert!(runtime.block_on(pending).is_err(), "the first attempt got no answer");

    let server = ServerProcess::start(dir.path(), None);
    let (status, replayed, charge) = runtime.block_on(post(&server.url, "/charges", "kill-1", CHARGE));
    assert_eq!((status, replayed), (201, false), "{charge}");
    assert_eq!(charge["resumed"], true, "the retry resumed from the checkpoint: {charge}");
    assert_eq!(count(&ledger(dir.path()), "charge"), 1, "no second charge");
    let (status, replayed, replay) = runtime.block_on(post(&server.url, "/charges", "kill-1", CHARGE));
    assert_eq!((status, replayed, &replay), (201, true, &charge));
}

#[test]
fn a_signup_killed_after_the_crm_step_resumes_with_billing_only() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut server = ServerProcess::start(dir.path(), Some("crm"));
    let url = server.url.clone();
    let pending = runtime.spawn(async move { post(&url, "/signups", "signup-1", SIGNUP).await });
    server.wait_for_line("PAUSED crm");
    server.sigkill();
    assert!(runtime.block_on(pending).is_err());
    let before = ledger(dir.path());
    assert_eq!((count(&before, "email"), count(&before, "crm"), count(&before, "billing")), (1, 1, 0));

    let server = ServerProcess::start(dir.path(), None);
    let (status, _, body) = runtime.block_on(post(&server.url, "/signups", "signup-1", SIGNUP));
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["resumed_after"], "crm");
    let after = ledger(dir.path());
    assert_eq!((count(&after, "email"), count(&after, "crm"), count(&after, "billing")), (1, 1, 1));
}

#[test]
fn concurrent_duplicate_charges_charge_once() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = ServerProcess::start(dir.path(), None);
    let answers = runtime.block_on(async {
        let requests: Vec<_> = (0..16)
            .map(|_| {
                let url = server.url.clone();
                tokio::spawn(async move { post(&url, "/charges", "dup-1", CHARGE).await })
            })
            .collect();
        let mut answers = Vec::new();
        for request in requests {
            answers.push(request.await.unwrap());
        }
        answers
    });
    let created: Vec<_> = answers.iter().filter(|(status, _, _)| *status == 201).collect();
    assert!(!created.is_empty());
    assert!(answers.iter().all(|(status, _, _)| *status == 201 || *status == 409), "{answers:?}");
    assert_eq!(created.iter().filter(|(_, replayed, _)| !replayed).count(), 1, "one request ran the charge");
    assert!(created.iter().all(|(_, _, body)| body == &created[0].2));
    assert_eq!(count(&ledger(dir.path()), "charge"), 1);
    let (status, _, _) =
        runtime.block_on(post(&server.url, "/refunds", "refund-1", r#"{"charge_id":"x","amount_cents":0}"#));
    assert_eq!(status, 400, "a refused refund is stored like any 4xx");
    let (status, replayed, _) =
        runtime.block_on(post(&server.url, "/refunds", "refund-1", r#"{"charge_id":"x","amount_cents":0}"#));
    assert_eq!((status, replayed), (400, true));
    assert_eq!(count(&ledger(dir.path()), "refund"), 0);
}
