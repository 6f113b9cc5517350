//! The engine's canonical tensor names (the llava-hf modules' own, `weights.rs`) as llama.cpp's
//! converters name them in a GGUF pair, with what must be undone when a tensor is read.
//!
//! The text file holds the decoder (`token_embd`, `blk.N.attn_q`, … `output`), the mmproj file
//! the vision tower and projector (`v.patch_embd`, `v.blk.N.attn_q`, … `mm.0`, `mm.2`). Three
//! conventions are undone here (docs/gguf.md cites the converter lines):
//! - ggml's reversed dimension order: a torch `[n_out, n_in]` weight is stored as
//!   `ne = [n_in, n_out]` (same bytes, the shape read backwards; `TensorInfo::shape`);
//! - the permutation of Q and K rows (`LlamaModel.permute`) that turns HF's rotate-half RoPE
//!   layout into ggml's interleaved one: [`RowOrder::UnpermuteHeads`];
//! - the legacy mmproj converter's swapped `ffn_up` / `ffn_down` names: fc1 and fc2 are told
//!   apart by their shapes, as `clip.cpp` does ([`Lookup::FfnByShape`]).

/// Which file of the pair holds a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Text,
    Vision,
}

/// A row order to restore after reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowOrder {
    AsStored,
    /// Undo `permute(w, n_head, ...)` over `heads` heads: stored row `h·hd + 2j + a` is HF row
    /// `h·hd + a·hd/2 + j` (a ∈ {0, 1}, j < hd/2).
    UnpermuteHeads {
        heads: usize,
    },
}

/// How to find a canonical tensor in the pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// One name.
    Named(String),
    /// `v.blk.N.ffn_up` / `ffn_down`, whichever has fc1's (`first`) or fc2's shape;
    /// `suffix` is `weight` or `bias`.
    FfnByShape {
        layer: usize,
        first: bool,
        suffix: String,
    },
    /// The first of these names that exists (`output` falls back to `token_embd` when the
    /// embeddings are tied; `image_newline` has two spellings).
    FirstOf(Vec<String>),
}

/// Where a canonical tensor lives in a GGUF pair, and how its rows must be reordered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub side: Side,
    pub lookup: Lookup,
    pub rows: RowOrder,
}

/// The heads Q and K are permuted over (the text model's head counts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub q: usize,
    pub kv: usize,
}

fn at(side: Side, name: String) -> Location {
    Location {
        side,
        lookup: Lookup::Named(name),
        rows: RowOrder::AsStored,
    }
}

/// The GGUF location of `canonical`, or None for a name the pair cannot hold.
pub fn locate(canonical: &str, heads: Heads) -> Option<Location> {
    if let Some(rest) = canonical.strip_prefix("text.") {
        return text(rest, heads);
    }
    if let Some(rest) = canonical.strip_prefix("vision.") {
        return vision(rest);
    }
    if let Some(rest) = canonical.strip_prefix("projector.") {
        let (layer, suffix) = rest.split_once('.')?;
        let index = match layer {
            "linear_1" => 0,
            "linear_2" => 2,
            _ => return None,
        };
        return Some(at(Side::Vision, format!("mm.{index}.{suffix}")));
    }
    match canonical {
        "lm_head.weight" => Some(Location {
            side: Side::Text,
            lookup: Lookup::FirstOf(vec!["output.weight".into(), "token_embd.weight".into()]),
            rows: RowOrder::AsStored,
        }),
        "image_newline" => Some(Location {
            side: Side::Vision,
            lookup: Lookup::FirstOf(vec!["model.image_newline".into(), "v.image_newline".into()]),
            rows: RowOrder::AsStored,
        }),
        _ => None,
    }
}

/// `text.…`: the decoder.
fn text(rest: &str, heads: Heads) -> Option<Location> {
    match rest {
        "embed_tokens.weight" => return Some(at(Side::Text, "token_embd.weight".into())),
        "norm.weight" => return Some(at(Side::Text, "output_norm.weight".into())),
        _ => {}
    }
    let rest = rest.strip_prefix("layers.")?;
    let (layer, field) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (name, rows) = match field {
        "input_layernorm.weight" => ("attn_norm.weight", RowOrder::AsStored),
        "self_attn.q_proj.weight" => ("attn_q.weight", RowOrder::UnpermuteHeads { heads: heads.q }),
        "self_attn.k_proj.weight" => (
            "attn_k.weight",
            RowOrder::UnpermuteHeads { heads: heads.kv },
        ),
        "self_attn.v_proj.weight" => ("attn_v.weight", RowOrder::AsStored),
        "self_attn.o_proj.weight" => ("attn_output.weight", RowOrder::AsStored),
        "post_attention_layernorm.weight" => ("ffn_norm.weight", RowOrder::AsStored),
        "mlp.gate_proj.weight" => ("ffn_gate.weight", RowOrder::AsStored),
        "mlp.up_proj.weight" => ("ffn_up.weight", RowOrder::AsStored),
        "mlp.down_proj.weight" => ("ffn_down.weight", RowOrder::AsStored),
        _ => return None,
    };
    Some(Location {
        side: Side::Text,
        lookup: Lookup::Named(format!("blk.{layer}.{name}")),
        rows,
    })
}

