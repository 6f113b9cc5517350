//! The WGSL sources and the preprocessor that specialises them: the bottom of the GPU layer
//! (it knows no device, only text).
//!
//! Shaders are plain WGSL with two kinds of directive comment:
//! - `//#if FLAG`, `//#else`, `//#endif` keep or drop lines by the device's capabilities
//!   (`SUBGROUPS`, `F16`); `enable f16;` is added where the F16 branch is kept.
//! - `//#inject NAME NAME ...` names the tuning constants the host decides (tile sizes,
//!   workgroup sizes, flag bits). The launcher passes their values as [`Constants`], built from
//!   the same typed decision it sizes its dispatch with, and the line is replaced by
//!   `const NAME: u32 = value;` declarations. A shader never declares those names itself.
//! - `//#include NAME` appends the shared file `shaders/NAME.wgsl` (see [`Library`]) after the
//!   shader's last line; WGSL's module-scope declarations may come in any order.
//!
//! Line numbers are preserved, so compiler messages point at the .wgsl file: dropped lines
//! become empty lines, the generated constants all sit on the `//#inject` line, included files
//! start after the shader's last line (a marker comment names them), and `enable f16;` is put in
//! front of line 1.

use std::fmt;

/// Every kernel source file, compiled into the binary so the engine needs no files at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shader {
    Matmul,
    MatmulLanes,
    Gemv,
    Attention,
    AttentionLanes,
    Topk,
    TopkLanes,
    TopkMulti,
    Norm,
    Rope,
    Activation,
    Sample,
    Fma,
    Copy,
    Merge,
    KvStore,
    Embedding,
    AttentionDecode,
    DecodeStep,
}

impl Shader {
    pub const ALL: [Shader; 19] = [
        Shader::Matmul,
        Shader::MatmulLanes,
        Shader::Gemv,
        Shader::Attention,
        Shader::AttentionLanes,
        Shader::Topk,
        Shader::TopkLanes,
        Shader::TopkMulti,
        Shader::Norm,
        Shader::Rope,
        Shader::Activation,
        Shader::Sample,
        Shader::Fma,
        Shader::Copy,
        Shader::Merge,
        Shader::KvStore,
        Shader::Embedding,
        Shader::AttentionDecode,
        Shader::DecodeStep,
    ];

    /// The file stem, used in labels and error messages.
    pub fn name(self) -> &'static str {
        match self {
            Shader::Matmul => "matmul",
            Shader::MatmulLanes => "matmul_lanes",
            Shader::Gemv => "gemv",
            Shader::Attention => "attention",
            Shader::AttentionLanes => "attention_lanes",
            Shader::Topk => "topk",
            Shader::TopkLanes => "topk_lanes",
            Shader::TopkMulti => "topk_multi",
            Shader::Norm => "norm",
            Shader::Rope => "rope",
            Shader::Activation => "activation",
            Shader::Sample => "sample",
            Shader::Fma => "fma",
            Shader::Copy => "copy",
            Shader::Merge => "merge_rows",
            Shader::KvStore => "kv_store",
            Shader::Embedding => "embedding",
            Shader::AttentionDecode => "attention_decode",
            Shader::DecodeStep => "decode_step",
        }
    }

    /// The WGSL text before preprocessing.
    pub fn source(self) -> &'static str {
        match self {
            Shader::Matmul => include_str!("../../shaders/matmul.wgsl"),
            Shader::MatmulLanes => include_str!("../../shaders/matmul_lanes.wgsl"),
            Shader::Gemv => include_str!("../../shaders/gemv.wgsl"),
            Shader::Attention => include_str!("../../shaders/attention.wgsl"),
            Shader::AttentionLanes => include_str!("../../shaders/attention_lanes.wgsl"),
            Shader::Topk => include_str!("../../shaders/topk.wgsl"),
            Shader::TopkLanes => include_str!("../../shaders/topk_lanes.wgsl"),
            Shader::TopkMulti => include_str!("../../shaders/topk_multi.wgsl"),
            Shader::Norm => include_str!("../../shaders/norm.wgsl"),
            Shader::Rope => include_str!("../../shaders/rope.wgsl"),
            Shader::Activation => include_str!("../../shaders/activation.wgsl"),
            Shader::Sample => include_str!("../../shaders/sample.wgsl"),
            Shader::Fma => include_str!("../../shaders/fma.wgsl"),
            Shader::Copy => include_str!("../../shaders/copy.wgsl"),
            Shader::Merge => include_str!("../../shaders/merge_rows.wgsl"),
            Shader::KvStore => include_str!("../../shaders/kv_store.wgsl"),
            Shader::Embedding => include_str!("../../shaders/embedding.wgsl"),
            Shader::AttentionDecode => include_str!("../../shaders/attention_decode.wgsl"),
            Shader::DecodeStep => include_str!("../../shaders/decode_step.wgsl"),
        }
    }

    /// The names listed on the shader's `//#inject` line, in order.
    pub fn injected_names(self) -> Vec<&'static str> {
        self.source()
            .lines()
            .find_map(|line| line.trim().strip_prefix(INJECT))
            .map(|names| names.split_whitespace().collect())
            .unwrap_or_default()
    }
}

