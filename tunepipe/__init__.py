"""tunepipe: staged LoRA fine-tuning with LLaMA-Factory-compatible data."""

__version__ = "0.1.0"
