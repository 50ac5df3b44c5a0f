//! One row per rule: every diagnostic code `load`, the schema and `validate` can report, with a
//! state that triggers it and the exact first line the user sees — `file:line:col:
//! severity[code]: message` — so both the message and the position are pinned. A code found in
//! the source without a row here fails `every_code_has_a_row`.

use super::validate;
use crate::spec::load::load_path;
use std::collections::BTreeSet;

/// A rule's case: the state's files (`state.yaml` alone, or several in a folder, and other
/// files such as certificates) and the diagnostic expected, first line only.
struct Row {
    code: &'static str,
    files: &'static [(&'static str, &'static str)],
    expect: &'static str,
}

const fn row(
    code: &'static str,
    files: &'static [(&'static str, &'static str)],
    expect: &'static str,
) -> Row {
    Row {
        code,
        files,
        expect,
    }
}

const PEM_CERT_ONLY: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

const ROWS: &[Row] = &[
    // ---- load: YAML and the merge of several files ----
    row(
        "yaml-syntax",
        &[("state.yaml", "version: 1\nlisteners: [\n")],
        "state.yaml:3:1: error[yaml-syntax]: did not find expected node content",
    ),
    row(
        "not-a-mapping",
        &[("state.yaml", "- listeners\n")],
        "state.yaml:1:1: error[not-a-mapping]: a state file must be a mapping of sections",
    ),
    row(
        "version-mismatch",
        &[("a.yaml", "version: 1\n"), ("b.yaml", "version: 2\n")],
        "b.yaml:1:1: error[version-mismatch]: `version` is 2 here but 1 in another file",
    ),
    row(
        "duplicate-key",
        &[
            (
                "a.yaml",
                "version: 1\nagents:\n  agent-7: { address: 10.0.0.7 }\n",
            ),
            ("b.yaml", "agents:\n  agent-7: { address: 10.0.0.8 }\n"),
        ],
        "b.yaml:2:3: error[duplicate-key]: agent `agent-7` is defined twice",
    ),
    // A key written twice in one file: YAML itself forbids it.
    row(
        "yaml-syntax",
        &[(
            "state.yaml",
            "version: 1\nagents:\n  agent-7: { address: 10.0.0.7 }\n  agent-7: { address: 10.0.0.8 }\n",
        )],
        "state.yaml:4:3: error[yaml-syntax]: agents: `agent-7` is defined twice in the same mapping",
    ),
    // ---- ACME, redirects and HSTS ----
    row(
        "acme-on-tcp",
        &[(
            "state.yaml",
            "version: 1\nacme: { directory: \"https://acme.example.com/dir\" }\nlisteners:\n  db: { bind: \":27017\", tls: passthrough, acme: true }\n",
        )],
        "state.yaml:4:43: error[acme-on-tcp]: listener `db` routes TCP by server name; `acme` gets certificates for HTTP listeners",
    ),
    row(
        "acme-not-configured",
        &[(
            "state.yaml",
            "version: 1\nlisteners:\n  http: { bind: \":80\" }\n  https: { bind: \":443\", acme: true }\n",
        )],
        "state.yaml:4:26: error[acme-not-configured]: listener `https` asks for ACME certificates, but the state has no `acme:` section",
    ),
    row(
        "acme-without-http-listener",
        &[(
            "state.yaml",
            "version: 1\nacme: { directory: \"https://acme.example.com/dir\" }\nlisteners:\n  https: { bind: \":443\", acme: true }\n",
        )],
        "state.yaml:4:26: error[acme-without-http-listener]: listener `https` asks for ACME certificates, but no plain HTTP listener can answer the CA's HTTP-01 challenges",
    ),
    row(
        "acme-wildcard-needs-dns",
        &[(
            "state.yaml",
            "version: 1\nacme: { directory: \"https://acme.example.com/dir\" }\nlisteners:\n  http: { bind: \":80\" }\n  https: { bind: \":443\", acme: true }\nbackends:\n  web: { servers: [ { address: 10.0.0.8, port: 80 } ] }\ndomains:\n  \"*.preview.example.com\": { backend: web }\n",
        )],
        "state.yaml:9:3: error[acme-wildcard-needs-dns]: wildcard domain `*.preview.example.com` is served on ACME listener `https`, and a CA validates wildcards only through DNS (DNS-01)",
    ),
    row(
        "acme-unused",
        &[(
            "state.yaml",
            "version: 1\nacme: { directory: \"https://acme.example.com/dir\" }\nlisteners:\n  http: { bind: \":80\" }\n",
        )],
        "state.yaml:2:1: warning[acme-unused]: the `acme` section is set, but no listener has `acme: true`",
    ),
    row(
        "redirect-invalid",
        &[(
            "state.yaml",
            "version: 1\nlisteners:\n  http: { bind: \":80\", redirect_to: other }\n  other: { bind: \":8080\" }\n",
        )],
        "state.yaml:3:37: error[redirect-invalid]: listener `http` redirects to `other`, which is not an HTTPS listener",
    ),
    row(
        "redirect-pinned-domain",
        &[(
            "state.yaml",
            "version: 1\nacme: { directory: \"https://acme.example.com/dir\" }\nlisteners:\n  http: { bind: \":80\", redirect_to: https }\n  https: { bind: \":443\", acme: true }\nbackends:\n  web: { servers: [ { address: 10.0.0.8, port: 80 } ] }\ndomains:\n  plain.example.com: { backend: web, listener: http }\n",
        )],
        "state.yaml:9:48: error[redirect-pinned-domain]: domain `plain.example.com` is served only on listener `http`, which redirects every request to `https`",
    ),
    row(
        "hsts-without-tls",
        &[(
            "state.yaml",
            "version: 1\nlisteners:\n  http: { bind: \":80\", hsts: true }\n",
        )],
        "state.yaml:3:24: error[hsts-without-tls]: listener `http` does not serve HTTPS; browsers ignore Strict-Transport-Security over plain HTTP",
    ),
    row(
        "hsts-preload",
        &[(
            "state.yaml",
            "version: 1\nacme: { directory: \"https://acme.example.com/dir\" }\nlisteners:\n  http: { bind: \":80\" }\n  https: { bind: \":443\", acme: true, hsts: { max_age: 30d, preload: true } }\n",
        )],
        "state.yaml:5:60: error[hsts-preload]: listener `https` asks for HSTS preloading without `include_subdomains: true` and a `max_age` of at least 365d",
    ),
    // A file emptied or cut short before its first entry (an editor's truncate-then-write, a
    // disk full): never read as a state without entries.
    row(
        "empty-file",
        &[("state.yaml", "# the state\ndomains:\n")],
        "state.yaml:1:1: error[empty-file]: the file names sections but holds no entries: a file cut short or still being written? It is not read as a state without entries",
    ),
    // A folder named like a state file (a file replaced by a folder).
    row(
        "not-a-file",
        &[
            ("a.yaml", "version: 1\n"),
            ("b.yaml", "domains: {}\n"),
            ("c.yaml/readme.txt", "a folder, not a file\n"),
        ],
        "c.yaml:1:1: error[not-a-file]: a folder has the name of a state file",
    ),
    // ---- the JSON Schema ----
    row(
        "unknown-field",
        &[(
            "state.yaml",
            "version: 1\nagents:\n  agent-7: { address: 10.0.0.7, adress: 10.0.0.8 }\n",
        )],
        "state.yaml:3:33: error[unknown-field]: unknown field `adress` in agent `agent-7`",
    ),
    row(
        "missing-field",
        &[(
            "state.yaml",
            "version: 1\nagents:\n  agent-7: { maintenance: true }\n",
        )],
        "state.yaml:3:3: error[missing-field]: agent `agent-7` is missing the required field `address`",
    ),
    row(
        "wrong-type",
        &[(
            "state.yaml",
            "version: 1\nagents:\n  agent-7: { address: 10.0.0.7, maintenance: yes-please }\n",
        )],
        "state.yaml:3:46: error[wrong-type]: agent `agent-7` field `maintenance` must be a boolean, found a string",
    ),
    row(
        "invalid-value",
        &[(
            "state.yaml",
            "version: 1\nlisteners:\n  http: { bind: \"127.0.0.1:80\", mode: udp }\n",
        )],
        "state.yaml:3:39: error[invalid-value]: listener `http` field `mode` is `udp`, which is not allowed",
    ),
    row(
        "port-range",
        &[(
            "state.yaml",
            "version: 1\nagents:\n  a: { address: 10.0.0.7 }\nbackends:\n  b: { servers: [ { agent: a, port: 70000 } ] }\n",
        )],
        "state.yaml:5:37: error[port-range]: backend `b` field `servers[0].port` `70000` is out of range (1-65535)",
    ),
    row(
        "out-of-range",
        &[(
            "state.yaml",
            "version: 1\nagents:\n  a: { address: 10.0.0.7 }\nbackends:\n  b: { servers: [ { agent: a, port: 80, weight: 300 } ] }\n",
        )],
        "state.yaml:5:49: error[out-of-range]: backend `b` field `servers[0].weight` `300` is out of range (0-256)",
    ),
    row(
        "too-few",
        &[(
            "state.yaml",
            "version: 1\nbackends:\n  b: { servers: [] }\n",
        )],
        "state.yaml:3:17: error[too-few]: backend `b` field `servers` needs at least 1 item(s)",
    ),
    row(
        "schema",
        &[(
            "state.yaml",
            "version: 1\ntargets:\n  t: { type: haproxy, config: /x/haproxy.cfg }\ngroups:\n  g: [ t, t ]\n",
        )],
        "state.yaml:5:6: error[schema]: group `g`: [\"t\",\"t\"] has non-unique elements",
    ),
    // ---- names and listeners ----
    row(
        "invalid-name",
        &[(
            "state.yaml",
            "version: 1\nagents:\n  \"bad name\": { address: 10.0.0.7 }\n",
        )],
        "state.yaml:3:3: error[invalid-name]: `bad name` is not a valid name for an entry of `agents`",
    ),
    row(
        "invalid-bind",
        &[(
            "state.yaml",
            "version: 1\nlisteners:\n  http: { bind: \"localhost\" }\n",
        )],
        "state.yaml:3:17: error[invalid-bind]: listener `http` bind `localhost`: a bind is `address:port`, such as `127.0.0.1:8080`, `[::1]:8080` or `:8080`",
    ),
    row(
        "bind-conflict",
        &[(
            "state.yaml",
            "version: 1\nlisteners:\n  a: { bind: \"127.0.0.1:8080\" }\n  b: { bind: \":8080\" }\n",
        )],
        "state.yaml:4:14: error[bind-conflict]: listener `b` binds `:8080`, which listener `a` already holds",
    ),
    row(
        "certificates-unused",
        &[
            (
                "state.yaml",
                "version: 1\nlisteners:\n  db: { bind: \":27017\", tls: passthrough, certificates: certs }\n",
            ),
            ("certs/db.pem", PEM_CERT_ONLY),
        ],
        "state.yaml:3:43: error[certificates-unused]: listener `db` passes TLS through untouched, so its certificates would never be used",
    ),
    row(
        "missing-certificates",
        &[(
            "state.yaml",
            "version: 1\nlisteners:\n  db: { bind: \":27017\", tls: terminate }\n",
        )],
        "state.yaml:3:25: error[missing-certificates]: listener `db` terminates TLS but has no `certificates`",
    ),
    row(
        "tcp-without-tls",
        &[(
            "state.yaml",
            "version: 1\nlisteners:\n  db: { bind: \":27017\", mode: tcp }\n",
        )],
        "state.yaml:3:3: error[tcp-without-tls]: TCP listener `db` has no `tls`: without TLS there is no server name to route on",
    ),
    row(
        "tls-on-http",
        &[(
            "state.yaml",
            "version: 1\nlisteners:\n  web: { bind: \":80\", mode: http, tls: passthrough }\n",
        )],
        "state.yaml:3:35: error[tls-on-http]: listener `web` is an HTTP listener; `tls` applies to TCP listeners",
    ),
    row(
        "certificates-missing",
        &[(
            "state.yaml",
            "version: 1\nlisteners:\n  web: { bind: \":443\", certificates: nowhere }\n",
        )],
        "state.yaml:3:38: error[certificates-missing]: certificates folder `",
    ),
    row(
        "certificates-empty",
        &[
            (
                "state.yaml",
                "version: 1\nlisteners:\n  web: { bind: \":443\", certificates: certs }\n",
            ),
            ("certs/readme.txt", "no PEM files here\n"),
        ],
        "state.yaml:3:38: error[certificates-empty]: certificates folder `",
    ),
    row(
        "certificate-invalid",
        &[
            (
                "state.yaml",
                "version: 1\nlisteners:\n  web: { bind: \":443\", certificates: certs }\n",
            ),
            ("certs/shop.pem", PEM_CERT_ONLY),
        ],
        "state.yaml:3:38: error[certificate-invalid]: listener `web` certificates: `shop.pem` holds no private key",
    ),
    // ---- agents, backends, servers ----
    row(
        "invalid-address",
        &[(
            "state.yaml",
            "version: 1\nagents:\n  a: { address: 0.0.0.0 }\n",
        )],
        "state.yaml:3:17: error[invalid-address]: agent `a` address `0.0.0.0` cannot be connected to",
    ),
    row(
        "invalid-address",
        &[(
            "state.yaml",
            "version: 1\nagents:\n  a: { address: not-an-ip }\n",
        )],
        "state.yaml:3:17: error[invalid-address]: agent `a` address `not-an-ip` is not an IP address",
    ),
    row(
        "duplicate-server",
        &[(
            "state.yaml",
            "version: 1\nagents:\n  a: { address: 10.0.0.7 }\nbackends:\n  b:\n    servers:\n      - { agent: a, port: 80 }\n      - { agent: a, port: 80 }\n",
        )],
        "state.yaml:8:9: error[duplicate-server]: backend `b` lists server `a:80` twice",
    ),
    row(
        "unknown-agent",
        &[(
            "state.yaml",
            "version: 1\nagents:\n  agent-7: { address: 10.0.0.7 }\nbackends:\n  b: { servers: [ { agent: agent-8, port: 80 } ] }\n",
        )],
        "state.yaml:5:28: error[unknown-agent]: agent `agent-8` is not defined",
    ),
    row(
        "server-target",
        &[(
            "state.yaml",
            "version: 1\nagents:\n  a: { address: 10.0.0.7 }\nbackends:\n  b: { servers: [ { agent: a, address: 10.0.0.8, port: 80 } ] }\n",
        )],
        "state.yaml:5:19: error[server-target]: backend `b` server has both `agent` and `address`",
    ),
    row(
        "server-target",
        &[(
            "state.yaml",
            "version: 1\nbackends:\n  b: { servers: [ { port: 80 } ] }\n",
        )],
        "state.yaml:3:19: error[server-target]: backend `b` server has neither `agent` nor `address`",
    ),
    row(
        "invalid-path",
        &[(
            "state.yaml",
            "version: 1\nbackends:\n  b: { servers: [ { address: 10.0.0.8, port: 80 } ], health_check: { path: \"/a b\" } }\n",
        )],
        "state.yaml:3:76: error[invalid-path]: backend `b` health check path `/a b` is not allowed",
    ),
    row(
        "invalid-host",
        &[(
            "state.yaml",
            "version: 1\nbackends:\n  b: { servers: [ { address: 10.0.0.8, port: 80 } ] }\ndomains:\n  Shop.example.com: { backend: b }\n",
        )],
        "state.yaml:5:3: error[invalid-host]: domain `Shop.example.com` has uppercase letters",
    ),
    row(
        "host-without-path",
        &[(
            "state.yaml",
            "version: 1\nbackends:\n  b: { servers: [ { address: 10.0.0.8, port: 80 } ], health_check: { host: b.example.com } }\n",
        )],
        "state.yaml:3:70: error[host-without-path]: backend `b` sets a health check `host` but no `path`",
    ),
    row(
        "ca-without-verify",
        &[(
            "state.yaml",
            "version: 1\nbackends:\n  b: { servers: [ { address: 10.0.0.8, port: 80 } ], tls: { ca_file: /etc/ssl/ca.pem } }\n",
        )],
        "state.yaml:3:61: error[ca-without-verify]: backend `b` names a `ca_file` but does not verify",
    ),
    row(
        "invalid-duration",
        &[(
            "state.yaml",
            "version: 1\nglobal:\n  timeouts: { connect: 99999999999s }\n",
        )],
        "state.yaml:3:24: error[invalid-duration]: ",
    ),
    // ---- domains ----
    row(
        "unknown-backend",
        &[(
            "state.yaml",
            "version: 1\nlisteners:\n  http: { bind: \":80\" }\nbackends:\n  shop: { servers: [ { address: 10.0.0.8, port: 80 } ] }\ndomains:\n  shop.example.com: { backend: shpo }\n",
        )],
        "state.yaml:7:32: error[unknown-backend]: backend `shpo` is not defined",
    ),
    row(
        "unknown-listener",
        &[(
            "state.yaml",
            "version: 1\nlisteners:\n  http: { bind: \":80\" }\nbackends:\n  shop: { servers: [ { address: 10.0.0.8, port: 80 } ] }\ndomains:\n  shop.example.com: { backend: shop, listener: htpp }\n",
        )],
        "state.yaml:7:48: error[unknown-listener]: listener `htpp` is not defined",
    ),
    // A target's binds name listeners by key: the position is the name's, not the address's.
    row(
        "unknown-listener",
        &[(
            "state.yaml",
            "version: 1\nlisteners:\n  http: { bind: \":80\" }\ntargets:\n  t: { type: haproxy, config: /x/haproxy.cfg, binds: { htpp: \"10.0.0.5:80\" } }\n",
        )],
        "state.yaml:5:56: error[unknown-listener]: listener `htpp` is not defined",
    ),
    // Raw HAProxy lines are the operator's: an entry an agent owns cannot carry them.
    row(
        "extra-not-allowed",
        &[(
            "state.yaml",
            "version: 1\nagents:\n  a1: { address: 10.0.0.7 }\nbackends:\n  shop: { owner: a1, servers: [ { agent: a1, port: 80 } ], extra: [ \"timeout queue 5s\" ] }\n",
        )],
        "state.yaml:5:60: error[extra-not-allowed]: backend `shop` belongs to agent `a1`: raw HAProxy lines (`extra:`) are for the operator only",
    ),
    row(
        "invalid-extra",
        &[(
            "state.yaml",
            "version: 1\nbackends:\n  shop: { servers: [ { address: 10.0.0.8, port: 80 } ], extra: [ \"backend other\" ] }\n",
        )],
        "state.yaml:3:66: error[invalid-extra]: backend `shop` extra line 1: the line starts a new `backend` section; extra lines belong to their own section",
    ),
    // A network that is no network (a prefix past 32) is an error, not a silent no-match.
    row(
        "invalid-network",
        &[(
            "state.yaml",
            "version: 1\napi:\n  apps_domain: apps.example.com\n  allowed_networks: [ 10.0.0.0/40 ]\n",
        )],
        "state.yaml:4:23: error[invalid-network]: api.allowed_networks: the prefix `/40` is not 0 to 32",
    ),
    row(
        "no-http-listener",
        &[(
            "state.yaml",
            "version: 1\nlisteners:\n  db: { bind: \":27017\", tls: passthrough }\nbackends:\n  shop: { servers: [ { address: 10.0.0.8, port: 80 } ] }\ndomains:\n  shop.example.com: { backend: shop }\n",
        )],
        "state.yaml:7:3: error[no-http-listener]: domain `shop.example.com` is an HTTP route, but no listener serves HTTP",
    ),
    row(
        "no-http-listener",
        &[(
            "state.yaml",
            "version: 1\nbackends:\n  shop: { servers: [ { address: 10.0.0.8, port: 80 } ] }\ndomains:\n  shop.example.com: { backend: shop }\n",
        )],
        "state.yaml:5:3: error[no-http-listener]: domain `shop.example.com` is an HTTP route, but there are no listeners",
    ),
    row(
        "listener-without-tls",
        &[(
            "state.yaml",
            "version: 1\nlisteners:\n  db: { bind: \":27017\", mode: tcp }\nbackends:\n  db: { servers: [ { address: 10.0.0.8, port: 27017 } ] }\ndomains:\n  db.example.com: { backend: db, listener: db }\n",
        )],
        "state.yaml:7:44: error[listener-without-tls]: domain `db.example.com` routes by TLS server name, but listener `db` has no TLS",
    ),
    row(
        "unused-backend",
        &[(
            "state.yaml",
            "version: 1\nbackends:\n  idle: { servers: [ { address: 10.0.0.8, port: 80 } ] }\n",
        )],
        "state.yaml:3:3: warning[unused-backend]: backend `idle` is not used by any domain",
    ),
    row(
        "backend-mode-conflict",
        &[(
            "state.yaml",
            "version: 1\nlisteners:\n  http: { bind: \":80\" }\n  db: { bind: \":27017\", tls: passthrough }\nbackends:\n  both: { servers: [ { address: 10.0.0.8, port: 80 } ] }\ndomains:\n  web.example.com: { backend: both }\n  db.example.com: { backend: both, listener: db }\n",
        )],
        "state.yaml:6:3: error[backend-mode-conflict]: backend `both` is used by an HTTP domain and by a TCP (SNI) domain",
    ),
    row(
        "http-check-on-tcp",
        &[(
            "state.yaml",
            "version: 1\nlisteners:\n  db: { bind: \":27017\", tls: passthrough }\nbackends:\n  db: { servers: [ { address: 10.0.0.8, port: 27017 } ], health_check: { path: /health } }\ndomains:\n  db.example.com: { backend: db, listener: db }\n",
        )],
        "state.yaml:5:74: error[http-check-on-tcp]: backend `db` serves TCP (SNI) domains, so it cannot be checked over HTTP",
    ),
    row(
        "name-claimed-twice",
        &[(
            "state.yaml",
            "version: 1\nlisteners:\n  http: { bind: \":80\" }\n  db: { bind: \":27017\", tls: passthrough }\nbackends:\n  web: { servers: [ { address: 10.0.0.8, port: 80 } ] }\n  db: { servers: [ { address: 10.0.0.8, port: 27017 } ] }\ndomains:\n  \"*.example.com\": { backend: db, listener: db }\n  shop.example.com: { backend: web }\n",
        )],
        "state.yaml:10:3: error[name-claimed-twice]: `shop.example.com` is claimed as HTTP by this domain and as TCP (SNI) by wildcard `*.example.com`",
    ),
    row(
        "redundant-domain",
        &[(
            "state.yaml",
            "version: 1\nlisteners:\n  http: { bind: \":80\" }\nbackends:\n  web: { servers: [ { address: 10.0.0.8, port: 80 } ] }\ndomains:\n  \"*.example.com\": { backend: web }\n  shop.example.com: { backend: web }\n",
        )],
        "state.yaml:8:3: warning[redundant-domain]: domain `shop.example.com` routes where wildcard `*.example.com` already sends it",
    ),
    // ---- targets and groups ----
    row(
        "password-source",
        &[(
            "state.yaml",
            "version: 1\ntargets:\n  edge: { type: dataplane, url: \"http://10.0.0.5:5555\", username: admin }\n",
        )],
        "state.yaml:3:3: error[password-source]: target `edge` needs exactly one of `password_env` and `password_file`",
    ),
    row(
        "unknown-target",
        &[(
            "state.yaml",
            "version: 1\ntargets:\n  edge-1: { type: haproxy, config: /x/haproxy.cfg }\ngroups:\n  edge: [ edge-1, edge-2 ]\n",
        )],
        "state.yaml:5:19: error[unknown-target]: target `edge-2` is not defined",
    ),
    row(
        "group-shadows-target",
        &[(
            "state.yaml",
            "version: 1\ntargets:\n  edge: { type: haproxy, config: /x/haproxy.cfg }\ngroups:\n  edge: [ edge ]\n",
        )],
        "state.yaml:5:3: error[group-shadows-target]: group `edge` has the name of a target",
    ),
];

