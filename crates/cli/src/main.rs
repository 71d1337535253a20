//! `lattice`: one binary for model management, the inference node and the local network.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use lattice_engine::Engine;
use lattice_engine::upstream::{UpstreamConfig, UpstreamEngine};
use lattice_engine_embed::{EmbedConfig, EmbedEngine};
use lattice_engine_llama::{LlamaConfig, LlamaEngine};
use lattice_models::{ModelSpec, ModelStore, PullOptions, TerminalProgress};

mod chain;

/// Nexus and the node allocate per request and per frame on many threads; mimalloc's
/// thread-local free lists are cheaper there than glibc's arenas (BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "lattice",
    version,
    about = "Lattice: a decentralized network for open-source LLM inference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Threads that run the async work (0: one per CPU this process may use). With one, tasks
    /// run on a single-threaded scheduler, which on one CPU costs less than a work-stealing one.
    #[arg(
        long,
        global = true,
        env = "LATTICE_RUNTIME_THREADS",
        default_value_t = 0
    )]
    runtime_threads: usize,
}

#[derive(Subcommand)]
enum Command {
    /// Start a whole local network (Nexus + two nodes) and print its OpenAI endpoint.
    Up(UpArgs),
    /// Run Nexus, the coordinator: one OpenAI endpoint over every linked node.
    Nexus(Box<NexusArgs>),
    /// Run an inference node, linked to a Nexus or standalone.
    Node(Box<NodeArgs>),
    /// Show the nodes a Nexus knows: models, health, load, reputation.
    Status {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        nexus: String,
    },
    /// Manage local model files.
    #[command(subcommand)]
    Model(ModelCommand),
    /// The protocol contracts: deploy, status, faucet, balances, reconciliation.
    Chain {
        #[command(flatten)]
        chain: chain::ChainArgs,
        /// Directory of Nexus's database (the embedded chain and its key live beside it).
        #[arg(long)]
        db: Option<PathBuf>,
        /// Chain id of the embedded chain.
        #[arg(long, default_value_t = 31337)]
        chain_id: u64,
        #[command(subcommand)]
        command: chain::ChainCommand,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Download a model and verify its sha256: a catalog name (`smollm2-135m`, `gemma3-270m`),
    /// `hf:OWNER/REPO/PATH.gguf[@REVISION]`, or a local GGUF path.
    Pull {
        spec: String,
        /// Expected sha256 (required to match; recorded otherwise).
        #[arg(long)]
        sha256: Option<String>,
    },
    /// Show the models present locally.
    List,
    /// Show the models `lattice model pull` knows by name.
    Catalog,
}

#[derive(Args)]
struct UpArgs {
    /// Address of the network's OpenAI endpoint (Nexus).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Chat model (first node).
    #[arg(long, default_value = lattice_models::DEFAULT_MODEL)]
    chat_model: String,
    /// Completion model (second node).
    #[arg(long, default_value = "gemma3-270m")]
    completion_model: String,
    /// Sentence-embedding model for /v1/embeddings (third node).
    #[arg(long, default_value = "all-minilm-l6-v2")]
    embedding_model: String,
    /// Threads per text node (the nodes share the machine's cores).
    #[arg(long, default_value_t = 1)]
    threads: u32,
}

/// Upper bound of Nexus's timeouts in seconds (a deadline past it would overflow the clock).
const WEEK_SECS: u64 = 7 * 24 * 3600;

#[derive(Args)]
struct NexusArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// SQLite database for nodes, accounts and the ledger (default: under the cache dir).
    #[arg(long)]
    db: Option<PathBuf>,
    /// Database URL instead of --db: `postgres://…` lets several Nexus replicas share it.
    #[arg(long, env = "LATTICE_DATABASE_URL")]
    database_url: Option<String>,
    /// Serve without API keys or charges (a private cluster, a benchmark).
    #[arg(long)]
    no_billing: bool,
    /// Write an API key of the local operator account (1,000 LAI of credit) to this file.
    #[arg(long)]
    operator_key_file: Option<PathBuf>,
    /// URL users open Nexus at; SIWE messages name its host, passkeys its domain (browsers
    /// refuse passkeys on IP addresses). Default: http://localhost:PORT.
    #[arg(long)]
    public_url: Option<String>,
    /// OpenID Connect issuer for "Sign in with …" (e.g. https://accounts.google.com); the
    /// redirect URL to register with it is PUBLIC_URL/lattice/v1/auth/oidc/callback.
    #[arg(long, requires_all = ["oidc_client_id", "oidc_client_secret"])]
    oidc_issuer: Option<String>,
    #[arg(long)]
    oidc_client_id: Option<String>,
    #[arg(long, env = "LATTICE_OIDC_CLIENT_SECRET", hide_env_values = true)]
    oidc_client_secret: Option<String>,
    /// How each charge is divided, in basis points: node, its staking pool, treasury (summing to
    /// 10000). With a chain, the chain's governed split applies instead (settlement pays by it).
    #[arg(long, value_parser = parse_split, default_value = "9000,500,500")]
    fee_split: lattice_ledger::Split,
    /// Starter credit per new sign-in identity, in whole LAI (0 turns the faucet off).
    #[arg(long, default_value_t = 10)]
    faucet_lai: u64,
    /// Chain id in SIWE messages and signed receipts (31337: the local chain).
    #[arg(long, default_value_t = 31337)]
    chain_id: u64,
    /// Name of this replica; on restart it releases the credit holds it left behind (with
    /// `--ledger-mode shared`), so replicas sharing a database need names of their own that
    /// stay the same across restarts. Default: HOSTNAME:PORT (of --listen).
    #[arg(long)]
    replica_id: Option<String>,
    /// How this Nexus writes the ledger: `exclusive` (it owns the database: balances in
    /// memory, written behind in group commits) or `shared` (several replicas on one PostgreSQL
    /// database: row locks, a commit per batch before replying). Default: exclusive on SQLite,
    /// shared on PostgreSQL.
    #[arg(long, value_enum)]
    ledger_mode: Option<LedgerModeArg>,
    /// Secret custodial addresses are derived from (created, mode 0600, if missing).
    /// Default: `nexus.secret` beside the database.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Seconds between health probes of each node and model.
    #[arg(long, default_value_t = 30)]
    probe_interval: u64,
    /// Seconds a node may send nothing mid-answer before the request ends with an error (its
    /// work cancelled, nothing charged, a failure on the node's record). At most a week.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=WEEK_SECS))]
    stall_timeout: u64,
    /// Seconds from a request's arrival to its first token, across the nodes tried (routing,
    /// a node's queue and the prompt's prefill all count); then it fails. Raise it for slow
    /// nodes or long prompts. At most a week.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=WEEK_SECS))]
    first_token_timeout: u64,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// HTTP requests handled at once (streams included); more get 503.
    #[arg(long, default_value_t = 4096)]
    max_in_flight: usize,
    #[command(flatten)]
    chain: chain::ChainArgs,
    /// Do not settle to a chain (the ledger stays off-chain only).
    #[arg(long)]
    no_chain: bool,
    /// Do not run the settlement loop on this replica (another one does).
    #[arg(long)]
    no_settle: bool,
    /// Seconds between settlement passes.
    #[arg(long, default_value_t = 5)]
    settle_interval: u64,
    /// Credit on-chain deposits this many blocks behind the head.
    #[arg(long, default_value_t = 0)]
    deposit_confirmations: u64,
    /// Refuse nodes that do not register with a valid pre-registered node token (`lattice node
    /// --token`). Off by default: tokens are then optional, but a revoked or unknown one is
    /// still refused.
    #[arg(long)]
    require_node_token: bool,
    /// New identities granted the faucet per client address per hour.
    #[arg(long, default_value_t = 5)]
    faucet_per_client_per_hour: u32,
    /// Node admission by on-chain stake (default: sponsor on the embedded chain — the operator
    /// stakes for nodes of a local network — and require with --chain-rpc).
    #[arg(long, value_enum)]
    node_stake: Option<chain::NodeStake>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LedgerModeArg {
    Exclusive,
    Shared,
}

#[derive(Args)]
struct NodeArgs {
    /// Serve on this machine only, without joining a Nexus.
    #[arg(long, conflicts_with = "nexus")]
    standalone: bool,
    /// Nexus to join, e.g. `http://127.0.0.1:8080` (the node dials out: works behind NAT).
    #[arg(long)]
    nexus: Option<String>,
    /// The node's secp256k1 key (its EVM address), created on first start.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Price per 1M prompt tokens, in the smallest LAI unit (10^-18 LAI; default 0.1 LAI).
    #[arg(long, default_value_t = 100_000_000_000_000_000)]
    price_in: u64,
    /// Price per 1M completion tokens, in the smallest LAI unit (default 0.2 LAI).
    #[arg(long, default_value_t = 200_000_000_000_000_000)]
    price_out: u64,
    /// Human-readable label shown in `lattice status`.
    #[arg(long)]
    label: Option<String>,
    /// Pre-registered node token (`lnt_…`, from the web UI's "Run a node" page or
    /// `POST /lattice/v1/account/node-tokens`): binds this node to your account.
    #[arg(long, env = "LATTICE_NODE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Model to serve: catalog name, `hf:` spec or GGUF path (pulled if missing).
    #[arg(long, required_unless_present = "upstream")]
    model: Option<String>,
    /// Id clients put in `model` (default: the catalog name or the file stem).
    #[arg(long)]
    model_id: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port; the address is printed as `listening on http://…`.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Forward to an existing OpenAI-compatible server (e.g. `http://127.0.0.1:8081/v1`)
    /// instead of running llama.cpp in-process.
    #[arg(long)]
    upstream: Option<String>,
    /// Model name to request from the upstream (default: --model-id).
    #[arg(long)]
    upstream_model: Option<String>,
    /// Bearer token for the upstream.
    #[arg(long, env = "LATTICE_UPSTREAM_API_KEY", hide_env_values = true)]
    upstream_api_key: Option<String>,
    /// The upstream reports log probabilities in OpenAI's formats (vLLM, llama.cpp's server,
    /// another lattice node): requests for them are passed on (and fail if an answer comes
    /// without them) instead of refused.
    #[arg(long, requires = "upstream")]
    upstream_logprobs: bool,
    /// The upstream model is an embedding model giving vectors of this many numbers (e.g. 384
    /// for all-MiniLM-L6-v2): `/v1/embeddings` is passed on to its `/embeddings`, each answer
    /// checked (one finite vector of this length per text, usage present), and the text
    /// endpoints refuse it.
    #[arg(long, requires = "upstream", conflicts_with = "upstream_logprobs", value_parser = clap::value_parser!(u32).range(1..=65536))]
    upstream_dimensions: Option<u32>,
    #[command(flatten)]
    engine: EngineArgs,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// HTTP requests handled at once (streams included); more get 503.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
}

#[derive(Args, Clone)]
struct EngineArgs {
    /// Decode threads (default: available cores, at most 8); for an embedding model, its
    /// encoder threads, each computing its own batch (default: one per core).
    #[arg(long)]
    threads: Option<u32>,
    /// Prompt-processing threads (default: same as --threads).
    #[arg(long)]
    threads_batch: Option<u32>,
    /// Requests decoded together (continuous batching slots).
    #[arg(long, default_value_t = 4)]
    parallel: u32,
    /// Context window per slot, in tokens (prompt + completion).
    #[arg(long, default_value_t = 2048)]
    ctx_per_slot: u32,
    /// Most tokens per decode step (bounds prompt chunks).
    #[arg(long, default_value_t = 512)]
    batch_size: u32,
    /// Requests allowed to wait for a slot; more get 503.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Jinja chat template file overriding the model's own (or adding one to a base model).
    #[arg(long)]
    chat_template: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Node(_)) {
        limit_candle_threads();
    }
    let _flush_logs = init_tracing();
    let serves = matches!(cli.command, Command::Nexus(_) | Command::Node(_));
    let rt = runtime(cli.runtime_threads, serves)?;
    rt.block_on(async move {
        match cli.command {
            Command::Up(a) => up(a).await,
            Command::Nexus(a) => nexus(*a).await,
            Command::Node(a) => node(*a).await,
            Command::Status { nexus } => status(&nexus).await,
            Command::Model(m) => model(m).await,
            Command::Chain {
                chain: args,
                db,
                chain_id,
                command,
            } => {
                let db = db.unwrap_or_else(|| cache_dir().join("nexus.db"));
                let dir = db
                    .parent()
                    .map(std::path::Path::to_path_buf)
                    .unwrap_or_else(cache_dir);
                chain::run(command, &args, &dir, chain_id, &db).await
            }
        }
    })
}

