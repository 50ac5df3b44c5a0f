//! A Data Plane API test server: the endpoints lunafront uses, as the API's specification
//! (`tests/fixtures/dataplaneapi/dataplaneapi-v3.4-spec.yaml`, HAProxy Technologies' own,
//! Apache-2.0) specifies them, backed by a real HAProxy.
//! It keeps the configuration file with its `# _version=N` line, checks pushes with
//! `haproxy -c`, reloads HAProxy through its master CLI (reload IDs, in_progress → succeeded or
//! failed), keeps map files, general files, certificates and crt-lists in storage folders
//! (certificates answered with metadata only, as the API does), and changes HAProxy's maps,
//! certificates and crt-lists through its runtime API. Faults can be injected: a conflicting writer (409), 5xx answers,
//! slow answers, malformed answers. It stands in for the real API (a Go service we do not
//! ship); everything behind it is real. Every request and answer is checked against the
//! specification (`spec_problems`; paths, methods, parameters, content types, status codes,
//! headers and JSON bodies), so neither lunafront's client nor this server can drift from the
//! real API unnoticed: a test fails when its server is dropped with a problem.

use super::{Haproxy, Server, haproxy_bin, haproxy_check};
use base64::Engine;
use lunafront::model::HaproxyTarget;
use lunafront::model::names::Duration as ModelDuration;
use lunafront::target::haproxy::process;
use lunafront::target::haproxy::socket::{Expect, RuntimeApi};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const USER: &str = "admin";

/// Faults to inject; each counter is used up one request at a time.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Pushes (POST raw) that find someone else changed the configuration just before: the
    /// version is bumped, so the push gets a 409.
    pub conflicts: u32,
    /// Requests answered 500 before anything is done.
    pub errors: u32,
    /// Every answer is delayed this long.
    pub delay: Option<Duration>,
    /// Configuration reads answered without their `Configuration-Version` header.
    pub malformed: u32,
    /// Pushes (not validations) answered 500 before anything is written.
    pub push_errors: u32,
    /// Pushes answered 201 once HAProxy reloaded (no reload ID to wait on), as an API that
    /// reloads before answering does.
    pub answer_201: bool,
    /// Once a push error is injected, the next this many requests are answered 500 too: the
    /// API stays down while lunafront tries to put the previous configuration back.
    pub then_errors: u32,
}

struct ApiState {
    version: u64,
    reloads: BTreeMap<String, (String, String)>,
    next_reload: u64,
    /// `METHOD path?query` of every request, in order.
    log: Vec<String>,
    faults: Faults,
    /// Every request and its answer, for the specification check (never cleared).
    exchanges: Vec<Exchange>,
}

/// One request and the answer it got.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub method: String,
    /// As sent, percent-encoded.
    pub path: String,
    pub query: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub response: Vec<u8>,
}

struct Shared {
    dir: PathBuf,
    authorization: String,
    haproxy: HaproxyTarget,
    state: Mutex<ApiState>,
    /// Signalled when the faults change: a delayed answer waits on it.
    faults_changed: std::sync::Condvar,
    /// One reload at a time, as the real API's reload agent does.
    reloading: Mutex<()>,
}

/// The API on a loopback port and the HAProxy behind it, both stopped on drop.
pub struct DataplaneApi {
    pub port: u16,
    pub dir: PathBuf,
    shared: Arc<Shared>,
    _server: Server,
    _haproxy: Haproxy,
}

