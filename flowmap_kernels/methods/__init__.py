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
    DEFAULTS       the method's hyper-parameters (time sampling, weighting, ratio of s != t, ...); every
                   method takes ``cfg_dropout`` (label dropout to the model's null class for
                   classifier-free guidance, 0 = off)
    TEACHER        None, "self" (stop-gradient copy of the current weights) or "ema" (the trainer passes
                   its EMA model as cfg teacher=...); the loss falls back to "self" when teacher is None
    TEACHER_EMA_DECAY, EVAL_EMA_DECAY   (optional, TVM) the decays of the teacher EMA and of a second EMA
                   kept only for evaluation (the training loop's --ema-decay / --eval-ema-decay defaults)
    SAMPLER        "flowmap" (jump with V(x, s, t)), "euler" (V(x, t, t)) or "consistency" (jump to t = 0
                   and re-noise)
    GUIDANCE       (optional) how sampling applies a guidance scale: "cfg" (default: the standard
                   combination V_null + omega (V_c - V_null), two forwards), "input" (iMF: the scale is
                   a model input, w=omega) or "scaled_input" (TVM: input, and the output times omega)
    prepare_model  (optional, sCM) prepare_model(model, cfg) -> the module to train (see prepare_model)
"""
from __future__ import annotations

from . import esd, fm, imf, lsd, meanflow, psd, scm, shortcut, tvm

METHODS = {m.NAME: m for m in (fm, meanflow, imf, tvm, scm, lsd, esd, shortcut, psd)}


def guidance_input_dim(method, cfg=None, model_kind: str = "mlp") -> int:
    """How many guidance inputs (model(..., w=)) ``method`` with config ``cfg`` needs from the network: iMF
    with cfg_omega_max > 0: 3 for the MLP (scale and interval), 1 for the DiT (scale); TVM with a guidance
    scale (cfg_scale != 1 or cfg_scale_range): 1; else 0. For building the network (MLPFlowMap /
    nn.DiT guidance_dim)."""
    c = {**method.DEFAULTS, **dict(cfg or {})}
    if method.NAME == "imf" and c.get("cfg_omega_max", 0) > 0:
        return 3 if model_kind == "mlp" else 1
    if method.NAME == "tvm" and (c.get("cfg_scale", 1.0) != 1.0 or c.get("cfg_scale_range") is not None):
        return 1
    return 0


# The settings that make a method's training target guided (it mixes in the null class's output): (key, active).
_GUIDED_TARGET = {"meanflow": (("cfg_scale", lambda v: v != 1.0), ("cfg_kappa", lambda v: v != 0.0)),
                  "imf": (("cfg_omega_max", lambda v: v > 0),),
                  "tvm": (("cfg_scale", lambda v: v != 1.0), ("cfg_scale_range", lambda v: v is not None))}


def guided_target_settings(method, cfg=None) -> dict:
    """{key: value} of the settings that make training ``method`` with ``cfg`` use a guided target (MeanFlow
    cfg_scale != 1 or cfg_kappa != 0, iMF cfg_omega_max > 0, TVM cfg_scale != 1 or cfg_scale_range); {} when
    guidance is off."""
    c = {**method.DEFAULTS, **dict(cfg or {})}
    return {k: c[k] for k, active in _GUIDED_TARGET.get(method.NAME, ()) if k in c and active(c[k])}


def uses_null_class(method, cfg=None) -> bool:
    """Whether training ``method`` with ``cfg`` on labelled data needs the model's null class: label dropout
    (cfg_dropout > 0) or a guided target (:func:`guided_target_settings`). For building the network
    (MLPFlowMap null_class)."""
    c = {**method.DEFAULTS, **dict(cfg or {})}
    return c.get("cfg_dropout", 0) > 0 or bool(guided_target_settings(method, cfg))


def uses_aux_velocity(method, cfg=None) -> bool:
    """Whether ``method`` with ``cfg`` trains an auxiliary velocity head (iMF aux_head, arXiv:2512.02012):
    for building the network (MLPFlowMap / nn.DiT aux_velocity)."""
    return bool({**method.DEFAULTS, **dict(cfg or {})}.get("aux_head", False))


def prepare_model(method, model, cfg=None):
    """The network as ``method`` with config ``cfg`` trains it: the module's prepare_model when it has
    one (sCM: TrigFlow wrapper, learned loss weighting), else ``model`` itself. Call after building the
    network, before the optimizer and the EMA copy."""
    prep = getattr(method, "prepare_model", None)
    return model if prep is None else prep(model, cfg)


def get_method(name: str):
    """The method module called ``name``; ValueError naming the choices otherwise."""
    if name not in METHODS:
        raise ValueError(f"method: unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "get_method", "prepare_model", "guidance_input_dim", "guided_target_settings", "uses_null_class",
           "uses_aux_velocity"]
