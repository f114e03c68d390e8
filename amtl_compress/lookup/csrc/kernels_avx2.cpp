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
// Vec::nibbles' tables, by the parity of a vector's first nibble.
alignas(16) constexpr uint8_t kNibbleBytes[2][16] = {{0, 0, 1, 1, 2, 2, 3, 3},
                                                     {0, 1, 1, 2, 2, 3, 3, 4}};
alignas(32) constexpr int32_t kNibbleShifts[2][8] = {{0, 4, 0, 4, 0, 4, 0, 4},
                                                     {4, 0, 4, 0, 4, 0, 4, 0}};

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
  static AMTL_INLINE R load(const float* p, __m256i m, float, float) { return load(p, m); }
  // AVX2 has no 8/16-bit masked loads: only float32 rows are read with masked loads; the other
  // dtypes with wide() (plain loads converted in registers, lanes outside the row zeroed).
  template <typename T>
  static constexpr bool masked() {
    return std::is_same_v<T, float>;
  }
  static AMTL_INLINE R keep(R v, __m256i m) { return _mm256_and_ps(v, _mm256_castsi256_ps(m)); }
  // q * scale + bias: two roundings (separate intrinsics; -ffp-contract=off).
  static AMTL_INLINE R affine(R q, float scale, float bias) {
    return _mm256_add_ps(_mm256_mul_ps(q, _mm256_set1_ps(scale)), _mm256_set1_ps(bias));
  }
  static AMTL_INLINE R wide(const c10::Half* v, int64_t at, __m256i m, float, float) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + at));
    return keep(_mm256_cvtph_ps(h), m);
  }
  static AMTL_INLINE R wide(const c10::BFloat16* v, int64_t at, __m256i m, float, float) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + at));
    const __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);  // exact
    return keep(_mm256_castsi256_ps(wide), m);
  }
  static AMTL_INLINE R wide(const int8_t* v, int64_t at, __m256i m, float scale, float bias) {
    const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(v + at));
    return keep(affine(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), scale, bias), m);
  }
  // int4: 8 nibbles from nibble position `at`, from the 8 bytes at its byte (5 are used): byte
  // (p + i) / 2 to lane i (pshufb), shifted right by 4 * ((p + i) & 1), p the parity of `at`.
  struct Nibbles {
    __m128i bytes;   // pshufb indices
    __m256i shifts;  // per-lane right shifts
  };
  static AMTL_INLINE Nibbles nibbles(int64_t parity) {
    return {_mm_loadu_si128(reinterpret_cast<const __m128i*>(kNibbleBytes[parity])),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kNibbleShifts[parity]))};
  }
  static AMTL_INLINE R wide(const Int4* v, int64_t at, __m256i m, float scale, float bias,
                            const Nibbles& nib) {
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(v + (at >> 1)));
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_shuffle_epi8(raw, nib.bytes));
    const __m256i u =
        _mm256_and_si256(_mm256_srlv_epi32(bytes, nib.shifts), _mm256_set1_epi32(0xF));
    return keep(affine(_mm256_cvtepi32_ps(u), scale, bias), m);
  }
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
