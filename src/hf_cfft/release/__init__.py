"""Release: complete-checkpoint resume, model cards (template as package data) and pushing folders to the Hub."""

from .checkpoints import checkpoint_problems, latest_complete_checkpoint, resolve_resume_checkpoint
from .hub import HubPushError, files_to_upload, push_model_dir
from .model_card import render_model_card, write_model_card

__all__ = [
    "HubPushError",
    "checkpoint_problems",
    "files_to_upload",
    "latest_complete_checkpoint",
    "push_model_dir",
    "render_model_card",
    "resolve_resume_checkpoint",
    "write_model_card",
]
