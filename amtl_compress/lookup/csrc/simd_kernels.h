// Vectorised per-chunk kernels, written once against a `Vec` policy and compiled per ISA.
//
// kernels_avx2.cpp and kernels_avx512.cpp include this file inside `namespace amtl::avx2` and
// `namespace amtl::avx512`, each under a `#pragma GCC target(...)` region that also defines `Vec`
// (W float lanes; masked loads whose inactive lanes are +0.0). The pragma gives every function
// defined here the ISA.
//
// Ids are walked in order with a two-level software prefetch: the offsets of the id kAheadOffsets
// positions ahead, and the row lines of the id kAhead positions ahead (whose offsets are in cache
// by then).
//
// Rows are read with masked loads over their L-value prefix: lanes past L are +0.0, exactly the
// zero tail of the dense table, so every mode does the dense arithmetic on every column. Nothing
// here branches on a row length (such branches mispredict, and each misprediction also squashes
// the loads of the next ids already in flight): every vector of the row is loaded, with the lanes
// past L masked off, also when all of them are (masked-off lanes never fault). An all-off masked
// load to a line not in cache still costs like a cache miss on the CPUs measured (AMD Zen 4 / 5),
// so the first kFree vectors of a row, whose lines were all prefetched with it
// (Table::prefetch_row), are loaded from p + k * W as they are, and the vectors after them are
// pointed back inside the row (min(k * W, L - 1): a cmp + cmov each). Clamping every vector and
// prefetching only the row's own lines (a cmp + cmov per line) fetched fewer lines, but cost more
// instructions than those lines were worth (docs/lookup.md). AVX-512 converts float16 / bfloat16 /
// int8 in registers from masked 16/8-bit loads. Where no masked load fits (AVX2: float16, bfloat16,
// int8; both ISAs: int4) a vector is a plain load converted in registers, its lanes past L then
// zeroed (WideRow); the plain load can read past the row, so the last rows of a table, whose loads
// could reach past the end of `values`, are converted into a scratch row instead (one compare per
// row, almost never taken). Converting every row through scratch, as AVX2 once did, ran a loop
// whose trip count is the row length: 5-10x the float32 cost per id (docs/lookup.md).
//
// Bags accumulate a block of NV vectors (NV * W columns) in registers over all ids of the bag,
// block after block; per column the additions run in input order, as in torch.

// No include guard and no #include: this file is included once per ISA namespace.

// Row prefix as float32 in `scratch` (n floats), for the rows WideRow may not read (the last ones
// of a table) on an ISA without masked converting loads for T. The loops are inlined into the ISA
// region, so they vectorise. float32 (in place), int8 (q * scale + bias) and int4 are table.h's
// row_as_float; float16 uses F16C and bfloat16 a shift here. n == 0 (and failed ids) read nothing.
template <typename T, typename OffT>
AMTL_INLINE const float* row_floats(const Table<T, OffT>& t, int64_t id, int64_t s, int64_t n,
                                    float* scratch) {
  return row_as_float(t, id, s, n, scratch);
}

