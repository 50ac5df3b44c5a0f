//! Scenario 1, compile: load + validate + render + plan for 1k, 10k, 100k domains (agents and
//! backends in proportion), on one core, and "+1 app" as `lunafront apply` does it against the
//! files the previous state left (load the YAML, validate, render, read back the target's
//! files and recorded state, plan). Each size runs in a fresh process of this binary so its
//! peak memory is its own; stages are medians of several runs. Growth is read off the
//! per-domain cost between sizes. The goals use the whole (what a user waits for).

use crate::report::{Better, Report, Table, median, ms};
use lunafront::model::validate;
use lunafront::plan::{Live, make_plan};
use lunafront::render::{MANIFEST, RenderOptions, Rendered, render, render_onto};
use lunafront::spec::load::{Source, SourceFile};
use std::time::Instant;

/// A platform's state: `domains` apps, one domain each, on `domains / 100` agents; one in ten
/// apps has two servers and an HTTP check (a backend of its own), one in fifty is a MongoDB on
/// the TCP listener.
pub fn state_yaml(domains: usize) -> String {
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

/// One size's figures, as the child process prints them (milliseconds, kB).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct SizeFigures {
    pub domains: usize,
    pub load_ms: f64,
    pub validate_ms: f64,
    pub render_ms: f64,
    pub plan_ms: f64,
    /// One new app against the files the previous state left, as `lunafront apply` does it:
    /// load, validate, render, read back (files and the recorded state), plan.
    pub one_change_ms: f64,
    /// Of which reading back the target's files and recorded state.
    pub one_change_readback_ms: f64,
    /// The figure before issue 17: validate + render + plan of the new app against the
    /// previous model held in memory (no YAML loading, no read-back).
    pub one_change_in_memory_ms: f64,
    pub peak_rss_kb: u64,
}

/// In the child: measures one size `runs` times and prints the medians as JSON.
pub fn child(domains: usize, runs: usize) {
    let yaml = state_yaml(domains);
    let edited = format!("{yaml}  new-app.apps.example.com: {{ backend: new-app }}\n").replace(
        "domains:\n",
        "  new-app: { servers: [ { agent: agent-0, port: 9999 } ] }\ndomains:\n",
    );
    let options = RenderOptions::for_target(None);
    let mut stages: [Vec<f64>; 7] = Default::default();
    let scratch = std::env::temp_dir().join(format!("lunafront-compile-{}", std::process::id()));
    for run in 0..runs {
        let t = Instant::now();
        let source = Source::parse(vec![SourceFile::new("state.yaml".into(), yaml.clone())]);
        stages[0].push(ms(t.elapsed()));
        let t = Instant::now();
        let model = validate(&source).model.expect("generated state is valid");
        stages[1].push(ms(t.elapsed()));
        let t = Instant::now();
        let rendered = render(&model, &options).unwrap();
        stages[2].push(ms(t.elapsed()));
        // Against an empty target (a first apply): everything is created.
        let t = Instant::now();
        let plan = make_plan("bench", &model, &rendered, &Live::default());
        stages[3].push(ms(t.elapsed()));
        assert!(!plan.is_empty());
        // One new app against the target as this state left it: the daily case.
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
            interrupted: None,
        };
        let source2 = Source::parse(vec![SourceFile::new("state.yaml".into(), edited.clone())]);
        let t = Instant::now();
        let model2 = validate(&source2).model.unwrap();
        let rendered2 =
            render_onto(&model2, &options, &live.slot_pools(&options.config_name)).unwrap();
        let plan = make_plan("bench", &model2, &rendered2, &live);
        stages[6].push(ms(t.elapsed()));
        assert_eq!(plan.changes.len(), 2, "{:?}", plan.changes);
        drop((model2, rendered2, plan, live));

        // The same change as `lunafront apply` makes it: the previous state's files are on
        // disk (a new folder each run: a fresh process has read no manifest yet).
        let dir = scratch.join(run.to_string());
        for f in rendered.files() {
            let path = dir.join(&f.path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, &f.bytes).unwrap();
        }
        drop((model, rendered));
        let t = Instant::now();
        let source2 = Source::parse(vec![SourceFile::new("state.yaml".into(), edited.clone())]);
        let model2 = validate(&source2).model.unwrap();
        // As `apply` does it: read the target first (its apps keep their slots), then render.
        let r = Instant::now();
        let live = lunafront::target::files::observe_dir(
            &dir,
            lunafront::render::output_paths(&model2, &options),
        )
        .unwrap();
        stages[5].push(ms(r.elapsed()));
        let rendered2 =
            render_onto(&model2, &options, &live.slot_pools(&options.config_name)).unwrap();
        assert!(live.previous.is_some(), "the recorded state reads back");
        let plan = make_plan("bench", &model2, &rendered2, &live);
        stages[4].push(ms(t.elapsed()));
        assert_eq!(plan.changes.len(), 2, "{:?}", plan.changes);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let figures = SizeFigures {
        domains,
        load_ms: median(&stages[0]),
        validate_ms: median(&stages[1]),
        render_ms: median(&stages[2]),
        plan_ms: median(&stages[3]),
        one_change_ms: median(&stages[4]),
        one_change_readback_ms: median(&stages[5]),
        one_change_in_memory_ms: median(&stages[6]),
        peak_rss_kb: crate::procs::memory_kb(std::process::id()).1,
    };
    println!("{}", serde_json::to_string(&figures).unwrap());
}

