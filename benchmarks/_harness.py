"""Shared pieces of the hf_cfft benchmarks: model sizes, in-memory data, prepared training steps, timing, memory.

Infrastructure for the scripts next to it (``training_throughput.py``, ``profile_step.py``); not a public API.
Everything runs offline on randomly initialised CLIP vision towers built from a ``CLIPVisionConfig`` in code.
"""

from __future__ import annotations

import copy
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from _live_tensors import LiveTensorPeak  # benchmarks/, beside this file
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import CLIPImageProcessor, CLIPVisionConfig, SiglipImageProcessorPil, SiglipVisionConfig

from hf_cfft import CfftConfig, CfftTrainer
from hf_cfft.cam import compute_cam
from hf_cfft.data import CounterfactualCollator, CounterfactualTransform, precompute_cams, preprocess_images
from hf_cfft.evaluation.report import markdown_table  # noqa: F401  (the benchmarks' tables)
from hf_cfft.modeling import CfftClassifierConfig, CfftImageClassifier, ClipCfftConfig, ClipCfftForImageClassification


@dataclass(frozen=True)
class ModelSize:
    """A ViT image tower (CLIP, or SigLIP: attention-pooled, no projection) and the per-device batch it is benchmarked
    with."""

    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    projection_dim: int
    batch_size: int
    num_labels: int
    # Side of the pre-decoded images fed to the transform: the processor resizes them to image_size.
    source_image_size: int
    family: str = "clip"

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side


SIZES = {
    # Test-only: the smallest model that exercises every code path in a second.
    "micro": ModelSize(32, 8, 32, 2, 2, 16, 8, 3, 32),
    # The embedded world's CLIP (hf_cfft.world.pretrain.build_world_clip_config): the CPU benchmark.
    "tiny": ModelSize(32, 4, 128, 4, 4, 64, 64, 10, 32),
    # OpenAI CLIP ViT-B/32 and ViT-B/16 image towers with ImageNet's 1000-class head: the GPU benchmark.
    "vit-b32": ModelSize(224, 32, 768, 12, 12, 512, 256, 1000, 256),
    "vit-b16": ModelSize(224, 16, 768, 12, 12, 512, 128, 1000, 256),
    # OpenAI CLIP ViT-L/14's image tower (24 layers, width 1024, 16 heads, projection 768): the memory benchmark.
    "vit-l14": ModelSize(224, 14, 1024, 24, 16, 768, 16, 1000, 256),
    # SigLIP ViT-B/16 (google/siglip-base-patch16-224's image tower: no CLS, attention-pooling head, 768-d feature).
    "siglip-b16": ModelSize(224, 16, 768, 12, 12, 768, 128, 1000, 256, family="siglip"),
    "siglip-micro": ModelSize(32, 8, 32, 2, 2, 32, 8, 3, 32, family="siglip"),
}


def build_model(size: ModelSize, seed: int = 0) -> CfftImageClassifier:
    """A randomly initialised classifier of ``size`` (sdpa attention; quick-GELU as CLIP, tanh-GELU as SigLIP)."""
    torch.manual_seed(seed)
    tower = dict(
        image_size=size.image_size,
        patch_size=size.patch_size,
        hidden_size=size.hidden_size,
        intermediate_size=4 * size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
    )
    labels = dict(
        num_labels=size.num_labels,
        id2label={i: f"class_{i}" for i in range(size.num_labels)},
        label2id={f"class_{i}": i for i in range(size.num_labels)},
    )
    if size.family == "siglip":
        config = CfftClassifierConfig(
            family="siglip", vision_config=SiglipVisionConfig(**tower), projection_dim=size.hidden_size, **labels
        )
        return CfftImageClassifier(config)
    config = ClipCfftConfig(vision_config=CLIPVisionConfig(**tower), projection_dim=size.projection_dim, **labels)
    return ClipCfftForImageClassification(config)


