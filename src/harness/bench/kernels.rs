//! `llava-wgpu bench kernels`: throughput of the kernel families on the chosen adapter, each as
//! a fraction of the ceiling that bounds it (`ceilings.rs`), measured in the same run on the
//! same GPU timestamps. GFLOP/s and GB/s come from each launcher's analytic flop and byte
//! counts, not from counters.

use std::time::Duration;

use serde::Serialize;

use super::{random, time_dispatches, Bound, Ceilings};
use crate::error::{Error, Result};
use crate::gpu::kernels::attention::{self, AttentionLayout};
use crate::gpu::kernels::linear::matmul::MatmulLayout;
use crate::gpu::kernels::linear::{gemv, matmul};
use crate::gpu::kernels::norm::{self, NormLayout};
use crate::gpu::kernels::{activation, copy, rope, topk, Dispatch};
use crate::gpu::{DType, Gpu, Tensor, Weight, WeightFormat};
use crate::harness::roofline::{Roofline, RooflinePoint};
use crate::quant;

#[derive(Clone, Debug, Serialize)]
pub struct KernelResult {
    pub kernel: String,
    pub shape: String,
    pub median_ms: f64,
    pub gflops: f64,
    pub gbytes_per_s: f64,
    /// The ceiling its analytic intensity puts it under.
    pub bound: Bound,
    /// GFLOP/s over the f32 FMA ceiling (arithmetic bound) or GB/s over the copy ceiling.
    pub of_ceiling: f64,
    /// For quantized-weight cases: this median time over the f16 case's at the same shape in
    /// the same run (below 1 is faster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_vs_f16: Option<f64>,
    /// For the lanes layouts (matmul, attention, norms): this median time over the tiled (for the
    /// norms, workgroup) layout's at the same shape and inputs in the same run (below 1 is
    /// faster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_vs_tiled: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct KernelReport {
    pub adapter: String,
    pub backend: String,
    pub repeats: usize,
    pub ceilings: Ceilings,
    pub results: Vec<KernelResult>,
}

impl KernelReport {
    /// Every case on a roofline of the run's ceilings (`bench kernels --roofline`).
    pub fn roofline(&self, adapter: &str) -> Roofline {
        let points = self
            .results
            .iter()
            .map(|r| {
                let seconds = r.median_ms / 1e3;
                RooflinePoint {
                    name: format!("{} {}", r.kernel, r.shape),
                    flops: r.gflops * 1e9 * seconds,
                    bytes: r.gbytes_per_s * 1e9 * seconds,
                    seconds,
                }
            })
            .collect();
        Roofline {
            title: format!("bench kernels on {adapter}"),
            fma_gflops: self.ceilings.fma_f32_gflops,
            copy_gbytes_per_s: self.ceilings.copy_gbytes_per_s,
            points,
        }
    }
}

fn row(r: &KernelResult) -> String {
    let ratio = |x: Option<f64>| x.map_or(format!(" {:>10}", ""), |x| format!(" {x:>9.2}x"));
    format!(
        "{:<22} {:<24} {:>11.3} {:>9.2} {:>8.2} {:>10} {:>8.1}%{}{}",
        r.kernel,
        r.shape,
        r.median_ms,
        r.gflops,
        r.gbytes_per_s,
        bound_name(r.bound),
        100.0 * r.of_ceiling,
        ratio(r.time_vs_f16),
        ratio(r.time_vs_tiled),
    )
    .trim_end()
    .to_string()
}

/// How tables name a bound.
pub fn bound_name(bound: Bound) -> &'static str {
    match bound {
        Bound::Arithmetic => "FMA f32",
        Bound::Bandwidth => "copy",
    }
}

fn measure(
    name: &str,
    dispatches: &[Dispatch],
    time: Duration,
    ceilings: &Ceilings,
) -> KernelResult {
    let flops: u64 = dispatches.iter().map(|d| d.flops).sum();
    let bytes: u64 = dispatches.iter().map(|d| d.bytes).sum();
    let secs = time.as_secs_f64();
    let (gflops, gbs) = (flops as f64 / secs / 1e9, bytes as f64 / secs / 1e9);
    let bound = ceilings.bound(flops as f64, bytes as f64);
    KernelResult {
        kernel: name.to_string(),
        shape: dispatches
            .first()
            .map(|d| d.shape.clone())
            .unwrap_or_default(),
        median_ms: secs * 1e3,
        gflops,
        gbytes_per_s: gbs,
        bound,
        of_ceiling: ceilings.fraction(bound, gflops, gbs),
        time_vs_f16: None,
        time_vs_tiled: None,
    }
}

