"""Block-diffusion training's two-stream attention (``kernels/two_stream_attention.py``): the
FlexAttention fast path against the reference, SDPA with ``two_stream_visible``'s dense mask.

* the mask_mod is ``two_stream_visible`` exactly, evaluated on the whole [S, S] grid (meta tokens,
  windows, block sizes that do not divide the length); the block mask skips no tile that holds a
  visible pair and does skip tiles;
* the flex path (``flex_attention`` eagerly on the CPU: PyTorch's unfused implementation, whose
  backward is its math backward) == the reference, outputs and q / k / v gradients in float64,
  over lengths, block sizes, meta tokens, windows, MHA / GQA / MQA;
* through the dispatch (the fast path registered for the CPU here, as in tests/test_decode_attention.py)
  a block-diffusion model's NELBO and parameter gradients are the same both ways, the block mask
  made once per layout; on the CPU the default is the reference;
* ``-m gpu``: the compiled fast path (``HYMBA_KERNELS=fast``) against the reference in bf16 at a
  realistic shape, and a bf16 model step both ways.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hymba_plus import build_model
from hymba_plus.core.two_stream import TwoStream, two_stream_visible
from hymba_plus.kernels import dispatch
from hymba_plus.kernels import two_stream_attention as T

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")


def grid(ts: TwoStream, window: int | None) -> torch.Tensor:
    S = ts.n_meta + 2 * ts.length
    i = torch.arange(S)
    zero = torch.zeros((), dtype=torch.long)
    return T.two_stream_mask_mod(ts, window)(zero, zero, i[:, None], i[None, :])


LAYOUTS = [(1, 1, 0), (8, 1, 0), (8, 2, 2), (12, 3, 0), (12, 4, 3), (13, 4, 2), (7, 3, 1), (5, 16, 0), (16, 16, 4),
           (40, 6, 1)]


@pytest.mark.parametrize("window", [None, 1, 2, 5, 100])
@pytest.mark.parametrize("L, bs, M", LAYOUTS)
def test_mask_mod_is_two_stream_visible_on_the_whole_grid(L, bs, M, window):
    ts = TwoStream(block_size=bs, n_meta=M, length=L)
    want = two_stream_visible(ts, torch.device("cpu"), window)
    assert torch.equal(grid(ts, window), want)


@pytest.mark.parametrize("window", [None, 70])
def test_block_mask_keeps_every_tile_with_a_visible_pair_and_skips_the_others(window):
    """Tile (i, j) of the block mask (128 x 128) is computed iff some query of tile i sees some key
    of tile j, so nothing visible is lost and the masked tiles are really skipped."""
    ts = TwoStream(block_size=64, n_meta=3, length=384)  # S = 771: the last tile cut short
    S = 3 + 2 * 384
    dense = two_stream_visible(ts, torch.device("cpu"), window)
    n = -(-S // 128)
    padded = torch.zeros(n * 128, n * 128, dtype=torch.bool)
    padded[:S, :S] = dense
    want = padded.view(n, 128, n, 128).any(dim=3).any(dim=1)
    bm = T.block_mask(ts, window, "cpu")
    got = bm.to_dense()[0, 0].bool()
    assert torch.equal(got, want)
    assert 0 < int(got.sum()) < n * n  # tiles are skipped (16 of 49 computed without a window)
    assert T.block_mask(ts, window, torch.device("cpu")) is bm  # cached
    if window is not None:  # built as on CUDA (compiled, tile by tile): the same block mask
        c = T.block_mask(ts, window, "cpu", compiled=True)
        assert c is not bm and torch.equal(c.to_dense(), bm.to_dense())
        for a, b in zip(bm.as_tuple(), c.as_tuple()):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else True


@pytest.fixture
def cpu_grad_flex(monkeypatch):
    """``flex_attention`` refuses inputs that need a gradient on the CPU at its API (its eager
    implementation has a backward, its CPU kernels none): the check is lifted for these tests so
    that the gradients of the flex path are compared too."""
    from torch.nn.attention import flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda q, k, v: None)


CASES = [  # L, bs, M, H, Hkv, window
    (12, 4, 0, 2, 2, None),
    (13, 4, 2, 4, 2, None),
    (16, 1, 3, 4, 1, 5),
    (20, 6, 1, 2, 2, 3),
    (9, 16, 2, 2, 1, None),
    (48, 8, 2, 4, 2, 7),
]


@pytest.mark.parametrize("L, bs, M, H, Hkv, window", CASES)
def test_flex_path_equals_dense_mask_sdpa_outputs_and_gradients(cpu_grad_flex, L, bs, M, H, Hkv, window):
    ts = TwoStream(block_size=bs, n_meta=M, length=L)
    S = M + 2 * L
    g = torch.Generator().manual_seed(L * 10 + bs)
    q = (3 * torch.randn(2, H, S, 8, generator=g, dtype=torch.float64)).requires_grad_()
    k = (3 * torch.randn(2, Hkv, S, 8, generator=g, dtype=torch.float64)).requires_grad_()
    v = torch.randn(2, Hkv, S, 8, generator=g, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, H, S, 8, generator=g, dtype=torch.float64)
    gqa = H != Hkv
    got = T.flex_two_stream(q, k, v, ts, window, enable_gqa=gqa)
    want = T.reference(q, k, v, ts, window, enable_gqa=gqa)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), gy), torch.autograd.grad(want, (q, k, v), gy)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    # (the reference is plain SDPA with the mask)
    explicit = F.scaled_dot_product_attention(q, k, v, attn_mask=two_stream_visible(ts, q.device, window),
                                              enable_gqa=gqa)
    assert torch.equal(want, explicit)


def test_on_the_cpu_the_default_is_the_reference(monkeypatch):
    monkeypatch.delenv("HYMBA_KERNELS", raising=False)
    called = []
    monkeypatch.setattr(T, "flex_two_stream", lambda *a, **k: called.append(1))
    ts = TwoStream(block_size=2, n_meta=1, length=4)
    q = torch.randn(1, 2, 9, 4)
    y = T.two_stream_attention(q, q, q, ts)
    assert not called and torch.equal(y, T.reference(q, q, q, ts))


def bd_model(pattern: str, comps: dict, meta: int, bs: int):
    torch.manual_seed(0)
    d = {"name": "flex-bd", "model": {"vocab_size": 37, "d_model": 32, "max_seq_len": 48, "block_pattern": pattern,
                                      "meta_tokens": meta},
         "components": {"gdn": {"n_heads": 2, "head_dim": 8, "chunk_size": 4}, "mlp": {"d_hidden": 32}, **comps},
         "objective": {"kind": "block_diffusion", "block_size": bs}}
    model = build_model(d).double()
    with torch.no_grad():
        model.embed.weight.mul_(4.0)
    return model


# attention head dims >= T.MIN_HEAD_DIM, 32 (smaller ones keep the reference: test_small_head_dims_keep_the_reference);
# hymba's attention heads split the SSM's inner width (gdn 2 x 32 here)
MODELS = {
    "GA-meta-gqa": ("GA | GD | GA", {"gated_attn": {"n_heads": 4, "n_kv_heads": 2, "head_dim": 32}}, 2, 4),
    "GA-window-kv_share": ("GA | GA", {"gated_attn": {"n_heads": 2, "head_dim": 32, "window": 5, "kv_share": True}},
                           1, 3),
    "HY-window-mqa": ("HY | GA", {"hymba": {"ssm": "gdn", "attn": {"n_heads": 2, "n_kv_heads": 1, "window": 6}},
                                 "gdn": {"n_heads": 2, "head_dim": 32, "chunk_size": 4},
                                 "gated_attn": {"n_heads": 2, "head_dim": 32}}, 0, 2),
}


@pytest.mark.parametrize("case", list(MODELS))
def test_block_diffusion_loss_and_gradients_equal_both_ways(cpu_grad_flex, monkeypatch, case):
    """A block-diffusion model's training loss (the NELBO of one noise draw) and its parameter
    gradients with the two-stream attention on the flex path (registered for the CPU here) ==
    on the reference; the flex path was taken in every attention layer and the block mask made
    once per layout and window."""
    pattern, comps, meta, bs = MODELS[case]
    model = bd_model(pattern, comps, meta, bs)
    ids = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(1))
    calls = []
    flex = T.flex_two_stream
    monkeypatch.setattr(T, "flex_two_stream", lambda *a, **k: calls.append(1) or flex(*a, **k))
    monkeypatch.setitem(dispatch._FAST, T.FAST, dispatch.FastPath(T.FAST, lambda: None, "test", device="cpu"))
    T._block_mask.cache_clear()
    res = {}
    for mode in ("reference", "fast"):
        monkeypatch.setenv("HYMBA_KERNELS", mode)
        model.zero_grad()
        torch.manual_seed(2)  # the same noise levels and masks both ways
        out = model.objective.train_forward(model, model, ids, ids)
        out.loss.backward()
        res[mode] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    attn = [getattr(b.mixer, "attn", b.mixer) for b in model.blocks if hasattr(b.mixer, "attend")
            or hasattr(b.mixer, "attn")]
    assert len(calls) == len(attn) > 0
    info = T._block_mask.cache_info()  # one block mask a window, every layer and call after the first reuse it
    assert info.misses == len({a.cfg.window for a in attn}) and info.hits + info.misses == len(calls)
    torch.testing.assert_close(res["fast"][0], res["reference"][0], rtol=0, atol=1e-12)
    assert res["fast"][1].keys() == res["reference"][1].keys()
    for name, g in res["reference"][1].items():
        torch.testing.assert_close(res["fast"][1][name], g, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


@pytest.mark.gpu
@pytest.mark.parametrize("window, Hkv", [(None, 8), (None, 2), (256, 2)])
def test_gpu_flex_two_stream_matches_dense_mask_sdpa(monkeypatch, window, Hkv):
    """CUDA, ``HYMBA_KERNELS=fast`` (a failed probe is an error): the compiled FlexAttention path ==
    SDPA with the dense mask in float32, bf16 inputs, at B 2, H 8, D 64, L 1024, block 16, 4 meta
    tokens (S 2052); outputs and q / k / v gradients; then a block-diffusion model's bf16 training
    step the same both ways."""
    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    ts = TwoStream(block_size=16, n_meta=4, length=1024)
    S = 4 + 2 * 1024
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, S, 64, generator=g).to("cuda", torch.bfloat16).requires_grad_()
    k, v = (torch.randn(2, Hkv, S, 64, generator=g).to("cuda", torch.bfloat16).requires_grad_() for _ in range(2))
    gy = torch.randn(2, 8, S, 64, generator=g).to("cuda", torch.bfloat16)
    gqa = Hkv != 8
    y = T.two_stream_attention(q, k, v, ts, window, enable_gqa=gqa)
    assert dispatch.statuses()[T.FAST] is True
    got = (y, *torch.autograd.grad(y, (q, k, v), gy))
    ref = T.reference(q.float(), k.float(), v.float(), ts, window, enable_gqa=gqa)
    want = (ref, *torch.autograd.grad(ref, (q, k, v), gy.float()))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(a.float(), b.float()) < 2e-2, name
    attn = {"n_heads": 4, "n_kv_heads": 2, "head_dim": 32, **({} if window is None else {"window": 24})}
    model = bd_model("GA | GA", {"gated_attn": attn}, 2, 16).float().cuda()
    ids = torch.randint(0, 37, (2, 48), generator=torch.Generator().manual_seed(1)).cuda()
    monkeypatch.setenv("HYMBA_KERNELS", "auto")  # the other ops as they run; only the two-stream path differs
    flex, res = T.flex_two_stream, {}
    for mode in ("fast", "reference"):
        monkeypatch.setattr(T, "flex_two_stream", flex if mode == "fast" else
                            lambda q, k, v, ts, window=None, *, enable_gqa=False: T.reference(
                                q, k, v, ts, window, enable_gqa=enable_gqa))
        model.zero_grad()
        torch.manual_seed(2)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.objective.train_forward(model, model, ids, ids)
        out.loss.backward()
        res[mode] = (out.loss.detach().float(), model.blocks[0].mixer.q_proj.weight.grad.clone())
    assert dispatch.statuses()[T.FAST] is True  # (the model's call compiled: no fallback at a call)
    for a, b in zip(res["fast"], res["reference"]):
        assert rel_err(a, b) < 3e-2


def test_a_compile_failure_at_a_call_falls_back_once(monkeypatch, capsys):
    """On an H100 the probe (D 64) passed and a block-diffusion model's first call failed in Inductor's
    lowering of flex_attention for its shapes (NoValidChoicesError, a traceback ending the run). A
    compile failure at a call computes nothing, so under ``auto`` the call runs the reference, the fast
    path is off from then on and one line says so; ``HYMBA_KERNELS=fast`` raises it; any other error
    is raised as it is."""
    from torch._inductor.exc import InductorError

    calls = []

    def failing(*a, **k):
        calls.append(1)
        raise InductorError(RuntimeError("NoValidChoicesError: No choices to select"), None)

    monkeypatch.setattr(T, "flex_two_stream", failing)
    monkeypatch.setitem(dispatch._FAST, T.FAST, dispatch.FastPath(T.FAST, lambda: None, "test", device="cpu"))
    ts = TwoStream(block_size=2, n_meta=1, length=4)
    q, k, v = (torch.randn(1, 2, 9, 32) for _ in range(3))
    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    with pytest.raises(InductorError):
        T.two_stream_attention(q, k, v, ts)
    monkeypatch.setenv("HYMBA_KERNELS", "auto")
    for _ in range(2):
        assert torch.equal(T.two_stream_attention(q, k, v, ts), T.reference(q, k, v, ts))
    assert len(calls) == 2  # (fast: raised; auto: failed once, then the reference without trying)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fast path {T.FAST} unavailable (failed at a call after its probe passed: InductorError: "
                   "RuntimeError: NoValidChoicesError: No choices to select): using the reference path"], err
    assert str(dispatch.statuses()[T.FAST]).startswith("failed at a call after its probe passed")
    monkeypatch.setitem(dispatch._FAST, T.FAST, dispatch.FastPath(T.FAST, lambda: None, "test", device="cpu"))
    monkeypatch.setattr(T, "flex_two_stream", lambda *a, **kw: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        T.two_stream_attention(q, k, v, ts)


def test_a_shape_past_the_recompile_limit_runs_the_reference_and_keeps_the_fast_path(monkeypatch, capsys):
    """flex_attention compiles with static shapes and fullgraph, so a shape past torch.compile's
    recompile limit raises FailOnRecompileLimitHit (not a TorchDynamoException, and Dynamo does not
    run it eagerly under fullgraph): such a call runs the reference, one line says so once, the
    fast path stays on for the shapes compiled before; ``HYMBA_KERNELS=fast`` raises it."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    compiled = {(1, 2, 9, 32)}  # the shapes "compiled" before the limit

    def flex(q, k, v, ts, window=None, *, enable_gqa=False):
        if tuple(q.shape) not in compiled:
            raise FailOnRecompileLimitHit("Hard failure due to fullgraph=True")
        return T.reference(q, k, v, ts, window, enable_gqa=enable_gqa) + 1  # (tells the paths apart)

    monkeypatch.setattr(T, "flex_two_stream", flex)
    monkeypatch.setattr(T, "recompile_limit_hits", 0)
    monkeypatch.setitem(dispatch._FAST, T.FAST, dispatch.FastPath(T.FAST, lambda: None, "test", device="cpu"))
    monkeypatch.setenv("HYMBA_KERNELS", "auto")
    ts = TwoStream(block_size=2, n_meta=1, length=4)
    old, new = torch.randn(1, 2, 9, 32), torch.randn(2, 2, 9, 32)
    for _ in range(2):
        assert torch.equal(T.two_stream_attention(new, new, new, ts), T.reference(new, new, new, ts))
        assert torch.equal(T.two_stream_attention(old, old, old, ts), T.reference(old, old, old, ts) + 1)
    assert T.recompile_limit_hits == 2 and dispatch.statuses()[T.FAST] is True
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fast path {T.FAST}: torch.compile's recompile limit reached"), err
    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    with pytest.raises(FailOnRecompileLimitHit):
        T.two_stream_attention(new, new, new, ts)


