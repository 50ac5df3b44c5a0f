//! The git edge of a fleet (`lunafront daemon --git URL`): the state folder is a clone this
//! module manages through the `git` command — clone, fetch, move forward, commit and push —
//! every command bounded by a timeout. It decides nothing about the state: `sync` gates a
//! fetched commit (fast-forward, signature, validation) and hands it to the reconcile loop like
//! a file change; the API commits and pushes its changes here (`api::ops`). Credentials in a URL
//! never leave this module: the URL reaches git through its environment (`GIT_CONFIG_*`, as the
//! remote `lunafront`), never on a command line (which every local user can read) nor in the
//! clone's configuration, and every message it returns is redacted.

pub mod hook;
pub mod sync;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How a daemon follows its repository (the `--git*` flags).
#[derive(Debug, Clone)]
pub struct GitOptions {
    /// The remote (any URL git takes; a password in it is never shown).
    pub url: String,
    pub branch: String,
    /// How often to fetch.
    pub interval: Duration,
    /// An SSH private key for the remote (through `GIT_SSH_COMMAND`).
    pub key: Option<PathBuf>,
    /// Follow a rewritten (force-pushed) branch instead of refusing it.
    pub allow_rewrite: bool,
    /// Accept only commits signed by a key of this allowed-signers file (`ssh-keygen`'s
    /// format, git's `gpg.ssh.allowedSignersFile`).
    pub allowed_signers: Option<PathBuf>,
    /// The SSH key the API signs its commits with (needed with `allowed_signers`).
    pub signing_key: Option<PathBuf>,
    /// The shared secret of `POST /hooks/git` (none: the hook is off).
    pub hook_secret: Option<String>,
    /// Longest a git command may take (a remote that hangs must not hold the daemon).
    pub timeout: Duration,
}

impl GitOptions {
    pub fn new(url: impl Into<String>) -> GitOptions {
        GitOptions {
            url: url.into(),
            branch: "main".into(),
            interval: Duration::from_secs(10),
            key: None,
            allow_rewrite: false,
            allowed_signers: None,
            signing_key: None,
            hook_secret: None,
            timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("git {what}: did not finish within {}s; stopped", timeout.as_secs())]
    Timeout { what: String, timeout: Duration },
    #[error("git {what}: {detail}")]
    Failed { what: String, detail: String },
    #[error("cannot run git ({0}); install git")]
    Spawn(String),
    /// The remote holds commits this clone does not (another node pushed first).
    #[error("git push: rejected, the remote branch moved (another node pushed first)")]
    Rejected,
    #[error(
        "{} exists and is not a git clone: point the state at an empty or missing folder, which the daemon clones into",
        .0.display()
    )]
    NotAClone(PathBuf),
}

/// A clone of the fleet's repository. Commands that touch the network are one at a time
/// (`net`); whoever moves the working tree or writes into it holds `state_lock`, which the
/// reconcile loop holds while it reads the state and the API while it writes and commits.
pub struct Repo {
    pub dir: PathBuf,
    pub options: GitOptions,
    net: Mutex<()>,
    pub state_lock: Arc<Mutex<()>>,
    /// Fetches, pushes and refusals, for `/metrics`.
    pub metrics: Arc<sync::GitMetrics>,
}

/// The remote's name, defined only in each command's environment (see the module's comment).
const REMOTE: &str = "lunafront";

/// The identity of commits lunafront makes; the author is the agent or the admin.
const COMMITTER: (&str, &str) = ("lunafront", "lunafront@localhost");