impl DataplaneApi {
    /// Starts HAProxy on a placeholder configuration serving `port` (503 for everything) and
    /// the API in front of it; files live under `dir`.
    pub fn start(dir: &Path, password: &str, port: u16) -> DataplaneApi {
        for sub in ["maps", "general", "ssl"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let config = dir.join("haproxy.cfg");
        std::fs::write(
            &config,
            format!(
                "# _version=1\nglobal\n    stats socket {}/admin.sock mode 600 level admin\ndefaults\n    mode http\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\nfrontend placeholder\n    bind 127.0.0.1:{port}\n    http-request return status 503\n",
                dir.display()
            ),
        )
        .unwrap();
        let haproxy = Haproxy::start(&config, &dir.join("master.sock"), &[port]);
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            authorization: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{password}"))
            ),
            haproxy: HaproxyTarget {
                config: config.clone(),
                master_socket: dir.join("master.sock"),
                runtime_socket: dir.join("admin.sock"),
                spawn: false,
                reload_timeout: ModelDuration::from_ms(10_000),
                state_dir: dir.join("unused"),
                history: 1,
                haproxy_bin: PathBuf::from(haproxy_bin()),
                fleet: Default::default(),
            },
            state: Mutex::new(ApiState {
                version: 1,
                reloads: BTreeMap::new(),
                next_reload: 1,
                log: Vec::new(),
                faults: Faults::default(),
                exchanges: Vec::new(),
            }),
            faults_changed: std::sync::Condvar::new(),
            reloading: Mutex::new(()),
        });
        let handler = shared.clone();
        let server = Server::spawn(move |stream| handle(&handler, stream));
        DataplaneApi {
            port: server.port,
            dir: dir.to_path_buf(),
            shared,
            _server: server,
            _haproxy: haproxy,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set_faults(&self, faults: Faults) {
        self.shared.state.lock().unwrap().faults = faults;
        self.shared.faults_changed.notify_all();
    }

    /// Every request and its answer so far.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.shared.state.lock().unwrap().exchanges.clone()
    }

    /// What the requests and answers so far do that the specification does not allow.
    pub fn spec_problems(&self) -> Vec<String> {
        self.exchanges().iter().flat_map(spec::check).collect()
    }

    /// What is left of the injected faults.
    pub fn faults(&self) -> Faults {
        self.shared.state.lock().unwrap().faults.clone()
    }

    pub fn version(&self) -> u64 {
        self.shared.state.lock().unwrap().version
    }

    /// Every request so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.state.lock().unwrap().log.clone()
    }

    pub fn clear_requests(&self) {
        self.shared.state.lock().unwrap().log.clear();
    }

    /// The configuration file as the API keeps it (with its version line).
    pub fn config_file(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.cfg")).unwrap()
    }

    /// Another writer changes the configuration (a comment), as someone using the API by hand.
    pub fn hand_edit(&self, comment: &str) {
        let mut state = self.shared.state.lock().unwrap();
        let text = strip_version(&self.config_file());
        state.version += 1;
        std::fs::write(
            self.dir.join("haproxy.cfg"),
            format!("# _version={}\n# {comment}\n{text}", state.version),
        )
        .unwrap();
    }

    pub fn runtime(&self) -> RuntimeApi {
        RuntimeApi::new(&self.dir.join("admin.sock"))
    }

    /// Reloads that ended, by status.
    pub fn reload_statuses(&self) -> Vec<String> {
        let state = self.shared.state.lock().unwrap();
        state.reloads.values().map(|(s, _)| s.clone()).collect()
    }
}

fn strip_version(text: &str) -> String {
    text.split_inclusive('\n')
        .filter(|l| !l.starts_with("# _version="))
        .collect()
}

struct Request {
    method: String,
    path: String,
    /// The path and query as sent (for the specification check).
    raw_path: String,
    raw_query: Vec<(String, String)>,
    query: BTreeMap<String, String>,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Request {
    fn flag(&self, name: &str) -> bool {
        self.query
            .get(name)
            .is_some_and(|v| v == "true" || v == "1")
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn json(status: u16, value: serde_json::Value) -> Response {
    Response {
        status,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: value.to_string().into_bytes(),
    }
}

fn error(status: u16, message: &str) -> Response {
    json(
        status,
        serde_json::json!({ "code": status, "message": message }),
    )
}

fn empty(status: u16) -> Response {
    Response {
        status,
        headers: Vec::new(),
        body: Vec::new(),
    }
}

fn read_request(stream: &mut TcpStream) -> Option<Request> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let raw_query: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), decode(v))
        })
        .collect();
    Some(Request {
        method,
        path: path.to_string(),
        raw_path: path.to_string(),
        query: raw_query.iter().cloned().collect(),
        raw_query,
        headers,
        body,
    })
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
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

fn handle(shared: &Arc<Shared>, mut stream: TcpStream) {
    let Some(request) = read_request(&mut stream) else {
        return;
    };
    let query: Vec<String> = request
        .query
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let (delay, fail) = {
        let mut state = shared.state.lock().unwrap();
        state.log.push(format!(
            "{} {}{}",
            request.method,
            request.path,
            if query.is_empty() {
                String::new()
            } else {
                format!("?{}", query.join("&"))
            }
        ));
        let fail = state.faults.errors > 0;
        if fail {
            state.faults.errors -= 1;
        }
        (state.faults.delay, fail)
    };
    if let Some(delay) = delay {
        // Slow until the delay passes, or stalled until the test changes the faults: the
        // client gave up long ago, and the request is dropped unanswered.
        let state = shared.state.lock().unwrap();
        let (state, wait) = shared
            .faults_changed
            .wait_timeout_while(state, delay, |s| s.faults.delay == Some(delay))
            .unwrap();
        if !wait.timed_out() {
            drop(state);
            return;
        }
    }
    let response = if request.headers.get("authorization") != Some(&shared.authorization) {
        error(401, "invalid credentials")
    } else if fail {
        error(500, "injected failure")
    } else {
        route(shared, &request)
    };
    let reason = match response.status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        409 => "Conflict",
        _ => "Error",
    };
    shared.state.lock().unwrap().exchanges.push(Exchange {
        method: request.method.clone(),
        path: request.raw_path.clone(),
        query: request.raw_query.clone(),
        content_type: request.headers.get("content-type").cloned(),
        body: request.body.clone(),
        status: response.status,
        headers: response.headers.clone(),
        response: response.body.clone(),
    });
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", response.status);
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        response.body.len()
    ));
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&response.body);
}

