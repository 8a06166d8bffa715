"""The report of ``deltanet bench lm``: ``results.md`` (protocol, table, the paper's orderings
checked against ours) and ``loss_vs_tokens.png`` (every model's training curve), rendered from
``results.jsonl`` alone, so a table completed over several calls renders the same way."""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["best_per_model", "orderings", "render", "table"]


def _latest(records: list[dict]) -> dict[tuple[str, float], dict]:
    out = {}
    for r in records:
        if r.get("type") == "result":
            out[(r["model"], r["lr"])] = r  # a later line (a rerun) replaces an earlier one
    return out


def best_per_model(records: list[dict], seq_len: int) -> dict[str, dict]:
    """Per model, the job (learning rate) with the lowest held-out loss at the training length."""
    best: dict[str, dict] = {}
    for r in _latest(records).values():
        if r["model"] not in best or r["eval"][str(seq_len)]["loss"] < best[r["model"]]["eval"][str(seq_len)]["loss"]:
            best[r["model"]] = r
    return best


def _count(n: float) -> str:
    """``134.3M``, ``37K``: parameter and token counts."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _f(x, fmt):
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def table(records: list[dict], seq_len: int) -> str:
    from deltanet.bench.lm import MODELS

    jobs = _latest(records)
    best = best_per_model(records, seq_len)
    grid = len(jobs) > len(best)
    L = [str(m * seq_len) for m in (1, 2, 4)]
    head = (f"| model | params | lr | tokens | loss | ppl | bits/byte | ppl @{L[1]} | ppl @{L[2]} | "
            f"recall-hit loss | other loss | hit share | tok/s | paper ppl (340M/15B) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    order = {k: i for i, k in enumerate(MODELS)}
    for (key, lr), r in sorted(jobs.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
        e = r["eval"]
        rec = e[L[0]].get("recall", {})
        hit, other = rec.get("hit", {}), rec.get("other", {})
        name = r["label"] + (" **(best lr)**" if grid and best[key] is r else "")
        lines.append(" | ".join([
            f"| {name}", _count(r["params"]), f"{lr:g}", _count(r["tokens"]),
            _f(e[L[0]]["loss"], ".4f"), _f(e[L[0]]["ppl"], ".2f"), _f(e[L[0]]["bpb"], ".4f"),
            _f(e.get(L[1], {}).get("ppl"), ".2f"), _f(e.get(L[2], {}).get("ppl"), ".2f"),
            _f(hit.get("loss"), ".4f"), _f(other.get("loss"), ".4f"), _f(rec.get("hit_fraction"), ".3f"),
            _f(r.get("tok_per_s_median"), ",.0f"),
            _f(MODELS[key].paper_ppl if key in MODELS else None, ".2f") + " |"]))
    return "\n".join(lines)


def orderings(records: list[dict], seq_len: int) -> list[str]:
    """Each pair of models the paper's Table 1 orders (lower perplexity first), checked on ours."""
    from deltanet.bench.lm import MODELS

    best = best_per_model(records, seq_len)
    have = [k for k in MODELS if k in best and MODELS[k].paper_ppl is not None and MODELS[k].fla != "mamba2"]
    out = []
    for i, a in enumerate(have):
        for b in have[i + 1:]:
            pa, pb = MODELS[a].paper_ppl, MODELS[b].paper_ppl
            if pa == pb:
                continue
            lo, hi = (a, b) if pa < pb else (b, a)
            ours_lo, ours_hi = (best[k]["eval"][str(seq_len)]["ppl"] for k in (lo, hi))
            verdict = "holds" if ours_lo < ours_hi else "does not hold"
            out.append(f"- {MODELS[lo].label} < {MODELS[hi].label} (paper {MODELS[lo].paper_ppl:.2f} < "
                       f"{MODELS[hi].paper_ppl:.2f}): **{verdict}** here ({ours_lo:.2f} vs {ours_hi:.2f})")
    return out


