//! `load`: the first step of the pipeline and the only code that knows YAML. Reads one state
//! file or a directory of `*.yaml` files, merges them into one JSON document (a key defined
//! twice is an error naming both places), reads the certificate folders the state names, and
//! keeps each file's text so any later diagnostic can point at the user's line and column.

use super::diagnostics::{Diagnostic, Location};
use super::spans::{SpanIndex, escape_pointer_token};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

mod derive;

pub use derive::{Base, Changes};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read the state at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no state files (*.yaml, *.yml) under {0}")]
    NoStateFiles(PathBuf),
}

#[derive(Debug)]
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
    spans: OnceLock<SpanIndex>,
}

impl SourceFile {
    pub fn new(path: PathBuf, text: String) -> SourceFile {
        SourceFile {
            path,
            text,
            spans: OnceLock::new(),
        }
    }
}

/// One certificate file of a listener's `certificates` folder, as read from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFile {
    pub name: String,
    pub sha256: String,
    /// The PEM bytes; `None` when the certificate is known only by its digest (a state
    /// recorded by a previous apply).
    pub pem: Option<Arc<[u8]>>,
}

impl CertFile {
    pub fn from_pem(name: String, pem: Vec<u8>) -> CertFile {
        CertFile {
            name,
            sha256: hex::encode(Sha256::digest(&pem)),
            pem: Some(pem.into()),
        }
    }
}

/// A listener's certificate folder: where it resolved to, and its `*.pem` files or why they
/// could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertDir {
    pub path: PathBuf,
    pub files: Result<Vec<CertFile>, String>,
}

/// The loaded, merged desired state with everything needed to point back at the user's text.
#[derive(Debug)]
pub struct Source {
    pub files: Vec<SourceFile>,
    /// The merged document (shared with the model built from it: it is recorded with each apply).
    pub document: Arc<Value>,
    /// `/section/entry` (and `/section`) → index of the file that defined it. Hashed: only
    /// ever looked up by pointer, never walked in order (one insert per entry of every load).
    origins: HashMap<String, usize>,
    /// Listener name → its certificate folder.
    pub certificates: BTreeMap<String, CertDir>,
    pub diagnostics: Vec<Diagnostic>,
    /// Each file's top-level names, by index (a section comes from the first file naming it);
    /// empty for a source not parsed from files. What `derive` needs of the files it keeps.
    sections: Vec<Vec<String>>,
}

impl Source {
    /// What this source was read from, by digest (see `Fingerprint`).
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint {
            files: self
                .files
                .iter()
                .map(|f| (f.path.clone(), Sha256::digest(f.text.as_bytes()).into()))
                .collect(),
            certificates: self
                .certificates
                .values()
                .map(|dir| (dir.path.clone(), cert_digests(&dir.files)))
                .collect(),
        }
    }
}

/// Everything a source was read from, by digest: each state file's path and the SHA-256 of its
/// text, and each certificate folder's files (name and SHA-256) or the error reading it. Two
/// loads with the same fingerprint validate the same. A few bytes per file: the daemon keeps
/// the one of the state it last applied, and learns that the files on disk are still those
/// without parsing them (`still_on_disk`). SHA-256, not a fast hash: a file whose text was
/// made to collide with the applied one would never be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    files: Vec<(PathBuf, [u8; 32])>,
    certificates: Vec<(PathBuf, CertDigests)>,
}

/// A certificate folder's files as (name, SHA-256), or the error reading it.
type CertDigests = Result<Vec<(String, String)>, String>;

fn cert_digests(files: &Result<Vec<CertFile>, String>) -> CertDigests {
    match files {
        Ok(files) => Ok(files
            .iter()
            .map(|f| (f.name.clone(), f.sha256.clone()))
            .collect()),
        Err(e) => Err(e.clone()),
    }
}

