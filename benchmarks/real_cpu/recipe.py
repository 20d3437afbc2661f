"""The CPU recipe (configs/smollm2-cpu.yaml) as the benchmarks run it, and the rule that measures its format.

Every benchmark here starts from the recipe file itself, so what they measure is what a user runs; they
change only what the experiment varies (a question's weight, the seed) and, with --tiny, the sizes.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

from benchmarks._common import ROOT

RECIPE = ROOT / "configs" / "smollm2-cpu.yaml"
STEER = "format"  # the recipe's question that the steering experiment turns on and off

# What the recipe's prompt asks for: the response ends with "The answer is N." (N a number; the final period
# optional, since a sampled answer often stops right after the number).
_ENDS_WITH_ANSWER = re.compile(r"The answer is \$?-?\d[\d,]*(?:\.\d+)?\.?\s*$")


def ends_with_answer(completion: str) -> bool:
    return bool(_ENDS_WITH_ANSWER.search(completion))


def recipe_dict(gguf: str | None = None) -> dict:
    """The recipe as a dict, its relative paths made absolute (it is written elsewhere). `gguf`: another
    location of the SmolLM2 file than the recipe's (RLME_REAL_MODELS moves it)."""
    d = yaml.safe_load(RECIPE.read_text())
    d["data"]["path"] = str((RECIPE.parent / d["data"]["path"]).resolve())
    model = d["policy"]["model"].removeprefix("gguf:")
    path = gguf or str((RECIPE.parent / model).resolve())
    d["policy"]["model"] = f"gguf:{path}"
    for ev in d["evaluators"]:
        ev["model"] = f"gguf:{path}"
    return d


def variant(base: dict, *, run_id: str, seed: int, steer_weight: float | None = None, tiny: bool = False) -> dict:
    """The recipe with another run id and seed; `steer_weight` sets the format question's weight (0: the
    control, which still asks it, so its P(yes) is recorded too); `tiny`: smoke sizes."""
    d = copy.deepcopy(base)
    d["run"].update(id=run_id, seed=seed)
    if steer_weight is not None:
        (q,) = [q for q in d["questions"] if q["id"] == STEER]
        q["weight"] = steer_weight
    if tiny:
        d["data"]["prompts_per_iteration"] = 2
        d["generation"].update(group_size=2, max_new_tokens=8)
        d["optimizer"].update(micro_batch_size=4, grad_accumulation=1)
    return d


def write(d: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{d['run']['id']}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path
