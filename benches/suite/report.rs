//! The suite's results: named figures (with their unit and which way is better), goals (met or
//! not, never hidden), tables for stdout, `bench/results/latest.json`, and the comparison with
//! a baseline (a figure more than 10% worse is a regression).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Lower,
    Higher,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: String,
    pub better: Better,
    /// A count that must be 0 (failed requests, socket errors): anything else fails `--check`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zero_tolerance: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Goal {
    pub scenario: String,
    /// What is promised, in words (`b/a req/s ≥ 0.95 at N=10000`).
    pub goal: String,
    /// What was measured.
    pub measured: String,
    pub met: bool,
}

/// A table as printed: a title, a header, rows, notes under it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Table {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    pub notes: Vec<String>,
}

impl Table {
    pub fn new(title: &str, header: &[&str]) -> Table {
        Table {
            title: title.to_string(),
            header: header.iter().map(|h| h.to_string()).collect(),
            ..Table::default()
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// Markdown, so the same text goes to stdout and BENCHMARKS.md.
    pub fn render(&self) -> String {
        let mut out = format!("### {}\n\n", self.title);
        out.push_str(&format!("| {} |\n", self.header.join(" | ")));
        out.push_str(&format!(
            "|{}\n",
            self.header.iter().map(|_| "---|").collect::<String>()
        ));
        for row in &self.rows {
            out.push_str(&format!("| {} |\n", row.join(" | ")));
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for note in &self.notes {
                out.push_str(&format!("{note}\n"));
            }
        }
        out
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub format_version: u32,
    /// `full` or `quick`.
    pub mode: String,
    pub started: String,
    pub machine: BTreeMap<String, String>,
    pub figures: Vec<Figure>,
    pub goals: Vec<Goal>,
    pub tables: Vec<Table>,
    /// Scenarios that could not run to the end, with the reason.
    pub failures: Vec<String>,
    /// Seconds each scenario took.
    pub durations: BTreeMap<String, f64>,
}

impl Report {
    pub fn figure(&mut self, name: impl Into<String>, value: f64, unit: &str, better: Better) {
        self.figures.push(Figure {
            name: name.into(),
            value,
            unit: unit.to_string(),
            better,
            zero_tolerance: false,
        });
    }

    /// A count that must be 0: `--check` fails on anything else.
    pub fn zero_figure(&mut self, name: impl Into<String>, value: f64, unit: &str) {
        self.figure(name, value, unit, Better::Lower);
        if let Some(f) = self.figures.last_mut() {
            f.zero_tolerance = true;
        }
    }

    pub fn goal(&mut self, scenario: &str, goal: String, measured: String, met: bool) {
        self.goals.push(Goal {
            scenario: scenario.to_string(),
            goal,
            measured,
            met,
        });
    }

    pub fn goals_table(&self) -> Table {
        let mut table = Table::new("Goals", &["scenario", "goal", "measured", ""]);
        for g in &self.goals {
            table.row(vec![
                g.scenario.clone(),
                g.goal.clone(),
                g.measured.clone(),
                if g.met { "met" } else { "**NOT MET**" }.to_string(),
            ]);
        }
        table
    }

    pub fn machine_line(&self) -> String {
        let m = |k: &str| self.machine.get(k).cloned().unwrap_or_default();
        format!(
            "Machine: {} ({} cores), {} RAM, Linux {}, {}, {}; mode {}, started {}.",
            m("cpu"),
            m("cores"),
            m("memory"),
            m("kernel"),
            m("haproxy"),
            m("rustc"),
            self.mode,
            self.started
        )
    }
}

/// Runs one part of a scenario (one size, one HAProxy); a panic in it becomes a failure of
/// the run (`what: message`) and the scenario goes on with its other parts and tables.
pub fn guarded(report: &mut Report, what: &str, part: impl FnOnce(&mut Report)) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| part(&mut *report)));
    if let Err(panic) = outcome {
        report
            .failures
            .push(format!("{what}: {}", panic_message(panic.as_ref())));
    }
}

pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}

/// A figure of `latest` worse than the same figure of `baseline` by more than `tolerance`
/// (0.10: 10%).
pub struct Regression {
    pub name: String,
    pub baseline: f64,
    pub latest: f64,
    pub unit: String,
    /// How much worse, as a fraction (0.25: 25% worse).
    pub worse_by: f64,
}

