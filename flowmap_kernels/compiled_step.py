"""One flow-map training step (loss with its JVP, backward, gradient clipping, Adam/AdamW update) as ONE
function that torch.compile captures whole (fullgraph=True) with the fused kernels in the graph.

Why it works: the methods take their JVP with ``flowmap_kernels.func.jvp``, which runs the model's dual form
(``forward_jvp``: explicit-tangent custom ops, no forward-mode AD) for the package's models, so nothing in the
step needs Dynamo's forward-mode tracing (which would drop to naive attention). The backward is
``torch.autograd.grad`` traced with ``torch._dynamo.config.trace_autograd_ops`` (set around every call), and
the optimizer update is written here with tensor ops: torch.optim's ``step()`` inserts graph breaks on
purpose (``_use_grad_for_differentiable``), so it cannot sit inside a fullgraph region. The update is
torch's *capturable* Adam/AdamW algorithm on the optimizer's own state (``exp_avg``, ``exp_avg_sq``, a
tensor ``step`` on the parameters' device), so checkpoints and ``optimizer.state_dict()`` keep working, and
the learning rate is a tensor (a new LR each step does not recompile). No ``.item()``, no host
synchronisation, no data-dependent Python branch: CUDA-graph safe (``mode="reduce-overhead"``).

Not inside: the finiteness check of the loss and the EMA update (the caller's, after the step), and
parameters' ``.grad`` (gradients stay local to the step).
"""
from __future__ import annotations

import time
from typing import Optional

import torch

__all__ = ["TrainStep", "COMPILE_MODES"]

COMPILE_MODES = ("none", "default", "reduce-overhead")


def _probe_backends() -> None:
    """Every op backend's availability, probed eagerly (the results are cached): a first probe while Dynamo
    traces would leave a guard on the empty cache, and the next call would recompile the whole step."""
    from .attention.registry import ATTENTION
    from .ops.registry import REGISTRIES
    for reg in (*REGISTRIES.values(), ATTENTION):
        for impl in reg.impls.values():
            impl.is_available()


def _checkpointed(model) -> bool:
    """Whether a module of ``model`` has its forward routed through flowmap_kernels.checkpoint."""
    from .activation_checkpoint import CheckpointedForward
    mods = model.modules() if isinstance(model, torch.nn.Module) else ()
    return any(isinstance(m.__dict__.get("forward"), CheckpointedForward) for m in mods)


def _adam_group(group: dict, optimizer) -> tuple:
    """(betas, eps, weight_decay, decoupled) of one Adam/AdamW param group; unsupported options raise."""
    for key in ("amsgrad", "maximize", "differentiable"):
        if group.get(key, False):
            raise ValueError(f"optimizer: {key}=True is not supported by the compiled step")
    decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
    b1, b2 = group["betas"]
    return float(b1), float(b2), float(group["eps"]), float(group["weight_decay"]), decoupled


def inductor_options(model: torch.nn.Module) -> dict:
    """Inductor settings the compiled step of ``model`` needs, patched around every call (so the compilation
    and any recompilation see them; nothing outside the step changes).

    A model without a dual form (``fk.func.has_dual_form``) takes its JVP with torch.func.jvp inside the compiled
    region. Forward-mode AD gives the parameters' absent tangents as efficient zero tensors
    (``aten._efficientzerotensor``: no storage, immutable), whose buffer inductor (torch 2.13) may reuse as the
    ``out=`` of a later matmul in the backward through the JVP (TVM, LSD): "RuntimeError: ZeroTensors are
    immutable" (pytorch/pytorch#184312 proposed the same cure upstream). Without buffer reuse every buffer is
    allocated afresh: the same graph and results, a little more memory. Models with a dual form (the
    package's DiT: no forward-mode AD, no zero tensors) keep inductor's defaults."""
    from .func import has_dual_form
    return {} if has_dual_form(model) else {"allow_buffer_reuse": False}


