//! The platform's reliability rules that do not belong to one family: allocation sizes
//! checked in bytes, tensors that know their device, borrowed views with no copy, a user's
//! own stream, and kernel lookup by typed id. The CPU-side checks run everywhere; the GPU
//! ones print SKIP without a device.

mod common;

use ntkv::cudarc::driver::CudaContext;
use ntkv::tensor::checked_numel;
use ntkv::{DeviceTensor, Error, KernelId, Module, TensorMut, TensorRef, TensorView, TensorViewMut};

#[test]
fn byte_size_overflow_is_too_large_not_a_short_buffer() {
    // 2^62 + 16 f32 elements: the count fits usize, the byte size does not.
    let shape = [(1usize << 62) + 16, 1];
    assert!(matches!(checked_numel::<f32>("shape", &shape), Err(Error::TooLarge { arg: "shape", .. })));
    // Count overflow itself.
    assert!(matches!(checked_numel::<u8>("shape", &[usize::MAX, 2]), Err(Error::TooLarge { .. })));
    // The boundary: isize::MAX bytes of u8 is the most an allocation may span; one more is refused.
    assert_eq!(checked_numel::<u8>("shape", &[isize::MAX as usize]).unwrap(), isize::MAX as usize);
    assert!(checked_numel::<u8>("shape", &[isize::MAX as usize + 1]).is_err());
    assert!(checked_numel::<f32>("shape", &[isize::MAX as usize / 4]).is_ok());
    assert!(checked_numel::<f32>("shape", &[isize::MAX as usize / 4 + 1]).is_err());
    // The empty shape is one element; a zero extent is zero elements.
    assert_eq!(checked_numel::<f32>("shape", &[]).unwrap(), 1);
    assert_eq!(checked_numel::<f32>("shape", &[0, usize::MAX]).unwrap(), 0);
}

#[test]
fn zeros_with_an_overflowing_byte_size_is_an_error() {
    // On a device the size check must come before the allocation.
    let dev = gpu_or_skip!("zeros_with_an_overflowing_byte_size_is_an_error");
    let r = DeviceTensor::<f32>::zeros(dev, &[(1usize << 62) + 16, 1]);
    assert!(matches!(r, Err(Error::TooLarge { .. })), "{r:?}");
}

#[test]
fn kernel_ids_are_unique_per_symbol() {
    let ids = ntkv::launch::registered_kernels();
    let mut symbols: Vec<(Module, String)> = ids.iter().map(|id| (id.module(), id.symbol())).collect();
    let n = symbols.len();
    symbols.sort();
    symbols.dedup();
    assert_eq!(symbols.len(), n, "two ids map to one symbol");
    let id = KernelId::new(Module::Decode, "decode_attn").dtype(ntkv::DType::F16).head_dim(64);
    assert_eq!(id.symbol(), "ntkv_decode_attn_f16_d64");
}

#[test]
fn errors_name_their_kind() {
    let e = Error::internal("an invariant");
    assert!(e.to_string().contains("bug in ntkv"), "{e}");
    let e = Error::DeviceMismatch { arg: "q", expected: 0, actual: 1 };
    assert!(e.to_string().contains("`q`"), "{e}");
    let e = Error::KernelFault { kernel: "ntkv_x", reason: "timed out".into() };
    assert!(e.to_string().contains("invalid"), "{e}");
}

#[test]
fn views_borrow_without_a_copy_and_check_their_length() {
    let dev = gpu_or_skip!("views_borrow_without_a_copy_and_check_their_length");
    // One "layer" of a larger cache allocated with plain cudarc, as a candle user would.
    let host: Vec<f32> = (0..4 * 64).map(|i| i as f32).collect();
    let mut whole = dev.stream().clone_htod(&host).unwrap();
    {
        let layer = whole.slice(64..128);
        let v = TensorView::new(layer, &[8, 8]).unwrap();
        assert_eq!(v.shape(), &[8, 8]);
        assert_eq!(v.len(), 64);
        assert_eq!(v.device_key(), dev.key());
        dev.check_tensor("v", &v).unwrap();
        // A shape whose product is not the view's length is refused.
        assert!(matches!(TensorView::new(whole.slice(0..10), &[3, 3]), Err(Error::Shape { .. })));
    }
    {
        let layer = whole.slice_mut(128..192);
        let mut v = TensorViewMut::new(layer, &[64]).unwrap();
        assert_eq!(v.cuda_view_mut().len(), 64);
    }
    let t = DeviceTensor::from_host(dev, &host, &[4, 64]).unwrap();
    assert_eq!(t.as_view().shape(), &[4, 64]);
}

#[test]
fn a_tensor_from_another_context_is_a_device_mismatch() {
    let dev = gpu_or_skip!("a_tensor_from_another_context_is_a_device_mismatch");
    // A second device if there is one; otherwise the check passes for the same device.
    let count = CudaContext::device_count().unwrap_or(1);
    if count < 2 {
        let t = DeviceTensor::<f32>::zeros(dev, &[4]).unwrap();
        dev.check_tensor("t", &t).unwrap();
        common::skip("a_tensor_from_another_context_is_a_device_mismatch", "only one GPU: mismatch not exercised");
        return;
    }
    let other = ntkv::Device::new(1).unwrap();
    let t = DeviceTensor::<f32>::zeros(&other, &[4]).unwrap();
    assert!(matches!(dev.check_tensor("t", &t), Err(Error::DeviceMismatch { arg: "t", expected: 0, actual: 1 })));
}

#[test]
fn a_device_on_the_callers_stream_runs_kernels_there() {
    let dev = gpu_or_skip!("a_device_on_the_callers_stream_runs_kernels_there");
    let ctx = dev.context().clone();
    let stream = ctx.new_stream().unwrap();
    let mine = ntkv::Device::from_stream(stream.clone()).unwrap();
    assert!(std::sync::Arc::ptr_eq(mine.stream(), &stream));
    let n = 4096 + 16;
    let host: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    let src = stream.clone_htod(&host).unwrap();
    let mut dst = stream.alloc_zeros::<u8>(n).unwrap();
    ntkv::timing::copy_vec16(&mine, &src, &mut dst).unwrap();
    assert_eq!(stream.clone_dtoh(&dst).unwrap(), host);
}

#[test]
fn ntkv_own_device_does_not_track_events() {
    let dev = gpu_or_skip!("ntkv_own_device_does_not_track_events");
    assert!(!dev.context().is_event_tracking(), "single-stream device should not record per-buffer events");
}
