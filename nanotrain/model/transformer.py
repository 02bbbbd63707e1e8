"""One decoder-only Transformer, built from the features of `model.flavour` (`FEATURES` in config.py).

- `gpt`:   learned position embeddings, LayerNorm, GELU MLP, biases, dropout (the mini-GPT).
- `llama`: RoPE (HF's rotate-halves layout), RMSNorm computed in fp32, SwiGLU MLP,
           grouped-query attention (`n_kv_heads`), no biases, optional tied embeddings.
The model asks `cfg.features` (norm, mlp, positions, bias), never the flavour's name: each
feature value picks one block from NORMS or MLPS below, or the position encoding.

Each block is pre-norm:  x = x + attn(norm(x));  x = x + mlp(norm(x)).
The model knows nothing of devices, parallelism or precision: those are applied from outside.

Padding: `attention_mask` (B, S) holds 1 for tokens and 0 for padding (left padding works).
Positions come from the mask (cumsum - 1), so a left-padded row gives the same logits at its
real tokens as the unpadded row; `forward(..., positions=)` passes them in instead (a
context-parallel chunk holds global positions).

Pipeline stages: `model.keep_only(blocks=range(a, b), embeddings=..., head=...)` drops the rest.
Blocks are keyed by their global index (`blocks.5.attn...` on every stage), so a stage's
parameter names are the whole model's. A stage without embeddings takes hidden states (B, T, C)
in place of token ids; one without the head returns hidden states in place of logits.

KV cache (generation; call under `torch.no_grad()`):
    cache = model.new_kv_cache(batch_size, max_len)   # preallocated per layer
    logits, _ = model(prompt_ids, attention_mask=mask, kv_cache=cache)      # prefill
    logits, _ = model(next_ids, attention_mask=mask_so_far, kv_cache=cache)  # one step
Each call appends its T tokens at position `cache.length` and attends over everything cached.
With a cache, `attention_mask` covers past *and* new tokens: (B, cache.length + T).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanotrain.config import ModelConfig
from nanotrain.model.loss import fused_next_token_loss, next_token_loss


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as HF Llama does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": RMSNorm}  # features.norm -> class(dim, eps=...)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The norm layer `cfg.features.norm` names, over d_model with eps `norm_eps`."""
    return NORMS[cfg.features.norm](cfg.d_model, eps=cfg.norm_eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """cos and sin tables (B, 1, T, head_dim) for integer positions (B, T), in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, hd): halves layout, as HF
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by pairs (i, i + hd/2), HF's layout, so HF weights map 1:1."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache:
    """Keys and values of past tokens, (B, heads, max_len, head_dim) per layer, allocated at its first write.

    The heads are those the layer's keys arrive with: n_kv_heads, or this process's share of
    them when the attention is split over processes (tensor parallelism).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None):
        self.keys: list[torch.Tensor | None] = [None] * cfg.n_layers
        self.values: list[torch.Tensor | None] = [None] * cfg.n_layers
        self.batch_size, self.max_len, self.device, self.dtype = batch_size, max_len, device, dtype
        self.length = 0  # tokens written so far; the model advances it after each forward

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, n_kv, T, hd) after the cached tokens; return all of them (B, n_kv, S, hd)."""
        if self.keys[layer] is None:
            shape = (self.batch_size, k.size(1), self.max_len, k.size(3))
            self.keys[layer] = torch.zeros(shape, device=self.device, dtype=self.dtype)
            self.values[layer] = torch.zeros(shape, device=self.device, dtype=self.dtype)
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        bias = cfg.features.bias
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.layer_index = layer_index  # which slot of a KVCache is ours
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=bias)

    def forward(self, x, rope, mask, kv_cache):
        B, T, _ = x.shape
        # Heads counted from the projections' width (-1), not from the config: under tensor
        # parallelism each process computes only its share of them.
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, k, v)  # (B, Hkv, S, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class GeluMLP(nn.Module):
    """down(gelu(up(x))), d_ff hidden units (GPT-2)."""

    matrices = 2  # weight matrices per token, for flops_per_token

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.features.bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.features.bias)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return self.down_proj(F.gelu(self.up_proj(x)))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), d_ff intermediate units (LLaMA)."""

    matrices = 3

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Registration order is init order (init_weights walks named_parameters): gate, up, down.
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.features.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.features.bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.features.bias)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


