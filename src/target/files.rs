//! File I/O of the targets: atomic writes (temporary file, fsync, rename) with the right
//! modes, and reading back what a rendering consists of.

use crate::model::Model;
use crate::plan::Live;
use crate::render::MANIFEST;
use std::sync::{Arc, Mutex};

/// A set of files: path relative to a folder → content.
pub type Files = BTreeMap<String, Vec<u8>>;
use crate::spec::load::Source;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of files HAProxy reads (root and the haproxy group).
pub const FILE_MODE: u32 = 0o640;
/// Mode of files holding private keys.
pub const SECRET_MODE: u32 = 0o600;

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct FileError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn err(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` so that readers see the old file or the new one, never a part,
/// also after a power cut (synced to disk).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    write_replacing(path, bytes, mode, true)
}

/// Like `write_atomic`, old or new whatever process dies when, but not synced to disk: for a
/// record that only has to survive the process (a power cut stops HAProxy too, which then
/// starts on the files anyway), written on every apply where a sync costs milliseconds.
pub fn write_atomic_unsynced(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    write_replacing(path, bytes, mode, false)
}

/// Like `write_atomic` for one file of several written into the same folder: the file is
/// synced, its folder is not; the caller syncs the folder once after the last (`sync_dir`),
/// before it tells anyone the files are written.
pub fn write_atomic_in_batch(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    write_replacing_with(path, bytes, mode, true, false)
}

/// Syncs folder `dir` (its entries: the renames and removals made in it) to disk.
pub fn sync_dir(dir: &Path) -> Result<(), FileError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err(dir))
}

fn write_replacing(path: &Path, bytes: &[u8], mode: u32, sync: bool) -> Result<(), FileError> {
    write_replacing_with(path, bytes, mode, sync, sync)
}

fn write_replacing_with(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    sync: bool,
    sync_folder: bool,
) -> Result<(), FileError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err(dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.lunafront-tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        // The mode given at creation is filtered by the umask: set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        if sync {
            file.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if sync_folder {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err(path))
}

/// The mode a rendered file is written with: private keys 0600, the rest 0640.
pub fn mode_for(path: &str) -> u32 {
    if path.ends_with(".pem") {
        SECRET_MODE
    } else {
        FILE_MODE
    }
}

/// Reads the files at `paths` (relative to `dir`); missing files are simply absent.
pub fn read_files(
    dir: &Path,
    paths: &BTreeSet<String>,
) -> Result<BTreeMap<String, Vec<u8>>, FileError> {
    let mut out = BTreeMap::new();
    for rel in paths {
        let path = dir.join(rel);
        match fs::read(&path) {
            Ok(bytes) => {
                out.insert(rel.clone(), bytes);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(&path)(e)),
        }
    }
    Ok(out)
}

/// What the last apply recorded beside the configuration.
#[derive(Clone)]
pub struct Recorded {
    pub model: Arc<Model>,
    /// Path (relative to the folder) → SHA-256 of each file it wrote.
    pub files: BTreeMap<String, String>,
}

/// Reads the manifest in `dir`: `Ok(None)` when there is none. The model it records is kept
/// for as long as the manifest does not change: a daemon reading it after each apply does
/// not validate the same state again.
pub fn read_recorded(dir: &Path) -> Result<Option<Recorded>, String> {
    let path = dir.join(MANIFEST);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    recorded_from_text(&text, &path).map(Some)
}

/// The manifest read last: its path, the digest of its text, and what it records.
static LAST: Mutex<Option<(PathBuf, String, Recorded)>> = Mutex::new(None);

/// An apply that just wrote `manifest` into `dir` knows the model it records (`model`, as
/// rendered for the target): the next read of that manifest need not validate it again.
pub fn remember_recorded(dir: &Path, manifest: &[u8], model: Arc<Model>) {
    #[derive(serde::Deserialize)]
    struct Files {
        #[serde(default)]
        files: BTreeMap<String, String>,
    }
    let Ok(recorded) = serde_json::from_slice::<Files>(manifest) else {
        return;
    };
    let digest = crate::plan::sha256_hex(manifest);
    *LAST.lock().expect("manifest cache") = Some((
        dir.join(MANIFEST),
        digest,
        Recorded {
            model,
            files: recorded.files,
        },
    ));
}

/// The state a manifest records (`origin` names it in messages). The last one read is kept
/// for as long as its text does not change.
pub fn recorded_from_text(text: &str, origin: &Path) -> Result<Recorded, String> {
    let path = origin.to_path_buf();
    let digest = crate::plan::sha256_hex(text.as_bytes());
    if let Some((p, d, recorded)) = LAST.lock().expect("manifest cache").as_ref()
        && *p == path
        && *d == digest
    {
        return Ok(recorded.clone());
    }
    let (source, recording) = Source::from_manifest(text, &path)?;
    let validation = crate::model::validate(&source);
    let recorded = match validation.model {
        Some(model) => Recorded {
            model: Arc::new(
                model
                    .with_binds(&recording.binds)
                    .into_owned()
                    .with_issued(recording.issued),
            ),
            files: recording.files,
        },
        None => {
            return Err(format!(
                "{}: the recorded state no longer validates ({})",
                path.display(),
                validation
                    .errors()
                    .next()
                    .map(|d| d.message.clone())
                    .unwrap_or_default()
            ));
        }
    };
    *LAST.lock().expect("manifest cache") = Some((path, digest, recorded.clone()));
    Ok(recorded)
}

/// What a folder holding a rendering has now: the files at `wanted` and those the last
/// apply recorded, with what that apply recorded.
pub fn observe_dir(
    dir: &Path,
    wanted: impl IntoIterator<Item = String>,
) -> Result<Live, FileError> {
    let (recorded, previous_error) = match read_recorded(dir) {
        Ok(recorded) => (recorded, None),
        Err(e) => (None, Some(e)),
    };
    let mut paths: BTreeSet<String> = wanted.into_iter().collect();
    paths.insert(MANIFEST.to_string());
    if let Some(recorded) = &recorded {
        paths.extend(
            recorded
                .files
                .keys()
                .filter(|p| is_relative_inside(p))
                .cloned(),
        );
    }
    let files = read_files(dir, &paths)?;
    let (previous, recorded_files) = match recorded {
        Some(r) => (Some(r.model), r.files),
        None => (None, BTreeMap::new()),
    };
    Ok(Live {
        files,
        previous,
        recorded_files,
        previous_error,
        version: None,
        interrupted: None,
    })
}

/// A recorded path stays inside the folder (the manifest could have been edited by hand).
fn is_relative_inside(path: &str) -> bool {
    !path.starts_with('/') && !path.split('/').any(|c| c == ".." || c.is_empty())
}

/// Writes `new` into `dir`, each file atomically: the configuration (`config_name`) after the
/// files it names, so it never names a file that is not there yet, and the manifest last, so
/// it never records files that are not all there. Removes the files of `live` that `new`
/// does not have. Files whose content `live` already has are not touched. Returns the paths
/// written or removed.
pub fn write_files(
    dir: &Path,
    new: &Files,
    live: &Files,
    config_name: &str,
) -> Result<Vec<String>, FileError> {
    let mut written = Vec::new();
    let ordered = new
        .iter()
        .filter(|(p, _)| *p != config_name && *p != MANIFEST)
        .chain(new.get_key_value(config_name))
        .chain(new.get_key_value(MANIFEST));
    for (path, bytes) in ordered {
        let target = dir.join(path);
        let mode = mode_for(path);
        if live.get(path) == Some(bytes) && has_mode(&target, mode) {
            continue;
        }
        write_atomic(&target, bytes, mode)?;
        written.push(path.clone());
    }
    for stale in live.keys().filter(|p| !new.contains_key(*p)) {
        let path = dir.join(stale);
        match fs::remove_file(&path) {
            Ok(()) => written.push(stale.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(&path)(e)),
        }
    }
    Ok(written)
}

fn has_mode(path: &Path, mode: u32) -> bool {
    fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o777 == mode)
}
