"""The recipe's optional ``train:`` section (defaults for ``hymba train``).

Every field can be overridden on the command line (``hymba train --help`` names the
flags). Sizes are per process: one optimizer step consumes
``batch_size * grad_accum * world_size`` sequences of ``seq_len`` tokens.

``data`` is a built-in task name (``mqar``, ``selective_copy``, ``parity``, ``khop``: no
files needed, accuracy is the eval metric) or a path: a text file, a folder of text files, or
a folder written by ``hymba prepare`` (token shards + ``index.json``). Forecast recipes read
a CSV of series or ``synthetic`` (``training/series.py``). Unset, it is the objective's
``default_data`` (``mqar``; ``synthetic`` for forecast; ``chain_arith`` for ladir).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..core.config import spec

#: the largest seed: what every generator seeded from one takes (torch's and NumPy's)
SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation (``hymba train --distill TEACHER_CKPT``; Hinton et al. 2015,
    arXiv 1503.02531): the loss is ``ce_weight`` x the objective's loss plus ``kl_weight`` x
    T^2 x KL(teacher || student) of the temperature-T softmaxes, averaged over every position
    (the auxiliary losses, e.g. MoE balancing, are added unweighted)."""

    kl_weight: float = spec(1.0, min=0.0, doc="weight of the KL term")
    ce_weight: float = spec(1.0, min=0.0, doc="weight of the usual (next-token) loss")
    temperature: float = spec(1.0, gt=0.0, doc="softmax temperature T of both models in the KL term")

    def check(self, model):  # noqa: ANN001 - ModelConfig
        if self.kl_weight == 0 and self.ce_weight == 0:
            yield "kl_weight", "kl_weight and ce_weight are both 0: nothing to train"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = spec(200, min=1, max=1 << 40, doc="optimizer steps of the whole run (the schedule's length)")
    batch_size: int = spec(16, min=1, max=1 << 20, doc="sequences per micro-batch per process")
    seq_len: int = spec(128, min=2)
    grad_accum: int = spec(1, min=1, max=1 << 16, doc="micro-batches per optimizer step")
    lr: float = spec(3e-3, gt=0.0, doc="AdamW learning rate (embeddings, head, norms, biases, ...)")
    muon_lr: float = spec(0.02, gt=0.0, doc="Muon learning rate (2-D hidden weight matrices)")
    muon_momentum: float = spec(0.95, min=0.0, lt=1.0, doc="1 would freeze every Muon matrix (a zero buffer)")
    beta1: float = spec(0.9, min=0.0, lt=1.0, doc="1 would divide by a zero bias correction")
    beta2: float = spec(0.95, min=0.0, lt=1.0)
    weight_decay: float = spec(0.0, min=0.0)
    optimizer: str = spec("muon", choices=("adamw", "muon"))
    schedule: str = spec("cosine", choices=("cosine", "wsd", "constant"))
    warmup_steps: int = spec(20, min=0)
    decay_frac: float = spec(0.2, min=0.0, max=1.0, doc="wsd: fraction of steps spent decaying")
    min_lr_frac: float = spec(0.1, min=0.0, max=1.0, doc="final lr as a fraction of the peak")
    grad_clip: float = spec(1.0, min=0.0, doc="max global grad norm; 0 = off")
    precision: str = spec("auto", choices=("auto", "fp32", "bf16"), doc="auto = bf16 autocast on CUDA")
    # None (unset) = off, so that recipes written before the key keep their hashes (Recipe.hash)
    tf32: bool | None = spec(None, doc="true: float32 matmuls on CUDA in TF32 (torch.backends.cuda.matmul.allow_tf32, "
                                       "as HF Trainer's tf32): those outside autocast (fp32 runs, the ATLAS memory's "
                                       "cuBLAS GEMMs) on tensor cores at ~1e-3 relative; fast-path probes still check "
                                       "in float32. Unset or false: float32 accuracy (benchmarks/atlas_tf32.py: what "
                                       "it does to ATLAS, emulated)")
    fsdp_param_dtype: str = spec("float32", choices=("float32", "bfloat16"),
                                 doc="under FSDP2 (several processes): the dtype of the gathered parameters the "
                                     "forward and backward use; bfloat16 = torchtitan's mixed precision (bf16 "
                                     "all-gathers, gradients reduced in float32 into the float32 shards the "
                                     "optimizer updates; needs bf16 precision); float32 = the shards' dtype, "
                                     "autocast casting for the GEMMs")
    # None (unset) = float32, so that recipes written before the key keep their hashes (Recipe.hash)
    param_dtype: str | None = spec(None, choices=("float32", "bfloat16"),
                                   doc="dtype of the weights the forward and backward read; bfloat16 (needs bf16 "
                                       "precision): on one process the GEMM weights are held in bf16 with float32 "
                                       "master copies that clipping, the optimizer and checkpoints see (Megatron's "
                                       "mixed precision: the same losses as float32 weights under autocast, without "
                                       "its per-weight casts; training/mixed.py); under FSDP2 what fsdp_param_dtype "
                                       "bfloat16 does. Unset or float32: float32 weights, autocast casting")
    # None (unset) = off, so that recipes written before the key keep their hashes (Recipe.hash)
    activation_checkpoint: int | None = spec(None, min=0, max=1 << 16,
                                             doc="recompute every N-th block application's activations in the "
                                                 "backward instead of keeping them (1: every block, HF's gradient "
                                                 "checkpointing; 2: every second; unset or 0: off): less activation "
                                                 "memory for about one more forward of those blocks")
    seed: int = spec(0, min=0, max=SEED_MAX, doc="seeds torch's and NumPy's generators (0 .. 2**32 - 1)")
    data: str | None = spec(None, doc="built-in task name or a path (default: the objective's: mqar; forecast: "
                                      "synthetic)")
    tokenizer: str | None = spec(None, doc="a `tokenizers` JSON file (default: bytes)")
    # None (unset) = text, so that recipes written before the key keep their hashes (Recipe.hash)
    text_field: str | None = spec(None, doc="the field of a JSON Lines object, the column of a Parquet file, that "
                                            "holds a document's text (unset: text), as hymba prepare --text-field")
    val_frac: float = spec(0.05, gt=0.0, max=0.5, doc="held-out fraction of a text corpus or a reasoning file")
    mqar_pairs: int | None = spec(None, min=1, doc="MQAR key/value pairs (default: min(seq_len/4, vocab/2 - 1))")
    copy_tokens: int | None = spec(None, min=1, doc="selective copy: tokens to copy (default: seq_len/8)")
    khop_hops: int = spec(2, min=1, doc="khop: pointers followed per query (k)")
    khop_nodes: int | None = spec(None, min=2, doc="khop: nodes of the cycle (default: min(vocab - 3, (seq_len - 1)/5))")
    chain_steps: int | None = spec(None, min=1, doc="chain_arith: operations per question; chain_pointer: hops "
                                   "(default: the task's, 3)")
    chain_values: int | None = spec(None, min=2, doc="chain_arith: the modulus; chain_pointer: nodes of the cycle "
                                    "(default: the task's, 10 / 8)")
    ladir_stage: str = spec("joint", choices=("vae", "flow", "joint"),
                            doc="objective ladir: train the VAE, the flow denoiser, or both")
    eval_every: int = spec(50, min=1)
    eval_batches: int = spec(4, min=1, max=1 << 20)
    save_every: int = spec(100, min=1)
    keep_last: int = spec(2, min=1, doc="checkpoints kept in OUT")
    distill: DistillConfig | None = spec(None, doc="weights of --distill TEACHER_CKPT (default when unset: "
                                                   "kl_weight 1, ce_weight 1, temperature 1)")
    # None (unset) = none, so that recipes written before the key keep their hashes (Recipe.hash)
    log_to: str | None = spec(None, doc="mirror metrics.jsonl's rows to tensorboard (OUT/tb), wandb (OUT/wandb) or "
                                        "both (tensorboard,wandb), rank 0 (training/tracking.py); unset or none: "
                                        "neither")

    def check(self, model):  # noqa: ANN001 - ModelConfig
        if self.fsdp_param_dtype == "bfloat16" and self.precision == "fp32":
            yield "fsdp_param_dtype", "bfloat16 computes with bf16 parameters: not with precision fp32 (use bf16)"
        if self.param_dtype == "bfloat16" and self.precision == "fp32":
            yield "param_dtype", "bfloat16 computes with bf16 weights: not with precision fp32 (use bf16)"
        if self.param_dtype == "float32" and self.fsdp_param_dtype == "bfloat16":
            yield "param_dtype", "float32 contradicts fsdp_param_dtype bfloat16 (set one of them)"
        # a model without vocabulary (forecast) reads windows whose length its objective sets
        if self.seq_len > model.max_seq_len and model.vocab_size is not None:
            yield "seq_len", f"must be <= model.max_seq_len ({model.max_seq_len}), got {self.seq_len}"
        from .tracking import parse_targets

        try:
            parse_targets(self.log_to)
        except ValueError as e:
            yield "log_to", str(e)
        from .tasks import TASKS, TaskError

        name = builtin_task(self, model)
        if self.tokenizer is not None and name is not None:  # (was dropped silently)
            yield "tokenizer", f"encodes text (a file or folder, reasoning data): the built-in task {name} makes " \
                               "token ids of its own"
        if self.text_field is not None and name is not None:
            yield "text_field", f"names the field of JSON Lines / Parquet text: the built-in task {name} reads no text"
        if name is not None:
            try:
                TASKS[name].check(self.seq_len, model.vocab_size, self)
            except TaskError as e:
                yield "data", str(e)


