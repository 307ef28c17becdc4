//! How a launch is named and sized: one typed kernel id for every kernel of every family,
//! and one grid-sizing helper that asks the driver for the occupancy of the kernel being
//! launched.
//!
//! A kernel's symbol is built from its parts, never written out by hand at a call site:
//! `ntkv_{op}[_{dtype}][_d{head_dim}][_br{rows}_bc{cols}][_{variant}]`, for example
//! `ntkv_attention_prefill_bf16_d128_br128_bc64_split` or `ntkv_topk_hist_f16`. Each family
//! lists every id its launchers can form ([`registered_kernels`]), and a test checks each
//! one against the compiled images (or, in a build without nvcc, the kernel sources), so a
//! misspelt kernel fails `cargo test`, not a run on a GPU.

use cudarc::driver::{CudaFunction, LaunchConfig};

use crate::device::{Device, Module};
use crate::error::{to_u32, Error, Result};
use crate::tensor::DType;

/// The typed name of one kernel: its module (family), op, and the dtype, head dim, tile and
/// variant it is specialised for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KernelId {
    module: Module,
    op: &'static str,
    dtype: Option<DType>,
    head_dim: Option<u32>,
    tile: Option<(u32, u32)>,
    variant: Option<&'static str>,
}

impl KernelId {
    /// The kernel `op` of `module`, with no specialisation yet.
    pub const fn new(module: Module, op: &'static str) -> Self {
        KernelId { module, op, dtype: None, head_dim: None, tile: None, variant: None }
    }

    /// Specialised for a storage dtype.
    pub const fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = Some(dtype);
        self
    }

    /// Specialised for a head dim.
    pub const fn head_dim(mut self, d: u32) -> Self {
        self.head_dim = Some(d);
        self
    }

    /// Specialised for a tile of `rows × cols`.
    pub const fn tile(mut self, rows: u32, cols: u32) -> Self {
        self.tile = Some((rows, cols));
        self
    }

    /// A named variant (an algorithm or a precision path).
    pub const fn variant(mut self, variant: &'static str) -> Self {
        self.variant = Some(variant);
        self
    }

    /// The module the kernel lives in.
    pub fn module(&self) -> Module {
        self.module
    }

    /// The symbol in the compiled image.
    pub fn symbol(&self) -> String {
        let mut s = format!("ntkv_{}", self.op);
        if let Some(dt) = self.dtype {
            s.push('_');
            s.push_str(dt.name());
        }
        if let Some(d) = self.head_dim {
            s.push_str(&format!("_d{d}"));
        }
        if let Some((r, c)) = self.tile {
            s.push_str(&format!("_br{r}_bc{c}"));
        }
        if let Some(v) = self.variant {
            s.push('_');
            s.push_str(v);
        }
        s
    }
}

impl std::fmt::Display for KernelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}::{}", self.module.name(), self.symbol())
    }
}

/// Every kernel id any launcher in this crate can form, family by family.
pub fn registered_kernels() -> Vec<KernelId> {
    let mut all = Vec::new();
    all.extend(crate::checks::kernels());
    all.extend(crate::timing::kernels());
    all.extend(crate::quant::gpu::kernels());
    all.extend(crate::topk::gpu::kernels());
    all.extend(crate::select::kernels());
    all.extend(crate::attention::plan::kernels());
    all.extend(crate::decode::gpu::kernels());
    all.extend(crate::ntk::gpu::kernels());
    all.extend(crate::gemm::kernels());
    all.extend(crate::cluster::gpu::kernels());
    all.extend(crate::pages::kernels());
    all.extend(crate::policy::kernels());
    all.extend(crate::lowrank::gpu::kernels());
    all.extend(crate::qdecode::gpu::kernels());
    all.sort();
    all.dedup();
    all
}

/// Whether `image` (an embedded fatbin) defines `symbol`: the ELF string tables inside an
/// uncompressed fatbin hold every entry point's name, NUL-terminated.
pub fn image_has_symbol(image: &[u8], symbol: &str) -> bool {
    let mut needle = Vec::with_capacity(symbol.len() + 2);
    needle.push(0u8);
    needle.extend_from_slice(symbol.as_bytes());
    needle.push(0u8);
    image.windows(needle.len()).any(|w| w == needle.as_slice())
}

/// How many blocks of `f` fit on one SM at `block` threads and `smem` bytes of dynamic
/// shared memory, as the driver computes it from the kernel's registers and shared memory.
///
/// # Errors
/// [`Error::Internal`] when not even one block fits (the launch would fail).
pub fn blocks_per_sm(f: &CudaFunction, block: u32, smem: u32) -> Result<u32> {
    let n = f.occupancy_max_active_blocks_per_multiprocessor(block, smem as usize, None)?;
    if n == 0 {
        return Err(Error::internal(format!(
            "a block of {block} threads with {smem} bytes of shared memory fits no SM"
        )));
    }
    Ok(n)
}

