"""Launch configurations of the Triton attention kernels: one visible table, one lookup function.

Every kernel launch takes its tile sizes from :func:`get_config`. The table is keyed by kernel name
(``forward``, ``jvp_forward``, the one-pass backwards ``backward_atomic``, ``jvp_backward_atomic`` and
the deterministic ones ``backward_dkdv``, ``backward_dq``, ``jvp_backward_dkdv``, ``jvp_backward_dq``; the
row pre-passes use a fixed small config), by the padded head dim bucket
(the power of two >= max(D, Dv, 16): 16, 32, 64, 128, 256; on sm90 / sm100 the launchers zero-pad other
head dims to it, elsewhere the tiles mask their columns), by the element size (2 bytes for
fp16/bf16, 4 for fp32) and by the tile table of the architecture family (:data:`FAMILIES`: each GPU
generation with its real limits; consumer parts with 99 KB of shared memory per block use the A100
tiles, Blackwell datacenter parts the Hopper tiles). The entries were chosen with
``python -m flowmap_kernels.compile_report``
(no register spills on sm_90a up to D=128 for 16-bit inputs; see docs/triton.md for the measured table).

In Triton's CPU interpreter (TRITON_INTERPRET=1) the cost is per program and per key block, not per
FLOP, so the lookup returns :data:`INTERPRETER_CONFIG` (large tiles) unless a test overrides it with
:func:`override`.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator, Optional

from ..._autodiff import triton_interpreter

KERNELS = ("forward", "jvp_forward", "jvp_forward_tma", "jvp_forward_tangent_fp32", "backward_atomic",
           "backward_dkdv", "backward_dq", "jvp_backward_atomic", "jvp_backward_atomic_pointer",
           "jvp_backward_atomic_masked", "jvp_backward_dkdv", "jvp_backward_dq")
#: Suffixes of the key-block launch variants: a kernel's tiles for problems its launcher cannot give tensor
#: descriptors ("_pointer") or that read a mask ("_masked"), where the dense tile would spill.
LAUNCH_VARIANTS = ("_pointer", "_masked")
HEAD_DIM_BUCKETS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ArchFamily:
    """A GPU generation: its compile targets, limits and the tile table its launches use.

    ``shared_bytes``: opt-in shared memory per block; ``registers``: per thread; ``mma``: the tensor-core
    instruction kind Triton emits there; ``tiles``: the key of :data:`TABLE` (a family whose limits
    admit another family's tiles shares them, and the compile report checks every launch against
    ``shared_bytes``).
    """

    name: str
    targets: tuple
    shared_bytes: int
    mma: str
    tiles: str
    devices: str
    registers: int = 255


FAMILIES = {f.name: f for f in (
    ArchFamily("sm80", ("sm_80",), 166912, "mma.sync", "sm80", "A100, A30"),
    ArchFamily("sm86", ("sm_86", "sm_89"), 101376, "mma.sync", "sm80", "RTX 30 / 40, A10, A40, L4, L40"),
    ArchFamily("sm90", ("sm_90a",), 232448, "wgmma", "sm90", "H100, H200, GH200"),
    ArchFamily("sm100", ("sm_100a",), 232448, "tcgen05", "sm90", "B200, GB200"),
    ArchFamily("sm120", ("sm_120",), 101376, "mma.sync", "sm80", "RTX 50, RTX PRO Blackwell"),
)}
ARCHS = tuple(FAMILIES)
#: compile target ("sm_86") -> family name ("sm86")
TARGETS = {t: f.name for f in FAMILIES.values() for t in f.targets}


@dataclass(frozen=True)
class KeyBlockPart:
    """One launch of the key-block kernel (dK, dV and their tangents): the outputs it writes.

    ``suffix`` names the launch in the compile report (``jvp_backward_dkdv[dk]``; "" for a launch writing
    all of them); ``dk``, ``dtk``: dK, dtK; ``dv``: dV (and dtV with tangents: they share their products).
    One-pass backward (:data:`ONE_PASS`): ``dq_ds``, ``dq_dts``, ``dtq`` add dQ's dS K term, dQ's dtS tK
    term and dtQ to float32 buffers with atomics (the terms of :class:`QueryBlockPart`).
    """

    suffix: str
    dk: bool
    dtk: bool
    dv: bool
    dq_ds: bool = False
    dq_dts: bool = False
    dtq: bool = False

    def constexprs(self) -> dict:
        return dict(WANT_DK=self.dk, WANT_DTK=self.dtk, WANT_DV=self.dv, ADD_DQ_DS=self.dq_ds,
                    ADD_DQ_DTS=self.dq_dts, ADD_DTQ=self.dtq)


@dataclass(frozen=True)
class QueryBlockPart:
    """One launch of the query-block kernel (dQ and dtQ): the terms it writes.

    dQ = scale sum_n (dS K + dtS tK): ``dq_ds`` the dS K term, ``dq_dts`` the dtS tK term; ``dtq``: dtQ.
    ``to_partial``: its dQ terms go to a float32 partial dQ that a later launch with ``add_partial`` adds.
    """

    suffix: str
    dq_ds: bool
    dq_dts: bool
    dtq: bool
    to_partial: bool = False
    add_partial: bool = False

    def constexprs(self) -> dict:
        return dict(DQ_DS=self.dq_ds, DQ_DTS=self.dq_dts, WANT_DTQ=self.dtq, ADD_PARTIAL=self.add_partial)


@dataclass(frozen=True)
class LaunchParts:
    """How the tangent backward divides its outputs over launches of the key-block kernel (``key_block``)
    and of the query-block kernel (``query_block``): split launches hold fewer fp32 accumulators and
    resident tiles in registers at large head dims, for a few recomputed products. ``tag`` ends the name
    of a config that splits ("32x64/w4/s1/split3"). The primal backward never splits (:data:`PRIMAL`)."""

    tag: str
    key_block: tuple
    query_block: tuple


#: One launch of each kernel, every output.
FUSED = LaunchParts("", (KeyBlockPart("", True, True, True),), (QueryBlockPart("", True, True, True),))
#: dK+dtK | dV+dtV, and dQ | dtQ.
BY_OUTPUT = LaunchParts(
    "split2",
    (KeyBlockPart("dk,dtk", True, True, False), KeyBlockPart("dv,dtv", False, False, True)),
    (QueryBlockPart("dq", True, True, False), QueryBlockPart("dtq", False, False, True)))
#: dK | dtK | dV+dtV, and dtQ with dQ's dtS tK term (into a float32 partial) | dQ's dS K term plus that partial.
BY_TERM = LaunchParts(
    "split3",
    (KeyBlockPart("dk", True, False, False), KeyBlockPart("dtk", False, True, False),
     KeyBlockPart("dv,dtv", False, False, True)),
    (QueryBlockPart("dtq,dq_dts", False, True, True, to_partial=True),
     QueryBlockPart("dq_ds", True, False, False, add_partial=True)))
#: The primal backward (no tangent terms): dK and dV in one launch, dQ in one.
PRIMAL = LaunchParts("", (KeyBlockPart("", True, False, True),), (QueryBlockPart("", True, False, False),))
#: Launch parts of the tangent backward by the tag in a config's name.
PARTS = {p.tag: p for p in (FUSED, BY_OUTPUT, BY_TERM)}

#: The one-pass backward (kernels ``backward_atomic``, ``jvp_backward_atomic``): the key-block launches of a
#: config's parts, each adding the dQ / dtQ terms whose dS / dtS it holds with atomics; no query-block launch.
#: With "" (one launch): 15 products per tile with tangents, the mathematical minimum (docs/math.md).
ONE_PASS = {
    "": LaunchParts("", (KeyBlockPart("", True, True, True, True, True, True),), ()),
    "split2": LaunchParts("split2", (KeyBlockPart("dk,dtk,dq,dtq", True, True, False, True, True, True),
                                     KeyBlockPart("dv,dtv", False, False, True)), ()),
    "split3": LaunchParts("split3", (KeyBlockPart("dk,dq_ds", True, False, False, True),
                                     KeyBlockPart("dtk,dtq,dq_dts", False, True, False, False, True, True),
                                     KeyBlockPart("dv,dtv", False, False, True)), ()),
}
#: The primal one-pass backward: dK, dV and dQ's atomics in one launch (5 products per tile, as FlashAttention-2).
PRIMAL_ONE_PASS = LaunchParts("", (KeyBlockPart("", True, False, True, True),), ())


@dataclass(frozen=True)
class Config:
    """Tile sizes: BLOCK_M query rows and BLOCK_N key rows per tile; num_warps, num_stages as in Triton;
    ``parts``: the launches of the tangent backward (:class:`LaunchParts`; read by the backward kernels)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    parts: LaunchParts = FUSED

    def as_dict(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps,
                    num_stages=self.num_stages)

    def __str__(self) -> str:
        tag = f"/{self.parts.tag}" if self.parts.tag else ""
        return f"{self.block_m}x{self.block_n}/w{self.num_warps}/s{self.num_stages}{tag}"

    @classmethod
    def parse(cls, name: str) -> "Config":
        """The config named ``name`` (its ``str``: "32x64/w4/s1/split3")."""
        m = re.fullmatch(r"(\d+)x(\d+)/w(\d+)/s(\d+)(?:/(\w+))?", name)
        if m is None or (m.group(5) or "") not in PARTS:
            raise ValueError(f"config: expected a name such as '32x64/w4/s1' or '32x64/w4/s1/split3', got {name!r}")
        return cls(*(int(g) for g in m.groups()[:4]), PARTS[m.group(5) or ""])


