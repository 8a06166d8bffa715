"""Why Gated DeltaNet's decay can stall MQAR: runs that log the decay as it trains (CPU by
default; ``--device cuda`` for the paper's scale, see the 2026-12-07 decay results file).

    OMP_NUM_THREADS=1 python benchmarks/mqar_decay_probe.py --out runs/decay_probe \\
        --runs gate=one,A=0:0.16 gate=one,A=0:0.16,freeze=1 --time-budget 420

Each ``--runs`` entry is one training run of a 2-layer Gated DeltaNet (or DeltaNet) on MQAR
(defaults: T = 128, 32 pairs, vocabulary 256, width 64 = one head of 64, lr 3e-3, AdamW with
weight decay 0.1 on matrices, cosine over 3 epochs of 20,000 sequences, batch 32: the setting
of ``deltanet eval mqar --seq-len 128 --num-pairs 32 --vocab-size 256 --lr 3e-3 ...``, same
seed, data and initial weights), given as comma-separated ``key=value`` options:

- ``model``: ``gated_delta_net`` (default) or ``delta_net``;
- ``gate``: ``silu`` (as shipped), ``sigmoid`` or ``one`` (no output gate: constant 1);
- ``A``: the range of the decay rate at initialisation, ``lo:hi`` (default ``0:16``), or
  ``off`` (``A_log = -50``: no decay);
- ``freeze=1``: the decay's parameters (``a_proj``, ``A_log``, ``dt_bias``) keep their initial
  values (not given to the optimizer);
- ``azero=1``: ``a_proj`` starts at zero (the decay starts data-independent);
- ``Afix=1``: only ``A_log`` is frozen; ``dtfix=1``: only ``dt_bias``; ``afix=1``: only ``a_proj``;
- ``alr=c``: ``a_proj``'s weight is stored as ``W' = W / c`` and used as ``c W'``: under Adam
  (whose steps do not depend on the gradient's scale) this is ``a_proj`` learning at ``c`` times
  the learning rate, everything else unchanged; ``glr=c``: the same for the output gate's
  projection ``g_proj``;
- ``gatefix=1``: the output gate's projection is zero and frozen, so the gate is the constant
  ``act(0)``: 0.5 with ``gate=sigmoid``;
- ``A0=x``, ``dt0=y``: every gated layer starts at ``A = x`` and ``softplus(dt_bias) = y``
  (so that another seed can start from the same decay as seed 0's layer 0);
- ``seed``: the model's initialisation seed (default 0; data and batch order stay fixed).

Every ``--eval-every`` steps (default 50) the run records held-out accuracy and, on 64 held-out
sequences, per gated layer: the per-token log decay ``g`` (min, 5th percentile, median, mean),
how much of a write survives 64 tokens (``exp`` of the sum of ``g`` over a 64-token window:
mean and 5th percentile), ``softplus(W_a x + dt_bias)`` (median and max), ``|W_a|``,
``dt_bias``, ``A = exp(A_log)``, the mean ``g`` at the key-value section's keys and values, the
queries and the filler; per layer the RMS of the mixer's output; with ``--grad-snr N`` each
projection's gradient signal-to-noise ratio over N training batches. Results go to
``OUT/results.json`` (rewritten after every evaluation) and ``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils.parametrize import register_parametrization

from deltanet.evaluation.tasks.mqar import make_mqar
from deltanet.evaluation.tasks.synthetic import (IGNORE_INDEX, TrainConfig, build_model, target_logits,
                                                 train_and_evaluate)
from deltanet.layers.delta_net import DeltaNetMixer

OPTIONS = {"model": "gated_delta_net", "gate": "silu", "A": "0:16", "freeze": "0", "azero": "0",
           "Afix": "0", "dtfix": "0", "afix": "0", "gatefix": "0", "alr": "1", "glr": "1", "A0": "", "dt0": "", "seed": "0"}


def parse_run(spec: str) -> dict:
    """``"gate=one,A=0:0.16"`` -> the full option dict (defaults filled in)."""
    opts = dict(OPTIONS)
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in OPTIONS:
            raise ValueError(f"--runs: bad option {item!r} in {spec!r}; keys are {sorted(OPTIONS)}")
        opts[key] = value
    if opts["model"] not in ("gated_delta_net", "delta_net"):
        raise ValueError(f"--runs: model must be gated_delta_net or delta_net, got {opts['model']!r}")
    if opts["gate"] not in ("silu", "sigmoid", "one"):
        raise ValueError(f"--runs: gate must be silu, sigmoid or one, got {opts['gate']!r}")
    if float(opts["alr"]) <= 0 or (float(opts["alr"]) != 1.0 and "1" in (opts["afix"], opts["freeze"])):
        raise ValueError(f"--runs: alr must be > 0 and cannot be combined with afix or freeze: {spec!r}")
    if float(opts["glr"]) <= 0 or (float(opts["glr"]) != 1.0 and (opts["gatefix"] == "1" or opts["gate"] == "one")):
        raise ValueError(f"--runs: glr must be > 0 and needs a trained gate (not gatefix=1 or gate=one): {spec!r}")
    return opts


def build(opts: dict, args, width: int) -> torch.nn.Module:
    over = {}
    if opts["gate"] == "sigmoid":
        over["output_gate_activation"] = "sigmoid"
    if opts["A"] != "off":
        lo, hi = (float(x) for x in opts["A"].split(":"))
        over["A_init_range"] = (lo, hi)
    torch.manual_seed(int(opts["seed"]))
    model = build_model(opts["model"], width=width, num_layers=2, vocab_size=args.vocab_size,
                        head_dim=args.head_dim, max_len=args.seq_len, **over)
    for m in mixers(model):
        if opts["gate"] == "one" and m.use_output_gate:
            m.use_output_gate = False  # the gate's projection stays, unused and untrained
            m.g_proj.weight.requires_grad_(False)
        if float(opts["glr"]) != 1.0 and m.use_output_gate:
            register_parametrization(m.g_proj, "weight", _Scaled(float(opts["glr"])), unsafe=True)
        if opts["gatefix"] == "1" and m.use_output_gate:
            with torch.no_grad():
                m.g_proj.weight.zero_()
            m.g_proj.weight.requires_grad_(False)
        if not m.gated:
            continue
        with torch.no_grad():
            if opts["A"] == "off":
                m.A_log.fill_(-50.0)
            if opts["A0"]:
                m.A_log.fill_(math.log(float(opts["A0"])))
            if opts["dt0"]:
                dt = torch.tensor(float(opts["dt0"]))
                m.dt_bias.fill_(float(dt + torch.log(-torch.expm1(-dt))))
            if opts["azero"] == "1":
                m.a_proj.weight.zero_()
        if float(opts["alr"]) != 1.0:
            register_parametrization(m.a_proj, "weight", _Scaled(float(opts["alr"])), unsafe=True)
        frozen = {"freeze": (m.a_proj.weight, m.A_log, m.dt_bias), "Afix": (m.A_log,), "dtfix": (m.dt_bias,),
                  "afix": (m.a_proj.weight,)}
        for key, params in frozen.items():
            if opts[key] == "1":
                for p in params:
                    p.requires_grad_(False)
    return model


class _Scaled(torch.nn.Module):
    """``W = c W'`` (``right_inverse``: ``W' = W / c``, so the initial weight is unchanged)."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, w):
        return w * self.c

    def right_inverse(self, w):
        return w / self.c