/// The rows' states, validated: the first line of each diagnostic, paths relative to the
/// state's folder.
fn diagnostics_of(row: &Row) -> Vec<(&'static str, String, Option<String>)> {
    let dir = tempfile::TempDir::new().unwrap();
    for (name, text) in row.files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
    }
    let yaml = row
        .files
        .iter()
        .filter(|(n, _)| n.ends_with(".yaml"))
        .count();
    let state = if yaml == 1 {
        dir.path().join(row.files[0].0)
    } else {
        dir.path().to_path_buf()
    };
    let source = load_path(&state).unwrap();
    let prefix = format!("{}/", dir.path().display());
    validate(&source)
        .diagnostics
        .into_iter()
        .map(|d| {
            let text = d.to_string().replace(&prefix, "");
            let first = text.lines().next().unwrap_or_default().to_string();
            (d.code, first, d.hint)
        })
        .collect()
}

#[test]
fn each_rule_reports_its_message_at_the_users_text() {
    let mut wrong = Vec::new();
    for row in ROWS {
        let found = diagnostics_of(row);
        let mine: Vec<&(&str, String, Option<String>)> = found
            .iter()
            .filter(|(code, ..)| *code == row.code)
            .collect();
        match mine
            .iter()
            .find(|(_, first, _)| first.starts_with(row.expect))
        {
            Some((_, _, hint)) => {
                // Every rule says what to do, except the two whose message says it all.
                if hint.as_deref().is_none_or(str::is_empty)
                    && !matches!(row.code, "too-few" | "schema")
                {
                    wrong.push(format!("{}: no hint", row.code));
                }
            }
            None => wrong.push(format!(
                "{}: expected {:?}\n  got {:#?}",
                row.code,
                row.expect,
                found.iter().map(|(_, f, _)| f).collect::<Vec<_>>()
            )),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The codes the rules can report, read from their source: every kebab-case literal of the
/// files that report diagnostics, and the code of every `Diagnostic::error(`/`warning(`.
fn codes_in_source() -> BTreeSet<String> {
    let sources = [
        include_str!("../validate.rs"),
        include_str!("../../spec/schema.rs"),
        include_str!("../../spec/load.rs"),
    ];
    let mut codes = BTreeSet::new();
    for text in sources {
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            // A `'"'` character literal is not the start of a string.
            if bytes[i] != b'"' || (i > 0 && bytes[i - 1] == b'\'') {
                i += 1;
                continue;
            }
            let start = i + 1;
            let mut end = start;
            while end < bytes.len() && bytes[end] != b'"' {
                end += if bytes[end] == b'\\' { 2 } else { 1 };
            }
            let literal = &text[start..end.min(text.len())];
            let kebab = literal.contains('-')
                && literal
                    .split('-')
                    .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()));
            let called = ["Diagnostic::error(", "Diagnostic::warning("]
                .iter()
                .any(|call| text[..i].trim_end().ends_with(call));
            if kebab || called {
                codes.insert(literal.to_string());
            }
            i = end + 1;
        }
    }
    codes
}

