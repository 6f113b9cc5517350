//! LLaVA-NeXT's anyres preprocessing against what transformers' LlavaNextImageProcessor (Pillow
//! backend) and processor recorded for the fixture images: the selected pinpoint, the crop grid,
//! the unpadded grid, the number of image tokens and every view's pixels.

mod next_fixture;

use llava_wgpu::model::config::LlavaConfig;
use llava_wgpu::vision::anyres::{AnyresLayout, PackedToken};
use llava_wgpu::vision::{load_image, ImageProcessorConfig};

/// As in tests/preprocess.rs: identical 8-bit pixels, f64 vs f32 normalisation arithmetic.
const PIXEL_BOUND: f32 = 1e-6;

#[test]
fn layouts_and_views_match_transformers() {
    let dir = next_fixture::model_dir(next_fixture::VICUNA);
    let config = LlavaConfig::load(&dir).unwrap();
    let anyres = config.anyres.as_ref().expect("a llava_next fixture");
    let (s, p) = (config.vision.image_size, config.vision.patch_size);
    let processor = ImageProcessorConfig::load(&dir, s).unwrap();
    let cases = next_fixture::cases(next_fixture::VICUNA);
    let mut pinpoints = std::collections::BTreeSet::new();
    for case in &cases {
        let image = load_image(&case.image).unwrap();
        let hw = (image.height() as usize, image.width() as usize);
        let layout = AnyresLayout::new(hw, &anyres.grid_pinpoints, s, p);
        let label = format!("case {} ({}x{})", case.index, hw.1, hw.0);
        let best = case.ints("best_resolution_hw");
        assert_eq!(layout.pinpoint_hw, (best[0], best[1]), "{label}: pinpoint");
        let crops = case.ints("crop_grid_rows_cols");
        assert_eq!(layout.crops, (crops[0], crops[1]), "{label}: crop grid");
        let (rows, cols) = (case.ints("unpadded_rows"), case.ints("unpadded_cols"));
        assert_eq!(layout.rows, rows[0]..rows[1], "{label}: unpadded rows");
        assert_eq!(layout.cols, cols[0]..cols[1], "{label}: unpadded columns");
        assert_eq!(layout.visual_tokens(), case.int("visual_tokens"), "{label}");
        assert_eq!(layout.image_tokens(), case.int("image_tokens"), "{label}");
        let image_id = 659;
        let placeholders = case.input_ids.iter().filter(|&&id| id == image_id).count();
        assert_eq!(
            layout.image_tokens(),
            placeholders,
            "{label}: prompt placeholders"
        );
        pinpoints.insert(layout.pinpoint_hw);

        let want = next_fixture::tensor(
            next_fixture::VICUNA,
            &format!("case{}.pixel_values", case.index),
        );
        let views = processor
            .anyres_views(&image, &case.image, &layout)
            .unwrap();
        assert_eq!(views.len(), layout.views(), "{label}: views");
        let got: Vec<f32> = views.concat();
        assert_eq!(got.len(), want.len(), "{label}: pixel count");
        for (v, (g, w)) in got
            .chunks(3 * s * s)
            .zip(want.chunks(3 * s * s))
            .enumerate()
        {
            let worst = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= PIXEL_BOUND, "{label} view {v}: max |Δ| = {worst}");
        }
    }
    assert!(
        pinpoints.len() >= 4,
        "the fixture should exercise four pinpoints: {pinpoints:?}"
    );
}

/// STAR stage 1 on NeXT selects per view on the full grid, then packs like the unpruned image
/// (docs/pruning.md): the kept sets recorded by the fixture script are the CPU top-k of
/// transformers' CLIP attention scores, and `packed_kept` arranges the recorded per-view
/// projector rows and image_newline exactly as the script's independent packing did.
#[test]
fn a_per_view_selection_packs_like_the_reference() {
    use llava_wgpu::prune::top_k;
    let variant = next_fixture::VICUNA;
    let dir = next_fixture::model_dir(variant);
    let config = LlavaConfig::load(&dir).unwrap();
    let anyres = config.anyres.as_ref().unwrap();
    let (s, p) = (config.vision.image_size, config.vision.patch_size);
    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&weights).unwrap();
    let newline: Vec<f32> =
        bytemuck::pod_collect_to_vec(st.tensor("image_newline").unwrap().data());
    let d = newline.len();
    for case in next_fixture::cases(variant) {
        let image = load_image(&case.image).unwrap();
        let hw = (image.height() as usize, image.width() as usize);
        let layout = AnyresLayout::new(hw, &anyres.grid_pinpoints, s, p);
        let per_view = layout.patches_per_view();
        let keep = case.int("stage1_keep_per_view");
        let scores = next_fixture::tensor(
            variant,
            &format!("case{}.clip_attention_scores", case.index),
        );
        let kept: Vec<Vec<usize>> = case.int_lists("stage1_kept_per_view");
        assert_eq!(kept.len(), layout.views());
        for (v, want) in kept.iter().enumerate() {
            // Row 0 of each view's scores is the CLS key, never a visual token.
            let view_scores = &scores[v * (per_view + 1) + 1..(v + 1) * (per_view + 1)];
            assert_eq!(
                &top_k(view_scores, keep),
                want,
                "case {} view {v}",
                case.index
            );
        }
        let rows = next_fixture::tensor(variant, &format!("case{}.view_features", case.index));
        let packed: Vec<f32> = layout
            .packed_kept(&kept)
            .into_iter()
            .flat_map(|token| match token {
                PackedToken::Patch { view, index } => {
                    let row = view * per_view + index;
                    rows[row * d..(row + 1) * d].to_vec()
                }
                PackedToken::Newline => newline.clone(),
            })
            .collect();
        let want = next_fixture::tensor(
            variant,
            &format!("case{}.stage1_image_features", case.index),
        );
        assert_eq!(
            packed.len() / d,
            case.int("stage1_image_tokens"),
            "case {}",
            case.index
        );
        assert!(packed == want, "case {}: packed rows differ", case.index);
    }
}
