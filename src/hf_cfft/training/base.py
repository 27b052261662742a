"""`RobustTrainer`: what every hf_cfft method's trainer shares, so that a method is an ``__init__`` and an objective.

A subclass of `transformers.Trainer` that holds everything that is not a loss:

- the run folder: marked and locked for the whole run (`hf_cfft.output_folder`), never landing on another run, a
  resume never mixing two configurations (`hf_cfft.training.run_folder`), a lost peer named with where to resume;
- loading: `from_checkpoint` turns a checkpoint (Hub id or folder), the class names and the prompts into the
  method's trainer, each method loading what it trains (`_load_models`);
- the data: a raw image dataset (or a stream) prepared by the method's ``_prepare_raw_dataset``, image checks and
  the fast image processor switch applied the same way for every method;
- step seeding: a generator per (seed, step, process, micro-step), so that a resumed run draws what it would have;
- the paper's optimisation switches (``one_cycle_schedule``, ``decay_all_parameters``);
- metric buffering: the parts of a loss logged as means since the last log;
- release: ``training_args.json`` and the model card beside every save, never a pickle written or pushed.

Subclasses: `hf_cfft.CfftTrainer` (classification + counterfactual distillation) and
`hf_cfft.baselines.flyp.FlypTrainer` (the contrastive loss on both towers).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.optim.lr_scheduler import OneCycleLR
from transformers import PretrainedConfig, Trainer
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import HubStrategy, TrainOutput
from transformers.utils import PushInProgress, hf_api, logging

from ..classifier_loading import is_cfft_checkpoint
from ..config import CfftConfig
from ..fast_images import FastImageProcessor
from ..output_folder import OutputFolder
from ..release.hub import EXCLUDED_FILES, files_to_upload
from ..release.model_card import TRAINING_ARGS_JSON, write_model_card
from ..streaming import prepare_streaming_train_dataset
from ..zeroshot import load_templates
from .arguments import check_training_arguments
from .run_folder import (
    check_output_dir,
    check_run_folder,
    checkpoint_ends_the_run,
    latest_complete_checkpoint,
    resolve_resume_checkpoint,
    saved_manifest,
)
from .run_manifest import (
    MANIFEST_KEY,
    manifest_changes,
    refuse_changed_manifest,
    rows_fingerprint,
    run_manifest,
    weights_fingerprint,
)

logger = logging.get_logger(__name__)


class RobustTrainer(Trainer):
    """The shared base of hf_cfft's trainers; not used on its own (it has no objective).

    Args:
        model: the model ``self.model`` trains.
        args: a `CfftConfig`.
        data_collator / train_dataset / processing_class: as for `transformers.Trainer`; a raw image
            ``train_dataset`` (``image_column`` + ``label_column``, or a streamed one) is prepared for the method
            (`_prepare_dataset`), which needs ``processing_class`` (the checkpoint's image processor).
        data_source: where the train set came from (e.g. ``{"dataset_name": ..., "split": ...,
            "max_train_samples": ...}``). With the train rows' fingerprint and the global batch it forms the run
            manifest in every ``training_args.json``; a resume on other data or another global batch is refused
            (`hf_cfft.training.run_manifest`).
        Other keyword arguments go to `transformers.Trainer`.

    Subclasses implement ``compute_loss``, ``_prepare_raw_dataset`` and ``_load_models``, and may override
    ``_place_frozen_models`` (called once the accelerator exists, before the data is prepared), ``_check_streaming``
    and ``_release_config``.
    """

    _tag_names = ["hf_cfft", "clip", "robust-fine-tuning"]  # + the method's own tag (model_card.method_info)
    # compute_loss returns per-micro-batch means (equal-sized batches: dataloader_drop_last), so the Trainer divides
    # by the accumulation steps itself. Without this, a model whose forward takes **kwargs (CLIPModel, SiglipModel)
    # would make the Trainer assume the loss is already scaled, and accumulation would multiply the gradients.
    loss_is_scaled_for_ga = False
    # Whether the method makes counterfactual images worth drawing (`hf_cfft.CounterfactualImagesCallback`).
    shows_counterfactual_images = False
    # TrainingArguments fields the method refuses beyond `arguments.REFUSED` ({field: (accepted value, why)}).
    _refused_arguments: dict = {}

    def __init__(
        self,
        model: torch.nn.Module,
        args: CfftConfig,
        data_collator=None,
        train_dataset=None,
        processing_class=None,
        *,
        image_column: str = "image",
        label_column: str = "label",
        data_source: Mapping[str, Any] | None = None,
        **kwargs,
    ):
        if not isinstance(args, CfftConfig):
            raise TypeError(f"args must be a CfftConfig, got {type(args).__name__}")
        check_training_arguments(args, self._refused_arguments)  # a field this run would not apply: before any work
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self.image_column, self.label_column = image_column, label_column
        self._place_frozen_models()
        # The starting model (and teacher), for the manifest: a resume from another one is refused, before the data
        # is prepared (the CAM pass) when the args name the checkpoint, else when training starts.
        self.run_model = self._start_fingerprints()
        self._check_resumed_start()
        self.skipped_images = 0
        # What the run trains on, for the run manifest a resume is checked against (before any preparation).
        self.run_data = {"source": dict(data_source or {})} | (
            rows_fingerprint(train_dataset, image_column, label_column) or {}
        )
        if train_dataset is not None:
            self.train_dataset = self._prepare_dataset(train_dataset)
        self._metrics: dict[str, list[float]] = defaultdict(list)
        # What the model card reports beyond the args; recipes set them (eval_results before the final save).
        self.base_model: str | None = None
        self.dataset_name: str | None = None
        self.eval_results: dict[str, dict[str, float]] | None = None
        self.ood_splits: list[str] | None = None
        # {"kind": "trained", "from_classifier": True} when training starts from a saved classifier (LP-FT stage 2).
        self.card_origin: dict | None = None
        self._micro_step, self._micro_step_of = 0, -1
        # [{"checkpoint", "step", "changed": {field: [old, new]}}]: resumes that changed settings (card, JSON).
        self.resumed_with_changes: list[dict] = []

    @classmethod
    def from_checkpoint(
        cls,
        model_name_or_path: str,
        args: CfftConfig,
        *,
        class_names: Sequence[str],
        templates: str | Sequence[str],
        teacher_name_or_path: str | None = None,
        show_progress: bool = True,
        **kwargs,
    ) -> RobustTrainer:
        """The method's trainer, with what it trains loaded from ``model_name_or_path``.

        ``model_name_or_path``: a pre-trained checkpoint (Hub id or folder: CLIP, MetaCLIP 2, SigLIP) or, for the
        methods that train a classifier, one saved by hf_cfft (LP-FT's second stage; the card says so).
        ``class_names`` / ``templates`` (a bundled set's name, a file, or the templates themselves) make the
        prompts of the zero-shot head. ``teacher_name_or_path``: a classifier to distil from instead of the frozen
        pre-trained model (methods that distil). Other keyword arguments (``train_dataset``, ``processing_class``,
        ``data_source``, the columns, ...) go to the trainer's ``__init__``. This is what the fine-tuning job and
        every training cell of the comparison call, through the method table (`hf_cfft.methods`).
        """
        templates = load_templates(templates) if isinstance(templates, str) else list(templates)
        models = cls._load_models(
            model_name_or_path, class_names=list(class_names), templates=templates,
            teacher_name_or_path=teacher_name_or_path, show_progress=show_progress,
        )  # fmt: skip
        trainer = cls(args=args, **models, **kwargs)
        trainer.base_model = model_name_or_path
        if is_cfft_checkpoint(model_name_or_path):  # e.g. LP-FT's second stage: the card says so
            trainer.card_origin = {"kind": "trained", "from_classifier": True}
        return trainer

    @classmethod
    def _load_models(
        cls,
        model_name_or_path: str,
        *,
        class_names: list[str],
        templates: list[str],
        teacher_name_or_path: str | None,
        show_progress: bool,
    ) -> dict[str, Any]:
        """Hook of `from_checkpoint`: the ``__init__`` arguments holding what the method trains (and distils from)."""
        raise NotImplementedError(f"{cls.__name__} does not say how to load its models")

    def classifier(self) -> torch.nn.Module:
        """The image classifier this run trains, as evaluation scores it (the trained model itself, by default)."""
        return self.model

    def _start_fingerprints(self) -> dict[str, str]:
        """Hook: ``{"start": ...}``, fingerprints of what the run starts from (`run_manifest.weights_fingerprint`)."""
        return {"start": weights_fingerprint(self.model)}

    def _check_resumed_start(self) -> None:
        """Refuse a resume (``args.resume_from_checkpoint``) from another starting model than the checkpoint's."""
        args = self.args
        if not args.resume_from_checkpoint or args.allow_changed_args_on_resume:
            return
        checkpoint = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
        if checkpoint is None:
            return
        refused, _ = manifest_changes(saved_manifest(checkpoint), {"model": self.run_model})
        refused = {key: values for key, values in refused.items() if key.startswith("model.")}
        if refused:
            refuse_changed_manifest(checkpoint, refused)

    def _place_frozen_models(self) -> None:
        """Hook: place models that are used but not trained (a teacher) once ``self.accelerator`` exists."""

    # ---- the run folder: a fresh run never lands on another run; a resume never mixes two configs ----

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """`Trainer.train`, guarding the run folder first.

        ``resume_from_checkpoint``: a checkpoint path, or True / "auto" for the newest *complete* checkpoint of
        ``output_dir`` (a fresh start when there is none). A fresh run into an ``output_dir`` that holds another run
        is refused unless ``args.overwrite_output_dir`` (which removes that run first); a resume whose method or
        optimisation settings differ from the checkpoint's ``training_args.json`` is refused unless
        ``args.allow_changed_args_on_resume`` (the change is then recorded in the card and the JSON).
        """
        args = self.args
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, args.output_dir, args=args)
        # Marked and locked for the whole run (hf_cfft.output_folder): a second run into it is refused meanwhile.
        with OutputFolder(
            args.output_dir, "finetune", overwrite=args.overwrite_output_dir, resuming=checkpoint is not None,
            write=args.should_save,
        ):  # fmt: skip
            return self._train_in_folder(checkpoint, trial, **kwargs)

    def _train_in_folder(self, checkpoint: str | None, trial, **kwargs):
        args = self.args
        changed = check_run_folder(args, checkpoint, data=self.run_data, model=self.run_model)
        if checkpoint is None and args.overwrite_output_dir:
            if args.should_save:
                check_output_dir(args.output_dir, resuming=False, overwrite=True)
            self.accelerator.wait_for_everyone()
        if checkpoint is not None:
            self.resumed_with_changes = _earlier_changes(checkpoint)
            if changed:
                logger.warning("Resuming %s with changed settings: %s", checkpoint, changed)
                step = json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("global_step")
                changes = {key: list(values) for key, values in changed.items()}
                entry = {"checkpoint": Path(checkpoint).name, "step": step, "changed": changes}
                self.resumed_with_changes.append(entry)
        if checkpoint is not None:
            state = json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text())
            if checkpoint_ends_the_run(state, args):
                return self._take_the_last_checkpoint(checkpoint)
        try:
            return super().train(resume_from_checkpoint=checkpoint, trial=trial, **kwargs)
        except RuntimeError as error:
            if args.world_size > 1 and _lost_a_peer(error):
                raise LostProcessError(self._lost_peer_message(error)) from error
            raise

    def _take_the_last_checkpoint(self, checkpoint: str) -> TrainOutput:
        """The run's result when ``checkpoint`` is its last step (a run stopped between that checkpoint and the final
        save): the checkpoint's weights and state, no step trained. Resumed there, transformers' loop trains one step
        past ``max_steps`` (with a constant learning rate that changes the weights) and saves it as ``checkpoint-N+1``.
        """
        self._load_from_checkpoint(checkpoint)
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        logger.warning(
            "%s is step %d, the run's last: training is complete, its weights are the result (no step trained)",
            checkpoint, self.state.global_step,
        )  # fmt: skip
        losses = [log["loss"] for log in self.state.log_history if "loss" in log]
        loss = sum(losses) / len(losses) if losses else float("nan")
        metrics = {"train_runtime": 0.0, "train_loss": loss, "epoch": self.state.epoch}
        return TrainOutput(self.state.global_step, loss, metrics)

    def _lost_peer_message(self, error: BaseException) -> str:
        args = self.args
        last = latest_complete_checkpoint(args.output_dir)
        first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        return (
            f"process {args.process_index} of {args.world_size} stopped at step {self.state.global_step + 1}: "
            f"another process died or hung (waited at most ddp_timeout={args.ddp_timeout} s; "
            f"{type(error).__name__}: {first_line}). "
            + (f"The newest complete checkpoint is {last}: " if last else "No checkpoint was saved yet: ")
            + "find why the other process stopped (its log, memory, the node), then resume with "
            "--resume_from_checkpoint auto; a lower --ddp_timeout fails faster"
        )

    def _stop_on_non_finite_loss(self, detail: str, fix: str) -> None:
        """Raise before the update of a non-finite loss is applied, naming the last good checkpoint."""
        last = latest_complete_checkpoint(self.args.output_dir)
        raise FloatingPointError(
            f"non-finite loss at step {self.state.global_step + 1} ({detail}); training stopped before this update "
            "was applied. "
            + (f"The last good checkpoint is {last}: " if last else "No checkpoint was saved yet: ")
            + f"{fix}, then resume or restart"
        )

    # ---- the data pipeline ----

    def _prepare_dataset(self, dataset):
        """Raw images -> the method's train set, as configured by ``args``.

        A `datasets.IterableDataset` is preprocessed lazily (`hf_cfft.streaming`); a raw `datasets.Dataset` goes to
        the method's ``_prepare_raw_dataset`` (image checks: unreadable images fail with their names, or are dropped
        and counted in ``self.skipped_images`` with ``args.skip_corrupt_images``). A dataset that already yields
        ``pixel_values`` (a format or transform set, or not a `datasets` dataset) is returned unchanged.
        """
        if isinstance(dataset, datasets.IterableDataset):
            self._check_streaming()
            return prepare_streaming_train_dataset(
                dataset, self._image_processor(), grid=self._patch_grid(), num_labels=self._num_labels(),
                augment=self.args.augment, image_column=self.image_column, label_column=self.label_column,
                batch_size=self.args.per_device_train_batch_size,
            )  # fmt: skip
        if not isinstance(dataset, datasets.Dataset):
            return dataset
        self._check_at_least_one_batch(len(dataset), "")
        if dataset.format["type"] is not None or "pixel_values" in dataset.column_names:
            return dataset
        dataset, self.skipped_images = self._prepare_raw_dataset(dataset, self._image_processor())
        self._check_at_least_one_batch(len(dataset), f" after {self.skipped_images} unreadable image(s) were skipped")
        return dataset

    def _check_at_least_one_batch(self, rows: int, after: str) -> None:
        """Refuse a train set that fills no batch: it would train 0 steps and save the zero-shot model as tuned."""
        args = self.args
        batch = args.per_device_train_batch_size * args.world_size
        if args.dataloader_drop_last and rows < batch:
            raise ValueError(
                f"the train set has {rows} image(s){after}, fewer than one batch of {batch} "
                f"(per_device_train_batch_size {args.per_device_train_batch_size} x {args.world_size} process(es)), "
                "and incomplete batches are dropped: the run would train 0 steps. Lower "
                f"--per_device_train_batch_size to at most {max(1, rows // args.world_size)} or train on more images"
            )

    def _prepare_raw_dataset(self, dataset: datasets.Dataset, processor) -> tuple[datasets.Dataset, int]:
        """The method's train set from a raw image dataset, and how many unreadable images were dropped."""
        raise NotImplementedError

    def _check_streaming(self) -> None:
        """Hook: refuse a streamed train set the method's configuration cannot use."""

    def _image_processor(self):
        """The train images' processor: the checkpoint's, or its fast twin (``fast_image_processing``)."""
        if self.processing_class is None:
            raise ValueError(
                f"{type(self).__name__} needs processing_class=<the checkpoint's image processor> to prepare a raw "
                "image dataset (e.g. AutoImageProcessor.from_pretrained(model_name_or_path)), or a train_dataset "
                "that already yields pixel_values"
            )
        if self.args.fast_image_processing:
            return FastImageProcessor(self.processing_class)
        return self.processing_class

    def _patch_grid(self) -> tuple[int, int]:
        """(h, w): the image tower's patch grid at its configured input size."""
        vision = self.accelerator.unwrap_model(self.model).config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    def _num_labels(self) -> int:
        """How many classes the labels index (labels outside [0, n) are refused by the transform)."""
        return self.accelerator.unwrap_model(self.model).config.num_labels

    # ---- step seeding: what a resumed run draws again ----

    def _count_micro_step(self) -> None:
        """Advance the micro-step counter of the current optimiser step (called once per training forward)."""
        if self._micro_step_of != self.state.global_step:
            self._micro_step_of, self._micro_step = self.state.global_step, 0
        self._micro_step += 1

    def step_generator(self) -> torch.Generator:
        """A CPU generator seeded by (seed, step, process, micro-step): the same draws after a resume."""
        key = f"{self.args.seed}/{self.state.global_step}/{self.args.process_index}/{self._micro_step}"
        seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    # ---- optimisation switches for the paper's exact setting ----

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        """All parameters when ``decay_all_parameters`` (the reference code), else the Trainer's default."""
        if self.args.decay_all_parameters:
            return [name for name, _ in model.named_parameters()]
        return super().get_decay_parameter_names(model)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """torch's OneCycleLR (cosine) when ``one_cycle_schedule``, else the configured transformers schedule."""
        if not self.args.one_cycle_schedule or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = optimizer if optimizer is not None else self.optimizer
        warmup = self.args.warmup_steps
        pct_start = warmup if 0 < warmup < 1 else (warmup / num_training_steps if warmup >= 1 else 0.02)
        self.lr_scheduler = OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=max(num_training_steps, 2),
            pct_start=min(max(pct_start, 1e-6), 0.999),
            anneal_strategy="cos",
            # torch's default, kept as the reference keeps it: Adam's beta1 goes 0.95 -> 0.85 -> 0.95 against the
            # learning rate.
            cycle_momentum=True,
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ---- metrics: the parts of the loss, as means since the last log ----

    def _record(self, training: bool, name: str, value: torch.Tensor | float) -> None:
        """Buffer one value of a loss part; `log` reports the mean as ``name`` (train) or ``eval_name``."""
        value = value.detach().item() if isinstance(value, torch.Tensor) else float(value)
        self._metrics[f"{'train' if training else 'eval'}/{name}"].append(value)

    def _extra_train_logs(self) -> dict[str, float]:
        """Hook: running totals a method adds to every training log."""
        return {}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Merge the buffered loss parts (means since the last log) into the Trainer's logs."""
        mode = "train" if any(not key.startswith("eval_") for key in logs) and "loss" in logs else "eval"
        prefix = "" if mode == "train" else "eval_"
        for key in [k for k in self._metrics if k.startswith(mode + "/")]:
            values = self._metrics.pop(key)
            logs[prefix + key.split("/", 1)[1]] = sum(values) / len(values)
        if mode == "train":
            logs.update(self._extra_train_logs())
        super().log(logs, start_time)

    # ---- release: training_args.json (and the card) beside every save, no pickle written or pushed ----

    def _save_weights(self, folder: str, output_dir: str | None, _internal_call: bool) -> None:
        """Hook: write the model's weights (and processor) to ``folder``; the Trainer's own save by default."""
        Trainer.save_model(self, output_dir, _internal_call=_internal_call)

    def _release_config(self, folder: str) -> PretrainedConfig | None:
        """The config the model card of ``folder`` describes; None writes ``training_args.json`` without a card."""
        return self.accelerator.unwrap_model(self.model).config

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, plus the model card (README.md) and ``training_args.json`` beside the weights.

        The Trainer saves every ``checkpoint-N`` through this method too, so checkpoints get them as well. Only
        processes that write the model (``args.should_save``) write them.
        """
        folder = output_dir if output_dir is not None else self.args.output_dir
        self._save_weights(folder, output_dir, _internal_call)
        if self.args.should_save:
            # transformers pickles the args beside every model; hf_cfft keeps them as training_args.json only, so
            # no folder (and no push of one) ever holds a pickle.
            Path(folder, TRAINING_ARGS_NAME).unlink(missing_ok=True)
            self._write_release_files(folder)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """The push of every save (``hub_strategy='every_save'``), without transformers' pickled training args.

        transformers' own version writes ``training_args.bin`` into ``output_dir`` just before uploading it; this
        one copies the checkpoint's model files (`files_to_upload`: no pickles) and uploads exactly those.
        """
        args = self.args
        if not self.is_world_process_zero() or args.hub_strategy == HubStrategy.END:
            return
        if not args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(args, self.state, self.control)
        for name in files_to_upload(checkpoint_folder):
            target = Path(args.output_dir, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.join(checkpoint_folder, name), target)
        job = hf_api().upload_folder(
            repo_id=self.hub_model_id,
            folder_path=args.output_dir,
            commit_message=f"Training in progress, step {self.state.global_step}",
            token=args.hub_token,
            run_as_future=True,
            allow_patterns=files_to_upload(args.output_dir),
            ignore_patterns=list(EXCLUDED_FILES),
            revision=args.hub_revision,
        )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress([job])
        else:
            self.push_in_progress.jobs.append(job)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write hf_cfft's model card to ``args.output_dir/README.md``: `push_to_hub` calls this before uploading.

        The card shows the method's hyper-parameters from ``args``, and reads these trainer attributes when set:
        ``base_model`` (the CLIP checkpoint fine-tuned from; ``finetuned_from`` overrides it), ``dataset_name``
        (``dataset`` overrides it), ``eval_results`` (``{"zero-shot": {split: acc}, "fine-tuned": {...}}``, top-1 in
        %, as in ``eval_results.json``) and ``ood_splits``. ``language``, ``tasks``, ``dataset_tags`` and
        ``dataset_args`` belong to the Trainer's signature and are not used: the task is image classification.
        """
        if not self.is_world_process_zero():
            return
        if isinstance(dataset, (list, tuple)):
            dataset = dataset[0] if dataset else None
        self._write_release_files(
            self.args.output_dir,
            model_name=model_name,
            license=license,
            tags=[tags] if isinstance(tags, str) else tags,
            base_model=finetuned_from,
            dataset_name=dataset,
        )

    def _write_release_files(self, output_dir: str, **overrides) -> None:
        """Write README.md (the model card) and ``training_args.json`` (the args as JSON, no pickle) to output_dir."""
        values = self.args.to_dict() | {MANIFEST_KEY: run_manifest(self.args, self.run_data, self.run_model)}
        if self.resumed_with_changes:
            values["resumed_with_changes"] = self.resumed_with_changes
        config = self._release_config(output_dir)
        if config is not None:
            repo_id = self.hub_model_id or self.args.hub_model_id
            extra_tags = overrides.pop("tags", None) or []
            card_kwargs = dict(
                model_config=config,
                base_model=self.base_model,
                dataset_name=self.dataset_name,
                results=self.eval_results,
                ood_splits=self.ood_splits,
                repo_id=repo_id,
                model_name=repo_id.split("/")[-1] if repo_id else Path(self.args.output_dir).resolve().name,
                tags=[*self._tag_names, *extra_tags],
                global_step=self.state.global_step,
                origin=self.card_origin,
            )
            card_kwargs.update({key: value for key, value in overrides.items() if value is not None})
            card_kwargs["training_args"] = values | {"world_size": self.args.world_size}
            write_model_card(output_dir, **card_kwargs)
        (Path(output_dir) / TRAINING_ARGS_JSON).write_text(json.dumps(values, indent=2) + "\n")


class LostProcessError(RuntimeError):
    """Another process of a multi-process run died or hung; the message says where to resume from."""


_PEER_LOST = ("timed out", "timeout", "connection closed by peer", "connection reset", "broken pipe", "nccl")


def _lost_a_peer(error: BaseException) -> bool:
    """Whether a collective failed because another process is gone or stuck (gloo/NCCL wording)."""
    text = str(error).lower()
    return isinstance(error, torch.distributed.DistBackendError) or any(word in text for word in _PEER_LOST)


def _earlier_changes(checkpoint: str) -> list[dict]:
    """The changed-settings resumes a checkpoint's ``training_args.json`` records (carried into the next saves)."""
    path = Path(checkpoint) / TRAINING_ARGS_JSON
    if not path.is_file():
        return []
    return list(json.loads(path.read_text(encoding="utf-8")).get("resumed_with_changes", []))
