"""Refuse a zero-shot head that cannot tell classes apart: a tokenizer without a vocabulary, or identical rows.

A CLIP folder saved with ``model.save_pretrained`` and the image processor alone has no tokenizer files;
``AutoTokenizer`` then builds a tokenizer with an empty vocabulary, every prompt becomes the same tokens, every row
of the head is the same and training starts from chance (loss ln K). Nothing else fails, so it is checked here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Cosine similarity above which two rows of the head count as the same classifier. Distinct class names give at
# most ~0.99 with real CLIP text towers (e.g. "tabby cat" / "tiger cat" averaged over the 80 ImageNet templates).
IDENTICAL_ROWS = 0.9999

_SAVE_THE_TOKENIZER = (
    "save the CLIP tokenizer into that folder too, e.g. CLIPTokenizerFast.from_pretrained('<the CLIP it came from>')"
    ".save_pretrained(folder) (or CLIPProcessor, which saves the tokenizer and the image processor), or pass the "
    "original Hub id"
)


def check_zeroshot_head(weights: torch.Tensor, class_names: Sequence[str], tokenizer, model_name_or_path: str) -> None:
    """Raise when distinct classes get the same prompt tokens or near-identical head rows.

    ``weights``: the zero-shot head [C, D]; ``class_names``: its C names (equal names may share a row: ImageNet's
    list has two 'missile's); ``tokenizer``: the one that built it; ``model_name_or_path``: named in the error.
    """
    names = list(class_names)
    distinct = list(dict.fromkeys(names))
    if len(distinct) < 2:
        return
    tokens = {tuple(ids) for ids in tokenizer(distinct, padding=False, truncation=True)["input_ids"]}
    if len(tokens) == 1:
        raise ValueError(
            f"the tokenizer loaded from {model_name_or_path} turns every class name into the same tokens "
            f"{list(next(iter(tokens)))} (its vocabulary has {len(tokenizer)} entries), so the zero-shot head "
            f"cannot tell {', '.join(map(repr, distinct[:3]))}, ... apart: {_SAVE_THE_TOKENIZER}"
        )
    rows = torch.nn.functional.normalize(weights.float(), dim=-1)
    similarity = rows @ rows.T
    same_name = torch.tensor([[a == b for b in names] for a in names])
    similarity[same_name] = -1.0
    value, flat = similarity.flatten().max(0)
    if value > IDENTICAL_ROWS:
        i, j = divmod(int(flat), len(names))
        raise ValueError(
            f"the zero-shot head built from {model_name_or_path} has near-identical rows for {names[i]!r} and "
            f"{names[j]!r} (cosine {float(value):.5f}): their prompts embed alike, which a tokenizer without a real "
            f"vocabulary (it has {len(tokenizer)} entries) or an untrained text tower causes. If the tokenizer is "
            f"missing, {_SAVE_THE_TOKENIZER}"
        )
