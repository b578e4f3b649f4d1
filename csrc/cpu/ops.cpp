// CPU extension (torch.utils.cpp_extension): the same row mathematics as the CUDA kernels
// (csrc/include/flowmap/*.h), on torch tensors. Signatures match flowmap_kernels/ops/fused_torch.py.
// x-like operands are (R, C) with unit column stride (any row stride); per-channel tables are contiguous
// (M, C), row r using table row r / (R / M); parameter gradients are fp32 partial sums over chunks of
// `rpc` consecutive rows, shape (R / rpc, C). float32 / float16 / bfloat16, fp32 accumulation.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "flowmap/pointwise.h"
#include "flowmap/rownorm.h"

using at::Tensor;
using flowmap::NormStats;
using OptT = std::optional<Tensor>;

namespace {

#define FM_DISPATCH(DT, NAME, ...)                                                        \
  switch (DT) {                                                                           \
    case at::kFloat: { using T = float; __VA_ARGS__; break; }                             \
    case at::kHalf: { using T = at::Half; __VA_ARGS__; break; }                           \
    case at::kBFloat16: { using T = at::BFloat16; __VA_ARGS__; break; }                   \
    default: TORCH_CHECK(false, NAME, ": dtype ", DT, " is not supported (float32, float16, bfloat16)"); \
  }

void check_rows(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), op, ": ", name,
              " must have shape (", x.size(0), ", ", x.size(1), "), got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name, " needs unit stride along C");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(), " != x dtype ",
              x.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
}

// A (M, C) table (contiguous) or nullptr; returns rows per table row in rows_per.
template <typename T>
const T* table(const char* op, const char* name, const OptT& t, const Tensor& x, long long& rows_per) {
  rows_per = 1;
  if (!t.has_value() || !t->defined()) return nullptr;
  const Tensor& m = *t;
  TORCH_CHECK(m.dim() == 2 && m.size(1) == x.size(1) && m.size(0) > 0 && x.size(0) % m.size(0) == 0, op, ": ", name,
              " must be a (M, ", x.size(1), ") table with M dividing ", x.size(0), ", got ", m.sizes());
  TORCH_CHECK(m.is_contiguous() && m.scalar_type() == x.scalar_type() && m.device().is_cpu(), op, ": ", name,
              " must be a contiguous CPU tensor of x's dtype");
  rows_per = x.size(0) / m.size(0);
  return m.data_ptr<T>();
}

template <typename T>
inline float ld(const T* p, long long i) { return static_cast<float>(p[i]); }

inline float ldo(const float* p) { return p == nullptr ? 0.0f : *p; }

Tensor partial(const Tensor& x, long long rpc, bool present) {
  auto opt = x.options().dtype(at::kFloat);
  if (!present) return at::empty({0}, opt);
  TORCH_CHECK(rpc > 0 && x.size(0) % rpc == 0, "rows per chunk ", rpc, " must divide the row count ", x.size(0));
  return at::zeros({x.size(0) / rpc, x.size(1)}, opt);
}

template <typename F>
void for_chunks(long long n, F f) {
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) f(k);
  });
}

// f(r) for every row r, rows in parallel (the passes without a reduction over rows).
template <typename F>
void for_rows(long long R, F f) {
  at::parallel_for(0, R, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) f(r);
  });
}

// f(k, r) for every row r of every chunk k of `rpc` consecutive rows, chunks in parallel (the backward
// passes: parameter gradients are summed per chunk, so one chunk runs on one thread).
template <typename F>
void for_chunk_rows(long long R, long long rpc, F f) {
  for_chunks(R / rpc, [&](long long k) {
    for (long long r = k * rpc; r < (k + 1) * rpc; ++r) f(k, r);
  });
}

// An optional output gradient (absent = zero: nothing is read): the tensor, else `fallback`, which only
// stands in for the shape checks and strides.
const Tensor& grad_or(const OptT& g, const Tensor& fallback, bool& present) {
  present = g.has_value() && g->defined();
  return present ? *g : fallback;
}

// ---------------------------------------------------------------------------------------------------
// row norm

