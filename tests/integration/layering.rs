//! Holds the code to the layer order declared in `docs/design.md`: a module
//! may use the modules below it and never one above it. The check reads the
//! source, so an upward `use crate::…` (or path) fails the test suite with
//! the file and line that made it.

use std::path::{Path, PathBuf};

const DESIGN: &str = include_str!("../../docs/design.md");

/// The layers, top first, from the ```text block after the "## Layers" heading.
fn declared_layers() -> Vec<String> {
    let section = DESIGN
        .split("\n## Layers")
        .nth(1)
        .expect("docs/design.md has a `## Layers` section");
    let block = section
        .split("```text\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the Layers section has a ```text block");
    block
        .lines()
        .map(|line| line.split_whitespace().next().unwrap_or_default())
        .filter(|name| !name.is_empty())
        .map(String::from)
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The crate-level modules a line of code names: `crate::x`, `crate::{x, y}`,
/// and `super::` paths that climb to the crate root from `depth`.
fn referenced(line: &str, depth: usize) -> Vec<String> {
    let code = line.split("//").next().unwrap_or_default();
    let mut names = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or_default();
            names.extend(inner.split(',').map(|item| first_segment(item.trim())));
        } else {
            names.push(first_segment(after));
        }
        rest = after;
    }
    let climb = "super::".repeat(depth);
    if depth > 0
        && let Some(at) = code.find(&climb)
        && !code[at + climb.len()..].starts_with("super::")
    {
        names.push(first_segment(&code[at + climb.len()..]));
    }
    names.retain(|n| !n.is_empty() && n != "self" && n != "*");
    names
}

fn first_segment(path: &str) -> String {
    path.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// Every reference from a module to one above it (or to one the order does not declare).
fn violations(src: &Path, layers: &[String]) -> Vec<String> {
    let rank = |name: &str| layers.iter().position(|l| l == name);
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut found = Vec::new();
    for file in files {
        let relative = file.strip_prefix(src).expect("under src");
        let mut parts: Vec<String> = relative
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let top = parts[0].trim_end_matches(".rs").to_string();
        if matches!(top.as_str(), "lib" | "bin") {
            continue;
        }
        let Some(own) = rank(&top) else {
            found.push(format!("src/{top} is not in docs/design.md's layer order"));
            continue;
        };
        // How many `super::` reach the crate root: src/x.rs and src/x/mod.rs
        // are one level down, src/x/y.rs two, and so on.
        if parts.last().is_some_and(|p| p == "mod.rs") {
            parts.pop();
        }
        let depth = parts.len();
        let text = std::fs::read_to_string(&file).expect("readable");
        for (number, line) in text.lines().enumerate() {
            for name in referenced(line, depth) {
                match rank(&name) {
                    Some(other) if other >= own => {}
                    Some(_) => found.push(format!(
                        "{}:{}: `{top}` uses `{name}`, a layer above it",
                        file.display(),
                        number + 1
                    )),
                    None => found.push(format!(
                        "{}:{}: `{top}` uses `{name}`, which is not in the layer order",
                        file.display(),
                        number + 1
                    )),
                }
            }
        }
    }
    found
}

#[test]
fn no_module_uses_one_above_it() {
    let layers = declared_layers();
    assert!(
        layers.len() > 5,
        "layers read from docs/design.md: {layers:?}"
    );
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&src, &layers);
    assert!(
        found.is_empty(),
        "upward dependencies:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_sees_upward_uses_in_every_form() {
    assert_eq!(referenced("use crate::config::Config;", 1), ["config"]);
    assert_eq!(
        referenced("use crate::{edge, error::X};", 2),
        ["edge", "error"]
    );
    assert_eq!(referenced("    let x = crate::app::run(a);", 2), ["app"]);
    assert_eq!(referenced("use super::super::app::Gateway;", 2), ["app"]);
    assert!(referenced("use super::frames;", 3).is_empty());
    assert!(referenced("/// built by [`crate::app`]", 1).is_empty());
}

#[test]
fn every_module_of_the_crate_has_a_layer() {
    let layers = declared_layers();
    let lib = include_str!("../../src/lib.rs");
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    let mut expected: Vec<&str> = layers.iter().map(String::as_str).collect();
    expected.sort_unstable();
    let mut declared_sorted = declared.clone();
    declared_sorted.sort_unstable();
    assert_eq!(
        declared_sorted, expected,
        "lib.rs's modules and docs/design.md's layers"
    );
}
