// convzoo native kernels: 16 floats as one vector (GCC vector extensions: one AVX-512 register where the build
// enables it, two AVX2 or four SSE registers otherwise), with unaligned loads and stores.
#pragma once

namespace convzoo_native {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void store(float* p, v16 v) { *reinterpret_cast<v16u*>(p) = v; }

}  // namespace convzoo_native
