// convzoo native CPU kernel: DO-Conv's kernel composition (paper §3) and its backward, for groups = 1 and
// D_mul = M*N = A (3x3 kernels: A = 9).
//
//   W  (C_in, A, C_out)   the input-major trained kernel (DOConv2d.W)
//   D  (C_in, A, A)       D' + I, one A x A matrix per input channel (or D' itself, with add_identity: the kernels
//                         add I as they read it, and dL/dD' = dL/dD)
//   W' (C_out, C_in, A)   W'[o, i, s] = sum_d D[i, s, d] W[i, d, o]     (the conv's kernel, output-major)
//
// backward, from G = dL/dW' (C_out, C_in, A):
//   dW[i, d, o] = sum_s D[i, s, d] G[o, i, s]          dD[i, s, d] = sum_o G[o, i, s] W[i, d, o]
//
// torch needs a batched matmul and a transposed copy each way (the copy single-threaded), so each step reads and
// writes every weight about six times. Here each side is one pass: a task owns 16 input channels, computes
// their (16*A) x C_out slice in a buffer that stays in L2 with 16-wide vector FMAs over output channels, and
// moves it between the two layouts with 16 x 16 register transposes. dD's sum over output channels is owned by
// the task of its input channel, so no thread reduces into another's memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "vec16.h"