def build_image_processor(size: ModelSize):
    """The family's preprocessing to ``size.image_size``: CLIP resize + centre crop, SigLIP a square resize."""
    side = size.image_size
    if size.family == "siglip":
        return SiglipImageProcessorPil(size={"height": side, "width": side})
    return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def make_images(count: int, side: int, seed: int = 0) -> list[PILImage.Image]:
    """``count`` decoded RGB images of ``side`` x ``side``: a coloured square on noise, so CAMs are not flat."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        pixels = rng.integers(0, 96, (side, side, 3), dtype=np.uint8)
        top, left = rng.integers(0, side // 2, 2)
        pixels[top : top + side // 2, left : left + side // 2] += rng.integers(64, 160, 3, dtype=np.uint8)
        images.append(PILImage.fromarray(pixels))
    return images


def random_cams(count: int, size: ModelSize, seed: int = 0) -> list[list[float]]:
    """Max-normalised random CAMs [count][h * w]: stand-ins when no model is run (the data pipeline alone)."""
    cams = np.random.default_rng(seed).random((count, size.grid[0] * size.grid[1]), dtype=np.float32)
    return (cams / cams.max(axis=1, keepdims=True)).tolist()


def make_dataset(size: ModelSize, num_batches: int, seed: int = 0) -> Dataset:
    """An in-memory image classification dataset of ``num_batches`` full batches (``image``, ``label`` columns)."""
    count = num_batches * size.batch_size
    labels = np.random.default_rng(seed + 1).integers(0, size.num_labels, count).tolist()
    features = Features({"image": Image(), "label": Value("int64")})
    return Dataset.from_dict({"image": make_images(count, size.source_image_size, seed), "label": labels}, features)


# ---- what is timed ----

# name -> (label in the tables, CfftConfig overrides). distill_weight defaults to the paper's 30.
TRAIN_CASES: dict[str, tuple[str, dict]] = {
    "ft": ("vanilla FT", {"distill_weight": 0.0, "mask_kind": "none", "fill_kind": "none"}),
    "ft_fd": ("FT+FD (distil on clean images)", {"mask_kind": "none", "fill_kind": "none"}),
    "ft_kd": (
        "FT+KD (distil logits on clean images)",
        {"mask_kind": "none", "fill_kind": "none", "distill_target": "logits", "distill_weight": 1.0},
    ),
    "cfft_teacher_single": ("CFFT object, teacher CAM cached, single-fill", {"fill_kind": "single"}),
    "cfft_teacher_multi": ("CFFT object, teacher CAM cached, multi-fill", {"fill_kind": "multi"}),
    "cfft_teacher_none": ("CFFT object, teacher CAM cached, no-fill", {"fill_kind": "none"}),
    "cfft_student_single": ("CFFT object, student CAM online, single-fill", {"fill_kind": "single"}),
    "cfft_student_multi": ("CFFT object, student CAM online, multi-fill", {"fill_kind": "multi"}),
    "cfft_student_none": ("CFFT object, student CAM online, no-fill", {"fill_kind": "none"}),
    "random_single": ("CFFT random-mask 0.5, single-fill", {"mask_kind": "random", "fill_kind": "single"}),
    "random_multi": ("CFFT random-mask 0.5, multi-fill", {"mask_kind": "random", "fill_kind": "multi"}),
    "random_none": ("CFFT random-mask 0.5, no-fill (tokens dropped)", {"mask_kind": "random", "fill_kind": "none"}),
    # FLYP trains the text tower too: timed by FlypStep on a contrastive model (CLIP-family sizes only).
    "flyp": (
        "FLYP (both towers, contrastive loss)",
        {"method": "flyp", "distill_weight": 0.0, "mask_kind": "none", "fill_kind": "none"},
    ),
}
for _name, (_, _overrides) in TRAIN_CASES.items():
    if _name.startswith("cfft_"):
        _overrides.update(mask_kind="object", cam_source=_name.split("_")[1])
OTHER_CASES = {
    "cam_pass": "teacher CAM pre-computation pass (compute_cam, rollout)",
    "data": "CounterfactualTransform + CounterfactualCollator, object-mask single-fill, 1 process",
    "preprocess": "the CLIP image processor alone (preprocess_images), 1 process",
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Measurement:
    """Wall-clock and process CPU seconds of each repeat of one case."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    @property
    def faults_median(self) -> float:
        return statistics.median(self.faults) if self.faults else float("nan")


