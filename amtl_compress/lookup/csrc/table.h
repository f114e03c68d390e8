// Shared by the kernel's translation units (lookup.cpp and the per-ISA kernels_*.cpp): the
// packed table and its per-row access, failure collection, bag arguments and the prefetch
// helpers. See lookup.cpp for the layout, the exactness rules and the safety checks.

#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define AMTL_X86 1
#include <immintrin.h>
#endif

#define AMTL_INLINE inline __attribute__((always_inline))
#define AMTL_INLINE_LAMBDA __attribute__((always_inline))

// GCC treats __builtin_prefetch as free of side effects and deletes loops made only of prefetches
// (seen with GCC 12 -O3); a volatile asm on x86 cannot be deleted. The "p" (address) operand lets
// GCC fold a constant displacement into the instruction: `prefetcht0 0x40(%rax)`, one instruction
// per line.
AMTL_INLINE void prefetch(const void* p) {
#ifdef AMTL_X86
  asm volatile("prefetcht0 %a0" : : "p"(p));
#else
  __builtin_prefetch(p);
#endif
}

namespace amtl {


// Output floats per parallel chunk; the same grain torch uses for its elementwise loops, so small
// batches stay on the calling thread.
constexpr int64_t kGrainFloats = 32768;
// Prefetch distance in ids: row lines are prefetched kAhead ids before they are read, offsets
// kAheadOffsets ids before (so reading them to address the row prefetch does not stall). A cached
// row takes ~3 ns, so 16 ids ahead leaves too little time for a DRAM miss: 16 and 24 measured
// slower than 32 for bags (docs/lookup.md, "Experiments").
constexpr int64_t kAhead = 32;
constexpr int64_t kAheadOffsets = 2 * kAhead;

// Cache lines that `bytes` contiguous bytes starting at any multiple of `elem` can touch.
constexpr int lines_spanned(int64_t bytes, int64_t elem) {
  return static_cast<int>((bytes + 63 - elem) / 64 + 1);
}

// ---------------------------------------------------------------------------------------------
// The packed table and per-row access.
// ---------------------------------------------------------------------------------------------

// int4 values (a torch.uint8 tensor of ceil(S / 2) bytes): value j is the low nibble of byte
// j / 2 for even j, the high nibble for odd j, unsigned 0..15, decoded as u * scale + bias. The
// tag stands for one byte of that stream: Table<Int4>::values points at byte 0, and positions
// (offsets, starts, lengths) count nibbles, so `values + s` is never formed for it; see
// value_byte().
struct Int4 {
  uint8_t bits;
};

// Per-row scale and bias: int8 and int4.
template <typename T>
constexpr bool kQuantized = std::is_same_v<T, int8_t> || std::is_same_v<T, Int4>;

// Byte offset of value `pos` in a values array of T.
template <typename T>
AMTL_INLINE constexpr uint64_t value_byte(uint64_t pos) {
  if constexpr (std::is_same_v<T, Int4>) {
    return pos >> 1;
  } else {
    return pos * sizeof(T);
  }
}

// Bytes that `n` consecutive values of T can touch (int4: a nibble-aligned start may add one).
template <typename T>
constexpr int64_t values_bytes(int64_t n) {
  return std::is_same_v<T, Int4> ? n / 2 + 1 : n * static_cast<int64_t>(sizeof(T));
}

// Value u of nibble position `pos` of an int4 stream (see Int4).
AMTL_INLINE uint32_t nibble(const Int4* v, int64_t pos) {
  return (static_cast<uint32_t>(v[pos >> 1].bits) >> ((pos & 1) * 4)) & 0xFu;
}

// OffT is the offsets type: int64 (the format), or int32 when len(values) < 2^31 (the modules
// derive such a copy once, which halves the index the lookups walk through). uint32_t marks that
// copy after the module validated it whole (the `*_trusted` operators): rows are not re-checked.
template <typename T, typename OffT = int64_t>
struct Table {
  const T* values;
  int64_t num_values;   // values it holds (int4: 2 x its bytes, the nibbles)
  const OffT* offsets;  // (rows + 1,)
  int64_t rows;         // N
  const float* scale;   // (N,) for int8 / int4, else nullptr
  const float* bias;    // (N,) for int8 / int4, else nullptr
  int64_t dim;          // D

