//! Users, the identities they sign in with, sessions, the faucet and chat history.

use lattice_ledger::{Applied, Money, Op};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::db::{Backend, now};
use crate::keys::{hash_token, random_token};
use crate::{Accounts, StoreError};

/// The transaction-scoped advisory lock that serialises faucet grants on PostgreSQL ("LFCT").
const FAUCET_LOCK_KEY: i64 = 0x4c46_4354;

pub const SESSION_PREFIX: &str = "ls_";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    pub id: String,
    /// On-chain address: the user's wallet, or one Nexus derived for them (custodial).
    pub address: String,
    pub custodial: bool,
    pub keep_history: bool,
    pub created_at: i64,
}

/// A way to sign in: `("siwe", address)`, `("passkey", credential id)`, `("oidc:ISSUER", sub)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub kind: String,
    pub subject: String,
    /// Free-form (an email claim, a stored passkey).
    #[serde(skip)]
    pub detail: Option<String>,
}

impl Identity {
    pub fn key(&self) -> String {
        format!("{}:{}", self.kind, self.subject)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum FaucetOutcome {
    Granted { amount: Money },
    AlreadyClaimed,
    RateLimited,
}

#[derive(Debug, Clone, Serialize)]
pub struct SignIn {
    pub user: User,
    /// Session token (also set as a cookie by the HTTP layer).
    #[serde(skip)]
    pub session: String,
    pub new_user: bool,
    pub faucet: FaucetOutcome,
}

pub(crate) fn user_from_row(r: &sqlx::any::AnyRow) -> Result<User, StoreError> {
    Ok(User {
        id: r.try_get("id")?,
        address: r.try_get("address")?,
        custodial: r.try_get::<Option<String>, _>("custodial_key")?.is_some(),
        keep_history: r.try_get::<i64, _>("keep_history")? != 0,
        created_at: r.try_get("created_at")?,
    })
}

impl Accounts {
    /// The custodial address of a user: a key derived from Nexus's master secret and the user
    /// id, so the database never holds a private key.
    fn custodial_address(&self, user_id: &str) -> Result<String, StoreError> {
        for counter in 0u32..16 {
            let mut h = Sha256::new();
            h.update(b"lattice custodial v1\0");
            h.update(self.config.master_secret);
            h.update(user_id.as_bytes());
            h.update(counter.to_be_bytes());
            let bytes: [u8; 32] = h.finalize().into();
            if let Some(k) = lattice_link::NodeKey::from_secret(&bytes) {
                return Ok(k.address());
            }
        }
        Err(StoreError::Random("no valid custodial key".into()))
    }

    pub async fn user(&self, user_id: &str) -> Result<Option<User>, StoreError> {
        let r = sqlx::query(
            "SELECT id, address, custodial_key, keep_history, created_at FROM users WHERE id = $1",
        )
        .bind(user_id)
        .fetch_optional(&self.db.pool)
        .await?;
        r.as_ref().map(user_from_row).transpose()
    }

    pub async fn identities(&self, user_id: &str) -> Result<Vec<Identity>, StoreError> {
        let rows = sqlx::query(
            "SELECT kind, subject FROM identities WHERE user_id = $1 ORDER BY created_at",
        )
        .bind(user_id)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Identity {
                    kind: r.try_get("kind")?,
                    subject: r.try_get("subject")?,
                    detail: None,
                })
            })
            .collect()
    }

    /// Signs in with `identity`: finds its user, or links it to `link_to` (a signed-in user
    /// adding a way to sign in), or creates a user (with `wallet` as its address when the
    /// identity is a wallet). New identities get the faucet once. Returns a fresh session.
    pub async fn sign_in(
        &self,
        identity: &Identity,
        wallet: Option<&str>,
        link_to: Option<&str>,
        client: &str,
    ) -> Result<SignIn, StoreError> {
        let existing =
            sqlx::query("SELECT user_id FROM identities WHERE kind = $1 AND subject = $2")
                .bind(&identity.kind)
                .bind(&identity.subject)
                .fetch_optional(&self.db.pool)
                .await?;
        let (user_id, new_user, new_identity) = match (existing, link_to) {
            (Some(r), Some(link)) => {
                let owner: String = r.try_get("user_id")?;
                if owner != link {
                    return Err(StoreError::Conflict(
                        "this sign-in method already belongs to another account".into(),
                    ));
                }
                (owner, false, false)
            }
            (Some(r), None) => (r.try_get::<String, _>("user_id")?, false, false),
            (None, Some(link)) => (link.to_owned(), false, true),
            (None, None) => {
                let id = format!("usr_{}", uuid::Uuid::new_v4().simple());
                let (address, custodial) = match wallet {
                    Some(w) => (w.to_lowercase(), None),
                    None => (self.custodial_address(&id)?, Some("derived".to_owned())),
                };
                sqlx::query(
                    "INSERT INTO users (id, address, custodial_key, keep_history, created_at)
                     VALUES ($1, $2, $3, 0, $4)",
                )
                .bind(&id)
                .bind(&address)
                .bind(custodial)
                .bind(now())
                .execute(&self.db.pool)
                .await
                .map_err(|e| match e {
                    sqlx::Error::Database(d) if d.is_unique_violation() => {
                        StoreError::Conflict("an account with this address already exists".into())
                    }
                    e => e.into(),
                })?;
                (id, true, true)
            }
        };
        if new_identity {
            sqlx::query(
                "INSERT INTO identities (kind, subject, user_id, detail, created_at)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&identity.kind)
            .bind(&identity.subject)
            .bind(&user_id)
            .bind(&identity.detail)
            .bind(now())
            .execute(&self.db.pool)
            .await?;
        }
        // Local operator accounts are funded by their operator, not the public faucet.
        let faucet = if new_identity && identity.kind != "local" {
            self.grant_faucet(&identity.key(), &user_id, client).await?
        } else {
            FaucetOutcome::AlreadyClaimed
        };
        let session = self.create_session(&user_id).await?;
        let user = self
            .user(&user_id)
            .await?
            .ok_or_else(|| StoreError::Corrupt("user vanished".into()))?;
        Ok(SignIn {
            user,
            session,
            new_user,
            faucet,
        })
    }

    async fn create_session(&self, user_id: &str) -> Result<String, StoreError> {
        let token = random_token(SESSION_PREFIX)?;
        let t = now();
        let ttl = i64::try_from(self.config.session_ttl.as_secs()).unwrap_or(i64::MAX);
        sqlx::query(
            "INSERT INTO sessions (token_hash, user_id, expires_at, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(hash_token(&token))
        .bind(user_id)
        .bind(t.saturating_add(ttl))
        .bind(t)
        .execute(&self.db.pool)
        .await?;
        Ok(token)
    }

    /// The user of a live session.
    pub async fn session_user(&self, token: &str) -> Result<Option<User>, StoreError> {
        if !token.starts_with(SESSION_PREFIX) || token.len() > 128 {
            return Ok(None);
        }
        let r = sqlx::query(
            "SELECT u.id, u.address, u.custodial_key, u.keep_history, u.created_at
             FROM sessions s JOIN users u ON u.id = s.user_id
             WHERE s.token_hash = $1 AND s.expires_at > $2",
        )
        .bind(hash_token(token))
        .bind(now())
        .fetch_optional(&self.db.pool)
        .await?;
        r.as_ref().map(user_from_row).transpose()
    }

    pub async fn sign_out(&self, token: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
            .bind(hash_token(token))
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    /// Starter credit, once per identity, at most N per client address and M overall per hour.
    pub async fn grant_faucet(
        &self,
        identity: &str,
        user_id: &str,
        client: &str,
    ) -> Result<FaucetOutcome, StoreError> {
        let amount = self.config.faucet_amount;
        if amount.is_zero() {
            return Ok(FaucetOutcome::RateLimited);
        }
        let hour_ago = now() - 3600;
        // The limits are checked and the grant recorded in one write transaction (on PostgreSQL
        // under a lock of its own), so concurrent sign-ins cannot all pass the same count.
        let mut tx = self.db.begin_write().await?;
        if self.db.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(FAUCET_LOCK_KEY)
                .execute(&mut *tx)
                .await?;
        }
        let claimed = sqlx::query("SELECT identity FROM faucet_grants WHERE identity = $1")
            .bind(identity)
            .fetch_optional(&mut *tx)
            .await?;
        if claimed.is_some() {
            return Ok(FaucetOutcome::AlreadyClaimed);
        }
        let per_client: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM faucet_grants WHERE client = $1 AND created_at > $2",
        )
        .bind(client)
        .bind(hour_ago)
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        let overall: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM faucet_grants WHERE created_at > $1")
                .bind(hour_ago)
                .fetch_one(&mut *tx)
                .await?
                .try_get("n")?;
        if per_client >= i64::from(self.config.faucet_per_client_per_hour)
            || overall >= i64::from(self.config.faucet_per_hour)
        {
            return Ok(FaucetOutcome::RateLimited);
        }
        sqlx::query(
            "INSERT INTO faucet_grants (identity, user_id, client, amount, created_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(identity)
        .bind(user_id)
        .bind(client)
        .bind(amount.to_string())
        .bind(now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let op = Op::Faucet {
            op: format!("faucet:{identity}"),
            user: user_id.to_owned(),
            amount,
        };
        match self.ledger.post(op).await {
            Ok(Applied::Posted(_)) => Ok(FaucetOutcome::Granted { amount }),
            Ok(Applied::Duplicate) => Ok(FaucetOutcome::AlreadyClaimed),
            Err(e) => {
                // Undo the claim so it can be tried again.
                let _ = sqlx::query("DELETE FROM faucet_grants WHERE identity = $1")
                    .bind(identity)
                    .execute(&self.db.pool)
                    .await;
                Err(StoreError::Ledger(e.to_string()))
            }
        }
    }

    /// Claims the faucet for any of the user's identities that has not had it yet.
    pub async fn claim_faucet(
        &self,
        user_id: &str,
        client: &str,
    ) -> Result<FaucetOutcome, StoreError> {
        let mut outcome = FaucetOutcome::AlreadyClaimed;
        for id in self.identities(user_id).await? {
            match self.grant_faucet(&id.key(), user_id, client).await? {
                FaucetOutcome::AlreadyClaimed => continue,
                other => {
                    outcome = other;
                    break;
                }
            }
        }
        Ok(outcome)
    }

    pub async fn set_keep_history(&self, user_id: &str, keep: bool) -> Result<(), StoreError> {
        sqlx::query("UPDATE users SET keep_history = $1 WHERE id = $2")
            .bind(i64::from(keep))
            .bind(user_id)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }
}
