//! OpenID Connect sign-in ("Sign in with Google" and any standards-compliant issuer): the
//! authorization-code flow with PKCE (S256), a nonce and a CSRF state. The flow state lives in
//! `challenges` (purpose `oidc`, 10 minutes, single use); a verified ID token signs its
//! `(oidc:ISSUER, sub)` identity in through [`Accounts::sign_in`].

use std::time::Duration;

use openidconnect::core::{CoreClient, CoreProviderMetadata, CoreResponseType};
use openidconnect::{
    AccessTokenHash, AuthenticationFlow, AuthorizationCode, ClientId, ClientSecret, CsrfToken,
    EndpointMaybeSet, EndpointNotSet, EndpointSet, IssuerUrl, Nonce, OAuth2TokenResponse,
    PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope, TokenResponse,
};
use serde::{Deserialize, Serialize};

use crate::db::now;
use crate::keys::random_token;
use crate::{Accounts, Identity, SignIn, StoreError};

/// How long a started sign-in may take to come back.
const STATE_TTL_SECS: i64 = 600;
/// Longest `code` or `state` accepted from the callback.
const MAX_PARAM_LEN: usize = 2048;
/// Back-channel requests (discovery, keys, token) give up after this.
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

/// One OpenID provider as the operator configured it.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    /// Issuer URL, e.g. `https://accounts.google.com` (discovery reads
    /// `{issuer}/.well-known/openid-configuration`).
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    /// Nexus's callback URL, registered with the provider.
    pub redirect_url: String,
}

/// The client configured by a provider's discovery metadata from [`OidcConfig`].
type Client = CoreClient<
    EndpointSet,      // authorization
    EndpointNotSet,   // device authorization
    EndpointNotSet,   // introspection
    EndpointNotSet,   // revocation
    EndpointMaybeSet, // token
    EndpointMaybeSet, // userinfo
>;

/// A discovered provider: its metadata (endpoints, signing keys) bound to our client
/// credentials, and the HTTP client used to reach it.
#[derive(Debug, Clone)]
pub struct OidcProvider {
    issuer: String,
    client: Client,
    http: reqwest::Client,
}

/// What `challenges.data` holds for a started sign-in.
#[derive(Serialize, Deserialize)]
struct FlowState {
    nonce: String,
    pkce_verifier: String,
}

/// An error and its causes, for messages (some protocol errors say little on their own).
fn describe(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        source = s.source();
    }
    msg
}

impl OidcProvider {
    /// Fetches the issuer's discovery document and signing keys. The HTTP client never follows
    /// redirects (the provider's URLs come from its metadata, not from redirects).
    pub async fn discover(config: OidcConfig) -> Result<Self, StoreError> {
        let bad = |what: &str, e: &dyn std::error::Error| {
            StoreError::Config(format!("OpenID Connect {what}: {}", describe(e)))
        };
        let issuer_url = IssuerUrl::new(config.issuer.clone())
            .map_err(|e| bad(&format!("issuer {:?}", config.issuer), &e))?;
        let redirect = RedirectUrl::new(config.redirect_url.clone())
            .map_err(|e| bad(&format!("redirect URL {:?}", config.redirect_url), &e))?;
        if config.client_id.is_empty() {
            return Err(StoreError::Config(
                "OpenID Connect client id is empty".into(),
            ));
        }
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(HTTP_TIMEOUT)
            .timeout(HTTP_TIMEOUT)
            .build()
            .map_err(|e| bad("HTTP client", &e))?;
        let metadata = CoreProviderMetadata::discover_async(issuer_url, &http)
            .await
            .map_err(|e| bad(&format!("discovery for {}", config.issuer), &e))?;
        if metadata.token_endpoint().is_none() {
            return Err(StoreError::Config(format!(
                "OpenID Connect issuer {} has no token endpoint",
                config.issuer
            )));
        }
        let issuer = metadata.issuer().as_str().to_owned();
        let client = CoreClient::from_provider_metadata(
            metadata,
            ClientId::new(config.client_id),
            Some(ClientSecret::new(config.client_secret)),
        )
        .set_redirect_uri(redirect);
        Ok(Self {
            issuer,
            client,
            http,
        })
    }

    /// The issuer as its discovery document names it (identities are `oidc:{issuer}`).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The identity kind this provider's users sign in with.
    pub fn identity_kind(&self) -> String {
        format!("oidc:{}", self.issuer)
    }
}

