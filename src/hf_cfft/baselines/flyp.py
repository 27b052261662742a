"""FLYP, "Finetune like you pretrain" (Goyal et al., CVPR 2023): fine-tune both towers with the pre-training loss.

Each training image is paired with a prompt of its class name (one template drawn per image and step), and the
image and text towers are trained with the contrastive loss the model was pre-trained with: CLIP's symmetric
InfoNCE (CLIP, MetaCLIP 2), or SigLIP's pairwise sigmoid loss. The classifier saved at the end is the usual
`CfftImageClassifier`: the fine-tuned image tower with a head rebuilt from the fine-tuned text tower (the zero-shot
head of the fine-tuned model), so evaluation, WiSE-FT, soups and release treat it like any other run.

Negatives are the other images and prompts of each process's own batch; features are not gathered across
processes, so under DDP the contrastive batch is ``per_device_train_batch_size``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.trainer import Trainer

from ..classifier_loading import BASE_MODEL_KEY, base_model_record, classifier_from_pretrained, is_cfft_checkpoint
from ..config import CfftConfig
from ..data import CounterfactualCollator, prepare_train_dataset
from ..families import family_for_model_type, family_of, tokenizer_kwargs
from ..modeling import CfftImageClassifier
from ..training.arguments import FLYP_REFUSED
from ..training.base import RobustTrainer
from ..training.run_manifest import weights_fingerprint
from ..zeroshot import build_zeroshot_head


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The pre-training loss of a batch of matched (image, text) pairs: [B, D], [B, D] -> [].

    Embeddings are L2-normalised here; ``logit_scale`` is the multiplier (``model.logit_scale.exp()``). Without
    ``logit_bias``: CLIP's loss, the mean of the image->text and text->image cross-entropies of the scaled cosine
    logits, pair i being the positive of row i. With ``logit_bias`` (SigLIP): the sigmoid loss,
    ``-sum log sigmoid(z_ij * (scale * cos_ij + bias)) / B`` with z = +1 on the diagonal and -1 elsewhere.
    """
    image = F.normalize(image_embeds.float(), dim=-1)
    text = F.normalize(text_embeds.float(), dim=-1)
    logits = logit_scale.float() * image @ text.T
    if logit_bias is None:
        targets = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    signs = 2 * torch.eye(logits.shape[0], device=logits.device) - 1
    return -F.logsigmoid(signs * (logits + logit_bias.float())).sum() / logits.shape[0]


