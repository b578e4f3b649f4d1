"""Flow-map training losses, one module per method, one interface for all.

TIME CONVENTION (the whole project; every formula taken from a paper is converted to it):

    t = 0 is data, t = 1 is noise;  x_t = (1 - t) x0 + t eps,  eps ~ N(0, I);  dx_t/dt = eps - x0.
    The network is the AVERAGE VELOCITY  V(x_s, s, t) = 1/(t - s) * int_s^t v(x_tau, tau) dtau,
    called as model(x, s, t, y=None) with s the source time and t the target time.
    Flow map:  F(x_s, s, t) = x_s + (t - s) V(x_s, s, t);  V(x, t, t) = v(x, t) is the instantaneous
    velocity.  Sampling goes from s = 1 (noise) to t = 0 (data): x0 = F(eps, 1, 0) = eps - V(eps, 1, 0).
    In training pairs s >= t (the source is noisier than the target).

Papers differ: MeanFlow writes u(z_t, r, t) with t the source (our s) and r the target (our t);
shortcut models and some others put noise at t = 0; sCM uses TrigFlow time. Each module's docstring
states its loss in the convention above.

Interface of every module in METHODS:

    loss(model, x0, *, cond=None, **cfg) -> (loss, logs)
        x0 (B, ...) data batch; cond optional labels passed as model(..., y=cond); cfg overrides DEFAULTS
        (unknown keys raise TypeError). loss is a scalar tensor to call .backward() on; logs a dict of
        detached 0-d tensors. Noise and times are drawn from torch's global RNG (or cfg generator).
    NAME           registry name
    NOMINAL_FPE    cost per iteration in forward-pass equivalents of the nominal model (docs/math.md section 4)
    CALLS          the call structure (F forward, B backward, J forward+JVP, BJ backward through a JVP)
    DEFAULTS       the method's hyper-parameters (time sampling, weighting, ratio of s != t, ...)
    TEACHER        None, "self" (stop-gradient copy of the current weights) or "ema" (the trainer passes
                   its EMA model as cfg teacher=...); the loss falls back to "self" when teacher is None
    SAMPLER        "flowmap" (jump with V(x, s, t)), "euler" (V(x, t, t)) or "consistency" (jump to t = 0
                   and re-noise)
"""
from __future__ import annotations

from . import esd, fm, imf, lsd, meanflow, psd, scm, shortcut, tvm

METHODS = {m.NAME: m for m in (fm, meanflow, imf, tvm, scm, lsd, esd, shortcut, psd)}


def get_method(name: str):
    """The method module called ``name``; ValueError naming the choices otherwise."""
    if name not in METHODS:
        raise ValueError(f"method: unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "get_method"]
