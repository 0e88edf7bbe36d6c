// convzoo native CPU kernel: CAC's sparse inference (content-aware convolution, deployed form).
//
//   out[n, :, oh, ow] = bias + sum_{t, c} W[t, c, :] * x[n, c, tap_t(oh, ow)]   where mask[n, oh, ow] (sharp)
//   out[n, :, oh, ow] = bias + sum_c   S[c, :]    * x[n, c, centre(oh, ow)]  elsewhere (smooth, S = sum_t W[t])
//
// with the conv's geometry: tap (i, j) of window (oh, ow) reads padded pixel (oh*sh + i*dh, ow*sw + j*dw), the
// centre tap is (i, j) = ((kh-1)/2, (kw-1)/2), and pixels in the zero padding read 0. This is CACSparseConv2d's
// pixel path without its im2col: each output row's sharp and smooth pixels are taken 6 at a time and their
// taps read straight from the input, through one register-blocked microkernel (6 pixels x 4 output vectors of
// 16 channels), so the k x k products are computed only where the mask is set, and nothing is gathered.
// Groups of 6 are filled across output rows, so a row's few sharp windows do not leave a group idle.
//
// Layout: x float32, channels-last or NCHW (an NCHW input's rows are transposed into a small ring of
// channels-last rows as the output rows need them, each input row once), C any; W (T, C, O), S (C, O),
// bias (O), O a multiple of 16; mask (N, Ho, Wo) bool; out in x's layout. groups = 1, zero padding.
// Work is split over output rows with at::parallel_for, on torch's own OpenMP thread pool.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "vec16.h"

namespace convzoo_native {
namespace {

constexpr int kPixels = 6;  // pixels per microkernel call (6 x 4 accumulators + 4 weights fit 32 registers)

// acc[p][b] = bias + sum_{t < T, c < C} w[t][c][ob + 16b] * src[t][p][c], for NB output vectors starting at ob;
// src[t][p]: the pixel tap t of pixel p reads (a zero row for taps in the padding).
template <int NB>
inline void microkernel(const float* const* src, int64_t T, int64_t C, const float* w, int64_t O, int64_t ob,
                        const float* bias, float* const* dst, int valid) {
  v16 acc[kPixels][NB];
  for (int b = 0; b < NB; ++b) {
    const v16 init = bias ? load(bias + ob + 16 * b) : v16{};
    for (int p = 0; p < kPixels; ++p) acc[p][b] = init;
  }
  for (int64_t t = 0; t < T; ++t) {
    const float* const* row = src + t * kPixels;
    const float* wt = w + t * C * O + ob;
    for (int64_t c = 0; c < C; ++c) {
      v16 wv[NB];
      for (int b = 0; b < NB; ++b) wv[b] = load(wt + c * O + 16 * b);
      for (int p = 0; p < kPixels; ++p) {
        const float xv = row[p][c];
        for (int b = 0; b < NB; ++b) acc[p][b] += xv * wv[b];
      }
    }
  }
  for (int p = 0; p < valid; ++p)
    for (int b = 0; b < NB; ++b) store(dst[p] + ob + 16 * b, acc[p][b]);
}

inline void all_outputs(const float* const* src, int64_t T, int64_t C, const float* w, int64_t O,
                        const float* bias, float* const* dst, int valid) {
  int64_t ob = 0;
  for (; ob + 64 <= O; ob += 64) microkernel<4>(src, T, C, w, O, ob, bias, dst, valid);
  switch ((O - ob) / 16) {
    case 3: microkernel<3>(src, T, C, w, O, ob, bias, dst, valid); break;
    case 2: microkernel<2>(src, T, C, w, O, ob, bias, dst, valid); break;
    case 1: microkernel<1>(src, T, C, w, O, ob, bias, dst, valid); break;
    default: break;
  }
}

struct Geometry {
  int64_t N, C, H, W, O, Ho, Wo, kh, kw, sh, sw, dh, dw, top, left;
};

// Windows waiting for the microkernel, kPixels at a time, across output rows (so that a row's few sharp
// windows do not leave most of a group idle). src[t * kPixels + p]: tap t of window p; dst[p]: its output.
struct Group {
  std::vector<const float*> src;
  float* dst[kPixels];
  int64_t taps;
  int count = 0;

  explicit Group(int64_t taps) : src(taps * kPixels), taps(taps) {}

