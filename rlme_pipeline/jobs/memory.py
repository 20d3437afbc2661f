"""GPU memory a training process will need, per stage, estimated before any model loads.

An out-of-memory error names its knobs after the fact (oom.py); this says, before anything starts, what
each stage will hold and which setting moves it. It is arithmetic on the models' shapes (config.json: the
parameter count of a model built on the meta device, which allocates nothing) and on the config:

    held       models kept between stages (the pool holds every model the config names: weights_at.py)
    generate   + KV cache of generation.batch_size sequences, one layer's prefill, the last logits
    score      + the same for scoring.batch_size rollouts with every question packed behind the prefix
    update     + gradients, the activations of optimizer.micro_batch_size sequences (gradient
               checkpointing keeps each layer's input only), the LM head's chunks

The activation terms are estimates (docs/gpu.md: 2·L·B·T·(8h + 3i) bytes in bf16), the weights, AdamW
state and gradients are exact; allocator fragmentation and the CUDA context (~0.5 GiB) come on top.
`benchmarks/gpu.py` measures the real peak.

A vLLM engine colocated with the trainer (generation.backend: vllm) is given the rest of the device
(`engine_share`): vLLM's own default, 0.9 of the device, fails beside a trainer that holds anything.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

from rlme_pipeline.config import FROZEN_SELF, LIVE_SELF, Config
from rlme_pipeline.models.building import BUILDING
from rlme_pipeline.models.loading import master_dtype
from rlme_pipeline.models.weights_at import hf_reads_policy

GiB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HELD, STAGES = "held", ("generate", "score", "update")
KNOBS = (
    "generation.batch_size and scoring.batch_size (KV cache), optimizer.micro_batch_size and "
    "optimizer.gradient_checkpointing: true (activations), policy.dtype: bfloat16 (half activations), "
    "policy.lora (no gradients or AdamW state for the base)"
)


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model: its config.json, and the parameter count that implies."""

    params: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_dim: int  # key/value width per token and layer: num_key_value_heads x head_dim
    lora_params: int = 0  # parameters of the policy's LoRA adapter (policy.lora), 0 without

    def activation_bytes(self, dtype: str, tokens: int) -> int:
        """One decoder layer's saved activations for `tokens` tokens (docs/gpu.md's 8h + 3i per token)."""
        return BYTES[dtype] * tokens * (8 * self.hidden + 3 * self.intermediate)

    def kv_bytes(self, dtype: str, tokens: int) -> int:
        return 2 * self.layers * self.kv_dim * BYTES[dtype] * tokens


@dataclass(frozen=True)
class Part:
    device: str
    stage: str  # HELD or one of STAGES
    what: str
    bytes: int


