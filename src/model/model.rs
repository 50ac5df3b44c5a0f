//! The model: the desired state after `validate`, always valid, normalised (defaults applied)
//! and ordered (BTreeMaps), so `render` and `plan` are deterministic. Only `validate` builds it.

use super::names::{Bind, Duration};
use crate::spec::load::CertFile;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub listeners: BTreeMap<String, Listener>,
    pub agents: BTreeMap<String, Agent>,
    pub backends: BTreeMap<String, Backend>,
    pub domains: BTreeMap<String, Domain>,
    pub targets: BTreeMap<String, Target>,
    pub groups: BTreeMap<String, Vec<String>>,
    pub global: Global,
    /// Settings of the agent API (`api:`), kept as validated JSON for the API layer.
    pub api: Option<serde_json::Value>,
    /// Automatic certificates (`acme:`): where to get them, for the listeners with `acme: true`.
    pub acme: Option<Acme>,
    /// Certificates obtained from the ACME CA, kept in a target's state folder: not desired
    /// state but an input of the rendering, like a certificate folder. Empty until a target's
    /// store is read (`crate::acme::store::Store::overlay`).
    pub issued: Issued,
    /// The merged state document this model was validated from, recorded with each apply.
    pub(crate) document: StateDocument,
}

/// The merged state document, kept as compact JSON text. As a `serde_json::Value` tree a
/// 10k-domain state takes ~23 MB, as text ~1 MB; a daemon keeps one for its whole life and
/// reads it only on API calls, so it is parsed on demand.
#[derive(Debug, Clone)]
pub struct StateDocument(std::sync::Arc<serde_json::value::RawValue>);

impl StateDocument {
    pub fn new(value: &serde_json::Value) -> StateDocument {
        StateDocument(serde_json::value::to_raw_value(value).expect("JSON").into())
    }

    /// The JSON text itself, shared (`load::Base` keeps it).
    pub fn shared(&self) -> std::sync::Arc<serde_json::value::RawValue> {
        self.0.clone()
    }

    /// The document as compact JSON (the text its revision digests).
    pub fn json(&self) -> &str {
        self.0.get()
    }

    /// The document as JSON embedded verbatim where it is serialized (the manifest).
    pub fn raw(&self) -> &serde_json::value::RawValue {
        &self.0
    }
}

impl PartialEq for StateDocument {
    fn eq(&self, other: &StateDocument) -> bool {
        self.json() == other.json()
    }
}

impl Model {
    /// The state document the model came from (the merged YAML, as JSON), parsed anew: hold
    /// on to it rather than calling this in a loop.
    pub fn document(&self) -> serde_json::Value {
        serde_json::from_str(self.document.json()).expect("written by StateDocument::new")
    }

    /// One value of the state document by JSON pointer (`/domains/shop.example.com/owner`),
    /// without building the rest: each level is only scanned. An API call looks up one entry
    /// of a document that holds every route of the platform.
    pub fn document_pointer(&self, pointer: &str) -> Option<serde_json::Value> {
        use serde_json::value::RawValue;
        let mut raw: &RawValue = self.document.raw();
        if !pointer.is_empty() {
            for token in pointer.strip_prefix('/')?.split('/') {
                let key = token.replace("~1", "/").replace("~0", "~");
                raw = match raw.get().as_bytes().first() {
                    Some(b'{') => {
                        let entries: std::collections::HashMap<String, &RawValue> =
                            serde_json::from_str(raw.get()).ok()?;
                        entries.get(&key).copied()?
                    }
                    Some(b'[') => {
                        let items: Vec<&RawValue> = serde_json::from_str(raw.get()).ok()?;
                        items.get(key.parse::<usize>().ok()?).copied()?
                    }
                    _ => return None,
                };
            }
        }
        serde_json::from_str(raw.get()).ok()
    }

    /// The state document as kept: compact JSON.
    pub fn document_text(&self) -> &StateDocument {
        &self.document
    }

    /// The model with the certificates a target's ACME store holds.
    pub fn with_issued(mut self, issued: Issued) -> Model {
        self.issued = issued;
        self
    }

    /// The model as one target serves it: its own listener addresses (`binds`, checked by
    /// validation) in place of the state's. Borrowed when the target has none.
    pub fn with_binds(&self, binds: &BTreeMap<String, String>) -> std::borrow::Cow<'_, Model> {
        if binds.is_empty() {
            return std::borrow::Cow::Borrowed(self);
        }
        let mut model = self.clone();
        for (name, address) in binds {
            if let (Some(listener), Ok(bind)) = (
                model.listeners.get_mut(name),
                super::names::parse_bind(address),
            ) {
                listener.bind = bind;
            }
        }
        std::borrow::Cow::Owned(model)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub bind: Bind,
    pub kind: ListenerKind,
    /// Raw HAProxy lines for its frontend (`extra:`), each checked by `names::check_raw_line`.
    pub extra: Vec<String>,
    /// HTTP listeners: domains served here get certificates from the ACME CA (TLS even
    /// without a certificate folder).
    pub acme: bool,
    /// Plain HTTP listeners: every request is redirected to this TLS listener (ACME
    /// challenges excepted).
    pub redirect_to: Option<String>,
    /// TLS HTTP listeners: the Strict-Transport-Security header sent.
    pub hsts: Option<Hsts>,
}

