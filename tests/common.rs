//! Shared helpers: fixture paths, golden tensors, comparisons.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use burn::tensor::{backend::Backend, Int};
use dsv3_backends::{DsBackend, Fp8Weight};

pub type B = dsv3_backends::Cpu;

/// Absolute tolerance on logits for f32 against the float64 golden. The fixtures' logits have
/// magnitude ~5-15; f32 carries ~7 significant digits, and the forward chains a few hundred
/// accumulations, so agreement to ~1e-5 is expected. 1e-4 leaves headroom without hiding bugs:
/// a wrong mask, rope layout, router choice or scale moves logits by 1e-2 or more.
pub const LOGIT_TOL: f32 = 1e-4;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A fixture directory; fails with a clear message if it was not generated/committed.
pub fn fixture(name: &str) -> PathBuf {
    let p = fixtures().join(name);
    assert!(
        p.join("config.json").is_file(),
        "fixture {} is missing: run `python3 tests/fixtures/gen_fixtures.py` (needs torch + transformers)",
        p.display()
    );
    p
}

pub fn device() -> burn::backend::flex::FlexDevice {
    Default::default()
}

/// A golden file's tensors, converted to f64 / i64 vectors with their shapes.
pub struct Golden {
    pub f: HashMap<String, (Vec<usize>, Vec<f64>)>,
    pub i: HashMap<String, (Vec<usize>, Vec<i64>)>,
}

impl Golden {
    pub fn read(path: &Path) -> Golden {
        let bytes = std::fs::read(path)
            .unwrap_or_else(|e| panic!("golden {} missing: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).expect("golden parses");
        let mut f = HashMap::new();
        let mut i = HashMap::new();
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let d = view.data();
            match view.dtype() {
                Dtype::F32 => {
                    f.insert(
                        name,
                        (
                            shape,
                            d.chunks_exact(4)
                                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                                .collect(),
                        ),
                    );
                }
                Dtype::F64 => {
                    f.insert(
                        name,
                        (
                            shape,
                            d.chunks_exact(8)
                                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                                .collect(),
                        ),
                    );
                }
                Dtype::I64 => {
                    i.insert(
                        name,
                        (
                            shape,
                            d.chunks_exact(8)
                                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                                .collect(),
                        ),
                    );
                }
                other => panic!("unexpected dtype {other:?} in golden {}", path.display()),
            }
        }
        Golden { f, i }
    }
    pub fn f(&self, name: &str) -> &(Vec<usize>, Vec<f64>) {
        self.f
            .get(name)
            .unwrap_or_else(|| panic!("golden tensor {name} missing"))
    }
    pub fn i(&self, name: &str) -> &(Vec<usize>, Vec<i64>) {
        self.i
            .get(name)
            .unwrap_or_else(|| panic!("golden tensor {name} missing"))
    }
    pub fn ids(&self) -> Vec<u32> {
        self.i("input_ids").1.iter().map(|&v| v as u32).collect()
    }
    pub fn offset(&self) -> usize {
        self.i
            .get("offset")
            .map(|(_, v)| v[0] as usize)
            .unwrap_or(0)
    }
}

/// Golden files of a fixture directory (`golden*.safetensors`).
pub fn goldens(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("golden") && n.ends_with(".safetensors")
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no golden*.safetensors in {}", dir.display());
    v
}

pub fn to_vec<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

pub fn tensor2(values: Vec<f32>, shape: [usize; 2]) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(values, shape), &device())
}

pub fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}

pub fn max_abs(b: &[f64]) -> f64 {
    b.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// A unique scratch directory under the system temp dir.
pub fn scratch(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "dsv3-test-{}-{}-{}",
        name,
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Copies a fixture directory's model files to a scratch dir (for corrupting them).
pub fn copy_fixture(name: &str) -> PathBuf {
    let src = fixture(name);
    let dst = scratch(name);
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        let n = p.file_name().unwrap().to_string_lossy().to_string();
        if n == "config.json" || n.starts_with("model") {
            std::fs::copy(&p, dst.join(&n)).unwrap();
        }
    }
    dst
}

/// Runs `dsv3 ARGS` in-process as the binary would (parsing included); the error is the one
/// line the binary prints.
pub fn dsv3(args: &[&str]) -> Result<String, String> {
    let cli = deepseek_v3::cli::parse_args(std::iter::once("dsv3").chain(args.iter().copied()))?
        .ok_or("help printed")?;
    let mut out = Vec::new();
    deepseek_v3::cli::run(cli, &mut out).map_err(|e| e.to_string())?;
    Ok(String::from_utf8(out).unwrap())
}

pub use dsv3_backends::SplitMix64;

/// Uniform in `[-1, 1)` from the workspace's one generator.
pub fn symmetric(rng: &mut SplitMix64) -> f64 {
    2.0 * rng.uniform() - 1.0
}

/// Test inputs drawn from the workspace's one generator.
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64::new(seed))
    }
    pub fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    pub fn uniform(&mut self) -> f32 {
        self.0.uniform() as f32
    }
    pub fn normal_vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| (self.uniform() + self.uniform() + self.uniform() - 1.5) * 2.0 * scale)
            .collect()
    }
    /// FP8 codes without the two NaN codes.
    pub fn codes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                let c = (self.next() >> 56) as u8;
                if c & 0x7F == 0x7F {
                    c ^ 1
                } else {
                    c
                }
            })
            .collect()
    }
}

pub fn f32s<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

pub fn ints<Bk: Backend, const D: usize>(t: Tensor<Bk, D, Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().to_vec().unwrap()
}

/// Whether Flex's matmul (the `gemm` crate, built with its `x86-v4` kernels) runs its AVX-512
/// kernels on this CPU; otherwise it runs the AVX2 + FMA ones (or scalar code). The two sum in
/// different orders, so results that are bit-identical to Flex's on one family are only within
/// f32 rounding of them on the other.
pub fn gemm_uses_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Random FP8 weights `[e, n, k]` with random positive block scales.
pub fn random_fp8<Bk: DsBackend>(
    rng: &mut Rng,
    [e, n, k]: [usize; 3],
    block: usize,
    device: &Bk::Device,
) -> (Fp8Weight<Bk>, Vec<u8>, Vec<f32>) {
    let codes = rng.codes(e * n * k);
    let scales: Vec<f32> = (0..e * n.div_ceil(block) * k.div_ceil(block))
        .map(|_| 0.001 + rng.uniform() * 0.01)
        .collect();
    let w = Fp8Weight::from_codes(&codes, &scales, [e, n, k], block, device).unwrap();
    (w, codes, scales)
}

/// Writes `text` to `path`, creating its directory.
pub fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// One tensor of a safetensors file: name, dtype, shape, little-endian bytes.
pub type RawTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// Rewrites the safetensors file at `path` after `edit` changed its tensors (dropped, renamed,
/// reshaped, zeroed or added some). The new file has no `__metadata__`.
pub fn rewrite_safetensors(path: &Path, edit: impl FnOnce(&mut Vec<RawTensor>)) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<RawTensor> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Runs `run` on a pool of 1 thread and on one of 3, and asserts that each output has the same
/// bits on both (results that must not depend on the thread count).
pub fn assert_same_bits_on_1_and_3_threads<const N: usize>(run: impl Fn() -> [Vec<f32>; N] + Sync) {
    let pool = |k| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(k)
            .build()
            .unwrap()
    };
    let (one, three) = (pool(1).install(&run), pool(3).install(&run));
    for (i, (a, b)) in one.iter().zip(&three).enumerate() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(a),
            bits(b),
            "output {i} differs between 1 and 3 threads"
        );
    }
}