def builtin_task(cfg: TrainConfig, model) -> str | None:  # noqa: ANN001 - ModelConfig
    """The built-in next-token task (``tasks.py``) a token model trains on with ``cfg``, or None (text,
    shards, reasoning data, whose tokenizer is the checkpoint's; a model without a vocabulary reads series)."""
    from .tasks import TASKS

    name = cfg.data if cfg.data is not None else "mqar"  # (objectives' default_data)
    return name if model.vocab_size is not None and name in TASKS else None


def tasks_reading(field_name: str) -> tuple[str, ...]:
    """The built-in tasks that read the train setting ``field_name`` (``tasks.py``: ``Task.settings``;
    ``reasoning.py``: ``chain_steps`` / ``chain_values``, every reasoning task's), () for a setting
    that is not a task's."""
    from .reasoning import REASONING_TASKS
    from .tasks import TASKS

    if field_name in ("chain_steps", "chain_values"):
        return tuple(REASONING_TASKS)
    return tuple(name for name, task in TASKS.items() if field_name in task.settings)


#: the data settings a built-in task does not read (``validate``): what each is for, and why a task has no use for it
DATA_SETTINGS = {"tokenizer": ("encodes text (a file or folder, reasoning data)", "makes token ids of its own"),
                 "text_field": ("names the field of JSON Lines / Parquet text", "reads no text"),
                 "val_frac": ("the held-out fraction of text, shards or a reasoning file",
                              "holds out a fixed set of its own examples")}


