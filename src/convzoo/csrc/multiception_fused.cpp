// convzoo native CPU kernel: the deployed Multiception layer in one pass.
//
//   out[n, o, oh, ow] = bias[o] + sum_{k, c} P[k, c, o] * z_k[n, c, oh, ow]
//   z_k[n, c, oh, ow] = sum_{i, j < K_k} D[k, i + off_k, j + off_k, c] * x[n, c, oh*s + i - K_k/2, ow*s + j - K_k/2]
//
// i.e. FusedMulticeptionConv2d's pointwise(depthwise(x)) with zero padding k_max/2 and stride s, where each
// branch k reads only its centred K_k x K_k window of the k_max x k_max depthwise kernel (off_k = k_max/2 - K_k/2;
// the caller checks that every tap outside the windows is zero). The K*C branch outputs of a few pixels live in
// a small buffer and go straight into the 1x1, so nothing of size K*C*H*W is ever written to memory; oneDNN's
// separate depthwise and 1x1 calls write and re-read it, and its depthwise kernels are slow for 5x5 and 7x7.
//
// Layout: channels are processed 16 at a time as one vector (GCC vector extensions: AVX-512 where the build
// enables it, two AVX2 or four SSE registers otherwise), so C and O must be multiples of 16; x may be
// channels-last or NCHW (contiguous), and the output has x's layout. float32 only. Work is split over
// (image, block of output rows) with at::parallel_for, on torch's own OpenMP thread pool.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "vec16.h"

