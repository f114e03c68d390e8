// Packed (jagged) embedding lookups: the CPU kernels behind amtl_compress.lookup.
//
// A packed table keeps the first L_i (1 <= L_i <= D) values of row i (paper Eq. 1):
// `values` holds the kept prefixes back to back, row i is values[offsets[i] : offsets[i+1]].
// int8 and int4 values carry a per-row affine: value = q * scale[i] + bias[i] (tail stays 0);
// int4 values come as a uint8 tensor of nibbles (table.h, Int4).
//
// Exactness: for float32 values the outputs are bitwise equal to F.embedding / F.embedding_bag
// on the dense table whose tails are zero. That pins down the arithmetic (checked against
// torch's CPU EmbeddingBag): every bag starts from +0.0 and adds rows in input order; mean is
// sum / count (a division, count excluding padding_idx); max keeps the first row and then takes
// `v > cur ? v : cur`; weighted sums use a fused multiply-add when padding_idx is None (torch's
// fbgemm path) and a separate multiply and add otherwise (torch's fallback loop). The build
// passes -ffp-contract=off so the compiler never fuses on its own.
//
// The tail: memory is read for each row's prefix only, but the arithmetic runs over the tail with
// a +0.0 operand wherever that can change a result: w * 0 can be NaN or flip the sign of a zero,
// and max must see the zeros. (Adding +0.0 to an unweighted sum, which starts at +0.0, never
// changes it, so the portable unweighted loop skips it.)
//
// Safety: every id is checked against [0, N) (IndexError) and every looked-up row's offsets
// against [0, len(values)] and length <= D (ValueError) before its values are read; failures are
// collected across threads and the one at the smallest position is raised after the loop.
//
// This file: the portable kernels, the parallel drivers, the operators and their registration.
// The vector kernels are simd_kernels.h, compiled per ISA in kernels_avx2.cpp / kernels_avx512.cpp;
// what all of them share is in table.h. It is over 400 lines because the operators' argument
// checks and registration sit beside the drivers they call: all of them are instantiated from the
// same templates in this one translation unit.

#include "table.h"

