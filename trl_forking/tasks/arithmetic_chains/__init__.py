"""The bundled task, chains of two-digit additions and subtractions (``task``), its splits (``data/``) and the tiny
Qwen3 that reasons on it, built on CPU and cached (``base_model``)."""

from .base_model import BaseModelRecipe, base_model_dir, build_base_model
from .task import TASK_NAME, load_task

__all__ = ["TASK_NAME", "BaseModelRecipe", "base_model_dir", "build_base_model", "load_task"]