impl Accounts {
    /// Starts an OpenID Connect sign-in: returns the provider's authorization URL to send the
    /// browser to (scopes `openid email profile`, PKCE S256, a nonce and a CSRF `state`). The
    /// state is remembered for 10 minutes and can be used once, by [`Accounts::oidc_finish`].
    pub async fn oidc_start(&self, p: &OidcProvider) -> Result<String, StoreError> {
        let state = random_token("")?;
        let nonce = random_token("")?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let data = serde_json::to_string(&FlowState {
            nonce: nonce.clone(),
            pkce_verifier: verifier.secret().clone(),
        })
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let (url, _, _) = p
            .client
            .authorize_url(
                AuthenticationFlow::<CoreResponseType>::AuthorizationCode,
                {
                    let state = state.clone();
                    move || CsrfToken::new(state)
                },
                move || Nonce::new(nonce),
            )
            .add_scope(Scope::new("email".into()))
            .add_scope(Scope::new("profile".into()))
            .set_pkce_challenge(challenge)
            .url();
        let t = now();
        sqlx::query("DELETE FROM challenges WHERE expires_at < $1")
            .bind(t)
            .execute(&self.db.pool)
            .await?;
        sqlx::query(
            "INSERT INTO challenges (id, purpose, data, expires_at) VALUES ($1, 'oidc', $2, $3)",
        )
        .bind(&state)
        .bind(&data)
        .bind(t + STATE_TTL_SECS)
        .execute(&self.db.pool)
        .await?;
        Ok(url.into())
    }

    /// Finishes an OpenID Connect sign-in from the provider's redirect (`code` and `state`):
    /// consumes the state (a replay fails), exchanges the code with the PKCE verifier, verifies
    /// the ID token (signature, issuer, audience, expiry, nonce) and signs `(oidc:ISSUER, sub)`
    /// in, creating a custodial account on first use or linking it to `link_to`.
    pub async fn oidc_finish(
        &self,
        p: &OidcProvider,
        code: &str,
        state: &str,
        link_to: Option<&str>,
        client: &str,
    ) -> Result<SignIn, StoreError> {
        let refuse = |msg: String| StoreError::SignIn(msg);
        if code.is_empty() || code.len() > MAX_PARAM_LEN {
            return Err(refuse("missing or oversized authorization code".into()));
        }
        if state.is_empty() || state.len() > MAX_PARAM_LEN {
            return Err(refuse("missing or oversized sign-in state".into()));
        }
        let row = sqlx::query(
            "DELETE FROM challenges WHERE id = $1 AND purpose = 'oidc' AND expires_at > $2
             RETURNING data",
        )
        .bind(state)
        .bind(now())
        .fetch_all(&self.db.pool)
        .await?;
        let [row] = row.as_slice() else {
            return Err(refuse(
                "unknown, expired or already used sign-in state".into(),
            ));
        };
        let data: String = sqlx::Row::try_get(row, "data")?;
        let flow: FlowState = serde_json::from_str(&data)
            .map_err(|e| StoreError::Corrupt(format!("OpenID Connect sign-in state: {e}")))?;

        let tokens = p
            .client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|e| refuse(format!("provider has no token endpoint: {}", describe(&e))))?
            .set_pkce_verifier(PkceCodeVerifier::new(flow.pkce_verifier))
            .request_async(&p.http)
            .await
            .map_err(|e| refuse(format!("code exchange failed: {}", describe(&e))))?;
        let id_token = tokens
            .id_token()
            .ok_or_else(|| refuse("the provider returned no ID token".into()))?;
        let verifier = p.client.id_token_verifier();
        let claims = id_token
            .claims(&verifier, &Nonce::new(flow.nonce))
            .map_err(|e| refuse(format!("invalid ID token: {}", describe(&e))))?;
        if let Some(expected) = claims.access_token_hash() {
            let bad_hash = |e: &dyn std::error::Error| {
                refuse(format!(
                    "invalid ID token access token hash: {}",
                    describe(e)
                ))
            };
            let alg = id_token.signing_alg().map_err(|e| bad_hash(&e))?;
            let key = id_token.signing_key(&verifier).map_err(|e| bad_hash(&e))?;
            let actual = AccessTokenHash::from_token(tokens.access_token(), alg, key)
                .map_err(|e| bad_hash(&e))?;
            if actual != *expected {
                return Err(refuse(
                    "ID token access token hash does not match the access token".into(),
                ));
            }
        }
        let identity = Identity {
            kind: p.identity_kind(),
            subject: claims.subject().as_str().to_owned(),
            detail: claims.email().map(|e| e.as_str().to_owned()),
        };
        self.sign_in(&identity, None, link_to, client).await
    }
}
