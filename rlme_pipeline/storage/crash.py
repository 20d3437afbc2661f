"""Test hook: kill this process with SIGKILL at a named point, to prove resume loses nothing.

    RLME_CRASH_AT=score:mid        the first time any iteration reaches the point
    RLME_CRASH_AT=update:mid@1     only in iteration 1
    RLME_CRASH_SIGNAL=TERM         send SIGTERM instead (the process is asked to stop: jobs/sigterm.py)

Points: generate:mid, score:mid, update:mid, eval:mid (inside each stage, after the first batch/step),
upload:mid (checkpoint upload, after its first file), upload:background (the same, in a checkpoint written
in the background while the next iteration samples: checkpoint.background_write), {stage}:written (data
files written, stage record not yet; with a background write, update:written comes after the write is
joined), commit:before-manifest (every stage recorded, MANIFEST.json not yet written), evolve:before-phase
(the online evolve step's proposal committed, its phase not yet recorded), import:mid (a model import's
weights written, its tokenizer and record not yet: models/importing.py), prune:recorded (retention's
PRUNED.json written, the files not yet deleted).
Unset (always, outside tests) it costs one environment lookup.
"""

from __future__ import annotations

import os
import signal


def crash_point(name: str, iteration: int | None = None) -> None:
    want = os.environ.get("RLME_CRASH_AT")
    if not want:
        return
    point, _, it = want.partition("@")
    if point == name and (not it or iteration is None or int(it) == iteration):
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("RLME_CRASH_SIGNAL", "KILL")))