/// Runs a child process (pinned to one core, like the data-plane runs) measuring `n` domains.
fn child_figures(n: usize, runs: usize) -> SizeFigures {
    let out = std::process::Command::new("taskset")
        .args(["-c", crate::procs::FRONT_CPU])
        .arg(std::env::current_exe().unwrap())
        .args(["--child-compile", &n.to_string(), &runs.to_string()])
        .output()
        .expect("run the compile child");
    assert!(
        out.status.success(),
        "compile child for {n}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(
        out.stdout
            .split(|b| *b == b'\n')
            .find(|l| l.starts_with(b"{"))
            .expect("the child's figures"),
    )
    .unwrap()
}

/// One size's figures over its rounds: the median of each stage, the highest peak.
fn combine(rounds: &[SizeFigures]) -> SizeFigures {
    let stage = |f: fn(&SizeFigures) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
    SizeFigures {
        domains: rounds[0].domains,
        load_ms: stage(|f| f.load_ms),
        validate_ms: stage(|f| f.validate_ms),
        render_ms: stage(|f| f.render_ms),
        plan_ms: stage(|f| f.plan_ms),
        one_change_ms: stage(|f| f.one_change_ms),
        one_change_readback_ms: stage(|f| f.one_change_readback_ms),
        one_change_in_memory_ms: stage(|f| f.one_change_in_memory_ms),
        peak_rss_kb: rounds.iter().map(|f| f.peak_rss_kb).max().unwrap_or(0),
    }
}

/// The file digests an apply of `r` records in its manifest.
fn recorded(r: &Rendered) -> std::collections::BTreeMap<String, String> {
    r.files()
        .into_iter()
        .filter(|f| f.path != MANIFEST)
        .map(|f| (f.path, lunafront::plan::sha256_hex(&f.bytes)))
        .collect()
}

