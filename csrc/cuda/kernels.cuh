// CUDA kernels of the DiT primitives: row-wise forward+JVP and backward through (y, ty), fp32 accumulation,
// float / half / bfloat16 load-store. The per-element mathematics is csrc/include/flowmap/*.h (shared with
// the CPU extension). Launchers take raw device pointers, sizes, row strides (elements) and a stream.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace flowmap_cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

using ptr = std::uintptr_t;
using i64 = long long;

// Row norm (see rownorm.h). Tables are contiguous (M, C) with `rp*` rows of x per table row (0 = absent).
void norm_forward(ptr x, i64 rs, ptr scale, i64 rps, ptr shift, i64 rph, ptr y, ptr stats, i64 R, i64 C, float offset,
                  bool center, float eps, int dtype, cudaStream_t s);
void norm_backward(ptr x, i64 rs, ptr scale, i64 rps, ptr stats, ptr gy, i64 gys, ptr dx, ptr ds, ptr dh, i64 R, i64 C,
                   float offset, bool center, i64 rpc, int dtype, cudaStream_t s);
void norm_jvp_forward(ptr x, i64 rs, ptr tx, i64 trs, ptr scale, i64 rps, ptr shift, i64 rph, ptr tscale, i64 rpts,
                      ptr tshift, i64 rpth, ptr y, ptr ty, ptr stats, i64 R, i64 C, float offset, bool center, float eps,
                      int dtype, cudaStream_t s);
void norm_jvp_backward(ptr x, i64 rs, ptr tx, i64 trs, ptr scale, i64 rps, ptr tscale, i64 rpts, ptr stats, ptr gy,
                       i64 gys, ptr gt, i64 gts, ptr dx, ptr dtx, ptr ds, ptr dh, ptr dts, ptr dth, i64 R, i64 C,
                       float offset, bool center, i64 rpc, int dtype, cudaStream_t s);
// GELU (tanh) with a fused bias (C,)
void gelu_forward(ptr x, i64 rs, ptr bias, ptr y, i64 R, i64 C, int dtype, cudaStream_t s);
void gelu_backward(ptr x, i64 rs, ptr bias, ptr gy, i64 gys, ptr dx, ptr db, i64 R, i64 C, i64 rpc, int dtype,
                   cudaStream_t s);
void gelu_jvp_forward(ptr x, i64 rs, ptr tx, i64 trs, ptr bias, ptr tbias, ptr y, ptr ty, i64 R, i64 C, int dtype,
                      cudaStream_t s);
void gelu_jvp_backward(ptr x, i64 rs, ptr tx, i64 trs, ptr bias, ptr tbias, ptr gy, i64 gys, ptr gt, i64 gts, ptr dx,
                       ptr dtx, ptr db, ptr dtb, i64 R, i64 C, i64 rpc, int dtype, cudaStream_t s);
// gated residual
void gated_forward(ptr x, i64 rs, ptr gate, i64 rpg, ptr y, i64 ys, ptr out, i64 R, i64 C, int dtype, cudaStream_t s);
void gated_backward(ptr gate, i64 rpg, ptr y, i64 ys, ptr go, i64 gos, ptr dy, ptr dg, i64 R, i64 C, i64 rpc,
                    int dtype, cudaStream_t s);
void gated_jvp_forward(ptr x, i64 rs, ptr tx, i64 trs, ptr gate, i64 rpg, ptr tgate, i64 rptg, ptr y, i64 ys, ptr ty,
                       i64 tys, ptr out, ptr tout, i64 R, i64 C, int dtype, cudaStream_t s);
void gated_jvp_backward(ptr gate, i64 rpg, ptr tgate, i64 rptg, ptr y, i64 ys, ptr ty, i64 tys, ptr go, i64 gos,
                        ptr gto, i64 gtos, ptr dy, ptr dty, ptr dg, ptr dtg, i64 R, i64 C, i64 rpc, int dtype,
                        cudaStream_t s);

}  // namespace flowmap_cuda
