"""`python -m eval.report results/*.json --out report/`: plots and a markdown table from results files.

Reads the results files `python -m eval.tts --output` writes (docs/contract.md) and draws what a
paper needs: speedup vs AR per method and paradigm, the accepted-tokens-per-step distribution, and
tokens/s per round for multi-round runs. Optional summary fields (`per_round`, `accepted_hist`) are
used when present; a plot whose data no file has is skipped, never drawn empty.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PARADIGM_ORDER = ("single", "best_of_n", "multi_round")
# what the table and plots read from every summary (per_round, accepted_hist, speedup_vs_ar: when present)
REQUIRED = ("method", "questions", "accuracy", "tokens_per_s", "mean_accepted_tokens", "target_forwards")


def load_results(paths: list[str]) -> list[dict[str, Any]]:
    """Each file's summary plus `label` (method, made unique when two files share method and paradigm)."""
    if not paths:
        raise ValueError("no results files given; pass the JSON files eval.tts --output wrote")
    rows, seen = [], set()
    for p in map(Path, paths):
        if not p.is_file():
            raise ValueError(f"results file {str(p)!r} not found (did the glob match nothing?)")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON ({e.msg}, line {e.lineno}); "
                             "is it an eval.tts results file?") from e
        s = data.get("summary") if isinstance(data, dict) else None
        if not isinstance(s, dict) or "method" not in s:
            raise ValueError(f"{p} has no summary.method; expected an eval.tts results file")
        missing = [key for key in REQUIRED if key not in s]
        if missing:  # a table of dashes would look like a result
            raise ValueError(f"{p}: its summary lacks {', '.join(missing)} (it has {', '.join(s)}); expected the "
                             "results file of a finished eval.tts run (docs/contract.md)")
        wrong = [key for key in REQUIRED[1:] if isinstance(s[key], bool) or not isinstance(s[key], (int, float))]
        if wrong:
            raise ValueError(f"{p}: summary {', '.join(f'{k}={s[k]!r}' for k in wrong)} must be numbers")
        s = dict(s, paradigm=s.get("paradigm") or (data.get("config") or {}).get("paradigm") or "single")
        key = (s["method"], s["paradigm"])
        s["label"] = s["method"] if key not in seen else f"{s['method']} ({p.stem})"
        seen.add(key)
        rows.append(s)
    return rows


def _paradigms(rows: list[dict[str, Any]]) -> list[str]:
    found = {r["paradigm"] for r in rows}
    return [p for p in PARADIGM_ORDER if p in found] + sorted(found - set(PARADIGM_ORDER))


