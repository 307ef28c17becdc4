//! The MLP helper on the GPU: weights loaded from host arrays, a forward pass and a
//! per-output backward pass producing the factored NTK's `A_l` and `G_l`, the one-call
//! empirical NTK, and the linearized model as a fused JVP.

use cudarc::driver::CudaSlice;

use crate::device::Device;
use crate::error::{check_shape, Error, Result};
use crate::ntk::gpu::{self, JvpStep};
use crate::ntk::{cpu, factored_ntk, Activation, FactoredLayer, NtkMode, Precision};
use crate::tensor::DeviceTensor;

struct Dense {
    /// `W [d_out, d_in]`.
    w: CudaSlice<f32>,
    /// `Wᵀ [d_in, d_out]`, for the backward pass's `G·W` as an `A·Bᵀ` GEMM.
    wt: CudaSlice<f32>,
    /// `b [d_out]`.
    b: Option<CudaSlice<f32>>,
}

/// A dense MLP on the GPU, `z_l = a_l·W_lᵀ + b_l`, `a_{l+1} = φ(z_l)` except after the last
/// layer (`W_l [d_out, d_in]`, the `nn.Linear` layout). All f32. The MLP lives on the device
/// it was uploaded to; every input must be on that device.
pub struct Mlp {
    device: Device,
    widths: Vec<usize>,
    layers: Vec<Dense>,
    activation: Activation,
}

impl std::fmt::Debug for Mlp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mlp").field("widths", &self.widths).field("activation", &self.activation).finish()
    }
}

/// The factors of an MLP at a batch of inputs, on the device.
#[derive(Debug)]
pub struct MlpFactors {
    /// `A_l [N, 1, d_l]` per layer (the layer inputs; `A_0 = x`).
    pub inputs: Vec<DeviceTensor<f32>>,
    /// `G_l [N, 1, O, d_{l+1}]`: `G_l[i,0,a,:] = ∂f_a(x_i)/∂z_l`.
    pub cotangents: Vec<DeviceTensor<f32>>,
    /// `f(x) [N, O]`.
    pub output: DeviceTensor<f32>,
    /// Whether each layer has a bias.
    pub bias: Vec<bool>,
}

impl MlpFactors {
    /// The layers as [`FactoredLayer`]s for [`factored_ntk`].
    pub fn layers(&self) -> Vec<FactoredLayer<'_>> {
        self.inputs
            .iter()
            .zip(&self.cotangents)
            .zip(&self.bias)
            .map(|((a, g), &bias)| FactoredLayer { a, g, bias })
            .collect()
    }
}

impl Mlp {
    /// Uploads a host MLP (weights and biases as f32 host arrays, see [`cpu::Mlp`]).
    ///
    /// # Errors
    /// As [`cpu::Mlp::validate`]; driver errors from the copies.
    pub fn from_host(device: &Device, host: &cpu::Mlp) -> Result<Self> {
        host.validate()?;
        let stream = device.stream();
        let mut layers = Vec::with_capacity(host.layers());
        for l in 0..host.layers() {
            let (din, dout) = (host.widths[l], host.widths[l + 1]);
            let w = &host.weights[l];
            let mut wt = vec![0.0f32; din * dout];
            for r in 0..dout {
                for c in 0..din {
                    wt[c * dout + r] = w[r * din + c];
                }
            }
            layers.push(Dense {
                w: stream.clone_htod(w)?,
                wt: stream.clone_htod(&wt)?,
                b: host.biases[l].as_ref().map(|b| stream.clone_htod(b)).transpose()?,
            });
        }
        Ok(Mlp { device: device.clone(), widths: host.widths.clone(), layers, activation: host.activation })
    }

    /// The device the MLP lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Layer widths `[d_0, …, d_L]`.
    pub fn widths(&self) -> &[usize] {
        &self.widths
    }

