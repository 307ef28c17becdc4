//! Storage dtypes and the typed device tensor.

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

use crate::device::Device;
use crate::error::{Error, Result};

/// A storage dtype of a floating-point tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16 (`half::f16`).
    F16,
    /// bfloat16 (`half::bf16`).
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The name used in tables and JSON (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// The code the kernels' parameter structs use: 0 = f32, 1 = f16, 2 = bf16.
    pub fn code(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A floating-point storage type: `f32`, `half::f16` or `half::bf16`.
///
/// Conversions go through `f32`, the type all arithmetic happens in (SPEC §0).
pub trait Float:
    sealed::Sealed + DeviceRepr + ValidAsZeroBits + Copy + Default + PartialOrd + Send + Sync + std::fmt::Debug + 'static
{
    /// The dtype tag.
    const DTYPE: DType;
    /// Widens to `f32` exactly.
    fn to_f32(self) -> f32;
    /// Rounds from `f32` to nearest even.
    fn from_f32(x: f32) -> Self;
}

impl Float for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Float for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Float for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// A contiguous row-major tensor in device memory: a `CudaSlice<T>` plus its shape
/// (outermost first).
///
/// `T` is any plain-data element the kernels use: `f32`, `f16`, `bf16`, `u32`, `u8`, …
#[derive(Debug)]
pub struct DeviceTensor<T> {
    data: CudaSlice<T>,
    shape: Vec<usize>,
}

/// The number of elements of a shape, or an error naming `arg` on overflow.
pub fn numel(arg: &'static str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::too_large(arg, format!("shape {shape:?} overflows usize")))
}

impl<T: DeviceRepr + ValidAsZeroBits + Copy> DeviceTensor<T> {
    /// Copies `data` to the device with the given shape.
    ///
    /// # Errors
    /// [`Error::Shape`] when `data.len()` is not the product of `shape`.
    pub fn from_host(device: &Device, data: &[T], shape: &[usize]) -> Result<Self> {
        let n = numel("data", shape)?;
        if n != data.len() {
            return Err(Error::shape("data", &[n], &[data.len()]));
        }
        let slice = device.stream().clone_htod(data)?;
        Ok(DeviceTensor { data: slice, shape: shape.to_vec() })
    }

    /// A zero-filled tensor.
    pub fn zeros(device: &Device, shape: &[usize]) -> Result<Self> {
        let n = numel("shape", shape)?;
        let slice = device.stream().alloc_zeros::<T>(n)?;
        Ok(DeviceTensor { data: slice, shape: shape.to_vec() })
    }

    /// Wraps an existing slice; its length must equal the product of `shape`.
    pub fn from_slice(data: CudaSlice<T>, shape: &[usize]) -> Result<Self> {
        let n = numel("shape", shape)?;
        if n != data.len() {
            return Err(Error::shape("data", &[n], &[data.len()]));
        }
        Ok(DeviceTensor { data, shape: shape.to_vec() })
    }

    /// Copies the tensor back to the host (this waits for the stream).
    pub fn to_host(&self) -> Result<Vec<T>> {
        Ok(self.data.stream().clone_dtoh(&self.data)?)
    }

    /// Overwrites the tensor from host data of the same length.
    pub fn copy_from_host(&mut self, data: &[T]) -> Result<()> {
        if data.len() != self.data.len() {
            return Err(Error::shape("data", &[self.data.len()], &[data.len()]));
        }
        let stream = self.data.stream().clone();
        stream.memcpy_htod(data, &mut self.data)?;
        Ok(())
    }

    /// Reinterprets the same elements with another shape of equal size.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        let n = numel("shape", shape)?;
        if n != self.data.len() {
            return Err(Error::shape("shape", &[self.data.len()], &[n]));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }
}

impl<T> DeviceTensor<T> {
    /// The shape, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.len() == 0
    }

    /// The underlying device slice (for launches: pass `&` for inputs).
    pub fn slice(&self) -> &CudaSlice<T> {
        &self.data
    }

    /// The underlying device slice, mutably (for launches: pass `&mut` for outputs).
    pub fn slice_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.data
    }

    /// Consumes the tensor, returning its slice.
    pub fn into_slice(self) -> CudaSlice<T> {
        self.data
    }
}