pub fn run(report: &mut Report, quick: bool) {
    let sizes: &[usize] = if quick {
        &[1_000, 10_000]
    } else {
        &[1_000, 10_000, 100_000]
    };
    let mut table = Table::new(
        "Compile: load + validate + render + plan, and +1 app as `apply` does it (one core; sizes take turns, median of runs)",
        &[
            "domains",
            "load (YAML)",
            "validate",
            "render",
            "plan",
            "**load+validate+render+plan**",
            "per domain",
            "**+1 app**",
            "of which read-back",
            "peak RSS",
        ],
    );
    // Sizes take turns (1k, 10k, 100k, 1k, ...) so that a slower stretch of this shared
    // machine does not land on one size only and bend the growth figures.
    let rounds = if quick { 1 } else { 3 };
    let mut measured: Vec<Vec<SizeFigures>> = sizes.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, &n) in sizes.iter().enumerate() {
            let runs = if !quick && n >= 100_000 { 1 } else { 3 };
            measured[i].push(child_figures(n, runs));
        }
    }
    let mut per_domain = Vec::new();
    for (&n, rounds) in sizes.iter().zip(&measured) {
        let f = combine(rounds);
        let total = f.load_ms + f.validate_ms + f.render_ms + f.plan_ms;
        let without_load = f.validate_ms + f.render_ms + f.plan_ms;
        let per = total * 1000.0 / n as f64;
        per_domain.push(per);
        let k = n / 1000;
        report.figure(format!("compile.{k}k.whole_ms"), total, "ms", Better::Lower);
        // The figure the goal used before issue 17 (without loading the YAML).
        report.figure(
            format!("compile.{k}k.total_ms"),
            without_load,
            "ms",
            Better::Lower,
        );
        report.figure(
            format!("compile.{k}k.one_change_in_memory_ms"),
            f.one_change_in_memory_ms,
            "ms",
            Better::Lower,
        );
        report.figure(
            format!("compile.{k}k.load_ms"),
            f.load_ms,
            "ms",
            Better::Lower,
        );
        report.figure(
            format!("compile.{k}k.one_change_ms"),
            f.one_change_ms,
            "ms",
            Better::Lower,
        );
        report.figure(
            format!("compile.{k}k.peak_rss_mb"),
            f.peak_rss_kb as f64 / 1024.0,
            "MB",
            Better::Lower,
        );
        table.row(vec![
            format!("{n}"),
            format!("{:.1} ms", f.load_ms),
            format!("{:.1} ms", f.validate_ms),
            format!("{:.1} ms", f.render_ms),
            format!("{:.1} ms", f.plan_ms),
            format!("**{total:.1} ms**"),
            format!("{per:.1} µs"),
            format!("**{:.1} ms**", f.one_change_ms),
            format!("{:.1} ms", f.one_change_readback_ms),
            format!("{:.0} MB", f.peak_rss_kb as f64 / 1024.0),
        ]);
        if n == 100_000 {
            // Issue 12's goal: the whole pipeline at 100k domains.
            report.goal(
                "compile",
                "100k domains: full validate+render+plan < 400 ms".into(),
                format!("{without_load:.1} ms (with loading the YAML: {total:.1} ms)"),
                without_load < 400.0,
            );
        }
        if n == 10_000 {
            report.goal(
                "compile",
                "10k domains: load+validate+render+plan < 150 ms".into(),
                format!("{total:.1} ms (validate+render+plan {without_load:.1} ms)"),
                total < 150.0,
            );
            report.goal(
                "compile",
                "10k domains: +1 app against the previous state, as `apply` does it, < 150 ms"
                    .into(),
                format!(
                    "{:.1} ms (against the previous model in memory, without loading: {:.1} ms)",
                    f.one_change_ms, f.one_change_in_memory_ms
                ),
                f.one_change_ms < 150.0,
            );
        }
    }
    let growth: Vec<String> = per_domain
        .windows(2)
        .map(|w| format!("{:.2}", w[1] / w[0]))
        .collect();
    for (i, w) in per_domain.windows(2).enumerate() {
        report.figure(
            format!("compile.growth_{}", i + 1),
            w[1] / w[0],
            "ratio",
            Better::Lower,
        );
    }
    table.note(format!(
        "Per-domain cost ratio between consecutive sizes (1.00 = linear growth): {}.",
        growth.join(", ")
    ));
    table.note("*plan* is a first plan against an empty target. *+1 app* is one new app as `lunafront apply` handles it against the files the previous state left: load the YAML, validate, render, read back the target's files and its recorded state (validated again, as a fresh process does), plan. *peak RSS* is the whole process at that size (the YAML text, both states, the rendering). The growth ratios use load+validate+render+plan.");
    report.goal(
        "compile",
        "growth linear (per-domain cost ratio ≤ 1.25 between sizes)".into(),
        growth.join(", "),
        per_domain.windows(2).all(|w| w[1] / w[0] <= 1.25),
    );
    report.tables.push(table);
}
