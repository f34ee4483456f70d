"""Tiny random-init HF models of every class ``hymba convert`` supports, built from configs in
the test (no network), with every 1-D weight (norm scales, A_log, dt_bias) perturbed so that a
wrong norm convention (w vs 1 + w) or a swapped vector shows in the logits."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=128,
              eos_token_id=None, bos_token_id=None, pad_token_id=None)
CLASSES = ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen3NextForCausalLM")


def hf_model(arch: str, seed: int = 0, **overrides):  # noqa: ANN201 - a transformers model
    import transformers as tf

    torch.manual_seed(seed)
    kw = dict(COMMON, **overrides)
    rope = kw.get("rope_parameters")
    if rope is not None and int(tf.__version__.split(".")[0]) < 5:  # 4.x: rope_theta + rope_scaling
        kw.pop("rope_parameters")
        kw["rope_theta"] = rope["rope_theta"]
        kw["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if arch == "LlamaForCausalLM":
        cfg = tf.LlamaConfig(**kw)
    elif arch == "Qwen3ForCausalLM":
        cfg = tf.Qwen3Config(**kw)
    elif arch == "Qwen3MoeForCausalLM":
        cfg = tf.Qwen3MoeConfig(**dict(dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                            norm_topk_prob=True, mlp_only_layers=[1]), **kw))
    else:
        cfg = tf.Qwen3NextConfig(**dict(dict(moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                             num_experts=4, num_experts_per_tok=2, linear_num_key_heads=2,
                                             linear_num_value_heads=4, linear_key_head_dim=8,
                                             linear_value_head_dim=8, mlp_only_layers=[2]), **kw))
    model = getattr(tf, arch)(cfg)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def word_tokenizer(path: Path, n_tokens: int) -> None:
    """A ``tokenizers`` word-level tokenizer of ``n_tokens`` tokens (t0 .. t{n-1}, split on spaces)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(n_tokens)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def save_hf(model, folder: Path, n_tokens: int = VOCAB - 6, **kw) -> Path:  # noqa: ANN001
    model.save_pretrained(folder, **kw)
    word_tokenizer(folder / "tokenizer.json", n_tokens)
    return folder