impl fmt::Display for Shader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

const INJECT: &str = "//#inject ";
const INCLUDE: &str = "//#include ";

/// WGSL shared by several shaders, appended where a shader says `//#include NAME`. A library
/// reads the names its includers declare (their bindings and `Params`) and declares no
/// bindings or injected constants of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Library {
    /// Every weight format's layout and dequantization (the linear kernels).
    Blocks,
    /// The two attention shaders' uniform block and constants.
    AttentionParams,
    /// The three top-k select kernels' uniform block and order-preserving score keys.
    TopkSelect,
    /// A workgroup's inclusive prefix sum (the 256-thread top-k selects).
    WorkgroupScan,
}

impl Library {
    pub const ALL: [Library; 4] = [
        Library::Blocks,
        Library::AttentionParams,
        Library::TopkSelect,
        Library::WorkgroupScan,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Library::Blocks => "blocks",
            Library::AttentionParams => "attention_params",
            Library::TopkSelect => "topk_select",
            Library::WorkgroupScan => "workgroup_scan",
        }
    }

    pub fn source(self) -> &'static str {
        match self {
            Library::Blocks => include_str!("../../shaders/blocks.wgsl"),
            Library::AttentionParams => include_str!("../../shaders/attention_params.wgsl"),
            Library::TopkSelect => include_str!("../../shaders/topk_select.wgsl"),
            Library::WorkgroupScan => include_str!("../../shaders/workgroup_scan.wgsl"),
        }
    }

    fn named(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.name() == name)
    }
}

/// Capability flags a shader can be specialised on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ShaderFlags {
    pub subgroups: bool,
    pub f16: bool,
}

impl ShaderFlags {
    /// Every combination, for tests that compile each variant.
    pub const ALL: [ShaderFlags; 4] = [
        ShaderFlags {
            subgroups: false,
            f16: false,
        },
        ShaderFlags {
            subgroups: true,
            f16: false,
        },
        ShaderFlags {
            subgroups: false,
            f16: true,
        },
        ShaderFlags {
            subgroups: true,
            f16: true,
        },
    ];
}

/// The values of a shader's `//#inject` constants, in the order a launcher gives them. Part of
/// the module and pipeline cache keys, so two variants of one shader can coexist.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Constants(Vec<(&'static str, u32)>);

impl Constants {
    pub fn new(values: &[(&'static str, u32)]) -> Self {
        Self(values.to_vec())
    }

    /// These constants followed by `other`'s.
    pub fn with(mut self, other: Constants) -> Self {
        self.0.extend(other.0);
        self
    }

    pub fn get(&self, name: &str) -> Option<u32> {
        self.0.iter().find(|(n, _)| *n == name).map(|&(_, v)| v)
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.0.iter().map(|&(name, _)| name)
    }
}

/// `TILE_M=64 TILE_N=64`: how labels name a variant.
impl fmt::Display for Constants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, value)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{name}={value}")?;
        }
        Ok(())
    }
}

