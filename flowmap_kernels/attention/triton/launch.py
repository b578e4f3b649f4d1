"""Launches of the Triton attention kernels (:mod:`.kernels`): one description of every launch, which the
launchers run and ``python -m flowmap_kernels.compile_report`` compiles.

Launchers with exactly the signatures of :mod:`flowmap_kernels.attention.blockwise` (the "torch" backend,
which is the exact PyTorch version of every kernel):

    forward(q, k, v, mask, causal, scale)                     -> o, lse
    backward(q, k, v, o, lse, do, mask, causal, scale)        -> dq, dk, dv
    jvp_forward(q, k, v, tq, tk, tv, mask, causal, scale, tangent_dtype=None) -> o, to, lse, mu
    jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, causal, scale)
                                                              -> dq, dk, dv, dtq, dtk, dtv

and for packed variable-length sequences (flash-attn varlen layout, same kernels with VARLEN):

    varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)                 -> o, lse
    varlen_jvp_forward(q, k, v, tq, tk, tv, cu_q, cu_k, max_q, max_k, causal, scale) -> o, to, lse, mu
    varlen_backward(q, k, v, o, lse, do, cu_q, cu_k, max_q, max_k, causal, scale)    -> dq, dk, dv
    varlen_jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, cu_q, cu_k, max_q, max_k, causal, scale)
                                                              -> dq, dk, dv, dtq, dtk, dtv

with q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv), cu_q / cu_k int32 (batch + 1), o / to
(total_q, Hq, Dv), lse / mu (Hq, total_q) float32. Operands and semantics: :mod:`.kernels`.

A call is a :class:`Plan` (sizes, dtype, mask, causal, varlen, the arch family and its configs from
:mod:`.configs`); :func:`forward_launches` and :func:`backward_launches` allocate the outputs of a pass and
return them with its list of :class:`Launch` (kernel, grid, arguments, constexprs, config, a name such as
``jvp_backward_dkdv[dk]``), in order. The launchers run that list (:meth:`Launch.run`: the tensors' device,
enable_fp_fusion pinned, batches split into launches of at most 65,535 (CUDA's grid limit on axes 1 and
2), smaller tiles when the device's limits are hit); the compile report compiles the same list built on
small CPU tensors. The backward is one key-block pass that also adds dQ (dtQ) with atomics
(``configs.ONE_PASS``; :class:`Cast` then converts the float32 dQ), or, when
``torch.are_deterministic_algorithms_enabled()`` (:attr:`Plan.deterministic`), the key-block pass and a
query-block pass for dQ; the tangent backward's launches are the config's :class:`configs.LaunchParts`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import triton

from ..._autodiff import triton_interpreter
from . import configs, interpreter, kernels

interpreter.install()


def _strides(x: Optional[torch.Tensor], n: int = 4):
    return tuple(x.stride()) if x is not None else (0,) * n


#: Pinned Triton option (Triton 3.10 changes its default): fused multiply-adds on, the setting every
#: measurement in docs/triton.md was taken with (Triton 3.9's default) and one rounding instead of two.
ENABLE_FP_FUSION = True
#: CUDA's limit on grid axes 1 and 2 (heads, batch); axis 0 (row blocks) allows 2**31 - 1.
MAX_GRID_YZ = 65535
#: Offsets (elements) from which the kernels need int64 row offsets.
INT32_OFFSET_LIMIT = 2 ** 31 - 1
#: |lse| above which the additive-mask backward recomputes a row's max and sum (see _attn_row_stats):
#: float32 lse keeps log(l) to within ulp(|lse|) / 2 <= 1.5e-5 below it.
ROW_STATS_LSE_LIMIT = 256.0

_force_large_offsets: list = []
_force_tensor_descriptors: list = []
_force_padded_head_dims: list = []


@contextlib.contextmanager
def _forced(stack: list, enabled: bool):
    """Push ``enabled`` on a stack of forced launch choices for the block (its top decides)."""
    stack.append(bool(enabled))
    try:
        yield
    finally:
        stack.pop()


def large_offsets(enabled: bool = True):
    """Force (or forbid) the int64 row-offset kernels inside the block, whatever the sizes (tests)."""
    return _forced(_force_large_offsets, enabled)


def tensor_descriptors(enabled: bool = True):
    """Force (or forbid) the forward+JVP's tensor-descriptor (TMA) loads inside the block where the operands
    allow them, on any arch (tests: the CPU interpreter runs them)."""
    return _forced(_force_tensor_descriptors, enabled)


def padded_head_dims(enabled: bool = True):
    """Force (or forbid) zero-padding head dims to their power-of-two tile width inside the block, on any
    arch (tests: the CPU interpreter runs the padded launches)."""
    return _forced(_force_padded_head_dims, enabled)


#: Families whose GPUs have TMA (tensor descriptors): Hopper and datacenter Blackwell.
TMA_FAMILIES = ("sm90", "sm100")


def launch_head_dims(head_dim: int, v_head_dim: int, arch: str) -> tuple:
    """(D, Dv) the kernels run at for these head dims on ``arch``. Head dims below their power-of-two tile
    width (72, 80, 96, ...) run zero-padded to it on the wgmma / tcgen05 families (the launchers copy the
    operands, :func:`_padded`): their masked columns cost registers, so the sm_90a tiles that fit them
    were narrower or spilled, and tensor descriptors need no masked columns. Elsewhere (mma.sync, where the
    padded tiles spill as much) the tiles mask their columns in registers."""
    pad = _force_padded_head_dims[-1] if _force_padded_head_dims else arch in configs.PADDED_HEAD_DIM_FAMILIES
    if pad and head_dim > 0 and v_head_dim > 0:
        return configs.head_dim_bucket(head_dim), configs.head_dim_bucket(v_head_dim)
    return head_dim, v_head_dim


def descriptors_allowed(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether TMA descriptors can cover the (L, C) rows of these (B, H, L, C) operands: unit column stride,
    rows of at least 16 bytes, every other stride and the data pointer 16-byte aligned."""
    for x in tensors:
        if x is None:
            continue
        es = x.element_size()
        if x.stride(-1) != 1 or x.shape[-1] * es < 16 or x.data_ptr() % 16:
            return False
        if any(st * es % 16 for n, st in zip(x.shape[:-1], x.stride()[:-1]) if n > 1):
            return False
    return True


