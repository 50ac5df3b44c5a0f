//! `render`: Model → Rendered {haproxy.cfg, map files, crt-lists, certificates, manifest}.
//! A pure function: no clock, no file system, no network; the same model always gives the same
//! bytes. The configuration comes from the templates in `templates/` (embedded in the binary),
//! but for the app slots' identical blocks (`slot_blocks`); every value goes through the one
//! escaping filter's rule (`filters`).

pub mod filters;
pub mod layout;
pub mod readback;

use crate::model::{ListenerKind, Model, Target, TcpTls};
use crate::spec::load::CertFile;
use layout::{ProxyBackend, SlotPools};
use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// The file that records the state a configuration was rendered from, beside haproxy.cfg.
pub const MANIFEST: &str = "lunafront.state.json";

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("template error: {0:#}")]
    Template(#[from] minijinja::Error),
    #[error("{0}")]
    Unsafe(String),
}

/// Where the rendered files refer to each other: depends on the target that will hold them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RenderOptions {
    /// File name of the configuration (`haproxy.cfg`).
    pub config_name: String,
    /// The stats socket (runtime API) HAProxy opens.
    pub runtime_socket: String,
    /// Folder of the map files as the configuration names it: relative (`maps`, next to the
    /// configuration) or absolute (the Data Plane API's maps folder).
    pub maps_dir: String,
    /// Folder of crt-lists and certificates, likewise.
    pub certs_dir: String,
    /// Listener addresses this target binds instead of the state's (listener name → address).
    #[serde(default)]
    pub binds: BTreeMap<String, String>,
    /// The target changes servers through its runtime API (a local HAProxy); a Data Plane API
    /// target changes them only with its configuration (a push and a reload). The plan reads
    /// it when it decides between runtime and reload.
    #[serde(default = "runtime_servers_default")]
    pub runtime_servers: bool,
}

fn runtime_servers_default() -> bool {
    true
}

impl RenderOptions {
    /// Options for a target; without one, Debian's paths.
    pub fn for_target(target: Option<&Target>) -> RenderOptions {
        match target {
            Some(Target::Haproxy(t)) => RenderOptions {
                config_name: t
                    .config
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "haproxy.cfg".into()),
                runtime_socket: t.runtime_socket.display().to_string(),
                maps_dir: "maps".into(),
                certs_dir: "certs".into(),
                binds: t.fleet.binds.clone(),
                runtime_servers: true,
            },
            Some(Target::Dataplane(t)) => RenderOptions {
                config_name: "haproxy.cfg".into(),
                runtime_socket: t.runtime_socket.clone(),
                maps_dir: t.maps_dir.clone(),
                certs_dir: t.certs_dir.clone(),
                binds: t.fleet.binds.clone(),
                runtime_servers: false,
            },
            None => RenderOptions {
                config_name: "haproxy.cfg".into(),
                runtime_socket: "/run/haproxy/admin.sock".into(),
                maps_dir: "maps".into(),
                certs_dir: "certs".into(),
                binds: BTreeMap::new(),
                runtime_servers: true,
            },
        }
    }

    /// How the configuration names a map file.
    pub fn map_ref(&self, file: &str) -> String {
        format!("{}/{file}", self.maps_dir)
    }

    /// How the configuration names a crt-list or certificate file.
    pub fn cert_ref(&self, file: &str) -> String {
        format!("{}/{file}", self.certs_dir)
    }
}

/// The compiled output.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub options: RenderOptions,
    pub config: String,
    /// Map file name → entries (key → route value), in HAProxy's map format once written.
    pub maps: BTreeMap<String, BTreeMap<String, String>>,
    /// crt-list file name → the certificate files it lists, as the configuration names them.
    pub crt_lists: BTreeMap<String, Vec<String>>,
    /// Certificate file name → the certificate (PEM of certificate and key: secret).
    pub certs: BTreeMap<String, CertFile>,
    /// HAProxy backends with their servers, in the configuration's order.
    pub backends: Vec<ProxyBackend>,
    /// Which slot each app holds: what the next rendering for this target starts from.
    pub slots: SlotPools,
    /// The ACME challenge map (as the configuration names it), when a listener uses ACME,
    /// and the HTTP-01 answers it holds (empty unless challenges are pending).
    pub acme_challenge_map: Option<String>,
    pub acme_challenges: BTreeMap<String, String>,
    /// The state this was rendered from (JSON), so a later plan can say what changed.
    pub manifest: String,
}

