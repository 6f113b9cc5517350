//! The launchers' shape checks on a real device: tensors of arbitrary small shapes (and dtypes)
//! handed to matmul, gemv, the norms, SiLU·mul, RoPE, argmax, the group mean, attention and the
//! ceiling kernels give a dispatch or an `Error::Shape` naming the kernel, never a panic, and
//! every consistent call is accepted. Nothing is submitted: only the checks and the dispatch building run.

use std::sync::OnceLock;

use llava_wgpu::gpu::kernels::attention::{self, AttentionShape};
use llava_wgpu::gpu::kernels::linear::{gemv, matmul};
use llava_wgpu::gpu::kernels::{activation, copy, merge, norm, rope, sample};
use llava_wgpu::gpu::{DType, Gpu, GpuOptions, Tensor, Weight, WeightFormat};
use llava_wgpu::Error;
use proptest::prelude::*;

use crate::support::cases;

fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
            let dir = std::env::temp_dir().join("llava-wgpu-runtime");
            let _ = std::fs::create_dir_all(&dir);
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
        }
        Gpu::new(GpuOptions::default()).expect("no GPU adapter: install mesa-vulkan-drivers")
    })
}

fn tensor(shape: &[usize], dtype: DType) -> Tensor {
    Tensor::empty(gpu(), shape, dtype, "t").expect("small tensor")
}

/// A consistent call gives Ok, an inconsistent one a shape error naming `op`; anything else
/// (a refusal of a good call, an accepted bad one, another error) fails the property.
fn named<T>(
    op: &str,
    result: llava_wgpu::Result<T>,
    consistent: bool,
) -> Result<(), TestCaseError> {
    match result {
        Ok(_) => {
            prop_assert!(consistent, "{op} accepted an inconsistent call");
            Ok(())
        }
        Err(Error::Shape { op: named, .. }) if named == op => {
            prop_assert!(!consistent, "{op} refused a consistent call");
            Ok(())
        }
        Err(other) => Err(TestCaseError::fail(format!("{op}: {other}"))),
    }
}

fn dim() -> impl Strategy<Value = usize> {
    1usize..9
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![4 => Just(DType::F32), 1 => Just(DType::U32)]
}

proptest! {
    #![proptest_config(cases(300))]

    #[test]
    fn matmul_and_gemv_check_their_shapes(
        (m, k, n) in (dim(), dim(), dim()),
        (m2, k2, n2) in (dim(), dim(), dim()),
        same in any::<bool>(),
        rows in (0usize..10, 0usize..10),
        f16 in any::<bool>(),
    ) {
        let (k2, m2, n2) = if same { (k, m, n) } else { (k2, m2, n2) };
        let format = if f16 { WeightFormat::F16 } else { WeightFormat::F32 };
        let w = Weight::from_f32(gpu(), "w", n, k, &vec![0.0; n * k], format).unwrap();
        let x = tensor(&[m, k2], DType::F32);
        let y = tensor(&[m2, n2], DType::F32);
        let fits = k2 == k && n2 == n;
        named("matmul", matmul::matmul(gpu(), &x, &w, &y, false), fits && m2 == m)?;
        let in_range = rows.0 < m && rows.1 < m2;
        named("gemv", gemv::gemv(gpu(), &x, rows.0, &w, &y, rows.1, true), fits && in_range)?;
    }

    #[test]
    fn pointwise_launchers_check_their_shapes(
        (rows, cols) in (dim(), dim()),
        (rows2, cols2, g) in (dim(), dim(), dim()),
        same in any::<bool>(),
        heads in 1usize..4,
        row in 0usize..10,
        dtypes in (dtype(), dtype()),
    ) {
        let (rows2, cols2, g) = if same { (rows, cols, cols) } else { (rows2, cols2, g) };
        let x = tensor(&[rows, cols], dtypes.0);
        let y = tensor(&[rows2, cols2], DType::F32);
        let gamma = tensor(&[g], DType::F32);
        let f32s = dtypes.0 == DType::F32;
        let norm_ok = f32s && rows2 == rows && cols2 == cols && g == cols;
        named("rms_norm", norm::rms_norm(gpu(), &x, &gamma, &y, 1e-6), norm_ok)?;
        named("layer_norm", norm::layer_norm(gpu(), &x, &gamma, &gamma, &y, 1e-5), norm_ok)?;
        let silu_ok = f32s && cols == 2 * cols2 && rows2 == rows;
        named("silu_mul", activation::silu_mul(gpu(), &x, &y), silu_ok)?;
        let ids = tensor(&[2], DType::U32);
        let argmax = sample::argmax(gpu(), &x, row, &ids, 1);
        if f32s && row >= rows {
            // A row outside f32 logits is a bad argument, named as such.
            let refused = matches!(&argmax, Err(Error::Argument { name, .. }) if name == "row");
            prop_assert!(refused, "argmax row {row} of {rows}: {:?}", argmax.err());
        } else {
            named("argmax", argmax, f32s)?;
        }
        let copy_ok = f32s && rows * cols == rows2 * cols2 && (rows * cols) % 4 == 0;
        named("copy", copy::copy(gpu(), &x, &y), copy_ok)?;
        let (groups, list_len) = (row, heads * 3);
        let list = tensor(&[list_len], DType::U32);
        let merge_ok = f32s && cols % 4 == 0 && cols2 == cols && rows2 >= groups && list_len > groups;
        named("merge_rows", merge::merge_rows(gpu(), &x, &list, groups, &y), merge_ok)?;
        let table = rope::RopeTable::new(gpu(), 10000.0, 2 * g, 16).unwrap();
        let positions = tensor(&[rows2], DType::U32);
        let rope_ok = f32s && cols == heads * 2 * g && rows2 >= rows;
        named("rope", rope::rope(gpu(), &x, heads, &positions, &table), rope_ok)?;
    }

    #[test]
    fn attention_checks_its_tensors(
        (q_rows, kv_rows, kv_heads, group, head_dim) in (dim(), dim(), 1usize..4, 1usize..3, 1usize..9),
        widths in (dim(), dim(), dim(), dim()),
        same in any::<bool>(),
        causal in any::<bool>(),
    ) {
        let heads = kv_heads * group;
        let shape = AttentionShape { q_rows, kv_rows, heads, kv_heads, head_dim, causal };
        let (qw, kvw) = (heads * head_dim, kv_heads * head_dim);
        let w = if same { (qw, kvw, kvw, qw) } else { widths };
        let q = tensor(&[q_rows, w.0], DType::F32);
        let k = tensor(&[kv_rows, w.1], DType::F32);
        let v = tensor(&[kv_rows, w.2], DType::F32);
        let o = tensor(&[q_rows, w.3], DType::F32);
        let result = attention::attention(gpu(), &shape, 0.5, &q, &k, &v, &o, None);
        prop_assert!(
            !matches!(result, Err(Error::Shape { ref op, .. }) if op != "attention"),
            "{result:?}"
        );
        if same && shape.validate().is_ok() {
            prop_assert!(result.is_ok(), "{shape:?}: {:?}", result.err());
        } else if let Err(e) = result {
            prop_assert!(matches!(e, Error::Shape { .. }), "{e}");
        }
    }
}