def _figure(records: list[dict], seq_len: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_per_model(records, seq_len)
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, r in best.items():
        pts = r.get("train_curve") or []
        if not pts:
            continue
        x, y = zip(*pts)
        k = max(1, len(y) // 50)  # moving average: step-to-step noise hides the gaps between models
        ys = [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1]) for i in range(len(y))]
        (line,) = ax.plot([t / 1e6 for t in x], ys, lw=1.2, label=f"{r['label']} (lr {r['lr']:g})")
        if r.get("val_curve"):
            vx, vy = zip(*r["val_curve"])
            ax.plot([t / 1e6 for t in vx], vy, "o", ms=3, color=line.get_color())
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("training loss (lines, moving average) and held-out loss (dots)")
    lows = [min(v for _, v in r["train_curve"]) for r in best.values() if r.get("train_curve")]
    if lows:
        ax.set_ylim(min(lows) - 0.1, min(lows) + 3.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(out: Path) -> Path:
    """Write ``OUT/results.md`` and ``OUT/loss_vs_tokens.png`` from ``OUT/results.jsonl``."""
    from deltanet.bench.lm import read_results

    header, records = read_results(out / "results.jsonl")
    md = out / "results.md"
    if header is None:
        md.write_text("# Language-model comparison\n\nNo results yet.\n")
        return md
    seq_len = header["seq_len"]
    res = [r for r in records if r.get("type") == "result"]
    errors = [r for r in records if r.get("type") == "error"]
    p = header
    text = [
        "# Language-model comparison (`deltanet bench lm`)", "",
        f"Protocol (created {p['created']}): data `{p['data']['spec']}` (held-out fraction {p['data']['val_fraction']}, "
        f"documents masked from each other); tokenizer: {p['tokenizer']['kind']}, "
        f"{p['tokenizer']['vocab_size']} tokens (fingerprint `{p['tokenizer']['fingerprint']}`); "
        f"{p['steps']} steps x {p['tokens_per_step']:,} tokens ({p['batch']}) = {_count(p['tokens_per_model'])} "
        f"tokens per model in the same order (seed {p['seed']}); {p['optimizer']}; {p['schedule']}; "
        f"peak lr {p['lr']['default']:g} for every model" + (f" (grid {p['lr']['grid']})" if p["lr"]["grid"] else "")
        + f"; {p['precision']}. Evaluation: the same {p['eval']['tokens']:,} held-out tokens at "
        f"{', '.join(map(str, p['eval']['lengths']))} tokens of context; recall hit = {p['eval']['recall_hit']}.",
        "",
    ]
    if res:
        text += [table(res, seq_len), ""]
        devices = sorted({f"{r['device']}, torch {r['torch']}, {r['date']}" for r in res})
        text += [f"Runs: {'; '.join(devices)}.", ""]
        notes = sorted({f"{r['label']}: {r['note']}" for r in res if r.get("note")})
        ref = best_per_model(res, seq_len).get("deltanet")
        for r in res:  # the protocol asks for parameter counts within 5% of each other
            if ref is not None and abs(r["params"] / ref["params"] - 1) > 0.05:
                notes.append(f"{r['label']}: {r['params']:,} parameters, {100 * (r['params'] / ref['params'] - 1):+.1f}% "
                             "from DeltaNet's (outside the 5% band)")
        text += [f"- {n}" for n in notes] + ([""] if notes else [])
        order = orderings(res, seq_len)
        if order:
            text += [f"The paper's orderings ({p['paper']}) at this scale:", "", *order, ""]
        _figure(res, seq_len, out / "loss_vs_tokens.png")
        text += ["![loss vs tokens](loss_vs_tokens.png)", ""]
    else:
        text += ["No finished model yet.", ""]
    if errors:
        text += ["Failed jobs (retried by the next call):", ""]
        text += [f"- {e['model']} lr {e['lr']:g} ({e['date']}): {e['error']}" for e in errors] + [""]
    md.write_text("\n".join(text))
    return md
