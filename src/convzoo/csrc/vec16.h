// convzoo native kernels: 16 floats as one vector (GCC vector extensions: one AVX-512 register where the build
// enables it, two AVX2 or four SSE registers otherwise), with unaligned loads and stores.
#pragma once

#include <cstdint>
#include <cstring>
#if defined(__SSE__)
#include <immintrin.h>
#endif

namespace convzoo_native {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void store(float* p, v16 v) { *reinterpret_cast<v16u*>(p) = v; }

typedef int v16i __attribute__((vector_size(64)));

// The butterfly stage b (8, 4, 2 or 1) of a 16 x 16 transpose, on a pair of rows (a, c) = (rows[r], rows[r + b]):
//   lo[k] = bit b of k clear ? a[k] : c[k - b]        hi[k] = bit b of k clear ? a[k + b] : c[k]
// (shuffle indices 16 and up pick from c). It swaps bit b of the row index with bit b of the column index.
template <int b>
constexpr v16i stage_lo() {
  return v16i{(0 & b) ? 16 - b : 0,       (1 & b) ? 17 - b : 1,   (2 & b) ? 18 - b : 2,   (3 & b) ? 19 - b : 3,
              (4 & b) ? 20 - b : 4,       (5 & b) ? 21 - b : 5,   (6 & b) ? 22 - b : 6,   (7 & b) ? 23 - b : 7,
              (8 & b) ? 24 - b : 8,       (9 & b) ? 25 - b : 9,   (10 & b) ? 26 - b : 10, (11 & b) ? 27 - b : 11,
              (12 & b) ? 28 - b : 12,     (13 & b) ? 29 - b : 13, (14 & b) ? 30 - b : 14, (15 & b) ? 31 - b : 15};
}
template <int b>
constexpr v16i stage_hi() {
  return v16i{(0 & b) ? 16 : 0 + b,   (1 & b) ? 17 : 1 + b,   (2 & b) ? 18 : 2 + b,   (3 & b) ? 19 : 3 + b,
              (4 & b) ? 20 : 4 + b,   (5 & b) ? 21 : 5 + b,   (6 & b) ? 22 : 6 + b,   (7 & b) ? 23 : 7 + b,
              (8 & b) ? 24 : 8 + b,   (9 & b) ? 25 : 9 + b,   (10 & b) ? 26 : 10 + b, (11 & b) ? 27 : 11 + b,
              (12 & b) ? 28 : 12 + b, (13 & b) ? 29 : 13 + b, (14 & b) ? 30 : 14 + b, (15 & b) ? 31 : 15 + b};
}

// two-source shuffle with a constant mask: indices 0-15 pick from a, 16-31 from c (GCC's builtin; clang, which
// lacks it, gets the lane loop, which it folds into shuffles for constant masks)
inline v16 shuffle2(v16 a, v16 c, v16i mask) {
#if defined(__clang__)
  v16 out;
  for (int k = 0; k < 16; ++k) out[k] = mask[k] < 16 ? a[mask[k]] : c[mask[k] - 16];
  return out;
#else
  return __builtin_shuffle(a, c, mask);
#endif
}

template <int b>
inline void transpose_stage(v16* rows) {
  constexpr v16i lo = stage_lo<b>(), hi = stage_hi<b>();
  for (int r = 0; r < 16; ++r) {
    if (r & b) continue;
    const v16 a = rows[r], c = rows[r + b];
    rows[r] = shuffle2(a, c, lo);
    rows[r + b] = shuffle2(a, c, hi);
  }
}

// rows[k][c] -> rows[c][k]
inline void transpose16(v16* rows) {
  transpose_stage<8>(rows);
  transpose_stage<4>(rows);
  transpose_stage<2>(rows);
  transpose_stage<1>(rows);
}

// dst[j * dst_stride + i] = src[i * src_stride + j] for i < rows, j < cols: full 16 x 16 tiles through a register
// transpose, the edges one by one. Moves NCHW rows to pixel-major (rows = channels, src_stride = the plane size,
// cols = pixels, dst_stride = the channel count) and back.
inline void transpose_copy(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t rows,
                           int64_t cols) {
  const int64_t tiled_rows = rows / 16 * 16, tiled_cols = cols / 16 * 16;
  for (int64_t i = 0; i < tiled_rows; i += 16)
    for (int64_t j = 0; j < tiled_cols; j += 16) {
      v16 tile[16];
      for (int k = 0; k < 16; ++k) tile[k] = load(src + (i + k) * src_stride + j);
      transpose16(tile);
      for (int k = 0; k < 16; ++k) store(dst + (j + k) * dst_stride + i, tile[k]);
    }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = i < tiled_rows ? tiled_cols : 0; j < cols; ++j) dst[j * dst_stride + i] = src[i * src_stride + j];
}

// the sum of the 16 lanes, as a tree (four shuffle + add steps): a lane-by-lane loop is a chain of 16 dependent adds
inline float reduce_add(v16 v) {
  v += shuffle2(v, v, v16i{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += shuffle2(v, v, v16i{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += shuffle2(v, v, v16i{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += shuffle2(v, v, v16i{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return v[0];
}

// A non-temporal (streaming) store of 16 floats to a 64-byte aligned p: the line goes to memory without first being
// read into the cache, for outputs written once and read much later. Plain store where the ISA has none. Call
// stream_fence() before another thread reads what was streamed.
inline void store_stream(float* p, v16 v) {
#if defined(__AVX512F__)
  _mm512_stream_ps(p, reinterpret_cast<__m512&>(v));
#elif defined(__AVX__)
  __m256 halves[2];
  std::memcpy(halves, &v, sizeof v);
  _mm256_stream_ps(p, halves[0]);
  _mm256_stream_ps(p + 8, halves[1]);
#else
  store(p, v);
#endif
}

inline void stream_fence() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

}  // namespace convzoo_native