def minor_faults() -> int:
    """Minor page faults of this process so far (memory the OS hands back in: CPU time no FLOP count shows)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Run ``fn`` once: (wall seconds, process CPU seconds), with the device's queue drained before and after."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def _cpu_sdpa_flops(query, key, value, *args, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's counter knows the CUDA attention kernels but not the CPU flash kernel.
_EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(fn: Callable[[], object]) -> int:
    """Matmul, convolution and attention FLOPs that ``fn`` executes (forward and backward), as torch counts them."""
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> tuple[int, int | None]:
    """(peak bytes allocated by ``fn`` above what was live before it, absolute device peak or None on CPU).

    CUDA: the caching allocator's own counters. CPU: the live tensor bytes that `_live_tensors.LiveTensorPeak` counts
    (every storage made inside ``fn``, until torch frees it), the same measure as benchmarks/memory.py's tensor peak;
    process RSS would mix in the allocator's and the Python heap's memory, so it is not used.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak - base, peak
    with LiveTensorPeak() as live:
        fn()
    return live.peak, None


class TrainStep:
    """One training configuration: a real `CfftTrainer` and batches built beforehand by its real data pipeline.

    ``step()`` is what the Trainer does per optimizer step without data loading: ``training_step`` (forward, loss,
    backward), gradient clipping, ``optimizer.step()``, ``lr_scheduler.step()``, ``zero_grad()``.
    """

    def __init__(
        self,
        name: str,
        base_model: ClipCfftForImageClassification,
        size: ModelSize,
        dataset: Dataset,
        processor: CLIPImageProcessor,
        device: torch.device,
        *,
        bf16: bool = False,
        torch_compile: bool = False,
        num_batches: int = 2,
        output_dir: str | None = None,
    ):
        self.name = name
        self.label, overrides = TRAIN_CASES[name]
        self.device = device
        self.batch_size = size.batch_size
        args = CfftConfig(
            output_dir=output_dir or tempfile.mkdtemp(prefix=f"cfft_bench_{name}_"),
            per_device_train_batch_size=size.batch_size,
            use_cpu=device.type == "cpu",
            bf16=bf16,
            torch_compile=torch_compile,
            seed=0,
            disable_tqdm=True,
            **overrides,
        )
        self.trainer = CfftTrainer(model=copy.deepcopy(base_model), args=args, processing_class=processor)
        trainer = self.trainer
        if args.needs_teacher_cams:
            # A no-op when the caller passed a dataset whose ``cam`` column was computed by an identical teacher.
            dataset = precompute_cams(dataset, trainer.teacher, processor, batch_size=size.batch_size)
        elif "cam" in dataset.column_names:
            dataset = dataset.remove_columns("cam")  # else object masks would be cut from cached CAMs
        transform = CounterfactualTransform(
            processor,
            grid=size.grid,
            mask_kind=args.mask_kind,
            mask_threshold=args.mask_threshold,
            num_labels=size.num_labels,
        )
        trainer.train_dataset = dataset.with_transform(transform)
        self._prepare(num_batches)

    def _prepare(self, num_batches: int) -> None:
        """The batches (built once, kept on the device: the timed step excludes data loading and the host-to-device
        copy), then what Trainer._inner_training_loop does: autocast (and compile) wrapping, accelerate's optimizer."""
        trainer = self.trainer
        loader = iter(trainer.get_train_dataloader())
        self.batches = [trainer._prepare_inputs(next(loader)) for _ in range(num_batches)]
        trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
        self.model, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
        trainer.model_wrapped = self.model
        trainer.current_gradient_accumulation_steps = 1
        self._next = 0

    def step(self) -> None:
        """One optimizer step on the next prepared batch."""
        trainer, args = self.trainer, self.trainer.args
        batch = self.batches[self._next % len(self.batches)]
        self._next += 1
        trainer.training_step(self.model, dict(batch))
        if args.max_grad_norm:
            trainer.accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad()
        trainer.state.global_step += 1


