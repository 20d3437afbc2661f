"""The miniature task, its tokenizer, and the SFT that makes the base policy and the judge.

Two-digit addition and subtraction ("What is 23 + 15?" -> " The answer is 38."). Numbers are split
into single digits by the pre-tokenizer, so arithmetic is learnable digit by digit; " Yes"/" No" stay
single tokens, which the meta-evaluation reward needs.

The judge is "knowledgeable": it is trained on every problem of the task (all operand pairs), as a
pretrained evaluator would have seen arithmetic, with hard negatives (off by 1, 2, 10) and malformed
answers, balanced Yes/No. The base policy is trained on a separate SFT split only, and stopped early
while it is still weak: RL then has room to improve it, and the judge knows more than it does.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rlme_pipeline.audit.labels import auroc as labels_auroc

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# The scoring templates the judge is trained on (short: every token is CPU time). The pipeline's score
# stage must be configured with exactly these.
TEMPLATE = "{prompt}{completion}\n"
QUESTION_TEMPLATE = "{question}"
QUESTION = "Is the answer correct?"
# A second objective that trades against the first: an odd right answer is not even, an even wrong one is.
QUESTION_EVEN = "Is the answer even?"
MASTER_KEYS = [
    " ",
    ".",
    ",",
    ":",
    " Thought process:",
    " Let's solve this problem step by step.",
    " Solution",
    " The answer is correct.",
    " The answer is the correct answer.",
]


# --- data -----------------------------------------------------------------------------------------
def problems(lo: int = 10, hi: int = 49) -> list[dict]:
    """Every a+b and a-b (a >= b) with two-digit operands in [lo, hi]."""
    out = []
    for a in range(lo, hi + 1):
        for b in range(lo, hi + 1):
            out.append({"prompt": f"What is {a} + {b}?", "answer": str(a + b), "a": a, "b": b, "op": "+"})
            if a >= b:
                out.append({"prompt": f"What is {a} - {b}?", "answer": str(a - b), "a": a, "b": b, "op": "-"})
    for p in out:
        p["id"] = f"{p['op']}{p['a']}_{p['b']}".replace("+", "add").replace("-", "sub")
    return out


def split(items: list[dict], seed: int, n_eval: int, n_rl: int) -> dict[str, list[dict]]:
    """Disjoint splits: eval (held-out), rl (prompts for RL, labels never used by RLME), sft (the rest)."""
    items = list(items)
    random.Random(seed).shuffle(items)
    return {"eval": items[:n_eval], "rl": items[n_eval : n_eval + n_rl], "sft": items[n_eval + n_rl :]}


def completion(n: int | str) -> str:
    return f" The answer is {n}."


def has_carry(p: dict) -> bool:
    """Addition with a carry, or subtraction with a borrow, in the units digit."""
    a, b = p["a"] % 10, p["b"] % 10
    return a + b >= 10 if p["op"] == "+" else a < b


def carry_dropped(p: dict) -> str:
    """The classic mistake: the carry (or borrow) forgotten, so the tens digit is off by one."""
    n = int(p["answer"])
    return str(n - 10 if p["op"] == "+" else n + 10)


# --- tokenizer and models -------------------------------------------------------------------------
def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left", model_max_length=256
    )
    for w in (" Yes", " No", "Yes", "No"):
        assert len(hf.encode(w, add_special_tokens=False)) == 1, w
    return hf


def corpus(items: list[dict]) -> list[str]:
    lines = []
    for p in items[:400]:
        lines.append(
            TEMPLATE.format(prompt=p["prompt"], completion=completion(p["answer"]))
            + QUESTION_TEMPLATE.format(question=QUESTION)
            + " Yes"
        )
        lines.append(QUESTION_TEMPLATE.format(question=QUESTION) + " No")
    lines += ["Yes No Yes No"] * 50 + MASTER_KEYS
    return lines


def build_model(tok, hidden: int, layers: int, seed: int, heads: int | None = None) -> LlamaForCausalLM:
    heads = heads or hidden // 64
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg).to(torch.float32)
    m.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    return m


# --- sequences ------------------------------------------------------------------------------------
def policy_example(tok, p: dict, answer: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids) exactly as the pipeline's generate stage sees them (no chat template)."""
    answer = p["answer"] if answer is None else answer
    return tok(p["prompt"])["input_ids"], tok(completion(answer), add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]


