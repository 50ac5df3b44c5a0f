//! `load::derive`: the load of a state folder in which a few files changed, made from the load
//! before it (a `Base`). Only the changed files are parsed; the merged document is the previous
//! one with their entries taken out and put back. The API checks each change this way, so the other
//! files of a large state are not parsed and merged again. Whatever a merge would report (a
//! name defined twice, a file that does not parse) is left to a full parse, which says where.

use super::{Source, SourceFile, parse_kept};
use crate::spec::spans::escape_pointer_token;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// A load without problems, kept to derive the next one from (`load_path_from`): the files it
/// read, where each entry came from, and its merged document as the compact JSON text a model
/// keeps of it (`model::StateDocument`), shared with that model — a tree of a 10k-domain
/// document is about 23 MB, its text about 1 MB, and parsing the text back takes about as
/// long as copying the tree.
pub struct Base {
    files: Vec<SourceFile>,
    origins: HashMap<String, usize>,
    sections: Vec<Vec<String>>,
    document: Arc<RawValue>,
}

impl Base {
    /// The base of `source`, whose merged document `document` is (as compact JSON: the
    /// model validated from it holds it); `None` when the source has problems of its own.
    pub fn new(source: &Source, document: Arc<RawValue>) -> Option<Base> {
        (source.diagnostics.is_empty() && source.sections.len() == source.files.len()).then(|| {
            Base {
                files: source
                    .files
                    .iter()
                    .map(|f| SourceFile::new(f.path.clone(), f.text.clone()))
                    .collect(),
                origins: source.origins.clone(),
                sections: source.sections.clone(),
                document,
            }
        })
    }

    /// Which files of `files` (sorted by path) are this base's, which changed, came or went.
    fn align(&self, files: &[SourceFile]) -> Alignment {
        // Each file of `self` → its index among `files` (None: gone); each file of `files` →
        // its index in `self` when its text is the same there.
        let mut moved = vec![None; self.files.len()];
        let mut same = vec![None; files.len()];
        let (mut gone, mut came) = (Vec::new(), Vec::new());
        let (mut i, mut j) = (0, 0);
        loop {
            match (self.files.get(i), files.get(j)) {
                (Some(old), Some(new)) if old.path == new.path => {
                    moved[i] = Some(j);
                    if old.text == new.text {
                        same[j] = Some(i);
                    } else {
                        gone.push(i);
                        came.push(j);
                    }
                    i += 1;
                    j += 1;
                }
                (Some(old), Some(new)) if old.path < new.path => {
                    gone.push(i);
                    i += 1;
                }
                (Some(_), None) => {
                    gone.push(i);
                    i += 1;
                }
                (_, Some(_)) => {
                    came.push(j);
                    j += 1;
                }
                (None, None) => break,
            }
        }
        Alignment {
            moved,
            same,
            gone,
            came,
        }
    }

    /// What differs between this base and `source`, a load of the same folder, by file: the
    /// entries the files that changed (or came, or went) define before and after, and their
    /// top-level names. Every entry of any other file is the same on both sides.
    pub fn changes(&self, source: &Source) -> Changes {
        let Alignment { gone, came, .. } = self.align(&source.files);
        let entries_of = |origins: &HashMap<String, usize>, files: &[usize]| {
            let files: std::collections::HashSet<usize> = files.iter().copied().collect();
            origins
                .iter()
                .filter(|(_, index)| files.contains(index))
                .filter_map(|(pointer, _)| entry_of(pointer))
                .collect::<BTreeSet<_>>()
        };
        let mut sections: BTreeSet<String> = gone
            .iter()
            .flat_map(|&i| self.sections[i].iter().cloned())
            .collect();
        for &j in &came {
            match source.sections.get(j) {
                Some(names) => sections.extend(names.iter().cloned()),
                // A source not parsed from files: nothing is known of its sections.
                None => {
                    sections.insert(String::new());
                }
            }
        }
        Changes {
            before: entries_of(&self.origins, &gone),
            after: entries_of(&source.origins, &came),
            sections,
        }
    }

