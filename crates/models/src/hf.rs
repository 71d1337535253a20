//! Streaming one file from a Hugging Face compatible hub into a verified local file.
//! Redirects are followed by hand so the hub's `X-Linked-Etag` (the file's sha256) is not lost.

use std::path::Path;
use std::time::Duration;

use reqwest::header::{self, HeaderMap};
use reqwest::{StatusCode, Url};

use crate::error::{ModelError, blocking};
use crate::files::{Expect, PartWriter};
use crate::progress::Progress;
use crate::spec::{HfFile, parse_sha256};

/// The public hub, used unless `HF_ENDPOINT` says otherwise.
pub const DEFAULT_HF_ENDPOINT: &str = "https://huggingface.co";

/// The hub redirects once to its CDN; more than a few hops means a loop.
const MAX_REDIRECTS: usize = 8;

/// No progress for this long means a dead connection, not a slow one.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Chunks buffered between the socket and the disk writer.
const IN_FLIGHT_CHUNKS: usize = 16;

/// Refuse anything bigger: no single GGUF we could serve comes close.
pub(crate) const MAX_DOWNLOAD: u64 = 512 << 30;

/// Where to download from and with which credentials.
#[derive(Clone)]
pub(crate) struct Hub {
    pub(crate) endpoint: String,
    pub(crate) token: Option<String>,
}

impl std::fmt::Debug for Hub {
    // Hand-written so a logged `ModelStore` never shows the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// What the download produced and how far it could be checked.
#[derive(Debug)]
pub(crate) struct Downloaded {
    pub(crate) sha256: String,
    /// The hash matched a value given by the user or announced by the hub.
    pub(crate) pinned: bool,
}

impl Hub {
    /// `{endpoint}/{owner}/{repo}/resolve/{revision}/{path}`, each part percent-encoded.
    pub(crate) fn url(&self, file: &HfFile) -> Result<Url, ModelError> {
        let bad = |reason: String| ModelError::InvalidSpec {
            spec: format!("HF_ENDPOINT={}", self.endpoint),
            reason,
        };
        let mut url = Url::parse(&self.endpoint).map_err(|e| bad(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("the endpoint must be an http or https URL".into()));
        }
        url.path_segments_mut()
            .map_err(|()| bad("the endpoint cannot have a path appended".into()))?
            .pop_if_empty()
            .extend([&file.owner, &file.repo, "resolve", &file.revision])
            .extend(file.path.split('/'));
        Ok(url)
    }

    /// Downloads `file` to `<dest>.part`, verifies it and renames it to `dest`.
    pub(crate) async fn download(
        &self,
        file: &HfFile,
        dest: &Path,
        expected_sha: Option<&str>,
        progress: &dyn Progress,
    ) -> Result<Downloaded, ModelError> {
        let url = self.url(file)?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .user_agent(concat!("lattice-models/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| ModelError::Http {
                url: url.to_string(),
                source,
            })?;
        let (mut response, announced_sha) = self.follow(&client, url.clone()).await?;
        let length = response.content_length();
        if let Some(len) = length.filter(|&l| l > MAX_DOWNLOAD) {
            return Err(ModelError::TooLarge {
                what: format!("{url} ({len} bytes)"),
                limit: MAX_DOWNLOAD,
            });
        }

        let expected = match expected_sha {
            Some(s) => Some(parse_sha256(s)?),
            None => announced_sha,
        };
        let pinned = expected.is_some();

        // Disk writes and hashing run on a blocking thread fed through a bounded channel,
        // so a slow disk pushes back on the socket instead of buffering the model in memory.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(IN_FLIGHT_CHUNKS);
        let dest_owned = dest.to_owned();
        let writer = tokio::task::spawn_blocking(move || {
            let mut part = PartWriter::create(&dest_owned)?;
            while let Some(chunk) = rx.blocking_recv() {
                part.write(&chunk)?;
            }
            Ok::<_, ModelError>(part)
        });
        progress.start(&format!("downloading {}", file.file_name()), length);
        let streamed = stream_body(&mut response, &url, length, &tx, progress).await;
        drop(tx);
        progress.finish();
        let written = writer.await.map_err(|e| ModelError::Task(e.to_string()))?;
        // A failed write closes the channel and ends the stream early: report the write error.
        let part = written?;
        let received = streamed?;
        if let Some(expected) = length.filter(|&l| l != received) {
            return Err(ModelError::Incomplete {
                url: url.to_string(),
                expected,
                actual: received,
            });
        }
        let expect = Expect {
            size: length,
            sha256: expected,
        };
        let dest_owned = dest.to_owned();
        let sha256 = blocking(move || part.commit(&dest_owned, &expect, true)).await?;
        Ok(Downloaded { sha256, pinned })
    }

