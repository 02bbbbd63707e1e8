"""Text generation (library): batched prompts, KV cache, sampling filters, training-time samples.

The command `python -m nanotrain.generate` (generate.py) is a thin front end over this module.
`generate()` completes a batch of prompts at once. Prompts of different lengths are LEFT padded,
so every row's last prompt token sits in the last column and one decoding step serves the whole
batch; `attention_mask` hides the padding and the model derives positions from it, so a padded
row decodes exactly as it would alone. A KV cache (`model.new_kv_cache`) keeps the keys and
values of past tokens, so each step runs the model on one new token per row instead of the
whole sequence; `use_cache=False` recomputes everything and exists to prove the two agree.
A sequence longer than the model's context is seen through its last context tokens (nanoGPT's
crop); the empty prompt is BOS alone (unconditional sampling). Chapter: docs/10-generation-and-export.md.

Sampling: temperature 0 is greedy (argmax); otherwise logits / temperature, then `filter_logits`
keeps the top-k tokens and the smallest set holding top-p of the probability, and a seeded
torch.Generator draws from what is left, so a seed gives the same text every time.

During training, `sample_completions` completes `train.sample_prompts` at each evaluation. Under
FSDP the weights are sharded, so every rank runs the same forwards in lockstep (same prompts,
greedy, a fixed number of steps) and only rank 0 prints.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from nanotrain.errors import GenerationError
from nanotrain.model.transformer import KVCache


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits (..., V) with every token outside the top-k / top-p (nucleus) set set to -inf.

    top_k = 0 and top_p = 1.0 disable the filters. Top-p keeps the most probable tokens whose
    cumulative probability first reaches top_p (always at least one token). Pure: the input is
    not modified.
    """
    if top_k > 0 and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly better-ranked tokens
        drop_sorted = mass_before >= top_p  # the set already reached top_p without this token
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row from logits (B, V): argmax at temperature 0, else a filtered draw."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):  # NaN fails every comparison: ask for what is valid
        raise GenerationError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise GenerationError(f"top_k must be >= 0 (0 = no top-k filter), got {top_k}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {top_p}")


