// CUDA kernels (see kernels.cuh). Row-wise ops: one block per row for the forward passes (three passes over
// the row for the JVP: sums, centred sums, outputs; re-reads hit L1/L2), one block per chunk of `rpc`
// consecutive rows for the backward passes, which also accumulate parameter-gradient partial sums (each
// thread owns a fixed set of columns: no atomics, deterministic).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "flowmap/pointwise.h"
#include "flowmap/rownorm.h"
#include "kernels.cuh"

namespace flowmap_cuda {
namespace {

using flowmap::NormStats;

__device__ __forceinline__ float ldf(const float* p) { return *p; }
__device__ __forceinline__ float ldf(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float ldf(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void stf(float* p, float v) { *p = v; }
__device__ __forceinline__ void stf(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void stf(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ float ldo(const T* row, i64 c, float dflt) { return row == nullptr ? dflt : ldf(row + c); }

// Sums N values over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the totals.
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N]) {
  __shared__ float sh[N][32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[i] += __shfl_xor_sync(0xffffffffu, v[i], o);
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) sh[i][wid] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float s = 0.f;
    for (int w = 0; w < nw; ++w) s += sh[i][w];
    v[i] = s;
  }
  __syncthreads();
}

// The max of v over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it. fmaxf drops a
// NaN operand: a NaN row still gives NaN through its sums.
__device__ __forceinline__ float block_max(float v) {
  __shared__ float sh[32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  float m = 0.f;
  for (int w = 0; w < nw; ++w) m = fmaxf(m, sh[w]);
  __syncthreads();
  return m;
}

// Power-of-two row scale of the row norm (see rownorm.h): 1 for rows with max |x| <= 1.
template <typename T>
__device__ __forceinline__ float row_inv_scale(const T* xr, i64 C) {
  float m = 0.f;
  for (i64 c = threadIdx.x; c < C; c += blockDim.x) m = fmaxf(m, fabsf(ldf(xr + c)));
  return flowmap::row_inv_scale(block_max(m));
}

// partial[k, c] = v on the chunk's first row, += v after (the same thread owns column c for every row)
__device__ __forceinline__ void acc_partial(float* p, i64 k, i64 C, i64 c, bool first, float v) {
  if (p == nullptr) return;
  float* q = p + k * C + c;
  *q = first ? v : *q + v;
}

// ---- row norm -------------------------------------------------------------------------------------------

template <typename T>
__global__ void norm_fwd_kernel(const T* __restrict__ x, i64 rs, const T* __restrict__ scale, i64 rps,
                                const T* __restrict__ shift, i64 rph, T* __restrict__ y, float* __restrict__ stats,
                                i64 C, float offset, bool center, float eps) {
  const i64 r = blockIdx.x;
  const T* xr = x + r * rs;
  const float inv = row_inv_scale(xr, C);
  float v[1] = {0.f};
  for (i64 c = threadIdx.x; c < C; c += blockDim.x) v[0] += ldf(xr + c) * inv;
  block_sum<1>(v);
  NormStats st{flowmap::finish_mean(v[0], (int)C, center), 0.f, 0.f, 0.f};
  float q[1] = {0.f};
  for (i64 c = threadIdx.x; c < C; c += blockDim.x) {
    float d = ldf(xr + c) * inv - st.mean;
    q[0] += d * d;
  }
  block_sum<1>(q);
  st.rstd = flowmap::finish_rstd(q[0], (int)C, eps, inv);
  flowmap::finish_unscale(st, inv);
  const T* sr = flowmap::table_row(scale, r, rps, C);
  const T* hr = flowmap::table_row(shift, r, rph, C);
  for (i64 c = threadIdx.x; c < C; c += blockDim.x) {
    float yv;
    flowmap::norm_fwd_elem(ldf(xr + c), offset + ldo(sr, c, 0.f), ldo(hr, c, 0.f), st, yv);
    stf(y + r * C + c, yv);
  }
  if (threadIdx.x == 0) {
    stats[2 * r] = st.mean;
    stats[2 * r + 1] = st.rstd;
  }
}

template <typename T>
__global__ void norm_jvp_fwd_kernel(const T* __restrict__ x, i64 rs, const T* __restrict__ tx, i64 trs,
                                    const T* __restrict__ scale, i64 rps, const T* __restrict__ shift, i64 rph,
                                    const T* __restrict__ tscale, i64 rpts, const T* __restrict__ tshift, i64 rpth,
                                    T* __restrict__ y, T* __restrict__ ty, float* __restrict__ stats, i64 C,
                                    float offset, bool center, float eps) {
  const i64 r = blockIdx.x;
  const T* xr = x + r * rs;
  const T* txr = tx + r * trs;
  const float inv = row_inv_scale(xr, C);
  float v[2] = {0.f, 0.f};
  for (i64 c = threadIdx.x; c < C; c += blockDim.x) {
    v[0] += ldf(xr + c) * inv;
    v[1] += ldf(txr + c);
  }
  block_sum<2>(v);
  NormStats st{flowmap::finish_mean(v[0], (int)C, center), 0.f, flowmap::finish_mean(v[1], (int)C, center), 0.f};
  float q[2] = {0.f, 0.f};
  for (i64 c = threadIdx.x; c < C; c += blockDim.x) {
    float d = ldf(xr + c) * inv - st.mean;
    q[0] += d * d;
    q[1] += d * ldf(txr + c);
  }
  block_sum<2>(q);
  st.rstd = flowmap::finish_rstd(q[0], (int)C, eps, inv);
  st.w = flowmap::finish_w(q[1], st.rstd, (int)C);
  flowmap::finish_unscale(st, inv);
  const T* sr = flowmap::table_row(scale, r, rps, C);
  const T* hr = flowmap::table_row(shift, r, rph, C);
  const T* tsr = flowmap::table_row(tscale, r, rpts, C);
  const T* thr = flowmap::table_row(tshift, r, rpth, C);
  for (i64 c = threadIdx.x; c < C; c += blockDim.x) {
    float yv, tyv;
    flowmap::norm_jvp_elem(ldf(xr + c), ldf(txr + c), offset + ldo(sr, c, 0.f), ldo(hr, c, 0.f), ldo(tsr, c, 0.f),
                           ldo(thr, c, 0.f), st, yv, tyv);
    stf(y + r * C + c, yv);
    stf(ty + r * C + c, tyv);
  }
  if (threadIdx.x == 0) {
    stats[4 * r] = st.mean;
    stats[4 * r + 1] = st.rstd;
    stats[4 * r + 2] = st.tmean;
    stats[4 * r + 3] = st.w;
  }
}

template <typename T>
__global__ void norm_bwd_kernel(const T* __restrict__ x, i64 rs, const T* __restrict__ scale, i64 rps,
                                const float* __restrict__ stats, const T* __restrict__ gy, i64 gys, T* __restrict__ dx,
                                float* __restrict__ ds, float* __restrict__ dh, i64 C, float offset, bool center,
                                i64 rpc) {
  const i64 k = blockIdx.x;
  for (i64 r = k * rpc; r < (k + 1) * rpc; ++r) {
    const T* xr = x + r * rs;
    const T* gr = gy + r * gys;
    const T* sr = flowmap::table_row(scale, r, rps, C);
    NormStats st{stats[2 * r], stats[2 * r + 1], 0.f, 0.f};
    flowmap::NormBwdSums1 acc{0.f, 0.f};
    for (i64 c = threadIdx.x; c < C; c += blockDim.x)
      flowmap::norm_bwd_accum(ldf(xr + c), offset + ldo(sr, c, 0.f), ldf(gr + c), st, acc);
    float v[2] = {acc.g, acc.gx};
    block_sum<2>(v);
    flowmap::NormBwdSums1 sum{v[0], v[1]};
    const bool first = r == k * rpc;
    for (i64 c = threadIdx.x; c < C; c += blockDim.x) {
      float d, dsc, g = ldf(gr + c);
      flowmap::norm_bwd_elem(ldf(xr + c), offset + ldo(sr, c, 0.f), g, st, sum, (int)C, center, d, dsc);
      stf(dx + r * C + c, d);
      acc_partial(ds, k, C, c, first, dsc);
      acc_partial(dh, k, C, c, first, g);
    }
  }
}

template <typename T>
__global__ void norm_jvp_bwd_kernel(const T* __restrict__ x, i64 rs, const T* __restrict__ tx, i64 trs,
                                    const T* __restrict__ scale, i64 rps, const T* __restrict__ tscale, i64 rpts,
                                    const float* __restrict__ stats, const T* __restrict__ gy, i64 gys,
                                    const T* __restrict__ gt, i64 gts, T* __restrict__ dx, T* __restrict__ dtx,
                                    float* __restrict__ ds, float* __restrict__ dh, float* __restrict__ dts,
                                    float* __restrict__ dth, i64 C, float offset, bool center, i64 rpc) {
  const i64 k = blockIdx.x;
  for (i64 r = k * rpc; r < (k + 1) * rpc; ++r) {
    const T* xr = x + r * rs;
    const T* txr = tx + r * trs;
    const T* gyr = gy == nullptr ? nullptr : gy + r * gys;  // gy absent = zero
    const T* gtr = gt + r * gts;
    const T* sr = flowmap::table_row(scale, r, rps, C);
    const T* tsr = flowmap::table_row(tscale, r, rpts, C);
    NormStats st{stats[4 * r], stats[4 * r + 1], stats[4 * r + 2], stats[4 * r + 3]};
    flowmap::NormBwdSums acc{0.f, 0.f, 0.f, 0.f, 0.f};
    for (i64 c = threadIdx.x; c < C; c += blockDim.x)
      flowmap::norm_jvp_bwd_accum(ldf(xr + c), ldf(txr + c), offset + ldo(sr, c, 0.f), ldo(tsr, c, 0.f),
                                  ldo(gyr, c, 0.f), ldf(gtr + c), st, acc);
    float v[5] = {acc.gxh, acc.gxh_xh, acc.gt, acc.gt_xh, acc.gt_txh};
    block_sum<5>(v);
    flowmap::NormBwdSums sum{v[0], v[1], v[2], v[3], v[4]};
    const bool first = r == k * rpc;
    for (i64 c = threadIdx.x; c < C; c += blockDim.x) {
      float d, dt, dsc, dtsc, g = ldo(gyr, c, 0.f), gtv = ldf(gtr + c);
      flowmap::norm_jvp_bwd_elem(ldf(xr + c), ldf(txr + c), offset + ldo(sr, c, 0.f), ldo(tsr, c, 0.f), g, gtv, st,
                                 sum, (int)C, center, d, dt, dsc, dtsc);
      stf(dx + r * C + c, d);
      stf(dtx + r * C + c, dt);
      acc_partial(ds, k, C, c, first, dsc);
      acc_partial(dts, k, C, c, first, dtsc);
      acc_partial(dh, k, C, c, first, g);
      acc_partial(dth, k, C, c, first, gtv);
    }
  }
}

// ---- GELU ---------------------------------------------------------------------------------------------------

template <typename T>
__global__ void gelu_fwd_kernel(const T* __restrict__ x, i64 rs, const T* __restrict__ bias, T* __restrict__ y, i64 R,
                                i64 C) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < R * C; i += (i64)gridDim.x * blockDim.x) {
    const i64 r = i / C, c = i - r * C;
    stf(y + i, flowmap::gelu_value(ldf(x + r * rs + c) + ldo(bias, c, 0.f)));
  }
}

template <typename T>
__global__ void gelu_jvp_fwd_kernel(const T* __restrict__ x, i64 rs, const T* __restrict__ tx, i64 trs,
                                    const T* __restrict__ bias, const T* __restrict__ tbias, T* __restrict__ y,
                                    T* __restrict__ ty, i64 R, i64 C) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < R * C; i += (i64)gridDim.x * blockDim.x) {
    const i64 r = i / C, c = i - r * C;
    float yv, tyv;
    flowmap::gelu_jvp_elem(ldf(x + r * rs + c) + ldo(bias, c, 0.f), ldf(tx + r * trs + c) + ldo(tbias, c, 0.f), yv,
                           tyv);
    stf(y + i, yv);
    stf(ty + i, tyv);
  }
}

