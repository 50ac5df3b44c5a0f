//! The daemon driving a `dataplane` target or a group (`--target edge`): each reconcile plans
//! every member and, when one has changes, rolls them out through the same rollout as `apply`
//! (`target::fleet::roll_out`: the canary first and its health check, then the rest). A local
//! HAProxy of a group is applied as `apply` applies it (started when `spawn: true`); only a
//! daemon driving one `haproxy` target supervises its HAProxy as a child.

use super::reconcile::{Outcome, PendingPlan, Reconciler, Revision, Trigger};
use crate::model::{Model, Target};
use crate::target::fleet::{self, Prepared, RollOutcome};
use crate::target::history::History;
use crate::target::{ApplyError, How};
use serde::Serialize;
use std::sync::atomic::Ordering;

/// A fleet the daemon drives.
pub struct Fleet {
    /// What `--target` named (a target or a group): resolved again from each state.
    pub name: String,
    /// Targets applied at a time after the canary.
    pub parallel: usize,
    /// The members when the daemon started (it holds their daemon locks).
    pub members: Vec<(String, Target)>,
    /// The git commit of the state every member was last brought to.
    pub applied_commit: Option<String>,
}

/// One member in `/status` (`"targets"`).
#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    pub target: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// applied, unchanged, failed, rolled_back, rollback_failed, unhealthy, not_applied
    pub result: &'static str,
    /// The revision it holds after the reconcile, when known.
    pub revision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub how: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Fleet {
    /// What the canary holds (its last history entry) and the commit the fleet was brought to.
    pub fn revision(&self) -> Revision {
        let last = self.members.first().and_then(|(_, t)| {
            History::new(crate::target::state_dir(t))
                .list()
                .ok()
                .and_then(|l| l.last().cloned())
        });
        Revision {
            history_entry: last.as_ref().map(|e| e.seq),
            applied_at: last.as_ref().map(|e| e.time.clone()),
            state_sha256: None,
            git_commit: self
                .applied_commit
                .clone()
                .or_else(|| last.and_then(|e| e.git_commit)),
        }
    }
}

fn kind(target: &Target) -> &'static str {
    match target {
        Target::Haproxy(_) => "haproxy",
        Target::Dataplane(_) => "dataplane",
    }
}

