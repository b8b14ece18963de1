"""declora: decentralized LoRA fine-tuning (Dec-LoRA) with a batched multi-peer engine."""

__version__ = "0.1.0"