/// `Strict-Transport-Security: max-age=…[; includeSubDomains][; preload]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hsts {
    pub max_age_seconds: u64,
    pub include_subdomains: bool,
    pub preload: bool,
}

/// Where certificates come from automatically (`acme:`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Acme {
    /// The CA's directory URL (https).
    pub directory: String,
    /// `mailto:` contacts of the account.
    pub contact: Vec<String>,
    /// A PEM bundle trusted for the directory's HTTPS instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Renew when less than this remains.
    pub renew_before: Duration,
    pub key_type: KeyType,
    /// Publishes DNS-01 TXT records for wildcards: `dns_hook set|clear <name> <value>`.
    pub dns_hook: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyType {
    EcdsaP256,
    EcdsaP384,
}

/// Certificates lunafront obtained itself, by domain, the self-signed default an ACME
/// listener without a certificate folder presents to names it has no certificate for, and
/// the HTTP-01 answers the CA may be asking for now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Issued {
    pub fallback: Option<CertFile>,
    pub certs: BTreeMap<String, CertFile>,
    /// `host/token` → key authorization: the challenge map's entries. Rendered into its file
    /// (not only added at runtime) so a HAProxy that restarts or reloads while the CA
    /// validates answers from its first request.
    pub challenges: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ListenerKind {
    /// Routes by the Host header; terminates TLS when it has certificates.
    Http { certificates: Option<Certificates> },
    /// Routes raw TCP by the TLS server name (SNI).
    Tcp { tls: TcpTls },
}

#[derive(Debug, Clone, PartialEq)]
pub enum TcpTls {
    /// Reads SNI from the ClientHello and forwards the TLS stream untouched.
    Passthrough,
    /// Terminates TLS here and forwards the plain stream.
    Terminate(Certificates),
}

impl Listener {
    pub fn is_http(&self) -> bool {
        matches!(self.kind, ListenerKind::Http { .. })
    }

    /// Terminates TLS: has certificates, or gets them from ACME.
    pub fn is_tls(&self) -> bool {
        self.certificates().is_some() || self.acme
    }

    pub fn certificates(&self) -> Option<&Certificates> {
        match &self.kind {
            ListenerKind::Http { certificates } => certificates.as_ref(),
            ListenerKind::Tcp {
                tls: TcpTls::Terminate(c),
            } => Some(c),
            ListenerKind::Tcp {
                tls: TcpTls::Passthrough,
            } => None,
        }
    }
}

/// The certificate folder of a listener: one PEM file (certificate and key) per name.
#[derive(Debug, Clone, PartialEq)]
pub struct Certificates {
    pub dir: PathBuf,
    pub files: Vec<CertFile>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    pub address: IpAddr,
    /// Every server on this agent is put in maintenance.
    pub maintenance: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    Http,
    Tcp,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub servers: Vec<Server>,
    pub health_check: Option<HealthCheck>,
    pub tls: Option<UpstreamTls>,
    pub balance: Balance,
    /// HTTP or TCP, from the listeners of the domains that use it.
    pub mode: Mode,
    /// Raw HAProxy lines for its backend section (`extra:`): such a backend is never pooled.
    pub extra: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastConn,
    Source,
}

