//! Nexus, the coordinator: one OpenAI-compatible endpoint over many nodes. Nodes dial in over a
//! persistent link; Nexus routes each request to the best healthy node and fails over.

mod answered;
mod api;
mod billing;
mod db;
mod health;
mod link;
mod network;
mod node_tokens;
mod onchain;
mod receipts;
mod registry;
mod settlement;
mod withdrawals;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use lattice_accounts::{Accounts, AccountsConfig, StoreError};
use lattice_ledger::{Money, Op, Split};
use tokio::sync::Notify;

pub use db::KnownNode;
pub use health::{Canary, builtin_canary};
pub use network::Failover;
pub use registry::{ModelStatus, NodeStatus};
pub use settlement::{
    ChainSettings, Mismatch, Pass, Reconciliation, SettleError, StakePolicy, reconcile,
};

use crate::billing::Billing;
use crate::db::Db;
use crate::network::NetworkEngine;
use crate::registry::Registry;

#[derive(Debug, Clone)]
pub struct NexusConfig {
    /// `sqlite://PATH` (created if missing), `sqlite::memory:` or `postgres://…`.
    pub database_url: String,
    /// Require API keys and charge credits (off: an open endpoint, for private clusters and
    /// benchmarks).
    pub billing: bool,
    pub accounts: AccountsConfig,
    /// How charges are divided between the node, its staking pool and the treasury.
    pub split: Split,
    /// "Sign in with Google" or any OpenID Connect issuer (discovered at start).
    pub oidc: Option<lattice_accounts::OidcConfig>,
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
    /// Refuse nodes that register without a valid node token (a revoked or unknown token is
    /// refused either way).
    pub require_node_token: bool,
}