def mixers(model) -> list:
    return [m for m in model.modules() if isinstance(m, DeltaNetMixer)]


@torch.no_grad()
def decay_stats(model, probe: torch.Tensor, window: int = 64, classes: dict | None = None) -> dict:
    """The logged statistics of the decay and mixers on ``probe`` (see the module docstring);
    ``classes``: name -> boolean mask ``[B, T]`` of positions whose mean ``g`` is logged too."""
    recorded, hooks = {}, []
    for i, m in enumerate(mixers(model)):
        hooks.append(m.register_forward_hook(lambda mod, inp, out, i=i: recorded.__setitem__(f"out{i}", out)))
        if m.gated:
            orig = type(m)._decay

            def rec(a, m=m, i=i, orig=orig):
                g = orig(m, a)
                recorded[f"g{i}"] = g.float()
                recorded[f"sp{i}"] = F.softplus(a.float() + m.dt_bias.float())
                return g
            m._decay = rec
    was = model.training
    model.eval()
    try:
        model.get_decoder()(input_ids=probe, use_cache=False)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
        for m in mixers(model):
            m.__dict__.pop("_decay", None)
    out = {}
    for i, m in enumerate(mixers(model)):
        y = recorded[f"out{i}"]
        y = y[0] if isinstance(y, tuple) else y
        row = {"mixer_rms": float(y.float().pow(2).mean().sqrt())}
        if m.use_output_gate:
            row["Wg_norm"] = float(m.g_proj.weight.norm())
        if m.gated:
            g = recorded[f"g{i}"]  # [B, T, H]
            sp = recorded[f"sp{i}"]
            window = min(window, g.shape[1])
            G = F.pad(g.cumsum(1), (0, 0, 1, 0))  # [B, T + 1, H]
            surv = (G[:, window:] - G[:, :-window]).exp()  # a write's share left after `window` tokens
            flat = g.flatten()
            row.update(
                g_min=float(flat.min()), g_p5=float(flat.quantile(0.05)), g_median=float(flat.median()),
                g_mean=float(flat.mean()), surv64_mean=float(surv.mean()), surv64_p5=float(surv.flatten().quantile(0.05)),
                dt_median=float(sp.flatten().median()), dt_max=float(sp.max()),
                Wa_norm=float(m.a_proj.weight.norm()), Wa=[round(float(x), 5) for x in m.a_proj.weight.flatten()],
                dt_bias=[round(float(x), 4) for x in m.dt_bias],
                A=[round(float(x), 5) for x in m.A_log.exp()],
            )
            for name, mask in (classes or {}).items():
                row[f"g_mean_{name}"] = float(g.mean(-1)[mask].mean())
        out[f"layer{i}"] = row
    return out


