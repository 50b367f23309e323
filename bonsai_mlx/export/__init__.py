"""Export targets (docs/architecture.md, "Export"): `hf.py` — a transformers `LlavaForConditionalGeneration` directory
(LoRA fused) and optionally a PEFT adapter (`bonsai-mlx export`, `python convert/to_hf.py`).

This `__init__` imports nothing (no mlx), so `from bonsai_mlx.export.hf import export` is the entry point.
"""
