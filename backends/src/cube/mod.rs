//! [`DsBackend`] for Burn's CubeCL backends: one impl for every runtime (wgpu, CUDA), launching
//! the kernels of [`kernels`]. Use `CubeBackend<..>` directly: the Fusion-wrapped aliases
//! (`burn::backend::Wgpu` with the `fusion` feature) would take the plain-tensor defaults.

pub mod kernels;

use burn::tensor::{Int, Shape, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{CubeCount, CubeDim};

use crate::ops::{DsBackend, Fp8Activations, Fp8Weight, GroupedWeight, MoeDispatch};

type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// 16×16 threads, one per output element of a 2-D output `[rows, cols]`.
fn grid_2d(rows: usize, cols: usize) -> (CubeCount, CubeDim) {
    (
        CubeCount::Static(cols.div_ceil(16) as u32, rows.div_ceil(16) as u32, 1),
        CubeDim::new_2d(16, 16),
    )
}

fn float<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    t: Tensor<Cube<R, F, I, BT>, D>,
) -> CubeTensor<R> {
    into_contiguous(t.into_primitive().tensor())
}

fn int<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    t: Tensor<Cube<R, F, I, BT>, D, Int>,
) -> CubeTensor<R> {
    into_contiguous(t.into_primitive())
}

/// An output for a kernel that writes it linearly: contiguous. CUDA's default ("optimized")
/// layout pads each row to an alignment (CubeCL's pitched allocator), which linear indexing
/// would miss.
fn empty<R: CubeRuntime>(
    like: &CubeTensor<R>,
    shape: Vec<usize>,
    dtype: burn::tensor::DType,
) -> CubeTensor<R> {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::from(shape),
        dtype,
    )
}

fn to_float<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    t: CubeTensor<R>,
) -> Tensor<Cube<R, F, I, BT>, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn to_int<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    t: CubeTensor<R>,
) -> Tensor<Cube<R, F, I, BT>, D, Int> {
    Tensor::from_primitive(t)
}

/// Which matmul kernel a launch uses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MatmulKernel {
    /// 32×32 output tiles through shared memory.
    Tiled,
    /// One thread per output (few rows per expert).
    Rows,
}