def shape_of(path: str, lora=None) -> Shape:
    """The Shape of a model directory (or cached hub id) from its config.json alone: the model is built on
    the meta device, so the count is exact for any architecture and nothing is allocated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with BUILDING, torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    shape = Shape(
        params=sum(p.numel() for p in model.parameters()),
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        vocab=text.vocab_size,
        kv_dim=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
    )
    return replace(shape, lora_params=lora_params(model, lora)) if lora is not None else shape


def lora_params(model, lora) -> int:
    """r·(in + out) for each Linear whose name ends in one of lora.target_modules (docs/gpu.md, LoRA)."""
    import torch

    return sum(
        lora.r * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora.target_modules
    )


def device_name(device: str) -> str:
    """'cuda' and 'cuda:0' are one device."""
    return "cuda:0" if device == "cuda" else device


def estimate(cfg: Config, shapes: dict[str, Shape], prompt_tokens: int, question_tokens: int) -> list[Part]:
    """Every part of the memory, by device and stage. `shapes`: by model reference as the config writes
    it (cfg.policy.model, each evaluator's model); `prompt_tokens`: the longest prompt as the policy reads
    it; `question_tokens`: every question of one rollout as the evaluators read them (they are packed into
    one row behind the rollout)."""
    return [
        *_policy_held(cfg, shapes[cfg.policy.model]),
        *_evaluators_held(cfg, shapes),
        *_generate(cfg, shapes[cfg.policy.model], prompt_tokens),
        *_score(cfg, shapes, prompt_tokens + cfg.generation.max_new_tokens + question_tokens),
        *_update(cfg, shapes[cfg.policy.model], prompt_tokens + cfg.generation.max_new_tokens),
    ]


def _policy_held(cfg: Config, s: Shape) -> list[Part]:
    p, dev = cfg.policy, device_name(cfg.policy.device)
    if p.lora is not None:  # the base is frozen in its dtype; only the fp32 adapter has AdamW state
        return [
            Part(dev, HELD, f"policy base weights ({p.dtype}, frozen: policy.lora)", s.params * BYTES[p.dtype]),
            Part(dev, HELD, "LoRA adapter + AdamW state (float32)", 12 * s.lora_params),
        ]
    m = master_dtype(p.dtype)
    parts = [
        Part(dev, HELD, f"policy weights ({m})", s.params * BYTES[m]),
        Part(dev, HELD, f"AdamW state ({m})", 2 * s.params * BYTES[m]),
    ]
    if m != p.dtype and hf_reads_policy(cfg):  # with vLLM generating the engine holds that copy (engine_share)
        parts.append(Part(dev, HELD, f"{p.dtype} copy that generates and judges", s.params * BYTES[p.dtype]))
    if cfg.algorithm.beta > 0 or any(ev.model == FROZEN_SELF for ev in cfg.evaluators):
        parts.append(Part(dev, HELD, f"initial policy ({p.dtype}: frozen self / KL reference)", s.params * BYTES[p.dtype]))  # fmt: skip
    return parts


def _evaluators_held(cfg: Config, shapes: dict[str, Shape]) -> list[Part]:
    """Frozen other evaluators, once per (model, dtype, device): two evaluators on one model share it."""
    seen, parts = set(), []
    for ev in cfg.evaluators:
        key = (ev.model, ev.dtype, device_name(ev.device))
        if ev.model in (LIVE_SELF, FROZEN_SELF) or key in seen:
            continue
        seen.add(key)
        parts.append(Part(key[2], HELD, f"evaluator {ev.name} ({ev.dtype})", shapes[ev.model].params * BYTES[ev.dtype]))
    return parts


def _generate(cfg: Config, s: Shape, prompt_tokens: int) -> list[Part]:
    g, dtype, dev = cfg.generation, cfg.policy.dtype, device_name(cfg.policy.device)
    if g.backend != "hf":
        return []  # a vLLM engine's memory is its share of the device (engine_share), apart from the trainer's
    tokens = g.batch_size * (prompt_tokens + g.max_new_tokens)
    return [
        Part(
            dev,
            "generate",
            f"KV cache of generation.batch_size {g.batch_size} x {prompt_tokens + g.max_new_tokens} tokens",
            s.kv_bytes(dtype, tokens),
        ),  # fmt: skip
        Part(
            dev, "generate", "one layer's prefill activations", s.activation_bytes(dtype, g.batch_size * prompt_tokens)
        ),  # fmt: skip
        Part(dev, "generate", "next-token logits (float32)", 4 * g.batch_size * s.vocab),
    ]


def _score(cfg: Config, shapes: dict[str, Shape], row_tokens: int) -> list[Part]:
    """The largest evaluator on each device: the evaluators judge one after another."""
    if cfg.scoring.backend != "hf":
        return []
    b, k, most = cfg.scoring.batch_size, len(cfg.questions), {}
    for ev in cfg.evaluators:
        self_judge = ev.model in (LIVE_SELF, FROZEN_SELF)
        s = shapes[cfg.policy.model] if self_judge else shapes[ev.model]
        dtype, dev = (cfg.policy.dtype, cfg.policy.device) if self_judge else (ev.dtype, ev.device)
        parts = [
            Part(
                device_name(dev),
                "score",
                f"KV cache of scoring.batch_size {b} x {row_tokens} tokens ({ev.name})",
                s.kv_bytes(dtype, b * row_tokens),
            ),  # fmt: skip
            Part(device_name(dev), "score", "one layer's activations", s.activation_bytes(dtype, b * row_tokens)),
            Part(device_name(dev), "score", f"answer log-probs of {k} questions (float32)", 2 * 4 * b * k * s.vocab),
        ]
        if sum(p.bytes for p in parts) > sum(p.bytes for p in most.get(parts[0].device, [])):
            most[parts[0].device] = parts
    return [p for parts in most.values() for p in parts]


def _update(cfg: Config, s: Shape, seq_tokens: int) -> list[Part]:
    o, p, dev = cfg.optimizer, cfg.policy, device_name(cfg.policy.device)
    if cfg.distributed.processes > 1:
        return []  # sharded across processes (update_fsdp.py): each rank holds 1/N
    m = master_dtype(p.dtype)
    grads = 4 * s.lora_params if p.lora is not None else s.params * BYTES[m]
    tokens = o.micro_batch_size * seq_tokens
    if o.gradient_checkpointing:  # each layer's input kept, one layer's activations at a time
        acts = BYTES[p.dtype] * s.layers * tokens * s.hidden + s.activation_bytes(p.dtype, tokens)
    else:
        acts = s.layers * s.activation_bytes(p.dtype, tokens)
    ckpt = "true" if o.gradient_checkpointing else "false"
    return [
        Part(dev, "update", "gradients" + (" (adapter)" if p.lora is not None else f" ({m})"), grads),
        Part(
            dev,
            "update",
            f"activations of optimizer.micro_batch_size {o.micro_batch_size} x {seq_tokens} tokens, optimizer.gradient_checkpointing {ckpt}",
            acts,
        ),  # fmt: skip
        Part(
            dev,
            "update",
            f"LM head chunks of optimizer.logprob_chunk_tokens {o.logprob_chunk_tokens}",
            3 * 4 * o.logprob_chunk_tokens * s.vocab,
        ),  # fmt: skip
    ]


def peaks(parts: list[Part]) -> dict[str, tuple[int, str]]:
    """Per device: (bytes at the busiest stage, that stage): what is held plus that stage's own."""
    held, stage = defaultdict(int), defaultdict(lambda: defaultdict(int))
    for p in parts:
        if p.stage == HELD:
            held[p.device] += p.bytes
        else:
            stage[p.device][p.stage] += p.bytes
    out = {}
    for dev in sorted(set(held) | set(stage)):
        name, extra = max(stage[dev].items(), key=lambda kv: kv[1], default=(HELD, 0))
        out[dev] = (held[dev] + extra, name)
    return out


def size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def report(parts: list[Part], totals: dict[str, int] | None = None) -> list[str]:
    """The estimate as lines, one per CUDA device and stage, naming the knob behind each term."""
    totals, lines = totals or {}, []
    for dev, (peak, at) in peaks(parts).items():
        if not dev.startswith("cuda"):
            continue
        mine = [p for p in parts if p.device == dev]
        of = f" of {size(totals[dev])}" if dev in totals else ""
        lines.append(f"GPU memory estimate for {dev} (before anything loads): peak {size(peak)} at {at}{of}")
        for stage in (HELD, *STAGES):
            terms = [p for p in mine if p.stage == stage]
            if terms:
                total = sum(p.bytes for p in terms)
                sign = "" if stage == HELD else "+"
                detail = "; ".join(f"{p.what} {size(p.bytes)}" for p in terms)
                lines.append(f"  {stage:8s} {sign}{size(total)}: {detail}")
        over = f"exceeds the device by {size(peak - totals[dev])}; " if dev in totals and peak > totals[dev] else ""
        lines.append(f"  {over}knobs: {KNOBS} (docs/gpu.md)")
    return lines


def float32_cost(cfg: Config, shapes: dict[str, Shape], prompt_tokens: int, question_tokens: int) -> str | None:
    """One line on what a float32 policy on a GPU costs against bfloat16 (the default stays float32: a
    default that followed the device would change the hash and the numbers of existing runs)."""
    if cfg.policy.dtype != "float32" or not cfg.policy.device.startswith("cuda"):
        return None
    d = cfg.model_dump(mode="json")
    d["policy"]["dtype"] = "bfloat16"
    half = type(cfg).model_validate(d)
    dev = device_name(cfg.policy.device)
    now = peaks(estimate(cfg, shapes, prompt_tokens, question_tokens))[dev][0]
    then = peaks(estimate(half, shapes, prompt_tokens, question_tokens))[dev][0]
    return (
        f"policy.dtype: float32 on {dev} runs generation, scoring and the update in float32 (peak {size(now)}, "
        f"no bf16 tensor cores); bfloat16 keeps float32 master weights and AdamW state, adds a 2-byte copy and "
        f"halves activations and KV cache (peak {size(then)}): set policy.dtype: bfloat16 for a new run "
        "(it changes the results, so not on an existing run id)"
    )


# --- a vLLM engine beside the trainer ---------------------------------------------------------------------
ENGINE_RESERVE = 2 * GiB  # CUDA context, allocator fragmentation, what a sleeping engine keeps (CUDA graphs)
ENGINE_MIN_EXTRA = GiB  # beyond its weights: the activations of vLLM's profile run and a KV cache worth having


def engine_share(
    total: int, held: int, busiest: int, engine_weights: int, *, sleeps: bool, reserve: int = ENGINE_RESERVE
) -> float:
    """vLLM's gpu_memory_utilization for an engine on the trainer's GPU: the share of the device it may
    take (vLLM refuses to start when less than that is free, then fills it with weights, activations and
    KV cache). `held`: what the trainer keeps between stages; `busiest`: the most its score or update stage
    adds. A sleeping engine (vLLM sleep mode, level 2) has given its memory back while the trainer scores
    and updates, so it need only fit beside `held`; an engine that stays awake must leave `busiest` too.
    Floored to 0.01. ValueError, one line, when the rest cannot hold the engine's weights and 1 GiB."""
    room = total - held - reserve - (0 if sleeps else busiest)
    if room < engine_weights + ENGINE_MIN_EXTRA:
        awake = "" if sleeps else f" and its busiest stage {size(busiest)} (the engine does not sleep)"
        raise ValueError(
            f"vllm.gpu_memory_utilization: the trainer holds {size(held)}{awake} of {size(total)}, {size(reserve)} "
            f"reserved, leaving {size(max(room, 0))} for the vLLM engine, which needs its {size(engine_weights)} "
            f"of weights plus {size(ENGINE_MIN_EXTRA)}; free memory ({KNOBS}) or set generation.backend: openai "
            "(a server on its own GPU)"
        )
    return (100 * room // total) / 100


def beside_engine(parts: list[Part], device: str) -> tuple[int, int]:
    """(held, busiest) on `device`: what the trainer holds between stages, and the most that its score or
    update stage adds (generation is the engine's)."""
    held = sum(p.bytes for p in parts if p.device == device and p.stage == HELD)
    busiest = max(sum(p.bytes for p in parts if p.device == device and p.stage == st) for st in ("score", "update"))
    return held, busiest


def colocated_share(cfg: Config, prompts, total: int | None = None) -> float:
    """engine_share for the policy's engine under this config: the estimate above on the policy's device
    (of `total` bytes; default: that CUDA device's size)."""
    from rlme_pipeline.models.loading import load_tokenizer, resolve_ref

    dev = device_name(cfg.policy.device)
    if total is None:
        import torch

        total = torch.cuda.get_device_properties(torch.device(dev)).total_memory
    try:
        tok = load_tokenizer(resolve_ref(cfg.resolve(cfg.policy.model)))
        shapes, prompt_tokens, question_tokens = inputs(cfg, prompts, tok)
    except Exception as e:  # noqa: BLE001 - a hub id not cached here: the user says the share instead
        raise ValueError(
            f"vllm.gpu_memory_utilization: cannot size the vLLM engine beside the trainer ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); set it (a share of the GPU, e.g. 0.4)"
        ) from None
    held, busiest = beside_engine(estimate(cfg, shapes, prompt_tokens, question_tokens), dev)
    weights = shapes[cfg.policy.model].params * BYTES[cfg.policy.dtype]
    sleeps = cfg.vllm.sleep and cfg.policy.lora is None  # session.Backends: no sleep with LoRA adapters
    return engine_share(total, held, busiest, weights, sleeps=sleeps)


def inputs(cfg: Config, prompts, policy_tok) -> tuple[dict[str, Shape], int, int]:
    """What `estimate` needs: each model's Shape (its config.json), the longest prompt as the policy reads
    it, and every question of one rollout as the evaluators read them."""
    from rlme_pipeline.models.loading import resolve_ref
    from rlme_pipeline.stages.generate import chat_prompt_ids

    models = [cfg.policy, *(ev for ev in cfg.evaluators if ev.model not in (LIVE_SELF, FROZEN_SELF))]
    shapes = {m.model: shape_of(resolve_ref(cfg.resolve(m.model)), getattr(m, "lora", None)) for m in models}
    longest = max(prompts["prompt"].to_list(), key=len)
    prompt_tokens = len(chat_prompt_ids(policy_tok, longest, cfg.data.system_prompt))
    sc = cfg.scoring
    count = lambda text: len(policy_tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    question_tokens = count(sc.template.format(prompt="", completion=""))
    question_tokens += sum(count(sc.question_template.format(question=q.text)) for q in cfg.questions)
    return shapes, prompt_tokens, question_tokens
