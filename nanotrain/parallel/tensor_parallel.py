"""Tensor parallelism (`parallel.tp`): each block's matrices split over the processes of the mesh's tp axis.

The plan, applied by `distributed.parallelize` to a plain model (model/transformer.py knows nothing of it),
is Megatron-LM's, written with PyTorch's DTensor tensor-parallel API:

    attention   q_proj, k_proj, v_proj   colwise: each process computes n_heads/tp whole heads
                                         (and n_kv_heads/tp key/value heads) and attends over them
                o_proj                   rowwise: partial outputs, summed by one all-reduce
    MLP         gate_proj, up_proj       colwise: d_ff/tp hidden units per process
                down_proj                rowwise: one all-reduce
    embedding   tok_embeddings           split by vocabulary rows (VocabParallelEmbedding): each
                                         process looks up the ids it holds, one all-reduce
                                         assembles the vectors
    head        lm_head                  split by vocabulary rows; the loss is vocabulary-parallel
                                         (VocabParallelHead): no process ever holds (B, T, V) logits
    the rest    norms, position table    replicated: every process holds them whole

So a block costs two all-reduces of the (B, T, C) activations in forward (after o_proj and
down_proj) and two in backward (of the gradients entering q/k/v and gate/up), and a tied
embedding and head share one vocabulary-split weight. Every parameter becomes a DTensor on the
tp mesh (replicated ones too), so gradient clipping, the optimizer and checkpoints (DCP) see one
kind of tensor; FSDP2 then shards them over the dp axis as well (2-D), and a data-parallel job
without FSDP averages their gradients over dp with `all_reduce_gradients` (DDP itself cannot
hold DTensor parameters).

With `parallel.sequence_parallel`, the norms, dropout and residual stream between the split
layers hold only this process's positions (a DTensor split along the sequence): each all-reduce
above becomes a reduce-scatter, and an all-gather brings every position back before attention,
the MLP and the head.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from nanotrain.model.loss import IGNORE_INDEX, count_valid_tokens, head_compute_dtype
from nanotrain.model.transformer import OutputHead, Transformer

# Block sub-modules by how their weight is split; a flavour's MLP has some of these names.
COLWISE = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROWWISE = ("attn.o_proj", "mlp.down_proj")


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> None:
    """Split `model`'s weights over `tp_mesh` in place (see the module docstring for the plan).

    `sequence_parallel`: between the split layers, each process holds T/tp of the sequence's
    positions rather than all of them (the residual stream, the norms, dropout): the all-reduce
    after o_proj and down_proj becomes a reduce-scatter over the sequence, and an all-gather
    brings the whole sequence back before attention and the MLP (Korthikanti et al., 2022).
    """
    # Under FSDP x TP, DTensor warns (on every rank) that the gradient norm's reduction and the
    # gather of whole weights for model.safetensors each take one collective per mesh axis rather
    # than one over both. Both are exact; gloo and NCCL give every rank the same sum.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    sequence = Shard(1)
    for block in model.blocks.values():
        names = {name for name, _ in block.named_modules()}
        plan = {name: ColwiseParallel() for name in COLWISE if name in names}
        if sequence_parallel:  # the residual stream stays a DTensor split by position
            plan.update({name: RowwiseParallel(output_layouts=sequence, use_local_output=False)
                         for name in ROWWISE if name in names})
            plan.update({norm: SequenceParallel() for norm in ("attn_norm", "mlp_norm")})
            plan["attn"] = PrepareModuleInput(input_layouts=(sequence, None, None, None),
                                              desired_input_layouts=(Replicate(), None, None, None))
            plan["mlp"] = PrepareModuleInput(input_layouts=(sequence,), desired_input_layouts=(Replicate(),))
        else:
            plan.update({name: RowwiseParallel() for name in ROWWISE if name in names})
        parallelize_module(block, tp_mesh, plan)
        if not sequence_parallel:
            for norm in (block.attn_norm, block.mlp_norm):
                replicate(norm, tp_mesh)
    model.tok_embeddings = VocabParallelEmbedding.from_embedding(model.tok_embeddings, tp_mesh, sequence_parallel)
    if hasattr(model, "pos_embeddings"):
        replicate(model.pos_embeddings, tp_mesh, output=sequence if sequence_parallel else None)
    if sequence_parallel:
        parallelize_module(model.norm, tp_mesh, SequenceParallel())
    else:
        replicate(model.norm, tp_mesh)
    model.lm_head = VocabParallelHead.from_head(model.lm_head, tp_mesh)
    if model.config.tie_embeddings:  # both are split by vocabulary rows: one weight serves both
        model.lm_head.weight = model.tok_embeddings.weight


def replicate(module: nn.Module, tp_mesh: DeviceMesh, output: Shard | None = None) -> None:
    """Make `module`'s parameters whole copies (replicated DTensors) on every tp process.

    Its inputs become replicated DTensors and its outputs plain tensors again, so it sits between
    the split layers unchanged; or, with `output` = Shard(1), DTensors split by position (each
    process keeps its own positions: the sequence-parallel residual stream). Every process
    computes the same gradient for these parameters.
    """
    def to_dtensor(_module, inputs, mesh):
        return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                     if isinstance(x, torch.Tensor) else x for x in inputs)

    def from_dtensor(_module, result, _mesh):
        return result.redistribute(placements=[output]) if output is not None else result.to_local()

    distribute_module(module, tp_mesh, input_fn=to_dtensor, output_fn=from_dtensor)


def vocabulary_starts(vocab_size: int, processes: int) -> list[int]:
    """The first vocabulary row of each process's share, and the end: DTensor's split of dim 0 (torch.chunk's)."""
    rows_per_process = math.ceil(vocab_size / processes)
    return [min(r * rows_per_process, vocab_size) for r in range(processes + 1)]


def local_rows(weight: DTensor) -> tuple[torch.Tensor, int, dist.ProcessGroup]:
    """This process's rows of a vocabulary-split weight, the vocabulary id of the first, and the tp group."""
    mesh = weight.device_mesh
    return weight.to_local(), vocabulary_starts(weight.size(0), mesh.size())[mesh.get_local_rank()], mesh.get_group()


class VocabParallelEmbedding(nn.Embedding):
    """The token embedding with its table split by vocabulary rows over the tp processes.

    Every process gets all the ids, looks up those in its rows (zeros for the others) and one
    all-reduce sums the shares. Written out rather than with DTensor's RowwiseParallel, whose
    backward leaves each process a whole (V, C) gradient (measured: a 32,000 x 256 table's 33 MB
    per rank, docs/benchmarks.md); here each process's gradient has its own rows only.
    """

    sequence_parallel = False  # True: the sum is split by position (reduce-scatter), not all-reduced

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, tp_mesh: DeviceMesh,
                       sequence_parallel: bool = False) -> "VocabParallelEmbedding":
        split = cls(embedding.num_embeddings, embedding.embedding_dim, device="meta")
        split.weight = nn.Parameter(distribute_tensor(embedding.weight.detach(), tp_mesh, [Shard(0)]))
        split.sequence_parallel = sequence_parallel
        return split

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight, start, group = local_rows(self.weight)
        elsewhere = (ids < start) | (ids >= start + weight.size(0))
        vectors = F.embedding((ids - start).masked_fill(elsewhere, 0), weight).masked_fill(elsewhere[..., None], 0.0)
        if self.sequence_parallel:  # summed and split by position in one reduce-scatter
            mesh = self.weight.device_mesh
            return DTensor.from_local(vectors, mesh, [Partial()], run_check=False).redistribute(placements=[Shard(1)])
        return _SumOverGroup.apply(vectors, group)