/// One file of the output, with its path relative to the configuration's folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    pub path: String,
    pub bytes: Vec<u8>,
    /// Holds a private key: never printed, written 0600.
    pub secret: bool,
}

impl Rendered {
    /// Every file to write, configuration first.
    pub fn files(&self) -> Vec<OutputFile> {
        let o = &self.options;
        let mut files = vec![OutputFile {
            path: o.config_name.clone(),
            bytes: self.config.clone().into_bytes(),
            secret: false,
        }];
        for (name, entries) in &self.maps {
            files.push(OutputFile {
                path: o.map_ref(name),
                bytes: map_text(entries).into_bytes(),
                secret: false,
            });
        }
        for (name, lines) in &self.crt_lists {
            files.push(OutputFile {
                path: o.cert_ref(name),
                bytes: lines
                    .iter()
                    .map(|l| format!("{l}\n"))
                    .collect::<String>()
                    .into_bytes(),
                secret: false,
            });
        }
        for (name, cert) in &self.certs {
            files.push(OutputFile {
                path: o.cert_ref(name),
                bytes: cert.pem.as_deref().expect("checked by render").to_vec(),
                secret: true,
            });
        }
        if let Some(map) = &self.acme_challenge_map {
            files.push(OutputFile {
                path: map.clone(),
                bytes: map_text(&self.acme_challenges).into_bytes(),
                secret: false,
            });
        }
        files.push(OutputFile {
            path: MANIFEST.into(),
            bytes: self.manifest.clone().into_bytes(),
            secret: false,
        });
        files
    }
}

impl Rendered {
    /// The files as a map of path → content.
    pub fn file_map(&self) -> BTreeMap<String, Vec<u8>> {
        self.files()
            .into_iter()
            .map(|f| (f.path, f.bytes))
            .collect()
    }
}

/// HAProxy's map file format: `key value` per line, sorted.
pub fn map_text(entries: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(entries.len() * 48);
    for (key, value) in entries {
        out.push_str(key);
        out.push(' ');
        out.push_str(value);
        out.push('\n');
    }
    out
}

/// The paths `render` writes for `model` (configuration first, manifest last), without
/// rendering: what must be read from a target before rendering onto it.
pub fn output_paths(model: &Model, options: &RenderOptions) -> Vec<String> {
    let mut paths = vec![options.config_name.clone()];
    paths.extend(layout::map_files(model).iter().map(|m| options.map_ref(m)));
    let mut certs = Vec::new();
    for (name, listener) in &model.listeners {
        if let Some(c) = listener.certificates() {
            paths.push(options.cert_ref(&format!("{name}.crt-list")));
            certs.extend(
                c.files
                    .iter()
                    .map(|f| options.cert_ref(&format!("{name}.{}", f.name))),
            );
        }
    }
    paths.extend(certs);
    paths.push(MANIFEST.into());
    paths
}

fn environment() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .keep_trailing_newline(true)
                .build()
                .expect("default delimiters"),
        );
        env.set_formatter(filters::format_value);
        env.add_filter("raw_line", filters::raw_line);
        for (name, text) in TEMPLATES {
            env.add_template(name, text)
                .expect("embedded template parses");
        }
        env
    })
}

const TEMPLATES: [(&str, &str); 5] = [
    (
        "haproxy.cfg.j2",
        include_str!("../../templates/haproxy.cfg.j2"),
    ),
    ("global.j2", include_str!("../../templates/global.j2")),
    (
        "frontend_http.j2",
        include_str!("../../templates/frontend_http.j2"),
    ),
    (
        "frontend_tcp.j2",
        include_str!("../../templates/frontend_tcp.j2"),
    ),
    ("backend.j2", include_str!("../../templates/backend.j2")),
];

