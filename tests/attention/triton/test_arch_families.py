"""Architecture families of the Triton launch configurations: every GPU maps to tiles that fit it."""
import pytest

from flowmap_kernels.attention.triton import configs


@pytest.mark.parametrize("capability, family", [
    ((8, 0), "sm80"), ((8, 6), "sm86"), ((8, 7), "sm86"), ((8, 9), "sm86"),
    ((9, 0), "sm90"), ((10, 0), "sm100"), ((10, 3), "sm100"), ((12, 0), "sm120"), ((12, 1), "sm120"),
    # unknown capabilities take the most conservative tiles (99 KB, mma.sync), never larger ones
    ((11, 0), "sm120"), ((13, 0), "sm120"), ((7, 5), "sm86"),
])
def test_capability_to_family(capability, family):
    assert configs.arch_family(capability) == family


@pytest.mark.parametrize("target, family", [
    ("sm_80", "sm80"), ("sm_86", "sm86"), ("sm_89", "sm86"), ("sm_90a", "sm90"), ("sm_100a", "sm100"),
    ("sm_120", "sm120"),
])
def test_target_names(target, family):
    assert configs.arch_family(target) == family
    assert configs.TARGETS[target] == family


def test_parse_target_errors():
    assert configs.parse_target("sm_100a") == (10, 0) and configs.parse_target("sm_120") == (12, 0)
    for bad in ("sm_", "gfx90a", "sm_9"):
        with pytest.raises(ValueError, match="arch"):
            configs.parse_target(bad)


def test_families_state_their_limits():
    fam = configs.FAMILIES
    assert fam["sm80"].shared_bytes == 166912 and fam["sm90"].shared_bytes == fam["sm100"].shared_bytes == 232448
    assert fam["sm86"].shared_bytes == fam["sm120"].shared_bytes == 101376
    assert fam["sm90"].mma == "wgmma" and fam["sm100"].mma == "tcgen05" and fam["sm120"].mma == "mma.sync"
    # a family may borrow another family's tiles only if it has at least as much shared memory or the
    # compile report shows the borrowed tiles fit (tests/compile_report/test_triton.py holds that part)
    for f in fam.values():
        assert f.tiles in ("sm80", "sm90") and f.registers == 255
    assert fam["sm100"].tiles == "sm90" and fam["sm86"].tiles == fam["sm120"].tiles == "sm80"


def test_every_family_has_a_config_for_every_kernel():
    for arch in configs.ARCHS:
        for kernel in configs.KERNELS:
            for d in (16, 64, 72, 128, 256):
                for es in (2, 4):
                    c = configs.get_config(kernel, d, es, arch)
                    own = configs.FAMILY_TABLE.get((kernel, arch), {}).get((configs.head_dim_bucket(d), es))
                    assert c == (own or configs.get_config(kernel, d, es, configs.FAMILIES[arch].tiles))


def test_family_entries_replace_tiles_that_trap_or_spill():
    # sm_100a: the Hopper tiles of these launches trap (D = 256) or spill (D = 128); see the compile report
    assert configs.get_config("jvp_forward", 256, 2, "sm_100a") != configs.get_config("jvp_forward", 256, 2, "sm_90a")
    assert configs.get_config("jvp_backward_dkdv", 128, 2, "sm100") == configs.Config(32, 64, 8, 1, configs.BY_TERM)
    for (kernel, fam), entries in configs.FAMILY_TABLE.items():
        assert kernel in configs.KERNELS and fam in configs.FAMILIES and entries


