//! Chat history, stored only for users who opted in; deleting really deletes the rows.

use serde::Serialize;
use sqlx::Row;

use crate::db::now;
use crate::{Accounts, StoreError};

/// Messages per conversation at most; conversations per user at most.
pub(crate) const MAX_MESSAGES: i64 = 1_000;
pub(crate) const MAX_CONVERSATIONS: i64 = 1_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conversation {
    pub id: String,
    pub title: String,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredMessage {
    pub role: String,
    pub content: String,
    pub request_id: Option<String>,
    pub created_at: i64,
}

impl Accounts {
    /// Appends messages to a conversation of the user (creating it), if the user opted in.
    /// Returns whether anything was stored.
    pub async fn record_chat(
        &self,
        user_id: &str,
        conversation: &str,
        messages: &[(String, String)],
        request_id: &str,
    ) -> Result<bool, StoreError> {
        let Some(user) = self.user(user_id).await? else {
            return Ok(false);
        };
        if !user.keep_history || conversation.is_empty() || conversation.len() > 64 {
            return Ok(false);
        }
        let mut tx = self.db.begin_write().await?;
        let t = now();
        let owner = sqlx::query("SELECT user_id FROM conversations WHERE id = $1")
            .bind(conversation)
            .fetch_optional(&mut *tx)
            .await?;
        match owner {
            Some(r) if r.try_get::<String, _>("user_id")? != user_id => return Ok(false),
            Some(_) => {
                sqlx::query("UPDATE conversations SET updated_at = $1 WHERE id = $2")
                    .bind(t)
                    .bind(conversation)
                    .execute(&mut *tx)
                    .await?;
            }
            None => {
                let n: i64 =
                    sqlx::query("SELECT COUNT(*) AS n FROM conversations WHERE user_id = $1")
                        .bind(user_id)
                        .fetch_one(&mut *tx)
                        .await?
                        .try_get("n")?;
                if n >= MAX_CONVERSATIONS {
                    return Ok(false);
                }
                let title: String = messages
                    .iter()
                    .find(|(role, _)| role == "user")
                    .map(|(_, c)| c.chars().take(80).collect())
                    .unwrap_or_else(|| "Conversation".into());
                sqlx::query(
                    "INSERT INTO conversations (id, user_id, title, created_at, updated_at) VALUES ($1, $2, $3, $4, $4)",
                )
                .bind(conversation)
                .bind(user_id)
                .bind(title)
                .bind(t)
                .execute(&mut *tx)
                .await?;
            }
        }
        let next: i64 = sqlx::query(
            "SELECT COALESCE(MAX(seq), -1) + 1 AS n FROM messages WHERE conversation_id = $1",
        )
        .bind(conversation)
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        if next + i64::try_from(messages.len()).unwrap_or(i64::MAX) > MAX_MESSAGES {
            return Ok(false);
        }
        for (i, (role, content)) in messages.iter().enumerate() {
            sqlx::query(
                "INSERT INTO messages (conversation_id, seq, role, content, request_id, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(conversation)
            .bind(next + i64::try_from(i).unwrap_or(0))
            .bind(role)
            .bind(content)
            .bind(request_id)
            .bind(t)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    pub async fn conversations(&self, user_id: &str) -> Result<Vec<Conversation>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, title, created_at, updated_at FROM conversations WHERE user_id = $1
             ORDER BY updated_at DESC LIMIT 1000",
        )
        .bind(user_id)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Conversation {
                    id: r.try_get("id")?,
                    title: r.try_get("title")?,
                    created_at: r.try_get("created_at")?,
                    updated_at: r.try_get("updated_at")?,
                })
            })
            .collect()
    }

    /// Messages of one of the user's conversations; `None` if it isn't theirs or doesn't exist.
    pub async fn conversation(
        &self,
        user_id: &str,
        id: &str,
    ) -> Result<Option<Vec<StoredMessage>>, StoreError> {
        let owned =
            sqlx::query("SELECT 1 AS one FROM conversations WHERE id = $1 AND user_id = $2")
                .bind(id)
                .bind(user_id)
                .fetch_optional(&self.db.pool)
                .await?;
        if owned.is_none() {
            return Ok(None);
        }
        let rows = sqlx::query(
            "SELECT role, content, request_id, created_at FROM messages WHERE conversation_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredMessage {
                    role: r.try_get("role")?,
                    content: r.try_get("content")?,
                    request_id: r.try_get("request_id")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()
            .map(Some)
    }

    /// Deletes one conversation (or all of the user's with `None`); returns how many.
    pub async fn delete_history(&self, user_id: &str, id: Option<&str>) -> Result<u64, StoreError> {
        let mut tx = self.db.begin_write().await?;
        let ids: Vec<String> = match id {
            Some(id) => {
                sqlx::query("SELECT id FROM conversations WHERE id = $1 AND user_id = $2")
                    .bind(id)
                    .bind(user_id)
                    .fetch_all(&mut *tx)
                    .await?
            }
            None => {
                sqlx::query("SELECT id FROM conversations WHERE user_id = $1")
                    .bind(user_id)
                    .fetch_all(&mut *tx)
                    .await?
            }
        }
        .iter()
        .map(|r| r.try_get::<String, _>("id"))
        .collect::<Result<_, _>>()?;
        for id in &ids {
            sqlx::query("DELETE FROM messages WHERE conversation_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM conversations WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(ids.len() as u64)
    }
}
