//! `validate::delta`: the validation of a state in which a few files changed (an agent's
//! fragment, written by the API), made from the validation of the state before (a `Checked`).
//! Only the entries the change can affect are checked again — the changed files' domains and
//! backends, the domains that use a changed backend, what a changed wildcard covers — together
//! with every section other than `domains` and `backends` (small), in one run of the same rules
//! over a document holding just those entries; every other entry keeps its result. The outcome
//! is the full validation's, model and diagnostics (a property test compares them).

use super::{Model, Validation, check_document, sort_diagnostics};
use crate::model::names;
use crate::spec::diagnostics::Diagnostic;
use crate::spec::load::{Base, CertDir, Source};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// A state that validated whole, kept to validate the next change from (`validate_from`): the
/// load it came from (compacted), its model and its diagnostics (warnings only).
pub struct Checked {
    pub base: Base,
    pub model: Arc<Model>,
    pub warnings: Vec<Diagnostic>,
    /// The listeners' certificate folders as read then: the rules judge domains by them too
    /// (a wildcard on an ACME listener needs a certificate file that covers it), and a
    /// folder changes without any state file changing.
    certificates: BTreeMap<String, CertDir>,
}

impl Checked {
    /// `None` when `source` has problems of its own or a diagnostic is an error.
    pub fn new(
        source: &Source,
        model: Arc<Model>,
        diagnostics: Vec<Diagnostic>,
    ) -> Option<Checked> {
        if diagnostics.iter().any(Diagnostic::is_error) {
            return None;
        }
        Some(Checked {
            base: Base::new(source, model.document_text().shared())?,
            model,
            warnings: diagnostics,
            certificates: source.certificates.clone(),
        })
    }
}

/// The sections whose entries a change may touch and still be checked from `before`: the ones
/// an agent's fragment holds. A change anywhere else (a listener, a target, `global`) can
/// change how every entry is judged.
const ENTRY_SECTIONS: [&str; 3] = ["agents", "backends", "domains"];

