// pybind11 module flowmap_kernels._C_cuda: built by nvcc with the static CUDA runtime, not linked to torch.
// Each function takes raw device pointers (Python ints; 0 = absent), sizes, row strides, float/bool options,
// a dtype code (0 f32, 1 f16, 2 bf16) and the CUDA stream as an int (torch.cuda.current_stream().cuda_stream).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <string>
#include <vector>

#include "kernels.cuh"

#ifndef FLOWMAP_CUDA_ARCHS
#define FLOWMAP_CUDA_ARCHS ""
#endif

namespace py = pybind11;
using flowmap_cuda::i64;
using flowmap_cuda::ptr;

static cudaStream_t S(ptr s) { return reinterpret_cast<cudaStream_t>(s); }

static std::vector<std::string> archs() {
  std::vector<std::string> out;
  std::stringstream ss(FLOWMAP_CUDA_ARCHS);
  std::string a;
  while (std::getline(ss, a, ','))
    if (!a.empty()) out.push_back(a);
  return out;
}

static void check_rpc(i64 R, i64 rpc) {
  if (rpc <= 0 || R % rpc != 0) throw std::invalid_argument("rows per chunk must divide the row count");
}

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "flowmap_kernels CUDA kernels of DiT primitives (raw pointers; not linked to torch)";
  m.def("archs", &archs, "GPU architectures this module was compiled for");
  m.def("norm_forward", [](ptr x, i64 rs, ptr sc, i64 rps, ptr sh, i64 rph, ptr y, ptr st, i64 R, i64 C, float off,
                           bool center, float eps, int dt, ptr s) {
    flowmap_cuda::norm_forward(x, rs, sc, rps, sh, rph, y, st, R, C, off, center, eps, dt, S(s));
  });
  m.def("norm_backward", [](ptr x, i64 rs, ptr sc, i64 rps, ptr st, ptr gy, i64 gys, ptr dx, ptr ds, ptr dh, i64 R,
                            i64 C, float off, bool center, i64 rpc, int dt, ptr s) {
    check_rpc(R, rpc);
    flowmap_cuda::norm_backward(x, rs, sc, rps, st, gy, gys, dx, ds, dh, R, C, off, center, rpc, dt, S(s));
  });
  m.def("norm_jvp_forward", [](ptr x, i64 rs, ptr tx, i64 trs, ptr sc, i64 rps, ptr sh, i64 rph, ptr tsc, i64 rpts,
                               ptr tsh, i64 rpth, ptr y, ptr ty, ptr st, i64 R, i64 C, float off, bool center, float eps,
                               int dt, ptr s) {
    flowmap_cuda::norm_jvp_forward(x, rs, tx, trs, sc, rps, sh, rph, tsc, rpts, tsh, rpth, y, ty, st, R, C, off, center,
                                   eps, dt, S(s));
  });
  m.def("norm_jvp_backward", [](ptr x, i64 rs, ptr tx, i64 trs, ptr sc, i64 rps, ptr tsc, i64 rpts, ptr st, ptr gy,
                                i64 gys, ptr gt, i64 gts, ptr dx, ptr dtx, ptr ds, ptr dh, ptr dts, ptr dth, i64 R, i64 C,
                                float off, bool center, i64 rpc, int dt, ptr s) {
    check_rpc(R, rpc);
    flowmap_cuda::norm_jvp_backward(x, rs, tx, trs, sc, rps, tsc, rpts, st, gy, gys, gt, gts, dx, dtx, ds, dh, dts, dth,
                                    R, C, off, center, rpc, dt, S(s));
  });
  m.def("gelu_forward", [](ptr x, i64 rs, ptr b, ptr y, i64 R, i64 C, int dt, ptr s) {
    flowmap_cuda::gelu_forward(x, rs, b, y, R, C, dt, S(s));
  });
  m.def("gelu_backward", [](ptr x, i64 rs, ptr b, ptr gy, i64 gys, ptr dx, ptr db, i64 R, i64 C, i64 rpc, int dt,
                            ptr s) {
    check_rpc(R, rpc);
    flowmap_cuda::gelu_backward(x, rs, b, gy, gys, dx, db, R, C, rpc, dt, S(s));
  });
  m.def("gelu_jvp_forward", [](ptr x, i64 rs, ptr tx, i64 trs, ptr b, ptr tb, ptr y, ptr ty, i64 R, i64 C, int dt,
                               ptr s) {
    flowmap_cuda::gelu_jvp_forward(x, rs, tx, trs, b, tb, y, ty, R, C, dt, S(s));
  });
  m.def("gelu_jvp_backward", [](ptr x, i64 rs, ptr tx, i64 trs, ptr b, ptr tb, ptr gy, i64 gys, ptr gt, i64 gts,
                                ptr dx, ptr dtx, ptr db, ptr dtb, i64 R, i64 C, i64 rpc, int dt, ptr s) {
    check_rpc(R, rpc);
    flowmap_cuda::gelu_jvp_backward(x, rs, tx, trs, b, tb, gy, gys, gt, gts, dx, dtx, db, dtb, R, C, rpc, dt, S(s));
  });
  m.def("gated_forward", [](ptr x, i64 rs, ptr g, i64 rpg, ptr y, i64 ys, ptr out, i64 R, i64 C, int dt, ptr s) {
    flowmap_cuda::gated_forward(x, rs, g, rpg, y, ys, out, R, C, dt, S(s));
  });
  m.def("gated_backward", [](ptr g, i64 rpg, ptr y, i64 ys, ptr go, i64 gos, ptr dy, ptr dg, i64 R, i64 C, i64 rpc,
                             int dt, ptr s) {
    check_rpc(R, rpc);
    flowmap_cuda::gated_backward(g, rpg, y, ys, go, gos, dy, dg, R, C, rpc, dt, S(s));
  });
  m.def("gated_jvp_forward", [](ptr x, i64 rs, ptr tx, i64 trs, ptr g, i64 rpg, ptr tg, i64 rptg, ptr y, i64 ys, ptr ty,
                                i64 tys, ptr out, ptr tout, i64 R, i64 C, int dt, ptr s) {
    flowmap_cuda::gated_jvp_forward(x, rs, tx, trs, g, rpg, tg, rptg, y, ys, ty, tys, out, tout, R, C, dt, S(s));
  });
  m.def("gated_jvp_backward", [](ptr g, i64 rpg, ptr tg, i64 rptg, ptr y, i64 ys, ptr ty, i64 tys, ptr go, i64 gos,
                                 ptr gto, i64 gtos, ptr dy, ptr dty, ptr dg, ptr dtg, i64 R, i64 C, i64 rpc, int dt,
                                 ptr s) {
    check_rpc(R, rpc);
    flowmap_cuda::gated_jvp_backward(g, rpg, tg, rptg, y, ys, ty, tys, go, gos, gto, gtos, dy, dty, dg, dtg, R, C, rpc,
                                     dt, S(s));
  });
}