/// `x [M, K] · W`: FP8 or float weights, one matrix or one per row's expert (`row_expert`, rows
/// sorted by expert), through the chosen kernel.
fn matmul_launch<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    x: Tensor<Cube<R, F, I, BT>, 2>,
    w: &GroupedWeight<Cube<R, F, I, BT>>,
    row_expert: Option<Tensor<Cube<R, F, I, BT>, 1, Int>>,
    kernel: MatmulKernel,
) -> Tensor<Cube<R, F, I, BT>, 2> {
    let [m, k] = x.dims();
    let (_, wk, n) = w.dims();
    assert_eq!(k, wk, "matmul: x has {k} columns, the weights {wk} rows");
    let device = x.device();
    if m == 0 || n == 0 {
        return Tensor::zeros([m, n], &device);
    }
    let grouped = row_expert.is_some();
    let row_expert = int(row_expert.unwrap_or_else(|| Tensor::zeros([1], &device)));
    let dummy_f = || float(Tensor::<Cube<R, F, I, BT>, 3>::zeros([1, 1, 1], &device));
    let (codes, scales, dense, block, fp8) = match (&w.fp8, &w.dense) {
        (Some(f), _) => (
            int(f.codes.clone()),
            float(f.scales.clone()),
            dummy_f(),
            f.block,
            true,
        ),
        (None, Some(d)) => (
            int(Tensor::<Cube<R, F, I, BT>, 3, Int>::zeros(
                [1, 1, 1],
                &device,
            )),
            dummy_f(),
            float(d.clone()),
            4,
            false,
        ),
        (None, None) => unreachable!("GroupedWeight holds dense or FP8 weights"),
    };
    let x = float(x);
    let out = empty(&x, vec![m, n], x.dtype);
    let dtypes = [x.dtype.into(), codes.dtype.into()];
    let (count, dim) = match kernel {
        MatmulKernel::Tiled => {
            let tile = kernels::TILE;
            (
                CubeCount::Static(n.div_ceil(tile) as u32, m.div_ceil(tile) as u32, 1),
                CubeDim::new_2d(16, 16),
            )
        }
        MatmulKernel::Rows => grid_2d(m, n),
    };
    let launch = match kernel {
        MatmulKernel::Tiled => kernels::tiled_matmul_kernel::launch::<R>,
        MatmulKernel::Rows => kernels::rows_matmul_kernel::launch::<R>,
    };
    launch(
        &out.client,
        count,
        dim,
        x.into_tensor_arg(),
        codes.into_tensor_arg(),
        scales.into_tensor_arg(),
        dense.into_tensor_arg(),
        row_expert.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        block,
        fp8,
        grouped,
        dtypes,
    );
    to_float(out)
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> DsBackend
    for CubeBackend<R, F, I, BT>
{
    fn quantized_linear(
        x: Tensor<Self, 2>,
        w: Tensor<Self, 2>,
        gemm: &crate::quant::QuantGemm,
    ) -> Tensor<Self, 2> {
        crate::quant_linear::forward(x, w, gemm).0
    }

    fn fp8_matmul(x: Tensor<Self, 2>, w: &Fp8Weight<Self>) -> Tensor<Self, 2> {
        matmul_launch(
            x,
            &GroupedWeight::fp8(w.narrow(0, 1)),
            None,
            MatmulKernel::Tiled,
        )
    }

    fn fp8_quantize(x: Tensor<Self, 2>, block: usize, ue8m0: bool) -> Fp8Activations<Self> {
        let [m, k] = x.dims();
        let tiles = k.div_ceil(block);
        let words = k.div_ceil(4);
        let device = x.device();
        if m == 0 || k == 0 {
            return Fp8Activations {
                codes: Tensor::zeros([m, words], &device),
                scales: Tensor::zeros([m, tiles], &device),
                cols: k,
                block,
            };
        }
        let x = float(x);
        let int_dtype = I::dtype();
        let codes = empty(&x, vec![m, words], int_dtype);
        let scales = empty(&x, vec![m, tiles], x.dtype);
        let (count, dim) = grid_2d(m, tiles);
        let dtypes = [x.dtype.into(), int_dtype.into()];
        kernels::fp8_quantize_kernel::launch::<R>(
            &x.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            codes.clone().into_tensor_arg(),
            scales.clone().into_tensor_arg(),
            block,
            ue8m0,
            dtypes,
        );
        Fp8Activations {
            codes: to_int(codes),
            scales: to_float(scales),
            cols: k,
            block,
        }
    }

    fn moe_dispatch(ids: Tensor<Self, 2, Int>, num_experts: usize) -> MoeDispatch<Self> {
        let [t, k] = ids.dims();
        let s = t * k;
        let ids = int(ids.reshape([s]));
        let dtype = ids.dtype;
        let order = empty(&ids, vec![s], dtype);
        let tokens = empty(&ids, vec![s], dtype);
        let experts = empty(&ids, vec![s], dtype);
        let position = empty(&ids, vec![s], dtype);
        let offsets = empty(&ids, vec![num_experts + 1], dtype);
        if num_experts > 0 {
            kernels::moe_dispatch_kernel::launch::<R>(
                &ids.client.clone(),
                CubeCount::Static(num_experts.div_ceil(64) as u32, 1, 1),
                CubeDim::new_1d(64),
                ids.into_tensor_arg(),
                order.clone().into_tensor_arg(),
                tokens.clone().into_tensor_arg(),
                experts.clone().into_tensor_arg(),
                position.clone().into_tensor_arg(),
                offsets.clone().into_tensor_arg(),
                k,
                dtype.into(),
            );
        }
        MoeDispatch {
            order: to_int(order),
            tokens: to_int(tokens),
            experts: to_int(experts),
            position: to_int(position),
            offsets: to_int(offsets),
            num_experts,
            k,
        }
    }

    fn grouped_matmul(
        x: Tensor<Self, 2>,
        w: &GroupedWeight<Self>,
        dispatch: &MoeDispatch<Self>,
    ) -> Tensor<Self, 2> {
        // A 32-row tile holding several experts runs one pass per expert; with fewer than 8
        // rows per expert on average (decode, small batches) one thread per output is cheaper.
        let [s, _] = x.dims();
        if s >= 8 * dispatch.num_experts {
            matmul_launch(x, w, Some(dispatch.experts.clone()), MatmulKernel::Tiled)
        } else {
            matmul_launch(x, w, Some(dispatch.experts.clone()), MatmulKernel::Rows)
        }
    }

    fn moe_combine(
        y: Tensor<Self, 2>,
        dispatch: &MoeDispatch<Self>,
        weights: Tensor<Self, 2>,
        base: Tensor<Self, 2>,
    ) -> Tensor<Self, 2> {
        let [t, h] = base.dims();
        if t == 0 || h == 0 {
            return base;
        }
        let y = float(y);
        let position = int(dispatch.position.clone());
        let weights = float(weights);
        let base = float(base);
        let out = empty(&base, vec![t, h], base.dtype);
        let (count, dim) = grid_2d(t, h);
        let dtypes = [base.dtype.into(), position.dtype.into()];
        kernels::moe_combine_kernel::launch::<R>(
            &out.client,
            count,
            dim,
            y.into_tensor_arg(),
            position.into_tensor_arg(),
            weights.into_tensor_arg(),
            base.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            dtypes,
        );
        to_float(out)
    }
}