pub fn compare(baseline: &Report, latest: &Report, tolerance: f64) -> (Vec<Regression>, usize) {
    let base: BTreeMap<&str, &Figure> = baseline
        .figures
        .iter()
        .map(|f| (f.name.as_str(), f))
        .collect();
    let mut regressions = Vec::new();
    let mut compared = 0;
    for f in &latest.figures {
        let Some(b) = base.get(f.name.as_str()) else {
            continue;
        };
        if b.value < 0.0 || !b.value.is_finite() || !f.value.is_finite() {
            continue;
        }
        compared += 1;
        let worse_by = match f.better {
            // From a baseline of 0 (no failed request), any increase is a regression: no
            // percentage of 0 would ever flag it.
            Better::Lower if b.value == 0.0 => {
                if f.value > 0.0 {
                    f64::INFINITY
                } else {
                    0.0
                }
            }
            Better::Higher if b.value == 0.0 => 0.0,
            Better::Lower => (f.value - b.value) / b.value,
            Better::Higher => (b.value - f.value) / b.value,
        };
        if worse_by > tolerance {
            regressions.push(Regression {
                name: f.name.clone(),
                baseline: b.value,
                latest: f.value,
                unit: f.unit.clone(),
                worse_by,
            });
        }
    }
    (regressions, compared)
}

pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The median: the middle value, or the mean of the two middle values of an even count.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The method before issue 17, kept to say in the same run how the figures moved: the upper
/// of the two middle values of an even count (the 3rd of 4).
pub fn upper_middle(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    percentile(&v, 0.5)
}

/// What is wrong with the figures themselves: a value that is not a finite number, a
/// zero-tolerance count (failed requests, socket errors) that is not 0.
pub fn figure_problems(figures: &[Figure]) -> Vec<String> {
    let mut problems = Vec::new();
    for f in figures {
        if !f.value.is_finite() || f.value < 0.0 {
            problems.push(format!("figure {} is {}", f.name, f.value));
        }
        if f.zero_tolerance && f.value != 0.0 {
            problems.push(format!(
                "figure {} is {} {}: it must be 0",
                f.name, f.value, f.unit
            ));
        }
    }
    problems
}

/// The statistics this suite's figures rest on, checked on known inputs (`--check` runs it:
/// this bench target has no test harness). Returns what is wrong.
pub fn self_check() -> Vec<String> {
    let mut problems = Vec::new();
    let mut expect = |what: &str, ok: bool| {
        if !ok {
            problems.push(format!("self-check: {what}"));
        }
    };
    expect(
        "the median of 4 values is the mean of the two middle ones",
        median(&[4.0, 1.0, 3.0, 2.0]) == 2.5 && upper_middle(&[4.0, 1.0, 3.0, 2.0]) == 3.0,
    );
    expect(
        "the median of an odd count is its middle value",
        median(&[3.0, 1.0, 2.0]) == 2.0 && median(&[7.0]) == 7.0 && median(&[]).is_nan(),
    );
    let report = |figures: &[(&str, f64, Better)]| {
        let mut r = Report::default();
        for (name, value, better) in figures {
            r.figure(*name, *value, "x", *better);
        }
        r
    };
    let zero = report(&[("errors", 0.0, Better::Lower), ("rps", 0.0, Better::Higher)]);
    let up = report(&[("errors", 3.0, Better::Lower), ("rps", 5.0, Better::Higher)]);
    let (regressions, compared) = compare(&zero, &up, 0.10);
    expect(
        "an increase from a zero baseline is flagged (and only that)",
        compared == 2
            && regressions.len() == 1
            && regressions[0].name == "errors"
            && regressions[0].worse_by.is_infinite(),
    );
    expect(
        "0 against a baseline of 0 is not flagged",
        compare(&zero, &zero, 0.10).0.is_empty(),
    );
    let mut counts = Report::default();
    counts.zero_figure("failed", 0.0, "requests");
    expect(
        "a zero-tolerance figure of 0 passes",
        figure_problems(&counts.figures).is_empty(),
    );
    counts.zero_figure("errors", 1.0, "errors");
    counts.figure("nan", f64::NAN, "ms", Better::Lower);
    expect(
        "a zero-tolerance figure above 0 and a NaN fail",
        figure_problems(&counts.figures).len() == 2,
    );
    let base = report(&[("ms", 100.0, Better::Lower), ("rps", 100.0, Better::Higher)]);
    let worse = report(&[("ms", 109.0, Better::Lower), ("rps", 89.0, Better::Higher)]);
    let (regressions, _) = compare(&base, &worse, 0.10);
    expect(
        "more than 10% worse, in the figure's own direction, is flagged",
        regressions.len() == 1 && regressions[0].name == "rps",
    );
    problems
}
