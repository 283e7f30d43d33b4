//! The layout's one dependency rule, checked on the source itself:
//! `cli` → `ops` → `engine` / `simulator` → `queue` / `upstream` / `store` / `webhook` /
//! `telemetry` → `domain` /
//! `config` / `spool`.
//! A module may use modules of a lower layer, never one of its own layer or above, and
//! the files inside one folder never import each other in a cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layer of every top-level module of the crate (`src/lib.rs` declares them).
const LAYERS: [(&str, u8); 13] = [
    ("domain", 0),
    ("config", 0),
    ("spool", 0),
    ("queue", 1),
    ("upstream", 1),
    ("store", 1),
    ("webhook", 1),
    ("telemetry", 1),
    ("engine", 2),
    ("dashboard", 2),
    ("simulator", 2),
    ("ops", 3),
    ("cli", 4),
];

fn layer(module: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(m, _)| *m == module)
        .unwrap_or_else(|| panic!("src/lib.rs declares `{module}`: give it a layer in LAYERS"))
        .1
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

/// The code of a file without its unit tests (they follow `#[cfg(test)]`, last).
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Names that follow `prefix` in `code`: `prefix name` and `prefix{a, b::c}`.
fn names_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.trim()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices(prefix) {
        // `crate::x` but not `some_crate::x`.
        if code[..i]
            .chars()
            .last()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
        {
            continue;
        }
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name = ident(part);
                if !name.is_empty() {
                    names.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                names.insert(name);
            }
        }
    }
    names
}

struct File {
    /// `engine`, `queue`, … (`lib`/`main` for the crate root files).
    top: String,
    /// The file's module inside its folder (`row` for src/engine/row.rs, `mod` for mod.rs).
    name: String,
    code: String,
}

fn files() -> Vec<File> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    paths
        .iter()
        .map(|p| {
            let rel = p.strip_prefix(&src).unwrap();
            let parts: Vec<String> = rel
                .iter()
                .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            let (top, name) = match parts.as_slice() {
                [file] => (file.clone(), file.clone()),
                [folder, file] => (folder.clone(), file.clone()),
                other => panic!("nested deeper than one folder: {other:?}"),
            };
            File {
                top,
                name,
                code: code(p),
            }
        })
        .collect()
}

#[test]
fn no_module_imports_its_own_layer_or_above() {
    let mut violations = Vec::new();
    let all = files();
    assert!(all.len() > 40, "only {} source files found", all.len());
    for f in all {
        if f.top == "lib" || f.top == "main" {
            continue;
        }
        let mut used = names_after(&f.code, "crate::");
        // In a folder's mod.rs (or a top-level file), `super::` is the crate root.
        if f.name == "mod" || f.name == f.top {
            used.extend(names_after(&f.code, "super::"));
        }
        for m in used {
            if m == f.top || m == "self" {
                continue;
            }
            if layer(&m) >= layer(&f.top) {
                violations.push(format!(
                    "src/{}/{}.rs uses crate::{m} (layer {} uses layer {})",
                    f.top,
                    f.name,
                    layer(&f.top),
                    layer(&m)
                ));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports against the layering:\n{}",
        violations.join("\n")
    );
}

#[test]
fn files_of_one_folder_import_each_other_without_cycles() {
    // folder → file → sibling files it uses.
    let mut graph: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    let all = files();
    for f in &all {
        if f.name == f.top {
            continue;
        }
        let siblings: BTreeSet<String> = all
            .iter()
            .filter(|g| g.top == f.top && g.name != "mod" && g.name != f.name)
            .map(|g| g.name.clone())
            .collect();
        let mut used = if f.name == "mod" {
            names_after(&f.code, "self::")
        } else {
            names_after(&f.code, "super::")
        };
        used.extend(names_after(&f.code, &format!("crate::{}::", f.top)));
        used.retain(|m| siblings.contains(m));
        graph
            .entry(f.top.clone())
            .or_default()
            .insert(f.name.clone(), used);
    }
    for (folder, edges) in &graph {
        // Depth-first search for a back edge.
        fn visit(
            node: &str,
            edges: &BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(start) = path.iter().position(|p| p == node) {
                let mut cycle = path[start..].to_vec();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            if done.contains(node) {
                return None;
            }
            path.push(node.to_string());
            for next in edges.get(node).into_iter().flatten() {
                if let Some(c) = visit(next, edges, path, done) {
                    return Some(c);
                }
            }
            path.pop();
            done.insert(node.to_string());
            None
        }
        let mut done = BTreeSet::new();
        for node in edges.keys() {
            if let Some(cycle) = visit(node, edges, &mut Vec::new(), &mut done) {
                panic!("src/{folder}/: import cycle {}", cycle.join(" → "));
            }
        }
    }
}

#[test]
fn the_map_in_lib_rs_names_every_module_and_folder() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
    let readme = std::fs::read_to_string(root.join("docs/development.md")).unwrap();
    for (module, _) in LAYERS {
        assert!(
            lib.contains(&format!("pub mod {module};")),
            "src/lib.rs declares {module}"
        );
        assert!(
            lib.contains(&format!("`{module}")),
            "the map in src/lib.rs describes {module}"
        );
        assert!(
            readme.contains(&format!("`src/{module}")),
            "docs/development.md's layout names src/{module}"
        );
    }
}

#[test]
fn the_checker_sees_imports() {
    let code = "use crate::queue::{self, Fenced};\nuse crate::{domain, upstream::X};\nlet x = some_crate::y; super::account::Account";
    assert_eq!(
        names_after(code, "crate::"),
        ["domain", "queue", "upstream"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    assert_eq!(
        names_after(code, "super::"),
        ["account"].into_iter().map(String::from).collect()
    );
}