fn route(shared: &Arc<Shared>, r: &Request) -> Response {
    let Some(path) = r.path.strip_prefix("/v3/services/haproxy/") else {
        return error(404, "not found");
    };
    let segments: Vec<String> = path.split('/').map(decode).collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    match (r.method.as_str(), segments.as_slice()) {
        ("GET", ["configuration", "raw"]) => get_raw(shared),
        ("POST", ["configuration", "raw"]) => post_raw(shared, r),
        ("GET", ["reloads", id]) => {
            let state = shared.state.lock().unwrap();
            match state.reloads.get(*id) {
                Some((status, response)) => json(
                    200,
                    serde_json::json!({ "id": id, "status": status, "response": response }),
                ),
                None => error(404, "no such reload"),
            }
        }
        (method, ["storage", kind @ ("maps" | "general"), rest @ ..]) => {
            storage(shared, r, method, kind, rest.first().copied())
        }
        (method, ["runtime", "maps", map, "entries", rest @ ..]) => {
            runtime_map(shared, r, method, map, rest.first().copied())
        }
        (
            method,
            [
                "storage",
                kind @ ("ssl_certificates" | "ssl_crt_lists"),
                rest @ ..,
            ],
        ) => ssl_storage(shared, r, method, kind, rest.first().copied()),
        (method, ["runtime", "ssl_certs", rest @ ..]) => {
            runtime_ssl_cert(shared, r, method, rest.first().copied())
        }
        (method, ["runtime", "ssl_crt_lists", "entries"]) => runtime_crt_list(shared, r, method),
        _ => error(404, "not found"),
    }
}

fn get_raw(shared: &Shared) -> Response {
    let mut state = shared.state.lock().unwrap();
    let text = std::fs::read(shared.dir.join("haproxy.cfg")).unwrap();
    let mut headers = vec![("Content-Type".to_string(), "text/plain".to_string())];
    if state.faults.malformed > 0 {
        state.faults.malformed -= 1;
    } else {
        headers.push(("Configuration-Version".into(), state.version.to_string()));
    }
    Response {
        status: 200,
        headers,
        body: text,
    }
}

/// `haproxy -c` on a configuration written beside the real one (paths resolve the same way).
fn check(shared: &Shared, text: &[u8]) -> Result<(), String> {
    let staged = shared
        .dir
        .join(format!(".check-{:?}.cfg", std::thread::current().id()));
    std::fs::write(&staged, text).unwrap();
    let result = haproxy_check(&staged);
    let _ = std::fs::remove_file(&staged);
    result
}

fn post_raw(shared: &Arc<Shared>, r: &Request) -> Response {
    let mut state = shared.state.lock().unwrap();
    if state.faults.conflicts > 0 && !r.flag("only_validate") {
        state.faults.conflicts -= 1;
        state.version += 1;
    }
    let version_header = |v: u64| ("Configuration-Version".to_string(), v.to_string());
    if !r.flag("skip_version") {
        match r.query.get("version").map(|v| v.parse::<u64>()) {
            Some(Ok(v)) if v == state.version => {}
            Some(Ok(_)) => {
                let mut response = error(409, "version mismatch");
                response.headers.push(version_header(state.version));
                return response;
            }
            _ => return error(400, "version is required"),
        }
    }
    if state.faults.push_errors > 0 && !r.flag("only_validate") {
        state.faults.push_errors -= 1;
        state.faults.errors += state.faults.then_errors;
        return error(500, "injected failure");
    }
    let body = strip_version(&String::from_utf8_lossy(&r.body));
    if let Err(detail) = check(shared, body.as_bytes()) {
        return error(400, &detail);
    }
    if r.flag("only_validate") {
        return Response {
            status: 202,
            headers: vec![version_header(state.version)],
            body: body.into_bytes(),
        };
    }
    state.version += 1;
    let file = shared.dir.join("haproxy.cfg");
    let tmp = shared.dir.join(".haproxy.cfg.tmp");
    std::fs::write(&tmp, format!("# _version={}\n{body}", state.version)).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    if state.faults.answer_201 {
        let _one = shared.reloading.lock().unwrap();
        return match process::reload(&shared.haproxy) {
            Ok(_) => Response {
                status: 201,
                headers: vec![version_header(state.version)],
                body: body.into_bytes(),
            },
            Err(e) => error(500, &e.to_string()),
        };
    }
    let id = start_reload(shared, &mut state);
    // Go's net/http writes header names canonically: the spec's `Reload-ID` goes out as
    // `Reload-Id`.
    Response {
        status: 202,
        headers: vec![version_header(state.version), ("Reload-Id".into(), id)],
        body: body.into_bytes(),
    }
}

