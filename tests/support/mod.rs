//! Test support: the real things on loopback. Starts HAProxy, HTTP and TLS backends on free
//! ports, makes certificates at test time (rcgen), and speaks HTTP and TLS as a client. Every
//! process and thread started here is stopped when its handle is dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub mod agent;
pub mod dpapi;

pub use tempfile::TempDir;

/// The lunafront binary under test.
pub fn lunafront() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lunafront"));
    cmd.env("NO_COLOR", "1").env_remove("LUNAFRONT_STATE");
    if let Some(path) = haproxy_path() {
        cmd.env("PATH", path);
    }
    cmd
}

/// Runs lunafront with `args`; returns (exit code, stdout, stderr).
pub fn run(args: &[&str], dir: &Path) -> (i32, String, String) {
    let out = lunafront()
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run lunafront");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The HAProxy the tests drive: `$LUNAFRONT_TEST_HAPROXY` (a binary or a wrapper such as
/// `scripts/haproxy-3.0`), else `haproxy` from PATH. Tests that need it fail (never skip) when
/// it does not run, and when `$LUNAFRONT_TEST_HAPROXY_VERSION` (e.g. `3.0`) names another
/// version than the one it reports.
pub fn haproxy_bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        let mut bin = std::env::var("LUNAFRONT_TEST_HAPROXY").unwrap_or_else(|_| "haproxy".into());
        // A path made absolute: tests run lunafront and HAProxy from other folders.
        if bin.contains('/') {
            bin = std::fs::canonicalize(&bin)
                .unwrap_or_else(|e| panic!("LUNAFRONT_TEST_HAPROXY={bin}: {e}"))
                .display()
                .to_string();
        }
        let version = haproxy_version_of(&bin);
        if let Ok(wanted) = std::env::var("LUNAFRONT_TEST_HAPROXY_VERSION") {
            assert!(
                version.contains(&format!("version {wanted}")),
                "LUNAFRONT_TEST_HAPROXY_VERSION={wanted}, but {bin} is `{version}`"
            );
        }
        bin
    })
}

