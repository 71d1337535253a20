//! Sign-In with Ethereum (EIP-4361): parse the message a wallet signed, check it was meant for
//! us (domain, URI, chain, time window) and recover the signer (EIP-191). Nonce bookkeeping is
//! the caller's; this module is pure.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiweMessage {
    pub domain: String,
    pub address: String,
    pub statement: Option<String>,
    pub uri: String,
    pub version: String,
    pub chain_id: u64,
    pub nonce: String,
    pub issued_at: OffsetDateTime,
    pub expiration_time: Option<OffsetDateTime>,
    pub not_before: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SiweError {
    #[error("not a Sign-In with Ethereum message: {0}")]
    Malformed(String),
    #[error("the message is for {0}, not this site")]
    WrongDomain(String),
    #[error("the message is for chain {0}, not this network's")]
    WrongChain(u64),
    #[error("the message has expired")]
    Expired,
    #[error("the message is not valid yet")]
    NotYetValid,
    #[error("the signature does not match the address in the message")]
    BadSignature,
}

const HEADER: &str = " wants you to sign in with your Ethereum account:";
/// Messages and signatures are short; anything longer is refused before parsing.
pub const MAX_MESSAGE_BYTES: usize = 4096;

fn time_field(v: &str) -> Result<OffsetDateTime, SiweError> {
    OffsetDateTime::parse(v, &Rfc3339).map_err(|_| SiweError::Malformed(format!("bad time {v:?}")))
}