def builtin_data(cfg: TrainConfig, model) -> str | None:  # noqa: ANN001 - ModelConfig
    """The built-in task ``cfg.data`` names for a token model, next-token (``tasks.py``) or reasoning
    (``reasoning.py``), or None (a path; a model without a vocabulary reads series)."""
    from .reasoning import REASONING_TASKS

    if cfg.data is None:
        return None
    return builtin_task(cfg, model) or (cfg.data if model.vocab_size is not None and cfg.data in REASONING_TASKS
                                        else None)


def cross_reads(field_name: str) -> tuple[str, ...]:
    """The other train settings that ``TrainConfig.check``'s rules under the key ``field_name`` read (a
    flag giving one of them breaks the rule as much as the key's own value: ``validate`` names that flag)."""
    from .tasks import TASKS

    if field_name == "data":  # the built-in task's check: seq_len and the tasks' own settings
        return ("seq_len", *dict.fromkeys(s for task in TASKS.values() for s in task.settings))
    return {"fsdp_param_dtype": ("precision",), "param_dtype": ("precision", "fsdp_param_dtype"),
            "tokenizer": ("data",), "text_field": ("data",)}.get(field_name, ())


#: command-line flag of each field (``hymba train``), where it is not ``--field-name``
FLAG_NAMES = {"warmup_steps": "--warmup"}