impl Fingerprint {
    /// Whether a load of `path` now would read exactly what this was taken from — the same
    /// state files with the same texts and the same certificate files — found without parsing
    /// anything. The certificate folders are the ones the same files name: read again.
    pub fn still_on_disk(&self, path: &Path) -> bool {
        let Ok((files, folders)) = read_state_files(path, &[]) else {
            return false;
        };
        folders.is_empty()
            && files.len() == self.files.len()
            && files.iter().zip(&self.files).all(|(file, (path, digest))| {
                file.path == *path
                    && <[u8; 32]>::from(Sha256::digest(file.text.as_bytes())) == *digest
            })
            && self
                .certificates
                .iter()
                .all(|(dir, digests)| cert_digests(&read_cert_dir(dir)) == *digests)
    }
}

/// Reads the state at `path` (a file or a directory) and the certificate folders it names.
pub fn load_path(path: &Path) -> Result<Source, LoadError> {
    load_path_with(path, &[])
}

/// `load_path`, with files of a state folder seen as the text given instead of what is on disk
/// (None: as if it did not exist), whether or not they exist: the state as it would be once
/// those files are written. The API checks changes this way before writing anything.
pub fn load_path_with(path: &Path, replace: &[(&Path, Option<&str>)]) -> Result<Source, LoadError> {
    load_path_from(path, replace, None)
}

/// `load_path_with`, made from `base` (an earlier load of the same path) when it can be: only
/// the files that differ from it are parsed (`Base::derive`), with the same result.
pub fn load_path_from(
    path: &Path,
    replace: &[(&Path, Option<&str>)],
    base: Option<&Base>,
) -> Result<Source, LoadError> {
    let (files, folders) = read_state_files(path, replace)?;
    let derived = match base {
        Some(base) => base.derive(files),
        None => Err(files),
    };
    let mut source = derived.unwrap_or_else(|files| Source::parse_files(files, true));
    // A folder where a state file was (say, a file replaced by an empty folder) took that
    // file's entries with it: an error, never a state without them.
    for folder in folders {
        source.diagnostics.push(
            Diagnostic::error("not-a-file", "a folder has the name of a state file")
                .hint("a *.yaml or *.yml name in a state folder must be a file: put the file back, or rename the folder")
                .at(Some(Location {
                    file: folder,
                    line: 1,
                    column: 1,
                })),
        );
    }
    source.read_certificates();
    Ok(source)
}

/// The state files at `path` with their texts (`replace` as in `load_path_with`), and the
/// folders named like state files found among them.
fn read_state_files(
    path: &Path,
    replace: &[(&Path, Option<&str>)],
) -> Result<(Vec<SourceFile>, Vec<PathBuf>), LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let mut folders = Vec::new();
    let paths = if meta.is_dir() {
        let mut found = Vec::new();
        let mut seen = std::collections::HashSet::new();
        collect_yaml(path, &mut found, &mut folders, &mut seen).map_err(io)?;
        for (file, text) in replace {
            found.retain(|p| p != file);
            if text.is_some() {
                found.push(file.to_path_buf());
            }
        }
        found.sort();
        folders.sort();
        if found.is_empty() && folders.is_empty() {
            return Err(LoadError::NoStateFiles(path.to_path_buf()));
        }
        found
    } else {
        vec![path.to_path_buf()]
    };
    let mut files = Vec::with_capacity(paths.len());
    for p in paths {
        let text = match replace.iter().find(|(file, _)| *file == p) {
            Some((_, Some(text))) => text.to_string(),
            _ => std::fs::read_to_string(&p).map_err(|source| LoadError::Io {
                path: p.clone(),
                source,
            })?,
        };
        files.push(SourceFile::new(p, text));
    }
    Ok((files, folders))
}

/// Whether a load of `path` now would read exactly what `source` was read from (see
/// `Fingerprint::still_on_disk`). The daemon's reconcile takes the state the API validated
/// before writing a change this way, instead of loading the files that change wrote
/// (`daemon::reconcile::Prevalidated`).
pub fn still_on_disk(path: &Path, source: &Source) -> bool {
    source.fingerprint().still_on_disk(path)
}

fn is_yaml_name(name: &str) -> bool {
    name.ends_with(".yaml") || name.ends_with(".yml")
}