template <typename T>
__global__ void gelu_bwd_kernel(const T* __restrict__ x, i64 rs, const T* __restrict__ bias, const T* __restrict__ gy,
                                i64 gys, T* __restrict__ dx, float* __restrict__ db, i64 C, i64 rpc) {
  const i64 k = blockIdx.x;
  for (i64 r = k * rpc; r < (k + 1) * rpc; ++r) {
    const bool first = r == k * rpc;
    for (i64 c = threadIdx.x; c < C; c += blockDim.x) {
      float dz;
      flowmap::gelu_bwd_elem(ldf(x + r * rs + c) + ldo(bias, c, 0.f), ldf(gy + r * gys + c), dz);
      stf(dx + r * C + c, dz);
      acc_partial(db, k, C, c, first, dz);
    }
  }
}

template <typename T>
__global__ void gelu_jvp_bwd_kernel(const T* __restrict__ x, i64 rs, const T* __restrict__ tx, i64 trs,
                                    const T* __restrict__ bias, const T* __restrict__ tbias, const T* __restrict__ gy,
                                    i64 gys, const T* __restrict__ gt, i64 gts, T* __restrict__ dx, T* __restrict__ dtx,
                                    float* __restrict__ db, float* __restrict__ dtb, i64 C, i64 rpc) {
  const i64 k = blockIdx.x;
  for (i64 r = k * rpc; r < (k + 1) * rpc; ++r) {
    const bool first = r == k * rpc;
    for (i64 c = threadIdx.x; c < C; c += blockDim.x) {
      float dz, dtz;
      flowmap::gelu_jvp_bwd_elem(ldf(x + r * rs + c) + ldo(bias, c, 0.f), ldf(tx + r * trs + c) + ldo(tbias, c, 0.f),
                                 gy == nullptr ? 0.f : ldf(gy + r * gys + c), ldf(gt + r * gts + c), dz, dtz);
      stf(dx + r * C + c, dz);
      stf(dtx + r * C + c, dtz);
      acc_partial(db, k, C, c, first, dz);
      acc_partial(dtb, k, C, c, first, dtz);
    }
  }
}

