//! The image side of a request: vision tower → before-projector selection (STAR stage 1,
//! FasterVLM, VisPruner, random) → projector. Its output is the N1 rows spliced into the
//! prompt's embeddings.

use crate::error::{Error, Result};
use crate::gpu::kernels::attention::{self, ScoreOutput};
use crate::gpu::kernels::merge as gpu_merge;
use crate::gpu::kernels::topk::{self, Segment};
use crate::gpu::{DType, Recorder, Tensor};
use crate::model::clip::ClipBuffers;
use crate::model::config::FeatureSelect;
use crate::model::image_cache::ProjectedImage;
use crate::model::llava::Engine;
use crate::model::projector::Projector;
use crate::prune::{merge, vispruner, BeforeProjector, Plan, Stage1Score};

use crate::vision::anyres::PackedToken;

use super::prepare::{ImageStep, PreparedRequest, TurnImage};
use super::request::TurnSettings;

/// The image side of a request after the vision tower, selection and the projector.
pub(super) struct EncodedImage {
    /// Projector output [N1, text width].
    pub embeddings: Tensor,
    /// Patch indices the language model receives (None: all of them).
    pub kept: Option<Vec<usize>>,
    /// LLaVA-NeXT: what each row of `embeddings` is, in prompt order (None for LLaVA-1.5).
    pub packed: Option<Vec<PackedToken>>,
}

/// Buffers of one image's pass: the tower's own, and what the projector reads and writes.
pub(super) struct ImageBuffers {
    tower: ClipBuffers,
    /// (N1, vision width): the encoder rows that become visual tokens.
    features: Tensor,
    /// (N1, text width): the projector's hidden layer.
    scratch: Tensor,
    /// (N1, text width): the projector output.
    pub(super) embeddings: Tensor,
}

/// What a before-projector selection adds: the scores of the last tower layer and the list of
/// kept encoder rows.
pub(super) struct Stage1Buffers {
    /// Per-block partial sums of the scored attention.
    partials: Tensor,
    /// (tokens,) per-key scores.
    scores: Tensor,
    /// (1 + N1,) u32: CLS and the kept patch rows of the encoder output.
    rows: Tensor,
}

impl Engine {
    /// The rows of each image the turn prefills: encoded (and stored in the image cache when
    /// the session uses it) or taken from the cache.
    pub(super) fn image_steps(&self, input: &PreparedRequest) -> Result<Vec<EncodedImage>> {
        input.images.iter().map(|i| self.image_step(i)).collect()
    }

    fn image_step(&self, image: &TurnImage) -> Result<EncodedImage> {
        match &image.step {
            ImageStep::Cached(projected) => Ok(EncodedImage {
                embeddings: projected.embeddings.clone(),
                kept: projected.kept.clone(),
                packed: projected.packed.clone(),
            }),
            ImageStep::Encode { pixels, key } => {
                let encoded = match &image.anyres {
                    Some(anyres) => self.encode_anyres_image(pixels, anyres)?,
                    None => self.encode_image(pixels, &image.plan)?,
                };
                if let (Some(key), Ok(mut cache)) = (key, self.image_cache.lock()) {
                    let projected = ProjectedImage {
                        embeddings: encoded.embeddings.clone(),
                        kept: encoded.kept.clone(),
                        packed: encoded.packed.clone(),
                    };
                    cache.insert(*key, projected);
                }
                Ok(encoded)
            }
        }
    }

    /// The image pass's buffers for `n1` visual tokens.
    pub(super) fn image_buffers(&self, n1: usize) -> Result<ImageBuffers> {
        let gpu = &self.gpu;
        let (dv, dt) = (self.config.vision.hidden_size, self.config.text.hidden_size);
        Ok(ImageBuffers {
            tower: self.vision.buffers(gpu)?,
            features: Tensor::empty(gpu, &[n1, dv], DType::F32, "image.features")?,
            scratch: Projector::scratch(gpu, n1, dt)?,
            embeddings: Tensor::empty(gpu, &[n1, dt], DType::F32, "image.embeddings")?,
        })
    }

    /// The buffers a before-projector selection of `n1` patches needs.
    pub(super) fn stage1_buffers(&self, n1: usize) -> Result<Stage1Buffers> {
        let (partials, scores) =
            attention::score_buffers(&self.gpu, &self.vision.attention_shape())?;
        let segment = self.patch_segment();
        let rows = Tensor::empty(
            &self.gpu,
            &[segment.kept_rows(n1)],
            DType::U32,
            "stage1.rows",
        )?;
        Ok(Stage1Buffers {
            partials,
            scores,
            rows,
        })
    }

