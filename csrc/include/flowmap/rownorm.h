// Row norm (LayerNorm when `center`, RMSNorm otherwise) with modulation, its JVP and the backward through
// (y, ty): the per-row mathematics shared by csrc/cpu/ops.cpp and csrc/cuda/kernels.cu. All fp32.
//
//   xh = (x - mean) r, r = rsqrt(var + eps)       y  = xh s + a,     s = offset + scale
//   txh = r (tx - tmean - xh w), w = mean(xh tx)   ty = txh s + xh ts + ta
//   J v = r (v - [center] mean(v) - xh mean(v xh))          (symmetric Jacobian of xh)
//   g_xh = gy s + gt ts, g_txh = gt s
//   dtx = J g_txh,  dx = J(g_xh - r w g_txh) - r (mean(g_txh txh) xh + mean(g_txh xh) txh)
//   dscale = gy xh + gt txh, dshift = gy, dtscale = gt xh, dtshift = gt
// A pass computes row sums (NormFwdSums / NormBwdSums) with the *_accum functions; finish_* turns them
// into row scalars; the *_elem functions give each element's outputs.
//
// Huge rows: (x - mean)^2 overflows fp32 for |x| > ~1.8e19, which would give r = 0 (y = shift). The forward
// therefore works on the row divided by a power of two above its max |x| (inv = row_inv_scale(max |x|), exact):
// xs = x inv, mean_s = mean(xs), d = xs - mean_s, r_s = rsqrt(mean(d^2) + eps inv^2), w = r_s mean(d tx);
// then mean = mean_s / inv and r = r_s inv, so that xh = (x - mean) r = d r_s is unchanged. Rows with
// max |x| <= 1 (inv = 1) compute exactly as before; rows with an inf or NaN keep the plain arithmetic.
#pragma once
#include "common.h"

namespace flowmap {

struct NormStats {
  float mean, rstd, tmean, w;
};

// pass 0 of the forward: max |x| -> inv (1 for rows with max |x| <= 1)
FM_HD float row_inv_scale(float absmax) { return fm_inv_pow2_above(absmax); }
// pass 1: sum(x inv), sum(tx)  -> mean_s, tmean
FM_HD float finish_mean(float sum, int C, bool center) { return center ? sum / (float)C : 0.0f; }
// pass 2: sum((x inv - mean_s)^2) -> r_s ;  sum((x inv - mean_s) tx) -> w = r_s * sum / C
FM_HD float finish_rstd(float sum_sq, int C, float eps, float inv) {
  return fm_rsqrt(sum_sq / (float)C + eps * inv * inv);
}
FM_HD float finish_w(float sum_xc_tx, float rstd_s, int C) { return rstd_s * sum_xc_tx / (float)C; }
// the stored row statistics: mean = mean_s / inv, r = r_s inv
FM_HD void finish_unscale(NormStats& st, float inv) {
  st.mean = st.mean / inv;
  st.rstd = st.rstd * inv;
}

FM_HD float norm_mod(float offset, const float* v) { return v == nullptr ? offset : offset + *v; }

FM_HD void norm_fwd_elem(float x, float s, float a, const NormStats& st, float& y) {
  float xh = (x - st.mean) * st.rstd;
  y = xh * s + a;
}

FM_HD void norm_jvp_elem(float x, float tx, float s, float a, float ts, float ta, const NormStats& st, float& y,
                         float& ty) {
  float xh = (x - st.mean) * st.rstd;
  float txh = st.rstd * (tx - st.tmean - xh * st.w);
  y = xh * s + a;
  ty = txh * s + xh * ts + ta;
}

// ---- plain backward: sums of g_xh and g_xh xh ----
struct NormBwdSums1 {
  float g, gx;
};

FM_HD void norm_bwd_accum(float x, float s, float gy, const NormStats& st, NormBwdSums1& acc) {
  float xh = (x - st.mean) * st.rstd;
  float g = gy * s;
  acc.g += g;
  acc.gx += g * xh;
}

// dx; dscale contribution (gy xh)
FM_HD void norm_bwd_elem(float x, float s, float gy, const NormStats& st, const NormBwdSums1& sum, int C, bool center,
                         float& dx, float& dscale) {
  float xh = (x - st.mean) * st.rstd;
  float inv = 1.0f / (float)C;
  float g = gy * s;
  dx = st.rstd * (g - (center ? sum.g * inv : 0.0f) - xh * sum.gx * inv);
  dscale = gy * xh;
}

// ---- backward through (y, ty): five row sums ----
struct NormBwdSums {
  float gxh, gxh_xh, gt, gt_xh, gt_txh;  // sums of g_xh, g_xh xh, g_txh, g_txh xh, g_txh txh
};

FM_HD void norm_jvp_bwd_accum(float x, float tx, float s, float ts, float gy, float gt, const NormStats& st,
                              NormBwdSums& acc) {
  float xh = (x - st.mean) * st.rstd;
  float txh = st.rstd * (tx - st.tmean - xh * st.w);
  float g_xh = gy * s + gt * ts;
  float g_txh = gt * s;
  acc.gxh += g_xh;
  acc.gxh_xh += g_xh * xh;
  acc.gt += g_txh;
  acc.gt_xh += g_txh * xh;
  acc.gt_txh += g_txh * txh;
}

// dx, dtx; contributions to dscale (gy xh + gt txh) and dtscale (gt xh)
FM_HD void norm_jvp_bwd_elem(float x, float tx, float s, float ts, float gy, float gt, const NormStats& st,
                             const NormBwdSums& sum, int C, bool center, float& dx, float& dtx, float& dscale,
                             float& dtscale) {
  float inv = 1.0f / (float)C;
  float r = st.rstd;
  float xh = (x - st.mean) * r;
  float txh = r * (tx - st.tmean - xh * st.w);
  float g_xh = gy * s + gt * ts;
  float g_txh = gt * s;
  float rw = r * st.w;
  float v = g_xh - rw * g_txh;
  float mean_v = center ? (sum.gxh - rw * sum.gt) * inv : 0.0f;
  float mean_vx = (sum.gxh_xh - rw * sum.gt_xh) * inv;
  dx = r * (v - mean_v - xh * mean_vx) - r * (sum.gt_txh * inv * xh + sum.gt_xh * inv * txh);
  dtx = r * (g_txh - (center ? sum.gt * inv : 0.0f) - xh * sum.gt_xh * inv);
  dscale = gy * xh + gt * txh;
  dtscale = gt * xh;
}

}  // namespace flowmap
