// Paged decode attention on the CPU, reading each sequence's K/V straight from the block pool:
// no gathered copy of its history. Built by paged_kernel.py with the machine's C++ compiler
// (-O3 -march=native -fopenmp) and called through ctypes. Its OpenMP runtime is torch's own
// (the library named libgomp.so.1 that torch loaded first), so its threads are the ones torch's
// ops run on: a second pool would spin against them for the same cores.
//
// Layout: q and out [B, KVH * G, D] float32, query head h * G + g reading KV head h (as
// enable_gqa maps them). A layer's K (and V) is block blk's [BS, KVH, D] at
// base + blk * block_stride elements: one position's row of every KV head is contiguous, so a
// sequence's positions are read once each, for all its heads. Softmax is computed online one
// block at a time (running maximum and sum per head), in float32 whatever the pool stores. Each
// sequence is computed by one thread, whatever the split, so its row is the same in any batch.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

enum Kind { F32 = 0, BF16 = 1, F16 = 2 };

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) bits = sign | 0x7f800000 | (man << 13);
    else if (exp != 0) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (man == 0) bits = sign;
    else {   // subnormal: normalize
        int e = -1;
        uint32_t m = man;
        do { ++e; m <<= 1; } while (!(m & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3ff) << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
#endif
}

template <int KIND>
inline const float* row_as_float(const void* src, int64_t n, float* scratch) {
    if (KIND == F32) return (const float*)src;
    const uint16_t* p = (const uint16_t*)src;
    if (KIND == BF16) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
            const uint32_t b = (uint32_t)p[i] << 16;
            float f;
            std::memcpy(&f, &b, 4);
            scratch[i] = f;
        }
    } else {
        for (int64_t i = 0; i < n; ++i) scratch[i] = half_to_float(p[i]);
    }
    return scratch;
}

template <typename T, int KIND>
void attend(float* out, const float* q, const T* kb, const T* vb, int64_t block_stride,
            const int64_t* tables, int64_t table_stride, const int64_t* lengths, int64_t B,
            int64_t KVH, int64_t G, int64_t D, int64_t BS, float scale, int threads) {
    const int64_t H = KVH * G, row = KVH * D;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> m(H), l(H), s(H * BS), acc(H * D), scratch(row);
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < B; ++b) {
            const int64_t len = lengths[b];
            const float* qb = q + b * H * D;
            for (int64_t i = 0; i < H; ++i) { m[i] = -INFINITY; l[i] = 0.f; }
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t j = 0; j * BS < len; ++j) {
                const int64_t n = len - j * BS < BS ? len - j * BS : BS;
                const int64_t blk = tables[b * table_stride + j];
                const T* k0 = kb + blk * block_stride;
                const T* v0 = vb + blk * block_stride;
                for (int64_t t = 0; t < n; ++t) {           // scores of every head at each position
                    const float* kx = row_as_float<KIND>(k0 + t * row, row, scratch.data());
                    for (int64_t h = 0; h < KVH; ++h) {
                        const float* kh = kx + h * D;
                        for (int64_t g = 0; g < G; ++g) {
                            const float* qg = qb + (h * G + g) * D;
                            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                            for (int64_t d = 0; d < D; ++d) dot += qg[d] * kh[d];
                            s[(h * G + g) * BS + t] = dot * scale;
                        }
                    }
                }
                for (int64_t i = 0; i < H; ++i) {             // online softmax over this block
                    float* si = &s[i * BS];
                    float mx = m[i];
                    for (int64_t t = 0; t < n; ++t) mx = si[t] > mx ? si[t] : mx;
                    const float corr = std::exp(m[i] - mx);
                    float sum = l[i] * corr;
                    if (corr != 1.f) {
                        float* a = &acc[i * D];
                        for (int64_t d = 0; d < D; ++d) a[d] *= corr;
                    }
                    for (int64_t t = 0; t < n; ++t) {
                        si[t] = std::exp(si[t] - mx);
                        sum += si[t];
                    }
                    m[i] = mx;
                    l[i] = sum;
                }
                for (int64_t t = 0; t < n; ++t) {           // weighted values
                    const float* vx = row_as_float<KIND>(v0 + t * row, row, scratch.data());
                    for (int64_t h = 0; h < KVH; ++h) {
                        const float* vh = vx + h * D;
                        for (int64_t g = 0; g < G; ++g) {
                            const float w = s[(h * G + g) * BS + t];
                            float* a = &acc[(h * G + g) * D];
#pragma omp simd
                            for (int64_t d = 0; d < D; ++d) a[d] += w * vh[d];
                        }
                    }
                }
            }
            float* ob = out + b * H * D;
            for (int64_t i = 0; i < H; ++i) {
                const float inv = 1.f / l[i];
                for (int64_t d = 0; d < D; ++d) ob[i * D + d] = acc[i * D + d] * inv;
            }
        }
    }
}

}  // namespace

// The whole batch of B sequences, on up to ``threads`` threads. kind: 0 float32, 1 bfloat16,
// 2 float16 pool. Returns 0, or 1 for a kind it does not know.
extern "C" int dsrv_paged_decode(int kind, float* out, const float* q, const void* kb,
                                 const void* vb, int64_t block_stride, const int64_t* tables,
                                 int64_t table_stride, const int64_t* lengths, int64_t B,
                                 int64_t KVH, int64_t G, int64_t D, int64_t BS, float scale,
                                 int threads) {
    typedef uint16_t U;
    if (kind == F32)
        attend<float, F32>(out, q, (const float*)kb, (const float*)vb, block_stride, tables,
                           table_stride, lengths, B, KVH, G, D, BS, scale, threads);
    else if (kind == BF16)
        attend<U, BF16>(out, q, (const U*)kb, (const U*)vb, block_stride, tables, table_stride,
                        lengths, B, KVH, G, D, BS, scale, threads);
    else if (kind == F16)
        attend<U, F16>(out, q, (const U*)kb, (const U*)vb, block_stride, tables, table_stride,
                       lengths, B, KVH, G, D, BS, scale, threads);
    else
        return 1;
    return 0;
}