// ---- gated residual -----------------------------------------------------------------------------------------

template <typename T>
__global__ void gated_fwd_kernel(const T* __restrict__ x, i64 rs, const T* __restrict__ gate, i64 rpg,
                                 const T* __restrict__ y, i64 ys, T* __restrict__ out, i64 R, i64 C) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < R * C; i += (i64)gridDim.x * blockDim.x) {
    const i64 r = i / C, c = i - r * C;
    float o, to;
    flowmap::gated_jvp_elem(ldf(x + r * rs + c), 0.f, ldf(flowmap::table_row(gate, r, rpg, C) + c), 0.f,
                            ldf(y + r * ys + c), 0.f, o, to);
    stf(out + i, o);
  }
}

template <typename T>
__global__ void gated_jvp_fwd_kernel(const T* __restrict__ x, i64 rs, const T* __restrict__ tx, i64 trs,
                                     const T* __restrict__ gate, i64 rpg, const T* __restrict__ tgate, i64 rptg,
                                     const T* __restrict__ y, i64 ys, const T* __restrict__ ty, i64 tys,
                                     T* __restrict__ out, T* __restrict__ tout, i64 R, i64 C) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < R * C; i += (i64)gridDim.x * blockDim.x) {
    const i64 r = i / C, c = i - r * C;
    float o, to;
    flowmap::gated_jvp_elem(ldf(x + r * rs + c), ldf(tx + r * trs + c), ldf(flowmap::table_row(gate, r, rpg, C) + c),
                            ldf(flowmap::table_row(tgate, r, rptg, C) + c), ldf(y + r * ys + c), ldf(ty + r * tys + c),
                            o, to);
    stf(out + i, o);
    stf(tout + i, to);
  }
}