class FlypStep(TrainStep):
    """A FLYP optimizer step: `FlypTrainer` on a contrastive model whose image tower is ``base_model``'s size.

    The text tower is the embedded world CLIP's at ``tiny`` (and ``micro``), and OpenAI CLIP ViT-B's
    (``CLIPTextConfig`` defaults: 12 layers, width 512) at the ViT-B sizes; prompts are the world's class prompts
    tokenised by the world CLIP's tokenizer (ImageNet prompts are longer, so the text tower's share is a lower bound
    there).
    """

    def __init__(self, name, base_model, size, dataset, processor, device, *, bf16=False, torch_compile=False,
                 num_batches=2, output_dir=None):  # fmt: skip
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPTextConfig

        import hf_cfft.world as world
        from hf_cfft.baselines.flyp import FlypTrainer

        if size.family != "clip":
            raise SystemExit(f"the flyp case times CLIP-family models; size {size} is {size.family}")
        self.name = name
        self.label, overrides = TRAIN_CASES[name]
        self.device, self.batch_size = device, size.batch_size
        tokenizer = AutoTokenizer.from_pretrained(world.world_clip_path())
        if size.image_size <= 32:
            text = CLIPConfig.from_pretrained(world.world_clip_path()).text_config
        else:
            text = CLIPTextConfig(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        config = CLIPConfig(
            text_config=text.to_dict(), vision_config=base_model.config.vision_config.to_dict(),
            projection_dim=size.projection_dim,
        )  # fmt: skip
        torch.manual_seed(0)
        model = CLIPModel(config)
        model.config._attn_implementation = "sdpa"
        names = [world.WORLD_CLASS_NAMES[i % len(world.WORLD_CLASS_NAMES)] for i in range(size.num_labels)]
        args = CfftConfig(
            output_dir=output_dir or tempfile.mkdtemp(prefix=f"cfft_bench_{name}_"),
            per_device_train_batch_size=size.batch_size, use_cpu=device.type == "cpu", bf16=bf16,
            torch_compile=torch_compile, seed=0, disable_tqdm=True, **overrides,
        )  # fmt: skip
        if "cam" in dataset.column_names:
            dataset = dataset.remove_columns("cam")
        self.trainer = FlypTrainer(
            model=model, args=args, tokenizer=tokenizer, class_names=names, templates=list(world.WORLD_TEMPLATES),
            train_dataset=dataset, processing_class=processor,
        )  # fmt: skip
        self._prepare(num_batches)


class CamPass:
    """The teacher-CAM pre-computation pass on one prepared pixel batch (what `precompute_cams` maps over)."""

    name, label = "cam_pass", OTHER_CASES["cam_pass"]

    def __init__(
        self,
        teacher: ClipCfftForImageClassification,
        processor: CLIPImageProcessor,
        dataset: Dataset,
        size: ModelSize,
        device: torch.device,
        method: str = "rollout",
    ):
        self.teacher, self.method, self.batch_size = teacher, method, size.batch_size
        rows = dataset[: size.batch_size]
        self.pixel_values = preprocess_images(processor, rows["image"]).to(device)
        self.labels = torch.as_tensor(rows["label"], device=device)

    def step(self) -> None:
        compute_cam(self.teacher, self.pixel_values, self.labels, self.method)


class DataPipeline:
    """The ``with_transform`` step and the collator on pre-decoded images, in this process (= one worker).

    With ``preprocess_only`` just the image processor, so that the difference is what masking and refilling cost.
    """

    def __init__(
        self,
        size: ModelSize,
        processor: CLIPImageProcessor,
        cam_dataset: Dataset,
        seed: int = 0,
        preprocess_only: bool = False,
    ):
        self.name = "preprocess" if preprocess_only else "data"
        self.label = OTHER_CASES[self.name]
        self.preprocess_only = preprocess_only
        self.processor = processor
        self.batch_size = size.batch_size
        rows = cam_dataset[: size.batch_size]
        # Decoded PIL images and python-list CAMs: what the transform receives from a formatted Dataset.
        self.batch = {"image": rows["image"], "label": rows["label"], "cam": [list(c) for c in rows["cam"]]}
        self.transform = CounterfactualTransform(
            processor, grid=size.grid, mask_kind="object", mask_threshold=0.3, num_labels=size.num_labels
        )
        self.collator = CounterfactualCollator(
            mask_kind="object", fill_kind="single", mask_ratio=0.5, patch_size=size.patch_size, seed=seed
        )

    def step(self) -> dict[str, torch.Tensor]:
        if self.preprocess_only:
            return {"pixel_values": preprocess_images(self.processor, self.batch["image"])}
        out = self.transform(dict(self.batch))
        examples = [{key: out[key][i] for key in out} for i in range(self.batch_size)]
        return self.collator(examples)


def machine_description(device: torch.device) -> str:
    """CPU model, cores, torch threads and load (or the GPU name), for the report header."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if hasattr(os, "getloadavg"):
        text += ", load average {:.2f} / {:.2f} / {:.2f} (1/5/15 min)".format(*os.getloadavg())
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}; host: {text}"
    allocator = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}
    if allocator:
        text += f"; allocator settings {allocator}"
    return text
