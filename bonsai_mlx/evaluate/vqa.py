"""Short-answer VQA: every assistant turn of every record is a question, answered greedily through the one
generation engine (`generate.py`: the chat template, one-pass prefill, mlx-lm's decode), scored by normalized exact
match per question type."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import BonsaiError
from .stats import normalize_answer, proportion


def vqa_items(records: list, source: str = "data") -> List[dict]:
    """One item per assistant turn: {id, image, turns (up to and including the question), answer, type}."""
    from ..prompting import RecordError, parse_turns

    items = []
    for i, rec in enumerate(records):
        rid = str(rec.get("id", i)) if isinstance(rec, dict) else str(i)
        try:
            turns, image = parse_turns(rec)
        except RecordError as e:
            raise BonsaiError(f"{source}: record {rid}: {e}") from None
        types = rec.get("types") if isinstance(rec.get("types"), list) else None
        k = 0
        for j, (role, text) in enumerate(turns):
            if role != "assistant":
                continue
            qtype = types[k] if types is not None and k < len(types) else rec.get("type", "all")
            items.append({"id": rid, "turn": k, "image": image, "turns": turns[:j], "answer": text, "type": qtype})
            k += 1
    return items


# --- the model side -----------------------------------------------------------------------------------------------


class Evaluator:
    """A loaded student + processor, with image features cached per image (several questions share one)."""

    def __init__(self, model, processor, image_root=None, system: Optional[str] = None):
        self.model, self.processor, self.system = model, processor, system
        self.root = Path(image_root) if image_root is not None else None
        self._feats: Dict[str, object] = {}
        model.eval()

    def check_images(self, images) -> None:
        """Fail before any work when an image is missing (one line naming the first and the count)."""
        names = sorted({i for i in images if i is not None})
        if names and self.root is None:
            raise BonsaiError(f"the records have images (e.g. {names[0]!r}) but no --image-root was given")
        missing = [n for n in names if not (self.root / n).is_file()]
        if missing:
            raise BonsaiError(f"{len(missing)} of {len(names)} images not found, e.g. {self.root / missing[0]} "
                              "(check --image-root)")

    def image_features(self, image: Optional[str]):
        import mlx.core as mx

        if image is None:
            return None
        if image not in self._feats:
            if self.root is None:
                raise BonsaiError(f"a record has image {image!r} but no --image-root was given")
            path = self.root / image
            if not path.is_file():
                raise BonsaiError(f"image {path} not found (check --image-root)")
            px = mx.array(self.processor.image_processor([path]))
            feats = self.model.get_image_features(px)
            mx.eval(feats)
            if len(self._feats) > 64:
                self._feats.clear()
            self._feats[image] = feats
        return self._feats[image]

    def answer_result(self, turns, image, max_tokens: int = 8):
        """The engine's GenerationResult for the conversation `turns` (ending with the question): greedy, stopping at
        an EOS token — exactly what `bonsai-mlx generate` gives for the same image and prompt."""
        from ..generate import generate
        from ..prompting import turns_to_messages

        return generate(self.model, self.processor, messages=turns_to_messages(turns),
                        image_features=self.image_features(image), system=self.system, max_tokens=max_tokens)

    def answer(self, turns, image, max_tokens: int = 8) -> str:
        return self.answer_result(turns, image, max_tokens).text

    def next_token_logits(self, turns, image):
        """The logits [V] after the conversation's assistant header: the engine's prefill (generate's first step)."""
        from ..generate import next_token_logits, prepare_inputs
        from ..prompting import turns_to_messages

        _, embeds, _ = prepare_inputs(self.model, self.processor, messages=turns_to_messages(turns),
                                      image_features=self.image_features(image), system=self.system)
        return next_token_logits(self.model, embeds)


def _progress(it, total: int, desc: str, show: bool):
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit="q", dynamic_ncols=True, disable=not show, leave=False)


def eval_vqa(ev: Evaluator, records: list, limit: Optional[int] = None, max_tokens: int = 8, progress: bool = True,
             source: str = "data") -> dict:
    items = vqa_items(records, source)
    if limit is not None:
        items = items[:limit]
    if not items:
        raise BonsaiError(f"{source}: no questions (records need a gpt turn)")
    ev.check_images(it["image"] for it in items)
    per_type: Dict[str, List[int]] = defaultdict(list)
    preds = []
    for it in _progress(items, len(items), "eval vqa", progress):
        res = ev.answer_result(it["turns"], it["image"], max_tokens)
        ok = int(normalize_answer(res.text) == normalize_answer(it["answer"]))
        per_type[it["type"]].append(ok)
        preds.append({"id": it["id"], "turn": it["turn"], "type": it["type"], "answer": it["answer"],
                      "prediction": res.text, "token_ids": res.token_ids, "correct": bool(ok)})
    allv = [p["correct"] for p in preds]
    return {"task": "vqa", "accuracy": proportion(sum(allv), len(allv)),
            "per_type": {t: proportion(sum(v), len(v)) for t, v in sorted(per_type.items())},
            "predictions": preds}