namespace amtl {

// ---------------------------------------------------------------------------------------------
// x86 vector kernels: simd_kernels.h compiled for AVX2+FMA (kernels_avx2.cpp) and for AVX-512
// (kernels_avx512.cpp), picked at run time.
// ---------------------------------------------------------------------------------------------

#ifdef AMTL_X86
namespace avx2 {
AMTL_DECLARE_CHUNKS()
}  // namespace avx2
namespace avx512 {
AMTL_DECLARE_CHUNKS()
}  // namespace avx512
#endif  // AMTL_X86

namespace {

// ---------------------------------------------------------------------------------------------
// Portable kernels (any CPU; also forced with AMTL_COMPRESS_ISA=portable). Rows are walked over
// their prefix with plain loops; the tail is handled with the same 0 operand as the vector code.
// ---------------------------------------------------------------------------------------------

namespace portable {

template <typename T, typename OffT, typename index_t>
void embedding_chunk(const Table<T, OffT>& t, const index_t* ids, int64_t begin, int64_t end,
                     float* out, Failures& fail) {
  const int64_t dim = t.dim;
  for (int64_t j = begin; j < end; ++j) {
    if (j + kAheadOffsets < end) t.prefetch_offsets(ids[j + kAheadOffsets]);
    float* o = out + j * dim;
    const int64_t id = ids[j];
    int64_t s = 0, len = 0;
    if (id < 0 || id >= t.rows) {
      fail.bad_id.record(j);
    } else if (!t.row(id, &s, &len)) {
      fail.bad_row.record(j);
    } else if constexpr (std::is_same_v<T, float>) {
      std::memcpy(o, t.values + s, len * sizeof(float));
    } else {
      row_as_float(t, id, s, len, o);  // converts straight into the output row
    }
    std::memset(o + len, 0, (dim - len) * sizeof(float));
  }
}

template <typename T, typename OffT, typename index_t>
void bag_chunk(const Table<T, OffT>& t, const BagArgs<index_t>& a, int64_t b_begin,
               int64_t b_end, float* out, Failures& fail) {
  const int64_t dim = t.dim;
  std::vector<float> scratch(std::is_same_v<T, float> ? 0 : dim);
  const int64_t chunk_end = a.bag_start(b_end);
  for (int64_t b = b_begin; b < b_end; ++b) {
    float* o = out + b * dim;
    std::memset(o, 0, dim * sizeof(float));
    int64_t count = 0;
    const int64_t e = a.bag_start(b + 1);
    for (int64_t j = a.bag_start(b); j < e; ++j) {
      if (j + kAheadOffsets < chunk_end) t.prefetch_offsets(a.input[j + kAheadOffsets]);
      const int64_t id = a.input[j];
      if (id < 0 || id >= t.rows) {
        fail.bad_id.record(j);
        continue;
      }
      if (id == a.padding_idx) continue;
      int64_t s = 0, len = 0;
      if (!t.row(id, &s, &len)) {
        fail.bad_row.record(j);
        continue;
      }
      const float* x = row_as_float(t, id, s, len, scratch.data());
      if (a.mode == Mode::kMax) {
        for (int64_t d = 0; d < dim; ++d) {
          const float v = d < len ? x[d] : 0.0f;
          o[d] = count == 0 || v > o[d] ? v : o[d];
        }
      } else if (a.weighting == Weights::kNone) {
        // Adding the +0.0 tail would not change an accumulator that started at +0.0: skip it.
        for (int64_t d = 0; d < len; ++d) o[d] += x[d];
      } else {
        const float w = a.weights[j];
        for (int64_t d = 0; d < dim; ++d) {
          const float v = d < len ? x[d] : 0.0f;
          o[d] = a.weighting == Weights::kFused ? __builtin_fmaf(w, v, o[d]) : o[d] + v * w;
        }
      }
      ++count;
    }
    if (a.mode == Mode::kMean) {
      const float n = static_cast<float>(std::max<int64_t>(count, 1));
      for (int64_t d = 0; d < dim; ++d) o[d] = o[d] / n;
    }
  }
}

}  // namespace portable



enum class Isa { kPortable, kAvx2, kAvx512 };

Isa detect_isa() {
#ifdef AMTL_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("bmi2")) {
    return Isa::kAvx512;
  }
  if (avx2) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

// The best ISA of this CPU, capped by AMTL_COMPRESS_ISA (portable|avx2|avx512) if set: a
// debugging and testing switch, read on every call so tests can flip it.
Isa active_isa() {
  static const Isa best = detect_isa();
  const char* cap = std::getenv("AMTL_COMPRESS_ISA");
  if (cap == nullptr || *cap == '\0') return best;
  const std::string want(cap);
  Isa limit = Isa::kAvx512;
  if (want == "portable") {
    limit = Isa::kPortable;
  } else if (want == "avx2") {
    limit = Isa::kAvx2;
  } else {
    TORCH_CHECK_VALUE(want == "avx512", "AMTL_COMPRESS_ISA must be portable, avx2 or avx512, got '",
                      want, "'");
  }
  return std::min(best, limit);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "portable";
  }
}

// ---------------------------------------------------------------------------------------------
// Parallel drivers.
// ---------------------------------------------------------------------------------------------

template <typename T, typename OffT, typename index_t>
void embedding_kernel(const Table<T, OffT>& t, const index_t* ids, int64_t n, float* out) {
  Failures fail;
  const Isa isa = active_isa();
  const int64_t grain = std::max<int64_t>(1, kGrainFloats / t.dim);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    switch (isa) {
#ifdef AMTL_X86
      case Isa::kAvx512:
        return avx512::embedding_chunk(t, ids, begin, end, out, fail);
      case Isa::kAvx2:
        return avx2::embedding_chunk(t, ids, begin, end, out, fail);
#endif
      default:
        return portable::embedding_chunk(t, ids, begin, end, out, fail);
    }
  });
  raise_failures(t, ids, fail);
}

template <typename T, typename OffT, typename index_t>
void bag_kernel(const Table<T, OffT>& t, const BagArgs<index_t>& a, int64_t num_bags,
                float* out) {
  Failures fail;
  const Isa isa = active_isa();
  const int64_t mean_bag = num_bags > 0 ? std::max<int64_t>(1, a.nnz / num_bags) : 1;
  const int64_t grain = std::max<int64_t>(1, kGrainFloats / (t.dim * mean_bag));
  at::parallel_for(0, num_bags, grain, [&](int64_t begin, int64_t end) {
    switch (isa) {
#ifdef AMTL_X86
      case Isa::kAvx512:
        return avx512::bag_chunk(t, a, begin, end, out, fail);
      case Isa::kAvx2:
        return avx2::bag_chunk(t, a, begin, end, out, fail);
#endif
      default:
        return portable::bag_chunk(t, a, begin, end, out, fail);
    }
  });
  raise_failures(t, a.input, fail);
}
// ---------------------------------------------------------------------------------------------
// Operator entry points: argument checks (O(1) plus one pass over the bag offsets), dispatch.
// ---------------------------------------------------------------------------------------------