/// An embedding node runs one encoder thread per core, each computing its own batch (see
/// lattice-engine-embed). Its matrix products stay on the encoder's thread (each encoder runs in
/// a rayon pool of one), but candle spreads large element-wise ops over a pool of its own, sized
/// once from `CANDLE_NUM_THREADS` (else one per core), and the encoders contend for it: on 2
/// cores, batches of 64 ran at 106 texts/s that way against 182 with that pool at one thread
/// (BENCHMARKS.md). This sets it to 1 unless the operator set it.
#[allow(unsafe_code)]
fn limit_candle_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: called first thing in `main`, before the log writer, the runtime or any other
        // thread exists, so nothing can read or write the environment at the same time.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}

/// The async runtime: a single-threaded scheduler when one thread is asked for or only one CPU
/// is usable (as under `taskset -c 0`: it spares the work-stealing scheduler's cross-thread
/// bookkeeping, ~10 % of Nexus's and the node's CPU per request there; BENCHMARKS.md), else a
/// multi-threaded one with that many workers. Blocking work runs on its own threads either way.
/// Servers (`log`) say which one they run.
fn runtime(threads: usize, log: bool) -> Result<tokio::runtime::Runtime> {
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        n => n,
    };
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    if log {
        let scheduler = if threads == 1 {
            "single-threaded"
        } else {
            "multi-threaded"
        };
        tracing::info!(threads, "async runtime: {scheduler} scheduler");
    }
    Ok(rt)
}