def flag_of(field_name: str) -> str:
    return FLAG_NAMES.get(field_name, "--" + field_name.replace("_", "-"))


class TrainConfigError(ValueError):
    """A train setting out of range, phrased with the flag or recipe key it came from; ``flag``: the
    command-line flag that gave it, or that sets a default no one set (``hymba train`` exits 2, a usage
    error), None where a checkpoint's saved settings hold the value (exit 1, bad input)."""

    def __init__(self, message: str, flag: str | None = None):
        super().__init__(message)
        self.flag = flag


def validate(cfg: TrainConfig, model, overrides: dict | None = None, where: str = "the recipe",
             section: str = "train", default_data: str = "mqar") -> None:  # noqa: ANN001
    """Range and cross-field checks of the effective config; the first error names the
    command-line flag when the value came from one, else ``where: SECTION.key`` (a recipe's
    ``train``, a checkpoint's trainer_state.json ``train_config``). Unset ``data`` is checked as
    ``default_data``, the objective's (``Objective.default_data``: ladir's is a reasoning task)."""
    from ..core.config import cross_errors, range_errors

    overrides = overrides or {}
    checked = cfg if cfg.data is not None else dataclasses.replace(cfg, data=default_data)
    task = builtin_data(checked, model)
    for name in overrides:  # (a task flag for a run on another task or on text was ignored silently)
        readers = tasks_reading(name)
        if readers and checked.data not in readers:
            data = checked.data + (" (the default data)" if cfg.data is None else "")
            raise TrainConfigError(f"{flag_of(name)} {overrides[name]}: a setting of the task"
                                   f"{'s' if len(readers) > 1 else ''} {' and '.join(readers)}; this run trains on "
                                   f"{data}", flag=flag_of(name))
        if name in DATA_SETTINGS and task is not None:  # (a data flag a built-in task does not read: ignored silently)
            what, why = DATA_SETTINGS[name]
            raise TrainConfigError(f"{flag_of(name)} {overrides[name]}: {what}: the built-in task {task}"
                                   f"{' (the default data)' if cfg.data is None else ''} {why}", flag=flag_of(name))
    ranges = list(range_errors(checked))
    for key, msg in [*ranges, *cross_errors(checked, model)]:
        name = key.split(".")[0]
        if name in overrides:
            raise TrainConfigError(f"{flag_of(name)} {overrides[name]}: {msg}", flag=flag_of(name))
        given = next((f for f in cross_reads(name) if f in overrides), None) if not ranges else None
        if given is not None:  # a flag's value against the recipe's (or checkpoint's) setting: the flag's error
            raise TrainConfigError(f"{flag_of(given)} {overrides[given]}: {where}: {section}.{key}: {msg}",
                                   flag=flag_of(given))
        field = TrainConfig.__dataclass_fields__.get(name)
        default = field is not None and getattr(cfg, name) == field.default
        if default:  # a default the model does not take
            msg += f" (the default: set {flag_of(name)} or train.{name})"
        # a default no one set asks for the flag (usage); a recipe's or a checkpoint's setting is bad input
        raise TrainConfigError(f"{where}: {section}.{key}: {msg}",
                               flag=flag_of(name) if default and section == "train" else None)
