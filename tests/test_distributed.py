"""FSDP2 under torchrun: 2 gloo processes on CPU train, checkpoint once, resume, and match
a single process that sees the same global batch (Muon gathers each sharded matrix for
Newton–Schulz, so the updates are the same up to float rounding)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hymba_plus import from_pretrained
from hymba_plus.cli import main

REPO = Path(__file__).resolve().parents[1]
# odd sizes so FSDP's dim-0 shards are uneven (meta [3, 32], w_up [45, 32], embed [37, 32])
RECIPE = {
    "name": "fsdp-tiny",
    "model": {"vocab_size": 37, "d_model": 32, "max_seq_len": 64, "block_pattern": "GA | GA", "meta_tokens": 3},
    "components": {"gated_attn": {"n_heads": 2, "n_kv_heads": 1}, "mlp": {"d_hidden": 45}},
}
COMMON = ["--steps", "6", "--seq-len", "16", "--warmup", "2", "--save-every", "1", "--keep-last", "6",
          "--eval-every", "3", "--device", "cpu", "--no-progress"]


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "hymba_plus", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def one_process(args: list[str]) -> int:
    """``hymba ARGS`` in this process on one thread (as each torchrun rank runs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(args)
    finally:
        torch.set_num_threads(n)


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def one_and_two(tmp_path: Path, recipe: dict, steps: int, *two_args: str) -> tuple[list[dict], list[dict], str]:
    """``recipe`` trained ``steps`` steps in one process at batch 4 and on 2 torchrun ranks at batch 2 (plus
    ``two_args``): (one's metrics rows, two's, the ranks' stderr)."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    common = ["--steps", str(steps), "--seq-len", "16", "--warmup", "1", "--device", "cpu", "--no-progress",
              "--eval-every", "100", "--save-every", "100"]
    assert one_process(["train", str(path), "--out", str(tmp_path / "one"), "--batch-size", "4", *common]) == 0
    r = torchrun(["train", str(path), "--out", str(tmp_path / "two"), "--batch-size", "2", *two_args, *common])
    assert r.returncode == 0, r.stderr[-3000:]
    return rows(tmp_path / "one"), rows(tmp_path / "two"), r.stderr


def test_fsdp2_two_gloo_processes_match_one_process_and_resume(tmp_path):
    """One process trains steps 1-3, FSDP2 on 2 processes resumes for steps 4-5 (loading and
    sharding the optimizer state), one process resumes the FSDP checkpoint for step 6; the
    losses and weights equal those of one uninterrupted process. The FSDP2 resume also logs to
    TensorBoard (--log-to, when installed): rank 0 alone writes OUT/tb."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    chain, single = tmp_path / "chain", tmp_path / "single"
    tensorboard = importlib.util.find_spec("tensorboard") is not None  # (in dev) --log-to under torchrun
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(recipe), "--out", str(single), "--batch-size", "4", *COMMON]) == 0
        assert main(["train", str(recipe), "--out", str(chain), "--batch-size", "4", "--stop-after", "3", *COMMON]) == 0
        r = torchrun(["train", str(recipe), "--out", str(chain), "--batch-size", "2", "--resume", "--stop-after", "5",
                      *COMMON, *(["--log-to", "tensorboard"] if tensorboard else [])])
        assert r.returncode == 0, r.stderr[-3000:]
        assert "x2 (FSDP2)" in r.stderr and r.stdout.count("done: 5 of 6 steps") == 1  # rank 0 alone reports
        if tensorboard:  # rank 0 alone logs too (training/tracking.py): one event file, steps 4 and 5
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

            assert len(list((chain / "tb").glob("events.out.tfevents.*"))) == 1
            acc = EventAccumulator(str(chain / "tb"))
            acc.Reload()
            assert [e.step for e in acc.Scalars("train/loss")] == [4, 5]
        state = json.loads((chain / "step-5" / "trainer_state.json").read_text())
        assert state["world_size"] == 2 and state["samples"] == 5 * 4
        assert main(["train", str(recipe), "--out", str(chain), "--batch-size", "4", "--resume", *COMMON]) == 0
    finally:
        torch.set_num_threads(n)
    d, s = rows(chain), rows(single)
    assert [x["step"] for x in d] == list(range(1, 7))  # written once per step, no gaps
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(d, s))
    print(f"FSDP2 x2 vs one process: max |loss diff| = {diff:.2e}")
    assert diff < 1e-5
    for a, b in zip(d, s):
        if "eval_loss" in b:
            assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-5)
            assert a["eval_accuracy"] == pytest.approx(b["eval_accuracy"], abs=1e-6)
    for step in (5, 6):  # step-5 was written by FSDP rank 0 from gathered full state dicts
        wd = from_pretrained(chain / f"step-{step}").state_dict()
        ws = from_pretrained(single / f"step-{step}").state_dict()
        assert max(float((wd[k] - ws[k]).abs().max()) for k in ws) < 1e-5