    /// Output width `O`.
    pub fn outputs(&self) -> usize {
        self.widths.last().copied().unwrap_or(0)
    }

    fn check_input(&self, arg: &'static str, x: &DeviceTensor<f32>) -> Result<usize> {
        let s = x.shape();
        if s.len() != 2 || s[1] != self.widths[0] || s[0] == 0 {
            return Err(Error::shape(arg, &[s.first().copied().unwrap_or(0).max(1), self.widths[0]], s));
        }
        self.device.check_tensor(arg, x)?;
        Ok(s[0])
    }

    /// `a [rows, k] · w [wrows, k]ᵀ` in exact f32.
    fn linear(
        &self,
        a: &CudaSlice<f32>,
        rows: usize,
        w: &CudaSlice<f32>,
        wrows: usize,
        k: usize,
    ) -> Result<CudaSlice<f32>> {
        gpu::matmul_abt(&self.device, &a.as_view(), rows, Some((&w.as_view(), wrows)), k, Precision::F32)
    }

    /// Forward pass and per-output backward pass on `x [N, d_0]` (GEMMs in exact f32):
    /// `G_{L-1} = I`, `G_{l-1} = (G_l·W_l) ⊙ φ'(z_{l-1})`.
    ///
    /// # Errors
    /// [`Error::Shape`] for `x`.
    pub fn factors(&self, x: &DeviceTensor<f32>) -> Result<MlpFactors> {
        let n = self.check_input("x", x)?;
        let device = &self.device;
        let stream = device.stream();
        let layers = self.layers.len();
        let o = self.outputs();
        let act = self.activation.code();
        let mut inputs: Vec<CudaSlice<f32>> = vec![stream.clone_dtod(x.slice())?];
        let mut pre_acts: Vec<CudaSlice<f32>> = Vec::with_capacity(layers);
        let mut output = None;
        for (l, layer) in self.layers.iter().enumerate() {
            let (din, dout) = (self.widths[l], self.widths[l + 1]);
            let a = &inputs[l];
            let pre = self.linear(a, n, &layer.w, dout, din)?;
            let mut z = stream.alloc_zeros::<f32>(n * dout)?;
            let mut next = stream.alloc_zeros::<f32>(n * dout)?;
            let last = l + 1 == layers;
            gpu::bias_act(device, &pre, layer.b.as_ref(), dout, !last, act, &mut z, &mut next)?;
            pre_acts.push(z);
            if last {
                output = Some(next);
            } else {
                inputs.push(next);
            }
        }
        // Backward, one row per (sample, output).
        let mut cot: Vec<Option<CudaSlice<f32>>> = (0..layers).map(|_| None).collect();
        let mut g = stream.alloc_zeros::<f32>(n * o * o)?;
        gpu::cotangent(device, None, o, o, act, &mut g)?;
        for l in (1..layers).rev() {
            let (din, dout) = (self.widths[l], self.widths[l + 1]);
            let pre = self.linear(&g, n * o, &self.layers[l].wt, din, dout)?;
            let mut gp = stream.alloc_zeros::<f32>(n * o * din)?;
            gpu::cotangent(device, Some((&pre, &pre_acts[l - 1])), o, din, act, &mut gp)?;
            cot[l] = Some(std::mem::replace(&mut g, gp));
        }
        cot[0] = Some(g);
        let bias = self.layers.iter().map(|d| d.b.is_some()).collect();
        let inputs = inputs
            .into_iter()
            .enumerate()
            .map(|(l, a)| DeviceTensor::from_slice(a, &[n, 1, self.widths[l]]))
            .collect::<Result<Vec<_>>>()?;
        let cotangents = cot
            .into_iter()
            .enumerate()
            .map(|(l, g)| {
                let g = g.ok_or_else(|| Error::internal("the backward pass skipped a cotangent"))?;
                DeviceTensor::from_slice(g, &[n, 1, o, self.widths[l + 1]])
            })
            .collect::<Result<Vec<_>>>()?;
        let output = output.ok_or_else(|| Error::internal("an MLP without layers passed validation"))?;
        Ok(MlpFactors { inputs, cotangents, output: DeviceTensor::from_slice(output, &[n, o])?, bias })
    }

