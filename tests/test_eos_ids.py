"""Several end-of-sequence ids (``eos_token_id=[a, b]``, as HF's generation configs of instruct
models): every decoding mode ends a row at its first end id of either kind and writes the first
id after it; the output is the run without end ids, cut there."""

from __future__ import annotations

import json

import pytest
import torch

from hymba_plus import build_model
from hymba_plus.cli import main
from hymba_plus.models import generation_config
from hymba_plus.models.generation import check_eos, end_tokens

V = 24
COMPS = {"gated_attn": {"n_heads": 2, "head_dim": 16}, "gdn": {"n_heads": 2, "head_dim": 16},
         "mlp": {"d_hidden": 64}}


def model(**extra) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model({"name": "eos", "model": {"vocab_size": V, "d_model": 32, "max_seq_len": 64,
                                               "block_pattern": "GD | GA", "tie_embeddings": False,
                                               **extra.pop("model", {})},
                     "components": COMPS, **extra}).double().eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20.0)  # a sharper random model (untied: tied ones repeat the last token)
    return m


def cut(ref: torch.Tensor, T: int, ids: tuple[int, ...]) -> torch.Tensor:
    """The oracle: ``ref``'s new tokens after each row's first end id replaced by ``ids[0]``."""
    new = ref[:, T:].clone()
    for row in new:
        hits = [j for j, t in enumerate(row.tolist()) if t in ids]
        if hits:
            row[hits[0] + 1:] = ids[0]
    return torch.cat([ref[:, :T], new], 1)


MODES = {
    "ar": ({}, {}),
    "speculative": ({}, {"k": 3}),  # the draft is the model itself
    "mtp": ({"model": {"mtp": {"depth": 2, "block": "GD"}}}, {"seed": 2}),  # (seed 1: one token repeated)
    "block_diffusion": ({"objective": {"kind": "block_diffusion", "block_size": 4}}, {"threshold": 0.5}),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_several_end_ids_end_a_row_at_the_first_of_any(mode) -> None:
    extra, opts = MODES[mode]
    opts = dict(opts)
    seed = opts.pop("seed", 1)
    m = model(**extra)
    if mode == "speculative":
        opts = {**opts, "draft": m}
    T, N = 5, 12
    x = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(seed))
    ref = m.generate(x, N, mode=mode, **opts)
    # two ids such that row 0 ends by the first (at its first occurrence) and row 1 by the second
    r0, r1 = ref[0, T:].tolist(), ref[1, T:].tolist()
    pairs = [(a, b) for a in r0 for b in r1 if a != b and b not in r0[:r0.index(a)] and a not in r1[:r1.index(b)]]
    assert pairs, (r0, r1)
    a, b = max(pairs, key=lambda p: r0.index(p[0]) + r1.index(p[1]))  # the latest ends
    i, j = T + r0.index(a), T + r1.index(b)
    for ids in ((a, b), (b, a), [a, b]):
        got = m.generate(x, N, mode=mode, eos_token_id=ids, **opts)
        want = cut(ref, T, tuple(ids))
        assert torch.equal(got, want[:, :got.shape[1]]), (ids, got, want)
        assert (want[:, got.shape[1]:] == ids[0]).all()  # a shorter output: every row had ended
        assert got[0, i] == a and got[0, i + 1:].eq(ids[0]).all()
        assert got[1, j] == b and got[1, j + 1:].eq(ids[0]).all()
    # one id in a list is that id
    assert torch.equal(m.generate(x, N, mode=mode, eos_token_id=[a], **opts),
                       m.generate(x, N, mode=mode, eos_token_id=a, **opts))


