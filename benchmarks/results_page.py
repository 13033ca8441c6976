"""Builds ``docs/results.md``: every benchmark script's committed tables and plots on one page, each
with the script, the exact command, the machine and the date it was measured.

    python benchmarks/results_page.py            # rewrite docs/results.md (and the recurrent plot)
    python benchmarks/results_page.py --check    # exit 1 if docs/results.md is out of date

The tables are the files under ``benchmarks/results/`` as the scripts wrote them (their headings moved
two levels down); each carries its command (and, where the script records them, date and load) in
its first lines. ``SECTIONS`` below says, for each script, what it measures and when its committed
results were produced. The one plot drawn here is ``recurrent.png`` (forward+backward time against
sequence length, from ``recurrent.json`` and ``ssm.json``); ``mqar.png`` is drawn by
``benchmarks/mqar.py``. A test keeps the page in step with the results (``--check``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
PAGE = os.path.join(ROOT, "docs", "results.md")

MACHINE = (
    "Every number here was measured on the project's development machine: a shared 2-core x86-64 VM "
    "(AMD EPYC, AVX-512), 24 GiB, CPU only, Python 3.11, JAX 0.10.2, Flax 0.12.8 (torch 2.14.1 and timm "
    "1.0.31 for the timm columns). Timings are CPU timings of XLA:CPU, reported as ratios measured side "
    "by side in one run; they are not claims about TPUs or GPUs. Pallas kernels run on this machine only "
    "in interpret mode (for correctness); their TPU and GPU lowering is checked, not timed."
)

# (title, script, results files, plots, date measured, what it measures)
SECTIONS = [
    dict(
        title="MQAR: Zoology's recall sweep",
        script="benchmarks/mqar.py",
        files=["mqar.md"],
        plots=["mqar.png"],
        date=None,  # the table's own header gives it
        pending="the sweep runs in parts and resumes; the script prints the projected time of the rest",
        about="Multi-query associative recall accuracy of 2-layer models per mixer, width and sequence "
              "length (Zoology Figure 2, scaled to this CPU), best learning rate per point; the "
              "comparison with the paper is in the script's docstring and the table's notes.",
    ),
    dict(
        title="Every kernel in one table",
        script="benchmarks/kernels.py",
        files=["kernels.md"],
        plots=[],
        date="2026-12-05",
        about="Each op of `attnzoo.pallas_kernels`: a float64 check of output and gradients, XLA's FLOPs "
              "and bytes, CPU time of the `xla` path against `reference`, memory, whether the Pallas "
              "kernels lower for TPU and GPU (forward and backward), block sizes, and a roofline estimate.",
    ),
    dict(
        title="Softmax attention",
        script="benchmarks/attention.py",
        files=["attention.md"],
        plots=[],
        date="2026-11-22",
        about="Causal and bidirectional softmax attention, forward + backward, `xla` (blockwise) "
              "against `reference` and a naive jnp version, with memory, over sequence lengths.",
    ),
    dict(
        title="Linear-attention, delta-rule and state-space ops against attention",
        script="benchmarks/recurrent.py",
        files=["recurrent.md", "ssm.md"],
        plots=["recurrent.png"],
        date=None,  # each table's header gives it
        about="Chunked `xla` forms of the recurrent ops against causal softmax attention, forward + "
              "backward, over sequence lengths: time, memory, the crossover length; each op checked "
              "against its float64 reference first.",
    ),
    dict(
        title="Routed (BiFormer) attention",
        script="benchmarks/routed_attention.py",
        files=["routed_attention.md"],
        plots=[],
        date="2026-12-05",
        about="`routed_attention` at BiFormer-T's three stage shapes: `xla` against `reference`, "
              "forward and forward + backward, after a float64 check of both.",
    ),
    dict(
        title="Vision train steps against timm",
        script="benchmarks/vision.py",
        files=["vision.md", "vision_breadth.md"],
        plots=[],
        date="2026-12-05",
        about="A whole train step (forward, backward, AdamW) of attnzoo models against the same timm "
              "models in PyTorch on the same CPU, after checking that both compute the same logits "
              "from converted weights.",
    ),
    dict(
        title="ViT-Ti dense layers against torch",
        script="benchmarks/vision_matmuls.py",
        files=["vision_matmuls.md"],
        plots=[],
        date="2026-12-05",
        about="The dense layers of ViT-Ti alone (forward, dx, dW) in XLA:CPU and torch: where the "
              "train-step gap comes from.",
    ),
    dict(
        title="Batched attention products against torch",
        script="benchmarks/attention_products.py",
        files=["attention_products.md"],
        plots=[],
        date="2026-12-05",
        about="Attention's batched matrix products at vision shapes, XLA:CPU against `torch.bmm`.",
    ),
]


def _demote(markdown: str) -> str:
    """Moves every heading two levels down (``# T`` -> ``### T``), so a file's title nests under its section."""
    return re.sub(r"^(#{1,4}) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", markdown, flags=re.MULTILINE)


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


# ssm.json predates selective_scan's token-by-token chunks (2026-12-06); ssd_torch is transformers' PyTorch SSD.
LABELS = {"selective_scan": "selective_scan (associative-scan xla, replaced)", "ssd_torch": "ssd in PyTorch (transformers)"}


def recurrent_plot(path: str) -> None:
    """``recurrent.png``: forward+backward ms against T (log-log), one line per op, from the widest
    record of ``recurrent.json`` and the SSM record of ``ssm.json`` (attention from the former)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, float]] = {}
    for name in ("recurrent.json", "ssm.json"):
        records = json.load(open(os.path.join(RESULTS, name)))
        record = max(records, key=lambda r: len(r["config"]["ops"]))
        for length, ops in record["results"].items():
            for op, result in ops.items():
                if result.get("status") == "ok" and not (op == "attention" and name == "ssm.json"):
                    series.setdefault(LABELS.get(op, op), {})[int(length)] = result["time_ms"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for op, points in sorted(series.items(), key=lambda item: item[0] != "attention"):
        lengths = sorted(points)
        style = dict(color="black", linewidth=2.5) if op == "attention" else {}
        ax.plot(lengths, [points[t] for t in lengths], marker="o", label=op, **style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (B=1, H=4, K=V=64)")
    ax.set_ylabel("forward + backward, ms (CPU)")
    ax.set_title("Chunked xla ops vs causal softmax attention, XLA:CPU, 2 cores")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_page() -> str:
    lines = [
        "# Results",
        "",
        "Every benchmark script's committed results, assembled by `python benchmarks/results_page.py` "
        "(do not edit this file by hand: rerun a script with the command shown, then rerun that). "
        "Each script checks correctness (against float64 or the reference implementation) before it "
        "times anything, and prints FAIL instead of a time where the check fails. "
        "`tests/test_scripts.py` runs every script at its smallest size in CI.",
        "",
        MACHINE,
        "",
    ]
    lines += [f"- [{s['title']}](#{_anchor(s['title'])}) (`{s['script']}`)" for s in SECTIONS]
    for section in SECTIONS:
        lines += ["", f"## {section['title']}", "", section["about"], ""]
        when = f"; measured {section['date']}" if section["date"] else ""
        present = [f for f in section["files"] + section["plots"] if os.path.exists(os.path.join(RESULTS, f))]
        files = ", ".join(f"[`{f}`](../benchmarks/results/{f})" for f in present) or "none yet"
        lines += [f"Script: `{section['script']}`{when}. Files: {files}.", ""]
        for plot in section["plots"]:
            if os.path.exists(os.path.join(RESULTS, plot)):
                lines += [f"![{plot}](../benchmarks/results/{plot})", ""]
        for name in section["files"]:
            path = os.path.join(RESULTS, name)
            if not os.path.exists(path):
                lines += [f"Not measured yet: `benchmarks/results/{name}` is written by `python {section['script']}` "
                          f"({section.get('pending', 'see the script docstring for its cost')}).", ""]
                continue
            with open(path) as handle:
                lines += [_demote(handle.read().strip()), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/results.md differs from what would be written")
    parser.add_argument("--no-plots", action="store_true", help="do not redraw recurrent.png")
    args = parser.parse_args(argv)
    if not args.check and not args.no_plots:
        recurrent_plot(os.path.join(RESULTS, "recurrent.png"))
    missing = [f for s in SECTIONS for f in s["files"] + s["plots"] if not os.path.exists(os.path.join(RESULTS, f))]
    if missing and not args.check:
        print(f"results_page: not measured yet (listed as such on the page): {', '.join(missing)}")
    page = build_page()
    if args.check:
        current = open(PAGE).read() if os.path.exists(PAGE) else ""
        if current != page:
            print("docs/results.md is out of date: run python benchmarks/results_page.py")
            return 1
        print("docs/results.md is up to date")
        return 0
    os.makedirs(os.path.dirname(PAGE), exist_ok=True)
    with open(PAGE, "w") as handle:
        handle.write(page)
    print(f"wrote {os.path.relpath(PAGE, ROOT)} ({len(page.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
