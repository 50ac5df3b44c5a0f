//! The two control sockets of a local HAProxy (I/O edge): the runtime API (stats socket,
//! `level admin`) and the master CLI. Every read has a timeout: on 2.6 the master CLI keeps a
//! connection open after `show proc` and answers nothing to `reload`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("HAProxy refused `{command}`: {answer}")]
    Refused { command: String, answer: String },
    /// HAProxy closed the connection without a byte: it did not run the command (on 2.6, a
    /// command longer than its buffer, `tune.bufsize`, is dropped that way). Every command it
    /// runs answers at least an empty line.
    #[error("HAProxy answered nothing to `{command}` ({bytes} bytes sent): it did not run it")]
    NoAnswer { command: String, bytes: usize },
    #[error("unexpected answer from {path}: {answer}")]
    Unexpected { path: PathBuf, answer: String },
}

/// What a runtime command answers when it worked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// An empty line (most `set`, `add map`, `commit` commands). Not a closed connection
    /// without a byte: that is a command HAProxy did not run.
    Empty,
    /// A line starting with this text.
    Prefix(&'static str),
    /// Anything: the caller reads the answer.
    Any,
}

/// The runtime API: one connection per command (HAProxy closes it after answering).
#[derive(Debug, Clone)]
pub struct RuntimeApi {
    pub path: PathBuf,
    pub timeout: Duration,
}

impl RuntimeApi {
    pub fn new(path: &Path) -> RuntimeApi {
        RuntimeApi {
            path: path.to_path_buf(),
            timeout: Duration::from_secs(10),
        }
    }

    /// Sends one command (a payload, if any, follows on the next lines) and checks the answer.
    pub fn run(&self, command: &str, expect: Expect) -> Result<String, SocketError> {
        let answer = self.raw(command)?;
        if answer.is_empty() {
            return Err(SocketError::NoAnswer {
                command: command.lines().next().unwrap_or_default().to_string(),
                bytes: command.len(),
            });
        }
        let trimmed = answer.trim();
        let ok = match expect {
            Expect::Empty => trimmed.is_empty(),
            Expect::Prefix(prefix) => trimmed.starts_with(prefix),
            Expect::Any => true,
        };
        if ok {
            Ok(answer)
        } else {
            Err(SocketError::Refused {
                command: command.lines().next().unwrap_or_default().to_string(),
                answer: trimmed.lines().next().unwrap_or_default().to_string(),
            })
        }
    }

    fn raw(&self, command: &str) -> Result<String, SocketError> {
        let mut stream =
            UnixStream::connect(&self.path).map_err(|source| SocketError::Connect {
                path: self.path.clone(),
                source,
            })?;
        let io = |source| SocketError::Io {
            path: self.path.clone(),
            source,
        };
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        let mut text = command.to_string();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        stream.write_all(text.as_bytes()).map_err(io)?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).map_err(io)?;
        Ok(answer)
    }

    /// Whether HAProxy answers, and the PID of the worker that did.
    pub fn worker_pid(&self) -> Result<u32, SocketError> {
        let info = self.run("show info", Expect::Prefix("Name:"))?;
        info.lines()
            .find_map(|l| l.strip_prefix("Pid: "))
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| SocketError::Unexpected {
                path: self.path.clone(),
                answer: info.lines().next().unwrap_or_default().to_string(),
            })
    }
}

/// One line of `show proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    pub pid: u32,
    /// How many reloads this worker has survived (0: the current generation).
    pub reloads: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub master_pid: u32,
    pub reloads: u32,
    pub failed: u32,
    pub workers: Vec<Worker>,
}

impl ProcInfo {
    /// The workers of the current generation: the newest, those that lived through the
    /// fewest reloads. Usually 0; after a reload that failed, the master kept its old workers
    /// and counted the reload on them too (1 or more), and they are still the current ones.
    pub fn current(&self) -> impl Iterator<Item = &Worker> {
        let newest = self.workers.iter().map(|w| w.reloads).min();
        self.workers
            .iter()
            .filter(move |w| Some(w.reloads) == newest)
    }
}