template <typename T>
__global__ void gated_bwd_kernel(const T* __restrict__ gate, i64 rpg, const T* __restrict__ y, i64 ys,
                                 const T* __restrict__ go, i64 gos, T* __restrict__ dy, float* __restrict__ dg, i64 C,
                                 i64 rpc) {
  const i64 k = blockIdx.x;
  for (i64 r = k * rpc; r < (k + 1) * rpc; ++r) {
    const bool first = r == k * rpc;
    const T* gr = flowmap::table_row(gate, r, rpg, C);
    for (i64 c = threadIdx.x; c < C; c += blockDim.x) {
      float d, dt, dgv, dtg;
      flowmap::gated_jvp_bwd_elem(ldf(gr + c), 0.f, ldf(y + r * ys + c), 0.f, ldf(go + r * gos + c), 0.f, d, dt, dgv,
                                  dtg);
      stf(dy + r * C + c, d);
      acc_partial(dg, k, C, c, first, dgv);
    }
  }
}

template <typename T>
__global__ void gated_jvp_bwd_kernel(const T* __restrict__ gate, i64 rpg, const T* __restrict__ tgate, i64 rptg,
                                     const T* __restrict__ y, i64 ys, const T* __restrict__ ty, i64 tys,
                                     const T* __restrict__ go, i64 gos, const T* __restrict__ gto, i64 gtos,
                                     T* __restrict__ dy, T* __restrict__ dty, float* __restrict__ dg,
                                     float* __restrict__ dtg, i64 C, i64 rpc) {
  const i64 k = blockIdx.x;
  for (i64 r = k * rpc; r < (k + 1) * rpc; ++r) {
    const bool first = r == k * rpc;
    const T* gr = flowmap::table_row(gate, r, rpg, C);
    const T* tgr = flowmap::table_row(tgate, r, rptg, C);
    for (i64 c = threadIdx.x; c < C; c += blockDim.x) {
      float d, dt, dgv, dtgv;
      flowmap::gated_jvp_bwd_elem(ldf(gr + c), ldf(tgr + c), ldf(y + r * ys + c), ldf(ty + r * tys + c),
                                  go == nullptr ? 0.f : ldf(go + r * gos + c), ldf(gto + r * gtos + c), d, dt, dgv,
                                  dtgv);
      stf(dy + r * C + c, d);
      stf(dty + r * C + c, dt);
      acc_partial(dg, k, C, c, first, dgv);
      acc_partial(dtg, k, C, c, first, dtgv);
    }
  }
}