/// The state files under `dir`. Folders are followed through symlinks, each one once (by
/// device and inode): a symlink loop (`ln -s . loop`) or a second way to the same folder
/// adds nothing.
fn collect_yaml(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    folders: &mut Vec<PathBuf>,
    seen: &mut std::collections::HashSet<(u64, u64)>,
) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir)?;
    if !seen.insert((meta.dev(), meta.ino())) {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // Hidden entries (.git, editors' swap files) are never state.
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            // A dangling or looping symlink is no folder of state files; named like a state
            // file, it is one that cannot be read (never a state without its entries).
            Err(_) if !is_yaml_name(&name) && entry.file_type().is_ok_and(|t| t.is_symlink()) => {
                continue;
            }
            // Something that is not a state file went away between listing and looking (a
            // socket's or an editor's temporary file): it was never part of the state.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !is_yaml_name(&name) => {
                continue;
            }
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("{}: {e}", path.display()),
                ));
            }
        };
        if meta.is_dir() {
            if is_yaml_name(&name) {
                folders.push(path.clone());
            }
            collect_yaml(&path, out, folders, seen)?;
        } else if is_yaml_name(&name) {
            out.push(path);
        }
    }
    Ok(())
}

/// What a manifest records about the apply that wrote it, beside the state.
#[derive(Debug, Clone, Default)]
pub struct Recording {
    /// Path → SHA-256 of every file the apply wrote.
    pub files: BTreeMap<String, String>,
    /// The target's own listener addresses the files were rendered with.
    pub binds: BTreeMap<String, String>,
    /// The ACME certificates rendered (known by digest only).
    pub issued: crate::model::Issued,
}

impl Source {
    /// Parses and merges in-memory files. Certificate folders are not read: see `load_path`.
    pub fn parse(files: Vec<SourceFile>) -> Source {
        Source::parse_files(files, false)
    }

    /// `parse`; with `cached`, a file whose text is the one parsed last time at its path is not
    /// parsed again when the process keeps parsed files (`keep_parsed`).
    fn parse_files(files: Vec<SourceFile>, cached: bool) -> Source {
        let mut source = Source {
            files,
            document: Arc::new(Value::Object(Map::new())),
            origins: HashMap::new(),
            certificates: BTreeMap::new(),
            diagnostics: Vec::new(),
            sections: Vec::new(),
        };
        source.sections = vec![Vec::new(); source.files.len()];
        for index in 0..source.files.len() {
            let file = &source.files[index];
            let parsed = match cached {
                true => parse_kept(&file.path, &file.text),
                false => parse_yaml(&file.text),
            };
            match parsed {
                // An empty file, or one with nothing but comments or section names: what a
                // file cut short (or being written) looks like. Never a state without entries.
                Ok(Value::Null) => source.empty_file(index, "the file is empty"),
                Ok(Value::Object(sections))
                    if !sections.is_empty() && sections.values().all(Value::is_null) =>
                {
                    source.empty_file(index, "the file names sections but holds no entries")
                }
                Ok(Value::Object(sections)) => {
                    source.sections[index] = sections.keys().cloned().collect();
                    source.merge(index, sections)
                }
                Ok(_) => {
                    let location = source.file_location(index, 1, 1);
                    source.diagnostics.push(
                        Diagnostic::error("not-a-mapping", "a state file must be a mapping of sections")
                            .hint("start with `version: 1` and sections such as `listeners:`, `agents:`, `backends:`, `domains:`")
                            .at(Some(location)),
                    );
                }
                Err((message, line, column)) => {
                    let location = source.file_location(index, line, column);
                    source.diagnostics.push(
                        Diagnostic::error("yaml-syntax", message)
                            .hint("fix the YAML syntax; the rest of this file was not read")
                            .at(Some(location)),
                    );
                }
            }
        }
        if cached {
            // Files gone from the state are forgotten.
            let present: std::collections::HashSet<&Path> =
                source.files.iter().map(|f| f.path.as_path()).collect();
            forget_kept(|path| present.contains(path));
        }
        source
    }