def test_fsdp2_bf16_parameters_train_like_autocast(tmp_path, capsys):
    """``--fsdp-param-dtype bfloat16`` (FSDP2's MixedPrecisionPolicy: bf16 gathered parameters,
    float32 gradient reduce into float32 shards) trains like one process under bf16 autocast
    (the GEMMs see the same bf16 weights; the rest rounds differently): losses within 1e-3 (measured
    ~1e-4) and gradient norms within 1e-2 (measured ~2e-3). With precision fp32 it is refused in one line."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    args = ["--steps", "3", "--seq-len", "16", "--warmup", "1", "--eval-every", "100", "--save-every", "100",
            "--device", "cpu", "--no-progress", "--precision", "bf16"]
    r = torchrun(["train", str(recipe), "--out", str(tmp_path / "mp"), "--batch-size", "2",
                  "--fsdp-param-dtype", "bfloat16", *args])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x2 (FSDP2, bf16 parameters, float32 gradient reduce)" in r.stderr
    assert one_process(["train", str(recipe), "--out", str(tmp_path / "one"), "--batch-size", "4", *args]) == 0
    mp, one = rows(tmp_path / "mp"), rows(tmp_path / "one")
    assert len(mp) == len(one) == 3
    for a, b in zip(mp, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-2)
    capsys.readouterr()
    # the refusal in this process (a real one cost ~5 s of imports; torchrun above is the real process)
    rc = main(["train", str(recipe), "--out", str(tmp_path / "bad"), "--fsdp-param-dtype", "bfloat16", "--precision",
               "fp32", "--steps", "1", "--device", "cpu"])
    assert rc == 2 and not (tmp_path / "bad").exists()
    assert capsys.readouterr().err.strip().splitlines() == [
        "hymba train: --fsdp-param-dtype bfloat16: bfloat16 computes with bf16 parameters: not with precision fp32 "
        "(use bf16)"]


def _sharded_helpers_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from hymba_plus.training.optim import _gather_full, _shard_of, clip_grad_norm_

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        g = torch.Generator().manual_seed(0)  # the same full tensors on every rank
        fulls = [torch.randn(5, 3, generator=g), torch.randn(1, 4, generator=g),  # uneven; rank 1 holds nothing
                 torch.randn(3, 4, 2, generator=g), torch.randn(6, 2, generator=g).double()]
        shards = [distribute_tensor(t, mesh, [Shard(0)]) for t in fulls]
        got = _gather_full([s.to_local() for s in shards], shards)
        for t, s, f in zip(fulls, shards, got):
            assert torch.equal(f, t), "gathered tensor differs"
            assert torch.equal(_shard_of(t, s), s.to_local()), "local shard differs"
        params = [torch.nn.Parameter(distribute_tensor(t.float(), mesh, [Shard(0)])) for t in fulls]
        plain = [torch.nn.Parameter(t.float().clone()) for t in fulls]
        for p, q in zip(params, plain):
            p.grad = distribute_tensor(q.data * 3, mesh, [Shard(0)])
            q.grad = q.data * 3
        n_sharded = clip_grad_norm_(params, 1.0)
        n_plain = clip_grad_norm_(plain, 1.0)
        assert torch.allclose(n_sharded, n_plain, rtol=1e-6), (n_sharded, n_plain)
        for p, q in zip(params, plain):
            assert torch.allclose(p.grad.full_tensor(), q.grad, rtol=1e-6, atol=1e-7)
        # no rank tears gloo down while the other may still be finishing its last collective
        # (seen once in a full suite run: SIGABRT "terminate called without an active exception")
        dist.barrier()
        del mesh, shards, got, params, p
    finally:
        import gc

        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def test_sharded_optimizer_helpers_gather_once_and_clip_like_one_process():
    """The optimizer's FSDP helpers: one all-gather rebuilds uneven dim-0 shards (2-D, 3-D, a
    shard with no rows, two dtypes) exactly; slicing the whole tensor gives back each rank's
    shard; the local-shard gradient clipping equals clipping the plain tensors."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sharded_helpers_worker, args=(2, port), nprocs=2, join=True)