/// `vision.…`: the CLIP vision tower.
fn vision(rest: &str) -> Option<Location> {
    let name = match rest {
        "embeddings.patch_embedding.weight" => "v.patch_embd.weight".to_string(),
        "embeddings.class_embedding" => "v.class_embd".to_string(),
        "embeddings.position_embedding.weight" => "v.position_embd.weight".to_string(),
        "pre_layrnorm.weight" => "v.pre_ln.weight".to_string(),
        "pre_layrnorm.bias" => "v.pre_ln.bias".to_string(),
        _ => return vision_layer(rest.strip_prefix("encoder.layers.")?),
    };
    Some(at(Side::Vision, name))
}

/// `vision.encoder.layers.N.…`.
fn vision_layer(rest: &str) -> Option<Location> {
    let (layer, field) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = field.rsplit_once('.')?;
    if !matches!(suffix, "weight" | "bias") {
        return None;
    }
    let name = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.out_proj" => "attn_out",
        "layer_norm1" => "ln1",
        "layer_norm2" => "ln2",
        "mlp.fc1" | "mlp.fc2" => {
            return Some(Location {
                side: Side::Vision,
                lookup: Lookup::FfnByShape {
                    layer,
                    first: module == "mlp.fc1",
                    suffix: suffix.to_string(),
                },
                rows: RowOrder::AsStored,
            })
        }
        _ => return None,
    };
    Some(at(Side::Vision, format!("v.blk.{layer}.{name}.{suffix}")))
}

/// The permutation `RowOrder::UnpermuteHeads` undoes: for each HF row, the stored row it is
/// read from.
pub fn unpermuted_rows(rows: usize, heads: usize) -> Option<Vec<usize>> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return None;
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    Some(
        (0..rows)
            .map(|hf| {
                let (h, within) = (hf / head_dim, hf % head_dim);
                let (a, j) = (within / half, within % half);
                h * head_dim + 2 * j + a
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADS: Heads = Heads { q: 4, kv: 2 };

    #[test]
    fn decoder_names_follow_llama_cpps_map() {
        let q = locate("text.layers.3.self_attn.q_proj.weight", HEADS).unwrap();
        assert_eq!(q.lookup, Lookup::Named("blk.3.attn_q.weight".into()));
        assert_eq!(q.rows, RowOrder::UnpermuteHeads { heads: 4 });
        let k = locate("text.layers.3.self_attn.k_proj.weight", HEADS).unwrap();
        assert_eq!(k.rows, RowOrder::UnpermuteHeads { heads: 2 });
        let down = locate("text.layers.0.mlp.down_proj.weight", HEADS).unwrap();
        assert_eq!(down.lookup, Lookup::Named("blk.0.ffn_down.weight".into()));
        let embed = locate("text.embed_tokens.weight", HEADS).unwrap();
        assert_eq!(embed.lookup, Lookup::Named("token_embd.weight".into()));
        assert!(locate("text.layers.x.mlp.up_proj.weight", HEADS).is_none());
    }

    #[test]
    fn vision_names_follow_the_mmproj_converter() {
        let q = locate("vision.encoder.layers.7.self_attn.q_proj.bias", HEADS).unwrap();
        assert_eq!(q.side, Side::Vision);
        assert_eq!(q.lookup, Lookup::Named("v.blk.7.attn_q.bias".into()));
        let fc2 = locate("vision.encoder.layers.1.mlp.fc2.weight", HEADS).unwrap();
        assert_eq!(
            fc2.lookup,
            Lookup::FfnByShape {
                layer: 1,
                first: false,
                suffix: "weight".into()
            }
        );
        let mm = locate("projector.linear_2.bias", HEADS).unwrap();
        assert_eq!(mm.lookup, Lookup::Named("mm.2.bias".into()));
    }

    /// The converter's `permute` on row indices, written from its numpy definition
    /// (reshape(heads, 2, hd/2) then swap the last two axes), inverted by `unpermuted_rows`.
    #[test]
    fn unpermuting_inverts_the_converters_permutation() {
        let (rows, heads) = (24, 3);
        let hd = rows / heads;
        // permuted[h, j, a] = original[h, a, j]: stored row h·hd + 2j + a holds HF row
        // h·hd + a·hd/2 + j.
        let mut stored_holds = vec![0; rows];
        for h in 0..heads {
            for a in 0..2 {
                for j in 0..hd / 2 {
                    stored_holds[h * hd + 2 * j + a] = h * hd + a * hd / 2 + j;
                }
            }
        }
        let read_from = unpermuted_rows(rows, heads).unwrap();
        for (hf, &stored) in read_from.iter().enumerate() {
            assert_eq!(stored_holds[stored], hf);
        }
        assert!(unpermuted_rows(10, 4).is_none());
    }
}