def test_a_shape_past_the_recompile_limit_is_not_compiled_again(monkeypatch):
    """Past the recompile limit Dynamo does not remember the refusal under fullgraph: each later call of that
    shape re-ran every guard, tried to compile again and logged Dynamo's five-line 'hit config.recompile_limit'
    warning (every layer, every step), so the path's 'said once' was not. A shape (with what else the compiled
    call is specialised on) that hit the limit now goes to the reference without entering the compiled
    function; the shapes compiled before keep it. Real torch.compile (backend eager, a limit of 1)."""
    tries = []
    compiled = torch.compile(lambda q, k, v: T.reference(q, k, v, ts) + 1, fullgraph=True, dynamic=False,
                             backend="eager")

    def flex(q, k, v, ts, window=None, *, enable_gqa=False):
        tries.append(tuple(q.shape))
        return compiled(q, k, v)

    monkeypatch.setattr(T, "flex_two_stream", flex)
    monkeypatch.setattr(T, "recompile_limit_hits", 0)
    monkeypatch.setattr(T, "past_recompile_limit", set(), raising=False)
    monkeypatch.setitem(dispatch._FAST, T.FAST, dispatch.FastPath(T.FAST, lambda: None, "test", device="cpu"))
    monkeypatch.setenv("HYMBA_KERNELS", "auto")
    ts = TwoStream(block_size=2, n_meta=1, length=4)
    old, new = torch.randn(1, 2, 9, 32), torch.randn(2, 2, 9, 32)
    with torch._dynamo.config.patch(recompile_limit=1):
        assert torch.equal(T.two_stream_attention(old, old, old, ts), T.reference(old, old, old, ts) + 1)
        for _ in range(3):
            assert torch.equal(T.two_stream_attention(new, new, new, ts), T.reference(new, new, new, ts))
            assert torch.equal(T.two_stream_attention(old, old, old, ts), T.reference(old, old, old, ts) + 1)
    assert tries.count((2, 2, 9, 32)) == 1 and tries.count((1, 2, 9, 32)) == 4, tries
    assert T.recompile_limit_hits == 3 and dispatch.statuses()[T.FAST] is True