def test_end_tokens_and_their_checks() -> None:
    e = end_tokens([7, 3], "cpu")
    t = torch.tensor([[1, 3, 5, 7], [2, 2, 2, 2]])
    assert e.fill == 7 and e.hit(t).tolist() == [[False, True, False, True], [False] * 4]
    assert e.after(t).tolist() == [[False, False, True, True], [False] * 4]
    assert end_tokens(None, "cpu") is None and end_tokens(3, "cpu").ids == (3,)
    check_eos([0, 255], 256)
    for bad in ([], [1, 256], [1, -1], [1, "a"], (True,), 2.0, {3}):
        with pytest.raises(ValueError, match="eos_token_id must be a token id in \\[0, 256\\) or a non-empty list"):
            check_eos(bad, 256)


# --------------------------------------------------------------------------- checkpoints and the CLI
def _ids_checkpoint(tmp_path, eos=None):  # noqa: ANN001, ANN202
    from hymba_plus.training.tokenizer import IdsTokenizer

    m = model()
    ckpt = tmp_path / "ckpt"
    m.save_pretrained(ckpt, extra_files={"tokenizer.json": IdsTokenizer(V).to_json()})
    if eos is not None:
        (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return m, ckpt


def _cli_ids(capsys, *args) -> tuple[int, list[int], str]:  # noqa: ANN001
    rc = main(["generate", *map(str, args)])
    cap = capsys.readouterr()
    return rc, [int(w) for w in cap.out.split()] if rc == 0 else [], cap.err


def test_cli_takes_the_end_ids_from_eos_then_generation_config(tmp_path, capsys) -> None:
    m, ckpt = _ids_checkpoint(tmp_path)
    prompt = [3, 4, 5, 6, 7]
    base = ["--prompt", " ".join(map(str, prompt)), "--temperature", "0", "--max-new-tokens", "10", "--no-stream"]
    rc, full, err = _cli_ids(capsys, ckpt, *base)
    assert rc == 0, err
    new = full[len(prompt):]
    assert len(new) == 10
    a = next(t for t in new[2:] if t not in new[:2])  # an id the model first gives past its 2nd new token
    cut_at = new.index(a)
    # --eos: the row ends at its first end id (printed without it)
    rc, got, err = _cli_ids(capsys, ckpt, *base, "--eos", f"{V - 1},{a}")
    assert rc == 0 and got == full[:len(prompt) + cut_at], (got, full, err)
    # generation_config.json names them; --eos none turns them off
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [a, V - 1], "do_sample": True}))
    rc, got, err = _cli_ids(capsys, ckpt, *base)
    assert rc == 0 and got == full[:len(prompt) + cut_at], err
    assert generation_config(ckpt, V) == {"eos_token_id": [a, V - 1]}  # only the end ids are read
    rc, got, err = _cli_ids(capsys, ckpt, *base, "--eos", "none")
    assert rc == 0 and got == full, err
    # streamed: the same text, the end token not printed (it was, while --no-stream cut it)
    streamed = [b for b in base if b != "--no-stream"]
    rc, got, err = _cli_ids(capsys, ckpt, *streamed)
    assert rc == 0 and got == full[:len(prompt) + cut_at], (got, err)


@pytest.mark.parametrize("mode", ["speculative", "mtp"])
def test_int32_prompts_in_every_mode(mode) -> None:
    """``generate`` takes int32 ids (``check_prompt``); speculative and mtp wrote the sampled (long)
    tokens into int32 buffers: RuntimeError in scatter."""
    extra, opts = MODES[mode]
    m = model(**extra)
    opts = {k: v for k, v in opts.items() if k != "seed"}
    if mode == "speculative":
        opts["draft"] = m
    x = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(2))
    assert torch.equal(m.generate(x.int(), 6, mode=mode, **opts), m.generate(x, 6))