/// `validate(source)`, made from `before` (see the module): `source` is a load of the same
/// state folder. `None` when the change is not one this can follow — a changed file holding
/// another section, agents added or removed, a certificate folder changed, a source with
/// problems of its own — and the caller validates the whole state.
pub fn validate_from(before: &Checked, source: &Source) -> Option<Validation> {
    if !source.diagnostics.is_empty() || source.certificates != before.certificates {
        return None;
    }
    let changes = before.base.changes(source);
    if !changes
        .sections
        .iter()
        .all(|s| ENTRY_SECTIONS.contains(&s.as_str()))
    {
        return None;
    }
    let touched = |side: &BTreeSet<(String, String)>, section: &str| -> BTreeSet<String> {
        side.iter()
            .filter(|(s, _)| s == section)
            .map(|(_, name)| name.clone())
            .collect()
    };
    // Backends refer to agents by name only: the same names, the same judgement.
    if touched(&changes.before, "agents") != touched(&changes.after, "agents") {
        return None;
    }
    let document = source.document.as_object()?;
    let empty = Map::new();
    let domains = document
        .get("domains")
        .map_or(Some(&empty), Value::as_object)?;
    let backends = document
        .get("backends")
        .map_or(Some(&empty), Value::as_object)?;
    let old = &before.model;

    let domains_before = touched(&changes.before, "domains");
    let domains_after = touched(&changes.after, "domains");
    let backend_of = |host: &str| {
        domains
            .get(host)
            .and_then(|d| d.get("backend"))
            .and_then(Value::as_str)
    };
    // Backends judged again: the changed ones, and those whose users changed (a backend's
    // mode and "unused" come from the domains that use it).
    let mut rejudged_backends: BTreeSet<String> = touched(&changes.before, "backends");
    rejudged_backends.extend(touched(&changes.after, "backends"));
    for host in &domains_before {
        if let Some(domain) = old.domains.get(host) {
            rejudged_backends.insert(domain.backend.clone());
        }
    }
    for host in &domains_after {
        if let Some(backend) = backend_of(host) {
            rejudged_backends.insert(backend.to_string());
        }
    }
    // Domains judged again: the changed ones, the users of a backend judged again, and what a
    // wildcard among them covers (a name claimed twice, a redundant domain).
    let mut rejudged_domains: BTreeSet<String> = domains_after.clone();
    rejudged_domains.extend(
        domains
            .keys()
            .filter(|host| backend_of(host).is_some_and(|b| rejudged_backends.contains(b)))
            .cloned(),
    );
    let wildcards: BTreeSet<String> = domains_before
        .iter()
        .chain(&rejudged_domains)
        .filter(|h| names::is_wildcard(h))
        .cloned()
        .collect();
    if !wildcards.is_empty() {
        rejudged_domains.extend(
            domains
                .keys()
                .filter(|h| cover(h).is_some_and(|c| wildcards.contains(&c)))
                .cloned(),
        );
    }
    // A domain is judged with the wildcard that covers it (its backend is looked up by name).
    let covers: Vec<String> = rejudged_domains
        .iter()
        .filter_map(|h| cover(h))
        .filter(|c| domains.contains_key(c))
        .collect();
    rejudged_domains.extend(covers);

    // One run of the rules over every other section and just those entries.
    let mut part: Map<String, Value> = document
        .iter()
        .filter(|(section, _)| *section != "domains" && *section != "backends")
        .map(|(section, value)| (section.clone(), value.clone()))
        .collect();
    let pick = |entries: &Map<String, Value>, names: &mut dyn Iterator<Item = &str>| {
        names
            .filter_map(|n| entries.get(n).map(|v| (n.to_string(), v.clone())))
            .collect::<Map<String, Value>>()
    };
    if document.contains_key("domains") {
        let picked = pick(domains, &mut rejudged_domains.iter().map(String::as_str));
        part.insert("domains".into(), Value::Object(picked));
    }
    if document.contains_key("backends") {
        // Only the backends judged again: a domain's backend is looked up among the names of
        // the whole document, and a backend not judged here keeps its result.
        let picked = pick(backends, &mut rejudged_backends.iter().map(String::as_str));
        part.insert("backends".into(), Value::Object(picked));
    }
    let (found, found_diagnostics) = check_document(source, &Value::Object(part), &source.document);

    // Each result from where it is known: the run's for what it judged, `before`'s for the rest.
    let judged_here = |d: &Diagnostic| match entry(&d.pointer) {
        Some(("domains", host)) => rejudged_domains.contains(&host),
        Some(("backends", name)) => rejudged_backends.contains(&name),
        _ => true,
    };
    let mut diagnostics: Vec<Diagnostic> = before
        .warnings
        .iter()
        .filter(|d| match entry(&d.pointer) {
            Some(("domains", host)) => {
                !rejudged_domains.contains(&host) && !domains_before.contains(&host)
            }
            Some(("backends", name)) => !rejudged_backends.contains(&name),
            _ => false,
        })
        .cloned()
        .collect();
    diagnostics.extend(found_diagnostics.into_iter().filter(judged_here));
    sort_diagnostics(&mut diagnostics);
    if diagnostics.iter().any(Diagnostic::is_error) {
        return Some(Validation {
            model: None,
            diagnostics,
        });
    }

    let mut model = found;
    let mut all_domains = old.domains.clone();
    for host in domains_before.iter().chain(&rejudged_domains) {
        all_domains.remove(host);
    }
    all_domains.append(&mut model.domains);
    model.domains = all_domains;
    let mut all_backends = old.backends.clone();
    for name in &rejudged_backends {
        all_backends.remove(name);
    }
    for (name, backend) in std::mem::take(&mut model.backends) {
        if rejudged_backends.contains(&name) {
            all_backends.insert(name, backend);
        }
    }
    model.backends = all_backends;
    model.document = crate::model::StateDocument::new(&source.document);
    Some(Validation {
        model: Some(model),
        diagnostics,
    })
}