def _colors(labels: list[str]) -> dict[str, Any]:
    """One colour per method label across every plot, so a method reads the same everywhere."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(dict.fromkeys(labels))}


def plot_speedup(rows: list[dict[str, Any]], path: Path) -> bool:
    """Grouped bars: one group per paradigm, one bar per speculative method; AR is the line at 1."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["method"] != "ar" and r.get("speedup_vs_ar") is not None]
    if not rows:
        return False
    paradigms = _paradigms(rows)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    colors = _colors(labels)
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 0.5 * len(labels) * len(paradigms)), 4))
    for j, label in enumerate(labels):
        xs, ys = [], []
        for i, p in enumerate(paradigms):
            for r in rows:
                if r["label"] == label and r["paradigm"] == p:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(r["speedup_vs_ar"])
        bars = ax.bar(xs, ys, width * 0.95, label=label, color=colors[label])
        ax.bar_label(bars, fmt="%.2fx", fontsize=8, padding=2)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="AR baseline")
    ax.set_xticks(range(len(paradigms)), [p.replace("_", "-") for p in paradigms])
    ax.set_xlabel("test-time-scaling paradigm")
    ax.set_ylabel("speedup vs AR (tokens/s ratio)")
    ax.set_title("Walltime speedup over autoregressive decoding")
    ax.set_ylim(0, max(1.0, max(r["speedup_vs_ar"] for r in rows)) * 1.2)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_accepted_hist(rows: list[dict[str, Any]], path: Path) -> bool:
    """Share of verification steps emitting n tokens (index n of `accepted_hist`), per method."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["method"] != "ar" and sum(r.get("accepted_hist") or []) > 0]
    if not rows:
        return False
    many = len(_paradigms(rows)) > 1
    names = [f"{r['label']} / {r['paradigm']}" if many else r["label"] for r in rows]
    colors = _colors([r["label"] for r in rows])
    top = max(max(i for i, c in enumerate(r["accepted_hist"]) if c) for r in rows)
    ns = list(range(1, top + 1))
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(ns) * max(1, len(rows) / 2)), 4))
    for j, (r, name) in enumerate(zip(rows, names)):
        h = r["accepted_hist"]
        total = sum(h)
        ys = [(h[n] if n < len(h) else 0) / total for n in ns]
        ax.bar([n - 0.4 + width * (j + 0.5) for n in ns], ys, width * 0.95, color=colors[r["label"]],
               label=f"{name} (mean {r.get('mean_accepted_tokens', 0):.2f})",
               hatch="//" if many and r["paradigm"] != rows[0]["paradigm"] else None)
    ax.set_xticks(ns)
    ax.set_xlabel("tokens emitted per target forward (accepted drafts + 1)")
    ax.set_ylabel("fraction of verification steps")
    ax.set_title("Accepted tokens per step")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_rounds(rows: list[dict[str, Any]], path: Path) -> bool:
    """Multi-round runs: tokens/s per round (left) and speedup vs AR per round (right)."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["paradigm"] == "multi_round" and r.get("per_round")]
    if not rows:
        return False
    colors = _colors([r["label"] for r in rows])
    has_speedup = any("speedup_vs_ar" in pr for r in rows for pr in r["per_round"])
    fig, axes = plt.subplots(1, 2 if has_speedup else 1, figsize=(10 if has_speedup else 5.5, 4), squeeze=False)
    for r in rows:
        rounds = [pr["round"] for pr in r["per_round"]]
        style = dict(color=colors[r["label"]], marker="o", label=r["label"],
                     linestyle="--" if r["method"] == "ar" else "-")
        axes[0, 0].plot(rounds, [pr["tokens_per_s"] for pr in r["per_round"]], **style)
        if has_speedup and r["method"] != "ar":
            axes[0, 1].plot(rounds, [pr.get("speedup_vs_ar", float("nan")) for pr in r["per_round"]], **style)
    all_rounds = sorted({pr["round"] for r in rows for pr in r["per_round"]})
    axes[0, 0].set_ylabel("tokens/s")
    axes[0, 0].set_title("Decode throughput per round")
    if has_speedup:
        axes[0, 1].axhline(1.0, color="black", linestyle="--", linewidth=1, label="AR baseline")
        axes[0, 1].set_ylabel("speedup vs AR")
        axes[0, 1].set_title("Speedup per round")
    for ax in axes[0]:
        ax.set_xlabel("round")
        ax.set_xticks(all_rounds)
        ax.set_ylim(bottom=0)  # ratios and rates read honestly from zero
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Multi-round test-time scaling")
    return _save(fig, path)


def _save(fig, path: Path) -> bool:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return True