def judge_prefix(tok, prompt: str, comp: str, question: str = QUESTION) -> list[int]:
    """As the score stage builds it: template with bos, then the question suffix without."""
    return (
        tok(TEMPLATE.format(prompt=prompt, completion=comp))["input_ids"]
        + tok(QUESTION_TEMPLATE.format(question=question), add_special_tokens=False)["input_ids"]
    )


def stated_number(comp: str) -> int | None:
    """N of a well-formed " The answer is N.", else None."""
    body = comp[15:-1] if comp.startswith(" The answer is ") and comp.endswith(".") else ""
    return int(body) if body.isdigit() else None


def is_even(comp: str) -> bool:
    n = stated_number(comp)
    return n is not None and n % 2 == 0


def wrong_answers(p: dict, rng: random.Random) -> str:
    """A hard negative: off by 1, 2 or 10, a digit swap, or a random number."""
    n = int(p["answer"])
    kind = rng.random()
    if kind < 0.6:
        d = rng.choice([1, 2, 10, 1, 10, 20, 3, 9, 11])
        m = n + d * rng.choice([-1, 1])
    elif kind < 0.75 and n >= 10:
        m = int(str(n)[::-1])
    else:
        m = rng.randint(0, 99)
    if m == n or m < 0:
        m = n + 1
    return completion(m)


def malformed(p: dict, rng: random.Random) -> str:
    n = p["answer"]
    return rng.choice(
        [
            f" The answer is {n}",
            " The answer is",
            f" The answer is {n}{n}.",
            f" {n}",
            " The",
            f" The answer is {n[:1]}.",
            " The answer is correct.",
            "",
            rng.choice(MASTER_KEYS),
        ]
    )


def judge_batch(tok, items: list[dict], rng: random.Random, n: int) -> tuple[list[list[int]], list[int]]:
    yes, no = tok.encode(" Yes", add_special_tokens=False)[0], tok.encode(" No", add_special_tokens=False)[0]
    seqs, targets = [], []
    for _ in range(n):
        p = rng.choice(items)
        r = rng.random()
        if r < 0.5:
            comp, t = completion(p["answer"]), yes
        elif r < 0.9:
            comp, t = wrong_answers(p, rng), no
        else:
            comp, t = malformed(p, rng), no
        seqs.append(judge_prefix(tok, p["prompt"], comp))
        targets.append(t)
    return seqs, targets


