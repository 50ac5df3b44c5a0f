//! Applied states, kept per target under its state folder (I/O edge): each apply records the
//! exact files it wrote and a summary, so `history` can list them and `rollback` can put one
//! back. Files are 0600 in 0700 folders: they include private keys.

use super::apply::{ApplyRequest, How};
use super::files::Files;
use serde::{Deserialize, Serialize};
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub seq: u64,
    /// RFC 3339, UTC.
    pub time: String,
    pub target: String,
    /// How it was applied: `runtime`, `reload`, `start`, `unchanged`.
    pub how: String,
    /// The plan's change summaries (`+ domain a.example.com → shop`).
    pub changes: Vec<String>,
    /// Set when this apply put back an earlier entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<u64>,
    /// The git commit the state was read at, when it came from a git checkout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_commit: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("history at {path}: {message}")]
pub struct HistoryError {
    pub path: PathBuf,
    pub message: String,
}

pub struct History {
    dir: PathBuf,
}

const META: &str = "meta.json";
const FILES: &str = "files";

impl History {
    pub fn new(state_dir: &Path) -> History {
        History {
            dir: state_dir.join("history"),
        }
    }

    fn error(&self, message: impl Into<String>) -> HistoryError {
        HistoryError {
            path: self.dir.clone(),
            message: message.into(),
        }
    }

    /// Entries, oldest first.
    pub fn list(&self) -> Result<Vec<Entry>, HistoryError> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(self.error(e.to_string())),
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.parse::<u64>().is_err() {
                continue;
            }
            let meta = fs::read_to_string(entry.path().join(META))
                .map_err(|e| self.error(format!("{name}: {e}")))?;
            out.push(serde_json::from_str(&meta).map_err(|e| self.error(format!("{name}: {e}")))?);
        }
        out.sort_by_key(|e: &Entry| e.seq);
        Ok(out)
    }

    /// Records an applied state and keeps only the newest `keep` entries.
    pub fn record(
        &self,
        files: &Files,
        mut entry: Entry,
        keep: usize,
    ) -> Result<u64, HistoryError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| self.error(e.to_string()))?;
        let existing = self.list()?;
        entry.seq = existing.last().map(|e| e.seq + 1).unwrap_or(1);
        // Written under a hidden name and renamed: an entry is complete or absent.
        let tmp = self
            .dir
            .join(format!(".{}-{}", entry.seq, std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let write = || -> std::io::Result<()> {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(tmp.join(FILES))?;
            for (path, bytes) in files {
                let target = tmp.join(FILES).join(stored_name(path));
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(target.parent().expect("under files"))?;
                fs::write(&target, bytes)?;
                fs::set_permissions(&target, fs::Permissions::from_mode(0o600))?;
            }
            let meta = tmp.join(META);
            fs::write(
                &meta,
                serde_json::to_vec_pretty(&entry).expect("entry serializes"),
            )?;
            fs::set_permissions(&meta, fs::Permissions::from_mode(0o600))?;
            fs::rename(&tmp, self.dir.join(format!("{:06}", entry.seq)))
        };
        if let Err(e) = write() {
            let _ = fs::remove_dir_all(&tmp);
            return Err(self.error(e.to_string()));
        }
        let all = self.list()?;
        if all.len() > keep {
            for old in &all[..all.len() - keep] {
                let _ = fs::remove_dir_all(self.dir.join(format!("{:06}", old.seq)));
            }
        }
        Ok(entry.seq)
    }

    /// Records a successful apply. The change is live whatever this returns: a failure is
    /// reported as such by the caller (see `Applied::unrecorded`), never passed over.
    pub fn record_applied(
        &self,
        request: &ApplyRequest,
        how: &How,
        keep: usize,
    ) -> Result<u64, HistoryError> {
        let entry = Entry {
            seq: 0,
            time: crate::clock::rfc3339_now(),
            target: request.target_name.clone(),
            how: how.label().to_string(),
            changes: request.changes.clone(),
            rollback_of: request.rollback_of,
            git_commit: request.git_commit.clone(),
        };
        self.record(&request.files, entry, keep)
    }

    /// One file an entry recorded.
    pub fn file(&self, seq: u64, path: &str) -> Result<Vec<u8>, HistoryError> {
        fs::read(
            self.dir
                .join(format!("{seq:06}"))
                .join(FILES)
                .join(stored_name(path)),
        )
        .map_err(|e| self.error(format!("entry {seq}: {path}: {e}")))
    }

    /// The files an entry recorded.
    pub fn files(&self, seq: u64) -> Result<Files, HistoryError> {
        let root = self.dir.join(format!("{seq:06}")).join(FILES);
        let mut out = Files::new();
        fn walk(dir: &Path, root: &Path, out: &mut Files) -> std::io::Result<()> {
            for entry in fs::read_dir(dir)? {
                let entry = entry?;
                let path = entry.path();
                // Not through symlinks: an entry holds real folders only.
                if entry.file_type()?.is_dir() {
                    walk(&path, root, out)?;
                } else {
                    let rel = path
                        .strip_prefix(root)
                        .expect("under root")
                        .to_string_lossy()
                        .into_owned();
                    out.insert(path_of(rel), fs::read(&path)?);
                }
            }
            Ok(())
        }
        walk(&root, &root, &mut out).map_err(|e| self.error(format!("entry {seq}: {e}")))?;
        Ok(out)
    }
}

/// Absolute paths (a Data Plane API target's maps folder) are kept under `@root/`: a rendered
/// relative path never starts with `@`.
const ROOT: &str = "@root";

fn stored_name(path: &str) -> String {
    match path.strip_prefix('/') {
        Some(rest) => format!("{ROOT}/{rest}"),
        None => path.to_string(),
    }
}

fn path_of(stored: String) -> String {
    match stored.strip_prefix(ROOT) {
        Some(rest) if rest.starts_with('/') => rest.to_string(),
        _ => stored,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            seq: 0,
            time: "2026-01-01T00:00:00Z".into(),
            target: "local".into(),
            how: "reload".into(),
            changes: vec!["+ domain a.example.com → shop".into()],
            rollback_of: None,
            git_commit: None,
        }
    }

    #[test]
    fn records_lists_prunes_and_reads_back() {
        let dir = std::env::temp_dir().join(format!("lunafront-history-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let history = History::new(&dir);
        for i in 0..5u8 {
            let files: Files = [
                ("haproxy.cfg".to_string(), vec![i]),
                ("maps/hosts.map".to_string(), vec![i, i]),
            ]
            .into();
            history.record(&files, entry(), 3).unwrap();
        }
        let list = history.list().unwrap();
        assert_eq!(
            list.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        let files = history.files(4).unwrap();
        assert_eq!(files["maps/hosts.map"], vec![3, 3]);
        let mode = fs::metadata(dir.join("history/000004/files/haproxy.cfg"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn absolute_paths_come_back_absolute() {
        let dir =
            std::env::temp_dir().join(format!("lunafront-history-abs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let history = History::new(&dir);
        let files: Files = [
            ("haproxy.cfg".to_string(), b"global\n".to_vec()),
            ("/etc/haproxy/maps/hosts.map".to_string(), b"a b\n".to_vec()),
        ]
        .into();
        let seq = history.record(&files, entry(), 3).unwrap();
        assert_eq!(history.files(seq).unwrap(), files);
        let _ = fs::remove_dir_all(&dir);
    }
}
