//! `lattice`: one binary for model management, the inference node and the local network.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use lattice_engine::Engine;
use lattice_engine::upstream::{UpstreamConfig, UpstreamEngine};
use lattice_engine_llama::{LlamaConfig, LlamaEngine};
use lattice_models::{ModelSpec, ModelStore, PullOptions, TerminalProgress};

#[derive(Parser)]
#[command(
    name = "lattice",
    version,
    about = "Lattice: a decentralized network for open-source LLM inference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local network and print its OpenAI endpoint (today: one node serving the default model).
    Up(UpArgs),
    /// Run an inference node.
    Node(NodeArgs),
    /// Manage local model files.
    #[command(subcommand)]
    Model(ModelCommand),
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
    /// Address the endpoint listens on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Model to serve (catalog name, `hf:` spec or GGUF path).
    #[arg(long, default_value = lattice_models::DEFAULT_MODEL)]
    model: String,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Args)]
struct NodeArgs {
    /// Serve on this machine only, without joining a Nexus.
    #[arg(long)]
    standalone: bool,
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
    /// Decode threads (default: available cores, at most 8).
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
    init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Up(a) => up(a).await,
            Command::Node(a) => node(a).await,
            Command::Model(m) => model(m).await,
        }
    })
}

fn init_tracing() {
    // llama.cpp is chatty at info level; its warnings still come through.
    let filter = tracing_subscriber::EnvFilter::try_from_env("LATTICE_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,llama-cpp-2=warn,llama_cpp_2=warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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
                    "{:<28} {:>6} {:>10} MB  {:<10} {}",
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

/// Loads the engine for `--model` (pulling it first if needed) or connects to `--upstream`.
async fn build_engine(
    model: Option<&str>,
    model_id: Option<String>,
    upstream: Option<(String, Option<String>, Option<String>)>,
    e: &EngineArgs,
) -> Result<Arc<dyn Engine>> {
    if let Some((base_url, upstream_model, api_key)) = upstream {
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

async fn serve(
    engine: Arc<dyn Engine>,
    addr: SocketAddr,
    limits: lattice_http::Limits,
) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let bound = listener.local_addr()?;
    let app = lattice_http::router(engine, limits, "lattice_node");
    // The line tests and scripts wait for; printed only once the socket accepts connections.
    println!("listening on http://{bound}");
    lattice_http::serve(listener, app, shutdown_signal()).await?;
    Ok(bound)
}

async fn node(a: NodeArgs) -> Result<()> {
    if !a.standalone {
        bail!(
            "joining a Nexus is not available yet: run with --standalone to serve on this machine"
        );
    }
    let upstream = a
        .upstream
        .clone()
        .map(|u| (u, a.upstream_model.clone(), a.upstream_api_key.clone()));
    let engine = build_engine(a.model.as_deref(), a.model_id.clone(), upstream, &a.engine).await?;
    let addr: SocketAddr = format!("{}:{}", a.host, a.port)
        .parse()
        .with_context(|| format!("invalid --host/--port {}:{}", a.host, a.port))?;
    let limits = lattice_http::Limits {
        max_body_bytes: a.max_body_bytes,
        max_in_flight: a.max_in_flight,
        ..lattice_http::Limits::default()
    };
    serve(engine, addr, limits).await?;
    Ok(())
}

async fn up(a: UpArgs) -> Result<()> {
    let engine = build_engine(Some(&a.model), None, None, &a.engine).await?;
    let model_id = engine
        .models()
        .first()
        .map(|m| m.id.clone())
        .unwrap_or_default();
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    let bound = listener.local_addr()?;
    let app = lattice_http::router(engine, lattice_http::Limits::default(), "lattice_node");
    println!("listening on http://{bound}");
    println!();
    println!("Lattice is up. OpenAI-compatible endpoint: http://{bound}/v1   (Ctrl-C stops it)");
    println!();
    println!("  curl http://{bound}/v1/chat/completions -H 'Content-Type: application/json' \\");
    println!(
        "    -d '{{\"model\":\"{model_id}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'"
    );
    println!();
    println!(
        "  python3 -c \"from openai import OpenAI; c = OpenAI(base_url='http://{bound}/v1', api_key='none'); \\"
    );
    println!(
        "    print(c.chat.completions.create(model='{model_id}', messages=[{{'role':'user','content':'Hello!'}}]).choices[0].message.content)\""
    );
    lattice_http::serve(listener, app, shutdown_signal()).await?;
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
    tracing::info!("shutting down");
}
