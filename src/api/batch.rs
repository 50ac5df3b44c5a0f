//! Group commit of route changes (the API's I/O edge, beside `ops`): agents that add or remove
//! a route at the same moment have their changes checked together — the whole state, as it
//! will be with all of them, validated once instead of once per change in a row — and written
//! together, and the reconcile they ask for makes them live in one batch. When the state with
//! all of them does not pass every check, each change is checked alone, in order, exactly as if
//! it had come alone: no change is refused, or accepted, because of another agent's.
//!
//! One agent's changes never share a batch: a change is computed (its quota, its names) from
//! the agent's fragment as its previous change left it (`AgentLocks`). Changes are computed
//! while a batch is being checked (only the check and the writes hold the store's lock), so
//! the next batch takes every change that arrived meanwhile.

use super::ops::{Api, ApiError, Caller, Saved, Settings};
use super::store::Fragment;
use crate::model::Model;
use crate::spec::load;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// One agent's change, waiting for its batch.
struct Queued {
    id: u64,
    caller: Caller,
    agent: String,
    /// The agent's fragment the change was computed from, and the fragment it makes.
    old: Fragment,
    new: Fragment,
    model: Arc<Model>,
    settings: Settings,
    message: String,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Queued>,
    /// A request is checking a batch: the others wait for its outcome or the next batch.
    leading: bool,
    decided: HashMap<u64, Result<Saved, ApiError>>,
    next_id: u64,
}

/// The changes waiting to be checked, and who checks them: the first request that finds no
/// batch being checked takes every change waiting and checks them for all.
#[derive(Default)]
pub struct Batches {
    queue: Mutex<Queue>,
    changed: Condvar,
}

/// One route change at a time per agent.
#[derive(Default)]
pub struct AgentLocks {
    busy: Mutex<HashSet<String>>,
    freed: Condvar,
}

/// Held while one agent's change is computed, checked and written.
pub struct AgentGuard<'a> {
    locks: &'a AgentLocks,
    agent: String,
}

impl AgentLocks {
    pub fn lock(&self, agent: &str) -> AgentGuard<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        while busy.contains(agent) {
            busy = self.freed.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        busy.insert(agent.to_string());
        AgentGuard {
            locks: self,
            agent: agent.to_string(),
        }
    }
}

impl Drop for AgentGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.locks.busy.lock().unwrap_or_else(|e| e.into_inner());
        busy.remove(&self.agent);
        self.locks.freed.notify_all();
    }
}