std::tuple<Tensor, Tensor> norm_forward(const Tensor& x, const OptT& scale, const OptT& shift, double offset,
                                        bool center, double eps) {
  check_rows("norm_forward", "x", x, x);
  const long long R = x.size(0), C = x.size(1), rs = x.stride(0);
  Tensor y = at::empty({R, C}, x.options());
  Tensor stats = at::empty({R, 2}, x.options().dtype(at::kFloat));
  float* st = stats.data_ptr<float>();
  const float off = (float)offset;
  FM_DISPATCH(x.scalar_type(), "norm_forward", {
    long long rps, rph;
    const T* S = table<T>("norm_forward", "scale", scale, x, rps);
    const T* H = table<T>("norm_forward", "shift", shift, x, rph);
    const T* X = x.data_ptr<T>();
    T* Y = y.data_ptr<T>();
    for_rows(R, [&](long long r) {
      const T* xr = X + r * rs;
      float amax = 0.f, sum = 0.f;
      for (long long c = 0; c < C; ++c) amax = std::fmax(amax, std::fabs(ld(xr, c)));
      const float inv = flowmap::row_inv_scale(amax);
      for (long long c = 0; c < C; ++c) sum += ld(xr, c) * inv;
      NormStats s{flowmap::finish_mean(sum, (int)C, center), 0.f, 0.f, 0.f};
      float sq = 0.f;
      for (long long c = 0; c < C; ++c) { float d = ld(xr, c) * inv - s.mean; sq += d * d; }
      s.rstd = flowmap::finish_rstd(sq, (int)C, (float)eps, inv);
      flowmap::finish_unscale(s, inv);
      const T* sr = flowmap::table_row(S, r, rps, C);
      const T* hr = flowmap::table_row(H, r, rph, C);
      for (long long c = 0; c < C; ++c) {
        float yv;
        flowmap::norm_fwd_elem(ld(xr, c), sr ? off + ld(sr, c) : off, hr ? ld(hr, c) : 0.f, s, yv);
        Y[r * C + c] = static_cast<T>(yv);
      }
      st[2 * r] = s.mean;
      st[2 * r + 1] = s.rstd;
    });
  });
  return {y, stats};
}

std::tuple<Tensor, Tensor, Tensor> norm_backward(const Tensor& x, const OptT& scale, const Tensor& stats,
                                                 const Tensor& gy, double offset, bool center, int64_t rpc,
                                                 bool has_shift) {
  check_rows("norm_backward", "x", x, x);
  check_rows("norm_backward", "gy", gy, x);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == x.size(0) && stats.size(1) >= 2 && stats.is_contiguous() &&
              stats.scalar_type() == at::kFloat, "norm_backward: stats must be contiguous float32 (R, >=2)");
  const long long R = x.size(0), C = x.size(1), rs = x.stride(0), gs = gy.stride(0), sw = stats.size(1);
  Tensor dx = at::empty({R, C}, x.options());
  const bool has_scale = scale.has_value() && scale->defined();
  Tensor ds = partial(x, rpc, has_scale), dh = partial(x, rpc, has_shift);
  float* DS = has_scale ? ds.data_ptr<float>() : nullptr;
  float* DH = has_shift ? dh.data_ptr<float>() : nullptr;
  const float* st = stats.data_ptr<float>();
  const float off = (float)offset;
  FM_DISPATCH(x.scalar_type(), "norm_backward", {
    long long rps;
    const T* S = table<T>("norm_backward", "scale", scale, x, rps);
    const T *X = x.data_ptr<T>(), *G = gy.data_ptr<T>();
    T* DX = dx.data_ptr<T>();
    for_chunk_rows(R, rpc, [&](long long k, long long r) {
      const T *xr = X + r * rs, *gr = G + r * gs;
      const T* sr = flowmap::table_row(S, r, rps, C);
      NormStats s{st[r * sw], st[r * sw + 1], 0.f, 0.f};
      flowmap::NormBwdSums1 sum{0.f, 0.f};
      for (long long c = 0; c < C; ++c)
        flowmap::norm_bwd_accum(ld(xr, c), sr ? off + ld(sr, c) : off, ld(gr, c), s, sum);
      for (long long c = 0; c < C; ++c) {
        float d, dsc;
        float g = ld(gr, c);
        flowmap::norm_bwd_elem(ld(xr, c), sr ? off + ld(sr, c) : off, g, s, sum, (int)C, center, d, dsc);
        DX[r * C + c] = static_cast<T>(d);
        if (DS) DS[k * C + c] += dsc;
        if (DH) DH[k * C + c] += g;
      }
    });
  });
  return {dx, ds, dh};
}

