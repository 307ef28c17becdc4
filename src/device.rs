//! The device handle: one CUDA context and stream, the device's properties, and a lazy
//! cache of kernel modules and functions.
//!
//! A [`Device`] is cheap to clone and can be shared across threads. Every ntkv call
//! enqueues its work on the device's stream in order; results are ready when a host copy
//! (for example [`crate::DeviceTensor::to_host`]) or [`Device::synchronize`] returns.
//!
//! ## Streams and ordering
//! - [`Device::new`] creates its own context handle and one stream. ntkv issues everything on
//!   that single stream, so cudarc's per-buffer event tracking (an event record and a stream
//!   wait per buffer per launch, there to order work across streams) is turned off for it.
//! - [`Device::from_stream`] runs ntkv on a stream that the caller already has (candle's or
//!   burn's, for example). ntkv's work is then ordered with the caller's own work on that
//!   stream, in call order, and ntkv never synchronizes it except where a function says so
//!   (a host copy, or a validator that reads a flag back). Event tracking stays as the
//!   caller's context has it. Memory that another stream writes must be ready before the
//!   ntkv call is enqueued: record an event there and wait on it here, or let cudarc's event
//!   tracking do so.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, CudaStream};

use crate::error::{Error, Result};
use crate::kernels;
use crate::launch::KernelId;
use crate::tensor::{DeviceKey, TensorRef};

/// One kernel module: the fatbin compiled from `cuda/<name>.cu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Module {
    /// `cuda/common.cu`: copy ceiling, finiteness scan.
    Common,
    /// `cuda/quant.cu`: group-wise quantization and the MiKV cache.
    Quant,
    /// `cuda/decode.cu`: sparse-index decode attention.
    Decode,
    /// `cuda/attention.cu`: block-sparse flash attention prefill.
    Attention,
    /// `cuda/ntk.cu`: NTK Jacobian contractions, the factored MLP NTK and kernel metrics.
    Ntk,
    /// `cuda/topk.cu`: radix top-k, H2O accumulation and eviction, SnapKV selection.
    Topk,
    /// `cuda/select.cu`: the shared selection module's segment padding, truncation and
    /// block-to-token expansion.
    Select,
    /// `cuda/cluster.cu`: k-means of keys and cluster retrieval.
    Cluster,
    /// `cuda/pages.cu`: Quest page bounds and ShadowKV chunk landmarks.
    Pages,
    /// `cuda/lowrank.cu`: ShadowKV low-rank key reconstruction (fused gather + GEMM + RoPE).
    Lowrank,
    /// `cuda/qdecode.cu`: fused decode attention over quantized KV caches.
    Qdecode,
    /// `cuda/policy.cu`: WindowKV window sums, LazyEviction state, PrefixKV budgets.
    Policy,
}

/// Finds a kernel module by its `.cu` stem (`"quant"`, `"topk"`, …).
impl std::str::FromStr for Module {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Module::ALL
            .iter()
            .copied()
            .find(|m| m.name() == s)
            .ok_or_else(|| Error::invalid("module", format!("no kernel module named {s:?}")))
    }
}

impl Module {
    /// Every module, in file order.
    pub const ALL: &'static [Module] = &[
        Module::Common,
        Module::Quant,
        Module::Topk,
        Module::Select,
        Module::Attention,
        Module::Decode,
        Module::Ntk,
        Module::Cluster,
        Module::Pages,
        Module::Lowrank,
        Module::Qdecode,
        Module::Policy,
    ];

    /// The module's name: the stem of its `.cu` file.
    pub fn name(self) -> &'static str {
        match self {
            Module::Common => "common",
            Module::Quant => "quant",
            Module::Decode => "decode",
            Module::Attention => "attention",
            Module::Ntk => "ntk",
            Module::Topk => "topk",
            Module::Select => "select",
            Module::Cluster => "cluster",
            Module::Pages => "pages",
            Module::Lowrank => "lowrank",
            Module::Qdecode => "qdecode",
            Module::Policy => "policy",
        }
    }

    /// The embedded fatbin, or `None` when the crate was built without nvcc.
    pub fn image(self) -> Option<&'static [u8]> {
        match self {
            Module::Common => kernels::COMMON,
            Module::Quant => kernels::QUANT,
            Module::Decode => kernels::DECODE,
            Module::Attention => kernels::ATTENTION,
            Module::Ntk => kernels::NTK,
            Module::Topk => kernels::TOPK,
            Module::Select => kernels::SELECT,
            Module::Cluster => kernels::CLUSTER,
            Module::Pages => kernels::PAGES,
            Module::Lowrank => kernels::LOWRANK,
            Module::Qdecode => kernels::QDECODE,
            Module::Policy => kernels::POLICY,
        }
    }
}

