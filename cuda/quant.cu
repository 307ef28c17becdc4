// quant.cu: group-wise quantization and the MiKV cache (SPEC §1).
//
// Every quantize/dequantize kernel works on one strided region (NtkvQuantParams): `heads`
// blocks of [tokens, dim] values. blockIdx.y strides over heads, x threads grid-stride over
// the items of a head. The f32 arithmetic mirrors src/quant/cpu.rs operation for operation:
// __fsub_rn/__fmul_rn/__fdiv_rn keep nvcc from contracting (x - mn) * inv into an FMA, a
// magic-number add rounds half to even (encode), and dequantization is one __fmaf_rn, so
// codes are bit-exact.
#include "ntkv_common.cuh"

namespace {

// The smallest magnitude that rounds to infinity in f16: inputs must stay below it.
constexpr float kF16Limit = 65520.0f;

__device__ __forceinline__ bool quantizable(float x) { return fabsf(x) < kF16Limit; }

// Raw bits of a storage value, so vectors are packed with integer ops in registers (a memcpy
// between a T array and a uint4 let nvcc split 16-byte stores into 4-byte ones).
template <typename T> struct RawBits;
template <> struct RawBits<float> {
    static __device__ __forceinline__ uint32_t to(float v) { return __float_as_uint(v); }
    static __device__ __forceinline__ float from(uint32_t u) { return __uint_as_float(u); }
};
template <> struct RawBits<__half> {
    static __device__ __forceinline__ uint32_t to(__half v) { return (uint32_t)__half_as_ushort(v); }
    static __device__ __forceinline__ __half from(uint32_t u) { return __ushort_as_half((unsigned short)u); }
};
template <> struct RawBits<__nv_bfloat16> {
    static __device__ __forceinline__ uint32_t to(__nv_bfloat16 v) { return (uint32_t)__bfloat16_as_ushort(v); }
    static __device__ __forceinline__ __nv_bfloat16 from(uint32_t u) {
        return __ushort_as_bfloat16((unsigned short)u);
    }
};

// Unpacks 32-bit words holding 4-byte or two 2-byte values (low half first) into f32.
template <typename T, int N>
__device__ __forceinline__ void unpack_words(const uint32_t* wds, float (&v)[N]) {
    if constexpr (sizeof(T) == 4) {
#pragma unroll
        for (int j = 0; j < N; ++j) v[j] = ntkv::to_f32(RawBits<T>::from(wds[j]));
    } else {
#pragma unroll
        for (int j = 0; j < N; ++j) v[j] = ntkv::to_f32(RawBits<T>::from((wds[j / 2] >> (16 * (j % 2))) & 0xffffu));
    }
}

template <typename T, int N>
__device__ __forceinline__ void pack_words(const float (&v)[N], uint32_t* wds) {
    if constexpr (sizeof(T) == 4) {
#pragma unroll
        for (int j = 0; j < N; ++j) wds[j] = RawBits<T>::to(ntkv::from_f32<T>(v[j]));
    } else {
#pragma unroll
        for (int j = 0; j < N / 2; ++j)
            wds[j] = RawBits<T>::to(ntkv::from_f32<T>(v[2 * j])) | (RawBits<T>::to(ntkv::from_f32<T>(v[2 * j + 1])) << 16);
    }
}

// kWords words as __ldg loads of V (uint4 or uint2) from q, V-aligned.
template <typename V, int kWords>
__device__ __forceinline__ void ldg_words(const V* q, uint32_t (&wds)[kWords]) {
    constexpr int kPer = (int)sizeof(V) / 4;
    static_assert(kWords % kPer == 0, "whole vectors only");
#pragma unroll
    for (int i = 0; i < kWords / kPer; ++i) {
        const V u = __ldg(q + i);
        wds[kPer * i] = u.x;
        wds[kPer * i + 1] = u.y;
        if constexpr (kPer == 4) {
            wds[kPer * i + 2] = u.z;
            wds[kPer * i + 3] = u.w;
        }
    }
}

// Loads N consecutive values (N * sizeof(T) bytes, a multiple of 8, aligned to min(that, 16))
// as f32, with 16-byte vector loads where the size allows.
template <typename T, int N>
__device__ __forceinline__ void load_vals(const T* __restrict__ p, float (&v)[N]) {
    constexpr int kBytes = N * (int)sizeof(T);
    static_assert(kBytes % 8 == 0, "vector of values must be a multiple of 8 bytes");
    uint32_t wds[kBytes / 4];
    if constexpr (kBytes % 16 == 0)
        ldg_words(reinterpret_cast<const uint4*>(p), wds);
    else
        ldg_words(reinterpret_cast<const uint2*>(p), wds);
    unpack_words<T, N>(wds, v);
}

// Stores N f32 values as N consecutive T (round to nearest even), vectorized like load_vals.
template <typename T, int N>
__device__ __forceinline__ void store_vals(T* __restrict__ p, const float (&v)[N]) {
    constexpr int kBytes = N * (int)sizeof(T);
    static_assert(kBytes % 8 == 0, "vector of values must be a multiple of 8 bytes");
    uint32_t wds[kBytes / 4];
    pack_words<T, N>(v, wds);
    if constexpr (kBytes % 16 == 0) {
        uint4* q = reinterpret_cast<uint4*>(p);
#pragma unroll
        for (int i = 0; i < kBytes / 16; ++i) ntkv::st_global_v4(q + i, wds[4 * i], wds[4 * i + 1], wds[4 * i + 2], wds[4 * i + 3]);
    } else {
        uint2* q = reinterpret_cast<uint2*>(p);
#pragma unroll
        for (int i = 0; i < kBytes / 8; ++i) ntkv::st_global_v2(q + i, wds[2 * i], wds[2 * i + 1]);
    }
}

// Stored (scale, min) of a group with extremes lo <= hi, as in cpu::group_params. Adding +0
// turns a -0 extreme into +0, so the order of fminf/fmaxf over signed zeros (a tree of
// shuffles here, a sequential fold on the CPU) cannot change the stored bits.
struct GroupParams {
    __half scale16, min16;
    float scale, mn, inv;
};

template <int B>
__device__ __forceinline__ GroupParams group_params(float lo, float hi) {
    constexpr float kQmax = (float)((1u << B) - 1u);
    GroupParams g;
    const float mn = __fadd_rn(lo, 0.0f);
    const float mx = __fadd_rn(hi, 0.0f);
    g.scale16 = __float2half_rn(__fdiv_rn(__fsub_rn(mx, mn), kQmax));
    g.min16 = __float2half_rn(mn);
    g.scale = __half2float(g.scale16);
    g.mn = __half2float(g.min16);
    g.inv = (g.scale == 0.0f) ? 0.0f : __fdiv_rn(1.0f, g.scale);
    return g;
}

// clamp(round_half_even((x - mn) * inv), 0, qmax) + 1.5 * 2^23, as f32 bits: the code sits in
// the low B bits above a constant 0x4B400000, without rintf + F2I. Clamping first to the
// integer bounds [0, qmax] gives the same code as rounding first, and fmaxf maps a NaN product
// (inv == 0 times an infinite difference) to 0, as the CPU does; a zero inv gives a +-0
// product, hence code 0, so the scale == 0 case needs no branch. Adding 1.5 * 2^23 to a t in
// [0, 255] rounds it half to even to an integer (the ulp there is 1) and leaves that integer
// in the low mantissa bits; -0 + 1.5 * 2^23 is 1.5 * 2^23, code 0.
constexpr uint32_t kMagicBits = 0x4B400000u;  // __float_as_uint(1.5 * 2^23)

template <int B>
__device__ __forceinline__ uint32_t code_bits(float x, const GroupParams& g) {
    constexpr float kQmax = (float)((1u << B) - 1u);
    constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
    const float t = fminf(fmaxf(__fmul_rn(__fsub_rn(x, g.mn), g.inv), 0.0f), kQmax);
    return __float_as_uint(__fadd_rn(t, kMagic));
}

template <int B>
__device__ __forceinline__ uint32_t encode(float x, const GroupParams& g) {
    return code_bits<B>(x, g) & ((1u << B) - 1u);
}

// sum_j kMagicBits << (j * B) over the E = 32 / B slots of a word, mod 2^32.
template <int B>
constexpr uint32_t magic_word() {
    uint32_t w = 0;
    for (int j = 0; j < 32 / B; ++j) w += kMagicBits << (j * B);
    return w;
}

// Packs the codes of N values into N / E words. Each code_bits is kMagicBits + code with
// code < 2^B, so sum_j code_bits_j << (j * B) (mod 2^32) is the packed word plus the constant
// magic_word<B>(): one shift-add per value (an IMAD or LEA) instead of a mask, a shift and an OR.
template <int B, int N>
__device__ __forceinline__ void encode_words(const float (&v)[N], const GroupParams& g, uint32_t (&w)[N / (32 / B)]) {
    constexpr int E = 32 / B;
#pragma unroll
    for (int k = 0; k < N / E; ++k) {
        uint32_t acc = code_bits<B>(v[k * E], g);
#pragma unroll
        for (int j = 1; j < E; ++j) acc += code_bits<B>(v[k * E + j], g) << (j * B);
        w[k] = acc - magic_word<B>();
    }
}

// Stores N consecutive words (N a power of two, the address aligned to min(4N, 16) bytes) as
// 16-byte, 8-byte or 4-byte stores.
template <int N>
__device__ __forceinline__ void store_words(uint32_t* __restrict__ p, const uint32_t (&w)[N]) {
    if constexpr (N % 4 == 0) {
        uint4* q = reinterpret_cast<uint4*>(p);
#pragma unroll
        for (int i = 0; i < N / 4; ++i) ntkv::st_global_v4(q + i, w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
    } else if constexpr (N == 2) {
        ntkv::st_global_v2(reinterpret_cast<uint2*>(p), w[0], w[1]);
    } else {
        p[0] = w[0];
    }
}

// Error flags start at 0 (a stream-ordered memset, no host copy). The lowest bad index i is
// kept as the largest ~i, so a flag of 0 means "none" and atomicMax makes it deterministic.
__device__ __forceinline__ void flag_index(unsigned long long* slot, uint64_t i) {
    atomicMax(slot, ~(unsigned long long)i);
}

// Flags a value that cannot be quantized: slot 0 for NaN/Inf, slot 1 for |x| >= 65520.
__device__ __forceinline__ void flag_value(unsigned long long* flags, float v, uint64_t i) {
    flag_index(&flags[isfinite(v) ? 1 : 0], i);
}

__device__ __forceinline__ uint32_t log2_pow2(uint32_t v) { return (uint32_t)(__ffs((int)v) - 1); }

// The code words, scales and mins of head h: the region's offsets and head strides applied.
template <typename W, typename S>
struct HeadCodes {
    W* codes;
    S* scales;
    S* mins;
};
template <typename W, typename S>
__device__ __forceinline__ HeadCodes<W, S> head_codes(const NtkvQuantParams& p, uint64_t h, W* codes, S* scales,
                                                      S* mins) {
    return {codes + p.codes_offset + h * p.codes_head_stride, scales + p.sm_offset + h * p.sm_head_stride,
            mins + p.sm_offset + h * p.sm_head_stride};
}

// ---- PerToken: groups along dim; one thread per group -------------------------------------
// A head's [tokens, dim] block is contiguous and dim is a multiple of the group, so group g of a
// head is values [g*G, g*G + G), code words [g*WPG, g*WPG + WPG) and scale/min g. Thread i takes
// group i (grid-stride): a warp reads 32 adjacent groups (32 * G * sizeof(T) contiguous bytes)
// and writes 32 adjacent runs of WPG words, and the group's scale, min and 1/scale (its two IEEE
// divisions) are computed once, by the one thread that holds the whole group.
//
// A group is read in slices of 64 bytes (four 16-byte loads). A one-slice group (f16 and bf16
// at G = 32, KIVI's case) stays in registers from the min/max to the codes. A larger one is
// read twice, min/max first and then the codes, the second time from L1 or L2: every (G, B)
// instance is one kernel, whose registers are those of its largest instance, so no instance
// may hold more than one slice.
template <typename T, int B, int G>
__device__ __forceinline__ void quantize_token_groups(const NtkvQuantParams& p, const T* __restrict__ x,
                                                      uint32_t* __restrict__ codes, __half* __restrict__ scales,
                                                      __half* __restrict__ mins,
                                                      unsigned long long* __restrict__ flags) {
    constexpr int E = 32 / B;
    constexpr int WPG = G / E;
    constexpr int S = 64 / (int)sizeof(T);  // values per slice
    constexpr int NS = G / S;               // slices per group: 1 to 8
    constexpr int SW = S / E;               // code words per slice: 1 to 8
    static_assert(NS * S == G && SW * E == S, "whole slices and words");
    const uint64_t groups = p.tokens * (uint64_t)p.dim / G;
    const uint64_t tid = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const uint64_t nthreads = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t h = blockIdx.y; h < p.heads; h += gridDim.y) {
        const uint64_t xbase = p.x_offset + h * p.x_head_stride;
        const auto [ch, sh, mh] = head_codes(p, h, codes, scales, mins);
        for (uint64_t gi = tid; gi < groups; gi += nthreads) {
            const T* xg = x + xbase + gi * G;
            float v[S];
            float lo = INFINITY, hi = -INFINITY;
            bool bad = false;
            // Rolled, so a multi-slice group is never held whole.
#pragma unroll 1
            for (int s = 0; s < NS; ++s) {
                load_vals<T, S>(xg + s * S, v);
#pragma unroll
                for (int j = 0; j < S; ++j) {
                    lo = fminf(lo, v[j]);
                    hi = fmaxf(hi, v[j]);
                    bad |= !quantizable(v[j]);
                }
            }
            const GroupParams g = group_params<B>(lo, hi);
            uint32_t* cg = ch + gi * WPG;
#pragma unroll 1
            for (int s = 0; s < NS; ++s) {
                if constexpr (NS > 1) load_vals<T, S>(xg + s * S, v);
                uint32_t w[SW];
                encode_words<B, S>(v, g, w);
                store_words<SW>(cg + s * SW, w);
            }
            sh[gi] = g.scale16;
            mh[gi] = g.min16;
            if (bad) {
#pragma unroll 1
                for (int j = 0; j < G; ++j) {
                    const float vj = ntkv::to_f32(xg[j]);
                    if (!quantizable(vj)) flag_value(flags, vj, xbase + gi * G + (uint64_t)j);
                }
            }
        }
    }
}

// Calls f(Const<v>{}) when v is one of Vs (the supported bit widths or group sizes), so the
// body is instantiated per value; any other value does nothing.
template <int V> struct Const { static constexpr int value = V; };
template <int... Vs, typename F>
__device__ __forceinline__ void with_one_of(uint32_t v, F&& f) {
    (void)((v == (uint32_t)Vs ? (f(Const<Vs>{}), true) : false) || ...);
}

template <typename T, int B>
__device__ __forceinline__ void quantize_token(const NtkvQuantParams& p, const T* __restrict__ x,
                                               uint32_t* __restrict__ codes, __half* __restrict__ scales,
                                               __half* __restrict__ mins, unsigned long long* __restrict__ flags) {
    with_one_of<32, 64, 128>(p.group, [&](auto g) { quantize_token_groups<T, B, decltype(g)::value>(p, x, codes, scales, mins, flags); });
}

// Each thread dequantizes U words per batch (U independent 4-byte loads in flight, then U
// vector stores of E values); consecutive lanes take consecutive words, so loads and stores
// are coalesced.
template <typename T, int B>
__device__ __forceinline__ void dequantize_token(const NtkvQuantParams& p, const uint32_t* __restrict__ codes,
                                                 const __half* __restrict__ scales,
                                                 const __half* __restrict__ mins, T* __restrict__ out) {
    constexpr int E = 32 / B;
    constexpr uint32_t kMask = (1u << B) - 1u;
    constexpr int U = 8;
    const uint32_t wpg_shift = log2_pow2(p.group / E);
    const uint64_t words = p.tokens * (uint64_t)p.dim / E;
    const uint64_t tid = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const uint64_t nthreads = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t h = blockIdx.y; h < p.heads; h += gridDim.y) {
        const auto [ch, sh, mh] = head_codes(p, h, codes, scales, mins);
        T* oh = out + p.x_offset + h * p.x_head_stride;
        for (uint64_t base = tid; base < words; base += U * nthreads) {
            uint32_t c[U];
            float s[U], m[U];
#pragma unroll
            for (int k = 0; k < U; ++k) {
                const uint64_t w = base + (uint64_t)k * nthreads;
                c[k] = 0u;
                s[k] = 0.0f;
                m[k] = 0.0f;
                if (w < words) {
                    c[k] = __ldg(ch + w);
                    s[k] = __half2float(sh[w >> wpg_shift]);
                    m[k] = __half2float(mh[w >> wpg_shift]);
                }
            }
#pragma unroll
            for (int k = 0; k < U; ++k) {
                const uint64_t w = base + (uint64_t)k * nthreads;
                if (w < words) {
                    float v[E];
#pragma unroll
                    for (int j = 0; j < E; ++j) v[j] = __fmaf_rn((float)((c[k] >> (j * B)) & kMask), s[k], m[k]);
                    store_vals<T, E>(oh + w * E, v);
                }
            }
        }
    }
}