def test_launch_parts_name_what_each_launch_writes():
    """The tangent backward's launch parts: every output written exactly once; a dQ partial is written
    before the launch that adds it; a split config is named by its tag and parsed back."""
    for parts in configs.PARTS.values():
        for out in ("dk", "dtk", "dv"):
            assert sum(getattr(p, out) for p in parts.key_block) == 1, (parts.tag, out)
        assert sum(p.dq_ds for p in parts.query_block) == sum(p.dq_dts for p in parts.query_block) == 1
        assert sum(p.dtq for p in parts.query_block) == 1
        partial = [i for i, p in enumerate(parts.query_block) if p.to_partial]
        added = [i for i, p in enumerate(parts.query_block) if p.add_partial]
        assert len(partial) == len(added) and all(i < j for i, j in zip(partial, added))
    cfg = configs.get_config("jvp_backward_dkdv", 128, 2, "sm90")
    assert cfg.parts is configs.BY_TERM and str(cfg) == "32x64/w4/s2/split3"
    # the one-pass parts: every output and every dQ / dtQ term exactly once, each where its dS / dtS is
    for tag, parts in configs.ONE_PASS.items():
        assert parts.tag == tag and parts.query_block == ()
        for out in ("dk", "dtk", "dv", "dq_ds", "dq_dts", "dtq"):
            assert sum(getattr(p, out) for p in parts.key_block) == 1, (tag, out)
        for p in parts.key_block:
            assert p.dk or not p.dq_ds, (tag, p)
            assert p.dk or p.dtk or not (p.dq_dts or p.dtq), (tag, p)
    assert configs.PRIMAL_ONE_PASS.key_block[0].dq_ds and configs.PRIMAL_ONE_PASS.query_block == ()
    for table in (configs.TABLE, configs.FAMILY_TABLE):
        for entries in table.values():
            assert all(configs.Config.parse(str(c)) == c for c in entries.values())


KEY_BLOCK_KERNELS = ("backward_atomic", "backward_dkdv", "jvp_backward_atomic", "jvp_backward_atomic_pointer",
                     "jvp_backward_atomic_masked", "jvp_backward_dkdv")


@pytest.mark.parametrize("kernel", configs.KERNELS)
def test_sm90_16bit_tiles_are_wide_and_pipelined(kernel):
    """Up to D = 128 in 16 bits every sm90 launch pipelines its key loop (num_stages >= 2) and puts 8 warps
    only on 128 rows (queries, or keys in the key-block kernels), so that no wgmma's N is split across two
    warpgroups. Head dims below their tile width run padded to it."""
    from flowmap_kernels.attention.triton.launch import launch_head_dims
    for d in (16, 32, 48, 64, 72, 80, 96, 112, 128):
        run = launch_head_dims(d, d, "sm90")[0]
        assert run in configs.HEAD_DIM_BUCKETS
        cfg = configs.get_config(kernel, run, 2, "sm90")
        rows = cfg.block_n if kernel in KEY_BLOCK_KERNELS else cfg.block_m
        assert cfg.num_stages >= 2, (kernel, d, str(cfg))
        assert rows >= 64 and not (cfg.num_warps == 8 and rows < 128), (kernel, d, str(cfg))


@pytest.mark.parametrize("arch,head_dim,skip", [("sm90", 64, True), ("sm100", 128, True), ("sm90", 72, False),
                                                ("sm80", 64, False), ("sm120", 128, False), ("interpret", 72, True)])
def test_interior_tiles_skip_the_mask_where_it_is_free(arch, head_dim, skip):
    """SKIP_INTERIOR (interior tiles branch around the mask arithmetic) on the wgmma / tcgen05 families at
    head dims a multiple of 16, and in the interpreter (so that its tests run it); not on mma.sync."""
    import torch
    from flowmap_kernels.attention.triton import launch
    q = torch.empty(1, 2, 8, head_dim)
    plan = launch.Plan(q, q, q, None, False, 1.0, arch=arch)
    assert plan.skip_interior is skip
    (_, fwd) = launch.forward_launches(plan, q, q, q)
    assert fwd[0].constexprs["SKIP_INTERIOR"] is skip