/// `validate_from(before, source)` where it follows the change, else `validate(source)`.
pub fn validate_from_or_whole(before: Option<&Checked>, source: &Source) -> Validation {
    before
        .and_then(|before| validate_from(before, source))
        .unwrap_or_else(|| super::validate(source))
}

/// The wildcard that would cover `host` (`*.example.com` for `shop.example.com`); none for a
/// wildcard or a name without a dot.
fn cover(host: &str) -> Option<String> {
    if names::is_wildcard(host) {
        return None;
    }
    host.find('.').map(|dot| format!("*{}", &host[dot..]))
}

/// The entry a diagnostic's pointer is in: `/domains/a.example.com/backend` →
/// (`domains`, `a.example.com`), unescaped; `None` outside `domains` and `backends`.
fn entry(pointer: &str) -> Option<(&str, String)> {
    let rest = pointer.strip_prefix('/')?;
    let (section, rest) = rest.split_once('/')?;
    if section != "domains" && section != "backends" {
        return None;
    }
    let token = rest.split('/').next().unwrap_or(rest);
    Some((section, token.replace("~1", "/").replace("~0", "~")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::validate;
    use crate::spec::load::SourceFile;
    use crate::test_rng::Rng;

    /// One state file: the first is the administrator's (listeners, and entries of its own),
    /// the others an agent's fragment each.
    #[derive(Clone, Default)]
    struct File {
        listeners: Option<&'static str>,
        agents: BTreeMap<String, String>,
        /// name → (servers as (agent, port), an HTTP check)
        backends: BTreeMap<String, (Vec<(String, u16)>, bool)>,
        /// host → (backend, listener)
        domains: BTreeMap<String, (String, Option<String>)>,
    }

    const LISTENERS: &str = "listeners:\n  http: { bind: \"127.0.0.1:8080\" }\n  mongodb: { bind: \"127.0.0.1:27017\", tls: passthrough }\n";
    const OTHER_LISTENERS: &str = "listeners:\n  http: { bind: \"127.0.0.1:8081\" }\n  mongodb: { bind: \"127.0.0.1:27017\", tls: passthrough }\n";

    impl File {
        fn text(&self) -> String {
            let mut t = String::new();
            if let Some(listeners) = self.listeners {
                t.push_str("version: 1\n");
                t.push_str(listeners);
            }
            if !self.agents.is_empty() {
                t.push_str("agents:\n");
                for (name, address) in &self.agents {
                    t.push_str(&format!("  {name}: {{ address: \"{address}\" }}\n"));
                }
            }
            if !self.backends.is_empty() {
                t.push_str("backends:\n");
                for (name, (servers, check)) in &self.backends {
                    let servers: Vec<String> = servers
                        .iter()
                        .map(|(agent, port)| format!("{{ agent: {agent}, port: {port} }}"))
                        .collect();
                    t.push_str(&format!("  {name}: {{ servers: [ {} ]", servers.join(", ")));
                    if *check {
                        t.push_str(", health_check: { path: /healthz }");
                    }
                    t.push_str(" }\n");
                }
            }
            if !self.domains.is_empty() {
                t.push_str("domains:\n");
                for (host, (backend, listener)) in &self.domains {
                    t.push_str(&format!("  \"{host}\": {{ backend: \"{backend}\""));
                    if let Some(l) = listener {
                        t.push_str(&format!(", listener: {l}"));
                    }
                    t.push_str(" }\n");
                }
            }
            if t.is_empty() {
                t.push_str("domains: {}\n");
            }
            t
        }
    }

    fn source(files: &[File]) -> Source {
        Source::parse(
            files
                .iter()
                .enumerate()
                .map(|(k, f)| SourceFile::new(format!("f{k}.yaml").into(), f.text()))
                .collect(),
        )
    }

    /// A backend name for file `k`; now and then one no file defines.
    fn backend_name(rng: &mut Rng, files: &[File]) -> String {
        let all: Vec<&String> = files.iter().flat_map(|f| f.backends.keys()).collect();
        if all.is_empty() || rng.one_in(25) {
            return "nowhere".into();
        }
        all[rng.below(all.len())].clone()
    }

    /// A host for file `k` in one of four zones; each file may hold its zone's wildcard, so a
    /// wildcard in one file covers names in the others.
    fn host(rng: &mut Rng, k: usize) -> String {
        let zone = rng.below(4);
        if zone == k && rng.one_in(2) {
            format!("*.z{zone}.test")
        } else {
            format!("h{k}-{}.z{zone}.test", rng.below(3))
        }
    }

    fn listener(rng: &mut Rng) -> Option<String> {
        match rng.below(12) {
            0..=7 => None,
            8..=10 => Some("mongodb".into()),
            _ => Some("http".into()),
        }
    }

    fn change(rng: &mut Rng, files: &mut [File]) {
        let k = match rng.below(10) {
            0 => 0,
            _ => 1 + rng.below(files.len() - 1),
        };
        for _ in 0..1 + rng.below(3) {
            match rng.below(14) {
                0..=3 => {
                    let h = host(rng, k);
                    let existing: Vec<&(String, Option<String>)> =
                        files.iter().flat_map(|f| f.domains.values()).collect();
                    // Now and then routed like another domain: a wildcard and a name it covers
                    // sending to the same place (redundant) or by HTTP and TCP (claimed twice).
                    let route = match existing.is_empty() || rng.one_in(2) {
                        true => (backend_name(rng, files), listener(rng)),
                        false => existing[rng.below(existing.len())].clone(),
                    };
                    files[k].domains.insert(h, route);
                }
                4 | 5 => {
                    let hosts: Vec<String> = files[k].domains.keys().cloned().collect();
                    if !hosts.is_empty() {
                        files[k].domains.remove(&hosts[rng.below(hosts.len())]);
                    }
                }
                6..=8 => {
                    let name = format!("b{k}-{}", rng.below(2));
                    let agent = match rng.below(20) {
                        0 => "agent-9".to_string(),
                        n => format!("agent-{}", 1 + n % (files.len() - 1)),
                    };
                    let mut servers = vec![(agent.clone(), 3000 + rng.below(3) as u16)];
                    if rng.one_in(5) {
                        servers.push((agent, 3000 + rng.below(3) as u16));
                    }
                    files[k].backends.insert(name, (servers, rng.one_in(3)));
                }
                9 | 10 => {
                    let names: Vec<String> = files[k].backends.keys().cloned().collect();
                    if !names.is_empty() {
                        files[k].backends.remove(&names[rng.below(names.len())]);
                    }
                }
                11 => {
                    // The same agent with another address, or (rarely) a listener changed.
                    if k > 0 {
                        files[k]
                            .agents
                            .insert(format!("agent-{k}"), format!("10.0.1.{}", rng.below(9)));
                    } else {
                        files[0].listeners = Some(OTHER_LISTENERS);
                    }
                }
                12 if rng.one_in(4) => {
                    // An agent added or removed: not followed, the whole state is validated.
                    let name = format!("agent-x{k}");
                    if files[k].agents.remove(&name).is_none() {
                        files[k].agents.insert(name, "10.0.2.1".into());
                    }
                }
                _ => {
                    // An entry moved unchanged into another file.
                    let to = rng.below(files.len());
                    if let Some((h, d)) = files[k].domains.pop_first()
                        && !files[to].domains.contains_key(&h)
                    {
                        files[to].domains.insert(h, d);
                    }
                }
            }
        }
    }

    fn fresh(rng: &mut Rng) -> Vec<File> {
        let n = 2 + rng.below(3);
        let mut files: Vec<File> = (0..n).map(|_| File::default()).collect();
        files[0].listeners = Some(LISTENERS);
        for (k, file) in files.iter_mut().enumerate().skip(1) {
            file.agents
                .insert(format!("agent-{k}"), format!("10.0.0.{k}"));
        }
        for _ in 0..8 {
            change(rng, &mut files);
        }
        files
    }

    /// Whenever `validate_from` follows a change, it finds what validating the whole state
    /// finds — the same model and the same diagnostics in the same order — over random
    /// changes of one file after another: routes added, removed, moved between files,
    /// pointing at missing or changed backends, wildcards covering names in other files,
    /// HTTP and TCP names claimed twice, backends unused or used by both kinds of domain.
    #[test]
    fn a_validation_from_the_last_is_the_validation_of_the_whole_state() {
        let mut rng = Rng(0x51_7cc1_b727_220a);
        let (mut followed, mut with_errors, mut with_warnings, mut not_followed) = (0, 0, 0, 0);
        let mut files = fresh(&mut rng);
        let mut codes: BTreeMap<&str, usize> = BTreeMap::new();
        for _ in 0..3000 {
            let before = source(&files);
            let validation = validate(&before);
            let Some(model) = validation.model else {
                files = fresh(&mut rng);
                continue;
            };
            let checked = Checked::new(&before, Arc::new(model), validation.diagnostics)
                .expect("a state that validated");
            change(&mut rng, &mut files);
            let after = source(&files);
            let whole = validate(&after);
            match validate_from(&checked, &after) {
                None => not_followed += 1,
                Some(derived) => {
                    followed += 1;
                    for d in &whole.diagnostics {
                        *codes.entry(d.code).or_insert(0) += 1;
                    }
                    with_errors += usize::from(derived.model.is_none());
                    with_warnings +=
                        usize::from(!derived.diagnostics.is_empty() && derived.model.is_some());
                    assert_eq!(
                        derived.diagnostics,
                        whole.diagnostics,
                        "diagnostics differ after the change to:\n{}",
                        files
                            .iter()
                            .map(File::text)
                            .collect::<Vec<_>>()
                            .join("---\n")
                    );
                    assert!(
                        derived.model == whole.model,
                        "models differ after the change to:\n{}",
                        files
                            .iter()
                            .map(File::text)
                            .collect::<Vec<_>>()
                            .join("---\n")
                    );
                }
            }
        }
        eprintln!(
            "{followed} followed ({with_errors} with errors, {with_warnings} valid with warnings), {not_followed} not; codes found: {codes:?}"
        );
        assert!(followed > 800 && with_errors > 100 && with_warnings > 100 && not_followed > 50);
        for code in [
            "name-claimed-twice",
            "redundant-domain",
            "backend-mode-conflict",
            "unknown-backend",
            "unused-backend",
        ] {
            assert!(
                codes.get(code).is_some_and(|&n| n >= 10),
                "{code} too rare: {codes:?}"
            );
        }
    }

    /// A wildcard added in one file claims, by TCP, a name another file routes by HTTP (to
    /// another backend, which nothing in the changed file uses): the name in the untouched
    /// file is judged again and the error found; removing the wildcard again clears it.
    #[test]
    fn a_wildcard_added_in_one_file_judges_the_names_it_covers_in_others() {
        let admin = "version: 1\nlisteners:\n  http: { bind: \"127.0.0.1:8080\" }\n  mongodb: { bind: \"127.0.0.1:27017\", tls: passthrough }\nagents:\n  a: { address: 10.0.0.1 }\nbackends:\n  web: { servers: [ { agent: a, port: 80 } ] }\n  db: { servers: [ { agent: a, port: 27017 } ] }\n  api: { servers: [ { agent: a, port: 81 } ] }\ndomains:\n  shop.z.test: { backend: web }\n  db.y.test: { backend: db, listener: mongodb }\n";
        let state = |fragment: &str| {
            Source::parse(vec![
                SourceFile::new("admin.yaml".into(), admin.into()),
                SourceFile::new("agent.yaml".into(), fragment.into()),
            ])
        };
        let without = state("domains:\n  other.y.test: { backend: api }\n");
        let with = state(
            "domains:\n  other.y.test: { backend: api }\n  \"*.z.test\": { backend: db, listener: mongodb }\n",
        );
        let checked_without = {
            let v = validate(&without);
            Checked::new(&without, Arc::new(v.model.expect("valid")), v.diagnostics).unwrap()
        };
        let derived = validate_from(&checked_without, &with).expect("a change of domains");
        assert_eq!(derived.diagnostics, validate(&with).diagnostics);
        assert!(
            derived
                .diagnostics
                .iter()
                .any(|d| d.code == "name-claimed-twice" && d.pointer == "/domains/shop.z.test"),
            "{:?}",
            derived.diagnostics
        );
        // And back: the wildcard removed, the name is clean again.
        let with_wildcard_valid =
            state("domains:\n  other.y.test: { backend: api }\n  \"*.z.test\": { backend: web }\n");
        let v = validate(&with_wildcard_valid);
        let checked = Checked::new(
            &with_wildcard_valid,
            Arc::new(v.model.expect("valid")),
            v.diagnostics,
        )
        .unwrap();
        let derived = validate_from(&checked, &without).expect("a change of domains");
        assert_eq!(derived.diagnostics, validate(&without).diagnostics);
        assert!(derived.model == validate(&without).model);
    }

    /// A self-signed certificate and its key for `name`, as a listener's folder holds them.
    fn pem_for(name: &str) -> String {
        let key = rcgen::KeyPair::generate().expect("a key");
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .expect("a name")
            .self_signed(&key)
            .expect("a certificate");
        format!("{}{}", cert.pem(), key.serialize_pem())
    }

    /// The rules read the listeners' certificate folders too: a wildcard on an ACME listener
    /// without a DNS hook needs a certificate file that covers it. A folder replaced between
    /// two API changes (no state file changed) is seen: the change that follows is judged on
    /// the whole state, not only on the entries it touches (a reviewer's counterexample).
    #[test]
    fn a_certificate_replaced_since_the_last_check_is_judged_on_the_whole_state() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(
            root.join("admin.yaml"),
            "version: 1\nacme: { directory: \"https://acme.test/dir\" }\nlisteners:\n  http: { bind: \"127.0.0.1:80\" }\n  https: { bind: \"127.0.0.1:443\", certificates: certs, acme: true }\nagents:\n  a: { address: 10.0.0.5 }\nbackends:\n  shop: { servers: [ { agent: a, port: 8080 } ] }\ndomains:\n  \"*.shop.test\": { backend: shop }\n",
        )
        .unwrap();
        std::fs::write(
            root.join("agent-a.yaml"),
            "backends:\n  blog: { servers: [ { agent: a, port: 8081 } ] }\ndomains:\n  blog.test: { backend: blog }\n",
        )
        .unwrap();
        std::fs::create_dir(root.join("certs")).unwrap();
        std::fs::write(root.join("certs/wild.pem"), pem_for("*.shop.test")).unwrap();
        let before = crate::spec::load::load_path(root).unwrap();
        let validation = validate(&before);
        let model = validation
            .model
            .expect("the wildcard's certificate covers it");
        let checked = Checked::new(&before, Arc::new(model), validation.diagnostics).unwrap();

        std::fs::write(root.join("certs/wild.pem"), pem_for("other.test")).unwrap();
        std::fs::write(
            root.join("agent-a.yaml"),
            "backends:\n  blog: { servers: [ { agent: a, port: 8081 } ] }\ndomains:\n  blog.test: { backend: blog }\n  api.blog.test: { backend: blog }\n",
        )
        .unwrap();
        let after = crate::spec::load::load_path_from(root, &[], Some(&checked.base)).unwrap();
        let whole = validate(&after);
        assert!(
            whole
                .diagnostics
                .iter()
                .any(|d| d.code == "acme-wildcard-needs-dns"),
            "{:?}",
            whole.diagnostics
        );
        let derived = validate_from_or_whole(Some(&checked), &after);
        assert_eq!(derived.diagnostics, whole.diagnostics);
        assert!(
            derived.model.is_none(),
            "a state with an error was accepted"
        );
    }
}