// ---- PerChannel: groups along tokens; one thread per (token group, channel) ----------------
// Item i of a head is token group r = i / dim, channel d = i % dim: values x[(r*group + t)*dim
// + d] for t < group, code words [(r*WPG + k)*dim + d] for k < WPG, scale/min [r*dim + d].
// Adjacent lanes take adjacent channels, so every access is coalesced across the warp.
template <typename T, int B>
__device__ __forceinline__ void quantize_channel(const NtkvQuantParams& p, const T* __restrict__ x,
                                                 uint32_t* __restrict__ codes, __half* __restrict__ scales,
                                                 __half* __restrict__ mins, unsigned long long* __restrict__ flags) {
    constexpr int E = 32 / B;
    const uint32_t wpg = p.group / E;
    const uint64_t dim = p.dim;
    const uint64_t items = (p.tokens / p.group) * dim;
    const uint64_t tid = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const uint64_t nthreads = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t h = blockIdx.y; h < p.heads; h += gridDim.y) {
        const uint64_t xbase = p.x_offset + h * p.x_head_stride;
        const auto [ch, sh, mh] = head_codes(p, h, codes, scales, mins);
        for (uint64_t i = tid; i < items; i += nthreads) {
            const uint64_t r = i / dim;
            const uint64_t d = i - r * dim;
            const uint64_t first = xbase + r * p.group * dim + d;  // value (r*group, d)
            const T* col = x + first;
            float lo = INFINITY, hi = -INFINITY;
            for (uint32_t t = 0; t < p.group; ++t) {
                const float v = ntkv::to_f32(col[(uint64_t)t * dim]);
                lo = fminf(lo, v);
                hi = fmaxf(hi, v);
                if (!quantizable(v)) flag_value(flags, v, first + (uint64_t)t * dim);
            }
            const GroupParams g = group_params<B>(lo, hi);
            sh[r * dim + d] = g.scale16;
            mh[r * dim + d] = g.min16;
            for (uint32_t k = 0; k < wpg; ++k) {
                uint32_t word = 0;
#pragma unroll
                for (int j = 0; j < E; ++j) {
                    const float v = ntkv::to_f32(col[(uint64_t)(k * E + j) * dim]);
                    word |= encode<B>(v, g) << (j * B);
                }
                ch[((uint64_t)r * wpg + k) * dim + d] = word;
            }
        }
    }
}

