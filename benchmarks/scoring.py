"""Scoring throughput: K meta-questions sharing each rollout's prefix versus each question scored on its own.

    PYTHONPATH=. python -m benchmarks.scoring [--rollouts 64] [--completion-words 60,200] [--repeats 3] [--tiny]

Both variants call the pipeline's own `score_rollouts` (tokenisation, batching, length sorting included):
"shared" with all K questions at once (the prefix is encoded once into the KV cache, the K questions run on
top of it packed in one row); "separate" once per question (the prefix is encoded K times). Runs alternate
shared/separate and each number is the median of the repeats. The target: K = 8 costs <= 2x K = 1 (shared).

"token bound" is the least the shared scheme can cost: the tokens it must run per rollout, prefix P plus
the K questions (each with the question template), relative to K = 1, i.e. (P + S_K) / (P + S_1). Compute
is linear in tokens at these lengths, so time(K)/time(1) can approach the bound but not beat it: with
short completions the questions, not the prefix, are most of the work.
"""

from __future__ import annotations

import argparse
import random
import time

from benchmarks._common import machine, median, spread, table

QUESTIONS = [
    "Is the answer correct?",
    "Does the whole solution logically lead from the question to an answer?",
    "Is the response polite?",
    "Is the final answer stated clearly?",
    "Is the arithmetic right?",
    "Is the response free of repetition?",
    "Does the response answer the question that was asked?",
    "Is the response concise?",
    "Is every step justified?",
    "Is the response in English?",
    "Does the response avoid making things up?",
    "Is the tone appropriate?",
    "Is the format easy to read?",
    "Would an expert agree with the answer?",
    "Is the answer a number?",
    "Is the response complete?",
]


def rollouts(n: int, words: int, seed: int = 0):
    from importlib.resources import files

    import polars as pl

    vocab = files("rlme_pipeline").joinpath("assets/corpus.txt").read_text().split()
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        rows.append(
            {
                "rollout_id": f"r{i}",
                "iteration": 0,
                "prompt": f"What is {a}+{b}?",
                "completion": " ".join(rng.choice(vocab) for _ in range(rng.randint(words // 2, words))),
            }
        )
    return pl.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rollouts", type=int, default=64)
    ap.add_argument("--completion-words", default="60,200", help="comma-separated: one table per length")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--ks", default="1,4,8,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="smoke sizes: 4 rollouts, K = 1 and 2, one repeat")
    a = ap.parse_args()
    if a.tiny:
        a.rollouts, a.completion_words, a.ks, a.repeats = 4, "10", "1,2", 1

    from rlme_pipeline.backends.session import Backends
    from rlme_pipeline.config import QuestionConfig, ScoringConfig
    from rlme_pipeline.judging.judges import Evaluator, score_rollouts
    from rlme_pipeline.models.tiny import resolve_tiny
    from rlme_pipeline.models.weights_at import ModelRef

    path = str(resolve_tiny("evaluator"))
    judge = Evaluator("ev", ModelRef(path=path, dtype="float32", device="cpu", version="bench"))
    sc = ScoringConfig(batch_size=a.batch_size, chat_template="off")  # the raw text, as RESULTS.md measured
    ks = [int(k) for k in a.ks.split(",")]
    qs = [
        QuestionConfig(id=f"q{i}", text=QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" ({i})"))
        for i in range(max(ks))
    ]
    backends = Backends()
    tok = backends.pool.get(path, "float32", "cpu", "bench").tokenizer  # loaded once, outside the timings
    q_tokens = [
        len(tok(sc.question_template.format(question=q.text), add_special_tokens=False)["input_ids"]) for q in qs
    ]
    print(
        f"scoring: {a.rollouts} rollouts, scoring batch {a.batch_size}, tiny evaluator (hidden 256, 3 layers); "
        f"median of {a.repeats} alternating runs"
    )
    print(f"machine: {machine()}")
    for words in [int(w) for w in a.completion_words.split(",")]:
        df = rollouts(a.rollouts, words)
        score_rollouts(df.head(min(4, df.height)), [judge], qs[:2], sc, "warm", backends)  # warm-up
        prefix = (
            sum(
                len(tok(sc.template.format(prompt=r["prompt"], completion=r["completion"]))["input_ids"])
                for r in df.iter_rows(named=True)
            )
            / df.height
        )
        times: dict[tuple[int, str], list[float]] = {}
        for _ in range(a.repeats):
            for k in ks:
                for mode in ("shared", "separate"):
                    t0 = time.perf_counter()
                    if mode == "shared":
                        out = score_rollouts(df, [judge], qs[:k], sc, "b", backends)
                    else:
                        out = [score_rollouts(df, [judge], [q], sc, "b", backends) for q in qs[:k]]
                    times.setdefault((k, mode), []).append(time.perf_counter() - t0)
                    assert (out.height if mode == "shared" else sum(o.height for o in out)) == df.height * k

        base = median(times[(ks[0], "shared")])
        rows = []
        for k in ks:
            sh, se = median(times[(k, "shared")]), median(times[(k, "separate")])
            n = df.height * k
            bound = (prefix + sum(q_tokens[:k])) / (prefix + sum(q_tokens[: ks[0]]))
            rows.append([k, n / sh, n / se, se / sh, sh / base, bound, spread(times[(k, "shared")])])
        print(
            f"\ncompletions of {words // 2}-{words} words: prefix {prefix:.0f} tokens on average; "
            f"question suffixes {min(q_tokens)}-{max(q_tokens)} tokens each"
        )
        print(
            table(
                [
                    "K",
                    "judgements/s shared",
                    "judgements/s separate",
                    "speed-up shared/separate",
                    f"time(K)/time(K={ks[0]}) shared",
                    "token bound",
                    "spread (shared)",
                ],
                rows,
            )
        )


if __name__ == "__main__":
    main()