/// The first line of `<bin> -v` (`HAProxy version 2.6.12-1+deb12u3 ...`); panics when it
/// does not run.
fn haproxy_version_of(bin: &str) -> String {
    let out = Command::new(bin).arg("-v").output();
    let out = match out {
        Ok(out) if out.status.success() => out,
        other => panic!(
            "{bin} -v does not run ({other:?}): these tests need a real HAProxy (apt-get install haproxy; for 3.0, scripts/haproxy-3.0 install); .ci/run installs it"
        ),
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// With `$LUNAFRONT_TEST_HAPROXY` set: a PATH whose first folder holds `haproxy` (a link to it),
/// so that lunafront run by a test (a target's default `haproxy_bin: haproxy`: `haproxy -c`,
/// `spawn`, the daemon) drives the same HAProxy as the test itself.
pub fn haproxy_path() -> Option<&'static str> {
    static PATH: OnceLock<Option<String>> = OnceLock::new();
    PATH.get_or_init(|| {
        // A version asked for is checked before any lunafront process may start HAProxy.
        if std::env::var_os("LUNAFRONT_TEST_HAPROXY_VERSION").is_some() {
            haproxy_bin();
        }
        std::env::var_os("LUNAFRONT_TEST_HAPROXY")?;
        let bin = PathBuf::from(haproxy_bin());
        // One folder per HAProxy; the link is replaced atomically (test processes may race).
        let key = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            bin.hash(&mut h);
            h.finish()
        };
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("haproxy-bin-{key:016x}"));
        std::fs::create_dir_all(&dir).unwrap();
        let tmp = dir.join(format!(".haproxy.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&bin, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("haproxy")).unwrap();
        Some(format!(
            "{}:{}",
            dir.display(),
            std::env::var("PATH").unwrap_or_default()
        ))
    })
    .as_deref()
}

/// `haproxy -c` on a configuration, run from an unrelated folder so that relative paths must
/// resolve through `default-path config`. (Not `-q`: HAProxy 3.0 then hides its alerts too.)
pub fn haproxy_check(config: &Path) -> Result<(), String> {
    let out = Command::new(haproxy_bin())
        .args(["-c", "-f"])
        .arg(config)
        .current_dir("/")
        .output()
        .expect("run haproxy -c");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A free TCP port on 127.0.0.1, for a listener a test configures (HAProxy's, the daemon's).
/// Not one the kernel picks (`bind(…:0)`): a port picked and released that way can be handed
/// out again at once to another test's server or to an outgoing connection, and the listener
/// configured on it then fails to bind. Ports come from below the kernel's ephemeral range
/// (which it never assigns by itself), in turn within this process, each checked free.
pub fn free_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let ephemeral_low: u64 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    if ephemeral_low < 4096 {
        return TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    }
    let span = (ephemeral_low - 2048).min(12000);
    let base = ephemeral_low - span;
    // Another test binary running at the same time starts elsewhere in the range.
    let offset = (u64::from(std::process::id()) * 977) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (base + (offset + n) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below {ephemeral_low}");
}

pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A running HAProxy in master-worker mode, stopped on drop.
pub struct Haproxy {
    pub child: Child,
    pub master_socket: PathBuf,
    pub log: PathBuf,
}

impl Haproxy {
    /// Starts `haproxy -W -S <master> -f <config>` and waits until `ports` accept connections.
    pub fn start(config: &Path, master_socket: &Path, ports: &[u16]) -> Haproxy {
        let log = config.with_extension("log");
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new(haproxy_bin())
            .arg("-W")
            .arg("-S")
            .arg(format!("{},mode,600", master_socket.display()))
            .arg("-f")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("start haproxy");
        let haproxy = Haproxy {
            child,
            master_socket: master_socket.to_path_buf(),
            log,
        };
        for port in ports {
            assert!(
                wait_for_port(*port, Duration::from_secs(10)),
                "haproxy did not listen on {port}: {}",
                std::fs::read_to_string(&haproxy.log).unwrap_or_default()
            );
        }
        haproxy
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        // SIGTERM to the master stops the workers too; wait, then make sure.
        unsafe_kill(self.child.id(), 15);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a PID this test started; nothing is shared.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// A server on a loopback port that runs `handle` for each connection in its own thread.
pub struct Server {
    pub port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub connections: Arc<AtomicU64>,
}

impl Server {
    pub fn spawn(handle: impl Fn(TcpStream) + Send + Sync + 'static) -> Server {
        Server::spawn_on("127.0.0.1", handle)
    }

    /// On `ip` (`0.0.0.0`: every loopback address, for agents at 127.0.x.y).
    pub fn spawn_on(ip: &str, handle: impl Fn(TcpStream) + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicU64::new(0));
        let handle = Arc::new(handle);
        let (stop2, conns2) = (stop.clone(), connections.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                conns2.fetch_add(1, Ordering::Relaxed);
                let handle = handle.clone();
                std::thread::spawn(move || handle(stream));
            }
        });
        Server {
            port,
            stop,
            thread: Some(thread),
            connections,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop (whatever address it listens on, loopback reaches it).
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An HTTP/1.1 backend (keep-alive) answering `backend=<name> host=<host> path=<path>`.
pub fn http_backend(name: &str) -> Server {
    let name = name.to_string();
    Server::spawn(move |stream| serve_http(stream, &name))
}

/// The same, listening on every address (agents registered at 127.0.x.y reach it).
pub fn http_backend_everywhere(name: &str) -> Server {
    let name = name.to_string();
    Server::spawn_on("0.0.0.0", move |stream| serve_http(stream, &name))
}

fn serve_http(stream: TcpStream, name: &str) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_string();
        let mut host = String::new();
        let mut length = 0usize;
        let mut close = false;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "host" => host = v.trim().to_string(),
                    "content-length" => length = v.trim().parse().unwrap_or(0),
                    "connection" => close = v.trim().eq_ignore_ascii_case("close"),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let text = format!("backend={name} host={host} path={path}\n");
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{text}",
            text.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if writer.write_all(response.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// A plain HTTP/1.1 request through a fresh connection; returns (status, body).
pub fn http_get(port: u16, host: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    parse_response(&response)
}

pub fn parse_response(response: &str) -> std::io::Result<(u16, String)> {
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP status in {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

// ---- TLS: certificates made at test time, rustls on both sides. ----

pub struct TestCa {
    pub cert_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Leaf {
    /// Certificate and key in one file, as HAProxy's crt-list wants them.
    pub fn combined(&self) -> String {
        format!("{}{}", self.cert_pem, self.key_pem)
    }
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "lunafront test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            cert_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A certificate for `names`, signed by this CA.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_certs(&self.cert_pem) {
            roots.add(cert).unwrap();
        }
        roots
    }

    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(self.roots())
                .with_no_client_auth(),
        )
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn rustls_pki_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap())
        .collect()
}

fn server_config(leaf: &Leaf) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(rustls_pki_certs(&leaf.cert_pem), key)
            .unwrap(),
    )
}

/// A TLS backend (a stand-in for MongoDB with TLS): answers each line with
/// `tls-backend=<name> sni=<server name it saw> got=<line>`.
pub fn tls_backend(name: &str, leaf: &Leaf) -> Server {
    tls_backend_counted(name, leaf).0
}

/// A plain TCP backend (behind a TLS-terminating listener): answers
/// `tcp-backend=<name> got=<line>`.
pub fn tcp_backend(name: &str) -> Server {
    let name = name.to_string();
    Server::spawn(move |stream| {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut stream = stream;
        let _ =
            stream.write_all(format!("tcp-backend={name} got={}\n", line.trim_end()).as_bytes());
        let _ = stream.shutdown(Shutdown::Write);
    })
}

/// Opens TLS to 127.0.0.1:`port` with server name `sni`, sends one line, returns the reply
/// line. Verifies the server certificate against `ca`.
pub fn tls_exchange(ca: &TestCa, port: u16, sni: &str, line: &str) -> std::io::Result<String> {
    tls_exchange_with(ca.client_config(), port, sni, line)
}

/// A TLS client that trusts the CA certificate(s) in `pem`.
pub fn client_config_trusting(pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_certs(pem) {
        roots.add(cert).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

pub fn tls_exchange_with(
    config: Arc<rustls::ClientConfig>,
    port: u16,
    sni: &str,
    line: &str,
) -> std::io::Result<String> {
    let server_name =
        rustls::pki_types::ServerName::try_from(sni.to_string()).map_err(std::io::Error::other)?;
    let conn = rustls::ClientConnection::new(config, server_name).map_err(std::io::Error::other)?;
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::StreamOwned::new(conn, stream);
    tls.write_all(format!("{line}\n").as_bytes())?;
    tls.flush()?;
    let mut reply = String::new();
    BufReader::new(&mut tls).read_line(&mut reply)?;
    if reply.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed without a reply",
        ));
    }
    Ok(reply.trim_end().to_string())
}

/// An HTTPS GET through a TLS connection with server name `sni`; returns (status, body).
pub fn https_get(
    ca: &TestCa,
    port: u16,
    sni: &str,
    host: &str,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let server_name =
        rustls::pki_types::ServerName::try_from(sni.to_string()).map_err(std::io::Error::other)?;
    let conn = rustls::ClientConnection::new(ca.client_config(), server_name)
        .map_err(std::io::Error::other)?;
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::StreamOwned::new(conn, stream);
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut response = Vec::new();
    match tls.read_to_end(&mut response) {
        Ok(_) => {}
        // HAProxy may close without close_notify after Connection: close.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(e),
    }
    parse_response(&String::from_utf8_lossy(&response))
}

/// Writes `text` to `dir/name`, creating folders.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

// ---- A lunafront-managed HAProxy in a temp folder. ----

/// A state folder with a `local` target whose files, sockets and history live inside it.
/// HAProxy is started by lunafront (`spawn: true`) and stopped when this is dropped.
pub struct Site {
    pub dir: TempDir,
}

impl Site {
    pub fn new() -> Site {
        Site {
            dir: TempDir::new().unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The `targets:` block of the site's states.
    pub fn target_block(&self, spawn: bool) -> String {
        format!(
            "targets:\n  local: {{ type: haproxy, config: live/haproxy.cfg, state_dir: state, spawn: {spawn}, master_socket: {d}/state/master.sock, runtime_socket: {d}/state/admin.sock, reload_timeout: 10s }}\n",
            d = self.path().display()
        )
    }

    /// `target_block` for a state kept in a folder below the site: its paths absolute, and
    /// the target's own files in `state_dir` (a folder outside the state).
    pub fn folder_target_block(&self, state_dir: &str) -> String {
        let d = self.path().display();
        self.target_block(true)
            .replace("config: live/", &format!("config: {d}/live/"))
            .replace("state_dir: state,", &format!("state_dir: {d}/{state_dir},"))
    }

    /// Writes `state.yaml` (atomically, as an editor would).
    pub fn write_state(&self, yaml: &str) {
        let tmp = self.path().join(".state.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.path().join("state.yaml")).unwrap();
    }

    pub fn lunafront(&self, args: &[&str]) -> (i32, String, String) {
        run(args, self.path())
    }

    /// `lunafront apply --auto-approve`, asserting it worked.
    pub fn apply(&self) -> String {
        let (code, stdout, stderr) = self.lunafront(&["apply", "state.yaml", "--auto-approve"]);
        assert_eq!(code, 0, "apply failed:\n{stdout}\n{stderr}");
        stdout
    }

    /// Writes and applies `yaml`, then waits (5 s at the most) until `host` on `port` answers a
    /// body starting with `prefix`.
    pub fn apply_until_served(&self, yaml: &str, port: u16, host: &str, prefix: &str) {
        self.write_state(yaml);
        self.apply();
        wait_for_route(port, host, prefix, Duration::from_secs(5));
    }

    pub fn master(&self) -> lunafront::target::haproxy::socket::MasterCli {
        lunafront::target::haproxy::socket::MasterCli::new(&self.path().join("state/master.sock"))
    }

    pub fn runtime(&self) -> lunafront::target::haproxy::socket::RuntimeApi {
        lunafront::target::haproxy::socket::RuntimeApi::new(&self.path().join("state/admin.sock"))
    }

    /// (master reloads counter, current worker PIDs).
    pub fn generation(&self) -> (u32, Vec<u32>) {
        let proc = self
            .master()
            .show_proc(Duration::from_secs(2))
            .expect("master answers");
        (proc.reloads, proc.current().map(|w| w.pid).collect())
    }

    /// The slot backend (`slot:http:N`) that holds HTTP app `app` in the live configuration.
    pub fn http_slot_of(&self, app: &str) -> String {
        let config = std::fs::read_to_string(self.path().join("live/haproxy.cfg")).unwrap();
        let pools = lunafront::render::readback::slot_pools(&config);
        lunafront::render::layout::slot_name(lunafront::model::Mode::Http, pools.http.apps[app])
    }

    /// Every file under `live/`, to compare before and after.
    pub fn live_files(&self) -> std::collections::BTreeMap<String, Vec<u8>> {
        fn walk(dir: &Path, root: &Path, out: &mut std::collections::BTreeMap<String, Vec<u8>>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, root, out);
                    continue;
                }
                // A daemon may be applying beside the test: its staged files are renamed away
                // between listing the folder and reading them. A file gone is not in the folder.
                match std::fs::read(&path) {
                    Ok(bytes) => {
                        out.insert(
                            path.strip_prefix(root).unwrap().display().to_string(),
                            bytes,
                        );
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => panic!("{}: {e}", path.display()),
                }
            }
        }
        let mut out = std::collections::BTreeMap::new();
        let root = self.path().join("live");
        walk(&root, &root, &mut out);
        out
    }

    /// Stops the HAProxy lunafront started (its master's PID is in the pidfile, or it answers
    /// on the master socket).
    pub fn stop_haproxy(&self) {
        let pid = self
            .master()
            .show_proc(Duration::from_millis(300))
            .map(|p| p.master_pid)
            .ok()
            .or_else(|| {
                std::fs::read_to_string(self.path().join("state/haproxy.pid"))
                    .ok()
                    .and_then(|p| p.trim().parse().ok())
            });
        if let Some(pid) = pid {
            unsafe_kill(pid, 15);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && Path::new(&format!("/proc/{pid}")).exists() {
                std::thread::sleep(Duration::from_millis(20));
            }
            if Path::new(&format!("/proc/{pid}")).exists() {
                unsafe_kill(pid, 9);
            }
        }
    }
}

impl Default for Site {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.stop_haproxy();
    }
}

/// A running `lunafront daemon`, stopped (SIGTERM) when dropped.
pub struct Daemon {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Daemon {
    /// `lunafront daemon <state> --target local` with `extra` arguments.
    pub fn start(dir: &Path, state: &str, extra: &[&str]) -> Daemon {
        Daemon::start_with_env(dir, state, extra, &[])
    }

    /// `start`, with environment variables set for the daemon.
    pub fn start_with_env(dir: &Path, state: &str, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let port = free_port();
        let log = std::fs::File::create(dir.join(format!("daemon-{port}.log"))).unwrap();
        let child = lunafront()
            .envs(env.iter().copied())
            .args([
                "daemon",
                state,
                "--target",
                "local",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(extra)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let daemon = Daemon {
            child,
            port,
            log: dir.join(format!("daemon-{port}.log")),
        };
        assert!(
            wait_for_port(port, Duration::from_secs(20)),
            "daemon did not listen: {}",
            daemon.log_text()
        );
        daemon
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.port, "127.0.0.1", path).unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the daemon with SIGKILL (no cleanup at all).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn post(&self, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        write!(stream, "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        parse_response(&response).unwrap()
    }

    /// Waits until `GET path` answers `status` (and the body contains `needle`).
    pub fn wait_for(&self, path: &str, status: u16, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut last = (0, String::new());
        while Instant::now() < deadline {
            if let Ok(r) = http_get(self.port, "127.0.0.1", path) {
                if r.0 == status && r.1.contains(needle) {
                    return r.1;
                }
                last = r;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{path} never answered {status} with {needle:?}; last: {last:?}\n{}",
            self.log_text()
        );
    }

    pub fn stop(&mut self) {
        unsafe_kill(self.child.id(), 15);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until `host` on `port` answers with a body starting with `prefix`.
pub fn wait_for_route(port: u16, host: &str, prefix: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        match http_get(port, host, "/") {
            Ok((200, body)) if body.starts_with(prefix) => return,
            other => last = Some(other),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{host} never answered {prefix:?}; last: {last:?}");
}

/// The whole response (status line, headers, body) to one GET with `Connection: close`.
pub fn raw_get(port: u16, host: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// Runs `a` and `b` on two threads released at the same moment; returns both results.
pub fn at_once<A: Send, B: Send>(
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
) -> (A, B) {
    let barrier = std::sync::Barrier::new(2);
    std::thread::scope(|scope| {
        let a = scope.spawn(|| {
            barrier.wait();
            a()
        });
        let b = scope.spawn(|| {
            barrier.wait();
            b()
        });
        (a.join().unwrap(), b.join().unwrap())
    })
}

/// An HTTP/1.1 request with a JSON body (or none) and optional bearer token; returns
/// (status, body).
pub fn http_json(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> (u16, String) {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    exchange_json(stream, method, path, token, body)
}

/// `http_json` from a chosen loopback source address (each agent is its own client).
pub fn http_json_from(
    source: std::net::IpAddr,
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> (u16, String) {
    exchange_json(connect_from(source, port), method, path, token, body)
}

/// A TCP connection to 127.0.0.1:`port` from the loopback address `source`.
pub fn connect_from(source: std::net::IpAddr, port: u16) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::new(source, 0).into())
        .unwrap();
    socket
        .connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
        .unwrap();
    socket.into()
}

/// One JSON request on a connected stream: the status and the body of the answer.
fn exchange_json(
    mut stream: TcpStream,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> (u16, String) {
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    parse_response(&response).unwrap()
}

// ---- Added for issue 17: keep-alive clients, served certificates, counted exchanges. ----

/// An HTTP/1.1 client that keeps its connection open between requests, as browsers and load
/// balancers do, and opens a new one only when the server said `Connection: close` (or before
/// the first request).
pub struct KeepAliveClient {
    port: u16,
    conn: Option<BufReader<TcpStream>>,
    /// Connections opened so far.
    pub connections: u64,
}

impl KeepAliveClient {
    pub fn new(port: u16) -> KeepAliveClient {
        KeepAliveClient {
            port,
            conn: None,
            connections: 0,
        }
    }

    /// One GET on the open connection; returns (status, body). An error is a failed request:
    /// the connection is dropped and the next request opens a new one.
    pub fn get(&mut self, host: &str, path: &str) -> std::io::Result<(u16, String)> {
        let result = self.exchange(host, path);
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    fn exchange(&mut self, host: &str, path: &str) -> std::io::Result<(u16, String)> {
        if self.conn.is_none() {
            let stream = TcpStream::connect(("127.0.0.1", self.port))?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            self.connections += 1;
            self.conn = Some(BufReader::new(stream));
        }
        let reader = self.conn.as_mut().expect("connected");
        // One write: a request in pieces waits on Nagle and delayed ACKs.
        reader
            .get_mut()
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())?;
        let mut status_line = String::new();
        if reader.read_line(&mut status_line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection without an answer",
            ));
        }
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no status in {status_line:?}")))?;
        let (mut length, mut close) = (0usize, false);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the connection in the headers",
                ));
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = v.trim().parse().unwrap_or(0),
                    "connection" => close = v.trim().eq_ignore_ascii_case("close"),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        if close {
            self.conn = None;
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

impl Leaf {
    /// The certificate, DER-encoded: what a TLS server presents.
    pub fn der(&self) -> Vec<u8> {
        rustls_pki_certs(&self.cert_pem)[0].to_vec()
    }
}

/// The certificate (DER) a TLS server on 127.0.0.1:`port` presents for server name `sni`,
/// verified against `ca`.
pub fn served_certificate(ca: &TestCa, port: u16, sni: &str) -> std::io::Result<Vec<u8>> {
    served_certificate_with(ca.client_config(), port, sni)
}

/// The certificate (DER) a TLS server on 127.0.0.1:`port` presents for `sni`, verified by
/// `config`.
pub fn served_certificate_with(
    config: Arc<rustls::ClientConfig>,
    port: u16,
    sni: &str,
) -> std::io::Result<Vec<u8>> {
    let server_name =
        rustls::pki_types::ServerName::try_from(sni.to_string()).map_err(std::io::Error::other)?;
    let mut conn =
        rustls::ClientConnection::new(config, server_name).map_err(std::io::Error::other)?;
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut stream)?;
    }
    conn.peer_certificates()
        .and_then(|certs| certs.first())
        .map(|c| c.to_vec())
        .ok_or_else(|| std::io::Error::other("no certificate presented"))
}

/// `tls_backend`, also counting the exchanges it answered (a health check's bare connect is a
/// connection, not an exchange).
pub fn tls_backend_counted(name: &str, leaf: &Leaf) -> (Server, Arc<AtomicU64>) {
    let config = server_config(leaf);
    let name = name.to_string();
    let exchanges = Arc::new(AtomicU64::new(0));
    let counted = exchanges.clone();
    let server = Server::spawn(move |stream| {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
            return;
        };
        let mut tls = rustls::StreamOwned::new(conn, stream);
        let mut line = String::new();
        if BufReader::new(&mut tls).read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        counted.fetch_add(1, Ordering::SeqCst);
        let sni = tls.conn.server_name().unwrap_or("-").to_string();
        let reply = format!("tls-backend={name} sni={sni} got={}\n", line.trim_end());
        let _ = tls.write_all(reply.as_bytes());
        let _ = tls.flush();
        tls.conn.send_close_notify();
        let _ = tls.flush();
    });
    (server, exchanges)
}

// ---- Added for issue 14: a daemon of any target (a fleet's nodes, groups). ----

impl Daemon {
    /// `lunafront daemon <state> --target <target>` with `extra` arguments and environment.
    pub fn start_target(
        dir: &Path,
        state: &str,
        target: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let port = free_port();
        let log_path = dir.join(format!("daemon-{port}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = lunafront()
            .envs(env.iter().copied())
            .args(["daemon", state, "--target", target])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(extra)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let daemon = Daemon {
            child,
            port,
            log: log_path,
        };
        assert!(
            wait_for_port(port, Duration::from_secs(30)),
            "daemon did not listen: {}",
            daemon.log_text()
        );
        daemon
    }

    /// `GET path` as JSON (panics when the answer is not JSON).
    pub fn json(&self, path: &str) -> serde_json::Value {
        let (_, body) = self.get(path);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }
}
