"""kernels.linear: several projections of one input as one GEMM when training; kernels.swiglu:
SwiGLU on the fused gate-up output (Liger's kernel on CUDA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hymba_plus import build_model
from hymba_plus.kernels.linear import ProjectionPacks, fusable, packed, project, stacked
from tests.conftest import rel_err, run_in_interpreter
from tests.helpers import saved_bytes


@pytest.mark.parametrize("bias", [False, True])
def test_project_equals_separate_linears_with_gradients(bias):
    torch.manual_seed(0)
    mods = [nn.Linear(24, n, bias=bias).double() for n in (16, 8, 8, 16)]
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    assert fusable(*mods)
    fused = project(x, *mods)
    sep = [m(x) for m in mods]
    gys = [torch.randn_like(y) for y in sep]
    wrt = [x, *(p for m in mods for p in m.parameters())]
    g_fused = torch.autograd.grad(fused, wrt, gys)
    g_sep = torch.autograd.grad(sep, wrt, gys)
    for a, b in zip([*fused, *g_fused], [*sep, *g_sep]):
        assert a.shape == b.shape and rel_err(a.detach(), b.detach()) < 1e-12


def test_project_runs_each_projection_without_autograd_or_with_hooks():
    """No gradient (decoding): no weight concatenation per step; a module with a forward hook
    (an ETD router's LoRA branch) runs its own call, so the hook still applies."""
    mods = [nn.Linear(8, 8) for _ in range(2)]
    with torch.no_grad():
        assert not fusable(*mods)
    calls = []
    mods[1].register_forward_hook(lambda m, i, o: calls.append(m) or o * 2)
    assert not fusable(*mods)
    x = torch.randn(2, 8)
    a, b = project(x, *mods)
    assert calls == [mods[1]] and torch.allclose(b, mods[1](x))  # the hook ran (and doubles the output)
    assert not fusable(nn.Linear(8, 4), nn.Linear(8, 4, bias=False)) and not fusable(nn.Linear(8, 4), nn.Linear(6, 4))


def test_projection_packs_one_gemm_on_a_packed_copy_refreshed_by_sync():
    """Without autograd, inside ``packed(packs)``: one GEMM over a packed copy made on first use
    (equal to the separate projections), reused as it is until ``sync`` copies the modules'
    current weights into it in place; outside ``packed`` or with autograd on, as before; a
    hooked module still runs its own call."""
    torch.manual_seed(0)
    mods = [nn.Linear(12, n).double() for n in (8, 4, 6)]
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    packs = ProjectionPacks()
    with torch.no_grad():
        assert not fusable(*mods)
        with packed(packs):
            assert fusable(*mods)
            out = project(x, *mods)
            assert len(packs) == 1
            for a, m in zip(out, mods):
                assert rel_err(a, m(x)) < 1e-14
            w, b = stacked(*mods)
            mods[1].weight.data.add_(1.0)  # an edit between generate calls
            assert torch.equal(stacked(*mods)[0], w) and not torch.equal(w[8:12], mods[1].weight)  # stale until sync
            packs.sync()
            w2, b2 = stacked(*mods)
            assert w2 is w and b2 is b and torch.equal(w[8:12], mods[1].weight)  # refreshed in place
            assert rel_err(project(x, *mods)[1], mods[1](x)) < 1e-14
            mods[2].register_forward_hook(lambda m, i, o: o * 0)
            assert not fusable(*mods) and torch.equal(project(x, *mods)[2], torch.zeros(2, 3, 6, dtype=torch.float64))
        mods[0].weight = nn.Parameter(torch.randn(8, 12))  # float32 now: the group is remade on next use
        packs.sync()
        assert len(packs) == 0
    with packed(packs):  # autograd on: a differentiable concatenation, not the packed copy
        assert stacked(mods[1], mods[2])[0].requires_grad and len(packs) == 0


def test_model_training_step_matches_unfused(monkeypatch):
    """A (GA+mlp) model's loss and every gradient with the fused projections == with each
    projection on its own (fusable forced False), float64."""
    from hymba_plus.kernels import linear

    recipe = {"name": "fused-projections", "model": {"d_model": 32, "vocab_size": 64, "block_pattern": "(GA+mlp)*2", "max_seq_len": 32},
              "components": {"gated_attn": {"n_heads": 4, "n_kv_heads": 2}}}
    torch.manual_seed(0)
    model = build_model(recipe).double()
    ids = torch.randint(0, 64, (2, 12))
    out = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(linear, "fusable", lambda *m: False)
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        out[fused] = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    for a, b in zip(out[True], out[False]):
        assert rel_err(a, b) < 1e-10


def test_liger_swiglu_in_the_triton_interpreter_matches_reference():
    """kernels.swiglu's fast path (Liger's fused gate-up SwiGLU, as the MLP calls it on the fused
    projection) in Triton's CPU interpreter == the reference, output and the fused gradient,
    float32 and fp16 (bf16 products come out NaN in the interpreter: the GPU test and the probe
    check bf16), a width that is no power of two."""
    run_in_interpreter("""
        import torch
        from hymba_plus.kernels.swiglu import swiglu_liger, swiglu_ref
        rel = lambda a, b: float((a.float() - b.float()).abs().max() / b.float().abs().max())
        g = torch.Generator().manual_seed(0)
        for dt, tol in ((torch.float32, 1e-6), (torch.float16, 2e-3)):
            gu0, dy = 2 * torch.randn(2, 5, 2 * 40, generator=g), torch.randn(2, 5, 40, generator=g)
            res = []
            for fn in (swiglu_liger, swiglu_ref):
                gu = gu0.to(dt).requires_grad_()
                y = fn(gu)
                res.append((y, torch.autograd.grad(y, gu, dy.to(dt))[0]))
            for a, b in zip(*res):
                assert a.dtype == b.dtype and a.shape == b.shape and rel(a, b) < tol, (dt, rel(a, b))
        print("ok")
    """)


@pytest.mark.gpu
def test_gpu_swiglu_and_fused_mlp_match_reference(monkeypatch):
    """On the GPU (HYMBA_KERNELS=fast: a failed probe is an error) Liger's SwiGLU == the reference,
    and an MLP's bf16-autocast training step (one GEMM + Liger) == the unfused layer's."""
    from hymba_plus.components.mlp import MLPConfig, SwiGLU
    from hymba_plus.kernels import linear
    from hymba_plus.kernels.swiglu import swiglu, swiglu_ref

    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    g = torch.Generator().manual_seed(0)
    gu = (2 * torch.randn(4, 256, 2 * 2816, generator=g)).to("cuda", torch.bfloat16).requires_grad_()
    dy = torch.randn(4, 256, 2816, generator=g).to("cuda", torch.bfloat16)
    got = [swiglu(gu)]
    got.append(torch.autograd.grad(got[0], gu, dy)[0])
    want = [swiglu_ref(gu)]
    want.append(torch.autograd.grad(want[0], gu, dy)[0])
    for a, b in zip(got, want):
        assert rel_err(a.float(), b.float()) < 2e-2
    torch.manual_seed(0)
    mlp = SwiGLU(MLPConfig(), d_model=512).cuda()
    x = torch.randn(2, 128, 512, device="cuda")
    res = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(linear, "fusable", lambda *m: False)
        mlp.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = mlp(x)
        y.float().square().mean().backward()
        res.append([y.float(), *(p.grad.clone() for p in mlp.parameters())])
    for a, b in zip(*res):
        assert rel_err(a, b) < 3e-2


def test_mlp_recompute_act_equals_plain_and_keeps_less():
    """recompute_act (default): the MLP's output and every gradient equal the layer that keeps the
    SwiGLU product (float64 gradcheck; bit-equal under bf16 autocast), autograd keeps
    B * T * d_hidden 16-bit values less, and a hooked down projection runs as a module."""
    from hymba_plus.components.mlp import MLPConfig, SwiGLU

    torch.manual_seed(0)
    for bias in (False, True):
        a = SwiGLU(MLPConfig(d_hidden=96, bias=bias), d_model=32).double()
        b = SwiGLU(MLPConfig(d_hidden=96, bias=bias, recompute_act=False), d_model=32).double()
        b.load_state_dict(a.state_dict())
        x = torch.randn(2, 5, 32, dtype=torch.double, requires_grad=True)
        assert torch.autograd.gradcheck(a, (x,))
        a.float(), b.float()
        x = torch.randn(2, 5, 32, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (ya, kept_a), (yb, kept_b) = saved_bytes(lambda: a(x)), saved_bytes(lambda: b(x))  # noqa: B023
        assert ya.dtype == yb.dtype == torch.bfloat16 and torch.equal(ya, yb)
        ga = torch.autograd.grad(ya.float().square().sum(), [x, *a.parameters()])
        gb = torch.autograd.grad(yb.float().square().sum(), [x, *b.parameters()])
        for p, q in zip(ga, gb):
            assert p.dtype == q.dtype == torch.float32 and torch.equal(p, q)
        # the [2, 5, 96] bf16 product at least (the reference activation also keeps SiLU(g))
        assert kept_b - kept_a >= 2 * 5 * 96 * 2
    calls = []
    a.w_down.register_forward_hook(lambda *args: calls.append(1))
    a(torch.randn(2, 5, 32)).sum().backward()
    assert calls == [1]
    with torch.no_grad():  # inference: the plain layer (nothing to keep)
        assert torch.equal(a(x), b(x))


def test_compiled_mlp_has_no_graph_break_and_equals_eager():
    """Under torch.compile the recompute-act MLP is the composed product: its hand-written backward
    calls ``autograd.grad``, which Dynamo cannot trace, and the break at every MLP made Dynamo compile
    a model block by block until its recompile limit left the later blocks eager. No break now;
    output and gradients equal eager's (bf16 autocast)."""
    from hymba_plus.components.mlp import MLPConfig, SwiGLU

    torch.manual_seed(0)
    m = SwiGLU(MLPConfig(d_hidden=64), d_model=32)
    x = torch.randn(2, 5, 32, requires_grad=True)

    def step(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x).float().square().sum()

    torch._dynamo.reset()
    assert torch._dynamo.explain(step)(x).graph_break_count == 0
    want = torch.autograd.grad(step(x), [x, *m.parameters()])
    got = torch.autograd.grad(torch.compile(step)(x), [x, *m.parameters()])
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < 2e-2


@pytest.mark.gpu
def test_gpu_mlp_recompute_act_matches_plain(monkeypatch):
    """On the GPU (Liger's SwiGLU, HYMBA_KERNELS=fast) recompute_act's bf16-autocast training step
    == the layer that keeps the product, and what autograd saves for the backward is at least the
    [B, T, d_hidden] bf16 product smaller. Counted with saved-tensor hooks (each storage once),
    not with ``torch.cuda.memory_allocated``: on an H200 that count, taken around the first
    forward of a fresh process, came out 6 MiB *higher* for recompute_act (171,966,464 vs
    178,257,920 bytes; not explained: allocations a process's first GEMMs make, such as cuBLAS
    workspaces, would count in whichever layer runs first),
    while the side-by-side attn row, whose only change it was, measured 1.95 GiB less (24 layers
    x 88 MiB predicted)."""
    from hymba_plus.components.mlp import MLPConfig, SwiGLU

    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    torch.manual_seed(0)
    x = torch.randn(4, 2048, 1024, device="cuda", requires_grad=True)
    res, kept = [], []
    for recompute in (True, False):
        torch.manual_seed(0)
        mlp = SwiGLU(MLPConfig(d_hidden=2816, recompute_act=recompute), d_model=1024).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, nbytes = saved_bytes(lambda: mlp(x))  # noqa: B023
        kept.append(nbytes)
        g = torch.autograd.grad(y.float().square().mean(), [x, *mlp.parameters()])
        res.append([y.float(), *g])
    for a, b in zip(*res):
        assert rel_err(a, b) < 1e-2
    assert kept[1] - kept[0] >= 4 * 2048 * 2816 * 2


def test_mlp_learns_a_token_lookup_table_the_embedding_alone_cannot():
    """The mlp's job as a key-value memory (Geva et al. 2021, arXiv 2012.14913): layers with no
    token mixer (``-+mlp``) and tied embeddings learn next token = f(token) for a random permutation
    f of 64 tokens. Without the mlp (``-``) the logits are the tied embedding's similarities to
    itself, which rank the token itself first: near chance (measured 0.05 at d_model 8, 0.11 at 16);
    with it, 1.0 after 200 steps (measured; about 0.5 s on a CPU)."""
    V, T = 64, 16
    f = torch.randperm(V, generator=torch.Generator().manual_seed(0))

    def accuracy(ffn: str) -> float:
        torch.manual_seed(0)
        m = build_model({"name": "lookup", "model": {"vocab_size": V, "d_model": 16, "max_seq_len": T,
                                                     "block_pattern": f"-+{ffn}", "ffn": "none",
                                                     "tie_embeddings": True},
                         "components": {"mlp": {"d_hidden": 128}}})
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
        g = torch.Generator().manual_seed(1)
        for _ in range(200):
            x = torch.randint(0, V, (32, T), generator=g)
            loss = m(x, labels=torch.cat([x[:, :1], f[x[:, :-1]]], 1)).loss  # position t predicts f(x_t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            x = torch.arange(V).view(V // T, T)  # every token once
            return float((m.eval()(x).logits.argmax(-1) == f[x]).float().mean())

    with_mlp, without = accuracy("mlp"), accuracy("none")
    assert with_mlp > 0.95 and without < 0.3, (with_mlp, without)
