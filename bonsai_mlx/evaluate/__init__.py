"""Evaluation (`bonsai-mlx eval`): held-out loss, short-answer VQA accuracy per question type, and the POPE hallucination probe.

Every metric comes with its sample count and a 95% confidence interval: Wilson score intervals for proportions
(accuracy, precision, recall, yes-ratio), a seeded bootstrap over samples for the loss and F1.

- `loss`: mean cross-entropy (and perplexity) over the assistant tokens of a LLaVA-Instruct JSON (the training loss).
- `vqa`: every assistant turn of every record is a question; the prompt is the conversation up to that turn (earlier
  answers as given, i.e. teacher-forced history) and the answer is generated greedily. Scoring is normalized exact
  match (the VQA-v2 normalization: lower case, punctuation and articles dropped, number words → digits). A turn's type
  is `record["types"][k]` (multi-turn) or `record["type"]`, else "all".
- `pope`: POPE (Li et al., 2023): JSON lines `{"question_id", "image", "text", "label": "yes"|"no"}`; the answer is
  decided by comparing the next-token logits of "Yes"/"yes" and "No"/"no" after the assistant header (no sampling).
  `build_pope` writes random / popular / adversarial splits from any COCO-format annotation file.

Files: `stats.py` (intervals, answer normalization; framework-free), `vqa.py` (the Evaluator: answers through the one
generation engine, `generate.py`), `loss.py`, `pope.py`, `run.py` (what `eval --task …` runs and prints).
This `__init__` imports nothing.
"""