impl Balance {
    pub fn as_str(&self) -> &'static str {
        match self {
            Balance::RoundRobin => "roundrobin",
            Balance::LeastConn => "leastconn",
            Balance::Source => "source",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    /// Unique in its backend: explicit, or `<agent>:<port>` / `<address>:<port>`.
    pub name: String,
    pub target: ServerTarget,
    pub port: u16,
    pub weight: u16,
    pub maintenance: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTarget {
    Agent(String),
    Address(IpAddr),
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    /// HTTP check of this path; `None` is a TCP connect check.
    pub path: Option<String>,
    /// Host header sent with the HTTP check.
    pub host: Option<String>,
    pub interval: Duration,
    pub rise: u8,
    pub fall: u8,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamTls {
    /// Verify the upstream certificate against the system CAs (or `ca_file`).
    pub verify: bool,
    pub ca_file: Option<String>,
    /// Server name sent in the ClientHello.
    pub sni: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Domain {
    pub backend: String,
    /// `None`: served on every HTTP listener.
    pub listener: Option<String>,
}

/// Where a rendering is applied. Serializable: a saved plan carries its target.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Target {
    Haproxy(HaproxyTarget),
    Dataplane(DataplaneTarget),
}

impl Target {
    pub fn fleet(&self) -> &FleetMember {
        match self {
            Target::Haproxy(t) => &t.fleet,
            Target::Dataplane(t) => &t.fleet,
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HaproxyTarget {
    pub config: PathBuf,
    pub master_socket: PathBuf,
    pub runtime_socket: PathBuf,
    pub spawn: bool,
    pub reload_timeout: Duration,
    /// Where applied states are recorded (history, last known good).
    pub state_dir: PathBuf,
    pub history: usize,
    /// Path of the haproxy binary used for `haproxy -c` and spawning.
    pub haproxy_bin: PathBuf,
    #[serde(flatten)]
    pub fleet: FleetMember,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DataplaneTarget {
    pub url: String,
    pub username: String,
    pub password: PasswordSource,
    pub timeout: Duration,
    /// Where the Data Plane API keeps map files on its host.
    pub maps_dir: String,
    /// Where it keeps SSL certificates on its host.
    pub certs_dir: String,
    /// The stats socket HAProxy serves there.
    pub runtime_socket: String,
    #[serde(flatten)]
    pub fleet: FleetMember,
    /// Where applied states (history) are kept, on the machine running lunafront.
    pub state_dir: PathBuf,
    pub history: usize,
}

/// What a target has as one front server of a fleet.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FleetMember {
    /// This server's own address for some listeners (listener name → `address:port`, already
    /// checked), when the servers of a fleet do not all bind the same.
    #[serde(default)]
    pub binds: BTreeMap<String, String>,
    /// Checked after an apply when the target is a fleet's canary.
    #[serde(default)]
    pub health_check: Option<CanaryCheck>,
}

/// A request through the front server that must answer 2xx: `url` reaches the server, `host`
/// (when set) is the route asked for, as the Host header.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CanaryCheck {
    pub url: String,
    #[serde(default)]
    pub host: Option<String>,
    /// How long it may take to answer 2xx.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PasswordSource {
    Env(String),
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Global {
    /// `None`: HAProxy derives it from the file-descriptor limit it runs with.
    pub maxconn: Option<u32>,
    pub hard_stop_after: Duration,
    pub mworker_max_reloads: u32,
    pub log: Option<String>,
    pub timeouts: Timeouts,
    /// Apply the valid rest of a state when some domains or backends are invalid (daemon).
    pub isolate_invalid: bool,
    /// Where HAProxy serves its own Prometheus exporter (`/metrics`) and stats page (`/stats`).
    pub stats: Option<Bind>,
    /// When a change removes many domains or backends at once, it is held (see `DeleteGuard`).
    pub delete_guard: DeleteGuard,
}

/// A change that removes more than `count` and more than `percent` % of the domains (or of
/// the backends) is not applied as it comes: `apply` refuses it without `--allow-deletes`, the
/// daemon holds it until the state stayed the same for `settle` or someone approves it. A
/// file cut short, emptied or half written looks like that.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeleteGuard {
    pub enabled: bool,
    pub count: u32,
    pub percent: u32,
    pub settle: Duration,
}

impl Default for DeleteGuard {
    fn default() -> Self {
        DeleteGuard {
            enabled: true,
            count: 10,
            percent: 10,
            settle: Duration::from_ms(10_000),
        }
    }
}

impl DeleteGuard {
    /// Whether removing `removed` of `before` entries goes past the guard.
    pub fn trips(&self, removed: usize, before: usize) -> bool {
        self.enabled
            && removed > self.count as usize
            && removed * 100 > self.percent as usize * before
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Timeouts {
    pub connect: Duration,
    pub client: Duration,
    pub server: Duration,
    pub http_request: Duration,
    pub http_keep_alive: Duration,
    /// Idle timeout of WebSocket and TCP (MongoDB) connections once established.
    pub tunnel: Duration,
    /// How long a TCP listener waits for the TLS ClientHello.
    pub tcp_inspect: Duration,
    pub check: Duration,
}

impl Default for Global {
    fn default() -> Self {
        Global {
            maxconn: None,
            hard_stop_after: Duration::from_ms(30 * 60_000),
            mworker_max_reloads: 50,
            log: None,
            timeouts: Timeouts {
                connect: Duration::from_ms(5_000),
                client: Duration::from_ms(60_000),
                server: Duration::from_ms(60_000),
                http_request: Duration::from_ms(10_000),
                http_keep_alive: Duration::from_ms(10_000),
                tunnel: Duration::from_ms(3_600_000),
                tcp_inspect: Duration::from_ms(5_000),
                check: Duration::from_ms(3_000),
            },
            isolate_invalid: false,
            stats: None,
            delete_guard: DeleteGuard::default(),
        }
    }
}
