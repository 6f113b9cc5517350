//! Imports point one way (ARCHITECTURE.md, "Layers"). Two checks over every file of src/:
//!
//! - a top-level module imports only from the layers below it in the data flow: error → gpu →
//!   {text, vision, sample, prune, quant} → model → generate → harness;
//! - inside the crate, the file-level import graph has no cycle. A module's use of its own
//!   ancestors is not an edge: a parent shares its contract with its children that way (e.g.
//!   `gpu::kernels::linear` holds the flag bits its `gemv` and `matmul` children read), and the
//!   parent is where callers enter.
//!
//! Imports are read from the source text: every `crate::a::b…` and `super::…` path, including
//! grouped `use crate::{a, b::c}` lists. `pub mod x;` declarations are not imports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules by layer, bottom first. A module may import from its own layer's module
/// and from lower layers only; modules of one layer do not import each other.
const LAYERS: &[&[&str]] = &[
    &["error"],
    &["gpu"],
    &["text", "vision", "sample", "prune", "quant"],
    &["model"],
    &["generate"],
    &["serve"],
    &["harness"],
];

fn layer_of(top: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&top))
}

/// Module path of a source file: src/gpu/kernels/mod.rs → ["gpu", "kernels"].
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
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

/// The code of a file without its `#[cfg(test)]` module and without comments.
fn code(text: &str) -> String {
    let body = text.split("#[cfg(test)]").next().unwrap();
    body.lines()
        .map(|l| l.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path that starts with `prefix` (`crate::` or `super::`), as its segments; a grouped
/// list `a::{b::c, d}` at any depth yields one path per member.
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (at, _) in code.match_indices(prefix) {
        if at > 0 && code[..at].ends_with(|c: char| is_ident(c) || c == ':') {
            continue; // `super::super::x` is read from its first `super::`.
        }
        expand(&code[at + prefix.len()..], Vec::new(), &mut out);
    }
    out
}

/// Read one path from the start of `text` after the segments in `stem`, expanding groups.
/// Returns how many bytes of `text` the path took.
fn expand(text: &str, mut stem: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let mut at = 0;
    loop {
        let rest = &text[at..];
        if let Some(group) = rest.strip_prefix('{') {
            at += 1;
            let mut inner = group;
            loop {
                let skipped = inner.len() - inner.trim_start().len();
                at += skipped;
                inner = &inner[skipped..];
                if inner.starts_with('}') || inner.is_empty() {
                    return at + 1;
                }
                let used = expand(inner, stem.clone(), out);
                at += used;
                inner = &inner[used..];
                if let Some(next) = inner.strip_prefix(',') {
                    at += 1;
                    inner = next;
                }
            }
        }
        let len = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
        if len > 0 {
            stem.push(rest[..len].to_string());
        }
        at += len;
        if text[at..].starts_with("::") {
            at += 2;
            continue;
        }
        out.push(stem);
        return at;
    }
}

/// The deepest module of `modules` that `path` (from the crate root) walks through.
fn target_module(modules: &BTreeSet<Vec<String>>, path: &[String]) -> Vec<String> {
    let mut target = Vec::new();
    for segment in path {
        let mut deeper = target.clone();
        deeper.push(segment.clone());
        if !modules.contains(&deeper) {
            break;
        }
        target = deeper;
    }
    target
}

/// Edges source module → imported module, with the import text for messages.
fn import_graph(src: &Path) -> BTreeMap<Vec<String>, BTreeMap<Vec<String>, String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_path(src, f)).collect();
    let binary = binary_modules(src);
    let mut graph = BTreeMap::new();
    for file in &files {
        let from = module_path(src, file);
        if from.is_empty() || binary.contains(&from[0]) {
            continue; // The binary and lib.rs's re-exports sit above everything.
        }
        let text = code(&std::fs::read_to_string(file).unwrap());
        let mut edges = BTreeMap::new();
        for path in paths_after(&text, "crate::") {
            let to = target_module(&modules, &path);
            edges.insert(to, format!("crate::{}", path.join("::")));
        }
        let parent = &from[..from.len() - 1];
        for path in paths_after(&text, "super::") {
            let full: Vec<String> = parent.iter().cloned().chain(path.iter().cloned()).collect();
            edges.insert(
                target_module(&modules, &full),
                format!("super::{}", path.join("::")),
            );
        }
        edges.retain(|to, _| !from.starts_with(to));
        graph.insert(from, edges);
    }
    graph
}

/// `main` and the modules main.rs declares (`mod cli;`): the binary, not the library.
fn binary_modules(src: &Path) -> BTreeSet<String> {
    let main = std::fs::read_to_string(src.join("main.rs")).unwrap();
    let declared = main.lines().filter_map(|l| {
        let name = l.trim().strip_prefix("mod ")?.strip_suffix(';')?;
        Some(name.trim().to_string())
    });
    declared.chain(["main".to_string()]).collect()
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn top_level_modules_import_only_from_lower_layers() {
    let mut violations = Vec::new();
    for (from, edges) in import_graph(&src_dir()) {
        let from_layer = layer_of(&from[0])
            .unwrap_or_else(|| panic!("module {} is in no layer of LAYERS", from[0]));
        for (to, text) in edges {
            if to.is_empty() || to[0] == from[0] {
                continue;
            }
            let to_layer = layer_of(&to[0]).unwrap();
            if to_layer >= from_layer {
                violations.push(format!("{} uses {text}", from.join("::")));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports that climb the layers:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_file_level_import_graph_has_no_cycle() {
    let graph = import_graph(&src_dir());
    // Depth-first search; a back edge closes a cycle, reported as the path around it.
    fn visit(
        node: &Vec<String>,
        graph: &BTreeMap<Vec<String>, BTreeMap<Vec<String>, String>>,
        stack: &mut Vec<Vec<String>>,
        done: &mut BTreeSet<Vec<String>>,
    ) -> Option<String> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let cycle: Vec<String> = stack[at..]
                .iter()
                .chain([node])
                .map(|n| n.join("::"))
                .collect();
            return Some(cycle.join(" → "));
        }
        if !done.insert(node.clone()) {
            return None;
        }
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flat_map(|e| e.keys()) {
            if let Some(cycle) = visit(next, graph, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, &graph, &mut Vec::new(), &mut done) {
            panic!("import cycle: {cycle}");
        }
    }
}

#[test]
fn the_checker_sees_an_upward_import_and_a_cycle() {
    // The reader itself must be able to fail: parse a grouped import and a super path.
    let text = "use crate::{model::llava::Engine, gpu};\nuse crate::gpu::kernels::{gemv, linear::{a, b}};\nfn f() { super::image::x(); }\n";
    let crate_paths = paths_after(text, "crate::");
    assert_eq!(crate_paths[0], ["model", "llava", "Engine"]);
    assert_eq!(crate_paths[1], ["gpu"]);
    assert_eq!(crate_paths[2], ["gpu", "kernels", "gemv"]);
    assert_eq!(crate_paths[4], ["gpu", "kernels", "linear", "b"]);
    assert_eq!(paths_after(text, "super::")[0], ["image", "x"]);
    assert!(layer_of("vision") < layer_of("model"));
}