void check_table(const at::Tensor& values, const at::Tensor& offsets,
                 const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias,
                 int64_t embedding_dim) {
  TORCH_CHECK_TYPE(values.dim() == 1 && values.is_contiguous(),
                   "`values` must be a contiguous 1-D tensor (call .contiguous()), got ",
                   values.dim(), "-D");
  // int32 offsets are the modules' derived copy (len(values) < 2^31); the format's are int64.
  TORCH_CHECK_TYPE(offsets.dim() == 1 &&
                       (offsets.scalar_type() == at::kLong || offsets.scalar_type() == at::kInt) &&
                       offsets.is_contiguous() && offsets.numel() >= 1,
                   "`offsets` must be a contiguous, non-empty 1-D int64 (or int32) tensor "
                   "(N + 1,)");
  TORCH_CHECK_VALUE(embedding_dim >= 1 && embedding_dim < (int64_t{1} << 30),
                    "`embedding_dim` must be in [1, 2^30), got ", embedding_dim);
  const int64_t rows = offsets.numel() - 1;
  // uint8 values are int4 (two a byte); int8 and int4 carry a scale and bias per row.
  const bool quantized = values.scalar_type() == at::kChar || values.scalar_type() == at::kByte;
  for (const auto* opt : {&scale, &bias}) {
    const char* label = opt == &scale ? "scale" : "bias";
    const bool given = opt->has_value() && (*opt)->defined();
    if (quantized) {
      TORCH_CHECK_TYPE(given && (*opt)->scalar_type() == at::kFloat && (*opt)->dim() == 1 &&
                           (*opt)->numel() == rows && (*opt)->is_contiguous(),
                       "int8 / int4 (uint8) `values` need a contiguous float32 `", label,
                       "` of shape (", rows, ",)");
    } else {
      TORCH_CHECK_TYPE(!given, "`", label,
                       "` is only used with int8 / int4 (uint8) `values`, got ",
                       values.scalar_type());
    }
  }
}

template <typename OffT>
const OffT* offsets_ptr(const at::Tensor& offsets) {
  if constexpr (std::is_same_v<OffT, uint32_t>) {  // a validated int32 copy: all in [0, 2^31)
    return reinterpret_cast<const uint32_t*>(offsets.const_data_ptr<int32_t>());
  } else {
    return offsets.const_data_ptr<OffT>();
  }
}

template <typename T, typename OffT>
Table<T, OffT> make_table(const at::Tensor& values, const at::Tensor& offsets,
                          const std::optional<at::Tensor>& scale,
                          const std::optional<at::Tensor>& bias, int64_t embedding_dim) {
  constexpr bool quantized = kQuantized<T>;
  const T* data;
  int64_t num_values = values.numel();
  if constexpr (std::is_same_v<T, Int4>) {
    data = reinterpret_cast<const Int4*>(values.const_data_ptr<uint8_t>());
    num_values *= 2;  // nibbles
  } else {
    data = values.const_data_ptr<T>();
  }
  return Table<T, OffT>{data,
                        num_values,
                        offsets_ptr<OffT>(offsets),
                        offsets.numel() - 1,
                        quantized ? scale->const_data_ptr<float>() : nullptr,
                        quantized ? bias->const_data_ptr<float>() : nullptr,
                        embedding_dim};
}

// Calls fn(T{}, OffT{}) with T the C++ type of the packed values, OffT that of the offsets.
// trusted: the caller (a module) validated int32 offsets whole; int64 offsets are always checked.
template <typename Fn>
void dispatch_values(at::ScalarType dtype, at::ScalarType offsets_dtype, bool trusted, Fn&& fn) {
  auto with_offsets = [&](auto tag) {
    if (offsets_dtype == at::kInt && trusted) return fn(tag, uint32_t{});
    if (offsets_dtype == at::kInt) return fn(tag, int32_t{});
    return fn(tag, int64_t{});
  };
  switch (dtype) {
    case at::kFloat:
      return with_offsets(float{});
    case at::kHalf:
      return with_offsets(c10::Half{});
    case at::kBFloat16:
      return with_offsets(c10::BFloat16{});
    case at::kChar:
      return with_offsets(int8_t{});
    case at::kByte:
      return with_offsets(Int4{});
    default:
      TORCH_CHECK_TYPE(false,
                       "`values` must be float32, float16, bfloat16, int8 or uint8 (int4), got ",
                       dtype);
  }
}