C, S2, S3 = Config, BY_OUTPUT, BY_TERM  # S2, S3: the split tangent backward ("/split2", "/split3")
# TABLE[(kernel, arch)][(head_dim_bucket, element_bytes)] -> Config.
# A missing element size falls back to the 2-byte entry of the same bucket.
TABLE: dict = {
    ("forward", "sm90"): {
        (16, 2): C(128, 64, 4, 3), (32, 2): C(128, 64, 4, 3), (64, 2): C(128, 64, 4, 3),
        (128, 2): C(128, 64, 8, 3), (256, 2): C(64, 64, 8, 2),
        (16, 4): C(64, 64, 4, 2), (32, 4): C(64, 64, 4, 2), (64, 4): C(64, 64, 4, 2),
        (128, 4): C(64, 32, 4, 2), (256, 4): C(32, 32, 4, 1),
    },
    # float32 on mma.sync (sm80 and the sm86 / sm120 families that borrow these tiles), 3xTF32 products:
    # (16, 4), (32, 4), (64, 4) are the largest tiles spill-free on sm_80, sm_86 and sm_120 at D = 16, 32, 48
    # and 64 (the compile report; the earlier 64x64 forward+JVP at D = 32 spilled 37 KB on sm_80, the tangent
    # backwards at D = 64 2-32 KB): the tangent backwards split (/split3) from D = 32, one launch at D = 16.
    ("forward", "sm80"): {
        (16, 2): C(128, 64, 4, 3), (32, 2): C(128, 64, 4, 3), (64, 2): C(128, 64, 4, 3),
        (128, 2): C(128, 32, 8, 2), (256, 2): C(64, 32, 8, 1),
        (16, 4): C(64, 64, 4, 2), (32, 4): C(64, 32, 4, 2), (64, 4): C(64, 16, 4, 2),
        (128, 4): C(32, 32, 4, 2), (256, 4): C(32, 32, 4, 1),
    },
    # D = 128: 128x32/w8 with pointer loads (and float32 tO); the tensor-descriptor variant takes 128x64
    ("jvp_forward", "sm90"): {
        (16, 2): C(128, 64, 8, 2), (32, 2): C(128, 64, 8, 2), (64, 2): C(128, 64, 8, 2),
        (128, 2): C(128, 32, 8, 2), (256, 2): C(64, 32, 8, 1),
        (16, 4): C(64, 32, 4, 2), (32, 4): C(64, 32, 4, 2), (64, 4): C(32, 16, 4, 2),
        (128, 4): C(32, 32, 4, 1), (256, 4): C(32, 32, 4, 1),
    },
    # D = 48 / 64: 128x32/w8 (64x64/w4 spilled 24 B at D = 48); D = 72..128: 128x16 (128x32 spilled 344-708 B)
    ("jvp_forward", "sm80"): {
        (16, 2): C(128, 64, 8, 2), (32, 2): C(128, 64, 8, 2), (64, 2): C(128, 32, 8, 2),
        (128, 2): C(128, 16, 8, 2), (256, 2): C(32, 32, 4, 1),
        (16, 4): C(64, 32, 4, 2), (32, 4): C(64, 32, 4, 2), (64, 4): C(16, 32, 4, 2),
        (128, 4): C(32, 32, 4, 1), (256, 4): C(32, 32, 4, 1),
    },
    ("backward_dkdv", "sm90"): {
        (16, 2): C(64, 128, 8, 2), (32, 2): C(64, 128, 8, 2), (64, 2): C(64, 128, 8, 2),
        (128, 2): C(64, 128, 8, 2), (256, 2): C(32, 32, 4, 1),
        (16, 4): C(32, 64, 4, 2), (32, 4): C(32, 64, 4, 2), (64, 4): C(16, 64, 4, 2),
        (128, 4): C(32, 32, 4, 1), (256, 4): C(16, 32, 4, 1),
    },
    ("backward_dkdv", "sm80"): {  # D = 72..128: 32x32/w4 (32x64/w8 spilled 8-28 B at D = 72)
        (16, 2): C(32, 128, 8, 2), (32, 2): C(32, 128, 8, 2), (64, 2): C(32, 128, 8, 2),
        (128, 2): C(32, 32, 4, 2), (256, 2): C(16, 32, 4, 1),
        (16, 4): C(32, 64, 4, 2), (32, 4): C(16, 32, 4, 2), (64, 4): C(32, 32, 4, 2),
        (128, 4): C(32, 32, 4, 1), (256, 4): C(16, 32, 4, 1),
    },
    ("backward_dq", "sm90"): {
        (16, 2): C(128, 64, 8, 2), (32, 2): C(128, 64, 8, 2), (64, 2): C(128, 64, 8, 2),
        (128, 2): C(128, 64, 8, 2), (256, 2): C(32, 32, 4, 1),
        (16, 4): C(64, 32, 4, 2), (32, 4): C(64, 32, 4, 2), (64, 4): C(64, 32, 4, 2),
        (128, 4): C(32, 32, 4, 1), (256, 4): C(32, 16, 4, 1),
    },
    ("backward_dq", "sm80"): {
        (16, 2): C(128, 32, 8, 2), (32, 2): C(128, 32, 8, 2), (64, 2): C(128, 32, 8, 2),
        (128, 2): C(64, 32, 8, 2), (256, 2): C(32, 16, 4, 1),
        (16, 4): C(64, 32, 4, 2), (32, 4): C(64, 32, 4, 2), (64, 4): C(32, 32, 4, 2),
        (128, 4): C(32, 32, 4, 1), (256, 4): C(32, 16, 4, 1),
    },
    ("jvp_backward_dkdv", "sm90"): {  # 2 stages: spill-free as with 1, fewer waits per key block (9 vs 12)
        (16, 2): C(32, 128, 8, 2), (32, 2): C(32, 128, 8, 2), (64, 2): C(32, 128, 8, 2),
        (128, 2): C(32, 64, 4, 2, S3), (256, 2): C(16, 64, 4, 1, S3),
        (16, 4): C(16, 64, 4, 1, S3), (32, 4): C(16, 64, 4, 1, S3), (64, 4): C(16, 16, 4, 1, S3),
        (128, 4): C(16, 32, 4, 1), (256, 4): C(16, 16, 4, 1),
    },
    ("jvp_backward_dkdv", "sm80"): {  # D = 64..128: 32x32/w4 (32x64/w8 spilled 12-788 B)
        (16, 2): C(32, 64, 8, 2), (32, 2): C(32, 64, 8, 2), (64, 2): C(32, 32, 4, 2),
        (128, 2): C(32, 32, 4, 2, S3), (256, 2): C(16, 32, 4, 1),
        (16, 4): C(16, 32, 4, 2), (32, 4): C(32, 16, 4, 2, S3), (64, 4): C(32, 16, 4, 2, S3),
        (128, 4): C(16, 32, 4, 1), (256, 4): C(16, 16, 4, 1),
    },
    ("jvp_backward_dq", "sm90"): {
        (16, 2): C(128, 64, 8, 2), (32, 2): C(128, 64, 8, 2), (64, 2): C(128, 64, 8, 2),
        (128, 2): C(128, 32, 8, 2, S2), (256, 2): C(64, 16, 4, 1, S2),
        (16, 4): C(64, 32, 4, 1, S2), (32, 4): C(64, 32, 4, 1, S2), (64, 4): C(64, 16, 4, 1, S3),
        (128, 4): C(32, 16, 4, 1), (256, 4): C(16, 16, 4, 1),
    },
    ("jvp_backward_dq", "sm80"): {  # D = 72..128: 16x32/split3 (32x32/split2 spilled 200-440 B)
        (16, 2): C(64, 32, 8, 2), (32, 2): C(64, 32, 8, 2), (64, 2): C(64, 32, 8, 2),
        (128, 2): C(16, 32, 4, 2, S3), (256, 2): C(32, 16, 4, 1),
        (16, 4): C(32, 32, 4, 1), (32, 4): C(32, 16, 4, 2, S3), (64, 4): C(16, 16, 4, 2, S3),
        (128, 4): C(32, 16, 4, 1), (256, 4): C(16, 16, 4, 1),
    },
}
# Entries where a family departs from the tiles it borrows (FAMILIES[...].tiles), found by the compile report:
# on sm_100a the Hopper tiles of these launches compile to a kernel that only traps (D = 256: every 64-row
# jvp_forward tile; the dV+dtV part of jvp_backward_dkdv at 16x64) or spill 216 B (D = 128 [dk] part).
# float32 at D = 32 and 64 (and 33..63, run padded to 64): the Hopper tiles spill 16 B-2.6 KB on sm_100a; these
# are spill-free there.
FAMILY_TABLE: dict = {
    ("forward", "sm100"): {(32, 4): C(64, 32, 4, 2), (64, 4): C(64, 32, 4, 2)},
    # sm_120: the sm80 32x128/w8/s2 spills 24 B at D = 16, the float32 tiles 12-44 B at D = 32 / 64
    ("backward_atomic", "sm120"): {(16, 2): C(32, 128, 8, 3), (32, 4): C(16, 16, 4, 2), (64, 4): C(16, 32, 4, 2)},
    # sm_120: the sm80 forward tiles spill 160 B at D = 48 / 64 (128x64/w4/s3) and D = 72 (128x32/w8/s2)
    ("forward", "sm120"): {(64, 2): C(128, 32, 4, 3), (128, 2): C(64, 64, 4, 2)},
    # sm_120: the sm80 128x16/w8/s2 spills 48 B at D = 80..128 (620 B at D = 72), float32 64x32 64 B at D = 32
    ("jvp_forward", "sm120"): {(128, 2): C(32, 32, 4, 2), (32, 4): C(64, 16, 4, 2)},
    ("jvp_backward_dq", "sm120"): {(32, 4): C(16, 16, 4, 2, S3)},  # float32: the sm80 32x16 [dq_ds] spills 32 B
    # sm_100a: with pointer loads (and float32 tO) the Hopper 128x64/w8/s2 spills 24-48 B at D = 128; the
    # tensor-descriptor variant keeps it (below); float32 at D = 64: 32x16/w4/s2 spilled 8-32 B
    ("jvp_forward", "sm100"): {(256, 2): C(32, 32, 4, 1), (128, 2): C(64, 64, 8, 2), (64, 4): C(16, 32, 4, 2)},
    ("backward_dkdv", "sm100"): {(64, 4): C(32, 32, 4, 2)},
    ("backward_dq", "sm100"): {(128, 2): C(64, 64, 8, 2),  # the Hopper 128x64/w8/s2 spills 24 B there
                               (64, 4): C(32, 32, 4, 2)},
    ("jvp_backward_dkdv", "sm100"): {(128, 2): C(32, 64, 8, 1, S3), (256, 2): C(16, 32, 4, 1, S3),
                                     (32, 4): C(32, 16, 4, 2, S3)},
    ("jvp_backward_dq", "sm100"): {(32, 4): C(32, 16, 4, 2, S3), (64, 4): C(16, 32, 4, 2, S3)},
}
# The one-pass backward (dQ by atomics; the parts of a config's tag are ONE_PASS[tag]). sm90: spill-free up to
# D = 128 in 16-bit (15 products in one launch up to D = 64 with 32 query columns, m64n32 score products; at
# D = 48 / 64, 32x128/w8/s2 with dQ and dtQ added by tensor-descriptor reductions: 254 registers (with pointer
# atomics every 32-column tile spilled 56-112 B, 1-4 stages, 4 or 8 warps); 32x64/w4/s2/split3 at D = 128:
# 20 products, m64n32; one launch spills KBs there, two 236 B) and as shipped in float32, every 16-bit launch
# pipelined.
# sm80 (mma.sync): the key-block kernels' tiles for the primal backward, 32x32/w4/s2 for the tangent one.
TABLE.update({
    ("backward_atomic", "sm90"): {
        (16, 2): C(64, 128, 8, 2), (32, 2): C(64, 128, 8, 2), (64, 2): C(64, 128, 8, 2),
        (128, 2): C(32, 128, 8, 2), (256, 2): C(32, 32, 4, 1),
        (16, 4): C(16, 64, 4, 2), (32, 4): C(16, 64, 4, 2), (64, 4): C(16, 32, 4, 2),
        (128, 4): C(32, 32, 4, 1), (256, 4): C(16, 32, 4, 1),
    },
    # float32 D = 64: tiles within the 99 KB of the sm86 / sm120 families, which take these; D = 72..128:
    # 16x32/w4/s2 (the dK/dV tile's 32x32/w4/s2 spills 36 B with dQ's atomics in a causal problem)
    ("backward_atomic", "sm80"): {**TABLE[("backward_dkdv", "sm80")], (64, 4): C(32, 32, 4, 2),
                                  (128, 2): C(16, 32, 4, 2)},
    ("jvp_backward_atomic", "sm90"): {
        (16, 2): C(32, 128, 8, 2), (32, 2): C(32, 64, 4, 2), (64, 2): C(32, 128, 8, 2),
        (128, 2): C(32, 64, 4, 2, S3), (256, 2): C(16, 64, 4, 1, S3),
        (16, 4): C(16, 64, 4, 2, S3), (32, 4): C(16, 64, 4, 2, S3), (64, 4): C(16, 16, 4, 1, S3),
        (128, 4): C(16, 32, 4, 1), (256, 4): C(16, 16, 4, 1),
    },
    # mma.sync: 32x32 tiles, 2 stages, spill-free on sm_80 / sm_86 / sm_120 up to D = 128 (32x64/w8: 212 B at D = 64)
    ("jvp_backward_atomic", "sm80"): {
        (16, 2): C(32, 32, 4, 2), (32, 2): C(32, 32, 4, 2), (64, 2): C(32, 32, 4, 2),
        (128, 2): C(32, 32, 4, 2, S3), (256, 2): C(16, 32, 4, 1, S3),
        (16, 4): C(16, 32, 4, 2), (32, 4): C(16, 32, 4, 2, S3), (64, 4): C(16, 16, 4, 2, S3),
        (128, 4): C(16, 32, 4, 1), (256, 4): C(16, 16, 4, 1),
    },
})
# sm100 keeps its accumulators in tensor memory: the one-pass tangent backward fits 32 query columns at D = 64
# there in one launch (no spill; on sm_90a the same tile spills 64 B); float32 at D = 32: 16x32/split3 (no spill)
FAMILY_TABLE.update({("jvp_backward_atomic", "sm100"): {**FAMILY_TABLE[("jvp_backward_dkdv", "sm100")],
                                                        (64, 2): C(32, 64, 4, 2), (32, 4): C(16, 32, 4, 2, S3)}})