/// The cases timed so far, each measured against the ceiling that bounds it.
struct Suite<'a> {
    gpu: &'a Gpu,
    repeats: usize,
    ceilings: Ceilings,
    results: Vec<KernelResult>,
}

impl Suite<'_> {
    /// Time `dispatches`, print the row on stderr as it comes, and keep it.
    fn time(&mut self, name: &str, dispatches: &[Dispatch]) -> Result<&mut KernelResult> {
        let t = time_dispatches(self.gpu, dispatches, self.repeats)?;
        let r = measure(name, dispatches, t, &self.ceilings);
        eprintln!("    {}", row(&r));
        self.results.push(r);
        Ok(self.results.last_mut().expect("just pushed"))
    }

    /// The f16 matmul at LLaVA-like widths for one row (decode), 64 rows and a CLIP image's 577,
    /// with the GEMV next to the one-row case.
    fn matmul_and_gemv(&mut self, progress: &mut dyn FnMut(&str)) -> Result<()> {
        let gpu = self.gpu;
        for (n, k) in [(1024usize, 1024usize), (4096, 1024)] {
            let w_values = random(n * k, (n + k) as u64);
            let w16 = Weight::from_f32(gpu, "w", n, k, &w_values, WeightFormat::F16)?;
            for m in [1usize, 64, 577] {
                let x = Tensor::from_f32(gpu, &[m, k], &random(m * k, m as u64), "x")?;
                let y = Tensor::empty(gpu, &[m, n], DType::F32, "y")?;
                if m == 1 {
                    progress(&format!("matmul M={m} N={n} K={k}"));
                    let d = matmul::matmul(gpu, &x, &w16, &y, false)?;
                    self.time(d[0].kernel, &d)?;
                    progress(&format!("gemv N={n} K={k}"));
                    let d = gemv::gemv(gpu, &x, 0, &w16, &y, 0, false)?;
                    self.time(d[0].kernel, &d)?;
                } else {
                    self.both_layouts(&x, &w16, &y, progress)?;
                }
            }
        }
        Ok(())
    }

    /// ggml's own perf shape (peer-bench.md: W 4096×4096 f16, 512 columns) for a direct
    /// comparison.
    fn ggml_matmul(&mut self, progress: &mut dyn FnMut(&str)) -> Result<()> {
        let gpu = self.gpu;
        let (m, n, k) = (512usize, 4096usize, 4096usize);
        let w = Weight::from_f32(gpu, "w", n, k, &random(n * k, 5), WeightFormat::F16)?;
        let x = Tensor::from_f32(gpu, &[m, k], &random(m * k, 6), "x")?;
        let y = Tensor::empty(gpu, &[m, n], DType::F32, "y")?;
        self.both_layouts(&x, &w, &y, progress)
    }

    /// `x · wᵀ` with the tiled layout, then the lanes layout with its time relative to tiled.
    fn both_layouts(
        &mut self,
        x: &Tensor,
        w: &Weight,
        y: &Tensor,
        progress: &mut dyn FnMut(&str),
    ) -> Result<()> {
        let (m, n, k) = (x.rows_cols().0, w.n, w.k);
        let mut tiled_ms = None;
        for layout in [MatmulLayout::Tiled, MatmulLayout::Lanes] {
            progress(&format!("matmul ({layout:?}) M={m} N={n} K={k}"));
            let d = matmul::matmul_in(self.gpu, layout, x, w, y, false)?;
            let r = self.time(d[0].kernel, &d)?;
            match tiled_ms {
                None => tiled_ms = Some(r.median_ms),
                Some(base) => r.time_vs_tiled = Some(r.median_ms / base),
            }
        }
        Ok(())
    }

    /// The decode GEMV of a 7B model's MLP (f16 weights, 4096 → 11008) and of its attention
    /// projections (4096 → 4096): memory bound, compare GB/s with the copy bandwidth.
    fn decode_gemv(&mut self, progress: &mut dyn FnMut(&str)) -> Result<()> {
        let gpu = self.gpu;
        for (n, k) in [(4096usize, 4096usize), (11008, 4096)] {
            let w = Weight::from_f32(gpu, "w", n, k, &random(n * k, 7), WeightFormat::F16)?;
            let x = Tensor::from_f32(gpu, &[1, k], &random(k, 3), "x")?;
            let y = Tensor::empty(gpu, &[1, n], DType::F32, "y")?;
            progress(&format!("gemv N={n} K={k}"));
            let d = gemv::gemv(gpu, &x, 0, &w, &y, 0, false)?;
            self.time(d[0].kernel, &d)?;
        }
        Ok(())
    }

    /// The 7B model's linear layers with f16 and each of [`BENCH_FORMATS`]' block formats of the same values, for
    /// each of `rows`: 1 is the decode GEMV, more the prefill matmul (577 rows, a CLIP-L/336
    /// image's worth). Shapes: the attention projections (4096 → 4096), the MLP up
    /// (4096 → 11008) and down (11008 → 4096); each quantized row with its time relative to f16.
    /// The GEMV also runs at the `small` preset's widths (512 → 512, 512 → 1408, 1408 → 512),
    /// where a row is only 16 or 44 blocks long.
    fn quantized_linear(&mut self, rows: &[usize], progress: &mut dyn FnMut(&str)) -> Result<()> {
        const SEVEN_B: [(usize, usize); 3] = [(4096, 4096), (11008, 4096), (4096, 11008)];
        const SMALL: [(usize, usize); 3] = [(512, 512), (1408, 512), (512, 1408)];
        if rows.contains(&1) {
            self.quantized_shapes(&SMALL, &[1], progress)?;
        }
        self.quantized_shapes(&SEVEN_B, rows, progress)
    }

    /// Weights of each (n, k) of `shapes` in every [`BENCH_FORMATS`] format, times `rows` rows each.
    fn quantized_shapes(
        &mut self,
        shapes: &[(usize, usize)],
        rows: &[usize],
        progress: &mut dyn FnMut(&str),
    ) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let gpu = self.gpu;
        for &(n, k) in shapes {
            let values = random(n * k, (3 * n + k) as u64);
            let weights = BENCH_FORMATS
                .into_iter()
                .filter(|f| k.is_multiple_of(f.block_weights()))
                .map(|format| bench_weight(gpu, n, k, &values, format))
                .collect::<Result<Vec<_>>>()?;
            for &m in rows {
                let x = Tensor::from_f32(gpu, &[m, k], &random(m * k, m as u64), "x")?;
                let y = Tensor::empty(gpu, &[m, n], DType::F32, "y")?;
                let mut f16_ms = None;
                for w in &weights {
                    let format = w.format_label();
                    let d = if m == 1 {
                        progress(&format!("gemv {format} N={n} K={k}"));
                        gemv::gemv(gpu, &x, 0, w, &y, 0, false)?
                    } else {
                        progress(&format!("matmul {format} M={m} N={n} K={k}"));
                        matmul::matmul(gpu, &x, w, &y, false)?
                    };
                    let r = self.time(d[0].kernel, &d)?;
                    match f16_ms {
                        None => f16_ms = Some(r.median_ms),
                        Some(base) => r.time_vs_f16 = Some(r.median_ms / base),
                    }
                }
            }
        }
        Ok(())
    }

    /// The fused attention at three shapes, in both layouts (tiled, then lanes with its time
    /// relative to tiled), without and with the pruning scores accumulated on the side:
    /// - CLIP ViT-L/14-336 (577 tokens, 16 heads of 64, bidirectional; stage 1 scores every row);
    /// - the 7B decoder's prefill (600 tokens, 32 heads of 128, causal; stage 2 scores the 24
    ///   text rows after the image);
    /// - a LLaVA-NeXT-sized prefill (2,900 tokens of 128, causal; the 20 rows after the image),
    ///   with 4 of the 32 heads: every head is the same work, and all 32 would take a minute a
    ///   run on a CPU driver.
    fn attention(&mut self, progress: &mut dyn FnMut(&str)) -> Result<()> {
        let cases = [
            ("T=577 H=16 D=64", 577, 16, 64, false, 0),
            ("T=600 H=32 D=128 causal", 600, 32, 128, true, 576),
            ("T=2900 H=4 D=128 causal", 2900, 4, 128, true, 2880),
        ];
        for (label, t, heads, head_dim, causal, score_from) in cases {
            let shape = attention::AttentionShape {
                q_rows: t,
                kv_rows: t,
                heads,
                kv_heads: heads,
                head_dim,
                causal,
            };
            let tensor = |seed, name| {
                Tensor::from_f32(
                    self.gpu,
                    &[t, heads * head_dim],
                    &random(t * heads * head_dim, seed),
                    name,
                )
            };
            let (q, k, v) = (tensor(11, "q")?, tensor(12, "k")?, tensor(13, "v")?);
            let o = Tensor::empty(self.gpu, &[t, heads * head_dim], DType::F32, "o")?;
            let (partials, scores) = attention::score_buffers(self.gpu, &shape)?;
            for scored in [false, true] {
                let mut tiled_ms = None;
                for layout in [AttentionLayout::Tiled, AttentionLayout::Lanes] {
                    let name = match (layout, scored) {
                        (AttentionLayout::Tiled, false) => "attention_tiled",
                        (AttentionLayout::Tiled, true) => "attention_tiled+scores",
                        (AttentionLayout::Lanes, false) => "attention_lanes",
                        (AttentionLayout::Lanes, true) => "attention_lanes+scores",
                    };
                    progress(&format!("{name} {label}"));
                    let out = scored.then_some(attention::ScoreOutput {
                        q_start: score_from,
                        q_end: t,
                        partials: &partials,
                        scores: &scores,
                    });
                    let scale = attention::default_scale(head_dim);
                    let d = attention::attention_in(
                        self.gpu,
                        layout,
                        &shape,
                        scale,
                        [&q, &k, &v, &o],
                        out,
                    )?;
                    let r = self.time(name, &d)?;
                    r.shape = label.into();
                    match tiled_ms {
                        None => tiled_ms = Some(r.median_ms),
                        Some(base) => r.time_vs_tiled = Some(r.median_ms / base),
                    }
                }
            }
        }
        Ok(())
    }
}