std::tuple<Tensor, Tensor, Tensor> norm_jvp_forward(const Tensor& x, const Tensor& tx, const OptT& scale,
                                                    const OptT& shift, const OptT& tscale, const OptT& tshift,
                                                    double offset, bool center, double eps) {
  check_rows("norm_jvp_forward", "x", x, x);
  check_rows("norm_jvp_forward", "tx", tx, x);
  const long long R = x.size(0), C = x.size(1), rs = x.stride(0), ts_ = tx.stride(0);
  Tensor y = at::empty({R, C}, x.options()), ty = at::empty({R, C}, x.options());
  Tensor stats = at::empty({R, 4}, x.options().dtype(at::kFloat));
  float* st = stats.data_ptr<float>();
  const float off = (float)offset;
  FM_DISPATCH(x.scalar_type(), "norm_jvp_forward", {
    long long rps, rph, rpts, rpth;
    const T* S = table<T>("norm_jvp_forward", "scale", scale, x, rps);
    const T* H = table<T>("norm_jvp_forward", "shift", shift, x, rph);
    const T* TS = table<T>("norm_jvp_forward", "tscale", tscale, x, rpts);
    const T* TH = table<T>("norm_jvp_forward", "tshift", tshift, x, rpth);
    const T *X = x.data_ptr<T>(), *TX = tx.data_ptr<T>();
    T *Y = y.data_ptr<T>(), *TY = ty.data_ptr<T>();
    for_rows(R, [&](long long r) {
      const T *xr = X + r * rs, *txr = TX + r * ts_;
      float amax = 0.f, sx = 0.f, stx = 0.f;
      for (long long c = 0; c < C; ++c) amax = std::fmax(amax, std::fabs(ld(xr, c)));
      const float inv = flowmap::row_inv_scale(amax);
      for (long long c = 0; c < C; ++c) { sx += ld(xr, c) * inv; stx += ld(txr, c); }
      NormStats s{flowmap::finish_mean(sx, (int)C, center), 0.f, flowmap::finish_mean(stx, (int)C, center), 0.f};
      float sq = 0.f, sxt = 0.f;
      for (long long c = 0; c < C; ++c) {
        float d = ld(xr, c) * inv - s.mean;
        sq += d * d;
        sxt += d * ld(txr, c);
      }
      s.rstd = flowmap::finish_rstd(sq, (int)C, (float)eps, inv);
      s.w = flowmap::finish_w(sxt, s.rstd, (int)C);
      flowmap::finish_unscale(s, inv);
      const T* sr = flowmap::table_row(S, r, rps, C);
      const T* hr = flowmap::table_row(H, r, rph, C);
      const T* tsr = flowmap::table_row(TS, r, rpts, C);
      const T* thr = flowmap::table_row(TH, r, rpth, C);
      for (long long c = 0; c < C; ++c) {
        float yv, tyv;
        flowmap::norm_jvp_elem(ld(xr, c), ld(txr, c), sr ? off + ld(sr, c) : off, hr ? ld(hr, c) : 0.f,
                               tsr ? ld(tsr, c) : 0.f, thr ? ld(thr, c) : 0.f, s, yv, tyv);
        Y[r * C + c] = static_cast<T>(yv);
        TY[r * C + c] = static_cast<T>(tyv);
      }
      st[4 * r] = s.mean; st[4 * r + 1] = s.rstd; st[4 * r + 2] = s.tmean; st[4 * r + 3] = s.w;
    });
  });
  return {y, ty, stats};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> norm_jvp_backward(
    const Tensor& x, const Tensor& tx, const OptT& scale, const OptT& tscale, const Tensor& stats, const OptT& gy_,
    const Tensor& gt, double offset, bool center, int64_t rpc, bool has_shift) {
  const char* op = "norm_jvp_backward";
  check_rows(op, "x", x, x);
  check_rows(op, "tx", tx, x);
  bool has_gy;
  const Tensor& gy = grad_or(gy_, gt, has_gy);
  check_rows(op, "gy", gy, x);
  check_rows(op, "gt", gt, x);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == x.size(0) && stats.size(1) == 4 && stats.is_contiguous() &&
              stats.scalar_type() == at::kFloat, op, ": stats must be contiguous float32 (R, 4)");
  const long long R = x.size(0), C = x.size(1);
  const long long rs = x.stride(0), trs = tx.stride(0), gs = gy.stride(0), gts = gt.stride(0);
  Tensor dx = at::empty({R, C}, x.options()), dtx = at::empty({R, C}, x.options());
  const bool has_scale = scale.has_value() && scale->defined();
  Tensor ds = partial(x, rpc, has_scale), dh = partial(x, rpc, has_shift);
  Tensor dts = partial(x, rpc, has_scale), dth = partial(x, rpc, has_shift);
  float* DS = has_scale ? ds.data_ptr<float>() : nullptr;
  float* DTS = has_scale ? dts.data_ptr<float>() : nullptr;
  float* DH = has_shift ? dh.data_ptr<float>() : nullptr;
  float* DTH = has_shift ? dth.data_ptr<float>() : nullptr;
  const float* st = stats.data_ptr<float>();
  const float off = (float)offset;
  FM_DISPATCH(x.scalar_type(), op, {
    long long rps, rpts;
    const T* S = table<T>(op, "scale", scale, x, rps);
    const T* TS = table<T>(op, "tscale", tscale, x, rpts);
    const T *X = x.data_ptr<T>(), *TX = tx.data_ptr<T>(), *GT = gt.data_ptr<T>();
    const T* GY = has_gy ? gy.data_ptr<T>() : nullptr;
    T *DX = dx.data_ptr<T>(), *DTX = dtx.data_ptr<T>();
    for_chunk_rows(R, rpc, [&](long long k, long long r) {
      const T *xr = X + r * rs, *txr = TX + r * trs, *gtr = GT + r * gts;
      const T* gyr = GY ? GY + r * gs : nullptr;
      const T* sr = flowmap::table_row(S, r, rps, C);
      const T* tsr = flowmap::table_row(TS, r, rpts, C);
      NormStats s{st[4 * r], st[4 * r + 1], st[4 * r + 2], st[4 * r + 3]};
      flowmap::NormBwdSums sum{0.f, 0.f, 0.f, 0.f, 0.f};
      for (long long c = 0; c < C; ++c)
        flowmap::norm_jvp_bwd_accum(ld(xr, c), ld(txr, c), sr ? off + ld(sr, c) : off, tsr ? ld(tsr, c) : 0.f,
                                    gyr ? ld(gyr, c) : 0.f, ld(gtr, c), s, sum);
      for (long long c = 0; c < C; ++c) {
        float d, dt, dsc, dtsc;
        float g = gyr ? ld(gyr, c) : 0.f, gtv = ld(gtr, c);
        flowmap::norm_jvp_bwd_elem(ld(xr, c), ld(txr, c), sr ? off + ld(sr, c) : off, tsr ? ld(tsr, c) : 0.f, g,
                                   gtv, s, sum, (int)C, center, d, dt, dsc, dtsc);
        DX[r * C + c] = static_cast<T>(d);
        DTX[r * C + c] = static_cast<T>(dt);
        if (DS) { DS[k * C + c] += dsc; DTS[k * C + c] += dtsc; }
        if (DH) { DH[k * C + c] += g; DTH[k * C + c] += gtv; }
      }
    });
  });
  return {dx, dtx, ds, dh, dts, dth};
}