impl Default for NexusConfig {
    fn default() -> Self {
        Self {
            database_url: "sqlite::memory:".into(),
            billing: true,
            accounts: AccountsConfig::default(),
            split: Split::default(),
            oidc: None,
            limits: lattice_http::Limits::default(),
            failover: Failover::default(),
            probe_interval: Duration::from_secs(30),
            probe_tick: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(30),
            breaker_threshold: 3,
            breaker_cooldown: Duration::from_secs(15),
            canaries: HashMap::new(),
            require_node_token: false,
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
    accounts: Arc<Accounts>,
    oidc: Option<lattice_accounts::OidcProvider>,
    health_kick: Notify,
    chain: Option<ChainSettings>,
    reconciliation: std::sync::Mutex<Option<Reconciliation>>,
    /// Charges waiting for their batch signature, per user.
    unsettled: Arc<billing::Unsettled>,
    /// The last `/lattice/v1/chain/nodes` answer (public, and up to hundreds of chain reads).
    chain_nodes: onchain::NodesCache,
}

/// Credit given to the local operator account that `lattice up` creates.
const OPERATOR_CREDIT_LAI: u64 = 1_000;

impl Nexus {
    /// A Nexus; with `chain`, it settles to the protocol contracts and checks node stake.
    pub async fn new(
        mut config: NexusConfig,
        chain: Option<ChainSettings>,
    ) -> Result<Arc<Self>, StoreError> {
        // Settlement pays nodes, pools and the treasury by the chain's (governed) split: the
        // off-chain ledger charges by the same one, or a node's earnings here would not be what
        // it can withdraw there.
        if let Some(c) = &chain {
            let s = c.protocol.split().await.map_err(|e| {
                StoreError::Config(format!("cannot read the fee split from the chain: {e}"))
            })?;
            let onchain = Split::new(s.node_bps, s.pool_bps, s.treasury_bps)
                .map_err(|e| StoreError::Config(format!("the chain's fee split: {e}")))?;
            if onchain != config.split {
                tracing::info!(
                    node_bps = s.node_bps,
                    pool_bps = s.pool_bps,
                    treasury_bps = s.treasury_bps,
                    "charging by the chain's fee split, not the configured one"
                );
                config.split = onchain;
            }
        }
        let store = lattice_accounts::Db::open(&config.database_url).await?;
        let db = Db::new(&store);
        let accounts = Arc::new(Accounts::open(store, config.accounts.clone()).await?);
        let oidc = match config.oidc.clone() {
            Some(c) => Some(lattice_accounts::OidcProvider::discover(c).await?),
            None => None,
        };
        let registry = Arc::new(Registry::new(
            config.breaker_threshold,
            config.breaker_cooldown,
        ));
        Ok(Arc::new(Self {
            config,
            registry,
            db,
            accounts,
            oidc,
            health_kick: Notify::new(),
            chain,
            reconciliation: std::sync::Mutex::new(None),
            unsettled: Arc::default(),
            chain_nodes: onchain::NodesCache::default(),
        }))
    }

    /// Waits (briefly) until the answers `user` already received are charged: their charges wait
    /// for the nodes' batch signatures, and a user's own reads should include them.
    pub(crate) async fn settled(&self, user: &str) {
        self.unsettled.wait_user(user, Duration::from_secs(2)).await;
    }

    /// Waits (briefly) until the answers a node already served are charged (its earnings).
    pub(crate) async fn node_settled(&self, node: &str) {
        self.unsettled.wait_node(node, Duration::from_secs(2)).await;
    }

    pub fn accounts(&self) -> &Arc<Accounts> {
        &self.accounts
    }

    /// An API key for the local operator account (created with starter credit on first use),
    /// kept in `path` (mode 0600) so `lattice up` can print a working example.
    pub async fn operator_key(&self, path: &std::path::Path) -> Result<String, StoreError> {
        if let Ok(existing) = std::fs::read_to_string(path) {
            let existing = existing.trim().to_owned();
            if self.accounts.authenticate(&existing).await?.is_some() {
                return Ok(existing);
            }
        }
        let identity = lattice_accounts::Identity {
            kind: "local".into(),
            subject: "operator".into(),
            detail: None,
        };
        let s = self
            .accounts
            .sign_in(&identity, None, None, "local")
            .await?;
        let amount = Money::from_lai(OPERATOR_CREDIT_LAI).unwrap_or_default();
        self.accounts
            .ledger()
            .post(Op::Faucet {
                op: "bootstrap:operator".into(),
                user: s.user.id.clone(),
                amount,
            })
            .await
            .map_err(|e| StoreError::Ledger(e.to_string()))?;
        let key = self
            .accounts
            .create_key(&s.user.id, "lattice up", None, None)
            .await?;
        lattice_link::write_private(path, &key.secret)
            .map_err(|e| StoreError::Config(format!("cannot write {}: {e}", path.display())))?;
        Ok(key.secret)
    }

    /// The HTTP application: the OpenAI API over the network, the node link and status.
    pub fn router(self: &Arc<Self>) -> Router {
        let billing = self.config.billing.then(|| {
            Arc::new(Billing {
                accounts: self.accounts.clone(),
                split: self.config.split,
                chain_id: self.config.accounts.chain_id,
                unsettled: self.unsettled.clone(),
            })
        });
        let engine = Arc::new(NetworkEngine::new(
            self.registry.clone(),
            self.config.failover.clone(),
            billing,
        ));
        let auth: Option<Arc<dyn lattice_http::Authenticator>> = self
            .config
            .billing
            .then(|| Arc::new(api::NexusAuth(self.accounts.clone())) as _);
        let lattice = Router::new()
            .route(lattice_link::LINK_PATH, get(link::upgrade))
            .route("/lattice/v1/nodes", get(nodes))
            .route("/lattice/v1/chain", get(chain))
            .route("/lattice/v1/chain/nodes", get(onchain::nodes))
            .route(
                "/lattice/v1/chain/accounts/{address}",
                get(onchain::account),
            )
            .route("/lattice/v1/chain/calls/{action}", get(onchain::calls))
            .route("/lattice/v1/account/chain", get(onchain::my_account))
            .route(
                "/lattice/v1/nodes/{address}/earnings",
                get(api::node_earnings),
            )
            .route("/lattice/v1/auth/siwe/nonce", get(api::siwe_nonce))
            .route("/lattice/v1/auth/siwe", post(api::siwe_sign_in))
            .route("/lattice/v1/auth/logout", post(api::sign_out))
            .route("/lattice/v1/auth/oidc/start", get(api::oidc_start))
            .route("/lattice/v1/auth/oidc/callback", get(api::oidc_callback))
            .route(
                "/lattice/v1/auth/passkey/register/start",
                post(api::passkey_register_start),
            )
            .route(
                "/lattice/v1/auth/passkey/register/finish",
                post(api::passkey_register_finish),
            )
            .route(
                "/lattice/v1/auth/passkey/login/start",
                post(api::passkey_login_start),
            )
            .route(
                "/lattice/v1/auth/passkey/login/finish",
                post(api::passkey_login_finish),
            )
            .route(
                "/lattice/v1/account",
                get(api::account).patch(api::update_account),
            )
            .route("/lattice/v1/account/faucet", post(api::faucet))
            .route(
                "/lattice/v1/account/withdrawals",
                get(withdrawals::list).post(withdrawals::create),
            )
            .route(
                "/lattice/v1/keys",
                get(api::list_keys).post(api::create_key),
            )
            .route("/lattice/v1/keys/{id}", delete(api::revoke_key))
            .route(
                "/lattice/v1/account/node-tokens",
                get(node_tokens::list).post(node_tokens::create),
            )
            .route(
                "/lattice/v1/account/node-tokens/{id}",
                delete(node_tokens::revoke),
            )
            .route("/lattice/v1/account/nodes", get(node_tokens::my_nodes))
            .route("/lattice/v1/usage", get(api::usage))
            .route(
                "/lattice/v1/history",
                get(api::conversations).delete(api::delete_history),
            )
            .route(
                "/lattice/v1/history/{id}",
                get(api::conversation).delete(api::delete_conversation),
            )
            .layer(axum::extract::DefaultBodyLimit::max(api::MAX_BODY_BYTES))
            .with_state(self.clone());
        let web = lattice_web::Features {
            oidc: self.oidc.is_some(),
            passkeys: self.accounts.config().passkeys.is_some(),
        };
        lattice_http::router_with_auth(engine, self.config.limits.clone(), "lattice_nexus", auth)
            .layer(axum::middleware::from_fn(answered::layer))
            .merge(lattice)
            .merge(lattice_web::router(web))
    }

    /// Starts background work (health probes) and serves until `shutdown`.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let health = tokio::spawn(health::run(self.clone()));
        let sweeper = tokio::spawn(sweep_holds(self.accounts.clone()));
        // Requests record their nodes' speeds; the routing snapshot takes them in from here, off
        // the request path.
        let registry = self.registry.clone();
        let republisher = tokio::spawn(async move {
            loop {
                tokio::time::sleep(registry::REPUBLISH_EVERY).await;
                registry.republish_if_changed();
            }
        });
        let settler = self
            .chain
            .clone()
            .filter(|c| c.settle)
            .map(|c| tokio::spawn(settlement::run(self.clone(), c)));
        let app = self.router();
        let r = lattice_http::serve(listener, app, shutdown).await;
        health.abort();
        sweeper.abort();
        republisher.abort();
        // Charges of the last requests are written behind them: make them durable before exiting.
        if let Err(e) = self.accounts.ledger().sync().await {
            tracing::error!(error = %e, "ledger not fully written at shutdown");
        }
        if let Some(s) = settler {
            s.abort();
        }
        r
    }
}

#[derive(serde::Serialize)]
struct NodesResponse {
    online: Vec<NodeStatus>,
    known: Vec<KnownNode>,
}

#[derive(serde::Serialize)]
struct ChainResponse {
    chain_id: u64,
    block: Option<u64>,
    deployment: lattice_chain::Deployment,
    /// Batches recorded but not yet confirmed on-chain.
    pending_batches: usize,
    batches: Vec<lattice_accounts::ChainBatch>,
    reconciliation: Option<Reconciliation>,
}

/// The chain Nexus settles to: contracts, recent batches and the last reconciliation.
async fn chain(State(nexus): State<Arc<Nexus>>) -> axum::response::Response {
    let Some(c) = &nexus.chain else {
        return lattice_http::error_response(&lattice_api::ApiError::new(
            404,
            "invalid_request_error",
            Some("no_chain"),
            "this Nexus is not connected to a chain",
        ));
    };
    let batches = match nexus.accounts.recent_batches(20).await {
        Ok(b) => b,
        Err(e) => {
            return lattice_http::error_response(&lattice_api::ApiError::internal(e.to_string()));
        }
    };
    let pending_batches = match nexus.accounts.unconfirmed_batches().await {
        Ok(p) => p.len(),
        Err(e) => {
            return lattice_http::error_response(&lattice_api::ApiError::internal(e.to_string()));
        }
    };
    let reconciliation = nexus
        .reconciliation
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    axum::Json(ChainResponse {
        chain_id: c.protocol.chain().chain_id(),
        block: c.protocol.chain().block_number().await.ok(),
        deployment: c.protocol.deployment().clone(),
        pending_batches,
        batches,
        reconciliation,
    })
    .into_response()
}

async fn nodes(State(nexus): State<Arc<Nexus>>) -> impl IntoResponse {
    let online = nexus.registry.status();
    let known = nexus.db.known_nodes().await;
    axum::Json(NodesResponse { online, known })
}

/// Releases holds that outlived their time-to-live (a crashed replica's, or lost releases).
async fn sweep_holds(accounts: Arc<Accounts>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        match accounts.ledger().sweep_holds(false).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(released = n, "released expired holds"),
            Err(e) => tracing::error!(error = %e, "sweeping holds"),
        }
    }
}
