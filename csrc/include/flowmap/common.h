// Shared by the CUDA kernels (nvcc) and the CPU extension (g++): host/device qualifiers and fp32 helpers.
#pragma once
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
