//! What the API writes (I/O edge): one desired-state fragment per agent, `agents.d/<agent>.yaml`
//! in the state folder, written atomically (0640) and, when the folder is a git checkout and
//! `api.git_commit` is on, committed with the agent (or admin) as author. The daemon reconciles
//! these files like any other edit: nothing the API accepts lives only in memory.

use crate::target::files::{FILE_MODE, write_atomic};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Fragment {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub agents: BTreeMap<String, AgentEntry>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub backends: BTreeMap<String, BackendEntry>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub domains: BTreeMap<String, DomainEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentEntry {
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Fields an operator added by hand, kept as they are.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerEntry {
    pub agent: String,
    pub port: u16,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendEntry {
    pub servers: Vec<ServerEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainEntry {
    pub backend: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The service name the agent asked for, when the domain's label is mapped from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

/// What `Fragment::route` writes for one route of an agent.
pub struct Route {
    pub backend: String,
    pub port: u16,
    pub listener: Option<String>,
    pub health_check: Option<serde_yaml::Value>,
    pub tls: Option<serde_yaml::Value>,
    pub service: Option<String>,
}

impl Fragment {
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty() && self.backends.is_empty() && self.domains.is_empty()
    }

    /// Routes `domain` (on `listener`, or the HTTP listeners) to a backend of one server on the
    /// agent's `port`, both owned by the agent; replaces what the fragment had under those names.
    pub fn route(&mut self, agent: &str, domain: &str, route: Route) {
        self.backends.insert(
            route.backend.clone(),
            BackendEntry {
                servers: vec![ServerEntry {
                    agent: agent.to_string(),
                    port: route.port,
                    other: BTreeMap::new(),
                }],
                health_check: route.health_check,
                tls: route.tls,
                owner: Some(agent.to_string()),
                other: BTreeMap::new(),
            },
        );
        self.domains.insert(
            domain.to_string(),
            DomainEntry {
                backend: route.backend,
                listener: route.listener,
                owner: Some(agent.to_string()),
                service: route.service,
                other: BTreeMap::new(),
            },
        );
    }

    /// This fragment's change from `before`, made again on `current` (the agent's fragment on
    /// a newer commit, another node's change in it): each entry the change set or removed is
    /// set or removed in `current`; the rest of `current` stays as it is.
    pub fn rebased(&self, before: &Fragment, current: &Fragment) -> Fragment {
        fn section<V: Clone + PartialEq>(
            before: &BTreeMap<String, V>,
            after: &BTreeMap<String, V>,
            current: &BTreeMap<String, V>,
        ) -> BTreeMap<String, V> {
            let mut out = current.clone();
            for key in before.keys().chain(after.keys()) {
                if before.get(key) != after.get(key) {
                    match after.get(key) {
                        Some(v) => {
                            out.insert(key.clone(), v.clone());
                        }
                        None => {
                            out.remove(key);
                        }
                    }
                }
            }
            out
        }
        Fragment {
            agents: section(&before.agents, &self.agents, &current.agents),
            backends: section(&before.backends, &self.backends, &current.backends),
            domains: section(&before.domains, &self.domains, &current.domains),
        }
    }

    /// As a JSON object in the state's shape, to merge into a document.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("fragments are JSON")
    }

    /// The file's text (None: an empty fragment, whose file is removed).
    pub fn text(&self) -> Option<String> {
        (!self.is_empty()).then(|| {
            format!(
                "{HEADER}{}",
                serde_yaml::to_string(self).expect("fragments are YAML")
            )
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct StoreError {
    pub path: PathBuf,
    pub message: String,
}

pub struct Store {
    /// The state folder.
    root: PathBuf,
    lock: Arc<Mutex<()>>,
}

const HEADER: &str = "# Written by the lunafront API for one agent. Edits by hand are kept, but the API rewrites\n# this file on the agent's next change.\n";

impl Store {
    pub fn new(root: &Path) -> Store {
        Store::with_lock(root, Arc::new(Mutex::new(())))
    }

    /// A store whose changes hold `lock`, shared with the daemon's reconcile (it reads the
    /// state folder under it: never a batch half written) and, with git, with the clone
    /// (nothing moves the checkout between a change's check and its commit).
    pub fn with_lock(root: &Path, lock: Arc<Mutex<()>>) -> Store {
        Store {
            root: root.to_path_buf(),
            lock,
        }
    }

    /// Held while a change is checked and written: changes to fragments are one at a time, so
    /// two agents cannot claim the same name between a check and a write, and the reconcile
    /// reads the folder before or after, never between (see `with_lock`).
    pub fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn dir(&self) -> PathBuf {
        self.root.join("agents.d")
    }

    pub fn path(&self, agent: &str) -> PathBuf {
        self.dir().join(format!("{agent}.yaml"))
    }

    /// An agent id names a file: anything but an identifier (`../x`, `a/b`) is refused here
    /// too, whatever the caller checked.
    fn checked(&self, agent: &str) -> Result<PathBuf, StoreError> {
        if crate::model::names::is_identifier(agent) {
            Ok(self.path(agent))
        } else {
            Err(StoreError {
                path: self.dir(),
                message: format!("`{agent}` is not an agent id"),
            })
        }
    }

    /// The state folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The fragment of every agent, by agent (from `agents.d/<agent>.yaml`).
    pub fn read_all(&self) -> Result<BTreeMap<String, Fragment>, StoreError> {
        let mut out = BTreeMap::new();
        let entries = match std::fs::read_dir(self.dir()) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => {
                return Err(StoreError {
                    path: self.dir(),
                    message: e.to_string(),
                });
            }
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if let Some(agent) = name.strip_suffix(".yaml")
                && crate::model::names::is_identifier(agent)
            {
                out.insert(agent.to_string(), self.read(agent)?.unwrap_or_default());
            }
        }
        Ok(out)
    }

    pub fn read(&self, agent: &str) -> Result<Option<Fragment>, StoreError> {
        let path = self.checked(agent)?;
        match std::fs::read_to_string(&path) {
            Ok(text)
                if text
                    .trim()
                    .lines()
                    .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) =>
            {
                Ok(Some(Fragment::default()))
            }
            Ok(text) => serde_yaml::from_str(&text)
                .map(Some)
                .map_err(|e| StoreError {
                    path,
                    message: format!("the agent's file does not parse ({e}); fix or remove it"),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError {
                path,
                message: e.to_string(),
            }),
        }
    }

    /// Writes (or, when empty, removes) the agent's fragment, then commits it when asked to.
    pub fn write(
        &self,
        agent: &str,
        fragment: &Fragment,
        commit: Option<&Commit>,
    ) -> Result<(), StoreError> {
        let path = self.put(agent, fragment, true)?;
        if let Some(commit) = commit {
            self.commit(&path, commit).map_err(|message| StoreError {
                path: path.clone(),
                message,
            })?;
        }
        Ok(())
    }

    /// Writes the agent's fragment (synced; its folder too when `sync_folder`), or removes
    /// its file when the fragment is empty; returns the file's path.
    fn put(
        &self,
        agent: &str,
        fragment: &Fragment,
        sync_folder: bool,
    ) -> Result<PathBuf, StoreError> {
        let path = self.checked(agent)?;
        let written = match fragment.text() {
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
                _ => Ok(()),
            },
            Some(text) if sync_folder => {
                write_atomic(&path, text.as_bytes(), FILE_MODE).map_err(|e| e.to_string())
            }
            Some(text) => {
                crate::target::files::write_atomic_in_batch(&path, text.as_bytes(), FILE_MODE)
                    .map_err(|e| e.to_string())
            }
        };
        match written {
            Ok(()) => Ok(path),
            Err(message) => Err(StoreError { path, message }),
        }
    }

    /// Writes (or removes) several agents' fragments, each as `write` does without a commit,
    /// and syncs their folder once at the end rather than once per file (a burst of agents'
    /// changes is written in one batch): one result per fragment, in order. Should the sync
    /// fail, every fragment's result is that error — none is known to be on disk.
    pub fn write_many(&self, fragments: &[(&str, &Fragment)]) -> Vec<Result<(), StoreError>> {
        let mut results: Vec<Result<(), StoreError>> = fragments
            .iter()
            .map(|(agent, fragment)| self.put(agent, fragment, false).map(|_| ()))
            .collect();
        // No folder: nothing was written into it (a write creates it), only removals found
        // nothing to remove.
        if let Err(e) = crate::target::files::sync_dir(&self.dir())
            && e.source.kind() != std::io::ErrorKind::NotFound
        {
            for result in &mut results {
                if result.is_ok() {
                    *result = Err(StoreError {
                        path: self.dir(),
                        message: e.to_string(),
                    });
                }
            }
        }
        results
    }

    fn commit(&self, path: &Path, commit: &Commit) -> Result<(), String> {
        if crate::daemon::reconcile::git_head(&self.root).is_none()
            && !self.root.join(".git").exists()
        {
            return Ok(()); // not a git checkout
        }
        let rel = path.strip_prefix(&self.root).unwrap_or(path);
        let git = |args: &[&str]| {
            Command::new("git")
                .arg("-C")
                .arg(&self.root)
                .args(args)
                .env("GIT_COMMITTER_NAME", "lunafront")
                .env("GIT_COMMITTER_EMAIL", "lunafront@localhost")
                .output()
                .map_err(|e| format!("git: {e}"))
        };
        git(&["add", "-A", "--", &rel.to_string_lossy()])?;
        let staged = git(&["diff", "--cached", "--quiet", "--", &rel.to_string_lossy()])?;
        if staged.status.success() {
            return Ok(()); // nothing to commit
        }
        let author = format!("{} <{}@lunafront.invalid>", commit.author, commit.author);
        let out = git(&[
            "commit",
            "-q",
            "--no-verify",
            "-m",
            &commit.message,
            "--author",
            &author,
            "--",
            &rel.to_string_lossy(),
        ])?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "git commit: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

/// A git commit of an API change.
#[derive(Debug, Clone, Default)]
pub struct Commit {
    pub author: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch writes each fragment (an empty one removes its file), answers for each in
    /// order, refuses a name that is not an agent id without writing it, and leaves no
    /// temporary file behind.
    #[test]
    fn fragments_written_together_are_each_written_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let route = |port: u16| {
            serde_yaml::from_str::<Fragment>(&format!(
                "backends:\n  a--web: {{ servers: [ {{ agent: a, port: {port} }} ] }}\n"
            ))
            .unwrap()
        };
        assert_eq!(
            store
                .write_many(&[("a", &route(1)), ("b", &route(2))])
                .len(),
            2
        );
        let results = store.write_many(&[
            ("a", &Fragment::default()),
            ("../x", &route(3)),
            ("b", &route(4)),
        ]);
        assert!(results[0].is_ok() && results[1].is_err() && results[2].is_ok());
        assert!(
            !store.path("a").exists(),
            "an empty fragment removes the file"
        );
        assert_eq!(store.read("b").unwrap(), Some(route(4)));
        let names: Vec<String> = std::fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["b.yaml"]);
        assert!(!dir.path().join("x.yaml").exists());
    }

    #[test]
    fn fragments_round_trip_and_keep_hand_added_fields() {
        let dir = std::env::temp_dir().join(format!("lunafront-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::new(&dir);
        std::fs::create_dir_all(store.dir()).unwrap();
        std::fs::write(
            store.path("agent-7"),
            "agents:\n  agent-7: { address: 203.0.113.7, maintenance: true }\nbackends:\n  agent-7--shop: { servers: [ { agent: agent-7, port: 3000, weight: 5 } ], owner: agent-7 }\ndomains:\n  shop.apps.example.com: { backend: agent-7--shop, owner: agent-7 }\n",
        )
        .unwrap();
        let mut f = store.read("agent-7").unwrap().unwrap();
        assert_eq!(
            f.agents["agent-7"].other["maintenance"],
            serde_yaml::Value::Bool(true)
        );
        f.agents.get_mut("agent-7").unwrap().address = "203.0.113.8".into();
        store.write("agent-7", &f, None).unwrap();
        let again = store.read("agent-7").unwrap().unwrap();
        assert_eq!(again, f);
        let text = std::fs::read_to_string(store.path("agent-7")).unwrap();
        assert!(
            text.contains("weight: 5") && text.contains("maintenance: true"),
            "{text}"
        );
        assert_eq!(store.read_all().unwrap().len(), 1);
        store.write("agent-7", &Fragment::default(), None).unwrap();
        assert!(store.read("agent-7").unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn route(port: u16) -> Route {
        Route {
            backend: format!("b{port}"),
            port,
            listener: None,
            health_check: None,
            tls: None,
            service: None,
        }
    }

    /// A change made on one head and re-made on a newer one (another node's change of the
    /// same agent in it) keeps both: what the change touched is set, the rest stays.
    #[test]
    fn a_change_rebased_on_a_newer_head_keeps_the_other_node_s_entries() {
        let mut before = Fragment::default();
        before.route("a", "old.example.com", route(1));
        before.route("a", "gone.example.com", route(2));
        let mut after = before.clone();
        after.route("a", "new.example.com", route(3));
        after.domains.remove("gone.example.com");
        // Meanwhile another node added a route of its own and changed `old`.
        let mut current = before.clone();
        current.route("a", "theirs.example.com", route(4));
        current.route("a", "old.example.com", route(5));
        let rebased = after.rebased(&before, &current);
        let domains: Vec<&str> = rebased.domains.keys().map(String::as_str).collect();
        assert_eq!(
            domains,
            ["new.example.com", "old.example.com", "theirs.example.com"]
        );
        // Not touched by this change: the other node's version stays.
        assert_eq!(rebased.domains["old.example.com"].backend, "b5");
        assert!(rebased.backends.contains_key("b4") && rebased.backends.contains_key("b3"));
        // Nothing changed meanwhile: the rebased change is the change.
        assert_eq!(after.rebased(&before, &before), after);
    }
}
