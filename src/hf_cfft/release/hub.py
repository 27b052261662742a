"""Push a trained model folder to the Hugging Face Hub: weights, config, remote code, image processor and card.

The card is regenerated and uploaded from a staging folder; it is written into the model folder only once the push
has succeeded, and nothing in the folder is ever moved or deleted, so a failed push leaves the folder byte for byte
as it was: the error says what failed and how to retry.
Pickles (``training_args.bin``, optimizer and RNG states, ``*.pt``) are never uploaded.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import shlex
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, RepoUrl

from .model_card import CARD_NAME, card_inputs_from_dir, render_model_card

# A command every pip-installed user has (recipes/push_to_hub.py is only in a clone of the repository).
PUSH_COMMAND = ("python", "-m", "hf_cfft.release.push")
# Pickles can run code when loaded, and training-state files are useless to someone who downloads the model.
EXCLUDED_FILES = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "trainer_state.json", "_*", ".*")
EXCLUDED_DIRS = ("checkpoint-*", "runs", "__pycache__", "_*", ".*")


class HubPushError(RuntimeError):
    """A push failed; the local folder is complete. ``retry_command`` repeats the push."""

    def __init__(self, message: str, retry_command: str):
        super().__init__(message)
        self.retry_command = retry_command


def files_to_upload(model_dir: str | os.PathLike) -> list[str]:
    """Paths (relative, '/'-separated, sorted) of the files in ``model_dir`` that a push uploads."""
    root = Path(model_dir)
    selected = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not any(fnmatch.fnmatch(d, pattern) for pattern in EXCLUDED_DIRS))
        for name in files:
            if not any(fnmatch.fnmatch(name, pattern) for pattern in EXCLUDED_FILES):
                selected.append((Path(folder) / name).relative_to(root).as_posix())
    return sorted(selected)


def retry_command(model_dir: str | os.PathLike, repo_id: str, **options: Any) -> str:
    """The shell command that repeats a push: ``python -m hf_cfft.release.push`` with the same options.

    ``options`` are the script's flags by name: True adds a switch, a list adds its items, None / False are left out.
    The token is never part of it (it comes from the environment or `hf auth login`).
    """
    parts = [*PUSH_COMMAND, "--model_dir", str(model_dir), "--repo_id", repo_id]
    for name, value in options.items():
        if value is None or value is False or value == []:
            continue
        parts.append(f"--{name}")
        if value is not True:
            parts += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return shlex.join(parts)


def _check_model_dir(model_dir: Path, files: Sequence[str]) -> None:
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {str(model_dir)!r} does not exist; pass the trained model's folder")
    if "config.json" not in files:
        raise FileNotFoundError(f"{model_dir} has no config.json: save the model with save_pretrained first")
    if not any(name.endswith(".safetensors") for name in files):
        raise FileNotFoundError(
            f"{model_dir} has no .safetensors weights (pickled .bin weights are never uploaded); re-save the model "
            "with save_pretrained(folder), which writes safetensors"
        )


def _stage(model_dir: Path, files: Sequence[str], staging: Path, card: ModelCard | None) -> None:
    """``staging`` holds a link to each of ``files`` in ``model_dir`` (the card: ``card`` when given)."""
    for name in files:
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name == CARD_NAME and card is not None:
            card.save(target)
        else:
            target.symlink_to((model_dir / name).resolve())


def push_model_dir(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    api: HfApi | None = None,
    base_model: str | None = None,
    dataset_name: str | None = None,
    ood_splits: Sequence[str] | None = None,
    license: str | None = None,
    regenerate_card: bool = True,
) -> str:
    """Upload a saved model folder to the Hub repo ``repo_id`` (created if missing); returns the repo's URL.

    The card (README.md) is regenerated from the folder's ``config.json``, ``eval_results.json`` and
    ``training_args.json``; base_model / dataset_name default to what an existing card records, and ood_splits
    labels the results table's columns; it is written into ``model_dir`` only after the upload succeeded.
    ``regenerate_card=False`` uploads an existing, e.g. hand-edited, card as is.
    Any failure of the Hub calls raises `HubPushError` naming the failed step and the command that retries.
    """
    model_dir = Path(model_dir)
    files = files_to_upload(model_dir) if model_dir.is_dir() else []
    _check_model_dir(model_dir, files)
    card = None
    if regenerate_card or CARD_NAME not in files:
        inputs: dict[str, Any] = card_inputs_from_dir(model_dir)
        given = dict(base_model=base_model, dataset_name=dataset_name, ood_splits=ood_splits)
        inputs.update({key: value for key, value in given.items() if value is not None})
        card = render_model_card(repo_id=repo_id, license=license, local_dir=str(model_dir), **inputs)
        files = sorted({*files, CARD_NAME})

    api = api if api is not None else HfApi()
    step = f"creating the repo {repo_id}"
    # The upload reads a staging folder of links to the model's files plus the new card, so that nothing in
    # model_dir changes unless the push succeeds (the new card is written there only then).
    staging = tempfile.TemporaryDirectory(prefix="hf_cfft_push_")
    try:
        _stage(model_dir, files, Path(staging.name), card)
        repo_url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
        resolved_id = repo_url.repo_id if isinstance(repo_url, RepoUrl) else repo_id
        if revision and revision != "main":
            step = f"creating the branch {revision!r} of {resolved_id}"
            api.create_branch(resolved_id, branch=revision, token=token, exist_ok=True)
        step = f"uploading {len(files)} files to {resolved_id}"
        api.upload_folder(
            repo_id=resolved_id,
            folder_path=staging.name,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or "Upload counterfactually fine-tuned CLIP classifier (hf_cfft)",
            token=token,
            # Exactly the listed files (escaped: names are matched as patterns), never a pickle.
            allow_patterns=[glob.escape(name) for name in files],
            ignore_patterns=list(EXCLUDED_FILES),
        )
    except Exception as error:
        command = retry_command(
            model_dir,
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            base_model=base_model,
            dataset_name=dataset_name,
            ood_splits=list(ood_splits) if ood_splits else None,
            license=license,
            keep_card=not regenerate_card,
        )
        raise HubPushError(
            f"Push of {model_dir} to the Hub failed while {step}: {type(error).__name__}: {error}\n"
            f"Nothing local changed: {model_dir} is as it was, byte for byte. Fix the cause (network, "
            f"`hf auth login` / HF_TOKEN with write access, quota) and retry with:\n  {command}",
            command,
        ) from error
    finally:
        staging.cleanup()
    if card is not None:
        card.save(model_dir / CARD_NAME)
    return str(repo_url) if isinstance(repo_url, RepoUrl) else f"https://huggingface.co/{resolved_id}"