namespace convzoo_native {
namespace {

constexpr int64_t kBlock = 16;  // input channels per task = vector lanes = transpose tile
// copies a 16 x 16 tile: dst row r (stride dst_stride) = column r of the src rows (stride src_stride)
inline void transpose_tile(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
  v16 rows[16];
  for (int k = 0; k < 16; ++k) rows[k] = load(src + k * src_stride);
  transpose16(rows);
  for (int k = 0; k < 16; ++k) store(dst + k * dst_stride, rows[k]);
}

// dst row r = sum_k M[r][k] src row k, for A rows of `length` floats (a multiple of 16), with M = m (A x A,
// row-major) or, if transposed, its transpose: A x A coefficients against 16-wide vectors, one column block at a time.
// With `stream`, dst (64-byte aligned, dst_stride a multiple of 16) is written with non-temporal stores.
template <int A, bool transposed, bool stream = false>
inline void mix_rows(const float* src, int64_t src_stride, const float* m, float* dst, int64_t dst_stride,
                     int64_t length) {
  for (int64_t o = 0; o < length; o += 16) {
    v16 x[A];
#pragma GCC unroll 16
    for (int k = 0; k < A; ++k) x[k] = load(src + k * src_stride + o);
#pragma GCC unroll 16
    for (int r = 0; r < A; ++r) {
      v16 acc = x[0] * m[transposed ? r : r * A];
#pragma GCC unroll 16
      for (int k = 1; k < A; ++k) acc += x[k] * m[transposed ? k * A + r : r * A + k];
      if (stream)
        store_stream(dst + r * dst_stride + o, acc);
      else
        store(dst + r * dst_stride + o, acc);
    }
  }
}

// D[i] as the kernels read it: the stored A x A block, plus the identity when the caller passes D' = D - I
// (DOConv2d's parameter) with add_identity, so that D = D' + I never has to exist as its own tensor. The sum is
// the same float32 addition torch's D' + I makes.
inline const float* d_block(const float* stored, bool add_identity, float* scratch, int A) {
  if (!add_identity) return stored;
  for (int k = 0; k < A * A; ++k) scratch[k] = stored[k];
  for (int k = 0; k < A; ++k) scratch[k * A + k] += 1.f;
  return scratch;
}

void check_operands(const at::Tensor& W, const at::Tensor& D, int64_t area) {
  TORCH_CHECK(W.device().is_cpu() && D.device().is_cpu() && W.scalar_type() == at::kFloat &&
                  D.scalar_type() == at::kFloat,
              "doconv_compose: W and D must be float32 CPU tensors");
  TORCH_CHECK(W.dim() == 3 && D.dim() == 3 && W.size(1) == area && D.size(0) == W.size(0) && D.size(1) == area &&
                  D.size(2) == area,
              "doconv_compose: W must be (C_in, ", area, ", C_out) and D (C_in, ", area, ", ", area, "), got ",
              W.sizes(), " and ", D.sizes());
  TORCH_CHECK(W.size(0) % kBlock == 0 && W.size(2) % kBlock == 0,
              "doconv_compose: C_in and C_out must be multiples of 16, got ", W.sizes());
}

template <int A>
at::Tensor compose(const at::Tensor& W_, const at::Tensor& D_, bool add_identity, at::IntArrayRef kernel_size) {
  check_operands(W_, D_, A);
  const at::Tensor W = W_.contiguous(), D = D_.contiguous();
  const int64_t I = W.size(0), O = W.size(2), row = I * A;  // row: one output channel of W'
  const int64_t ld = O + 16;  // the buffer's row stride: rows 2^k floats apart would share a few cache sets
  // (C_out, C_in, A), or the conv's (C_out, C_in, M, N) when the caller passes its kernel size: the same memory
  TORCH_CHECK(kernel_size.empty() || (kernel_size.size() == 2 && kernel_size[0] * kernel_size[1] == A),
              "doconv_compose: kernel_size must be empty or a pair whose product is ", A, ", got ", kernel_size);
  at::Tensor out = kernel_size.empty() ? at::empty({O, I, A}, W.options())
                                       : at::empty({O, I, kernel_size[0], kernel_size[1]}, W.options());
  const float* w = W.data_ptr<float>();
  const float* dm = D.data_ptr<float>();
  float* wc = out.data_ptr<float>();
  at::parallel_for(0, I / kBlock, 1, [&](int64_t begin, int64_t end) {
    // slice[j][o] = W'[o, i0 + j / A, j % A] for the task's 16 input channels, j < 16 A: (16 A) x C_out, in L2
    at::Tensor buffer = at::empty({kBlock * A, ld}, W.options());
    float* slice = buffer.data_ptr<float>();
    float scratch[A * A];
    for (int64_t block = begin; block < end; ++block) {
      for (int64_t k = 0; k < kBlock; ++k) {
        const int64_t i = block * kBlock + k;
        const float* wi = w + i * A * O;
        const float* di = d_block(dm + i * A * A, add_identity, scratch, A);
        mix_rows<A, false>(wi, O, di, slice + k * A * ld, ld, O);  // slice rows s = sum_d D[i, s, d] W[i, d]
      }
      // (16 A) x C_out -> C_out rows of 16 A contiguous floats each, in 16 x 16 tiles
      float* dst = wc + block * kBlock * A;
      for (int64_t o = 0; o < O; o += 16) {
        if (o + 32 < O)  // the destination lines of the rows two blocks ahead, for writing
          for (int64_t r = o + 32; r < o + 48; ++r)
            for (int t = 0; t < A; ++t) __builtin_prefetch(dst + r * row + t * 16, 1, 3);
        for (int t = 0; t < A; ++t) transpose_tile(slice + t * 16 * ld + o, ld, dst + o * row + t * 16, row);
      }
    }
  });
  return out;
}

template <int A>
std::tuple<at::Tensor, at::Tensor> compose_backward(const at::Tensor& grad_, const at::Tensor& W_,
                                                    const at::Tensor& D_, bool need_w, bool need_d,
                                                    bool add_identity) {
  check_operands(W_, D_, A);
  const int64_t I = W_.size(0), O = W_.size(2), row = I * A, ld = O + 16;
  const bool grad_shape_ok = grad_.size(0) == O && grad_.size(1) == I &&
                             ((grad_.dim() == 3 && grad_.size(2) == A) ||
                              (grad_.dim() == 4 && grad_.size(2) * grad_.size(3) == A));
  TORCH_CHECK(grad_.device().is_cpu() && grad_.scalar_type() == at::kFloat && grad_.dim() >= 3 && grad_shape_ok,
              "doconv_compose_backward: grad must be a float32 CPU tensor of shape (", O, ", ", I, ", ", A,
              ") or (", O, ", ", I, ", M, N) with M*N = ", A, ", got ", grad_.sizes());
  const at::Tensor grad = grad_.contiguous().view({O, I, A}), W = W_.contiguous(), D = D_.contiguous();
  // a gradient that is not needed comes back empty (0 elements)
  at::Tensor grad_w = at::empty({need_w ? I : 0, A, O}, W.options());
  at::Tensor grad_d = at::empty({need_d ? I : 0, A, A}, W.options());
  if (!need_w && !need_d) return {grad_w, grad_d};
  const float* g = grad.data_ptr<float>();
  const float* w = W.data_ptr<float>();
  const float* dm = D.data_ptr<float>();
  float* gw = need_w ? grad_w.data_ptr<float>() : nullptr;
  float* gd = need_d ? grad_d.data_ptr<float>() : nullptr;
  // dW is read only by the optimizer, long after this pass: stream it to memory (no read-for-ownership of its
  // lines, no eviction of what the rest of the backward still reads) where the vector stores can be aligned
  const bool stream_w = need_w && reinterpret_cast<uintptr_t>(gw) % 64 == 0;
  at::parallel_for(0, I / kBlock, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buffer = at::empty({kBlock * A, ld}, W.options());
    float* slice = buffer.data_ptr<float>();
    float scratch[A * A];
    for (int64_t block = begin; block < end; ++block) {
      // slice[j][o] = G[o, i0 + j / A, j % A]
      const float* src = g + block * kBlock * A;
      for (int64_t o = 0; o < O; o += 16) {
        if (o + 32 < O)  // the source lines of the rows two blocks ahead
          for (int64_t r = o + 32; r < o + 48; ++r)
            for (int t = 0; t < A; ++t) __builtin_prefetch(src + r * row + t * 16, 0, 3);
        for (int t = 0; t < A; ++t) transpose_tile(src + o * row + t * 16, row, slice + t * 16 * ld + o, ld);
      }
      for (int64_t k = 0; k < kBlock; ++k) {
        const int64_t i = block * kBlock + k;
        const float* wi = w + i * A * O;
        const float* di = d_block(dm + i * A * A, add_identity, scratch, A);
        const float* si = slice + k * A * ld;
        if (stream_w) {  // dW rows d = sum_s D[i, s, d] G-slice rows s
          mix_rows<A, true, true>(si, ld, di, gw + i * A * O, O, O);
        } else if (need_w) {
          mix_rows<A, true>(si, ld, di, gw + i * A * O, O, O);
        }
        if (need_d) {
          float* gdi = gd + i * A * A;
          for (int s = 0; s < A; ++s) {
            v16 acc[A];
#pragma GCC unroll 16
            for (int d = 0; d < A; ++d) acc[d] = v16{};
            for (int64_t o = 0; o < O; o += 16) {
              const v16 x = load(si + s * ld + o);
#pragma GCC unroll 16
              for (int d = 0; d < A; ++d) acc[d] += x * load(wi + d * O + o);
            }
#pragma GCC unroll 16
            for (int d = 0; d < A; ++d) gdi[s * A + d] = reduce_add(acc[d]);
          }
        }
      }
    }
    stream_fence();  // the streamed dW is complete before the join, and so before any other thread reads it
  });
  return {grad_w, grad_d};
}

at::Tensor doconv_compose(const at::Tensor& W, const at::Tensor& D, bool add_identity, at::IntArrayRef kernel_size) {
  TORCH_CHECK(W.dim() == 3 && W.size(1) == 9, "doconv_compose: only 3x3 kernels with d_mul = 9, got W ", W.sizes());
  return compose<9>(W, D, add_identity, kernel_size);
}

std::tuple<at::Tensor, at::Tensor> doconv_compose_backward(const at::Tensor& grad, const at::Tensor& W,
                                                           const at::Tensor& D, bool need_w, bool need_d,
                                                           bool add_identity) {
  TORCH_CHECK(W.dim() == 3 && W.size(1) == 9,
              "doconv_compose_backward: only 3x3 kernels with d_mul = 9, got W ", W.sizes());
  return compose_backward<9>(grad, W, D, need_w, need_d, add_identity);
}

void check_weight_area(const at::Tensor& W) {
  TORCH_CHECK(W.dim() == 3 && W.size(1) == 9, "doconv_weight: only 3x3 kernels with d_mul = 9, got W ", W.sizes());
}

// A gradient the native backward may read: a plain float32 CPU tensor with its own storage, outside create_graph
// (double backward needs a differentiable backward) and torch dispatch modes (they see the torch form's ops). Not a
// wrapper such as vmap's batched tensors (autograd.grad(is_grads_batched=True), jacobian(vectorize=True)), a
// functionalized or Python-subclass tensor, or an efficient zero tensor.
bool plain_gradient(const at::Tensor& grad) {
  const c10::DispatchKeySet wrappers({c10::DispatchKey::Python, c10::DispatchKey::FuncTorchBatched,
                                      c10::DispatchKey::BatchedNestedTensor, c10::DispatchKey::Batched,
                                      c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::Functionalize,
                                      c10::DispatchKey::ZeroTensor});
  return grad.device().is_cpu() && grad.scalar_type() == at::kFloat && grad.layout() == at::kStrided &&
         grad.has_storage() && !grad.key_set().has_any(wrappers) && !at::GradMode::is_enabled() &&
         c10::impl::TorchDispatchModeTLS::stack_len() == 0;
}

// DOConv2d.weight where the native kernels apply: W' = (D' + I) W as the conv's kernel, (C_out, C_in, M, N), with
// its backward in C++ too, so that autograd runs no Python for it (a Python autograd.Function costs tens of us per
// layer and step, more when a large conv has just left the interpreter's memory cold). The forward redispatches
// below autograd (the CPU kernel; the Meta one for shapes). The backward runs the native kernel for a
// plain_gradient, else the differentiable torch form, as convzoo.ops.doconv._torch_compose_backward computes it,
// with autocast off (a backward() called inside an autocast region would otherwise run its bmm in bf16 / fp16).
class ComposedWeight : public torch::autograd::Function<ComposedWeight> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& W, const at::Tensor& d_delta,
                            std::vector<int64_t> kernel_size) {
    ctx->save_for_backward({W, d_delta});
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("convzoo::doconv_weight", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(W, d_delta, kernel_size);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &W = saved[0], &d_delta = saved[1];
    const bool need_w = ctx->needs_input_grad(0), need_d = ctx->needs_input_grad(1);
    const at::Tensor& grad = grads[0];
    if (!grad.defined() || !(need_w || need_d)) return {at::Tensor(), at::Tensor(), at::Tensor()};
    if (plain_gradient(grad)) {
      auto [grad_w, grad_d] = compose_backward<9>(grad, W, d_delta, need_w, need_d, true);
      return {need_w ? grad_w : at::Tensor(), need_d ? grad_d : at::Tensor(), at::Tensor()};
    }
    // the torch form: D = D' + I; dW[i, d, o] = sum_s D[i, s, d] G[o, i, s]; dD[i, s, d] = sum_o G[o, i, s] W[i, d, o]
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const int64_t I = W.size(0), O = W.size(2);
    const at::Tensor D = d_delta + at::eye(9, d_delta.options());
    const at::Tensor g = grad.reshape({O, I, 9}).permute({1, 2, 0});  // (C_in, A, C_out): G[o, i, s] at [i, s, o]
    at::Tensor grad_w, grad_d;
    if (need_w) grad_w = at::bmm(D.transpose(1, 2), g);  // (C_in, A, C_out)
    if (need_d) grad_d = at::bmm(g, W.transpose(1, 2));  // (C_in, A, A)
    return {grad_w, grad_d, at::Tensor()};
  }
};