impl Suite<'_> {
    /// The row kernels at the README demo's shapes and at 7B's (CLIP-L for the vision ones):
    /// both norm layouts (the lanes one with its time relative to the workgroup one), RoPE, the
    /// activations and the row gather of a pruning stage. All bandwidth bound.
    /// First the launch floor: a copy of 4 floats, the time any dispatch costs on this driver,
    /// which bounds the rate of the demo's small rows.
    fn row_kernels(&mut self, progress: &mut dyn FnMut(&str)) -> Result<()> {
        progress("launch floor: copy of 4 floats");
        let (src, dst) = (self.tensor(1, 4, 20)?, self.tensor(1, 4, 0)?);
        let d = copy::copy(self.gpu, &src, &dst)?;
        self.time_row("launch_floor", "copy", &[d])?;
        for (label, rows, cols) in [("demo", 197, 192), ("CLIP-L", 577, 1024)] {
            self.norm_both_layouts(label, "layer_norm", rows, cols, progress)?;
        }
        for (label, rows, cols) in [("demo", 80, 256), ("7B", 600, 4096)] {
            self.norm_both_layouts(label, "rms_norm", rows, cols, progress)?;
        }
        for (label, rows, heads, head_dim) in [("demo", 80, 8, 32), ("7B", 600, 32, 128)] {
            progress(&format!("rope {label}"));
            let gpu = self.gpu;
            let x = self.tensor(rows, heads * head_dim, 21)?;
            let positions: Vec<u32> = (0..rows as u32).collect();
            let positions = Tensor::from_u32(gpu, &[rows], &positions, "positions")?;
            let table = rope::RopeTable::new(gpu, 10000.0, head_dim, rows)?;
            let d = rope::rope(gpu, &x, heads, &positions, &table)?;
            self.time_row("rope", label, &[d])?;
        }
        for (label, rows, width) in [("demo", 80, 704), ("7B", 600, 11008)] {
            progress(&format!("silu_mul {label}"));
            let (gate_up, out) = (
                self.tensor(rows, 2 * width, 22)?,
                self.tensor(rows, width, 0)?,
            );
            let d = activation::silu_mul(self.gpu, &gate_up, &out)?;
            self.time_row("silu_mul", label, &[d])?;
        }
        for (label, rows, width) in [("demo", 197, 768), ("CLIP-L", 577, 4096)] {
            progress(&format!("quick_gelu {label}"));
            let x = self.tensor(rows, width, 23)?;
            let d = activation::activate(self.gpu, activation::Activation::QuickGelu, &x)?;
            self.time_row("quick_gelu", label, &[d])?;
        }
        self.top_k(progress)?;
        for (label, rows, kept, width) in [("demo", 64, 16, 256), ("7B", 576, 144, 4096)] {
            progress(&format!("gather_rows {label}"));
            let src = self.tensor(rows, width, 24)?;
            let dst = self.tensor(kept, width, 0)?;
            let idx: Vec<u32> = (0..kept as u32).map(|i| i * 4).collect();
            let idx = Tensor::from_u32(self.gpu, &[kept], &idx, "idx")?;
            let d = topk::gather_rows(self.gpu, &src, &idx, 0, kept, &dst)?;
            self.time_row("gather_rows", label, &[d])?;
        }
        Ok(())
    }

    /// Stage 1's top-k at the demo's 196 patches and CLIP-L's 576, and over LLaVA-NeXT's 2,880
    /// patch rows, in every layout (lanes and multi-workgroup with their time relative to the
    /// workgroup's), next to one pass over the same scores (a copy) to compare with.
    fn top_k(&mut self, progress: &mut dyn FnMut(&str)) -> Result<()> {
        for (label, n, k) in [
            ("demo", 196usize, 176usize),
            ("CLIP-L", 576, 518),
            ("NeXT", 2880, 320),
        ] {
            let scores = self.tensor(1, n.next_multiple_of(4), 28)?;
            let out = Tensor::empty(self.gpu, &[n], DType::U32, "keep")?;
            progress(&format!("one pass over {n} scores"));
            let pass = copy::copy(
                self.gpu,
                &scores,
                &self.tensor(1, n.next_multiple_of(4), 0)?,
            )?;
            self.time_row("scores_pass", label, &[pass])?;
            let mut workgroup_ms = None;
            for (layout, name) in [
                (topk::SelectLayout::Workgroup, "topk_select"),
                (topk::SelectLayout::Lanes, "topk_select_lanes"),
                (topk::SelectLayout::Multi, "topk_select_multi"),
            ] {
                progress(&format!("topk_select ({layout:?}) n={n}"));
                let segment = topk::Segment::whole(n);
                let d = topk::select_in(self.gpu, layout, &scores, 0, segment, k, &out)?;
                let r = self.time_row(name, label, &d)?;
                match workgroup_ms {
                    None => workgroup_ms = Some(r.median_ms),
                    Some(base) => r.time_vs_tiled = Some(r.median_ms / base),
                }
            }
        }
        Ok(())
    }

    fn tensor(&self, rows: usize, cols: usize, seed: u64) -> Result<Tensor> {
        Tensor::from_f32(self.gpu, &[rows, cols], &random(rows * cols, seed), "bench")
    }

    /// Time `dispatches` and label the row with the shape's origin.
    fn time_row(&mut self, name: &str, label: &str, d: &[Dispatch]) -> Result<&mut KernelResult> {
        let r = self.time(name, d)?;
        r.shape = format!("{label} {}", r.shape);
        Ok(r)
    }

    fn norm_both_layouts(
        &mut self,
        label: &str,
        op: &str,
        rows: usize,
        cols: usize,
        progress: &mut dyn FnMut(&str),
    ) -> Result<()> {
        let gpu = self.gpu;
        let x = self.tensor(rows, cols, 25)?;
        let (gamma, beta) = (self.tensor(1, cols, 26)?, self.tensor(1, cols, 27)?);
        let y = self.tensor(rows, cols, 0)?;
        let mut workgroup_ms = None;
        for layout in [NormLayout::Workgroup, NormLayout::Lanes] {
            progress(&format!("{op} ({layout:?}) {label}"));
            let d = if op == "layer_norm" {
                norm::layer_norm_in(gpu, layout, &x, &gamma, &beta, &y, 1e-5)?
            } else {
                norm::rms_norm_in(gpu, layout, &x, &gamma, &y, 1e-6)?
            };
            let r = self.time_row(d.kernel, label, &[d])?;
            match workgroup_ms {
                None => workgroup_ms = Some(r.median_ms),
                Some(base) => r.time_vs_tiled = Some(r.median_ms / base),
            }
        }
        Ok(())
    }
}

