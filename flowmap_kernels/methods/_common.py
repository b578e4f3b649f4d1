"""Shared pieces of the flow-map losses: config merging, time sampling, JVPs, weighting."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

__all__ = ["merge_cfg", "bcast", "sample_times", "sample_pair", "interpolate", "velocity", "model_fn", "jvp",
           "sq_err", "adaptive_weight", "detached_logs", "null_label", "drop_labels", "guidance_dim",
           "sample_guidance_scale", "sample_gap_pair", "eulerian_draws", "check_interval", "CALLS_JVP_PRIMAL"]

# The call structure of the losses whose JVP primal is the prediction and whose tangent is a detached
# target (meanflow, scm): one forward+JVP and the backward through the primal only.
CALLS_JVP_PRIMAL = "J (primal is the prediction) + B through the primal; tangent detached"


_NO_BATCH = object()


def merge_cfg(defaults: dict, cfg: dict, method: str, x0=_NO_BATCH) -> dict:
    """defaults updated by cfg; a key not in defaults is a TypeError naming it. ``x0`` (the loss's data batch,
    when given) must be a tensor with at least one example (ValueError otherwise)."""
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise TypeError(f"{method}.loss: unknown config key(s) {unknown}; known: {sorted(defaults)}")
    if x0 is not _NO_BATCH and (not isinstance(x0, torch.Tensor) or x0.dim() < 1 or x0.shape[0] == 0):
        shape = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
        raise ValueError(f"{method}.loss: x0: expected a tensor (B, ...) with B >= 1, got {shape}")
    return {**defaults, **cfg}


def bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against x (B, ...)."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


TIME_DISTS = ("uniform", "logit_normal")


def rng(generator: Optional[torch.Generator]) -> dict:
    """``generator=`` for torch's random functions, left out when None: torch.compile (torch 2.13) cannot trace
    torch.rand / randn / randint given an explicit ``generator=None`` and a symbolic size (a batch size that
    changed between compiled steps): "SymIntArrayRef expected to contain only concrete integers"."""
    return {} if generator is None else {"generator": generator}


def sample_times(n: int, dist: str, mu: float, sigma: float, *, device=None, dtype=torch.float32,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """n times in (0, 1): 'uniform' or 'logit_normal' (sigmoid of N(mu, sigma^2))."""
    if dist == "uniform":
        return torch.rand(n, device=device, dtype=dtype, **rng(generator))
    if dist == "logit_normal":
        return torch.sigmoid(mu + sigma * torch.randn(n, device=device, dtype=dtype, **rng(generator)))
    raise ValueError(f"time_dist: expected 'uniform' or 'logit_normal', got {dist!r}")


def sample_pair(n: int, c: dict, *, device=None, dtype=torch.float32, generator=None):
    """(s, t) with s >= t (source noisier than target): two draws a, b from c['time_dist']; a fraction
    c['ratio_neq'] of the pairs is (max(a, b), min(a, b)), the rest sit on the flow-matching diagonal
    s = t = a. (MeanFlow's recipe puts the diagonal at max(a, b); that skews the diagonal towards noise,
    density 2s for uniform draws, and starves the velocity near the data: measured on checkerboard, a
    pure-diagonal run reached Euler-64 SWD 0.143 against 0.080 for flow matching after 1000 steps.)"""
    a = sample_times(n, c["time_dist"], c["time_mu"], c["time_sigma"], device=device, dtype=dtype, generator=generator)
    b = sample_times(n, c["time_dist"], c["time_mu"], c["time_sigma"], device=device, dtype=dtype, generator=generator)
    ratio = c["ratio_neq"]
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio_neq: expected a fraction in [0, 1], got {ratio}")
    keep = torch.rand(n, device=device, dtype=dtype, **rng(generator)) < ratio
    return torch.where(keep, torch.maximum(a, b), a), torch.where(keep, torch.minimum(a, b), a)


def eulerian_draws(model, x0, cond, c: dict):
    """The draws MeanFlow and iMF share, in this order: label dropout (only when c['cfg_dropout'] > 0 and
    labels are given), noise, the (s, t) pair (sample_pair); then x_s and the velocity v of c['velocity']
    (the labels ``cond`` and the dropped rows select the 'batch' posterior). Random numbers from
    c['generator'] (None: torch's global RNG). Returns (cond_in the labels the model sees, dropped mask
    or None, s, t, x_s, v)."""
    g = c["generator"]
    cond_in, dropped = drop_labels(model, cond, c["cfg_dropout"], g)
    eps = randn_like(x0, g)
    s, t = sample_pair(x0.shape[0], c, device=x0.device, dtype=x0.dtype, generator=g)
    xs, _ = interpolate(x0, eps, s)
    return cond_in, dropped, s, t, xs, velocity(c["velocity"], s, x0, eps, cond, free=dropped)


def check_interval(c: dict) -> tuple:
    """c['cfg_interval'] as (lo, hi) after checking 0 <= lo <= hi <= 1 (ValueError naming the key)."""
    lo, hi = c["cfg_interval"]
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"cfg_interval: expected [lo, hi] with 0 <= lo <= hi <= 1, got {c['cfg_interval']!r}")
    return lo, hi


def interpolate(x0, eps, s):
    """x_s = (1 - s) x0 + s eps and the conditional velocity dx_s/ds = eps - x0."""
    sb = bcast(s, x0)
    return (1 - sb) * x0 + sb * eps, eps - x0


VELOCITIES = ("conditional", "batch")


def velocity(kind: str, s, x0, eps, cond=None, free=None) -> torch.Tensor:
    """The velocity at x_s = (1 - s) x0 + s eps that a target uses: 'conditional' eps - x0, or 'batch'
    the marginal velocity of the minibatch's empirical data distribution,

        u(x_s, s) = E[eps - x0 | x_s] = sum_j w_j (x_s - x0_j) / s,
        w_j = softmax_j(-||x_s - (1 - s) x0_j||^2 / (2 s^2))   over the batch's x0_j (same label when cond),

    the minibatch posterior of "Stable Target Field" (Xu et al. 2023): a far lower-variance estimate of
    E[eps - x0 | x_s], self-normalised (consistent as the batch grows); at s -> 0 it is eps - x0. Written as
    (eps_i - x0_i) + sum_j w_ij (x0_i - x0_j) / s_i so that the j = i term is exact; the logits drop the
    j-independent ||eps_i||^2 / 2. Cost O(B^2 D) (two (B, B) products), computed in float32 or wider.
    Returns a detached tensor for 'batch' (it is a target), in x0's dtype; x0, eps (B, ...), s (B,).
    ``free`` (B,) bool: rows whose label was dropped (classifier-free guidance) average over the whole
    batch (the unconditional posterior); the other rows over the rows of their own label in ``cond``."""
    v = eps - x0
    if kind == "conditional":
        return v
    if kind != "batch":
        raise ValueError(f"velocity: expected one of {list(VELOCITIES)}, got {kind!r}")
    with torch.no_grad():
        b = x0.shape[0]
        work = torch.promote_types(x0.dtype, torch.float32)  # 16-bit inputs: logits in float32
        x0f, ef = x0.reshape(b, -1).to(work), eps.reshape(b, -1).to(work)
        sc = s.to(work).clamp_min(torch.finfo(work).tiny ** 0.25)[:, None]
        sq = x0f.pow(2).sum(1)
        dist = (sq[:, None] + sq[None, :] - 2 * x0f @ x0f.T).clamp_min(0).fill_diagonal_(0)  # ||x0_i - x0_j||^2
        cross = (ef * x0f).sum(1, keepdim=True) - ef @ x0f.T  # eps_i . (x0_i - x0_j)
        logits = -((1 - sc) / sc) * cross - ((1 - sc) / sc).pow(2) / 2 * dist
        if cond is not None:
            other = cond.reshape(b, 1) != cond.reshape(1, b)
            if free is not None:
                other = other & ~free.reshape(b, 1)
            logits = logits.masked_fill(other, float("-inf"))
        w = torch.softmax(logits, dim=1)
        shift = (x0f - w @ x0f) / sc
        return v.detach() + shift.reshape(x0.shape).to(v.dtype)


def call(model, x, s, t, cond=None, w=None):
    """model(x, s, t, y=cond), with the guidance input w=... only when w is given (models without a
    guidance input never see the keyword)."""
    return model(x, s, t, y=cond) if w is None else model(x, s, t, y=cond, w=w)


def model_fn(model, cond, w=None) -> Callable:
    return lambda x, s, t: call(model, x, s, t, cond, w)


def jvp(model, cond, primals, tangents, w=None, tangent_grad: bool = True):
    """(V, dV) = the JVP of (x, s, t) -> model(x, s, t, y=cond) along ``tangents`` (same shapes).

    By ``flowmap_kernels.func.jvp``: the model's dual form (``forward_jvp``: explicit-tangent fused ops, no
    forward-mode AD, so a torch.compile'd step keeps the fused kernels) when it has one, torch.func.jvp
    otherwise (same results). Both outputs stay in the autograd graph (differentiable w.r.t. the
    parameters); ``tangent_grad=False`` returns dV detached and keeps the backward through it out of the
    graph (methods whose loss stops the gradient of the JVP: MeanFlow, iMF, sCM). A tangent computed by the
    model (iMF's and ESD's v_hat) is cast to its primal's dtype: under torch.autocast it comes out in the
    autocast dtype while the primal x_s stays float32.
    """
    from ..func import bind, jvp as _jvp
    f = bind(model, y=cond) if w is None else bind(model, y=cond, w=w)  # as call(): w only when given
    tangents = tuple(t.to(p.dtype) for p, t in zip(primals, tangents))
    return _jvp(f, tuple(primals), tangents, tangent_grad=tangent_grad)


def sq_err(a, b=None):
    """Per-sample mean over non-batch dims of (a - b)^2 -> (B,)."""
    d = a if b is None else a - b
    return d.pow(2).reshape(d.shape[0], math.prod(d.shape[1:])).mean(1)


def sq_err_sum(a, b=None):
    """Per-sample sum over non-batch dims of (a - b)^2 -> (B,)."""
    d = a if b is None else a - b
    return d.pow(2).reshape(d.shape[0], math.prod(d.shape[1:])).sum(1)


REDUCTIONS = ("sum", "mean")


def weighted_err(pred, target, p: float, c: float, reduce: str):
    """(adaptively weighted per-sample loss, per-sample mean square error), both (B,).

    reduce="sum" (MeanFlow's and iMF's published code): err = sum over the sample's dims of the squared
    error, loss = sg[1 / (err + c)^p] * err; reduce="mean": the same with the per-dimension mean. The
    two differ in scale by the sample size D: on 32x32x4 latents (D = 4096) c = 1e-3 on the sum is
    c ~ 4 on the mean, so the choice matters whenever c is not negligible."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"adaptive_reduce: expected one of {list(REDUCTIONS)}, got {reduce!r}")
    mse = sq_err(pred, target)
    err = mse if reduce == "mean" else sq_err_sum(pred, target)
    return adaptive_weight(err, p, c) * err, mse