// ---- launch helpers -------------------------------------------------------------------------------------------

int row_threads(i64 C) { return C <= 256 ? 64 : (C <= 1024 ? 128 : 256); }

unsigned elem_blocks(i64 n) {
  i64 b = (n + 255) / 256;
  return (unsigned)(b < 1 ? 1 : (b > 65535 * 8 ? 65535 * 8 : b));
}

void check(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("flowmap_kernels._C_cuda.") + what + ": " +
                                                 cudaGetErrorString(e));
}

template <typename F>
void dispatch(int dtype, const char* what, F f) {
  switch (dtype) {
    case kF32: f(float{}); break;
    case kF16: f(__half{}); break;
    case kBF16: f(__nv_bfloat16{}); break;
    default: throw std::invalid_argument(std::string(what) + ": dtype code must be 0 (f32), 1 (f16) or 2 (bf16)");
  }
}

// Launch KERNEL<T> on (GRID, BLOCK) in the stream `s` for the dtype code `dtype` of the enclosing launcher
// (T names the element type inside the argument list), then raise any launch error as OP's.
#define FM_LAUNCH(OP, KERNEL, GRID, BLOCK, ...)      \
  dispatch(dtype, OP, [&](auto t) {                  \
    using T = decltype(t);                           \
    KERNEL<T><<<GRID, BLOCK, 0, s>>>(__VA_ARGS__);   \
  });                                                \
  check(OP)

