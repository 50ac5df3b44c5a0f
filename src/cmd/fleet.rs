//! `lunafront fleet status URL...`: asks each node's daemon (`GET /status`) which commit it
//! runs and which it fetched, and prints a table (or `--json`) naming the nodes that lag, fail
//! or do not answer. Exit 0 when every node answers and runs the newest commit any of them
//! fetched with its last reconcile succeeded, 1 otherwise.

use super::exit;
use crate::cli::FleetAction;
use serde_json::{Value, json};
use std::process::ExitCode;
use std::time::Duration;

pub fn run(action: &FleetAction) -> ExitCode {
    match action {
        FleetAction::Status {
            urls,
            json,
            timeout,
        } => status(urls, *json, *timeout),
    }
}

/// What one node said.
struct Node {
    url: String,
    answer: Result<Value, String>,
}

fn ask(url: &str, timeout: Duration) -> Result<Value, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into();
    let base = url.trim_end_matches('/').trim_end_matches("/status");
    let mut response = agent
        .get(&format!("{base}/status"))
        .call()
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("GET /status answered {status}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("GET /status: not JSON: {e}"))
}

fn text<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

fn short(commit: Option<&str>) -> String {
    commit
        .map(|c| c[..c.len().min(12)].to_string())
        .unwrap_or_else(|| "-".into())
}

fn status(urls: &[String], as_json: bool, timeout: Duration) -> ExitCode {
    // Every node at once: a node that does not answer costs one timeout, not one per node.
    let nodes: Vec<Node> = std::thread::scope(|scope| {
        let handles: Vec<_> = urls
            .iter()
            .map(|url| scope.spawn(move || ask(url, timeout)))
            .collect();
        urls.iter()
            .zip(handles)
            .map(|(url, h)| Node {
                url: url.clone(),
                answer: h
                    .join()
                    .unwrap_or_else(|_| Err("the request failed".into())),
            })
            .collect()
    });
    let applied = |v: &Value| {
        text(v, "/git/applied_commit")
            .or_else(|| text(v, "/revision/git_commit"))
            .map(str::to_string)
    };
    // The newest commit: the one any node fetched that every other fetched commit precedes
    // is not knowable without the repository; the commit most nodes fetched stands for it,
    // and a node is behind when it says so (`behind` > 0) or runs another one.
    let mut fetched: Vec<String> = nodes
        .iter()
        .filter_map(|n| n.answer.as_ref().ok())
        .filter_map(|v| text(v, "/git/fetched_commit").map(str::to_string))
        .collect();
    fetched.sort();
    let newest = fetched
        .chunk_by(|a, b| a == b)
        .max_by_key(|c| c.len())
        .map(|c| c[0].clone());
    let mut rows = Vec::new();
    let mut in_sync = true;
    for node in &nodes {
        let row = match &node.answer {
            Err(e) => {
                in_sync = false;
                json!({"url": node.url, "reachable": false, "state": "unreachable", "error": e})
            }
            Ok(v) => {
                let applied = applied(v);
                let last = text(v, "/last_reconcile/result").map(str::to_string);
                let behind = v.pointer("/git/behind").and_then(Value::as_u64);
                let refused = v.pointer("/git/refused").filter(|r| !r.is_null()).cloned();
                let remote = v.pointer("/git/remote_reachable").and_then(Value::as_bool);
                let failing = last
                    .as_deref()
                    .is_some_and(|r| !matches!(r, "applied" | "unchanged"));
                let lagging = behind.is_some_and(|b| b > 0)
                    || (newest.is_some() && applied.is_some() && applied != newest);
                let state = if failing {
                    "failing"
                } else if lagging {
                    "behind"
                } else if remote == Some(false) {
                    "remote unreachable"
                } else if refused.is_some() {
                    "refusing a commit"
                } else {
                    "ok"
                };
                if state != "ok" {
                    in_sync = false;
                }
                let error = if failing {
                    text(v, "/last_reconcile/message").map(str::to_string)
                } else if let Some(r) = &refused {
                    text(r, "/message").map(str::to_string)
                } else {
                    text(v, "/git/fetch_error").map(str::to_string)
                };
                json!({
                    "url": node.url,
                    "reachable": true,
                    "target": text(v, "/target"),
                    "applied_commit": applied,
                    "fetched_commit": text(v, "/git/fetched_commit"),
                    "behind": behind,
                    "remote_reachable": remote,
                    "last_reconcile": last,
                    "refused": refused,
                    "state": state,
                    "error": error,
                })
            }
        };
        rows.push(row);
    }
    if as_json {
        let doc = json!({"format_version": "1", "in_sync": in_sync, "nodes": rows});
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).expect("serializes")
        );
    } else {
        println!(
            "{:<28} {:<12} {:<13} {:<13} {:>6}  {:<14} state",
            "node", "target", "applied", "fetched", "behind", "last reconcile"
        );
        for r in &rows {
            let state = r["state"].as_str().unwrap_or_default();
            let error = r["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            println!(
                "{:<28} {:<12} {:<13} {:<13} {:>6}  {:<14} {state}{error}",
                r["url"].as_str().unwrap_or_default(),
                r["target"].as_str().unwrap_or("-"),
                short(r["applied_commit"].as_str()),
                short(r["fetched_commit"].as_str()),
                r["behind"]
                    .as_u64()
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "-".into()),
                r["last_reconcile"].as_str().unwrap_or("-"),
            );
        }
        let ok = rows.iter().filter(|r| r["state"] == "ok").count();
        println!(
            "\n{ok} of {} node(s) run commit {} and their last reconcile succeeded.",
            rows.len(),
            short(newest.as_deref())
        );
    }
    ExitCode::from(if in_sync { exit::OK } else { exit::ERROR })
}