    /// The source a full parse of `files` (a state folder's files, sorted by path as the loader
    /// lists them) gives — the same document, origins and sections, no diagnostic — made from
    /// this base, a load of the same folder, by parsing only the files whose path or text
    /// differs. `Err(files)`, given back, when that cannot be known without the full parse: a
    /// changed file is empty, does not parse, or defines a name (or a `version`) another file
    /// defines. Certificate folders are not read: see `load_path_from`.
    pub(super) fn derive(&self, files: Vec<SourceFile>) -> Result<Source, Vec<SourceFile>> {
        let Ok(Value::Object(mut document)) = serde_json::from_str::<Value>(self.document.get())
        else {
            return Err(files);
        };
        let Alignment {
            moved,
            same,
            gone,
            came,
        } = self.align(&files);
        let mut parsed = Vec::with_capacity(came.len());
        for &j in &came {
            match parse_kept(&files[j].path, &files[j].text) {
                Ok(Value::Object(sections))
                    if !sections.is_empty() && !sections.values().all(Value::is_null) =>
                {
                    parsed.push((j, sections))
                }
                _ => return Err(files),
            }
        }

        let mut origins = HashMap::with_capacity(self.origins.len());
        let gone_set: std::collections::HashSet<usize> = gone.iter().copied().collect();
        // The sections whose origin must be found again, and whether they still exist.
        let mut affected: BTreeSet<String> = gone
            .iter()
            .flat_map(|&i| self.sections[i].iter().cloned())
            .collect();
        for (pointer, &index) in &self.origins {
            if !gone_set.contains(&index) {
                origins.insert(pointer.clone(), moved[index].expect("a file that stays"));
            } else if let Some((section, entry)) = entry_of(pointer) {
                // A clean load defines each entry once: it goes with its file.
                if let Some(Value::Object(entries)) = document.get_mut(&section) {
                    entries.remove(&entry);
                }
            }
        }
        let mut sections: Vec<Vec<String>> = same
            .iter()
            .map(|old| old.map(|i| self.sections[i].clone()).unwrap_or_default())
            .collect();
        for (j, file_sections) in parsed {
            sections[j] = file_sections.keys().cloned().collect();
            for (section, value) in file_sections {
                affected.insert(section.clone());
                let section_pointer = format!("/{}", escape_pointer_token(&section));
                if section == "version" {
                    match document.get("version") {
                        Some(existing) if *existing != value => return Err(files),
                        Some(_) => {}
                        None => {
                            document.insert(section, value);
                        }
                    }
                    continue;
                }
                let value = match value {
                    Value::Null => Value::Object(Map::new()),
                    value => value,
                };
                match (document.get_mut(&section), value) {
                    (Some(Value::Object(existing)), Value::Object(entries)) => {
                        for (name, entry) in entries {
                            if existing.contains_key(&name) {
                                return Err(files);
                            }
                            let pointer =
                                format!("{section_pointer}/{}", escape_pointer_token(&name));
                            origins.insert(pointer, j);
                            existing.insert(name, entry);
                        }
                    }
                    (Some(_), _) => return Err(files),
                    (None, value) => {
                        if let Value::Object(entries) = &value {
                            for name in entries.keys() {
                                let pointer =
                                    format!("{section_pointer}/{}", escape_pointer_token(name));
                                origins.insert(pointer, j);
                            }
                        }
                        document.insert(section, value);
                    }
                }
            }
        }
        // A section comes from the first file that names it; one no file names is gone.
        for section in affected {
            let pointer = format!("/{}", escape_pointer_token(&section));
            match sections.iter().position(|names| names.contains(&section)) {
                Some(first) => {
                    origins.insert(pointer, first);
                }
                None => {
                    origins.remove(&pointer);
                    document.remove(&section);
                }
            }
        }
        // Files gone from the state are forgotten by the kept parses, as a full load does.
        let present: std::collections::HashSet<&std::path::Path> =
            files.iter().map(|f| f.path.as_path()).collect();
        super::forget_kept(|path| present.contains(path));
        Ok(Source {
            files,
            document: Arc::new(Value::Object(document)),
            origins,
            certificates: Default::default(),
            diagnostics: Vec::new(),
            sections,
        })
    }
}

/// See `Base::changes`.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    /// (section, name) of each entry the changed files defined in the base.
    pub before: BTreeSet<(String, String)>,
    /// Likewise in the source.
    pub after: BTreeSet<(String, String)>,
    /// The top-level names the changed files hold, before or after.
    pub sections: BTreeSet<String>,
}

struct Alignment {
    moved: Vec<Option<usize>>,
    same: Vec<Option<usize>>,
    gone: Vec<usize>,
    came: Vec<usize>,
}

