//! `validate`: Raw (the loaded document) → `Model`. The only constructor of a `Model`. Runs the
//! JSON Schema, then every semantic rule, and collects all problems in one pass, each at the
//! position of the user's text.

use super::model::*;
use super::names::{self, Duration};
use crate::spec::diagnostics::{Diagnostic, Location, closest, quote};
use crate::spec::load::{CertDir, Source};
use crate::spec::schema;
use crate::spec::spans::escape_pointer_token;
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// The outcome of validation: a model when there is no error, and every diagnostic found
/// (errors and warnings, in file order).
#[derive(Debug)]
pub struct Validation {
    pub model: Option<Model>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Validation {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.is_error())
    }
}

/// The targets (and groups) of a state that may not validate as a whole: what `rollback`,
/// `agent enroll` and the daemon's start need. Targets' `binds` name listeners, so the whole
/// state is tried first, then the targets with the listeners, then the targets alone.
pub fn validate_targets(source: &Source) -> Validation {
    let whole = validate(source);
    if whole.model.is_some() {
        return whole;
    }
    let with_listeners = validate(&source.only(&["targets", "groups", "listeners"]));
    if with_listeners.model.is_some() {
        return with_listeners;
    }
    validate(&source.only(&["targets", "groups"]))
}

pub fn validate(source: &Source) -> Validation {
    validate_document(source, &source.document, &source.document)
}

/// `validate` of `document`, a part of `source`'s merged document (`delta`'s restricted
/// document) or the whole of it: its entries are checked and located in `source`'s files;
/// references are looked up among the names `names` (the whole document) defines.
fn validate_document(source: &Source, document: &Value, names: &Value) -> Validation {
    let (model, diagnostics) = check_document(source, document, names);
    let has_errors = diagnostics.iter().any(Diagnostic::is_error);
    Validation {
        model: (!has_errors).then_some(model),
        diagnostics,
    }
}

/// What `validate_document` finds: the model built from the entries that passed (whole only
/// when no diagnostic is an error) and every diagnostic, sorted.
fn check_document(source: &Source, document: &Value, names: &Value) -> (Model, Vec<Diagnostic>) {
    let schema_diagnostics = schema::check_document(source, document);
    let mut checker = Checker {
        source,
        document,
        names,
        diagnostics: Vec::new(),
        // When a file could not be parsed, names it defined are unknown: do not report
        // references to them as errors of their own.
        partial: source.has_errors(),
    };
    let model = checker.build();
    let semantic = checker.diagnostics;

    // The semantic rules explain a bad value better than the schema's pattern does: where
    // both speak of the same value, keep the semantic diagnostic.
    let explained: HashSet<&str> = semantic
        .iter()
        .filter(|d| d.is_error())
        .map(|d| d.pointer.as_str())
        .collect();
    let mut diagnostics: Vec<Diagnostic> = source.diagnostics.clone();
    diagnostics.extend(
        schema_diagnostics
            .iter()
            .filter(|d| !explained.contains(d.pointer.as_str()))
            .cloned(),
    );
    diagnostics.extend(semantic.iter().cloned());
    sort_diagnostics(&mut diagnostics);
    (model, diagnostics)
}

/// In file order; diagnostics at the same place by pointer, rule and message, so that the
/// order depends only on the set (`delta` merges sets found in different runs).
fn sort_diagnostics(diagnostics: &mut [Diagnostic]) {
    diagnostics.sort_by(|a, b| {
        let key = |d: &Diagnostic| {
            d.location
                .as_ref()
                .map(|l| (0, l.file.clone(), l.line, l.column))
                .unwrap_or((1, PathBuf::new(), 0, 0))
        };
        key(a)
            .cmp(&key(b))
            .then_with(|| a.pointer.cmp(&b.pointer))
            .then_with(|| a.code.cmp(b.code))
            .then_with(|| a.message.cmp(&b.message))
    });
}

// ---- Raw shapes: lenient, since the schema has already reported wrong types. ----

#[derive(Deserialize)]
struct RawListener {
    bind: String,
    mode: Option<String>,
    certificates: Option<String>,
    tls: Option<String>,
    #[serde(default)]
    acme: bool,
    redirect_to: Option<String>,
    hsts: Option<Toggle<RawHsts>>,
}

#[derive(Deserialize, Default)]
struct RawHsts {
    max_age: Option<String>,
    #[serde(default)]
    include_subdomains: bool,
    #[serde(default)]
    preload: bool,
}

#[derive(Deserialize)]
struct RawAcme {
    directory: String,
    #[serde(default)]
    contact: Vec<String>,
    ca_file: Option<String>,
    renew_before: Option<String>,
    key_type: Option<String>,
    dns_hook: Option<String>,
}

/// The `extra:` list of an entry, when it has one.
#[derive(Deserialize, Default)]
struct RawExtra {
    #[serde(default)]
    extra: Vec<String>,
    owner: Option<String>,
}

#[derive(Deserialize)]
struct RawAgent {
    address: String,
    #[serde(default)]
    maintenance: bool,
}

#[derive(Deserialize)]
struct RawServer {
    agent: Option<String>,
    address: Option<String>,
    port: i64,
    name: Option<String>,
    weight: Option<i64>,
    #[serde(default)]
    maintenance: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Toggle<T> {
    Flag(bool),
    Settings(T),
}

#[derive(Deserialize, Default)]
struct RawHealthCheck {
    path: Option<String>,
    host: Option<String>,
    interval: Option<String>,
    rise: Option<u8>,
    fall: Option<u8>,
}

#[derive(Deserialize, Default)]
struct RawTls {
    #[serde(default)]
    verify: bool,
    ca_file: Option<String>,
    sni: Option<String>,
}

#[derive(Deserialize)]
struct RawBackend {
    /// Read from the document by reference (see `backends`): only checked for presence here.
    #[serde(rename = "servers")]
    _servers: serde::de::IgnoredAny,
    health_check: Option<Toggle<RawHealthCheck>>,
    tls: Option<Toggle<RawTls>>,
    balance: Option<String>,
}

#[derive(Deserialize)]
struct RawDomain {
    backend: String,
    listener: Option<String>,
}

#[derive(Deserialize)]
struct RawTarget {
    #[serde(rename = "type")]
    kind: String,
    config: Option<String>,
    master_socket: Option<String>,
    runtime_socket: Option<String>,
    #[serde(default)]
    spawn: bool,
    reload_timeout: Option<String>,
    state_dir: Option<String>,
    history: Option<usize>,
    haproxy_bin: Option<String>,
    url: Option<String>,
    username: Option<String>,
    password_env: Option<String>,
    password_file: Option<String>,
    timeout: Option<String>,
    maps_dir: Option<String>,
    certs_dir: Option<String>,
    #[serde(default)]
    binds: BTreeMap<String, String>,
    health_check: Option<RawCanaryCheck>,
}

#[derive(Deserialize, Clone)]
struct RawCanaryCheck {
    url: String,
    host: Option<String>,
    timeout: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawGlobal {
    maxconn: Option<u32>,
    hard_stop_after: Option<String>,
    mworker_max_reloads: Option<u32>,
    log: Option<String>,
    #[serde(default)]
    isolate_invalid: bool,
    #[serde(default)]
    timeouts: BTreeMap<String, Value>,
    stats: Option<RawStats>,
    delete_guard: Option<Toggle<RawDeleteGuard>>,
}

#[derive(Deserialize)]
struct RawStats {
    bind: String,
}

#[derive(Deserialize, Default)]
struct RawDeleteGuard {
    count: Option<u32>,
    percent: Option<u32>,
    settle: Option<String>,
}

struct Checker<'a> {
    source: &'a Source,
    /// The document whose entries are checked: the source's merged document, or a part of it.
    document: &'a Value,
    /// The document whose names references may name: the source's merged document.
    names: &'a Value,
    diagnostics: Vec<Diagnostic>,
    partial: bool,
}

/// The entries of one section: name, JSON pointer, value.
fn entries<'v>(document: &'v Value, section: &str) -> Vec<(&'v str, String, &'v Value)> {
    all_entries(document, section)
        .into_iter()
        .filter(|(name, ..)| section == "domains" || names::is_identifier(name))
        .collect()
}