@pytest.mark.parametrize("text, says", [
    ("[1, 99]", "generation_config.json: eos_token_id: eos_token_id must be a token id in [0, 24)"),
    ("[]", "generation_config.json: eos_token_id:"),
    ("{", "generation_config.json: not JSON"),
    ("[2]", "generation_config.json: must be a JSON object"),
])
def test_a_bad_generation_config_is_one_line(tmp_path, capsys, text, says) -> None:
    _, ckpt = _ids_checkpoint(tmp_path)
    (ckpt / "generation_config.json").write_text(text if text[0] != "[" or text == "[2]" else
                                                 json.dumps({"eos_token_id": json.loads(text)}))
    rc, _, err = _cli_ids(capsys, ckpt, "--prompt", "3 4", "--max-new-tokens", "2")
    assert rc == 1 and err.count("\n") == 1 and says in err and "Traceback" not in err, err


@pytest.mark.parametrize("flag, says", [
    ("x", "argument --eos: 'x': token ids separated by commas"),
    ("1,-2", "argument --eos: '1,-2': token ids are >= 0"),
    ("1,99", "--eos 1,99: token id 99 is outside [0, 24)"),  # (was the API's "eos_token_id must be ... (or None ...)")
])
def test_bad_eos_flags(tmp_path, capsys, flag, says) -> None:
    _, ckpt = _ids_checkpoint(tmp_path)
    try:
        rc = main(["generate", str(ckpt), "--prompt", "3 4", "--max-new-tokens", "2", "--eos", flag])
    except SystemExit as e:  # argparse's usage error
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and says in err, err


def test_convert_carries_the_end_ids_both_ways(tmp_path, capsys) -> None:
    """An instruct model's ``generation_config.json`` lists several end ids (Llama-3: <|end_of_text|>,
    <|eot_id|>): import keeps them, ``hymba generate`` ends there as HF's ``generate`` does, export
    writes them back (config.json and generation_config.json)."""
    tf = pytest.importorskip("transformers")
    from hymba_plus import from_pretrained
    from hymba_plus.convert import export_hf, import_hf
    from tests.hf_models import hf_model, save_hf

    hf = hf_model("LlamaForCausalLM", seed=2)
    src = save_hf(hf, tmp_path / "hf")
    prompt = torch.randint(0, 90, (2, 5), generator=torch.Generator().manual_seed(3))
    free = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    r0, r1 = free[0, 5:].tolist(), free[1, 5:].tolist()
    a = next(t for t in r0[1:] if t not in r0[:1] + r1[:3])  # ends row 0 past its first new token
    b = next(t for t in r1 if t != a and t not in r0[:r0.index(a)])
    gen = json.loads((src / "generation_config.json").read_text())
    (src / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [a, b]}))
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "eos_token_id": a}))  # generation_config's list wins
    import_hf(src, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "generation_config.json").read_text()) == {"eos_token_id": [a, b]}
    ours = from_pretrained(tmp_path / "ours").eval()
    want = tf.LlamaForCausalLM.from_pretrained(src).eval().generate(prompt, max_new_tokens=12, do_sample=False,
                                                                     pad_token_id=0)
    got = ours.generate(prompt, 12, eos_token_id=generation_config(tmp_path / "ours")["eos_token_id"])
    for row in range(2):  # equal up to each row's end (HF pads after it, we repeat the first end id)
        n = next(j for j, t in enumerate(want[row, 5:].tolist()) if t in (a, b)) + 1
        assert torch.equal(got[row, :5 + n], want[row, :5 + n]), row
    export_hf(tmp_path / "ours", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["eos_token_id"] == [a, b]
    assert json.loads((tmp_path / "back" / "generation_config.json").read_text()) == {"do_sample": False,
                                                                                      "eos_token_id": [a, b]}
    # config.json alone (no generation_config.json): its id; an id outside the vocabulary: refused in one line
    (src / "generation_config.json").unlink()
    import_hf(src, tmp_path / "ours2")
    assert json.loads((tmp_path / "ours2" / "generation_config.json").read_text()) == {"eos_token_id": a}
    (src / "config.json").write_text(json.dumps({**cfg, "eos_token_id": [a, 500]}))
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "ours3")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json: eos_token_id: eos_token_id must be a token id in [0, 96)" in err
    assert not (tmp_path / "ours3").exists()