/// Starts a reload in the background; its status is `in_progress` until HAProxy's new worker
/// answers (`succeeded`) or the master reports the reload failed (`failed`).
fn start_reload(shared: &Arc<Shared>, state: &mut ApiState) -> String {
    let id = format!("2026-11-28-{}", state.next_reload);
    state.next_reload += 1;
    state
        .reloads
        .insert(id.clone(), ("in_progress".into(), String::new()));
    let (shared, reload) = (shared.clone(), id.clone());
    std::thread::spawn(move || {
        let outcome = {
            let _one = shared.reloading.lock().unwrap();
            process::reload(&shared.haproxy)
        };
        let entry = match outcome {
            Ok(pid) => ("succeeded".to_string(), format!("new worker {pid}")),
            Err(e) => ("failed".to_string(), e.to_string()),
        };
        shared.state.lock().unwrap().reloads.insert(reload, entry);
    });
    id
}

/// The uploaded file of a `multipart/form-data` body (field `file_upload`): (name, bytes).
fn upload(r: &Request) -> Option<(String, Vec<u8>)> {
    let content_type = r.headers.get("content-type")?;
    let boundary = content_type.split("boundary=").nth(1)?.trim_matches('"');
    let body = &r.body;
    let head_end = find(body, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&body[..head_end]);
    if !head.contains("name=\"file_upload\"") {
        return None;
    }
    let name = head
        .split("filename=\"")
        .nth(1)?
        .split('"')
        .next()?
        .to_string();
    let end = find(&body[head_end..], format!("\r\n--{boundary}").as_bytes())? + head_end;
    Some((name, body[head_end..end].to_vec()))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Whether a storage name would leave the storage folder (a path, or a dot file such as `..`).
fn unsafe_name(name: &str) -> bool {
    name.contains('/') || name.starts_with('.')
}

/// A 200 whose body is a stored file's bytes (`application/octet-stream`).
fn file_response(bytes: Vec<u8>) -> Response {
    Response {
        status: 200,
        headers: vec![("Content-Type".into(), "application/octet-stream".into())],
        body: bytes,
    }
}

/// Writes a POST's multipart `file_upload` into `dir`: its name and bytes, or the refusal
/// (400 without an upload, 409 when the file exists).
fn save_upload(r: &Request, dir: &Path) -> Result<(String, Vec<u8>), Response> {
    let Some((name, bytes)) = upload(r) else {
        return Err(error(400, "a multipart file_upload is required"));
    };
    if dir.join(&name).exists() {
        return Err(error(409, "the file already exists"));
    }
    std::fs::write(dir.join(&name), &bytes).unwrap();
    Ok((name, bytes))
}

fn storage(
    shared: &Arc<Shared>,
    r: &Request,
    method: &str,
    kind: &str,
    name: Option<&str>,
) -> Response {
    let dir = shared.dir.join(kind);
    if name.is_some_and(unsafe_name) {
        return error(400, "invalid name");
    }
    match (method, name) {
        ("GET", Some(name)) => match std::fs::read(dir.join(name)) {
            Ok(bytes) => file_response(bytes),
            Err(_) => error(404, "no such file"),
        },
        ("POST", None) => match save_upload(r, &dir) {
            Ok((name, _)) => json(
                201,
                serde_json::json!({ "storage_name": name, "file": dir.join(&name) }),
            ),
            Err(refused) => refused,
        },
        ("PUT", Some(name)) => {
            if !dir.join(name).exists() {
                return error(404, "no such file");
            }
            // Maps are replaced with a text/plain body, general files with a multipart one.
            let bytes = if kind == "maps" {
                r.body.clone()
            } else {
                match upload(r) {
                    Some((_, bytes)) => bytes,
                    None => return error(400, "a multipart file_upload is required"),
                }
            };
            std::fs::write(dir.join(name), bytes).unwrap();
            if r.flag("skip_reload") {
                empty(204)
            } else {
                let mut state = shared.state.lock().unwrap();
                let id = start_reload(shared, &mut state);
                Response {
                    status: 202,
                    headers: vec![("Reload-Id".into(), id)],
                    body: Vec::new(),
                }
            }
        }
        ("DELETE", Some(name)) => match std::fs::remove_file(dir.join(name)) {
            Ok(()) => empty(204),
            Err(_) => error(404, "no such file"),
        },
        _ => error(404, "not found"),
    }
}

/// SHA-256 of the first certificate of a PEM file, upper-case hex.
fn cert_fingerprint(pem: &[u8]) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::pem_slice_iter(pem)
        .next()
        .and_then(Result::ok)
        .map(|c| c.to_vec())
        .unwrap_or_default();
    lunafront::plan::sha256_hex(&der).to_uppercase()
}