    /// Follows redirects, remembering a sha256 announced by any hop.
    async fn follow(
        &self,
        client: &reqwest::Client,
        mut url: Url,
    ) -> Result<(reqwest::Response, Option<String>), ModelError> {
        let endpoint_origin = Url::parse(&self.endpoint).ok().map(|u| u.origin());
        let mut announced = None;
        let mut last = StatusCode::FOUND;
        for _ in 0..=MAX_REDIRECTS {
            let mut request = client.get(url.clone());
            // The token is for the hub only, never for the CDN it redirects to.
            if let Some(token) = &self.token
                && Some(url.origin()) == endpoint_origin
            {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.map_err(|source| ModelError::Http {
                url: url.to_string(),
                source,
            })?;
            announced = announced.or_else(|| announced_sha256(response.headers()));
            let status = response.status();
            last = status;
            if status.is_success() {
                return Ok((response, announced));
            }
            if status.is_redirection() {
                let next = response
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|loc| url.join(loc).ok());
                match next {
                    Some(next) => {
                        url = next;
                        continue;
                    }
                    None => {
                        return Err(ModelError::HttpStatus {
                            url: url.to_string(),
                            status: status.as_u16(),
                            hint: " without a usable Location header".into(),
                        });
                    }
                }
            }
            return Err(ModelError::HttpStatus {
                url: url.to_string(),
                status: status.as_u16(),
                hint: status_hint(status).into(),
            });
        }
        Err(ModelError::HttpStatus {
            url: url.to_string(),
            status: last.as_u16(),
            hint: format!(": more than {MAX_REDIRECTS} redirects"),
        })
    }
}

/// Reads the body into `tx`; returns how many bytes were received.
async fn stream_body(
    response: &mut reqwest::Response,
    url: &Url,
    length: Option<u64>,
    tx: &tokio::sync::mpsc::Sender<bytes::Bytes>,
    progress: &dyn Progress,
) -> Result<u64, ModelError> {
    let limit = length.unwrap_or(MAX_DOWNLOAD);
    let mut received = 0u64;
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(received),
            Err(source) => {
                return Err(match length {
                    Some(expected) if received < expected => ModelError::Incomplete {
                        url: url.to_string(),
                        expected,
                        actual: received,
                    },
                    _ => ModelError::Http {
                        url: url.to_string(),
                        source,
                    },
                });
            }
        };
        received += chunk.len() as u64;
        if received > limit {
            return Err(ModelError::TooLarge {
                what: format!("the body of {url}"),
                limit,
            });
        }
        let n = chunk.len() as u64;
        if tx.send(chunk).await.is_err() {
            // The writer stopped on an error of its own, which the caller reports.
            return Ok(received);
        }
        progress.advance(n);
    }
}

/// The hub sends the sha256 of LFS files as `X-Linked-Etag` (or `ETag` when serving directly).
///
/// Only a 64-hex value counts: git blob ids and CDN md5 etags are other hashes.
fn announced_sha256(headers: &HeaderMap) -> Option<String> {
    ["x-linked-etag", "etag"].iter().find_map(|name| {
        let raw = headers.get(*name)?.to_str().ok()?;
        let v = raw.trim().trim_start_matches("W/").trim_matches('"');
        parse_sha256(v).ok()
    })
}

fn status_hint(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            ": the repository may be gated or private; set HF_TOKEN"
        }
        StatusCode::NOT_FOUND => ": check the owner, repository, revision and file path",
        _ => "",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn hub(endpoint: &str) -> Hub {
        Hub {
            endpoint: endpoint.into(),
            token: None,
        }
    }

    #[test]
    fn urls() {
        let f = HfFile::parse("o/r@v1/sub dir/m.gguf").unwrap();
        assert_eq!(
            hub("https://hub.example").url(&f).unwrap().as_str(),
            "https://hub.example/o/r/resolve/v1/sub%20dir/m.gguf"
        );
        assert_eq!(
            hub("http://127.0.0.1:9/mirror/").url(&f).unwrap().as_str(),
            "http://127.0.0.1:9/mirror/o/r/resolve/v1/sub%20dir/m.gguf"
        );
        assert!(hub("ftp://x").url(&f).is_err());
        assert!(hub("not a url").url(&f).is_err());
    }

    #[test]
    fn announced_hashes() {
        let sha = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";
        let mut h = HeaderMap::new();
        h.insert(
            "etag",
            "\"0123456789abcdef0123456789abcdef\"".parse().unwrap(),
        );
        assert_eq!(announced_sha256(&h), None);
        h.insert("x-linked-etag", format!("\"{sha}\"").parse().unwrap());
        assert_eq!(announced_sha256(&h).as_deref(), Some(sha));
    }
}
