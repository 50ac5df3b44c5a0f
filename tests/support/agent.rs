//! Test support for the CloudLunacy agent's real calls and its real peers: the installer's
//! requests made by curl itself, the agent's axios requests byte for byte, a keep-alive load
//! that counts every failed request, an app that can be removed as a container is (its
//! connections closed), a TLS MongoDB stand-in that speaks the wire protocol's handshake, and
//! pymongo (the official driver) as the client.

use super::Server;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// An HTTP answer: status, headers (lowercase names) and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Reads one HTTP/1.1 response (Content-Length or close-delimited) from `reader`.
pub fn read_answer(reader: &mut impl BufRead) -> std::io::Result<Answer> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before an answer",
        ));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed in the headers",
            ));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let mut body = Vec::new();
    match length {
        Some(n) => {
            body.resize(n, 0);
            reader.read_exact(&mut body)?;
        }
        None => {
            reader.read_to_end(&mut body)?;
        }
    }
    Ok(Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Sends `request` (exact bytes) to 127.0.0.1:`port` and reads the answer.
pub fn raw_exchange(port: u16, request: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream.write_all(request).unwrap();
    read_answer(&mut BufReader::new(stream)).unwrap()
}

/// What axios 1.x on Node.js sends for `axios.post(url, object, {headers: {"Content-Type":
/// "application/json", Authorization: "Bearer <jwt>"}})`: `body` is `JSON.stringify(object)`,
/// exactly as the agent builds it (keys in its order, no spaces).
pub fn axios_post(port: u16, path: &str, jwt: &str, body: &str) -> Answer {
    let request = format!(
        "POST {path} HTTP/1.1\r\nAccept: application/json, text/plain, */*\r\nContent-Type: application/json\r\nAuthorization: Bearer {jwt}\r\nUser-Agent: axios/1.8.4\r\nContent-Length: {}\r\nAccept-Encoding: gzip, compress, deflate, br\r\nHost: 127.0.0.1:{port}\r\nConnection: keep-alive\r\n\r\n{body}",
        body.len()
    );
    raw_exchange(port, request.as_bytes())
}

/// `axios.get(url, {headers: {Authorization: "Bearer <jwt>"}})`.
pub fn axios_get(port: u16, path: &str, jwt: &str) -> Answer {
    let request = format!(
        "GET {path} HTTP/1.1\r\nAccept: application/json, text/plain, */*\r\nAuthorization: Bearer {jwt}\r\nUser-Agent: axios/1.8.4\r\nAccept-Encoding: gzip, compress, deflate, br\r\nHost: 127.0.0.1:{port}\r\nConnection: keep-alive\r\n\r\n"
    );
    raw_exchange(port, request.as_bytes())
}

/// Runs curl itself (as the installer does: `curl -s …`) and parses its answer; `args` are
/// the installer's own arguments after `-s`.
pub fn curl(args: &[&str]) -> Answer {
    let out = Command::new("curl")
        .args(["-s", "-i", "--max-time", "60"])
        .args(args)
        .output()
        .expect("curl is installed (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    read_answer(&mut BufReader::new(&out.stdout[..])).unwrap()
}

/// Keep-alive clients sending `GET /` for `host` through HAProxy on `port` as fast as they
/// are answered, until stopped. Every request is counted: an answer other than 200, or a
/// connection that fails before answering, is a failure (an answer with `Connection: close`
/// is not: the client opens a new connection, as browsers do).
pub struct Load {
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    /// Every distinct failure, for the message.
    pub errors: Arc<Mutex<Vec<String>>>,
    /// The body of the last answer of each client.
    pub last: Arc<Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    pub fn start(port: u16, host: &str, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let last = Arc::new(Mutex::new(vec![String::new(); clients]));
        let threads = (0..clients)
            .map(|i| {
                let (stop, ok, failed, errors, last) = (
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    errors.clone(),
                    last.clone(),
                );
                let host = host.to_string();
                std::thread::spawn(move || {
                    let request =
                        format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: load/1\r\n\r\n");
                    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
                    while !stop.load(Ordering::SeqCst) {
                        if conn.is_none() {
                            match TcpStream::connect(("127.0.0.1", port)) {
                                Ok(s) => {
                                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                                    let r = BufReader::new(s.try_clone().unwrap());
                                    conn = Some((s, r));
                                }
                                Err(e) => {
                                    failed.fetch_add(1, Ordering::SeqCst);
                                    errors.lock().unwrap().push(format!("connect: {e}"));
                                    std::thread::sleep(Duration::from_millis(10));
                                    continue;
                                }
                            }
                        }
                        let (stream, reader) = conn.as_mut().unwrap();
                        let answer = stream
                            .write_all(request.as_bytes())
                            .and_then(|()| read_answer(reader));
                        match answer {
                            Ok(a) if a.status == 200 => {
                                ok.fetch_add(1, Ordering::SeqCst);
                                last.lock().unwrap()[i] = a.body.clone();
                                if a.header("connection")
                                    .is_some_and(|c| c.eq_ignore_ascii_case("close"))
                                {
                                    conn = None;
                                }
                            }
                            Ok(a) => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                errors.lock().unwrap().push(format!(
                                    "status {}: {}",
                                    a.status,
                                    a.body.trim()
                                ));
                                conn = None;
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                errors.lock().unwrap().push(format!("request: {e}"));
                                conn = None;
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            errors,
            last,
            threads,
        }
    }

    /// Waits until `n` more requests were answered 200 (or panics after `timeout`).
    pub fn wait_for(&self, n: u64, timeout: Duration) {
        let target = self.ok.load(Ordering::SeqCst) + n;
        let deadline = Instant::now() + timeout;
        while self.ok.load(Ordering::SeqCst) < target {
            assert!(
                Instant::now() < deadline,
                "the load got {} answers, waited for {target}; failures: {:?}",
                self.ok.load(Ordering::SeqCst),
                self.errors.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the clients: (requests answered 200, failed requests, the failures).
    pub fn stop(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            self.errors.lock().unwrap().clone(),
        )
    }
}

/// An HTTP app (keep-alive, `backend=<name> …` as `http_backend`) that can be removed the
/// way the agent removes an old container: it stops listening and closes every connection.
pub struct App {
    pub port: u16,
    server: Option<Server>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
}

impl App {
    pub fn start(name: &str) -> App {
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (kept, name) = (streams.clone(), name.to_string());
        let server = Server::spawn_on("0.0.0.0", move |stream| {
            kept.lock().unwrap().push(stream.try_clone().unwrap());
            super::serve_http(stream, &name)
        });
        App {
            port: server.port,
            server: Some(server),
            streams,
        }
    }

    /// `docker stop` + `docker rm`: the listener goes, open connections are closed.
    pub fn remove(&mut self) {
        drop(self.server.take());
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.remove();
    }
}

// ---- MongoDB: a TLS stand-in speaking the wire protocol, and pymongo as the client. ----

/// A BSON value, as much of it as a handshake needs.
pub enum Bson {
    Double(f64),
    Str(String),
    Bool(bool),
    Int32(i32),
    Int64(i64),
    DateTime(i64),
}

/// Encodes a BSON document.
pub fn bson(doc: &[(&str, Bson)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (key, value) in doc {
        let (kind, bytes): (u8, Vec<u8>) = match value {
            Bson::Double(d) => (0x01, d.to_le_bytes().to_vec()),
            Bson::Str(s) => {
                let mut b = ((s.len() + 1) as i32).to_le_bytes().to_vec();
                b.extend_from_slice(s.as_bytes());
                b.push(0);
                (0x02, b)
            }
            Bson::Bool(v) => (0x08, vec![*v as u8]),
            Bson::DateTime(ms) => (0x09, ms.to_le_bytes().to_vec()),
            Bson::Int32(i) => (0x10, i.to_le_bytes().to_vec()),
            Bson::Int64(i) => (0x12, i.to_le_bytes().to_vec()),
        };
        body.push(kind);
        body.extend_from_slice(key.as_bytes());
        body.push(0);
        body.extend_from_slice(&bytes);
    }
    let mut out = ((body.len() + 5) as i32).to_le_bytes().to_vec();
    out.extend_from_slice(&body);
    out.push(0);
    out
}

/// The first key of a BSON document: a command's name.
fn first_key(doc: &[u8]) -> String {
    if doc.len() < 6 {
        return String::new();
    }
    let name = &doc[5..];
    let end = name.iter().position(|b| *b == 0).unwrap_or(0);
    String::from_utf8_lossy(&name[..end]).into_owned()
}

/// A mongod stand-in: TLS with `cert`/`key` (PEM), then OP_QUERY and OP_MSG commands
/// answered as a standalone server would for the handshake (`hello`, `isMaster`, `ping`,
/// `buildInfo`, …); `whoami` answers `{ok, standIn: <name>, sni: <server name it saw>}`.
/// A real mongod is not available on this machine.
pub fn mongod_stand_in(name: &str, cert_pem: &str, key_pem: &str) -> Server {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap(),
    );
    let name = name.to_string();
    Server::spawn_on("0.0.0.0", move |stream| {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
            return;
        };
        let mut tls = rustls::StreamOwned::new(conn, stream);
        loop {
            let mut header = [0u8; 16];
            if tls.read_exact(&mut header).is_err() {
                return;
            }
            let int = |b: &[u8]| i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            let (len, request_id, op) =
                (int(&header[0..4]), int(&header[4..8]), int(&header[12..16]));
            let mut rest = vec![0u8; (len as usize).saturating_sub(16)];
            if tls.read_exact(&mut rest).is_err() {
                return;
            }
            let command = match op {
                // OP_QUERY: flags, full collection name, skip, return, query document.
                2004 => {
                    let name_end = 4 + rest[4..].iter().position(|b| *b == 0).unwrap_or(0);
                    first_key(&rest[name_end + 9..])
                }
                // OP_MSG: flag bits, then a kind-0 section with the command document.
                2013 => first_key(&rest[5..]),
                _ => return,
            };
            let sni = tls.conn.server_name().unwrap_or("-").to_string();
            let doc = match command.as_str() {
                "hello" | "isMaster" | "ismaster" => bson(&[
                    ("helloOk", Bson::Bool(true)),
                    ("ismaster", Bson::Bool(true)),
                    ("isWritablePrimary", Bson::Bool(true)),
                    ("maxBsonObjectSize", Bson::Int32(16 * 1024 * 1024)),
                    ("maxMessageSizeBytes", Bson::Int32(48_000_000)),
                    ("maxWriteBatchSize", Bson::Int32(100_000)),
                    ("localTime", Bson::DateTime(0)),
                    ("logicalSessionTimeoutMinutes", Bson::Int32(30)),
                    ("connectionId", Bson::Int32(1)),
                    ("minWireVersion", Bson::Int32(0)),
                    ("maxWireVersion", Bson::Int32(17)),
                    ("readOnly", Bson::Bool(false)),
                    ("ok", Bson::Double(1.0)),
                ]),
                "whoami" => bson(&[
                    ("ok", Bson::Double(1.0)),
                    ("standIn", Bson::Str(name.clone())),
                    ("sni", Bson::Str(sni)),
                    ("requests", Bson::Int64(request_id as i64)),
                ]),
                _ => bson(&[("ok", Bson::Double(1.0))]),
            };
            let mut reply = Vec::new();
            let body = match op {
                2004 => {
                    let mut b = 0i32.to_le_bytes().to_vec(); // responseFlags
                    b.extend_from_slice(&0i64.to_le_bytes()); // cursorID
                    b.extend_from_slice(&0i32.to_le_bytes()); // startingFrom
                    b.extend_from_slice(&1i32.to_le_bytes()); // numberReturned
                    b.extend_from_slice(&doc);
                    b
                }
                _ => {
                    let mut b = 0u32.to_le_bytes().to_vec(); // flagBits
                    b.push(0);
                    b.extend_from_slice(&doc);
                    b
                }
            };
            reply.extend_from_slice(&((16 + body.len()) as i32).to_le_bytes());
            reply.extend_from_slice(&(request_id.wrapping_add(1_000_000)).to_le_bytes());
            reply.extend_from_slice(&request_id.to_le_bytes());
            reply.extend_from_slice(&(if op == 2004 { 1i32 } else { 2013 }).to_le_bytes());
            reply.extend_from_slice(&body);
            if tls.write_all(&reply).and_then(|()| tls.flush()).is_err() {
                return;
            }
        }
    })
}

/// The Python interpreter with pymongo. Tests that need it fail (never skip) without it.
pub fn pymongo_python() -> &'static str {
    let ok = Command::new("python3")
        .args(["-c", "import pymongo"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "pymongo is not installed: these tests connect with MongoDB's own driver (pip install pymongo; scripts/setup installs it)"
    );
    "python3"
}

/// Connects with pymongo to `uri` (names under `resolve_suffix` resolve to 127.0.0.1, as DNS
/// would send them to the front server), verifying the server against the CA in `ca_file`,
/// and runs `whoami` on it: the answer as JSON, or pymongo's error.
pub fn pymongo_whoami(
    uri: &str,
    ca_file: &Path,
    resolve_suffix: &str,
) -> Result<serde_json::Value, String> {
    const SCRIPT: &str = r#"
import json, socket, sys
uri, ca, suffix = sys.argv[1], sys.argv[2], sys.argv[3]
real = socket.getaddrinfo
def resolve(host, *args, **kwargs):
    if isinstance(host, str) and host.endswith(suffix):
        host = "127.0.0.1"
    return real(host, *args, **kwargs)
socket.getaddrinfo = resolve
from pymongo import MongoClient
client = MongoClient(uri, tlsCAFile=ca, directConnection=True, serverSelectionTimeoutMS=10000, connectTimeoutMS=10000)
try:
    print(json.dumps(client.admin.command("whoami")))
finally:
    client.close()
"#;
    let out = Command::new(pymongo_python())
        .args(["-c", SCRIPT, uri])
        .arg(ca_file)
        .arg(resolve_suffix)
        .output()
        .expect("run python3");
    if out.status.success() {
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A TLS client config that trusts `ca_pem` and checks validity at `now` (seconds since the
/// epoch): to check what a daemon whose clock was moved forward presents.
pub fn client_config_at(ca_pem: &str, now: u64) -> Arc<rustls::ClientConfig> {
    #[derive(Debug)]
    struct At(u64);
    impl rustls::time_provider::TimeProvider for At {
        fn current_time(&self) -> Option<rustls::pki_types::UnixTime> {
            Some(rustls::pki_types::UnixTime::since_unix_epoch(
                Duration::from_secs(self.0),
            ))
        }
    }
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_details(
            Arc::new(rustls::crypto::ring::default_provider()),
            Arc::new(At(now)),
        )
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// A long-lived TLS connection through the front (a MongoDB client keeping its connection):
/// each `line` is answered by the backend on the same connection.
pub struct LongLived {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl LongLived {
    pub fn open(
        config: Arc<rustls::ClientConfig>,
        port: u16,
        sni: &str,
    ) -> std::io::Result<LongLived> {
        let name = rustls::pki_types::ServerName::try_from(sni.to_string())
            .map_err(std::io::Error::other)?;
        let conn = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(LongLived {
            tls: rustls::StreamOwned::new(conn, stream),
        })
    }

    /// Completes the TLS handshake (the certificate is verified here).
    pub fn handshake(&mut self) -> std::io::Result<()> {
        while self.tls.conn.is_handshaking() {
            self.tls.conn.complete_io(&mut self.tls.sock)?;
        }
        Ok(())
    }

    pub fn line(&mut self, line: &str) -> std::io::Result<String> {
        self.tls.write_all(format!("{line}\n").as_bytes())?;
        self.tls.flush()?;
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            if self.tls.read(&mut byte)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the connection was closed",
                ));
            }
            if byte[0] == b'\n' {
                return Ok(String::from_utf8_lossy(&reply).into_owned());
            }
            reply.push(byte[0]);
        }
    }
}

/// A TLS echo backend that keeps connections open: each line is answered `<name>: <line>`.
pub fn tls_echo(name: &str, cert_pem: &str, key_pem: &str) -> Server {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap(),
    );
    let name = name.to_string();
    Server::spawn_on("0.0.0.0", move |stream| {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
        let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
            return;
        };
        let mut tls = rustls::StreamOwned::new(conn, stream);
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            match tls.read(&mut byte) {
                Ok(0) | Err(_) => return,
                Ok(_) if byte[0] == b'\n' => {
                    let reply = format!("{name}: {}\n", String::from_utf8_lossy(&line));
                    line.clear();
                    if tls
                        .write_all(reply.as_bytes())
                        .and_then(|()| tls.flush())
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(_) => line.push(byte[0]),
            }
        }
    })
}

/// A plain listener that is never a real service: the port of something local (to check
/// that routes cannot reach it).
pub fn listener_port() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

// ---- A front server with the agent API, whose clock the test moves. ----

pub const ADMIN: &str = "admin-token-0123456789-abcdefghijklmnop";

/// A daemon serving the API, on a state written by the test, with its clock offset read from
/// a file the test controls (`LUNAFRONT_TEST_CLOCK_FILE`).
pub struct ApiFront {
    pub site: super::Site,
    pub daemon: super::Daemon,
    pub api: u16,
    pub http: u16,
    pub tcp: u16,
    pub clock: std::path::PathBuf,
}

impl ApiFront {
    /// A state with an HTTP listener, a TCP listener `mongodb` (`tls` is `passthrough` or
    /// `terminate, certificates: certs`), the API settings (`api` lines, indented by two) and
    /// `extra` top-level YAML.
    pub fn start(tls: &str, api: &str, extra: &str) -> ApiFront {
        ApiFront::start_with(tls, api, extra, &[])
    }

    /// `start_with`, returning once the daemon is ready (20 s at the most).
    pub fn start_ready(tls: &str, api: &str, extra: &str, files: &[(&str, String)]) -> ApiFront {
        let front = ApiFront::start_with(tls, api, extra, files);
        front
            .daemon
            .wait_for("/ready", 200, "ok", Duration::from_secs(20));
        front
    }

    /// `start`, with `files` (path in the site → text) written before the daemon starts.
    /// `{API}` in `extra` is the API's port.
    pub fn start_with(tls: &str, api: &str, extra: &str, files: &[(&str, String)]) -> ApiFront {
        let site = super::Site::new();
        for (path, text) in files {
            super::write(site.path(), path, text);
        }
        let (http, tcp, api_port) = (super::free_port(), super::free_port(), super::free_port());
        let extra = extra.replace("{API}", &api_port.to_string());
        let clock = site.path().join("clock-offset");
        std::fs::write(&clock, "0").unwrap();
        super::write(
            site.path(),
            "state/base.yaml",
            &format!(
                "version: 1\nlisteners:\n  http: {{ bind: \"127.0.0.1:{http}\" }}\n  mongodb: {{ bind: \"127.0.0.1:{tcp}\", tls: {tls} }}\napi:\n  apps_domain: apps.example.com\n  mongodb_domain: mongodb.example.com\n{api}{extra}{}",
                site.folder_target_block("daemon")
            ),
        );
        super::write(site.path(), "admin.token", ADMIN);
        let daemon = daemon_with_clock(&site, api_port, &clock);
        ApiFront {
            site,
            daemon,
            api: api_port,
            http,
            tcp,
            clock,
        }
    }

    pub fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        api_call(self.api, method, path, token, body)
    }

    /// `call` from a loopback address of its own (each client has its own rate limit).
    pub fn call_from(
        &self,
        source: &str,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let (status, text) = super::http_json_from(
            source.parse().unwrap(),
            self.api,
            method,
            path,
            token,
            body.as_ref(),
        );
        let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        (status, value)
    }

    /// `lunafront agent enroll NAME`: the one-time token the agent registers with.
    pub fn enroll(&self, agent: &str) -> String {
        let (code, stdout, stderr) = super::run(
            &["agent", "enroll", agent, "state", "--target", "local"],
            self.site.path(),
        );
        assert_eq!(code, 0, "{stderr}");
        stdout.trim().to_string()
    }

    /// Enrolls and registers `agent` at `ip` (JSON body); returns its token.
    pub fn register(&self, agent: &str, ip: &str) -> String {
        let key = self.enroll(agent);
        let (status, body) = self.call(
            "POST",
            "/api/agent/register",
            None,
            Some(serde_json::json!({"agentId": agent, "agentKey": key, "agentName": agent, "targetIp": ip})),
        );
        assert_eq!(status, 201, "{body}");
        body["token"].as_str().unwrap().to_string()
    }

    /// Moves the daemon's clock to `seconds` past the real time.
    pub fn set_clock(&self, seconds: u64) {
        std::fs::write(&self.clock, seconds.to_string()).unwrap();
    }

    /// (HAProxy's reload counter, its current worker PIDs).
    pub fn generation(&self) -> (u32, Vec<u32>) {
        self.site.generation()
    }
}

/// A request to the API on `api`: the status and the answer as JSON (a JSON string where it is
/// not JSON).
pub fn api_call(
    api: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let (status, text) = super::http_json(api, method, path, token, body.as_ref());
    let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, value)
}

/// `POST /v1/agents` as the administrator to the API on `api`: agent `id` at `address`.
pub fn post_agent(api: u16, id: &str, address: &str) -> (u16, serde_json::Value) {
    api_call(
        api,
        "POST",
        "/v1/agents",
        Some(ADMIN),
        Some(serde_json::json!({"id": id, "address": address})),
    )
}

/// `lunafront daemon state --api 127.0.0.1:<api>` with the admin token and the clock file.
pub fn daemon_with_clock(site: &super::Site, api: u16, clock: &Path) -> super::Daemon {
    let port = super::free_port();
    let log_path = site.path().join(format!("daemon-{port}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let child = super::lunafront()
        .args(["daemon", "state", "--target", "local", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--api", &format!("127.0.0.1:{api}")])
        .args(["--admin-token-file", "admin.token"])
        .env("LUNAFRONT_TEST_CLOCK_FILE", clock)
        .current_dir(site.path())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let daemon = super::Daemon {
        child,
        port,
        log: log_path,
    };
    assert!(
        super::wait_for_port(port, Duration::from_secs(20))
            && super::wait_for_port(api, Duration::from_secs(20)),
        "the daemon did not listen: {}",
        daemon.log_text()
    );
    daemon.wait_for("/health", 200, "ok", Duration::from_secs(20));
    daemon
}

/// An HTTPS app: TLS with `leaf`, one request per connection, `backend=<name> tls=yes`.
pub fn https_app(name: &str, leaf: &super::Leaf) -> Server {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .map(|c| c.unwrap())
            .collect();
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap(),
    );
    let name = name.to_string();
    Server::spawn_on("0.0.0.0", move |stream| {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
            return;
        };
        let mut tls = rustls::StreamOwned::new(conn, stream);
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !seen.ends_with(b"\r\n\r\n") {
            match tls.read(&mut byte) {
                Ok(1) => seen.push(byte[0]),
                _ => return,
            }
        }
        let text = format!("backend={name} tls=yes\n");
        let _ = tls.write_all(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            )
            .as_bytes(),
        );
        tls.conn.send_close_notify();
        let _ = tls.flush();
    })
}