/// Log lines go to stderr from a thread of their own, so a tokio worker never waits on a write
/// (on a busy disk a write to a log file can block for milliseconds, and with it every request
/// on that worker). None is dropped: a full buffer makes the logging call wait. The returned
/// guard flushes what is buffered when `main` returns.
fn init_tracing() -> tracing_appender::non_blocking::WorkerGuard {
    // llama.cpp is chatty at info level; its warnings still come through.
    let filter = tracing_subscriber::EnvFilter::try_from_env("LATTICE_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,llama-cpp-2=warn,llama_cpp_2=warn")
    });
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("lattice-log")
        .finish(std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .init();
    guard
}

async fn model(cmd: ModelCommand) -> Result<()> {
    let store = ModelStore::from_env()?;
    match cmd {
        ModelCommand::Pull { spec, sha256 } => {
            let spec = ModelSpec::parse(&spec)?;
            let mut opts = PullOptions::default().with_progress(Arc::new(TerminalProgress::new()));
            if let Some(h) = sha256 {
                opts = opts.with_sha256(&h)?;
            }
            let m = store.pull(&spec, &opts).await?;
            println!(
                "{} ready at {} ({} bytes, sha256 {})",
                m.name,
                m.path.display(),
                m.size,
                m.sha256.as_deref().unwrap_or("?")
            );
        }
        ModelCommand::List => {
            let models = store.list()?;
            if models.is_empty() {
                println!(
                    "No models in {} yet. Try: lattice model pull {}",
                    store.models_dir().display(),
                    lattice_models::DEFAULT_MODEL
                );
            }
            for m in models {
                let kind = m
                    .kind
                    .map(|k| format!("{k:?}").to_lowercase())
                    .unwrap_or_else(|| "-".into());
                let state = if m.verified { "verified" } else { "unverified" };
                println!(
                    "{:<28} {:>9} {:>7} MB  {:<10} {}",
                    m.name,
                    kind,
                    m.size / 1_000_000,
                    state,
                    m.path.display()
                );
            }
        }
        ModelCommand::Catalog => {
            for e in lattice_models::catalog() {
                println!(
                    "{:<16} {:>5} MB  {}",
                    e.name,
                    e.size / 1_000_000,
                    e.description
                );
            }
        }
    }
    Ok(())
}

