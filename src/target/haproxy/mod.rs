//! The `haproxy` target: a local HAProxy whose configuration, maps and certificates live in the
//! folder of its haproxy.cfg (I/O edge).
//!
//! An apply: check the plan is not stale → (the point of no return: an interrupt stops the apply
//! before it; `marker` records the apply under way) → either the runtime change the plan decided,
//! command by command, read back from HAProxy, then the files swapped atomically; or the new
//! files written into a staging folder, `haproxy -c` on them, swapped, and a reload (verified
//! by the new worker) → record what HAProxy runs (`marker`) and the history. If anything fails
//! once something went live, the previous files are put back and HAProxy reloads them. Files
//! on disk are never replaced by ones HAProxy refuses: a reload's pass `haproxy -c`, a runtime
//! change's differences were each taken by the runtime API (see `apply_with`).

pub mod marker;
pub mod process;
pub mod socket;

use super::apply::{Applied, ApplyError, ApplyRequest, How};
use super::files::{self, Files};
use super::history::History;
use crate::model::HaproxyTarget;
use crate::plan::Live;
use crate::plan::ops::{self as runtime, Execution, Op, RuntimeState};
use crate::render::RenderOptions;
use socket::{Expect, RuntimeApi, SocketError};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The folder holding haproxy.cfg and, beside it, the maps and certificates.
pub fn config_dir(target: &HaproxyTarget) -> &Path {
    target.config.parent().unwrap_or(Path::new("."))
}

pub fn observe(
    target: &HaproxyTarget,
    wanted: impl IntoIterator<Item = String>,
) -> Result<Live, files::FileError> {
    let mut live = files::observe_dir(config_dir(target), wanted)?;
    live.interrupted = marker::interrupted(target, marker::digest(&live.files).as_deref());
    Ok(live)
}

/// Holds the target's apply lock for its lifetime: one apply at a time, across processes.
pub struct Lock {
    _file: fs::File,
}

pub fn lock(target: &HaproxyTarget, name: &str) -> Result<Lock, ApplyError> {
    use std::os::unix::fs::DirBuilderExt;
    let prepare = |detail: String| ApplyError::Prepare {
        target: name.to_string(),
        detail,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&target.state_dir)
        .map_err(|e| {
            prepare(format!(
                "cannot create the state folder {}: {e}",
                target.state_dir.display()
            ))
        })?;
    let path = target.state_dir.join("lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| prepare(format!("cannot open {}: {e}", path.display())))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(Lock { _file: file }),
            Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(_) => {
                return Err(ApplyError::Busy {
                    target: name.to_string(),
                    lock: path,
                });
            }
        }
    }
}

/// Removes what a process killed in the middle of an apply may have left: staging folders and
/// temporary files. The files HAProxy reads are only ever replaced by rename, so they are whole.
pub fn clean_leftovers(dir: &Path) {
    fn walk(dir: &Path) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(".lunafront-staging-") {
                let _ = fs::remove_dir_all(&path);
            } else if name.contains(".lunafront-tmp-") {
                let _ = fs::remove_file(&path);
            } else if entry.file_type().is_ok_and(|t| t.is_dir()) && !name.starts_with('.') {
                // Not through symlinks: lunafront writes real folders only.
                walk(&path);
            }
        }
    }
    walk(dir);
}

/// How HAProxy gets started when a `spawn: true` target is not running: in the background
/// from the command line, as a supervised child in the daemon.
pub type Starter<'a> = &'a dyn Fn(&HaproxyTarget) -> Result<u32, String>;

pub fn apply(target: &HaproxyTarget, request: &ApplyRequest) -> Result<Applied, ApplyError> {
    apply_with(target, request, &process::start_background)
}

