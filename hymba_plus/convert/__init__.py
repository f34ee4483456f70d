"""Interoperability with HF ``transformers`` checkpoints (no dependency on transformers itself).

* ``import_hf(src, out)``: an HF folder of ``LlamaForCausalLM``, ``Qwen3ForCausalLM``,
  ``Qwen3MoeForCausalLM`` or ``Qwen3NextForCausalLM`` -> a hymba_plus checkpoint.
* ``export_hf(ckpt, out)``: a hymba_plus checkpoint an HF architecture expresses -> an HF folder.
* ``hybridize(src, out, recipe)``: a pretrained attention model -> a hybrid checkpoint whose
  replaced mixers start from the attention weights they replace (``hybridize.py``).

One file per concern: ``loader`` (streaming safetensors), ``rules`` (tensor re-layouts),
``family`` and one file per HF family, ``importer``, ``exporter``, ``hybridize``, ``staging``
(all-or-nothing output folders). Every user-facing problem is one ``ConvertError`` line.
"""

from .exporter import export_hf
from .families import FAMILIES
from .hybridize import hybridize
from .importer import import_hf
from .loader import ConvertError, ConvertOptionError

__all__ = ["FAMILIES", "ConvertError", "ConvertOptionError", "export_hf", "hybridize", "import_hf"]
