// simd_kernels.h compiled for AVX-512 (F, BW, VL) + BMI2, instantiated for every type lookup.cpp
// dispatches to; lookup.cpp picks the ISA at run time (no -march at build time, so one cached
// build serves any x86-64 machine). A translation unit of its own, so the ISAs build in
// parallel.

#include "table.h"

#ifdef AMTL_X86

namespace amtl::avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c,bmi2")

// Vec::nibbles' tables, by the parity of a vector's first nibble.
alignas(16) constexpr uint8_t kNibbleBytes[2][16] = {
    {0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7},
    {0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8}};
alignas(64) constexpr int32_t kNibbleShifts[2][16] = {
    {0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4},
    {4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0}};

struct Vec {
  static constexpr int64_t W = 16;
  using R = __m512;
  static AMTL_INLINE __mmask16 mask(int64_t n) {  // lanes [0, n) on
    const int64_t k = n < 0 ? 0 : (n > W ? W : n);  // bzhi reads only 8 bits of the index
    return static_cast<__mmask16>(_bzhi_u32(0xFFFFu, static_cast<uint32_t>(k)));
  }
  // Per-row lane count for mask_k: the row's remaining length, broadcast. It is in [-D, D] and
  // check_table keeps D < 2^30, so it fits int32 without a clamp.
  using Lanes = __m512i;
  static AMTL_INLINE Lanes lanes(int64_t rem) {
    return _mm512_set1_epi32(static_cast<int32_t>(rem));
  }
  // Lanes of vector k that lie inside the row: one compare against a constant lane index.
  static AMTL_INLINE __mmask16 mask_k(Lanes l, int64_t k) {
    const __m512i index = _mm512_add_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(static_cast<int32_t>(k * W)));
    return _mm512_cmplt_epi32_mask(index, l);
  }
  static AMTL_INLINE R load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
  // Typed masked loads converted to float32 in registers (exact for float16/bfloat16; int8 is
  // q * scale + bias with two roundings, and +0.0, not bias, in the lanes outside the row).
  template <typename T>
  static constexpr bool masked() {
    return !std::is_same_v<T, Int4>;
  }
  static AMTL_INLINE R load(const float* p, __mmask16 m, float, float) { return load(p, m); }
  static AMTL_INLINE R load(const c10::Half* p, __mmask16 m, float, float) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
  static AMTL_INLINE R load(const c10::BFloat16* p, __mmask16 m, float, float) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static AMTL_INLINE R load(const int8_t* p, __mmask16 m, float scale, float bias) {
    const R q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
    return _mm512_maskz_add_ps(m, _mm512_mul_ps(q, _mm512_set1_ps(scale)), _mm512_set1_ps(bias));
  }
  // int4 (no masked load reads nibbles): 16 nibbles from nibble position `at`, from the 16 bytes
  // at its byte (9 are used): byte (p + i) / 2 to lane i (pshufb), shifted right by
  // 4 * ((p + i) & 1), p the parity of `at`; lanes outside the row are +0.0, not bias.
  struct Nibbles {
    __m128i bytes;   // pshufb indices
    __m512i shifts;  // per-lane right shifts
  };
  static AMTL_INLINE Nibbles nibbles(int64_t parity) {
    return {_mm_loadu_si128(reinterpret_cast<const __m128i*>(kNibbleBytes[parity])),
            _mm512_loadu_si512(kNibbleShifts[parity])};
  }
  static AMTL_INLINE R wide(const Int4* v, int64_t at, __mmask16 m, float scale, float bias,
                            const Nibbles& nib) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + (at >> 1)));
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(raw, nib.bytes));
    const __m512i u =
        _mm512_and_si512(_mm512_srlv_epi32(bytes, nib.shifts), _mm512_set1_epi32(0xF));
    const R q = _mm512_cvtepi32_ps(u);
    return _mm512_maskz_add_ps(m, _mm512_mul_ps(q, _mm512_set1_ps(scale)), _mm512_set1_ps(bias));
  }
  static AMTL_INLINE R zero() { return _mm512_setzero_ps(); }
  static AMTL_INLINE R broadcast(float v) { return _mm512_set1_ps(v); }
  // Lanes >= n read no memory and are +0.0 (zero-masked load); always masked, see avx2::Vec.
  static AMTL_INLINE R load(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static AMTL_INLINE void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static AMTL_INLINE void store(float* p, R v, int64_t n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static AMTL_INLINE R add(R a, R b) { return _mm512_add_ps(a, b); }
  static AMTL_INLINE R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static AMTL_INLINE R div(R a, R b) { return _mm512_div_ps(a, b); }
  static AMTL_INLINE R fma(R w, R x, R acc) { return _mm512_fmadd_ps(w, x, acc); }
  static AMTL_INLINE R max_keep(R x, R acc) { return _mm512_max_ps(x, acc); }
};

#include "simd_kernels.h"

AMTL_INSTANTIATE_CHUNKS()

#pragma GCC pop_options
}  // namespace amtl::avx512

#endif  // AMTL_X86
