//! The claims tables stay true to the code: every test README.md and BENCHMARKS.md name as
//! `path/to/file.rs::test_name` exists, so a renamed or deleted test cannot leave a claim
//! pointing at nothing.

use std::path::Path;

/// Every `` `something.rs::name` `` of a Markdown text.
fn references(text: &str) -> Vec<(String, String)> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|code| {
            let (file, name) = code.split_once(".rs::")?;
            let valid = !file.is_empty()
                && file
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/_-".contains(&b))
                && !name.is_empty()
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            valid.then(|| (format!("{file}.rs"), name.to_string()))
        })
        .collect()
}

#[test]
fn every_test_a_claim_names_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    let mut missing = Vec::new();
    for doc in ["README.md", "BENCHMARKS.md"] {
        let Ok(text) = std::fs::read_to_string(root.join(doc)) else {
            continue;
        };
        for (file, name) in references(&text) {
            checked += 1;
            let source = std::fs::read_to_string(root.join(&file)).unwrap_or_default();
            if !source.contains(&format!("fn {name}(")) {
                missing.push(format!("{doc}: {file}::{name}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "claims naming no test:\n{}",
        missing.join("\n")
    );
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(
        readme.contains("## What the tests prove"),
        "the README's claims table is gone"
    );
    assert!(checked >= 60, "only {checked} references found");
}

#[test]
fn references_are_read_from_code_spans() {
    assert_eq!(
        references("a `tests/x.rs::one_test`, `src/m/tests.rs::two` and `x.rs` `not::this`"),
        vec![
            ("tests/x.rs".to_string(), "one_test".to_string()),
            ("src/m/tests.rs".to_string(), "two".to_string())
        ]
    );
}
