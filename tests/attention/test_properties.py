"""Property-based: random shapes and options against the float64 reference (blockwise backend)."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowmap_kernels as fk
from tests.attention.cases import Case
from tests.numerics import rel_err
from tests.reference import loss_on_outputs, ref_grads


@st.composite
def cases(draw):
    kv_heads = draw(st.integers(1, 2))
    mask = draw(st.sampled_from([None, "bool", "float", "bool_dead_rows", "float_dead_rows"]))
    return Case(
        batch=draw(st.integers(1, 2)),
        q_heads=kv_heads * draw(st.integers(1, 3)),
        kv_heads=kv_heads,
        q_len=draw(st.integers(1, 40)),
        kv_len=draw(st.integers(1, 40)),
        head_dim=draw(st.integers(1, 20)),
        v_head_dim=draw(st.one_of(st.none(), st.integers(1, 20))),
        causal=mask is None and draw(st.booleans()),
        mask=mask,
        scale=draw(st.one_of(st.none(), st.floats(0.05, 3.0))),
        seed=draw(st.integers(0, 2 ** 16)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), use_func=st.booleans())
def test_random_configurations_match_reference(case, use_func):
    t = case.make(torch.float64, requires_grad=True)
    xs = [t[n] for n in ("q", "k", "v", "tq", "tk", "tv")]
    if use_func:
        o, to = torch.func.jvp(lambda a, b, c: fk.attention(a, b, c, **case.kwargs), tuple(xs[:3]), tuple(xs[3:]))
    else:
        o, to = fk.attention_jvp(*xs, **case.kwargs)
    grads = torch.autograd.grad(loss_on_outputs(o, to, t["wo"], t["wt"]), xs)
    (ro, rto), rgrads = ref_grads(*xs, t["wo"], t["wt"], **case.kwargs)
    assert rel_err(o, ro) < 1e-10 and rel_err(to, rto) < 1e-10
    for g, rg in zip(grads, rgrads):
        assert rel_err(g, rg) < 1e-10
        assert torch.isfinite(g).all()
