//! Pre-registered node tokens: `lnt_` + 43 base64url characters (256 random bits), shown once,
//! stored as SHA-256 like API keys. A signed-in user creates one and starts
//! `lattice node --token …`; the first node address that registers with it is bound to it, which
//! makes the token's user the node's operator. A token binds one node address: another address
//! presenting it is refused. A revoked or unknown token is refused.

use serde::Serialize;
use sqlx::Row;

use crate::db::now;
use crate::keys::{hash_token, random_token};
use crate::{Accounts, StoreError};

pub const NODE_TOKEN_PREFIX: &str = "lnt_";
/// Node tokens per user at most (revoked ones included).
pub const MAX_NODE_TOKENS_PER_USER: i64 = 100;
/// Longest label of a node token, in bytes.
pub const MAX_NODE_TOKEN_LABEL: usize = 64;
/// Longest string accepted as a token before it is hashed (a real one is 47 bytes).
pub(crate) const MAX_NODE_TOKEN_LEN: usize = 128;

/// A node token as listed (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeToken {
    pub id: String,
    pub label: Option<String>,
    /// The first characters of the token, to recognise it.
    pub prefix: String,
    /// The node address that registered with it (lower-case), once one has.
    pub node_address: Option<String>,
    pub created_at: i64,
    pub bound_at: Option<i64>,
    /// Last time a node registered with this token.
    pub last_used_at: Option<i64>,
    /// Last time Nexus saw the bound node (its registry row), when it has.
    pub last_seen: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// The one time a token's secret is seen.
#[derive(Debug, Clone, Serialize)]
pub struct NewNodeToken {
    #[serde(flatten)]
    pub token: NodeToken,
    pub secret: String,
}

/// Whose node a registering address is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeOwner {
    pub token_id: String,
    pub user_id: String,
    /// The owner's on-chain address.
    pub user_address: String,
    /// This registration bound the address to the token (its first use).
    pub first_use: bool,
}

/// Why a node token does not admit a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeTokenRefused {
    #[error("unknown node token")]
    Unknown,
    #[error("this node token was revoked")]
    Revoked,
    #[error("this node token is bound to another node ({0})")]
    BoundToOther(String),
    #[error("this node is already bound to another live node token; revoke that one first")]
    NodeTaken,
}

