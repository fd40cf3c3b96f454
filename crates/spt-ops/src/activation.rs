//! Elementwise activations with exact backward: GELU (erf), GELU (tanh, HF's "gelu_new") and ReLU.
//!
//! The forward is a [`CustomOp1`]; its backward is a second op, [`ActivationBackward`], that
//! multiplies the upstream gradient by the derivative at the saved input.

use crate::util::{check_float, contiguous, Float};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// Elements per rayon task: small tensors stay on one thread.
const CHUNK: usize = 16 * 1024;

/// The FFN activations of BERT and GPT-2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `0.5·x·(1 + erf(x/√2))`: BERT's "gelu".
    GeluErf,
    /// `0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))`: GPT-2's "gelu_new".
    GeluTanh,
    /// `max(x, 0)`.
    Relu,
}

impl Activation {
    /// Parses a Hugging Face `hidden_act` / `activation_function` string.
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "gelu" | "gelu_python" => Some(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            "relu" => Some(Self::Relu),
            _ => None,
        }
    }

    /// The Hugging Face name of this activation.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::GeluErf => "gelu",
            Self::GeluTanh => "gelu_new",
            Self::Relu => "relu",
        }
    }

    /// Applies the activation with a recorded, exact backward.
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        check_float("activation", "x", x)?;
        x.contiguous()?.apply_op1(ActivationOp(self))
    }

    /// Scalar forward, shared with the routed FFN's fused kernel.
    #[inline]
    pub fn eval<T: ActScalar>(self, x: T) -> T {
        match self {
            Self::GeluErf => x.gelu_erf(),
            Self::GeluTanh => x.gelu_tanh(),
            Self::Relu => x.relu(),
        }
    }

    /// Scalar derivative at `x`.
    #[inline]
    pub fn derivative<T: ActScalar>(self, x: T) -> T {
        match self {
            Self::GeluErf => x.gelu_erf_grad(),
            Self::GeluTanh => x.gelu_tanh_grad(),
            Self::Relu => x.relu_grad(),
        }
    }
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044_715;

/// Scalars the activations are defined for (f32 and f64).
pub trait ActScalar: Copy + std::ops::Mul<Output = Self> {
    fn gelu_erf(self) -> Self;
    fn gelu_erf_grad(self) -> Self;
    fn gelu_tanh(self) -> Self;
    fn gelu_tanh_grad(self) -> Self;
    fn relu(self) -> Self;
    fn relu_grad(self) -> Self;

    /// `out[i] = act(x[i])`; f32 GELU is vectorised where the CPU allows.
    fn eval_slice(act: Activation, x: &[Self], out: &mut [Self]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = act.eval(v);
        }
    }

    /// `out[i] = g[i] · act'(x[i])`; f32 GELU is vectorised where the CPU allows.
    fn grad_slice(act: Activation, x: &[Self], g: &[Self], out: &mut [Self]) {
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(g) {
            *o = g * act.derivative(v);
        }
    }

    /// `y[i] = act(x[i])` and `d[i] = act'(x[i])`, the values of [`eval_slice`](Self::eval_slice)
    /// and [`grad_slice`](Self::grad_slice) with `g = 1`; f32 GELU computes both in one pass.
    fn eval_grad_slice(act: Activation, x: &[Self], y: &mut [Self], d: &mut [Self]) {
        for ((y, d), &v) in y.iter_mut().zip(d.iter_mut()).zip(x) {
            *y = act.eval(v);
            *d = act.derivative(v);
        }
    }
}

