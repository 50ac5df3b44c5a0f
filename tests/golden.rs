//! Golden tests: each `tests/fixtures/render/<case>/state.yaml` (or `state/` folder) rendered by
//! the lunafront binary must give exactly the files under `<case>/expected/`, and every rendered
//! configuration must pass `haproxy -c` (run from another folder, so relative map and
//! certificate paths must resolve through `default-path config`).
//!
//! After an intended change of the output, regenerate with:
//! `LUNAFRONT_BLESS=1 cargo test --test golden`

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use support::*;

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/render");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 5,
        "golden cases are missing under {}",
        root.display()
    );
    cases
}

fn read_tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    if root.exists() {
        walk(root, root, &mut out);
    }
    out
}

#[test]
fn rendered_output_matches_the_golden_files_and_passes_haproxy_check() {
    let bless = std::env::var_os("LUNAFRONT_BLESS").is_some();
    let mut failures = Vec::new();
    for case in cases() {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let state = if case.join("state").is_dir() {
            "state"
        } else {
            "state.yaml"
        };
        let out = TempDir::new().unwrap();
        let (code, stdout, stderr) = run(
            &["render", state, "--out", out.path().to_str().unwrap()],
            &case,
        );
        assert_eq!(code, 0, "{name}: render failed\n{stdout}\n{stderr}");

        if let Err(e) = haproxy_check(&out.path().join("haproxy.cfg")) {
            failures.push(format!(
                "{name}: haproxy -c refused the rendered configuration:\n{e}"
            ));
        }

        let actual = read_tree(out.path());
        let expected_dir = case.join("expected");
        if bless {
            let _ = std::fs::remove_dir_all(&expected_dir);
            for (path, bytes) in &actual {
                let target = expected_dir.join(path);
                std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                std::fs::write(target, bytes).unwrap();
            }
            continue;
        }
        let expected = read_tree(&expected_dir);
        if expected.is_empty() {
            failures.push(format!(
                "{name}: no golden files; run with LUNAFRONT_BLESS=1"
            ));
            continue;
        }
        let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
        if names(&actual) != names(&expected) {
            failures.push(format!(
                "{name}: files differ: rendered {:?}, expected {:?}",
                names(&actual),
                names(&expected)
            ));
            continue;
        }
        for (path, bytes) in &actual {
            if expected[path] != *bytes {
                failures.push(format!(
                    "{name}/{path} differs from the golden file:\n--- expected\n{}\n--- rendered\n{}",
                    String::from_utf8_lossy(&expected[path]),
                    String::from_utf8_lossy(bytes)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn rendering_twice_gives_identical_bytes() {
    for case in cases() {
        let state = if case.join("state").is_dir() {
            "state"
        } else {
            "state.yaml"
        };
        let a = TempDir::new().unwrap();
        let b = TempDir::new().unwrap();
        for out in [&a, &b] {
            let (code, _, stderr) = run(
                &["render", state, "--out", out.path().to_str().unwrap()],
                &case,
            );
            assert_eq!(code, 0, "{stderr}");
        }
        assert_eq!(
            read_tree(a.path()),
            read_tree(b.path()),
            "{}",
            case.display()
        );
    }
}