/// The `//#inject` line with the constants' declarations in its place.
fn inject_line(names: &str, constants: &Constants) -> Result<String, String> {
    let listed: Vec<&str> = names.split_whitespace().collect();
    let mut line = String::new();
    for (i, name) in listed.iter().enumerate() {
        if listed[..i].contains(name) {
            return Err(format!("{name} is listed twice on the //#inject line"));
        }
        let value = constants
            .get(name)
            .ok_or_else(|| format!("the host gives no value for the injected constant {name}"))?;
        line.push_str(&format!("const {name}: u32 = {value}u; "));
    }
    if let Some(extra) = constants.names().find(|n| !listed.contains(n)) {
        return Err(format!(
            "the host gives {extra}, which the //#inject line does not list"
        ));
    }
    Ok(line)
}

/// Resolve `//#if FLAG` / `//#else` / `//#endif` blocks (not nested), replace the `//#inject`
/// line by `constants`, append the `//#include`d libraries, and add the `enable` directives the
/// kept code needs.
pub fn preprocess(
    source: &str,
    flags: ShaderFlags,
    constants: &Constants,
) -> Result<String, String> {
    let mut includes = Vec::new();
    let body = expand(source, flags, Some(constants), &mut includes)?;
    let mut out = String::with_capacity(body.len() + 256);
    let uses_f16 = std::iter::once(source)
        .chain(includes.iter().map(|l| l.source()))
        .any(|text| text.contains("//#if F16"));
    if flags.f16 && uses_f16 {
        // On line 1 (in front of its text) so that no line number moves.
        out.push_str("enable f16; ");
    }
    // Naga accepts subgroup builtins when the device has SUBGROUP; it rejects the
    // `enable subgroups;` directive itself, so none is added for them.
    out.push_str(&body);
    for library in includes {
        out.push_str(&format!("// ---- included: {}.wgsl ----\n", library.name()));
        let text = expand(library.source(), flags, None, &mut Vec::new())
            .map_err(|e| format!("{}.wgsl: {e}", library.name()))?;
        out.push_str(&text);
    }
    Ok(out)
}

