//! API keys: `lk_` + 43 base64url characters (256 random bits), shown once, stored as SHA-256.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use lattice_ledger::Money;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::db::{Db, now};
use crate::ledger::parse_money;
use crate::{Caller, KeyInfo, StoreError};

pub const KEY_PREFIX: &str = "lk_";
/// Keys per user at most (revoked ones included).
pub(crate) const MAX_KEYS_PER_USER: i64 = 100;

pub(crate) fn random_token(prefix: &str) -> Result<String, StoreError> {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).map_err(|e| StoreError::Random(e.to_string()))?;
    Ok(format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    ))
}

pub(crate) fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A key as listed (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    /// The first characters of the key, to recognise it.
    pub prefix: String,
    pub spend_limit: Option<Money>,
    pub rpm_limit: Option<u32>,
    pub spent: Money,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// The one time a key's secret is seen.
#[derive(Debug, Clone, Serialize)]
pub struct NewKey {
    #[serde(flatten)]
    pub key: ApiKey,
    pub secret: String,
}

/// Authenticated keys are cached briefly so the request path rarely touches the database;
/// revoking through this Nexus takes effect at once, through another replica within the TTL.
/// An entry older than half the TTL is still served while one background read refreshes it, so
/// a busy key never makes requests queue behind a database read (when it aged out, every request
/// arriving during the read made a read of its own and waited for it). Past the TTL it is read
/// again first.
pub(crate) struct KeyCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Caller, Instant)>>,
    /// Key hashes being refreshed in the background (one read each at a time).
    refreshing: Mutex<HashSet<String>>,
    minute: Mutex<HashMap<String, (u64, u32)>>,
}

const CACHE_MAX: usize = 100_000;

/// How a cached entry of a given age may be used.
#[derive(Debug, PartialEq, Eq)]
enum Freshness {
    Fresh,
    /// Serve it, and refresh it in the background.
    Stale,
    /// Read it again before serving.
    Expired,
}

fn freshness(age: Duration, ttl: Duration) -> Freshness {
    if age < ttl / 2 {
        Freshness::Fresh
    } else if age < ttl {
        Freshness::Stale
    } else {
        Freshness::Expired
    }
}

impl KeyCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
            refreshing: Mutex::new(HashSet::new()),
            minute: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, hash: &str) -> Option<(Caller, Freshness)> {
        let map = self.entries.lock().ok()?;
        let (c, at) = map.get(hash)?;
        match freshness(at.elapsed(), self.ttl) {
            Freshness::Expired => None,
            f => Some((c.clone(), f)),
        }
    }

    /// True for the one caller that should refresh `hash` now.
    fn begin_refresh(&self, hash: &str) -> bool {
        self.refreshing
            .lock()
            .is_ok_and(|mut r| r.len() < CACHE_MAX && r.insert(hash.to_owned()))
    }

    fn end_refresh(&self, hash: &str) {
        if let Ok(mut r) = self.refreshing.lock() {
            r.remove(hash);
        }
    }

    fn forget(&self, hash: &str) {
        if let Ok(mut map) = self.entries.lock() {
            map.remove(hash);
        }
    }

    fn put(&self, hash: String, c: Caller) {
        if let Ok(mut map) = self.entries.lock() {
            if map.len() >= CACHE_MAX {
                map.clear();
            }
            map.insert(hash, (c, Instant::now()));
        }
    }

    pub(crate) fn forget_key(&self, key_id: &str) {
        if let Ok(mut map) = self.entries.lock() {
            map.retain(|_, (c, _)| c.key.as_ref().map(|k| k.id.as_str()) != Some(key_id));
        }
    }

    /// Counts a request against the key's per-minute limit; false when over it.
    pub(crate) fn admit(&self, key: &KeyInfo) -> bool {
        let Some(limit) = key.rpm_limit else {
            return true;
        };
        let minute = u64::try_from(now()).unwrap_or(0) / 60;
        let Ok(mut map) = self.minute.lock() else {
            return true;
        };
        if map.len() >= CACHE_MAX {
            map.retain(|_, (m, _)| *m == minute);
        }
        let e = map.entry(key.id.clone()).or_insert((minute, 0));
        if e.0 != minute {
            *e = (minute, 0);
        }
        if e.1 >= limit {
            return false;
        }
        e.1 += 1;
        true
    }
}

fn spend_limit(r: &sqlx::any::AnyRow) -> Result<Option<Money>, StoreError> {
    r.try_get::<Option<String>, _>("spend_limit")?
        .map(|s| parse_money(&s))
        .transpose()
}

fn rpm_limit(r: &sqlx::any::AnyRow) -> Result<Option<u32>, StoreError> {
    Ok(r.try_get::<Option<i64>, _>("rpm_limit")?
        .and_then(|v| u32::try_from(v).ok()))
}

