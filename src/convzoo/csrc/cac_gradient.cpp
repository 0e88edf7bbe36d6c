// convzoo native CPU kernel: CAC's score map input G, the Sobel gradient magnitude of the channel mean (eq. 9-10).
//
//   M[n, h, w]   = (sum_c x[n, c, h, w]) / C, zero outside the input (zero padding)
//   D(r)         = M(r, c2) - M(r, c0);   S(r) = (M(r, c0) + M(r, c2)) + 2 M(r, c1)
//   G[n, oh, ow] = hypot((D(r0) + D(r2)) + 2 D(r1), S(r2) - S(r0))   (hypot: the double sqrt rounded to float)
//
// where row r of window (oh, ow) is padded row oh*sh + ch + (r-1)*dh and column c is ow*sw + cw + (c-1)*dw, with
// the centre (ch, cw) = (dh*((kh-1)/2), dw*((kw-1)/2)): the same taps and the same order of operations as
// convzoo.ops.cac.gradient_map's torch form, for kernels of at least 3x3 (no replicated margins) and zero padding.
// The input is read once (the channel sum is memory-bound; the torch form also runs a dozen small ops over the
// 1-channel maps). x float32, channels-last or NCHW. cac_sharp_windows also makes eq. (12)'s test, gamma * G + beta
// > 0, and counts the sharp windows, as it writes each row of G, and optionally returns an NCHW x in channels-last
// memory, written as the sum reads it (one pass, where the conv's own layout change would be another).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "vec16.h"

