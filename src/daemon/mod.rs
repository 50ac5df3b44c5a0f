//! `lunafront daemon`: keeps a target converged with a watched state folder. A thin shell
//! around the same pipeline as `apply`: file changes, the drift timer, new commits of a git
//! remote (`--git`) and HTTP requests all become reconcile requests, served one at a time by
//! the reconcile loop.

pub mod fleet;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod reconcile;
pub mod signals;
pub mod status_page;
pub mod supervise;
pub mod watch;

use crate::model::Target;
use crate::render::RenderOptions;
use crate::target::haproxy;
use reconcile::{Drive, Reconciler, Request, Status, Targets, Trigger};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

pub struct DaemonOptions {
    pub state: PathBuf,
    pub target: String,
    pub listen: SocketAddr,
    /// Run HAProxy as a child even if the target does not say `spawn: true`.
    pub spawn: bool,
    /// How often to look for drift (hand edits of the files or the runtime state).
    pub interval: Duration,
    pub debounce_quiet: Duration,
    pub debounce_cap: Duration,
    /// Serve the agent registration and admin API.
    pub api: Option<crate::api::ApiOptions>,
    /// Called after every reconcile, once its transient data is dropped: the binary hands
    /// its allocator's memory back to the system here, so an idle daemon stays small.
    pub after_reconcile: Option<fn()>,
    /// Follow a git remote: the state folder is a clone the daemon manages.
    pub git: Option<crate::git::GitOptions>,
    /// With a group: targets applied at a time after the canary.
    pub parallel: usize,
}