    fn empty_file(&mut self, index: usize, what: &str) {
        let location = self.file_location(index, 1, 1);
        self.diagnostics.push(
            Diagnostic::error(
                "empty-file",
                format!("{what}: a file cut short or still being written? It is not read as a state without entries"),
            )
            .hint("write its entries back; a file meant to hold nothing says `{}`, or is deleted")
            .at(Some(location)),
        );
    }

    fn file_location(&self, index: usize, line: usize, column: usize) -> Location {
        Location {
            file: self.files[index].path.clone(),
            line,
            column,
        }
    }

    fn merge(&mut self, index: usize, sections: Map<String, Value>) {
        // Parsing is the only writer: the document is not shared yet, so this never copies.
        let document = Arc::make_mut(&mut self.document)
            .as_object_mut()
            .expect("document is an object");
        let mut duplicates = Vec::new();
        for (section, value) in sections {
            let section_pointer = format!("/{}", escape_pointer_token(&section));
            if section == "version" {
                match document.get("version") {
                    Some(existing) if *existing != value => duplicates.push((
                        section_pointer.clone(),
                        self.origins[&section_pointer],
                        "version-mismatch",
                        format!("`version` is {value} here but {existing} in another file"),
                    )),
                    Some(_) => {}
                    None => {
                        document.insert(section, value);
                        self.origins.insert(section_pointer, index);
                    }
                }
                continue;
            }
            let value = if value.is_null() {
                Value::Object(Map::new())
            } else {
                value
            };
            match (document.get_mut(&section), value) {
                (Some(Value::Object(existing)), Value::Object(entries)) => {
                    for (name, entry) in entries {
                        let pointer = format!("{section_pointer}/{}", escape_pointer_token(&name));
                        if existing.contains_key(&name) {
                            duplicates.push((
                                pointer.clone(),
                                self.origins[&pointer],
                                "duplicate-key",
                                format!(
                                    "{} {} is defined twice",
                                    singular(&section),
                                    super::diagnostics::quote(&name)
                                ),
                            ));
                        } else {
                            existing.insert(name, entry);
                            self.origins.insert(pointer, index);
                        }
                    }
                }
                (Some(_), _) => duplicates.push((
                    section_pointer.clone(),
                    self.origins[&section_pointer],
                    "duplicate-key",
                    format!("section `{section}` is defined twice"),
                )),
                (None, value) => {
                    if let Value::Object(entries) = &value {
                        for name in entries.keys() {
                            let pointer =
                                format!("{section_pointer}/{}", escape_pointer_token(name));
                            self.origins.insert(pointer, index);
                        }
                    }
                    document.insert(section, value);
                    self.origins.insert(section_pointer, index);
                }
            }
        }
        for (pointer, first, code, message) in duplicates {
            let here = self.locate_in(index, &pointer, true);
            let there = self.locate_in(first, &pointer, true);
            self.diagnostics.push(
                Diagnostic::error(code, message)
                    .hint("keep one definition: state files in a directory are merged, and each name may appear once")
                    .at(here)
                    .pointer(pointer)
                    .note(there, "first defined here"),
            );
        }
    }

    /// Reads the `certificates` folder of every listener, relative to the file declaring it.
    fn read_certificates(&mut self) {
        let Some(listeners) = self.document.get("listeners").and_then(Value::as_object) else {
            return;
        };
        let mut dirs = BTreeMap::new();
        for (name, listener) in listeners {
            let Some(dir) = listener.get("certificates").and_then(Value::as_str) else {
                continue;
            };
            // Paths that validation will reject are never touched.
            if !crate::model::names::is_safe_path(dir) {
                continue;
            }
            let pointer = format!("/listeners/{}", escape_pointer_token(name));
            let path = self.base_dir(&pointer).join(dir);
            let files = read_cert_dir(&path);
            dirs.insert(name.clone(), CertDir { path, files });
        }
        self.certificates = dirs;
    }

