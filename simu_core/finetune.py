"""Fine-tuning on QA items with the loss on answer tokens only (AdamW, warm-up, linear decay).

AdamW is :class:`simu_core.optim.MasterAdamW`: fp32 moments and fp32 master weights for a bf16/fp16
model (torch's AdamW on bf16 weights rounds small updates away), the model keeping its dtype.

Produces the built-in benchmark's target model (full set + general facts) and retain reference
(retain split + general facts); also usable on a Hugging Face base model and TOFU.

Sharded (``distributed``, one process of a torchrun launch; :mod:`simu_core.distributed`): the
model is sharded with FSDP2 and trained as unlearning trains, so the result is a one-process run's
within float rounding. Every process plans the same batches; each micro-batch's items are split in
contiguous chunks; a process's loss is its chunk's mean answer-token loss times its chunk's share
of the micro-batch's answer tokens (the sum over processes is the one-process loss); a process
with nothing to contribute runs an item with weight 0 (FSDP's collectives need every process). The
gradient is clipped with its global norm, and MasterAdamW updates the local shards.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from simu_core.config import FinetuneConfig
from simu_core.models.checkpointing import gradient_checkpointing
from simu_core.optim import MasterAdamW
from simu_core.optim.sharded import local_tensor
from simu_core.prompting import IGNORE_INDEX, EncodedExample, collate, encode_qa, pad_token_id
from simu_core.scoring import answer_loss

if TYPE_CHECKING:
    from simu_core.distributed import DistributedContext


@dataclass
class FinetuneResult:
    """Training log (one row per optimizer step) and throughput figures."""

    log: pd.DataFrame
    wall_seconds: float
    tokens_seen: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / self.wall_seconds if self.wall_seconds > 0 else float("nan")


def encode_frame(
    tokenizer: PreTrainedTokenizerBase, frame: pd.DataFrame, max_length: int, answer_column: str = "answer"
) -> list[EncodedExample]:
    """Tokenize every (question, answer) row of ``frame``."""
    return [encode_qa(tokenizer, q, a, max_length) for q, a in zip(frame["question"], frame[answer_column])]


def finetune(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[EncodedExample],
    config: FinetuneConfig,
    seed: int = 0,
    description: str = "fine-tune",
    progress: bool = True,
    distributed: DistributedContext | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` in place; deterministic on CPU for a given seed.

    ``distributed``: this process's place in a sharded run. ``model`` (whole, the same on every
    process, e.g. loaded on CPU) is sharded in place with :func:`simu_core.distributed.shard_model`
    first (unless it is an FSDP module already); afterwards
    :func:`simu_core.distributed.full_state_dict` gathers its weights. The log's loss and gradient
    norm, and the token count, are the whole micro-batch's (summed over processes).
    """
    if not examples:
        raise ValueError("fine-tuning needs at least one example")
    if distributed is not None:
        from torch.distributed.fsdp import FSDPModule

        from simu_core.distributed import shard_model

        if not isinstance(model, FSDPModule):  # a model the caller sharded already is used as it is
            shard_model(model, distributed)
        device = distributed.device
    else:
        device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    batches_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = math.ceil(batches_per_epoch * config.epochs / config.grad_accum)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    optimizer = MasterAdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.95),
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    model.train()
    with gradient_checkpointing(model, config.gradient_checkpointing):
        rows, tokens_seen, micro_step = [], 0, 0
        started = time.perf_counter()
        bar = tqdm(total=total_steps, desc=description, disable=not progress, leave=False)
        for epoch in range(config.epochs):
            order = torch.randperm(len(examples), generator=generator).tolist()
            for start in range(0, len(order), config.batch_size):
                if distributed is not None:
                    indices = order[start : start + config.batch_size]
                    loss = _sharded_micro_batch(model, examples, indices, pad_id, config.grad_accum, distributed,
                                                f"{description}: non-finite loss at epoch {epoch}, batch {start}")
                    tokens_seen += sum(len(examples[i].input_ids) for i in indices)
                    micro_step += 1
                else:
                    batch = collate([examples[i] for i in order[start : start + config.batch_size]], pad_id)
                    batch = {key: value.to(device) for key, value in batch.items()}
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    loss = answer_loss(logits, batch["labels"])
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"{description}: non-finite loss at epoch {epoch}, batch {start}")
                    (loss / config.grad_accum).backward()
                    tokens_seen += int(batch["attention_mask"].sum())
                    micro_step += 1
                if micro_step % config.grad_accum == 0 or (epoch == config.epochs - 1 and start + config.batch_size >= len(order)):
                    if distributed is not None:
                        grads = [local_tensor(p.grad) for p in model.parameters() if p.grad is not None]
                        grad_norm = distributed.clip_grad_norm_(grads, config.max_grad_norm)
                    else:
                        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    rows.append(
                        {"step": len(rows) + 1, "epoch": epoch, "loss": float(loss.detach()), "lr": scheduler.get_last_lr()[0],
                         "grad_norm": float(grad_norm)}
                    )
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        bar.close()
    model.eval()
    return FinetuneResult(log=pd.DataFrame(rows), wall_seconds=time.perf_counter() - started, tokens_seen=tokens_seen)


def _sharded_micro_batch(
    model: torch.nn.Module,
    examples: Sequence[EncodedExample],
    indices: Sequence[int],
    pad_id: int,
    grad_accum: int,
    context: DistributedContext,
    error: str,
) -> torch.Tensor:
    """Forward and backward of this process's chunk of a micro-batch (its share of the loss); returns
    the micro-batch's loss summed over processes (CPU). A non-finite sum raises ``error`` on every
    process before any backward, so none is left waiting in a collective."""
    counts = {i: sum(label != IGNORE_INDEX for label in examples[i].labels[1:]) for i in indices}
    total = sum(counts.values())
    mine = context.split(indices)
    share = sum(counts[i] for i in mine) / total if total else 0.0
    if not mine or (total and share == 0.0):
        # Nothing to add (an empty chunk, or one without answer tokens): an item with answer tokens
        # at weight 0, since FSDP's collectives need every process.
        mine, share = [next((i for i in indices if counts[i]), indices[0])], 0.0
    batch = collate([examples[i] for i in mine], pad_id)
    batch = {key: value.to(context.device) for key, value in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = answer_loss(logits, batch["labels"]) * share
    summed = context.all_reduce_sum(loss.detach().double()).cpu()
    if not torch.isfinite(summed):
        raise FloatingPointError(error)
    (loss / grad_accum).backward()
    return summed
