//! Storage dtypes and the typed device tensor.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr, DeviceSlice, ValidAsZeroBits};
use half::{bf16, f16};

use crate::device::Device;
use crate::error::{Error, Result};

/// A storage dtype of a floating-point tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
/// Conversions go through `f32`, the type all arithmetic happens in on the GPU.
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

/// `Float` of a `half` type, through its own f32 conversions (round to nearest even).
macro_rules! half_float {
    ($ty:ident, $dtype:ident) => {
        impl Float for $ty {
            const DTYPE: DType = DType::$dtype;
            fn to_f32(self) -> f32 {
                $ty::to_f32(self)
            }
            fn from_f32(x: f32) -> Self {
                $ty::from_f32(x)
            }
        }
    };
}

half_float!(f16, F16);
half_float!(bf16, BF16);

/// A contiguous row-major tensor in device memory that ntkv owns: a `CudaSlice<T>` plus its
/// shape (outermost first).
///
/// `T` is any plain-data element the kernels use: `f32`, `f16`, `bf16`, `u32`, `u8`, …
///
/// The length always equals the product of the shape: no safe call can swap the buffer for
/// one of another length. A tensor knows its device (the context of the stream it was
/// allocated on), and an operation on another device rejects it with
/// [`Error::DeviceMismatch`]. To run on memory that ntkv does not own (one layer of a larger
/// cache, a candle or burn buffer), wrap a cudarc view in [`TensorView`] or [`TensorViewMut`]:
/// every operation takes any [`TensorRef`] / [`TensorMut`].
///
/// The slice inside cannot be replaced from outside the crate:
///
/// ```compile_fail
/// fn swap(t: &mut ntkv::DeviceTensor<f32>, other: ntkv::cudarc::driver::CudaSlice<f32>) {
///     *t.slice_mut() = other; // not public: the length would no longer match the shape
/// }
/// ```
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

/// The number of elements of a shape of `T`, checked so that the byte size `numel ·
/// size_of::<T>()` also fits (`isize::MAX` bytes, the most any allocation may span).
pub fn checked_numel<T>(arg: &'static str, shape: &[usize]) -> Result<usize> {
    let n = numel(arg, shape)?;
    let bytes = n.checked_mul(std::mem::size_of::<T>().max(1));
    match bytes {
        Some(b) if b <= isize::MAX as usize => Ok(n),
        _ => Err(Error::too_large(
            arg,
            format!("shape {shape:?} of {}-byte elements overflows the address space", std::mem::size_of::<T>()),
        )),
    }
}

/// Identifies the device (CUDA context) a buffer lives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceKey {
    ctx: usize,
    ordinal: usize,
}

impl DeviceKey {
    /// The key of the context that `stream` belongs to.
    pub fn of_stream(stream: &Arc<CudaStream>) -> Self {
        let ctx = stream.context();
        DeviceKey { ctx: ctx.cu_ctx() as usize, ordinal: ctx.ordinal() }
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
}

/// Read access to a device tensor: an owned [`DeviceTensor`], or a borrowed [`TensorView`] /
/// [`TensorViewMut`] over memory that ntkv does not own. Every operation's inputs take this.
pub trait TensorRef<T> {
    /// The shape, outermost first. Its product equals [`len`](Self::len).
    fn shape(&self) -> &[usize];
    /// A cudarc view of exactly the tensor's elements (for launches: pass `&` for inputs).
    fn cuda_view(&self) -> CudaView<'_, T>;
    /// The stream the memory was allocated on (its context identifies the device).
    fn alloc_stream(&self) -> &Arc<CudaStream>;
    /// Number of elements.
    fn len(&self) -> usize {
        self.cuda_view().len()
    }
    /// Whether the tensor has no elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The device the memory lives on.
    fn device_key(&self) -> DeviceKey {
        DeviceKey::of_stream(self.alloc_stream())
    }
}

/// Write access to a device tensor. Every operation's outputs take this.
pub trait TensorMut<T>: TensorRef<T> {
    /// A mutable cudarc view of exactly the tensor's elements (for launches: pass `&mut`).
    fn cuda_view_mut(&mut self) -> CudaViewMut<'_, T>;
}

impl<T: DeviceRepr + ValidAsZeroBits + Copy> DeviceTensor<T> {
    /// Copies `data` to the device with the given shape.
    ///
    /// # Errors
    /// [`Error::Shape`] when `data.len()` is not the product of `shape`; [`Error::TooLarge`]
    /// when the byte size overflows.
    pub fn from_host(device: &Device, data: &[T], shape: &[usize]) -> Result<Self> {
        let n = checked_numel::<T>("data", shape)?;
        if n != data.len() {
            return Err(Error::shape("data", &[n], &[data.len()]));
        }
        let slice = device.stream().clone_htod(data)?;
        Ok(DeviceTensor { data: slice, shape: shape.to_vec() })
    }