    /// The state recorded by a previous apply (the manifest written beside haproxy.cfg):
    /// its document, and its certificates known by digest only. Also returns what else the
    /// manifest records about that apply.
    pub fn from_manifest(text: &str, origin: &Path) -> Result<(Source, Recording), String> {
        #[derive(serde::Deserialize)]
        struct Manifest {
            format_version: u32,
            document: Value,
            #[serde(default)]
            certificates: BTreeMap<String, BTreeMap<String, String>>,
            #[serde(default)]
            files: BTreeMap<String, String>,
            #[serde(default)]
            binds: BTreeMap<String, String>,
            #[serde(default)]
            acme: Option<RecordedIssued>,
        }
        #[derive(serde::Deserialize)]
        struct RecordedIssued {
            fallback: Option<String>,
            #[serde(default)]
            certs: BTreeMap<String, String>,
            #[serde(default)]
            challenges: BTreeMap<String, String>,
        }
        let manifest: Manifest =
            serde_json::from_str(text).map_err(|e| format!("{}: {e}", origin.display()))?;
        if manifest.format_version != 1 {
            return Err(format!(
                "{}: unknown format_version {}",
                origin.display(),
                manifest.format_version
            ));
        }
        let certificates = manifest
            .certificates
            .into_iter()
            .map(|(listener, files)| {
                let files = files
                    .into_iter()
                    .map(|(name, sha256)| CertFile {
                        name,
                        sha256,
                        pem: None,
                    })
                    .collect();
                (
                    listener,
                    CertDir {
                        path: PathBuf::new(),
                        files: Ok(files),
                    },
                )
            })
            .collect();
        let source = Source {
            files: vec![SourceFile::new(origin.to_path_buf(), String::new())],
            document: Arc::new(manifest.document),
            origins: HashMap::new(),
            certificates,
            diagnostics: Vec::new(),
            sections: Vec::new(),
        };
        Ok((
            source,
            Recording {
                files: manifest.files,
                binds: manifest.binds,
                issued: manifest
                    .acme
                    .map(|a| crate::model::Issued {
                        fallback: a.fallback.map(|sha256| CertFile {
                            name: crate::acme::fallback_file(),
                            sha256,
                            pem: None,
                        }),
                        certs: a
                            .certs
                            .into_iter()
                            .map(|(domain, sha256)| {
                                let name = crate::acme::cert_file(&domain);
                                (
                                    domain,
                                    CertFile {
                                        name,
                                        sha256,
                                        pem: None,
                                    },
                                )
                            })
                            .collect(),
                        challenges: a.challenges,
                    })
                    .unwrap_or_default(),
            },
        ))
    }

    /// The same files with another merged document (a state with some entries replaced).
    pub fn with_document(&self, document: Value) -> Source {
        Source {
            files: self
                .files
                .iter()
                .map(|f| SourceFile::new(f.path.clone(), f.text.clone()))
                .collect(),
            document: Arc::new(document),
            origins: self.origins.clone(),
            certificates: self.certificates.clone(),
            diagnostics: Vec::new(),
            sections: Vec::new(),
        }
    }

    /// The same state reduced to some sections (say, `targets` to roll back while the rest of
    /// the state is broken). Positions still point into the original files.
    pub fn only(&self, sections: &[&str]) -> Source {
        let mut document = Map::new();
        if let Value::Object(all) = self.document.as_ref() {
            for (key, value) in all {
                if key == "version" || sections.contains(&key.as_str()) {
                    document.insert(key.clone(), value.clone());
                }
            }
        }
        Source {
            files: self
                .files
                .iter()
                .map(|f| SourceFile::new(f.path.clone(), f.text.clone()))
                .collect(),
            document: Arc::new(Value::Object(document)),
            origins: self.origins.clone(),
            certificates: BTreeMap::new(),
            diagnostics: Vec::new(),
            sections: Vec::new(),
        }
    }

