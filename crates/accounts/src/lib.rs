//! Nexus's accounts and money store: users and the ways they sign in (SIWE, passkeys, OpenID
//! Connect — all through [`Accounts::sign_in`]), sessions, API keys, the faucet, the ledger
//! (see [`ledger`]), withdrawals to the chain, usage and opt-in chat history. SQLite by
//! default, PostgreSQL when configured — the same migrations and queries.

mod db;
mod history;
mod keys;
pub mod ledger;
mod node_tokens;
mod oidc;
mod passkey;
mod settlement;
pub mod siwe;
mod usage;
mod users;
mod withdrawals;

use std::time::Duration;

use lattice_ledger::{Account, Money};
use serde::Serialize;

pub use db::{Backend, Db};
pub use history::{Conversation, StoredMessage};
pub use keys::{ApiKey, KEY_PREFIX, NewKey};
pub use ledger::{
    Audit, LedgerConfig, LedgerMode, LedgerStore, PostError, ReceiptBatch, UsageRecord,
};
pub use node_tokens::{
    MAX_NODE_TOKEN_LABEL, MAX_NODE_TOKENS_PER_USER, NODE_TOKEN_PREFIX, NewNodeToken, NodeOwner,
    NodeToken, NodeTokenRefused,
};
pub use oidc::{OidcConfig, OidcProvider};
pub use passkey::PasskeyConfig;
pub use settlement::{BatchEntry, BatchKind, BatchLimits, ChainBatch, ChainPosition, Expected};
pub use siwe::{SiweError, SiweMessage};
pub use usage::{StoredReceipt, UsageGroup, UsageRow};
pub use users::{FaucetOutcome, Identity, SESSION_PREFIX, SignIn, User};
/// The WebAuthn JSON types browsers exchange with the passkey endpoints.
pub use webauthn_rs::prelude::{
    CreationChallengeResponse, PublicKeyCredential, RegisterPublicKeyCredential,
    RequestChallengeResponse,
};
pub use withdrawals::{WithdrawError, Withdrawal, WithdrawalLimits, WithdrawalStatus};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {url}: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Config(String),
    #[error("no randomness available: {0}")]
    Random(String),
    #[error("{0}")]
    Limit(String),
    #[error("{0}")]
    Conflict(String),
    #[error("database error: {0}")]
    Native(String),
    #[error("ledger: {0}")]
    Ledger(String),
    #[error("sign-in refused: {0}")]
    SignIn(String),
}

#[derive(Debug, Clone)]
pub struct AccountsConfig {
    /// Starter credit for each new identity (0 disables the faucet).
    pub faucet_amount: Money,
    pub faucet_per_client_per_hour: u32,
    pub faucet_per_hour: u32,
    pub session_ttl: Duration,
    /// How long an authenticated API key is trusted without a database read.
    pub key_cache_ttl: Duration,
    /// Secret from which custodial addresses are derived (kept in a file beside the database).
    pub master_secret: [u8; 32],
    /// `host[:port]` users sign in at (SIWE messages must name it) and the chain id.
    pub siwe_domain: String,
    pub chain_id: u64,
    /// Passkey relying party; `None` turns passkeys off.
    pub passkeys: Option<PasskeyConfig>,
    pub ledger: LedgerConfig,
    pub withdrawals: WithdrawalLimits,
}

impl Default for AccountsConfig {
    fn default() -> Self {
        Self {
            faucet_amount: Money::from_units(10 * lattice_ledger::UNITS_PER_LAI),
            faucet_per_client_per_hour: 5,
            faucet_per_hour: 1_000,
            session_ttl: Duration::from_secs(7 * 24 * 3600),
            key_cache_ttl: Duration::from_secs(2),
            master_secret: [0; 32],
            siwe_domain: "127.0.0.1".into(),
            chain_id: 31337,
            passkeys: None,
            ledger: LedgerConfig::default(),
            withdrawals: WithdrawalLimits::default(),
        }
    }
}

/// Who is calling the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user_id: String,
    pub address: String,
    /// Set when the call is authenticated by an API key (not a browser session).
    pub key: Option<KeyInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: String,
    pub spend_limit: Option<Money>,
    pub rpm_limit: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Balance {
    pub available: Money,
    pub held: Money,
}

pub struct Accounts {
    pub(crate) db: Db,
    pub(crate) config: AccountsConfig,
    pub(crate) ledger: LedgerStore,
    pub(crate) webauthn: Option<webauthn_rs::Webauthn>,
    keys: std::sync::Arc<keys::KeyCache>,
}