class TrainStep:
    """``step(x0, cond=None, lr=None) -> (loss, logs)`` (detached tensors): one optimisation step of
    ``method.loss(model, x0, cond=cond, **method_cfg)``.

    model: the network (its dual form makes the JVP compile with the fused kernels; a model without one
    still works, with torch.func.jvp inside: naive attention, see ``fk.func``). method: a
    ``flowmap_kernels.methods`` module (or anything with ``loss(model, x0, cond=..., **cfg)``). optimizer:
    ``torch.optim.Adam`` or ``AdamW`` over (a subset of) the model's parameters, its state is updated in
    place. compile: "none" (eager, the same code), "default" or "reduce-overhead" (torch.compile with
    fullgraph=True; ``backend`` as torch.compile's, e.g. "aot_eager"). grad_clip: clip the global gradient
    norm to this value (0: off), as torch.nn.utils.clip_grad_norm_. ``compile_seconds`` is the wall time of
    the first call (tracing and compilation plus one step) when compiled.
    """

    def __init__(self, model: torch.nn.Module, method, optimizer: torch.optim.Optimizer, *,
                 compile: str = "default", backend: Optional[str] = None, grad_clip: float = 0.0,
                 method_cfg: Optional[dict] = None):
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile: expected one of {list(COMPILE_MODES)}, got {compile!r}")
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise ValueError(f"optimizer: the compiled step implements Adam and AdamW, got {type(optimizer).__name__}")
        if not hasattr(method, "loss"):
            raise ValueError(f"method: expected a flowmap_kernels.methods module (with loss), got {method!r}")
        if not grad_clip >= 0:
            raise ValueError(f"grad_clip: expected a non-negative number, got {grad_clip!r}")
        self.method_cfg = dict(method_cfg or {})
        if compile != "none" and self.method_cfg.get("generator") is not None:
            raise ValueError("method_cfg: generator= (a torch.Generator) cannot be traced by torch.compile; use "
                             "torch.manual_seed, or compile='none'")
        if compile == "reduce-overhead" and backend not in (None, "inductor"):
            raise ValueError(f"backend: mode 'reduce-overhead' needs the inductor backend, got {backend!r}")
        if compile != "none" and _checkpointed(model):
            raise ValueError("model: activation checkpointing (fk.checkpoint under forward mode) runs eagerly, it "
                             "cannot sit inside the fullgraph compiled step; undo it with "
                             "fk.apply_activation_checkpointing(model, 'none') or use compile='none'")
        self.model, self.method, self.optimizer = model, method, optimizer
        self.grad_clip, self.compile_mode, self.backend = float(grad_clip), compile, backend
        self.groups = [(list(g["params"]), _adam_group(g, optimizer)) for g in optimizer.param_groups]
        self.params = [p for ps, _ in self.groups for p in ps]
        if any(not p.requires_grad for p in self.params):
            raise ValueError("optimizer: every optimised parameter must require grad")
        dev = self.params[0].device if self.params else torch.device("cpu")
        self._lrs = [torch.zeros((), dtype=torch.float64, device=dev) for _ in self.groups]
        if compile != "none":
            for t in self._lrs:
                torch._dynamo.mark_static_address(t)
        self._states = None
        self._inductor_options = inductor_options(model)
        self.compile_seconds: Optional[float] = None
        self.calls = 0
        if compile == "none":
            self._fn = self._step
        else:
            kw = {"fullgraph": True}
            if compile == "reduce-overhead":
                kw["mode"] = "reduce-overhead"
            elif backend is not None:
                kw["backend"] = backend
            self._fn = torch.compile(self._step, **kw)

    # -- state ----------------------------------------------------------------------------------------
    def _init_states(self):
        """The optimizer's Adam state for every parameter (created as torch.optim would; ``step`` as a tensor
        on the parameter's device, as torch's capturable mode keeps it)."""
        states = []
        for ps, _ in self.groups:
            group_states = []
            for p in ps:
                st = self.optimizer.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                else:
                    st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).to(p.device)
                group_states.append((st["step"], st["exp_avg"], st["exp_avg_sq"]))
                if self.compile_mode != "none":  # fixed addresses: CUDA graphs may update them in place
                    for t in group_states[-1]:
                        torch._dynamo.mark_static_address(t)
            states.append(group_states)
        return states

    # -- the step (what torch.compile traces) ------------------------------------------------------------
    def _step(self, x0, cond, lrs, states, method_kwargs):
        loss, logs = self.method.loss(self.model, x0, cond=cond, **{**self.method_cfg, **method_kwargs})
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        with torch.no_grad():
            present = [g for g in grads if g is not None]
            if self.grad_clip > 0 and present:
                total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0) for g in present]), 2.0)
                coef = torch.clamp(self.grad_clip / (total + 1e-6), max=1.0)
                grads = [None if g is None else g * coef.to(g.dtype) for g in grads]
            i = 0
            for (ps, (b1, b2, eps, wd, decoupled)), lr, group_states in zip(self.groups, lrs, states):
                for p, (step_t, exp_avg, exp_avg_sq) in zip(ps, group_states):
                    g = grads[i]
                    i += 1
                    if g is None:  # as torch.optim: parameters without a gradient are skipped
                        continue
                    # torch.optim.Adam(W), capturable algorithm (tensor step and lr: no host value)
                    step_t.add_(1)
                    if wd != 0:
                        if decoupled:
                            p.mul_(1 - lr * wd)
                        else:
                            g = g.add(p, alpha=wd)
                    exp_avg.lerp_(g, 1 - b1)
                    exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
                    n = step_t.double()  # bias corrections in float64, as torch's Python-float path
                    bias_correction1 = 1 - torch.pow(b1, n)
                    bias_correction2 = 1 - torch.pow(b2, n)
                    step_size_neg = (lr / bias_correction1).neg()
                    denom = (exp_avg_sq.sqrt() / (bias_correction2.sqrt() * step_size_neg)).add_(eps / step_size_neg)
                    p.addcdiv_(exp_avg, denom)
        return loss.detach(), logs

    def __call__(self, x0: torch.Tensor, cond: Optional[torch.Tensor] = None, lr=None, **method_kwargs):
        """One step; ``lr``: a float for every group (None: each group's current ``lr``); ``method_kwargs``
        update ``method_cfg`` for this call (e.g. ``step=`` for sCM's warm-up; a Python number that changes
        recompiles once, after which Dynamo treats it as dynamic)."""
        if self._states is None:
            self._states = self._init_states()
            _probe_backends()
        for lr_t, g in zip(self._lrs, self.optimizer.param_groups):
            value = g["lr"] if lr is None else lr
            if lr is not None:
                g["lr"] = lr
            lr_t.fill_(float(value))
        first = self.calls == 0 and self.compile_mode != "none"
        t0 = time.perf_counter()
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        import torch._inductor.config as inductor_config
        with torch._dynamo.config.patch(trace_autograd_ops=True), inductor_config.patch(self._inductor_options):
            out = self._fn(x0, cond, self._lrs, self._states, method_kwargs)
        if self.compile_mode == "reduce-overhead":  # CUDA-graph outputs are overwritten by the next replay
            out = torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)
        if first:
            self.compile_seconds = time.perf_counter() - t0
        self.calls += 1
        return out