fn default_threads() -> u32 {
    std::thread::available_parallelism().map_or(2, |n| u32::try_from(n.get()).unwrap_or(2).min(8))
}

/// `--upstream` and the options that go with it.
struct Upstream {
    base_url: String,
    model: Option<String>,
    api_key: Option<String>,
    logprobs: bool,
    dimensions: Option<u32>,
}

/// Loads the engine for `--model` (pulling it first if needed) or connects to `--upstream`.
async fn build_engine(
    model: Option<&str>,
    model_id: Option<String>,
    upstream: Option<Upstream>,
    e: &EngineArgs,
) -> Result<Arc<dyn Engine>> {
    if let Some(Upstream {
        base_url,
        model: upstream_model,
        api_key,
        logprobs,
        dimensions,
    }) = upstream
    {
        let model_id = model_id
            .or_else(|| upstream_model.clone())
            .or_else(|| model.map(str::to_owned))
            .context("--upstream needs --model-id or --upstream-model")?;
        let engine = UpstreamEngine::new(UpstreamConfig {
            base_url,
            upstream_model: upstream_model.unwrap_or_else(|| model_id.clone()),
            model_id,
            api_key,
            context_length: e.ctx_per_slot,
            max_in_flight: usize::try_from(e.parallel)
                .unwrap_or(4)
                .saturating_add(e.queue),
            connect_timeout: Duration::from_secs(5),
            logprobs,
            dimensions,
        })?;
        return Ok(Arc::new(engine));
    }
    let spec = model.context("--model is required")?;
    let store = ModelStore::from_env()?;
    let local = store.resolve(spec, true).await?;
    let id = model_id.unwrap_or_else(|| match ModelSpec::parse(spec) {
        Ok(ModelSpec::Catalog(entry)) => entry.name.to_owned(),
        _ => local
            .path
            .file_stem()
            .map_or_else(|| spec.to_owned(), |s| s.to_string_lossy().into_owned()),
    });
    // Sentence-embedding models come as safetensors (with their tokenizer and configuration
    // next to them); text models as GGUF.
    if local
        .path
        .extension()
        .is_some_and(|x| x.eq_ignore_ascii_case("safetensors"))
    {
        let mut cfg = EmbedConfig::new(local.path.clone(), id);
        cfg.queue_capacity = e.queue;
        cfg.threads = e.threads.map(|t| t.max(1) as usize);
        let engine = tokio::task::spawn_blocking(move || EmbedEngine::load(cfg)).await??;
        return Ok(Arc::new(engine));
    }
    let chat_template = match &e.chat_template {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => None,
    };
    let threads = e.threads.unwrap_or_else(default_threads);
    let cfg = LlamaConfig {
        model_path: local.path.clone(),
        model_id: id,
        threads,
        threads_batch: e.threads_batch.unwrap_or(threads),
        parallel: e.parallel,
        ctx_per_slot: e.ctx_per_slot,
        batch_size: e.batch_size,
        queue_capacity: e.queue,
        chat_template,
    };
    let engine = tokio::task::spawn_blocking(move || LlamaEngine::load(cfg)).await??;
    Ok(Arc::new(engine))
}

