"""Release: model cards (template as package data) and pushing folders to the Hub."""

from .hub import HubPushError, files_to_upload, push_model_dir
from .model_card import render_model_card, write_model_card

__all__ = [
    "HubPushError",
    "files_to_upload",
    "push_model_dir",
    "render_model_card",
    "write_model_card",
]
