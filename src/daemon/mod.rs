//! `lunafront daemon`: keeps a target converged with a watched state folder. A thin shell
//! around the same pipeline as `apply`: file changes, the drift timer and HTTP requests all
//! become reconcile requests, served one at a time by the reconcile loop.

pub mod http;
pub mod metrics;
pub mod notify;
pub mod reconcile;
pub mod signals;
pub mod supervise;
pub mod watch;

use crate::model::Target;
use crate::render::RenderOptions;
use crate::target::haproxy;
use reconcile::{Reconciler, Request, Status, Trigger};
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
    let (mut target, _) = reconcile::target_of(&state, &options.target)?;
    // `--spawn` only says who runs HAProxy: the sockets stay where the state puts them, so
    // `plan` and `apply` on the same state speak to the same HAProxy.
    target.spawn |= options.spawn;
    let render_options = RenderOptions::for_target(Some(&Target::Haproxy(target.clone())));
    let config_dir = haproxy::config_dir(&target).to_path_buf();
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&target.state_dir)
            .map_err(|e| format!("cannot create {}: {e}", target.state_dir.display()))?;
    }
    // One daemon per target: a second one would supervise (and reload) the same HAProxy.
    let _lock = lock(&target, &options.target)?;
    // A previous daemon killed in the middle of an apply may have left temporary files.
    haproxy::clean_leftovers(&config_dir);

    let status = Arc::new(Mutex::new(Status {
        target: options.target.clone(),
        state: state.display().to_string(),
        ..Status::default()
    }));
    let metrics = Arc::new(metrics::Metrics::default());
    // Until the first reconcile, the API works from the last applied state.
    let valid_model = Arc::new(Mutex::new(
        crate::target::files::read_recorded(&config_dir)
            .ok()
            .flatten()
            .map(|r| r.model),
    ));
    let (requests, receiver) = mpsc::channel::<Request>();

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
                            target.state_dir.join("api")
                        } else {
                            api_options.data_dir.clone()
                        },
                    },
                    state.clone(),
                    options.target.clone(),
                    target.clone(),
                    RenderOptions::for_target(Some(&Target::Haproxy(target.clone()))),
                    crate::api::Shared {
                        model: valid_model.clone(),
                        requests: requests.clone(),
                        status: status.clone(),
                        daemon_listen,
                    },
                )?,
            ))
        }
        None => None,
    };
    signals.reconcile_with(requests.clone());

    let supervisor = target
        .spawn
        .then(|| supervise::Supervisor::new(target.clone(), metrics.haproxy_restarts.clone()));
    // Whatever way this function returns, the HAProxy it runs (or adopted) is stopped.
    let _stop_haproxy = StopOnExit(supervisor.clone());
    if let Some(supervisor) = &supervisor {
        // Serve the last applied state at once, before looking at the (maybe broken) state.
        match supervisor.start(&target) {
            Ok(pid) => tracing::info!(worker = pid, "HAProxy serves the last applied state"),
            Err(e) => tracing::info!("HAProxy not started yet: {e}"),
        }
    }

    // ACME issuance runs beside the reconcile loop and asks it to install each certificate.
    // Its sender is taken back at shutdown so the loop can end.
    let acme_sender = Arc::new(Mutex::new(Some(requests.clone())));
    let acme = crate::acme::manager::Shared::new(&target.state_dir, &target.runtime_socket, {
        let sender = acme_sender.clone();
        Box::new(move || {
            if let Some(sender) = sender.lock().expect("acme sender").as_ref() {
                let _ = sender.send(Request {
                    trigger: Trigger::Acme,
                    reply: None,
                });
            }
        })
    });
    let acme_thread = crate::acme::manager::spawn(acme.clone());
    let reconciler = Reconciler {
        state: state.clone(),
        target_name: options.target.clone(),
        target: target.clone(),
        options: render_options,
        status: status.clone(),
        metrics: metrics.clone(),
        supervisor: supervisor.clone(),
        valid_model: valid_model.clone(),
        after_reconcile: options.after_reconcile,
        acme: Some(acme.clone()),
        holding: None,
        last_reload: None,
        for_api: false,
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
            ignore: [config_dir.clone(), target.state_dir.join("history")]
                .into_iter()
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

    let app = http::AppState {
        status,
        metrics,
        requests: Arc::new(Mutex::new(requests)),
        target: Arc::new(target),
        acme: Some(acme.clone()),
    };
    let served = runtime.block_on(serve(listener, app, api, signals.shutdown()));

    tracing::info!("shutting down");
    signals.stop_reconciling();
    if let Some(supervisor) = &supervisor {
        supervisor.begin_stop();
    }
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    acme.stop();
    acme_sender.lock().expect("acme sender").take();
    let _ = acme_thread.join();
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
fn lock(target: &crate::model::HaproxyTarget, name: &str) -> Result<std::fs::File, String> {
    let path = target.state_dir.join("daemon.lock");
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
    let result = axum::serve(listener, http::router(app))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| e.to_string());
    let _ = stop_tx.send(true);
    if let Some(task) = api_task {
        let _ = task.await;
    }
    result
}