@pytest.mark.parametrize("recipe,extra", [
    ("bd_tiny.yaml", ["--seq-len", "16"]),
    ("ladir_tiny.yaml", ["--data", "chain_arith", "--seq-len", "32"]),
])
def test_fsdp2_trains_objectives_that_run_the_models_parts(tmp_path, recipe, extra):
    """Block diffusion's two-stream pass and LaDiR's passes call the model's parts (embedding,
    blocks, norm, head), not its forward: the trainer runs them through ``HybridLM.run``, which
    ``shard_model`` registers as an FSDP2 forward, so the root's sharded parameters are gathered
    (before, the first step failed with "aten.embedding.default got mixed torch.Tensor and DTensor")."""
    out = tmp_path / "run"
    r = torchrun(["train", str(REPO / "configs" / recipe), "--out", str(out), "--batch-size", "2", "--steps", "2",
                  "--warmup", "1", "--eval-every", "2", "--eval-batches", "1", "--save-every", "100", "--device", "cpu",
                  "--no-progress", *extra])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x2 (FSDP2)" in r.stderr
    got = rows(out)
    assert [x["step"] for x in got] == [1, 2] and all(math.isfinite(x["loss"]) for x in got)
    assert "eval_loss" in got[-1]


ETD_RECIPE = {
    "name": "etd-fsdp", "model": {"vocab_size": 32, "d_model": 32, "max_seq_len": 64, "meta_tokens": 2,
                                  "block_pattern": "GA | (GA | GD) | GA",
                                  "etd": {"encoder_layers": 1, "think_layers": 2, "decoder_layers": 1,
                                          "iterations": 3}},
    "components": {"gated_attn": {"n_heads": 2, "head_dim": 16}, "gdn": {"n_heads": 2, "head_dim": 16},
                   "mlp": {"d_hidden": 64}},
}