namespace convzoo_native {
namespace {

constexpr int kPixels = 8;  // output pixels of one row computed together (independent accumulators)

// One branch (KK x KK window, stride S) for P consecutive output pixels of a row, one 16-channel block.
// centre: the padded input at the first pixel's window centre; rowstride: floats between padded rows.
template <int KK, int S, int P>
inline void branch(const float* centre, int64_t rowstride, int64_t C, const float* w, int64_t wrowstride, float* z,
                   int64_t zstride) {
  constexpr int R = KK / 2;
  constexpr int NX = (P - 1) * S + KK;  // input pixels of one row that the P windows read
  v16 acc[P] = {};
  for (int i = 0; i < KK; ++i) {
    const float* xrow = centre + (i - R) * rowstride - R * C;
    v16 xr[NX];
    for (int t = 0; t < NX; ++t) xr[t] = load(xrow + t * C);
    const float* wrow = w + i * wrowstride;
    for (int j = 0; j < KK; ++j) {
      const v16 wv = load(wrow + j * C);
      for (int p = 0; p < P; ++p) acc[p] += xr[j + p * S] * wv;
    }
  }
  for (int p = 0; p < P; ++p) store(z + p * zstride, acc[p]);
}

template <int S, int P>
inline void branch_any(int64_t kk, const float* centre, int64_t rowstride, int64_t C, const float* w,
                       int64_t wrowstride, float* z, int64_t zstride) {
  switch (kk) {
    case 1: return branch<1, S, P>(centre, rowstride, C, w, wrowstride, z, zstride);
    case 3: return branch<3, S, P>(centre, rowstride, C, w, wrowstride, z, zstride);
    case 5: return branch<5, S, P>(centre, rowstride, C, w, wrowstride, z, zstride);
    case 7: return branch<7, S, P>(centre, rowstride, C, w, wrowstride, z, zstride);
    case 9: return branch<9, S, P>(centre, rowstride, C, w, wrowstride, z, zstride);
    case 11: return branch<11, S, P>(centre, rowstride, C, w, wrowstride, z, zstride);
    default: TORCH_CHECK(false, "multiception_fused: kernel size ", kk, " is not one of 1, 3, 5, 7, 9, 11");
  }
}

struct Geometry {
  int64_t N, C, H, W, O, K, kmax, r, Ho, Wo;
};

// P output pixels (oh, ow..ow+P-1): branch outputs into z (P x K*C), then the 1x1 into out (P x O, pixel-major).
template <int S, int P>
inline void pixels(const Geometry& g, const float* centre, int64_t rowstride, const int64_t* kernels,
                   const float* dw, const float* pw, const float* bias, float* z, float* out) {
  const int64_t KC = g.K * g.C;
  for (int64_t cb = 0; cb < g.C; cb += 16) {
    for (int64_t k = 0; k < g.K; ++k) {
      const int64_t kk = kernels[k], off = g.r - kk / 2;
      const float* w = dw + ((k * g.kmax + off) * g.kmax + off) * g.C + cb;
      branch_any<S, P>(kk, centre + cb, rowstride, g.C, w, g.kmax * g.C, z + k * g.C + cb, KC);
    }
  }
  for (int64_t ob = 0; ob < g.O; ob += 16) {
    v16 acc[P];
    const v16 b = load(bias + ob);
    for (int p = 0; p < P; ++p) acc[p] = b;
    const float* pcol = pw + ob;
    for (int64_t q = 0; q < KC; ++q) {
      const v16 w = load(pcol + q * g.O);
      for (int p = 0; p < P; ++p) acc[p] += z[p * KC + q] * w;
    }
    for (int p = 0; p < P; ++p) store(out + p * g.O + ob, acc[p]);
  }
}

template <int S>
void run(const Geometry& g, const float* x, bool channels_last, const int64_t* kernels, const float* dw,
         const float* pw, const float* bias, float* out) {
  const int64_t threads = at::get_num_threads();
  const int64_t Wp = g.W + 2 * g.r;
  // Each image is split into blocks of output rows: enough blocks for every thread even for one image,
  // and blocks small enough for the padded rows they read to stay in L2 (about kBlockBytes) on big maps.
  constexpr int64_t kBlockBytes = 512 * 1024;
  const int64_t rows_that_fit = std::max<int64_t>(1, kBlockBytes / (S * Wp * g.C * int64_t(sizeof(float))));
  const int64_t blocks_for_threads = (2 * threads + g.N - 1) / g.N;
  const int64_t blocks_for_cache = (g.Ho + rows_that_fit - 1) / rows_that_fit;
  const int64_t blocks_per_image = std::min(g.Ho, std::max({int64_t(1), blocks_for_threads, blocks_for_cache}));
  const int64_t rows_per_block = (g.Ho + blocks_per_image - 1) / blocks_per_image;
  const int64_t max_rows = (rows_per_block - 1) * S + 2 * g.r + 1;  // padded input rows one block reads
  const int64_t pad_floats = max_rows * Wp * g.C;
  const int64_t z_floats = kPixels * g.K * g.C;
  const int64_t row_floats = g.Wo * g.O;  // one output row, pixel-major, before an NCHW store
  at::parallel_for(0, g.N * blocks_per_image, 1, [&](int64_t begin, int64_t end) {
    const int64_t total = pad_floats + z_floats + row_floats;
    std::unique_ptr<float, decltype(&std::free)> buffer(
        static_cast<float*>(std::aligned_alloc(64, ((total * 4 + 63) / 64) * 64)), &std::free);
    TORCH_CHECK(buffer != nullptr, "multiception_fused: out of memory");
    float* pad = buffer.get();
    float* z = pad + pad_floats;
    float* row = z + z_floats;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks_per_image;
      const int64_t oh0 = (task % blocks_per_image) * rows_per_block;
      const int64_t oh1 = std::min(g.Ho, oh0 + rows_per_block);
      if (oh0 >= oh1) continue;
      // padded copy of the input rows this block reads: padded row t is input row h0 + t
      const int64_t h0 = oh0 * S - g.r, rows = (oh1 - 1 - oh0) * S + 2 * g.r + 1;
      // each padded row written once: zeros outside the image, else its border columns zeroed and x copied in
      for (int64_t t = 0; t < rows; ++t) {
        const int64_t h = h0 + t;
        float* line = pad + t * Wp * g.C;
        if (h < 0 || h >= g.H) {
          std::memset(line, 0, Wp * g.C * sizeof(float));
          continue;
        }
        std::memset(line, 0, g.r * g.C * sizeof(float));
        std::memset(line + (g.r + g.W) * g.C, 0, g.r * g.C * sizeof(float));
        float* dst = line + g.r * g.C;
        if (channels_last) {
          std::memcpy(dst, x + (n * g.H + h) * g.W * g.C, g.W * g.C * sizeof(float));
        } else {
          transpose_copy(x + (n * g.C * g.H + h) * g.W, g.H * g.W, dst, g.C, g.C, g.W);
        }
      }
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        const float* centre_row = pad + ((oh - oh0) * S + g.r) * Wp * g.C + g.r * g.C;
        float* dst = channels_last ? out + (n * g.Ho + oh) * g.Wo * g.O : row;
        if (oh + 1 < oh1) {  // the next output row towards L2 while this one computes
          const int64_t bytes = g.Wo * int64_t(sizeof(float));
          if (channels_last) {
            const char* next = reinterpret_cast<const char*>(dst + g.Wo * g.O);
            for (int64_t b = 0; b < bytes * g.O; b += 64) __builtin_prefetch(next + b, 1, 2);
          } else {
            for (int64_t o = 0; o < g.O; ++o) {
              const char* plane = reinterpret_cast<const char*>(out + ((n * g.O + o) * g.Ho + oh + 1) * g.Wo);
              for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(plane + b, 1, 2);
            }
          }
        }
        int64_t ow = 0;
        for (; ow + kPixels <= g.Wo; ow += kPixels)
          pixels<S, kPixels>(g, centre_row + ow * S * g.C, Wp * g.C, kernels, dw, pw, bias, z, dst + ow * g.O);
        for (; ow < g.Wo; ++ow)
          pixels<S, 1>(g, centre_row + ow * S * g.C, Wp * g.C, kernels, dw, pw, bias, z, dst + ow * g.O);
        if (!channels_last) transpose_copy(row, g.O, out + (n * g.O * g.Ho + oh) * g.Wo, g.Ho * g.Wo, g.Wo, g.O);
      }
    }
  });
}