namespace convzoo_native {
namespace {

// One row h of an NCHW image: sum[w] += x[c][w] over c in ascending order (the order of the plane-by-plane sum,
// so the mean is bit for bit the same), and dst[w * C + c] = x[c][w] (the row in channels-last order). `src` is
// channel 0's row, `plane` the channel stride. 16 x 16 tiles (16 channels x 16 pixels) go through a register
// transpose; each lane of the sum adds its pixel's channels one by one, in order, as the scalar loop does.
template <bool stream>
inline void sum_and_transpose_row(const float* src, int64_t plane, int64_t C, int64_t W, float* sum, float* dst) {
  const int64_t tiled_c = C / 16 * 16, tiled_w = W / 16 * 16;
  for (int64_t c0 = 0; c0 < tiled_c; c0 += 16) {
    for (int64_t w0 = 0; w0 < tiled_w; w0 += 16) {
      v16 tile[16];
      for (int k = 0; k < 16; ++k) tile[k] = load(src + (c0 + k) * plane + w0);
      v16 acc = load(sum + w0);
      for (int k = 0; k < 16; ++k) acc += tile[k];
      store(sum + w0, acc);
      transpose16(tile);
      for (int k = 0; k < 16; ++k) {
        if (stream)
          store_stream(dst + (w0 + k) * C + c0, tile[k]);
        else
          store(dst + (w0 + k) * C + c0, tile[k]);
      }
    }
    for (int64_t w = tiled_w; w < W; ++w)
      for (int64_t c = c0; c < c0 + 16; ++c) {
        const float value = src[c * plane + w];
        sum[w] += value;
        dst[w * C + c] = value;
      }
  }
  for (int64_t c = tiled_c; c < C; ++c)
    for (int64_t w = 0; w < W; ++w) {
      const float value = src[c * plane + w];
      sum[w] += value;
      dst[w * C + c] = value;
    }
}

// The sharp-window test of eq. (12) on G as it is written: sharp[n, oh, ow] = gamma * G + beta > 0, decided in double,
// where gamma * G of float32 operands is exact and the one rounding of the sum keeps its sign (an FMA, if the compiler
// contracts to one, gives the same sign), so the test is the exact sign of gamma * G + beta: the same on every machine
// and in convzoo.ops.cac.sharp_test's torch form. row_counts[n * Ho + oh] counts the row's sharp windows.
struct SharpTest {
  double gamma, beta;
  bool* sharp;
  int64_t* row_counts;
};

// G for x; with `transposed` (an NCHW x only), also writes x's channels-last copy there as the channel sum reads it;
// with `test`, also the sharp-window mask and counts, as each row of G is written
at::Tensor gradient(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef dilation,
                    at::IntArrayRef padding, at::IntArrayRef out_size, float* transposed,
                    const SharpTest* test = nullptr) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4,
              "cac_gradient: x must be a 4-D float32 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && dilation.size() == 2 && padding.size() == 2 &&
                  out_size.size() == 2,
              "cac_gradient: kernel_size, stride, dilation, padding (top, left) and out_size must be pairs");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t kh = kernel_size[0], kw = kernel_size[1], sh = stride[0], sw = stride[1];
  const int64_t dh = dilation[0], dw = dilation[1], top = padding[0], left = padding[1];
  const int64_t Ho = out_size[0], Wo = out_size[1];
  TORCH_CHECK(kh >= 3 && kw >= 3, "cac_gradient: the kernel must be at least 3x3, got ", kh, "x", kw);
  TORCH_CHECK(sh > 0 && sw > 0 && dh > 0 && dw > 0 && top >= 0 && left >= 0 && Ho >= 0 && Wo >= 0,
              "cac_gradient: bad geometry");
  at::Tensor out = at::empty({N, Ho, Wo}, x.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK(C > 0 && H > 0 && W > 0, "cac_gradient: the input must have channels and a non-empty map");

  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  const at::Tensor input = channels_last ? x : x.contiguous();
  const float* xd = input.data_ptr<float>();
  const float channels = static_cast<float>(C);
  // the mean map with a zero margin wide enough for every Sobel tap (zero padding), so that the Sobel pass has no
  // bounds checks: rows oh*sh + ch + (r-1)*dh - top for r in {0, 2}, likewise for columns
  const int64_t ch = dh * ((kh - 1) / 2), cw = dw * ((kw - 1) / 2);
  const int64_t pad_top = std::max<int64_t>(0, top + dh - ch);
  const int64_t pad_bottom = std::max<int64_t>(0, (Ho - 1) * sh + ch + dh - top - (H - 1));
  const int64_t pad_left = std::max<int64_t>(0, left + dw - cw);
  const int64_t pad_right = std::max<int64_t>(0, (Wo - 1) * sw + cw + dw - left - (W - 1));
  const int64_t Hp = H + pad_top + pad_bottom, Wp = W + pad_left + pad_right;
  std::vector<float> padded(N * Hp * Wp);  // zero-initialised: the margins stay 0

  // a channels-last copy streams to memory (no read-for-ownership of its lines) where every tile store is aligned
  const bool stream_transposed =
      transposed != nullptr && C % 16 == 0 && reinterpret_cast<uintptr_t>(transposed) % 64 == 0;
  // the channel mean, in blocks of input rows: an NCHW input is summed plane by plane over the block (long
  // contiguous runs; with a copy, row by row in 16 x 16 tiles), a channels-last one pixel by pixel, reading ahead
  const int64_t threads = at::get_num_threads();
  const int64_t blocks_per_image = std::min<int64_t>(H, std::max<int64_t>(1, (2 * threads + N - 1) / N));
  const int64_t rows_per_block = (H + blocks_per_image - 1) / blocks_per_image;
  at::parallel_for(0, N * blocks_per_image, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks_per_image, h0 = (task % blocks_per_image) * rows_per_block;
      const int64_t h1 = std::min(H, h0 + rows_per_block);
      if (h0 >= h1) continue;
      auto mean_row = [&](int64_t h) { return padded.data() + (n * Hp + h + pad_top) * Wp + pad_left; };
      if (channels_last) {
        const float* px = xd + (n * H + h0) * W * C;
        for (int64_t h = h0; h < h1; ++h) {
          float* m = mean_row(h);
          for (int64_t w = 0; w < W; ++w, px += C) {
            __builtin_prefetch(px + 16 * C, 0, 0);
            int64_t c = 0;
            float sum = 0.f;
            if (C >= 16) {
              v16 acc = load(px);
              for (c = 16; c + 16 <= C; c += 16) acc += load(px + c);
              for (int i = 0; i < 16; ++i) sum += acc[i];
            }
            for (; c < C; ++c) sum += px[c];
            m[w] = sum / channels;
          }
        }
      } else if (transposed != nullptr) {
        for (int64_t h = h0; h < h1; ++h) {
          const float* src = xd + (n * C * H + h) * W;
          float* dst = transposed + (n * H + h) * W * C;
          if (stream_transposed)
            sum_and_transpose_row<true>(src, H * W, C, W, mean_row(h), dst);
          else
            sum_and_transpose_row<false>(src, H * W, C, W, mean_row(h), dst);
        }
        for (int64_t h = h0; h < h1; ++h) {
          float* m = mean_row(h);
          for (int64_t w = 0; w < W; ++w) m[w] /= channels;
        }
        if (stream_transposed) stream_fence();
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const float* plane = xd + ((n * C + c) * H + h0) * W;
          for (int64_t h = h0; h < h1; ++h, plane += W) {
            float* m = mean_row(h);
            for (int64_t w = 0; w < W; ++w) m[w] += plane[w];
          }
        }
        for (int64_t h = h0; h < h1; ++h) {
          float* m = mean_row(h);
          for (int64_t w = 0; w < W; ++w) m[w] /= channels;
        }
      }
    }
  });

  float* od = out.data_ptr<float>();
  at::parallel_for(0, N * Ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / Ho, oh = row % Ho;
      const float* rows[3];
      for (int r = 0; r < 3; ++r) rows[r] = padded.data() + (n * Hp + oh * sh + ch + (r - 1) * dh - top + pad_top) * Wp;
      float* o = od + row * Wo;
      const int64_t first = cw - left + pad_left;  // the centre column of window 0 in the padded row
      for (int64_t ow = 0; ow < Wo; ++ow) {  // no branches: vectorized for stride 1
        const int64_t w1 = first + ow * sw, w0 = w1 - dw, w2 = w1 + dw;
        float diff[3], smooth[3];
        for (int r = 0; r < 3; ++r) {
          const float m0 = rows[r][w0], m1 = rows[r][w1], m2 = rows[r][w2];
          diff[r] = m2 - m0;
          smooth[r] = (m0 + m2) + 2.f * m1;
        }
        const float gx = (diff[0] + diff[2]) + 2.f * diff[1];
        const float gy = smooth[2] - smooth[0];
        // hypot(gx, gy) as the double sqrt rounded to float: no overflow (|gx|, |gy| < 2^128 square to < 2^256),
        // and vectorizable, unlike std::hypot; hypot(+-inf, NaN) = +inf as IEEE and torch.hypot have it (inf
        // inputs, or responses that overflow float, give inf - inf = NaN in one direction and inf in the other)
        const double x2 = static_cast<double>(gx) * gx, y2 = static_cast<double>(gy) * gy;
        const bool infinite = (x2 == INFINITY) | (y2 == INFINITY);  // a bitwise or: keeps the loop vectorized
        o[ow] = static_cast<float>(std::sqrt(infinite ? INFINITY : x2 + y2));
      }
      if (test != nullptr) {  // the row of G is in L1; NaN (from inf - inf) is not sharp, as in torch
        bool* sharp = test->sharp + row * Wo;
        int64_t count = 0;
        for (int64_t ow = 0; ow < Wo; ++ow) {
          const bool is_sharp = test->gamma * static_cast<double>(o[ow]) + test->beta > 0.0;
          sharp[ow] = is_sharp;
          count += is_sharp;
        }
        test->row_counts[row] = count;
      }
    }
  });
  return out;
}