def _launch_variant(kernel: str, base: str, own: Optional[dict] = None) -> None:
    """Table entries of ``kernel``, a launch variant of ``base``: ``base``'s tiles in every table, then the
    variant's ``own`` entries ({family: {(bucket, bytes): Config}}) over them: in :data:`TABLE` for a family
    with a tile table of its own, in :data:`FAMILY_TABLE` for one that borrows another's tiles."""
    for table in (TABLE, FAMILY_TABLE):
        for (k, arch), entries in list(table.items()):
            if k == base:
                table[(kernel, arch)] = dict(entries)
    for arch, entries in (own or {}).items():
        table = TABLE if (base, arch) in TABLE else FAMILY_TABLE
        table.setdefault((kernel, arch), {}).update(entries)


# The forward+JVP with a float32 tO from 16-bit inputs (TANGENT_FP32: the probabilities enter the tangent
# products as two 16-bit parts, 9 products) and with tensor-descriptor (TMA) loads of the key-loop tiles
# (sm90 / sm100, where the strides allow, launch.descriptors_allowed): the jvp_forward tiles. At D = 128 on
# sm_90a, 128x64/w8/s2 is spill-free with tensor descriptors (249 registers) and spills 56 B with pointer loads,
# 108-136 B with float32 tO: those two take 128x32/w8/s2 (233 / 245 registers).
# On mma.sync at D = 72..128 the float32-tO launch holds more than the pointer one (128x16/w8 spills 8 B at D = 72).
_launch_variant("jvp_forward_tangent_fp32", "jvp_forward", {"sm80": {(128, 2): C(32, 32, 4, 2)}})
# With tensor descriptors the loads hold no pointer or mask tensors: 128x64/w8/s2 at D = 128 (249 registers on
# sm_90a, spill-free on sm_100a), and on sm_90a float32 at D = 64 pipelined 64x16/w4/s2 (wgmma; with pointer
# loads that tile spills 40 B there, and the pointer launch takes 32x16/w4/s2, mma.sync).
_launch_variant("jvp_forward_tma", "jvp_forward", {"sm90": {(128, 2): C(128, 64, 8, 2), (64, 4): C(64, 16, 4, 2)},
                                                   "sm100": {(128, 2): C(128, 64, 8, 2)}})