  // Start and length of row `id` (already checked to be in [0, N)); false if the offsets are
  // corrupt, so nothing outside `values` is ever read. Unsigned compares: 0 <= s <= e <= len and
  // e - s <= D in three compare-and-branch pairs (never taken, so cheaper than combining them
  // without branches, which measured slower).
  AMTL_INLINE bool row(int64_t id, int64_t* start, int64_t* length) const {
    const int64_t s = offsets[id];
    const int64_t e = offsets[id + 1];
    // uint32_t offsets are the modules' int32 copy, validated as a whole when it was derived
    // (trusted operators only): no per-row check.
    if constexpr (std::is_same_v<OffT, uint32_t>) {
      *start = s;
      *length = e - s;
      return true;
    }
    if (static_cast<uint64_t>(e) > static_cast<uint64_t>(num_values) ||
        static_cast<uint64_t>(s) > static_cast<uint64_t>(e) || e - s > dim) {
      return false;
    }
    *start = s;
    *length = e - s;
    return true;
  }

  // Prefetches kLines lines from the start of row `id` into L1 (offsets are read only for ids in
  // [0, N)): the whole span the vector loads of the row touch, masked lanes included (this CPU
  // fetches the lines of masked-off lanes too). A fixed count, not clamped to the row's end: a
  // clamp costs two instructions per line (cmp, cmov), more than fetching the lines of the next
  // rows costs (clamped variants measured slower; docs/lookup.md, "Experiments"). Prefetches never
  // fault, so corrupt offsets only waste a hint.
  template <int kLines>
  AMTL_INLINE void prefetch_row(int64_t id) const {
    if (static_cast<uint64_t>(id) >= static_cast<uint64_t>(rows)) return;
    // Integer arithmetic: corrupt offsets must not make this pointer arithmetic out of bounds.
    const uintptr_t first =
        reinterpret_cast<uintptr_t>(values) +
        static_cast<uintptr_t>(value_byte<T>(static_cast<int64_t>(offsets[id])));
    for (int k = 0; k < kLines; ++k) prefetch(reinterpret_cast<const void*>(first + 64 * k));
    if constexpr (kQuantized<T>) {  // the row's scale and bias: two more lines
      prefetch(scale + id);
      prefetch(bias + id);
    }
  }

  // One hint, no bounds check (a prefetch never faults, whatever the id): offsets[id + 1] shares
  // the line except at a line boundary.
  AMTL_INLINE void prefetch_offsets(int64_t id) const {
    prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(offsets) +
                                           static_cast<uintptr_t>(id) * sizeof(OffT)));
  }
};

// Row prefix as float32: float rows are used in place, the others are converted into `scratch`.
template <typename OffT>
AMTL_INLINE const float* row_as_float(const Table<float, OffT>& t, int64_t, int64_t s, int64_t,
                                      float*) {
  return t.values + s;
}

template <typename T, typename OffT>
AMTL_INLINE const float* row_as_float(const Table<T, OffT>& t, int64_t, int64_t s, int64_t n,
                                      float* scratch) {
  const T* src = t.values + s;
  for (int64_t d = 0; d < n; ++d) scratch[d] = static_cast<float>(src[d]);
  return scratch;
}

template <typename OffT>
AMTL_INLINE const float* row_as_float(const Table<int8_t, OffT>& t, int64_t id, int64_t s,
                                      int64_t n, float* scratch) {
  if (n <= 0) return scratch;  // also for failed ids: never index scale/bias with them
  const int8_t* src = t.values + s;
  const float scale = t.scale[id];
  const float bias = t.bias[id];
  // Two roundings, like the reference (`q.float() * scale + bias`): -ffp-contract=off keeps it so.
  for (int64_t d = 0; d < n; ++d) scratch[d] = static_cast<float>(src[d]) * scale + bias;
  return scratch;
}

template <typename OffT>
AMTL_INLINE const float* row_as_float(const Table<Int4, OffT>& t, int64_t id, int64_t s,
                                      int64_t n, float* scratch) {
  if (n <= 0) return scratch;  // also for failed ids: never index scale/bias with them
  const float scale = t.scale[id];
  const float bias = t.bias[id];
  for (int64_t d = 0; d < n; ++d) {
    scratch[d] = static_cast<float>(nibble(t.values, s + d)) * scale + bias;
  }
  return scratch;
}

// Smallest failing position seen by any thread, so the error message does not depend on timing.
class FirstFailure {
 public:
  void record(int64_t pos) {
    int64_t cur = pos_.load(std::memory_order_relaxed);
    while (pos < cur && !pos_.compare_exchange_weak(cur, pos, std::memory_order_relaxed)) {
    }
  }
  bool any() const { return pos_.load() != kNone; }
  int64_t pos() const { return pos_.load(); }