impl Reconciler {
    /// Plans every member of the fleet and rolls the changes out.
    pub(super) fn reconcile_fleet(
        &mut self,
        trigger: Trigger,
        model: &Model,
        git_commit: Option<String>,
    ) -> Outcome {
        let super::reconcile::Drive::Fleet(fleet) = &self.drive else {
            unreachable!("reconcile_fleet drives a fleet");
        };
        let (name, parallel) = (fleet.name.clone(), fleet.parallel);
        let fail = |result, message: String| {
            let mut o = Self::outcome(trigger, result);
            o.message = Some(message);
            o
        };
        let members = match fleet::resolve(model, std::slice::from_ref(&name)) {
            Ok(m) => m,
            Err(e) => return fail("failed", e.to_string()),
        };
        let mut prepared: Vec<Prepared> = Vec::new();
        for (member, target) in members {
            match fleet::prepare(model, &member, target) {
                Ok(mut p) => {
                    p.git_commit = git_commit.clone();
                    prepared.push(p);
                }
                Err(e) => {
                    return fail(
                        "failed",
                        format!("target {member}: {e}; nothing was changed on any target"),
                    );
                }
            }
        }
        self.metrics
            .domains
            .store(model.domains.len() as u64, Ordering::Relaxed);
        self.status.lock().expect("status").pending_plan = prepared
            .iter()
            .find(|p| !p.plan.is_empty())
            .map(|p| PendingPlan {
                changes: p.plan.changes.clone(),
                reload_required: p.plan.reload_required(),
            });
        let changes: Vec<String> = prepared
            .iter()
            .flat_map(|p| {
                p.plan
                    .changes
                    .iter()
                    .map(move |c| format!("{}: {}", p.name, c.summary()))
            })
            .collect();
        match prepared.iter().find_map(|p| p.plan.mass_delete.clone()) {
            Some(mass) => {
                if let Some(held) = self.hold(model, &mass) {
                    let mut o = Self::outcome(trigger, "held");
                    o.message = Some(held);
                    o.changes = changes;
                    return o;
                }
            }
            None => self.release_hold(),
        }
        let revision = fleet::revision_of(model.document_text().json());
        let pending = prepared
            .iter()
            .any(|p| !p.plan.is_empty() || fleet::must_start(&p.target));
        if !pending {
            let statuses = prepared
                .iter()
                .map(|p| MemberStatus {
                    target: p.name.clone(),
                    kind: kind(&p.target),
                    result: "unchanged",
                    revision: p.before.clone(),
                    how: None,
                    error: None,
                })
                .collect();
            self.set_fleet_result(statuses, git_commit);
            return Self::outcome(trigger, "unchanged");
        }
        let started = std::time::Instant::now();
        let outcomes = fleet::roll_out(&prepared, parallel, &|_| {});
        self.metrics.observe_apply(started.elapsed().as_secs_f64());
        let mut statuses = Vec::new();
        let mut failure: Option<(&'static str, String)> = None;
        let mut how = None;
        for (p, outcome) in prepared.iter().zip(&outcomes) {
            let (result, held, applied_how, error) = match outcome {
                RollOutcome::Applied(applied) => {
                    match applied.how {
                        How::Runtime { commands } => {
                            self.metrics.runtime_updates.fetch_add(1, Ordering::Relaxed);
                            self.metrics
                                .runtime_commands
                                .fetch_add(commands as u64, Ordering::Relaxed);
                        }
                        How::Reloaded { .. } | How::RemoteReload { .. } => {
                            self.metrics.reloads.fetch_add(1, Ordering::Relaxed);
                        }
                        How::Started { .. } | How::Unchanged => {}
                    }
                    how.get_or_insert(applied.how.label());
                    let result = if applied.how == How::Unchanged {
                        "unchanged"
                    } else {
                        "applied"
                    };
                    (
                        result,
                        Some(revision.clone()),
                        Some(applied.how.label()),
                        None,
                    )
                }
                RollOutcome::Failed(e) => {
                    let (result, held) = match e {
                        ApplyError::RolledBack { .. } => ("rolled_back", p.before.clone()),
                        ApplyError::RollbackFailed { .. } => ("rollback_failed", None),
                        _ => ("failed", p.before.clone()),
                    };
                    failure.get_or_insert((
                        if result == "rolled_back" {
                            "rolled_back"
                        } else {
                            "failed"
                        },
                        e.to_string(),
                    ));
                    (result, held, None, Some(e.to_string()))
                }
                RollOutcome::Unhealthy(e) => {
                    let message =
                        format!("canary {}: {e}; the rollout stopped at the canary", p.name);
                    failure.get_or_insert(("failed", message.clone()));
                    ("unhealthy", Some(revision.clone()), None, Some(e.clone()))
                }
                RollOutcome::NotStarted => ("not_applied", p.before.clone(), None, None),
            };
            statuses.push(MemberStatus {
                target: p.name.clone(),
                kind: kind(&p.target),
                result,
                revision: held,
                how: applied_how,
                error,
            });
        }
        let mut o = match failure {
            Some((result, message)) => {
                self.set_fleet_result(statuses, None);
                fail(
                    result,
                    format!("{message}; targets not applied keep what they served"),
                )
            }
            None => {
                self.set_fleet_result(statuses, git_commit);
                let mut o = Self::outcome(trigger, "applied");
                o.how = how;
                o
            }
        };
        o.changes = changes;
        o
    }

    /// Records what each member holds, for /status with this reconcile's outcome
    /// (`Reconciler::fleet_targets`); `commit` (when every member has it) is the commit the
    /// fleet now runs.
    fn set_fleet_result(&mut self, statuses: Vec<MemberStatus>, commit: Option<String>) {
        if let super::reconcile::Drive::Fleet(fleet) = &mut self.drive
            && commit.is_some()
        {
            fleet.applied_commit = commit;
        }
        self.fleet_targets = Some(statuses);
    }
}
