"""Pre-train the tiny world CLIP that ships in ``src/hf_cfft/resources/world_clip`` (CPU, about 20 minutes).

    python recipes/pretrain_world_clip.py --output_dir outputs/world_clip

Prints the zero-shot accuracy on ``test_id`` and on each OOD split at the end, and writes them with the training
curve to ``<output_dir>/training_log.json``. With its defaults it rebuilds the shipped ``model.safetensors`` bit for
bit on any x86-64 host with AVX2 (it says whether the sha256 matches; ``--require_match true`` makes a mismatch an
error). Why that needs more than a seed: floating-point sums give other bits in another order, and three things
choose the order by the host. torch's vectorised kernels follow the CPU's widest instruction set (AVX-512 on one
host, AVX2 on another), MKL's matrix products take per-vendor and per-ISA code paths, and every thread count splits
reductions differently. The script therefore fixes all three before torch loads: ``ATEN_CPU_CAPABILITY=avx2``,
``MKL_CBWR=COMPATIBLE`` (MKL's one code path that is the same on Intel and AMD CPUs), ``ONEDNN_MAX_CPU_ISA=AVX2``,
and a fixed thread count (``--num_threads``, 1: one thread also keeps its pace when other processes load the
machine). It re-executes itself with that environment when started without it. The price is speed: MKL's
compatible path is about 4x slower than its default on these tiny matrices.
"""

from __future__ import annotations

import hf_cfft_help  # noqa: F401  (first: --help from its cache, before the library loads)

# isort: split
import os
import sys

# The numerics environment of the published run; set before torch is imported (it is read once, at load time).
PINNED_ENVIRONMENT = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2"}

if __name__ == "__main__" and any(os.environ.get(k) != v for k, v in PINNED_ENVIRONMENT.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PINNED_ENVIRONMENT})

import hashlib  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402

import torch  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

from hf_cfft.world import world_clip_path  # noqa: E402
from hf_cfft.world.pretrain import FAMILY_PROBS, evaluate_world_zeroshot, pretrain_world_clip  # noqa: E402


@dataclass
class PretrainWorldClipArguments:
    output_dir: str = field(
        default="outputs/world_clip", metadata={"help": "Where to save model, tokenizer, processor."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the model init, the pretrain image stream and captions."})
    digit_steps: int = field(default=400, metadata={"help": "Stage 1 steps: every caption names only the digit."})
    mixed_steps: int = field(
        default=1100, metadata={"help": "Stage 2 steps: each batch's captions come from one family, drawn per batch."}
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
    num_threads: int = field(
        default=1, metadata={"help": "torch CPU threads; part of the numerics: another count gives other bits."}
    )
    require_match: bool = field(
        default=False,
        metadata={"help": "Exit with an error unless model.safetensors is bitwise the shipped one (defaults only)."},
    )

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


def numerics() -> dict[str, str]:
    """What decides the bits of a CPU run: the pinned environment as torch sees it, and the library versions."""
    import numpy
    import transformers

    return {
        **{key: os.environ.get(key, "<unset>") for key in PINNED_ENVIRONMENT},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
    }


def sha256_of(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    digest = sha256_of(out / "model.safetensors")
    log = {
        "arguments": {k: v for k, v in asdict(args).items() if k not in ("output_dir", "require_match")},
        "model_sha256": digest,
        "numerics": numerics(),
        "train_seconds": round(train_seconds, 1),
        "machine": _machine(),
        "zeroshot_accuracy": accuracy,
        "history": [{k: round(v, 4) if isinstance(v, float) else v for k, v in h.items()} for h in history],
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"trained {args.digit_steps + args.mixed_steps} steps in {train_seconds:.0f}s; saved to {out}")
    for split, acc in accuracy.items():
        print(f"zero-shot {split:>21}: {acc:.3f}")
    shipped = sha256_of(world_clip_path() / "model.safetensors")
    same = digest == shipped
    print(f"model.safetensors sha256 {digest}: {'the same as' if same else 'differs from'} the shipped {shipped}")
    if args.require_match and not same:
        raise SystemExit(
            "the rebuilt model differs from the shipped one; run with the defaults (only --output_dir changed) and "
            f"the environment of training_log.json's 'numerics' ({json.dumps(log['numerics'])})"
        )
    return accuracy


if __name__ == "__main__":
    (parsed,) = HfArgumentParser(PretrainWorldClipArguments).parse_args_into_dataclasses()
    main(parsed)