fn token_from_row(r: &sqlx::any::AnyRow) -> Result<NodeToken, StoreError> {
    Ok(NodeToken {
        id: r.try_get("id")?,
        label: r.try_get("label")?,
        prefix: r.try_get("prefix")?,
        node_address: r.try_get("node_address")?,
        created_at: r.try_get("created_at")?,
        bound_at: r.try_get("bound_at")?,
        last_used_at: r.try_get("last_used_at")?,
        last_seen: r.try_get("last_seen")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

impl Accounts {
    pub async fn create_node_token(
        &self,
        user_id: &str,
        label: Option<&str>,
    ) -> Result<NewNodeToken, StoreError> {
        if label.is_some_and(|l| l.is_empty() || l.len() > MAX_NODE_TOKEN_LABEL) {
            return Err(StoreError::Config(format!(
                "a node token label is 1 to {MAX_NODE_TOKEN_LABEL} bytes"
            )));
        }
        let count: i64 = sqlx::query("SELECT COUNT(*) AS n FROM node_tokens WHERE user_id = $1")
            .bind(user_id)
            .fetch_one(&self.db.pool)
            .await?
            .try_get("n")?;
        if count >= MAX_NODE_TOKENS_PER_USER {
            return Err(StoreError::Limit(format!(
                "at most {MAX_NODE_TOKENS_PER_USER} node tokens per account"
            )));
        }
        let secret = random_token(NODE_TOKEN_PREFIX)?;
        let id = format!("nt_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        let prefix: String = secret.chars().take(10).collect();
        let t = now();
        sqlx::query(
            "INSERT INTO node_tokens (id, user_id, label, hash, prefix, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(user_id)
        .bind(label)
        .bind(hash_token(&secret))
        .bind(&prefix)
        .bind(t)
        .execute(&self.db.pool)
        .await?;
        Ok(NewNodeToken {
            token: NodeToken {
                id,
                label: label.map(str::to_owned),
                prefix,
                node_address: None,
                created_at: t,
                bound_at: None,
                last_used_at: None,
                last_seen: None,
                revoked_at: None,
            },
            secret,
        })
    }

    /// The user's node tokens, newest first, with the node bound to each.
    pub async fn list_node_tokens(&self, user_id: &str) -> Result<Vec<NodeToken>, StoreError> {
        let rows = sqlx::query(
            "SELECT t.id, t.label, t.prefix, t.node_address, t.created_at, t.bound_at,
                    t.last_used_at, t.revoked_at, n.last_seen
             FROM node_tokens t LEFT JOIN nodes n ON n.address = t.node_address
             WHERE t.user_id = $1 ORDER BY t.created_at DESC, t.id",
        )
        .bind(user_id)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter().map(token_from_row).collect()
    }

    /// Revokes a node token of `user_id`; returns the node address it had bound (the caller
    /// disconnects it), or None if there is no such live token.
    pub async fn revoke_node_token(
        &self,
        user_id: &str,
        token_id: &str,
    ) -> Result<Option<Option<String>>, StoreError> {
        let row = sqlx::query(
            "SELECT node_address FROM node_tokens
             WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
        )
        .bind(token_id)
        .bind(user_id)
        .fetch_optional(&self.db.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let address: Option<String> = row.try_get("node_address")?;
        let r = sqlx::query(
            "UPDATE node_tokens SET revoked_at = $1
             WHERE id = $2 AND user_id = $3 AND revoked_at IS NULL",
        )
        .bind(now())
        .bind(token_id)
        .bind(user_id)
        .execute(&self.db.pool)
        .await?;
        Ok((r.rows_affected() == 1).then_some(address))
    }

    /// Checks `token` for a node registering as `address` (lower-case) and binds the address to
    /// it on first use. The outer error is the store's; the inner one is a refusal.
    pub async fn admit_node_token(
        &self,
        token: &str,
        address: &str,
    ) -> Result<Result<NodeOwner, NodeTokenRefused>, StoreError> {
        if !token.starts_with(NODE_TOKEN_PREFIX) || token.len() > MAX_NODE_TOKEN_LEN {
            return Ok(Err(NodeTokenRefused::Unknown));
        }
        let address = address.to_lowercase();
        let hash = hash_token(token);
        let row = sqlx::query(
            "SELECT t.id, t.user_id, t.node_address, t.revoked_at, u.address AS user_address
             FROM node_tokens t JOIN users u ON u.id = t.user_id WHERE t.hash = $1",
        )
        .bind(&hash)
        .fetch_optional(&self.db.pool)
        .await?;
        let Some(r) = row else {
            return Ok(Err(NodeTokenRefused::Unknown));
        };
        if r.try_get::<Option<i64>, _>("revoked_at")?.is_some() {
            return Ok(Err(NodeTokenRefused::Revoked));
        }
        let token_id: String = r.try_get("id")?;
        let owner = |first_use| -> Result<NodeOwner, StoreError> {
            Ok(NodeOwner {
                token_id: token_id.clone(),
                user_id: r.try_get("user_id")?,
                user_address: r.try_get::<String, _>("user_address")?.to_lowercase(),
                first_use,
            })
        };
        let t = now();
        match r.try_get::<Option<String>, _>("node_address")? {
            Some(bound) if bound == address => {
                sqlx::query("UPDATE node_tokens SET last_used_at = $1 WHERE id = $2")
                    .bind(t)
                    .bind(&token_id)
                    .execute(&self.db.pool)
                    .await?;
                Ok(Ok(owner(false)?))
            }
            Some(bound) => Ok(Err(NodeTokenRefused::BoundToOther(bound))),
            None => {
                let taken = sqlx::query(
                    "SELECT id FROM node_tokens
                     WHERE node_address = $1 AND revoked_at IS NULL AND id <> $2",
                )
                .bind(&address)
                .bind(&token_id)
                .fetch_optional(&self.db.pool)
                .await?;
                if taken.is_some() {
                    return Ok(Err(NodeTokenRefused::NodeTaken));
                }
                // Only an unbound, live token is bound: of two nodes racing for one token, one
                // wins and the other is refused.
                let bound = sqlx::query(
                    "UPDATE node_tokens SET node_address = $1, bound_at = $2, last_used_at = $2
                     WHERE id = $3 AND node_address IS NULL AND revoked_at IS NULL",
                )
                .bind(&address)
                .bind(t)
                .bind(&token_id)
                .execute(&self.db.pool)
                .await;
                match bound {
                    Ok(b) if b.rows_affected() == 1 => Ok(Ok(owner(true)?)),
                    Ok(_) => {
                        // Bound or revoked in the meantime: decide again on the stored row.
                        Box::pin(self.admit_node_token(token, &address)).await
                    }
                    Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                        Ok(Err(NodeTokenRefused::NodeTaken))
                    }
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    /// The owner of every node bound to a live token: node address → owner's on-chain address.
    pub async fn node_owners(
        &self,
    ) -> Result<std::collections::HashMap<String, String>, StoreError> {
        let rows = sqlx::query(
            "SELECT t.node_address, u.address AS user_address
             FROM node_tokens t JOIN users u ON u.id = t.user_id
             WHERE t.node_address IS NOT NULL AND t.revoked_at IS NULL",
        )
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<String, _>("node_address")?,
                    r.try_get::<String, _>("user_address")?.to_lowercase(),
                ))
            })
            .collect()
    }

    /// Node addresses bound to the user's tokens (live first, then revoked), each once, with
    /// whether its token is still live.
    pub async fn user_nodes(&self, user_id: &str) -> Result<Vec<(String, bool)>, StoreError> {
        let rows = sqlx::query(
            "SELECT node_address, revoked_at FROM node_tokens
             WHERE user_id = $1 AND node_address IS NOT NULL
             ORDER BY bound_at DESC, id",
        )
        .bind(user_id)
        .fetch_all(&self.db.pool)
        .await?;
        let mut out: Vec<(String, bool)> = Vec::new();
        for r in &rows {
            let address: String = r.try_get("node_address")?;
            let live = r.try_get::<Option<i64>, _>("revoked_at")?.is_none();
            match out.iter_mut().find(|(a, _)| *a == address) {
                Some(e) => e.1 |= live,
                None => out.push((address, live)),
            }
        }
        out.sort_by_key(|(_, live)| !*live);
        Ok(out)
    }
}

impl Accounts {
    /// The on-chain address of the user whose live token `address` (lower-case) is bound to.
    pub async fn node_owner(&self, address: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query(
            "SELECT u.address AS user_address FROM node_tokens t JOIN users u ON u.id = t.user_id
             WHERE t.node_address = $1 AND t.revoked_at IS NULL",
        )
        .bind(address.to_lowercase())
        .fetch_optional(&self.db.pool)
        .await?;
        row.map(|r| Ok(r.try_get::<String, _>("user_address")?.to_lowercase()))
            .transpose()
    }
}
