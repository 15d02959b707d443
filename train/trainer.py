"""`logitcache train`: distil a student from a logit dataset, in one explicit loop.

The teacher is never loaded: its targets come from the dataset. Each step takes
``grad_accum`` micro-batches per rank, runs the student's decoder to its final hidden states,
keeps the loss positions only, and applies :func:`chunked_distill_loss` with the student's
lm_head inside, so ``(B, T, V)`` logits never exist. The loss is a mean over every loss
position of the step (all micro-batches, all ranks), whatever their sizes.

Run with ``torchrun --nproc-per-node N`` for DDP (gloo on CPU, nccl on GPU), and with
``train.parallel=fsdp`` for FSDP2 (:mod:`logitcache.train.fsdp`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from logitcache.cache.errors import InputError
from logitcache.cache.format import DatasetInfo
from logitcache.cache.paths import output_problem, plot_problem
from logitcache.cache.settings import format_problems

from . import fsdp as fsdp_
from .adapters import MERGED_NAME, save_final_lora
from .batching import Batch, Batcher, idle_batch
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, sharded_tmp
from .compat import check_datasets
from .config import Config
from .epochs import micro_batches, steps_for
from .evaluate import evaluate
from .metrics import append_jsonl, kl_label, plot_metrics, truncate_jsonl
from .optim import clipped_step, lr_at, make_optimizer, set_lr
from .resume import check_resumable, resumed_steps
from .stream import LogitStream, StreamLoader
from .student import (
    Dist,
    DistillStudent,
    load_student,
    load_tokenizer,
    setup_dist,
    student_problems,
)
from .tensorboard import open_writer, write_scalars

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "resolved_config.yaml"
FINAL_NAME = "final"

# --------------------------------------------------------------------------- setup


def total_steps(cfg: Config, loader: StreamLoader, dist: Dist) -> int:
    """train.steps, or the steps in which every rank trains on all of its batches of
    train.epochs passes (see :mod:`logitcache.train.epochs`)."""
    if cfg.train.steps:
        return cfg.train.steps
    return steps_for(dist.gather(micro_batches(loader)), cfg.optim.grad_accum)


def make_loader(
    cfg: Config,
    url: str,
    info: DatasetInfo,
    dist: Dist,
    *,
    train: bool,
    pad_id: int,
    tail_draws: bool = False,
) -> StreamLoader:
    """The batches of the dataset at ``url``: the training stream (``train``) or one pass over
    a held-out set; ``tail_draws`` as :class:`~logitcache.train.loss_plan.LossPlan` says."""
    d = cfg.data
    batcher = Batcher(
        info,
        d.max_seq_len,
        batch_size=d.batch_size,
        max_tokens=d.max_tokens,
        pad_id=pad_id,
        tail_draws=tail_draws,
    )
    stream = LogitStream(
        url,
        seed=cfg.train.seed,
        shuffle=train,
        shuffle_buffer=d.shuffle_buffer,
        # train.steps trains on a stream that never ends; train.epochs on one that ends after
        # its passes, every batch of which the run trains on. Held-out sets: one pass.
        epochs=(None if cfg.train.steps else cfg.train.epochs) if train else 1,
        rank=dist.rank,
        world_size=dist.world,
        verify=d.verify,
        cache_dir=d.cache_dir,
        make_batches=batcher,
    )
    return StreamLoader(
        stream,
        num_workers=d.num_workers if train else 0,
        prefetch=d.prefetch,
        pin_memory=dist.device.type == "cuda",
    )


# --------------------------------------------------------------------------- files


def _nothing_to_score(cfg: Config, result: dict[str, Any]) -> str:
    """Why an eval had no loss position to average over, and what to do about it."""
    where = f"data.eval={cfg.data.eval!r}"
    n, dropped = result["examples"], result["dropped_targets"]
    if n == 0:
        why = f"{where} gave no examples; point data.eval at a held-out set that holds some"
    else:
        why = (
            f"the {n} examples of {where} have no target left to score ({dropped} dropped: a "
            "response token right after an empty prompt has no logit to predict it); hold out "
            "examples with a prompt, or with responses of two tokens or more"
        )
    return (
        f"eval: nothing to score: {why}. metrics.jsonl records eval/kl, eval/ce and eval/top1 "
        "as null"
    )


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


# --------------------------------------------------------------------------- the loop


def train(cfg: Config, *, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) training; returns a summary. See the module docstring."""
    import yaml
    from tqdm.auto import tqdm

    from logitcache.cache.reader import open_dataset

    # Paths first, all at once: a run must not train (nor download) toward one it cannot use.
    output, plot = cfg.train.output, cfg.log.plot
    problems = student_problems(cfg)
    if problem := output_problem(output, f"train.output={output!r}", folder=True):
        problems.append(problem)
    if plot is not None and (problem := plot_problem(plot, f"log.plot={plot!r}")):
        problems.append(problem)
    if problems:
        raise InputError(format_problems(problems))
    dist = setup_dist(cfg)
    fsdp = cfg.train.parallel == "fsdp"
    if fsdp and dist.world == 1:
        raise InputError(
            "train.parallel=fsdp shards the student over torchrun's processes, but this is one "
            "process: launch with torchrun --nproc-per-node N (N ≥ 2), or drop "
            "--train.parallel fsdp to train on one process"
        )
    out = Path(cfg.train.output)
    metrics_path = out / METRICS_NAME
    ids_path = out / f"examples-rank{dist.rank}.jsonl"
    ckpt = latest_checkpoint(out) if resume else None
    started = any((out / name).exists() for name in (METRICS_NAME, CONFIG_NAME, "checkpoints"))
    if resume and not started:
        raise InputError(
            f"--resume: train.output={str(out)!r} holds no run to resume; drop --resume to "
            "start, or point train.output at the interrupted run"
        )
    if not resume and started:
        raise InputError(
            f"train.output={str(out)!r} already holds a run; pass --resume to continue it, or "
            "choose another train.output (or delete the folder)"
        )
    # Interrupted before its first checkpoint: nothing to restore, so it starts over.
    restart = resume and ckpt is None

    # Everything that can be refused is refused before the student is built.
    train_ds = open_dataset(cfg.data.train, verify=False, cache_dir=cfg.data.cache_dir)
    info = train_ds.info
    tokenizer = load_tokenizer(cfg)
    eval_info = info
    if cfg.data.eval is not None:
        eval_info = open_dataset(cfg.data.eval).info
    infos = {"data.train": info} | ({"data.eval": eval_info} if cfg.data.eval is not None else {})
    # Tokenizer, capture temperature, tail and divergence against the datasets, all at once;
    # the loss resolved for the training set (loss.tail auto resolved) is the run's from here.
    plan = check_datasets(cfg, infos, tokenizer)
    cfg = replace(cfg, loss=plan.loss)
    readers = dist.world * max(cfg.data.num_workers, 1)
    if train_ds.num_examples == 0:
        extra = train_ds.manifest.extra
        why = (
            f"; its capture left out {extra.get('too_long', {}).get('dropped', 0)} as too long "
            f"and skipped {extra.get('skipped_count', 0)} bad record(s) (extra in its manifest.json)"
        )
        raise InputError(
            f"data.train={cfg.data.train!r} holds no examples{why}: capture it again with "
            "records that fit (--max-length, --truncation left) or train on another dataset"
        )
    if train_ds.num_examples < readers:
        raise InputError(
            f"data.train={cfg.data.train!r} holds {train_ds.num_examples} examples, fewer than "
            f"the {readers} readers (ranks × data.num_workers); lower data.num_workers"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loader = make_loader(
        cfg, cfg.data.train, info, dist, train=True, pad_id=pad_id, tail_draws=plan.tail_draws
    )

    bf16 = cfg.train.precision == "bf16" or (
        cfg.train.precision == "auto" and dist.device.type == "cuda"
    )
    # Under LoRA the frozen base weights are held in bf16 when the run computes in it.
    frozen = torch.bfloat16 if bf16 and cfg.lora.r > 0 else torch.float32
    # FSDP: only rank 0 reads the weights (onto the host); the others build the student on the
    # meta device, and each rank receives its shards from rank 0 (fsdp.shard_student).
    model = load_student(
        cfg, info, infos.get("data.eval"), frozen_dtype=frozen, on_meta=fsdp and not dist.main
    )
    if not cfg.lora.load_in_4bit and not fsdp:  # 4-bit weights are placed as they load
        model = model.to(dist.device)
    module: torch.nn.Module = DistillStudent(model, plan)
    student = module
    if fsdp:
        module = fsdp_.shard_student(module, dist.device)  # in place: module is student
    elif dist.world > 1:
        module = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )
    o = cfg.optim
    optimizer = make_optimizer(model, o, dist.device)
    # train.stop_after bounds one invocation, not the run: the config saved with the run
    # (which `--config <output>/resolved_config.yaml --resume` reads back) runs to the end.
    saved = replace(cfg, train=replace(cfg.train, stop_after=0))
    step = 0
    # What draws from the RNG in training (dropout, LoRA's included) depends on the seed and
    # the rank only; a checkpoint restores each rank's state.
    torch.manual_seed(cfg.train.seed * 1000 + dist.rank)
    if ckpt is not None:
        saved_cfg = yaml.safe_load((ckpt / CONFIG_NAME).read_text())
        check_resumable(saved_cfg, cfg, ckpt)
        state, rng = load_checkpoint(
            ckpt, model=model, optimizer=optimizer, adapter=cfg.lora.r > 0, sharded=fsdp
        )
        # The stream first: it refuses another order before any resharding.
        loader.load_state_dict(state["stream"])
        if fsdp:
            fsdp_.load_sharded(ckpt, module, optimizer)
        step = int(state["step"])
        steps = resumed_steps(cfg, saved_cfg, loader, dist, step)
        # A rank the checkpointed run did not have keeps the seed set above.
        if f"cpu.rank{dist.rank}" in rng:
            torch.set_rng_state(rng[f"cpu.rank{dist.rank}"])
        if dist.device.type == "cuda" and f"cuda.rank{dist.rank}" in rng:
            torch.cuda.set_rng_state(rng[f"cuda.rank{dist.rank}"], dist.device)
    else:
        steps = total_steps(cfg, loader, dist)
    if dist.main:
        if restart:
            print(
                f"--resume: no checkpoint in {out / 'checkpoints'} yet (the run stopped before "
                f"its first one); starting over from step 0",
                file=sys.stderr,
            )
        out.mkdir(parents=True, exist_ok=True)
        saved.dump(out / CONFIG_NAME)
        if resume:
            truncate_jsonl(metrics_path, step if ckpt else -1)
    # Rank 0's scalars, also as TensorBoard events; on resume, readers drop the steps redone.
    board = None
    if dist.main and cfg.log.tensorboard:
        board = open_writer(out, purge_step=step + 1 if ckpt else (0 if resume else None))

    def log(record: dict[str, Any]) -> None:
        append_jsonl(metrics_path, record)
        if board is not None:
            write_scalars(board, record)

    if resume and cfg.log.example_ids:
        truncate_jsonl(ids_path, step if ckpt else -1)
        if dist.main:  # ranks the checkpointed run had and this one has not
            for path in out.glob("examples-rank*.jsonl"):
                if int(path.stem.removeprefix("examples-rank")) >= dist.world:
                    truncate_jsonl(path, step if ckpt else -1)

    def autocast() -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=bf16)

    def run_eval() -> None:
        if cfg.data.eval is None:
            return
        model.eval()
        # Scored on its exact top-k and tail mass (plan.topk_tail), never on draws.
        eval_loader = make_loader(cfg, cfg.data.eval, eval_info, dist, train=False, pad_id=pad_id)
        # FSDP: the lm_head (root group) is read outside forward, so gather it for the eval.
        full = fsdp_.unsharded(module) if fsdp else contextlib.nullcontext()
        with autocast(), full:
            result = evaluate(
                eval_loader,
                lambda b: student.hidden(b.input_ids, b.attention_mask, b.positions),
                model.get_output_embeddings(),
                device=dist.device,
                tail=plan.topk_tail,
                temperature=plan.loss.temperature,
                chunk_size=plan.loss.chunk_size,
                max_batches=cfg.log.eval_batches,
                all_reduce=dist.sum,
            )
        model.train()
        if dist.main:
            log({"step": step, **{f"eval/{k}": v for k, v in result.items()}})
            if result["positions"]:
                kl = kl_label(eval_info.targets.kind == "sampled")
                bar.write(
                    f"step {step}: eval {kl} {result['kl']:.4f}  CE {result['ce']:.4f}  "
                    f"top-1 {result['top1']:.3f}"
                )
            else:
                bar.write(f"step {step}: {_nothing_to_score(cfg, result)}", file=sys.stderr)

    def checkpoint() -> None:
        states = dist.gather(loader.state_dict())
        rngs = dist.gather(_rng_state(dist.device))
        tmp = None
        if fsdp:  # every rank writes its shards into one temporary folder
            tmp = sharded_tmp(out, step)
            if dist.main:
                shutil.rmtree(tmp, ignore_errors=True)
            dist.barrier()
            fsdp_.save_sharded(tmp, module, optimizer)
            dist.barrier()
        if not dist.main:
            return
        rng = {f"{name}.rank{r}": t for r, d in enumerate(rngs) for name, t in d.items()}
        save_checkpoint(
            out,
            step,
            model=model,
            optimizer=optimizer,
            config=saved,
            state={"stream": StreamLoader.merge_states(states)},
            rng=rng,
            keep=cfg.log.keep_checkpoints,
            sharded=tmp,
        )

    bar = tqdm(
        total=steps,
        initial=step,
        disable=not (dist.main and cfg.log.progress),
        unit="step",
        dynamic_ncols=True,
    )
    batches: Iterator[Batch] = iter(loader)
    # What a rank trains on in the last steps of an epochs run once its own batches are spent.
    idle = idle_batch(info, pad_id=pad_id, tail_draws=plan.tail_draws)
    idle.epoch = math.ceil(cfg.train.epochs) - 1
    if step == 0:
        run_eval()
    model.train()
    stop_at = min(steps, cfg.train.stop_after) if cfg.train.stop_after else steps
    while step < stop_at:
        t0 = time.perf_counter()
        micro = list(itertools.islice(batches, o.grad_accum))
        idling = not micro  # this rank's share of the run ended before another rank's
        micro = micro or [idle]
        data_s = time.perf_counter() - t0  # time the loop waited for data: ~0 with prefetch
        # Position-weighted mean over the whole step: every rank needs the global count first.
        n_local = float(sum(b.num_positions for b in micro))
        n_global = float(dist.sum(torch.tensor([n_local], device=dist.device))[0])
        global_positions = max(n_global, 1.0)
        lr = lr_at(step, cfg, steps)
        set_lr(optimizer, lr)
        loss_sums = torch.zeros(3, dtype=torch.float64, device=dist.device)  # total, kd, ce
        tokens = rows = 0
        for i, batch in enumerate(micro):
            batch = batch.to(dist.device, non_blocking=True)
            last = i == len(micro) - 1
            no_sync = dist.world > 1 and not last  # reduce gradients once, after the last
            if fsdp:
                module.set_requires_gradient_sync(not no_sync)  # type: ignore[operator]
            with module.no_sync() if no_sync and not fsdp else contextlib.nullcontext():  # type: ignore[operator]
                with autocast():
                    total, kd, ce = module(
                        batch.input_ids,
                        batch.attention_mask,
                        batch.positions,
                        batch.labels,
                        batch.targets,
                    )
                n = batch.num_positions
                # DDP (and FSDP) average gradients over ranks; scale back to a sum, then divide.
                (total * (n * dist.world / global_positions)).backward()
            loss_sums += torch.stack([total.detach(), kd, ce]).double() * n
            if idling:
                continue
            tokens, rows = tokens + batch.num_tokens, rows + len(batch.ids)
            if cfg.log.example_ids:
                seen = {"step": step + 1, "micro": i, "epoch": batch.epoch, "ids": batch.ids}
                append_jsonl(ids_path, seen)
        grad_norm = clipped_step(model, optimizer, o)
        if fsdp:  # a DTensor over the ranks' shards
            grad_norm = grad_norm.full_tensor()  # type: ignore[attr-defined]
        step += 1
        counts = torch.tensor([tokens, rows], dtype=torch.float64, device=dist.device)
        sums = dist.sum(torch.cat([loss_sums, counts]))
        dt = time.perf_counter() - t0
        record = {
            "step": step,
            # A step without a loss position (every target dropped) has no loss: null, not 0.
            "loss": float(sums[0]) / n_global if n_global else None,
            "kd": float(sums[1]) / n_global if n_global else None,
            "ce": float(sums[2]) / n_global if n_global else None,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "positions": int(n_global),
            "tokens": int(sums[3]),
            "examples": int(sums[4]),
            "epoch": micro[-1].epoch,
            "tokens_per_s": float(sums[3]) / dt,
            "data_s": data_s,
        }
        if dist.device.type == "cuda":  # this rank's high-water mark so far (torchtune's name)
            record["peak_memory_alloc_gib"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
        if dist.main:
            log(record)
            shown = "none" if record["loss"] is None else f"{record['loss']:.4f}"
            bar.set_postfix(loss=shown, tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
        is_last = step == steps
        if (cfg.log.eval_every and step % cfg.log.eval_every == 0) or is_last:
            run_eval()
        if (cfg.log.checkpoint_every and step % cfg.log.checkpoint_every == 0) or is_last:
            checkpoint()
    bar.close()
    if board is not None:
        board.close()

    finished = step == steps
    if finished and not cfg.train.steps:
        # The count was exact: the run trained on every batch of its epochs, none is left.
        assert next(batches, None) is None, "train.epochs: batches left after the last step"
    # FSDP: every rank takes part in gathering the full weights; rank 0 writes them.
    full_state = fsdp_.full_model_state(module) if finished and fsdp else None
    if finished and dist.main:
        if full_state is not None:
            model.save_pretrained(out / FINAL_NAME, state_dict=full_state)
        elif cfg.lora.r > 0:
            # The adapter folder, and with lora.merge a merged model in final-merged/.
            # A reduced-precision base is merged into from its fp32 weights.
            reduced = cfg.lora.load_in_4bit or frozen != torch.float32
            base = cfg.model.path if reduced else None
            save_final_lora(model, out / FINAL_NAME, merge=cfg.lora.merge, base=base)
            if cfg.lora.merge:
                tokenizer.save_pretrained(out / MERGED_NAME)
        else:
            model.save_pretrained(out / FINAL_NAME)
        tokenizer.save_pretrained(out / FINAL_NAME)
        if cfg.log.plot:
            try:
                plot_metrics(metrics_path, cfg.log.plot)
            except (OSError, ValueError) as e:  # checked up front; the run is saved regardless
                code = (
                    "from logitcache.train.metrics import plot_metrics; "
                    f"plot_metrics({str(metrics_path)!r}, {cfg.log.plot!r})"
                )
                print(
                    f"log.plot={cfg.log.plot!r}: the loss curves could not be written ({e}); "
                    f"the run is saved. To plot them, run: python -c {shlex.quote(code)}",
                    file=sys.stderr,
                )
    if dist.world > 1:
        torch.distributed.barrier()
    dist.close()
    return {"step": step, "steps": steps, "finished": finished, "output": str(out)}