#[derive(Serialize)]
struct ListenerView {
    name: String,
    bind: String,
    own_map: String,
    crt_list: Option<String>,
    /// HTTP listeners: which map lookups the frontend makes.
    own_lookup: bool,
    wildcard_lookup: bool,
    extra: Vec<String>,
    /// Plain HTTP listeners of a state using ACME: answer HTTP-01 challenges.
    acme_challenges: bool,
    /// Plain HTTP listeners: the port of the HTTPS listener every request is redirected to.
    redirect_port: Option<u16>,
    hsts: Option<HstsView>,
}

#[derive(Serialize)]
struct HstsView {
    max_age: u64,
    include_subdomains: bool,
    preload: bool,
}

#[derive(Serialize)]
struct ServerView {
    name: String,
    address: String,
    params: Vec<String>,
}

#[derive(Serialize)]
struct CheckView {
    path: String,
    host: Option<String>,
}

#[derive(Serialize)]
struct BackendView {
    name: String,
    mode: &'static str,
    balance: &'static str,
    http_check: Option<CheckView>,
    servers: Vec<ServerView>,
    extra: Vec<String>,
}

#[derive(Serialize)]
struct GlobalView {
    maxconn: Option<u32>,
    hard_stop_after: String,
    mworker_max_reloads: u32,
    log: Option<String>,
}

#[derive(Serialize)]
struct ConfigView {
    runtime_socket: String,
    g: GlobalView,
    t: BTreeMap<&'static str, String>,
    http_listeners: Vec<ListenerView>,
    tcp_listeners: Vec<ListenerView>,
    shared_map: String,
    acme_challenge_map: String,
    not_found: &'static str,
    reject: &'static str,
    backends: Vec<BackendView>,
    /// The bind of HAProxy's Prometheus exporter and stats page, when asked for.
    stats: Option<String>,
    /// Whether slot backends follow the others (`slot_blocks` writes them).
    slots: bool,
}

#[derive(Serialize)]
struct ManifestView<'a> {
    format_version: u32,
    document: &'a serde_json::value::RawValue,
    certificates: BTreeMap<&'a str, BTreeMap<&'a str, &'a str>>,
    /// SHA-256 of every other file written, to find drift without rendering again.
    files: BTreeMap<String, String>,
    /// The target's own listener addresses it was rendered with.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    binds: &'a BTreeMap<String, String>,
    /// The ACME certificates it was rendered with (domain → SHA-256; the default one as
    /// `fallback`), so a later plan sees them as applied rather than new.
    #[serde(skip_serializing_if = "Option::is_none")]
    acme: Option<IssuedView<'a>>,
}

#[derive(Serialize)]
struct IssuedView<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    fallback: Option<&'a str>,
    certs: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    challenges: &'a BTreeMap<String, String>,
}

/// Writes the slot backends after the rest of the configuration, as the template wrote them:
/// a blank line, `backend`, its mode, `balance roundrobin`, its server if it holds an app.
/// Every value is held to the template's own rule (`filters::check_token`). Written here
/// rather than by the template engine, whose cost per value was a third of a 10k-domain
/// render (its slots are nine in ten of its backends).
fn slot_blocks(out: &mut String, slots: &[&ProxyBackend]) -> Result<(), RenderError> {
    use std::fmt::Write;
    let token = |s: &str| filters::check_token(s).map_err(RenderError::Unsafe);
    for slot in slots {
        let mode = layout::mode_str(slot.mode);
        token(&slot.name)?;
        token(mode)?;
        let _ = write!(
            out,
            "\nbackend {}\n    mode {mode}\n    balance roundrobin\n",
            slot.name
        );
        for server in &slot.servers {
            let address = server.address();
            token(&server.name)?;
            token(&address)?;
            let _ = write!(out, "    server {} {address}", server.name);
            for param in server.params() {
                token(&param)?;
                out.push(' ');
                out.push_str(&param);
            }
            out.push('\n');
        }
    }
    Ok(())
}