/// The suite's sections, in the order they run: `bench kernels --only NAME` picks some.
pub const SECTIONS: [&str; 7] = [
    "matmul",
    "ggml",
    "decode",
    "attention",
    "rows",
    "quantized-gemv",
    "quantized-matmul",
];

/// Run the kernel benchmark suite.
pub fn kernels(gpu: &Gpu, repeats: usize, progress: impl FnMut(&str)) -> Result<KernelReport> {
    kernel_sections(gpu, repeats, &SECTIONS, progress)
}

/// Run the named [`SECTIONS`] of the suite (the copy bandwidth is always measured).
pub fn kernel_sections(
    gpu: &Gpu,
    repeats: usize,
    sections: &[&str],
    mut progress: impl FnMut(&str),
) -> Result<KernelReport> {
    if let Some(bad) = sections.iter().find(|s| !SECTIONS.contains(s)) {
        return Err(Error::argument(
            "sections",
            format!("'{bad}' is not one of {}", SECTIONS.join(", ")),
        ));
    }
    if repeats == 0 {
        return Err(Error::argument(
            "repeats",
            "must be at least 1: the report gives the median of the timed runs",
        ));
    }
    progress("ceilings: FMA throughput and copy bandwidth");
    let ceilings = Ceilings::measure(gpu, repeats)?;
    let mut suite = Suite {
        gpu,
        repeats,
        ceilings,
        results: Vec::new(),
    };
    let run = |name: &str| sections.contains(&name);
    if run("matmul") {
        suite.matmul_and_gemv(&mut progress)?;
    }
    if run("ggml") {
        suite.ggml_matmul(&mut progress)?;
    }
    if run("decode") {
        suite.decode_gemv(&mut progress)?;
    }
    if run("attention") {
        suite.attention(&mut progress)?;
    }
    if run("rows") {
        suite.row_kernels(&mut progress)?;
    }
    let mut quantized_rows = Vec::new();
    if run("quantized-gemv") {
        quantized_rows.push(1);
    }
    if run("quantized-matmul") {
        quantized_rows.push(577);
    }
    suite.quantized_linear(&quantized_rows, &mut progress)?;
    Ok(KernelReport {
        adapter: gpu.describe(),
        backend: format!("{:?}", gpu.info.backend),
        repeats,
        ceilings: suite.ceilings,
        results: suite.results,
    })
}

