"""hymba generate: streaming, batched prompts with left padding, sampling flags, the
checkpoint's tokenizer, and one-line errors."""

from __future__ import annotations

import functools
import io
import sys

import pytest
import torch

from hymba_plus import build_model
from hymba_plus.cli import main
from hymba_plus.training.tokenizer import ByteTokenizer, IdsTokenizer

RECIPE = {
    "name": "gen-tiny",
    "model": {"vocab_size": 256, "d_model": 32, "max_seq_len": 48, "block_pattern": "GA | GA", "meta_tokens": 2},
    "components": {"gated_attn": {"n_heads": 2}, "mlp": {"d_hidden": 64}},
}




@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(RECIPE)
    root = tmp_path_factory.mktemp("gen")
    model.save_pretrained(root / "ids", extra_files={"tokenizer.json": IdsTokenizer(256).to_json()})
    model.save_pretrained(root / "bytes", extra_files={"tokenizer.json": ByteTokenizer().to_json()})
    return root


def gen(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["generate", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_single_prompt_streams_token_by_token(ckpts, monkeypatch):
    writes: list[str] = []

    class Recorder(io.StringIO):
        def write(self, s: str) -> int:
            writes.append(s)
            return super().write(s)

    rec = Recorder()
    monkeypatch.setattr(sys, "stdout", rec)
    assert main(["generate", str(ckpts / "ids"), "--prompt", "5 6 7", "--max-new-tokens", "6",
                 "--temperature", "0"]) == 0
    text = rec.getvalue()
    assert text.startswith(" 5 6 7") and len(text.split()) == 3 + 6
    token_writes = [w for w in writes if w.strip() and w.strip().isdigit()]
    assert len(token_writes) == 6  # one write per generated token, as it comes


def test_batched_prompts_use_left_padding_and_match_single_runs(ckpts, capsys):
    prompts = ["1 2 3 4 5 6", "9 8", "40 41 42 43"]
    singles = []
    for p in prompts:
        rc, out, _ = gen(capsys, str(ckpts / "ids"), "--prompt", p, "--max-new-tokens", "5", "--temperature", "0",
                         "--no-stream")
        assert rc == 0
        singles.append(out.strip())
    args = [str(ckpts / "ids"), "--max-new-tokens", "5", "--temperature", "0"]
    for p in prompts:
        args += ["--prompt", p]
    rc, out, _ = gen(capsys, *args)
    assert rc == 0
    lines = out.strip().splitlines()
    assert [ln.split("]", 1)[1].strip() for ln in lines] == singles
    assert lines[1].startswith("[1]  9 8")


def test_sampling_flags_are_seeded(ckpts, capsys):
    base = [str(ckpts / "bytes"), "--prompt", "hi", "--max-new-tokens", "8", "--no-stream"]
    a = gen(capsys, *base, "--temperature", "1.0", "--top-p", "0.9", "--seed", "3")[1]
    b = gen(capsys, *base, "--temperature", "1.0", "--top-p", "0.9", "--seed", "3")[1]
    assert a == b and a.startswith("hi")
    greedy = gen(capsys, *base, "--temperature", "0")[1]
    top1 = gen(capsys, *base, "--temperature", "0.7", "--top-k", "1", "--seed", "5")[1]
    assert top1 == greedy
    # --min-p 1 keeps the top token alone (min-p sampling: p >= min_p x the top token's probability)
    assert gen(capsys, *base, "--temperature", "1.5", "--min-p", "1", "--seed", "5")[1] == greedy
    assert gen(capsys, *base, "--temperature", "1.5", "--min-p", "0.05", "--seed", "5")[1] != greedy


def test_training_out_folder_resolves_to_its_newest_checkpoint(ckpts, capsys, tmp_path):
    import shutil

    shutil.copytree(ckpts / "ids", tmp_path / "run" / "step-4")
    (tmp_path / "run" / "step-4" / "trainer_state.json").write_text('{"format": "hymba-train-state", "step": 4}')
    rc, out, _ = gen(capsys, str(tmp_path / "run"), "--prompt", "3", "--max-new-tokens", "2", "--temperature", "0")
    assert rc == 0 and out.startswith(" 3")


@pytest.mark.parametrize("args,code,needle", [
    # a flag's value, on its own or given the checkpoint's recipe, is a usage error: exit 2 (these were 1)
    (["--prompt", "1", "--mode", "nope"], 2, "--mode: unknown generation mode 'nope'"),
    (["--prompt", "1", "--mode", "mtp"], 2, "--mode: mode mtp needs a model with MTP modules"),
    (["--prompt", "1", "--mode", "ladir"], 2, "--mode: mode ladir needs a model with latent reasoning"),
    (["--prompt", "1", "--mode", "block_diffusion"], 2, "--mode: mode block_diffusion needs a model trained"),
    (["--mode", "forecast", "--data", "x.csv"], 2, "is a token model (objective next_token), not a forecaster"),
    (["--prompt", "1 2", "--max-new-tokens", "47"], 2, "--max-new-tokens 47"),
    (["--prompt", " ".join(["3"] * 60)], 2, "longer than the model's max_seq_len"),
    (["--prompt", " ".join(["3"] * 48)], 2, "--prompt: 48 tokens, as long as the model's max_seq_len (48) allows: no "
                                            "room for a new token"),  # (it said 'longer than')
    (["--prompt", "1 x"], 2, "--prompt '1 x'"),
    (["--prompt", "1 999"], 2, "outside [0, 256)"),
    (["--prompt", "1", "--top-p", "1.5"], 2, "--top-p"),
    (["--prompt", "1", "--min-p", "1.5"], 2, "--min-p 1.5: must be in [0, 1]"),
    (["--prompt", "1", "--min-p", "-0.1"], 2, "--min-p -0.1: must be in [0, 1]"),
    (["--mode", "forecast", "--data", "x.csv", "--min-p", "0.1"], 2, "--min-p: not for --mode forecast"),
    (["--prompt", "1", "--max-new-tokens", "0"], 2, "--max-new-tokens"),
    (["--prompt", "1", "--engine", "static", "--mode", "block_diffusion"], 2, "--engine: only for --mode ar"),
    (["--prompt", "1", "--engine", "graph"], 2, "--engine: engine='graph' needs a CUDA device"),
    # (was the API's line after loading the model, exit 1: "threshold must be a number > 0 (or None ...)")
    (["--prompt", "1", "--mode", "block_diffusion", "--threshold", "0"], 2, "--threshold 0.0: must be > 0, or none"),
    # (were exit 1 after loading the model: "--block-size: block_size must be an integer >= 1, got 0")
    (["--prompt", "1", "--mode", "block_diffusion", "--block-size", "0"], 2, "--block-size 0: must be >= 1"),
    (["--prompt", "1", "--mode", "block_diffusion", "--steps", "-1"], 2, "--steps -1: must be >= 1"),
    # (was the API's "--eos: eos_token_id must be a token id in [0, 256) ... (or None: no end token), got [999]")
    (["--prompt", "1", "--eos", "2,999"], 2, "--eos 2,999: token id 999 is outside [0, 256)"),
])
def test_bad_generate_input_is_one_line(ckpts, capsys, args, code, needle):
    rc, out, err = gen(capsys, str(ckpts / "ids"), *args)
    assert rc == code and "Traceback" not in err and len(err.strip().splitlines()) == 1 and needle in err, err
    assert out == ""  # nothing streamed before the error


def test_engine_flag_gives_the_same_tokens(ckpts, capsys):
    outs = []
    for engine in ("dynamic", "static"):
        rc, out, _ = gen(capsys, str(ckpts / "ids"), "--prompt", "4 5 6", "--prompt", "7", "--max-new-tokens", "8",
                         "--temperature", "0", "--engine", engine)
        assert rc == 0
        outs.append(out)
    assert outs[0] == outs[1]


def test_missing_checkpoint(capsys, tmp_path):
    rc, _, err = gen(capsys, str(tmp_path / "nope"), "--prompt", "x")
    assert rc == 1 and "nope: no such checkpoint folder" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = gen(capsys, str(tmp_path / "empty"), "--prompt", "x")
    assert rc == 1 and "recipe.yaml: missing" in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["metaspace", "wordpiece"])
def test_the_completion_is_decoded_after_its_prompt(tmp_path, capsys, kind):
    """The prompt and the completion were decoded as two sequences and joined: SentencePiece's Metaspace
    drops a sequence's leading space, WordPiece keeps its first token's '##' ("the quickbrown fox"). The
    CLI prints what the whole row's ids decode to, streamed, unstreamed and batched."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from hymba_plus.training.tokenizer import load_file

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog and then runs away. " * 200)
    if kind == "metaspace":
        t = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
        t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
        t.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
        t.train([str(text)], trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"]))
    else:
        t = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
        t.pre_tokenizer = pre_tokenizers.Whitespace()
        t.decoder = decoders.WordPiece()
        t.train([str(text)], trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[UNK]", "[SEP]"]))
    t.save(str(tmp_path / "tok.json"))
    tok = load_file(tmp_path / "tok.json")
    torch.manual_seed(1)
    model = build_model({**RECIPE, "model": {**RECIPE["model"], "vocab_size": 128}}).eval()
    model.save_pretrained(tmp_path / "ck", extra_files={"tokenizer.json": (tmp_path / "tok.json").read_text()})
    prompts = ["the quick", "the lazy"]
    want, apart = [], []
    for p in prompts:
        ids = tok.encode(p)
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, temperature=0.0, eos_token_id=None)[0].tolist()
        want.append(tok.decode(out))
        apart.append(tok.decode(ids) + tok.decode(out[len(ids):]))
    assert want != apart  # what decoding the two apart printed
    common = ["--temperature", "0", "--max-new-tokens", "6", "--eos", "none"]
    for extra in ([], ["--no-stream"]):
        rc, out, err = gen(capsys, str(tmp_path / "ck"), "--prompt", prompts[0], *common, *extra)
        assert rc == 0 and out.rstrip("\n") == want[0], (out, want[0], err)
    rc, out, _ = gen(capsys, str(tmp_path / "ck"), *[a for p in prompts for a in ("--prompt", p)], *common)
    assert rc == 0 and out.splitlines() == [f"[{i}] {w}" for i, w in enumerate(want)]


def test_a_training_folder_resolves_to_its_newest_intact_checkpoint(ckpts, capsys, tmp_path):
    """A corrupt newest step-N was taken (and failed); as `--resume` does, generation skips it with a
    warning and uses the newest intact one; all corrupt is one line."""
    import shutil

    state = '{"format": "hymba-train-state", "step": %d}'
    for n in (2, 4):
        shutil.copytree(ckpts / "ids", tmp_path / "run" / f"step-{n}")
        (tmp_path / "run" / f"step-{n}" / "trainer_state.json").write_text(state % n)
    weights = tmp_path / "run" / "step-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    rc, out, err = gen(capsys, str(tmp_path / "run"), "--prompt", "3", "--max-new-tokens", "2", "--temperature", "0")
    assert rc == 0 and out.startswith(" 3") and "warning: skipping corrupt checkpoint step-4" in err
    weights = tmp_path / "run" / "step-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    rc, out, err = gen(capsys, str(tmp_path / "run"), "--prompt", "3", "--max-new-tokens", "2")
    assert rc == 1 and "(all 2 checkpoints in" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_a_draft_too_short_for_the_prompt_is_named(ckpts, capsys, tmp_path):
    """Its max_seq_len holds the prompt but no new token: generate's message told to use max_new_tokens <= 0,
    which the CLI refuses."""
    torch.manual_seed(0)
    short = {**RECIPE, "model": {**RECIPE["model"], "max_seq_len": 4}}
    build_model(short).save_pretrained(tmp_path / "draft", extra_files={"tokenizer.json": IdsTokenizer(256).to_json()})
    rc, out, err = gen(capsys, str(ckpts / "ids"), "--prompt", "1 2 3 4", "--mode", "speculative", "--draft",
                       str(tmp_path / "draft"))
    assert rc == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert "draft: its max_seq_len (4) leaves no room for a new token after the 4-token prompt" in err, err


def test_a_forecaster_as_the_draft_is_named_as_such(ckpts, capsys, tmp_path):
    """A forecast checkpoint given as --draft said "vocab_size None differs from ...'s vocab_size 256": it
    has no vocabulary at all, which the line now says."""
    fc = {"name": "fc", "model": {"d_model": 32, "max_seq_len": 16, "block_pattern": "GA"},
          "components": {"gated_attn": {"n_heads": 2}},
          "objective": {"kind": "forecast", "context": 16, "horizon": 4, "patch": 4, "channels": 1, "season": 4}}
    build_model(fc).save_pretrained(tmp_path / "fc")
    rc, out, err = gen(capsys, str(ckpts / "ids"), "--prompt", "1 2", "--mode", "speculative", "--draft",
                       str(tmp_path / "fc"))
    assert rc == 1 and out == "" and err.count("\n") == 1 and "None" not in err, err
    assert f"--draft {tmp_path / 'fc'}: a forecaster (objective forecast, no vocabulary) cannot draft tokens" in err


def test_python_warnings_are_one_line_notices_and_the_api_keeps_its_own(ckpts, capsys, tmp_path):
    """A warning raised inside the command (from_pretrained's recipe-hash mismatch) printed as Python's
    two lines with a source path; the CLI prints `warning: MESSAGE`, and leaves warnings.showwarning
    as it was for the library's callers."""
    import shutil
    import warnings

    shutil.copytree(ckpts / "ids", tmp_path / "ck")
    recipe = tmp_path / "ck" / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("max_seq_len: 48", "max_seq_len: 64"))  # an edit: another hash
    before = warnings.showwarning
    rc, out, err = gen(capsys, str(tmp_path / "ck"), "--prompt", "3", "--max-new-tokens", "2", "--temperature", "0")
    lines = [ln for ln in err.splitlines() if "recipe hash" in ln]
    assert rc == 0 and len(lines) == 1 and lines[0].startswith("warning: ") and "UserWarning" not in err, err
    assert ".py:" not in err and warnings.showwarning is before


LADIR = {"name": "ladir-gen", "model": {"vocab_size": 24, "d_model": 32, "max_seq_len": 48, "block_pattern": "GD | GA"},
         "components": {"gated_attn": {"n_heads": 2}, "gdn": {"n_heads": 2, "head_dim": 16}, "mlp": {"d_hidden": 64}},
         "ladir": {"latent_dim": 8, "memory_slots": 2, "inference_steps": 4, "denoiser_layers": 1,
                   "denoiser_heads": 2},
         "objective": {"kind": "ladir"}}


@pytest.fixture(scope="module")
def ladir_ckpts(tmp_path_factory):
    """Two LaDiR checkpoints: ``plain`` (no condition dropout: no guidance) and ``cfg`` (cfg_dropout 0.1)."""
    root = tmp_path_factory.mktemp("ladir-gen")
    for name, extra in (("plain", {}), ("cfg", {"cfg_dropout": 0.1})):
        torch.manual_seed(0)
        model = build_model({**LADIR, "ladir": {**LADIR["ladir"], **extra}})
        model.save_pretrained(root / name, extra_files={"tokenizer.json": IdsTokenizer(24).to_json()})
    return root


LADIR_FLAGS = {"--samples": ("samples", "3", 3), "--cfg-scale": ("cfg_scale", "2.5", 2.5),
               "--diversity-scale": ("diversity_scale", "0.5", 0.5),
               "--diversity-bandwidth": ("diversity_bandwidth", "0.7", 0.7),
               "--diversity-target": ("diversity_target", "velocity", "velocity"),
               "--init-noise-scale": ("init_noise_scale", "2.5", 2.5)}


def test_ladir_flags_reach_the_sampler_for_this_run(ladir_ckpts, capsys, monkeypatch):
    """``--samples``, ``--cfg-scale``, ``--diversity-scale``, ``--diversity-bandwidth``, ``--diversity-target``
    and ``--init-noise-scale`` go to ``generate(mode="ladir")`` (which samples with them as a recipe setting
    them would: ``test_ladir.py``), the stderr line names the settings; without them, the recipe's."""
    from hymba_plus.models import ladir_decoding

    seen: list = []
    real = ladir_decoding.GENERATORS["ladir"]

    @functools.wraps(real)  # (its signature: the options generate and the flags' checks read)
    def spy(model, input_ids, **kw):  # noqa: ANN001, ANN202
        seen.append(kw)
        return real(model, input_ids, **kw)

    monkeypatch.setitem(ladir_decoding.GENERATORS, "ladir", spy)
    base = [str(ladir_ckpts / "cfg"), "--mode", "ladir", "--prompt", "3 4 5", "--max-new-tokens", "2"]
    rc, _, err = gen(capsys, *base)
    assert rc == 0, err
    assert not set(seen.pop()) & {o for o, _, _ in LADIR_FLAGS.values()}  # the recipe's settings
    argv = [a for flag, (_, text, _) in LADIR_FLAGS.items() for a in (flag, text)]
    rc, _, err = gen(capsys, *base, *argv)
    assert rc == 0, err
    kw = seen.pop()
    assert {o: kw[o] for o, _, _ in LADIR_FLAGS.values()} == {o: v for o, _, v in LADIR_FLAGS.values()}
    assert ("; sampler: cfg_scale 2.5, diversity_scale 0.5 (bandwidth: 0.7, target: velocity), init_noise_scale 2.5"
            in err), err
    assert load_recipe_of(ladir_ckpts / "cfg").ladir.cfg_scale == 1.0  # (nothing written back)


def test_prophet_flag_turns_the_early_exit_on_or_off_for_this_run(ladir_ckpts, ckpts, capsys, monkeypatch):
    """``--no-prophet`` / ``--prophet`` reach ``generate(mode="ladir")`` as ``prophet=False`` / ``True`` (None
    without either: the recipe's ``ladir.prophet.enabled``); refused for another mode and a non-LaDiR model."""
    from hymba_plus.models import ladir_decoding

    seen: list = []
    real = ladir_decoding.GENERATORS["ladir"]

    @functools.wraps(real)
    def spy(model, input_ids, **kw):  # noqa: ANN001, ANN202
        seen.append(kw.get("prophet"))
        return real(model, input_ids, **kw)

    monkeypatch.setitem(ladir_decoding.GENERATORS, "ladir", spy)
    base = [str(ladir_ckpts / "cfg"), "--mode", "ladir", "--prompt", "3 4 5", "--max-new-tokens", "2"]
    for extra, want in (((), None), (("--no-prophet",), False), (("--prophet",), True)):
        rc, _, err = gen(capsys, *base, *extra)
        assert rc == 0 and seen.pop() is want, err
    rc, out, err = gen(capsys, str(ladir_ckpts / "cfg"), "--prompt", "3 4 5", "--no-prophet")
    assert rc == 2 and err.strip().endswith("--prophet/--no-prophet: only for --mode ladir") and out == "", err
    rc, out, err = gen(capsys, str(ckpts / "ids"), "--mode", "ladir", "--prompt", "3 4 5", "--prophet")
    assert rc == 2 and "--prophet/--no-prophet: " in err and "is not a LaDiR model" in err and out == "", err


def load_recipe_of(ckpt):
    from hymba_plus import load_recipe

    return load_recipe(ckpt / "recipe.yaml")


@pytest.mark.parametrize("ckpt,args,code,needle", [
    ("cfg", ["--cfg-scale", "-1"], 2, "--cfg-scale -1.0: must be >= 0"),
    ("cfg", ["--cfg-scale", "nan"], 2, "--cfg-scale: must be a finite number"),
    ("cfg", ["--diversity-scale", "-0.5"], 2, "--diversity-scale -0.5: must be >= 0"),
    ("cfg", ["--diversity-bandwidth", "-1"], 2, "--diversity-bandwidth -1.0: must be >= 0"),
    ("cfg", ["--diversity-target", "state"], 2, "--diversity-target: invalid choice: 'state'"),
    ("cfg", ["--init-noise-scale", "0"], 2, "--init-noise-scale 0.0: must be > 0"),
    # past float32's range, as a recipe's (--diversity-bandwidth 1e308 was an OverflowError traceback)
    ("cfg", ["--diversity-bandwidth", "1e308"], 2, "--diversity-bandwidth 1e+308: must be within float32's range"),
    ("cfg", ["--init-noise-scale", "1e39"], 2, "--init-noise-scale 1e+39: must be within float32's range"),
    ("cfg", ["--samples", "0"], 2, "--samples 0: must be in 1..64"),
    ("cfg", ["--samples", "65"], 2, "--samples 65: must be in 1..64"),
    # (was exit 1 after loading the model, the API's line: "--steps: steps must be an integer >= 1, got 0")
    ("cfg", ["--steps", "0"], 2, "--steps 0: must be >= 1"),
    # the recipe's refusal: guidance needs the unconditional velocity that only condition dropout trains
    ("plain", ["--cfg-scale", "2"], 2, "--cfg-scale 2: guides with the unconditional velocity, which the denoiser "
                                       "learns only with ladir.cfg_dropout > 0 (0 in "),
])
def test_bad_ladir_flags_are_one_line(ladir_ckpts, capsys, ckpt, args, code, needle):
    try:
        rc, out, err = gen(capsys, str(ladir_ckpts / ckpt), "--mode", "ladir", "--prompt", "3 4 5", *args)
    except SystemExit as e:  # argparse's usage error (the flag's type or choices)
        cap = capsys.readouterr()
        rc, out, err = int(e.code), cap.out, cap.err
    assert rc == code and "Traceback" not in err and len(err.strip().splitlines()) == 1 and needle in err, err
    assert out == ""


def test_ladir_flags_need_a_ladir_model_and_mode(ladir_ckpts, ckpts, capsys):
    """Unguided ``--cfg-scale 1`` passes without condition dropout (as in a recipe); the flags are refused
    in one line for another mode, and for a model without a ladir section."""
    rc, _, err = gen(capsys, str(ladir_ckpts / "plain"), "--mode", "ladir", "--prompt", "3 4 5", "--cfg-scale", "1",
                     "--max-new-tokens", "2")
    assert rc == 0, err
    for flag, (_, text, _) in LADIR_FLAGS.items():
        rc, out, err = gen(capsys, str(ladir_ckpts / "cfg"), "--prompt", "3 4 5", flag, text)
        assert rc == 2 and err.strip().endswith(f"{flag}: only for --mode ladir") and out == "", err
        rc, out, err = gen(capsys, str(ckpts / "ids"), "--mode", "ladir", "--prompt", "3 4 5", flag, text)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and out == "", err
        assert f"{flag}: {ckpts / 'ids'} is not a LaDiR model (its recipe has no ladir section)" in err, err


@pytest.mark.parametrize("mode,samples", [("ar", 1), ("ladir", 1), ("ladir", 3)])
def test_a_streamer_that_ends_the_call_leaves_the_stats_so_far(ladir_ckpts, mode, samples):
    """``hymba generate --stop`` ends a call by raising from its streamer (``AllStopped``): the decoder's stats
    and summary are those of the tokens so far (the streamer's columns, the one it stopped at included), as a
    call of that many tokens fills them; they were empty (no summary line printed). LaDiR with several samples
    decodes each whole before the vote, then streams the voted answer: its stats are the whole call's."""
    from hymba_plus.models.lm import from_pretrained
    from hymba_plus.training.tokenizer import AllStopped

    torch.manual_seed(0)
    model = build_model(RECIPE) if mode == "ar" else from_pretrained(ladir_ckpts / "plain")
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    opts = {"samples": samples} if mode == "ladir" else {}
    seen = []

    def stop_at_2(col: torch.Tensor) -> None:
        seen.append(col)
        if len(seen) == 2:
            raise AllStopped

    stats: dict = {}
    torch.manual_seed(1)
    with pytest.raises(AllStopped):
        model.generate(ids, max_new_tokens=6, mode=mode, temperature=0.0, streamer=stop_at_2, stats=stats, **opts)
    whole: dict = {}
    n = 2 if samples == 1 else 6
    torch.manual_seed(1)
    model.generate(ids, max_new_tokens=n, mode=mode, temperature=0.0, stats=whole, **opts)
    assert stats["tokens"] == n * 2 and stats == whole, (stats, whole)
    if mode == "ladir":
        assert stats["summary"][0].startswith("ladir: denoising steps used"), stats