fn cache_dir() -> PathBuf {
    std::env::var_os("LATTICE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME").map_or_else(
                || PathBuf::from(".lattice"),
                |h| PathBuf::from(h).join(".cache/lattice"),
            )
        })
}

/// Single-stream decode speed, measured once at start-up and advertised to Nexus.
/// (0 for an embedding model, which decodes nothing.)
async fn measure_decode_tps(engine: &Arc<dyn Engine>) -> f64 {
    let Some(model) = engine
        .models()
        .first()
        .filter(|m| m.dimensions.is_none())
        .map(|m| m.id.clone())
    else {
        return 0.0;
    };
    let req = lattice_engine::GenerateRequest {
        request_id: "startup-speed".into(),
        model,
        prompt: lattice_engine::Prompt::Text("The history of the city".into()),
        params: lattice_engine::SamplingParams {
            temperature: 0.0,
            max_tokens: Some(24),
            ignore_eos: true,
            ..Default::default()
        },
        preference: lattice_engine::Preference::default(),
        user: None,
        payer: None,
        conversation: None,
        whole: false,
    };
    let Ok(mut events) = engine.generate(req).await else {
        return 0.0;
    };
    let mut first = None;
    let mut n = 0u32;
    while let Some(Ok(ev)) = futures::StreamExt::next(&mut events).await {
        match ev {
            lattice_engine::Event::Delta(_) => {
                n += 1;
                first.get_or_insert_with(std::time::Instant::now);
            }
            lattice_engine::Event::Done { .. } => break,
            lattice_engine::Event::Logprobs(_)
            | lattice_engine::Event::Ending
            | lattice_engine::Event::Embedding(_) => {}
        }
    }
    match first {
        Some(t) if n > 1 => f64::from(n - 1) / t.elapsed().as_secs_f64().max(1e-6),
        _ => 0.0,
    }
}

async fn node(a: NodeArgs) -> Result<()> {
    if !a.standalone && a.nexus.is_none() {
        bail!("say where to serve: --nexus URL to join a network, or --standalone");
    }
    if let Some(t) = &a.token
        && (!t.starts_with(lattice_accounts::NODE_TOKEN_PREFIX) || t.len() > 128)
    {
        bail!(
            "--token must be a node token ({}…, at most 128 characters) from the \"Run a node\" page",
            lattice_accounts::NODE_TOKEN_PREFIX
        );
    }
    let upstream = a.upstream.clone().map(|base_url| Upstream {
        base_url,
        model: a.upstream_model.clone(),
        api_key: a.upstream_api_key.clone(),
        logprobs: a.upstream_logprobs,
        dimensions: a.upstream_dimensions,
    });
    let engine = build_engine(a.model.as_deref(), a.model_id.clone(), upstream, &a.engine).await?;
    let addr: SocketAddr = format!("{}:{}", a.host, a.port)
        .parse()
        .with_context(|| format!("invalid --host/--port {}:{}", a.host, a.port))?;
    let limits = lattice_http::Limits {
        max_body_bytes: a.max_body_bytes,
        max_in_flight: a.max_in_flight,
        ..lattice_http::Limits::default()
    };
    let listener = lattice_http::bind(addr).with_context(|| format!("binding {addr}"))?;
    let bound = listener.local_addr()?;
    let app = lattice_http::router(engine.clone(), limits, "lattice_node");
    if let Some(nexus) = a.nexus.clone() {
        let key_path = a
            .key
            .clone()
            .unwrap_or_else(|| cache_dir().join("keys/node.key"));
        let key = Arc::new(lattice_link::NodeKey::load_or_create(&key_path)?);
        let decode_tps = measure_decode_tps(&engine).await;
        tracing::info!(address = %key.address(), decode_tps = format!("{decode_tps:.1}"), "node identity");
        let cfg = lattice_node::LinkConfig {
            nexus_url: nexus,
            kind: lattice_link::NodeKind::Llm,
            price: lattice_link::Price {
                input_per_mtok: a.price_in,
                output_per_mtok: a.price_out,
            },
            label: a.label.clone(),
            token: a.token.clone(),
            decode_tps,
            heartbeat: Duration::from_secs(2),
        };
        tokio::spawn(lattice_node::run(engine, key, cfg, shutdown_signal()));
    }
    // The line tests and scripts wait for; printed only once the socket accepts connections.
    println!("listening on http://{bound}");
    lattice_http::serve(listener, app, shutdown_signal()).await?;
    tracing::info!("node stopped");
    Ok(())
}

