"""lorasp-edge: plan, train (LoRA-SP) and export language models for edge devices."""

__version__ = "0.1.0"