at::Tensor multiception_fused(const at::Tensor& x, const at::Tensor& depthwise, at::IntArrayRef kernels,
                              const at::Tensor& pointwise, const at::Tensor& bias, int64_t stride) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4,
              "multiception_fused: x must be a 4-D float32 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(stride == 1 || stride == 2, "multiception_fused: stride must be 1 or 2, got ", stride);
  const int64_t K = static_cast<int64_t>(kernels.size());
  TORCH_CHECK(K >= 1, "multiception_fused: kernels must not be empty");
  TORCH_CHECK(depthwise.dim() == 4 && depthwise.size(0) == K && depthwise.size(1) == depthwise.size(2),
              "multiception_fused: depthwise must be (K, k_max, k_max, C), got ", depthwise.sizes());
  const int64_t C = x.size(1), kmax = depthwise.size(1);
  TORCH_CHECK(depthwise.size(3) == C && C % 16 == 0, "multiception_fused: channels must match and be a multiple of 16");
  TORCH_CHECK(pointwise.dim() == 2 && pointwise.size(0) == K * C && pointwise.size(1) % 16 == 0,
              "multiception_fused: pointwise must be (K*C, O) with O a multiple of 16, got ", pointwise.sizes());
  const int64_t O = pointwise.size(1);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == O, "multiception_fused: bias must be (O,)");
  TORCH_CHECK(kmax % 2 == 1, "multiception_fused: k_max must be odd, got ", kmax);
  for (int64_t k : kernels)
    TORCH_CHECK(k % 2 == 1 && k <= kmax && k <= 11,
                "multiception_fused: kernel sizes must be odd, <= k_max and <= 11, got ", k);
  for (const at::Tensor* t : {&depthwise, &pointwise, &bias})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "multiception_fused: weights must be contiguous float32 CPU tensors");

  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  const at::Tensor input = channels_last ? x : x.contiguous();
  const int64_t H = x.size(2), W = x.size(3);
  TORCH_CHECK(H > 0 && W > 0, "multiception_fused: the input must have a non-empty map, got ", x.sizes());
  Geometry g{x.size(0), C, H, W, O, K, kmax, kmax / 2, (H - 1) / stride + 1, (W - 1) / stride + 1};
  auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({g.N, O, g.Ho, g.Wo}, x.options().memory_format(format));
  if (out.numel() == 0) return out;
  std::vector<int64_t> sizes(kernels.begin(), kernels.end());
  auto body = stride == 1 ? run<1> : run<2>;
  body(g, input.data_ptr<float>(), channels_last, sizes.data(), depthwise.data_ptr<float>(),
       pointwise.data_ptr<float>(), bias.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

}  // namespace
}  // namespace convzoo_native

TORCH_LIBRARY(convzoo, m) {
  m.def(
      "multiception_fused(Tensor x, Tensor depthwise, int[] kernels, Tensor pointwise, Tensor bias, int stride) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(convzoo, CPU, m) { m.impl("multiception_fused", &convzoo_native::multiception_fused); }