template <typename OffT>
AMTL_INLINE const float* row_floats(const Table<c10::Half, OffT>& t, int64_t, int64_t s,
                                    int64_t n, float* scratch) {
  const uint16_t* src = reinterpret_cast<const uint16_t*>(t.values + s);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {  // whole groups of 8 only: never read past the row
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(scratch + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) scratch[i] = _cvtsh_ss(src[i]);
  return scratch;
}

template <typename OffT>
AMTL_INLINE const float* row_floats(const Table<c10::BFloat16, OffT>& t, int64_t, int64_t s,
                                    int64_t n, float* scratch) {
  const uint16_t* src = reinterpret_cast<const uint16_t*>(t.values + s);
  uint32_t* dst = reinterpret_cast<uint32_t*>(scratch);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<uint32_t>(src[i]) << 16;  // exact
  return scratch;
}

template <int NV>
struct Acc {
  typename Vec::R v[NV];
};

// Lines that the first `vectors` vector loads of a row of T (from its start) can touch.
template <typename T>
constexpr int row_lines(int64_t vectors) {
  return lines_spanned(values_bytes<T>(vectors * Vec::W),
                       std::is_same_v<T, Int4> ? 1 : static_cast<int64_t>(sizeof(T)));
}

// How many vectors from a row's start lie within its first `lines` lines (wherever it starts).
template <typename T>
constexpr int vectors_within(int lines) {
  int k = 0;
  while (row_lines<T>(k + 1) <= lines) ++k;
  return k;
}

// The prefix of one row seen from column c0, as vectors of W float32 (+0.0 past the prefix), read
// with masked loads. E is float, or the packed dtype where Vec converts in registers
// (Vec::masked<T>). Vectors from kFree on point back inside the row when they lie wholly past it
// (see the top of this file).
template <typename E, int kFree>
struct Row {
  const E* p;
  int64_t lim;                // the last value of the prefix, from p (0 if none)
  typename Vec::Lanes lanes;  // the values left from p (may be <= 0), as Vec::mask_k wants them
  float scale, bias;          // int8 only

  AMTL_INLINE Row(const E* p_, int64_t rem, float scale_ = 1.0f, float bias_ = 0.0f)
      : p(p_), lim(std::max<int64_t>(rem - 1, 0)), lanes(Vec::lanes(rem)), scale(scale_),
        bias(bias_) {}

  AMTL_INLINE typename Vec::R vec(int64_t k) const {
    // min() compiles to a cmov; `?:` on the pointer became an unpredictable branch.
    const int64_t at = k < kFree ? k * Vec::W : std::min<int64_t>(k * Vec::W, lim);
    return Vec::load(p + at, Vec::mask_k(lanes, k), scale, bias);
  }
};

// The same for a dtype Vec has no masked converting load for (AVX2: float16, bfloat16, int8;
// both ISAs: int4): each vector is a plain load of W values (int4: of the bytes that hold them),
// converted in registers, with the lanes past the prefix then set to +0.0. The plain load may read
// up to W - 1 values past the row, so with_row takes this path only for rows at least
// wide_margin() values before the end of `values` (all but the last few rows of a table). Vectors
// from kFree on that lie wholly past the prefix are pointed back at the row's last value (not past
// it, as Row does: its masked loads read nothing there, these read a whole vector).
template <typename T, int kFree>
struct WideRow {
  const T* values;  // the table's values (int4: byte 0 of the stream)
  int64_t first;    // position of column c0 of the row in `values`
  int64_t last;     // position of the row's last value (its start if it has none)
  typename Vec::Lanes lanes;
  float scale, bias;  // int8 / int4 only
  // int4: how the nibbles of a vector sit in its bytes, set once per row from the parity of
  // `first` (W is even, so every vector of the row shares it; a vector pointed back at `last` may
  // not, but all its lanes are zeroed anyway).
  typename Vec::Nibbles nibbles;

  AMTL_INLINE WideRow(const T* values_, int64_t s, int64_t n, int64_t c0, float scale_,
                      float bias_)
      : values(values_), first(s + c0), last(s + std::max<int64_t>(n - 1, 0)),
        lanes(Vec::lanes(n - c0)), scale(scale_), bias(bias_) {
    if constexpr (std::is_same_v<T, Int4>) nibbles = Vec::nibbles(first & 1);
  }

  AMTL_INLINE typename Vec::R vec(int64_t k) const {
    const int64_t at = k < kFree ? first + k * Vec::W : std::min<int64_t>(first + k * Vec::W, last);
    if constexpr (std::is_same_v<T, Int4>) {
      return Vec::wide(values, at, Vec::mask_k(lanes, k), scale, bias, nibbles);
    } else {
      return Vec::wide(values, at, Vec::mask_k(lanes, k), scale, bias);
    }
  }
};

// Values past a row's start that WideRow's loads may read, for rows up to D with blocks of NV
// vectors: a vector starts at most max((NV - 1) * W, D - 1) values past the row start and reads W
// values (int4: W bytes from the byte of its first value, so W nibbles more).
template <typename T, int NV>
constexpr int64_t wide_reach(int64_t dim) {
  return dim + NV * Vec::W + (std::is_same_v<T, Int4> ? Vec::W : 0);
}

// Whether rows of T are read with WideRow (and, near the end of `values`, through a float
// scratch row): no masked load of Vec reads them.
template <typename T>
constexpr bool uses_wide() {
  return !std::is_same_v<T, float> && !Vec::template masked<T>();
}

// The last row start WideRow may read from (see wide_reach); 0, unused, for other dtypes.
template <typename T, int NV, typename OffT>
AMTL_INLINE int64_t wide_limit_of(const Table<T, OffT>& t) {
  if constexpr (uses_wide<T>()) {
    return t.num_values - wide_reach<T, NV>(t.dim);
  } else {
    return 0;
  }
}

// Calls fn(row) for row id (start s, n values) seen from column c0: masked loads in place when
// the values are float32 or Vec converts them so; else WideRow when s <= wide_limit (the row is far
// enough from the end of `values`), else through `scratch` (D floats; needs no pointing back: it
// is in cache). The wide_limit branch is almost never taken, so it predicts well.
template <int kFree, typename T, typename OffT, typename Fn>
AMTL_INLINE void with_row(const Table<T, OffT>& t, int64_t id, int64_t s, int64_t n, int64_t c0,
                          int64_t wide_limit, float* scratch, Fn&& fn) {
  if constexpr (std::is_same_v<T, float>) {
    fn(Row<float, kFree>(t.values + s + c0, n - c0));
  } else {
    float scale = 1.0f, bias = 0.0f;
    if constexpr (kQuantized<T>) {
      scale = n > 0 ? t.scale[id] : 0.0f;  // failed ids have n == 0: not indexed
      bias = n > 0 ? t.bias[id] : 0.0f;
    }
    if constexpr (Vec::template masked<T>()) {
      fn(Row<T, kFree>(t.values + s + c0, n - c0, scale, bias));
    } else if (s <= wide_limit) {
      fn(WideRow<T, kFree>(t.values, s, n, c0, scale, bias));
    } else {
      fn(Row<float, std::numeric_limits<int>::max()>(row_floats(t, id, s, n, scratch) + c0,
                                                      n - c0));
    }
  }
}

struct SumOp {
  static constexpr bool kWeighted = false;
  template <int NV, typename RowT>
  static AMTL_INLINE void apply(Acc<NV>& a, const RowT& r, bool, float) {
    for (int k = 0; k < NV; ++k) a.v[k] = Vec::add(a.v[k], r.vec(k));
  }
};

// torch's weighted sum without padding_idx (fbgemm): one rounding, w * x + acc.
struct FusedOp {
  static constexpr bool kWeighted = true;
  template <int NV, typename RowT>
  static AMTL_INLINE void apply(Acc<NV>& a, const RowT& r, bool, float w) {
    const typename Vec::R wv = Vec::broadcast(w);
    for (int k = 0; k < NV; ++k) a.v[k] = Vec::fma(wv, r.vec(k), a.v[k]);
  }
};

// torch's weighted sum with padding_idx (its scalar loop): acc + x * w, two roundings.
struct SeparateOp {
  static constexpr bool kWeighted = true;
  template <int NV, typename RowT>
  static AMTL_INLINE void apply(Acc<NV>& a, const RowT& r, bool, float w) {
    const typename Vec::R wv = Vec::broadcast(w);
    for (int k = 0; k < NV; ++k) a.v[k] = Vec::add(a.v[k], Vec::mul(r.vec(k), wv));
  }
};

// torch's max: the first row is taken as is, then `x > acc ? x : acc` per column.
struct MaxOp {
  static constexpr bool kWeighted = false;
  template <int NV, typename RowT>
  static AMTL_INLINE void apply(Acc<NV>& a, const RowT& r, bool first, float) {
    for (int k = 0; k < NV; ++k) {
      const typename Vec::R v = r.vec(k);
      a.v[k] = first ? v : Vec::max_keep(v, a.v[k]);
    }
  }
};

// kFull: D == NV * W (D = 16, 32, 64, 128 with AVX-512), so the output row is exactly NV whole
// vectors: the loop over them unrolls and its lane indices are constants, where the general loop
// spends ~10 instructions per vector on loop control and lane indices.
template <int NV, bool kFull, typename T, typename OffT, typename index_t>
void embedding_chunk_nv(const Table<T, OffT> t, const index_t* ids, int64_t begin, int64_t end,
                        float* out, Failures& fail) {
  const int64_t dim = t.dim;
  std::vector<float> scratch(uses_wide<T>() ? dim : 0);
  const int64_t wide_limit = wide_limit_of<T, NV>(t);
  // At most 5 lines (256 bytes, more than the mean row of D = 128 at 37 %): all 9 of D = 128
  // measured the same median and a higher worst cell (bench/lookup.py, 1 thread). Vectors past
  // them point back inside the row.
  constexpr int kLines = std::min(row_lines<T>(NV), 5);
  auto step = [&](int64_t j) AMTL_INLINE_LAMBDA {
    const int64_t id = ids[j];
    int64_t s = 0, n = 0;
    if (static_cast<uint64_t>(id) >= static_cast<uint64_t>(t.rows)) {
      fail.bad_id.record(j);
    } else if (!t.row(id, &s, &n)) {
      fail.bad_row.record(j);
      s = n = 0;
    }
    float* o = out + j * dim;
    // n == 0 reads nothing
    with_row<vectors_within<T>(kLines)>(t, id, s, n, 0, wide_limit, scratch.data(),
                                        [&](const auto& r) {
      if constexpr (kFull) {
        for (int k = 0; k < NV; ++k) Vec::store(o + k * Vec::W, r.vec(k));
      } else {
        int64_t k = 0;
        for (; (k + 1) * Vec::W <= dim; ++k) Vec::store(o + k * Vec::W, r.vec(k));
        if (k * Vec::W < dim) Vec::store(o + k * Vec::W, r.vec(k), dim - k * Vec::W);
      }
    });
  };
  // Ids at least kAheadOffsets before the end prefetch without bounds tests; the rest test them.
  int64_t j = begin;
  for (; j + kAheadOffsets < end; ++j) {
    t.prefetch_offsets(ids[j + kAheadOffsets]);
    t.template prefetch_row<kLines>(ids[j + kAhead]);
    step(j);
  }
  for (; j < end; ++j) {
    if (j + kAhead < end) t.template prefetch_row<kLines>(ids[j + kAhead]);
    step(j);
  }
}

// NV: vectors per row block; a row of D floats spans at most NV * W * 4 / 64 + 1 = NV + 1 lines
// for AVX-512 (fewer for AVX2 and narrower dtypes: the extra prefetches hit the last line).
template <int NV, typename T, typename OffT, typename index_t>
void embedding_chunk_of(const Table<T, OffT>& t, const index_t* ids, int64_t begin, int64_t end,
                        float* out, Failures& fail) {
  // kFull only where D is exactly NV vectors (D = 24 with AVX2 is 3 vectors: NV = 4, not full).
  if (t.dim == NV * Vec::W) return embedding_chunk_nv<NV, true>(t, ids, begin, end, out, fail);
  return embedding_chunk_nv<NV, false>(t, ids, begin, end, out, fail);
}

template <typename T, typename OffT, typename index_t>
void embedding_chunk(const Table<T, OffT>& t, const index_t* ids, int64_t begin, int64_t end,
                     float* out, Failures& fail) {
  const int64_t vectors = (t.dim + Vec::W - 1) / Vec::W;
  if (vectors <= 1) return embedding_chunk_of<1>(t, ids, begin, end, out, fail);
  if (vectors <= 2) return embedding_chunk_of<2>(t, ids, begin, end, out, fail);
  if (vectors <= 4) return embedding_chunk_of<4>(t, ids, begin, end, out, fail);
  return embedding_chunk_of<8>(t, ids, begin, end, out, fail);
}

template <int NV, typename Op, typename T, typename OffT, typename index_t>
void bag_chunk_nv(const Table<T, OffT> t, const BagArgs<index_t> a, int64_t b_begin,
                  int64_t b_end, float* out, Failures& fail) {
  const int64_t dim = t.dim;
  const int64_t limit = a.bag_start(b_end);
  std::vector<float> scratch(uses_wide<T>() ? dim : 0);
  const int64_t wide_limit = wide_limit_of<T, NV>(t);
  const index_t* input = a.input;
  for (int64_t b = b_begin; b < b_end; ++b) {
    const int64_t s_bag = a.bag_start(b);
    const int64_t e_bag = a.bag_start(b + 1);
    float* o = out + b * dim;
    for (int64_t c0 = 0; c0 < dim; c0 += NV * Vec::W) {
      Acc<NV> acc;
      for (int k = 0; k < NV; ++k) acc.v[k] = Vec::zero();
      int64_t count = 0;
      // kFree: NV for the first column block, whose lines the prefetch covers; 0 after it.
      auto add = [&](int64_t j, auto free) AMTL_INLINE_LAMBDA {
        const int64_t id = input[j];
        if (static_cast<uint64_t>(id) >= static_cast<uint64_t>(t.rows)) {
          fail.bad_id.record(j);
          return;
        }
        if (id == a.padding_idx) return;
        int64_t s = 0, n = 0;
        if (!t.row(id, &s, &n)) {
          fail.bad_row.record(j);
          return;
        }
        const float w = Op::kWeighted ? a.weights[j] : 0.0f;
        with_row<decltype(free)::value>(t, id, s, n, c0, wide_limit, scratch.data(),
                                        [&](const auto& r) { Op::apply(acc, r, count == 0, w); });
        ++count;
      };
      // Prefetches run with the first column block. Bags ending at least kAheadOffsets ids before
      // the chunk does (all but the last one or two of 20 ids) prefetch without bounds tests: two
      // compare-and-branch pairs fewer per id (bag D = 16: 3.4 instead of 4.0 ns per id).
      constexpr int kLines = row_lines<T>(NV);
      const std::integral_constant<int, 0> clamped;
      const std::integral_constant<int, NV> prefetched;
      if (c0 != 0) {
        for (int64_t j = s_bag; j < e_bag; ++j) add(j, clamped);
      } else if (e_bag + kAheadOffsets <= limit) {
        for (int64_t j = s_bag; j < e_bag; ++j) {
          t.prefetch_offsets(input[j + kAheadOffsets]);
          t.template prefetch_row<kLines>(input[j + kAhead]);
          add(j, prefetched);
        }
      } else {
        for (int64_t j = s_bag; j < e_bag; ++j) {
          if (j + kAheadOffsets < limit) t.prefetch_offsets(input[j + kAheadOffsets]);
          if (j + kAhead < limit) t.template prefetch_row<kLines>(input[j + kAhead]);
          add(j, prefetched);
        }
      }
      if (a.mode == Mode::kMean) {
        const typename Vec::R c = Vec::broadcast(static_cast<float>(std::max<int64_t>(count, 1)));
        for (int k = 0; k < NV; ++k) acc.v[k] = Vec::div(acc.v[k], c);
      }
      for (int k = 0; k < NV; ++k) {
        const int64_t c = c0 + k * Vec::W;
        if (c + Vec::W <= dim) {
          Vec::store(o + c, acc.v[k]);
        } else if (c < dim) {
          Vec::store(o + c, acc.v[k], dim - c);
        }
      }
    }
  }
}

template <typename Op, typename T, typename OffT, typename index_t>
void bag_chunk_op(const Table<T, OffT>& t, const BagArgs<index_t>& a, int64_t b_begin,
                  int64_t b_end, float* out, Failures& fail) {
  // Fewest vectors that cover D (up to 8 per block): small D wastes no masked loads.
  const int64_t vectors = (t.dim + Vec::W - 1) / Vec::W;
  if (vectors <= 1) return bag_chunk_nv<1, Op>(t, a, b_begin, b_end, out, fail);
  if (vectors <= 2) return bag_chunk_nv<2, Op>(t, a, b_begin, b_end, out, fail);
  if (vectors <= 4) return bag_chunk_nv<4, Op>(t, a, b_begin, b_end, out, fail);
  return bag_chunk_nv<8, Op>(t, a, b_begin, b_end, out, fail);
}

template <typename T, typename OffT, typename index_t>
void bag_chunk(const Table<T, OffT>& t, const BagArgs<index_t>& a, int64_t b_begin,
               int64_t b_end, float* out, Failures& fail) {
  if (a.mode == Mode::kMax) return bag_chunk_op<MaxOp>(t, a, b_begin, b_end, out, fail);
  switch (a.weighting) {
    case Weights::kNone:
      return bag_chunk_op<SumOp>(t, a, b_begin, b_end, out, fail);
    case Weights::kFused:
      return bag_chunk_op<FusedOp>(t, a, b_begin, b_end, out, fail);
    case Weights::kSeparate:
      return bag_chunk_op<SeparateOp>(t, a, b_begin, b_end, out, fail);
  }
}