@pytest.mark.parametrize("arch,head_dim,tangent_dtype,tv_acc", [
    ("sm90", 64, None, True), ("sm100", 32, None, True), ("sm90", 48, None, True), ("sm90", 128, None, False),
    ("sm90", 64, "float32", False), ("sm80", 64, None, False), ("interpret", 64, None, True),
    ("interpret", 72, None, False), ("sm90", 64, "fp32 inputs", False)])
def test_tangent_value_products_accumulate_apart_where_it_is_free(arch, head_dim, tangent_dtype, tv_acc):
    """TV_ACC (the P tV products in an accumulator of their own, so that they stay asynchronous) on the
    wgmma / tcgen05 families with 16-bit inputs and in the interpreter, up to Dv = 64, never with a float32
    tO."""
    import torch
    from flowmap_kernels.attention.triton import launch
    fp32_inputs = tangent_dtype == "fp32 inputs"
    q = torch.empty(1, 2, 8, head_dim, dtype=torch.float32 if fp32_inputs else torch.bfloat16)
    plan = launch.Plan(q, q, q, None, False, 1.0, arch=arch)
    dtype = getattr(torch, tangent_dtype) if tangent_dtype and not fp32_inputs else None
    (_, fwd) = launch.forward_launches(plan, q, q, q, q, q, q, tangent_dtype=dtype)
    assert fwd[0].constexprs["TV_ACC"] is tv_acc
    (_, fwd) = launch.forward_launches(plan, q, q, q)
    assert fwd[0].constexprs["TV_ACC"] is False


def test_key_block_descriptors_and_the_pointer_fallback_tile():
    """sm90, 16-bit, D = 64: the key-block kernel takes tensor descriptors (TMA) and 32 query columns in one
    launch (two with a mask: the "_masked" variant); Q rows the descriptors cannot read keep pointer loads and
    the 16-column tile in one launch; dO given as an expanded view is copied, not a reason to fall back; float32
    and D = 256 keep pointer loads."""
    import torch
    from flowmap_kernels.attention.triton import launch

    def key_block(q, do, arch="sm90", mask=None):
        x = torch.empty(1, 2, 64, q.shape[-1], dtype=q.dtype)
        p = launch.Plan(q, x, x, mask, False, 0.125, arch=arch)
        (o, to, lse, mu), _ = launch.forward_launches(p, q, x, x, x, x, x)
        launches = launch.backward_launches(p, q, x, x, x, x, x, o, to, lse, mu, do, do)[1]
        return [(str(ln.config), ln.constexprs["TMA"]) for ln in launches if ln.name.startswith("jvp_backward_atomic")
                and hasattr(ln, "constexprs")]

    q = torch.empty(1, 2, 64, 64, dtype=torch.bfloat16)
    assert key_block(q, torch.empty_like(q)) == [("32x128/w8/s2", True)]  # one launch
    assert key_block(q, torch.ones(1, 1, 1, 1, dtype=q.dtype).expand_as(q)) == [("32x128/w8/s2", True)]
    for mask in (torch.ones(64, 64, dtype=torch.bool), torch.zeros(1, 1, 64, 64, dtype=q.dtype)):
        assert key_block(q, torch.empty_like(q), mask=mask) == [("32x64/w4/s2/split2", True)] * 2  # two launches
    unaligned = torch.empty(1, 2, 64, 65, dtype=torch.bfloat16)[..., 1:]  # rows start 2 bytes off 16
    assert not launch.descriptors_allowed(unaligned)
    assert key_block(unaligned, torch.empty_like(q)) == [("16x64/w4/s2", False)]
    assert key_block(q, torch.empty_like(q), arch="sm80")[0][1] is False
    q32 = torch.empty(1, 2, 64, 64)
    assert all(not tma for _, tma in key_block(q32, torch.empty_like(q32)))
    q256 = torch.empty(1, 2, 64, 256, dtype=torch.bfloat16)
    assert all(not tma for _, tma in key_block(q256, torch.empty_like(q256)))