/// 32 secret bytes kept in `path` (hex, mode 0600), created on first use.
fn load_or_create_secret(path: &std::path::Path) -> Result<[u8; 32]> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let bytes = hex::decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .with_context(|| format!("{} is not 64 hex digits", path.display()))?;
        return Ok(bytes);
    }
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new();
    f.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut f, 0o600);
    f.open(path)
        .and_then(|mut f| f.write_all(hex::encode(b).as_bytes()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(b)
}

async fn nexus(a: NexusArgs) -> Result<()> {
    let db = a.db.unwrap_or_else(|| cache_dir().join("nexus.db"));
    let dir = db
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(cache_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let settle = if a.no_billing || a.no_chain {
        None
    } else {
        let protocol = chain::open(&a.chain, &dir, a.chain_id).await?;
        let stake = match a.node_stake {
            Some(chain::NodeStake::Off) => lattice_nexus::StakePolicy::Off,
            Some(chain::NodeStake::Require) => lattice_nexus::StakePolicy::Require,
            Some(chain::NodeStake::Sponsor) => lattice_nexus::StakePolicy::Sponsor,
            None if a.chain.chain_rpc.is_some() => lattice_nexus::StakePolicy::Require,
            None => lattice_nexus::StakePolicy::Sponsor,
        };
        tracing::info!(chain_id = protocol.chain().chain_id(), tokenomics = %protocol.deployment().tokenomics, "settling to the chain");
        Some(lattice_nexus::ChainSettings {
            protocol,
            settle: !a.no_settle,
            interval: Duration::from_secs(a.settle_interval.max(1)),
            limits: lattice_accounts::BatchLimits::default(),
            confirmations: a.deposit_confirmations,
            stake,
        })
    };
    // Receipts and SIWE messages name the chain that is settled to.
    let chain_id = settle
        .as_ref()
        .map_or(a.chain_id, |s| s.protocol.chain().chain_id());
    let secret_file = a.secret_file.unwrap_or_else(|| dir.join("nexus.secret"));
    let master_secret = load_or_create_secret(&secret_file)?;
    let public = reqwest::Url::parse(
        &a.public_url
            .clone()
            .unwrap_or_else(|| format!("http://localhost:{}", a.listen.port())),
    )
    .context("--public-url is not a URL")?;
    let passkeys = match public.domain() {
        Some(d) => Some(lattice_accounts::PasskeyConfig {
            rp_id: d.to_owned(),
            origin: public.origin().ascii_serialization(),
        }),
        None => {
            tracing::warn!("passkeys are off: --public-url must name a domain, not an IP address");
            None
        }
    };
    let accounts = lattice_accounts::AccountsConfig {
        faucet_amount: lattice_ledger::Money::from_lai(a.faucet_lai)
            .context("--faucet-lai is too large")?,
        faucet_per_client_per_hour: a.faucet_per_client_per_hour,
        master_secret,
        siwe_domain: public.host_str().map_or_else(
            || a.listen.to_string(),
            |h| match public.port() {
                Some(p) => format!("{h}:{p}"),
                None => h.to_owned(),
            },
        ),
        passkeys,
        chain_id,
        ledger: lattice_accounts::LedgerConfig {
            mode: match a.ledger_mode {
                Some(LedgerModeArg::Exclusive) => lattice_accounts::LedgerMode::Exclusive,
                Some(LedgerModeArg::Shared) => lattice_accounts::LedgerMode::Shared,
                None if a
                    .database_url
                    .as_deref()
                    .is_some_and(|u| u.starts_with("postgres")) =>
                {
                    lattice_accounts::LedgerMode::Shared
                }
                None => lattice_accounts::LedgerMode::Exclusive,
            },
            owner: a
                .replica_id
                .clone()
                .unwrap_or_else(|| default_replica_id(a.listen.port())),
            ..lattice_accounts::LedgerConfig::default()
        },
        ..lattice_accounts::AccountsConfig::default()
    };
    let config = lattice_nexus::NexusConfig {
        database_url: a
            .database_url
            .unwrap_or_else(|| format!("sqlite://{}", db.display())),
        billing: !a.no_billing,
        oidc: a
            .oidc_issuer
            .clone()
            .map(|issuer| lattice_accounts::OidcConfig {
                issuer,
                client_id: a.oidc_client_id.clone().unwrap_or_default(),
                client_secret: a.oidc_client_secret.clone().unwrap_or_default(),
                redirect_url: format!(
                    "{}/lattice/v1/auth/oidc/callback",
                    public.as_str().trim_end_matches('/')
                ),
            }),
        accounts,
        limits: lattice_http::Limits {
            max_body_bytes: a.max_body_bytes,
            max_in_flight: a.max_in_flight,
            ..lattice_http::Limits::default()
        },
        probe_interval: Duration::from_secs(a.probe_interval.max(1)),
        failover: lattice_nexus::Failover {
            stall_timeout: Duration::from_secs(a.stall_timeout),
            first_token_deadline: Duration::from_secs(a.first_token_timeout),
            ..lattice_nexus::Failover::default()
        },
        require_node_token: a.require_node_token,
        split: a.fee_split,
        ..lattice_nexus::NexusConfig::default()
    };
    let nexus = lattice_nexus::Nexus::new(config, settle).await?;
    if let Some(path) = &a.operator_key_file {
        nexus.operator_key(path).await?;
    }
    let listener = lattice_http::bind(a.listen).with_context(|| format!("binding {}", a.listen))?;
    let bound = listener.local_addr()?;
    println!("listening on http://{bound}");
    nexus.serve(listener, shutdown_signal()).await?;
    tracing::info!("nexus stopped");
    Ok(())
}

async fn status(base: &str) -> Result<()> {
    let url = format!("{}/lattice/v1/nodes", base.trim_end_matches('/'));
    let v: serde_json::Value = reqwest::get(&url)
        .await
        .with_context(|| format!("cannot reach Nexus at {base}"))?
        .error_for_status()?
        .json()
        .await?;
    let online = v["online"].as_array().cloned().unwrap_or_default();
    println!("{} node(s) online at {base}", online.len());
    println!(
        "{:<5} {:<12} {:<28} {:>7} {:>5} {:>7} {:>7} {:>7} {:>6} {:>6}  address",
        "id", "label", "models", "busy", "queue", "now t/s", "tok/s", "ttft ms", "rep", "served"
    );
    for n in &online {
        let models: Vec<String> = n["models"]
            .as_array()
            .map(|ms| {
                ms.iter()
                    .map(|m| {
                        let ok = m["admitted"] == true && m["circuit"] == "closed";
                        let mark = if m["held"] == true {
                            "!"
                        } else if ok {
                            ""
                        } else {
                            "*"
                        };
                        format!("{}{mark}", m["id"].as_str().unwrap_or("?"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<5} {:<12} {:<28} {:>7} {:>5} {:>7.1} {:>7.1} {:>7.0} {:>6.3} {:>6}  {}",
            n["id"].as_u64().unwrap_or(0),
            n["label"].as_str().unwrap_or("-"),
            models.join(","),
            // In flight as Nexus counts it or as the node last reported, whichever is larger.
            format!(
                "{}/{}",
                n["inflight"]
                    .as_u64()
                    .unwrap_or(0)
                    .max(n["busy"].as_u64().unwrap_or(0))
                    .min(n["slots"].as_u64().unwrap_or(0)),
                n["slots"].as_u64().unwrap_or(0)
            ),
            n["queued"].as_u64().unwrap_or(0),
            n["recent_tps"].as_f64().unwrap_or(0.0),
            n["decode_tps"].as_f64().unwrap_or(0.0),
            n["ttft_ms"].as_f64().unwrap_or(0.0),
            n["reputation"].as_f64().unwrap_or(0.0),
            n["served"].as_u64().unwrap_or(0),
            n["address"].as_str().unwrap_or("?"),
        );
    }
    println!(
        "(* = calibrating or circuit open, ! = held: other nodes serve the id as another kind; \
         no user traffic either way)"
    );
    let known = v["known"].as_array().map_or(0, Vec::len);
    println!("{known} node(s) in the registry database");
    Ok(())
}

/// `NODE,POOL,TREASURY` basis points summing to 10000.
fn parse_split(s: &str) -> Result<lattice_ledger::Split, String> {
    let parts: Vec<u16> = s
        .split(',')
        .map(|p| p.trim().parse::<u16>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("basis points are whole numbers: {e}"))?;
    let [node, pool, treasury] = parts[..] else {
        return Err("three numbers: NODE,POOL,TREASURY basis points".into());
    };
    lattice_ledger::Split::new(node, pool, treasury).map_err(|e| e.to_string())
}

/// This machine's hostname and Nexus's port: distinct between replicas on different machines or
/// ports, the same across one replica's restarts.
fn default_replica_id(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "nexus".to_owned());
    format!("{host}:{port}")
}

/// A child process of `lattice up`, killed when dropped.
struct Child(tokio::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

fn spawn_self(args: &[String]) -> Result<Child> {
    let exe = std::env::current_exe()?;
    let child = tokio::process::Command::new(exe)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    Ok(Child(child))
}

fn catalog_name(spec: &str) -> String {
    match ModelSpec::parse(spec) {
        Ok(ModelSpec::Catalog(e)) => e.name.to_owned(),
        _ => spec.to_owned(),
    }
}

async fn up(a: UpArgs) -> Result<()> {
    let store = ModelStore::from_env()?;
    let progress = Arc::new(TerminalProgress::new());
    let models = [&a.chat_model, &a.completion_model, &a.embedding_model];
    for m in models {
        let spec = ModelSpec::parse(m)?;
        store
            .pull(
                &spec,
                &PullOptions::default().with_progress(progress.clone()),
            )
            .await?;
    }
    let dir = cache_dir().join("up");
    std::fs::create_dir_all(&dir)?;
    let base = format!("http://{}", a.listen);
    let mut children = vec![spawn_self(&[
        "nexus".into(),
        "--listen".into(),
        a.listen.to_string(),
        "--db".into(),
        dir.join("nexus.db").display().to_string(),
        "--operator-key-file".into(),
        dir.join("operator.key").display().to_string(),
    ])?];
    for (i, model) in models.into_iter().enumerate() {
        let args: Vec<String> = [
            "node",
            "--nexus",
            &base,
            "--model",
            model,
            "--port",
            "0",
            "--threads",
            &a.threads.to_string(),
            "--parallel",
            "4",
            "--key",
            &dir.join(format!("node-{i}.key")).display().to_string(),
            "--label",
            &format!("local-{}", i + 1),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        children.push(spawn_self(&args)?);
    }
    let want = models.map(|m| catalog_name(m));
    eprintln!("waiting for the nodes to link and pass calibration…");
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        for c in &mut children {
            if let Ok(Some(status)) = c.0.try_wait() {
                bail!("a network process exited early ({status}); LATTICE_LOG=debug shows why");
            }
        }
        let models: Vec<String> = match client.get(format!("{base}/v1/models")).send().await {
            Ok(r) => r
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|v| v["data"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|m| m["id"].as_str().map(str::to_owned))
                .collect(),
            Err(_) => Vec::new(),
        };
        if want.iter().all(|w| models.contains(w)) {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("the network did not become healthy within 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let [chat, text, embedding] = &want;
    let key = std::fs::read_to_string(dir.join("operator.key"))
        .context("reading the operator API key")?;
    let key = key.trim();
    println!("listening on {base}");
    println!();
    println!(
        "Lattice is up: Nexus + 3 nodes ({chat}, {text}, {embedding}). OpenAI endpoint: {base}/v1"
    );
    println!(
        "Web UI: http://localhost:{}/ (passkeys need the name localhost, not 127.0.0.1)",
        a.listen.port()
    );
    println!("(Ctrl-C stops it)");
    println!();
    println!("API key of the local operator account (1,000 LAI): {key}");
    println!();
    println!("  export OPENAI_API_KEY={key}");
    println!();
    println!(
        "  curl {base}/v1/chat/completions -H \"Authorization: Bearer $OPENAI_API_KEY\" -H 'Content-Type: application/json' \\"
    );
    println!(
        "    -d '{{\"model\":\"{chat}\",\"temperature\":0,\"messages\":[{{\"role\":\"user\",\"content\":\"Which city is the capital of France?\"}}]}}'"
    );
    println!();
    println!(
        "  curl {base}/v1/completions -H \"Authorization: Bearer $OPENAI_API_KEY\" -H 'Content-Type: application/json' \\"
    );
    println!("    -d '{{\"model\":\"{text}\",\"prompt\":\"Once upon a time\",\"max_tokens\":32}}'");
    println!();
    println!(
        "  curl {base}/v1/embeddings -H \"Authorization: Bearer $OPENAI_API_KEY\" -H 'Content-Type: application/json' \\"
    );
    println!(
        "    -d '{{\"model\":\"{embedding}\",\"input\":[\"The cat sits on the mat.\",\"A cat is sitting on a mat.\"]}}'"
    );
    println!();
    // The setup's venv has the `openai` client; a system python3 usually has not.
    let venv = cache_dir().join("venv/bin/python");
    let python = if venv.exists() {
        venv.display().to_string()
    } else {
        "python3".to_owned()
    };
    println!(
        "  {python} -c \"from openai import OpenAI; c = OpenAI(base_url='{base}/v1'); print(c.chat.completions.create(model='{chat}', messages=[{{'role':'user','content':'Hello!'}}]).choices[0].message.content)\""
    );
    println!();
    // `./lattice` (the wrapper that set up and built this binary) says where it is.
    let lattice = std::env::var("LATTICE_LAUNCHER").unwrap_or_else(|_| "lattice".to_owned());
    println!("  {lattice} status --nexus {base}");
    println!(
        "  curl {base}/lattice/v1/chain   # the embedded chain: contracts, settlement batches"
    );
    shutdown_signal().await;
    drop(children);
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = term => {} }
}