MLPS = {"gelu": GeluMLP, "swiglu": SwiGLU}  # features.mlp -> class(cfg)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer_index)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLPS[cfg.features.mlp](cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, mask=None, kv_cache=None):  # (B, T, C) -> (B, T, C)
        x = x + self.dropout(self.attn(self.attn_norm(x), rope, mask, kv_cache))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class OutputHead(nn.Linear):
    """The output projection, d_model -> vocabulary, and the next-token loss computed through it.

    The loss goes through the head (`head.loss`), not after it, so a head whose weight is split
    over processes (parallel/tensor_parallel.py's vocabulary-parallel head) can compute it without ever
    holding every token's logits; the model's forward stays the same either way.
    """

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, fused: bool):
        """(logits (B, T, V) or None, loss summed over valid tokens, valid tokens) for hidden (B, T, C).

        `fused`: head and loss together in row chunks (loss.fused_next_token_loss); no logits.
        """
        if fused:  # the weight is read inside forward, where FSDP has unsharded it
            return None, *fused_next_token_loss(hidden, self.weight, labels)
        logits = self(hidden)  # (B, T, V)
        return logits, *next_token_loss(logits, labels)


def attention_mask_for(padding_mask, T: int, past: int, device) -> torch.Tensor:
    """Boolean (B|1, 1, T, past + T) mask, True where a query may attend: causal and not padding."""
    query = torch.arange(past, past + T, device=device)[:, None]  # (T, 1) index in the sequence
    key = torch.arange(past + T, device=device)[None, :]  # (1, S)
    allowed = (key <= query)[None, None]  # (1, 1, T, S)
    if padding_mask is not None:
        allowed = allowed & padding_mask.bool()[:, None, None, :]  # (B, 1, T, S)
    # A padding query would see no key at all and softmax would give NaN: let it see itself.
    return allowed | (key == query)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.features.positions == "learned":
            self.pos_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        # Keyed by global index, not a list: a pipeline stage keeping blocks 4-7 still names them 4-7.
        self.blocks = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm = make_norm(cfg)
        self.lm_head = OutputHead(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """Draw every weight from `generator` (a CPU generator) so the result depends on its seed only.

        normal(0, init_std) for matrices, zeros for biases, ones for norms; the projections that
        write into the residual stream (o_proj, down_proj) get std / sqrt(2 * n_layers) so the
        stream's variance does not grow with depth (GPT-2).
        """
        std = self.config.init_std
        for name, param in self.named_parameters():  # tied weights appear once
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:  # norm scales
                param.fill_(1.0)
            else:
                writes_residual = name.endswith(("o_proj.weight", "down_proj.weight"))
                scale = std / math.sqrt(2 * self.config.n_layers) if writes_residual else std
                param.copy_(torch.empty(param.shape).normal_(0.0, scale, generator=generator))

    def keep_only(self, blocks: range, embeddings: bool, head: bool) -> Transformer:
        """Make this model a pipeline stage, in place: keep `blocks` (global indices) and, if asked,
        the embeddings (first stage) and the final norm, head and loss (last stage); drop the rest.

        Call it on the whole model after `build_model`, so the stage's weights are the whole model's.
        """
        for key in list(self.blocks):
            if int(key) not in blocks:
                del self.blocks[key]
        if not embeddings:
            del self.tok_embeddings
            if hasattr(self, "pos_embeddings"):
                del self.pos_embeddings
        if not head:
            del self.norm, self.lm_head
        return self

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache for `batch_size` rows of up to `max_len` tokens, on the model's device and dtype."""
        weight = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, device=weight.device, dtype=weight.dtype)

    def forward(self, input_ids, attention_mask=None, labels=None, kv_cache=None, *, positions=None,
                fused_loss: bool = False, loss_reduction: str = "mean"):
        """input_ids (B, T) -> (logits (B, T, V), mean next-token loss or None).

        `positions` (B, T): each token's position in its sequence; None computes them from
        `attention_mask` (cumsum - 1) or, without one, as past, past + 1, ...
        Training options (keyword-only): `loss_reduction="sum"` returns the loss summed over
        valid tokens instead of the mean (the train loop normalises over the whole step);
        `fused_loss=True` (with labels) computes the head and the loss together in row chunks
        (loss.fused_next_token_loss) and returns logits=None: no (B, T, V) tensor is made.
        On a pipeline stage (`keep_only`) without embeddings `input_ids` is hidden states (B, T, C);
        without the head the result is (hidden states (B, T, C), None).
        """
        cfg = self.config
        B, T = input_ids.shape[:2]
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > cfg.max_position_embeddings:
            raise ValueError(
                f"{past + T} tokens exceed model.max_position_embeddings ({cfg.max_position_embeddings})"
            )
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if kv_cache is not None and past + T > kv_cache.max_len:
            raise ValueError(f"KV cache holds {kv_cache.max_len} tokens; {past + T} were asked for")
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(
                f"attention_mask must have shape ({B}, {past + T}), got {tuple(attention_mask.shape)}"
            )
        if positions is not None and positions.shape != (B, T):
            raise ValueError(f"positions must have shape ({B}, {T}), got {tuple(positions.shape)}")

        device = input_ids.device
        if positions is None and attention_mask is None:
            positions = torch.arange(past, past + T, device=device).expand(B, T)  # (B, T)
        elif positions is None:  # left padding: a row's first real token is position 0
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        # No mask and nothing cached: SDPA's is_causal path (flash attention on CUDA).
        mask = None
        if attention_mask is not None or past > 0:
            mask = attention_mask_for(attention_mask, T, past, device)  # (B|1, 1, T, S)
        rope = None
        if cfg.features.positions == "rope":
            rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)

        x = self.embed(input_ids, positions) if hasattr(self, "tok_embeddings") else input_ids  # (B, T, C)
        for block in self.blocks.values():
            x = block(x, rope, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        if not hasattr(self, "lm_head"):
            return x, None
        hidden = self.norm(x)  # (B, T, C)
        if labels is None:
            return self.lm_head(hidden), None  # (B, T, V)
        logits, loss_sum, valid_tokens = self.lm_head.loss(hidden, labels, fused=fused_loss)
        return logits, loss_sum if loss_reduction == "sum" else loss_sum / valid_tokens.clamp(min=1)

    def embed(self, input_ids, positions):
        """Token ids (B, T) -> the first block's input (B, T, C), with learned positions if the flavour has them."""
        x = self.tok_embeddings(input_ids)
        if self.config.features.positions == "learned":
            x = x + self.pos_embeddings(positions)
        return self.dropout(x)


def build_model(model_cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A Transformer on CPU whose weights depend only on `seed` (the global RNG is not touched)."""
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own default init draws from the global RNG
        model = Transformer(model_cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


# ---- sizes and FLOPs ---------------------------------------------------------------------------

def num_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Parameter count, tied weights once. `exclude_embeddings` drops the token and position tables."""
    total = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        total -= model.tok_embeddings.weight.numel()
        if hasattr(model, "pos_embeddings"):
            total -= model.pos_embeddings.weight.numel()
    return total


def parameter_report(model: Transformer) -> str:
    """A table of parameters per component: embeddings, each block, final norm, head, total."""
    def count(module):
        return sum(p.numel() for p in module.parameters())

    rows = [("tok_embeddings", count(model.tok_embeddings), "")]
    if hasattr(model, "pos_embeddings"):
        rows.append(("pos_embeddings", count(model.pos_embeddings), ""))
    for key, block in model.blocks.items():
        norms = count(block.attn_norm) + count(block.mlp_norm)
        detail = f"attn {count(block.attn):,}  mlp {count(block.mlp):,}  norms {norms:,}"
        rows.append((f"blocks.{key}", count(block), detail))
    rows.append(("norm", count(model.norm), ""))
    tied = model.lm_head.weight is model.tok_embeddings.weight
    rows.append(("lm_head", 0 if tied else count(model.lm_head), "tied to tok_embeddings" if tied else ""))
    rows.append(("total", num_parameters(model), ""))
    return "\n".join(f"{name:<16}{n:>14,}  {note}".rstrip() for name, n, note in rows)


def flops_per_token(model_cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N_matmul + 12 * n_layers * d_model * seq_len (PaLM, appendix B).

    N_matmul counts the weights of every matrix multiply (attention and MLP projections and the
    output head, tied or not; not the embedding lookups, norms or biases). Forward is 2 FLOPs per
    weight per token and backward twice that, hence 6. The second term is QK^T and attention x V
    (2 matmuls of d_model * seq_len per layer, x2 FLOPs, x3 for fwd+bwd), counted without
    discounting the causal mask, as PaLM does.
    """
    d, kv_dim = model_cfg.d_model, model_cfg.kv_heads * model_cfg.head_dim
    mlp_matrices = MLPS[model_cfg.features.mlp].matrices
    per_layer = 2 * d * d + 2 * d * kv_dim + mlp_matrices * d * model_cfg.d_ff
    n_matmul = model_cfg.n_layers * per_layer + model_cfg.vocab_size * d
    return 6.0 * n_matmul + 12.0 * model_cfg.n_layers * d * seq_len