/// The SSL storage: certificates (answered with metadata, as the API does: never the file)
/// and crt-lists (answered with the file), in one folder, `ssl/`.
fn ssl_storage(
    shared: &Arc<Shared>,
    r: &Request,
    method: &str,
    kind: &str,
    name: Option<&str>,
) -> Response {
    let dir = shared.dir.join("ssl");
    if name.is_some_and(unsafe_name) {
        return error(400, "invalid name");
    }
    let meta = |name: &str, bytes: &[u8]| {
        serde_json::json!({
            "storage_name": name,
            "file": dir.join(name),
            "sha256_finger_print": cert_fingerprint(bytes),
            "size": bytes.len(),
        })
    };
    let described = |name: &str, bytes: &[u8]| match kind {
        "ssl_certificates" => meta(name, bytes),
        _ => serde_json::json!({ "storage_name": name, "file": dir.join(name) }),
    };
    match (method, name) {
        ("GET", Some(name)) => match std::fs::read(dir.join(name)) {
            Ok(bytes) if kind == "ssl_certificates" => json(200, meta(name, &bytes)),
            Ok(bytes) => file_response(bytes),
            Err(_) => error(404, "no such file"),
        },
        ("POST", None) => match save_upload(r, &dir) {
            Ok((name, bytes)) => json(201, described(&name, &bytes)),
            Err(refused) => refused,
        },
        ("PUT", Some(name)) => {
            if !dir.join(name).exists() {
                return error(404, "no such file");
            }
            std::fs::write(dir.join(name), &r.body).unwrap();
            if r.flag("skip_reload") {
                json(200, described(name, &r.body))
            } else {
                let mut state = shared.state.lock().unwrap();
                let id = start_reload(shared, &mut state);
                let mut response = json(202, described(name, &r.body));
                response.headers.push(("Reload-Id".into(), id));
                response
            }
        }
        ("DELETE", Some(name)) => match std::fs::remove_file(dir.join(name)) {
            Ok(()) => empty(204),
            Err(_) => error(404, "no such file"),
        },
        _ => error(404, "not found"),
    }
}

/// `set ssl cert` + `commit ssl cert` through HAProxy's runtime API.
fn load_cert(api: &RuntimeApi, path: &str, pem: &[u8]) -> Result<(), String> {
    let payload: String = String::from_utf8_lossy(pem)
        .lines()
        .map(|l| format!("{l}\n"))
        .collect();
    api.run(
        &format!("set ssl cert {path} <<\n{payload}\n"),
        Expect::Prefix("Transaction"),
    )
    .map_err(|e| e.to_string())?;
    let answer = api
        .run(&format!("commit ssl cert {path}"), Expect::Any)
        .map_err(|e| e.to_string())?;
    if answer.contains("Success") {
        Ok(())
    } else {
        Err(answer)
    }
}

/// Runtime certificates: created (`new ssl cert`), replaced, deleted; `name` is the
/// certificate's path as HAProxy knows it.
fn runtime_ssl_cert(shared: &Shared, r: &Request, method: &str, name: Option<&str>) -> Response {
    let api = RuntimeApi::new(&shared.dir.join("admin.sock"));
    let result = match (method, name) {
        ("POST", None) => {
            let Some((path, bytes)) = upload(r) else {
                return error(400, "a multipart file_upload is required");
            };
            api.run(
                &format!("new ssl cert {path}"),
                Expect::Prefix("New empty certificate store"),
            )
            .map_err(|e| e.to_string())
            .and_then(|_| load_cert(&api, &path, &bytes))
            .map(|()| empty(201))
        }
        ("PUT", Some(path)) => {
            let Some((_, bytes)) = upload(r) else {
                return error(400, "a multipart file_upload is required");
            };
            load_cert(&api, path, &bytes).map(|()| empty(200))
        }
        ("DELETE", Some(path)) => api
            .run(&format!("del ssl cert {path}"), Expect::Any)
            .map_err(|e| e.to_string())
            .and_then(deleted),
        _ => return error(404, "not found"),
    };
    result.unwrap_or_else(|e| error(400, &e))
}

