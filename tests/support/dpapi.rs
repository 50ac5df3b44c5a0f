//! A Data Plane API test server: the endpoints lunafront uses, as
//! `../shared/reference/dataplaneapi-v3.4-spec.yaml` specifies them, backed by a real HAProxy.
//! It keeps the configuration file with its `# _version=N` line, checks pushes with
//! `haproxy -c`, reloads HAProxy through its master CLI (reload IDs, in_progress → succeeded or
//! failed), keeps map files and general files in storage folders, and changes HAProxy's maps
//! through its runtime API. Faults can be injected: a conflicting writer (409), 5xx answers,
//! slow answers, malformed answers. It stands in for the real API (a Go service we do not
//! ship); everything behind it is real.

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
}

struct ApiState {
    version: u64,
    reloads: BTreeMap<String, (String, String)>,
    next_reload: u64,
    /// `METHOD path?query` of every request, in order.
    log: Vec<String>,
    faults: Faults,
}

struct Shared {
    dir: PathBuf,
    authorization: String,
    haproxy: HaproxyTarget,
    state: Mutex<ApiState>,
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
        for sub in ["maps", "general"] {
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
            }),
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
    let query = query
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
        query,
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
        std::thread::sleep(delay);
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

fn storage(
    shared: &Arc<Shared>,
    r: &Request,
    method: &str,
    kind: &str,
    name: Option<&str>,
) -> Response {
    let dir = shared.dir.join(kind);
    if name.is_some_and(|n| n.contains('/') || n.starts_with('.')) {
        return error(400, "invalid name");
    }
    match (method, name) {
        ("GET", Some(name)) => match std::fs::read(dir.join(name)) {
            Ok(bytes) => Response {
                status: 200,
                headers: vec![("Content-Type".into(), "application/octet-stream".into())],
                body: bytes,
            },
            Err(_) => error(404, "no such file"),
        },
        ("POST", None) => {
            let Some((name, bytes)) = upload(r) else {
                return error(400, "a multipart file_upload is required");
            };
            if dir.join(&name).exists() {
                return error(409, "the file already exists");
            }
            std::fs::write(dir.join(&name), bytes).unwrap();
            json(
                201,
                serde_json::json!({ "storage_name": name, "file": dir.join(&name) }),
            )
        }
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