template <bool kTrusted>
at::Tensor packed_embedding(const at::Tensor& values, const at::Tensor& offsets,
                            const std::optional<at::Tensor>& scale,
                            const std::optional<at::Tensor>& bias, const at::Tensor& ids,
                            int64_t embedding_dim) {
  check_table(values, offsets, scale, bias, embedding_dim);
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
                   "ids must be int32 or int64, got ", ids.scalar_type());
  const at::Tensor ids_c = ids.contiguous();
  std::vector<int64_t> out_sizes(ids.sizes().begin(), ids.sizes().end());
  out_sizes.push_back(embedding_dim);
  at::Tensor out = at::empty(out_sizes, values.options().dtype(at::kFloat));
  dispatch_values(values.scalar_type(), offsets.scalar_type(), kTrusted, [&](auto tag, auto off_tag) {
    using T = decltype(tag);
    using OffT = decltype(off_tag);
    const Table<T, OffT> t = make_table<T, OffT>(values, offsets, scale, bias, embedding_dim);
    AT_DISPATCH_INDEX_TYPES(ids_c.scalar_type(), "packed_embedding", [&] {
      embedding_kernel<T, OffT, index_t>(t, ids_c.const_data_ptr<index_t>(), ids_c.numel(),
                                   out.mutable_data_ptr<float>());
    });
  });
  return out;
}

template <typename index_t>
void check_bag_offsets(const index_t* bag_offsets, int64_t n_offsets, int64_t nnz,
                       bool include_last_offset) {
  if (n_offsets == 0) return;
  TORCH_CHECK_VALUE(bag_offsets[0] == 0, "offsets[0] must be 0, got ",
                    static_cast<int64_t>(bag_offsets[0]));
  for (int64_t b = 1; b < n_offsets; ++b) {
    TORCH_CHECK_VALUE(bag_offsets[b] >= bag_offsets[b - 1],
                      "bag `offsets` must be non-decreasing, offsets[", b, "] = ",
                      static_cast<int64_t>(bag_offsets[b]), " < offsets[", b - 1, "]");
  }
  const int64_t last = bag_offsets[n_offsets - 1];
  TORCH_CHECK_VALUE(last <= nnz && (!include_last_offset || last == nnz),
                    "the last bag offset must ", include_last_offset ? "equal" : "be <=",
                    " len(input) = ", nnz, ", got ", last);
}