impl Accounts {
    /// Starts the ledger writer and releases holds this replica left behind when it stopped.
    pub async fn open(db: Db, config: AccountsConfig) -> Result<Self, StoreError> {
        let webauthn = config.passkeys.as_ref().map(passkey::build).transpose()?;
        let ledger = LedgerStore::start(db.clone(), config.ledger.clone()).await?;
        if config.ledger.recover_holds {
            let released = ledger.sweep_holds(true).await?;
            if released > 0 {
                tracing::warn!(released, "released holds left by a previous run");
            }
        }
        Ok(Self {
            keys: std::sync::Arc::new(keys::KeyCache::new(config.key_cache_ttl)),
            webauthn,
            db,
            config,
            ledger,
        })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn ledger(&self) -> &LedgerStore {
        &self.ledger
    }

    pub fn config(&self) -> &AccountsConfig {
        &self.config
    }

    pub async fn balance(&self, user_id: &str) -> Result<Balance, StoreError> {
        Ok(Balance {
            available: self
                .ledger
                .balance(&Account::User(user_id.to_owned()))
                .await?,
            held: self
                .ledger
                .balance(&Account::Held(user_id.to_owned()))
                .await?,
        })
    }

    /// Authenticates a bearer token: an API key (`lk_…`) or a session (`ls_…`).
    pub async fn authenticate(&self, token: &str) -> Result<Option<Caller>, StoreError> {
        if token.starts_with(KEY_PREFIX) {
            return keys::authenticate(&self.db, &self.keys, token).await;
        }
        Ok(self.session_user(token).await?.map(|u| Caller {
            user_id: u.id,
            address: u.address,
            key: None,
        }))
    }

    /// Counts a request against the caller's key rate limit; false when over it.
    pub fn admit(&self, caller: &Caller) -> bool {
        caller.key.as_ref().is_none_or(|k| self.keys.admit(k))
    }

    pub async fn create_key(
        &self,
        user_id: &str,
        name: &str,
        spend_limit: Option<Money>,
        rpm_limit: Option<u32>,
    ) -> Result<NewKey, StoreError> {
        keys::create(&self.db, user_id, name, spend_limit, rpm_limit).await
    }

    pub async fn list_keys(&self, user_id: &str) -> Result<Vec<ApiKey>, StoreError> {
        keys::list(&self.db, user_id).await
    }

    pub async fn revoke_key(&self, user_id: &str, key_id: &str) -> Result<bool, StoreError> {
        let revoked = keys::revoke(&self.db, user_id, key_id).await?;
        self.keys.forget_key(key_id);
        Ok(revoked)
    }

    /// A fresh single-use nonce for a SIWE message (valid 10 minutes).
    pub async fn siwe_nonce(&self) -> Result<String, StoreError> {
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        sqlx::query(
            "INSERT INTO challenges (id, purpose, data, expires_at) VALUES ($1, 'siwe', '', $2)",
        )
        .bind(&nonce)
        .bind(db::now() + 600)
        .execute(&self.db.pool)
        .await?;
        sqlx::query("DELETE FROM challenges WHERE expires_at < $1")
            .bind(db::now())
            .execute(&self.db.pool)
            .await?;
        Ok(nonce)
    }

    /// Verifies a signed SIWE message and signs its wallet in (creating the account on first
    /// use, or linking the wallet to `link_to`). The nonce is consumed: a replay fails.
    pub async fn siwe_sign_in(
        &self,
        message: &str,
        signature: &str,
        link_to: Option<&str>,
        client: &str,
    ) -> Result<SignIn, StoreError> {
        let refuse = |e: SiweError| StoreError::SignIn(e.to_string());
        let msg = SiweMessage::parse(message).map_err(refuse)?;
        let address = msg
            .verify(
                message,
                signature,
                &self.config.siwe_domain,
                self.config.chain_id,
                time::OffsetDateTime::now_utc(),
            )
            .map_err(refuse)?;
        let used = sqlx::query(
            "DELETE FROM challenges WHERE id = $1 AND purpose = 'siwe' AND expires_at > $2",
        )
        .bind(&msg.nonce)
        .bind(db::now())
        .execute(&self.db.pool)
        .await?;
        if used.rows_affected() != 1 {
            return Err(StoreError::SignIn(
                "unknown, expired or already used nonce".into(),
            ));
        }
        let identity = Identity {
            kind: "siwe".into(),
            subject: address.clone(),
            detail: None,
        };
        self.sign_in(&identity, Some(&address), link_to, client)
            .await
    }
}