    /// The patch rows of the encoder output, after CLS.
    fn patch_segment(&self) -> Segment {
        Segment {
            total: self.vision.tokens(),
            start: 1,
            len: self.config.image_tokens(),
        }
    }

    /// Run the vision tower, apply the plan's before-projector selection and the projector.
    pub(super) fn encode_image(&self, pixels: &[f32], plan: &Plan) -> Result<EncodedImage> {
        let b = self.image_buffers(plan.n1())?;
        let mut rec = Recorder::new(&self.gpu);
        rec.set_stage("vision");
        let kept = match plan.before_projector {
            None => {
                self.all_patch_features(&mut rec, &b, pixels)?;
                None
            }
            Some(selection) => {
                let kept = self.selected_patch_features(
                    &mut rec,
                    (&b.tower, &b.features),
                    pixels,
                    (plan.n0, plan.merge),
                    selection,
                )?;
                Some(kept)
            }
        };
        // An adaptive stage 1 may keep fewer rows than the buffers hold: project only those.
        let n1 = kept.as_ref().map_or(plan.n1(), Vec::len);
        let rows = |t: &Tensor| t.view(&[n1, t.shape[1]]);
        let embeddings = rows(&b.embeddings)?;
        rec.set_stage("projector");
        self.projector.forward(
            &mut rec,
            &rows(&b.features)?,
            &rows(&b.scratch)?,
            &embeddings,
        )?;
        rec.finish("vision")?;
        Ok(EncodedImage {
            embeddings,
            kept,
            packed: None,
        })
    }

    /// Unpruned: every patch row of the encoder output becomes a feature row.
    fn all_patch_features(
        &self,
        rec: &mut Recorder,
        b: &ImageBuffers,
        pixels: &[f32],
    ) -> Result<()> {
        let dv = self.config.vision.hidden_size;
        // Rows of the encoder output that become image features: patches after CLS, or all.
        let skip = match self.config.vision_feature_select_strategy {
            FeatureSelect::Default => 1,
            FeatureSelect::Full => 0,
        };
        let n0 = self.config.image_tokens();
        self.vision.forward(rec, &b.tower, pixels, None)?;
        let row_bytes = (dv * 4) as u64;
        rec.copy(
            &b.tower.hidden.buffer,
            skip as u64 * row_bytes,
            &b.features.buffer,
            0,
            n0 as u64 * row_bytes,
        );
        Ok(())
    }

    /// Pruned before the projector: run `tower` with the scores `selection` needs, choose the
    /// kept patches and gather their rows into `features`. Returns the kept patch indices
    /// (ascending).
    pub(super) fn selected_patch_features(
        &self,
        rec: &mut Recorder,
        (tower, features): (&ClipBuffers, &Tensor),
        pixels: &[f32],
        (n0, merge): (usize, bool),
        selection: BeforeProjector,
    ) -> Result<Vec<usize>> {
        if self.config.vision_feature_select_strategy != FeatureSelect::Default {
            return Err(Error::argument(
                "prune.method",
                "visual-token pruning needs vision_feature_select_strategy \"default\" (CLS is never a visual token)",
            ));
        }
        let tokens = self.vision.tokens();
        let s1 = self.stage1_buffers(features.shape[0])?;
        // Which query rows score the patches: all of them (STAR's default), or the CLS row
        // only (FasterVLM, VisPruner's default).
        let all_queries = matches!(
            selection,
            BeforeProjector::TopK {
                score: Stage1Score::Attention,
                ..
            } | BeforeProjector::VisPruner {
                score: Stage1Score::Attention,
                ..
            }
        );
        let out = ScoreOutput {
            q_start: 0,
            q_end: if all_queries { tokens } else { 1 },
            partials: &s1.partials,
            scores: &s1.scores,
        };
        let needs_scores = !matches!(selection, BeforeProjector::Random { .. });
        self.vision
            .forward(rec, tower, pixels, needs_scores.then_some(out))?;
        rec.set_stage("stage 1");
        self.select_and_gather(rec, (tower, features), &s1, (n0, merge), selection)
    }