// Item i of a head is code-word row rw = i / dim (tokens rw*E .. rw*E + E - 1), channel d.
template <typename T, int B>
__device__ __forceinline__ void dequantize_channel(const NtkvQuantParams& p, const uint32_t* __restrict__ codes,
                                                   const __half* __restrict__ scales,
                                                   const __half* __restrict__ mins, T* __restrict__ out) {
    const uint64_t dim = p.dim;
    constexpr int E = 32 / B;
    constexpr uint32_t kMask = (1u << B) - 1u;
    const uint32_t wpg_shift = log2_pow2(p.group / E);
    const uint64_t items = (p.tokens / E) * dim;
    const uint64_t tid = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const uint64_t nthreads = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t h = blockIdx.y; h < p.heads; h += gridDim.y) {
        const auto [ch, sh, mh] = head_codes(p, h, codes, scales, mins);
        T* oh = out + p.x_offset + h * p.x_head_stride;
        for (uint64_t i = tid; i < items; i += nthreads) {
            const uint64_t rw = i / dim;
            const uint64_t d = i - rw * dim;
            const uint32_t c = __ldg(ch + i);
            const uint64_t gi = (rw >> wpg_shift) * dim + d;
            const float s = __half2float(sh[gi]);
            const float m = __half2float(mh[gi]);
#pragma unroll
            for (int j = 0; j < E; ++j) {
                const float v = __fmaf_rn((float)((c >> (j * B)) & kMask), s, m);
                oh[(rw * E + (uint64_t)j) * dim + d] = ntkv::from_f32<T>(v);
            }
        }
    }
}