# The one-pass tangent backward where its key-block kernel keeps pointer loads (launch._key_block_descriptors:
# operands the descriptors cannot read): at D = 64 it keeps one launch with 16 query columns on sm_90a (15
# products, m64n16, 244 registers, spill-free).
_launch_variant("jvp_backward_atomic_pointer", "jvp_backward_atomic", {"sm90": {(64, 2): C(16, 64, 4, 2)}})
# ... and for masked problems: at D = 48 / 64 on sm_90a the one launch (32x128/w8/s2) spills 32 B with a boolean
# mask and 280 B with an additive one; they keep two launches, 32x64/w4/s2/split2 (18 products, spill-free).
_launch_variant("jvp_backward_atomic_masked", "jvp_backward_atomic", {"sm90": {(64, 2): C(32, 64, 4, 2, S2)}})
del C, S2, S3

#: Families that run head dims below their power-of-two tile width zero-padded to it (wgmma / tcgen05:
#: Hopper and datacenter Blackwell; see ``launch.launch_head_dims``). mma.sync families mask the columns.
PADDED_HEAD_DIM_FAMILIES = ("sm90", "sm100")

#: float32 inputs run their products as 3xTF32 (about fp32 accuracy), which holds three times the operand
#: registers: the shipped float32 tiles are spill-free on sm_90a for head dims up to 32, and for multiples
#: of 16 up to 64 (48 and 64). Where head dims run padded (sm90 / sm100), every head dim up to 64 runs those
#: tiles (40 and 56 as 64); elsewhere 40 or 56 would tile 64 with masked columns and spill. At D = 128 every
#: float32 launch spills on sm_90a (1-67 KB), so D > 64 cannot fit. The registry routes other float32
#: problems on CUDA to the "torch" backend (see :func:`fp32_head_dim_supported`).
FP32_MAX_HEAD_DIM = 64
FP32_MAX_ANY_HEAD_DIM = 32
#: Families with a lower float32 limit: on sm_120 every float32 tile of the tangent backwards tried at D = 48 / 64
#: spills (12-72 B: 16x16 and 32x16 query x key tiles, 1 to 3 stages, split in three launches).
FP32_MAX_HEAD_DIM_BY_FAMILY = {"sm120": 32}