def _etd_worker(rank: int, world: int, port: int, out: str, recipe: dict = ETD_RECIPE) -> None:
    """Rank-dependent routes (rank 0 skips the think blocks, rank 1 repeats them) and ACT halting
    (rank 0's tokens halt after the first think iteration, rank 1's think to the end): each block
    call is a collective, so the ranks must make the same calls; each rank's outputs and gradients
    must equal the unsharded model's on its own rows."""
    import torch.distributed as dist

    from hymba_plus import build_model
    from hymba_plus.training.distributed import DistInfo, shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        info = DistInfo(rank=rank, world=world, local_rank=rank, device=torch.device("cpu"),
                        mesh=init_device_mesh("cpu", (world,)))
        results = {}
        for kind in ("routes", "act"):
            comps = dict(recipe["components"])
            comps["etd_router"] = ({"layer_router": {"enabled": True, "hidden": 8, "windows": 2}} if kind == "routes"
                                   else {"halting": {"kind": "act"}})
            torch.manual_seed(0)
            ref = build_model({**recipe, "components": comps}).double()
            model = build_model({**recipe, "components": comps}).double()
            model.load_state_dict(ref.state_dict())
            ids = torch.randint(0, 32, (2, 10), generator=torch.Generator().manual_seed(rank))
            kw = {}
            if kind == "routes":
                n = len(model.structure.slots)
                routes = torch.ones(2, n, dtype=torch.long)
                for i, s in enumerate(model.structure.slots):
                    if s.stage == "think":
                        routes[:, i] = 0 if rank == 0 else 2  # skip / repeat
                kw["routes"] = routes
            else:
                p = 1.0 if rank == 0 else 0.0
                for m in (ref, model):
                    m.etd_router.halting_prob = lambda x, p=p: torch.full(x.shape[:2], p, dtype=torch.float32)
            shard_model(model, info)
            got = model(ids, labels=ids, **kw)
            got.loss.backward()
            want = ref(ids, labels=ids, **kw)
            want.loss.backward()
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
            flat = torch.cat([g.flatten() for g in grads.values()])
            dist.all_reduce(flat)  # FSDP's gradients are the ranks' mean: compare with the mean of the refs'
            rp = dict(ref.named_parameters())  # (a block this rank's reference skipped has no gradient: 0)
            ref_flat = torch.cat([(rp[n].grad if rp[n].grad is not None else torch.zeros_like(rp[n])).flatten()
                                  for n in grads])
            dist.all_reduce(ref_flat)
            results[kind] = (float((got.logits - want.logits).abs().max()), float((flat - ref_flat).abs().max()))
        if rank == 0:
            Path(out).write_text(json.dumps(results))
        dist.barrier()
    finally:
        import gc

        gc.collect()
        dist.destroy_process_group()


# an MoE layer in a think block: applied once per iteration, each application adding its aux losses
ETD_MOE_RECIPE = {**ETD_RECIPE, "model": {**ETD_RECIPE["model"], "block_pattern": "GA | (GA | GD+moe) | GA"},
                  "components": {**ETD_RECIPE["components"], "moe": {"n_experts": 4, "top_k": 2, "d_expert": 16}}}