    /// The empirical NTK of this MLP in one call: forward and backward on the GPU, then the
    /// factored NTK ([`factored_ntk`]) at `precision`. `x2 = None` is `Θ(x1, x1)` (symmetric
    /// path). Output as [`NtkMode::output_shape`] with `O` = the MLP's output width.
    ///
    /// # Errors
    /// [`Error::Shape`] for `x1` or `x2`.
    pub fn empirical_ntk(
        &self,
        x1: &DeviceTensor<f32>,
        x2: Option<&DeviceTensor<f32>>,
        mode: NtkMode,
        precision: Precision,
    ) -> Result<DeviceTensor<f32>> {
        self.check_input("x1", x1)?;
        if let Some(x) = x2 {
            self.check_input("x2", x)?;
        }
        let f1 = self.factors(x1)?;
        match x2 {
            None => factored_ntk(&self.device, &f1.layers(), None, mode, precision),
            Some(x) => {
                let f2 = self.factors(x)?;
                factored_ntk(&self.device, &f1.layers(), Some(&f2.layers()), mode, precision)
            }
        }
    }

    /// The linearized model `f_lin(x) = f(x; θ0) + J(x; θ0)·Δθ` as one fused JVP through the
    /// MLP (primal and tangent propagate together: `dz_l = a_l·ΔW_lᵀ + da_l·W_lᵀ + Δb_l`,
    /// `da_{l+1} = φ'(z_l) ⊙ dz_l`), without forming `J`. `delta` holds `Δθ` with this MLP's
    /// widths and bias pattern. Returns `[N, O]`. GEMMs in exact f32.
    ///
    /// # Errors
    /// [`Error::Shape`] for `x`, or when `delta` has other widths or bias pattern.
    pub fn linearized(&self, delta: &Mlp, x: &DeviceTensor<f32>) -> Result<DeviceTensor<f32>> {
        let n = self.check_input("x", x)?;
        self.device.check_key("delta", delta.device.key())?;
        let device = &self.device;
        check_shape("delta.widths", &self.widths, &delta.widths)?;
        for (a, b) in self.layers.iter().zip(&delta.layers) {
            if a.b.is_some() != b.b.is_some() {
                return Err(Error::invalid("delta.biases", "bias pattern differs from the MLP's"));
            }
        }
        let stream = device.stream();
        let act = self.activation.code();
        let layers = self.layers.len();
        let mut a: CudaSlice<f32> = stream.clone_dtod(x.slice())?;
        let mut da: Option<CudaSlice<f32>> = None;
        for l in 0..layers {
            let (din, dout) = (self.widths[l], self.widths[l + 1]);
            let (w, dw) = (&self.layers[l], &delta.layers[l]);
            let pre = self.linear(&a, n, &w.w, dout, din)?;
            let t1 = self.linear(&a, n, &dw.w, dout, din)?;
            let t2 = da.as_ref().map(|d| self.linear(d, n, &w.w, dout, din)).transpose()?;
            let bias = match (&w.b, &dw.b) {
                (Some(b), Some(db)) => Some((b, db)),
                _ => None,
            };
            let is_last = l + 1 == layers;
            let mut a_next = stream.alloc_zeros::<f32>(n * dout)?;
            let mut da_next = stream.alloc_zeros::<f32>(n * dout)?;
            let step = JvpStep { pre: &pre, t1: &t1, t2: t2.as_ref(), bias, cols: dout, is_last, act };
            gpu::jvp(device, &step, &mut a_next, &mut da_next)?;
            a = a_next;
            da = Some(da_next);
        }
        DeviceTensor::from_slice(a, &[n, self.outputs()])
    }
}
