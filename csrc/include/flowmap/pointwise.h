// GELU (tanh approximation) with a fused bias, and the gated residual: element formulas shared by the CPU
// extension and the CUDA kernels (fp32).
//   z = x + b, u = k (z + a z^3), t = tanh(u), y = 0.5 z (1 + t)
//   y'  = 0.5 (1 + t) + 0.5 z (1 - t^2) u',  u' = k (1 + 3 a z^2)
//   y'' = (1 - t^2) (u' + 0.5 z (6 k a z - 2 t u'^2))
//   JVP: ty = y' (tx + tb); backward through (y, ty): dz = gy y' + gt tz y'', dtz = gt y'
//   gated: out = x + g y, tout = tx + tg y + g ty; dy = go g + gto tg, dty = gto g, dg = go y + gto ty,
//   dtg = gto y (dx = go and dtx = gto need no kernel)
#pragma once
#include "common.h"

namespace flowmap {

constexpr float kGeluK = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

FM_HD float gelu_value(float z) {
  float u = kGeluK * (z + kGeluA * z * z * z);
  return 0.5f * z * (1.0f + fm_tanh(u));
}

FM_HD void gelu_parts(float z, float& y, float& d1, float& d2) {
  float u = kGeluK * (z + kGeluA * z * z * z);
  float t = fm_tanh(u);
  float du = kGeluK * (1.0f + 3.0f * kGeluA * z * z);
  float sech2 = 1.0f - t * t;
  y = 0.5f * z * (1.0f + t);
  d1 = 0.5f * (1.0f + t) + 0.5f * z * sech2 * du;
  d2 = sech2 * (du + 0.5f * z * (6.0f * kGeluK * kGeluA * z - 2.0f * t * du * du));
}

FM_HD void gelu_jvp_elem(float z, float tz, float& y, float& ty) {
  float d1, d2;
  gelu_parts(z, y, d1, d2);
  ty = d1 * tz;
}

FM_HD void gelu_bwd_elem(float z, float gy, float& dz) {
  float y, d1, d2;
  gelu_parts(z, y, d1, d2);
  dz = gy * d1;
}

FM_HD void gelu_jvp_bwd_elem(float z, float tz, float gy, float gt, float& dz, float& dtz) {
  float y, d1, d2;
  gelu_parts(z, y, d1, d2);
  dz = gy * d1 + gt * tz * d2;
  dtz = gt * d1;
}

FM_HD void gated_jvp_elem(float x, float tx, float g, float tg, float y, float ty, float& out, float& tout) {
  out = x + g * y;
  tout = tx + tg * y + g * ty;
}

FM_HD void gated_jvp_bwd_elem(float g, float tg, float y, float ty, float go, float gto, float& dy, float& dty,
                              float& dg, float& dtg) {
  dy = go * g + gto * tg;
  dty = gto * g;
  dg = go * y + gto * ty;
  dtg = gto * y;
}

}  // namespace flowmap