impl SiweMessage {
    pub fn parse(text: &str) -> Result<Self, SiweError> {
        let bad = |m: &str| SiweError::Malformed(m.to_owned());
        if text.len() > MAX_MESSAGE_BYTES {
            return Err(bad("too long"));
        }
        let mut lines = text.split('\n');
        let domain = lines
            .next()
            .and_then(|l| l.strip_suffix(HEADER))
            .ok_or_else(|| bad("missing header line"))?
            .to_owned();
        let address = lines
            .next()
            .ok_or_else(|| bad("missing address"))?
            .trim()
            .to_owned();
        if address.len() != 42
            || !address.starts_with("0x")
            || !address[2..].bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(bad("bad address"));
        }
        if lines.next() != Some("") {
            return Err(bad("expected a blank line after the address"));
        }
        let rest: Vec<&str> = lines.collect();
        let mut i = 0;
        let mut statement = None;
        if let Some(first) = rest.first()
            && !first.starts_with("URI: ")
        {
            statement = Some((*first).to_owned());
            if rest.get(1) != Some(&"") {
                return Err(bad("expected a blank line after the statement"));
            }
            i = 2;
        }
        let mut field = |name: &str, required: bool| -> Result<Option<String>, SiweError> {
            match rest.get(i).and_then(|l| l.strip_prefix(name)) {
                Some(v) => {
                    i += 1;
                    Ok(Some(v.to_owned()))
                }
                None if required => Err(SiweError::Malformed(format!("missing {name:?}"))),
                None => Ok(None),
            }
        };
        let uri = field("URI: ", true)?.unwrap_or_default();
        let version = field("Version: ", true)?.unwrap_or_default();
        if version != "1" {
            return Err(bad("unsupported version"));
        }
        let chain_id = field("Chain ID: ", true)?
            .unwrap_or_default()
            .parse()
            .map_err(|_| bad("bad chain id"))?;
        let nonce = field("Nonce: ", true)?.unwrap_or_default();
        if nonce.len() < 8 || !nonce.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(bad("nonce must be at least 8 alphanumeric characters"));
        }
        let issued_at = time_field(&field("Issued At: ", true)?.unwrap_or_default())?;
        let expiration_time = field("Expiration Time: ", false)?
            .map(|v| time_field(&v))
            .transpose()?;
        let not_before = field("Not Before: ", false)?
            .map(|v| time_field(&v))
            .transpose()?;
        Ok(Self {
            domain,
            address,
            statement,
            uri,
            version,
            chain_id,
            nonce,
            issued_at,
            expiration_time,
            not_before,
        })
    }

    /// The canonical text of this message (what a wallet shows and signs).
    pub fn to_text(&self) -> String {
        let mut s = format!("{}{HEADER}\n{}\n\n", self.domain, self.address);
        if let Some(st) = &self.statement {
            s.push_str(st);
            s.push_str("\n\n");
        }
        let t = |t: &OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
        s.push_str(&format!(
            "URI: {}\nVersion: {}\nChain ID: {}\nNonce: {}\nIssued At: {}",
            self.uri,
            self.version,
            self.chain_id,
            self.nonce,
            t(&self.issued_at)
        ));
        if let Some(e) = &self.expiration_time {
            s.push_str(&format!("\nExpiration Time: {}", t(e)));
        }
        if let Some(n) = &self.not_before {
            s.push_str(&format!("\nNot Before: {}", t(n)));
        }
        s
    }

    /// Checks the message against this site and time, then the signature over `text`.
    /// Returns the signer's address, lower-case.
    pub fn verify(
        &self,
        text: &str,
        signature: &str,
        domain: &str,
        chain_id: u64,
        now: OffsetDateTime,
    ) -> Result<String, SiweError> {
        if self.domain != domain {
            return Err(SiweError::WrongDomain(self.domain.clone()));
        }
        if self.chain_id != chain_id {
            return Err(SiweError::WrongChain(self.chain_id));
        }
        if self.expiration_time.is_some_and(|e| now >= e) {
            return Err(SiweError::Expired);
        }
        // Accept small clock skew on issue time; refuse stale messages (10 minutes).
        if self.not_before.is_some_and(|n| now < n)
            || self.issued_at > now + time::Duration::minutes(2)
        {
            return Err(SiweError::NotYetValid);
        }
        if now - self.issued_at > time::Duration::minutes(10) {
            return Err(SiweError::Expired);
        }
        let signer =
            lattice_link::recover_address(text, signature).map_err(|_| SiweError::BadSignature)?;
        if signer != self.address.to_lowercase() {
            return Err(SiweError::BadSignature);
        }
        Ok(signer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lattice_link::NodeKey;

    fn message(address: &str, nonce: &str, issued: OffsetDateTime) -> SiweMessage {
        SiweMessage {
            domain: "127.0.0.1:8080".into(),
            address: address.into(),
            statement: Some("Sign in to Lattice".into()),
            uri: "http://127.0.0.1:8080".into(),
            version: "1".into(),
            chain_id: 31337,
            nonce: nonce.into(),
            issued_at: issued,
            expiration_time: None,
            not_before: None,
        }
    }

    #[test]
    fn round_trips_and_verifies_a_real_signature() {
        let key = NodeKey::generate().unwrap();
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let m = message(&key.address(), "abcdef1234", now);
        let text = m.to_text();
        assert_eq!(SiweMessage::parse(&text).unwrap(), m);
        let sig = key.sign(&text).unwrap();
        let parsed = SiweMessage::parse(&text).unwrap();
        assert_eq!(
            parsed.verify(&text, &sig, "127.0.0.1:8080", 31337, now),
            Ok(key.address())
        );
        assert_eq!(
            parsed.verify(&text, &sig, "evil.example", 31337, now),
            Err(SiweError::WrongDomain("127.0.0.1:8080".into()))
        );
        assert_eq!(
            parsed.verify(&text, &sig, "127.0.0.1:8080", 1, now),
            Err(SiweError::WrongChain(31337))
        );
        assert_eq!(
            parsed.verify(
                &text,
                &sig,
                "127.0.0.1:8080",
                31337,
                now + time::Duration::hours(1)
            ),
            Err(SiweError::Expired)
        );
        // Someone else's signature, or a tampered message.
        let other = NodeKey::generate().unwrap();
        let forged = other.sign(&text).unwrap();
        assert_eq!(
            parsed.verify(&text, &forged, "127.0.0.1:8080", 31337, now),
            Err(SiweError::BadSignature)
        );
        let tampered = text.replace("abcdef1234", "abcdef9999");
        let t = SiweMessage::parse(&tampered).unwrap();
        assert_eq!(
            t.verify(&tampered, &sig, "127.0.0.1:8080", 31337, now),
            Err(SiweError::BadSignature)
        );
    }

    #[test]
    fn statement_is_optional_and_garbage_is_refused() {
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let mut m = message(
            "0x7e5f4552091a69125d5dfcb7b8c2659029395bdf",
            "abcdefgh",
            now,
        );
        m.statement = None;
        m.expiration_time = Some(now + time::Duration::minutes(5));
        assert_eq!(SiweMessage::parse(&m.to_text()).unwrap(), m);
        for bad in [
            "",
            "hello",
            "x wants you to sign in with your Ethereum account:\n0x12\n\nURI: a",
            &m.to_text().replace("Version: 1", "Version: 2"),
            &m.to_text().replace("Nonce: abcdefgh", "Nonce: a b"),
            &"a".repeat(5000),
        ] {
            assert!(SiweMessage::parse(bad).is_err(), "{bad:?}");
        }
    }
}