    /// The directory relative paths in the entry at `pointer` resolve against: the folder of
    /// the file that declared it.
    pub fn base_dir(&self, pointer: &str) -> PathBuf {
        let dir = self
            .origin(pointer)
            .and_then(|index| self.files[index].path.parent())
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        // Absolute, so the paths written into haproxy.cfg do not depend on any working folder.
        std::path::absolute(&dir).unwrap_or(dir)
    }

    fn origin(&self, pointer: &str) -> Option<usize> {
        let mut current = pointer;
        loop {
            if let Some(index) = self.origins.get(current) {
                return Some(*index);
            }
            match current.rfind('/') {
                Some(idx) if idx > 0 => current = &current[..idx],
                _ => return if self.files.len() == 1 { Some(0) } else { None },
            }
        }
    }

    /// The position of the key (`key: true`) or value at `pointer` in the file that defined it.
    pub fn locate(&self, pointer: &str, key: bool) -> Option<Location> {
        let index = self.origin(pointer)?;
        self.locate_in(index, pointer, key)
    }

    fn locate_in(&self, index: usize, pointer: &str, key: bool) -> Option<Location> {
        let file = &self.files[index];
        let spans = file.spans.get_or_init(|| SpanIndex::build(&file.text));
        let (span, exact) = spans.find(pointer)?;
        // For a missing child (say, a required field), point at its parent's key.
        let position = if key || !exact {
            span.key.unwrap_or(span.value)
        } else {
            span.value
        };
        Some(Location {
            file: file.path.clone(),
            line: position.line,
            column: position.column,
        })
    }

    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

fn singular(section: &str) -> String {
    match section {
        "listeners" => "listener".into(),
        "agents" => "agent".into(),
        "backends" => "backend".into(),
        "domains" => "domain".into(),
        "targets" => "target".into(),
        "groups" => "group".into(),
        other => format!("`{other}` entry"),
    }
}

fn read_cert_dir(path: &Path) -> Result<Vec<CertFile>, String> {
    let entries = std::fs::read_dir(path).map_err(|e| e.to_string())?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".pem") {
            continue;
        }
        let pem = std::fs::read(entry.path()).map_err(|e| format!("{name}: {e}"))?;
        files.push(CertFile::from_pem(name, pem));
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

type Parsed = Result<Value, (String, usize, usize)>;

/// Each state file's text digest and what it parsed to, by path, in a process that keeps them
/// (the daemon): a change of one file (an agent's fragment, an edited file) re-parses that file
/// alone; the merge and validation still see the whole state, so the result is the same as a
/// fresh load (`tests/incremental.rs` checks it over random sequences of changes). A document
/// is kept as compact JSON text, not as a tree: a tenth of the memory (a JSON tree of 10k
/// domains is about 25 MB), and parsing JSON back is several times faster than parsing YAML.
static KEPT: std::sync::Mutex<Option<Kept>> = std::sync::Mutex::new(None);

/// Path → (SHA-256 of the text, what it parsed to: JSON text, or the error).
type Kept = std::collections::HashMap<PathBuf, ([u8; 32], Result<String, (String, usize, usize)>)>;

/// Forgets the kept parses of the paths `keep` says no.
fn forget_kept(keep: impl Fn(&Path) -> bool) {
    if let Some(kept) = KEPT.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        kept.retain(|path, _| keep(path));
    }
}

/// From now on, state files loaded from disk are kept parsed (see `KEPT`).
pub fn keep_parsed() {
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    kept.get_or_insert_with(Default::default);
}

fn parse_kept(path: &Path, text: &str) -> Parsed {
    if KEPT.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
        return parse_yaml(text);
    }
    let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
    let known = KEPT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(|kept| kept.get(path).filter(|(d, _)| *d == digest).cloned());
    if let Some((_, parsed)) = known {
        // JSON that serde_json wrote reads back to the same value.
        return parsed.map(|json| serde_json::from_str(&json).expect("kept JSON reads back"));
    }
    // Parsed outside the lock: loads of other files go on meanwhile.
    let parsed = parse_yaml(text);
    let kept_form = match &parsed {
        Ok(value) => Ok(serde_json::to_string(value).expect("a JSON value serializes")),
        Err(e) => Err(e.clone()),
    };
    if let Some(kept) = KEPT.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        kept.insert(path.to_path_buf(), (digest, kept_form));
    }
    parsed
}

