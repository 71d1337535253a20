//! Passkeys (WebAuthn, `webauthn-rs`): register with a user name, sign in with it. The
//! ceremony state lives in the `challenges` table between the two HTTP calls (single use,
//! 5 minutes); the credential is stored with the `passkey` identity and its signature counter
//! is updated on every sign-in.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use webauthn_rs::prelude::{
    CreationChallengeResponse, Passkey, PasskeyAuthentication, PasskeyRegistration,
    PublicKeyCredential, RegisterPublicKeyCredential, RequestChallengeResponse, Url, Uuid,
    Webauthn, WebauthnBuilder,
};

use crate::db::now;
use crate::{Accounts, Identity, SignIn, StoreError};

/// The relying party: a domain name (browsers refuse IP addresses) and the page's origin.
#[derive(Debug, Clone)]
pub struct PasskeyConfig {
    pub rp_id: String,
    pub origin: String,
}

pub(crate) fn build(c: &PasskeyConfig) -> Result<Webauthn, StoreError> {
    let origin = Url::parse(&c.origin)
        .map_err(|e| StoreError::Config(format!("passkey origin {:?}: {e}", c.origin)))?;
    WebauthnBuilder::new(&c.rp_id, &origin)
        .map(|b| b.rp_name("Lattice").allow_any_port(c.rp_id == "localhost"))
        .and_then(|b| b.build())
        .map_err(|e| {
            StoreError::Config(format!(
                "passkeys need a domain name matching the origin (rp id {:?}, origin {:?}): {e}",
                c.rp_id, c.origin
            ))
        })
}

#[derive(Serialize, Deserialize)]
struct Registering {
    state: PasskeyRegistration,
    name: String,
    link_to: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Authenticating {
    state: PasskeyAuthentication,
    user_id: String,
}

fn cred_key(id: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id)
}

fn refuse(m: impl Into<String>) -> StoreError {
    StoreError::SignIn(m.into())
}

/// User names: 3 to 64 characters of letters, digits and `._@-`.
fn valid_name(name: &str) -> bool {
    (3..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b))
}

impl Accounts {
    fn webauthn(&self) -> Result<&Webauthn, StoreError> {
        self.webauthn
            .as_ref()
            .ok_or_else(|| StoreError::Config("passkeys are not configured on this Nexus".into()))
    }

    async fn put_challenge(
        &self,
        purpose: &str,
        data: &impl Serialize,
    ) -> Result<String, StoreError> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let data = serde_json::to_string(data).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query(
            "INSERT INTO challenges (id, purpose, data, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&id)
        .bind(purpose)
        .bind(data)
        .bind(now() + 300)
        .execute(&self.db.pool)
        .await?;
        Ok(id)
    }

