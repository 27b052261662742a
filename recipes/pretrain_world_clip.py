"""Pre-train the tiny world CLIP that ships in ``src/hf_cfft/resources/world_clip`` (CPU, a few minutes).

    python recipes/pretrain_world_clip.py --output_dir src/hf_cfft/resources/world_clip

Prints the zero-shot accuracy on ``test_id`` and on each OOD split at the end, and writes them with the training
curve to ``<output_dir>/training_log.json``.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import HfArgumentParser

from hf_cfft.world_pretrain import FAMILY_PROBS, evaluate_world_zeroshot, pretrain_world_clip


@dataclass
class PretrainWorldClipArguments:
    output_dir: str = field(
        default="outputs/world_clip", metadata={"help": "Where to save model, tokenizer, processor."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the model init, the pretrain image stream and captions."})
    digit_steps: int = field(default=300, metadata={"help": "Stage 1 steps: every caption names only the digit."})
    mixed_steps: int = field(
        default=450, metadata={"help": "Stage 2 steps: each batch's captions come from one family, drawn per batch."}
    )
    batch_size: int = field(default=64, metadata={"help": "Images (and captions) per contrastive batch."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate (cosine, 5% warm-up)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices."})
    caption_family_probs: list[float] = field(
        default_factory=lambda: list(FAMILY_PROBS),
        metadata={"help": "Stage 2: probabilities of a batch's captions naming (digit and context, digit, context)."},
    )
    eval_every: int = field(default=100, metadata={"help": "Log zero-shot accuracy on a test_id probe every N steps."})
    eval_size: int = field(default=1000, metadata={"help": "Images per split in the final zero-shot evaluation."})
    num_threads: int = field(default=2, metadata={"help": "torch CPU threads (the published run used 2 cores)."})

    def __post_init__(self):
        if min(self.digit_steps, self.mixed_steps) < 0 or self.digit_steps + self.mixed_steps < 1:
            raise ValueError(
                f"need digit_steps, mixed_steps >= 0, not both 0; got {self.digit_steps}, {self.mixed_steps}."
            )
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 for a contrastive loss, got {self.batch_size}.")
        if len(self.caption_family_probs) != 3 or min(self.caption_family_probs) < 0:
            raise ValueError(f"caption_family_probs needs 3 non-negative numbers, got {self.caption_family_probs}.")


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    return f"{cpu}; {os.cpu_count()} cores visible; torch {torch.__version__}, {torch.get_num_threads()} threads"


def main(args: PretrainWorldClipArguments) -> dict[str, float]:
    torch.set_num_threads(args.num_threads)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    model, tokenizer, processor, history = pretrain_world_clip(
        seed=args.seed,
        digit_steps=args.digit_steps,
        mixed_steps=args.mixed_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        caption_family_probs=args.caption_family_probs,
        eval_every=args.eval_every,
    )
    train_seconds = time.perf_counter() - start
    accuracy = evaluate_world_zeroshot(model, tokenizer, seed=args.seed, size=args.eval_size)
    out = pathlib.Path(args.output_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    log = {
        "arguments": asdict(args),
        "train_seconds": round(train_seconds, 1),
        "machine": _machine(),
        "zeroshot_accuracy": accuracy,
        "history": [{k: round(v, 4) if isinstance(v, float) else v for k, v in h.items()} for h in history],
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"trained {args.digit_steps + args.mixed_steps} steps in {train_seconds:.0f}s; saved to {out}")
    for split, acc in accuracy.items():
        print(f"zero-shot {split:>21}: {acc:.3f}")
    return accuracy


if __name__ == "__main__":
    (parsed,) = HfArgumentParser(PretrainWorldClipArguments).parse_args_into_dataclasses()
    main(parsed)
