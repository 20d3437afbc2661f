"""What an evaluator reads: the token ids of each rollout's shared prefix and of its K question suffixes.

Built here, once, for every backend (hf, vllm, openai all receive these ids), so a judgement is the same
number whichever backend computes it. Two forms, chosen per evaluator by `scoring.chat_template`:

raw   (off) `tok(template) + tok(question_template)` with no special tokens in the second: the text rlme
      has always built. Two tokenisations joined, exactly as before this module existed.
chat  (on; auto where the evaluator's tokenizer has a chat template) one user message holding
      template + question_template, then the opened assistant turn (add_generation_prompt=True): an instruct
      judge answers inside its template, so that is where its P(yes) means something. The answer token is
      read right after the assistant header.

In chat form every (rollout, question) text is tokenised whole, and the part shared by the K questions
is the longest common token prefix of those K tokenisations that ends within the rollout's text. So
prefix + suffix is always exactly the whole text's tokenisation, also where a byte-level BPE would merge
across the seam (a completion ending in "\\n" before a question starting "\\n": "\\n\\n" is one token at
the end of a string but two before a letter). Such a rollout gets a shorter prefix and longer suffixes
than its batch; the scorer groups rollouts by their suffixes.

A run created before `scoring.chat_template` existed reads "auto" as "off": its evaluators carry
`predates_chat_template` (judges.evaluators_at), so resuming or re-scoring it repeats its scores.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlme_pipeline.config import ConfigError, ScoringConfig

FIELD = "scoring.chat_template"


def uses_chat(sc: ScoringConfig, tok, evaluator: str, predates_chat_template: bool = False) -> bool:
    """Whether this evaluator reads the chat form (see the module docstring)."""
    has = bool(getattr(tok, "chat_template", None))
    if sc.chat_template == "on" and not has:
        raise ConfigError(
            f"{FIELD}: on, but evaluator {evaluator!r} has no chat template in its tokenizer; set "
            f"{FIELD}: auto (use one where there is one) or off"
        )
    chat = has and not predates_chat_template if sc.chat_template == "auto" else sc.chat_template == "on"
    if chat:
        _no_markers(sc, tok, evaluator)
    return chat


def _no_markers(sc: ScoringConfig, tok, evaluator: str) -> None:
    """A template that already holds the chat format's markers would be wrapped twice: the judge would read
    a chat inside its user turn, and its P(yes) would no longer be the assistant's first token."""
    found = [t for t in tok.all_special_tokens if t in sc.template + sc.question_template]
    if found:
        raise ConfigError(
            f"{FIELD}: evaluator {evaluator!r} reads its chat template, and scoring.template/question_template "
            f"already hold its markers ({', '.join(found)}); write the templates without them (rlme wraps them), "
            f"or set {FIELD}: off to keep your hand-written chat text"
        )


@dataclass(frozen=True)
class Encoded:
    """prefixes[i]: rollout i's shared ids; suffixes[i][k]: question k's ids after it (prefix + suffix is
    the whole text). In raw form every rollout shares the same suffix lists."""

    prefixes: list[list[int]]
    suffixes: list[list[list[int]]]


def encode(tok, texts: list[dict], questions: list[str], sc: ScoringConfig, chat: bool) -> Encoded:
    """The ids of every (rollout, question): `texts` rows have prompt and completion; `questions` are the
    questions' texts."""
    bodies = [sc.template.format(prompt=r["prompt"], completion=r["completion"]) for r in texts]
    asked = [sc.question_template.format(question=q) for q in questions]
    if not chat:
        q_ids = [tok(a, add_special_tokens=False)["input_ids"] for a in asked]
        return Encoded([tok(b)["input_ids"] for b in bodies], [q_ids] * len(bodies))
    prefixes, suffixes = [], []
    for body in bodies:
        head, wholes = _render(tok, body, asked)
        p, s = _split(tok, head, wholes)
        prefixes.append(p)
        suffixes.append(s)
    return Encoded(prefixes, suffixes)


def _user_turn(tok, content: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def _render(tok, body: str, asked: list[str]) -> tuple[str, list[str]]:
    """(the rendered text up to the end of the rollout's body, each question's whole rendered text)."""
    wholes = [_user_turn(tok, body + a) for a in asked]
    at = wholes[0].find(body + asked[0])
    if at < 0 or any(not w.startswith(wholes[0][: at + len(body)]) for w in wholes):
        raise ConfigError(
            f"{FIELD}: the evaluator's chat template rewrites the message text (e.g. trims it), so the "
            f"questions cannot share the rollout's prefix; set {FIELD}: off, or templates without leading/"
            "trailing whitespace"
        )
    return wholes[0][: at + len(body)], wholes


def _split(tok, head: str, wholes: list[str]) -> tuple[list[int], list[list[int]]]:
    """Tokenise each whole text; the shared ids are their longest common prefix within `head`."""
    full = tok([head, *wholes], add_special_tokens=False)["input_ids"]
    n = common_prefix_length(full)
    return full[1][:n], [f[n:] for f in full[1:]]


def common_prefix_length(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs):
            return i
    return n


def answer_ids(tok, answers: list[str], where: str, after: str | None = None) -> list[int]:
    """Distinct token ids of the answer variants; each must be exactly one token for this tokenizer.

    `after`: the text the answer follows (chat form: a question's rendered suffix, which ends with the
    assistant header). The variant's id is then the token it becomes *there*: after "<|im_start|>assistant\\n"
    a reply starts "Yes", with no leading space, and whatever a tokenizer does at that seam is what the
    judge's next-token distribution is over."""
    ids = []
    for a in answers:
        toks = tok(a, add_special_tokens=False)["input_ids"] if after is None else _in_context(tok, a, after, where)
        if not toks:
            raise ConfigError(f"{where}: answer {a!r} tokenizes to nothing; give a visible answer such as ' Yes'")
        if len(toks) > 1:
            pieces = tok.convert_ids_to_tokens(toks)
            seam = " after the chat template's assistant header" if after is not None else ""
            raise ConfigError(
                f"{where}: answer {a!r} is {len(toks)} tokens {pieces}{seam} for this evaluator's tokenizer; "
                "use variants that are single tokens (e.g. ' Yes' and 'Yes')"
            )
        ids.append(toks[0])
    return sorted(set(ids))


def _in_context(tok, answer: str, after: str, where: str) -> list[int]:
    """The tokens `answer` adds after `after`; an answer that merges with the end of `after` has no id
    of its own there, so reading any id for it would read something else."""
    base = tok(after, add_special_tokens=False)["input_ids"]
    both = tok(after + answer, add_special_tokens=False)["input_ids"]
    if both[: len(base)] != base:
        raise ConfigError(
            f"{where}: answer {answer!r} merges with the end of the chat template's assistant header "
            f"({after[-12:]!r}) for this evaluator's tokenizer; use a variant that starts a new token (e.g. 'Yes')"
        )
    return both[len(base) :]


def question_tail(tok, sc: ScoringConfig, question: str) -> str:
    """What a question's chat text ends with, from the question on (the seam its answer follows)."""
    body = sc.template.format(prompt="", completion="")
    asked = sc.question_template.format(question=question)
    whole = _user_turn(tok, body + asked)
    return whole[whole.rfind(asked) :]