@contextlib.contextmanager
def _descriptor_workspace(device: torch.device):
    """Triton's allocator for the in-kernel tensor descriptors' global workspace, unless the caller set one."""
    try:
        from triton.runtime import _allocation
    except ImportError:  # pragma: no cover - older Triton: nothing to set
        yield
        return
    if device.type != "cuda" or not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        yield
        return
    token = _allocation._allocator.set(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8,
                                                                                    device=device))
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def slice_offset_span(x: torch.Tensor) -> int:
    """Largest element offset inside one (batch, head) slice of a (B, H, L, C) view: the in-kernel
    row/column part of an address, (L - 1) |stride_L| + (C - 1) |stride_C| (0 for an empty slice)."""
    if x.dim() < 2 or x.shape[-1] == 0 or x.shape[-2] == 0:
        return 0
    return sum((n - 1) * abs(s) for n, s in zip(x.shape[-2:], x.stride()[-2:]))


def needs_large_offsets(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether some in-slice offset (row index x row stride + column index x column stride) of these
    (B, H, L, C) operands passes 2**31 - 1 elements, so the kernels must compute it in int64 (the batch
    and head parts are always int64). Forced by :func:`large_offsets`."""
    if _force_large_offsets:
        return _force_large_offsets[-1]
    return any(slice_offset_span(x) > INT32_OFFSET_LIMIT for x in tensors if x is not None)


def batch_chunks(batch: int, heads: int) -> list:
    """[(b0, b1)] batch ranges of at most :data:`MAX_GRID_YZ` (grid axis 2); ValueError when ``heads``
    (grid axis 1) passes the limit."""
    if heads > MAX_GRID_YZ:
        raise ValueError(f"query/key: {heads} heads pass CUDA's grid limit of {MAX_GRID_YZ} on the head axis; "
                         "fold heads into the batch dimension")
    return [(b0, min(batch, b0 + MAX_GRID_YZ)) for b0 in range(0, batch, MAX_GRID_YZ)]


def _device_guard(device: torch.device):
    """torch.cuda.device(device) for a CUDA device (Triton launches on the current device), else a no-op."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def smaller_configs(kwargs: dict, grid_block: str) -> list:
    """Launch options to try, in order, when a launch asks for more shared memory (or registers) than the
    device has: as given; one stage; then the tile halved along the block size that does NOT set the grid
    (``grid_block``: "BLOCK_M" for query-block kernels, "BLOCK_N" for key-block ones), down to 16."""
    tries = [dict(kwargs)]
    cur = dict(kwargs)
    if cur.get("num_stages", 1) > 1:
        cur = dict(cur, num_stages=1)
        tries.append(cur)
    other = "BLOCK_N" if grid_block == "BLOCK_M" else "BLOCK_M"
    while cur.get(other, 16) > 16:
        cur = dict(cur, **{other: cur[other] // 2})
        tries.append(cur)
    return tries


def _launch_one(kernel, grid, args, kwargs: dict, grid_block: str) -> None:
    """kernel[grid](*args, **kwargs), retried with :func:`smaller_configs` when the device's limits are
    hit (Triton's OutOfResources: shared memory or registers of this GPU), so a table entry tuned for a
    larger GPU still runs; if none fits, a RuntimeError names the kernel, the limit and the tiles tried."""
    from triton.runtime.errors import OutOfResources
    tries = smaller_configs(kwargs, grid_block)
    for i, kw in enumerate(tries):
        try:
            kernel[grid](*args, enable_fp_fusion=ENABLE_FP_FUSION, **kw)
            return
        except OutOfResources as e:
            if i + 1 == len(tries):
                name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
                tiles = ", ".join(f"{t.get('BLOCK_M')}x{t.get('BLOCK_N')}/s{t.get('num_stages')}" for t in tries)
                raise RuntimeError(
                    f"flowmap_kernels: {name} needs {e.required} of {e.name} but this GPU allows {e.limit} "
                    f"(tiles tried: {tiles}); run attention on the 'torch' backend "
                    f"(flowmap_kernels.use_backend('torch')) and report the GPU") from e


def _launch(kernel, blocks: int, heads: int, batch: int, args: list, cu_seqlens: tuple = (),
            grid_block: str = "BLOCK_M", **kwargs) -> None:
    """kernel[(blocks, heads, batch)](*args, **kwargs) on the tensors' device, with enable_fp_fusion pinned,
    split into launches of at most MAX_GRID_YZ batch entries, with smaller tiles when the device's limits
    are hit (:func:`_launch_one`; ``grid_block`` names the block size that sets ``blocks``). Dense: every
    tensor argument has the batch first and a chunk passes views [b0:b1], so in-kernel batch offsets stay
    relative to the view. Packed sequences (``cu_seqlens``: the cumulative-offset tensors among ``args``):
    a chunk passes cu[b0:b1 + 1]."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not cu_seqlens and any(a.shape[0] != batch for a in tensors):
        raise ValueError("internal: every tensor argument of a launch must have the batch dimension first")
    with _device_guard(tensors[0].device):
        for b0, b1 in batch_chunks(batch, heads):
            if (b0, b1) == (0, batch):
                chunk = args
            elif cu_seqlens:
                chunk = [a[b0:b1 + 1] if any(a is c for c in cu_seqlens) else a for a in args]
            else:
                chunk = [a[b0:b1] if isinstance(a, torch.Tensor) else a for a in args]
            _launch_one(kernel, (blocks, heads, b1 - b0), chunk, kwargs, grid_block)


def _prec(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _mask_args(mask, q, k):
    """(tensor, strides, kind) with the mask viewed with broadcast (stride 0) dims, never copied."""
    if mask is None:
        return q, (0, 0, 0, 0), 0
    B, Hq, Lq = q.shape[:3]
    Lk = k.shape[2]
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(B, Hq, Lq, Lk)
    if m.dtype == torch.bool:
        return m.view(torch.uint8), tuple(m.stride()), 1
    return m, tuple(m.stride()), 2


def _check(q, k, v):
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"query: the Triton kernels take float16, bfloat16 or float32, got {q.dtype}")
    if max(q.shape[-1], v.shape[-1]) > 256:
        raise ValueError(f"query/value: head dim {max(q.shape[-1], v.shape[-1])} > 256 is not supported")


class Plan:
    """One call's problem: sizes, dtype, mask, causal, packed sequences (see :func:`_varlen_plan`), ALIGN,
    LARGE_OFFSETS, the arch family whose configs it takes (``arch``: by default the tensors' GPU; the
    interpreter's tiles under TRITON_INTERPRET=1) and the module of @triton.jit kernels it launches
    (``jit``: by default :mod:`.kernels`; the compile report passes a copy loaded with the interpreter off)."""

    def __init__(self, q, k, v, mask, causal, scale, arch: Optional[str] = None, jit=None,
                 deterministic: Optional[bool] = None):
        _check(q, k, v)
        self.B, self.H, self.Lq, self.D = q.shape
        self.Hkv, self.Lk, self.DV = k.shape[1], k.shape[2], v.shape[-1]
        self.G = self.H // self.Hkv
        self.mask, self.mstrides, self.mask_kind = _mask_args(mask, q, k)
        self.causal = bool(causal)
        self.scale = float(scale)
        self.dtype = q.dtype
        self.device = q.device
        self.esize = q.element_size()
        if arch is None:
            arch = configs.current_arch(q.device) if q.device.type == "cuda" or triton_interpreter() else "sm90"
        self.arch = arch
        # head dims a multiple of 16: no masked columns in the tiles (tensor descriptors and SKIP_INTERIOR need it)
        self.dims_multiple_of_16 = self.D % 16 == 0 and self.DV % 16 == 0
        # interior tiles skip the mask arithmetic (forward, query-block kernels) where the branch costs no
        # spill: the wgmma / tcgen05 families, no masked columns (D = 72's forward+JVP spilled 112 B with it,
        # 8 B without); the interpreter runs it too, so that its tests cover it
        self.skip_interior = arch == "interpret" or (arch in TMA_FAMILIES and self.dims_multiple_of_16)
        self.kernels = kernels if jit is None else jit
        self.block_d, self.block_dv = configs.head_dim_bucket(self.D), configs.head_dim_bucket(self.DV)
        # head dims below their tile width (72, 96, ...) run zero-padded to it on the wgmma / tcgen05 families
        self.pad_head_dims = launch_head_dims(self.D, self.DV, arch) != (self.D, self.DV)
        self.align = 1
        self.large_offsets = needs_large_offsets(q, k, v, self.mask if mask is not None else None)
        self.varlen = False  # packed sequences: see _varlen_plan
        self.cu_q = self.cu_k = q  # cumulative offsets (dummies for dense problems)
        self.blocks_q, self.blocks_k = self.Lq, self.Lk  # rows the grid covers per (batch, head)
        self.cu_seqlens = ()
        # the backward's dQ: atomics in the key-block pass, or (deterministic) a query-block pass of its own
        self.deterministic = torch.are_deterministic_algorithms_enabled() if deterministic is None \
            else bool(deterministic)

    def new(self, heads: int, rows: int, channels: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """An uninitialised operand in the plan's layout: dense (B, heads, rows, channels), or packed
        (rows, heads, channels) viewed as the kernels read it (:func:`_rows4`)."""
        dtype = self.dtype if dtype is None else dtype
        if self.varlen:
            return _rows4(torch.empty((rows, heads, channels), dtype=dtype, device=self.device))
        return torch.empty((self.B, heads, rows, channels), dtype=dtype, device=self.device)

    def new_rows(self) -> torch.Tensor:
        """An uninitialised float32 per-query-row buffer (lse, mu, ...): (B, H, Lq), packed (H, total_q)."""
        shape = (self.H, self.Lq) if self.varlen else (self.B, self.H, self.Lq)
        return torch.empty(shape, dtype=torch.float32, device=self.device)

    def set_align(self, *tensors) -> None:
        """ALIGN: the largest power of two <= 16 dividing every row/head/batch stride and every data
        offset (in elements) of the dense operands; 1 unless each has a unit last-dim stride."""
        g = 16
        for x in tensors:
            if x is None:
                continue
            if x.stride(-1) != 1 and x.shape[-1] > 1:
                self.align = 1
                return
            for st in x.stride()[:-1]:
                g = math.gcd(g, st)
            g = math.gcd(g, x.data_ptr() // x.element_size() if x.data_ptr() % x.element_size() == 0 else 1)
        self.align = 1 << (g.bit_length() - 1) if g > 0 else 16
        self.large_offsets = self.large_offsets or needs_large_offsets(*tensors)

    def config(self, kernel: str) -> configs.Config:
        return configs.get_config(kernel, self.D, self.esize, self.arch, self.DV)

    def constexprs(self, **extra) -> dict:
        return dict(D=self.D, DV=self.DV, IS_CAUSAL=self.causal, MASK_KIND=self.mask_kind,
                    BLOCK_D=self.block_d, BLOCK_DV=self.block_dv, PREC=_prec(self.dtype), ALIGN=self.align,
                    LARGE_OFFSETS=self.large_offsets, VARLEN=self.varlen, **extra)



# ----------------------------------------------------------------------------------------------------
# launch descriptions
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=, num_stages=)``.

    ``name``: the launch in the compile report ("forward", "jvp_backward_dkdv[dk]", ...: the kernel's table
    name and, for split launches, the outputs of its part); ``grid``: (blocks, heads, batch), the batch split
    into launches of at most :data:`MAX_GRID_YZ`; ``config``: the tiles (BLOCK_M, BLOCK_N in ``constexprs``,
    num_warps, num_stages); ``grid_block``: the block size that sets ``grid[0]`` (kept when a device's limits
    make :func:`smaller_configs` shrink the tile); ``cu_seqlens``: the cumulative-offset tensors among
    ``args`` (packed sequences)."""

    name: str
    kernel: Any
    grid: tuple
    args: tuple = field(repr=False)
    constexprs: dict
    config: configs.Config
    grid_block: str = "BLOCK_M"
    cu_seqlens: tuple = field(default=(), repr=False)

    @property
    def num_warps(self) -> int:
        return self.config.num_warps

    @property
    def num_stages(self) -> int:
        return self.config.num_stages

    def run(self) -> None:
        workspace = _descriptor_workspace(self.args[0].device) if self.constexprs.get("TMA") \
            else contextlib.nullcontext()
        with workspace:
            _launch(self.kernel, *self.grid, list(self.args), cu_seqlens=self.cu_seqlens,
                    grid_block=self.grid_block, **self.constexprs, num_warps=self.num_warps,
                    num_stages=self.num_stages)


@dataclass(frozen=True)
class Cast:
    """Not a kernel: ``dst.copy_(src)`` after the launches before it (the one-pass backward's float32 dQ
    and dtQ into the inputs' dtype)."""

    name: str
    src: torch.Tensor = field(repr=False)
    dst: torch.Tensor = field(repr=False)

    def run(self) -> None:
        self.dst.copy_(self.src)


def run(launches) -> None:
    """Run launches in order."""
    for launch in launches:
        launch.run()


def _descriptors_apply(p: Plan) -> bool:
    """Whether a kernel with a TMA variant may take it for this plan: a TMA family (or forced,
    :func:`tensor_descriptors`), int32 offsets, head dims a multiple of 16 (with descriptors, masked columns
    spill more); each launcher adds what its operands need (:func:`descriptors_allowed`)."""
    on = _force_tensor_descriptors[-1] if _force_tensor_descriptors else p.arch in TMA_FAMILIES
    return bool(on and not p.large_offsets and p.dims_multiple_of_16)


def forward_launches(p: Plan, q, k, v, tq=None, tk=None, tv=None, tangent_dtype=None) -> tuple:
    """((o, to, lse, mu), launches) of the forward (``tq`` None: to = mu = None) or forward+JVP pass; ``to``
    in ``tangent_dtype`` (default the inputs' dtype; the kernel converts its float32 accumulator on store)."""
    t = tq is not None
    o = p.new(p.H, p.Lq, p.DV)
    to = p.new(p.H, p.Lq, p.DV, tangent_dtype) if t else None
    lse = p.new_rows()
    mu = p.new_rows() if t else None
    p.set_align(q, k, v, tq, tk, tv, o, to)
    name = "jvp_forward" if t else "forward"
    tangent_fp32 = bool(t and to.dtype != p.dtype)  # float32 tO from 16-bit inputs (tangent_dtype)
    tma = t and not tangent_fp32 and _descriptors_apply(p) and descriptors_allowed(k, v, tk, tv)
    # the P tV products in an accumulator of their own (every product after tS stays asynchronous on the
    # wgmma / tcgen05 families): spill-free up to Dv = 64 in 16 bits (D = 128 spilled 624 B, float32 inputs
    # at D = 48/64 56 B), not with two-part products
    tv_acc = t and not tangent_fp32 and p.block_dv <= 64 and (p.arch == "interpret" or (
        p.arch in TMA_FAMILIES and p.esize == 2))
    if tangent_fp32:
        name += "[tangent_fp32]"
    elif tma:
        name += "[tma]"
    cfg = p.config(configs.table_key(name))
    launches = []
    if p.B * p.H > 0 and p.Lq > 0 and p.blocks_q > 0:
        args = (q, k, v, tq if t else q, tk if t else k, tv if t else v, o, to if t else o, lse, mu if t else lse,
                p.mask, p.cu_q, p.cu_k, *q.stride(), *k.stride(), *v.stride(), *_strides(tq), *_strides(tk),
                *_strides(tv), *o.stride(), *p.mstrides, p.H, p.G, p.Lq, p.Lk, p.scale)
        launches.append(Launch(name, p.kernels._attn_fwd,
                               (triton.cdiv(p.blocks_q, cfg.block_m), p.H, p.B), args,
                               p.constexprs(TANGENT=t, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                            TANGENT_FP32=tangent_fp32, TMA=tma, SKIP_INTERIOR=p.skip_interior,
                                            TV_ACC=tv_acc),
                               cfg, cu_seqlens=p.cu_seqlens))
    return (o, to, lse, mu), launches


def _bwd_args(p: Plan, q, k, v, tq, tk, tv, do, dto, lse, linv, mu, const, crow, outs) -> tuple:
    """Arguments of the key-block and query-block kernels up to their output strides; ``lse`` is the row
    max and ``linv`` 1 / l (row statistics) with an additive mask."""
    t = tq is not None
    return (q, k, v, tq if t else q, tk if t else k, tv if t else v, do if do is not None else q,
            dto if dto is not None else q, lse, linv if linv is not None else lse, mu if mu is not None else lse,
            const, crow if crow is not None else const, p.mask, p.cu_q, p.cu_k, *outs,
            *q.stride(), *k.stride(), *v.stride(), *_strides(tq), *_strides(tk), *_strides(tv),
            *_strides(do), *_strides(dto))


def _key_block_descriptors(p: Plan, q, tq) -> bool:
    """Whether the key-block kernel loads its query-side tiles and stores dK, dV (dtK, dtV) through tensor
    descriptors (sm90 / sm100, 16-bit inputs, head dims a multiple of 16 up to 128, Q and tQ rows the
    descriptors can read; the gradients are allocated here, dO and dtO copied if needed): its 32-query-column
    tiles at D = 64 then fit sm_90a's registers. Elsewhere the pointer loads (at D = 256 the descriptors cost
    8-40 B of spill in the primal deterministic key-block launch on sm_90a / sm_100a)."""
    return (_descriptors_apply(p) and p.esize == 2 and max(p.block_d, p.block_dv) <= 128
            and descriptors_allowed(q, tq))


#: Widest (padded) head dim whose one-pass dQ / dtQ adds are tensor-descriptor reductions (with descriptors): they
#: take the 32 x D pointer and mask tiles out of the registers (sm_90a's one launch at D = 64 fits only so) but
#: stage each tile in shared memory, which at D = 128 costs the [dtk,dtq,dq_dts] launch its second CTA per SM
#: (119 KB instead of 107 KB); the pointer atomics stay there.
TMA_ADD_MAX_HEAD_DIM = 64


def backward_launches(p: Plan, q, k, v, tq, tk, tv, o, to, lse, mu, do, dto) -> tuple:
    """((dq, dk, dv, dtq, dtk, dtv), launches) of the backward: the primal (``dto`` None: no tangent terms
    compiled in, tangent gradients None) or the backward through (O, tO); ``do`` None drops dO's terms.

    Launches: the row pre-pass; with an additive mask the row statistics; the key-block kernel (one launch,
    or the config's :attr:`configs.LaunchParts.key_block` parts with tangents); the query-block kernel
    (likewise). Gradients no launch writes (no dO and no dtO, empty problems) are zero-filled here."""
    tangent, has_do = dto is not None, do is not None
    if not tangent:
        tq = tk = tv = to = mu = None
    prefix = "jvp_backward" if tangent else "backward"
    dq, dk, dv = p.new(p.H, p.Lq, p.D), p.new(p.Hkv, p.Lk, p.D), p.new(p.Hkv, p.Lk, p.DV)
    dtq, dtk, dtv = (p.new(p.H, p.Lq, p.D), p.new(p.Hkv, p.Lk, p.D), p.new(p.Hkv, p.Lk, p.DV)) if tangent \
        else (None, None, None)
    grads = (dq, dk, dv, dtq, dtk, dtv)
    if not (tangent or has_do) or p.B * p.H == 0:
        for x in grads:
            if x is not None:
                x.zero_()
        return grads, []
    const = p.new_rows()
    crow = p.new_rows() if tangent else None
    tma = _key_block_descriptors(p, q, tq)
    tma_add = tma and max(p.block_d, p.block_dv) <= TMA_ADD_MAX_HEAD_DIM
    if tma:  # (dO from autograd may be an expanded view: copied, O(N D), to rows the descriptors can read)
        do, dto = (x if x is None or descriptors_allowed(x) else x.contiguous() for x in (do, dto))
    p.set_align(q, k, v, tq, tk, tv, o, to, do, dto, dq, dk, dv, dtq, dtk, dtv)
    flags = dict(TANGENT=tangent, HAS_DO=has_do)
    launches = []
    pc = configs.PREP_CONFIG
    if p.Lq > 0:
        args = (o, do if has_do else o, to if tangent else o, dto if tangent else o, mu if tangent else const, const,
                crow if tangent else const, p.cu_q, *o.stride(), *_strides(do), *_strides(to), *_strides(dto),
                p.H, p.Lq)
        ce = dict(DV=p.DV, BLOCK_M=pc.block_m, BLOCK_DV=p.block_dv, ALIGN=p.align, LARGE_OFFSETS=p.large_offsets,
                  VARLEN=p.varlen, **flags)
        grid = (triton.cdiv(p.blocks_q, pc.block_m), p.H, p.B)
        launches.append(Launch(prefix + "_prep", p.kernels._attn_bwd_prep, grid, args, ce, pc, cu_seqlens=p.cu_seqlens))
    linv = None
    if p.mask_kind == 2 and p.Lq > 0:  # P = exp(S - row max) / l, robust to finfo.min-sized logits
        rowmax, linv = p.new_rows(), p.new_rows()
        sc = p.config("forward")
        args = (q, k, lse, rowmax, linv, p.mask, *q.stride(), *k.stride(), *p.mstrides, p.H, p.G, p.Lq, p.Lk,
                p.scale, ROW_STATS_LSE_LIMIT)
        ce = dict(D=p.D, IS_CAUSAL=p.causal, MASK_KIND=p.mask_kind, BLOCK_M=sc.block_m, BLOCK_N=sc.block_n,
                  BLOCK_D=p.block_d, PREC=_prec(p.dtype), ALIGN=p.align, LARGE_OFFSETS=p.large_offsets)
        grid = (triton.cdiv(p.Lq, sc.block_m), p.H, p.B)
        launches.append(Launch(prefix + "_row_stats", p.kernels._attn_row_stats, grid, args, ce, sc))
        lse = rowmax  # the key-block and query-block kernels read the row max where they read lse
    operands = (q, k, v, tq, tk, tv, do, dto, lse, linv, mu, const, crow)

    one_pass = not p.deterministic
    kernel = prefix + ("_atomic" if one_pass else "_dkdv")
    cfg = p.config(kernel)
    # launch variants (configs) whose tile fits where the dense one's would spill: without descriptors, with a
    # mask; named apart where their tile differs (the compile report's key)
    for variant, applies in (("_pointer", not tma), ("_masked", p.mask_kind != 0)):
        if applies and kernel + variant in configs.KERNELS and p.config(kernel + variant) != cfg:
            kernel, cfg = kernel + variant, p.config(kernel + variant)
            break
    if one_pass:  # dQ (dtQ) accumulate in float32 across key blocks, zeroed here, cast after the pass
        parts = configs.ONE_PASS[cfg.parts.tag] if tangent else configs.PRIMAL_ONE_PASS
        def accumulator(g):  # float32, zeroed: the gradient itself for float32 inputs
            return (g if p.dtype == torch.float32 else p.new(p.H, p.Lq, p.D, torch.float32)).zero_()
        dqa = accumulator(dq)
        dtqa = accumulator(dtq) if tangent else dqa
    else:
        parts = cfg.parts if tangent else configs.PRIMAL
        dqa = dtqa = dq  # not written (no ADD_* part)
    if p.Lk > 0:
        args = (*_bwd_args(p, *operands, (dk, dv, dtk if tangent else dk, dtv if tangent else dv, dqa, dtqa)),
                *dk.stride(), *dv.stride(), *dq.stride(), *p.mstrides, p.Hkv, p.G, p.Lq, p.Lk, p.scale)
        for part in parts.key_block:
            launches.append(Launch(kernel + (f"[{part.suffix}]" if part.suffix else ""),
                                   p.kernels._attn_bwd_dkdv, (triton.cdiv(p.blocks_k, cfg.block_n), p.Hkv, p.B), args,
                                   p.constexprs(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **part.constexprs(), **flags,
                                                TMA=tma, TMA_ADD=tma_add),
                                   cfg, grid_block="BLOCK_N", cu_seqlens=p.cu_seqlens))
    else:
        dk.zero_(), dv.zero_()
    if one_pass:
        launches += [Cast(prefix + "_atomic_cast", a, g) for a, g in ((dqa, dq), (dtqa, dtq))
                     if g is not None and a is not g]
        return grads, launches

    cfg = p.config(prefix + "_dq")
    if p.Lq > 0:
        parts = (cfg.parts if tangent else configs.PRIMAL).query_block
        # a part with to_partial writes its dQ terms to a float32 partial that a later part adds
        partial = p.new(p.H, p.Lq, p.D, torch.float32) if any(part.add_partial for part in parts) else dq
        for part in parts:
            args = (*_bwd_args(p, *operands, (partial if part.to_partial else dq, dtq if tangent else dq, partial)),
                    *dq.stride(), *p.mstrides, p.H, p.G, p.Lq, p.Lk, p.scale)
            launches.append(Launch(prefix + "_dq" + (f"[{part.suffix}]" if part.suffix else ""),
                                   p.kernels._attn_bwd_dq, (triton.cdiv(p.blocks_q, cfg.block_m), p.H, p.B), args,
                                   p.constexprs(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **part.constexprs(), **flags,
                                                SKIP_INTERIOR=p.skip_interior), cfg, cu_seqlens=p.cu_seqlens))
    return grads, launches


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
def _run_forward(p: Plan, q, k, v, tq=None, tk=None, tv=None, tangent_dtype=None) -> tuple:
    outputs, launches = forward_launches(p, q, k, v, tq, tk, tv, tangent_dtype)
    run(launches)
    return outputs


def _run_backward(p: Plan, *operands) -> tuple:
    grads, launches = backward_launches(p, *operands)
    run(launches)
    return grads


def _pad(x: Optional[torch.Tensor], width: int) -> Optional[torch.Tensor]:
    """x zero-padded along its last dim to ``width`` (a new contiguous tensor; None stays None)."""
    if x is None or x.shape[-1] == width:
        return x
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def _cut(x: Optional[torch.Tensor], width: int) -> Optional[torch.Tensor]:
    """The first ``width`` channels of a padded output, contiguous (None stays None)."""
    return x if x is None or x.shape[-1] == width else x[..., :width].contiguous()


def _pad_operands(p: Plan, qk: tuple, v: tuple) -> tuple:
    """(qk, v): the q/k-side operands zero-padded to ``p.block_d``, the v-side ones (v, O, dO, ...) to
    ``p.block_dv``. The zero columns add exact zeros to every product and give zero output columns, so the
    results are those of the masked tiles, computed by the head-dim-exact tiles (no masked columns; tensor
    descriptors and SKIP_INTERIOR apply) for O(N D) copies."""
    return tuple(_pad(x, p.block_d) for x in qk), tuple(_pad(x, p.block_dv) for x in v)


def _padded(p: Plan, plan, qk: tuple, v: tuple) -> tuple:
    """(plan, qk, v): where ``p.pad_head_dims``, the operands padded (:func:`_pad_operands`) with
    ``plan(q, k, v)`` the plan of the padded problem; else as given."""
    if not p.pad_head_dims:
        return p, qk, v
    qk, v = _pad_operands(p, qk, v)
    return plan(qk[0], qk[1], v[0]), qk, v


def _dense_plan(mask, causal: bool, scale: float):
    return lambda q, k, v: Plan(q, k, v, mask, causal, scale)


def forward(q, k, v, mask, causal: bool, scale: float):
    """O (B, Hq, Lq, Dv) in q's dtype and the row log-sum-exp (B, Hq, Lq) float32."""
    dv, plan = v.shape[-1], _dense_plan(mask, causal, scale)
    p, (q, k), (v,) = _padded(plan(q, k, v), plan, (q, k), (v,))
    o, _, lse, _ = _run_forward(p, q, k, v)
    return _cut(o, dv), lse


def jvp_forward(q, k, v, tq, tk, tv, mask, causal: bool, scale: float, tangent_dtype=None):
    """O, tO (B, Hq, Lq, Dv) and lse, mu (B, Hq, Lq) float32 in one pass over the keys; tO in
    ``tangent_dtype`` (default q's dtype)."""
    dv, plan = v.shape[-1], _dense_plan(mask, causal, scale)
    p, (q, k, tq, tk), (v, tv) = _padded(plan(q, k, v), plan, (q, k, tq, tk), (v, tv))
    o, to, lse, mu = _run_forward(p, q, k, v, tq, tk, tv, tangent_dtype)
    return _cut(o, dv), _cut(to, dv), lse, mu


def backward(q, k, v, o, lse, do, mask, causal: bool, scale: float):
    """dQ, dK, dV of the primal (no tangent terms compiled in)."""
    d, dv, plan = q.shape[-1], v.shape[-1], _dense_plan(mask, causal, scale)
    p, (q, k), (v, o, do) = _padded(plan(q, k, v), plan, (q, k), (v, o, do))
    dq, dk, dv_ = _run_backward(p, q, k, v, None, None, None, o, None, lse, None, do, None)[:3]
    return _cut(dq, d), _cut(dk, d), _cut(dv_, dv)


def jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do: Optional[torch.Tensor], dto: Optional[torch.Tensor],
                 mask, causal: bool, scale: float):
    """Gradients for (q, k, v, tq, tk, tv) from dO (may be None) and dtO (None: tangent grads are None)."""
    d, dv, plan = q.shape[-1], v.shape[-1], _dense_plan(mask, causal, scale)
    p, (q, k, tq, tk), (v, tv, o, to, do, dto) = _padded(plan(q, k, v), plan, (q, k, tq, tk),
                                                         (v, tv, o, to, do, dto))
    grads = _run_backward(p, q, k, v, tq, tk, tv, o, to, lse, mu, do, dto)
    return tuple(_cut(g, w) for g, w in zip(grads, (d, d, dv, d, d, dv)))


# ----------------------------------------------------------------------------------------------------
# packed variable-length sequences (flash-attn varlen convention)
# ----------------------------------------------------------------------------------------------------
def _rows4(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(T, H, C) packed rows viewed as (1, H, T, C) with the row stride also in the batch slot: the kernels
    (VARLEN) address sequence b's rows from cu_seqlens[b] * row stride, as a dense batch from b * batch
    stride."""
    if x is None:
        return None
    return x.as_strided((1, x.shape[1], x.shape[0], x.shape[2]), (x.stride(0), x.stride(1), x.stride(0), x.stride(2)),
                        x.storage_offset())


def _packed(x4: torch.Tensor) -> torch.Tensor:
    """The (T, H, C) tensor behind a :func:`_rows4` view."""
    return x4[0].transpose(0, 1)


def _varlen_plan(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, tangents=(None, None, None), **plan_kw):
    """Validated (Plan, 4-D views of q, k, v, tq, tk, tv) of a packed problem (``plan_kw``: :class:`Plan`'s
    ``arch``, ``jit``, ``deterministic``)."""
    for name, x in (("query", q), ("key", k), ("value", v)):
        if x.dim() != 3:
            raise ValueError(f"{name}: expected a packed (total, heads, head_dim) tensor, got shape {tuple(x.shape)}")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype != torch.int32 or cu.numel() < 1:
            raise ValueError(f"{name}: expected a 1-D int32 tensor of cumulative offsets (batch + 1 entries)")
        if cu.device != q.device:
            raise ValueError(f"{name}: on {cu.device}, the query on {q.device}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_k: {cu_k.numel()} entries, cu_seqlens_q has {cu_q.numel()}")
    if k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"key/value: shapes {tuple(k.shape)}, {tuple(v.shape)} do not match the query "
                         f"{tuple(q.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query: {q.shape[1]} heads are not a multiple of the {k.shape[1]} key/value heads")
    if int(max_q) < 0 or int(max_k) < 0:
        raise ValueError(f"max_seqlen_q/max_seqlen_k: expected >= 0, got {max_q}, {max_k}")
    views = [_rows4(x) for x in (q, k, v, *tangents)]
    p = Plan(*views[:3], None, causal, scale, **plan_kw)
    p.B = cu_q.numel() - 1
    p.varlen = True
    p.cu_q, p.cu_k = cu_q.contiguous(), cu_k.contiguous()
    p.cu_seqlens = (p.cu_q, p.cu_k)
    p.blocks_q, p.blocks_k = int(max_q), int(max_k)
    return p, views




def _varlen_padded(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, tangents=(None, None, None), rest=()):
    """(Plan, 4-D views of q, k, v, tq, tk, tv, the v-side packed operands ``rest`` (O, dO, ...)) of a packed
    problem, zero-padded along the head dims where the plan says so (see :func:`_padded`)."""
    p, views = _varlen_plan(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, tangents)
    if not p.pad_head_dims:
        return p, views, rest
    (q, k, tq, tk), (v, tv, *rest) = _pad_operands(p, (q, k, *tangents[:2]), (v, tangents[2], *rest))
    p, views = _varlen_plan(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, (tq, tk, tv))
    return p, views, tuple(rest)


def varlen_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float):
    """Packed sequences: q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); cu_q, cu_k int32
    (batch + 1) cumulative offsets (sequence b is rows cu[b]:cu[b + 1]; empty sequences allowed); max_q,
    max_k at least the longest lengths. Causal is top-left aligned per sequence. Returns O (total_q, Hq, Dv)
    in q's dtype and lse (Hq, total_q) float32 (-inf on rows with no key)."""
    p, (q4, k4, v4, *_), _ = _varlen_padded(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
    o4, _, lse, _ = _run_forward(p, q4, k4, v4)
    return _cut(_packed(o4), v.shape[-1]), lse


def varlen_jvp_forward(q, k, v, tq, tk, tv, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float):
    """:func:`varlen_forward` and its JVP: O, tO (total_q, Hq, Dv) and lse, mu (Hq, total_q) float32."""
    p, views, _ = _varlen_padded(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, (tq, tk, tv))
    o4, to4, lse, mu = _run_forward(p, *views)
    return _cut(_packed(o4), v.shape[-1]), _cut(_packed(to4), v.shape[-1]), lse, mu


def varlen_backward(q, k, v, o, lse, do, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float):
    """dQ, dK, dV of :func:`varlen_forward` (packed layouts as the inputs) from dO (total_q, Hq, Dv)."""
    p, (q4, k4, v4, *_), (o, do) = _varlen_padded(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, rest=(o, do))
    grads = _run_backward(p, q4, k4, v4, None, None, None, _rows4(o), None, lse.contiguous(), None, _rows4(do), None)
    return tuple(_cut(_packed(g), x.shape[-1]) for g, x in zip(grads[:3], (q, k, v)))


def varlen_jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do: Optional[torch.Tensor], dto: Optional[torch.Tensor],
                        cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float):
    """Gradients for (q, k, v, tq, tk, tv) of :func:`varlen_jvp_forward` from dO (may be None) and dtO (None:
    tangent gradients are None)."""
    if dto is None:
        return (*varlen_backward(q, k, v, o, lse, do, cu_q, cu_k, max_q, max_k, causal, scale), None, None, None)
    p, views, (o, to, do, dto) = _varlen_padded(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, (tq, tk, tv),
                                                 (o, to, do, dto))
    grads = _run_backward(p, *views, _rows4(o), _rows4(to), lse.contiguous(), mu.contiguous(), _rows4(do),
                          _rows4(dto))
    return tuple(_cut(_packed(g), x.shape[-1]) for g, x in zip(grads, (q, k, v, q, k, v)))