class _SumOverGroup(torch.autograd.Function):
    """Forward: the sum of every process's tensor (all-reduce). Backward: the gradient as it is.

    Each process's share enters the sum once and the sum's gradient is the same on every process
    (what follows is replicated), so each share's gradient is that gradient (Megatron-LM's g).
    """

    @staticmethod
    def forward(ctx, share, group):
        total = share.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class VocabParallelHead(OutputHead):
    """The output head with its weight split by vocabulary rows, and the loss computed without gathering logits.

    Process r holds rows [start, start + rows) of the (V, C) weight (DTensor's even split, the last
    share smaller when tp does not divide V). The loss needs, per token, the log of the sum of
    exp(logits) over the whole vocabulary and the target's logit: each process computes its
    slice's maximum, sum of exponentials and (where it holds the target) target logit, and three
    all-reduces of (tokens,)-sized vectors combine them (Megatron-LM's vocabulary-parallel
    cross-entropy). Logits are gathered whole only when asked for (`forward`: generation).
    """

    @classmethod
    def from_head(cls, head: OutputHead, tp_mesh: DeviceMesh) -> "VocabParallelHead":
        split = cls(head.in_features, head.out_features, bias=False, device="meta")
        split.weight = nn.Parameter(distribute_tensor(head.weight.detach(), tp_mesh, [Shard(0)]))
        return split

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Whole logits (B, T, V) on every process (an all-gather): for generation, not for training."""
        hidden = whole_sequence(hidden)
        weight, _, group = local_rows(self.weight)
        width = vocabulary_starts(self.out_features, dist.get_world_size(group))[1]  # only trailing shares are narrower
        local = F.pad(F.linear(hidden, weight), (0, width - weight.size(0)))  # (B, T, width): gloo gathers equal sizes
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        return torch.cat(gathered, dim=-1)[..., : self.out_features]

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, fused: bool):
        """(None, loss summed over valid tokens, valid tokens): the vocabulary-parallel loss.

        `fused` makes no difference: this path never holds more than (B, T, V/tp) logits.
        """
        hidden = whole_sequence(hidden)
        weight, start, group = local_rows(self.weight)
        dtype = head_compute_dtype(hidden, weight)
        rows = hidden[:, :-1].reshape(-1, hidden.size(-1)).to(dtype)  # (N, C)
        targets = labels[:, 1:].reshape(-1)  # (N,)
        needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        with torch.autocast(hidden.device.type, enabled=False):
            loss_sum = _VocabParallelCrossEntropy.apply(rows, weight.to(dtype), targets, start, group, needs_grad)
        return None, loss_sum, count_valid_tokens(labels)


def whole_sequence(hidden: torch.Tensor) -> torch.Tensor:
    """The final norm's output with every position, as a plain tensor (an all-gather under sequence parallelism).

    Its gradient comes back whole on every process (the loss sums it over the vocabulary
    slices), so the all-gather's backward keeps each process's own positions of it.
    """
    return hidden.full_tensor() if isinstance(hidden, DTensor) else hidden


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of hidden @ weight_shard.T over a vocabulary split across `group`.

    The gradients are made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, start: int, group, needs_grad: bool):
        # hidden (N, C) whole on every process; weight (V/tp, C): vocabulary rows [start, start + V/tp).
        logits = (hidden @ weight.t()).float()  # (N, V/tp)
        valid = targets != IGNORE_INDEX  # (N,)
        local_target = targets - start
        here = valid & (local_target >= 0) & (local_target < weight.size(0))  # (N,): this process holds the target
        row_max = logits.max(dim=-1).values  # (N,)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        logits -= row_max[:, None]  # shifted by the row's maximum over the whole vocabulary: exp stays in range
        picked = logits.gather(1, local_target.clamp(0, weight.size(0) - 1)[:, None]).squeeze(1)
        exp = logits.exp_()  # (N, V/tp), in place
        sums = torch.stack([exp.sum(dim=-1), torch.where(here, picked, 0.0)])  # (2, N): sum of exp, target logit
        dist.all_reduce(sums, group=group)
        sum_exp, target_logit = sums
        # -log softmax[target] = log(sum of exp) - target logit, both shifted by the same maximum
        loss_sum = torch.where(valid, sum_exp.log() - target_logit, 0.0).sum()
        if needs_grad:
            # d(sum of -log p[target]) / d(logits) = softmax - one_hot, zero on ignored rows
            grad_logits = exp.div_(sum_exp[:, None])
            grad_logits[here, local_target[here]] -= 1.0
            grad_logits *= valid[:, None]
            grad_logits = grad_logits.to(hidden.dtype)
            grad_hidden = grad_logits @ weight  # this slice's share of the gradient ...
            dist.all_reduce(grad_hidden, group=group)  # ... summed over the vocabulary
            ctx.save_for_backward(grad_hidden, grad_logits.t() @ hidden)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss.float()  # the loop's 1 / (valid tokens), times the fp16 loss scale if any
        return ((grad_hidden * scale).to(grad_hidden.dtype), (grad_weight * scale).to(grad_weight.dtype),
                None, None, None, None)


def all_reduce_gradients(model: nn.Module, dp_group: dist.ProcessGroup) -> None:
    """Average every gradient over the data-parallel group, as DDP would (one all-reduce of one flat buffer).

    DDP cannot wrap a model whose parameters are DTensors, so a tensor-parallel model under
    `parallel.strategy = ddp` calls this after the backward of an optimizer step's last micro-batch.
    Each process averages its own shard of each gradient with the same shard on the other dp ranks.
    """
    for p in model.parameters():  # sequence parallelism leaves the norms' gradients partial sums over tp
        if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
            p.grad = p.grad.redistribute(placements=p.placements)
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
             for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=dp_group)
    flat /= dist.get_world_size(dp_group)
    for grad, averaged in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(averaged.view_as(grad))