def fp32_head_dim_supported(head_dim: int, v_head_dim: Optional[int] = None, arch: Optional[str] = None) -> bool:
    """Whether the float32 Triton kernels ship for head dims (D, Dv) on arch family ``arch`` (see
    :data:`FP32_MAX_HEAD_DIM`); ``arch`` None: a family that does not pad head dims (the stricter rule)."""
    dims = (head_dim, v_head_dim or head_dim)
    if arch in PADDED_HEAD_DIM_FAMILIES:
        dims = tuple(head_dim_bucket(d) for d in dims)
    if max(dims) <= FP32_MAX_ANY_HEAD_DIM:
        return True
    return max(dims) <= FP32_MAX_HEAD_DIM_BY_FAMILY.get(arch, FP32_MAX_HEAD_DIM) and all(d % 16 == 0 for d in dims)


#: Tiles used in the CPU interpreter: few programs and few key blocks (cost ~10 ms per program x block).
INTERPRETER_CONFIG = Config(64, 64, 4, 1)
#: Config of the row pre-passes (delta, c, e): BLOCK_M rows per program, no key loop.
PREP_CONFIG = Config(32, 16, 4, 1)

_override: list = []


def table_key(launch_name: str) -> str:
    """The table kernel of a launch name: "jvp_backward_dkdv[dk]" -> "jvp_backward_dkdv",
    "jvp_forward[tangent_fp32]" -> "jvp_forward_tangent_fp32", "jvp_forward[tma]" -> "jvp_forward_tma"."""
    base, _, part = launch_name.partition("[")
    return f"{base}_{part[:-1]}" if part in ("tangent_fp32]", "tma]") else base


