//! llama.cpp's LLaVA files: a text-model GGUF (`general.architecture` llama) and an mmproj GGUF
//! (`clip`: the vision tower and projector), read as one checkpoint. docs/gguf.md describes
//! the conventions undone here and where the engine differs from llama.cpp.
//!
//! - `file`: the container (header, metadata, tensor infos), checked and memory mapped;
//! - `names`: canonical tensor names → GGUF names, with the row-order fix-ups;
//! - `metadata`: `LlavaConfig`, the image processor and the vocabulary from the metadata;
//! - `writer` (with `writer_text`, `writer_vision`): writing a pair (`llava-wgpu quantize
//!   --format gguf`).

mod encode;
pub mod file;
pub mod metadata;
pub mod names;
pub mod writer;
mod writer_text;
mod writer_vision;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::stored::StoredTensor;
use file::{GgufFile, TensorInfo};
use names::{Heads, Location, Lookup, RowOrder, Side};

/// A text GGUF and its mmproj GGUF.
pub struct GgufPair {
    pub text: GgufFile,
    pub mmproj: GgufFile,
    /// Head counts of the text model, which Q and K rows are permuted over.
    heads: Heads,
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Whether `path` names a GGUF model: a `.gguf` file, or a directory holding some.
pub fn is_gguf_model(path: &Path) -> bool {
    if path.is_file() {
        return GgufFile::is_gguf(path);
    }
    path.is_dir() && !path.join("config.json").exists() && !gguf_files(path).is_empty()
}

fn gguf_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// `general.architecture` of a file.
fn architecture(file: &GgufFile) -> Result<&str> {
    file.string("general.architecture")?
        .ok_or_else(|| file_error(&file.path, "metadata 'general.architecture' is missing"))
}

impl GgufPair {
    /// The pair `model` (a text GGUF, or a directory holding exactly one text GGUF and one
    /// mmproj GGUF) and `mmproj` (required with a file, optional with a directory).
    pub fn open(model: &Path, mmproj: Option<&Path>) -> Result<Self> {
        let (text, mmproj) = if model.is_dir() {
            Self::from_dir(model, mmproj)?
        } else {
            let text = GgufFile::open(model)?;
            let Some(mmproj) = mmproj else {
                let arch = architecture(&text)?;
                if arch == "clip" {
                    return Err(file_error(
                        model,
                        "this is an mmproj file (vision tower and projector): pass it with \
                         --mmproj, and the text model's GGUF with --model",
                    ));
                }
                return Err(file_error(
                    model,
                    "a GGUF text model needs its mmproj file (the vision tower): pass it with \
                     --mmproj FILE.gguf",
                ));
            };
            (text, GgufFile::open(mmproj)?)
        };
        Self::check_roles(&text, &mmproj)?;
        let heads = metadata::text_heads(&text)?;
        Ok(Self {
            text,
            mmproj,
            heads,
        })
    }

    /// The text and mmproj files of a directory: every `.gguf` in it is read, and exactly one
    /// of each kind must be there (or `mmproj` given).
    fn from_dir(dir: &Path, mmproj: Option<&Path>) -> Result<(GgufFile, GgufFile)> {
        let mut texts = Vec::new();
        let mut projs = Vec::new();
        for path in gguf_files(dir) {
            let file = GgufFile::open(&path)?;
            match architecture(&file)? {
                "clip" => projs.push(file),
                _ => texts.push(file),
            }
        }
        if let Some(path) = mmproj {
            projs = vec![GgufFile::open(path)?];
        }
        let names = |files: &[GgufFile]| -> String {
            let names: Vec<String> = files.iter().map(|f| f.path.display().to_string()).collect();
            names.join(", ")
        };
        match (texts.len(), projs.len()) {
            (1, 1) => Ok((texts.remove(0), projs.remove(0))),
            (0, _) => Err(file_error(
                dir,
                "no text-model GGUF here (only mmproj files or none)",
            )),
            (_, 0) => Err(file_error(
                dir,
                "no mmproj GGUF here (general.architecture clip): add the model's mmproj file \
                 or pass --mmproj FILE.gguf",
            )),
            _ => Err(file_error(
                dir,
                format!(
                    "more than one GGUF pair here: text models {}; mmproj files {}; pass \
                     --model FILE.gguf --mmproj FILE.gguf",
                    names(&texts),
                    names(&projs)
                ),
            )),
        }
    }

    fn check_roles(text: &GgufFile, mmproj: &GgufFile) -> Result<()> {
        match architecture(text)? {
            "llama" => {}
            "clip" => {
                return Err(file_error(
                    &text.path,
                    "this is an mmproj file (general.architecture clip), given as the text \
                     model: pass it with --mmproj and the text model's GGUF with --model",
                ))
            }
            other => {
                return Err(file_error(
                    &text.path,
                    format!(
                        "unsupported architecture '{other}' (general.architecture): LLaVA's \
                         text models are 'llama' (LLaMA, Vicuna, Mistral)"
                    ),
                ))
            }
        }
        match architecture(mmproj)? {
            "clip" => Ok(()),
            other => Err(file_error(
                &mmproj.path,
                format!(
                    "general.architecture is '{other}', not 'clip': this is not an mmproj file"
                ),
            )),
        }
    }