pub fn apply_with(
    target: &HaproxyTarget,
    request: &ApplyRequest,
    start: Starter<'_>,
) -> Result<Applied, ApplyError> {
    let name = request.target_name.as_str();
    let _lock = lock(target, name)?;
    let dir = config_dir(target);
    clean_leftovers(dir);
    let prepare = |detail: String| ApplyError::Prepare {
        target: name.to_string(),
        detail,
    };
    let live =
        observe(target, request.files.keys().cloned()).map_err(|e| prepare(e.to_string()))?;
    if let Some(expected) = &request.expected_fingerprint
        && *expected != live.fingerprint()
    {
        return Err(ApplyError::Stale {
            target: name.to_string(),
        });
    }
    let running = process::running(target);
    if running.is_none()
        && let Some(detail) = process::existing_master(target)
    {
        return Err(ApplyError::Unresponsive {
            target: name.to_string(),
            detail,
        });
    }
    if running.is_none() && !target.spawn {
        return Err(ApplyError::NotRunning {
            target: name.to_string(),
            detail: format!("no master answers on {}", target.master_socket.display()),
        });
    }
    if running.is_some() && live.files == request.files && live.interrupted.is_none() {
        return Ok(Applied {
            how: How::Unchanged,
            seq: None,
            notes: Vec::new(),
            unrecorded: None,
        });
    }

    let refused = |detail: String| ApplyError::Refused {
        target: name.to_string(),
        detail,
    };
    let mut timer = crate::clock::PhaseTimer::new();
    // The new files, written beside the live ones (relative paths resolve the same way) for
    // `haproxy -c`, with its verdict (HAProxy's message, without the staging folder's name).
    let check_staged = || -> Result<Result<(), String>, ApplyError> {
        let staging = Staging::write(dir, &request.files)
            .map_err(|e| prepare(format!("staging the files: {e}")))?;
        let staged_config = staging.dir.join(&request.options.config_name);
        Ok(process::check_config(&target.haproxy_bin, &staged_config)
            .map_err(|e| staging.clean(&e)))
    };
    let config_name = &request.options.config_name;
    let mut notes = Vec::new();
    // The point of no return: an interrupt that came before it stops the apply here, with
    // nothing changed; one that comes later is noted and the apply completes. The marker says
    // an apply is under way until HAProxy is verified to run it.
    let go_live = || {
        if super::interrupted() {
            return Err(ApplyError::Interrupted {
                target: name.to_string(),
            });
        }
        marker::begin(target, &request.files)
            .map_err(|e| prepare(format!("recording the apply under way: {e}")))
    };
    // Puts the new files in place of the live ones, once `haproxy -c` accepted them.
    let swap = |live_changed: bool| {
        files::write_files(dir, &request.files, &live.files, config_name).map_err(|e| {
            rollback(
                target,
                request,
                &live.files,
                format!("writing the files: {e}"),
                start,
                live_changed,
            )
        })
    };
    // The plan decided how; HAProxy not running has nothing to change at runtime (it is started
    // on the files), and an apply found interrupted since the plan is finished by a reload.
    let ops = match (&request.execution, &running, &live.interrupted) {
        (Execution::Runtime { ops }, Some(_), None) => Some(ops),
        _ => None,
    };

    let how = if let Some(ops) = ops {
        // A runtime change goes live first, command by command, and is not checked with
        // `haproxy -c`: HAProxy's runtime API parses each server line (`add server`), address,
        // weight, map entry and certificate with the parsers its configuration loading uses and
        // refuses what they refuse, and the plan allowed no other difference between the files
        // (`readback::runtime_blocker`). So once every command was taken and HAProxy reads back
        // exactly the new state, the new files differ from the running ones only by what HAProxy
        // accepted, and they replace them. Should the runtime change not go through, the reload
        // that replaces it starts from files `haproxy -c` accepted first, as any reload does.
        go_live()?;
        let api = RuntimeApi::new(&target.runtime_socket);
        let expected = RuntimeState::touched_by(&request.files, &request.options, ops);
        let ops = runtime::rebase_map_ops(
            ops.clone(),
            &expected,
            |map| read_map(&api, map),
            |map, key| read_map_entry(&api, map, key),
        )
        .unwrap_or_else(|_| ops.clone());
        let runtime = execute(&api, &ops).and_then(|commands| {
            verify_state(&api, &expected, Scope::TouchedBy(&ops)).map(|()| commands)
        });
        timer.lap("runtime");
        match runtime {
            Ok(commands) => {
                swap(true)?;
                timer.lap("swap");
                How::Runtime { commands }
            }
            Err(e) => {
                if let Err(detail) = check_staged()? {
                    // The previous files are untouched: a reload puts HAProxy back on them.
                    return Err(match process::reload(target) {
                        Ok(_) => {
                            marker::back_to(target, &live.files);
                            refused(detail)
                        }
                        Err(e) => ApplyError::RollbackFailed {
                            target: name.to_string(),
                            reason: format!("haproxy -c refused the new files: {detail}"),
                            rollback: e.to_string(),
                        },
                    });
                }
                swap(true)?;
                notes.push(format!(
                    "the runtime change did not go through ({e}); reloaded instead"
                ));
                match process::reload(target) {
                    Ok(worker) => How::Reloaded { worker },
                    Err(e) => {
                        return Err(rollback(
                            target,
                            request,
                            &live.files,
                            e.to_string(),
                            start,
                            true,
                        ));
                    }
                }
            }
        }
    } else {
        check_staged()?.map_err(refused)?;
        timer.lap("check");
        go_live()?;
        swap(false)?;
        if running.is_some() {
            match (&request.execution, &live.interrupted) {
                (_, Some(why)) => notes.push(format!(
                    "reload: {why}: a reload makes HAProxy run the files"
                )),
                (Execution::Reload { reasons }, None) => {
                    notes.push(format!("reload: {}", reasons.join("; ")))
                }
                (Execution::Runtime { .. }, None) => {}
            }
        }
        match activate(target, running.is_some(), start) {
            Ok(how) => how,
            Err(reason) => {
                return Err(rollback(target, request, &live.files, reason, start, true));
            }
        }
    };
    if super::interrupted() {
        notes.push(
            "interrupted while the change was going live: the apply was completed first".into(),
        );
    }
    let mut unrecorded = marker::runs(target, &request.files, request.git_commit.as_deref())
        .err()
        .map(|e| {
            format!("what HAProxy runs could not be recorded ({e}): the next plan reloads it")
        });
    timer.lap("marker");
    let seq = match History::new(&target.state_dir).record_applied(request, &how, target.history) {
        Ok(seq) => Some(seq),
        Err(e) => {
            unrecorded = Some(match unrecorded {
                Some(first) => format!("{first}; {e}"),
                None => e.to_string(),
            });
            None
        }
    };
    timer.lap("history");
    tracing::debug!(phases = %timer, "apply timings");
    Ok(Applied {
        how,
        seq,
        notes,
        unrecorded,
    })
}