template <bool kTrusted>
at::Tensor packed_embedding_bag(const at::Tensor& values, const at::Tensor& offsets,
                                const std::optional<at::Tensor>& scale,
                                const std::optional<at::Tensor>& bias, const at::Tensor& input,
                                const at::Tensor& bag_offsets,
                                const std::optional<at::Tensor>& per_sample_weights,
                                c10::string_view mode, int64_t embedding_dim,
                                std::optional<int64_t> padding_idx, bool include_last_offset) {
  check_table(values, offsets, scale, bias, embedding_dim);
  const int64_t rows = offsets.numel() - 1;
  Mode m;
  if (mode == "sum") {
    m = Mode::kSum;
  } else if (mode == "mean") {
    m = Mode::kMean;
  } else if (mode == "max") {
    m = Mode::kMax;
  } else {
    TORCH_CHECK_VALUE(false, "mode must be one of sum, mean, max, got '", mode, "'");
  }
  TORCH_CHECK_VALUE(input.dim() == 1, "input must be 1-D, got ", input.dim(), "-D");
  TORCH_CHECK_TYPE(input.scalar_type() == at::kLong || input.scalar_type() == at::kInt,
                   "input must be int32 or int64, got ", input.scalar_type());
  TORCH_CHECK_TYPE(bag_offsets.dim() == 1 && (bag_offsets.scalar_type() == at::kLong ||
                                              bag_offsets.scalar_type() == at::kInt),
                   "bag `offsets` must be a 1-D int32/int64 tensor");
  TORCH_CHECK_VALUE(!include_last_offset || bag_offsets.numel() >= 1,
                    "with include_last_offset=True, `offsets` needs at least 1 element");
  const bool weighted = per_sample_weights.has_value() && per_sample_weights->defined();
  if (weighted) {
    TORCH_CHECK_NOT_IMPLEMENTED(m == Mode::kSum,
                                "per_sample_weights is only supported for mode='sum' (got mode='",
                                mode, "')");
    TORCH_CHECK_TYPE(per_sample_weights->scalar_type() == at::kFloat &&
                         per_sample_weights->dim() == 1 &&
                         per_sample_weights->numel() == input.numel(),
                     "per_sample_weights must be float32 of shape (", input.numel(), ",)");
  }
  const int64_t pad = padding_idx.value_or(-1);
  TORCH_CHECK_VALUE(!padding_idx.has_value() || (pad >= 0 && pad < rows),
                    "padding_idx must be in [0, ", rows, "), got ", pad);

  const at::Tensor input_c = input.contiguous();
  const at::Tensor bag_offsets_c = bag_offsets.to(input.scalar_type()).contiguous();
  const at::Tensor weights_c = weighted ? per_sample_weights->contiguous() : at::Tensor();
  const int64_t n_offsets = bag_offsets_c.numel();
  const int64_t num_bags = include_last_offset ? n_offsets - 1 : n_offsets;
  at::Tensor out = at::empty({num_bags, embedding_dim}, values.options().dtype(at::kFloat));
  // Mirror torch's two arithmetic paths for weighted sums (see the file comment).
  const Weights weighting =
      !weighted ? Weights::kNone : (padding_idx.has_value() ? Weights::kSeparate : Weights::kFused);

  dispatch_values(values.scalar_type(), offsets.scalar_type(), kTrusted, [&](auto tag, auto off_tag) {
    using T = decltype(tag);
    using OffT = decltype(off_tag);
    const Table<T, OffT> t = make_table<T, OffT>(values, offsets, scale, bias, embedding_dim);
    AT_DISPATCH_INDEX_TYPES(input_c.scalar_type(), "packed_embedding_bag", [&] {
      const index_t* boffs = bag_offsets_c.const_data_ptr<index_t>();
      check_bag_offsets(boffs, n_offsets, input_c.numel(), include_last_offset);
      const BagArgs<index_t> args{input_c.const_data_ptr<index_t>(),
                                  input_c.numel(),
                                  boffs,
                                  n_offsets,
                                  weighted ? weights_c.const_data_ptr<float>() : nullptr,
                                  weighting,
                                  m,
                                  pad};
      bag_kernel<T, OffT, index_t>(t, args, num_bags, out.mutable_data_ptr<float>());
    });
  });
  return out;
}

}  // namespace
}  // namespace amtl

TORCH_LIBRARY(amtl_compress, m) {
  m.def(
      "packed_embedding(Tensor values, Tensor offsets, Tensor? scale, Tensor? bias, Tensor ids, "
      "int embedding_dim) -> Tensor");
  m.def(
      "packed_embedding_bag(Tensor values, Tensor offsets, Tensor? scale, Tensor? bias, "
      "Tensor input, Tensor bag_offsets, Tensor? per_sample_weights, str mode, "
      "int embedding_dim, int? padding_idx, bool include_last_offset) -> Tensor");
  // The same, for the modules only: int32 `offsets` the caller has validated whole (0 first,
  // len(values) last, every length in [0, embedding_dim]) are not re-checked per row. Ids are
  // still checked against [0, N). Unvalidated offsets passed here can read outside `values`.
  m.def(
      "packed_embedding_trusted(Tensor values, Tensor offsets, Tensor? scale, Tensor? bias, "
      "Tensor ids, int embedding_dim) -> Tensor");
  m.def(
      "packed_embedding_bag_trusted(Tensor values, Tensor offsets, Tensor? scale, Tensor? bias, "
      "Tensor input, Tensor bag_offsets, Tensor? per_sample_weights, str mode, "
      "int embedding_dim, int? padding_idx, bool include_last_offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(amtl_compress, CPU, m) {
  m.impl("packed_embedding", &amtl::packed_embedding<false>);
  m.impl("packed_embedding_bag", &amtl::packed_embedding_bag<false>);
  m.impl("packed_embedding_trusted", &amtl::packed_embedding<true>);
  m.impl("packed_embedding_bag_trusted", &amtl::packed_embedding_bag<true>);
}