impl KernelReport {
    /// The table `bench kernels` prints.
    pub fn table(&self) -> String {
        let mut out = format!(
            "adapter: {}\n{}\nmedians of {} runs\n\n",
            self.adapter,
            self.ceilings.describe(),
            self.repeats
        );
        out.push_str(&format!(
            "{:<22} {:<24} {:>11} {:>9} {:>8} {:>10} {:>9} {:>10} {:>10}\n",
            "kernel",
            "shape",
            "median ms",
            "GFLOP/s",
            "GB/s",
            "bound",
            "% of it",
            "time/f16",
            "time/tiled"
        ));
        for r in &self.results {
            out.push_str(&row(r));
            out.push('\n');
        }
        out
    }
}

/// The formats the quantized rows compare with f16 (the first): the engine's own Q8_0 and
/// Q4_0, and the K-quants of llama.cpp's Q4_K_M and Q5_K_M files.
const BENCH_FORMATS: [WeightFormat; 6] = [
    WeightFormat::F16,
    WeightFormat::Q8_0,
    WeightFormat::Q4_0,
    WeightFormat::Q4_K,
    WeightFormat::Q5_K,
    WeightFormat::Q6_K,
];

/// A benchmark weight in `format` (quantized formats go through the host quantizer).
fn bench_weight(
    gpu: &Gpu,
    n: usize,
    k: usize,
    values: &[f32],
    format: WeightFormat,
) -> Result<Weight> {
    if format.is_quantized() {
        let blocks = quant::quantize(format, values)?;
        Weight::from_blocks(gpu, "w", n, k, format, &blocks)
    } else {
        Weight::from_f32(gpu, "w", n, k, values, format)
    }
}