def adaptive_weight(err: torch.Tensor, p: float, c: float) -> torch.Tensor:
    """MeanFlow's adaptive weight sg[1 / (err + c)^p] (p = 0: all ones)."""
    if p == 0:
        return torch.ones_like(err)
    return 1.0 / (err.detach() + c).pow(p)


def detached_logs(**kw) -> dict:
    """Log values as detached 0-d tensors (converted to float by the caller when it logs)."""
    return {k: v.detach() if torch.is_tensor(v) else torch.tensor(float(v)) for k, v in kw.items()}


def randn_like(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard normal noise shaped like x (from ``generator`` or torch's global RNG)."""
    return torch.randn(x.shape, dtype=x.dtype, device=x.device, **rng(generator))


def self_or_teacher(model, teacher):
    """The network evaluated under stop-gradient: the given teacher (e.g. EMA weights) or the model."""
    return model if teacher is None else teacher


# ---------------------------------------------------------------------------------------------------
# Classifier-free guidance: label dropout, the null class, guidance as a model input
# ---------------------------------------------------------------------------------------------------

def null_label(model, key: str = "cfg_dropout") -> int:
    """The null-class label of a class-conditional model: ``model.null_label`` (MLPFlowMap built with
    null_class=True) or, for flowmap_kernels.nn.DiT (whose LabelEmbedder keeps a row for it),
    ``model.num_classes``. ValueError naming ``key`` (the setting that needs it) when the model has none."""
    lab = getattr(model, "null_label", None)
    if lab is None:
        emb = getattr(model, "y_embedder", None)
        n = getattr(emb, "num_classes", -1)
        if emb is not None and hasattr(emb, "table") and emb.table.num_embeddings == n + 1:
            lab = emb.num_classes
    if lab is None:
        raise ValueError(f"{key}: classifier-free guidance needs a model with a null class (labels "
                         "num_classes): MLPFlowMap(..., null_class=True) or flowmap_kernels.nn.DiT; "
                         f"{type(model).__name__} has none")
    return int(lab)


def drop_labels(model, cond, p: float, generator=None):
    """Label dropout of classifier-free guidance (Ho & Salimans, arXiv:2207.12598): each label is
    replaced by the model's null class with probability p. Returns (labels, dropped mask or None).
    Draws one uniform per example from ``generator`` only when p > 0 and labels are given (p = 0 draws
    nothing: runs without CFG keep their random streams)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"cfg_dropout: expected a probability in [0, 1], got {p!r}")
    if cond is None or p == 0:
        return cond, None
    null = null_label(model)
    drop = torch.rand(cond.shape[0], device=cond.device, **rng(generator)) < p
    return torch.where(drop, torch.full_like(cond, null), cond), drop


def guidance_dim(model) -> int:
    """How many guidance inputs the model takes through model(..., w=): ``model.guidance_dim`` (0: none)."""
    return int(getattr(model, "guidance_dim", 0) or 0)


def require_guidance_input(model, key: str) -> int:
    d = guidance_dim(model)
    if d < 1:
        raise ValueError(f"{key}: guidance as a model input needs a model that takes w= (MLPFlowMap(..., "
                         f"guidance_dim=1 or 3) or nn.DiT(..., guidance_dim=1)); {type(model).__name__} has none")
    return d


def sample_guidance_scale(n: int, omega_max: float, beta: float, *, device=None, dtype=torch.float32,
                          generator=None) -> torch.Tensor:
    """iMF's per-example guidance scales (arXiv:2512.02012): omega in [1, 1 + omega_max] with density
    proportional to omega^-beta (beta = 1: log-uniform), by inverting the CDF of one uniform draw."""
    if not omega_max >= 0:
        raise ValueError(f"cfg_omega_max: expected a number >= 0, got {omega_max!r}")
    u = torch.rand(n, device=device, dtype=dtype, **rng(generator))
    top = math.log1p(omega_max)
    if beta == 1.0:
        return torch.exp(u * top)
    base = math.expm1((1.0 - beta) * top)
    return torch.exp(torch.log1p(u * base) / (1.0 - beta))


def sample_gap_pair(n: int, c: dict, *, device=None, dtype=torch.float32, generator=None):
    """TVM's time pairs (arXiv:2511.19797, its released loss): the gap s - t = sigmoid(N(gap_mu,
    gap_sigma^2)), the target t from logit-normal(time_mu, time_sigma) truncated to t <= 1 - gap
    (inverse-CDF sampling of the truncated normal in logit space), source s = min(t + gap, 1).
    Draws: one normal (gap), then one uniform (truncated target). Returns (s, t) with s >= t, drawn in float32
    (float64 for float64) and cast to ``dtype`` (ndtri has no 16-bit kernel)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    s, t = _gap_pair(n, c, device, work, generator)
    return s.to(dtype), t.to(dtype)


def _gap_pair(n: int, c: dict, device, dtype, generator):
    gap = torch.sigmoid(c["gap_mu"] + c["gap_sigma"] * torch.randn(n, device=device, dtype=dtype, **rng(generator)))
    hi = torch.logit(1 - gap)  # the largest target time, in logit space
    cdf_hi = torch.special.ndtr((hi - c["time_mu"]) / c["time_sigma"])
    u = torch.rand(n, device=device, dtype=dtype, **rng(generator)) * cdf_hi
    t = torch.sigmoid(c["time_mu"] + c["time_sigma"] * torch.special.ndtri(u))
    return (t + gap).clamp(max=1.0), t
