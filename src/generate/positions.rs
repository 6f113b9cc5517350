//! The RoPE position of every prompt row (docs/pruning.md, "Positions").
//!
//! A text id takes the position after the one before it. An image of N0 patches, of which a
//! selection before the projector kept N1, takes N1 rows; with `Positions::Contiguous` they sit
//! at the next N1 positions, with `Positions::Original` each sits at its patch's own position
//! (the image's first position plus the patch's index among the unpruned rows) and the text
//! after the image continues N0 positions on, where it would sit unpruned. Stage 2 never changes
//! a position (the kept rows' positions are gathered with them), and decoding continues after
//! the last position.

use crate::model::llava::Engine;
use crate::prune::Positions;
use crate::vision::anyres::PackedToken;

use super::image::EncodedImage;
use super::prepare::{PreparedRequest, TurnImage};

/// A turn's positions.
pub(super) struct RowPositions {
    /// The positions of the prompt's new rows (`prompt.ids[reused..]`).
    pub rows: Vec<u32>,
    /// The position the first generated token takes.
    pub next: usize,
}

/// Where one image's rows sit, relative to its first position.
pub(super) struct ImagePositions {
    /// Each row's offset from the image's first position.
    pub offsets: Vec<usize>,
    /// Positions the image takes: N0 with original positions, else its rows.
    pub span: usize,
}

impl Engine {
    /// Positions of `input`'s prompt rows, given the image passes of its new images.
    pub(super) fn row_positions(
        &self,
        input: &PreparedRequest,
        images: &[EncodedImage],
        positions: Positions,
    ) -> RowPositions {
        let spans = &input.prompt.images;
        // Held images' rows lie before `reused`: only the positions they take matter.
        let mut layout: Vec<ImagePositions> = input
            .held
            .iter()
            .map(|held| ImagePositions {
                offsets: Vec::new(),
                span: held.position_span,
            })
            .collect();
        for (image, encoded) in input.images.iter().zip(images) {
            let rows = spans[image.index].len;
            layout.push(image_positions(image, encoded, rows, positions));
        }
        let mut all = Vec::with_capacity(input.prompt.ids.len());
        let mut position = 0;
        let mut row = 0;
        let mut next_image = 0;
        while row < input.prompt.ids.len() {
            match spans.get(next_image) {
                Some(span) if span.start == row => {
                    let image = &layout[next_image];
                    let offset = |r: usize| image.offsets.get(r).copied().unwrap_or(r);
                    all.extend((0..span.len).map(|r| (position + offset(r)) as u32));
                    position += image.span;
                    row += span.len;
                    next_image += 1;
                }
                _ => {
                    all.push(position as u32);
                    position += 1;
                    row += 1;
                }
            }
        }
        RowPositions {
            rows: all.split_off(input.reused),
            next: position,
        }
    }
}

/// Where a new image's rows sit: with original positions and a selection before the projector,
/// at its kept patches' places among its unpruned rows (LLaVA-NeXT: among every packed row);
/// otherwise one after another.
pub(super) fn image_positions(
    image: &TurnImage,
    encoded: &EncodedImage,
    rows: usize,
    positions: Positions,
) -> ImagePositions {
    let contiguous = ImagePositions {
        offsets: (0..rows).collect(),
        span: rows,
    };
    if positions == Positions::Contiguous || image.plan.before_projector.is_none() {
        return contiguous;
    }
    let offsets = match (&image.anyres, &encoded.kept) {
        (Some(anyres), _) => packed_offsets(&anyres.layout.packed(), &anyres.packed),
        (None, Some(kept)) => kept.clone(),
        (None, None) => return contiguous,
    };
    ImagePositions {
        offsets,
        span: image.plan.n0,
    }
}

/// The index of each of `kept` (in order) among `all` (in the same order).
fn packed_offsets(all: &[PackedToken], kept: &[PackedToken]) -> Vec<usize> {
    let mut offsets = Vec::with_capacity(kept.len());
    let mut at = 0;
    for token in kept {
        while all[at] != *token {
            at += 1;
        }
        offsets.push(at);
        at += 1;
    }
    offsets
}
