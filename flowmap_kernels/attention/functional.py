"""Public attention functions: a drop-in for scaled_dot_product_attention and its explicit JVP form."""
from __future__ import annotations

from typing import Optional

import torch

from .._autodiff import (apply_on_unpacked, float32_tangents, follows_autocast, for_compile, make_dual,
                         tangent_dtype_allowed, unpack_duals, widened_jvp, zeros_if_none)
from . import naive
from .autograd import (AttentionCompiledFunction, AttentionFunction, AttentionJVPCompiledFunction,
                       AttentionJVPFunction, check_tangent_dtypes)
from .problem import AttentionProblem, SDPAShapes, broadcast_batch, make_problem
from .registry import ATTENTION
from ..func import forward_mode_active


def resolve_backend(problem: AttentionProblem, backend: Optional[str] = None) -> str:
    """The single dispatch point: the backend name that will run ``problem``."""
    return ATTENTION.backend_name(backend, **problem.as_dict())


class CompiledForwardModeWarning(UserWarning):
    """Forward-mode AD inside a torch.compile region: attention runs the naive O(N^2)-memory math."""


_WARNED_COMPILED_FORWARD_MODE = [False]


@torch.compiler.assume_constant_result
def warn_compiled_forward_mode(op: str, dtype: str) -> bool:
    """Warn once per process (runs outside Dynamo's trace, at compile time: Dynamo cannot trace warnings.warn;
    the sizes are not named: under dynamic shapes they are symbolic, which this constant function cannot take)."""
    if not _WARNED_COMPILED_FORWARD_MODE[0]:
        _WARNED_COMPILED_FORWARD_MODE[0] = True
        import warnings
        warnings.warn(
            f"flowmap_kernels.{op}: forward-mode AD (torch.func.jvp / forward_ad) inside a torch.compile'd "
            f"region runs the NAIVE attention math, which materialises (batch, heads, q_len, kv_len) score "
            f"matrices ({dtype}): O(N^2) memory, several per layer. Dynamo differentiates traced code with its "
            f"own formulas, so the fused kernels cannot serve it. Keep them by taking the JVP with "
            f"flowmap_kernels.func.jvp on a model with a dual form (forward_jvp: the package's DiT, MLPFlowMap, "
            f"nn modules) or with fk.attention_jvp.",
            CompiledForwardModeWarning, stacklevel=2)
    return True


def _empty(p: AttentionProblem) -> bool:
    """No output element, or no key to attend to (the output is zero): the naive math serves these exactly."""
    return p.batch * p.q_heads * p.q_len * p.v_head_dim == 0 or p.kv_len == 0