/// `/section/entry` → (section, entry), unescaped; `None` for a section's own pointer.
fn entry_of(pointer: &str) -> Option<(String, String)> {
    let (section, entry) = pointer.strip_prefix('/')?.split_once('/')?;
    let unescape = |token: &str| token.replace("~1", "/").replace("~0", "~");
    Some((unescape(section), unescape(entry)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;
    use std::path::PathBuf;

    /// A random state file `k`: a few sections (some null, some a scalar, now and then a
    /// `version`, rarely 2), with entries named after the file (some needing escapes in a JSON
    /// pointer) and now and then one from a pool every file draws from (a name defined twice);
    /// rarely empty or not YAML at all.
    fn random_file(rng: &mut Rng, k: usize) -> String {
        match rng.below(40) {
            0 => return String::new(),
            1 => return "domains: [\n".into(),
            2 => return "domains:\nbackends:\n".into(),
            _ => {}
        }
        let mut text = String::new();
        if rng.one_in(3) {
            text.push_str(&format!("version: {}\n", 1 + rng.below(30) / 29));
        }
        for section in ["agents", "backends", "domains", "global"] {
            match rng.below(30) {
                0..=9 => {}
                10..=14 => text.push_str(&format!("{section}:\n")),
                15 if section == "global" => text.push_str("global: 5\n"),
                _ => {
                    text.push_str(&format!("{section}:\n"));
                    let names: std::collections::BTreeSet<String> = (0..1 + rng.below(3))
                        .map(|_| match rng.below(40) {
                            0 => "shared".to_string(),
                            1 => format!("c/d~{k}"),
                            n => format!("n{k}-{}", n % 5),
                        })
                        .collect();
                    for name in names {
                        text.push_str(&format!("  \"{name}\": {{ v: {} }}\n", rng.below(3)));
                    }
                }
            }
        }
        if text.is_empty() {
            text.push_str("version: 1\n");
        }
        text
    }

    fn full(files: &[SourceFile]) -> Source {
        Source::parse(
            files
                .iter()
                .map(|f| SourceFile::new(f.path.clone(), f.text.clone()))
                .collect(),
        )
    }

    /// Whenever a derived load is given, it is what a full parse of the same files gives,
    /// over random sequences of files changed, added and removed (several at once too).
    #[test]
    fn a_derived_load_is_the_full_parse_of_the_same_files() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut derived_count, mut refused) = (0, 0);
        for _round in 0..100 {
            let mut files: Vec<SourceFile> = (0..1 + rng.below(5))
                .map(|k| {
                    SourceFile::new(
                        PathBuf::from(format!("/s/f{k}.yaml")),
                        random_file(&mut rng, k),
                    )
                })
                .collect();
            for _step in 0..15 {
                let loaded = full(&files);
                let json = serde_json::value::to_raw_value(loaded.document.as_ref()).unwrap();
                let base = Base::new(&loaded, json.into());
                for _ in 0..1 + rng.below(3) {
                    let k = rng.below(8);
                    let path = PathBuf::from(format!("/s/f{k}.yaml"));
                    files.retain(|f| f.path != path);
                    if !rng.one_in(5) {
                        files.push(SourceFile::new(path, random_file(&mut rng, k)));
                    }
                }
                if files.is_empty() {
                    files.push(SourceFile::new(
                        PathBuf::from("/s/f0.yaml"),
                        "version: 1\n".into(),
                    ));
                }
                files.sort_by(|a, b| a.path.cmp(&b.path));
                let whole = full(&files);
                let given: Vec<SourceFile> = files
                    .iter()
                    .map(|f| SourceFile::new(f.path.clone(), f.text.clone()))
                    .collect();
                let derived = match &base {
                    Some(base) => base.derive(given),
                    None => Err(given),
                };
                match derived {
                    Ok(source) => {
                        derived_count += 1;
                        assert!(loaded.diagnostics.is_empty());
                        assert_eq!(whole.diagnostics.len(), 0, "{:?}", whole.diagnostics);
                        assert_eq!(source.document, whole.document);
                        assert_eq!(source.origins, whole.origins);
                        assert_eq!(source.sections, whole.sections);
                        assert_eq!(
                            source.files.iter().map(|f| &f.path).collect::<Vec<_>>(),
                            whole.files.iter().map(|f| &f.path).collect::<Vec<_>>()
                        );
                    }
                    Err(given) => {
                        refused += 1;
                        assert_eq!(given.len(), files.len(), "the files are given back");
                    }
                }
            }
        }
        println!("{derived_count} derived, {refused} left to a full parse");
        assert!(
            derived_count > 300 && refused > 100,
            "{derived_count} / {refused}"
        );
    }

    /// A load from a base reads every state file on disk again: one an administrator edited
    /// since the base was loaded is seen, with the same diagnostics a full load gives (here a
    /// name the replaced file defines too).
    #[test]
    fn a_load_from_a_base_sees_files_edited_since() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
        std::fs::write(&a, "domains:\n  x.example.com: { backend: x }\n").unwrap();
        std::fs::write(&b, "version: 1\nbackends:\n  x: { servers: [] }\n").unwrap();
        let loaded = super::super::load_path(dir.path()).unwrap();
        let json = serde_json::value::to_raw_value(loaded.document.as_ref()).unwrap();
        let base = Base::new(&loaded, json.into()).expect("a clean load");
        let replaced =
            "domains:\n  x.example.com: { backend: x }\n  y.example.com: { backend: x }\n";
        for edit in [
            "version: 1\nbackends:\n  x: { servers: [] }\n  z: { servers: [] }\n",
            "version: 1\nbackends:\n  x: { servers: [] }\ndomains:\n  y.example.com: { backend: x }\n",
        ] {
            std::fs::write(&b, edit).unwrap();
            let replace = [(a.as_path(), Some(replaced))];
            let from = super::super::load_path_from(dir.path(), &replace, Some(&base)).unwrap();
            let full = super::super::load_path_with(dir.path(), &replace).unwrap();
            assert_eq!(from.document, full.document, "{edit}");
            assert_eq!(
                format!("{:?}", from.diagnostics),
                format!("{:?}", full.diagnostics),
                "{edit}"
            );
            assert_eq!(from.fingerprint(), full.fingerprint());
        }
    }

    #[test]
    fn entry_pointers_unescape() {
        assert_eq!(
            entry_of("/domains/a~1b~0c"),
            Some(("domains".into(), "a/b~c".into()))
        );
        assert_eq!(entry_of("/domains"), None);
    }
}