// ---- Finiteness and range scan --------------------------------------------------------------
__device__ __forceinline__ void note_bad(float v, uint64_t i, unsigned long long* flags) {
    if (!quantizable(v)) flag_value(flags, v, i);
}

template <typename T>
__device__ __forceinline__ void scan(const NtkvQuantScanParams& p, const T* __restrict__ x,
                                     unsigned long long* __restrict__ flags) {
    constexpr int V = 16 / (int)sizeof(T);
    const uint64_t tid = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const uint64_t nthreads = (uint64_t)gridDim.x * blockDim.x;
    const uint64_t nvec = p.n / V;
    for (uint64_t i = tid; i < nvec; i += nthreads) {
        float v[V];
        load_vals<T, V>(x + i * V, v);
#pragma unroll
        for (int j = 0; j < V; ++j) note_bad(v[j], i * V + (uint64_t)j, flags);
    }
    for (uint64_t i = nvec * V + tid; i < p.n; i += nthreads) note_bad(ntkv::to_f32(x[i]), i, flags);
}

}  // namespace

// ---- extern "C" entry points: one per (operation, axis, dtype); bits dispatch inside ------------

#define NTKV_QUANT_QUANTIZE_ENTRY(NAME, BODY, T)                                                           \
    extern "C" __global__ void NAME(const NtkvQuantParams p, const T* __restrict__ x,                      \
                                    uint32_t* __restrict__ codes, __half* __restrict__ scales,             \
                                    __half* __restrict__ mins, unsigned long long* __restrict__ flags) {   \
        with_one_of<2, 4, 8>(p.bits, [&](auto b) { BODY<T, decltype(b)::value>(p, x, codes, scales, mins, flags); }); \
    }