/// The new files written into a folder beside the configuration (so relative paths resolve the
/// same way), for `haproxy -c`. Removed when dropped.
struct Staging {
    dir: PathBuf,
}

impl Staging {
    fn write(dir: &Path, new: &Files) -> Result<Staging, files::FileError> {
        let staging = Staging {
            dir: dir.join(format!(".lunafront-staging-{}", std::process::id())),
        };
        let _ = fs::remove_dir_all(&staging.dir);
        for (path, bytes) in new {
            files::write_atomic(&staging.dir.join(path), bytes, files::mode_for(path))?;
        }
        Ok(staging)
    }

    /// HAProxy's message without the staging folder's name in its paths.
    fn clean(&self, message: &str) -> String {
        message.replace(&format!("{}/", self.dir.display()), "")
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Makes HAProxy run the files just written when the runtime API cannot: a start (spawned
/// target not running) or a reload. `Err` is the reason it could not.
fn activate(target: &HaproxyTarget, running: bool, start: Starter<'_>) -> Result<How, String> {
    if !running {
        return start(target).map(|worker| How::Started { worker });
    }
    let worker = process::reload(target).map_err(|e| e.to_string())?;
    Ok(How::Reloaded { worker })
}

/// Puts the previous files back and brings HAProxy back onto what the files say: a reload
/// (or a start, for a spawned HAProxy that was not running). The files are compared with what
/// is on disk now, so a file whose write failed (and still holds its old content) is left
/// alone; and HAProxy is reloaded even when some file could not be restored, so that it never
/// keeps runtime changes that no file holds.
fn rollback(
    target: &HaproxyTarget,
    request: &ApplyRequest,
    old: &Files,
    reason: String,
    start: Starter<'_>,
    live_changed: bool,
) -> ApplyError {
    let name = request.target_name.clone();
    let dir = config_dir(target);
    let failed = |rollback: String| ApplyError::RollbackFailed {
        target: name.clone(),
        reason: reason.clone(),
        rollback,
    };
    let paths = old.keys().chain(request.files.keys()).cloned().collect();
    let restored = files::read_files(dir, &paths)
        .map_err(|e| e.to_string())
        .and_then(|now| {
            files::write_files(dir, old, &now, &request.options.config_name)
                .map_err(|e| e.to_string())
        });
    let restarted = match process::running(target) {
        Some(_) if live_changed || restored.is_err() => process::reload(target)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Some(_) => Ok(()),
        None if old.contains_key(&request.options.config_name) && target.spawn => {
            start(target).map(|_| ())
        }
        None if !old.contains_key(&request.options.config_name) => Ok(()),
        None => Err("HAProxy is not running".to_string()),
    };
    match (restored, restarted) {
        (Ok(_), Ok(())) => {
            // HAProxy runs the previous files again (or nothing, when there were none).
            marker::back_to(target, old);
            ApplyError::RolledBack {
                target: name,
                reason,
            }
        }
        (Err(e), Ok(())) => failed(format!(
            "restoring the files: {e}; HAProxy was reloaded onto the files as they are, and the next plan shows what differs"
        )),
        (Ok(_), Err(e)) => failed(e),
        (Err(files), Err(e)) => failed(format!("restoring the files: {files}; {e}")),
    }
}

/// Runs operations through the runtime API; returns how many commands were sent. A map
/// replacement's new version is read back before `commit map`: a version that does not hold
/// exactly the new entries is never committed (it is cleared, and the apply fails, which makes
/// it reload instead).
pub fn execute(api: &RuntimeApi, ops: &[Op]) -> Result<usize, String> {
    let mut sent = 0;
    for op in ops {
        let mut version = String::new();
        for command in op.commands() {
            let text = command.text.replace("@VERSION", &format!("@{version}"));
            if let Op::MapReplace { map, entries } = op
                && text.starts_with("commit map ")
            {
                check_prepared(api, map, &version, entries)?;
            }
            let answer = match (op, command.expect) {
                // A server with connections still attached cannot be deleted yet: they close
                // once it is in maintenance and no route points to it.
                (Op::DelServer { .. }, Expect::Prefix(_)) => {
                    run_patiently(api, &text, command.expect, Duration::from_secs(3))
                }
                _ => api.run(&text, command.expect),
            }
            .map_err(|e| e.to_string())?;
            if text.starts_with("prepare map") {
                version = answer
                    .trim()
                    .trim_start_matches("New version created:")
                    .trim()
                    .to_string();
            }
            if text.starts_with("commit ssl cert") && !answer.contains("Success") {
                return Err(format!("`{}` answered: {}", text, answer.trim()));
            }
            sent += 1;
        }
    }
    Ok(sent)
}

/// Compares a prepared (uncommitted) map version with the entries it must hold; clears it when
/// it differs, so that it can never be committed by mistake.
fn check_prepared(
    api: &RuntimeApi,
    map: &str,
    version: &str,
    entries: &BTreeMap<String, String>,
) -> Result<(), String> {
    if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "map {map}: `prepare map` gave no version number ({version:?}); nothing committed"
        ));
    }
    let prepared = read_map(api, &format!("@{version} {map}")).map_err(|e| e.to_string())?;
    if prepared == *entries {
        return Ok(());
    }
    let _ = api.run(&format!("clear map @{version} {map}"), Expect::Empty);
    Err(format!(
        "map {map}: the prepared version @{version} holds {} entries, {} differing from the {} expected; it was not committed",
        prepared.len(),
        differing(&prepared, entries),
        entries.len()
    ))
}

