//! The runtime on any machine: opening a device never panics, and a missing driver,
//! device or kernel image is a typed error.

mod common;

#[test]
fn device_open_is_typed_error_or_device() {
    match ntkv::Device::new(0) {
        Ok(d) => {
            assert!(d.props().sm_count > 0);
            assert!(!d.props().name.is_empty());
        }
        Err(e) => {
            assert!(
                matches!(e, ntkv::Error::NoDriver | ntkv::Error::NoDevice { .. } | ntkv::Error::Driver(_)),
                "unexpected error kind: {e:?}"
            );
            if common::gpu_required() {
                panic!("NTKV_REQUIRE_GPU=1 but Device::new(0) failed: {e}");
            }
            common::skip("device_open_is_typed_error_or_device", &e.to_string());
        }
    }
}

#[test]
fn out_of_range_ordinal_is_no_device() {
    match ntkv::Device::new(1 << 20) {
        Err(ntkv::Error::NoDevice { ordinal, .. }) => assert_eq!(ordinal, 1 << 20),
        Err(ntkv::Error::NoDriver) => common::skip("out_of_range_ordinal_is_no_device", "no driver"),
        other => panic!("expected NoDevice, got {other:?}"),
    }
}

#[test]
fn built_archs_match_kernels_built() {
    assert_eq!(ntkv::kernels_built(), !ntkv::built_archs().is_empty());
    if std::env::var("NTKV_REQUIRE_KERNELS").is_ok_and(|v| v == "1") {
        assert!(ntkv::kernels_built(), "NTKV_REQUIRE_KERNELS=1 but the kernels were not built");
    }
}

#[test]
fn copy_kernel_copies() {
    let dev = gpu_or_skip!("copy_kernel_copies");
    let n = 4096 * 16 + 48;
    let host: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
    let src = dev.stream().clone_htod(&host).unwrap();
    let mut dst = dev.stream().alloc_zeros::<u8>(n).unwrap();
    ntkv::timing::copy_vec16(dev, &src, &mut dst).unwrap();
    let back = dev.stream().clone_dtoh(&dst).unwrap();
    assert_eq!(back, host);
}

#[test]
fn median_is_order_free() {
    let mut a = vec![5.0, 1.0, 3.0];
    assert_eq!(ntkv::timing::median(&mut a), 3.0);
    let mut b = vec![4.0, 1.0, 3.0, 2.0];
    assert_eq!(ntkv::timing::median(&mut b), 2.5);
    assert_eq!(ntkv::timing::median(&mut []), 0.0);
}
