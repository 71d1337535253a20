//! A node's identity: a secp256k1 key created on first start and kept on disk; its EVM address
//! names the node (later: staking, signed receipts). Possession is proven by signing a challenge
//! with EIP-191 `personal_sign`, so any Ethereum tool can verify it.
//!
//! Signing and recovery use libsecp256k1 (Bitcoin Core's C library): a node signs a receipt
//! batch every few milliseconds on the thread that serves its requests, and Nexus recovers
//! every batch's signer on its own (`cargo bench -p lattice-link` has both against `k256`).

use std::path::Path;

use secp256k1::{PublicKey, Secp256k1, SecretKey, SignOnly};
use sha3::{Digest, Keccak256};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read or write the node key at {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the node key at {0} is not a valid secp256k1 key (expected 64 hex digits)")]
    BadKey(String),
    #[error("no randomness available: {0}")]
    Random(String),
    #[error("invalid signature: {0}")]
    BadSignature(String),
}

pub struct NodeKey {
    secret: SecretKey,
    /// The EVM address, `0x` and 40 lowercase hex digits (derived once).
    address: String,
}

impl Drop for NodeKey {
    /// Overwrites the secret (volatile writes; `k256`'s key, used before, zeroized itself too).
    fn drop(&mut self) {
        self.secret.non_secure_erase();
    }
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeKey")
            .field("address", &self.address())
            .finish_non_exhaustive()
    }
}

pub(crate) fn keccak(data: &[u8]) -> [u8; 32] {
    Keccak256::digest(data).into()
}

/// The EVM address of a public key: the last 20 bytes of the Keccak hash of its 64-byte point.
fn address_of(key: &PublicKey) -> String {
    let point = key.serialize_uncompressed();
    let hash = keccak(point.get(1..).unwrap_or_default());
    format!("0x{}", hex::encode(hash.get(12..).unwrap_or_default()))
}

/// EIP-191 hash of the text a node signs to prove its key to Nexus.
fn eip191(message: &str) -> [u8; 32] {
    let mut data = format!("\x19Ethereum Signed Message:\n{}", message.len()).into_bytes();
    data.extend_from_slice(message.as_bytes());
    keccak(&data)
}

/// The exact text signed for a link challenge; binds nonce and address to this protocol.
pub fn challenge_message(nonce: &str, address: &str) -> String {
    format!(
        "lattice link v1\nnonce: {nonce}\naddress: {}",
        address.to_lowercase()
    )
}

/// Recovers the signer's address of an EIP-191 signature (65 bytes r‖s‖v, hex).
pub fn recover_address(message: &str, signature_hex: &str) -> Result<String, IdentityError> {
    recover_digest(&eip191(message), signature_hex)
}

/// libsecp256k1's verification context, built once (building it costs more than a recovery).
static SECP: std::sync::LazyLock<secp256k1::Secp256k1<secp256k1::VerifyOnly>> =
    std::sync::LazyLock::new(secp256k1::Secp256k1::verification_only);

/// libsecp256k1's signing context, built once and blinded with fresh randomness when it can be
/// (side-channel hardening; signatures are RFC 6979 deterministic either way).
static SIGNER: std::sync::LazyLock<Secp256k1<SignOnly>> = std::sync::LazyLock::new(|| {
    let mut secp = Secp256k1::signing_only();
    let mut seed = [0u8; 32];
    if getrandom::getrandom(&mut seed).is_ok() {
        secp.seeded_randomize(&seed);
    }
    secp
});

/// Recovers the signer's address of a signature over a 32-byte digest.
pub(crate) fn recover_digest(
    digest: &[u8; 32],
    signature_hex: &str,
) -> Result<String, IdentityError> {
    let bytes = hex::decode(signature_hex.trim_start_matches("0x"))
        .map_err(|e| IdentityError::BadSignature(e.to_string()))?;
    let (rs, v) = match bytes.as_slice() {
        [rs @ .., v] if rs.len() == 64 => (rs, *v),
        _ => return Err(IdentityError::BadSignature("expected 65 bytes".into())),
    };
    let v = if v >= 27 { v - 27 } else { v };
    if v > 1 {
        // 2 and 3 (an r beyond the group order) never occur for real signatures.
        return Err(IdentityError::BadSignature("bad recovery id".into()));
    }
    let rec = secp256k1::ecdsa::RecoveryId::try_from(i32::from(v))
        .map_err(|e| IdentityError::BadSignature(e.to_string()))?;
    let sig = secp256k1::ecdsa::RecoverableSignature::from_compact(rs, rec)
        .map_err(|e| IdentityError::BadSignature(e.to_string()))?;
    let key = SECP
        .recover_ecdsa(secp256k1::Message::from_digest(*digest), &sig)
        .map_err(|e| IdentityError::BadSignature(e.to_string()))?;
    Ok(address_of(&key))
}

impl NodeKey {
    fn new(secret: SecretKey) -> Self {
        let address = address_of(&PublicKey::from_secret_key(&SIGNER, &secret));
        Self { secret, address }
    }