/// Parses one YAML document into JSON, refusing duplicate keys and tags. On error returns the
/// message and its 1-based line and column.
fn parse_yaml(text: &str) -> Parsed {
    let deserializer = serde_yaml::Deserializer::from_str(text);
    match StrictValue::deserialize(deserializer) {
        Ok(StrictValue(value)) => Ok(value),
        Err(error) => {
            let (line, column) = error
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            let mut message = error.to_string();
            // serde_yaml appends " at line X column Y"; the location prefix says it already.
            if let Some(idx) = message.find(" at line ") {
                message.truncate(idx);
            }
            // serde_yaml places a duplicate key at its mapping; point at the repeated key.
            if message.contains("defined twice")
                && let Some((_, pos)) = SpanIndex::build(text).duplicates.first()
            {
                return Err((message, pos.line, pos.column));
            }
            Err((message, line, column))
        }
    }
}

/// A JSON value built straight from YAML events, rejecting what JSON cannot say and what a
/// plain map would silently drop (a key written twice: the second would win).
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a YAML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("numbers must be finite"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        StrictValue::deserialize(d).map(|v| v.0)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(KeyString(key)) = map.next_key()? {
            let StrictValue(value) = map.next_value()?;
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!(
                    "{} is defined twice in the same mapping",
                    super::diagnostics::quote(&key)
                )));
            }
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _data: A) -> Result<Value, A::Error> {
        Err(de::Error::custom(
            "YAML tags (`!name`) are not supported in a state file",
        ))
    }
}

/// A mapping key: strings as they are, plain numbers and booleans as their text.
struct KeyString(String);

