//! What the docs promise about themselves: every block an operator copies is
//! marked the one way (`<!-- recipe: NAME -->` before a fenced block) and is
//! run or installed by the real-systemd suite; every figure section names
//! the bench command that prints its figures, and that bench exists.

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every page of docs/.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

fn relative(page: &Path) -> String {
    page.strip_prefix(root()).unwrap().display().to_string()
}

/// The tests that read recipes out of the docs.
fn recipe_readers() -> String {
    ["tests/systemd_boot.rs", "tests/systemd/package.rs"]
        .iter()
        .map(|f| std::fs::read_to_string(root().join(f)).unwrap())
        .collect()
}

#[test]
fn every_recipe_uses_the_one_marker_and_is_run_by_a_test() {
    let readers = recipe_readers();
    let mut found = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let name = relative(&page);
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let line = line.trim();
            if !line.starts_with("<!--") {
                continue;
            }
            let recipe = line.strip_prefix("<!-- recipe: ").and_then(|r| r.strip_suffix(" -->"));
            let Some(recipe) = recipe else {
                panic!("{name}:{}: {line:?}: the one doc marker is `<!-- recipe: NAME -->`", i + 1);
            };
            assert!(
                lines.get(i + 1).is_some_and(|l| l.starts_with("```")),
                "{name}:{}: {line} must precede a fenced block",
                i + 1
            );
            assert!(
                readers.contains(&format!("\"{recipe}\"")),
                "{name}:{}: recipe {recipe:?} is read by no test (tests/systemd_boot.rs, tests/systemd/package.rs)",
                i + 1
            );
            found += 1;
        }
    }
    // README's two, docs/haproxy.md's two, docs/generic-daemons.md's five.
    assert!(found >= 9, "only {found} recipes found: the marker check checked nothing");
}

/// The bench targets of Cargo.toml.
fn benches() -> Vec<String> {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let mut names = Vec::new();
    let mut in_bench = false;
    for line in manifest.lines() {
        if line.starts_with('[') {
            in_bench = line == "[[bench]]";
        } else if let Some(name) = line.strip_prefix("name = ").filter(|_| in_bench) {
            names.push(name.trim_matches('"').to_string());
        }
    }
    names
}

#[test]
fn every_figures_section_names_the_bench_that_prints_it() {
    let benches = benches();
    assert!(benches.len() >= 6, "{benches:?}");
    let mut sections = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let name = relative(&page);
        for section in text.split("\n## ").skip(1).filter(|s| s.starts_with("Figures")) {
            sections += 1;
            let section = section.split("\n## ").next().unwrap();
            let commands: Vec<&str> = section
                .split("`cargo bench --bench ")
                .skip(1)
                .map(|rest| rest.split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap())
                .collect();
            assert!(!commands.is_empty(), "{name}: a Figures section names no `cargo bench --bench NAME`");
            for bench in commands {
                assert!(benches.iter().any(|b| b == bench), "{name}: `cargo bench --bench {bench}`: no such bench");
            }
        }
    }
    assert!(sections >= 2, "only {sections} Figures sections found (docs/haproxy.md, docs/generic-daemons.md)");
}