  // run the microkernel on the windows held (a short group repeats its last window, whose result is not stored)
  void flush(int64_t C, const float* w, int64_t O, const float* bias) {
    if (count == 0) return;
    for (int p = count; p < kPixels; ++p) {
      dst[p] = dst[count - 1];
      for (int64_t t = 0; t < taps; ++t) src[t * kPixels + p] = src[t * kPixels + count - 1];
    }
    all_outputs(src.data(), taps, C, w, O, bias, dst, count);
    count = 0;
  }
};

at::Tensor cac_sparse(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& weight, const at::Tensor& summed,
                      const c10::optional<at::Tensor>& bias_opt, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                      at::IntArrayRef dilation, at::IntArrayRef padding) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4,
              "cac_sparse: x must be a 4-D float32 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && dilation.size() == 2 && padding.size() == 2,
              "cac_sparse: kernel_size, stride, dilation and padding (top, left) must be pairs");
  TORCH_CHECK(weight.dim() == 3, "cac_sparse: weight must be (kh*kw, C_in, C_out), got ", weight.sizes());
  TORCH_CHECK(mask.dim() == 3, "cac_sparse: mask must be a contiguous bool (N, H', W') tensor, got ", mask.sizes());
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(2), mask.size(1), mask.size(2),
             kernel_size[0], kernel_size[1], stride[0], stride[1], dilation[0], dilation[1], padding[0], padding[1]};
  const int64_t T = g.kh * g.kw;
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == T && weight.size(1) == g.C && g.O % 16 == 0,
              "cac_sparse: weight must be (kh*kw, C_in, C_out) with C_out a multiple of 16, got ", weight.sizes());
  TORCH_CHECK(summed.dim() == 2 && summed.size(0) == g.C && summed.size(1) == g.O,
              "cac_sparse: summed must be (C_in, C_out), got ", summed.sizes());
  TORCH_CHECK(mask.dim() == 3 && mask.size(0) == g.N && mask.scalar_type() == at::kBool && mask.is_contiguous(),
              "cac_sparse: mask must be a contiguous bool (N, H', W') tensor, got ", mask.sizes());
  TORCH_CHECK(g.sh > 0 && g.sw > 0 && g.dh > 0 && g.dw > 0, "cac_sparse: stride and dilation must be positive");
  TORCH_CHECK(g.kh > 0 && g.kw > 0 && g.top >= 0 && g.left >= 0, "cac_sparse: bad kernel size or padding");
  TORCH_CHECK((g.H > 0 && g.W > 0) || g.Ho * g.Wo == 0, "cac_sparse: the input must have a non-empty map");
  const float* bias = nullptr;
  at::Tensor bias_t;
  if (bias_opt.has_value() && bias_opt->defined()) {
    bias_t = *bias_opt;
    TORCH_CHECK(bias_t.dim() == 1 && bias_t.size(0) == g.O, "cac_sparse: bias must be (C_out,)");
  }
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&weight, &summed, &bias_t}) {
    if (!t->defined()) continue;
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "cac_sparse: weights must be contiguous float32 CPU tensors");
  }
  if (bias_t.defined()) bias = bias_t.data_ptr<float>();

  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  const at::Tensor input = channels_last ? x : x.contiguous();
  auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({g.N, g.O, g.Ho, g.Wo}, x.options().memory_format(format));
  if (out.numel() == 0) return out;
  const float* xd = input.data_ptr<float>();
  const bool* md = mask.data_ptr<bool>();
  const float* wd = weight.data_ptr<float>();
  const float* sd = summed.data_ptr<float>();
  float* od = out.data_ptr<float>();
  const int64_t ci = (g.kh - 1) / 2, cj = (g.kw - 1) / 2;  // the centre tap

  // NCHW input: a ring of channels-last copies of input rows; slot h % slots holds row h of the current image
  const int64_t slots = channels_last ? 0 : (g.kh - 1) * g.dh + 1 + g.sh;

  at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zeros(g.C, 0.f);
    std::vector<float> ring(slots * g.W * g.C);
    std::vector<int64_t> ring_row(slots, -1);  // which (n * H + h) each slot holds
    std::vector<float> row_out(channels_last ? 0 : g.Wo * g.O);
    std::vector<const float*> rows(g.kh);  // the input row (channels-last) each kernel row reads, or null
    Group sharp(T), smooth(1);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.Ho, oh = row % g.Ho;
      if (row + 1 < end) {
        // the next output row's input rows and its output, towards L2 while this row computes: the smooth
        // windows do little arithmetic per byte, and without this they wait on memory (7.2 -> 5.6 ms at
        // rho = 0.25 for 64 channels, 32x32, batch 64)
        const int64_t next_n = (row + 1) / g.Ho, next_oh = (row + 1) % g.Ho;
        const int64_t row_bytes = g.W * int64_t(sizeof(float));
        for (int64_t i = 0; i < g.kh; ++i) {
          const int64_t h = next_oh * g.sh + i * g.dh - g.top;
          if (h < 0 || h >= g.H) continue;
          if (channels_last) {
            const char* line = reinterpret_cast<const char*>(xd + (next_n * g.H + h) * g.W * g.C);
            for (int64_t b = 0; b < row_bytes * g.C; b += 64) __builtin_prefetch(line + b, 0, 2);
          } else {
            for (int64_t c = 0; c < g.C; ++c) {
              const char* line = reinterpret_cast<const char*>(xd + ((next_n * g.C + c) * g.H + h) * g.W);
              for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(line + b, 0, 2);
            }
          }
        }
        const int64_t out_bytes = g.Wo * int64_t(sizeof(float));
        if (channels_last) {
          const char* next_out = reinterpret_cast<const char*>(od + (row + 1) * g.Wo * g.O);
          for (int64_t b = 0; b < out_bytes * g.O; b += 64) __builtin_prefetch(next_out + b, 1, 2);
        } else {
          for (int64_t o = 0; o < g.O; ++o) {
            const char* plane = reinterpret_cast<const char*>(od + ((next_n * g.O + o) * g.Ho + next_oh) * g.Wo);
            for (int64_t b = 0; b < out_bytes; b += 64) __builtin_prefetch(plane + b, 1, 2);
          }
        }
      }
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t h = oh * g.sh + i * g.dh - g.top;
        if (h < 0 || h >= g.H) {
          rows[i] = nullptr;
        } else if (channels_last) {
          rows[i] = xd + (n * g.H + h) * g.W * g.C;
        } else {
          const int64_t slot = h % slots;
          float* dst = ring.data() + slot * g.W * g.C;
          if (ring_row[slot] != n * g.H + h) {
            transpose_copy(xd + (n * g.C * g.H + h) * g.W, g.H * g.W, dst, g.C, g.C, g.W);
            ring_row[slot] = n * g.H + h;
          }
          rows[i] = dst;
        }
      }
      // pixel that tap (i, j) of window (oh, ow) reads, or the zero row
      auto tap = [&](int64_t ow, int64_t i, int64_t j) -> const float* {
        const int64_t w = ow * g.sw + j * g.dw - g.left;
        if (rows[i] == nullptr || w < 0 || w >= g.W) return zeros.data();
        return rows[i] + w * g.C;
      };
      const bool* mrow = md + row * g.Wo;
      float* orow = channels_last ? od + row * g.Wo * g.O : row_out.data();
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        if (mrow[ow]) {  // sharp: all T taps with W
          sharp.dst[sharp.count] = orow + ow * g.O;
          for (int64_t i = 0; i < g.kh; ++i)
            for (int64_t j = 0; j < g.kw; ++j) sharp.src[(i * g.kw + j) * kPixels + sharp.count] = tap(ow, i, j);
          if (++sharp.count == kPixels) sharp.flush(g.C, wd, g.O, bias);
        } else {  // smooth: the centre tap with S = sum_t W[t]
          smooth.dst[smooth.count] = orow + ow * g.O;
          smooth.src[smooth.count] = tap(ow, ci, cj);
          if (++smooth.count == kPixels) smooth.flush(g.C, sd, g.O, bias);
        }
      }
      if (!channels_last) {  // the ring and the row buffer move on with the next row: finish this one
        sharp.flush(g.C, wd, g.O, bias);
        smooth.flush(g.C, sd, g.O, bias);
        transpose_copy(orow, g.O, od + (n * g.O * g.Ho + oh) * g.Wo, g.Ho * g.Wo, g.Wo, g.O);
      }
    }
    sharp.flush(g.C, wd, g.O, bias);
    smooth.flush(g.C, sd, g.O, bias);
  });
  return out;
}

}  // namespace
}  // namespace convzoo_native

TORCH_LIBRARY_FRAGMENT(convzoo, m) {
  m.def(
      "cac_sparse(Tensor x, Tensor mask, Tensor weight, Tensor summed, Tensor? bias, int[] kernel_size, "
      "int[] stride, int[] dilation, int[] padding) -> Tensor");
}

TORCH_LIBRARY_IMPL(convzoo, CPU, m) { m.impl("cac_sparse", &convzoo_native::cac_sparse); }
