"""Text generation (library): batched prompts, KV cache, sampling filters, training-time samples.

The command `python -m nanotrain.generate` (generate.py) is a thin front end over this module.
`generate()` completes a batch of prompts at once. Prompts of different lengths are LEFT padded,
so every row's last prompt token sits in the last column and one decoding step serves the whole
batch; `attention_mask` hides the padding and the model derives positions from it, so a padded
row decodes exactly as it would alone. A KV cache (`model.new_kv_cache`) keeps the keys and
values of past tokens, so each step runs the model on one new token per row instead of the
whole sequence; `use_cache=False` recomputes everything and exists to prove the two agree.

Sampling: temperature 0 is greedy (argmax); otherwise logits / temperature, then `filter_logits`
keeps the top-k tokens and the smallest set holding top-p of the probability, and a seeded
torch.Generator draws from what is left, so a seed gives the same text every time.

During training, `sample_completions` completes `train.sample_prompts` at each evaluation. Under
FSDP the weights are sharded, so every rank runs the same forwards in lockstep (same prompts,
greedy, a fixed number of steps) and only rank 0 prints.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from nanotrain.errors import NanotrainError
from nanotrain.model import KVCache


class GenerationError(NanotrainError):
    """Bad generation input (prompt, length, sampling setting), in one line."""


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
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise GenerationError(f"top_k must be >= 0 (0 = no top-k filter), got {top_k}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {top_p}")


def check_device(name: str) -> str:
    """A --device value that exists here, or a one-line error (before any loading starts)."""
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
    exactly max_new_tokens forwards run, which keeps sharded ranks in lockstep). The prompt plus
    max_new_tokens must fit in the model's context (model.max_position_embeddings).

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
    longest = max(len(p) for p in prompt_ids)
    if longest + max_new_tokens > context_length(model):
        raise GenerationError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's context of "
            f"{context_length(model)} tokens; shorten the prompt or lower max_new_tokens"
        )

    if max_new_tokens == 0:
        return [[] for _ in prompt_ids]

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
        total = longest + max_new_tokens
        cache = (model.new_kv_cache(batch, total) if cache_dtype is None
                 else KVCache(model.config, batch, total, device=device, dtype=cache_dtype))

    completions: list[list[int]] = [[] for _ in range(batch)]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        logits, _ = model(ids, attention_mask=mask, kv_cache=cache)  # prefill: the whole prompt
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
            mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)
            if use_cache:
                logits, _ = model(next_ids[:, None], attention_mask=mask, kv_cache=cache)
            else:
                ids = torch.cat([ids, next_ids[:, None]], dim=1)
                logits, _ = model(ids, attention_mask=mask)
    finally:
        model.train(was_training)
    return completions


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt, starting with BOS as every training document does."""
    if not text.strip():
        raise GenerationError("empty prompt: pass some text with --prompt")
    bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    return bos + tokenizer.encode(text)


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
    Prompts too long for the context are shortened to their last tokens rather than failing
    the run.
    """
    if tokenizer is None or not train_cfg.sample_prompts or train_cfg.sample_tokens == 0:
        return []
    max_new_tokens = min(train_cfg.sample_tokens, context_length(model) - 1)
    keep = context_length(model) - max_new_tokens
    prompt_ids = [encode_prompt(tokenizer, p)[-keep:] for p in train_cfg.sample_prompts]
    autocast = precision.autocast() if precision is not None else nullcontext()
    cache_dtype = precision.kv_cache_dtype if precision is not None else None
    with autocast:
        completions = generate(model, prompt_ids, max_new_tokens, temperature=0.0,
                               eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                               stop_when_all_done=False, cache_dtype=cache_dtype)
    return [tokenizer.decode(p + c) for p, c in zip(prompt_ids, completions)]