pub(crate) async fn create(
    db: &Db,
    user_id: &str,
    name: &str,
    spend_limit: Option<Money>,
    rpm_limit: Option<u32>,
) -> Result<NewKey, StoreError> {
    let count: i64 = sqlx::query("SELECT COUNT(*) AS n FROM api_keys WHERE user_id = $1")
        .bind(user_id)
        .fetch_one(&db.pool)
        .await?
        .try_get("n")?;
    if count >= MAX_KEYS_PER_USER {
        return Err(StoreError::Limit(format!(
            "at most {MAX_KEYS_PER_USER} API keys per account"
        )));
    }
    let secret = random_token(KEY_PREFIX)?;
    let id = format!("key_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let prefix: String = secret.chars().take(10).collect();
    let t = now();
    sqlx::query(
        "INSERT INTO api_keys (id, user_id, name, hash, prefix, spend_limit, rpm_limit, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&id)
    .bind(user_id)
    .bind(name)
    .bind(hash_token(&secret))
    .bind(&prefix)
    .bind(spend_limit.map(|m| m.to_string()))
    .bind(rpm_limit.map(i64::from))
    .bind(t)
    .execute(&db.pool)
    .await?;
    Ok(NewKey {
        key: ApiKey {
            id,
            name: name.to_owned(),
            prefix,
            spend_limit,
            rpm_limit,
            spent: Money::ZERO,
            created_at: t,
            revoked_at: None,
        },
        secret,
    })
}

pub(crate) async fn list(db: &Db, user_id: &str) -> Result<Vec<ApiKey>, StoreError> {
    let rows = sqlx::query(
        "SELECT k.id, k.name, k.prefix, k.spend_limit, k.rpm_limit, k.created_at, k.revoked_at, u.spent
         FROM api_keys k LEFT JOIN key_usage u ON u.key_id = k.id
         WHERE k.user_id = $1 ORDER BY k.created_at DESC, k.id",
    )
    .bind(user_id)
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ApiKey {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                prefix: r.try_get("prefix")?,
                spend_limit: spend_limit(r)?,
                rpm_limit: rpm_limit(r)?,
                spent: r
                    .try_get::<Option<String>, _>("spent")?
                    .map(|s| parse_money(&s))
                    .transpose()?
                    .unwrap_or_default(),
                created_at: r.try_get("created_at")?,
                revoked_at: r.try_get("revoked_at")?,
            })
        })
        .collect()
}

/// Revokes a key of `user_id`; false if there is no such (active) key.
pub(crate) async fn revoke(db: &Db, user_id: &str, key_id: &str) -> Result<bool, StoreError> {
    let r = sqlx::query(
        "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND user_id = $3 AND revoked_at IS NULL",
    )
    .bind(now())
    .bind(key_id)
    .bind(user_id)
    .execute(&db.pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Looks up an active key by its secret.
pub(crate) async fn authenticate(
    db: &Db,
    cache: &Arc<KeyCache>,
    secret: &str,
) -> Result<Option<Caller>, StoreError> {
    if !secret.starts_with(KEY_PREFIX) || secret.len() > 128 {
        return Ok(None);
    }
    let hash = hash_token(secret);
    match cache.get(&hash) {
        Some((c, Freshness::Stale)) => {
            if cache.begin_refresh(&hash) {
                let (db, cache) = (db.clone(), cache.clone());
                tokio::spawn(async move {
                    match lookup(&db, &hash).await {
                        Ok(Some(c)) => cache.put(hash.clone(), c),
                        Ok(None) => cache.forget(&hash),
                        // Left to age out: past the TTL it is read on the request path.
                        Err(e) => tracing::warn!(error = %e, "refreshing a cached API key"),
                    }
                    cache.end_refresh(&hash);
                });
            }
            return Ok(Some(c));
        }
        Some((c, _)) => return Ok(Some(c)),
        None => {}
    }
    let caller = lookup(db, &hash).await?;
    if let Some(c) = &caller {
        cache.put(hash, c.clone());
    }
    Ok(caller)
}

/// The active key with this hash, as a caller.
async fn lookup(db: &Db, hash: &str) -> Result<Option<Caller>, StoreError> {
    let row = sqlx::query(
        "SELECT k.id, k.user_id, k.spend_limit, k.rpm_limit, u.address FROM api_keys k
         JOIN users u ON u.id = k.user_id WHERE k.hash = $1 AND k.revoked_at IS NULL",
    )
    .bind(hash)
    .fetch_optional(&db.pool)
    .await?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some(Caller {
        user_id: r.try_get("user_id")?,
        address: r.try_get("address")?,
        key: Some(KeyInfo {
            id: r.try_get("id")?,
            spend_limit: spend_limit(&r)?,
            rpm_limit: rpm_limit(&r)?,
        }),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_fresh_then_refreshed_in_the_background_then_read_again() {
        let ttl = Duration::from_secs(2);
        let ms = Duration::from_millis;
        assert_eq!(freshness(ms(0), ttl), Freshness::Fresh);
        assert_eq!(freshness(ms(999), ttl), Freshness::Fresh);
        assert_eq!(freshness(ms(1000), ttl), Freshness::Stale);
        assert_eq!(freshness(ms(1999), ttl), Freshness::Stale);
        assert_eq!(freshness(ms(2000), ttl), Freshness::Expired);
    }

    #[test]
    fn one_refresh_per_key_at_a_time() {
        let cache = KeyCache::new(Duration::from_secs(2));
        assert!(cache.begin_refresh("a"));
        assert!(!cache.begin_refresh("a"));
        assert!(cache.begin_refresh("b"));
        cache.end_refresh("a");
        assert!(cache.begin_refresh("a"));
    }
}
