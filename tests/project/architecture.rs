//! The shape of `src/`: data flows down the module tree without climbing
//! back. Every `crate::…` path in a file of `src/` (in `use` items and in
//! code, braces expanded; comment lines skipped, so intra-doc links do not
//! count) is an edge from that file's module to the longest module the path
//! names; this test fails on any cycle among those edges and prints it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `src/a/b.rs` and `src/a/b/mod.rs` → `a::b`; `lib.rs` and `main.rs` → none.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?.with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts == ["lib"] || parts == ["main"] || parts.is_empty() {
        return None;
    }
    Some(parts.join("::"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The paths (as segments) that `text[at..]` names, after a `crate::` or
/// inside a `{…}` group; `prefix` is what the enclosing group already named.
fn expand(text: &str, at: usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let rest = &text[at..];
    if let Some(group) = rest.strip_prefix('{') {
        let mut depth = 1;
        let mut start = 0;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' | ',' if depth == 1 => {
                    let item = &group[start..i];
                    let skip = item.len() - item.trim_start().len();
                    if !item.trim().is_empty() {
                        expand(text, at + 1 + start + skip, prefix, out);
                    }
                    if c == '}' {
                        return;
                    }
                    start = i + 1;
                }
                '}' => depth -= 1,
                _ => {}
            }
        }
        return;
    }
    let mut segments = prefix.to_vec();
    let mut i = 0;
    loop {
        let len = rest[i..].find(|c: char| !is_ident(c)).unwrap_or(rest.len() - i);
        if len == 0 {
            break;
        }
        segments.push(rest[i..i + len].to_string());
        i += len;
        if rest[i..].starts_with("::{") {
            expand(text, at + i + 2, &segments, out);
            return;
        }
        if !rest[i..].starts_with("::") {
            break;
        }
        i += 2;
    }
    out.push(segments);
}

/// Every module's `crate::` edges to other modules.
fn edges(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeMap<String, PathBuf> =
        files.iter().filter_map(|f| Some((module_of(src, f)?, f.clone()))).collect();
    let mut graph = BTreeMap::new();
    for (module, file) in &modules {
        let text: String = std::fs::read_to_string(file)
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut paths = Vec::new();
        let mut from = 0;
        while let Some(found) = text[from..].find("crate::") {
            let at = from + found;
            from = at + "crate::".len();
            if text[..at].ends_with(is_ident) {
                continue; // `$crate::` in a macro, `sockbroker_crate::`, …
            }
            expand(&text, from, &[], &mut paths);
        }
        let mut targets = BTreeSet::new();
        for segments in paths {
            let target = (1..=segments.len()).rev().map(|n| segments[..n].join("::")).find(|m| modules.contains_key(m));
            if let Some(target) = target.filter(|t| t != module) {
                targets.insert(target);
            }
        }
        graph.insert(module.clone(), targets);
    }
    graph
}

/// One cycle through `graph`, if any (depth-first search, three colours).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit<'a>(
        node: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<&'a str>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(pos) = stack.iter().position(|n| *n == node) {
            let mut cycle: Vec<String> = stack[pos..].iter().map(|s| s.to_string()).collect();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node);
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

#[test]
fn no_import_cycle_between_files_of_src() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = edges(&src);
    // The parser must see the edges that exist, or the test proves nothing.
    assert!(graph["cli"].contains("broker"), "{graph:#?}");
    assert!(graph["upgrade"].contains("server"), "{graph:#?}");
    assert!(graph["systemd::fdstore"].contains("registry"), "{graph:#?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle in src/: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let graph: BTreeMap<String, BTreeSet<String>> = [("a", &["b"][..]), ("b", &["c"]), ("c", &["a"]), ("d", &[])]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
        .collect();
    assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
}

#[test]
fn braces_and_nested_groups_are_expanded() {
    let text = "use crate::{a::{B, c::D}, e, f::G};\nlet x = crate::h::i::J::new();";
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(found) = text[from..].find("crate::") {
        from += found + "crate::".len();
        expand(text, from, &[], &mut out);
    }
    let joined: Vec<String> = out.iter().map(|s| s.join("::")).collect();
    assert_eq!(joined, ["a::B", "a::c::D", "e", "f::G", "h::i::J::new"]);
}
