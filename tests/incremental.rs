//! Incremental loading (issue 12): a process that keeps state files parsed (`keep_parsed`, as
//! the daemon does) re-parses only the files whose text changed. Over random sequences of
//! changes to a state folder — agents' fragments added, changed, removed, made invalid; the
//! base file edited — the incremental result must equal a full compile of the same files:
//! the same diagnostics, and the same rendered bytes, rendered onto the slots the previous
//! step left (as the daemon renders).

use lunafront::model::validate;
use lunafront::render::{self, RenderOptions, readback};
use lunafront::spec::load::{self, Source, SourceFile};
use std::collections::BTreeMap;
use std::path::Path;

/// xorshift64*: the same sequence on every run, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn base(domains: usize, weight: u64) -> String {
    let mut s = format!(
        "version: 1\nlisteners:\n  http: {{ bind: \":80\" }}\nagents:\n  a0: {{ address: 10.0.0.1 }}\nbackends:\n  web: {{ servers: [ {{ agent: a0, port: 80, weight: {weight} }} ] }}\ndomains:\n"
    );
    for d in 0..domains {
        s.push_str(&format!("  base-{d}.example.com: {{ backend: web }}\n"));
    }
    s
}

/// An agent's fragment as the API writes it: the agent, its apps and their domains.
fn fragment(agent: usize, apps: &[(usize, u16)]) -> String {
    let mut s = format!(
        "agents:\n  ag{agent}: {{ address: 10.1.0.{} }}\n",
        agent + 1
    );
    if !apps.is_empty() {
        s.push_str("backends:\n");
        for (app, port) in apps {
            s.push_str(&format!(
                "  ag{agent}_app{app}: {{ servers: [ {{ agent: ag{agent}, port: {port} }} ] }}\n"
            ));
        }
        s.push_str("domains:\n");
        for (app, _) in apps {
            s.push_str(&format!(
                "  app{app}-ag{agent}.apps.example.com: {{ backend: ag{agent}_app{app} }}\n"
            ));
        }
    }
    s
}

/// The state as a fresh process compiles it: every file read and parsed again.
fn full(dir: &Path) -> Source {
    let mut paths: Vec<_> = walk(dir);
    paths.sort();
    let files = paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            SourceFile::new(p, text)
        })
        .collect();
    Source::parse(files)
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
    out
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn incremental_loading_equals_a_full_compile_over_random_sequences_of_changes() {
    load::keep_parsed();
    let options = RenderOptions::for_target(None);
    for seed in [0x9e37_79b9_7f4a_7c15_u64, 0x2545_f491_4f6c_dd1d, 7, 1234567] {
        let mut rng = Rng(seed);
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        write(&state.join("base.yaml"), &base(20, 1));
        // Agent → its apps (app → port).
        let mut agents: BTreeMap<usize, BTreeMap<usize, u16>> = BTreeMap::new();
        let mut slots = Default::default();
        let (mut valid, mut invalid) = (0, 0);
        for step in 0..60 {
            for _ in 0..1 + rng.below(3) {
                let agent = rng.below(6) as usize;
                let file = state.join(format!("agents.d/ag{agent}.yaml"));
                match rng.below(10) {
                    // An app added or moved to another port.
                    0..=4 => {
                        let app = rng.below(5) as usize;
                        agents
                            .entry(agent)
                            .or_default()
                            .insert(app, 9000 + rng.below(40) as u16);
                    }
                    // An app removed.
                    5 | 6 => {
                        if let Some(apps) = agents.get_mut(&agent) {
                            let app = rng.below(5) as usize;
                            apps.remove(&app);
                        }
                    }
                    // The agent removed.
                    7 => {
                        agents.remove(&agent);
                        let _ = std::fs::remove_file(&file);
                        continue;
                    }
                    // A fragment that clashes with the base (a domain defined twice), or
                    // broken YAML: errors, which must be the same both ways.
                    8 => {
                        let text = if rng.below(2) == 0 {
                            format!(
                                "{}  base-1.example.com: {{ backend: web }}\n",
                                fragment(agent, &[(0, 9000)])
                            )
                        } else {
                            "agents: { ag: [\n".to_string()
                        };
                        write(&file, &text);
                        agents.remove(&agent);
                        continue;
                    }
                    // The base edited.
                    _ => {
                        write(
                            &state.join("base.yaml"),
                            &base(15 + rng.below(10) as usize, 1 + rng.below(3)),
                        );
                        continue;
                    }
                }
                let Some(apps) = agents.get(&agent) else {
                    continue;
                };
                let apps: Vec<(usize, u16)> = apps.iter().map(|(a, p)| (*a, *p)).collect();
                write(&file, &fragment(agent, &apps));
            }
            let incremental = load::load_path(&state).unwrap();
            let fresh = full(&state);
            let (a, b) = (validate(&incremental), validate(&fresh));
            let messages = |v: &lunafront::model::Validation| {
                v.diagnostics
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
            };
            assert_eq!(messages(&a), messages(&b), "seed {seed} step {step}");
            match (a.model, b.model) {
                (Some(a), Some(b)) => {
                    let ra = render::render_onto(&a, &options, &slots).unwrap();
                    let rb = render::render_onto(&b, &options, &slots).unwrap();
                    assert_eq!(ra.file_map(), rb.file_map(), "seed {seed} step {step}");
                    slots = readback::slot_pools(&ra.config);
                    valid += 1;
                }
                (None, None) => invalid += 1,
                (a, b) => panic!(
                    "seed {seed} step {step}: incremental valid {}, full valid {}",
                    a.is_some(),
                    b.is_some()
                ),
            }
        }
        assert!(
            valid > 10 && invalid > 0,
            "valid {valid}, invalid {invalid}"
        );
    }
}
