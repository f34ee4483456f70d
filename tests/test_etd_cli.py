"""The command line on ETD (encode-think-decode) recipes: ``hymba info`` (stages, the
per-application view, the ``etd`` JSON object; plain recipes unchanged), ``hymba generate``
(the think iterations and Dr.LLM route of every prompt row, ``--think-iterations``, its
errors) and the ``configs/etd_*tiny.yaml`` recipes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from hymba_plus import build_model
from hymba_plus.cli import main
from hymba_plus.components.etd_router import REPEAT
from hymba_plus.training.tokenizer import IdsTokenizer
from tests.conftest import rel_err
from tests.test_invariant import chunked

ROOT = Path(__file__).resolve().parents[1]
ETD_CONFIGS = {p.stem: p for p in sorted((ROOT / "configs").glob("etd_*.yaml"))}
TINY, DRLLM, MODR = (ETD_CONFIGS[k] for k in ("etd_tiny", "etd_drllm_tiny", "etd_modr_tiny"))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def info_json(capsys, path: Path, *extra: str) -> dict:
    rc, out, err = run(capsys, "info", str(path), "--json", *extra)
    assert rc == 0, err
    return json.loads(out)


# --------------------------------------------------------------------------- hymba info


def test_info_text_shows_stages_applications_and_cache_per_iteration(capsys):
    rc, out, err = run(capsys, "info", str(TINY))
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert "etd         encoder 1 | think 4 x 2 iterations (max 3), tied weights | decoder 1" in lines
    assert "            fixed iterations (inference may ask for 1..3)" in lines
    assert re.search(r"^layer\s+stage\s+mixer\s+ffn\s+params\s+active\s+state@1k\s+state@32k$", out, re.M)
    stages = [m.group(1) for m in re.finditer(r"^\s+\d+\s+(encoder|think|decoder)\s+\w+\s+mlp\s", out, re.M)]
    assert stages == ["encoder"] + ["think"] * 4 + ["decoder"]
    assert re.search(r"^\s+-\s+etd_router\s+0\s+0$", out, re.M)  # fixed iterations: no learned controller
    assert re.search(r"^\s+-\s+embed/meta/norm/head\s+[\d,]+\s+[\d,]+$", out, re.M)
    assert ("applied     per forward: encoder 1 + think 4 x 2 iterations (max 3) + decoder 1 = 10 layer "
            "applications") in lines
    assert "            at max_iterations 3: 14 layer applications" in lines
    parts = [m.group(1) for m in re.finditer(r"^(encoder|think it\d \*|think it\d|decoder)\s+[\d-]+\s+[\d.]+ ",
                                             out, re.M)]
    assert parts == ["encoder", "think it0", "think it1", "think it2 *", "decoder"]
    assert any(line.startswith("* beyond iterations (2): only when inference asks for more") for line in lines)
    assert re.search(r"^parameters  total [\d,]+ \(.*\), active [\d,]+ \(.*\) \(think weights counted once; "
                     r"etd_router 0\)$", out, re.M)
    assert re.search(r"^cache       per sequence \(float32\), 3 think iterations \(max_iterations\): 1k tokens "
                     r"[\d.]+ [KM]iB, 32k tokens [\d.]+ [KM]iB$", out, re.M)
    assert re.search(r"^            2 think iterations: 1k tokens ", out, re.M)
    assert lines[-1].startswith("kernels     ")


def test_info_text_for_routes_and_act(capsys):
    out = run(capsys, "info", str(DRLLM))[1]
    assert "layer routes: per slot skip 0, execute 1, repeat 2 applications: 0 to 16" in out
    assert re.search(r"^            layer routes: a repeat fills a second state for its slot, so at worst \(every "
                     r"slot repeated\) 2x the states': 1k tokens", out, re.M)
    assert "Dr.LLM layer routes" in out and "think it2" not in out  # max_iterations = iterations
    out = run(capsys, "info", str(MODR))[1]
    assert "etd         encoder 1 | think 2 x 1..4 iterations (ACT, per token), tied weights | decoder 1" in out
    assert "ACT halting (threshold 0.99, ponder cost 0.01); MoDr 4 LoRA branches of rank 4" in out
    assert "= at most 10 layer applications" in out and "*" not in out.split("application ")[1].split("parameters")[0]
    assert "4 think iterations (max_iterations; tokens that halt earlier add less)" in out
    assert "layer routes" not in out


def test_info_json_parameters_count_think_weights_once(capsys):
    for path in ETD_CONFIGS.values():
        d = info_json(capsys, path)
        e = d["etd"]
        torch.manual_seed(0)
        model = build_model(path)
        assert d["params_total"] == model.num_parameters()
        assert e["router_params"] == sum(p.numel() for p in model.etd_router.parameters())
        assert [r["params"] for r in d["layers"]] == [sum(p.numel() for p in b.parameters()) for b in model.blocks]
        assert sum(r["params"] for r in d["layers"]) + e["router_params"] + d["other_params"] == d["params_total"]
        assert [r["stage"] for r in d["layers"]] == (["encoder"] * e["encoder_layers"] + ["think"] * e["think_layers"]
                                                     + ["decoder"] * e["decoder_layers"])
        assert e["cache_states"] == len(model.new_cache(1).states)
    e = info_json(capsys, MODR)["etd"]
    lora = sum(p.numel() for n, p in info_model(MODR).etd_router.named_parameters() if n.startswith("lora_"))
    assert lora > 0 and e["router_active_params"] == e["router_params"] - lora + lora // 4  # one branch of 4
    assert e["halting"] == "act" and e["default_think_iterations"] == 4 and e["n_branches"] == 4
    assert e["applications"] == {"per_forward": 10, "at_max_iterations": 10, "most_with_repeats": None}
    e = info_json(capsys, DRLLM)["etd"]
    assert e["layer_routes"] and e["applications"] == {"per_forward": 8, "at_max_iterations": 8,
                                                       "most_with_repeats": 16}


def info_model(path: Path):
    torch.manual_seed(0)
    return build_model(path).eval()


@pytest.mark.parametrize("T", [5, 17])
def test_info_cache_bytes_match_a_real_cache(capsys, T):
    """Every (layer, iteration) application has its own state: the per-part bytes are the
    real states' bytes; a Dr.LLM repeat fills a second state per slot (2x at worst)."""
    d = info_json(capsys, TINY, "--seq-lens", f"{T}")
    model = info_model(TINY)
    ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(T))
    cache = model.new_cache(1)
    with torch.no_grad():
        model(ids, cache=cache, think_iterations=3)
    per_state = [b for p in d["etd"]["parts"] for b in [d["layers"][i]["state_bytes"][str(T)] for i in p["layers"]]]
    assert per_state == cache.layer_nbytes()
    assert [p["state_bytes"][str(T)] for p in d["etd"]["parts"]][1:4] == [sum(per_state[1:5])] * 3
    assert d["cache_bytes"][str(T)] == d["etd"]["cache_bytes"]["max_iterations"][str(T)] == cache.nbytes()
    its = d["etd"]["cache_bytes"]["iterations"][str(T)]  # iteration 2's slots idle: only attention's is empty
    assert its == cache.nbytes() - d["etd"]["parts"][3]["state_bytes"][str(T)] + sum(
        b.mixer.state_nbytes(0, torch.float32) for b in model.blocks[1:5])

    d = info_json(capsys, DRLLM, "--seq-lens", f"{T}")
    model = info_model(DRLLM)
    n_slots = len(model.structure.slots)
    cache = model.new_cache(1)
    with torch.no_grad():  # every slot repeated: both states of every slot are filled
        model(ids, cache=cache, routes=torch.full((1, n_slots), REPEAT))
    applied = sum(d["layers"][i]["state_bytes"][str(T)] for p in d["etd"]["parts"] for i in p["layers"])
    assert d["etd"]["cache_bytes_with_repeats"][str(T)] == 2 * applied == cache.nbytes()


