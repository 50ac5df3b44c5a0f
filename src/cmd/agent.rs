//! `lunafront agent enroll|revoke NAME`: an agent's credentials for the API, managed from the
//! front server itself.

use super::exit;
use crate::cli::AgentAction;
use lunafront::api::auth::{Kind, TokenStore};
use lunafront::model::Target;
use lunafront::spec::load;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The API's data folder: `--api-data`, else `<target state_dir>/api`.
fn data_dir(
    state: &Path,
    target: Option<&str>,
    api_data: Option<&Path>,
) -> Result<PathBuf, String> {
    if let Some(dir) = api_data {
        return Ok(dir.to_path_buf());
    }
    let source = load::load_path(state).map_err(|e| e.to_string())?;
    let validation = lunafront::model::validate_targets(&source);
    let errors: Vec<String> = validation.errors().map(|d| d.to_string()).collect();
    let model = validation.model.ok_or_else(|| errors.join("\n"))?;
    match lunafront::target::select(&model, target).map_err(|e| e.to_string())? {
        (_, Target::Haproxy(t)) => Ok(t.state_dir.join("api")),
        (name, _) => Err(format!(
            "target {name}: give the API's data folder with --api-data"
        )),
    }
}

/// The key hashes the state declares for `agent` (its fragment's or the administrator's
/// `key_sha256`), read from the files as they are: revocation must work even when the state
/// does not validate.
fn declared_keys(state: &Path, agent: &str) -> Vec<String> {
    let Ok(source) = load::load_path(state) else {
        return Vec::new();
    };
    source
        .document
        .pointer(&format!("/agents/{agent}/key_sha256"))
        .and_then(|v| v.as_str())
        .map(|k| vec![k.to_string()])
        .unwrap_or_default()
}

pub fn run(action: &AgentAction) -> ExitCode {
    let result = match action {
        AgentAction::Enroll {
            name,
            state,
            target,
            valid,
            api_data,
            json,
        } => (|| {
            if !lunafront::model::names::is_identifier(name) {
                return Err(format!(
                    "`{name}` is not an agent id: {}",
                    lunafront::model::names::IDENTIFIER_RULE
                ));
            }
            let dir = data_dir(&state.state, target.as_deref(), api_data.as_deref())?;
            // Creates the folder 0700 (its parents too), as the daemon would.
            let token = TokenStore::open(&dir)
                .map_err(|e| e.to_string())?
                .issue(name, Kind::Enrollment, *valid)
                .map_err(|e| e.to_string())?;
            if *json {
                let expires = lunafront::clock::unix_now() as i64 + valid.as_secs() as i64;
                let doc = serde_json::json!({
                    "agent": name,
                    "token": token,
                    "kind": "enrollment",
                    "expires_at": lunafront::clock::rfc3339(expires),
                });
                println!("{doc}");
                return Ok(());
            }
            println!("{token}");
            eprintln!(
                "One-time enrollment token for agent {name}, valid {}s: the agent registers with it as its agentKey. It is shown once; only its hash is kept.",
                valid.as_secs()
            );
            Ok(())
        })(),
        AgentAction::Revoke {
            name,
            state,
            target,
            api_data,
        } => (|| {
            let dir = data_dir(&state.state, target.as_deref(), api_data.as_deref())?;
            let keys = declared_keys(&state.state, name);
            let revoked = TokenStore::open(&dir)
                .map_err(|e| e.to_string())?
                .revoke(name, &keys)
                .map_err(|e| e.to_string())?;
            println!(
                "Revoked {revoked} token(s) and key(s) of agent {name}: it cannot authenticate again until `lunafront agent enroll {name}`."
            );
            Ok(())
        })(),
    };
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            if matches!(action, AgentAction::Enroll { json: true, .. }) {
                println!("{}", serde_json::json!({ "error": e }));
            }
            eprintln!("error: {e}");
            ExitCode::from(exit::ERROR)
        }
    }
}