impl Repo {
    /// Opens the clone in `dir`, or clones the remote into it (a missing or empty folder).
    /// An existing clone is kept when the remote cannot be reached: it holds the last good
    /// commit, which the daemon serves until the remote answers again.
    pub fn open_or_clone(dir: &Path, options: GitOptions) -> Result<Repo, GitError> {
        let repo = Repo {
            dir: dir.to_path_buf(),
            options,
            net: Mutex::new(()),
            state_lock: Arc::new(Mutex::new(())),
            metrics: Arc::default(),
        };
        let empty = match std::fs::read_dir(dir) {
            Ok(mut entries) => entries.next().is_none(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => {
                return Err(GitError::Failed {
                    what: "clone".into(),
                    detail: format!("{}: {e}", dir.display()),
                });
            }
        };
        if empty {
            let existed = dir.exists();
            repo.clone_into()?;
            // With --require-signed, the first commit served is checked like every later one.
            let head = repo.head()?;
            if let Err(why) = repo.verify_signature(&head) {
                let _ = std::fs::remove_dir_all(dir);
                if existed {
                    let _ = std::fs::create_dir(dir);
                }
                return Err(GitError::Failed {
                    what: "clone".into(),
                    detail: format!("{why}; nothing was cloned"),
                });
            }
        } else if !dir.join(".git").is_dir() {
            return Err(GitError::NotAClone(dir.to_path_buf()));
        } else {
            // The remote is named by the environment at each command: a changed URL (or
            // password) takes effect without touching the clone.
            if repo.head().is_err() {
                return Err(GitError::Failed {
                    what: "open".into(),
                    detail: format!(
                        "{} is a git folder without a commit checked out",
                        dir.display()
                    ),
                });
            }
        }
        Ok(repo)
    }

    /// Clones into a folder beside `dir` and renames it into place: an interrupted clone never
    /// leaves a half state behind. A clone is `init`, `fetch` and `reset`: `git clone` would
    /// take the URL on its command line.
    fn clone_into(&self) -> Result<(), GitError> {
        let parent = self.dir.parent().unwrap_or(Path::new("."));
        let fail = |detail: String| GitError::Failed {
            what: "clone".into(),
            detail,
        };
        std::fs::create_dir_all(parent).map_err(|e| fail(format!("{}: {e}", parent.display())))?;
        let name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "state".into());
        let staging = parent.join(format!(".{name}.clone-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        let staging_repo = Repo {
            dir: staging.clone(),
            options: self.options.clone(),
            net: Mutex::new(()),
            state_lock: self.state_lock.clone(),
            metrics: self.metrics.clone(),
        };
        let cloned = (|| {
            let staging_text = staging.to_string_lossy().into_owned();
            self.run(
                None,
                &["init", "--quiet", "-b", &self.options.branch, &staging_text],
                "clone",
            )?;
            let head = staging_repo.fetch().map_err(|e| match e {
                GitError::Failed { detail, .. } => fail(detail),
                other => other,
            })?;
            staging_repo.move_to(&head)
        })();
        if let Err(e) = cloned {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700));
        }
        if self.dir.exists() {
            // An empty folder (a mount point, or made by the administrator): move the clone's
            // content into it.
            for entry in std::fs::read_dir(&staging).map_err(|e| fail(e.to_string()))? {
                let entry = entry.map_err(|e| fail(e.to_string()))?;
                std::fs::rename(entry.path(), self.dir.join(entry.file_name()))
                    .map_err(|e| fail(e.to_string()))?;
            }
            let _ = std::fs::remove_dir(&staging);
        } else {
            std::fs::rename(&staging, &self.dir)
                .map_err(|e| fail(format!("{}: {e}", self.dir.display())))?;
        }
        Ok(())
    }

    /// Holds the working tree still (see `state_lock`).
    pub fn lock_state(&self) -> MutexGuard<'_, ()> {
        self.state_lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The remote's URL as it may be shown.
    pub fn shown_url(&self) -> String {
        redact_url(&self.options.url)
    }

    /// Fetches the branch; returns the commit the remote's branch is at.
    pub fn fetch(&self) -> Result<String, GitError> {
        let _net = self.net.lock().unwrap_or_else(|e| e.into_inner());
        let branch = &self.options.branch;
        // `+`: a rewritten branch is fetched too, so that it can be seen and refused.
        let refspec = format!("+refs/heads/{branch}:refs/remotes/{REMOTE}/{branch}");
        self.git(
            &["fetch", "--quiet", "--no-tags", REMOTE, &refspec],
            "fetch",
        )?;
        self.rev_parse(&format!("refs/remotes/{REMOTE}/{branch}"))
    }

    /// The commit checked out.
    pub fn head(&self) -> Result<String, GitError> {
        self.rev_parse("HEAD")
    }

    fn rev_parse(&self, what: &str) -> Result<String, GitError> {
        self.git(
            &[
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("{what}^{{commit}}"),
            ],
            "rev-parse",
        )
    }

    /// Whether `ancestor` is `descendant` or one of its ancestors.
    pub fn is_ancestor(&self, ancestor: &str, descendant: &str) -> Result<bool, GitError> {
        match self.run(
            Some(&self.dir),
            &["merge-base", "--is-ancestor", ancestor, descendant],
            "merge-base",
        ) {
            Ok(_) => Ok(true),
            // 1: not an ancestor; anything else (128: no such commit) is an error.
            Err(GitError::Failed { detail, .. }) if detail == "exit status 1" => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// How many commits `to` has that `from` does not.
    pub fn count_between(&self, from: &str, to: &str) -> Result<u64, GitError> {
        let out = self.git(
            &["rev-list", "--count", &format!("{from}..{to}")],
            "rev-list",
        )?;
        out.trim().parse().map_err(|_| GitError::Failed {
            what: "rev-list".into(),
            detail: format!("unexpected answer {out:?}"),
        })
    }

    /// Checks `commit`'s signature against the allowed signers (git's own verification).
    /// `Ok(())` without `--require-signed`.
    pub fn verify_signature(&self, commit: &str) -> Result<(), String> {
        let Some(signers) = &self.options.allowed_signers else {
            return Ok(());
        };
        let config = format!("gpg.ssh.allowedSignersFile={}", signers.display());
        match self.run(
            Some(&self.dir),
            &["-c", &config, "verify-commit", commit],
            "verify-commit",
        ) {
            Ok(_) => Ok(()),
            Err(GitError::Failed { detail, .. }) => Err(format!(
                "commit {} is not signed by a key of {} ({})",
                short(commit),
                signers.display(),
                detail
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with("exit status"))
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Writes the tree of `commit` into `into` (an empty folder), without touching the
    /// working tree or the index: a commit is validated before it is checked out.
    pub fn export(&self, commit: &str, into: &Path) -> Result<(), GitError> {
        let index = into.with_extension("index");
        let mut prefix = into.to_string_lossy().into_owned();
        prefix.push('/');
        let result = (|| {
            self.run_env(
                Some(&self.dir),
                &["read-tree", commit],
                "read-tree",
                &[("GIT_INDEX_FILE", index.as_os_str())],
            )?;
            self.run_env(
                Some(&self.dir),
                &[
                    "checkout-index",
                    "--all",
                    "--force",
                    &format!("--prefix={prefix}"),
                ],
                "checkout-index",
                &[("GIT_INDEX_FILE", index.as_os_str())],
            )
        })();
        let _ = std::fs::remove_file(&index);
        result.map(|_| ())
    }

    /// Moves the branch and the working tree to `commit` (the caller holds `state_lock`).
    /// Hand edits of the clone's files are dropped: the clone holds what git holds.
    pub fn move_to(&self, commit: &str) -> Result<(), GitError> {
        self.git(&["reset", "--quiet", "--hard", commit], "reset")
            .map(|_| ())
    }

    /// Commits `paths` (relative to the clone, added or removed) as `author`; returns the new
    /// commit, or `None` when they hold no change.
    pub fn commit(
        &self,
        paths: &[&Path],
        author: &str,
        message: &str,
    ) -> Result<Option<String>, GitError> {
        let paths: Vec<String> = paths
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let mut add = vec!["add", "--all", "--"];
        add.extend(paths.iter().map(String::as_str));
        self.git(&add, "add")?;
        let mut staged = vec!["diff", "--cached", "--quiet", "--"];
        staged.extend(paths.iter().map(String::as_str));
        if self.run(Some(&self.dir), &staged, "diff").is_ok() {
            return Ok(None);
        }
        let author = format!("{author} <{author}@lunafront.invalid>");
        let mut args: Vec<String> = Vec::new();
        if let Some(key) = &self.options.signing_key {
            args.extend([
                "-c".into(),
                "gpg.format=ssh".into(),
                "-c".into(),
                format!("user.signingkey={}", key.display()),
            ]);
        }
        args.extend(
            ["commit", "--quiet", "--no-verify", "--allow-empty-message"].map(String::from),
        );
        if self.options.signing_key.is_some() {
            args.push("--gpg-sign".into());
        } else {
            args.push("--no-gpg-sign".into());
        }
        args.extend([
            "--author".into(),
            author,
            "-m".into(),
            message.into(),
            "--".into(),
        ]);
        args.extend(paths);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.git(&args, "commit")?;
        self.head().map(Some)
    }

    /// Pushes the checked-out commit to the branch: `Rejected` when the remote moved (someone
    /// pushed first), never a force push.
    pub fn push(&self) -> Result<(), GitError> {
        let _net = self.net.lock().unwrap_or_else(|e| e.into_inner());
        let refspec = format!("HEAD:refs/heads/{}", self.options.branch);
        match self.run(
            Some(&self.dir),
            &["push", "--porcelain", "--quiet", REMOTE, &refspec],
            "push",
        ) {
            Ok(_) => Ok(()),
            // Not a fast-forward of the remote's branch, or — pushes meeting at the same
            // instant — the remote moved between its check and its update of the branch.
            Err(GitError::Failed { detail, .. })
                if detail.contains("[rejected]")
                    || detail.contains("(fetch first)")
                    || detail.contains("(non-fast-forward)")
                    || detail.contains("(failed to update ref)")
                    || detail.contains("cannot lock ref")
                    || detail.contains("incorrect old value provided") =>
            {
                Err(GitError::Rejected)
            }
            Err(e) => Err(e),
        }
    }

    /// `git -C <clone> args`, its stdout trimmed.
    fn git(&self, args: &[&str], what: &str) -> Result<String, GitError> {
        self.run(Some(&self.dir), args, what)
    }

    fn run(&self, dir: Option<&Path>, args: &[&str], what: &str) -> Result<String, GitError> {
        self.run_env(dir, args, what, &[])
    }

    /// Runs git with a timeout, in its own process group (a hanging `ssh` it started is
    /// stopped with it). Errors carry git's stderr, redacted.
    fn run_env(
        &self,
        dir: Option<&Path>,
        args: &[&str],
        what: &str,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<String, GitError> {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new("git");
        if let Some(dir) = dir {
            command.arg("-C").arg(dir);
        }
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            // Never ask for a password on a terminal: a daemon has none.
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "true")
            .env("SSH_ASKPASS", "true")
            .env("LC_ALL", "C")
            .env("GIT_COMMITTER_NAME", COMMITTER.0)
            .env("GIT_COMMITTER_EMAIL", COMMITTER.1)
            .env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", format!("remote.{REMOTE}.url"))
            .env("GIT_CONFIG_VALUE_0", &self.options.url);
        if let Some(key) = &self.options.key {
            command.env(
                "GIT_SSH_COMMAND",
                format!(
                    "ssh -i {} -o IdentitiesOnly=yes -o BatchMode=yes",
                    shell_quote(&key.to_string_lossy())
                ),
            );
        }
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command
            .spawn()
            .map_err(|e| GitError::Spawn(e.to_string()))?;
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let out_reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        let err_reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let deadline = Instant::now() + self.options.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() >= deadline => {
                    // SAFETY: kill(2) on the process group this command leads.
                    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => {
                    return Err(GitError::Failed {
                        what: what.into(),
                        detail: e.to_string(),
                    });
                }
            }
        };
        let out = out_reader.join().unwrap_or_default();
        let err = err_reader.join().unwrap_or_default();
        let Some(status) = status else {
            return Err(GitError::Timeout {
                what: what.into(),
                timeout: self.options.timeout,
            });
        };
        if status.success() {
            return Ok(out.trim().to_string());
        }
        let mut detail = format!(
            "exit status {}",
            status
                .code()
                .map(|c| c.to_string())
                .unwrap_or("signal".into())
        );
        // `push --porcelain` says why on stdout.
        for text in [err.trim(), out.trim()] {
            if !text.is_empty() {
                detail.push_str(": ");
                detail.push_str(text);
            }
        }
        Err(GitError::Failed {
            what: what.into(),
            detail: redact(&detail, &self.options.url),
        })
    }
}

/// The first 12 digits of a commit, as messages show it.
pub fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// A URL with its password (and a token used as user name) replaced by `***`:
/// `https://user:secret@host/repo` → `https://user:***@host/repo`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    let shown = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        // A user name alone may be a token (`https://<token>@host`): hidden too, except the
        // usual `git@`.
        None if userinfo == "git" => userinfo.to_string(),
        None => "***".to_string(),
    };
    format!("{}://{shown}@{}", &url[..scheme_end], &rest[at + 1..])
}

/// `text` with every secret of `url` (the URL as given, its user information, its password
/// and their percent-decoded forms) replaced: what git prints is shown only through this.
pub fn redact(text: &str, url: &str) -> String {
    let mut out = text.replace(url, &redact_url(url));
    let Some(scheme_end) = url.find("://") else {
        return out;
    };
    let rest = &url[scheme_end + 3..];
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    if let Some(at) = authority.rfind('@') {
        let userinfo = &authority[..at];
        let secrets: Vec<&str> = match userinfo.split_once(':') {
            Some((_, password)) => vec![password],
            None if userinfo == "git" => vec![],
            None => vec![userinfo],
        };
        for secret in secrets.into_iter().filter(|s| s.len() >= 3) {
            for form in [secret.to_string(), percent_decode(secret)] {
                if !form.is_empty() {
                    out = out.replace(&form, "***");
                }
            }
        }
    }
    out
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_tokens_in_urls_are_hidden() {
        assert_eq!(
            redact_url("https://deploy:s3cr%40t@git.example.com/fleet.git"),
            "https://deploy:***@git.example.com/fleet.git"
        );
        assert_eq!(
            redact_url("https://ghp_tokentokentoken@github.com/o/r.git"),
            "https://***@github.com/o/r.git"
        );
        assert_eq!(
            redact_url("ssh://git@git.example.com/fleet.git"),
            "ssh://git@git.example.com/fleet.git"
        );
        assert_eq!(redact_url("/srv/git/fleet.git"), "/srv/git/fleet.git");
        assert_eq!(
            redact_url("https://git.example.com/a@b/fleet.git"),
            "https://git.example.com/a@b/fleet.git"
        );
        let url = "https://deploy:s3cr%40t@git.example.com/fleet.git";
        let said =
            format!("fatal: unable to access '{url}': auth failed for deploy:s3cr@t and s3cr%40t");
        let shown = redact(&said, url);
        assert!(!shown.contains("s3cr"), "{shown}");
        assert!(
            shown.contains("https://deploy:***@git.example.com/fleet.git"),
            "{shown}"
        );
    }
}