// ---------------------------------------------------------------------------------------------------
// GELU (tanh) with fused bias

Tensor gelu_forward(const Tensor& x, const OptT& bias) {
  check_rows("gelu_forward", "x", x, x);
  const long long R = x.size(0), C = x.size(1), rs = x.stride(0);
  Tensor y = at::empty({R, C}, x.options());
  FM_DISPATCH(x.scalar_type(), "gelu_forward", {
    long long rpb;
    const T* B = table<T>("gelu_forward", "bias", bias, x, rpb);
    const T* X = x.data_ptr<T>();
    T* Y = y.data_ptr<T>();
    for_rows(R, [&](long long r) {
      const T* br = flowmap::table_row(B, r, rpb, C);
      for (long long c = 0; c < C; ++c)
        Y[r * C + c] = static_cast<T>(flowmap::gelu_value(ld(X + r * rs, c) + (br ? ld(br, c) : 0.f)));
    });
  });
  return y;
}

std::tuple<Tensor, Tensor> gelu_backward(const Tensor& x, const OptT& bias, const Tensor& gy, int64_t rpc) {
  check_rows("gelu_backward", "x", x, x);
  check_rows("gelu_backward", "gy", gy, x);
  const long long R = x.size(0), C = x.size(1), rs = x.stride(0), gs = gy.stride(0);
  Tensor dx = at::empty({R, C}, x.options());
  const bool has_bias = bias.has_value() && bias->defined();
  Tensor db = partial(x, rpc, has_bias);
  float* DB = has_bias ? db.data_ptr<float>() : nullptr;
  FM_DISPATCH(x.scalar_type(), "gelu_backward", {
    long long rpb;
    const T* B = table<T>("gelu_backward", "bias", bias, x, rpb);
    const T *X = x.data_ptr<T>(), *G = gy.data_ptr<T>();
    T* DX = dx.data_ptr<T>();
    for_chunk_rows(R, rpc, [&](long long k, long long r) {
      const T* br = flowmap::table_row(B, r, rpb, C);
      for (long long c = 0; c < C; ++c) {
        float dz;
        flowmap::gelu_bwd_elem(ld(X + r * rs, c) + (br ? ld(br, c) : 0.f), ld(G + r * gs, c), dz);
        DX[r * C + c] = static_cast<T>(dz);
        if (DB) DB[k * C + c] += dz;
      }
    });
  });
  return {dx, db};
}

