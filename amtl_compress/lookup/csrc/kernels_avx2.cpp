// simd_kernels.h compiled for AVX2 + FMA + F16C, instantiated for every type lookup.cpp
// dispatches to; lookup.cpp picks the ISA at run time (no -march at build time, so one cached
// build serves any x86-64 machine). A translation unit of its own, so the ISAs build in
// parallel.

#include "table.h"

#ifdef AMTL_X86

namespace amtl::avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

alignas(32) constexpr int32_t kLaneMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                               0,  0,  0,  0,  0,  0,  0,  0};

struct Vec {
  static constexpr int64_t W = 8;
  using R = __m256;
  static AMTL_INLINE __m256i mask(int64_t n) {  // lanes [0, n) on
    n = n < 0 ? 0 : (n > W ? W : n);
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLaneMask + W - n));
  }
  static AMTL_INLINE R zero() { return _mm256_setzero_ps(); }
  static AMTL_INLINE R broadcast(float v) { return _mm256_set1_ps(v); }
  // Lanes >= n read no memory and are +0.0 (vmaskmovps). Always masked: a branch on the row
  // length would depend on a load that may miss the cache, and its mispredictions would squash
  // the loads of the following ids that are already in flight.
  static AMTL_INLINE R load(const float* p, int64_t n) { return _mm256_maskload_ps(p, mask(n)); }
  using Lanes = int64_t;
  static AMTL_INLINE Lanes lanes(int64_t rem) { return rem; }
  static AMTL_INLINE __m256i mask_k(Lanes l, int64_t k) { return mask(l - k * W); }
  static AMTL_INLINE R load(const float* p, __m256i m) { return _mm256_maskload_ps(p, m); }
  // AVX2 has no 8/16-bit masked loads: other dtypes are converted into a scratch row first.
  static constexpr bool kConverts = false;
  static AMTL_INLINE R load(const float* p, __m256i m, float, float) { return load(p, m); }
  static AMTL_INLINE void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static AMTL_INLINE void store(float* p, R v, int64_t n) { _mm256_maskstore_ps(p, mask(n), v); }
  static AMTL_INLINE R add(R a, R b) { return _mm256_add_ps(a, b); }
  static AMTL_INLINE R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static AMTL_INLINE R div(R a, R b) { return _mm256_div_ps(a, b); }
  static AMTL_INLINE R fma(R w, R x, R acc) { return _mm256_fmadd_ps(w, x, acc); }
  // vmaxps(x, acc) is exactly `x > acc ? x : acc` (NaN and +-0 cases included).
  static AMTL_INLINE R max_keep(R x, R acc) { return _mm256_max_ps(x, acc); }
};

#include "simd_kernels.h"

AMTL_INSTANTIATE_CHUNKS()

#pragma GCC pop_options
}  // namespace amtl::avx2

#endif  // AMTL_X86