@pytest.mark.parametrize("T", [5, 17])
def test_info_cache_bytes_count_the_states_new_cache_allocates_unused(capsys, T):
    """``new_cache`` allocates a state for every (layer, iteration) slot, repeats included, and
    a recurrent one has its size before any token: a cache run at ``iterations`` (< max) or with
    all-execute routes (no repeat) still holds those idle states. Regression: ``hymba info``
    left them out (etd_tiny's 2-iteration line, etd_drllm_tiny's cache line too small)."""
    ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(T))
    for path, key in ((TINY, "iterations"), (DRLLM, "max_iterations")):
        d = info_json(capsys, path, "--seq-lens", f"{T}")
        model = info_model(path)
        cache = model.new_cache(1)
        with torch.no_grad():  # the default: etd.iterations, every route "execute"
            model(ids, cache=cache)
        assert d["etd"]["cache_bytes"][key][str(T)] == cache.nbytes(), path.name


def test_info_plain_recipe_output_is_unchanged(capsys):
    d = info_json(capsys, ROOT / "configs" / "gpt_tiny.yaml")
    assert "etd" not in d and all("stage" not in r for r in d["layers"])
    out = run(capsys, "info", str(ROOT / "configs" / "gpt_tiny.yaml"))[1]
    assert re.search(r"^layer\s+mixer\s+ffn\s+params", out, re.M)
    out = out.replace(str(ROOT), "")  # the checkout's path may hold the letters "etd"
    assert "etd" not in out and "applied" not in out and "counted once" not in out


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", list(ETD_CONFIGS.values()), ids=list(ETD_CONFIGS))
def test_etd_configs_check_and_keep_the_invariant_with_routes_on(capsys, path):
    """``hymba check`` passes; CPU-small; chunked cached == full forward with the routers
    switched on and a halting unit that depends on the token (the full forward gets the
    route the prefill took: per-sequence decisions are kept in cache.extra)."""
    rc, out, _ = run(capsys, "check", str(path))
    assert rc == 0 and out.startswith("OK ")
    model = info_model(path)
    assert model.num_parameters() < 400_000
    with torch.no_grad():
        r = model.etd_router
        model.embed.weight.mul_(20.0)
        if r.halt is not None:
            r.halt.weight.normal_(0, 1.0)
        if r.routers is not None:
            r.enable_routes()
        ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
        got, cache = chunked(model, ids, [0, 1, 8, 20])
        full = model(ids, routes=cache.extra.get("routes")).logits
    assert rel_err(got, full) <= 1e-4


