"""The training loop behind ``deltanet train``: one process or many (torchrun), CPU or GPU.

Order of events: run directory (a ``--resume`` of a finished run stops here) → tokenizer
(trained BPE, or given) → token cache → config.json (a failed start leaves no run folder) →
model (fresh, or from the latest checkpoint) → DDP / FSDP2 → AdamW → loop (micro-batches with
gradient accumulation, clipping, cosine schedule, logging, periodic validation and
checkpoints) → final validation → last checkpoint → loss plot → sample. A run killed after
its last checkpoint is therefore complete on disk.

Determinism: the rows of global step ``s``, micro-step ``m`` are positions
``[(s*A + m) * W*B, (s*A + m + 1) * W*B)`` of a seeded per-epoch permutation, rank ``r``
taking the ``r``-th slice of ``B``. So a resumed run sees exactly the rows an uninterrupted
one would, and ``W`` processes with batch ``B`` see the rows of one process with ``W*B``.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .checkpoint import (CheckpointError, capture_rng, find_checkpoint, list_checkpoints, load_model,
                         load_training_state, read_trainer_state, removing_new_files_on_failure, restore_rng,
                         save_checkpoint, write_text_atomic)
from .config import ConfigError, RunConfig, auto_lr
from .core import AdamWConfig, LRSchedule, amp_dtype, autocast, build_adamw, lr_at, set_lr, train_step
from .data import (DataError, PackedTokens, build_token_cache, eval_positions, format_stats, make_batch, open_corpus,
                   prepare_tokenizer)
from .distributed import Dist, configure_cpu_threads, context_parallel_batch, context_parallel_group, setup, wrap_model
from .metrics import MetricsLog, last_validation, plot_losses, time_left
from .tokenizer import load_tokenizer

__all__ = ["TrainResult", "lr_at", "train"]

# Peak dense bf16 FLOP/s by GPU name, for MFU (vendor spec sheets).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}
# Run-config keys that change what the model or the data stream is; resuming with a different
# value would silently train something else.
_INCOMPATIBLE = ("preset", "model", "data", "tokenizer", "vocab_size", "seq_len", "val_fraction", "doc_mask",
                 "grad_accum", "seed")
# Model fields that change how a step is computed, not what it computes: a run may resume with others
# (a run started when the fused loss was off by default resumes with it on).
_RUNTIME_MODEL_FIELDS = ("activation_checkpointing", "fuse_linear_cross_entropy")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val: dict | None
    sample: str
    interrupted: bool
    tokens_per_s: float
    signum: int = 0  # the signal that interrupted the run (SIGINT / SIGTERM), else 0
    already_complete: bool = False  # --resume of a run that had reached its end: nothing was trained


def _pad_vocab(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple  # tensor-core friendly embedding / head


def _flops_per_token(model, seq_len: int) -> float:
    """6·N for the matmuls (input embedding excluded, output head included) + the mixers' extra."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    if not cfg.tie_word_embeddings:
        n -= model.get_input_embeddings().weight.numel()
    flops = 6.0 * n
    d_head = cfg.hidden_size // cfg.num_heads
    for kind in getattr(cfg, "layer_types", None) or ():  # another library's model: 6·N only
        if kind == "delta_net":  # chunkwise: 6·d² + 10·C·d per head forward (delta_rule/README.md §5), ×3 fwd+bwd
            flops += 3 * cfg.num_heads * (6 * d_head * d_head + 10 * 64 * d_head)
        elif kind in ("full_attention", "sliding_attention"):
            ctx = seq_len if kind == "full_attention" else min(seq_len, cfg.sliding_window or seq_len)
            flops += 6 * cfg.num_heads * d_head * ctx  # QKᵀ and PV, causal half, fwd+bwd
    return flops


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and leaves after the current step."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def train(cfg: RunConfig, *, model_factory: Callable[[int], Any] | None = None,
          stop_at: float | None = None) -> TrainResult:
    """Train as configured (see :class:`RunConfig`); returns the final validation and sample.

    ``model_factory`` trains a model that is not a preset (e.g. another library's Hugging Face
    causal LM, as a yardstick): called with the (padded) vocabulary size, it returns a fresh
    model taking ``input_ids``, ``labels``, ``cu_seqlens`` and ``use_cache`` and returning
    ``.loss`` / ``.logits``; on resume its weights are loaded from the checkpoint. ``preset`` and
    ``model`` of the config are then only labels.

    ``stop_at`` (a ``time.time()`` value) pauses the run like SIGTERM: checkpoint, then return
    with ``interrupted=True``; unlike ``max_time_s`` it leaves the learning-rate schedule alone,
    so a run paused and resumed follows the same schedule as one run straight through.

    >>> # cfg = RunConfig.from_dict({"max_steps": 50, "tokenizer": "bytes", "out": "runs/x"}); train(cfg)
    """
    cfg.validate()
    d = setup(cfg.train.device)
    try:
        return _Run(cfg, d, model_factory, stop_at).run()
    finally:
        d.close()