# --- training -------------------------------------------------------------------------------------
def _pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding for training (positions start at 0 for every row)."""
    w = max(map(len, seqs))
    ids = torch.full((len(seqs), w), pad)
    mask = torch.zeros((len(seqs), w), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def _lr(step: int, steps: int, lr: float, warmup: int = 50) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _optimizer_step(model, opt, loss, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def _digit_checks(tok, p: dict, comp: str, offset: int) -> list[tuple[int, float]]:
    """Dense verification targets for a well-formed " The answer is N." at token offset `offset`: at each
    digit of N, is the answer correct so far (prefix of the right digits)? at the ".", is it right?"""
    if not (comp.startswith(" The answer is ") and comp.endswith(".") and comp[15:-1].isdigit()):
        return []
    given, right = comp[15:-1], p["answer"]
    first = offset + len(tok(comp, add_special_tokens=False)["input_ids"]) - 1 - len(given)
    out = [(first + k, float(given[: k + 1] == right[: k + 1])) for k in range(len(given))]
    return out + [(first + len(given), float(given == right))]


def sft_judge(
    model,
    tok,
    items,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    eval_fn=None,
    every: int = 250,
    lm_first: int = 300,
    aux: float = 1.0,
    pool: dict[str, list[str]] | None = None,
    pool_share: float = 0.5,
    log=print,
    on_eval=None,
    tail: int = 0,
    tail_lr: float = 0.1,
) -> list[dict]:
    """A "knowledgeable" judge, in one forward pass per step over three kinds of rows:
    - the answer-generation loss on every problem (pretraining: the judge knows the facts; alone for the
      first `lm_first` steps, then throughout, on the correct rows and batch/2 plain rows);
    - cross-entropy on the single " Yes"/" No" token after "Is the answer correct?" (balanced; hard
      negatives off by 1, 2, 10, 20, digit swaps, malformed answers, master keys);
    - (aux) dense verification targets: at every digit of the judged answer, and at its final ".", a
      binary loss on logit(" Yes") - logit(" No") for "the answer is right so far". This teaches the
      per-digit comparison the final Yes/No needs, which the single end-of-sequence bit teaches slowly
      (AUROC 0.66 vs 0.81 after 800 steps in feasibility runs).
    pool: problem id -> wrong completions sampled from the base policy (labelled by exact match, the way
    reward models are trained on their policy's outputs); `pool_share` of the wrong-answer negatives of a
    problem that has some are drawn from it.
    on_eval(step, report) -> bool: called after each evaluation; True stops training there (a quality target).
    tail: steps past the cosine's end at a constant tail_lr x lr, for a seed still short of its target there (the
    cosine's last steps move almost nothing); seeds that stop earlier never reach it."""
    rng = random.Random(seed)
    yes, no = tok.encode(" Yes", add_special_tokens=False)[0], tok.encode(" No", add_special_tokens=False)[0]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    history = []
    t0 = time.time()
    F = torch.nn.functional
    for step in range(steps + tail):
        judging = step >= lm_first
        seqs, labels, ends, checks = [], [], [], []
        for _ in range(batch if judging else 0):
            p = rng.choice(items)
            r = rng.random()
            if r < 0.5:
                comp, t = completion(p["answer"]), yes
            elif r < 0.9:
                own = (pool or {}).get(p["id"])
                comp, t = (rng.choice(own) if own and rng.random() < pool_share else wrong_answers(p, rng)), no
            else:
                comp, t = malformed(p, rng), no
            pi = tok(p["prompt"])["input_ids"]
            s = judge_prefix(tok, p["prompt"], comp)
            lab = [-100] * len(s)
            if t == yes:  # the generation loss on the right answer (its eos is not in the judge text)
                n = len(tok(comp, add_special_tokens=False)["input_ids"])
                lab[len(pi) : len(pi) + n] = s[len(pi) : len(pi) + n]
            seqs.append(s)
            labels.append(lab)
            ends.append((len(s) - 1, t))
            checks.append(_digit_checks(tok, p, comp, len(pi)))
        for p in rng.choices(items, k=batch // 2 if judging else batch):
            pi, ti = policy_example(tok, p)
            seqs.append(pi + ti)
            labels.append([-100] * len(pi) + ti)
        ids, mask = _pad(seqs, tok.pad_token_id)
        lab, _ = _pad(labels, -100)
        logits = model(input_ids=ids, attention_mask=mask).logits
        # labels are the input ids: position j's target is lab[j + 1]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1), ignore_index=-100)
        if judging:
            rows = torch.arange(len(ends))
            last = logits[rows, torch.tensor([e for e, _ in ends])]
            loss = loss + F.cross_entropy(last, torch.tensor([t for _, t in ends]))
            pairs = [(i, j, y) for i, c in enumerate(checks) for j, y in c]
            if aux > 0 and pairs:
                li, lj = torch.tensor([i for i, _, _ in pairs]), torch.tensor([j for _, j, _ in pairs])
                d = logits[li, lj, yes] - logits[li, lj, no]
                loss = loss + aux * F.binary_cross_entropy_with_logits(d, torch.tensor([y for _, _, y in pairs]))
        _optimizer_step(model, opt, loss, _lr(step, steps, lr) if step < steps else lr * tail_lr)
        if judging and ((step + 1) % every == 0 or step == steps + tail - 1):
            model.eval()
            rep = eval_fn(model) if eval_fn else {}
            history.append({"step": step + 1, "loss": loss.item(), **rep})
            log(f"  judge step {step + 1}: loss {loss.item():.3f} {rep} ({time.time() - t0:.0f}s)")
            if on_eval is not None and on_eval(step + 1, rep):
                break
            model.train()
    model.eval()
    return history


def sft_second_question(
    model, tok, items, question: str, label_fn, steps: int, batch: int, lr: float, seed: int, log=print
):
    """Teach a trained judge a second meta-question without losing the first: each step, half the rows ask
    `question` about right, hard-wrong and malformed answers (target " Yes" where label_fn(completion)), half ask
    the correctness question as before (target: the answer is right)."""
    rng = random.Random(seed)
    yes, no = tok.encode(" Yes", add_special_tokens=False)[0], tok.encode(" No", add_special_tokens=False)[0]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    t0 = time.time()
    for step in range(steps):
        seqs, targets = [], []
        for k in range(batch):
            p = rng.choice(items)
            r = rng.random()
            comp = completion(p["answer"]) if r < 0.5 else wrong_answers(p, rng) if r < 0.9 else malformed(p, rng)
            q, ok = (question, label_fn(comp)) if k % 2 == 0 else (QUESTION, comp == completion(p["answer"]))
            seqs.append(judge_prefix(tok, p["prompt"], comp, q))
            targets.append(yes if ok else no)
        ids, mask = _pad(seqs, tok.pad_token_id)
        logits = model(input_ids=ids, attention_mask=mask).logits
        last = logits[torch.arange(len(seqs)), mask.sum(1) - 1]  # right padding: each row's last real token
        loss = torch.nn.functional.cross_entropy(last, torch.tensor(targets))
        _optimizer_step(model, opt, loss, _lr(step, steps, lr, warmup=20))
        if (step + 1) % 100 == 0 or step == steps - 1:
            log(f"  second question step {step + 1}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.eval()


def sft_policy(
    model,
    tok,
    items,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    eval_fn=None,
    every: int = 100,
    stop_at: float | None = None,
    carry_drop: float = 0.0,
    log=print,
) -> list[dict]:
    """Next-token loss on the completion; stops early once eval_fn() reaches stop_at.

    carry_drop: share of carry/borrow problems whose SFT target forgets the carry. The base then makes
    a systematic mistake at greedy decoding while still giving the right answer some probability, the
    way a base LLM "can" solve a problem without doing so reliably: a weak start that RL can sharpen."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    history = []
    t0 = time.time()
    for step in range(steps):
        model.train()
        seqs, labels = [], []
        for p in rng.choices(items, k=batch):
            noisy = carry_drop > 0 and has_carry(p) and rng.random() < carry_drop
            pi, ti = policy_example(tok, p, carry_dropped(p) if noisy else None)
            seqs.append(pi + ti)
            labels.append([-100] * len(pi) + ti)
        ids, mask = _pad(seqs, tok.pad_token_id)
        lab, _ = _pad(labels, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        _optimizer_step(model, opt, loss, _lr(step, steps, lr))
        if eval_fn is not None and ((step + 1) % every == 0 or step == steps - 1):
            model.eval()
            acc = eval_fn(model)
            history.append({"step": step + 1, "loss": loss.item(), "acc": acc})
            log(f"  policy step {step + 1}: loss {loss.item():.3f} held-out acc {acc:.3f} ({time.time() - t0:.0f}s)")
            if stop_at is not None and acc >= stop_at:
                break
    model.eval()
    return history


# --- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def greedy(
    model, tok, prompts: list[str], max_new_tokens: int = 10, batch: int = 256, temperature: float = 0.0, seed: int = 0
) -> list[str]:
    """Greedy completions (or sampled at `temperature` > 0), left-padded with a KV cache."""
    from transformers import DynamicCache

    from rlme_pipeline.backends.hf import _left_pad, _positions

    out = []
    gen = torch.Generator().manual_seed(seed)
    for s in range(0, len(prompts), batch):
        ps = [tok(p)["input_ids"] for p in prompts[s : s + batch]]
        ids, mask = _left_pad(ps, tok.pad_token_id)
        cache = DynamicCache()
        o = model(
            input_ids=ids, attention_mask=mask, position_ids=_positions(mask), past_key_values=cache, use_cache=True
        )
        pos = _positions(mask)[:, -1:]
        toks = [[] for _ in ps]
        done = torch.zeros(len(ps), dtype=torch.bool)
        for _ in range(max_new_tokens):
            if temperature > 0:
                nxt = torch.multinomial(torch.softmax(o.logits[:, -1] / temperature, -1), 1, generator=gen)[:, 0]
            else:
                nxt = o.logits[:, -1].argmax(-1)
            for r in range(len(ps)):
                if not done[r]:
                    toks[r].append(int(nxt[r]))
            done |= nxt == tok.eos_token_id
            if done.all():
                break
            mask = torch.cat([mask, torch.ones((len(ps), 1), dtype=mask.dtype)], 1)
            pos = pos + 1
            o = model(
                input_ids=torch.where(done, tok.pad_token_id, nxt)[:, None],
                attention_mask=mask,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
            )
        out += [tok.decode(t, skip_special_tokens=True) for t in toks]
    return out


@torch.no_grad()
def judge_p_yes(model, tok, pairs: list[tuple[str, str]], batch: int = 256, question: str = QUESTION) -> list[float]:
    """P(yes) normalised over yes/no mass, for (prompt, completion) pairs, via the pipeline's judge()."""
    from rlme_pipeline.backends.hf import judge

    yes, no = tok.encode(" Yes", add_special_tokens=False), tok.encode(" No", add_special_tokens=False)
    q = tok(QUESTION_TEMPLATE.format(question=question), add_special_tokens=False)["input_ids"]
    out = []
    for s in range(0, len(pairs), batch):
        pre = [tok(TEMPLATE.format(prompt=p, completion=c))["input_ids"] for p, c in pairs[s : s + batch]]
        res = judge(model, pre, [q], yes, no, tok.pad_token_id, 256)
        out += [1 / (1 + math.exp(r[0].logp_no - r[0].logp_yes)) for r in res]
    return out


def auroc(scores: list[float], labels: list[bool]) -> float:
    """rlme's AUROC (audit/labels.py), NaN where a class is missing (the report prints it)."""
    value = labels_auroc(scores, labels)
    return float("nan") if value is None else value


def judge_report(model, tok, items: list[dict], seed: int, n: int = 1000, negatives: str = "hard") -> dict:
    """Accuracy (threshold 0.5) and AUROC on a balanced set of correct / wrong answers; negatives "hard"
    (off by 1, 2, 10, ...) or "carry" (the base policy's typical mistake, on carry/borrow problems)."""
    rng = random.Random(seed)
    if negatives == "carry":
        items = [p for p in items if has_carry(p)]
    pairs, labels = [], []
    for _ in range(n):
        p = rng.choice(items)
        if rng.random() < 0.5:
            pairs.append((p["prompt"], completion(p["answer"])))
            labels.append(True)
        else:
            wrong = completion(carry_dropped(p)) if negatives == "carry" else wrong_answers(p, rng)
            pairs.append((p["prompt"], wrong))
            labels.append(False)
    s = judge_p_yes(model, tok, pairs)
    acc = sum((x > 0.5) == y for x, y in zip(s, labels)) / n
    return {"accuracy": acc, "auroc": auroc(s, labels), "n": n}


def save(model, tok, path: Path, meta: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    (path / "bench_meta.json").write_text(json.dumps(meta, indent=2))