def test_a_backward_lowering_failure_falls_back_at_the_forward_call(monkeypatch, capsys):
    """With static shapes AOTAutograd lowers a compiled graph's backward lazily, at the first backward: a
    lowering failure there (a shape the probe did not have; NoValidChoicesError on an H100 came from these
    templates) was a traceback in ``loss.backward()``, after the forward had run on the fast path, out of the
    fallback's reach. The backward is now lowered with the forward (``force_non_lazy_backward_lowering``), so
    its failure is the forward call's compile failure: the reference, one line. Real torch.compile (AOTAutograd
    with a backward compiler that fails) of a stand-in for flex_attention (the reference)."""
    import functools

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def bw(gm, example_inputs):
        raise RuntimeError("NoValidChoicesError: No choices to select (backward)")

    backend = aot_autograd(fw_compiler=lambda gm, ex: make_boxed_func(gm), bw_compiler=bw)
    ts = TwoStream(block_size=2, n_meta=1, length=4)

    def attend(q, k, v, *, block_mask, enable_gqa):  # (flex_attention's signature; its CPU eager code: the reference)
        return T.reference(q, k, v, ts, enable_gqa=enable_gqa)

    monkeypatch.setattr(T, "_compiled", lambda fn, dynamic=None: torch.compile(attend, fullgraph=True, dynamic=False,
                                                                               backend=backend))
    monkeypatch.setattr(T, "flex_two_stream", functools.partial(T.flex_two_stream, compiled=True))
    monkeypatch.setitem(dispatch._FAST, T.FAST, dispatch.FastPath(T.FAST, lambda: None, "test", device="cpu"))
    monkeypatch.setenv("HYMBA_KERNELS", "auto")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 32, generator=g, requires_grad=True) for _ in range(3))
    y = T.two_stream_attention(q, k, v, ts)
    y.sum().backward()
    ref = T.reference(*(t.detach().requires_grad_() for t in (q, k, v)), ts)
    assert torch.equal(y, ref)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fast path {T.FAST} unavailable (failed at a call after its probe "
                                               "passed: BackendCompilerFailed"), err
    assert str(dispatch.statuses()[T.FAST]).startswith("failed at a call after its probe passed")