    pub fn generate() -> Result<Self, IdentityError> {
        loop {
            let mut bytes = [0u8; 32];
            getrandom::getrandom(&mut bytes).map_err(|e| IdentityError::Random(e.to_string()))?;
            // A random 32-byte value is a valid scalar with overwhelming probability.
            if let Some(key) = Self::from_secret(&bytes) {
                return Ok(key);
            }
        }
    }

    /// A key from 32 secret bytes (e.g. derived for a custodial account); `None` if the bytes
    /// are not a valid secp256k1 scalar.
    pub fn from_secret(bytes: &[u8; 32]) -> Option<Self> {
        SecretKey::from_byte_array(*bytes).ok().map(Self::new)
    }

    /// Loads the key at `path`, creating it (readable only by the owner) on first start.
    pub fn load_or_create(path: &Path) -> Result<Self, IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bad = || IdentityError::BadKey(path.display().to_string());
                let bytes: [u8; 32] = hex::decode(text.trim().trim_start_matches("0x"))
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(bad)?;
                Self::from_secret(&bytes).ok_or_else(bad)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate()?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let tmp = path.with_extension("tmp");
                write_private(&tmp, &hex::encode(key.secret.secret_bytes())).map_err(io)?;
                std::fs::rename(&tmp, path).map_err(io)?;
                Ok(key)
            }
            Err(e) => Err(io(e)),
        }
    }

    pub fn address(&self) -> String {
        self.address.clone()
    }

    /// Signature of a 32-byte digest (r‖s‖v with v = 27/28, s low, RFC 6979 nonce), hex.
    pub(crate) fn sign_digest(&self, digest: &[u8; 32]) -> Result<String, IdentityError> {
        let sig =
            SIGNER.sign_ecdsa_recoverable(secp256k1::Message::from_digest(*digest), &self.secret);
        let (rec, rs) = sig.serialize_compact();
        let v =
            u8::try_from(i32::from(rec)).map_err(|e| IdentityError::BadSignature(e.to_string()))?;
        let mut out = [0u8; 65];
        out[..64].copy_from_slice(&rs);
        out[64] = v + 27;
        Ok(hex::encode(out))
    }

    /// EIP-191 signature (r‖s‖v with v = 27/28), hex.
    pub fn sign(&self, message: &str) -> Result<String, IdentityError> {
        self.sign_digest(&eip191(message))
    }
}

/// Writes `text` to `path` readable only by the owner (0600), synced to disk.
#[cfg(unix)]
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

#[cfg(not(unix))]
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector_matches_ethereum() {
        // Private key 1 → the well-known address of generator point G.
        let mut one = [0u8; 32];
        one[31] = 1;
        let key = NodeKey::from_secret(&one).unwrap_or_else(|| unreachable!());
        assert_eq!(key.address(), "0x7e5f4552091a69125d5dfcb7b8c2659029395bdf");
        assert!(NodeKey::from_secret(&[0u8; 32]).is_none(), "zero is no key");
    }

    /// The same bytes as `k256`, the pure-Rust signer this replaced (and what Ethereum tools
    /// produce): RFC 6979 nonces, low s, the same recovery id, for many keys and digests.
    #[test]
    fn signatures_match_k256() {
        use k256::ecdsa::SigningKey;
        for i in 0u8..64 {
            let key = NodeKey::generate().unwrap_or_else(|e| unreachable!("{e}"));
            let theirs = SigningKey::from_slice(&key.secret.secret_bytes())
                .unwrap_or_else(|e| unreachable!("{e}"));
            let digest = keccak(&[i; 7]);
            let (sig, rec) = theirs
                .sign_prehash_recoverable(&digest)
                .unwrap_or_else(|e| unreachable!("{e}"));
            let mut expected = sig.to_bytes().to_vec();
            expected.push(rec.to_byte() + 27);
            assert_eq!(key.sign_digest(&digest).ok(), Some(hex::encode(expected)));
            let point = theirs.verifying_key().to_encoded_point(false);
            let hash = keccak(point.as_bytes().get(1..).unwrap_or_default());
            let address = format!("0x{}", hex::encode(hash.get(12..).unwrap_or_default()));
            assert_eq!(key.address(), address);
        }
    }

    #[test]
    fn sign_and_recover() {
        let key = NodeKey::generate().unwrap_or_else(|e| unreachable!("{e}"));
        let msg = challenge_message("abc", &key.address());
        let sig = key.sign(&msg).unwrap_or_default();
        assert_eq!(recover_address(&msg, &sig).ok(), Some(key.address()));
        let other = challenge_message("abd", &key.address());
        assert_ne!(
            recover_address(&other, &sig).ok(),
            Some(key.address()),
            "nonce is bound"
        );
        assert!(recover_address(&msg, "00").is_err());
        assert!(recover_address(&msg, "zz").is_err());
    }

    #[test]
    fn key_persists_across_restarts() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let path = dir.path().join("node.key");
        let a = NodeKey::load_or_create(&path).unwrap_or_else(|e| unreachable!("{e}"));
        let b = NodeKey::load_or_create(&path).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(a.address(), b.address());
        std::fs::write(&path, "garbage").unwrap_or_default();
        assert!(matches!(
            NodeKey::load_or_create(&path),
            Err(IdentityError::BadKey(_))
        ));
    }
}