/// A 204 when HAProxy's answer to a `del ssl …` says deleted; otherwise the answer, as the error.
fn deleted(answer: String) -> Result<Response, String> {
    match answer.contains("deleted") {
        true => Ok(empty(204)),
        false => Err(answer),
    }
}

/// Entries of a crt-list HAProxy serves, at runtime.
fn runtime_crt_list(shared: &Shared, r: &Request, method: &str) -> Response {
    let api = RuntimeApi::new(&shared.dir.join("admin.sock"));
    let query = |key: &str| r.query.get(key).cloned();
    let Some(list) = query("name") else {
        return error(400, "name is required");
    };
    let result = match method {
        "POST" => {
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            let Some(file) = body.get("file").and_then(|f| f.as_str()) else {
                return error(400, "file is required");
            };
            api.run(&format!("add ssl crt-list {list} {file}"), Expect::Any)
                .map_err(|e| e.to_string())
                .and_then(|a| match a.contains("Success") || a.contains("Inserting") {
                    true => Ok(empty(201)),
                    false => Err(a),
                })
        }
        "DELETE" => {
            let Some(cert) = query("cert_file") else {
                return error(400, "cert_file is required");
            };
            api.run(&format!("del ssl crt-list {list} {cert}"), Expect::Any)
                .map_err(|e| e.to_string())
                .and_then(deleted)
        }
        _ => return error(404, "not found"),
    };
    result.unwrap_or_else(|e| error(400, &e))
}

fn runtime_map(
    shared: &Shared,
    r: &Request,
    method: &str,
    map: &str,
    id: Option<&str>,
) -> Response {
    let api = RuntimeApi::new(&shared.dir.join("admin.sock"));
    let path = shared.dir.join("maps").join(map);
    let path = path.display();
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    let text = |key: &str| body.get(key).and_then(|v| v.as_str()).map(str::to_string);
    let result = match (method, id) {
        ("GET", None) => {
            return match lunafront::target::haproxy::read_map(&api, &path.to_string()) {
                Ok(entries) => json(
                    200,
                    entries
                        .iter()
                        .map(|(k, v)| serde_json::json!({ "id": k, "key": k, "value": v }))
                        .collect(),
                ),
                Err(e) => error(404, &e.to_string()),
            };
        }
        ("POST", None) => match (text("key"), text("value")) {
            (Some(k), Some(v)) => api
                .run(&format!("add map {path} {k} {v}"), Expect::Empty)
                .map(|_| json(201, serde_json::json!({ "id": k, "key": k, "value": v }))),
            _ => return error(400, "key and value are required"),
        },
        ("PUT", Some(key)) => match text("value") {
            Some(v) => api
                .run(&format!("set map {path} {key} {v}"), Expect::Empty)
                .map(|_| {
                    json(
                        200,
                        serde_json::json!({ "id": key, "key": key, "value": v }),
                    )
                }),
            None => return error(400, "value is required"),
        },
        ("DELETE", Some(key)) => api
            .run(&format!("del map {path} {key}"), Expect::Empty)
            .map(|_| empty(204)),
        _ => return error(404, "not found"),
    };
    result.unwrap_or_else(|e| error(404, &e.to_string()))
}

impl Drop for DataplaneApi {
    /// Whatever the test checked, the API was spoken as specified.
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let problems = self.spec_problems();
        assert!(
            problems.is_empty(),
            "requests or answers the Data Plane API specification does not allow:\n{}",
            problems.join("\n")
        );
    }
}