def without_variant(launch_name: str) -> str:
    """A launch's name without its launch variant (:data:`LAUNCH_VARIANTS`): "jvp_backward_atomic_masked[dv,dtv]"
    -> "jvp_backward_atomic[dv,dtv]"."""
    base, bracket, part = launch_name.partition("[")
    for suffix in LAUNCH_VARIANTS:
        base = base.removesuffix(suffix)
    return base + bracket + part


def head_dim_bucket(head_dim: int, v_head_dim: Optional[int] = None) -> int:
    """The padded (power-of-two, >= 16) head dim a kernel tiles with."""
    d = max(head_dim, v_head_dim or head_dim, 16)
    return 1 << (d - 1).bit_length()


def parse_target(target: str) -> tuple:
    """Compute capability (major, minor) of a target name: "sm_90a" -> (9, 0), "sm_120" -> (12, 0)."""
    digits = str(target).removeprefix("sm_").rstrip("af")
    if not digits.isdigit() or len(digits) < 2:
        raise ValueError(f"arch: expected a target such as 'sm_80', 'sm_90a' or 'sm_120', got {target!r}")
    return int(digits[:-1]), int(digits[-1])


def arch_family(capability) -> str:
    """The family whose tiles a GPU of compute ``capability`` runs ((major, minor) or "sm_XY[a]").

    8.0 -> sm80; 8.x (99-163 KB) -> sm86; 9.x -> sm90; 10.x -> sm100; 12.x and every capability this table
    does not know (11.x, 13+, pre-Ampere) -> the most conservative tiles: sm120 / sm86 (99 KB of shared
    memory and mma.sync, which every later GPU launches) -- never a family whose tiles may not fit.
    """
    if isinstance(capability, str):
        capability = parse_target(capability)
    major, minor = int(capability[0]), int(capability[1])
    if major == 8:
        return "sm80" if minor == 0 else "sm86"
    if major == 9:
        return "sm90"
    if major == 10:
        return "sm100"
    return "sm120" if major >= 11 else "sm86"