class _Run:
    def __init__(self, cfg: RunConfig, d: Dist, model_factory=None, stop_at: float | None = None):
        self.cfg, self.d = cfg, d
        self.tc, self.dc, self.oc = cfg.train, cfg.data, cfg.optim
        self.model_factory, self.stop_at = model_factory, stop_at

    def log(self, msg: str) -> None:
        if self.d.is_main:
            print(msg, file=sys.stderr, flush=True)

    # -- setup -------------------------------------------------------------------------------
    def _run_dir(self) -> Path:
        out = self.tc.out or self.d.broadcast_object(f"runs/{self.tc.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir = Path(out)
        has_ckpt = bool(list_checkpoints(run_dir))
        if self.tc.resume:
            if not has_ckpt:
                raise CheckpointError(f"--resume: no checkpoint in {run_dir}")
            saved = json.loads((run_dir / "config.json").read_text())
            self._check_compatible(saved)
        elif has_ckpt:
            raise CheckpointError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
        return run_dir

    def _write_config(self, run_dir: Path) -> None:
        if self.d.is_main:
            conf = {**self.cfg.to_dict(), "world_size": self.d.world_size, "threads": self.threads}
            # atomic: each resume rewrites it, and a kill mid-write must not leave half a file
            write_text_atomic(run_dir / "config.json", json.dumps(conf, indent=1) + "\n")
        self.d.barrier()

    def _already_complete(self, run_dir: Path, ckpt: Path, state: dict) -> TrainResult | None:
        """``--resume`` of a run whose checkpoint is its end: report it, train nothing."""
        tc, step, elapsed = self.tc, state["step"], state.get("elapsed_s", 0.0)
        if step < tc.max_steps and not (tc.max_time_s and elapsed >= tc.max_time_s):
            return None
        why = (f"max_steps={tc.max_steps}" if step >= tc.max_steps else f"its time budget of {tc.max_time_s:g}s")
        self.log(f"{run_dir} is already complete: {ckpt.name} reached {why}; nothing to train "
                 f"(pass a larger --max-steps or --max-time-s with --resume to continue it)")
        if self.d.is_main and (run_dir / "metrics.jsonl").is_file():
            plot_losses(run_dir)  # a run killed after its last checkpoint may not have written it
        return TrainResult(run_dir, step, last_validation(run_dir), "", False, 0.0, already_complete=True)

    def _check_compatible(self, saved: dict) -> None:
        now = self.cfg.to_dict()
        for key in _INCOMPATIBLE:
            sec = next(s for s in RunConfig.SECTIONS if key in now[s])
            old, new = saved.get(sec, {}).get(key), now[sec][key]
            if key == "model" and isinstance(old, dict):
                old, new = ({k: v for k, v in d.items() if k not in _RUNTIME_MODEL_FIELDS} for d in (old, new))
            if old != new:
                raise CheckpointError(f"cannot resume: {key} is {new!r} but the run was started with {old!r}")
        old_global = saved["train"]["batch_size"] * saved.get("world_size", 1) // saved["train"].get("context_parallel", 1)
        new_global = self.tc.batch_size * self.d.world_size // self.tc.context_parallel
        if old_global != new_global:
            raise CheckpointError(f"cannot resume: global batch (batch_size x processes) is {new_global} "
                                  f"but the run was started with {old_global}")

    def _tokenizer(self, run_dir: Path, corpus):
        # decided on the main process only: another rank looking later would see its file
        if self.d.broadcast_object(not (run_dir / "tokenizer_meta.json").is_file()):
            if self.d.is_main:
                prepare_tokenizer(self.dc, corpus, log=self.log).save(run_dir)
            self.d.barrier()
        return load_tokenizer(run_dir)

    def _data(self, corpus, tokenizer):
        if self.d.is_main:
            t0 = time.time()
            cache = build_token_cache(corpus, tokenizer, self.dc.resolved_cache_dir(), progress=self.tc.progress,
                                      workers=self.dc.data_workers, log=self.log)
            m = cache.meta
            if m["train_docs"] == 0:
                raise DataError(f"no usable training text in {self.dc.data} ({format_stats(m)})")
            self.log(f"token cache {'reused' if cache.reused else 'built'}: {cache.path} [{time.time() - t0:.1f}s]\n"
                     f"data {self.dc.data}: {format_stats(m)}")
        self.d.barrier()
        cache = build_token_cache(corpus, tokenizer, self.dc.resolved_cache_dir(), progress=False)
        train = PackedTokens(cache.tokens("train"), self.dc.seq_len, seed=self.tc.seed)
        val = PackedTokens(cache.tokens("val"), self.dc.seq_len, shuffle=False)
        for name, p in (("training", train), ("validation", val)):
            if p.n_rows == 0:
                raise DataError(f"the {name} split of {self.dc.data} has {len(p.tokens)} tokens, "
                                f"fewer than seq_len={self.dc.seq_len}")
        return train, val

    def _model_config(self, vocab_size: int):
        from deltanet.models import get_config

        try:
            return get_config(self.tc.preset, vocab_size=vocab_size, **self.tc.model)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model: {str(e).splitlines()[0]}") from None

    def _model(self, vocab_size: int, ckpt: Path | None):
        if self.model_factory is not None:
            torch.manual_seed(self.tc.seed)
            model = self.model_factory(vocab_size)
            if ckpt is not None:
                from safetensors.torch import load_model as load_weights

                load_weights(model, str(ckpt / "model.safetensors"))
            return model
        config = self._model_config(vocab_size)
        if ckpt is None:
            from deltanet.models import DeltaNetForCausalLM

            torch.manual_seed(self.tc.seed)
            return DeltaNetForCausalLM(config)
        model = load_model(ckpt)
        ignore = {"transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path",
                  *_RUNTIME_MODEL_FIELDS}
        a, b = config.to_dict(), model.config.to_dict()
        for k in sorted(set(a) | set(b)):
            if k not in ignore and a.get(k) != b.get(k):
                raise CheckpointError(f"cannot resume: model {k} is {a.get(k)!r} but the checkpoint has {b.get(k)!r}")
        for k in _RUNTIME_MODEL_FIELDS:  # this run's setting, not the checkpoint's
            setattr(model.config, k, getattr(config, k))
        return model

    def _optimizer(self, model):
        oc = self.oc
        return build_adamw(model.parameters(), AdamWConfig(lr=self.peak_lr, weight_decay=oc.weight_decay,
                                                           betas=(oc.beta1, oc.beta2), eps=oc.eps),
                           device=self.d.device)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        tc, d = self.tc, self.d
        if self.model_factory is None:
            self._model_config(256)  # a bad preset / override fails now, not after tokenising
        run_dir = self._run_dir()
        ckpt = find_checkpoint(run_dir) if tc.resume else None
        ckpt_state = read_trainer_state(ckpt) if ckpt is not None else {}
        if ckpt is not None and (done := self._already_complete(run_dir, ckpt, ckpt_state)) is not None:
            return done
        self.threads = None
        if d.device.type == "cpu":
            # Bit-exact resume on CPU needs the thread count the run started with (float sums
            # are split differently otherwise): reuse the recorded one unless --threads is given.
            recorded = ckpt_state.get("threads")
            note = configure_cpu_threads(tc.threads or recorded or 0, d.world_size)
            if recorded and not tc.threads:
                note += " as recorded by the run"
            self.threads = torch.get_num_threads()
        # creates run_dir; a failed start (missing or unusable data, ...) leaves no half-made run folder
        with removing_new_files_on_failure(run_dir, enabled=d.is_main):
            d.barrier()
            corpus = open_corpus(self.dc.data, self.dc.val_fraction)
            self.log(corpus.describe())  # the file-list fingerprint: did two runs see the same data?
            tokenizer = self._tokenizer(run_dir, corpus)
            train_rows, val_rows = self._data(corpus, tokenizer)
            self._write_config(run_dir)
        # context parallelism: groups of consecutive ranks share rows; data-parallel rank = group index
        self.cp, self.dp_rank, self.dp_size = context_parallel_group(d, tc.context_parallel)
        # train mode explicitly: from_pretrained (the resume path) returns the model in eval mode, where
        # the fused loss and activation checkpointing are off, so a resumed run would train through
        # other code (other float sums, more memory) than the run it continues
        raw = self._model(_pad_vocab(tokenizer.vocab_size), ckpt).to(d.device).train()
        model = wrap_model(raw, d, fsdp=tc.fsdp)
        fwd = torch.compile(model) if tc.compile else model
        self.peak_lr = self.oc.lr or auto_lr(raw.config.hidden_size)
        opt = self._optimizer(model)
        n_params = sum(p.numel() for p in raw.parameters())
        step, elapsed0, self.saved_step = 0, 0.0, None
        if ckpt is not None:
            state = load_training_state(ckpt)
            self._load_optimizer(model, opt, state["optimizer"])
            step, elapsed0 = state["trainer"]["step"], state["trainer"].get("elapsed_s", 0.0)
            ranks = state["rng"]
            restore_rng(ranks[d.rank] if d.rank < len(ranks) else ranks[0])
            self.saved_step = step
            self.log(f"resumed {run_dir} from {ckpt.name}")
        threads = f", {note}" if d.device.type == "cpu" else ""
        self.log(f"model {tc.preset}: {n_params / 1e6:.2f}M parameters, {d.world_size} process(es) on {d.device}{threads}, "
                 f"{tc.batch_size}x{self.dc.seq_len} tokens x {tc.grad_accum} accum per process, "
                 f"peak lr {self.peak_lr:g}{'' if self.oc.lr else ' (auto)'}")
        self.amp_dtype = amp_dtype(d.device, tc.dtype)
        schedule = LRSchedule(self.peak_lr, tc.max_steps, self.oc.warmup, self.oc.min_lr_ratio)
        metrics = MetricsLog(run_dir, d.is_main, resume_step=step)
        tok_per_step = tc.batch_size * self.dc.seq_len * tc.grad_accum * self.dp_size
        flops_tok = _flops_per_token(raw, self.dc.seq_len)
        peak = _peak_flops(d.device)
        bar = None
        if d.is_main and tc.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=tc.max_steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr)
        t_start, step0 = time.time(), step
        tps_ema, last_val, last_loss, interrupted = 0.0, None, None, False
        with _StopFlag() as stop:
            while step < tc.max_steps:
                elapsed = elapsed0 + time.time() - t_start
                halt = float(stop.signum or (self.stop_at is not None and time.time() >= self.stop_at))
                flags = d.all_reduce_(torch.tensor([halt, elapsed], device=d.device), op=torch.distributed.ReduceOp.MAX)
                if flags[0] > 0:
                    interrupted = True
                    break
                if tc.max_time_s and flags[1] >= tc.max_time_s:
                    self.log(f"time budget of {tc.max_time_s:.0f}s reached at step {step}")
                    break
                frac = None  # with a time budget the cosine follows whichever of time / steps runs out first
                if tc.max_time_s:
                    frac = max(float(flags[1]) / tc.max_time_s,
                               (step - self.oc.warmup) / max(1, tc.max_steps - self.oc.warmup))
                lr = schedule.lr(step, frac)
                t0 = time.time()
                loss, gnorm = self._step(fwd, model, opt, train_rows, tokenizer.eos_id, step, lr)
                if d.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.time() - t0
                step += 1
                last_loss = loss
                tps = tok_per_step / dt
                tps_ema = tps if tps_ema == 0 else 0.9 * tps_ema + 0.1 * tps
                mfu = tps_ema * flops_tok / (peak * d.world_size) if peak else None
                rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": gnorm, "tokens": step * tok_per_step,
                       "tok_per_s": round(tps, 1), "elapsed_s": round(elapsed0 + time.time() - t_start, 3)}
                if mfu is not None:
                    rec["mfu"] = round(mfu, 4)
                if step % tc.eval_every == 0 or step == tc.max_steps:
                    last_val = self._validate(model, val_rows, tokenizer)
                    rec.update({f"val_{k}": v for k, v in last_val.items() if k in ("loss", "bpb", "ppl")})
                if step % tc.log_every == 0 or "val_loss" in rec or step == 1:
                    metrics.write(rec)
                if bar is not None:
                    post = {"loss": f"{loss:.3f}", "tok/s": f"{tps_ema:,.0f}"}
                    if mfu is not None:
                        post["mfu"] = f"{100 * mfu:.1f}%"
                    if last_val:
                        post["val"] = f"{last_val['loss']:.3f}"
                    if tc.max_time_s:  # the bar's own ETA counts steps; the time budget may end the run first
                        left = time_left(step - step0, time.time() - t_start, tc.max_steps - step,
                                         tc.max_time_s - rec["elapsed_s"])
                        post["left"] = f"{left:.0f}s"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if tc.save_every and step % tc.save_every == 0 and step < tc.max_steps:
                    self._save(run_dir, step, raw, model, opt, tokenizer, elapsed0 + time.time() - t_start)
        if bar is not None:
            bar.close()
        if not interrupted and not metrics.has_val(step):  # stopped by the time budget: validate the final weights
            # before the last checkpoint, so that a run killed after it is complete on disk
            last_val = self._validate(model, val_rows, tokenizer)
            metrics.write({"step": step, **({"loss": last_loss} if last_loss is not None else {}), "final": True,
                           **{f"val_{k}": last_val[k] for k in ("loss", "bpb", "ppl")}})
        metrics.close()
        self._save(run_dir, step, raw, model, opt, tokenizer, elapsed0 + time.time() - t_start)
        if d.is_main:
            plot_losses(run_dir)
        if interrupted:
            why = f"interrupted by signal {stop.signum}" if stop.signum else "paused at the stop_at deadline"
            self.log(f"{why} at step {step}: checkpoint saved; "
                     f"continue with: deltanet train --out {run_dir} --resume")
            return TrainResult(run_dir, step, None, "", True, tps_ema, signum=stop.signum)
        sample = self._sample(raw, tokenizer)
        return TrainResult(run_dir, step, last_val, sample, False, tps_ema)

    def _step(self, fwd, model, opt, rows: PackedTokens, eos_id: int, step: int, lr: float):
        tc, d = self.tc, self.d
        set_lr(opt, lr)
        W, B, A = self.dp_size, tc.batch_size, tc.grad_accum
        # DDP averages gradients over all ranks; under context parallelism a group's loss shares
        # add up to the group's mean, so each share is scaled by the group size for the backward
        cp_scale = tc.context_parallel if self.cp is not None else 1

        def micro_loss(m: int) -> torch.Tensor:
            start = (step * A + m) * W * B + self.dp_rank * B
            batch = make_batch(rows.rows(np.arange(start, start + B)), eos_id, self.dc.doc_mask)
            batch = {k: v.to(d.device, non_blocking=True) for k, v in batch.items()}
            if self.cp is not None:
                batch = context_parallel_batch(batch, self.cp)
            with autocast(d.device, self.amp_dtype):
                loss = fwd(**batch, use_cache=False).loss
            return loss * cp_scale if cp_scale != 1 else loss

        # model.parameters() is read after the backward: FSDP2 swaps the module's parameters
        out = train_step(opt, model.parameters(), micro_loss, accum=A, grad_clip=self.oc.grad_clip,
                         sync=lambda last: self._no_sync(model, last))
        d.all_reduce_(out.loss)
        return float(out.loss) / (W * cp_scale), float(out.grad_norm)

    @contextlib.contextmanager
    def _no_sync(self, model, last: bool):
        # Gradient accumulation: all-reduce only on the last micro-step.
        if not self.d.enabled or last:
            yield
        elif self.tc.fsdp:
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        else:
            with model.no_sync():
                yield

    def _validate(self, model, val: PackedTokens, tokenizer) -> dict:
        from deltanet.evaluation.perplexity import evaluate_rows, summarize

        d, B = self.d, self.tc.batch_size
        rows = eval_positions(val.n_rows, self.tc.eval_batches * B * d.world_size)
        n = len(rows)
        # FSDP needs every rank in every forward: give all ranks the same number of batches
        mine = rows[d.rank::d.world_size]
        n_batches = math.ceil(math.ceil(n / d.world_size) / B)
        batches = [mine[i * B:(i + 1) * B] for i in range(n_batches)]
        total = torch.zeros(3, dtype=torch.float64, device=d.device)
        for b in batches:
            part = evaluate_rows(model, [val.rows(b if len(b) else np.arange(1))], eos_id=tokenizer.eos_id,
                                 token_bytes=tokenizer.token_bytes(), device=d.device, doc_mask=self.dc.doc_mask,
                                 autocast_dtype=self.amp_dtype)
            if len(b):  # an empty slice is only a stand-in so every rank runs the same forwards
                total += part
        return summarize(d.all_reduce_(total))

    def _load_optimizer(self, model, opt, state: dict) -> None:
        if self.d.enabled and self.tc.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(state)

    def _save(self, run_dir, step, raw, model, opt, tokenizer, elapsed) -> None:
        d = self.d
        if step == self.saved_step:
            # Interrupted before its first step after a resume: the checkpoint it resumed from is
            # this state. Re-saving it would briefly leave `latest` pointing at a moved folder.
            return
        self.saved_step = step
        if d.enabled and self.tc.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            o = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state, opt_state = get_model_state_dict(model, options=o), get_optimizer_state_dict(model, opt, options=o)
        else:
            model_state, opt_state = raw.state_dict(), opt.state_dict()
        rngs = d.gather_objects(capture_rng())
        if d.is_main:
            trainer_state = {"step": step, "elapsed_s": elapsed,
                             "data_position": step * self.tc.grad_accum * self.tc.batch_size * self.dp_size,
                             "schedule": {"step": step, "max_steps": self.tc.max_steps},
                             "world_size": d.world_size, "threads": self.threads, "config": self.cfg.to_dict()}
            save_checkpoint(run_dir, step, model=raw, model_state=model_state, optimizer_state=opt_state,
                            trainer_state=trainer_state, rng_states=rngs, tokenizer=tokenizer,
                            keep=self.tc.keep_checkpoints)
        d.barrier()

    def _sample(self, raw, tokenizer) -> str:
        from .generation import generate_text

        if not self.tc.sample_tokens or (self.d.enabled and self.tc.fsdp):
            return ""  # a sharded model can't generate on one rank
        if not self.d.is_main:
            return ""
        from deltanet.models.decoding import clear_decode_graphs

        text = generate_text(raw, tokenizer, self.tc.sample_prompt, max_new_tokens=self.tc.sample_tokens,
                             temperature=0.8, top_p=0.95, seed=self.tc.seed)
        clear_decode_graphs(raw)  # the sample's kept decode step and cache must not hold memory through training
        return text


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)
