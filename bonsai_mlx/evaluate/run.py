"""`bonsai-mlx eval --task loss|vqa|pope`: load, evaluate, and the printed lines (the CLI only parses flags)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from ..atomic import write_json
from ..errors import BonsaiError

TASKS = ("loss", "vqa", "pope")


def run_eval(model: str, task: str, data: str, adapter: Optional[str] = None, image_root: Optional[str] = None,
             limit: Optional[int] = None, max_tokens: int = 8, batch_size: int = 4, quantize: Optional[int] = None,
             system: Optional[str] = None, out: Optional[str] = None) -> dict:
    """Evaluate a student on one task; writes the full result (metrics, intervals, every prediction) to `out`."""
    from ..io import load
    from .vqa import Evaluator

    if task not in TASKS:
        raise BonsaiError(f"--task must be one of {TASKS}, got {task!r}")
    if limit is not None and limit < 1:
        raise BonsaiError(f"--limit must be at least 1, got {limit}")
    if task in ("loss", "vqa"):
        from ..train.data import read_records

        records = read_records(data)
    else:
        from .pope import read_pope

        questions = read_pope(data)
    # the loss is the training loss, so on training's exact products (unpacked: packed tiles round a prompt's
    # activations to int8); vqa and pope generate as `generate` does
    m, processor = load(model, quantize=quantize, adapter=adapter, pack=task != "loss")
    if task == "loss":
        from .loss import eval_loss

        res = eval_loss(m, processor, records, image_root, limit=limit, batch_size=batch_size, source=str(data))
    elif task == "vqa":
        from .vqa import eval_vqa

        res = eval_vqa(Evaluator(m, processor, image_root, system), records, limit=limit, max_tokens=max_tokens,
                       source=str(data))
    else:
        from .pope import eval_pope

        res = eval_pope(Evaluator(m, processor, image_root, system), questions, limit=limit)
    if out:
        write_json(Path(out), {"model": str(model), "adapter": adapter, "data": str(data), **res})
    return res


def result_lines(res: dict) -> List[str]:
    """The table `eval` prints: each metric with its 95% interval and count."""
    if res["task"] == "loss":
        lo, hi = res["loss"]["ci95"]
        return [f"loss {res['loss']['value']:.4f} [{lo:.4f}, {hi:.4f}]  perplexity "
                f"{res['perplexity']['value']:.3f}  ({res['loss']['n']} samples, {res['tokens']} tokens)"]
    if res["task"] == "vqa":
        lines = [f"{'type':<12} {'n':>5}  accuracy [95% CI]"]
        for t, v in list(res["per_type"].items()) + [("overall", res["accuracy"])]:
            lines.append(f"{t:<12} {v['n']:>5}  {v['value']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]")
        return lines
    return [f"{k:<10} {res[k]['value']:.3f} [{res[k]['ci95'][0]:.3f}, {res[k]['ci95'][1]:.3f}]  (n={res[k]['n']})"
            for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")]
