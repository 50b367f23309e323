"""Training the student (docs/architecture.md, "Training").

- `config.py`: `TrainConfig` and where a run's options come from (checkpoint → YAML → flags); framework-free
- `data.py`: LLaVA-Instruct records → validated, tokenized samples with counted skips → batches; framework-free
  (the teacher tool reads records with it)
- `step.py`: the trainable student, the loss, the compiled step, schedules and named optimizer groups
- `losses.py`: masked cross-entropy; `distill.py`: the teacher cache's targets, the alignment projectors, L_text/L_img
- `checkpoint.py`: exact-resume checkpoints; `trainer.py`: the loop (`Trainer(cfg).train()`)

This `__init__` imports nothing, so the framework-free parts stay importable without mlx.
"""