/// Whether this build carries compiled kernels (nvcc was found at build time).
pub fn kernels_built() -> bool {
    Module::ALL.iter().all(|m| m.image().is_some())
}

/// The architectures the embedded kernels carry SASS for (for example `sm_80,sm_90`),
/// or an empty string when they were not built.
pub fn built_archs() -> &'static str {
    kernels::BUILT_ARCHS
}

/// Properties read once when the device is opened.
#[derive(Clone, Debug)]
pub struct DeviceProps {
    /// The device's name as the driver reports it.
    pub name: String,
    /// Compute capability `(major, minor)`.
    pub compute_capability: (i32, i32),
    /// Number of streaming multiprocessors.
    pub sm_count: u32,
    /// Most dynamic shared memory one block may opt in to, in bytes.
    pub max_shared_mem_per_block_optin: u32,
    /// Shared memory per SM, in bytes.
    pub shared_mem_per_sm: u32,
    /// L2 cache size, in bytes.
    pub l2_cache_bytes: u64,
    /// Global memory, in bytes.
    pub total_mem_bytes: u64,
}

struct Inner {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    props: DeviceProps,
    modules: RwLock<HashMap<Module, Arc<CudaModule>>>,
    functions: RwLock<HashMap<KernelId, CudaFunction>>,
}

/// A CUDA device with its context, stream and kernel cache. Clone to share.
#[derive(Clone)]
pub struct Device {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("ordinal", &self.inner.ordinal).field("props", &self.inner.props).finish()
    }
}

/// Whether the CUDA driver library can be loaded. Never panics.
pub fn driver_present() -> bool {
    // SAFETY: is_culib_present only tries to dlopen libcuda and drops the handle.
    unsafe { sys::is_culib_present() }
}

impl Device {
    /// Opens device `ordinal` on a new stream.
    ///
    /// # Errors
    /// [`Error::NoDriver`] when `libcuda` is absent (this never panics),
    /// [`Error::NoDevice`] when the ordinal is out of range, [`Error::Driver`] otherwise.
    pub fn new(ordinal: usize) -> Result<Self> {
        // cudarc's dynamic loading panics when libcuda is missing; probe first.
        if !driver_present() {
            return Err(Error::NoDriver);
        }
        cudarc::driver::result::init()?;
        let count = usize::try_from(CudaContext::device_count()?).unwrap_or(0);
        if ordinal >= count {
            return Err(Error::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: this context handle is ntkv's own, and every buffer ntkv allocates through
        // it is used on the one stream created below, where launches are ordered by the
        // stream itself, so the per-buffer events cudarc would record add driver calls and
        // order nothing. Buffers a caller brings from other streams arrive through
        // `from_stream` or views, whose own context keeps its tracking setting.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        Self::with_stream(ordinal, ctx, stream)
    }

    /// Runs ntkv on a stream the caller already has: a candle or burn stream, or any cudarc
    /// [`CudaStream`]. No new context or stream is created, and the caller's event-tracking
    /// setting is left as it is. See the module docs for the ordering contract.
    ///
    /// # Errors
    /// [`Error::Driver`] when the device's properties cannot be read.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context().clone();
        let ordinal = ctx.ordinal();
        Self::with_stream(ordinal, ctx, stream)
    }

    fn with_stream(ordinal: usize, ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Result<Self> {
        let attr = |a: sys::CUdevice_attribute| -> Result<u32> { Ok(u32::try_from(ctx.attribute(a)?).unwrap_or(0)) };
        use sys::CUdevice_attribute as A;
        let total_mem_bytes = ctx.mem_get_info()?.1 as u64;
        let props = DeviceProps {
            name: ctx.name()?,
            compute_capability: ctx.compute_capability()?,
            sm_count: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            max_shared_mem_per_block_optin: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?,
            shared_mem_per_sm: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)?,
            l2_cache_bytes: u64::from(attr(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?),
            total_mem_bytes,
        };
        Ok(Device {
            inner: Arc::new(Inner {
                ordinal,
                ctx,
                stream,
                props,
                modules: RwLock::new(HashMap::new()),
                functions: RwLock::new(HashMap::new()),
            }),
        })
    }

    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        self.inner.ordinal
    }

    /// Properties read when the device was opened.
    pub fn props(&self) -> &DeviceProps {
        &self.inner.props
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.inner.ctx
    }

    /// The stream every ntkv call on this device enqueues its work on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    /// The identity of this device's context; tensors carry the same key.
    pub fn key(&self) -> DeviceKey {
        DeviceKey::of_stream(&self.inner.stream)
    }

    /// Checks that tensor `arg` lives on this device.
    ///
    /// # Errors
    /// [`Error::DeviceMismatch`] naming `arg` otherwise.
    pub fn check_tensor<T>(&self, arg: &'static str, t: &(impl TensorRef<T> + ?Sized)) -> Result<()> {
        self.check_key(arg, t.device_key())
    }

    /// Checks that buffer `arg` lives on this device, has exactly `shape`, and holds exactly
    /// as many elements as that shape: a shape alone is never trusted, since a [`TensorRef`]
    /// implemented outside the crate could report one its length does not match, and every
    /// launch relies on the length.
    ///
    /// # Errors
    /// [`Error::DeviceMismatch`], [`Error::Shape`] or [`Error::TooLarge`] naming `arg`.
    pub fn check_buffer<T>(&self, arg: &'static str, t: &(impl TensorRef<T> + ?Sized), shape: &[usize]) -> Result<()> {
        self.check_tensor(arg, t)?;
        crate::error::check_shape(arg, shape, t.shape())?;
        let n = crate::tensor::checked_numel::<T>(arg, shape)?;
        if t.len() != n {
            return Err(Error::shape(arg, &[n], &[t.len()]));
        }
        Ok(())
    }

    /// Checks that something made on the device with key `key` (a tensor, a plan) may be
    /// used on this device.
    ///
    /// # Errors
    /// [`Error::DeviceMismatch`] naming `arg` otherwise.
    pub fn check_key(&self, arg: &'static str, key: DeviceKey) -> Result<()> {
        let mine = self.key();
        if key == mine {
            Ok(())
        } else {
            Err(Error::DeviceMismatch { arg, expected: mine.ordinal(), actual: key.ordinal() })
        }
    }

    /// Blocks until all work enqueued on the device's stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.stream.synchronize()?;
        Ok(())
    }

