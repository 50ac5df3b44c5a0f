//! A client of HAProxy's Data Plane API v3 (I/O edge), built from its specification
//! (`dataplaneapi-v3.4-spec.yaml`): the raw configuration with its version, reloads, map
//! files (storage and runtime) and general storage. Reads are retried with backoff on
//! transport errors and 5xx; writes are not (the caller re-plans instead). The password is only
//! ever in the Authorization header: no error or log carries it.

use crate::model::{DataplaneTarget, PasswordSource};
use base64::Engine;
use std::collections::BTreeMap;
use std::io::Read;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum DpError {
    #[error("target {target}: {step}: {message}")]
    Transport {
        target: String,
        step: String,
        message: String,
    },
    #[error("target {target}: {step}: the Data Plane API answered {status}: {body}")]
    Status {
        target: String,
        step: String,
        status: u16,
        body: String,
    },
    #[error(
        "target {target}: {step}: someone else changed the configuration (409: version conflict)"
    )]
    Conflict { target: String, step: String },
    #[error("target {target}: {step}: unexpected answer: {message}")]
    Malformed {
        target: String,
        step: String,
        message: String,
    },
    #[error("target {target}: {step}: {message}")]
    Reload {
        target: String,
        step: String,
        message: String,
    },
}

pub struct Response {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Response {
    /// A header, case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub struct Client {
    pub target: String,
    base: String,
    authorization: String,
    agent: ureq::Agent,
    pub timeout: Duration,
}

/// What pushing a configuration gave.
pub struct Pushed {
    /// 201: applied without a reload; 202: a reload was requested.
    pub status: u16,
    pub reload_id: Option<String>,
}

const RETRIES: u32 = 3;

/// Reads the password from where the state says it is. The error names the place, never a value.
pub fn password(target_name: &str, source: &PasswordSource) -> Result<String, String> {
    match source {
        PasswordSource::Env(var) => std::env::var(var).map_err(|_| {
            format!(
                "target {target_name}: the environment variable {var} (its password) is not set"
            )
        }),
        PasswordSource::File(path) => std::fs::read_to_string(path)
            .map(|p| p.trim_end_matches(['\n', '\r']).to_string())
            .map_err(|e| {
                format!(
                    "target {target_name}: cannot read its password file {}: {e}",
                    path.display()
                )
            }),
    }
}

impl Client {
    pub fn new(name: &str, target: &DataplaneTarget) -> Result<Client, String> {
        let password = password(name, &target.password)?;
        let credentials = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{password}", target.username));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(target.timeout.as_std()))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Client {
            target: name.to_string(),
            base: format!("{}/v3", target.url),
            authorization: format!("Basic {credentials}"),
            agent,
            timeout: target.timeout.as_std(),
        })
    }

    fn transport(&self, step: &str, e: impl std::fmt::Display) -> DpError {
        DpError::Transport {
            target: self.target.clone(),
            step: step.to_string(),
            message: e.to_string(),
        }
    }

    fn once(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
        step: &str,
    ) -> Result<Response, DpError> {
        let url = format!("{}{path}", self.base);
        let result = match (method, body) {
            ("GET", _) => self
                .agent
                .get(&url)
                .header("Authorization", &self.authorization)
                .call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &self.authorization)
                .call(),
            (m, body) => {
                let (content_type, bytes) = body.unwrap_or(("application/json", b""));
                let request = match m {
                    "POST" => self.agent.post(&url),
                    _ => self.agent.put(&url),
                };
                request
                    .header("Authorization", &self.authorization)
                    .header("Content-Type", content_type)
                    .send(bytes)
            }
        };
        let mut response = result.map_err(|e| self.transport(step, e))?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    v.to_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        let mut body = Vec::new();
        response
            .body_mut()
            .as_reader()
            .take(64 * 1024 * 1024)
            .read_to_end(&mut body)
            .map_err(|e| self.transport(step, e))?;
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    /// A request; safe ones (`retry`) are retried with backoff on transport errors and 5xx.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
        step: &str,
        retry: bool,
    ) -> Result<Response, DpError> {
        let mut pause = Duration::from_millis(200);
        let attempts = if retry { RETRIES } else { 1 };
        let mut last = None;
        for attempt in 0..attempts {
            if attempt > 0 {
                std::thread::sleep(pause);
                pause *= 2;
            }
            match self.once(method, path, body, step) {
                Ok(r) if r.status >= 500 && retry && attempt + 1 < attempts => {
                    tracing::warn!(target = %self.target, status = r.status, "{step}: retrying");
                    last = Some(Ok(r));
                }
                Err(e @ DpError::Transport { .. }) if retry && attempt + 1 < attempts => {
                    tracing::warn!("{e}: retrying");
                    last = Some(Err(e));
                }
                other => return other,
            }
        }
        last.expect("at least one attempt")
    }

    fn expect(&self, response: Response, ok: &[u16], step: &str) -> Result<Response, DpError> {
        if ok.contains(&response.status) {
            return Ok(response);
        }
        if response.status == 409 {
            return Err(DpError::Conflict {
                target: self.target.clone(),
                step: step.to_string(),
            });
        }
        Err(DpError::Status {
            target: self.target.clone(),
            step: step.to_string(),
            status: response.status,
            body: response.text().chars().take(500).collect(),
        })
    }

    /// The configuration file (without the API's `# _version=N` line) and its version.
    pub fn get_raw(&self) -> Result<(String, u64), DpError> {
        let step = "reading the configuration";
        let r = self.request(
            "GET",
            "/services/haproxy/configuration/raw",
            None,
            step,
            true,
        )?;
        let r = self.expect(r, &[200], step)?;
        let version = r
            .header("Configuration-Version")
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| DpError::Malformed {
                target: self.target.clone(),
                step: step.into(),
                message: "no Configuration-Version header".into(),
            })?;
        // The body is JSON-quoted text by some versions, plain text by others.
        let text = r.text();
        let text = match serde_json::from_str::<String>(&text) {
            Ok(unquoted) => unquoted,
            Err(_) => text,
        };
        Ok((strip_version(&text), version))
    }

    /// Pushes the whole configuration at `version` (or only validates it).
    pub fn push_raw(
        &self,
        config: &str,
        version: u64,
        only_validate: bool,
    ) -> Result<Pushed, DpError> {
        let step = if only_validate {
            "validating the configuration"
        } else {
            "pushing the configuration"
        };
        let path = format!(
            "/services/haproxy/configuration/raw?version={version}{}",
            if only_validate {
                "&only_validate=true"
            } else {
                ""
            }
        );
        // Validation is safe to retry; a push is not (it may have been applied).
        let r = self.request(
            "POST",
            &path,
            Some(("text/plain", config.as_bytes())),
            step,
            only_validate,
        )?;
        let r = self.expect(r, &[200, 201, 202], step)?;
        Ok(Pushed {
            status: r.status,
            reload_id: r.header("Reload-ID").map(str::to_string),
        })
    }

    /// Waits until a reload succeeded; `Err` when it failed or did not end in time.
    pub fn wait_reload(&self, id: &str, timeout: Duration) -> Result<(), DpError> {
        let step = format!("waiting for reload {id}");
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.request(
                "GET",
                &format!("/services/haproxy/reloads/{id}"),
                None,
                &step,
                true,
            )?;
            let r = self.expect(r, &[200], &step)?;
            let reload: serde_json::Value =
                serde_json::from_slice(&r.body).map_err(|e| DpError::Malformed {
                    target: self.target.clone(),
                    step: step.clone(),
                    message: e.to_string(),
                })?;
            match reload.get("status").and_then(|s| s.as_str()) {
                Some("succeeded") => return Ok(()),
                Some("failed") => {
                    return Err(DpError::Reload {
                        target: self.target.clone(),
                        step,
                        message: format!(
                            "the reload failed: {}",
                            reload
                                .get("response")
                                .and_then(|r| r.as_str())
                                .unwrap_or("no detail")
                        ),
                    });
                }
                Some("in_progress") | None => {}
                Some(other) => {
                    return Err(DpError::Malformed {
                        target: self.target.clone(),
                        step,
                        message: format!("reload status `{other}`"),
                    });
                }
            }
            if Instant::now() >= deadline {
                return Err(DpError::Reload {
                    target: self.target.clone(),
                    step,
                    message: format!("the reload did not end within {}s", timeout.as_secs()),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn storage_get(&self, kind: &str, name: &str, step: &str) -> Result<Option<Vec<u8>>, DpError> {
        let r = self.request(
            "GET",
            &format!("/services/haproxy/storage/{kind}/{}", encode(name)),
            None,
            step,
            true,
        )?;
        match r.status {
            404 => Ok(None),
            _ => Ok(Some(self.expect(r, &[200], step)?.body)),
        }
    }

    /// Writes a managed file: replaced when it exists (without a reload), created otherwise.
    fn storage_put(
        &self,
        kind: &str,
        name: &str,
        bytes: &[u8],
        multipart_replace: bool,
        step: &str,
    ) -> Result<(), DpError> {
        let path = format!(
            "/services/haproxy/storage/{kind}/{}?skip_reload=true",
            encode(name)
        );
        let boundary = "lunafront-boundary-7d3f1c";
        let form = multipart(boundary, name, bytes);
        let content_type = format!("multipart/form-data; boundary={boundary}");
        let replaced = if multipart_replace {
            self.request("PUT", &path, Some((&content_type, &form)), step, false)?
        } else {
            self.request("PUT", &path, Some(("text/plain", bytes)), step, false)?
        };
        if replaced.status != 404 {
            self.expect(replaced, &[200, 202, 204], step)?;
            return Ok(());
        }
        // A certificate created in storage is loaded by the next reload or the runtime
        // endpoints, not by a reload of its own.
        let query = if kind == "ssl_certificates" {
            "?skip_reload=true"
        } else {
            ""
        };
        let created = self.request(
            "POST",
            &format!("/services/haproxy/storage/{kind}{query}"),
            Some((&content_type, &form)),
            step,
            false,
        )?;
        self.expect(created, &[200, 201, 202], step).map(|_| ())
    }

    pub fn map_get(&self, name: &str) -> Result<Option<Vec<u8>>, DpError> {
        self.storage_get("maps", name, &format!("reading map {name}"))
    }

    pub fn map_put(&self, name: &str, bytes: &[u8]) -> Result<(), DpError> {
        self.storage_put("maps", name, bytes, false, &format!("writing map {name}"))
    }

    /// Removes a map file the configuration no longer uses (gone already is fine).
    pub fn map_delete(&self, name: &str) -> Result<(), DpError> {
        let step = format!("removing map {name}");
        let r = self.request(
            "DELETE",
            &format!("/services/haproxy/storage/maps/{}", encode(name)),
            None,
            &step,
            false,
        )?;
        self.expect(r, &[204, 404], &step).map(|_| ())
    }

    pub fn general_get(&self, name: &str) -> Result<Option<Vec<u8>>, DpError> {
        self.storage_get("general", name, &format!("reading {name}"))
    }

    pub fn general_put(&self, name: &str, bytes: &[u8]) -> Result<(), DpError> {
        self.storage_put("general", name, bytes, true, &format!("writing {name}"))
    }

    /// A certificate in the API's SSL storage: its metadata (the API never returns the file).
    pub fn cert_meta(&self, name: &str) -> Result<Option<serde_json::Value>, DpError> {
        let step = format!("reading certificate {name}");
        let Some(body) = self.storage_get("ssl_certificates", name, &step)? else {
            return Ok(None);
        };
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| DpError::Malformed {
                target: self.target.clone(),
                step,
                message: e.to_string(),
            })
    }

    /// Writes a certificate (chain and key) to the SSL storage, without a reload.
    pub fn cert_put(&self, name: &str, bytes: &[u8]) -> Result<(), DpError> {
        self.storage_put(
            "ssl_certificates",
            name,
            bytes,
            false,
            &format!("writing certificate {name}"),
        )
    }

    pub fn crt_list_get(&self, name: &str) -> Result<Option<Vec<u8>>, DpError> {
        self.storage_get("ssl_crt_lists", name, &format!("reading crt-list {name}"))
    }

    pub fn crt_list_put(&self, name: &str, bytes: &[u8]) -> Result<(), DpError> {
        self.storage_put(
            "ssl_crt_lists",
            name,
            bytes,
            false,
            &format!("writing crt-list {name}"),
        )
    }

    /// Removes a certificate or crt-list file from storage (gone already is fine).
    pub fn ssl_delete(&self, kind: &str, name: &str) -> Result<(), DpError> {
        let step = format!("removing {name}");
        let r = self.request(
            "DELETE",
            &format!(
                "/services/haproxy/storage/{kind}/{}?skip_reload=true",
                encode(name)
            ),
            None,
            &step,
            false,
        )?;
        self.expect(r, &[202, 204, 404], &step).map(|_| ())
    }

    /// A certificate new to HAProxy (`path` as its crt-list names it), loaded at runtime.
    pub fn runtime_cert_new(&self, path: &str, bytes: &[u8]) -> Result<(), DpError> {
        let step = format!("loading certificate {path} at runtime");
        let boundary = "lunafront-boundary-7d3f1c";
        let form = multipart(boundary, path, bytes);
        let r = self.request(
            "POST",
            "/services/haproxy/runtime/ssl_certs",
            Some((&format!("multipart/form-data; boundary={boundary}"), &form)),
            &step,
            false,
        )?;
        self.expect(r, &[201], &step).map(|_| ())
    }

    /// Replaces a certificate HAProxy serves, at runtime.
    pub fn runtime_cert_replace(&self, path: &str, bytes: &[u8]) -> Result<(), DpError> {
        let step = format!("replacing certificate {path} at runtime");
        let boundary = "lunafront-boundary-7d3f1c";
        let form = multipart(boundary, path, bytes);
        let r = self.request(
            "PUT",
            &format!("/services/haproxy/runtime/ssl_certs/{}", encode(path)),
            Some((&format!("multipart/form-data; boundary={boundary}"), &form)),
            &step,
            false,
        )?;
        self.expect(r, &[200], &step).map(|_| ())
    }

    pub fn runtime_cert_delete(&self, path: &str) -> Result<(), DpError> {
        let step = format!("unloading certificate {path}");
        let r = self.request(
            "DELETE",
            &format!("/services/haproxy/runtime/ssl_certs/{}", encode(path)),
            None,
            &step,
            false,
        )?;
        self.expect(r, &[204], &step).map(|_| ())
    }

    pub fn runtime_crt_list_add(&self, list: &str, cert: &str) -> Result<(), DpError> {
        let step = format!("adding {cert} to crt-list {list} at runtime");
        let body = serde_json::json!({ "file": cert }).to_string();
        let r = self.request(
            "POST",
            &format!(
                "/services/haproxy/runtime/ssl_crt_lists/entries?name={}",
                encode(list)
            ),
            Some(("application/json", body.as_bytes())),
            &step,
            false,
        )?;
        self.expect(r, &[201], &step).map(|_| ())
    }

    pub fn runtime_crt_list_del(&self, list: &str, cert: &str) -> Result<(), DpError> {
        let step = format!("removing {cert} from crt-list {list} at runtime");
        let r = self.request(
            "DELETE",
            &format!(
                "/services/haproxy/runtime/ssl_crt_lists/entries?name={}&cert_file={}",
                encode(list),
                encode(cert)
            ),
            None,
            &step,
            false,
        )?;
        self.expect(r, &[204, 404], &step).map(|_| ())
    }

    /// The entries of a map as HAProxy holds them now.
    pub fn runtime_entries(&self, map: &str) -> Result<BTreeMap<String, String>, DpError> {
        let step = format!("reading runtime map {map}");
        let r = self.request(
            "GET",
            &format!("/services/haproxy/runtime/maps/{}/entries", encode(map)),
            None,
            &step,
            true,
        )?;
        let r = self.expect(r, &[200], &step)?;
        let entries: Vec<serde_json::Value> =
            serde_json::from_slice(&r.body).map_err(|e| DpError::Malformed {
                target: self.target.clone(),
                step: step.clone(),
                message: e.to_string(),
            })?;
        Ok(entries
            .iter()
            .filter_map(|e| {
                Some((
                    e.get("key")?.as_str()?.to_string(),
                    e.get("value")?.as_str()?.to_string(),
                ))
            })
            .collect())
    }

    pub fn runtime_add(&self, map: &str, key: &str, value: &str) -> Result<(), DpError> {
        let step = format!("adding {key} to runtime map {map}");
        let body = serde_json::json!({"key": key, "value": value}).to_string();
        let r = self.request(
            "POST",
            &format!("/services/haproxy/runtime/maps/{}/entries", encode(map)),
            Some(("application/json", body.as_bytes())),
            &step,
            false,
        )?;
        self.expect(r, &[200, 201], &step).map(|_| ())
    }

    pub fn runtime_set(&self, map: &str, key: &str, value: &str) -> Result<(), DpError> {
        let step = format!("changing {key} in runtime map {map}");
        let body = serde_json::json!({"value": value}).to_string();
        let r = self.request(
            "PUT",
            &format!(
                "/services/haproxy/runtime/maps/{}/entries/{}",
                encode(map),
                encode(key)
            ),
            Some(("application/json", body.as_bytes())),
            &step,
            false,
        )?;
        self.expect(r, &[200], &step).map(|_| ())
    }

    pub fn runtime_del(&self, map: &str, key: &str) -> Result<(), DpError> {
        let step = format!("removing {key} from runtime map {map}");
        let r = self.request(
            "DELETE",
            &format!(
                "/services/haproxy/runtime/maps/{}/entries/{}",
                encode(map),
                encode(key)
            ),
            None,
            &step,
            false,
        )?;
        self.expect(r, &[200, 204], &step).map(|_| ())
    }
}

/// Drops the `# _version=N` line the Data Plane API writes into the file it manages, so a plan
/// right after an apply is empty.
pub fn strip_version(config: &str) -> String {
    let mut out = String::with_capacity(config.len());
    for line in config.split_inclusive('\n') {
        if !line.starts_with("# _version=") {
            out.push_str(line);
        }
    }
    out
}

/// Percent-encodes a path segment (map names, keys).
fn encode(segment: &str) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn multipart(boundary: &str, name: &str, bytes: &[u8]) -> Vec<u8> {
    let mut form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file_upload\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    form.extend_from_slice(bytes);
    form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    form
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_line_is_not_part_of_the_configuration() {
        assert_eq!(
            strip_version("# _version=7\nglobal\n    maxconn 10\n"),
            "global\n    maxconn 10\n"
        );
        assert_eq!(strip_version("global\n"), "global\n");
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode("hosts.map"), "hosts.map");
        assert_eq!(encode("*.x.example.com"), "%2A.x.example.com");
        assert_eq!(encode("a/b"), "a%2Fb");
    }
}