def check_device(name: str) -> str:
    """A --device value that exists here, or a one-line error (before any loading starts).

    "auto" follows training's rule (distributed.pick_device): the first CUDA device when one is
    visible, else the CPU.
    """
    if name == "auto":
        from nanotrain.parallel.distributed import pick_device

        return str(pick_device("auto", local_rank=0))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GenerationError(f"--device '{name}' is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerationError(f"--device {name} but no CUDA device is visible; use --device cpu")
    return name


def context_length(model: torch.nn.Module) -> int:
    return model.config.max_position_embeddings


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: list[list[int]], max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
             seed: int | None = None, pad_id: int = 0, use_cache: bool = True,
             stop_when_all_done: bool = True, cache_dtype: torch.dtype | None = None) -> list[list[int]]:
    """Complete each prompt (a list of token ids) with up to `max_new_tokens` new tokens.

    Returns the new tokens per prompt. A row stops after it produces `eos_id` (which ends its
    list); the batch stops when every row has stopped, unless `stop_when_all_done` is False (then
    exactly max_new_tokens forwards run, which keeps sharded ranks in lockstep).

    Each token is predicted from at most the model's context (model.max_position_embeddings) of
    the tokens before it, as nanoGPT crops: a longer prompt, or one that grows past the context,
    is seen through its last `context` tokens, re-positioned from 0. With the cache, once the
    window is full it slides by one token per step, which moves every position, so each such
    step re-prefills the cache from the window: one full-window forward per token, as without
    the cache.

    `model` is the plain Transformer (unwrap DDP first) or an FSDP2 module called on every rank.
    `cache_dtype` is the dtype the forward produces keys and values in, when it differs from the
    parameters' (FSDP mixed precision); default: the parameters' dtype.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise GenerationError("every prompt needs at least one token")
    vocab_size = model.config.vocab_size
    if any(not 0 <= t < vocab_size for p in prompt_ids for t in p):
        raise GenerationError(f"prompt token ids must be in [0, {vocab_size})")
    if max_new_tokens == 0:
        return [[] for _ in prompt_ids]

    context = context_length(model)
    longest = max(len(p) for p in prompt_ids)
    device = model.lm_head.weight.device
    batch = len(prompt_ids)
    ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, longest), dtype=torch.long)
    for row, prompt in enumerate(prompt_ids):  # left padding: the last column is every row's last token
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    cache = None
    if use_cache:
        capacity = min(longest + max_new_tokens, context)
        cache = (model.new_kv_cache(batch, capacity) if cache_dtype is None
                 else KVCache(model.config, batch, capacity, device=device, dtype=cache_dtype))

    def window_forward():
        """The whole window (the last `context` columns) through the model; refills the cache."""
        if cache is not None:
            cache.length = 0
        start = max(0, ids.size(1) - context)
        return model(ids[:, start:], attention_mask=mask[:, start:], kv_cache=cache)[0]

    completions: list[list[int]] = [[] for _ in range(batch)]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        logits = window_forward()  # prefill: the (cropped) prompt
        for step in range(max_new_tokens):
            next_ids = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
            next_ids = next_ids.masked_fill(finished, pad_id)  # stopped rows only carry padding
            for row in (~finished).nonzero().flatten().tolist():
                completions[row].append(int(next_ids[row]))
            if eos_id is not None:
                finished |= next_ids == eos_id
            if step == max_new_tokens - 1 or (stop_when_all_done and bool(finished.all())):
                break
            # A stopped row's padding is masked out, like the prompt's, so it cannot matter.
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)
            if cache is not None and cache.length < cache.max_len:  # the cache holds the columns from start on
                start = ids.size(1) - 1 - cache.length
                logits, _ = model(next_ids[:, None], attention_mask=mask[:, start:], kv_cache=cache)
            else:
                logits = window_forward()
    finally:
        model.train(was_training)
    return completions


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt, starting with BOS as every training document does.

    The empty prompt is BOS alone: the model samples a document from its start (unconditionally).
    """
    bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    if not text and not bos:
        raise GenerationError("empty prompt, and this tokenizer has no BOS token to start a document from; "
                              "pass some text with --prompt")
    return bos + tokenizer.encode(text) if text else bos


def complete(model, tokenizer, prompts: list[str], max_new_tokens: int, **sampling) -> list[str]:
    """Prompt texts -> prompt + completion texts (EOS not shown). `sampling` goes to generate()."""
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    completions = generate(model, prompt_ids, max_new_tokens, eos_id=tokenizer.eos_id,
                           pad_id=tokenizer.pad_id, **sampling)
    # Decoding prompt and completion together keeps the space between them (sentencepiece drops
    # a leading one), and decode skips the BOS/EOS control tokens.
    return [tokenizer.decode(p + c) for p, c in zip(prompt_ids, completions)]


def sample_completions(model: torch.nn.Module, tokenizer, train_cfg, precision=None) -> list[str]:
    """Greedy completions of `train.sample_prompts` for the log, run on EVERY rank.

    Greedy decoding and a fixed number of forwards make all ranks issue the same collectives,
    which FSDP needs; the caller prints on rank 0 only. Returns [] when there is nothing to do
    (no tokenizer, as with data.source = "random", no prompts, or sample_tokens = 0).
    Prompts too long for the context are seen through their last tokens, as in `generate`.
    """
    if tokenizer is None or not train_cfg.sample_prompts or train_cfg.sample_tokens == 0:
        return []
    prompt_ids = [encode_prompt(tokenizer, p) for p in train_cfg.sample_prompts]
    autocast = precision.autocast() if precision is not None else nullcontext()
    cache_dtype = precision.kv_cache_dtype if precision is not None else None
    with autocast:
        completions = generate(model, prompt_ids, train_cfg.sample_tokens, temperature=0.0,
                               eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                               stop_when_all_done=False, cache_dtype=cache_dtype)
    return [tokenizer.decode(p + c) for p, c in zip(prompt_ids, completions)]
