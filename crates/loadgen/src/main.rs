//! `lattice-loadgen`: an open-loop HTTP/1.1 load at a fixed rate, for `bench/routers`.
//!
//! Request *i* is due at t0 + i/rate whatever happened to earlier ones; its latency is the time
//! from its due time to the end of its response, so queueing in a target that falls behind
//! counts (no coordinated omission). A dedicated thread releases requests at their due times
//! (`thread::sleep`; the latest release of a run is reported), a single-threaded tokio
//! runtime carries them on at most `--conns` keep-alive connections. It prints one JSON object
//! with the same fields as the Python client it replaces.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use lattice_loadgen::{Parse, parse_response, summarize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

#[derive(Parser)]
#[command(about = "Open-loop HTTP load at a fixed rate; prints latency percentiles as JSON")]
struct Args {
    /// http://HOST:PORT/PATH
    #[arg(long)]
    url: String,
    /// The POST body (JSON).
    #[arg(long)]
    body: String,
    /// Extra request header, `Name: value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// A 200 response counts as a success only if its body contains this.
    #[arg(long, default_value = "")]
    expect: String,
    /// Requests per second.
    #[arg(long)]
    rate: f64,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of requests sent first and not measured.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Most connections (= requests in flight).
    #[arg(long, default_value_t = 64)]
    conns: usize,
    /// Seconds one request may take.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Seconds after the last due time before unfinished requests are cancelled and counted.
    #[arg(long, default_value_t = 5.0)]
    grace: f64,
    /// Also write every measured request as `due_ms latency_ms` lines, in due order, to this
    /// file (to see how a tail is made).
    #[arg(long)]
    latencies: Option<std::path::PathBuf>,
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

struct Ctx {
    addr: String,
    request: Vec<u8>,
    expect: Vec<u8>,
    idle: Mutex<Vec<Conn>>,
    sem: Arc<Semaphore>,
    timeout: Duration,
}

/// Most requests one run sends (each keeps an outcome in memory until the report).
const MAX_REQUESTS: usize = 10_000_000;

/// How many of the slowest requests the report lists, each as [due ms after t0, latency ms]: a
/// tail made of one stall shows up as neighbouring due times.
const SLOWEST: usize = 20;

/// A request's index, due time, and when it was written and its response ended (or why not).
type Outcome = (usize, Instant, Result<(Instant, Instant), String>);

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    // Bounded so every time derived from them is a valid `Duration` (no panic on any input).
    let within = |v: f64, min_exclusive: bool| {
        v.is_finite() && v <= 1e6 && if min_exclusive { v > 0.0 } else { v >= 0.0 }
    };
    if !(within(a.rate, true)
        && within(a.duration, true)
        && within(a.warmup, false)
        && within(a.timeout, true)
        && within(a.grace, false))
        || a.conns == 0
    {
        bail!(
            "--rate, --duration and --timeout must be in (0, 1e6], --warmup and --grace in \
             [0, 1e6], --conns at least 1"
        );
    }
    if a.rate * (a.duration + a.warmup) > MAX_REQUESTS as f64 {
        bail!("--rate × (--duration + --warmup) is over {MAX_REQUESTS} requests");
    }
    let rest = a
        .url
        .strip_prefix("http://")
        .context("--url must start with http://")?;
    let (addr, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: */*\r\n"
    );
    for h in &a.headers {
        if !h.contains(':') || h.contains('\r') || h.contains('\n') {
            bail!("--header must be one `Name: value` line: {h:?}");
        }
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str(&format!(
        "Content-Length: {}\r\n\r\n{}",
        a.body.len(),
        a.body
    ));
    let ctx = Arc::new(Ctx {
        addr: addr.to_string(),
        request: request.into_bytes(),
        expect: a.expect.clone().into_bytes(),
        idle: Mutex::new(Vec::new()),
        sem: Arc::new(Semaphore::new(a.conns)),
        timeout: Duration::from_secs_f64(a.timeout),
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(run(&a, ctx))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

async fn run(a: &Args, ctx: Arc<Ctx>) -> anyhow::Result<serde_json::Value> {
    let n_warm = (a.rate * a.warmup) as usize;
    let n_total = n_warm + (a.rate * a.duration) as usize;
    let t0 = Instant::now() + Duration::from_millis(50);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let rate = a.rate;
    let dispatcher = std::thread::spawn(move || {
        let mut max_late = Duration::ZERO;
        for i in 0..n_total {
            let due = t0 + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            max_late = max_late.max(Instant::now().saturating_duration_since(due));
            if tx.send((i, due)).is_err() {
                break;
            }
        }
        max_late
    });
    let mut tasks: JoinSet<Outcome> = JoinSet::new();
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(n_total);
    loop {
        tokio::select! {
            job = rx.recv() => match job {
                Some((i, due)) => {
                    let ctx = ctx.clone();
                    tasks.spawn(async move { (i, due, one(&ctx).await) });
                }
                None => break,
            },
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                outcomes.push(done.context("a request task failed")?);
            }
        }
    }
    let t_sent = Instant::now();
    let max_late = dispatcher
        .join()
        .map_err(|_| anyhow::anyhow!("the dispatcher thread panicked"))?;
    let deadline = tokio::time::Instant::from_std(t_sent + Duration::from_secs_f64(a.grace));
    let mut unfinished = 0;
    while !tasks.is_empty() {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(done)) => outcomes.push(done.context("a request task failed")?),
            Ok(None) => break,
            Err(_) => {
                unfinished = tasks.len();
                tasks.abort_all();
                break;
            }
        }
    }
    let t_end = Instant::now();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut latencies = Vec::with_capacity(outcomes.len());
    // (latency, due time after t0, how late it was written) of each measured request, for the
    // slowest ones' timeline; the write's lateness tells a client-side delay (the runtime thread
    // late, no free connection) from the target's.
    let mut timeline = Vec::with_capacity(outcomes.len());
    let mut sent_late = Vec::with_capacity(outcomes.len());
    for (i, due, result) in outcomes {
        match result {
            Ok((sent, done)) if i >= n_warm => {
                let latency = done.saturating_duration_since(due).as_secs_f64();
                let late = sent.saturating_duration_since(due).as_secs_f64();
                latencies.push(latency);
                sent_late.push(late);
                timeline.push((
                    latency,
                    due.saturating_duration_since(t0).as_secs_f64(),
                    late,
                ));
            }
            Ok(_) => {}
            Err(kind) => *errors.entry(kind).or_default() += 1,
        }
    }
    if unfinished > 0 {
        errors.insert("unfinished".into(), unfinished as u64);
    }
    let ok = latencies.len();
    let meas_start = t0 + Duration::from_secs_f64(n_warm as f64 / a.rate);
    let window = t_end
        .saturating_duration_since(meas_start)
        .as_secs_f64()
        .max(1e-9);
    let ms = |s: f64| (s * 1e6).round() / 1e3;
    if let Some(path) = &a.latencies {
        let mut by_due = timeline.clone();
        by_due.sort_by(|a, b| a.1.total_cmp(&b.1));
        let lines: String = by_due
            .iter()
            .map(|&(latency, at, _)| format!("{} {}\n", ms(at), ms(latency)))
            .collect();
        std::fs::write(path, lines).with_context(|| format!("writing {}", path.display()))?;
    }
    let s = summarize(&mut latencies);
    timeline.sort_by(|a, b| b.0.total_cmp(&a.0));
    let slowest: Vec<[f64; 2]> = timeline
        .iter()
        .take(SLOWEST)
        .map(|&(latency, at, _)| [ms(at), ms(latency)])
        .collect();
    let slowest_sent_late: Vec<f64> = timeline
        .iter()
        .take(SLOWEST)
        .map(|&(_, _, late)| ms(late))
        .collect();
    let sent = summarize(&mut sent_late);
    Ok(serde_json::json!({
        "client": "lattice-loadgen",
        "rate": a.rate, "duration_s": a.duration, "warmup_s": a.warmup, "max_conns": a.conns,
        "requests": n_total - n_warm, "ok": ok, "errors": errors,
        "achieved_rps": (ok as f64 / window * 10.0).round() / 10.0,
        "client_max_lateness_ms": ms(max_late.as_secs_f64()),
        "drain_s": (t_end.saturating_duration_since(t_sent).as_secs_f64() * 1e3).round() / 1e3,
        "p50_ms": s.map(|s| ms(s.p50)), "p90_ms": s.map(|s| ms(s.p90)),
        "p99_ms": s.map(|s| ms(s.p99)), "max_ms": s.map(|s| ms(s.max)),
        "mean_ms": s.map(|s| ms(s.mean)),
        "slowest_at_ms_latency_ms": slowest,
        "slowest_sent_late_ms": slowest_sent_late,
        "sent_late_p99_ms": sent.map(|s| ms(s.p99)), "sent_late_max_ms": sent.map(|s| ms(s.max)),
    }))
}

/// One request on an idle keep-alive connection or a new one; when it was written and when its
/// response ended, or the kind of failure.
async fn one(ctx: &Ctx) -> Result<(Instant, Instant), String> {
    let _permit = ctx.sem.acquire().await.map_err(|_| "closed".to_string())?;
    match tokio::time::timeout(ctx.timeout, exchange(ctx)).await {
        Ok(r) => r,
        Err(_) => Err("timeout".into()),
    }
}

async fn exchange(ctx: &Ctx) -> Result<(Instant, Instant), String> {
    let idle = ctx.idle.lock().map_err(|_| "poisoned".to_string())?.pop();
    let mut conn = match idle {
        Some(c) => c,
        None => {
            let stream = TcpStream::connect(&ctx.addr)
                .await
                .map_err(|e| format!("connect: {}", e.kind()))?;
            stream
                .set_nodelay(true)
                .map_err(|e| format!("nodelay: {}", e.kind()))?;
            Conn {
                stream,
                buf: Vec::with_capacity(8192),
            }
        }
    };
    let sent = Instant::now();
    conn.stream
        .write_all(&ctx.request)
        .await
        .map_err(|e| format!("write: {}", e.kind()))?;
    let mut eof = false;
    loop {
        match parse_response(&conn.buf, eof).map_err(|e| e.to_string())? {
            Parse::Incomplete => {
                conn.buf.reserve(8192);
                let n = conn
                    .stream
                    .read_buf(&mut conn.buf)
                    .await
                    .map_err(|e| format!("read: {}", e.kind()))?;
                eof = n == 0;
            }
            Parse::Done { response, consumed } => {
                let done = Instant::now();
                conn.buf.drain(..consumed);
                // The connection is reusable whatever the answer was (an error status too).
                if response.keep_alive && conn.buf.is_empty() && !eof {
                    ctx.idle
                        .lock()
                        .map_err(|_| "poisoned".to_string())?
                        .push(conn);
                }
                if response.status != 200 {
                    return Err(format!("HTTP {}", response.status));
                }
                let found = ctx.expect.is_empty()
                    || response
                        .body
                        .windows(ctx.expect.len())
                        .any(|w| w == ctx.expect.as_slice());
                if !found {
                    return Err("bad body".into());
                }
                return Ok((sent, done));
            }
        }
    }
}