at::Tensor doconv_weight_autograd(const at::Tensor& W, const at::Tensor& d_delta, at::IntArrayRef kernel_size) {
  check_weight_area(W);
  return ComposedWeight::apply(W, d_delta, kernel_size.vec());
}

at::Tensor doconv_weight(const at::Tensor& W, const at::Tensor& d_delta, at::IntArrayRef kernel_size) {
  check_weight_area(W);
  return compose<9>(W, d_delta, true, kernel_size);
}

// shapes only (meta and fake tensors): what doconv_weight allocates
at::Tensor doconv_weight_meta(const at::Tensor& W, const at::Tensor& d_delta, at::IntArrayRef kernel_size) {
  check_weight_area(W);
  TORCH_CHECK(d_delta.dim() == 3 && d_delta.size(0) == W.size(0) && d_delta.size(1) == 9 && d_delta.size(2) == 9,
              "doconv_weight: d_delta must be (C_in, 9, 9), got ", d_delta.sizes());
  TORCH_CHECK(kernel_size.empty() || (kernel_size.size() == 2 && kernel_size[0] * kernel_size[1] == 9),
              "doconv_weight: kernel_size must be empty or a pair whose product is 9, got ", kernel_size);
  return kernel_size.empty() ? at::empty({W.size(2), W.size(0), 9}, W.options())
                             : at::empty({W.size(2), W.size(0), kernel_size[0], kernel_size[1]}, W.options());
}

}  // namespace
}  // namespace convzoo_native

TORCH_LIBRARY_FRAGMENT(convzoo, m) {
  m.def("doconv_weight(Tensor W, Tensor d_delta, int[] kernel_size) -> Tensor");
  m.def("doconv_compose(Tensor W, Tensor D, bool add_identity=False, int[] kernel_size=[]) -> Tensor");
  m.def(
      "doconv_compose_backward(Tensor grad, Tensor W, Tensor D, bool need_w, bool need_d, bool add_identity=False) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(convzoo, Autograd, m) { m.impl("doconv_weight", &convzoo_native::doconv_weight_autograd); }

TORCH_LIBRARY_IMPL(convzoo, Meta, m) { m.impl("doconv_weight", &convzoo_native::doconv_weight_meta); }

TORCH_LIBRARY_IMPL(convzoo, CPU, m) {
  m.impl("doconv_weight", &convzoo_native::doconv_weight);
  m.impl("doconv_compose", &convzoo_native::doconv_compose);
  m.impl("doconv_compose_backward", &convzoo_native::doconv_compose_backward);
}