#define NTKV_QUANT_DEQUANTIZE_ENTRY(NAME, BODY, T)                                                          \
    extern "C" __global__ void NAME(const NtkvQuantParams p, const uint32_t* __restrict__ codes,            \
                                    const __half* __restrict__ scales, const __half* __restrict__ mins,     \
                                    T* __restrict__ out) {                                                  \
        with_one_of<2, 4, 8>(p.bits, [&](auto b) { BODY<T, decltype(b)::value>(p, codes, scales, mins, out); });       \
    }
#define NTKV_QUANT_ENTRIES(SUFFIX, T)                                                                          \
    NTKV_QUANT_QUANTIZE_ENTRY(ntkv_quant_quantize_token_##SUFFIX, quantize_token, T)                         \
    NTKV_QUANT_QUANTIZE_ENTRY(ntkv_quant_quantize_channel_##SUFFIX, quantize_channel, T)                     \
    NTKV_QUANT_DEQUANTIZE_ENTRY(ntkv_quant_dequantize_token_##SUFFIX, dequantize_token, T)                   \
    NTKV_QUANT_DEQUANTIZE_ENTRY(ntkv_quant_dequantize_channel_##SUFFIX, dequantize_channel, T)               \
    extern "C" __global__ void ntkv_quant_scan_##SUFFIX(const NtkvQuantScanParams p, const T* __restrict__ x, \
                                                        unsigned long long* __restrict__ flags) {             \
        scan<T>(p, x, flags);                                                                                  \
    }

NTKV_QUANT_ENTRIES(f32, float)
NTKV_QUANT_ENTRIES(f16, __half)
NTKV_QUANT_ENTRIES(bf16, __nv_bfloat16)

// ---- MiKV row moves (f16 rows); see NtkvMikvRowsParams -------------------------------------------
namespace {
// Calls f(h, i, k, d) for element i = k * dim + d of rows k < p.rows of every head h: heads
// stride over gridDim.y, elements over the grid's x threads.
template <typename F>
__device__ __forceinline__ void for_each_row_elem(const NtkvMikvRowsParams& p, F&& f) {
    const uint64_t dim = p.dim;
    const uint64_t items = (uint64_t)p.rows * dim;
    const uint64_t tid = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const uint64_t nthreads = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t h = blockIdx.y; h < p.heads; h += gridDim.y) {
        for (uint64_t i = tid; i < items; i += nthreads) {
            const uint64_t k = i / dim;
            f(h, i, k, i - k * dim);
        }
    }
}
}  // namespace

extern "C" __global__ void ntkv_mikv_gather(const NtkvMikvRowsParams p, const __half* __restrict__ src,
                                            const uint32_t* __restrict__ idx, const uint32_t* __restrict__ counts,
                                            __half* __restrict__ dst) {
    const uint64_t dim = p.dim;
    for_each_row_elem(p, [&](uint64_t h, uint64_t i, uint64_t k, uint64_t d) {
        __half v = __float2half_rn(0.0f);
        if (k < counts[h]) {
            const uint32_t t = idx[h * p.rows + k];
            if (t < p.src_rows) v = src[h * p.src_head_stride + (uint64_t)t * dim + d];
        }
        dst[h * p.dst_head_stride + i] = v;
    });
}

extern "C" __global__ void ntkv_mikv_scatter(const NtkvMikvRowsParams p, const __half* __restrict__ src,
                                             const uint32_t* __restrict__ idx, const uint32_t* __restrict__ counts,
                                             __half* __restrict__ dst) {
    const uint64_t dim = p.dim;
    for_each_row_elem(p, [&](uint64_t h, uint64_t i, uint64_t k, uint64_t d) {
        if (k >= counts[h]) return;
        const uint32_t t = idx[h * p.rows + k];
        if (t < p.dst_rows) dst[h * p.dst_head_stride + (uint64_t)t * dim + d] = src[h * p.src_head_stride + i];
    });
}

extern "C" __global__ void ntkv_mikv_residual(const NtkvMikvRowsParams p, const __half* __restrict__ src,
                                              __half* __restrict__ dst) {
    const uint64_t dim = p.dim;
    if (p.ring == 0) return;
    for_each_row_elem(p, [&](uint64_t h, uint64_t, uint64_t k, uint64_t d) {
        const uint64_t t = (uint64_t)p.first + k;
        const uint64_t slot = t % p.ring;
        if (p.to_ring) {
            if (t < p.src_rows && slot < p.dst_rows)
                dst[h * p.dst_head_stride + slot * dim + d] = src[h * p.src_head_stride + t * dim + d];
        } else if (t < p.dst_rows && slot < p.src_rows) {
            dst[h * p.dst_head_stride + t * dim + d] = src[h * p.src_head_stride + slot * dim + d];
        }
    });
}

extern "C" __global__ void ntkv_mikv_append(const NtkvMikvRowsParams p, const __half* __restrict__ src,
                                            __half* __restrict__ dst) {
    const uint64_t dim = p.dim;
    const uint64_t tid = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const uint64_t nthreads = (uint64_t)gridDim.x * blockDim.x;
    if (p.first >= p.dst_rows) return;
    for (uint64_t h = blockIdx.y; h < p.heads; h += gridDim.y) {
        for (uint64_t d = tid; d < dim; d += nthreads) {
            dst[h * p.dst_head_stride + (uint64_t)p.first * dim + d] = src[h * p.src_head_stride + d];
        }
    }
}
