"""ERGO Hub folders: writing, converting checkpoints, model cards, pushing."""

from .card import build_model_card
from .folder import Conversion, convert_checkpoint, copy_remote_code, push_folder, save_hub_folder

__all__ = ["Conversion", "build_model_card", "convert_checkpoint", "copy_remote_code", "push_folder",
           "save_hub_folder"]
