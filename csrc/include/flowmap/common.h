// Shared by the CUDA kernels (nvcc) and the CPU extension (g++): host/device qualifiers and fp32 helpers.
#pragma once
#include <cfloat>
#include <cmath>

#if defined(__CUDACC__)
#define FM_HD __host__ __device__ __forceinline__
#else
#define FM_HD inline
#endif

namespace flowmap {

FM_HD float fm_rsqrt(float v) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(v);
#else
  return 1.0f / std::sqrt(v);
#endif
}

// 2^-e for the e with max|x| < 2^e (e <= 126, so that the result stays a normal float) when 1 < absmax <= FLT_MAX;
// 1 otherwise (small, infinite or NaN rows keep the plain arithmetic). Multiplying by it is exact.
FM_HD float fm_inv_pow2_above(float absmax) {
  if (!(absmax > 1.0f) || !(absmax <= FLT_MAX)) return 1.0f;
  int e;
#if defined(__CUDA_ARCH__)
  frexpf(absmax, &e);
  return ldexpf(1.0f, e > 126 ? -126 : -e);
#else
  std::frexp(absmax, &e);
  return std::ldexp(1.0f, e > 126 ? -126 : -e);
#endif
}

FM_HD float fm_tanh(float v) {
#if defined(__CUDA_ARCH__)
  return tanhf(v);
#else
  return std::tanh(v);
#endif
}

// Row r of a (M, C) per-channel table shared by rows_per consecutive rows; nullptr when absent.
template <typename T>
FM_HD const T* table_row(const T* table, long long r, long long rows_per, long long C) {
  return table == nullptr ? nullptr : table + (r / rows_per) * C;
}

}  // namespace flowmap