/// The master CLI (`haproxy -W -S <socket>`).
#[derive(Debug, Clone)]
pub struct MasterCli {
    pub path: PathBuf,
}

impl MasterCli {
    pub fn new(path: &Path) -> MasterCli {
        MasterCli {
            path: path.to_path_buf(),
        }
    }

    /// Connects, retrying while the master re-executes itself during a reload (the socket
    /// refuses connections for a few milliseconds then).
    fn connect(&self, patience: Duration) -> Result<UnixStream, SocketError> {
        let deadline = Instant::now() + patience;
        loop {
            match UnixStream::connect(&self.path) {
                Ok(stream) => return Ok(stream),
                Err(source) if Instant::now() >= deadline => {
                    return Err(SocketError::Connect {
                        path: self.path.clone(),
                        source,
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    pub fn show_proc(&self, patience: Duration) -> Result<ProcInfo, SocketError> {
        let mut stream = self.connect(patience)?;
        let io = |source| SocketError::Io {
            path: self.path.clone(),
            source,
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(io)?;
        // `quit` closes the connection, which 2.6 otherwise keeps open.
        stream.write_all(b"show proc\nquit\n").map_err(io)?;
        let mut answer = String::new();
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    answer.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if answer.contains("# programs") && answer.ends_with("\n\n") {
                        break;
                    }
                }
                // A signal (the apply's interrupt handler) ends a read with a timeout early,
                // whatever SA_RESTART says: read on.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(e) => return Err(io(e)),
            }
        }
        parse_show_proc(&answer).ok_or_else(|| SocketError::Unexpected {
            path: self.path.clone(),
            answer: answer.lines().take(3).collect::<Vec<_>>().join(" | "),
        })
    }

    /// Asks the master to reload. It answers nothing: judge the outcome with `show_proc`.
    pub fn reload(&self) -> Result<(), SocketError> {
        let mut stream = self.connect(Duration::from_secs(2))?;
        stream
            .write_all(b"reload\n")
            .map_err(|source| SocketError::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok(())
    }
}

/// Parses `show proc` of HAProxy 2.6:
/// `<pid> master <reloads> [failed: <n>] <uptime> <version>` then `<pid> worker <reloads> ...`.
pub fn parse_show_proc(text: &str) -> Option<ProcInfo> {
    let mut master = None;
    let mut workers = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [pid, "master", reloads, "[failed:", failed, ..] => {
                master = Some((
                    pid.parse().ok()?,
                    reloads.parse().ok()?,
                    failed.trim_end_matches(']').parse().ok()?,
                ));
            }
            [pid, "worker", reloads, ..] => workers.push(Worker {
                pid: pid.parse().ok()?,
                reloads: reloads.parse().ok()?,
            }),
            _ => {}
        }
    }
    let (master_pid, reloads, failed) = master?;
    Some(ProcInfo {
        master_pid,
        reloads,
        failed,
        workers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_show_proc() {
        let text = "#<PID>          <type>          <reloads>       <uptime>        <version>      \n24092           master          2 [failed: 1]   0d00h00m20s     2.6.12-1+deb12u3\n# workers\n24456           worker          0               0d00h00m01s     2.6.12-1+deb12u3\n24400           worker          1               0d00h01m01s     2.6.12-1+deb12u3\n# programs\n\n";
        let info = parse_show_proc(text).unwrap();
        assert_eq!((info.master_pid, info.reloads, info.failed), (24092, 2, 1));
        assert_eq!(info.workers.len(), 2);
        assert_eq!(
            info.current().map(|w| w.pid).collect::<Vec<_>>(),
            vec![24456]
        );
    }

    #[test]
    fn after_a_failed_reload_the_kept_workers_are_the_current_generation() {
        let text = "#<PID>          <type>          <reloads>       <uptime>        <version>      \n24092           master          1 [failed: 1]   0d00h00m20s     2.6.12-1+deb12u3\n# workers\n24400           worker          1               0d00h01m01s     2.6.12-1+deb12u3\n# programs\n\n";
        let info = parse_show_proc(text).unwrap();
        assert_eq!(
            info.current().map(|w| w.pid).collect::<Vec<_>>(),
            vec![24400]
        );
    }
}