pub fn run(options: DaemonOptions) -> Result<(), String> {
    // A long-running process: each reload re-parses only the state files that changed.
    crate::spec::load::keep_parsed();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    // Signals are caught from the very start: one that arrives while HAProxy starts must
    // neither kill the daemon silently nor leave HAProxy behind.
    let signals = {
        let _context = runtime.enter();
        signals::Signals::install()?
    };
    let result = run_with(options, &runtime, &signals);
    // Ends every task (the signal task holds a sender of the reconcile loop's channel).
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

fn run_with(
    options: DaemonOptions,
    runtime: &tokio::runtime::Runtime,
    signals: &signals::Signals,
) -> Result<(), String> {
    let state = std::path::absolute(&options.state).map_err(|e| e.to_string())?;
    // With --git the state folder is a clone: cloned first (the targets are in it), or kept
    // as it is when the remote cannot be reached (it holds the last good commit).
    let repo = match &options.git {
        Some(git) => {
            if git.allowed_signers.is_some() && options.api.is_some() && git.signing_key.is_none() {
                return Err("--require-signed with --api needs --git-signing-key: the commits the API makes must be signed too, or the other nodes refuse them".into());
            }
            Some(Arc::new(
                crate::git::Repo::open_or_clone(&state, git.clone()).map_err(|e| e.to_string())?,
            ))
        }
        None => None,
    };
    let (drive, local) = match reconcile::targets_of(&state, &options.target)? {
        Targets::Local(mut target) => {
            // `--spawn` only says who runs HAProxy: the sockets stay where the state puts
            // them, so `plan` and `apply` on the same state speak to the same HAProxy.
            target.spawn |= options.spawn;
            (Drive::Local(target.clone()), Some(target))
        }
        Targets::Fleet(members) => {
            if options.spawn {
                return Err(format!(
                    "--spawn runs the HAProxy of one haproxy target; `{}` is driven as a fleet (a target with `spawn: true` in it is started as `apply` starts it)",
                    options.target
                ));
            }
            (
                Drive::Fleet(fleet::Fleet {
                    name: options.target.clone(),
                    parallel: options.parallel.max(1),
                    members,
                    applied_commit: None,
                }),
                None,
            )
        }
    };
    // The targets whose daemon lock this daemon holds (and whose state folders it uses).
    let driven: Vec<(String, Target)> = match &drive {
        Drive::Local(t) => vec![(options.target.clone(), Target::Haproxy(t.clone()))],
        Drive::Fleet(f) => f.members.clone(),
    };
    // The API (and its own-listener rule) speaks for the local target, or a fleet's canary.
    let api_target = driven[0].1.clone();
    let render_options = RenderOptions::for_target(Some(&api_target));
    let mut locks = Vec::new();
    for (name, target) in &driven {
        let state_dir = crate::target::state_dir(target);
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|e| format!("cannot create {}: {e}", state_dir.display()))?;
        // One daemon per target: a second one would supervise (and reload) the same HAProxy.
        locks.push(lock(state_dir, name)?);
    }
    if let Some(target) = &local {
        // A previous daemon killed in the middle of an apply may have left temporary files.
        haproxy::clean_leftovers(haproxy::config_dir(target));
    }

    let status = Arc::new(Mutex::new(Status {
        target: options.target.clone(),
        state: state.display().to_string(),
        ..Status::default()
    }));
    let metrics = Arc::new(metrics::Metrics::default());
    let git_metrics = repo.as_ref().map(|repo| {
        let _ = metrics.git.set(repo.metrics.clone());
        repo.metrics.clone()
    });
    // Until the first reconcile, the API works from the last applied state.
    let valid_model = Arc::new(Mutex::new(local.as_ref().and_then(|target| {
        crate::target::files::read_recorded(haproxy::config_dir(target))
            .ok()
            .flatten()
            .map(|r| r.model)
    })));
    let (requests, receiver) = mpsc::channel::<Request>();
    let prevalidated = reconcile::Prevalidated::default();
    // Whoever writes into the state folder holds this while the reconcile reads it: the API's
    // store (a batch of agents' fragments is read whole or not at all) and, with git, whoever
    // moves the clone.
    let state_lock = repo
        .as_ref()
        .map(|r| r.state_lock.clone())
        .unwrap_or_default();

    // Everything that can refuse to start does so before HAProxy is started: the listeners
    // are bound and the API is built first.
    let bind = |addr: SocketAddr| {
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let _context = runtime.enter();
        tokio::net::TcpListener::from_std(listener).map_err(|e| format!("{addr}: {e}"))
    };
    let listener = bind(options.listen)?;
    // The addresses actually bound (a port 0 becomes the one the kernel chose): the API never
    // lets a route point at them.
    let daemon_listen = listener.local_addr().unwrap_or(options.listen);
    let api = match &options.api {
        Some(api_options) => {
            let api_listener = bind(api_options.listen)?;
            let api_listen = api_listener.local_addr().unwrap_or(api_options.listen);
            Some((
                api_listener,
                crate::api::build(
                    &crate::api::ApiOptions {
                        listen: api_listen,
                        admin_token_file: api_options.admin_token_file.clone(),
                        data_dir: if api_options.data_dir.as_os_str().is_empty() {
                            crate::target::state_dir(&api_target).join("api")
                        } else {
                            api_options.data_dir.clone()
                        },
                    },
                    state.clone(),
                    driven[0].0.clone(),
                    api_target.clone(),
                    render_options.clone(),
                    crate::api::Shared {
                        model: valid_model.clone(),
                        requests: requests.clone(),
                        status: status.clone(),
                        daemon_listen,
                        git: repo.clone(),
                        prevalidated: prevalidated.clone(),
                        state_lock: state_lock.clone(),
                    },
                )?,
            ))
        }
        None => None,
    };
    signals.reconcile_with(requests.clone());

    let supervisor = local
        .as_ref()
        .filter(|t| t.spawn)
        .map(|target| supervise::Supervisor::new(target.clone(), metrics.haproxy_restarts.clone()));
    // Whatever way this function returns, the HAProxy it runs (or adopted) is stopped.
    let _stop_haproxy = StopOnExit(supervisor.clone());
    if let (Some(supervisor), Some(target)) = (&supervisor, &local) {
        // Serve the last applied state at once, before looking at the (maybe broken) state.
        match supervisor.start(target) {
            Ok(pid) => tracing::info!(worker = pid, "HAProxy serves the last applied state"),
            Err(e) => tracing::info!("HAProxy not started yet: {e}"),
        }
    }

    // ACME issuance runs beside the reconcile loop and asks it to install each certificate
    // (a local haproxy target's: a fleet's members get none). Its sender is taken back at
    // shutdown so the loop can end.
    let acme_sender = Arc::new(Mutex::new(Some(requests.clone())));
    let acme = local.as_ref().map(|target| {
        let (install, apply) = (acme_sender.clone(), acme_sender.clone());
        crate::acme::manager::Shared::new(
            &target.state_dir,
            Box::new(move || {
                if let Some(sender) = install.lock().expect("acme sender").as_ref() {
                    let _ = sender.send(Request {
                        trigger: Trigger::Acme,
                        reply: None,
                    });
                }
            }),
            Box::new(move || {
                let sender = apply.lock().expect("acme sender").clone();
                let outcome = sender
                    .and_then(|sender| reconcile::request_blocking(&sender, Trigger::Acme))
                    .ok_or("the daemon is stopping")?;
                match outcome.ok() {
                    true => Ok(()),
                    false => Err(outcome
                        .message
                        .unwrap_or_else(|| format!("the reconcile {}", outcome.result))),
                }
            }),
        )
    });
    let acme_thread = acme.clone().map(crate::acme::manager::spawn);
    let reconciler = Reconciler {
        state: state.clone(),
        target_name: options.target.clone(),
        drive,
        options: render_options,
        status: status.clone(),
        metrics: metrics.clone(),
        supervisor: supervisor.clone(),
        valid_model: valid_model.clone(),
        after_reconcile: options.after_reconcile,
        acme: acme.clone(),
        holding: None,
        last_reload: None,
        for_api: false,
        state_lock,
        last_converged: None,
        file_events_only: false,
        prevalidated,
        fleet_targets: None,
    };
    let reconcile_thread = std::thread::spawn(move || reconciler.run(receiver));
    let stop = Arc::new(AtomicBool::new(false));

    let root = if state.is_dir() {
        state.clone()
    } else {
        state.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let mut threads = watch::spawn(
        watch::WatchOptions {
            root: root.clone(),
            // lunafront's own writes (rendered certificates, the history's copies) are not
            // changes of the state; a folder holding the state itself is never ignored.
            ignore: driven
                .iter()
                .flat_map(|(_, t)| {
                    let history = crate::target::state_dir(t).join("history");
                    match t {
                        Target::Haproxy(h) => vec![haproxy::config_dir(h).to_path_buf(), history],
                        Target::Dataplane(_) => vec![history],
                    }
                })
                .filter(|dir| !root.starts_with(dir))
                .collect(),
            quiet: options.debounce_quiet,
            cap: options.debounce_cap,
            poll: Duration::from_secs(1),
            polls: metrics.watch_polls.clone(),
        },
        requests.clone(),
        stop.clone(),
    );
    {
        let requests = requests.clone();
        let stop = stop.clone();
        let interval = options.interval;
        threads.push(std::thread::spawn(move || {
            let mut next = std::time::Instant::now() + interval;
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
                if std::time::Instant::now() >= next {
                    next = std::time::Instant::now() + interval;
                    let _ = requests.send(Request {
                        trigger: Trigger::Timer,
                        reply: None,
                    });
                }
            }
        }));
    }
    let supervisor_thread = supervisor.clone().map(|s| s.watch());
    let _ = requests.send(Request {
        trigger: Trigger::Start,
        reply: None,
    });
    // The git remote is followed by a thread of its own: a fetch (up to its timeout) never
    // holds up a reconcile.
    let (git, git_reconcile) = match (&repo, git_metrics) {
        (Some(repo), Some(git_metrics)) => {
            let (asks, receiver) = mpsc::channel();
            let syncer = crate::git::sync::Syncer::new(
                repo.clone(),
                status.clone(),
                requests.clone(),
                git_metrics,
            );
            let reconcile = syncer.reconcile.clone();
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || syncer.run(receiver, stop)));
            (
                Some(Arc::new(http::GitHook::new(
                    asks,
                    repo.options.hook_secret.clone(),
                ))),
                Some(reconcile),
            )
        }
        _ => (None, None),
    };

    let app = http::AppState {
        status,
        metrics,
        requests: Arc::new(Mutex::new(requests)),
        target: local.map(Arc::new),
        git,
        acme: acme.clone(),
    };
    let served = runtime.block_on(serve(listener, app, api, signals.shutdown()));

    tracing::info!("shutting down");
    signals.stop_reconciling();
    if let Some(supervisor) = &supervisor {
        supervisor.begin_stop();
    }
    stop.store(true, Ordering::SeqCst);
    // A fetch under way may take up to its timeout: the reconcile loop does not wait for it.
    if let Some(reconcile) = git_reconcile {
        reconcile.lock().expect("git").take();
    }
    for t in threads {
        let _ = t.join();
    }
    if let Some(acme) = &acme {
        acme.stop();
    }
    acme_sender.lock().expect("acme sender").take();
    if let Some(t) = acme_thread {
        let _ = t.join();
    }
    // The last sender is gone with the HTTP state: the loop ends after its current reconcile.
    let _ = reconcile_thread.join();
    if let Some(supervisor) = &supervisor {
        supervisor.stop(Duration::from_secs(10));
    }
    if let Some(t) = supervisor_thread {
        let _ = t.join();
    }
    served
}

