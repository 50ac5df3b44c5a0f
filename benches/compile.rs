//! Compile cost: load + validate + render + plan for 1k, 10k and 100k domains (agents and
//! backends in proportion), one core. Prints the time of each stage (median of several runs),
//! the peak RSS growth, and the per-domain cost so linear growth can be read off.
//!
//! Run: `cargo bench --bench compile` (add `-- --quick` for fewer repetitions).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use lunafront::model::{Model, validate};
use lunafront::plan::{Live, make_plan};
use lunafront::render::{RenderOptions, Rendered, render};
use lunafront::spec::load::{Source, SourceFile};
use std::time::{Duration, Instant};

/// A platform's state: `domains` apps, one domain each, on `domains / 100` agents; one in ten
/// apps has two servers and an HTTP check (a backend of its own), one in fifty is a MongoDB on
/// the TCP listener.
fn state_yaml(domains: usize) -> String {
    let agents = (domains / 100).max(1);
    let mut s = String::with_capacity(domains * 160);
    s.push_str("version: 1\nlisteners:\n  http: { bind: \"127.0.0.1:8080\" }\n  mongodb: { bind: \"127.0.0.1:27017\", tls: passthrough }\nagents:\n");
    for a in 0..agents {
        s.push_str(&format!(
            "  agent-{a}: {{ address: 10.{}.{}.1 }}\n",
            a / 250,
            a % 250
        ));
    }
    s.push_str("backends:\n");
    for i in 0..domains {
        let agent = i % agents;
        if i % 10 == 9 {
            s.push_str(&format!(
                "  app-{i}: {{ servers: [ {{ agent: agent-{agent}, port: {} }}, {{ agent: agent-{}, port: {} }} ], health_check: {{ path: /healthz }} }}\n",
                3000 + i % 1000,
                (agent + 1) % agents,
                3000 + i % 1000
            ));
        } else {
            s.push_str(&format!(
                "  app-{i}: {{ servers: [ {{ agent: agent-{agent}, port: {} }} ] }}\n",
                3000 + i % 1000
            ));
        }
    }
    s.push_str("domains:\n");
    for i in 0..domains {
        if i % 50 == 48 {
            s.push_str(&format!(
                "  app-{i}.mongodb.example.com: {{ backend: app-{i}, listener: mongodb }}\n"
            ));
        } else {
            s.push_str(&format!(
                "  app-{i}.apps.example.com: {{ backend: app-{i} }}\n"
            ));
        }
    }
    s
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        })
        .unwrap_or(0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

struct Figures {
    load: Duration,
    validate: Duration,
    render: Duration,
    plan_first: Duration,
    plan_one_change: Duration,
}

fn run_once(yaml: &str, edited: &str) -> (Figures, Model) {
    let t = Instant::now();
    let source = Source::parse(vec![SourceFile::new("state.yaml".into(), yaml.to_string())]);
    let load = t.elapsed();
    let t = Instant::now();
    let model = validate(&source).model.expect("generated state is valid");
    let validate_time = t.elapsed();
    let options = RenderOptions::for_target(None);
    let t = Instant::now();
    let rendered = render(&model, &options).unwrap();
    let render_time = t.elapsed();
    // Plan against an empty target (first apply): everything is created.
    let t = Instant::now();
    let plan = make_plan("bench", &model, &rendered, &Live::default());
    let plan_first = t.elapsed();
    assert!(!plan.is_empty());
    // Plan one new app against the target as this state left it: the daily case.
    let live = Live {
        files: rendered
            .files()
            .into_iter()
            .map(|f| (f.path, f.bytes))
            .collect(),
        previous: Some(std::sync::Arc::new(model.clone())),
        recorded_files: recorded(&rendered),
        previous_error: None,
        version: None,
    };
    let source2 = Source::parse(vec![SourceFile::new(
        "state.yaml".into(),
        edited.to_string(),
    )]);
    let t = Instant::now();
    let model2 = validate(&source2).model.unwrap();
    let rendered2 = render(&model2, &options).unwrap();
    let plan = make_plan("bench", &model2, &rendered2, &live);
    let plan_one_change = t.elapsed();
    assert_eq!(plan.changes.len(), 2, "{:?}", plan.changes);
    (
        Figures {
            load,
            validate: validate_time,
            render: render_time,
            plan_first,
            plan_one_change,
        },
        model,
    )
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes: &[usize] = if quick {
        &[1_000, 10_000]
    } else {
        &[1_000, 10_000, 100_000]
    };
    println!("lunafront compile benchmark (one core; median of runs)");
    println!(
        "{:>8} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>12} {:>10}",
        "domains",
        "load",
        "validate",
        "render",
        "plan",
        "total",
        "per domain",
        "+1 app",
        "peak RSS"
    );
    let mut per_domain = Vec::new();
    for &n in sizes {
        let yaml = state_yaml(n);
        let edited = format!("{yaml}  new-app.apps.example.com: {{ backend: new-app }}\n").replace(
            "domains:\n",
            "  new-app: { servers: [ { agent: agent-0, port: 9999 } ] }\ndomains:\n",
        );
        let runs = if quick || n >= 100_000 { 3 } else { 7 };
        let before = rss_kb();
        let mut all = Vec::new();
        for _ in 0..runs {
            all.push(run_once(&yaml, &edited).0);
        }
        let peak = rss_kb().saturating_sub(before);
        let m = |f: fn(&Figures) -> Duration| median(all.iter().map(f).collect());
        let (load, val, ren, plan, one) = (
            m(|f| f.load),
            m(|f| f.validate),
            m(|f| f.render),
            m(|f| f.plan_first),
            m(|f| f.plan_one_change),
        );
        let total = load + val + ren + plan;
        let per = total.as_secs_f64() * 1e6 / n as f64;
        per_domain.push(per);
        println!(
            "{n:>8} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>9.1}ms {:>9.2}µs {:>10.1}ms {:>8}MB",
            ms(load),
            ms(val),
            ms(ren),
            ms(plan),
            ms(total),
            per,
            ms(one),
            peak / 1024
        );
    }
    let growth: Vec<String> = per_domain
        .windows(2)
        .map(|w| format!("{:.2}", w[1] / w[0]))
        .collect();
    println!(
        "per-domain cost ratio between sizes (1.00 = linear): {}",
        growth.join(", ")
    );
    println!("target: 10k domains validate+render+plan < 150 ms on one core");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The file digests an apply of `r` records in its manifest.
fn recorded(r: &Rendered) -> std::collections::BTreeMap<String, String> {
    r.files()
        .into_iter()
        .filter(|f| f.path != lunafront::render::MANIFEST)
        .map(|f| (f.path, lunafront::plan::sha256_hex(&f.bytes)))
        .collect()
}