impl Api {
    /// What a route change is computed under, besides the agent's lock: with `--git`, the
    /// store's lock (the clone's: it must not move before the change is committed); otherwise
    /// nothing — the change only reads files written atomically, a name another agent claims
    /// meanwhile is caught when the batch is checked, and a registration writing the agent's
    /// fragment meanwhile is kept (the change is made again on it).
    pub fn route_lock(&self) -> Option<MutexGuard<'_, ()>> {
        self.git.is_some().then(|| self.store.lock())
    }

    /// `save` for an agent's route change, checked and written with the route changes other
    /// agents make at the same moment (see the module). The caller holds the agent's lock
    /// (`AgentLocks`) and `store` from `route_lock`. With `--git` each change is its own commit
    /// and push, made under the store's lock.
    #[allow(clippy::too_many_arguments)]
    pub fn save_route(
        &self,
        store: Option<MutexGuard<'_, ()>>,
        caller: &Caller,
        agent: &str,
        fragment: &Fragment,
        model: &Arc<Model>,
        settings: &Settings,
        message: String,
    ) -> Result<Saved, ApiError> {
        if let Some(_store) = store {
            return self.save(caller, agent, fragment, model, settings, message);
        }
        let old = self
            .store
            .read(agent)
            .map_err(|e| ApiError::internal(e.to_string()))?
            .unwrap_or_default();
        let id = {
            let mut queue = self.lock_queue();
            queue.next_id += 1;
            let id = queue.next_id;
            queue.waiting.push(Queued {
                id,
                caller: caller.clone(),
                agent: agent.to_string(),
                old,
                new: fragment.clone(),
                model: model.clone(),
                settings: settings.clone(),
                message,
            });
            id
        };
        let mut queue = self.lock_queue();
        loop {
            if let Some(result) = queue.decided.remove(&id) {
                return result;
            }
            if !queue.leading {
                queue.leading = true;
                let batch = std::mem::take(&mut queue.waiting);
                let ids: Vec<u64> = batch.iter().map(|q| q.id).collect();
                drop(queue);
                let decided = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.check_batch(batch)
                }));
                queue = self.lock_queue();
                match decided {
                    Ok(results) => queue.decided.extend(results),
                    Err(_) => queue.decided.extend(
                        ids.into_iter()
                            .map(|id| (id, Err(ApiError::internal("checking the change failed")))),
                    ),
                }
                queue.leading = false;
                self.batches.changed.notify_all();
                continue;
            }
            queue = self
                .batches
                .changed
                .wait(queue)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        self.batches.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks and writes a batch under the store's lock: together when they all pass, else
    /// each alone in order.
    fn check_batch(&self, batch: Vec<Queued>) -> Vec<(u64, Result<Saved, ApiError>)> {
        let _store = self.store.lock();
        let mut out = Vec::with_capacity(batch.len());
        // Each change made on the agent's fragment as it is now: something that is not a
        // route change (a registration) may have written it since.
        let mut changes = Vec::with_capacity(batch.len());
        for q in batch {
            match self.store.read(&q.agent) {
                Ok(current) => {
                    let current = current.unwrap_or_default();
                    let new = if current == q.old {
                        q.new.clone()
                    } else {
                        q.new.rebased(&q.old, &current)
                    };
                    changes.push((q, current, new));
                }
                Err(e) => out.push((q.id, Err(ApiError::internal(e.to_string())))),
            }
        }
        if changes.len() > 1
            && let Some(saved) = self.check_together(&changes)
        {
            out.extend(saved);
            return out;
        }
        for (q, _, new) in changes {
            let result = self
                .check(
                    &q.caller,
                    &q.agent,
                    &new,
                    &q.model,
                    &q.settings,
                    q.message.clone(),
                )
                .and_then(|saved| self.write(&q.agent, &new, &q.model, saved));
            out.push((q.id, result));
        }
        out
    }

    /// The batch checked as one change: `None` (check each alone) unless the state with all of
    /// them validates whole and every change passes the checks `check` makes — none of them
    /// needing a reload (those are budgeted per agent, and checked alone).
    fn check_together(
        &self,
        changes: &[(Queued, Fragment, Fragment)],
    ) -> Option<Vec<(u64, Result<Saved, ApiError>)>> {
        let root = self.store.root();
        let mut timer = crate::clock::PhaseTimer::new();
        let files: Vec<(PathBuf, Option<String>)> = changes
            .iter()
            .map(|(q, _, new)| (self.store.path(&q.agent), new.text()))
            .collect();
        let replace: Vec<(&Path, Option<&str>)> = files
            .iter()
            .map(|(path, text)| (path.as_path(), text.as_deref()))
            .collect();
        let checked = self.prevalidated.checked();
        let source =
            load::load_path_from(root, &replace, checked.as_deref().map(|c| &c.base)).ok()?;
        timer.lap("load");
        let validation =
            crate::model::validate::validate_from_or_whole(checked.as_deref(), &source);
        let merged = validation.model?;
        timer.lap("validate");
        let model = &changes[0].0.model;
        if crate::plan::MassDelete::between(model, &merged).is_some() {
            return None;
        }
        let diff = self.reload_diff(model, &merged);
        timer.lap("diff");
        for (q, current, new) in changes {
            self.check_own_listeners(&q.agent, new, &merged).ok()?;
            if Self::needs_reload(&diff, &q.agent, current, new) {
                return None;
            }
        }
        timer.lap("each");
        let saved: Vec<Saved> = changes
            .iter()
            .map(|(q, current, _)| {
                Saved::new(&q.caller, q.message.clone(), &q.settings, current.clone())
            })
            .collect();
        // Without commits, the fragments are written together: each file synced, their
        // folder once (a sync per file was most of a burst's write).
        let written: Vec<Result<(), crate::api::store::StoreError>> =
            if saved.iter().all(|s| s.commit().is_none()) {
                let fragments: Vec<(&str, &Fragment)> = changes
                    .iter()
                    .map(|(q, _, new)| (q.agent.as_str(), new))
                    .collect();
                self.store.write_many(&fragments)
            } else {
                changes
                    .iter()
                    .zip(&saved)
                    .map(|((q, _, new), saved)| self.store.write(&q.agent, new, saved.commit()))
                    .collect()
            };
        let mut out = Vec::with_capacity(changes.len());
        let mut all_written = true;
        for (((q, _, _), saved), result) in changes.iter().zip(saved).zip(written) {
            let result = result
                .map(|()| saved)
                .map_err(|e| ApiError::internal(e.to_string()));
            all_written &= result.is_ok();
            out.push((q.id, result));
        }
        if all_written {
            self.prevalidated
                .keep(source, Arc::new(merged), validation.diagnostics);
        }
        timer.lap("write");
        tracing::debug!(changes = changes.len(), phases = %timer, "route changes checked together");
        Some(out)
    }
}