def test_demo_tour_runs_the_etd_configs(capsys, tmp_path):
    from hymba_plus import demo

    for path in ETD_CONFIGS.values():
        shutil.copy(path, tmp_path / path.name)
    assert demo.main(["--configs", str(tmp_path), "--new-tokens", "3", "--no-train",
                      "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert out.count("same tokens: yes") == 3 and out.count("(ok, bound 1e-4)") == 3


# --------------------------------------------------------------------------- hymba generate


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("etd-gen")
    tok = IdsTokenizer(256).to_json()
    for name, path in ETD_CONFIGS.items():
        model = info_model(path)
        with torch.no_grad():
            r = model.etd_router
            if r.halt is not None:  # halting that depends on the token
                r.halt.weight.normal_(0, 1.0)
                model.embed.weight.mul_(20.0)
            if r.routers is not None:  # trained routers: they decide the routes
                r.enable_routes()
        model.save_pretrained(root / name, extra_files={"tokenizer.json": tok})
    plain = build_model({"name": "plain", "model": {"vocab_size": 256, "d_model": 32, "max_seq_len": 48,
                                                    "block_pattern": "GA"},
                         "components": {"gated_attn": {"n_heads": 2}, "mlp": {"d_hidden": 64}}})
    plain.save_pretrained(root / "plain", extra_files={"tokenizer.json": tok})
    return root


def gen(capsys, ckpt: Path, *args: str) -> tuple[int, str, list[str]]:
    rc, out, err = run(capsys, "generate", str(ckpt), "--max-new-tokens", "4", "--temperature", "0", *args)
    return rc, out, err.splitlines()


def loaded(ckpt: Path):
    from hymba_plus import from_pretrained

    return from_pretrained(ckpt).eval()


def test_generate_prints_fixed_iterations_and_think_iterations_reaches_the_model(ckpts, capsys):
    rc, out, err = gen(capsys, ckpts / "etd_tiny", "--prompt", "1 2 3 4 5")
    assert rc == 0 and err == ["etd: 2 think iterations (fixed; trained with 2, max 3)"]
    assert len(out.split()) == 5 + 4
    for n in (1, 3):
        rc, out, err = gen(capsys, ckpts / "etd_tiny", "--prompt", "1 2 3 4 5", "--think-iterations", str(n))
        assert rc == 0
        assert err == [f"etd: {n} think iteration{'s' if n > 1 else ''} (fixed; trained with 2, max 3)"]
        model = loaded(ckpts / "etd_tiny")  # greedy re-run of full forwards at n iterations
        want = torch.tensor([[1, 2, 3, 4, 5]])
        with torch.no_grad():
            for _ in range(4):
                nxt = model(want, think_iterations=n).logits[:, -1].argmax(-1, keepdim=True)
                want = torch.cat([want, nxt], 1)
        assert [int(t) for t in out.split()] == want[0].tolist()


def test_generate_prints_the_route_of_every_row(ckpts, capsys):
    ckpt = ckpts / "etd_drllm_tiny"
    model = loaded(ckpt)
    prompts = [[1, 2, 3, 4, 5, 6], [9, 8], [40, 41, 42]]
    want = []
    for p in prompts:
        with torch.no_grad():
            routes = model(torch.tensor([p])).stats["etd/routes"]
        want.append(model.structure.describe_route(routes[0], 2))
    assert len(set(want)) > 1  # the rows take different routes
    args = [a for p in prompts for a in ("--prompt", " ".join(map(str, p)))]
    rc, out, err = gen(capsys, ckpt, *args)
    assert rc == 0 and len(out.splitlines()) == 3
    assert err == [f"[{i}] etd: 2 think iterations (fixed; trained with 2); route: {w}" for i, w in enumerate(want)]
    assert all(re.fullmatch(r"(enc|think|dec) \d(@it\d)? (skip|execute|repeat)", part)
               for part in want[0].split(", "))
    rc, _, err = gen(capsys, ckpt, "--prompt", "1 2 3 4 5 6", "--think-iterations", "1")
    with torch.no_grad():
        routes = model(torch.tensor([prompts[0]]), think_iterations=1).stats["etd/routes"]
    assert rc == 0 and err == [f"etd: 1 think iteration (fixed; trained with 2); route: "
                               f"{model.structure.describe_route(routes[0], 1)}"]
    assert "@it1" not in err[0]


def test_generate_prints_the_act_mean_per_row(ckpts, capsys):
    ckpt = ckpts / "etd_modr_tiny"
    model = loaded(ckpt)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [200, 3]]
    means = []
    for p in prompts:
        with torch.no_grad():
            means.append(float(model(torch.tensor([p])).stats["etd/iterations"]))
    rc, _, err = gen(capsys, ckpt, "--prompt", "1 2 3 4 5 6 7")
    assert rc == 0 and err == [f"etd: 4 think iterations (ACT: mean over prompt tokens {means[0]:.2f} of max 4)"]
    assert 1.0 <= means[0] < 4.0  # tokens halt at different iterations
    rc, _, err = gen(capsys, ckpt, "--prompt", "1 2 3 4 5 6 7", "--prompt", "200 3", "--no-stream")
    assert rc == 0 and err == [f"[{i}] etd: 4 think iterations (ACT: mean over prompt tokens {m:.2f} of max 4)"
                               for i, m in enumerate(means)]
    rc, _, err = gen(capsys, ckpt, "--prompt", "1 2 3", "--think-iterations", "2")
    with torch.no_grad():
        mean = float(model(torch.tensor([[1, 2, 3]]), think_iterations=2).stats["etd/iterations"])
    assert rc == 0 and err == [f"etd: 2 think iterations (ACT: mean over prompt tokens {mean:.2f} of max 4)"]


@pytest.mark.parametrize("name, value, needle", [
    ("plain", "2", "--think-iterations: {ckpt} is not an ETD model (its recipe has no model.etd)"),
    ("etd_tiny", "4", "--think-iterations 4: the model holds states for at most 3 think iterations "
                      "(model.etd.max_iterations)"),
    ("etd_tiny", "0", "--think-iterations 0: must be >= 1"),
])
def test_think_iterations_errors_are_one_line(ckpts, capsys, name, value, needle):
    rc, out, err = gen(capsys, ckpts / name, "--prompt", "1 2", "--think-iterations", value)
    assert rc == 2 and out == ""
    assert err == [f"hymba generate: {needle.format(ckpt=ckpts / name)}"]


def test_plain_checkpoint_prints_no_etd_line(ckpts, capsys):
    rc, out, err = gen(capsys, ckpts / "plain", "--prompt", "1 2")
    assert rc == 0 and err == [] and len(out.split()) == 6


@pytest.mark.parametrize("flag, says", [(("--route-tolerance", "-0.1"), "--route-tolerance -0.1: must be >= 0"),
                                        (("--route-beam", "0"), "--route-beam 0: must be in 1 .. 64")])
def test_train_route_search_flags_are_checked(capsys, tmp_path, flag, says) -> None:
    """The route-search flags of router training: a bad value is one line, exit 2, nothing written."""
    rc, out, err = run(capsys, "train", str(DRLLM), "--out", str(tmp_path / "run"), *flag)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert says in err
    assert not (tmp_path / "run").exists()


def test_ladir_generate_prints_each_prompts_own_route(tmp_path, capsys):
    """LaDiR prefills each question once per sample (B * samples rows): row i of the prefill's routes is
    not prompt i's, so every prompt after the first was shown the first prompt's route."""
    import yaml

    configs = Path(__file__).resolve().parents[1] / "configs"
    r = yaml.safe_load((configs / "etd_drllm_tiny.yaml").read_text())
    lad = yaml.safe_load((configs / "ladir_tiny.yaml").read_text())
    r.update(name="etd-ladir", ladir=dict(lad["ladir"], samples=3), objective=lad["objective"])
    r["model"].update(vocab_size=32, max_seq_len=64)
    torch.manual_seed(0)
    model = build_model(r).eval()
    with torch.no_grad():  # routes switched on and sharpened so that they differ between the prompts
        model.etd_router.enable_routes()
        for n, p in model.named_parameters():
            if "routers" in n and n.endswith("weight"):
                p.mul_(60)
    model.save_pretrained(tmp_path / "ck", extra_files={"tokenizer.json": IdsTokenizer(32).to_json()})
    prompts = ["1 2 3 4 5", "20 3 17 8 30 2 11"]
    alone = []
    for p in prompts:
        rc, _, err = gen(capsys, tmp_path / "ck", "--prompt", p, "--mode", "ladir", "--max-new-tokens", "2")
        assert rc == 0
        alone += [line.split("route: ")[1] for line in err if "route: " in line]
    assert len(alone) == 2 and alone[0] != alone[1]
    rc, _, err = gen(capsys, tmp_path / "ck", *[a for p in prompts for a in ("--prompt", p)], "--mode", "ladir",
                     "--max-new-tokens", "2")
    assert rc == 0 and [line.split("route: ")[1] for line in err if "route: " in line] == alone


def test_info_act_json_has_no_fixed_iterations_cache(capsys):
    """Under ACT halting a forward runs up to max_iterations (tokens halt on their own): the
    recipe's ``iterations`` sets no cache size. Regression: the JSON carried a
    ``cache_bytes.iterations`` figure the text (rightly) omits; it is null now."""
    e = info_json(capsys, MODR)["etd"]
    assert e["halting"] == "act"
    assert e["cache_bytes"]["iterations"] is None and e["cache_bytes_known"]["iterations"] is None
    assert e["cache_bytes"]["max_iterations"]["1024"] > 0
    e = info_json(capsys, TINY)["etd"]  # fixed iterations: both figures
    assert e["halting"] != "act" and e["cache_bytes"]["iterations"]["1024"] > 0
