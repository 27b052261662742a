"""Push an already-trained model folder to the Hugging Face Hub, with a model card regenerated from its files.

    python -m hf_cfft.release.push --model_dir outputs/world_cfft --repo_id you/clip-cfft-world
    python -m hf_cfft.release.push --model_dir DIR --repo_id you/name --private --revision v1 --commit_message "..."

Uploads weights (safetensors), config.json with the model's code (modeling.py), the image processor, the card and
the JSON results/arguments; never pickles such as training_args.bin. Log in first (`hf auth login`) or set HF_TOKEN.
A failed push leaves the folder as it was (plus the card) and prints the command that retries.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from .hub import HubPushError, push_model_dir


@dataclass
class PushArguments:
    model_dir: str = field(metadata={"help": "Folder written by save_model / save_pretrained."})
    repo_id: str = field(metadata={"help": "Hub model repo, 'user/name' or 'org/name' (created if missing)."})
    private: bool = field(default=False, metadata={"help": "Create the repo private (no effect if it exists)."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (created if missing)."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message of the upload."})
    base_model: str | None = field(
        default=None, metadata={"help": "CLIP checkpoint it was fine-tuned from (default: what the card records)."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Dataset it was fine-tuned on (default: what the card records)."}
    )
    ood_splits: list[str] = field(
        default_factory=list, metadata={"help": "Evaluated splits that are OOD, to label the results table."}
    )
    license: str | None = field(default=None, metadata={"help": "License id for the card, e.g. 'mit'."})
    keep_card: bool = field(
        default=False, metadata={"help": "Upload the folder's README.md as is instead of regenerating it."}
    )


def main(argv: list[str] | None = None) -> str:
    (args,) = HfArgumentParser(PushArguments).parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    try:
        url = push_model_dir(
            args.model_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            base_model=args.base_model,
            dataset_name=args.dataset_name,
            ood_splits=args.ood_splits or None,
            license=args.license,
            regenerate_card=not args.keep_card,
        )
    except (HubPushError, FileNotFoundError) as error:  # a failed upload, or a folder that holds no model
        print(f"push: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"Pushed {args.model_dir} to {url}")
    return url


if __name__ == "__main__":
    main()