    /// Choose the kept patches (top-k on the GPU, or VisPruner / random on the host) and gather
    /// their encoder rows into `features`, or, with `merge`, each kept row's group mean.
    fn select_and_gather(
        &self,
        rec: &mut Recorder,
        (tower, features): (&ClipBuffers, &Tensor),
        s1: &Stage1Buffers,
        (n0, merge): (usize, bool),
        selection: BeforeProjector,
    ) -> Result<Vec<usize>> {
        let gpu = &self.gpu;
        // Row list into the encoder output: [CLS, 1 + kept...]; the gather skips CLS.
        let segment = self.patch_segment();
        let (scores, rows) = (&s1.scores, &s1.rows);
        let hidden = &tower.hidden;
        // The patch rows' similarities, when the selection or the merge needs them.
        let mut gram = None;
        let kept = match selection {
            BeforeProjector::TopK {
                keep,
                adaptive: Some(adaptive),
                ..
            } => {
                // The share is known once the scores are: read them back and choose here.
                rec.submit();
                let patch_scores = &gpu.read_f32(scores)?[1..=n0];
                crate::prune::smallest_mass_set(patch_scores, adaptive.mass, adaptive.floor, keep)
            }
            BeforeProjector::TopK { keep, .. } => {
                rec.dispatch_all(topk::select(gpu, scores, 1, segment, keep, rows)?);
                // Without a merge the GPU's list gathers the rows at once.
                if !merge {
                    rec.dispatch(topk::gather_rows(gpu, hidden, rows, 1, keep, features)?);
                }
                rec.submit();
                let list = gpu.read_u32(rows)?;
                let kept: Vec<usize> = list[1..].iter().map(|&r| r as usize - 1).collect();
                match merge {
                    true => kept,
                    false => return Ok(kept),
                }
            }
            BeforeProjector::VisPruner {
                keep,
                important_ratio,
                ..
            } => {
                // The important half's ranking (CLS's attention, or every query's) and the
                // patch rows' similarities, computed on the GPU.
                let similarities = gram.insert(self.gram(rec, hidden, 1, n0, "VisPruner")?);
                let ranking = gpu.read_f32(scores)?;
                vispruner::select(&ranking[1..=n0], similarities, keep, important_ratio)
            }
            BeforeProjector::Random { keep, seed } => {
                crate::prune::random_selection(n0, keep, seed)
            }
        };
        if merge {
            let gram = match gram {
                Some(gram) => gram,
                None => self.gram(rec, hidden, 1, n0, "merging")?,
            };
            self.merge_dropped(rec, hidden, (&gram, n0), &kept, features)?;
            return Ok(kept);
        }
        let list: Vec<u32> = std::iter::once(0)
            .chain(kept.iter().map(|&i| i as u32 + 1))
            .collect();
        rows.write_u32(gpu, &list)?;
        rec.dispatch(topk::gather_rows(
            gpu,
            hidden,
            rows,
            1,
            kept.len(),
            features,
        )?);
        Ok(kept)
    }

    /// `--merge`: each kept patch's feature row becomes the mean of its own encoder row and
    /// those of the dropped patches most similar to it (`prune::merge::groups`; encoder row =
    /// patch + 1, after CLS).
    fn merge_dropped(
        &self,
        rec: &mut Recorder,
        hidden: &Tensor,
        (gram, n0): (&[f32], usize),
        kept: &[usize],
        features: &Tensor,
    ) -> Result<()> {
        let mut groups = merge::groups(gram, n0, kept);
        for row in groups.iter_mut().flatten() {
            *row += 1;
        }
        let list = gpu_merge::group_list(&groups)?;
        let list = Tensor::from_u32(&self.gpu, &[list.len()], &list, "merge.groups")?;
        rec.dispatch(gpu_merge::merge_rows(
            &self.gpu,
            hidden,
            &list,
            kept.len(),
            features,
        )?);
        Ok(())
    }
}

impl Engine {
    /// After the image passes, the prompt keeps only the rows each new image filled: a
    /// LLaVA-NeXT prompt was tokenized with every packed row (`images[i].packed` holds the
    /// rows the pass kept), a LLaVA-1.5 prompt with an adaptive stage 1's cap (`images[i].kept`
    /// holds what it kept). Each image's plan is restated over its rows.
    pub(super) fn fit_images(
        &self,
        input: &mut PreparedRequest,
        images: &[EncodedImage],
        settings: &TurnSettings,
    ) -> Result<()> {
        let dt = self.config.text.hidden_size;
        for (image, encoded) in input.images.iter_mut().zip(images) {
            let span = input.prompt.images[image.index];
            let rows = match (image.anyres.as_mut(), &encoded.packed, &encoded.kept) {
                (Some(anyres), Some(packed), _) => {
                    anyres.packed = packed.clone();
                    image.plan = anyres.row_plan(&image.plan);
                    packed.len()
                }
                (None, None, Some(kept)) if kept.len() < span.len => {
                    image.plan = image.plan.with_stage1_kept(kept.len());
                    kept.len()
                }
                _ => continue,
            };
            let dropped = span.len - rows;
            input.prompt.shrink_image(image.index, rows);
            // Embeddings start at the first new row; image rows are zero until the GPU fills
            // them.
            let end = span.end() - input.reused;
            input.embeddings.drain((end - dropped) * dt..end * dt);
        }
        self.set_limits(input, settings, true)
    }
}
