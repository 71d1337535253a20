//! Nexus, the coordinator: one OpenAI-compatible endpoint over many nodes. Nodes dial in over a
//! persistent link; Nexus routes each request to the best healthy node and fails over.

mod db;
mod health;
mod link;
mod network;
mod registry;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::Notify;

pub use db::{DbError, KnownNode};
pub use health::{Canary, builtin_canary};
pub use network::Failover;
pub use registry::{ModelStatus, NodeStatus};

use crate::db::Db;
use crate::network::NetworkEngine;
use crate::registry::Registry;

#[derive(Debug, Clone)]
pub struct NexusConfig {
    /// `sqlite://PATH` (created if missing) or `sqlite::memory:`.
    pub database_url: String,
    pub limits: lattice_http::Limits,
    pub failover: Failover,
    /// How often each admitted (node, model) is re-probed.
    pub probe_interval: Duration,
    /// How often the health loop looks for due probes.
    pub probe_tick: Duration,
    pub probe_timeout: Duration,
    /// Consecutive failures that open a node's circuit for a model.
    pub breaker_threshold: u32,
    pub breaker_cooldown: Duration,
    /// Canaries replacing or adding to the built-in ones, by model id.
    pub canaries: HashMap<String, Canary>,
}

impl Default for NexusConfig {
    fn default() -> Self {
        Self {
            database_url: "sqlite::memory:".into(),
            limits: lattice_http::Limits::default(),
            failover: Failover::default(),
            probe_interval: Duration::from_secs(30),
            probe_tick: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(30),
            breaker_threshold: 3,
            breaker_cooldown: Duration::from_secs(15),
            canaries: HashMap::new(),
        }
    }
}

impl NexusConfig {
    fn canary(&self, model: &str) -> Option<Canary> {
        self.canaries
            .get(model)
            .cloned()
            .or_else(|| builtin_canary(model))
    }
}

pub struct Nexus {
    config: NexusConfig,
    registry: Arc<Registry>,
    db: Db,
    health_kick: Notify,
}

impl Nexus {
    pub async fn new(config: NexusConfig) -> Result<Arc<Self>, DbError> {
        let db = Db::open(&config.database_url).await?;
        let registry = Arc::new(Registry::new(
            config.breaker_threshold,
            config.breaker_cooldown,
        ));
        Ok(Arc::new(Self {
            config,
            registry,
            db,
            health_kick: Notify::new(),
        }))
    }

    /// The HTTP application: the OpenAI API over the network, the node link and status.
    pub fn router(self: &Arc<Self>) -> Router {
        let engine = Arc::new(NetworkEngine::new(
            self.registry.clone(),
            self.config.failover.clone(),
        ));
        let lattice = Router::new()
            .route(lattice_link::LINK_PATH, get(link::upgrade))
            .route("/lattice/v1/nodes", get(nodes))
            .with_state(self.clone());
        lattice_http::router(engine, self.config.limits.clone(), "lattice_nexus").merge(lattice)
    }

    /// Starts background work (health probes) and serves until `shutdown`.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let health = tokio::spawn(health::run(self.clone()));
        let app = self.router();
        let r = lattice_http::serve(listener, app, shutdown).await;
        health.abort();
        r
    }
}

#[derive(serde::Serialize)]
struct NodesResponse {
    online: Vec<NodeStatus>,
    known: Vec<KnownNode>,
}

async fn nodes(State(nexus): State<Arc<Nexus>>) -> impl IntoResponse {
    let online = nexus.registry.status();
    let known = nexus.db.known_nodes().await;
    axum::Json(NodesResponse { online, known })
}