 private:
  static constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  std::atomic<int64_t> pos_{kNone};
};

struct Failures {
  FirstFailure bad_id;   // position of an id outside [0, N)
  FirstFailure bad_row;  // position of an id whose row has corrupt offsets
};

template <typename T, typename OffT, typename index_t>
void raise_failures(const Table<T, OffT>& t, const index_t* ids, const Failures& fail) {
  if (fail.bad_id.any()) {
    const int64_t j = fail.bad_id.pos();
    TORCH_CHECK_INDEX(false, "id ", static_cast<int64_t>(ids[j]), " at position ", j,
                      " is outside [0, ", t.rows, ")");
  }
  if (fail.bad_row.any()) {
    const int64_t id = ids[fail.bad_row.pos()];
    TORCH_CHECK_VALUE(false, "corrupt offsets for row ", id, ": [",
                      static_cast<int64_t>(t.offsets[id]), ", ",
                      static_cast<int64_t>(t.offsets[id + 1]), ") is not within [0, ",
                      t.num_values, "] or is longer than ", t.dim);
  }
}

enum class Mode { kSum, kMean, kMax };
enum class Weights { kNone, kFused, kSeparate };

template <typename index_t>
struct BagArgs {
  const index_t* input;        // (nnz,)
  int64_t nnz;
  const index_t* bag_offsets;  // (n_offsets,), checked: 0 first, non-decreasing, last <= nnz
  int64_t n_offsets;
  const float* weights;        // (nnz,) or nullptr
  Weights weighting;
  Mode mode;
  int64_t padding_idx;         // -1 for none

  // Bag b spans input[bag_start(b) : bag_start(b + 1)]; without include_last_offset the last bag
  // ends at nnz.
  int64_t bag_start(int64_t b) const {
    return b < n_offsets ? static_cast<int64_t>(bag_offsets[b]) : nnz;
  }
};

// The chunk kernels of one ISA (simd_kernels.h, compiled in kernels_avx2.cpp / kernels_avx512.cpp)
// as lookup.cpp calls them: declared there, defined and instantiated in the ISA's own translation
// unit, so the ISAs compile in parallel. Every (values, offsets, ids) type lookup.cpp dispatches
// to is instantiated.
#define AMTL_DECLARE_CHUNKS()                                                                  \
  template <typename T, typename OffT, typename index_t>                                      \
  void embedding_chunk(const Table<T, OffT>& t, const index_t* ids, int64_t begin, int64_t end, \
                       float* out, Failures& fail);                                           \
  template <typename T, typename OffT, typename index_t>                                      \
  void bag_chunk(const Table<T, OffT>& t, const BagArgs<index_t>& a, int64_t b_begin,         \
                 int64_t b_end, float* out, Failures& fail);

#define AMTL_INSTANTIATE_CHUNK(T, OffT, index_t)                                             \
  template void embedding_chunk<T, OffT, index_t>(const Table<T, OffT>&, const index_t*,       \
                                                  int64_t, int64_t, float*, Failures&);        \
  template void bag_chunk<T, OffT, index_t>(const Table<T, OffT>&, const BagArgs<index_t>&,    \
                                            int64_t, int64_t, float*, Failures&);
#define AMTL_INSTANTIATE_OFFSETS(T, index_t) \
  AMTL_INSTANTIATE_CHUNK(T, int64_t, index_t)  \
  AMTL_INSTANTIATE_CHUNK(T, int32_t, index_t)  \
  AMTL_INSTANTIATE_CHUNK(T, uint32_t, index_t)
#define AMTL_INSTANTIATE_VALUES(index_t)              \
  AMTL_INSTANTIATE_OFFSETS(float, index_t)           \
  AMTL_INSTANTIATE_OFFSETS(c10::Half, index_t)       \
  AMTL_INSTANTIATE_OFFSETS(c10::BFloat16, index_t)   \
  AMTL_INSTANTIATE_OFFSETS(int8_t, index_t)          \
  AMTL_INSTANTIATE_OFFSETS(Int4, index_t)
#define AMTL_INSTANTIATE_CHUNKS() \
  AMTL_INSTANTIATE_VALUES(int64_t)  \
  AMTL_INSTANTIATE_VALUES(int32_t)

}  // namespace amtl
