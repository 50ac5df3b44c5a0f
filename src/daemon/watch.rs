//! Watching the state folder (I/O edge): file-system notifications, plus a polling fallback for
//! the events notifications miss, then a debounce: a reconcile is asked for once the folder has
//! been quiet for `quiet`, and never later than `cap` after the first event, so an editor's
//! atomic save or a `git pull` rewriting many files becomes one reconcile.

use super::reconcile::{Request, Trigger};
use notify::{RecursiveMode, Watcher};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

pub struct WatchOptions {
    /// The folder to watch (the state folder, or the folder of a state file).
    pub root: PathBuf,
    /// Folders under `root` whose changes are not the state's (the target's own files).
    pub ignore: Vec<PathBuf>,
    pub quiet: Duration,
    pub cap: Duration,
    pub poll: Duration,
    /// Counts the polls (`lunafront_watch_polls_total`).
    pub polls: Arc<std::sync::atomic::AtomicU64>,
}

/// Whether a change at `path` can change the state: YAML files and certificates, outside
/// hidden folders (`.git`) and ignored ones.
fn relevant(path: &Path, options: &WatchOptions) -> bool {
    if options.ignore.iter().any(|i| path.starts_with(i)) {
        return false;
    }
    let Ok(rel) = path.strip_prefix(&options.root) else {
        return false;
    };
    if rel
        .components()
        .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
    {
        return false;
    }
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "pem")
    )
}

/// (path → size and modification time) of every relevant file: what polling compares.
/// Folders are followed through symlinks as the loader follows them, each folder once (by
/// device and inode): a symlink loop adds nothing, so the walk and its result stay as small as
/// the folder's real content whatever links it holds.
fn snapshot(options: &WatchOptions) -> BTreeMap<PathBuf, (u64, Option<SystemTime>)> {
    type Seen = std::collections::HashSet<(u64, u64)>;
    fn walk(
        dir: &Path,
        options: &WatchOptions,
        seen: &mut Seen,
        out: &mut BTreeMap<PathBuf, (u64, Option<SystemTime>)>,
    ) {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(dir) {
            Ok(meta) if seen.insert((meta.dev(), meta.ino())) => {}
            _ => return,
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                let hidden = entry.file_name().to_string_lossy().starts_with('.');
                if !hidden && !options.ignore.iter().any(|i| path.starts_with(i)) {
                    walk(&path, options, seen, out);
                }
            } else if relevant(&path, options) {
                out.insert(path, (meta.len(), meta.modified().ok()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&options.root, options, &mut Seen::new(), &mut out);
    out
}

/// Starts watching; stops when `stop` is set. Returns the threads to join.
pub fn spawn(
    options: WatchOptions,
    requests: Sender<Request>,
    stop: Arc<AtomicBool>,
) -> Vec<JoinHandle<()>> {
    let options = Arc::new(options);
    let (events, changes) = mpsc::channel::<()>();
    let mut threads = Vec::new();

    // Notifications. When they cannot be set up, polling alone still works.
    // Set by a notification, cleared by each poll: what notifications reported, polling does
    // not report again (a second reconcile of the same change would delay the next one).
    let notified = Arc::new(AtomicBool::new(false));
    let watcher = {
        let events = events.clone();
        let notified = notified.clone();
        let options = options.clone();
        let handler = move |result: notify::Result<notify::Event>| {
            // Reads (our own loading of the state) are events too, and so is the access time
            // a read updates right after a save: only changes of content or names count.
            if let Ok(event) = result
                && !matches!(
                    event.kind,
                    notify::EventKind::Access(_)
                        | notify::EventKind::Modify(notify::event::ModifyKind::Metadata(_))
                        | notify::EventKind::Other
                )
                && event.paths.iter().any(|p| relevant(p, &options))
            {
                notified.store(true, Ordering::SeqCst);
                let _ = events.send(());
            }
        };
        // Notifications do not follow symlinks (a loop would add watches without end);
        // polling sees what changes behind one.
        notify::RecommendedWatcher::new(
            handler,
            notify::Config::default().with_follow_symlinks(false),
        )
    };
    let watcher = match watcher {
        Ok(mut watcher) => match watcher.watch(&options.root, RecursiveMode::Recursive) {
            Ok(()) => Some(watcher),
            Err(e) => {
                tracing::warn!("cannot watch {}: {e}; polling only", options.root.display());
                None
            }
        },
        Err(e) => {
            tracing::warn!("file notifications unavailable: {e}; polling only");
            None
        }
    };

    // Polling fallback: catches what notifications miss (network file systems, overflows).
    {
        let options = options.clone();
        let stop = stop.clone();
        let notified = notified.clone();
        threads.push(std::thread::spawn(move || {
            let mut last = snapshot(&options);
            let mut due = Instant::now() + options.poll;
            while !stop.load(Ordering::SeqCst) {
                // Wake often enough to notice `stop`; poll at the configured pace.
                std::thread::sleep(options.poll.min(Duration::from_millis(200)));
                if Instant::now() < due {
                    continue;
                }
                due = Instant::now() + options.poll;
                let now = snapshot(&options);
                options.polls.fetch_add(1, Ordering::Relaxed);
                let seen_by_notify = notified.swap(false, Ordering::SeqCst);
                if now != last {
                    last = now;
                    // The reconcile a notification triggered reads every file anyway; one it
                    // missed while reporting another is found by the timer's reconcile.
                    if !seen_by_notify {
                        let _ = events.send(());
                    }
                }
            }
        }));
    }

    // Debounce.
    {
        let options = options.clone();
        threads.push(std::thread::spawn(move || {
            let _watcher = watcher; // lives as long as this thread
            while !stop.load(Ordering::SeqCst) {
                match changes.recv_timeout(Duration::from_millis(200)) {
                    Ok(()) => {}
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
                let first = Instant::now();
                loop {
                    let left = options.cap.saturating_sub(first.elapsed());
                    if left.is_zero() {
                        break;
                    }
                    match changes.recv_timeout(options.quiet.min(left)) {
                        Ok(()) => continue,
                        Err(_) => break,
                    }
                }
                if requests
                    .send(Request {
                        trigger: Trigger::Files,
                        reply: None,
                    })
                    .is_err()
                {
                    break;
                }
            }
        }));
    }
    threads
}