/// The one grid-sizing policy of the crate.
///
/// `work_blocks` is how many blocks the work could use (one per tile, row, …). Kernels that
/// loop over their work with a grid stride pass `resident = true`: the grid is then capped at
/// the number of blocks that are resident at once on the whole device (occupancy × SMs), so
/// the launch is exactly one wave. Kernels that need one block per work item pass `false`
/// and get `work_blocks` (checked against the grid limit).
///
/// # Errors
/// [`Error::TooLarge`] when the grid does not fit a launch; [`Error::Internal`] when a
/// block does not fit an SM.
pub fn grid_for(
    device: &Device,
    f: &CudaFunction,
    block: u32,
    smem: u32,
    work_blocks: usize,
    resident: bool,
) -> Result<LaunchConfig> {
    let work = work_blocks.max(1);
    let blocks = if resident {
        let per_sm = blocks_per_sm(f, block, smem)? as usize;
        work.min(per_sm * device.props().sm_count.max(1) as usize)
    } else {
        work
    };
    if blocks > i32::MAX as usize {
        return Err(Error::too_large("grid", format!("{blocks} blocks exceed the launch limit of 2^31 - 1")));
    }
    Ok(LaunchConfig { grid_dim: (to_u32("grid", blocks)?, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: smem })
}

/// [`grid_for`] for a grid-stride kernel with one item per thread: `items` items in blocks of
/// `block` threads, no dynamic shared memory, capped at one resident wave.
///
/// # Errors
/// As [`grid_for`].
pub fn grid_stride(device: &Device, f: &CudaFunction, block: u32, items: usize) -> Result<LaunchConfig> {
    grid_for(device, f, block, 0, items.div_ceil(block.max(1) as usize), true)
}

/// Looks up `id` and sizes its grid with [`grid_stride`]: the function and launch
/// configuration of an elementwise grid-stride kernel over `items` items.
///
/// # Errors
/// As [`Device::kernel`] and [`grid_for`].
pub fn grid_stride_kernel(
    device: &Device,
    id: KernelId,
    block: u32,
    items: usize,
) -> Result<(CudaFunction, LaunchConfig)> {
    let f = device.kernel(id)?;
    let cfg = grid_stride(device, &f, block, items)?;
    Ok((f, cfg))
}

/// The grid-stride form of [`grid_for`] with a second axis: `y` rows of work (heads; at most
/// 65535, the kernels stride over the rest) times `x_items` items per row at one item per
/// thread. The whole grid is one resident wave: `x` is capped so that `x · y` blocks do not
/// exceed occupancy × SMs (but at least one block per row).
///
/// # Errors
/// As [`grid_for`].
pub fn resident_grid_2d(
    device: &Device,
    f: &CudaFunction,
    block: u32,
    smem: u32,
    x_items: usize,
    y: usize,
) -> Result<LaunchConfig> {
    let per_sm = blocks_per_sm(f, block, smem)? as usize;
    let gy = y.clamp(1, 65535);
    let target = per_sm * (device.props().sm_count.max(1) as usize);
    let gx = x_items.div_ceil(block.max(1) as usize).clamp(1, (target / gy).max(1));
    grid_2d(gx, gy, block, smem)
}

/// A two-dimensional grid of `x × y` blocks (`y` at most 65535), checked.
///
/// # Errors
/// [`Error::TooLarge`] when either extent does not fit a launch.
pub fn grid_2d(x: usize, y: usize, block: u32, smem: u32) -> Result<LaunchConfig> {
    if x > i32::MAX as usize {
        return Err(Error::too_large("grid", format!("{x} blocks exceed the launch limit of 2^31 - 1")));
    }
    if y > 65535 {
        return Err(Error::too_large("grid", format!("{y} blocks exceed the launch limit of 65535 in y")));
    }
    Ok(LaunchConfig {
        grid_dim: (to_u32("grid", x.max(1))?, to_u32("grid", y.max(1))?, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem,
    })
}

/// `Debug` for a plan: its name and the listed fields (`label = field` where they differ);
/// device handles and buffers are left out.
macro_rules! plan_debug {
    ($plan:ty, $name:expr, $($label:ident $(= $field:ident)?),+) => {
        impl std::fmt::Debug for $plan {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let mut s = f.debug_struct($name);
                $(s.field(stringify!($label), $crate::launch::plan_debug!(@field self, $label $(, $field)?));)+
                s.finish()
            }
        }
    };
    (@field $plan:ident, $label:ident) => { &$plan.$label };
    (@field $plan:ident, $label:ident, $field:ident) => { &$plan.$field };
}
pub(crate) use plan_debug;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_compose_in_a_fixed_order() {
        let id = KernelId::new(Module::Attention, "attention_prefill")
            .dtype(DType::BF16)
            .head_dim(128)
            .tile(128, 64)
            .variant("split");
        assert_eq!(id.symbol(), "ntkv_attention_prefill_bf16_d128_br128_bc64_split");
        assert_eq!(KernelId::new(Module::Topk, "topk_hist").dtype(DType::F16).symbol(), "ntkv_topk_hist_f16");
    }

    #[test]
    fn symbol_search_needs_the_whole_name() {
        let image = b"\0ntkv_topk_hist_f16\0ntkv_topk_filter_f32\0";
        assert!(image_has_symbol(image, "ntkv_topk_hist_f16"));
        assert!(!image_has_symbol(image, "ntkv_topk_hist_f1"));
        assert!(!image_has_symbol(image, "topk_hist_f16"));
    }
}
