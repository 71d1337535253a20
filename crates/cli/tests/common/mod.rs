//! Helpers shared by the multi-process tests: spawning `lattice` processes, keys, HTTP calls.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const CHAT: &str = "smollm2-135m";
pub const TEXT: &str = "gemma3-270m";

pub struct Proc {
    pub child: Child,
    pub url: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `lattice ARGS` and waits for its `listening on URL` line.
pub fn spawn(args: &[&str]) -> Proc {
    spawn_env(args, &[])
}

/// As [`spawn`], with extra environment variables.
pub fn spawn_env(args: &[&str], env: &[(&str, &str)]) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_lattice"))
        .args(args)
        .env("LATTICE_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn lattice");
    listening(child, args)
}

/// Waits for the child's `listening on URL` line on stdout (which is then drained).
fn listening(mut child: std::process::Child, args: &[&str]) -> Proc {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if let Some(url) = line.strip_prefix("listening on ") {
                let _ = tx.send(url.trim().to_owned());
                break;
            }
        }
        // Keep draining so the child never blocks on a full pipe.
        for _ in lines {}
    });
    let url = rx
        .recv_timeout(Duration::from_secs(180))
        .unwrap_or_else(|_| panic!("lattice {args:?} did not start"));
    Proc { child, url }
}

/// What a process wrote to stderr so far (its log), shared with the thread that reads it.
#[derive(Clone, Default)]
pub struct Log(std::sync::Arc<std::sync::Mutex<String>>);

impl Log {
    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle`; panics after `within`.
    pub async fn wait_for(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the log never said {needle:?}:\n{}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// As [`spawn_env`], keeping the process's stderr (also echoed to the test's stderr).
pub fn spawn_logged(args: &[&str], env: &[(&str, &str)]) -> (Proc, Log) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lattice"))
        .args(args)
        .env("LATTICE_LOG", "warn")
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lattice");
    let log = Log::default();
    let stderr = child.stderr.take().expect("stderr");
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("{line}");
            let mut s = sink.0.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    (listening(child, args), log)
}

/// Nexus requires API keys: every request these tests send carries the operator key of the
/// Nexus it addresses (created with 1,000 LAI by `--operator-key-file`).
pub static KEYS: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

pub fn key_for(url: &str) -> String {
    KEYS.lock()
        .unwrap()
        .iter()
        .rev()
        .find(|(base, _)| url.starts_with(base.as_str()))
        .map(|(_, k)| k.clone())
        .unwrap_or_default()
}

pub fn nexus_at(dir: &Path, listen: &str) -> Proc {
    nexus_with(dir, listen, &[])
}

pub fn nexus_with(dir: &Path, listen: &str, extra: &[&str]) -> Proc {
    nexus_env(dir, listen, extra, &[])
}

pub fn nexus_env(dir: &Path, listen: &str, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    nexus_spawn(dir, listen, extra, |args| spawn_env(args, env))
}

/// A Nexus whose log (at info level) the test reads.
pub fn nexus_logged(dir: &Path, listen: &str, extra: &[&str]) -> (Proc, Log) {
    nexus_logged_env(dir, listen, extra, &[])
}

/// As [`nexus_logged`], with extra environment variables.
pub fn nexus_logged_env(
    dir: &Path,
    listen: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Proc, Log) {
    let mut log = None;
    let env: Vec<(&str, &str)> = [("LATTICE_LOG", "info")]
        .into_iter()
        .chain(env.iter().copied())
        .collect();
    let p = nexus_spawn(dir, listen, extra, |args| {
        let (p, l) = spawn_logged(args, &env);
        log = Some(l);
        p
    });
    (p, log.unwrap())
}

fn nexus_spawn(
    dir: &Path,
    listen: &str,
    extra: &[&str],
    start: impl FnOnce(&[&str]) -> Proc,
) -> Proc {
    let db = dir.join("nexus.db");
    let key_file = dir.join("operator.key");
    let mut args = vec![
        "nexus",
        "--listen",
        listen,
        "--db",
        db.to_str().unwrap(),
        "--operator-key-file",
        key_file.to_str().unwrap(),
    ];
    if !extra.contains(&"--probe-interval") {
        args.extend_from_slice(&["--probe-interval", "2"]);
    }
    args.extend_from_slice(extra);
    let p = start(&args);
    let key = std::fs::read_to_string(&key_file).unwrap();
    KEYS.lock()
        .unwrap()
        .push((p.url.clone(), key.trim().to_owned()));
    p
}

/// The arguments of [`node`], for variants (extra flags, a captured log).
pub fn node_args<'a>(
    nexus: &'a str,
    model: &'a str,
    key: &'a Path,
    parallel: &'a str,
) -> Vec<&'a str> {
    vec![
        "node",
        "--nexus",
        nexus,
        "--model",
        model,
        "--port",
        "0",
        "--threads",
        "1",
        "--parallel",
        parallel,
        "--ctx-per-slot",
        "1024",
        "--key",
        key.to_str().unwrap(),
    ]
}

pub fn node(nexus: &str, model: &str, key: &Path, parallel: &str) -> Proc {
    spawn(&node_args(nexus, model, key, parallel))
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn key(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.key"))
}

pub async fn wait_for_models(nexus: &str, want: &[(&str, u64)]) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Ok(r) = client.get(format!("{nexus}/v1/models")).send().await
            && let Ok(v) = r.json::<Value>().await
        {
            let ok = want.iter().all(|(m, n)| {
                v["data"].as_array().is_some_and(|d| {
                    d.iter()
                        .any(|e| e["id"] == *m && e["nodes"].as_u64() >= Some(*n))
                })
            });
            if ok {
                return;
            }
        }
        assert!(Instant::now() < deadline, "network never served {want:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn post(url: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .bearer_auth(key_for(url))
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

/// GET with the URL's Nexus key: (status, JSON body or null).
pub async fn get_status(url: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(url)
        .bearer_auth(key_for(url))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

pub async fn get(url: &str) -> Value {
    let (s, v) = get_status(url).await;
    assert_eq!(s, 200, "GET {url}: {v}");
    v
}

pub async fn nodes(nexus: &str) -> Value {
    reqwest::get(format!("{nexus}/lattice/v1/nodes"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

pub fn chat(content: &str, extra: Value) -> Value {
    let mut b = json!({"model": CHAT, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 16});
    b.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    b
}

/// Runs `lattice ARGS` to completion: (success, stdout).
pub fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lattice"))
        .args(args)
        .env("LATTICE_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run lattice");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A loopback port that was free a moment ago (for a process that must keep its address
/// across restarts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