template <typename T>
const T* P(ptr p) { return reinterpret_cast<const T*>(p); }
template <typename T>
T* W(ptr p) { return reinterpret_cast<T*>(p); }
inline float* FW(ptr p) { return reinterpret_cast<float*>(p); }
inline const float* FP(ptr p) { return reinterpret_cast<const float*>(p); }

}  // namespace

void norm_forward(ptr x, i64 rs, ptr scale, i64 rps, ptr shift, i64 rph, ptr y, ptr stats, i64 R, i64 C, float offset,
                  bool center, float eps, int dtype, cudaStream_t s) {
  if (R == 0) return;
  FM_LAUNCH("norm_forward", norm_fwd_kernel, (unsigned)R, row_threads(C), P<T>(x), rs, P<T>(scale), rps, P<T>(shift),
            rph, W<T>(y), FW(stats), C, offset, center, eps);
}

void norm_backward(ptr x, i64 rs, ptr scale, i64 rps, ptr stats, ptr gy, i64 gys, ptr dx, ptr ds, ptr dh, i64 R, i64 C,
                   float offset, bool center, i64 rpc, int dtype, cudaStream_t s) {
  if (R == 0) return;
  FM_LAUNCH("norm_backward", norm_bwd_kernel, (unsigned)(R / rpc), row_threads(C), P<T>(x), rs, P<T>(scale), rps,
            FP(stats), P<T>(gy), gys, W<T>(dx), FW(ds), FW(dh), C, offset, center, rpc);
}

void norm_jvp_forward(ptr x, i64 rs, ptr tx, i64 trs, ptr scale, i64 rps, ptr shift, i64 rph, ptr tscale, i64 rpts,
                      ptr tshift, i64 rpth, ptr y, ptr ty, ptr stats, i64 R, i64 C, float offset, bool center, float eps,
                      int dtype, cudaStream_t s) {
  if (R == 0) return;
  FM_LAUNCH("norm_jvp_forward", norm_jvp_fwd_kernel, (unsigned)R, row_threads(C), P<T>(x), rs, P<T>(tx), trs,
            P<T>(scale), rps, P<T>(shift), rph, P<T>(tscale), rpts, P<T>(tshift), rpth, W<T>(y), W<T>(ty), FW(stats),
            C, offset, center, eps);
}

void norm_jvp_backward(ptr x, i64 rs, ptr tx, i64 trs, ptr scale, i64 rps, ptr tscale, i64 rpts, ptr stats, ptr gy,
                       i64 gys, ptr gt, i64 gts, ptr dx, ptr dtx, ptr ds, ptr dh, ptr dts, ptr dth, i64 R, i64 C,
                       float offset, bool center, i64 rpc, int dtype, cudaStream_t s) {
  if (R == 0) return;
  FM_LAUNCH("norm_jvp_backward", norm_jvp_bwd_kernel, (unsigned)(R / rpc), row_threads(C), P<T>(x), rs, P<T>(tx), trs,
            P<T>(scale), rps, P<T>(tscale), rpts, FP(stats), P<T>(gy), gys, P<T>(gt), gts, W<T>(dx), W<T>(dtx),
            FW(ds), FW(dh), FW(dts), FW(dth), C, offset, center, rpc);
}

void gelu_forward(ptr x, i64 rs, ptr bias, ptr y, i64 R, i64 C, int dtype, cudaStream_t s) {
  if (R * C == 0) return;
  FM_LAUNCH("gelu_forward", gelu_fwd_kernel, elem_blocks(R * C), 256, P<T>(x), rs, P<T>(bias), W<T>(y), R, C);
}

void gelu_backward(ptr x, i64 rs, ptr bias, ptr gy, i64 gys, ptr dx, ptr db, i64 R, i64 C, i64 rpc, int dtype,
                   cudaStream_t s) {
  if (R * C == 0) return;
  FM_LAUNCH("gelu_backward", gelu_bwd_kernel, (unsigned)(R / rpc), row_threads(C), P<T>(x), rs, P<T>(bias), P<T>(gy),
            gys, W<T>(dx), FW(db), C, rpc);
}