/// The Data Plane API specification (Swagger 2.0), read from the file HAProxy Technologies
/// publishes, and the check of one exchange against it.
pub mod spec {
    use super::Exchange;
    use serde_json::{Value, json};
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    pub const PATH: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/dataplaneapi/dataplaneapi-v3.4-spec.yaml"
    );

    pub fn document() -> &'static Value {
        static SPEC: OnceLock<Value> = OnceLock::new();
        SPEC.get_or_init(|| {
            let text = std::fs::read_to_string(PATH).expect("the Data Plane API specification");
            let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
            to_json(yaml)
        })
    }

    /// YAML → JSON, with the response codes YAML reads as numbers kept as their text.
    fn to_json(v: serde_yaml::Value) -> Value {
        match v {
            serde_yaml::Value::Null => Value::Null,
            serde_yaml::Value::Bool(b) => Value::Bool(b),
            serde_yaml::Value::Number(n) => serde_json::to_value(&n).unwrap(),
            serde_yaml::Value::String(s) => Value::String(s),
            serde_yaml::Value::Sequence(items) => items.into_iter().map(to_json).collect(),
            serde_yaml::Value::Mapping(map) => Value::Object(
                map.into_iter()
                    .map(|(k, v)| {
                        let key = match k {
                            serde_yaml::Value::String(s) => s,
                            serde_yaml::Value::Number(n) => n.to_string(),
                            other => panic!("unexpected key {other:?}"),
                        };
                        (key, to_json(v))
                    })
                    .collect(),
            ),
            serde_yaml::Value::Tagged(t) => to_json(t.value),
        }
    }

    fn resolve(v: &Value) -> &Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => document()
                .pointer(r.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("unresolved {r}")),
            None => v,
        }
    }

    /// `value` is valid for `schema` (a fragment of the specification, whose `$ref`s point
    /// into its `definitions`).
    fn valid(schema: &Value, value: &Value) -> Result<(), String> {
        static VALIDATORS: OnceLock<Mutex<HashMap<String, jsonschema::Validator>>> =
            OnceLock::new();
        let key = schema.to_string();
        let mut cache = VALIDATORS.get_or_init(Default::default).lock().unwrap();
        if !cache.contains_key(&key) {
            let mut root = schema.clone();
            if let Some(object) = root.as_object_mut() {
                object.insert("definitions".into(), document()["definitions"].clone());
            }
            let validator = jsonschema::options()
                .with_draft(jsonschema::Draft::Draft4)
                .build(&root)
                .map_err(|e| format!("the specification's schema does not compile: {e}"))?;
            cache.insert(key.clone(), validator);
        }
        let errors: Vec<String> = cache[&key]
            .iter_errors(value)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    fn decode(segment: &str) -> String {
        super::decode(segment)
    }

    /// The path template of the specification a request path matches (the most literal one),
    /// with its parameters' values.
    fn template(path: &str) -> Option<(&'static str, Vec<(String, String)>)> {
        let base = document()["basePath"].as_str().unwrap_or("");
        let rest = path.strip_prefix(base)?;
        let segments: Vec<&str> = rest.split('/').collect();
        document()["paths"]
            .as_object()?
            .keys()
            .filter_map(|t| {
                let parts: Vec<&str> = t.split('/').collect();
                if parts.len() != segments.len() {
                    return None;
                }
                let mut params = Vec::new();
                let mut literal = 0;
                for (part, segment) in parts.iter().zip(&segments) {
                    if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                        if segment.is_empty() {
                            return None;
                        }
                        params.push((name.to_string(), decode(segment)));
                    } else if part == segment {
                        literal += 1;
                    } else {
                        return None;
                    }
                }
                Some((literal, t.as_str(), params))
            })
            .max_by_key(|(literal, ..)| *literal)
            .map(|(_, t, params)| (t, params))
    }

    /// A parameter's value as the JSON its declared type makes of the text.
    fn typed(param: &Value, text: &str) -> Value {
        match param["type"].as_str() {
            Some("boolean") => match text {
                "true" => json!(true),
                "false" => json!(false),
                _ => json!(text),
            },
            Some("integer") => text.parse::<i64>().map(|n| json!(n)).unwrap_or(json!(text)),
            _ => json!(text),
        }
    }

    /// The JSON Schema part of a (non-body) parameter.
    fn param_schema(param: &Value) -> Value {
        let mut schema = serde_json::Map::new();
        for key in [
            "type",
            "pattern",
            "enum",
            "minimum",
            "maximum",
            "maxLength",
            "minLength",
        ] {
            if let Some(v) = param.get(key) {
                schema.insert(key.into(), v.clone());
            }
        }
        Value::Object(schema)
    }

    /// The specification's name of the operation `exchange` called, if it names one.
    pub fn operation_id(exchange: &Exchange) -> Option<String> {
        let (template, _) = template(&exchange.path)?;
        document()["paths"][template]
            .get(exchange.method.to_ascii_lowercase())?
            .get("operationId")?
            .as_str()
            .map(str::to_string)
    }

    /// Everything `exchange` does that the specification does not allow.
    pub fn check(exchange: &Exchange) -> Vec<String> {
        let what = format!("{} {}", exchange.method, exchange.path);
        let mut problems = Vec::new();
        let Some((template, path_values)) = template(&exchange.path) else {
            return vec![format!("{what}: no such path in the specification")];
        };
        let item = &document()["paths"][template];
        let Some(operation) = item.get(exchange.method.to_ascii_lowercase()) else {
            return vec![format!(
                "{what}: {template} has no {} operation",
                exchange.method
            )];
        };
        let what = format!(
            "{what} ({})",
            operation["operationId"].as_str().unwrap_or("?")
        );
        let params: Vec<&Value> = item
            .get("parameters")
            .and_then(Value::as_array)
            .into_iter()
            .chain(operation.get("parameters").and_then(Value::as_array))
            .flatten()
            .map(resolve)
            .collect();
        let declared = |location: &str, name: &str| {
            params
                .iter()
                .find(|p| p["in"] == location && p["name"] == name)
                .copied()
        };

        // The request: path and query parameters, body, content type.
        for (name, value) in &path_values {
            match declared("path", name) {
                Some(p) => {
                    if let Err(e) = valid(&param_schema(p), &typed(p, value)) {
                        problems.push(format!("{what}: path parameter {name}={value:?}: {e}"));
                    }
                }
                None => problems.push(format!("{what}: path parameter {name} is not declared")),
            }
        }
        for (name, value) in &exchange.query {
            match declared("query", name) {
                Some(p) => {
                    if let Err(e) = valid(&param_schema(p), &typed(p, value)) {
                        problems.push(format!("{what}: query parameter {name}={value:?}: {e}"));
                    }
                }
                None => problems.push(format!(
                    "{what}: query parameter {name} is not a parameter of this operation"
                )),
            }
        }
        for p in &params {
            let name = p["name"].as_str().unwrap_or_default();
            let required = p["required"] == json!(true);
            let present = match p["in"].as_str() {
                Some("query") => exchange.query.iter().any(|(k, _)| k == name),
                Some("body") => !exchange.body.is_empty(),
                _ => true,
            };
            if required && !present {
                problems.push(format!("{what}: required parameter {name} is missing"));
            }
        }
        let content_type = exchange
            .content_type
            .as_deref()
            .map(|c| c.split(';').next().unwrap_or_default().trim().to_string());
        if !exchange.body.is_empty() {
            let consumes = operation
                .get("consumes")
                .or_else(|| document().get("consumes"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            match &content_type {
                Some(c) if consumes.iter().any(|x| x == c.as_str()) => {}
                other => problems.push(format!(
                    "{what}: body sent as {other:?}; the operation consumes {consumes:?}"
                )),
            }
            if content_type.as_deref() == Some("multipart/form-data") {
                let form = String::from_utf8_lossy(&exchange.body);
                for field in form.split("; name=\"").skip(1) {
                    let name = field.split('"').next().unwrap_or_default();
                    if declared("formData", name).is_none() {
                        problems.push(format!("{what}: form field {name} is not declared"));
                    }
                }
            }
            if content_type.as_deref() == Some("application/json")
                && let Some(body) = params.iter().find(|p| p["in"] == "body")
            {
                match serde_json::from_slice::<Value>(&exchange.body) {
                    Ok(v) => {
                        if let Err(e) = valid(&body["schema"], &v) {
                            problems.push(format!("{what}: request body: {e}"));
                        }
                    }
                    Err(e) => problems.push(format!("{what}: request body is not JSON: {e}")),
                }
            }
        }

        // The answer: a declared status (a success must be declared explicitly; an error may
        // be the `default` one), declared headers, and a body of the declared schema.
        let responses = &operation["responses"];
        let status = exchange.status.to_string();
        let response = match responses.get(&status) {
            Some(r) => resolve(r),
            None if exchange.status >= 400 && responses.get("default").is_some() => {
                resolve(&responses["default"])
            }
            None => {
                problems.push(format!(
                    "{what}: answered {status}, which the operation does not declare (it declares {:?})",
                    responses.as_object().map(|r| r.keys().collect::<Vec<_>>())
                ));
                return problems;
            }
        };
        let declared_headers: Vec<String> = response
            .get("headers")
            .and_then(Value::as_object)
            .map(|h| h.keys().map(|k| k.to_ascii_lowercase()).collect())
            .unwrap_or_default();
        for (name, _) in &exchange.headers {
            let name = name.to_ascii_lowercase();
            if !matches!(name.as_str(), "content-type" | "content-length")
                && !declared_headers.contains(&name)
            {
                problems.push(format!(
                    "{what}: answer {status} has header {name}, which it does not declare"
                ));
            }
        }
        // Operations that produce text (the raw configuration) declare their errors as text
        // too, while the API's handlers answer them with its JSON error object
        // (dataplaneapi handlers/raw.go: `...Default(code).WithPayload(e)`), as this server
        // does: JSON bodies are checked where the operation produces JSON.
        let produces_json = operation
            .get("produces")
            .or_else(|| document().get("produces"))
            .and_then(Value::as_array)
            .is_some_and(|p| p.iter().any(|x| x == "application/json"));
        let json_answer = exchange
            .headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v == "application/json");
        if produces_json
            && json_answer
            && let Some(schema) = response.get("schema")
        {
            match serde_json::from_slice::<Value>(&exchange.response) {
                Ok(v) => {
                    if let Err(e) = valid(schema, &v) {
                        problems.push(format!("{what}: answer {status}: {e}"));
                    }
                }
                Err(e) => problems.push(format!("{what}: answer {status} is not JSON: {e}")),
            }
        }
        problems
    }
}