impl<'de> Deserialize<'de> for KeyString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = String;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_str<E>(self, v: &str) -> Result<String, E> {
                Ok(v.to_owned())
            }
            fn visit_string<E>(self, v: String) -> Result<String, E> {
                Ok(v)
            }
            fn visit_bool<E>(self, v: bool) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_i64<E>(self, v: i64) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_u64<E>(self, v: u64) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_f64<E>(self, v: f64) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_unit<E: de::Error>(self) -> Result<String, E> {
                Err(E::custom("a mapping key cannot be empty (null)"))
            }
        }
        deserializer.deserialize_any(KeyVisitor).map(KeyString)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(files: &[(&str, &str)]) -> Source {
        Source::parse(
            files
                .iter()
                .map(|(p, t)| SourceFile::new(PathBuf::from(p), t.to_string()))
                .collect(),
        )
    }

    #[test]
    fn merges_files_by_entry() {
        let s = parse(&[
            (
                "a.yaml",
                "version: 1\ndomains:\n  a.example.com: { backend: x }\n",
            ),
            (
                "b.yaml",
                "version: 1\ndomains:\n  b.example.com: { backend: y }\n",
            ),
        ]);
        assert!(s.diagnostics.is_empty(), "{:?}", s.diagnostics);
        assert_eq!(s.document["domains"].as_object().unwrap().len(), 2);
        let loc = s.locate("/domains/b.example.com/backend", false).unwrap();
        assert_eq!(loc.file, PathBuf::from("b.yaml"));
        assert_eq!((loc.line, loc.column), (3, 29));
    }

    #[test]
    fn duplicate_across_files_names_both_places() {
        let s = parse(&[
            ("a.yaml", "domains:\n  a.example.com: { backend: x }\n"),
            ("b.yaml", "\n\ndomains:\n  a.example.com: { backend: y }\n"),
        ]);
        assert_eq!(s.diagnostics.len(), 1);
        let d = &s.diagnostics[0];
        assert_eq!(d.code, "duplicate-key");
        assert_eq!(d.location.as_ref().unwrap().file, PathBuf::from("b.yaml"));
        assert_eq!(d.location.as_ref().unwrap().line, 4);
        let first = d.notes[0].location.as_ref().unwrap();
        assert_eq!((first.file.to_str().unwrap(), first.line), ("a.yaml", 2));
    }

    #[test]
    fn duplicate_in_one_mapping_is_a_syntax_error_with_position() {
        let s = parse(&[(
            "a.yaml",
            "agents:\n  a: { address: 10.0.0.1 }\n  a: { address: 10.0.0.2 }\n",
        )]);
        assert_eq!(s.diagnostics.len(), 1, "{:?}", s.diagnostics);
        let d = &s.diagnostics[0];
        assert_eq!(d.code, "yaml-syntax");
        assert!(d.message.contains("defined twice"), "{}", d.message);
        assert_eq!(d.location.as_ref().unwrap().line, 3);
    }

    #[test]
    fn syntax_error_has_position() {
        let s = parse(&[("a.yaml", "domains:\n  a: [unclosed\n")]);
        assert_eq!(s.diagnostics[0].code, "yaml-syntax");
        assert!(s.diagnostics[0].location.as_ref().unwrap().line >= 2);
    }

    #[test]
    fn tags_are_refused() {
        let s = parse(&[("a.yaml", "agents: !custom { a: 1 }\n")]);
        assert_eq!(s.diagnostics[0].code, "yaml-syntax");
    }

    #[test]
    fn empty_and_cut_short_files_are_errors_never_an_empty_state() {
        for text in [
            "",
            "\n  \n",
            "# only a comment\n",
            "---\n",
            "domains:\n",
            "domains:\nbackends:\n",
        ] {
            let s = parse(&[("a.yaml", text)]);
            assert_eq!(s.diagnostics.len(), 1, "{text:?}: {:?}", s.diagnostics);
            assert_eq!(s.diagnostics[0].code, "empty-file", "{text:?}");
            let at = s.diagnostics[0].location.as_ref().unwrap();
            assert_eq!((at.line, at.column), (1, 1));
        }
        // Saying "nothing" on purpose is not an error.
        assert!(parse(&[("a.yaml", "{}\n")]).diagnostics.is_empty());
        assert!(parse(&[("a.yaml", "domains: {}\n")]).diagnostics.is_empty());
        // A line cut in the middle does not parse.
        let s = parse(&[(
            "a.yaml",
            "domains:\n  a.example.com: { backend: x }\n  b.exam",
        )]);
        assert_eq!(s.diagnostics[0].code, "yaml-syntax");
    }

    #[test]
    fn symlink_loops_and_folders_named_like_files_in_a_state_folder() {
        let dir = tempfile_dir("symlink_loops");
        std::fs::write(dir.join("a.yaml"), "version: 1\n").unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/b.yaml"), "domains: {}\n").unwrap();
        std::os::unix::fs::symlink(".", dir.join("loop")).unwrap();
        std::os::unix::fs::symlink("..", dir.join("sub/up")).unwrap();
        std::os::unix::fs::symlink("missing", dir.join("dangling")).unwrap();
        std::fs::create_dir(dir.join("c.yaml")).unwrap();
        let source = load_path(&dir).unwrap();
        let names: Vec<String> = source
            .files
            .iter()
            .map(|f| f.path.strip_prefix(&dir).unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["a.yaml", "sub/b.yaml"]);
        assert_eq!(source.diagnostics.len(), 1, "{:?}", source.diagnostics);
        assert_eq!(source.diagnostics[0].code, "not-a-file");
        // A state file that is a dangling symlink cannot be read: an error, not no entries.
        std::os::unix::fs::symlink("missing", dir.join("gone.yaml")).unwrap();
        let error = load_path(&dir).unwrap_err().to_string();
        assert!(error.contains("gone.yaml"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lunafront-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn version_must_agree() {
        let s = parse(&[("a.yaml", "version: 1\n"), ("b.yaml", "version: 2\n")]);
        assert_eq!(s.diagnostics[0].code, "version-mismatch");
    }
}
