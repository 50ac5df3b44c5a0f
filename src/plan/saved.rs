//! Saved plans (`plan --out FILE`, `apply --plan FILE`): the plan, the exact files to write,
//! the target they are for, and a fingerprint of what the target held, so a plan is applied
//! exactly as reviewed, or refused when the target changed since.

use super::Plan;
use super::diff::Change;
use crate::model::Target;
use crate::render::RenderOptions;
use crate::target::files::Files;
use base64::Engine;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedPlan {
    pub format_version: String,
    pub kind: String,
    /// RFC 3339 time the plan was made.
    pub created: String,
    pub target_name: String,
    pub target: Target,
    pub live_fingerprint: String,
    pub reload_required: bool,
    pub changes: Vec<Change>,
    pub options: RenderOptions,
    pub files: Vec<SavedFile>,
    /// The plan trips `global.delete_guard` (absent in plans saved before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mass_delete: Option<super::MassDelete>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedFile {
    pub path: String,
    pub base64: String,
}

const KIND: &str = "lunafront-plan";

impl SavedPlan {
    pub fn new(plan: &Plan, target: &Target, created: String) -> SavedPlan {
        let engine = base64::engine::general_purpose::STANDARD;
        SavedPlan {
            format_version: "1".into(),
            kind: KIND.into(),
            created,
            target_name: plan.target.clone(),
            target: target.clone(),
            live_fingerprint: plan.live_fingerprint.clone(),
            reload_required: plan.reload_required(),
            changes: plan.changes.clone(),
            options: plan.options.clone(),
            mass_delete: plan.mass_delete.clone(),
            files: plan
                .new_files
                .iter()
                .map(|(path, bytes)| SavedFile {
                    path: path.clone(),
                    base64: engine.encode(bytes),
                })
                .collect(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plan serializes") + "\n"
    }

    pub fn from_json(text: &str) -> Result<SavedPlan, String> {
        let plan: SavedPlan =
            serde_json::from_str(text).map_err(|e| format!("not a lunafront plan: {e}"))?;
        if plan.kind != KIND || plan.format_version != "1" {
            return Err(format!(
                "not a lunafront plan of format 1 (kind {}, format {})",
                plan.kind, plan.format_version
            ));
        }
        for file in &plan.files {
            if !plan.names_own_file(&file.path) {
                return Err(format!(
                    "the plan names a file outside the target's folder: {}",
                    file.path
                ));
            }
        }
        Ok(plan)
    }

    /// Whether `path` is one of the target's files: relative to its folder (a haproxy target),
    /// or directly in the absolute maps or certificates folder its options name (a Data Plane
    /// API target's storage). Nothing else may come from a file that could have been edited.
    fn names_own_file(&self, path: &str) -> bool {
        let safe = |p: &str| !p.is_empty() && p.split('/').all(|c| !c.is_empty() && c != "..");
        if !path.starts_with('/') {
            return safe(path);
        }
        // A haproxy target writes files under its folder: never an absolute path.
        if !matches!(self.target, Target::Dataplane(_)) {
            return false;
        }
        [&self.options.maps_dir, &self.options.certs_dir]
            .into_iter()
            .filter(|dir| dir.starts_with('/'))
            .any(|dir| {
                path.strip_prefix(dir.as_str())
                    .and_then(|rest| rest.strip_prefix('/'))
                    .is_some_and(|name| safe(name) && !name.contains('/'))
            })
    }

    pub fn files(&self) -> Result<Files, String> {
        let engine = base64::engine::general_purpose::STANDARD;
        self.files
            .iter()
            .map(|f| {
                engine
                    .decode(&f.base64)
                    .map(|b| (f.path.clone(), b))
                    .map_err(|e| format!("{}: {e}", f.path))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(target: serde_json::Value, maps_dir: &str) -> SavedPlan {
        serde_json::from_value(serde_json::json!({
            "format_version": "1", "kind": KIND, "created": "2026-01-01T00:00:00Z",
            "target_name": "t", "target": target, "live_fingerprint": "x",
            "reload_required": false, "changes": [],
            "options": { "config_name": "haproxy.cfg", "runtime_socket": "/run/a.sock",
                         "maps_dir": maps_dir, "certs_dir": "certs" },
            "files": []
        }))
        .unwrap()
    }

    #[test]
    fn a_saved_plan_names_only_the_target_s_own_files() {
        let local = saved(
            serde_json::to_value(Target::Haproxy(crate::model::HaproxyTarget {
                config: "/etc/haproxy/haproxy.cfg".into(),
                master_socket: "/run/m.sock".into(),
                runtime_socket: "/run/a.sock".into(),
                spawn: false,
                reload_timeout: crate::model::names::Duration::from_ms(1000),
                state_dir: "/var/lib/lunafront".into(),
                history: 1,
                haproxy_bin: "haproxy".into(),
                fleet: Default::default(),
            }))
            .unwrap(),
            "/etc",
        );
        assert!(local.names_own_file("maps/hosts.map"));
        assert!(!local.names_own_file("../haproxy.cfg"));
        assert!(!local.names_own_file("maps//x"));
        // Even when the (editable) options name an absolute folder.
        assert!(!local.names_own_file("/etc/passwd"));

        let mut remote = local.clone();
        remote.target = Target::Dataplane(crate::model::DataplaneTarget {
            url: "http://127.0.0.1:5555".into(),
            username: "admin".into(),
            password: crate::model::PasswordSource::Env("P".into()),
            timeout: crate::model::names::Duration::from_ms(1000),
            maps_dir: "/etc/haproxy/maps".into(),
            certs_dir: "/etc/haproxy/ssl".into(),
            runtime_socket: "/run/a.sock".into(),
            fleet: Default::default(),
            state_dir: "/var/lib/lunafront/t".into(),
            history: 1,
        });
        remote.options.maps_dir = "/etc/haproxy/maps".into();
        assert!(remote.names_own_file("/etc/haproxy/maps/hosts.map"));
        assert!(!remote.names_own_file("/etc/haproxy/maps/../../passwd"));
        assert!(!remote.names_own_file("/etc/haproxy/maps/sub/x.map"));
        assert!(!remote.names_own_file("/etc/passwd"));
    }
}