/// One file's lines with its `//#if` blocks resolved, its `//#inject` line replaced (when
/// `constants` is given: a library may inject nothing) and its `//#include`s collected.
fn expand(
    source: &str,
    flags: ShaderFlags,
    constants: Option<&Constants>,
    includes: &mut Vec<Library>,
) -> Result<String, String> {
    let mut out = String::with_capacity(source.len() + 256);
    // (inside a block?, keeping lines?)
    let mut state: Option<bool> = None;
    let mut injected = false;
    for (number, line) in source.lines().enumerate() {
        let at = |reason: String| format!("line {}: {reason}", number + 1);
        let trimmed = line.trim();
        if let Some(names) = trimmed.strip_prefix(INJECT) {
            let Some(constants) = constants.filter(|_| !injected && state.is_none()) else {
                return Err(at(
                    "//#inject must appear once, outside //#if blocks, in a shader".into(),
                ));
            };
            out.push_str(&inject_line(names, constants).map_err(at)?);
            injected = true;
        } else if let Some(name) = trimmed.strip_prefix(INCLUDE) {
            let library = Library::named(name.trim())
                .filter(|_| constants.is_some() && state.is_none())
                .ok_or_else(|| at(format!("cannot include '{}' here", name.trim())))?;
            if !includes.contains(&library) {
                includes.push(library);
            }
        } else if let Some(flag) = trimmed.strip_prefix("//#if ") {
            if state.is_some() {
                return Err(at("nested //#if".into()));
            }
            state = Some(match flag.trim() {
                "SUBGROUPS" => flags.subgroups,
                "F16" => flags.f16,
                other => return Err(at(format!("unknown flag {other}"))),
            });
        } else if trimmed == "//#else" {
            let on = state.ok_or_else(|| at("//#else without //#if".into()))?;
            state = Some(!on);
        } else if trimmed == "//#endif" {
            state
                .take()
                .ok_or_else(|| at("//#endif without //#if".into()))?;
        } else if state != Some(false) {
            // Dropped lines stay as empty lines.
            out.push_str(line);
        }
        out.push('\n');
    }
    if state.is_some() {
        return Err("missing //#endif".into());
    }
    if let Some(constants) = constants {
        if !injected && constants.names().next().is_some() {
            return Err(format!(
                "the host gives {constants}, but the shader has no //#inject line"
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUBGROUPS: ShaderFlags = ShaderFlags {
        subgroups: true,
        f16: false,
    };

    #[test]
    fn preprocess_keeps_the_branch_for_the_flags() {
        let src = "a\n//#if SUBGROUPS\nb\n//#else\nc\n//#endif\nd\n";
        let none = Constants::default();
        let on = preprocess(src, SUBGROUPS, &none).unwrap();
        assert!(on.contains("b\n") && !on.contains("c\n"));
        let off = preprocess(src, ShaderFlags::default(), &none).unwrap();
        assert!(!off.contains("enable") && off.contains("c\n") && !off.contains("b\n"));
        // Line numbers are preserved.
        assert_eq!(off.lines().count(), src.lines().count());
    }

    #[test]
    fn preprocess_rejects_malformed_blocks() {
        let none = Constants::default();
        let flags = ShaderFlags::default();
        assert!(preprocess("//#if SUBGROUPS\n", flags, &none).is_err());
        assert!(preprocess("//#endif\n", flags, &none).is_err());
        assert!(preprocess("//#if NOPE\n//#endif\n", flags, &none).is_err());
    }

    #[test]
    fn injected_constants_replace_their_line_and_keep_line_numbers() {
        let src = "// header\n//#inject WG ROWS\nfn f() {}\n//#if F16\nx\n//#endif\n";
        let constants = Constants::new(&[("ROWS", 4), ("WG", 64)]);
        let flags = ShaderFlags {
            subgroups: false,
            f16: true,
        };
        let out = preprocess(src, flags, &constants).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), src.lines().count());
        assert!(lines[0].starts_with("enable f16; // header"));
        assert_eq!(
            lines[1].trim(),
            "const WG: u32 = 64u; const ROWS: u32 = 4u;"
        );
        assert_eq!(lines[2], "fn f() {}");
    }

    #[test]
    fn injection_demands_exactly_the_listed_constants() {
        let src = "//#inject WG ROWS\n";
        let flags = ShaderFlags::default();
        let missing = Constants::new(&[("WG", 64)]);
        assert!(preprocess(src, flags, &missing).is_err());
        let extra = Constants::new(&[("WG", 64), ("ROWS", 4), ("TILE", 8)]);
        assert!(preprocess(src, flags, &extra).is_err());
        assert!(preprocess("//#inject WG WG\n", flags, &missing).is_err());
        assert!(preprocess("fn f() {}\n", flags, &missing).is_err());
        let twice = "//#inject WG\n//#inject WG\n";
        assert!(preprocess(twice, flags, &missing).is_err());
    }

    #[test]
    fn includes_are_appended_after_the_last_line() {
        let src = "//#inject WG\n//#include blocks\nfn f() {}\n";
        let constants = Constants::new(&[("WG", 64)]);
        let out = preprocess(src, ShaderFlags::default(), &constants).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        // The shader's own lines keep their numbers; the library follows them.
        assert_eq!(lines[1], "");
        assert_eq!(lines[2], "fn f() {}");
        assert_eq!(lines[3], "// ---- included: blocks.wgsl ----");
        assert!(out.contains("fn load_unit("));
        assert!(preprocess(
            "//#include nothing\n",
            ShaderFlags::default(),
            &Constants::default()
        )
        .is_err());
        assert!(preprocess(
            "//#if F16\n//#include blocks\n//#endif\n",
            ShaderFlags::default(),
            &Constants::default()
        )
        .is_err());
    }

    /// No shader declares a constant the host injects: the Rust value is the only one.
    #[test]
    fn shaders_do_not_redeclare_injected_constants() {
        for shader in Shader::ALL {
            let names = shader.injected_names();
            // A shader without an `//#inject` line (decode_step.wgsl) takes nothing.
            assert_eq!(
                names.is_empty(),
                !shader.source().contains(INJECT),
                "{shader}: its //#inject line lists nothing"
            );
            for name in names {
                for decl in ["const", "override", "let", "var"] {
                    let needle = format!("{decl} {name}:");
                    let needle_eq = format!("{decl} {name} =");
                    let source = shader.source();
                    assert!(
                        !source.contains(&needle) && !source.contains(&needle_eq),
                        "{shader}.wgsl declares {name}, which the host injects"
                    );
                }
            }
        }
    }
}
