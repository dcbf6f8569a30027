"""Integrations with other training stacks: `hf` for Hugging Face ``transformers.Trainer`` / TRL."""

from .hf import LorakitCallback, LorakitTrainer, LorakitTrainerMixin

__all__ = ["LorakitCallback", "LorakitTrainer", "LorakitTrainerMixin"]