    /// Loads (once) and returns the kernel `id`.
    ///
    /// The fast path takes a read lock; the module is loaded under the write lock the first
    /// time any of its functions is asked for, so a user of one family pays for no other.
    ///
    /// # Errors
    /// [`Error::KernelsNotBuilt`] in a build without nvcc; [`Error::ModuleLoad`] when the
    /// image lacks the symbol (a test checks every id the launchers can form, so this means
    /// a stale build).
    pub fn kernel(&self, id: KernelId) -> Result<CudaFunction> {
        if let Some(f) = self.inner.functions.read().ok().and_then(|m| m.get(&id).cloned()) {
            return Ok(f);
        }
        let loaded = self.module(id.module())?;
        let symbol = id.symbol();
        let f = loaded.load_function(&symbol).map_err(|source| Error::ModuleLoad {
            module: id.module().name(),
            what: symbol.clone(),
            source,
        })?;
        if let Ok(mut map) = self.inner.functions.write() {
            map.insert(id, f.clone());
        }
        Ok(f)
    }

    fn module(&self, module: Module) -> Result<Arc<CudaModule>> {
        if let Some(m) = self.inner.modules.read().ok().and_then(|m| m.get(&module).cloned()) {
            return Ok(m);
        }
        let mut map = self
            .inner
            .modules
            .write()
            .map_err(|_| Error::internal("module cache lock poisoned by a panic in another thread"))?;
        if let Some(m) = map.get(&module) {
            return Ok(m.clone());
        }
        let image = module.image().ok_or(Error::KernelsNotBuilt { module: module.name() })?;
        let loaded = self
            .inner
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))
            .map_err(|source| Error::ModuleLoad { module: module.name(), what: "module".to_owned(), source })?;
        map.insert(module, loaded.clone());
        Ok(loaded)
    }

    /// Checks a dynamic shared-memory request against the device's opt-in limit and, above
    /// the 48 KiB default, raises the function's limit so the launch can use it.
    pub fn prepare_shared_mem(&self, f: &CudaFunction, bytes: usize) -> Result<u32> {
        let limit = self.inner.props.max_shared_mem_per_block_optin as usize;
        if bytes > limit {
            return Err(Error::too_large(
                "shared memory",
                format!("kernel needs {bytes} bytes of shared memory; the device allows {limit}"),
            ));
        }
        let b = crate::error::to_u32("shared memory", bytes)?;
        if bytes > 48 * 1024 {
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                i32::try_from(bytes).unwrap_or(i32::MAX),
            )?;
        }
        Ok(b)
    }
}