/// Like `entries`, including entries whose names are invalid.
fn all_entries<'v>(document: &'v Value, section: &str) -> Vec<(&'v str, String, &'v Value)> {
    document
        .get(section)
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.as_str(),
                        format!("/{section}/{}", escape_pointer_token(k)),
                        v,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

impl<'a> Checker<'a> {
    fn at(&self, pointer: &str, key: bool) -> Option<Location> {
        self.source.locate(pointer, key)
    }

    fn error(
        &mut self,
        code: &'static str,
        pointer: &str,
        key: bool,
        message: String,
        hint: impl Into<String>,
    ) {
        let d = Diagnostic::error(code, message)
            .hint(hint)
            .at(self.at(pointer, key))
            .pointer(pointer);
        self.diagnostics.push(d);
    }

    fn push(&mut self, diagnostic: Diagnostic) {
        self.diagnostics.push(diagnostic);
    }

    fn raw<T: for<'de> Deserialize<'de>>(value: &Value) -> Option<T> {
        T::deserialize(value).ok()
    }

    /// Reports a reference to a name that is not defined, with a "did you mean". `key`: the
    /// name is a mapping key (a target's `binds`), so the position is the key's.
    #[allow(clippy::too_many_arguments)]
    fn unknown(
        &mut self,
        code: &'static str,
        kind: &str,
        section: &str,
        name: &str,
        pointer: &str,
        key: bool,
        known: &BTreeSet<&str>,
    ) {
        if self.partial {
            return;
        }
        let hint = match closest(name, known.iter().copied()) {
            Some(best) => format!(
                "did you mean `{best}`? or define {kind} {} under `{section}:`",
                quote(name)
            ),
            None => format!("define {kind} {} under `{section}:`", quote(name)),
        };
        self.error(
            code,
            pointer,
            key,
            format!("{kind} {} is not defined", quote(name)),
            hint,
        );
    }

    /// Every entry name of the named sections must be an identifier; entries with other
    /// names are reported here and never reach the model.
    fn check_names(&mut self) {
        for section in ["listeners", "agents", "backends", "targets", "groups"] {
            for (name, pointer, _) in all_entries(self.document, section) {
                if !names::is_identifier(name) {
                    self.error(
                        "invalid-name",
                        &pointer,
                        true,
                        format!(
                            "{} is not a valid name for an entry of `{section}`",
                            quote(name)
                        ),
                        names::IDENTIFIER_RULE,
                    );
                }
            }
        }
    }

    fn build(&mut self) -> Model {
        self.check_names();
        let doc = self.document;
        let names = self.names;
        let agent_names: BTreeSet<&str> = entries(names, "agents").iter().map(|e| e.0).collect();
        let backend_names: BTreeSet<&str> =
            entries(names, "backends").iter().map(|e| e.0).collect();
        let listener_names: BTreeSet<&str> =
            entries(names, "listeners").iter().map(|e| e.0).collect();
        let target_names: BTreeSet<&str> = entries(names, "targets").iter().map(|e| e.0).collect();

        let listeners = self.listeners();
        let agents = self.agents();
        let backends = self.backends(&agent_names);
        let domains = self.domains(&listeners, &listener_names, &backend_names);
        let backends = self.backend_modes(backends, &domains, &listeners);
        self.name_claims(&domains, &listeners);
        let acme = self.acme(&listeners, &listener_names, &domains);
        let targets = self.targets(&listeners, &listener_names);
        let groups = self.groups(&target_names);
        let global = self.global();
        if let Some(stats) = &global.stats
            && let Some((name, _)) = listeners.iter().find(|(_, l)| l.bind.conflicts_with(stats))
        {
            let note = self.at(&format!("/listeners/{name}/bind"), false);
            let d = Diagnostic::error(
                "bind-conflict",
                format!(
                    "the stats listener binds {stats}, which listener {} already holds",
                    quote(name)
                ),
            )
            .hint("give the stats listener its own address:port")
            .at(self.at("/global/stats/bind", false))
            .pointer("/global/stats/bind")
            .note(note, "the listener binds here");
            self.push(d);
        }
        self.api_settings();

        Model {
            listeners,
            agents,
            backends,
            domains,
            targets,
            groups,
            global,
            api: doc.get("api").cloned(),
            acme,
            issued: Issued::default(),
            document: super::model::StateDocument::new(doc),
        }
    }

    fn listeners(&mut self) -> BTreeMap<String, Listener> {
        let mut out = BTreeMap::new();
        let mut binds: Vec<(names::Bind, String, String)> = Vec::new();
        for (name, pointer, value) in entries(self.document, "listeners") {
            let Some(raw) = Self::raw::<RawListener>(value) else {
                continue;
            };
            let bind = match names::parse_bind(&raw.bind) {
                Ok(bind) => bind,
                Err(message) => {
                    self.error(
                        "invalid-bind",
                        &format!("{pointer}/bind"),
                        false,
                        format!(
                            "listener {} bind {}: {message}",
                            quote(name),
                            quote(&raw.bind)
                        ),
                        "write `address:port`, such as `127.0.0.1:8080`, `[::1]:8443` or `:80`",
                    );
                    continue;
                }
            };
            if let Some((_, other, other_pointer)) =
                binds.iter().find(|(b, ..)| b.conflicts_with(&bind))
            {
                let note = self.at(&format!("{other_pointer}/bind"), false);
                let d = Diagnostic::error(
                    "bind-conflict",
                    format!(
                        "listener {} binds {}, which listener {} already holds",
                        quote(name),
                        quote(&raw.bind),
                        quote(other)
                    ),
                )
                .hint("give each listener its own address:port")
                .at(self.at(&format!("{pointer}/bind"), false))
                .pointer(format!("{pointer}/bind"))
                .note(note, "the other listener binds here");
                self.push(d);
                continue;
            }
            binds.push((bind, name.to_string(), pointer.clone()));

            let tcp = match raw.mode.as_deref() {
                Some("tcp") => true,
                Some(_) => false,
                None => raw.tls.is_some(),
            };
            let certificates = match &raw.certificates {
                Some(_) => self.certificates(name, &pointer),
                None => None,
            };
            let kind = if tcp {
                match raw.tls.as_deref() {
                    Some("passthrough") => {
                        if raw.certificates.is_some() {
                            self.error(
                                "certificates-unused",
                                &format!("{pointer}/certificates"),
                                true,
                                format!("listener {} passes TLS through untouched, so its certificates would never be used", quote(name)),
                                "remove `certificates`, or use `tls: terminate` to decrypt here",
                            );
                        }
                        ListenerKind::Tcp {
                            tls: TcpTls::Passthrough,
                        }
                    }
                    Some(_) => match certificates {
                        Some(c) => ListenerKind::Tcp {
                            tls: TcpTls::Terminate(c),
                        },
                        None => {
                            if raw.certificates.is_none() {
                                self.error(
                                    "missing-certificates",
                                    &format!("{pointer}/tls"),
                                    true,
                                    format!(
                                        "listener {} terminates TLS but has no `certificates`",
                                        quote(name)
                                    ),
                                    "add `certificates: <folder of PEM files>`",
                                );
                            }
                            continue;
                        }
                    },
                    None => {
                        self.error(
                            "tcp-without-tls",
                            &pointer,
                            true,
                            format!("TCP listener {} has no `tls`: without TLS there is no server name to route on", quote(name)),
                            "add `tls: passthrough` (route on the ClientHello) or `tls: terminate` with `certificates`",
                        );
                        continue;
                    }
                }
            } else {
                if raw.tls.is_some() {
                    self.error(
                        "tls-on-http",
                        &format!("{pointer}/tls"),
                        true,
                        format!("listener {} is an HTTP listener; `tls` applies to TCP listeners", quote(name)),
                        "an HTTP listener terminates TLS when it has `certificates`; remove `tls` or set `mode: tcp`",
                    );
                }
                if raw.certificates.is_some() && certificates.is_none() {
                    continue;
                }
                ListenerKind::Http { certificates }
            };
            let hsts = match raw.hsts {
                None | Some(Toggle::Flag(false)) => None,
                Some(Toggle::Flag(true)) => Some(RawHsts::default()),
                Some(Toggle::Settings(h)) => Some(h),
            };
            let hsts = match hsts {
                None => None,
                Some(h) => {
                    let at = format!("{pointer}/hsts");
                    let Some(max_age) = self.duration(
                        h.max_age.as_deref(),
                        &format!("{at}/max_age"),
                        Duration::from_ms(365 * 86_400_000),
                    ) else {
                        continue;
                    };
                    let hsts = Hsts {
                        max_age_seconds: max_age.ms / 1000,
                        include_subdomains: h.include_subdomains,
                        preload: h.preload,
                    };
                    if hsts.preload
                        && (!hsts.include_subdomains || hsts.max_age_seconds < 365 * 86_400)
                    {
                        self.error(
                            "hsts-preload",
                            &format!("{at}/preload"),
                            true,
                            format!("listener {} asks for HSTS preloading without `include_subdomains: true` and a `max_age` of at least 365d", quote(name)),
                            "browsers preload only names that send includeSubDomains and max-age of a year or more: set both, or remove `preload`",
                        );
                        continue;
                    }
                    Some(hsts)
                }
            };
            let Some(extra) = self.extra("listener", name, &pointer, value) else {
                continue;
            };
            out.insert(
                name.to_string(),
                Listener {
                    bind,
                    kind,
                    extra,
                    acme: raw.acme,
                    redirect_to: raw.redirect_to.filter(|r| names::is_identifier(r)),
                    hsts,
                },
            );
        }
        out
    }

    fn certificates(&mut self, listener: &str, pointer: &str) -> Option<Certificates> {
        let field = format!("{pointer}/certificates");
        let Some(CertDir { path, files }) = self.source.certificates.get(listener).cloned() else {
            // The path itself is invalid; the schema has said so.
            return None;
        };
        let files = match files {
            Ok(files) => files,
            Err(reason) => {
                self.error(
                    "certificates-missing",
                    &field,
                    false,
                    format!("certificates folder {} of listener {} cannot be read: {reason}", quote(&path.display().to_string()), quote(listener)),
                    "create the folder with one PEM file (certificate chain and private key) per name, or fix the path (relative paths start at this state file's folder)",
                );
                return None;
            }
        };
        if files.is_empty() {
            self.error(
                "certificates-empty",
                &field,
                false,
                format!(
                    "certificates folder {} has no *.pem files",
                    quote(&path.display().to_string())
                ),
                "add one PEM file (certificate chain and private key) per name",
            );
            return None;
        }
        let mut ok = true;
        for file in &files {
            let bad_name = !names::is_safe_path(&file.name) || file.name.contains('/');
            let pem = file.pem.as_deref().unwrap_or_default();
            let text = String::from_utf8_lossy(pem);
            let problem = if bad_name {
                Some(format!(
                    "file name {} has characters HAProxy paths cannot hold",
                    quote(&file.name)
                ))
            } else if file.pem.is_some() && !text.contains("-----BEGIN CERTIFICATE-----") {
                Some(format!("{} holds no certificate", quote(&file.name)))
            } else if file.pem.is_some() && !text.contains("PRIVATE KEY-----") {
                Some(format!("{} holds no private key", quote(&file.name)))
            } else {
                None
            };
            if let Some(problem) = problem {
                ok = false;
                self.error(
                    "certificate-invalid",
                    &field,
                    false,
                    format!("listener {} certificates: {problem}", quote(listener)),
                    "each *.pem file holds the certificate, its chain and the private key; name files with letters, digits, `.`, `_`, `-`",
                );
            }
        }
        ok.then_some(Certificates { dir: path, files })
    }

    /// An entry's `extra:` lines: each must pass `names::check_raw_line`, and an entry an
    /// agent owns (written through the API) may not carry any: raw configuration is the
    /// operator's alone. `None` when a line is refused (each is reported at its place).
    fn extra(
        &mut self,
        kind: &str,
        name: &str,
        pointer: &str,
        value: &Value,
    ) -> Option<Vec<String>> {
        let raw = Self::raw::<RawExtra>(value).unwrap_or_default();
        let mut ok = true;
        if !raw.extra.is_empty() && raw.owner.as_deref().is_some_and(|o| o != "admin") {
            self.error(
                "extra-not-allowed",
                &format!("{pointer}/extra"),
                true,
                format!(
                    "{kind} {} belongs to agent {}: raw HAProxy lines (`extra:`) are for the operator only",
                    quote(name),
                    quote(raw.owner.as_deref().unwrap_or_default())
                ),
                "move the lines to an entry the operator owns, or remove `owner:`",
            );
            ok = false;
        }
        for (i, line) in raw.extra.iter().enumerate() {
            if let Err(message) = names::check_raw_line(line) {
                self.error(
                    "invalid-extra",
                    &format!("{pointer}/extra/{i}"),
                    false,
                    format!("{kind} {} extra line {}: {message}", quote(name), i + 1),
                    "write one HAProxy directive per list item; `lunafront validate --check` runs `haproxy -c` on it",
                );
                ok = false;
            }
        }
        ok.then_some(raw.extra)
    }

    fn agents(&mut self) -> BTreeMap<String, Agent> {
        let mut out = BTreeMap::new();
        for (name, pointer, value) in entries(self.document, "agents") {
            let Some(raw) = Self::raw::<RawAgent>(value) else {
                continue;
            };
            let Some(address) = self.ip(
                &raw.address,
                &format!("{pointer}/address"),
                &format!("agent {}", quote(name)),
            ) else {
                continue;
            };
            out.insert(
                name.to_string(),
                Agent {
                    address,
                    maintenance: raw.maintenance,
                },
            );
        }
        out
    }

    fn ip(&mut self, text: &str, pointer: &str, owner: &str) -> Option<IpAddr> {
        match text.parse::<IpAddr>() {
            // Judged as what it is: `::ffff:0.0.0.0` is as unconnectable as 0.0.0.0.
            Ok(ip) if !super::address::is_connectable(ip) => {
                self.error(
                    "invalid-address",
                    pointer,
                    false,
                    format!("{owner} address {} cannot be connected to", quote(text)),
                    "use the unicast IP address the server listens on",
                );
                None
            }
            Ok(ip) => Some(ip),
            Err(_) => {
                self.error(
                    "invalid-address",
                    pointer,
                    false,
                    format!("{owner} address {} is not an IP address", quote(text)),
                    "write an IPv4 (203.0.113.7) or IPv6 (2001:db8::7) address; host names are not resolved",
                );
                None
            }
        }
    }

    fn backends(&mut self, agent_names: &BTreeSet<&str>) -> BTreeMap<String, Backend> {
        let mut out = BTreeMap::new();
        for (name, pointer, value) in entries(self.document, "backends") {
            let Some(raw) = Self::raw::<RawBackend>(value) else {
                continue;
            };
            let mut servers = Vec::new();
            let mut ok = true;
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            let server_values = value
                .get("servers")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            for (i, server_value) in server_values.iter().enumerate() {
                let Some(server) = Self::raw::<RawServer>(server_value) else {
                    ok = false;
                    continue;
                };
                match self.server(name, &pointer, i, server, agent_names) {
                    Some(server) => {
                        if let Some(first) = seen.get(&server.name) {
                            let sp = format!("{pointer}/servers/{i}");
                            let note = self.at(&format!("{pointer}/servers/{first}"), false);
                            let d = Diagnostic::error(
                                "duplicate-server",
                                format!(
                                    "backend {} lists server {} twice",
                                    quote(name),
                                    quote(&server.name)
                                ),
                            )
                            .hint("remove the repeated server, or give each a distinct `name:`")
                            .at(self.at(&sp, false))
                            .pointer(sp.clone())
                            .note(note, "first listed here");
                            self.push(d);
                            ok = false;
                        } else {
                            seen.insert(server.name.clone(), i);
                            servers.push(server);
                        }
                    }
                    None => ok = false,
                }
            }
            let health_check = match raw.health_check {
                None | Some(Toggle::Flag(false)) => None,
                Some(Toggle::Flag(true)) => Some(RawHealthCheck::default()),
                Some(Toggle::Settings(h)) => Some(h),
            };
            let health_check = match health_check {
                None => None,
                Some(h) => match self.health_check(name, &format!("{pointer}/health_check"), h) {
                    Some(h) => Some(h),
                    None => {
                        ok = false;
                        None
                    }
                },
            };
            let tls = match raw.tls {
                None | Some(Toggle::Flag(false)) => None,
                Some(Toggle::Flag(true)) => Some(UpstreamTls {
                    verify: false,
                    ca_file: None,
                    sni: None,
                }),
                Some(Toggle::Settings(t)) => {
                    let tp = format!("{pointer}/tls");
                    if let Some(sni) = &t.sni
                        && let Err(e) = names::check_host(sni)
                    {
                        self.error(
                            "invalid-host",
                            &format!("{tp}/sni"),
                            false,
                            e.message,
                            e.hint,
                        );
                        ok = false;
                    }
                    if t.ca_file
                        .as_deref()
                        .is_some_and(|c| !names::is_safe_path(c))
                    {
                        ok = false; // reported by the schema
                    }
                    if t.ca_file.is_some() && !t.verify {
                        self.error(
                            "ca-without-verify",
                            &format!("{tp}/ca_file"),
                            true,
                            format!(
                                "backend {} names a `ca_file` but does not verify",
                                quote(name)
                            ),
                            "add `verify: true`, or remove `ca_file`",
                        );
                        ok = false;
                    }
                    Some(UpstreamTls {
                        verify: t.verify,
                        ca_file: t.ca_file,
                        sni: t.sni,
                    })
                }
            };
            let balance = match raw.balance.as_deref() {
                Some("leastconn") => Balance::LeastConn,
                Some("source") => Balance::Source,
                _ => Balance::RoundRobin,
            };
            let extra = self.extra("backend", name, &pointer, value);
            ok &= extra.is_some();
            if ok {
                out.insert(
                    name.to_string(),
                    Backend {
                        extra: extra.unwrap_or_default(),
                        servers,
                        health_check,
                        tls,
                        balance,
                        mode: Mode::Http,
                    },
                );
            }
        }
        out
    }

    fn server(
        &mut self,
        backend: &str,
        backend_pointer: &str,
        index: usize,
        raw: RawServer,
        agent_names: &BTreeSet<&str>,
    ) -> Option<Server> {
        // Formatted only when a diagnostic needs them: this runs for every server.
        let pointer = || format!("{backend_pointer}/servers/{index}");
        let owner = || format!("backend {} server", quote(backend));
        let target = match (&raw.agent, &raw.address) {
            (Some(agent), None) => {
                if !agent_names.contains(agent.as_str()) {
                    if names::is_identifier(agent) {
                        self.unknown(
                            "unknown-agent",
                            "agent",
                            "agents",
                            agent,
                            &format!("{}/agent", pointer()),
                            false,
                            agent_names,
                        );
                    }
                    return None;
                }
                ServerTarget::Agent(agent.clone())
            }
            (None, Some(address)) => match address.parse::<IpAddr>() {
                Ok(ip) if !ip.is_unspecified() && !ip.is_multicast() => ServerTarget::Address(ip),
                _ => {
                    self.ip(address, &format!("{}/address", pointer()), &owner())?;
                    return None;
                }
            },
            (Some(_), Some(_)) => {
                self.error(
                    "server-target",
                    &pointer(),
                    false,
                    format!("{} has both `agent` and `address`", owner()),
                    "a server runs on an agent (`agent: agent-7`) or at an address (`address: 10.0.0.5`), not both",
                );
                return None;
            }
            (None, None) => {
                self.error(
                    "server-target",
                    &pointer(),
                    false,
                    format!("{} has neither `agent` nor `address`", owner()),
                    "add `agent: <name>` or `address: <ip>`",
                );
                return None;
            }
        };
        if !(1..=65535).contains(&raw.port) || raw.weight.is_some_and(|w| !(0..=256).contains(&w)) {
            return None; // reported by the schema
        }
        let port = raw.port as u16;
        let name = match raw.name {
            Some(name) if names::is_identifier(&name) => name,
            Some(_) => return None,
            None => match &target {
                ServerTarget::Agent(agent) => format!("{agent}:{port}"),
                ServerTarget::Address(ip) => format!("{ip}:{port}"),
            },
        };
        Some(Server {
            name,
            target,
            port,
            weight: raw.weight.unwrap_or(1) as u16,
            maintenance: raw.maintenance,
        })
    }

    fn health_check(
        &mut self,
        backend: &str,
        pointer: &str,
        raw: RawHealthCheck,
    ) -> Option<HealthCheck> {
        let mut ok = true;
        if let Some(path) = &raw.path
            && !names::is_http_path(path)
        {
            self.error(
                "invalid-path",
                &format!("{pointer}/path"),
                false,
                format!(
                    "backend {} health check path {} is not allowed",
                    quote(backend),
                    quote(path)
                ),
                names::HTTP_PATH_RULE,
            );
            ok = false;
        }
        if let Some(host) = &raw.host
            && let Err(e) = names::check_host(host)
        {
            self.error(
                "invalid-host",
                &format!("{pointer}/host"),
                false,
                e.message,
                e.hint,
            );
            ok = false;
        }
        if raw.host.is_some() && raw.path.is_none() {
            self.error(
                "host-without-path",
                &format!("{pointer}/host"),
                true,
                format!(
                    "backend {} sets a health check `host` but no `path`",
                    quote(backend)
                ),
                "the Host header is sent by HTTP checks only: add `path:`",
            );
            ok = false;
        }
        let interval = self.duration(
            raw.interval.as_deref(),
            &format!("{pointer}/interval"),
            Duration::from_ms(2000),
        )?;
        ok.then_some(HealthCheck {
            path: raw.path,
            host: raw.host,
            interval,
            rise: raw.rise.unwrap_or(2),
            fall: raw.fall.unwrap_or(3),
        })
    }

    fn duration(
        &mut self,
        text: Option<&str>,
        pointer: &str,
        default: Duration,
    ) -> Option<Duration> {
        match text {
            None => Some(default),
            Some(text) => match names::parse_duration(text) {
                Ok(d) => Some(d),
                Err(message) => {
                    self.error(
                        "invalid-duration",
                        pointer,
                        false,
                        message,
                        "write a number and a unit: 250ms, 10s, 5m, 1h, 1d",
                    );
                    None
                }
            },
        }
    }

    fn domains(
        &mut self,
        listeners: &BTreeMap<String, Listener>,
        listener_names: &BTreeSet<&str>,
        backend_names: &BTreeSet<&str>,
    ) -> BTreeMap<String, Domain> {
        let mut out = BTreeMap::new();
        let has_http_listener = listeners.values().any(Listener::is_http);
        for (host, pointer, value) in entries(self.document, "domains") {
            let host_ok = match names::check_host(host) {
                Ok(()) => true,
                Err(e) => {
                    self.error("invalid-host", &pointer, true, e.message, e.hint);
                    false
                }
            };
            let Some(raw) = Self::raw::<RawDomain>(value) else {
                continue;
            };
            let mut ok = host_ok;
            if !backend_names.contains(raw.backend.as_str()) {
                if names::is_identifier(&raw.backend) {
                    self.unknown(
                        "unknown-backend",
                        "backend",
                        "backends",
                        &raw.backend,
                        &format!("{pointer}/backend"),
                        false,
                        backend_names,
                    );
                }
                ok = false;
            }
            match &raw.listener {
                Some(listener) => match listeners.get(listener) {
                    Some(_) => {}
                    None if listener_names.contains(listener.as_str()) => ok = false, // invalid listener, reported
                    None => {
                        if names::is_identifier(listener) {
                            self.unknown(
                                "unknown-listener",
                                "listener",
                                "listeners",
                                listener,
                                &format!("{pointer}/listener"),
                                false,
                                listener_names,
                            );
                        }
                        ok = false;
                    }
                },
                None if !has_http_listener && !listeners.is_empty() => {
                    self.error(
                        "no-http-listener",
                        &pointer,
                        true,
                        format!("domain {} is an HTTP route, but no listener serves HTTP", quote(host)),
                        "add an HTTP listener (`http: { bind: \":80\" }`), or set `listener:` to a TCP listener to route it by TLS SNI",
                    );
                    ok = false;
                }
                None if listeners.is_empty() && !listener_names.is_empty() => ok = false,
                None if listeners.is_empty() => {
                    self.error(
                        "no-http-listener",
                        &pointer,
                        true,
                        format!(
                            "domain {} is an HTTP route, but there are no listeners",
                            quote(host)
                        ),
                        "add `listeners:` with an HTTP listener such as `http: { bind: \":80\" }`",
                    );
                    ok = false;
                }
                None => {}
            }
            // A TCP domain on a listener that was rejected for having no TLS is reported too:
            // that is the domain the user will look at.
            if let Some(listener) = &raw.listener
                && self.listener_lacks_tls(listener)
            {
                self.error(
                    "listener-without-tls",
                    &format!("{pointer}/listener"),
                    false,
                    format!(
                        "domain {} routes by TLS server name, but listener {} has no TLS",
                        quote(host),
                        quote(listener)
                    ),
                    "set `tls: passthrough` or `tls: terminate` on the listener",
                );
                ok = false;
            }
            if ok {
                out.insert(
                    host.to_string(),
                    Domain {
                        backend: raw.backend,
                        listener: raw.listener,
                    },
                );
            }
        }
        out
    }

    /// The `acme` section, and what listeners ask of each other: `acme: true` on HTTP listeners
    /// with a plain HTTP listener beside them to answer HTTP-01, wildcards only with a DNS
    /// hook or a certificate file, redirects to a TLS listener, HSTS on TLS only.
    fn acme(
        &mut self,
        listeners: &BTreeMap<String, Listener>,
        listener_names: &BTreeSet<&str>,
        domains: &BTreeMap<String, Domain>,
    ) -> Option<Acme> {
        let doc = self.document;
        let raw = doc.get("acme").and_then(Self::raw::<RawAcme>);
        let acme = raw.and_then(|raw| {
            let renew_before = self.duration(
                raw.renew_before.as_deref(),
                "/acme/renew_before",
                Duration::from_ms(30 * 86_400_000),
            )?;
            let safe = |p: &Option<String>| p.as_deref().is_none_or(names::is_safe_path);
            if !safe(&raw.ca_file) || !safe(&raw.dns_hook) {
                return None; // reported by the schema
            }
            Some(Acme {
                directory: raw.directory,
                contact: raw.contact,
                ca_file: raw.ca_file.map(|f| self.path("/acme", &f)),
                renew_before,
                key_type: match raw.key_type.as_deref() {
                    Some("ecdsa-p384") => KeyType::EcdsaP384,
                    _ => KeyType::EcdsaP256,
                },
                dns_hook: raw.dns_hook.map(|f| self.path("/acme", &f)),
            })
        });
        let plain_http = listeners
            .iter()
            .find(|(_, l)| l.is_http() && !l.is_tls())
            .map(|(n, _)| n.clone());
        for (name, listener) in listeners {
            let pointer = format!("/listeners/{}", escape_pointer_token(name));
            if listener.acme {
                let at = format!("{pointer}/acme");
                if !listener.is_http() {
                    self.error(
                        "acme-on-tcp",
                        &at,
                        true,
                        format!("listener {} routes TCP by server name; `acme` gets certificates for HTTP listeners", quote(name)),
                        "remove `acme`, or put `certificates:` on this listener",
                    );
                } else if doc.get("acme").is_none() {
                    self.error(
                        "acme-not-configured",
                        &at,
                        true,
                        format!("listener {} asks for ACME certificates, but the state has no `acme:` section", quote(name)),
                        "add `acme: { directory: https://acme-staging-v02.api.letsencrypt.org/directory, contact: [\"mailto:you@example.com\"] }` (staging first)",
                    );
                } else if plain_http.is_none() {
                    self.error(
                        "acme-without-http-listener",
                        &at,
                        true,
                        format!("listener {} asks for ACME certificates, but no plain HTTP listener can answer the CA's HTTP-01 challenges", quote(name)),
                        "add a listener without TLS on port 80, such as `http: { bind: \":80\" }`",
                    );
                } else if acme.as_ref().is_some_and(|a| a.dns_hook.is_none()) {
                    let files = listener.certificates().map(|c| c.files.as_slice());
                    for (host, domain) in domains {
                        let served = match &domain.listener {
                            Some(l) => l == name,
                            None => true,
                        };
                        if served
                            && names::is_wildcard(host)
                            && !crate::acme::covered_by_files(host, files.unwrap_or_default())
                        {
                            let d = Diagnostic::error(
                                "acme-wildcard-needs-dns",
                                format!("wildcard domain {} is served on ACME listener {}, and a CA validates wildcards only through DNS (DNS-01)", quote(host), quote(name)),
                            )
                            .hint("set `acme.dns_hook` to a command that publishes TXT records, or put a certificate for the wildcard in the listener's `certificates` folder")
                            .at(self.at(&format!("/domains/{}", escape_pointer_token(host)), true))
                            .pointer(format!("/domains/{}", escape_pointer_token(host)))
                            .note(self.at(&at, true), "the listener asks for ACME certificates here");
                            self.push(d);
                        }
                    }
                }
            }
            if let Some(to) = &listener.redirect_to {
                let at = format!("{pointer}/redirect_to");
                if !listener.is_http() || listener.is_tls() {
                    self.error(
                        "redirect-invalid",
                        &at,
                        false,
                        format!("listener {} already serves TLS or TCP; `redirect_to` sends plain HTTP requests to HTTPS", quote(name)),
                        "set `redirect_to` on the plain HTTP listener (port 80)",
                    );
                } else {
                    match listeners.get(to) {
                        // Defined but invalid: reported where it is defined.
                        None if listener_names.contains(to.as_str()) => {}
                        None => self.unknown(
                            "unknown-listener",
                            "listener",
                            "listeners",
                            to,
                            &at,
                            false,
                            listener_names,
                        ),
                        Some(l) if !l.is_http() || !l.is_tls() => self.error(
                            "redirect-invalid",
                            &at,
                            false,
                            format!(
                                "listener {} redirects to {}, which is not an HTTPS listener",
                                quote(name),
                                quote(to)
                            ),
                            "name an HTTP listener with `certificates` or `acme: true`",
                        ),
                        Some(_) => {}
                    }
                    for (host, domain) in domains {
                        if domain.listener.as_deref() == Some(name.as_str()) {
                            let d = Diagnostic::error(
                                "redirect-pinned-domain",
                                format!("domain {} is served only on listener {}, which redirects every request to {}", quote(host), quote(name), quote(to)),
                            )
                            .hint("pin the domain to the HTTPS listener, or remove `redirect_to`")
                            .at(self.at(&format!("/domains/{}/listener", escape_pointer_token(host)), false))
                            .pointer(format!("/domains/{}/listener", escape_pointer_token(host)))
                            .note(self.at(&at, true), "the redirect is set here");
                            self.push(d);
                        }
                    }
                }
            }
            if listener.hsts.is_some() && (!listener.is_http() || !listener.is_tls()) {
                self.error(
                    "hsts-without-tls",
                    &format!("{pointer}/hsts"),
                    true,
                    format!("listener {} does not serve HTTPS; browsers ignore Strict-Transport-Security over plain HTTP", quote(name)),
                    "set `hsts` on the HTTPS listener, and `redirect_to` on the plain one",
                );
            }
        }
        let asked = doc
            .get("listeners")
            .and_then(Value::as_object)
            .is_some_and(|l| {
                l.values()
                    .any(|l| l.get("acme") == Some(&Value::Bool(true)))
            });
        if acme.is_some() && !asked {
            let d = Diagnostic::warning(
                "acme-unused",
                "the `acme` section is set, but no listener has `acme: true`".to_string(),
            )
            .hint("add `acme: true` to the HTTPS listener whose domains should get certificates")
            .at(self.at("/acme", true))
            .pointer("/acme");
            self.push(d);
        }
        acme
    }

    fn listener_lacks_tls(&self, listener: &str) -> bool {
        let raw = self.document.get("listeners").and_then(|l| l.get(listener));
        let Some(raw) = raw.and_then(Self::raw::<RawListener>) else {
            return false;
        };
        raw.mode.as_deref() == Some("tcp") && raw.tls.is_none()
    }

    /// A backend serves HTTP or TCP, from the listeners of its domains; not both.
    fn backend_modes(
        &mut self,
        mut backends: BTreeMap<String, Backend>,
        domains: &BTreeMap<String, Domain>,
        listeners: &BTreeMap<String, Listener>,
    ) -> BTreeMap<String, Backend> {
        let mut users: BTreeMap<&str, BTreeMap<Mode, &str>> = BTreeMap::new();
        for (host, domain) in domains {
            let mode = match domain.listener.as_ref().and_then(|l| listeners.get(l)) {
                Some(l) if !l.is_http() => Mode::Tcp,
                _ => Mode::Http,
            };
            users
                .entry(domain.backend.as_str())
                .or_default()
                .entry(mode)
                .or_insert(host);
        }
        let mut rejected = Vec::new();
        for (name, backend) in backends.iter_mut() {
            let pointer = format!("/backends/{}", escape_pointer_token(name));
            let modes = users.get(name.as_str());
            match modes {
                None => {
                    let d = Diagnostic::warning(
                        "unused-backend",
                        format!("backend {} is not used by any domain", quote(name)),
                    )
                    .hint("route a domain to it, or remove it")
                    .at(self.at(&pointer, true))
                    .pointer(pointer);
                    self.push(d);
                }
                Some(modes) if modes.len() > 1 => {
                    let http = modes[&Mode::Http];
                    let tcp = modes[&Mode::Tcp];
                    let d = Diagnostic::error(
                        "backend-mode-conflict",
                        format!(
                            "backend {} is used by an HTTP domain and by a TCP (SNI) domain",
                            quote(name)
                        ),
                    )
                    .hint("a backend speaks HTTP or raw TCP: define one backend for each")
                    .at(self.at(&pointer, true))
                    .pointer(pointer)
                    .note(
                        self.at(&format!("/domains/{}", escape_pointer_token(http)), true),
                        format!("HTTP domain {}", quote(http)),
                    )
                    .note(
                        self.at(&format!("/domains/{}", escape_pointer_token(tcp)), true),
                        format!("TCP domain {}", quote(tcp)),
                    );
                    self.push(d);
                    rejected.push(name.clone());
                }
                Some(modes) => {
                    backend.mode = *modes.keys().next().expect("one mode");
                    if backend.mode == Mode::Tcp
                        && backend
                            .health_check
                            .as_ref()
                            .is_some_and(|h| h.path.is_some())
                    {
                        let at = format!("{pointer}/health_check/path");
                        self.error(
                            "http-check-on-tcp",
                            &at,
                            true,
                            format!("backend {} serves TCP (SNI) domains, so it cannot be checked over HTTP", quote(name)),
                            "use `health_check: true` for a TCP connect check",
                        );
                        rejected.push(name.clone());
                    }
                }
            }
        }
        for name in rejected {
            backends.remove(&name);
        }
        backends
    }

    /// A name is either a web app (HTTP) or a TCP service; a wildcard of one must not cover an
    /// exact name of the other. Also warns about exact domains a wildcard already covers.
    fn name_claims(
        &mut self,
        domains: &BTreeMap<String, Domain>,
        listeners: &BTreeMap<String, Listener>,
    ) {
        let protocol = |d: &Domain| match d.listener.as_ref().and_then(|l| listeners.get(l)) {
            Some(l) if !l.is_http() => "TCP (SNI)",
            _ => "HTTP",
        };
        for (host, domain) in domains {
            if names::is_wildcard(host) {
                continue;
            }
            let Some(dot) = host.find('.') else { continue };
            let wildcard = format!("*{}", &host[dot..]);
            let Some(cover) = domains.get(&wildcard) else {
                continue;
            };
            let pointer = format!("/domains/{}", escape_pointer_token(host));
            let cover_at = self.at(
                &format!("/domains/{}", escape_pointer_token(&wildcard)),
                true,
            );
            if protocol(domain) != protocol(cover) {
                let d = Diagnostic::error(
                    "name-claimed-twice",
                    format!(
                        "{} is claimed as {} by this domain and as {} by wildcard {}",
                        quote(host),
                        protocol(domain),
                        protocol(cover),
                        quote(&wildcard)
                    ),
                )
                .hint("a name is either a web app (HTTP) or a database/TCP service routed by SNI: rename one of them")
                .at(self.at(&pointer, true))
                .pointer(pointer)
                .note(cover_at, "the wildcard is here");
                self.push(d);
            } else if cover.backend == domain.backend && cover.listener == domain.listener {
                let d = Diagnostic::warning(
                    "redundant-domain",
                    format!(
                        "domain {} routes where wildcard {} already sends it",
                        quote(host),
                        quote(&wildcard)
                    ),
                )
                .hint("remove it, unless you mean to keep it when the wildcard changes")
                .at(self.at(&pointer, true))
                .pointer(pointer)
                .note(cover_at, "the wildcard is here");
                self.push(d);
            }
        }
    }

    fn path(&self, pointer: &str, text: &str) -> PathBuf {
        let p = Path::new(text);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.source.base_dir(pointer).join(p)
        }
    }

    /// A target's own listener addresses: each names a listener of the state, parses, and the
    /// addresses the target ends up binding do not collide.
    fn target_binds(
        &mut self,
        target: &str,
        pointer: &str,
        raw: &BTreeMap<String, String>,
        listeners: &BTreeMap<String, Listener>,
        listener_names: &BTreeSet<&str>,
    ) -> Option<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        let mut ok = true;
        for (listener, address) in raw {
            let at = format!("{pointer}/binds/{}", escape_pointer_token(listener));
            // Validating the targets alone (a rollback of a broken state): listeners unknown.
            if !listener_names.contains(listener.as_str()) && !self.partial {
                self.unknown(
                    "unknown-listener",
                    "listener",
                    "listeners",
                    listener,
                    &at,
                    true,
                    listener_names,
                );
                ok = false;
                continue;
            }
            match names::parse_bind(address) {
                Ok(bind) => {
                    out.insert(listener.clone(), bind);
                }
                Err(message) => {
                    self.error(
                        "invalid-bind",
                        &at,
                        false,
                        format!(
                            "target {} bind {} for listener {}: {message}",
                            quote(target),
                            quote(address),
                            quote(listener)
                        ),
                        "write `address:port`, such as `10.0.0.5:443` or `[::1]:8443`",
                    );
                    ok = false;
                }
            }
        }
        let effective: Vec<(&String, names::Bind)> = listeners
            .iter()
            .map(|(name, l)| (name, out.get(name).copied().unwrap_or(l.bind)))
            .collect();
        for (i, (a, bind_a)) in effective.iter().enumerate() {
            if let Some((b, _)) = effective[i + 1..]
                .iter()
                .find(|(_, bind_b)| bind_a.conflicts_with(bind_b))
            {
                self.error(
                    "bind-conflict",
                    &format!("{pointer}/binds"),
                    false,
                    format!(
                        "on target {}, listeners {} and {} would both bind {}",
                        quote(target),
                        quote(a),
                        quote(b),
                        bind_a
                    ),
                    "give each listener its own address:port on this target",
                );
                ok = false;
            }
        }
        ok.then(|| out.into_iter().map(|(k, v)| (k, v.to_string())).collect())
    }

    fn targets(
        &mut self,
        listeners: &BTreeMap<String, Listener>,
        listener_names: &BTreeSet<&str>,
    ) -> BTreeMap<String, Target> {
        let mut out = BTreeMap::new();
        for (name, pointer, value) in entries(self.document, "targets") {
            let Some(raw) = Self::raw::<RawTarget>(value) else {
                continue;
            };
            let safe = |v: &Option<String>| v.as_deref().is_none_or(names::is_safe_path);
            if ![
                &raw.config,
                &raw.master_socket,
                &raw.runtime_socket,
                &raw.state_dir,
                &raw.haproxy_bin,
                &raw.maps_dir,
                &raw.certs_dir,
                &raw.password_file,
            ]
            .into_iter()
            .all(safe)
            {
                continue; // reported by the schema
            }
            let state_dir = match &raw.state_dir {
                Some(dir) => self.path(&pointer, dir),
                None => PathBuf::from("/var/lib/lunafront").join(name),
            };
            let history = raw.history.unwrap_or(20);
            let Some(binds) =
                self.target_binds(name, &pointer, &raw.binds, listeners, listener_names)
            else {
                continue;
            };
            let health_check = match &raw.health_check {
                Some(check) => {
                    let Some(timeout) = self.duration(
                        check.timeout.as_deref(),
                        &format!("{pointer}/health_check/timeout"),
                        Duration::from_ms(15_000),
                    ) else {
                        continue;
                    };
                    Some(CanaryCheck {
                        url: check.url.clone(),
                        host: check.host.clone(),
                        timeout,
                    })
                }
                None => None,
            };
            let fleet = FleetMember {
                binds,
                health_check,
            };
            let target = match raw.kind.as_str() {
                "haproxy" => {
                    let Some(config) = &raw.config else { continue };
                    let Some(reload_timeout) = self.duration(
                        raw.reload_timeout.as_deref(),
                        &format!("{pointer}/reload_timeout"),
                        Duration::from_ms(10_000),
                    ) else {
                        continue;
                    };
                    // A spawned HAProxy keeps its sockets in the state folder, out of /run.
                    let (master_default, runtime_default) = if raw.spawn {
                        (state_dir.join("master.sock"), state_dir.join("admin.sock"))
                    } else {
                        (
                            PathBuf::from("/run/haproxy-master.sock"),
                            PathBuf::from("/run/haproxy/admin.sock"),
                        )
                    };
                    Target::Haproxy(HaproxyTarget {
                        config: self.path(&pointer, config),
                        master_socket: raw
                            .master_socket
                            .as_deref()
                            .map(|p| self.path(&pointer, p))
                            .unwrap_or(master_default),
                        runtime_socket: raw
                            .runtime_socket
                            .as_deref()
                            .map(|p| self.path(&pointer, p))
                            .unwrap_or(runtime_default),
                        spawn: raw.spawn,
                        reload_timeout,
                        state_dir,
                        history,
                        fleet: fleet.clone(),
                        haproxy_bin: raw
                            .haproxy_bin
                            .as_deref()
                            .map(PathBuf::from)
                            .unwrap_or_else(|| PathBuf::from("haproxy")),
                    })
                }
                "dataplane" => {
                    let (Some(url), Some(username)) = (raw.url.clone(), raw.username.clone())
                    else {
                        continue;
                    };
                    let password = match (&raw.password_env, &raw.password_file) {
                        (Some(env), None) => PasswordSource::Env(env.clone()),
                        (None, Some(file)) => PasswordSource::File(self.path(&pointer, file)),
                        _ => {
                            self.error(
                                "password-source",
                                &pointer,
                                true,
                                format!("target {} needs exactly one of `password_env` and `password_file`", quote(name)),
                                "the password is never written in the state: name an environment variable or a file that holds it",
                            );
                            continue;
                        }
                    };
                    let Some(timeout) = self.duration(
                        raw.timeout.as_deref(),
                        &format!("{pointer}/timeout"),
                        Duration::from_ms(10_000),
                    ) else {
                        continue;
                    };
                    Target::Dataplane(DataplaneTarget {
                        url: url.trim_end_matches('/').to_string(),
                        username,
                        password,
                        timeout,
                        maps_dir: raw.maps_dir.unwrap_or_else(|| "/etc/haproxy/maps".into()),
                        certs_dir: raw.certs_dir.unwrap_or_else(|| "/etc/haproxy/ssl".into()),
                        runtime_socket: raw
                            .runtime_socket
                            .unwrap_or_else(|| "/run/haproxy/admin.sock".into()),
                        fleet,
                        state_dir,
                        history,
                    })
                }
                _ => continue,
            };
            out.insert(name.to_string(), target);
        }
        out
    }

    fn groups(&mut self, target_names: &BTreeSet<&str>) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        for (name, pointer, value) in entries(self.document, "groups") {
            let Some(members) = Self::raw::<Vec<String>>(value) else {
                continue;
            };
            let mut ok = true;
            for (i, member) in members.iter().enumerate() {
                if !target_names.contains(member.as_str()) {
                    if names::is_identifier(member) {
                        self.unknown(
                            "unknown-target",
                            "target",
                            "targets",
                            member,
                            &format!("{pointer}/{i}"),
                            false,
                            target_names,
                        );
                    }
                    ok = false;
                }
            }
            if target_names.contains(name) {
                self.error(
                    "group-shadows-target",
                    &pointer,
                    true,
                    format!("group {} has the name of a target", quote(name)),
                    "`--target NAME` names either a target or a group: rename one",
                );
                ok = false;
            }
            if ok {
                out.insert(name.to_string(), members);
            }
        }
        out
    }

    /// The `api:` section's networks (`allowed_networks`, `trusted_proxies`): each a network
    /// with its prefix, or an error at its place (a typo must not silently match nothing).
    fn api_settings(&mut self) {
        let doc = self.document;
        for key in ["allowed_networks", "trusted_proxies"] {
            let Some(list) = doc
                .pointer(&format!("/api/{key}"))
                .and_then(Value::as_array)
            else {
                continue;
            };
            for (i, item) in list.iter().enumerate() {
                let Some(text) = item.as_str() else { continue };
                if let Err(e) = super::address::Cidr::parse(text) {
                    self.error(
                        "invalid-network",
                        &format!("/api/{key}/{i}"),
                        false,
                        format!("api.{key}: {e}"),
                        "write a network as address/prefix: 10.0.0.0/8, 192.168.1.0/24, fd00::/8, 127.0.0.1/32",
                    );
                }
            }
        }
        for key in ["token_ttl", "limits/reload_interval"] {
            let pointer = format!("/api/{key}");
            if let Some(text) = doc.pointer(&pointer).and_then(Value::as_str) {
                let _ = self.duration(Some(text), &pointer, Duration::from_ms(0));
            }
        }
    }

    fn global(&mut self) -> Global {
        let defaults = Global::default();
        let Some(raw) = self.document.get("global").and_then(Self::raw::<RawGlobal>) else {
            return defaults;
        };
        let t = &defaults.timeouts;
        let mut timeout = |key: &str, default: Duration| {
            let text = raw.timeouts.get(key).and_then(Value::as_str);
            self.duration(text, &format!("/global/timeouts/{key}"), default)
                .unwrap_or(default)
        };
        let timeouts = Timeouts {
            connect: timeout("connect", t.connect),
            client: timeout("client", t.client),
            server: timeout("server", t.server),
            http_request: timeout("http_request", t.http_request),
            http_keep_alive: timeout("http_keep_alive", t.http_keep_alive),
            tunnel: timeout("tunnel", t.tunnel),
            tcp_inspect: timeout("tcp_inspect", t.tcp_inspect),
            check: timeout("check", t.check),
        };
        let hard_stop_after = self
            .duration(
                raw.hard_stop_after.as_deref(),
                "/global/hard_stop_after",
                defaults.hard_stop_after,
            )
            .unwrap_or(defaults.hard_stop_after);
        let stats = raw
            .stats
            .as_ref()
            .and_then(|s| match names::parse_bind(&s.bind) {
                Ok(bind) => Some(bind),
                Err(message) => {
                    self.error(
                        "invalid-bind",
                        "/global/stats/bind",
                        false,
                        format!("stats bind {}: {message}", quote(&s.bind)),
                        "write `address:port`, such as `127.0.0.1:8404`",
                    );
                    None
                }
            });
        let guard = defaults.delete_guard;
        let delete_guard = match &raw.delete_guard {
            None | Some(Toggle::Flag(true)) => guard,
            Some(Toggle::Flag(false)) => DeleteGuard {
                enabled: false,
                ..guard
            },
            Some(Toggle::Settings(settings)) => DeleteGuard {
                enabled: true,
                count: settings.count.unwrap_or(guard.count),
                percent: settings.percent.unwrap_or(guard.percent),
                settle: self
                    .duration(
                        settings.settle.as_deref(),
                        "/global/delete_guard/settle",
                        guard.settle,
                    )
                    .unwrap_or(guard.settle),
            },
        };
        Global {
            maxconn: raw.maxconn,
            hard_stop_after,
            mworker_max_reloads: raw
                .mworker_max_reloads
                .unwrap_or(defaults.mworker_max_reloads),
            log: raw.log.filter(|l| {
                l.bytes().all(|b| {
                    b.is_ascii_graphic() && !matches!(b, b'#' | b'"' | b'\'' | b'\\' | b'$' | b'%')
                })
            }),
            timeouts,
            isolate_invalid: raw.isolate_invalid,
            stats,
            delete_guard,
        }
    }
}

mod delta;
pub use delta::{Checked, validate_from, validate_from_or_whole};

#[cfg(test)]
mod tests;