macro_rules! impl_act_scalar {
    ($t:ty, $erf:path $(, $slices:item)*) => {
        impl ActScalar for $t {
            $($slices)*
            #[inline]
            fn gelu_erf(self) -> Self {
                0.5 * self * (1.0 + $erf(self * std::f64::consts::FRAC_1_SQRT_2 as $t))
            }
            #[inline]
            fn gelu_erf_grad(self) -> Self {
                let cdf = 0.5 * (1.0 + $erf(self * std::f64::consts::FRAC_1_SQRT_2 as $t));
                let pdf = (-0.5 * self * self).exp()
                    * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2) as $t;
                cdf + self * pdf
            }
            #[inline]
            fn gelu_tanh(self) -> Self {
                let u = SQRT_2_OVER_PI as $t * (self + GELU_C as $t * self * self * self);
                0.5 * self * (1.0 + u.tanh())
            }
            #[inline]
            fn gelu_tanh_grad(self) -> Self {
                let x2 = self * self;
                let u = SQRT_2_OVER_PI as $t * (self + GELU_C as $t * x2 * self);
                let t = u.tanh();
                let du = SQRT_2_OVER_PI as $t * (1.0 + 3.0 * GELU_C as $t * x2);
                0.5 * (1.0 + t) + 0.5 * self * (1.0 - t * t) * du
            }
            #[inline]
            fn relu(self) -> Self {
                if self > 0.0 {
                    self
                } else {
                    0.0
                }
            }
            #[inline]
            fn relu_grad(self) -> Self {
                if self > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
        }
    };
}
impl_act_scalar!(
    f32,
    candle_core::cpu::erf::erf_f32,
    fn eval_slice(act: Activation, x: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if let (Some(kind), true) = (crate::gelu_simd::Gelu::of(act), crate::simd::has_avx2()) {
            // SAFETY: AVX2 and FMA were detected on this CPU.
            return unsafe { crate::gelu_simd::forward(kind, x, out) };
        }
        for (o, &v) in out.iter_mut().zip(x) {
            *o = act.eval(v);
        }
    },
    fn grad_slice(act: Activation, x: &[f32], g: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if let (Some(kind), true) = (crate::gelu_simd::Gelu::of(act), crate::simd::has_avx2()) {
            // SAFETY: AVX2 and FMA were detected on this CPU.
            return unsafe { crate::gelu_simd::backward(kind, x, g, out) };
        }
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(g) {
            *o = g * act.derivative(v);
        }
    },
    fn eval_grad_slice(act: Activation, x: &[f32], y: &mut [f32], d: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if let (Some(kind), true) = (crate::gelu_simd::Gelu::of(act), crate::simd::has_avx2()) {
            // SAFETY: AVX2 and FMA were detected on this CPU.
            return unsafe { crate::gelu_simd::value_and_grad(kind, x, y, d) };
        }
        for ((y, d), &v) in y.iter_mut().zip(d.iter_mut()).zip(x) {
            *y = act.eval(v);
            *d = act.derivative(v);
        }
    }
);
impl_act_scalar!(f64, candle_core::cpu::erf::erf_f64);

/// GELU with the exact erf (BERT's "gelu"), differentiable.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    Activation::GeluErf.forward(x)
}

/// GELU with the tanh approximation (GPT-2's "gelu_new"), differentiable.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    Activation::GeluTanh.forward(x)
}

/// `act(x)` in parallel chunks.
pub(crate) fn eval_par<T: Float + ActScalar>(act: Activation, x: &[T]) -> Vec<T> {
    crate::util::par_vec(x.len(), CHUNK, T::zero(), |i, o| {
        T::eval_slice(act, &x[i * CHUNK..i * CHUNK + o.len()], o)
    })
}

/// `g ⊙ act'(x)` in parallel chunks.
pub(crate) fn grad_par<T: Float + ActScalar>(act: Activation, x: &[T], g: &[T]) -> Vec<T> {
    crate::util::par_vec(x.len(), CHUNK, T::zero(), |i, o| {
        let r = i * CHUNK..i * CHUNK + o.len();
        T::grad_slice(act, &x[r.clone()], &g[r], o)
    })
}

/// Forward op: `act(x)`.
pub struct ActivationOp(pub Activation);

impl CustomOp1 for ActivationOp {
    fn name(&self) -> &'static str {
        "activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let act = self.0;
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(eval_par(act, contiguous::<f32>("activation", "x", s, l)?)),
            CpuStorage::F64(_) => CpuStorage::F64(eval_par(act, contiguous::<f64>("activation", "x", s, l)?)),
            other => bail!("activation: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        crate::cuda::by_float!(
            "activation",
            s.dtype(),
            crate::cuda::activation::forward(self.0, s, l)
        )
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(&grad, &ActivationBackward(self.0))?))
    }
}

/// Backward op: `grad · act'(x)`, inputs `(x, grad)`.
pub struct ActivationBackward(pub Activation);

impl CustomOp2 for ActivationBackward {
    fn name(&self) -> &'static str {
        "activation_backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let act = self.0;
        if l1.shape() != l2.shape() {
            bail!(
                "activation_backward: x is {:?} but grad is {:?}",
                l1.dims(),
                l2.dims()
            );
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(grad_par(
                act,
                contiguous::<f32>("activation_backward", "x", s1, l1)?,
                contiguous::<f32>("activation_backward", "grad", s2, l2)?,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(grad_par(
                act,
                contiguous::<f64>("activation_backward", "x", s1, l1)?,
                contiguous::<f64>("activation_backward", "grad", s2, l2)?,
            )),
            _ => bail!(
                "activation_backward: dtypes {:?} and {:?} must both be f32 or f64",
                s1.dtype(),
                s2.dtype()
            ),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        crate::cuda::by_float!(
            "activation_backward",
            s1.dtype(),
            crate::cuda::activation::backward(self.0, s1, l1, s2, l2)
        )
    }
}
