"""The CUDA occupancy calculator (cuda_occupancy.h, `cudaOccMaxActiveBlocksPerMultiprocessor`),
for a device with no partitioned global caching and the default shared-memory carveout (the
driver picks the largest carveout, 228 KiB on sm_90, when the kernel sets no preference).

blocks/SM = min(block limit, warp limit, register limit, shared-memory limit), where for a
block of `T` threads using `R` registers per thread and `S` bytes of shared memory:

- warps per block      W = ceil(T / 32)
- block limit          32 (max resident blocks per SM)
- warp limit           floor(64 / W) (2048 threads per SM)
- warps and threads    0 when T > 1024 (max threads per block)
- registers per warp   Rw = roundup(R * 32, 256) (allocation unit 256 registers per warp)
- register limit       registers are split over 4 sub-partitions of 16384; each holds
                       floor(16384 / Rw) warps, so floor(4 * floor(16384 / Rw) / W) blocks;
                       0 when Rw * roundup(W, 4) > 65536 (the hardware's per-block check,
                       which assumes every sub-partition is allocated at once),
                       Rw * W > 65536, or R > 255
- shared memory        per block roundup(S_static + S_dynamic + 1024, 128) (1 KiB reserved per
                       block by the system); limit floor(233472 / that); 0 when
                       S_static + S_dynamic > 232448 (the 227 KiB opt-in maximum; the
                       launchers opt in with cuFuncSetAttribute before a launch above 48 KiB)
- a block larger than its `__launch_bounds__` maximum does not launch (0).

occupancy = blocks * W / 64.
"""

from collections import namedtuple

Device = namedtuple(
    "Device",
    "name sm_count max_threads_per_sm max_blocks_per_sm regs_per_sm regs_per_block reg_alloc_unit "
    "sub_partitions max_threads_per_block max_regs_per_thread smem_per_sm smem_per_block_optin "
    "smem_reserved_per_block smem_alloc_unit warp_size",
)

H200 = Device(
    name="NVIDIA H200 (sm_90)",
    sm_count=132,
    max_threads_per_sm=2048,
    max_blocks_per_sm=32,
    regs_per_sm=65536,
    regs_per_block=65536,
    reg_alloc_unit=256,
    sub_partitions=4,
    max_threads_per_block=1024,
    max_regs_per_thread=255,
    smem_per_sm=228 * 1024,
    smem_per_block_optin=227 * 1024,
    smem_reserved_per_block=1024,
    smem_alloc_unit=128,
    warp_size=32,
)

Occupancy = namedtuple("Occupancy", "blocks percent limiter limits")


def _round_up(x, m):
    return (x + m - 1) // m * m


def blocks_per_sm(dev, regs, smem_static, smem_dynamic, block, max_threads=None):
    """Resident blocks per SM, the occupancy in percent, and what limits it."""
    if block <= 0:
        raise ValueError("block must be positive")
    warps = -(-block // dev.warp_size)
    max_warps = dev.max_threads_per_sm // dev.warp_size
    limits = {"blocks": dev.max_blocks_per_sm, "warps": max_warps // warps}
    if block > dev.max_threads_per_block:
        limits["warps"] = 0

    regs_per_warp = _round_up(regs * dev.warp_size, dev.reg_alloc_unit)
    if regs_per_warp == 0:
        limits["regs"] = dev.max_blocks_per_sm
    elif (regs_per_warp * _round_up(warps, dev.sub_partitions) > dev.regs_per_block
          or regs_per_warp * warps > dev.regs_per_block
          or regs > dev.max_regs_per_thread):
        limits["regs"] = 0
    else:
        per_partition = (dev.regs_per_sm // dev.sub_partitions) // regs_per_warp
        limits["regs"] = per_partition * dev.sub_partitions // warps

    smem = smem_static + smem_dynamic
    if smem > dev.smem_per_block_optin:
        limits["smem"] = 0
    else:
        alloc = _round_up(smem + dev.smem_reserved_per_block, dev.smem_alloc_unit)
        limits["smem"] = dev.smem_per_sm // alloc

    if max_threads is not None:
        mt = max_threads[0] * max_threads[1] * max_threads[2]
        if block > mt:
            limits["launch_bounds"] = 0

    blocks = min(limits.values())
    order = ["launch_bounds", "regs", "smem", "warps", "blocks"]
    limiter = "+".join(k for k in order if k in limits and limits[k] == blocks)
    percent = 100.0 * blocks * warps / max_warps
    return Occupancy(blocks, percent, limiter, limits)


def self_test():
    """Known answers of the calculator for sm_90."""
    cases = [
        # (regs, static smem, dynamic smem, block) -> blocks
        ((40, 0, 0, 512), 3),  # 1280 regs/warp: 12 warps per sub-partition -> 48 warps
        ((32, 0, 0, 512), 4),
        ((128, 528, 0, 128), 4),  # 25% occupancy
        ((64, 0, 0, 1024), 1),
        ((65, 0, 0, 1024), 0),  # 2304 regs/warp x 32 warps > 64K
        ((255, 0, 0, 96), 2),  # 3 warps, allocated as 4 for the per-block check
        ((16, 0, 0, 256), 8),  # warp limit
        ((16, 0, 0, 32), 32),  # block limit
        ((32, 0, 110592, 128), 2),  # 2 x (110592 + 1024) <= 233472
        ((32, 0, 232448, 128), 1),
        ((32, 0, 232449, 128), 0),  # above the opt-in maximum
        ((32, 2048, 81920, 1024), 2),
        ((40, 2048, 131072, 1024), 1),
        ((16, 0, 0, 1056), 0),  # above 1024 threads per block
        ((256, 0, 0, 32), 0),  # above 255 registers per thread
        ((36, 16528, 0, 512), 3),  # ntkv_topk_hist: the review's "3 fit, not 4"
        ((32, 16528, 0, 512), 4),  # ... and at <= 32 registers
        ((120, 0, 82752, 128), 2),  # decode attention, d128: shared-memory limited
    ]
    for (regs, s, d, b), want in cases:
        got = blocks_per_sm(H200, regs, s, d, b).blocks
        assert got == want, f"regs={regs} smem={s}+{d} block={b}: got {got}, want {want}"
    assert blocks_per_sm(H200, 40, 0, 0, 512).percent == 75.0
    assert blocks_per_sm(H200, 32, 0, 0, 512, [256, 1, 1]).blocks == 0