def _fmt(v: Any, spec: str, suffix: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{suffix}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("method", "paradigm", "questions", "accuracy", "tok/s", "speedup vs ar", "mean accepted tokens",
            "target forwards")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    order = {p: i for i, p in enumerate(_paradigms(rows))}
    for r in sorted(rows, key=lambda r: (order[r["paradigm"]], r["method"] != "ar")):
        lines.append("| " + " | ".join([
            r["label"], r["paradigm"], str(r.get("questions", "–")), _fmt(r.get("accuracy"), ".3f"),
            _fmt(r.get("tokens_per_s"), ".1f"), _fmt(r.get("speedup_vs_ar"), ".2f", "x"),
            _fmt(r.get("mean_accepted_tokens"), ".2f"), str(r.get("target_forwards", "–"))]) + " |")
    return "\n".join(lines)


def paper_methods() -> dict[str, str]:
    """specjax method -> its name in the SpecTTS-Bench table (arXiv 2509.04474), in the paper's row order
    (each proposer declares its row as `paper`)."""
    from specjax.proposers import registry

    rows = sorted((cls.paper, name) for name, cls in registry().items() if cls.paper is not None)
    return {name: paper[1] for paper, name in rows}


def paper_table(rows: list[dict[str, Any]]) -> str:
    """The SpecTTS-Bench layout: methods as rows (the paper's names and order, then any others), paradigms
    as column groups, each cell `speedup / mean accepted tokens`."""
    paradigms = _paradigms(rows)
    cells: dict[str, dict[str, str]] = {}
    for r in rows:
        if r["method"] == "ar":
            continue
        cell = f"{_fmt(r.get('speedup_vs_ar'), '.2f', 'x')} / {_fmt(r.get('mean_accepted_tokens'), '.2f')}"
        cells.setdefault(r["label"], {})[r["paradigm"]] = cell
    names = paper_methods()
    order = {m: i for i, m in enumerate(names)}
    labels = sorted(cells, key=lambda m: (order.get(m, len(order)), m))
    head = ["method", "specjax"] + [f"{p.replace('_', '-')}: speedup / MAT" for p in paradigms]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(paradigms)) + "|"]
    for label in labels:
        lines.append("| " + " | ".join([names.get(label, label), label]
                                       + [cells[label].get(p, "–") for p in paradigms]) + " |")
    return "\n".join(lines)


def plot_width_hist(rows: list[dict[str, Any]], path: Path) -> bool:
    """Share of decode steps the adaptive loop ran at each static verify width (1: no draft), per method."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("widths") and sum(r.get("width_hist") or []) > 0]
    if not rows:
        return False
    many = len(_paradigms(rows)) > 1
    names = [f"{r['label']} / {r['paradigm']}" if many else r["label"] for r in rows]
    colors = _colors([r["label"] for r in rows])
    fig, axes = plt.subplots(1, len(rows), figsize=(max(5.0, 2.6 * len(rows)), 3.4), squeeze=False)
    for ax, r, name in zip(axes[0], rows, names):
        total = sum(r["width_hist"])
        ax.bar([str(w) for w in r["widths"]], [c / total for c in r["width_hist"]], color=colors[r["label"]])
        ax.set_title(f"{name}\n(drafted {100 * r.get('drafted_share', 0):.0f}% of steps)", fontsize=9)
        ax.set_xlabel("verify width")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("fraction of decode steps")
    fig.suptitle("Verify widths chosen by the adaptive loop")
    return _save(fig, path)


def write_report(paths: list[str], out: Path) -> Path:
    """Write the plots and `report.md` into `out`; returns the markdown path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display on servers or in CI
    rows = load_results(paths)
    out.mkdir(parents=True, exist_ok=True)
    plots = [("speedup.png", "Speedup vs AR", plot_speedup),
             ("accepted_hist.png", "Accepted tokens per step", plot_accepted_hist),
             ("width_hist.png", "Verify widths of the adaptive loop", plot_width_hist),
             ("rounds.png", "Tokens/s per round (multi-round)", plot_rounds)]
    md = ["# specjax report", "", f"{len(rows)} results file(s).", "", markdown_table(rows), "",
          "## Method table (SpecTTS-Bench layout)", "", paper_table(rows), ""]
    for name, title, plot in plots:
        if plot(rows, out / name):
            md += [f"## {title}", "", f"![{title}]({name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from eval.cli import Parser

    p = Parser(prog="python -m eval.report", description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="*", help="results JSON files written by eval.tts --output")
    p.add_argument("--out", default="report", help="output folder for report.md and the PNG plots")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from eval import cli

    return cli.run(parse_args, _main, argv)


def _main(args: argparse.Namespace) -> int:
    from eval import cli

    out = cli.output_dir(args.out, "--out")  # before the files are read and plotted
    print(f"wrote {write_report(args.results, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