def test_a_traced_call_keeps_the_reference(monkeypatch):
    """Under torch.compile the dispatch's answer is not asked (as ``kernels.sdpa``): the traced
    two-stream attention is the dense-mask SDPA even where the fast path is registered."""
    called = []
    monkeypatch.setattr(T, "flex_two_stream", lambda *a, **k: called.append(1))
    monkeypatch.setitem(dispatch._FAST, T.FAST, dispatch.FastPath(T.FAST, lambda: None, "test", device="cpu"))
    ts = TwoStream(block_size=2, n_meta=1, length=4)
    q = torch.randn(1, 2, 9, 4)
    y = torch.compile(lambda q: T.two_stream_attention(q, q, q, ts), backend="eager")(q)
    assert not called and torch.allclose(y, T.reference(q, q, q, ts))


@pytest.mark.parametrize("D, Dv, fast", [(8, 8, False), (16, 8, False), (8, 16, False), (16, 16, False),
                                        (24, 24, False), (32, 16, False), (32, 32, True), (48, 40, True)])
def test_small_head_dims_keep_the_reference(monkeypatch, D, Dv, fast):
    """FlexAttention's Triton kernels (compiled, CUDA) refuse head dims below 16 when Inductor lowers
    them ("NYI: embedding dimension of the query, key, and value must be at least 16"), and on an H100 a
    model's head dim 16 failed the lowering too (NoValidChoicesError), shapes the probe (D 64) never
    sees: calls below ``MIN_HEAD_DIM`` (32) keep the reference instead of reaching the fast path (here
    registered for the CPU) and failing in the model's first training step."""
    called = []
    monkeypatch.setattr(T, "flex_two_stream", lambda *a, **k: called.append(1) or T.reference(*a, **k))
    monkeypatch.setitem(dispatch._FAST, T.FAST, dispatch.FastPath(T.FAST, lambda: None, "test", device="cpu"))
    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    ts = TwoStream(block_size=2, n_meta=1, length=4)
    q, k, v = torch.randn(1, 2, 9, D), torch.randn(1, 2, 9, D), torch.randn(1, 2, 9, Dv)
    y = T.two_stream_attention(q, k, v, ts)
    assert bool(called) == fast
    assert torch.allclose(y, T.reference(q, k, v, ts))