@follows_autocast("query", "key", "value", "attn_mask")
def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False) -> torch.Tensor:
    """scaled_dot_product_attention with forward-mode AD and backward through the tangent.

    query (B, Hq, Lq, D), key (B, Hkv, Lk, D), value (B, Hkv, Lk, Dv) -> (B, Hq, Lq, Dv), same dtype.
    O = softmax(scale * Q K^T + mask) V; ``scale`` defaults to 1/sqrt(D). ``attn_mask`` broadcasts to
    (B, Hq, Lq, Lk): bool (True = may attend) or float (float32 or the inputs' dtype, added to the logits).
    ``is_causal`` is top-left aligned. A batch of 1 in query or key / value broadcasts, and so, without
    ``enable_gqa``, does a heads dim of 1 in any of them (as in SDPA). A float
    mask may require grad (a learned bias: its gradient comes from one extra blockwise pass, memory linear in N
    plus the mask's size) or carry a forward-mode tangent (then the naive math runs, (B, Hq, Lq, Lk) memory).
    With ``enable_gqa`` each key/value head serves Hq/Hkv consecutive query heads. Rows with no
    allowed key give 0 (no key at all, Lk = 0: zeros, as SDPA). Works under torch.func.jvp,
    torch.autograd.forward_ad and torch.func.vmap (jacrev, jacfwd, hessian, per-sample gradients); the tangent
    output is differentiable with respect to the inputs and their tangents. ``is_causal`` must be a bool and
    ``scale`` None, a real number or a 0-d tensor not requiring grad (TypeError otherwise); tangents must have
    their primal's dtype.
    SDPA's other shapes work as there: 2-d (tokens, head_dim), 3-d (heads, tokens, head_dim) and
    (N, ..., heads, tokens, head_dim), whose leading dims broadcast as in SDPA (inputs with fewer dims read
    with leading ones) and are flattened into the batch (:class:`~.problem.SDPAShapes`). Inside ``torch.autocast``
    the inputs and a float mask are cast to the autocast dtype first, as SDPA's are (float64 is not cast).
    """
    shapes = SDPAShapes(query, key, value)
    if shapes.reshaped:
        o = attention(*shapes.inputs(query, key, value), shapes.mask(attn_mask), dropout_p, is_causal, scale,
                      enable_gqa)
        return shapes.restore(o)
    (query, key, value), _ = broadcast_batch((query, key, value), enable_gqa=enable_gqa)
    p = make_problem(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    name = resolve_backend(p)
    mask_tangent = False
    if not torch.compiler.is_compiling():
        primals, tangents = unpack_duals(query, key, value)
        check_tangent_dtypes(primals, tangents)
        mask_tangent = attn_mask is not None and unpack_duals(attn_mask)[1][0] is not None
    if name == "naive" or _empty(p) or mask_tangent:
        # (a mask with a forward-mode tangent: the fused passes take the mask as a constant; the naive math
        # follows its tangent, at O(N^2) memory)
        return naive.attention(query, key, value, p)
    if torch.compiler.is_compiling():
        if forward_mode_active():  # (evaluated at trace time: see flowmap_kernels.func.forward_mode_active)
            # Forward-mode AD inside a compiled region (torch.func.jvp traced by torch.compile, or dual
            # tensors fed to a compiled function): AOTAutograd would take the custom ops' tangent as ZERO,
            # silently. The naive math is traced op by op with exact tangents (O(N^2) memory).
            warn_compiled_forward_mode("attention", str(query.dtype))
            return naive.attention(query, key, value, p)
        o, _ = for_compile(AttentionFunction, AttentionCompiledFunction).apply(query, key, value, attn_mask, p, name)
        return o
    if any(t is not None for t in tangents):
        # Forward mode (torch.func.jvp or forward_ad): one fused pass for O and tO, whose backward runs
        # through both outputs at once, instead of a forward followed by the JVP rule's own pass.
        tangents = [zeros_if_none(t, x) for t, x in zip(tangents, primals)]
        o, to, _, _ = apply_on_unpacked(AttentionJVPFunction, *primals, *tangents, attn_mask, p, name)
        return make_dual(o, to)
    o, _ = AttentionFunction.apply(query, key, value, attn_mask, p, name)
    return o


@follows_autocast("q", "k", "v", "attn_mask", tangents=(("tq", "q"), ("tk", "k"), ("tv", "v")))
def attention_jvp(q, k, v, tq, tk, tv, *, attn_mask=None, is_causal=False, scale=None,
                  enable_gqa=False, tangent_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, tO): attention and its directional derivative along (tq, tk, tv), in one fused pass.

    Shapes as in :func:`attention`; each tangent has the shape, dtype and device of its primal (None
    means zero). tO = tP V + P tV with tP = P * (tS - rowsum(P * tS)), tS = scale (tQ K^T + Q tK^T).
    Differentiable with respect to all six inputs (the backward runs through both outputs at once).
    ``tangent_dtype=torch.float32`` with float16/bfloat16 inputs returns tO in float32, as the kernels
    accumulate it, instead of rounded to the inputs' dtype (every backend; O keeps the inputs' dtype).
    Float32 tangents with float16/bfloat16 q, k, v (the models' dual forms with float32 tangents) run the
    float32 attention (O rounded to the inputs' dtype once, at the output; tO in float32). Inside
    ``torch.autocast`` q, k, v and a float mask are cast to the autocast dtype, each tangent with its primal.
    """
    shapes = SDPAShapes(q, k, v)
    if shapes.reshaped:
        o, to = attention_jvp(*shapes.inputs(q, k, v), *shapes.tangents((q, k, v), (tq, tk, tv)),
                              attn_mask=shapes.mask(attn_mask), is_causal=is_causal, scale=scale,
                              enable_gqa=enable_gqa, tangent_dtype=tangent_dtype)
        return shapes.restore(o), shapes.restore(to)
    (q, k, v), (tq, tk, tv) = broadcast_batch((q, k, v), (tq, tk, tv), enable_gqa=enable_gqa)
    if isinstance(q, torch.Tensor) and float32_tangents(q, (tq, tk, tv)):
        make_problem(q, k, v, attn_mask, 0.0, is_causal, scale, enable_gqa)  # q, k, v and the mask as given
        if tangent_dtype not in (None, torch.float32):
            raise ValueError(f"tangent_dtype: float32 tangents give a float32 tO; expected None or torch.float32, "
                             f"got {tangent_dtype}")
        for name, x, t in zip(("query", "key", "value"), (q, k, v), (tq, tk, tv)):
            if isinstance(t, torch.Tensor) and not tangent_dtype_allowed(t.dtype, x.dtype):
                raise ValueError(f"tangent of {name}: expected dtype {x.dtype} or torch.float32, got {t.dtype}")
        mask = attn_mask.float() if isinstance(attn_mask, torch.Tensor) and attn_mask.is_floating_point() \
            else attn_mask
        kw = dict(attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        return widened_jvp(lambda p, t: attention_jvp(*p, *t, **kw), (q, k, v), (tq, tk, tv))
    p = make_problem(q, k, v, attn_mask, 0.0, is_causal, scale, enable_gqa, tangents=(tq, tk, tv),
                     tangent_dtype=tangent_dtype)
    name = resolve_backend(p)
    if name == "naive" or _empty(p):
        return naive.attention_jvp(q, k, v, tq, tk, tv, p)
    tq, tk, tv = zeros_if_none(tq, q), zeros_if_none(tk, k), zeros_if_none(tv, v)
    fn = for_compile(AttentionJVPFunction, AttentionJVPCompiledFunction)
    o, to, _, _ = fn.apply(q, k, v, tq, tk, tv, attn_mask, p, name)
    return o, to