    /// A zero-filled tensor.
    ///
    /// # Errors
    /// [`Error::TooLarge`] when the element count or the byte size overflows; driver errors
    /// (out of memory) from the allocation.
    pub fn zeros(device: &Device, shape: &[usize]) -> Result<Self> {
        let n = checked_numel::<T>("shape", shape)?;
        let slice = device.stream().alloc_zeros::<T>(n)?;
        Ok(DeviceTensor { data: slice, shape: shape.to_vec() })
    }

    /// Wraps an existing slice; its length must equal the product of `shape`.
    pub fn from_slice(data: CudaSlice<T>, shape: &[usize]) -> Result<Self> {
        let n = checked_numel::<T>("shape", shape)?;
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

    /// A mutable view of the elements (for launches: pass `&mut` for outputs). A view can
    /// be written through but not replaced, so the length stays that of the shape.
    pub fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.data.as_view_mut()
    }

    /// A borrowed view with the same shape.
    pub fn as_view(&self) -> TensorView<'_, T> {
        TensorView { view: self.data.as_view(), shape: self.shape.clone() }
    }

    /// A borrowed mutable view with the same shape.
    pub fn as_view_mut(&mut self) -> TensorViewMut<'_, T> {
        let shape = self.shape.clone();
        TensorViewMut { view: self.data.as_view_mut(), shape }
    }

    /// The device the tensor lives on.
    pub fn device_key(&self) -> DeviceKey {
        DeviceKey::of_stream(self.data.stream())
    }

    /// Consumes the tensor, returning its slice.
    pub fn into_slice(self) -> CudaSlice<T> {
        self.data
    }
}

impl<T> TensorRef<T> for DeviceTensor<T> {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn cuda_view(&self) -> CudaView<'_, T> {
        self.data.as_view()
    }
    fn alloc_stream(&self) -> &Arc<CudaStream> {
        self.data.stream()
    }
}

impl<T> TensorMut<T> for DeviceTensor<T> {
    fn cuda_view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.data.as_view_mut()
    }
}

/// The shape of a view of `len` elements, checked.
fn view_shape<T>(len: usize, shape: &[usize]) -> Result<Vec<usize>> {
    let n = checked_numel::<T>("shape", shape)?;
    if n != len {
        return Err(Error::shape("view", &[n], &[len]));
    }
    Ok(shape.to_vec())
}

/// A view type: a cudarc view plus a checked shape, and its constructor.
macro_rules! view_type {
    ($(#[$doc:meta])* $name:ident, $view:ident) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name<'a, T> {
            view: $view<'a, T>,
            shape: Vec<usize>,
        }

        impl<'a, T> $name<'a, T> {
            /// Wraps `view` with `shape`; the view's length must equal the product of the shape.
            ///
            /// # Errors
            /// [`Error::Shape`] on a length mismatch, [`Error::TooLarge`] on overflow.
            pub fn new(view: $view<'a, T>, shape: &[usize]) -> Result<Self> {
                let shape = view_shape::<T>(view.len(), shape)?;
                Ok($name { view, shape })
            }
        }
    };
}

view_type!(
    /// A borrowed, read-only tensor over device memory that ntkv does not own: a cudarc
    /// [`CudaView`] (for example `slice.slice(a..b)`, one layer of a larger cache) plus a shape.
    /// No copy is made.
    TensorView,
    CudaView
);

view_type!(
    /// A borrowed, writable tensor over device memory that ntkv does not own: a cudarc
    /// [`CudaViewMut`] plus a shape. No copy is made.
    TensorViewMut,
    CudaViewMut
);

/// The whole of a read-only view, reborrowed.
trait Full<T> {
    fn full(&self) -> CudaView<'_, T>;
}

impl<T> Full<T> for CudaView<'_, T> {
    fn full(&self) -> CudaView<'_, T> {
        self.slice(..)
    }
}

/// `TensorRef` of a view type: its shape, a reborrow of its cudarc view, its stream.
macro_rules! view_tensor_ref {
    ($ty:ident, $reborrow:ident) => {
        impl<T> TensorRef<T> for $ty<'_, T> {
            fn shape(&self) -> &[usize] {
                &self.shape
            }
            fn cuda_view(&self) -> CudaView<'_, T> {
                self.view.$reborrow()
            }
            fn alloc_stream(&self) -> &Arc<CudaStream> {
                self.view.stream()
            }
        }
    };
}

view_tensor_ref!(TensorView, full);

view_tensor_ref!(TensorViewMut, as_view);

impl<T> TensorMut<T> for TensorViewMut<'_, T> {
    fn cuda_view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.view.slice_mut(..)
    }
}