#[test]
fn every_code_has_a_row() {
    let codes = codes_in_source();
    let rows: BTreeSet<String> = ROWS.iter().map(|r| r.code.to_string()).collect();
    let missing: Vec<&String> = codes.difference(&rows).collect();
    assert!(missing.is_empty(), "rules without a row: {missing:?}");
    let unknown: Vec<&String> = rows.difference(&codes).collect();
    assert!(
        unknown.is_empty(),
        "rows for codes no rule reports: {unknown:?}"
    );
    // The scan sees what it should: 57 codes (the 9 of ACME, redirects and HSTS among them).
    assert!(codes.len() >= 57, "{codes:?}");
}

#[test]
fn a_document_pointer_finds_what_the_whole_document_holds() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("state.yaml"),
        "version: 1\nlisteners:\n  web: { bind: \"127.0.0.1:8080\" }\nbackends:\n  shop: { servers: [ { address: 10.0.0.1, port: 80 } ] }\ndomains:\n  shop.example.com: { backend: shop, owner: agent-7 }\n  a.example.com: { backend: shop }\n",
    )
    .unwrap();
    let source = load_path(&dir.path().join("state.yaml")).unwrap();
    let validation = validate(&source);
    let model = validation
        .model
        .unwrap_or_else(|| panic!("{:?}", validation.diagnostics));
    let document = model.document();
    for pointer in [
        "",
        "/domains",
        "/domains/shop.example.com/owner",
        "/domains/a~0b.example.com",
        "/backends/shop/servers/0/port",
        "/backends/shop/servers/1",
        "/domains/nowhere.example.com",
        "/listeners/web/bind/x",
    ] {
        assert_eq!(
            model.document_pointer(pointer),
            document.pointer(pointer).cloned(),
            "{pointer}"
        );
    }
    assert_eq!(
        model.document_pointer("/domains/shop.example.com/owner"),
        Some(serde_json::json!("agent-7"))
    );
}