def load_contrastive_model(model_name_or_path: str, **kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(the CLIP / MetaCLIP 2 / SigLIP model with both towers, its tokenizer): what FLYP fine-tunes."""
    if is_cfft_checkpoint(model_name_or_path):
        raise ValueError(
            f"{model_name_or_path} is a saved hf_cfft classifier: it holds no text tower, which FLYP trains; start "
            "FLYP from the pre-trained checkpoint (e.g. openai/clip-vit-base-patch32)"
        )
    family = family_for_model_type(AutoConfig.from_pretrained(model_name_or_path).model_type, model_name_or_path)
    model = family.model_class.from_pretrained(model_name_or_path, **kwargs)
    return model, AutoTokenizer.from_pretrained(model_name_or_path)


class FlypTrainer(RobustTrainer):
    """FLYP on top of `transformers.Trainer`; ``self.model`` is the contrastive model with both towers.

    Args:
        model: a ``CLIPModel``, ``MetaClip2Model`` or ``SiglipModel`` (`load_contrastive_model`).
        args: a `CfftConfig` with ``method='flyp'`` (its distillation knobs unused: ``distill_weight`` must be 0).
        tokenizer: the model's tokenizer; prompts are tokenised once, as the family was trained.
        class_names / templates: the prompts; class ``labels[i]`` is paired with ``template.format(name)``.
        train_dataset: a raw image dataset (prepared here: image checks, the transform), a streamed one, or one
            yielding ``pixel_values`` and ``labels``.
        processing_class: the checkpoint's image processor.
    Everything but the objective is `hf_cfft.training.RobustTrainer`'s: the run-folder guard, resume checks,
    step seeding, the optimisation switches, the pickle-free push. Checkpoints (``checkpoint-N``) hold the whole
    contrastive model (with ``training_args.json``), so a run resumes; any other save writes the classifier
    (`classifier`), with the image processor, the model card and ``training_args.json``.
    """

    _tag_names = ["hf_cfft", "clip", "robust-fine-tuning", "flyp"]
    _refused_arguments = FLYP_REFUSED

    def __init__(
        self,
        model: PreTrainedModel,
        args: CfftConfig,
        *,
        tokenizer: PreTrainedTokenizerBase,
        class_names: Sequence[str],
        templates: Sequence[str],
        data_collator=None,
        train_dataset=None,
        processing_class=None,
        image_column: str = "image",
        label_column: str = "label",
        **kwargs,
    ):
        if not isinstance(args, CfftConfig) or args.method != "flyp":
            raise ValueError("FlypTrainer needs a CfftConfig with method='flyp'")
        self.family = family_of(model)
        self.class_names, self.templates = list(class_names), list(templates)
        self.text_tokenizer = tokenizer
        # Class-major [C, T, L]: the prompt of class c with template t is [c, t].
        prompts = [t.replace("{}", name) for name in self.class_names for t in self.templates]
        encoded = tokenizer(prompts, **tokenizer_kwargs(model), return_tensors="pt")
        shape = (len(self.class_names), len(self.templates), -1)
        self.prompt_ids = encoded["input_ids"].view(shape)
        mask = encoded.get("attention_mask")
        self.prompt_mask = mask.view(shape) if mask is not None else None
        if data_collator is None:  # stacks pixel_values and labels (no masks, no refills)
            data_collator = CounterfactualCollator(
                mask_kind="none", fill_kind="none", mask_ratio=0.5, patch_size=model.config.vision_config.patch_size,
                seed=args.seed,
            )  # fmt: skip
        self._classifier_config: PretrainedConfig | None = None
        # The pre-trained checkpoint the saved classifiers come from (before any step changes the weights): WiSE-FT
        # and soups refuse to average classifiers of different base models.
        self.base_model_record = base_model_record(str(model.config._name_or_path or "unknown"), model)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            processing_class=processing_class,
            image_column=image_column,
            label_column=label_column,
            **kwargs,
        )

    @classmethod
    def _load_models(cls, model_name_or_path, *, class_names, templates, teacher_name_or_path, show_progress):
        """Both towers and the tokenizer: FLYP trains the contrastive model, then builds the classifier from it."""
        if teacher_name_or_path:
            raise ValueError("--teacher_name_or_path has no use with --method flyp, which distils nothing")
        model, tokenizer = load_contrastive_model(model_name_or_path)
        return {"model": model, "tokenizer": tokenizer, "class_names": class_names, "templates": templates}

    def _start_fingerprints(self) -> dict[str, str]:
        """Both towers' start and the prompts (class names x templates) the contrastive loss pairs images with."""
        prompts = json.dumps([self.class_names, self.templates]).encode()
        return {"start": weights_fingerprint(self.model, extra=prompts)}

    def _prepare_raw_dataset(self, dataset, processor):
        """Raw images -> checked, undecoded, with the image transform (no masks, no CAMs)."""
        args = self.args
        return prepare_train_dataset(
            dataset, processor, grid=self._patch_grid(), num_labels=self._num_labels(), augment=args.augment,
            image_check=args.image_check, skip_corrupt_images=args.skip_corrupt_images,
            image_column=self.image_column, label_column=self.label_column,
        )  # fmt: skip

    def _num_labels(self) -> int:
        return len(self.class_names)

    def draw_templates(self, batch_size: int) -> torch.Tensor:
        """One template index per image [B], seeded by (seed, step, process, micro-step): a resume redraws them."""
        return torch.randint(len(self.templates), (batch_size,), generator=self.step_generator())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The contrastive loss of the batch's images and their class prompts; one forward of the wrapped model."""
        if model.training:
            self._count_micro_step()
        labels = inputs["labels"].cpu()
        chosen = self.draw_templates(labels.shape[0])
        device = inputs["pixel_values"].device
        text = {"input_ids": self.prompt_ids[labels, chosen].to(device)}
        if self.prompt_mask is not None:
            text["attention_mask"] = self.prompt_mask[labels, chosen].to(device)
        outputs = model(pixel_values=inputs["pixel_values"], **text)
        unwrapped = self.accelerator.unwrap_model(model)
        bias = unwrapped.logit_bias if self.family.sigmoid else None
        loss = contrastive_loss(outputs.image_embeds, outputs.text_embeds, unwrapped.logit_scale.exp(), bias)
        if model.training and not torch.isfinite(loss):
            self._stop_on_non_finite_loss(f"contrastive loss {loss.item()}", "lower --learning_rate or use bf16")
        self._record(model.training, "contrastive_loss", loss)
        return (loss, outputs) if return_outputs else loss

    def classifier(self) -> CfftImageClassifier:
        """The fine-tuned image tower with the head rebuilt from the fine-tuned text tower, on the run's device."""
        model = self.accelerator.unwrap_model(self.model)
        weights, bias = build_zeroshot_head(
            model, self.text_tokenizer, self.class_names, self.templates, show_progress=False
        )
        classifier = classifier_from_pretrained(model, weights, self.class_names, head_bias=bias)
        setattr(classifier.config, BASE_MODEL_KEY, dict(self.base_model_record))
        return classifier.to(self.args.device).eval()

    def _save_weights(self, folder: str, output_dir: str | None, _internal_call: bool) -> None:
        """A ``checkpoint-N`` gets the whole contrastive model (to resume); anything else, the classifier."""
        if _internal_call and output_dir is not None:
            self._classifier_config = None
            return Trainer.save_model(self, output_dir, _internal_call=True)
        if not self.args.should_save:
            return None
        classifier = self.classifier()
        classifier.save_pretrained(folder)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(folder)
        self._classifier_config = classifier.config
        return None

    def _release_config(self, folder: str) -> PretrainedConfig | None:
        """The classifier's config beside a saved classifier; a checkpoint (the contrastive model) has no card."""
        return self._classifier_config