std::tuple<Tensor, Tensor> gelu_jvp_forward(const Tensor& x, const Tensor& tx, const OptT& bias, const OptT& tbias) {
  check_rows("gelu_jvp_forward", "x", x, x);
  check_rows("gelu_jvp_forward", "tx", tx, x);
  const long long R = x.size(0), C = x.size(1), rs = x.stride(0), trs = tx.stride(0);
  Tensor y = at::empty({R, C}, x.options()), ty = at::empty({R, C}, x.options());
  FM_DISPATCH(x.scalar_type(), "gelu_jvp_forward", {
    long long rpb, rptb;
    const T* B = table<T>("gelu_jvp_forward", "bias", bias, x, rpb);
    const T* TB = table<T>("gelu_jvp_forward", "tbias", tbias, x, rptb);
    const T *X = x.data_ptr<T>(), *TX = tx.data_ptr<T>();
    T *Y = y.data_ptr<T>(), *TY = ty.data_ptr<T>();
    for_rows(R, [&](long long r) {
      const T* br = flowmap::table_row(B, r, rpb, C);
      const T* tbr = flowmap::table_row(TB, r, rptb, C);
      for (long long c = 0; c < C; ++c) {
        float yv, tyv;
        flowmap::gelu_jvp_elem(ld(X + r * rs, c) + (br ? ld(br, c) : 0.f),
                               ld(TX + r * trs, c) + (tbr ? ld(tbr, c) : 0.f), yv, tyv);
        Y[r * C + c] = static_cast<T>(yv);
        TY[r * C + c] = static_cast<T>(tyv);
      }
    });
  });
  return {y, ty};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gelu_jvp_backward(const Tensor& x, const Tensor& tx, const OptT& bias,
                                                             const OptT& tbias, const OptT& gy_, const Tensor& gt,
                                                             int64_t rpc) {
  const char* op = "gelu_jvp_backward";
  check_rows(op, "x", x, x);
  check_rows(op, "tx", tx, x);
  bool has_gy;
  const Tensor& gy = grad_or(gy_, gt, has_gy);
  check_rows(op, "gy", gy, x);
  check_rows(op, "gt", gt, x);
  const long long R = x.size(0), C = x.size(1);
  const long long rs = x.stride(0), trs = tx.stride(0), gs = gy.stride(0), gts = gt.stride(0);
  Tensor dx = at::empty({R, C}, x.options()), dtx = at::empty({R, C}, x.options());
  const bool has_bias = bias.has_value() && bias->defined();
  Tensor db = partial(x, rpc, has_bias), dtb = partial(x, rpc, has_bias);
  float* DB = has_bias ? db.data_ptr<float>() : nullptr;
  float* DTB = has_bias ? dtb.data_ptr<float>() : nullptr;
  FM_DISPATCH(x.scalar_type(), op, {
    long long rpb, rptb;
    const T* B = table<T>(op, "bias", bias, x, rpb);
    const T* TB = table<T>(op, "tbias", tbias, x, rptb);
    const T *X = x.data_ptr<T>(), *TX = tx.data_ptr<T>(), *GT = gt.data_ptr<T>();
    const T* GY = has_gy ? gy.data_ptr<T>() : nullptr;
    T *DX = dx.data_ptr<T>(), *DTX = dtx.data_ptr<T>();
    for_chunk_rows(R, rpc, [&](long long k, long long r) {
      const T* br = flowmap::table_row(B, r, rpb, C);
      const T* tbr = flowmap::table_row(TB, r, rptb, C);
      for (long long c = 0; c < C; ++c) {
        float dz, dtz;
        flowmap::gelu_jvp_bwd_elem(ld(X + r * rs, c) + (br ? ld(br, c) : 0.f),
                                   ld(TX + r * trs, c) + (tbr ? ld(tbr, c) : 0.f), GY ? ld(GY + r * gs, c) : 0.f,
                                   ld(GT + r * gts, c), dz, dtz);
        DX[r * C + c] = static_cast<T>(dz);
        DTX[r * C + c] = static_cast<T>(dtz);
        if (DB) { DB[k * C + c] += dz; DTB[k * C + c] += dtz; }
      }
    });
  });
  return {dx, dtx, db, dtb};
}

// ---------------------------------------------------------------------------------------------------
// gated residual

Tensor gated_forward(const Tensor& x, const Tensor& gate, const Tensor& y) {
  check_rows("gated_forward", "x", x, x);
  check_rows("gated_forward", "y", y, x);
  const long long R = x.size(0), C = x.size(1), rs = x.stride(0), ys = y.stride(0);
  Tensor out = at::empty({R, C}, x.options());
  FM_DISPATCH(x.scalar_type(), "gated_forward", {
    long long rpg;
    const T* Gt = table<T>("gated_forward", "gate", gate, x, rpg);
    const T *X = x.data_ptr<T>(), *Yp = y.data_ptr<T>();
    T* O = out.data_ptr<T>();
    for_rows(R, [&](long long r) {
      const T* gr = flowmap::table_row(Gt, r, rpg, C);
      for (long long c = 0; c < C; ++c) {
        float o, to;
        flowmap::gated_jvp_elem(ld(X + r * rs, c), 0.f, ld(gr, c), 0.f, ld(Yp + r * ys, c), 0.f, o, to);
        O[r * C + c] = static_cast<T>(o);
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> gated_backward(const Tensor& gate, const Tensor& y, const Tensor& go, int64_t rpc) {
  check_rows("gated_backward", "go", go, y);
  check_rows("gated_backward", "y", y, y);
  const long long R = y.size(0), C = y.size(1), ys = y.stride(0), gs = go.stride(0);
  Tensor dy = at::empty({R, C}, y.options());
  Tensor dg = partial(y, rpc, true);
  float* DG = dg.data_ptr<float>();
  FM_DISPATCH(y.scalar_type(), "gated_backward", {
    long long rpg;
    const T* Gt = table<T>("gated_backward", "gate", gate, y, rpg);
    const T *Yp = y.data_ptr<T>(), *GO = go.data_ptr<T>();
    T* DY = dy.data_ptr<T>();
    for_chunk_rows(R, rpc, [&](long long k, long long r) {
      const T* gr = flowmap::table_row(Gt, r, rpg, C);
      for (long long c = 0; c < C; ++c) {
        float d, dt, dgv, dtg;
        flowmap::gated_jvp_bwd_elem(ld(gr, c), 0.f, ld(Yp + r * ys, c), 0.f, ld(GO + r * gs, c), 0.f, d, dt, dgv,
                                    dtg);
        DY[r * C + c] = static_cast<T>(d);
        DG[k * C + c] += dgv;
      }
    });
  });
  return {dy, dg};
}

std::tuple<Tensor, Tensor> gated_jvp_forward(const Tensor& x, const Tensor& tx, const Tensor& gate,
                                             const Tensor& tgate, const Tensor& y, const Tensor& ty) {
  const char* op = "gated_jvp_forward";
  check_rows(op, "x", x, x);
  check_rows(op, "tx", tx, x);
  check_rows(op, "y", y, x);
  check_rows(op, "ty", ty, x);
  const long long R = x.size(0), C = x.size(1);
  const long long rs = x.stride(0), trs = tx.stride(0), ys = y.stride(0), tys = ty.stride(0);
  Tensor out = at::empty({R, C}, x.options()), tout = at::empty({R, C}, x.options());
  FM_DISPATCH(x.scalar_type(), op, {
    long long rpg, rptg;
    const T* Gt = table<T>(op, "gate", gate, x, rpg);
    const T* TG = table<T>(op, "tgate", tgate, x, rptg);
    const T *X = x.data_ptr<T>(), *TX = tx.data_ptr<T>(), *Yp = y.data_ptr<T>(), *TYp = ty.data_ptr<T>();
    T *O = out.data_ptr<T>(), *TO = tout.data_ptr<T>();
    for_rows(R, [&](long long r) {
      const T* gr = flowmap::table_row(Gt, r, rpg, C);
      const T* tgr = flowmap::table_row(TG, r, rptg, C);
      for (long long c = 0; c < C; ++c) {
        float o, to;
        flowmap::gated_jvp_elem(ld(X + r * rs, c), ld(TX + r * trs, c), ld(gr, c), ld(tgr, c), ld(Yp + r * ys, c),
                                ld(TYp + r * tys, c), o, to);
        O[r * C + c] = static_cast<T>(o);
        TO[r * C + c] = static_cast<T>(to);
      }
    });
  });
  return {out, tout};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gated_jvp_backward(const Tensor& gate, const Tensor& tgate,
                                                              const Tensor& y, const Tensor& ty, const OptT& go_,
                                                              const Tensor& gto, int64_t rpc) {
  const char* op = "gated_jvp_backward";
  check_rows(op, "y", y, y);
  check_rows(op, "ty", ty, y);
  bool has_go;
  const Tensor& go = grad_or(go_, gto, has_go);
  check_rows(op, "go", go, y);
  check_rows(op, "gto", gto, y);
  const long long R = y.size(0), C = y.size(1);
  const long long ys = y.stride(0), tys = ty.stride(0), gs = go.stride(0), gts = gto.stride(0);
  Tensor dy = at::empty({R, C}, y.options()), dty = at::empty({R, C}, y.options());
  Tensor dg = partial(y, rpc, true), dtg = partial(y, rpc, true);
  float *DG = dg.data_ptr<float>(), *DTG = dtg.data_ptr<float>();
  FM_DISPATCH(y.scalar_type(), op, {
    long long rpg, rptg;
    const T* Gt = table<T>(op, "gate", gate, y, rpg);
    const T* TG = table<T>(op, "tgate", tgate, y, rptg);
    const T *Yp = y.data_ptr<T>(), *TYp = ty.data_ptr<T>(), *GTO = gto.data_ptr<T>();
    const T* GO = has_go ? go.data_ptr<T>() : nullptr;
    T *DY = dy.data_ptr<T>(), *DTY = dty.data_ptr<T>();
    for_chunk_rows(R, rpc, [&](long long k, long long r) {
      const T* gr = flowmap::table_row(Gt, r, rpg, C);
      const T* tgr = flowmap::table_row(TG, r, rptg, C);
      for (long long c = 0; c < C; ++c) {
        float d, dt, dgv, dtgv;
        flowmap::gated_jvp_bwd_elem(ld(gr, c), ld(tgr, c), ld(Yp + r * ys, c), ld(TYp + r * tys, c),
                                    GO ? ld(GO + r * gs, c) : 0.f, ld(GTO + r * gts, c), d, dt, dgv, dtgv);
        DY[r * C + c] = static_cast<T>(d);
        DTY[r * C + c] = static_cast<T>(dt);
        DG[k * C + c] += dgv;
        DTG[k * C + c] += dtgv;
      }
    });
  });
  return {dy, dty, dg, dtg};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flowmap_kernels CPU extension: fused forward/JVP/backward kernels of DiT primitives";
  m.def("norm_forward", &norm_forward);
  m.def("norm_backward", &norm_backward);
  m.def("norm_jvp_forward", &norm_jvp_forward);
  m.def("norm_jvp_backward", &norm_jvp_backward);
  m.def("gelu_forward", &gelu_forward);
  m.def("gelu_backward", &gelu_backward);
  m.def("gelu_jvp_forward", &gelu_jvp_forward);
  m.def("gelu_jvp_backward", &gelu_jvp_backward);
  m.def("gated_forward", &gated_forward);
  m.def("gated_backward", &gated_backward);
  m.def("gated_jvp_forward", &gated_jvp_forward);
  m.def("gated_jvp_backward", &gated_jvp_backward);
}