def gradient_snr(model, batches: list) -> dict:
    """Per parameter group of layer 0 and 1: ``|mean_b grad_b| / sqrt(mean_b |grad_b - mean|^2)``
    over the minibatches ``batches`` (lists of ``(inputs, targets)``): below ~1/sqrt(len(batches))
    the gradient is mostly minibatch noise, which Adam still turns into steps of about ``lr``."""
    named = {}
    for i, m in enumerate(mixers(model)):
        for name in ("q_proj", "k_proj", "v_proj", "b_proj", "a_proj", "g_proj", "o_proj"):
            mod = getattr(m, name, None)
            ps = [p for p in mod.parameters() if p.requires_grad] if mod is not None else []
            if ps:
                named[f"L{i}.{name}"] = ps
    flat = [p for ps in named.values() for p in ps]
    grads = []
    for x, y in batches:
        mask = y != IGNORE_INDEX
        loss = F.cross_entropy(target_logits(model, x, mask).float(), y[mask])
        grads.append(torch.autograd.grad(loss, flat))
    out, j = {}, 0
    for key, ps in named.items():
        g = torch.stack([torch.cat([gr[j + n].flatten() for n in range(len(ps))]) for gr in grads])  # [N, P]
        j += len(ps)
        mean = g.mean(0)
        noise = (g - mean).pow(2).sum(1).mean().sqrt()
        out[key] = round(float(mean.norm() / noise.clamp_min(1e-30)), 4)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runs", nargs="+", default=["gate=one,A=0:0.16", "gate=one,A=0:0.16,freeze=1"])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--num-pairs", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--widths", type=int, nargs="+", default=[64], help="every run at every width")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (bf16 autocast, CUDA-graph steps)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-size", type=int, default=20_000)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds of training per run")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds for the whole script: a run starts only with 60 s left and trains at most until then")
    p.add_argument("--stop-accuracy", type=float, default=0.99)
    p.add_argument("--grad-snr", type=int, default=0, metavar="N",
                   help="also log each projection's gradient signal-to-noise ratio over N training batches")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    runs = [parse_run(s) for s in args.runs]
    args.out.mkdir(parents=True, exist_ok=True)

    mk = dict(vocab_size=args.vocab_size, power_a=0.01)
    train = make_mqar(args.train_size, args.seq_len, args.num_pairs, seed=0, **mk)
    test = make_mqar(args.test_size, args.seq_len, args.num_pairs, seed=1, **mk)
    probe = test[0][:64].long()
    # Positions of the probe by role: the key-value section's keys and values, the queries and
    # the random filler between queries.
    P, T = args.num_pairs, args.seq_len
    pos = torch.arange(T).expand(probe.shape[0], T)
    query = test[1][:64] != IGNORE_INDEX
    classes = {"kv_key": (pos < 2 * P) & (pos % 2 == 0), "kv_value": (pos < 2 * P) & (pos % 2 == 1),
               "query": query, "filler": (pos >= 2 * P) & ~query}
    snr_batches = [(train[0][i * args.batch_size:(i + 1) * args.batch_size].long(),
                    train[1][i * args.batch_size:(i + 1) * args.batch_size].long()) for i in range(args.grad_snr)]
    payload = {"date": time.strftime("%Y-%m-%d"), "hardware": os.environ.get("PROBE_HARDWARE", "cpu"),
               "torch": torch.__version__, "command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
               "runs": []}

    def save():
        (args.out / "results.json").write_text(json.dumps(payload, indent=1))

    device = torch.device(args.device)
    start = time.perf_counter()
    # On CUDA each training step is one CUDA-graph replay (small models are launch-bound); that
    # needs the data on the device. Falls back to eager steps if capture fails (result's step_mode).
    graph = device.type == "cuda"
    if graph:
        train = tuple(t.to(device) for t in train)
    probe = probe.to(device)
    classes = {k: v.to(device) for k, v in classes.items()}
    snr_batches = [(x.to(device), y.to(device)) for x, y in snr_batches]
    for (spec, opts), width in ((r, w) for r in zip(args.runs, runs) for w in args.widths):
        rec = {"spec": spec, "width": width, "options": opts, "log": []}
        payload["runs"].append(rec)
        budget = args.time_budget
        if args.deadline is not None:
            left = args.deadline - (time.perf_counter() - start) - 30  # 30 s for evaluations and writing
            if left < 30:
                rec["error"] = "skipped: deadline"
                continue
            budget = min(budget, left)
        try:
            model = build(opts, args, width).to(device)
            rec["log"].append({"step": 0, **decay_stats(model, probe, classes=classes)})
            cfg = TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, eval_every=args.eval_every,
                              time_budget=budget, stop_accuracy=args.stop_accuracy, device=str(device),
                              cuda_graph=graph)

            def on_eval(row, model=model, rec=rec):
                rec["log"].append({**row, **decay_stats(model, probe, classes=classes)})
                if snr_batches:
                    rec["log"][-1]["grad_snr"] = gradient_snr(model, snr_batches)
                l0 = rec["log"][-1]["layer0"]
                print(f"[{spec} d={width}] step {row['step']} loss {row['loss']:.3f} acc {row['accuracy']:.3f} "
                      f"L0 g_p5 {l0.get('g_p5', 0):.3g} surv64 {l0.get('surv64_mean', 1):.3f} "
                      f"|Wa| {l0.get('Wa_norm', 0):.3g}", flush=True)
                save()
            result = train_and_evaluate(model, train, test, cfg, on_eval=on_eval)
            rec["result"] = {k: v for k, v in result.to_dict().items() if k != "curve"}
        except Exception:  # record and go on with the next run
            rec["error"] = traceback.format_exc()
            print(rec["error"], file=sys.stderr)
        save()
    lines = ["| run | width | best accuracy | steps | stopped by |", "|---|---|---|---|---|"]
    for rec in payload["runs"]:
        r = rec.get("result", {})
        lines.append(f"| `{rec['spec']}` | {rec['width']} | {r.get('best_accuracy', 'error')} | {r.get('steps', '')} | {r.get('stopped_by', '')} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