    fn file(&self, side: Side) -> &GgufFile {
        match side {
            Side::Text => &self.text,
            Side::Vision => &self.mmproj,
        }
    }

    /// Whether the pair holds `canonical`.
    pub fn contains(&self, canonical: &str) -> bool {
        self.find(canonical).is_ok_and(|found| found.is_some())
    }

    /// The info of `canonical`'s tensor, its file and its fix-up, if the pair holds it.
    fn find(&self, canonical: &str) -> Result<Option<(&GgufFile, &TensorInfo, RowOrder)>> {
        let Some(Location { side, lookup, rows }) = names::locate(canonical, self.heads) else {
            return Ok(None);
        };
        let file = self.file(side);
        let info = match &lookup {
            Lookup::Named(name) => file.tensor(name),
            Lookup::FirstOf(names) => names.iter().find_map(|n| file.tensor(n)),
            Lookup::FfnByShape {
                layer,
                first,
                suffix,
            } => self.ffn_by_shape(*layer, *first, suffix)?,
        };
        Ok(info.map(|info| (file, info, rows)))
    }

    /// fc1 or fc2 of vision layer `layer` (`suffix` weight or bias). The legacy converter
    /// names fc1 `ffn_down` and fc2 `ffn_up`, the newer one the other way round; as clip.cpp
    /// does, the shapes decide: fc1's weight maps the embedding width to the wider feed-forward
    /// width, so its rows (ggml `ne[0]`) are the embedding width. Equal widths keep the newer
    /// naming.
    fn ffn_by_shape(&self, layer: usize, first: bool, suffix: &str) -> Result<Option<&TensorInfo>> {
        let file = &self.mmproj;
        let name = |kind: &str| format!("v.blk.{layer}.{kind}.{suffix}");
        let up = format!("v.blk.{layer}.ffn_up.weight");
        let down = format!("v.blk.{layer}.ffn_down.weight");
        let (Some(up_w), Some(_)) = (file.tensor(&up), file.tensor(&down)) else {
            return Ok(file.tensor(&name(if first { "ffn_up" } else { "ffn_down" })));
        };
        let width = metadata::vision_width(file)?;
        // ffn_up holds fc1 unless its rows are the feed-forward width (the legacy swap).
        let swapped = up_w.dims.first() != Some(&width) && up_w.dims.get(1) == Some(&width);
        let fc1_is_up = !swapped;
        let kind = if first == fc1_is_up {
            "ffn_up"
        } else {
            "ffn_down"
        };
        Ok(file.tensor(&name(kind)))
    }

    /// The tensor `canonical` in torch's order, with its rows in HF's order.
    pub fn tensor(&self, canonical: &str) -> Result<StoredTensor<'_>> {
        let Some((file, info, rows)) = self.find(canonical)? else {
            let side = names::locate(canonical, self.heads).map(|l| l.side);
            let path = match side {
                Some(Side::Vision) => &self.mmproj.path,
                _ => &self.text.path,
            };
            return Err(file_error(
                path,
                format!(
                    "tensor for '{canonical}' is missing ({})",
                    expected_name(canonical)
                ),
            ));
        };
        let stored = StoredTensor {
            name: info.name.clone(),
            file: &file.path,
            shape: info.shape(),
            format: info.format,
            bytes: std::borrow::Cow::Borrowed(file.bytes(info)),
        };
        match rows {
            RowOrder::AsStored => Ok(stored),
            RowOrder::UnpermuteHeads { heads } => {
                let order = names::unpermuted_rows(stored.rows(), heads).ok_or_else(|| {
                    file.tensor_error(
                        &info.name,
                        format!(
                            "has {} rows, which {heads} heads of an even size cannot hold",
                            stored.rows()
                        ),
                    )
                })?;
                stored.reorder_rows(&order)
            }
        }
    }
}

/// The GGUF name a canonical tensor is looked for under, for error messages.
fn expected_name(canonical: &str) -> String {
    let heads = Heads { q: 1, kv: 1 };
    match names::locate(canonical, heads).map(|l| l.lookup) {
        Some(Lookup::Named(name)) => format!("looked for '{name}'"),
        Some(Lookup::FirstOf(names)) => format!("looked for {}", names.join(" or ")),
        Some(Lookup::FfnByShape { layer, suffix, .. }) => {
            format!("looked for v.blk.{layer}.ffn_up/ffn_down.{suffix}")
        }
        None => "a GGUF LLaVA pair does not hold it".into(),
    }
}