at::Tensor cac_gradient(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                        at::IntArrayRef dilation, at::IntArrayRef padding, at::IntArrayRef out_size) {
  return gradient(x, kernel_size, stride, dilation, padding, out_size, nullptr);
}

// (G, sharp mask, sharp count per image, x in channels-last memory or an empty tensor, total sharp count): the score
// map, eq. (12)'s test (see SharpTest) and, with channels_last_copy (a contiguous NCHW x), the layout change, in
// cac_gradient's one read of x. G equals cac_gradient(x)'s bit for bit.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t> cac_sharp_windows(
    const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef dilation,
    at::IntArrayRef padding, at::IntArrayRef out_size, const at::Tensor& gamma, const at::Tensor& beta,
    bool channels_last_copy) {
  TORCH_CHECK(gamma.numel() == 1 && beta.numel() == 1 && gamma.device().is_cpu() && beta.device().is_cpu(),
              "cac_sharp_windows: gamma and beta must be one-element CPU tensors");
  TORCH_CHECK(out_size.size() == 2 && out_size[0] >= 0 && out_size[1] >= 0, "cac_sharp_windows: bad out_size");
  TORCH_CHECK(!channels_last_copy || (x.dim() == 4 && x.is_contiguous()),
              "cac_sharp_windows: the channels-last copy needs a contiguous NCHW x, got ", x.sizes());
  const int64_t N = x.dim() == 4 ? x.size(0) : 0, Ho = out_size[0], Wo = out_size[1];
  at::Tensor sharp = at::empty({N, Ho, Wo}, x.options().dtype(at::kBool));
  std::vector<int64_t> row_counts(N * Ho, 0);
  const SharpTest test{gamma.item<double>(), beta.item<double>(), sharp.data_ptr<bool>(), row_counts.data()};
  at::Tensor transposed = channels_last_copy ? at::empty_like(x, at::MemoryFormat::ChannelsLast) : at::empty({0}, x.options());
  at::Tensor g = gradient(x, kernel_size, stride, dilation, padding, out_size,
                          channels_last_copy && x.numel() ? transposed.data_ptr<float>() : nullptr, &test);
  if (channels_last_copy && g.numel() == 0) transposed.copy_(x);  // no output positions: G read nothing
  at::Tensor counts = at::zeros({N}, x.options().dtype(at::kLong));
  int64_t* cd = counts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t row = 0; row < N * Ho; ++row) {
    cd[row / Ho] += row_counts[row];
    total += row_counts[row];
  }
  return {g, sharp, counts, transposed, total};
}

}  // namespace
}  // namespace convzoo_native

TORCH_LIBRARY_FRAGMENT(convzoo, m) {
  m.def(
      "cac_gradient(Tensor x, int[] kernel_size, int[] stride, int[] dilation, int[] padding, int[] out_size) "
      "-> Tensor");
  m.def(
      "cac_sharp_windows(Tensor x, int[] kernel_size, int[] stride, int[] dilation, int[] padding, int[] out_size, "
      "Tensor gamma, Tensor beta, bool channels_last_copy) -> (Tensor, Tensor, Tensor, Tensor, int)");
}

TORCH_LIBRARY_IMPL(convzoo, CPU, m) {
  m.impl("cac_gradient", &convzoo_native::cac_gradient);
  m.impl("cac_sharp_windows", &convzoo_native::cac_sharp_windows);
}