def current_arch(device=None) -> str:
    """Arch family of a CUDA device ("interpret" in Triton's CPU interpreter)."""
    if triton_interpreter():
        return "interpret"
    import torch
    return arch_family(torch.cuda.get_device_capability(device))


_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "fp16": 2, "bf16": 2, "fp32": 4}


def get_config(kernel: str, head_dim: int, element_bytes, arch: str,
               v_head_dim: Optional[int] = None) -> Config:
    """The launch config of ``kernel`` for head dims (D, Dv), dtype and arch family.

    ``element_bytes``: 2 or 4, or a dtype (torch.bfloat16, "bf16", "float32", ...). ``arch`` is
    a family of :data:`FAMILIES` ("sm80", "sm86", "sm90", "sm100", "sm120"), a compute capability like
    (9, 0), a target like "sm_90a", or "interpret".
    Raises ValueError for an unknown kernel, dtype or arch.
    """
    if not isinstance(element_bytes, int):
        name = str(element_bytes).replace("torch.", "")
        if name not in _DTYPE_BYTES:
            raise ValueError(f"element_bytes: expected 2, 4 or a float16/bfloat16/float32 dtype, got {element_bytes!r}")
        element_bytes = _DTYPE_BYTES[name]
    if isinstance(arch, (tuple, list)) or (isinstance(arch, str) and arch.startswith("sm_")):
        arch = arch_family(arch)
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    if _override:
        return _override[-1]
    if arch == "interpret":
        return INTERPRETER_CONFIG
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {ARCHS} or 'interpret', got {arch!r}")
    bucket = head_dim_bucket(head_dim, v_head_dim)
    if bucket > 256:
        raise ValueError(f"head_dim: {max(head_dim, v_head_dim or 0)} > 256 is not supported by the Triton kernels")
    own = FAMILY_TABLE.get((kernel, arch), {}).get((bucket, element_bytes))
    if own is not None:
        return own
    entries = TABLE[(kernel, FAMILIES[arch].tiles)]
    return entries.get((bucket, element_bytes), entries[(bucket, 2)])


@contextlib.contextmanager
def override(config: Config) -> Iterator[Config]:
    """Force one config for every kernel inside the block (tests: small tiles, many key blocks)."""
    _override.append(config)
    try:
        yield config
    finally:
        _override.pop()
