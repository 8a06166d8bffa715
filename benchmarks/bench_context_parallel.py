"""Context parallelism (the delta rule op; whole models): throughput, peak memory and accuracy vs one device.

Launched by torchrun, one process per GPU (NCCL), bf16. For each sequence length T:

- ``single``: rank 0 alone runs ``delta_rule`` forward + backward on the whole ``[B, T, H, D]``
  (the other ranks wait): time per step, tokens/s, peak memory (or the error, e.g. out of memory);
- ``cp``: every rank runs ``context_parallel_delta_rule`` on its ``T / R`` segment: step time
  (the slowest rank's), tokens/s of the whole sequence, peak memory per GPU (max over ranks);
- ``accuracy`` (lengths up to ``--check-max-len``): the gathered CP output and the gathered
  gradients of q, k, v, beta (and g) against a float32 single-device run, next to the error of
  the plain single-device bf16 run against the same reference (ratio ~1 expected).

With ``--models`` (presets, e.g. ``hybrid-swa-340m,hybrid-global-340m,deltanet-340m``) the same
three parts run for whole language models (``model(input_ids, labels)`` forward + backward, no
optimizer step, no gradient all-reduce in either): ``<preset> single`` on rank 0,
``<preset> cp`` with ``context_parallel=`` over all ranks (delta layers exchange state summaries,
attention layers their K/V halos), and ``<preset> accuracy`` (up to ``--model-check-max-len``):
the loss and the group-summed gradients of every parameter against a float32 copy of the model
on one device, next to the same errors of the 1-device run. ``--skip-op`` leaves out the op parts.

``--doc-len N``: every part runs on packed documents (batch 1, ``cu_seqlens`` of the whole row,
document lengths drawn uniformly from 1 to 2N - 1 once per T, the same on every rank), so
documents start anywhere in the segments and span ranks; with ``--model-override
activation_checkpointing="block"`` (or ``"mixer"``) the model parts recompute in backward.

Every part is in try/except (the failure is recorded and the script carries on); results are
rewritten after each part to ``OUT/context_parallel.json`` and ``OUT/context_parallel.md``;
``--budget-s`` stops starting new lengths once spent. A rank that fails inside a collective
(e.g. out of memory on one GPU only) can stall the others until the process-group timeout
(``--timeout-s``); the lengths run in increasing order so the earlier results are kept.

GPU (H100 x 2/4/8)::

    torchrun --nproc-per-node 4 benchmarks/bench_context_parallel.py --out results_cp \\
        --lengths 32768,65536,131072 --heads 16 --head-dim 128 --gated

Hybrid models, bf16 parameters (H100 x 2/4/8)::

    torchrun --nproc-per-node 4 benchmarks/bench_context_parallel.py --out results_cp_models --skip-op \\
        --models hybrid-swa-340m,hybrid-global-340m,deltanet-340m --lengths 16384,32768,65536

Packed documents of ~4K tokens under activation checkpointing (H100 x 2/4/8)::

    torchrun --nproc-per-node 4 benchmarks/bench_context_parallel.py --out results_cp_packed --doc-len 4096 \
        --models hybrid-swa-340m,deltanet-340m --model-override 'activation_checkpointing="block"' \
        --lengths 16384,32768,65536 --heads 16 --head-dim 128 --gated

CPU smoke run (gloo, float32, tiny; checks the script end to end)::

    torchrun --nproc-per-node 2 benchmarks/bench_context_parallel.py --device cpu --out /tmp/cp \\
        --lengths 128,256 --heads 2 --head-dim 16 --iters 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from deltanet.models import DeltaNetForCausalLM, get_config  # noqa: E402
from deltanet.ops import delta_rule  # noqa: E402
from deltanet.parallel import context_parallel_delta_rule, gather_segments, split_segment  # noqa: E402

GIB = 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for context_parallel.json / .md")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--lengths", default="32768,65536,131072", help="comma-separated sequence lengths T")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128, help="K = V")
    p.add_argument("--gated", action="store_true", help="gated delta rule (g = log decay)")
    p.add_argument("--dtype", default=None, help="bfloat16 (default on cuda) or float32 (default on cpu)")
    p.add_argument("--iters", type=int, default=5, help="timed steps per measurement (after 2 warm-up steps)")
    p.add_argument("--check-max-len", type=int, default=65536, help="accuracy check up to this T")
    p.add_argument("--budget-s", type=float, default=1500.0, help="no new length starts after this many seconds")
    p.add_argument("--timeout-s", type=float, default=600.0, help="process-group timeout")
    p.add_argument("--models", default="", help="comma-separated model presets to run as whole models")
    p.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE",
                   help="a model config field for every preset (JSON value, else a string); repeatable")
    p.add_argument("--model-batch", type=int, default=1, help="rows per model step")
    p.add_argument("--model-check-max-len", type=int, default=8192, help="model accuracy check up to this T")
    p.add_argument("--skip-op", action="store_true", help="only the model parts")
    p.add_argument("--doc-len", type=int, default=0,
                   help="pack documents of about this many tokens (cu_seqlens; batch 1); 0 = plain rows")
    args = p.parse_args(argv)
    if args.doc_len < 0 or (args.doc_len and (args.batch != 1 or args.model_batch != 1)):
        p.error("--doc-len takes a positive length and --batch 1 --model-batch 1 (documents are packed along T)")
    return args


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--model-override expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


class Run:
    def __init__(self, args):
        self.args = args
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
        self.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
        self.out = Path(args.out)
        self._documents = {}  # T -> cu_seqlens (--doc-len)
        self.results = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(self.dev) if self.dev.type == "cuda" else platform.processor() or "cpu",
            "world_size": self.world, "backend": dist.get_backend(), "torch": torch.__version__,
            "python": platform.python_version(), "dtype": str(self.dtype).replace("torch.", ""),
            "command": " ".join(sys.argv), "args": vars(args), "rows": [], "errors": [],
        }

    # -- helpers -------------------------------------------------------------------------------
    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def reset_peak(self):
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.dev)

    def peak_gib(self):
        return torch.cuda.max_memory_allocated(self.dev) / GIB if self.dev.type == "cuda" else None

    def inputs(self, T, dtype, seed=0):
        """The same full inputs on every rank (same seed), ``[B, T, H, D]``."""
        a = self.args
        g = torch.Generator(device=self.dev).manual_seed(seed)
        B, H, D = a.batch, a.heads, a.head_dim
        kw = dict(device=self.dev, generator=g)
        x = {"q": torch.randn(B, T, H, D, **kw), "k": F.normalize(torch.randn(B, T, H, D, **kw), dim=-1),
             "v": torch.randn(B, T, H, D, **kw), "beta": torch.rand(B, T, H, **kw)}
        if a.gated:
            x["g"] = F.logsigmoid(torch.randn(B, T, H, **kw) + 4)  # mild decay, <= 0
        return {n: t.to(dtype) if n not in ("g",) else t for n, t in x.items()}

    def documents(self, T):
        """``{"cu_seqlens": ...}`` of the whole row with ``--doc-len``, else ``{}``: the same
        boundaries on every rank (a CPU generator of a fixed seed)."""
        n = self.args.doc_len
        if not n:
            return {}
        if T not in self._documents:
            g = torch.Generator().manual_seed(2)
            ends = torch.randint(1, 2 * n, (T + 1,), generator=g).cumsum(0)  # T + 1 lengths >= 1: past T
            cu = torch.cat([torch.zeros(1, dtype=torch.long), ends[ends < T], torch.tensor([T])])
            self._documents[T] = cu.to(self.dev, torch.int32)
        return {"cu_seqlens": self._documents[T]}

    def step(self, fn, x):
        """One forward + backward of ``fn(**x)`` (output gradient of ones); returns (o, grads)."""
        leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
        o = fn(**leaves)
        o.backward(torch.ones_like(o))
        return o.detach(), {n: t.grad for n, t in leaves.items()}

    def timed(self, fn, x):
        for _ in range(2):  # warm-up: Triton compilation / autotuning
            self.step(fn, x)
        self.sync()
        self.reset_peak()
        t0 = time.perf_counter()
        for _ in range(self.args.iters):
            self.step(fn, x)
        self.sync()
        return (time.perf_counter() - t0) / self.args.iters, self.peak_gib()

    def write(self):
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "context_parallel.json").write_text(json.dumps(self.results, indent=2))
        r = self.results
        lines = [f"# Context parallelism, {r['date'][:10]}, {r['world_size']} x {r['device']}", "",
                 f"torch {r['torch']}, {r['backend']}, {r['dtype']}, B={self.args.batch}, H={self.args.heads}, "
                 f"D={self.args.head_dim}, {'gated' if self.args.gated else 'plain'}"
                 f"{f', packed documents of ~{self.args.doc_len} tokens' if self.args.doc_len else ''}; "
                 f"command: `{r['command']}`", "",
                 "| T | part | step (ms) | tokens/s | peak GiB per GPU | notes |", "|---|---|---|---|---|---|"]
        for row in r["rows"]:
            ms = f"{row['step_s'] * 1e3:.1f}" if row.get("step_s") else "–"
            tps = f"{row['tokens_per_s']:,.0f}" if row.get("tokens_per_s") else "–"
            mem = f"{row['peak_gib']:.2f}" if row.get("peak_gib") is not None else "–"
            lines.append(f"| {row['T']} | {row['part']} | {ms} | {tps} | {mem} | {row.get('notes', '')} |")
        if r["errors"]:
            lines += ["", "Errors:", ""] + [f"- T={e['T']} {e['part']}: {e['error']}" for e in r["errors"]]
        (self.out / "context_parallel.md").write_text("\n".join(lines) + "\n")

    def record(self, T, part, fn):
        try:
            row = fn()
            if row is not None:
                self.results["rows"].append({"T": T, "part": part, **row})
        except Exception as e:  # recorded, the script carries on
            self.results["errors"].append({"T": T, "part": part, "rank": self.rank,
                                           "error": f"{type(e).__name__}: {e}",
                                           "traceback": traceback.format_exc()[-2000:]})
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()
        self.write()

    # -- parts ---------------------------------------------------------------------------------
    def single(self, T):
        row = None
        if self.rank == 0:
            x = self.inputs(T, self.dtype)
            s, mem = self.timed(lambda **t: delta_rule(**t, **self.documents(T))[0], x)
            row = {"step_s": s, "tokens_per_s": self.args.batch * T / s, "peak_gib": mem, "notes": "1 device"}
        dist.barrier()
        return row

    def cp(self, T):
        x = {n: split_segment(t, 1).contiguous() for n, t in self.inputs(T, self.dtype).items()}
        s, mem = self.timed(lambda **t: context_parallel_delta_rule(**t, **self.documents(T))[0], x)
        stats = torch.tensor([s, mem or 0.0], dtype=torch.float64, device=self.dev)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        s, mem = stats.tolist()
        single = [r for r in self.results["rows"] if r["T"] == T and r["part"] == "single"]
        note = f"{self.world} ranks, T/R = {T // self.world}"
        if single:
            note += f"; {single[0]['step_s'] / s:.2f}x the 1-device speed"
        return {"step_s": s, "tokens_per_s": self.args.batch * T / s,
                "peak_gib": mem if self.dev.type == "cuda" else None, "notes": note}

    def accuracy(self, T):
        if T > self.args.check_max_len:
            return None
        full32 = self.inputs(T, torch.float32)
        x = {n: t.to(self.dtype) if n != "g" else t for n, t in full32.items()}
        docs = self.documents(T)
        o_cp, g_cp = self.step(lambda **t: context_parallel_delta_rule(**t, **docs)[0],
                               {n: split_segment(t, 1).contiguous() for n, t in x.items()})
        o_cp = gather_segments(o_cp, 1)
        g_cp = {n: gather_segments(t.contiguous(), 1) for n, t in g_cp.items()}
        errs = {}
        if self.rank == 0:
            ref_o, ref_g = self.step(lambda **t: delta_rule(**t, **docs)[0],
                                     {n: t.to(torch.float32) for n, t in x.items()})  # fp32, same rounded inputs
            one_o, one_g = self.step(lambda **t: delta_rule(**t, **docs)[0], x)

            def rel(a, b):
                return ((a.float() - b.float()).norm() / b.float().norm()).item()

            for n, (a, b, ref) in {"o": (o_cp, one_o, ref_o),
                                   **{f"d{k}": (g_cp[k], one_g[k], ref_g[k]) for k in ref_g}}.items():
                errs[n] = {"cp": rel(a, ref), "one_device": rel(b, ref)}
        dist.barrier()
        if self.rank != 0:
            return None
        # floor 1e-6: in float32 the 1-device run IS the reference computation (error 0)
        worst = max(e["cp"] / max(e["one_device"], 1e-6) for e in errs.values())
        return {"errors_vs_fp32": errs, "notes": f"max error ratio cp / 1-device = {worst:.2f} "
                + ", ".join(f"{n} {e['cp']:.1e}/{e['one_device']:.1e}" for n, e in errs.items())}

    # -- whole models ---------------------------------------------------------------------------
    def model(self, name, dtype):
        """The preset with the overrides, the same weights on every rank (same seed)."""
        torch.manual_seed(0)
        cfg = get_config(name, **parse_overrides(self.args.model_override))
        return DeltaNetForCausalLM(cfg).to(self.dev, dtype).train()

    def ids(self, T, vocab):
        g = torch.Generator(device=self.dev).manual_seed(1)
        return torch.randint(0, vocab, (self.args.model_batch, T), device=self.dev, generator=g)

    def model_step(self, model, ids, cp: bool):
        """Forward + backward; returns (loss of the whole rows, {name: gradient}) — under context
        parallelism the loss shares and gradients summed over the group."""
        model.zero_grad(set_to_none=True)
        docs = self.documents(ids.shape[1])
        if cp:
            targets = torch.cat([ids[:, 1:], ids.new_full((ids.shape[0], 1), -100)], dim=1)
            loss = model(input_ids=split_segment(ids, 1), labels=split_segment(targets, 1),
                         context_parallel=dist.group.WORLD, **docs).loss
        else:
            loss = model(input_ids=ids, labels=ids, **docs).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    def model_timed(self, model, ids, cp: bool):
        for _ in range(2):
            self.model_step(model, ids, cp)
        self.sync()
        self.reset_peak()
        t0 = time.perf_counter()
        for _ in range(self.args.iters):
            self.model_step(model, ids, cp)
        self.sync()
        return (time.perf_counter() - t0) / self.args.iters, self.peak_gib()

    def model_single(self, name, T):
        row = None
        if self.rank == 0:
            model = self.model(name, self.dtype)
            s, mem = self.model_timed(model, self.ids(T, model.config.vocab_size), cp=False)
            row = {"model": name, "step_s": s, "tokens_per_s": self.args.model_batch * T / s, "peak_gib": mem,
                   "notes": "1 device"}
            del model
        dist.barrier()
        return row

    def model_cp(self, name, T):
        model = self.model(name, self.dtype)
        s, mem = self.model_timed(model, self.ids(T, model.config.vocab_size), cp=True)
        del model
        stats = torch.tensor([s, mem or 0.0], dtype=torch.float64, device=self.dev)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        s, mem = stats.tolist()
        single = [r for r in self.results["rows"] if r["T"] == T and r["part"] == f"{name} single"]
        note = f"{self.world} ranks, T/R = {T // self.world}"
        if single:
            note += f"; {single[0]['step_s'] / s:.2f}x the 1-device speed"
        return {"model": name, "step_s": s, "tokens_per_s": self.args.model_batch * T / s,
                "peak_gib": mem if self.dev.type == "cuda" else None, "notes": note}

    def model_accuracy(self, name, T):
        if T > self.args.model_check_max_len:
            return None
        model = self.model(name, self.dtype)
        ids = self.ids(T, model.config.vocab_size)
        loss_cp, g_cp = self.model_step(model, ids, cp=True)
        dist.all_reduce(loss_cp)
        for t in g_cp.values():
            dist.all_reduce(t)  # each rank holds the gradient of its own tokens' uses
        errs = {}
        if self.rank == 0:
            g_cp = {n: t.float().clone() for n, t in g_cp.items()}
            loss_one, g_one = self.model_step(model, ids, cp=False)
            g_one = {n: t.float().clone() for n, t in g_one.items()}
            ref = model.float()  # the same (rounded) weights in float32: the reference
            loss_ref, g_ref = self.model_step(ref, ids, cp=False)

            def flat(g):
                return torch.cat([g[n].flatten() for n in sorted(g_ref)])

            def rel(a, b):
                return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()

            errs = {"loss": {"cp": rel(loss_cp, loss_ref), "one_device": rel(loss_one, loss_ref)},
                    "grads": {"cp": rel(flat(g_cp), flat(g_ref)), "one_device": rel(flat(g_one), flat(g_ref))}}
            worst = {n: max(rel(g_cp[n], g_ref[n]) / max(rel(g_one[n], g_ref[n]), 1e-6), 0.0) for n in g_ref}
            errs["worst_parameter"] = max(worst.items(), key=lambda kv: kv[1])
        del model
        dist.barrier()
        if self.rank != 0:
            return None
        ratio = max(e["cp"] / max(e["one_device"], 1e-6) for k, e in errs.items() if k != "worst_parameter")
        return {"model": name, "errors_vs_fp32": errs,
                "notes": f"max error ratio cp / 1-device = {ratio:.2f}; loss {errs['loss']['cp']:.1e}/"
                         f"{errs['loss']['one_device']:.1e}, all gradients {errs['grads']['cp']:.1e}/"
                         f"{errs['grads']['one_device']:.1e}; worst parameter ratio "
                         f"{errs['worst_parameter'][1]:.2f} ({errs['worst_parameter'][0]})"}

    def main(self):
        t_start = time.time()
        for T in [int(t) for t in self.args.lengths.split(",")]:
            if time.time() - t_start > self.args.budget_s:
                self.results["errors"].append({"T": T, "part": "all", "error": "time budget spent; not run"})
                self.write()
                continue
            if T % self.world:
                self.results["errors"].append({"T": T, "part": "all", "error": f"T not divisible by {self.world}"})
                self.write()
                continue
            if not self.args.skip_op:
                self.record(T, "single", lambda: self.single(T))
                self.record(T, "cp", lambda: self.cp(T))
                self.record(T, "accuracy", lambda: self.accuracy(T))
            for name in filter(None, self.args.models.split(",")):
                self.record(T, f"{name} single", lambda: self.model_single(name, T))
                self.record(T, f"{name} cp", lambda: self.model_cp(name, T))
                self.record(T, f"{name} accuracy", lambda: self.model_accuracy(name, T))
        self.results["total_s"] = time.time() - t_start
        self.write()


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=args.timeout_s))
    try:
        Run(args).main()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