@pytest.mark.parametrize("recipe", [ETD_RECIPE, ETD_MOE_RECIPE], ids=["dense", "moe"])
def test_fsdp2_etd_routes_and_halting_that_differ_per_rank(tmp_path, recipe):
    """ETD under FSDP2 with a route that skips a block on one rank and repeats it on the other, and
    ACT halting at different iterations per rank: the ranks' block calls (each a collective) used to
    differ ("Received data size doesn't match expected size ... collective mismatch" in gloo); whether
    a block runs is now decided over all ranks, a rank that needs none running it with every token
    inactive. With MoE in a think block (``moe``): FSDP2's pre-forward rebuilt the block's
    StepContext argument once it held an aux loss (a dataclass holding a tensor that requires grad),
    so from the second iteration on the block's aux losses went into a copy: the loss counted one
    iteration's balance and z losses of 3, and the gradients differed by ~4e-3."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "r.json"
    mp.spawn(_etd_worker, args=(2, port, str(out), recipe), nprocs=2, join=True)
    res = json.loads(out.read_text())
    for kind, (logits, grads) in res.items():
        assert logits < 1e-10 and grads < 1e-10, (kind, logits, grads)


@pytest.mark.slow  # two training runs, one of them under torchrun (~13 s): make test-all runs it
def test_fsdp2_routing_statistics_are_the_global_batchs(tmp_path):
    """The MoE statistics in metrics.jsonl were rank 0's (half the tokens on 2 ranks): counts are now
    summed over ranks, the rest averaged, so 2 ranks x batch 2 log what 1 process x batch 4 logs."""
    moe = {**RECIPE, "model": {**RECIPE["model"], "block_pattern": "GA+moe | GA"},
           "components": {**RECIPE["components"], "moe": {"n_experts": 5, "top_k": 2, "d_expert": 16}}}
    one, two, _ = one_and_two(tmp_path, moe, 1)
    one, two = one[0], two[0]
    key = next(k for k in one if k.endswith("tokens_per_expert"))
    assert sum(one[key]) == 4 * (16 + 3) * 2  # rows x (tokens + meta) x top_k
    assert two[key] == one[key]
    for k in (k for k in one if k.startswith("moe/") and not k.endswith("tokens_per_expert")):
        assert two[k] == pytest.approx(one[k], rel=0.5, abs=1e-6), k  # means of the ranks' (max_load, entropy)


@pytest.mark.slow  # two training runs, one of them under torchrun (~12 s): make test-all runs it
def test_fsdp2_with_activation_checkpointing_matches_one_plain_process(tmp_path):
    """``--activation-checkpoint 1`` under FSDP2: each checkpointed block's recomputation in the
    backward gathers its parameters again (FSDP2's pre-backward unshard); the 2-process run's losses
    equal one process's without checkpointing. (A dense recipe: an MoE's balance loss is each rank's
    batch's, so MoE runs differ from one process by ~2e-4 by step 3, checkpointed or not; checkpointed
    MoE blocks are tested equal to plain ones in tests/test_recompute.py.)"""
    one, two, err = one_and_two(tmp_path, RECIPE, 3, "--activation-checkpoint", "1")
    assert "activation checkpointing" in err
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two)) < 1e-5


@pytest.mark.slow  # two training runs, one of them under torchrun (~10 s): make test-all runs it
def test_fsdp2_cross_layer_kv_sharing_matches_one_process(tmp_path):
    """Hymba's cross-layer K/V sharing under FSDP2: a producer block leaves its keys and values in
    the call's ``StepContext.shared`` for the next block. FSDP2's pre-forward rebuilt that context
    once it held a tensor requiring grad, so later producers wrote into a copy and their consumers
    read an earlier layer's K/V: the first step's loss was 5.585 against one process's 5.602."""
    hy = {"name": "hy-fsdp", "model": {"vocab_size": 37, "d_model": 32, "max_seq_len": 64, "meta_tokens": 3,
                                       "block_pattern": "GA | HY*4 | GA"},
          "components": {"hymba": {"ssm": "mamba3", "attn": {"n_heads": 2, "n_kv_heads": 1, "window": 8,
                                                             "kv_share": True}},
                         "mamba3": {"state_size": 8, "head_dim": 16, "expand": 1},
                         "gated_attn": {"n_heads": 2, "n_kv_heads": 1}, "mlp": {"d_hidden": 45}}}
    one, two, _ = one_and_two(tmp_path, hy, 2)
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two)) < 1e-5


@pytest.mark.slow  # two training runs, one of them under torchrun (~10 s): make test-all runs it
def test_fsdp2_bf16_parameters_keep_float_inputs(tmp_path):
    """``--fsdp-param-dtype bfloat16`` leaves the forward's inputs as they come: FSDP2's
    MixedPrecisionPolicy cast every floating input to bf16 by default (the residual stream at each
    block, and the forecast objective's series values and targets at the root), so 2 processes
    trained configs/forecast_tiny.yaml 1.7e-4 off in the first step's loss and 1.8% in its gradient
    norm from one process with ``--param-dtype bfloat16`` (bf16 weights, float32 activations)."""
    common = ["--steps", "1", "--warmup", "1", "--device", "cpu", "--no-progress", "--eval-every", "100",
              "--save-every", "100", "--precision", "bf16"]
    recipe = str(REPO / "configs" / "forecast_tiny.yaml")
    assert one_process(["train", recipe, "--out", str(tmp_path / "one"), "--batch-size", "4",
                        "--param-dtype", "bfloat16", *common]) == 0
    r = torchrun(["train", recipe, "--out", str(tmp_path / "two"), "--batch-size", "2",
                  "--fsdp-param-dtype", "bfloat16", *common])
    assert r.returncode == 0, r.stderr[-3000:]
    (a,), (b,) = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert abs(a["loss"] - b["loss"]) < 3e-5 and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2e-3)