    /// Reads and deletes a challenge: each can be answered once.
    async fn take_challenge<T: for<'de> Deserialize<'de>>(
        &self,
        purpose: &str,
        id: &str,
    ) -> Result<T, StoreError> {
        if id.len() > 64 {
            return Err(refuse("unknown challenge"));
        }
        let mut tx = self.db.begin_write().await?;
        let row = sqlx::query(
            "SELECT data FROM challenges WHERE id = $1 AND purpose = $2 AND expires_at > $3",
        )
        .bind(id)
        .bind(purpose)
        .bind(now())
        .fetch_optional(&mut *tx)
        .await?;
        let deleted = sqlx::query("DELETE FROM challenges WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let Some(row) = row.filter(|_| deleted.rows_affected() == 1) else {
            return Err(refuse("unknown, expired or already used challenge"));
        };
        serde_json::from_str(&row.try_get::<String, _>("data")?)
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// Starts registering a passkey: for a new account named `name`, or added to `link_to`.
    pub async fn passkey_register_start(
        &self,
        name: &str,
        link_to: Option<&str>,
    ) -> Result<(String, CreationChallengeResponse), StoreError> {
        let w = self.webauthn()?;
        if !valid_name(name) {
            return Err(StoreError::Limit(
                "a user name is 3 to 64 letters, digits or ._@-".into(),
            ));
        }
        let taken = sqlx::query(
            "SELECT user_id FROM identities WHERE kind = 'passkey-name' AND subject = $1",
        )
        .bind(name)
        .fetch_optional(&self.db.pool)
        .await?;
        if let Some(r) = taken
            && link_to != Some(r.try_get::<String, _>("user_id")?.as_str())
        {
            return Err(StoreError::Conflict("this user name is taken".into()));
        }
        let (ccr, state) = w
            .start_passkey_registration(Uuid::new_v4(), name, name, None)
            .map_err(|e| refuse(format!("cannot start passkey registration: {e}")))?;
        let id = self
            .put_challenge(
                "passkey-register",
                &Registering {
                    state,
                    name: name.to_owned(),
                    link_to: link_to.map(str::to_owned),
                },
            )
            .await?;
        Ok((id, ccr))
    }

    /// Finishes registration with the browser's credential and signs the account in.
    pub async fn passkey_register_finish(
        &self,
        challenge: &str,
        credential: &RegisterPublicKeyCredential,
        client: &str,
    ) -> Result<SignIn, StoreError> {
        let w = self.webauthn()?;
        let r: Registering = self.take_challenge("passkey-register", challenge).await?;
        let passkey = w
            .finish_passkey_registration(credential, &r.state)
            .map_err(|e| refuse(format!("passkey registration failed: {e}")))?;
        let detail =
            serde_json::to_string(&passkey).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let identity = Identity {
            kind: "passkey".into(),
            subject: cred_key(passkey.cred_id()),
            detail: Some(detail),
        };
        let s = self
            .sign_in(&identity, None, r.link_to.as_deref(), client)
            .await?;
        // The name that finds this account's passkeys at sign-in.
        sqlx::query(
            "INSERT INTO identities (kind, subject, user_id, detail, created_at)
             VALUES ('passkey-name', $1, $2, NULL, $3) ON CONFLICT (kind, subject) DO NOTHING",
        )
        .bind(&r.name)
        .bind(&s.user.id)
        .bind(now())
        .execute(&self.db.pool)
        .await?;
        Ok(s)
    }

    /// Starts signing in the account registered as `name`.
    pub async fn passkey_login_start(
        &self,
        name: &str,
    ) -> Result<(String, RequestChallengeResponse), StoreError> {
        let w = self.webauthn()?;
        let user = sqlx::query(
            "SELECT user_id FROM identities WHERE kind = 'passkey-name' AND subject = $1",
        )
        .bind(name)
        .fetch_optional(&self.db.pool)
        .await?
        .ok_or_else(|| refuse("no account with this user name"))?
        .try_get::<String, _>("user_id")?;
        let passkeys: Vec<Passkey> =
            sqlx::query("SELECT detail FROM identities WHERE kind = 'passkey' AND user_id = $1")
                .bind(&user)
                .fetch_all(&self.db.pool)
                .await?
                .iter()
                .filter_map(|r| r.try_get::<Option<String>, _>("detail").ok().flatten())
                .filter_map(|d| serde_json::from_str(&d).ok())
                .collect();
        if passkeys.is_empty() {
            return Err(refuse("this account has no passkey"));
        }
        let (rcr, state) = w
            .start_passkey_authentication(&passkeys)
            .map_err(|e| refuse(format!("cannot start passkey sign-in: {e}")))?;
        let id = self
            .put_challenge(
                "passkey-login",
                &Authenticating {
                    state,
                    user_id: user,
                },
            )
            .await?;
        Ok((id, rcr))
    }

    /// Verifies the browser's assertion and signs the account in.
    pub async fn passkey_login_finish(
        &self,
        challenge: &str,
        credential: &PublicKeyCredential,
        client: &str,
    ) -> Result<SignIn, StoreError> {
        let w = self.webauthn()?;
        let a: Authenticating = self.take_challenge("passkey-login", challenge).await?;
        let result = w
            .finish_passkey_authentication(credential, &a.state)
            .map_err(|e| refuse(format!("passkey sign-in failed: {e}")))?;
        let subject = cred_key(result.cred_id());
        let row = sqlx::query(
            "SELECT user_id, detail FROM identities WHERE kind = 'passkey' AND subject = $1",
        )
        .bind(&subject)
        .fetch_optional(&self.db.pool)
        .await?
        .ok_or_else(|| refuse("unknown passkey"))?;
        if row.try_get::<String, _>("user_id")? != a.user_id {
            return Err(refuse("this passkey belongs to another account"));
        }
        if let Some(mut pk) = row
            .try_get::<Option<String>, _>("detail")?
            .and_then(|d| serde_json::from_str::<Passkey>(&d).ok())
            && pk.update_credential(&result) == Some(true)
        {
            let detail =
                serde_json::to_string(&pk).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            sqlx::query(
                "UPDATE identities SET detail = $1 WHERE kind = 'passkey' AND subject = $2",
            )
            .bind(detail)
            .bind(&subject)
            .execute(&self.db.pool)
            .await?;
        }
        let identity = Identity {
            kind: "passkey".into(),
            subject,
            detail: None,
        };
        self.sign_in(&identity, None, None, client).await
    }
}