/// Renders `model` as a first rendering: apps take slots 1, 2, 3… in name order. For a target
/// that already runs a configuration use `render_onto`, so that its apps keep their slots.
pub fn render(model: &Model, options: &RenderOptions) -> Result<Rendered, RenderError> {
    render_onto(model, options, &SlotPools::default())
}

/// Renders `model` for a target whose running configuration holds the app slots `previous`
/// (`readback::slot_pools`, or `Live::slot_pools`): apps keep their slots, new ones take free
/// slots (see `layout::assign_slots`). The same model and `previous` give the same bytes.
pub fn render_onto(
    model: &Model,
    options: &RenderOptions,
    previous: &SlotPools,
) -> Result<Rendered, RenderError> {
    let model = &*model.with_binds(&options.binds);
    let slots = layout::assign_slots(model, previous);
    let backends = layout::proxy_backends(model, &slots);
    let maps = layout::route_maps(model, &slots);
    for (file, entries) in &maps {
        filters::check_token(file).map_err(RenderError::Unsafe)?;
        for (key, value) in entries {
            filters::check_token(key).map_err(RenderError::Unsafe)?;
            filters::check_token(value).map_err(RenderError::Unsafe)?;
        }
    }

    let mut missing_pem = Vec::new();
    let mut crt_lists = BTreeMap::new();
    let mut certs = BTreeMap::new();
    let mut http_listeners = Vec::new();
    let mut tcp_listeners = Vec::new();
    let uses_acme = model.acme.is_some() && model.listeners.values().any(|l| l.acme);
    for (name, listener) in &model.listeners {
        let tls = listener.is_tls();
        let crt_list = tls.then(|| {
            let list_name = format!("{name}.crt-list");
            let mut lines = Vec::new();
            for file in listener
                .certificates()
                .map(|c| c.files.as_slice())
                .unwrap_or_default()
            {
                if file.pem.is_none() {
                    missing_pem.push(file.name.clone());
                }
                let file_name = format!("{name}.{}", file.name);
                lines.push(options.cert_ref(&file_name));
                certs.insert(file_name, file.clone());
            }
            // Certificates from the CA, after the folder's (its first file stays the default).
            for (file_name, file) in crate::acme::listener_certs(model, name) {
                if file.pem.is_none() {
                    missing_pem.push(file_name.clone());
                }
                lines.push(options.cert_ref(&file_name));
                certs.insert(file_name, file.clone());
            }
            crt_lists.insert(list_name.clone(), lines);
            options.cert_ref(&list_name)
        });
        if tls && crt_lists[&format!("{name}.crt-list")].is_empty() {
            return Err(RenderError::Unsafe(format!(
                "listener {name} gets its certificates from ACME and has no certificate yet: render it for a target (--target), whose state folder holds its default certificate"
            )));
        }
        let redirect_port = listener
            .redirect_to
            .as_ref()
            .and_then(|to| model.listeners.get(to))
            .map(|to| to.bind.port);
        let hsts = listener.hsts.map(|h| HstsView {
            max_age: h.max_age_seconds,
            include_subdomains: h.include_subdomains,
            preload: h.preload,
        });
        let lookups = layout::http_lookups(model, name);
        let view = ListenerView {
            name: name.clone(),
            bind: listener.bind.to_string(),
            own_map: options.map_ref(&layout::listener_map(name)),
            own_lookup: lookups.own,
            wildcard_lookup: lookups.wildcards,
            acme_challenges: uses_acme && listener.is_http() && !tls,
            redirect_port,
            hsts,
            crt_list,
            extra: listener.extra.clone(),
        };
        match &listener.kind {
            ListenerKind::Http { .. } => http_listeners.push(view),
            ListenerKind::Tcp {
                tls: TcpTls::Passthrough | TcpTls::Terminate(_),
            } => tcp_listeners.push(view),
        }
    }

    if !missing_pem.is_empty() {
        // A model recorded by an apply knows certificates by digest only: it cannot be rendered.
        return Err(RenderError::Unsafe(format!(
            "certificates known by digest only: {}",
            missing_pem.join(", ")
        )));
    }
    let view_of = |b: &ProxyBackend| BackendView {
        name: b.name.clone(),
        mode: layout::mode_str(b.mode),
        balance: b.balance.as_str(),
        http_check: b.http_check.as_ref().map(|h| CheckView {
            path: h.path.clone().unwrap_or_default(),
            host: h.host.clone(),
        }),
        servers: b
            .servers
            .iter()
            .map(|s| ServerView {
                name: s.name.clone(),
                address: s.address(),
                params: s.params(),
            })
            .collect(),
        extra: b.extra.clone(),
    };
    let (slot_backends, backend_views): (Vec<&ProxyBackend>, Vec<&ProxyBackend>) =
        backends.iter().partition(|b| b.slot.is_some());
    let backend_views: Vec<BackendView> = backend_views.into_iter().map(view_of).collect();

    let g = &model.global;
    let t = &g.timeouts;
    let timeouts: BTreeMap<&str, String> = [
        ("connect", t.connect),
        ("client", t.client),
        ("server", t.server),
        ("http_request", t.http_request),
        ("http_keep_alive", t.http_keep_alive),
        ("tunnel", t.tunnel),
        ("tcp_inspect", t.tcp_inspect),
        ("check", t.check),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_string()))
    .collect();
    let view = ConfigView {
        runtime_socket: options.runtime_socket.clone(),
        g: GlobalView {
            maxconn: g.maxconn,
            hard_stop_after: g.hard_stop_after.to_string(),
            mworker_max_reloads: g.mworker_max_reloads,
            log: g.log.clone(),
        },
        t: timeouts,
        http_listeners,
        tcp_listeners,
        shared_map: options.map_ref(layout::SHARED_HTTP_MAP),
        acme_challenge_map: crate::acme::CHALLENGE_MAP.to_string(),
        not_found: layout::NOT_FOUND_BACKEND,
        reject: layout::REJECT_BACKEND,
        backends: backend_views,
        stats: g.stats.as_ref().map(|b| b.to_string()),
        slots: !slot_backends.is_empty(),
    };
    let mut config = environment()
        .get_template("haproxy.cfg.j2")?
        .render(minijinja::Value::from(minijinja::value::Serde(view)))?;
    slot_blocks(&mut config, &slot_backends)?;

    let mut rendered = Rendered {
        options: options.clone(),
        config,
        maps,
        crt_lists,
        certs,
        backends,
        slots,
        acme_challenge_map: uses_acme.then(|| crate::acme::CHALLENGE_MAP.to_string()),
        acme_challenges: match uses_acme {
            true => model.issued.challenges.clone(),
            false => BTreeMap::new(),
        },
        manifest: String::new(),
    };
    let files = rendered
        .files()
        .into_iter()
        .filter(|f| f.path != MANIFEST)
        .map(|f| {
            let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&f.bytes));
            (f.path, digest)
        })
        .collect();
    let manifest = ManifestView {
        format_version: 1,
        document: model.document_text().raw(),
        certificates: model
            .listeners
            .iter()
            .filter_map(|(name, l)| {
                l.certificates().map(|c| {
                    (
                        name.as_str(),
                        c.files
                            .iter()
                            .map(|f| (f.name.as_str(), f.sha256.as_str()))
                            .collect(),
                    )
                })
            })
            .collect(),
        files,
        binds: &options.binds,
        acme: (model.issued != Default::default()).then(|| IssuedView {
            fallback: model.issued.fallback.as_ref().map(|f| f.sha256.as_str()),
            certs: model
                .issued
                .certs
                .iter()
                .map(|(d, f)| (d.as_str(), f.sha256.as_str()))
                .collect(),
            challenges: &model.issued.challenges,
        }),
    };
    rendered.manifest = serde_json::to_string(&manifest).expect("manifest serializes") + "\n";
    Ok(rendered)
}
