//! ntkv inside another Rust GPU stack, as a candle or burn user would run it: the caller owns
//! the context, the stream and the buffers (allocated with plain cudarc), and ntkv runs top-k
//! and sparse-index decode on borrowed views of them, on the caller's stream, with no copy.
//!
//! One layer of a larger KV cache is selected by slicing the caller's buffer; the top-k picks
//! the tokens with the highest scores per kv head, and decode attends to exactly those.
//!
//! Run with `cargo run --release --example cudarc_interop` on a machine with a GPU; without
//! one it says so and exits cleanly.

use half::f16;
use ntkv::cudarc::driver::CudaContext;
use ntkv::decode::{DecodeOptions, DecodePlan, DecodeShape};
use ntkv::select::{TopkOptions, TopkOrder, TopkPlan, TopkShape};
use ntkv::{Device, DeviceTensor, TensorView, TensorViewMut};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if !ntkv::driver_present() || !ntkv::kernels_built() {
        println!("SKIP: no CUDA driver or no compiled kernels on this machine");
        return Ok(());
    }
    // The caller's side: its own context, stream and allocations.
    let ctx = CudaContext::new(0)?;
    let stream = ctx.new_stream()?;
    let (layers, hq, hkv, d, cap, keep) = (4usize, 32usize, 8usize, 128usize, 4096usize, 256usize);
    let layer_elems = hkv * cap * d;
    let host: Vec<f16> = (0..layers * layer_elems).map(|i| f16::from_f32(((i % 97) as f32 - 48.0) / 97.0)).collect();
    let k_cache = stream.clone_htod(&host)?; // [layers, Hkv, T, D]
    let v_cache = stream.clone_htod(&host)?;
    let scores_host: Vec<f32> = (0..hkv * cap).map(|i| ((i * 7919) % 10007) as f32).collect();
    let scores = stream.clone_htod(&scores_host)?; // [Hkv, T], e.g. accumulated attention mass
    let mut indices = stream.alloc_zeros::<u32>(hkv * keep)?;
    let mut values = stream.alloc_zeros::<f32>(hkv * keep)?;

    // ntkv on that stream.
    let device = Device::from_stream(stream.clone())?;

    // Top-`keep` tokens per kv head, written ascending by index: a sorted decode list.
    let shape = TopkShape { rows: hkv, n: cap, k: keep };
    let mut topk = TopkPlan::new(&device, &shape, TopkOptions { order: TopkOrder::Index })?;
    let scores_v = TensorView::new(scores.as_view(), &[hkv, cap])?;
    topk.run(
        &scores_v,
        None,
        &mut TensorViewMut::new(values.as_view_mut(), &[hkv, keep])?,
        &mut TensorViewMut::new(indices.as_view_mut(), &[hkv, keep])?,
    )?;

    // CSR lists over the selected tokens (one list per kv head), on the device.
    let indptr: Vec<u32> = (0..=hkv as u32).map(|h| h * keep as u32).collect();
    let indptr = DeviceTensor::from_host(&device, &indptr, &[hkv + 1])?;
    let indices_v = TensorView::new(indices.as_view(), &[hkv * keep])?;

    // Decode one query token against layer 2 of the caller's cache, read in place.
    let layer = 2;
    let range = layer * layer_elems..(layer + 1) * layer_elems;
    let k = TensorView::new(k_cache.slice(range.clone()), &[1, hkv, cap, d])?;
    let v = TensorView::new(v_cache.slice(range), &[1, hkv, cap, d])?;
    let dshape = DecodeShape { batch: 1, q_tokens: 1, hq, hkv, head_dim: d, capacity: cap };
    let mut plan = DecodePlan::new(&device, &dshape, DecodeOptions::default(), &[cap as u32], &indptr, &indices_v)?;
    let q = DeviceTensor::from_host(&device, &vec![f16::from_f32(0.1); hq * d], &[1, 1, hq, d])?;
    let mut o = DeviceTensor::<f16>::zeros(&device, &[1, 1, hq, d])?;
    let mut lse = DeviceTensor::<f32>::zeros(&device, &[1, 1, hq])?;
    plan.run(&q, &k, &v, &mut o, &mut lse)?;

    let lse = lse.to_host()?;
    let picked = stream.clone_dtoh(&indices)?;
    println!("kv head 0 keeps tokens {:?} ...; lse of query head 0 = {}", &picked[..8], lse[0]);
    Ok(())
}
