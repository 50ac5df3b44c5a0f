//! `lunafront daemon`: keeps a target converged with a watched state folder. A thin shell
//! around the same pipeline as `apply`: file changes, the drift timer and HTTP requests all
//! become reconcile requests, served one at a time by the reconcile loop.

pub mod http;
pub mod metrics;
pub mod reconcile;
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
    let state = std::path::absolute(&options.state).map_err(|e| e.to_string())?;
    let (mut target, _) = reconcile::target_of(&state, &options.target)?;
    if options.spawn && !target.spawn {
        target.spawn = true;
        // A spawned HAProxy keeps its sockets in the state folder unless the state says otherwise.
        if target.master_socket == Path::new("/run/haproxy-master.sock") {
            target.master_socket = target.state_dir.join("master.sock");
        }
        if target.runtime_socket == Path::new("/run/haproxy/admin.sock") {
            target.runtime_socket = target.state_dir.join("admin.sock");
        }
    }
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
    // A previous daemon killed in the middle of an apply may have left temporary files.
    haproxy::clean_leftovers(&config_dir);

    let supervisor = target
        .spawn
        .then(|| supervise::Supervisor::new(target.clone()));
    if let Some(supervisor) = &supervisor {
        // Serve the last applied state at once, before looking at the (maybe broken) state.
        match supervisor.start(&target) {
            Ok(pid) => tracing::info!(worker = pid, "HAProxy serves the last applied state"),
            Err(e) => tracing::info!("HAProxy not started yet: {e}"),
        }
    }

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

    let api = match &options.api {
        Some(api_options) => Some((
            api_options.listen,
            crate::api::build(
                &crate::api::ApiOptions {
                    listen: api_options.listen,
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
                },
            )?,
        )),
        None => None,
    };
    let app = http::AppState {
        status,
        metrics,
        requests: Arc::new(Mutex::new(requests)),
        target: Arc::new(target),
        acme: Some(acme.clone()),
    };
    let served = serve(options.listen, app, api);

    tracing::info!("shutting down");
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
    if let Some(supervisor) = supervisor {
        supervisor.stop(Duration::from_secs(10));
    }
    if let Some(t) = supervisor_thread {
        let _ = t.join();
    }
    served
}

/// Serves HTTP until SIGTERM or SIGINT.
/// Serves HTTP (and the API, when asked) until SIGTERM or SIGINT.
fn serve(
    listen: SocketAddr,
    app: http::AppState,
    api: Option<(SocketAddr, crate::api::AppState)>,
) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        tracing::info!("listening on http://{listen}");
        eprintln!(
            "lunafront daemon: listening on http://{listen} (health, status, metrics, reconcile)"
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let api_task = match api {
            Some((api_listen, api_state)) => {
                let api_listener = tokio::net::TcpListener::bind(api_listen)
                    .await
                    .map_err(|e| format!("cannot listen on {api_listen}: {e}"))?;
                eprintln!("lunafront daemon: API on http://{api_listen}");
                let mut stop = stop_rx.clone();
                Some(tokio::spawn(crate::api::serve(
                    api_listener,
                    crate::api::router(api_state),
                    async move {
                        let _ = stop.changed().await;
                    },
                )))
            }
            None => None,
        };
        let result = axum::serve(listener, http::router(app))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|e| e.to_string());
        let _ = stop_tx.send(true);
        if let Some(task) = api_task {
            let _ = task.await;
        }
        result
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