void gelu_jvp_forward(ptr x, i64 rs, ptr tx, i64 trs, ptr bias, ptr tbias, ptr y, ptr ty, i64 R, i64 C, int dtype,
                      cudaStream_t s) {
  if (R * C == 0) return;
  FM_LAUNCH("gelu_jvp_forward", gelu_jvp_fwd_kernel, elem_blocks(R * C), 256, P<T>(x), rs, P<T>(tx), trs, P<T>(bias),
            P<T>(tbias), W<T>(y), W<T>(ty), R, C);
}

void gelu_jvp_backward(ptr x, i64 rs, ptr tx, i64 trs, ptr bias, ptr tbias, ptr gy, i64 gys, ptr gt, i64 gts, ptr dx,
                       ptr dtx, ptr db, ptr dtb, i64 R, i64 C, i64 rpc, int dtype, cudaStream_t s) {
  if (R * C == 0) return;
  FM_LAUNCH("gelu_jvp_backward", gelu_jvp_bwd_kernel, (unsigned)(R / rpc), row_threads(C), P<T>(x), rs, P<T>(tx), trs,
            P<T>(bias), P<T>(tbias), P<T>(gy), gys, P<T>(gt), gts, W<T>(dx), W<T>(dtx), FW(db), FW(dtb), C, rpc);
}

void gated_forward(ptr x, i64 rs, ptr gate, i64 rpg, ptr y, i64 ys, ptr out, i64 R, i64 C, int dtype, cudaStream_t s) {
  if (R * C == 0) return;
  FM_LAUNCH("gated_forward", gated_fwd_kernel, elem_blocks(R * C), 256, P<T>(x), rs, P<T>(gate), rpg, P<T>(y), ys,
            W<T>(out), R, C);
}

void gated_backward(ptr gate, i64 rpg, ptr y, i64 ys, ptr go, i64 gos, ptr dy, ptr dg, i64 R, i64 C, i64 rpc,
                    int dtype, cudaStream_t s) {
  if (R * C == 0) return;
  FM_LAUNCH("gated_backward", gated_bwd_kernel, (unsigned)(R / rpc), row_threads(C), P<T>(gate), rpg, P<T>(y), ys,
            P<T>(go), gos, W<T>(dy), FW(dg), C, rpc);
}

void gated_jvp_forward(ptr x, i64 rs, ptr tx, i64 trs, ptr gate, i64 rpg, ptr tgate, i64 rptg, ptr y, i64 ys, ptr ty,
                       i64 tys, ptr out, ptr tout, i64 R, i64 C, int dtype, cudaStream_t s) {
  if (R * C == 0) return;
  FM_LAUNCH("gated_jvp_forward", gated_jvp_fwd_kernel, elem_blocks(R * C), 256, P<T>(x), rs, P<T>(tx), trs,
            P<T>(gate), rpg, P<T>(tgate), rptg, P<T>(y), ys, P<T>(ty), tys, W<T>(out), W<T>(tout), R, C);
}

void gated_jvp_backward(ptr gate, i64 rpg, ptr tgate, i64 rptg, ptr y, i64 ys, ptr ty, i64 tys, ptr go, i64 gos,
                        ptr gto, i64 gtos, ptr dy, ptr dty, ptr dg, ptr dtg, i64 R, i64 C, i64 rpc, int dtype,
                        cudaStream_t s) {
  if (R * C == 0) return;
  FM_LAUNCH("gated_jvp_backward", gated_jvp_bwd_kernel, (unsigned)(R / rpc), row_threads(C), P<T>(gate), rpg,
            P<T>(tgate), rptg, P<T>(y), ys, P<T>(ty), tys, P<T>(go), gos, P<T>(gto), gtos, W<T>(dy), W<T>(dty),
            FW(dg), FW(dtg), C, rpc);
}

}  // namespace flowmap_cuda