/// Holds the target's daemon lock (`<state_dir>/daemon.lock`) for the daemon's life. Not
/// inherited by HAProxy (the file is opened close-on-exec), so a daemon started after this one
/// died gets it even while the HAProxy it ran still serves.
fn lock(state_dir: &Path, name: &str) -> Result<std::fs::File, String> {
    let path = state_dir.join("daemon.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "another lunafront daemon drives target {name} (it holds {}); stop it first: two daemons would start, reload and stop the same HAProxy",
            path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(format!("cannot lock {}: {e}", path.display())),
    }
}

/// Stops the supervised HAProxy when dropped: a daemon that returns early (say, a listen
/// address in use) leaves no HAProxy it started or adopted behind.
struct StopOnExit(Option<Arc<supervise::Supervisor>>);

impl Drop for StopOnExit {
    fn drop(&mut self) {
        if let Some(supervisor) = &self.0 {
            supervisor.stop(Duration::from_secs(10));
        }
    }
}

/// Serves HTTP (and the API, when asked) until `shutdown` (SIGTERM or SIGINT).
async fn serve(
    listener: tokio::net::TcpListener,
    app: http::AppState,
    api: Option<(tokio::net::TcpListener, crate::api::AppState)>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let listen = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(
        "listening on http://{listen} (health, ready, status, metrics, reconcile, approve)"
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let api_task = match api {
        Some((api_listener, api_state)) => {
            if let Ok(api_listen) = api_listener.local_addr() {
                tracing::info!("API on http://{api_listen}");
            }
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(crate::api::serve(
                api_listener,
                api_state,
                async move {
                    let _ = stop.changed().await;
                },
            )))
        }
        None => None,
    };
    let result = axum::serve(
        listener,
        http::router(app).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .map_err(|e| e.to_string());
    let _ = stop_tx.send(true);
    if let Some(task) = api_task {
        let _ = task.await;
    }
    result
}