fn run_patiently(
    api: &RuntimeApi,
    text: &str,
    expect: Expect,
    patience: Duration,
) -> Result<String, SocketError> {
    let deadline = Instant::now() + patience;
    loop {
        match api.run(text, expect) {
            Err(SocketError::Refused { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            other => return other,
        }
    }
}

/// What `verify` reads back.
#[derive(Clone, Copy)]
pub enum Scope<'a> {
    /// Every map and backend (drift detection).
    Everything,
    /// Every backend's servers.
    Servers,
    /// What these operations touched (after an apply).
    TouchedBy(&'a [Op]),
}

/// Checks that HAProxy's runtime state (maps and servers) is what `files` say.
pub fn verify(
    api: &RuntimeApi,
    files: &Files,
    options: &RenderOptions,
    scope: Scope<'_>,
) -> Result<(), String> {
    verify_state(api, &RuntimeState::from_files(files, options), scope)
}

/// How long HAProxy may take to show a change it has answered for. HAProxy 3.0.11 answers
/// `set server <b>/<s> addr <ip> port <p>` with "port changed from 'A' to 'B'", yet about one
/// such change in a hundred under traffic still shows port A in `show servers state` for up to
/// ~2 ms after the answer (measured: 20 of 2,000 changes); read back at once, a change HAProxy
/// took looked refused, and the apply reloaded instead. A difference must outlast this to count.
const SETTLE: Duration = Duration::from_millis(500);

/// `verify` against the runtime state the files hold, already read from them. A difference is
/// read again until it has lasted `SETTLE`: only one that stays is reported.
pub fn verify_state(
    api: &RuntimeApi,
    expected: &RuntimeState,
    scope: Scope<'_>,
) -> Result<(), String> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let problems = differences(api, expected, scope)?;
        if problems.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(problems.join("; "));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What differs between HAProxy's runtime state and `expected`, read once; `Err` when it cannot
/// be read.
fn differences(
    api: &RuntimeApi,
    expected: &RuntimeState,
    scope: Scope<'_>,
) -> Result<Vec<String>, String> {
    let all_backends = || expected.servers.keys().map(|(b, _)| b.as_str()).collect();
    let (maps, backends): (BTreeSet<&str>, BTreeSet<&str>) = match scope {
        Scope::Everything => (
            expected.maps.keys().map(String::as_str).collect(),
            all_backends(),
        ),
        Scope::Servers => (BTreeSet::new(), all_backends()),
        Scope::TouchedBy(ops) => (
            ops.iter().filter_map(Op::map).collect(),
            ops.iter().filter_map(Op::backend).collect(),
        ),
    };
    let mut problems = Vec::new();
    for map in maps {
        // A map changed entry by entry is read back by those entries (the operations carry
        // their new values); only a map expected whole is read whole.
        let Some(want) = expected.maps.get(map) else {
            if let Scope::TouchedBy(ops) = scope {
                for (_, key, value) in ops.iter().filter_map(Op::map_entry).filter(|e| e.0 == map) {
                    let live = read_map_entry(api, map, key).map_err(|e| e.to_string())?;
                    if live.as_deref() != value {
                        problems.push(format!("map {map} holds {live:?} for {key}, not {value:?}"));
                    }
                }
            }
            continue;
        };
        let live = read_map(api, map).map_err(|e| e.to_string())?;
        if live != *want {
            problems.push(format!(
                "map {map} holds {} entries that differ from the file",
                differing(&live, want)
            ));
        }
    }
    // Thousands of app slots: one dump of every backend's servers, not a command for each.
    let dump = if backends.len() > 32 {
        Some(read_all_servers(api).map_err(|e| e.to_string())?)
    } else {
        None
    };
    for backend in backends {
        let live = match &dump {
            Some(all) => all.get(backend).cloned().unwrap_or_default(),
            None => read_servers(api, backend).map_err(|e| e.to_string())?,
        };
        let want: BTreeMap<&str, ServerState> = expected
            .servers
            .iter()
            .filter(|((b, _), _)| b == backend)
            .map(|((_, n), s)| {
                (
                    n.as_str(),
                    ServerState {
                        addr: s.addr.to_string(),
                        port: s.port,
                        weight: s.weight,
                        maintenance: s.disabled,
                    },
                )
            })
            .collect();
        let live: BTreeMap<&str, ServerState> =
            live.iter().map(|(n, s)| (n.as_str(), s.clone())).collect();
        if live != want {
            problems.push(format!(
                "backend {backend}: servers differ from the file (live {live:?}, file {want:?})"
            ));
        }
    }
    Ok(problems)
}

fn differing(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> usize {
    a.iter().filter(|(k, v)| b.get(*k) != Some(v)).count()
        + b.keys().filter(|k| !a.contains_key(*k)).count()
}

/// `show map <map>`: `0x55d… key value` per line. `map` may name a version (`@3 maps/x.map`).
pub fn read_map(api: &RuntimeApi, map: &str) -> Result<BTreeMap<String, String>, SocketError> {
    let text = api.run(&format!("show map {map}"), Expect::Any)?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.splitn(3, ' ');
        match (words.next(), words.next(), words.next()) {
            (Some(ptr), Some(key), Some(value)) if ptr.starts_with("0x") => {
                out.insert(key.to_string(), value.trim().to_string());
            }
            _ if line.trim().is_empty() => {}
            _ => {
                return Err(SocketError::Refused {
                    command: format!("show map {map}"),
                    answer: line.to_string(),
                });
            }
        }
    }
    Ok(out)
}

/// `get map <map> <key>`: the value HAProxy finds for `key` in `map`, `None` when it finds none.
/// Our maps are matched as strings (`map()`), so this is the entry for exactly `key`, the one
/// requests get when the map holds the key twice (`show map` lists both).
pub fn read_map_entry(
    api: &RuntimeApi,
    map: &str,
    key: &str,
) -> Result<Option<String>, SocketError> {
    let command = format!("get map {map} {key}");
    let answer = api.run(&command, Expect::Any)?;
    parse_map_entry(&answer, key).ok_or_else(|| SocketError::Refused {
        command,
        answer: answer.trim().to_string(),
    })
}

/// `get map`'s answer for `key`: `Some(None)` when not found, `None` when it is not one answer
/// of a string map.
fn parse_map_entry(answer: &str, key: &str) -> Option<Option<String>> {
    // `type=str, case=sensitive, found=yes, idx=tree, key="k", value="v", type="str"`, or
    // `type=str, case=sensitive, found=no`: one line per kind of lookup the map is used with.
    // Ours are all `map()`; a map a raw `extra:` line also looks up another way answers with
    // more than one line, which is not read as an answer for requests (the apply reloads).
    let mut lines = answer.lines().filter(|l| !l.trim().is_empty());
    let (Some(line), None) = (lines.next(), lines.next()) else {
        return None;
    };
    let line = line.trim();
    if !line.starts_with("type=str,") {
        return None;
    }
    if line.ends_with("found=no") {
        return Some(None);
    }
    line.split_once(", found=yes, ")
        .and_then(|(_, rest)| rest.split_once(&format!("key=\"{key}\", value=\"")))
        .and_then(|(_, rest)| rest.rsplit_once("\", type="))
        .map(|(value, _)| Some(value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::parse_map_entry;

    #[test]
    fn a_get_map_answer_is_read_only_when_it_is_one_string_lookup() {
        let found = "type=str, case=sensitive, found=yes, idx=tree, key=\"a.example.com\", value=\"slot:http:3\", type=\"str\"\n\n";
        assert_eq!(
            parse_map_entry(found, "a.example.com"),
            Some(Some("slot:http:3".into()))
        );
        let missing = "type=str, case=sensitive, found=no\n\n";
        assert_eq!(parse_map_entry(missing, "a.example.com"), Some(None));
        // The same map also looked up another way (a raw line's `map_dom`): two answers, neither
        // trusted, even when the last says "not found".
        let two = format!(
            "{}\ntype=dom, case=sensitive, found=no\n\n",
            found.trim_end()
        );
        assert_eq!(parse_map_entry(&two, "a.example.com"), None);
        let two = format!("{}\n{found}", missing.trim_end());
        assert_eq!(parse_map_entry(&two, "a.example.com"), None);
        for other in [
            "Unknown map identifier. Please use #<id> or <file>.\n",
            "",
            "type=str, case=sensitive, found=yes, idx=tree, key=\"b.example.com\", value=\"x\", type=\"str\"\n",
        ] {
            assert_eq!(parse_map_entry(other, "a.example.com"), None, "{other}");
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerState {
    pub addr: String,
    pub port: u16,
    pub weight: u16,
    pub maintenance: bool,
}

/// `show servers state <backend>`: address, port, weight and maintenance of each server.
pub fn read_servers(
    api: &RuntimeApi,
    backend: &str,
) -> Result<BTreeMap<String, ServerState>, SocketError> {
    let text = api.run(&format!("show servers state {backend}"), Expect::Any)?;
    let out = parse_servers_state(&text)
        .remove(backend)
        .unwrap_or_default();
    if out.is_empty() && text.contains("Can't find backend") {
        return Err(SocketError::Refused {
            command: format!("show servers state {backend}"),
            answer: text.trim().to_string(),
        });
    }
    Ok(out)
}

/// `show servers state`: the servers of every backend, by backend.
pub fn read_all_servers(
    api: &RuntimeApi,
) -> Result<BTreeMap<String, BTreeMap<String, ServerState>>, SocketError> {
    Ok(parse_servers_state(
        &api.run("show servers state", Expect::Any)?,
    ))
}

/// Backend → server → state, from `show servers state` (format version 1).
fn parse_servers_state(text: &str) -> BTreeMap<String, BTreeMap<String, ServerState>> {
    let mut out: BTreeMap<String, BTreeMap<String, ServerState>> = BTreeMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if line.starts_with('#') || f.len() < 19 {
            continue;
        }
        // srv_admin_state: forced (1), inherited (2), configured (4) or resolution (0x20)
        // maintenance all mean "in maintenance".
        let admin: u32 = f[6].parse().unwrap_or(0);
        out.entry(f[1].to_string()).or_default().insert(
            f[3].to_string(),
            ServerState {
                addr: f[4].to_string(),
                port: f[18].parse().unwrap_or(0),
                weight: f[7].parse().unwrap_or(0),
                maintenance: admin & 0x27 != 0,
            },
        );
    }
    out
}

/// Puts HAProxy's runtime state back to what its files say, when someone changed it through
/// the runtime API by hand: maps are replaced atomically, servers by a reload. Returns what was
/// corrected, or `None` when nothing differed.
pub fn correct_runtime_drift(
    target: &HaproxyTarget,
    files: &Files,
    options: &RenderOptions,
) -> Result<Option<String>, String> {
    let api = RuntimeApi::new(&target.runtime_socket);
    let expected = RuntimeState::from_files(files, options);
    let mut ops = Vec::new();
    for (map, entries) in &expected.maps {
        if read_map(&api, map).map_err(|e| e.to_string())? != *entries {
            ops.push(Op::MapReplace {
                map: map.clone(),
                entries: entries.clone(),
            });
        }
    }
    let mut fixed: Vec<String> = ops
        .iter()
        .map(|op| match op {
            Op::MapReplace { map, .. } => format!("map {map}"),
            _ => unreachable!("maps only"),
        })
        .collect();
    execute(&api, &ops)?;
    if let Err(differs) = verify(&api, files, options, Scope::Servers) {
        process::reload(target).map_err(|e| e.to_string())?;
        fixed.push(format!("servers, by a reload ({differs})"));
    }
    Ok((!fixed.is_empty()).then(|| fixed.join(", ")))
}
