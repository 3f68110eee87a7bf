"""Training curves: `python dev/plot.py RUN_DIR_OR_METRICS_JSONL [-o out.png]` draws a gad.py,
distillm2.py or amm.py run's metrics.jsonl as one PNG, a panel per metric (x: the step across
stages; dashed lines: a stage or an epoch changes). Needs matplotlib."""

import argparse
import json
import math
import os

# The panels of each trainer, in order; every other key is ignored. reward_std has no panel of its
# own: it is the band around reward_mean (the spread of one step's rewards).
PANELS = {
    "gad": ("d_loss", "d_acc", "reward_mean", "kl", "response_len", "sft_loss"),
    "distillm2": ("loss", "skl", "srkl", "beta", "alpha_skl_mean", "alpha_srkl_mean"),
    "amm": ("d_on", "d_off", "l1_on", "l1_off"),
}
BOUNDARY = {"gad": "stage", "distillm2": "epoch"}   # the key whose changes get a dashed line


def trainer_of(rows):
    """Which trainer wrote the rows, from a key that only it logs."""
    keys = set().union(*rows)
    for trainer, key in (("amm", "d_on"), ("gad", "stage"), ("distillm2", "beta")):
        if key in keys:
            return trainer
    raise ValueError("rows of neither gad.py, distillm2.py nor amm.py (no d_on, stage or beta)")


def series(rows, key):
    """(x, y) of the rows that hold `key` as a number. x: the row's index in metrics.jsonl (one a
    step; gad.py's `step` restarts at each stage); a metric only some stages log is drawn there."""
    xs = [i for i, r in enumerate(rows) if isinstance(r.get(key), (int, float))]
    return xs, [rows[i][key] for i in xs]


def segments(rows, key):
    """[(value, first x, last x)] of the runs of equal `key` values: the stages, or the epochs."""
    segs = []
    for i, r in enumerate(rows):
        if segs and segs[-1][0] == r.get(key):
            segs[-1][2] = i
        else:
            segs.append([r.get(key), i, i])
    return segs


def plot(rows, out, title="", dpi=100):
    """Draw the rows' curves into the PNG `out`; returns the metrics drawn, in panel order."""
    trainer = trainer_of(rows)
    panels = [k for k in PANELS[trainer] if series(rows, k)[0]]
    if not panels:
        raise ValueError(f"no {trainer} metric to plot ({', '.join(PANELS[trainer])})")
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plot.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")   # files only: no display on a training node
    import matplotlib.pyplot as plt

    segs = segments(rows, BOUNDARY[trainer]) if trainer in BOUNDARY else []
    if len(segs) > 1:
        title += "  |  " + ", ".join(f"{BOUNDARY[trainer]} {v}: {a}-{b}" for v, a, b in segs)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    # one x axis for all: a metric of one stage is drawn over that stage, not stretched over all
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 2.4 * nrows + 0.6), sharex=True,
                             squeeze=False)
    drawn = []
    for ax, key in zip(axes.flat, panels):
        xs, ys = series(rows, key)
        ax.plot(xs, ys, lw=1.2, marker="." if len(xs) < 50 else None)
        drawn.append(key)
        if key == "reward_mean":
            std = dict(zip(*series(rows, "reward_std")))
            band = [(x, y - std[x], y + std[x]) for x, y in zip(xs, ys) if x in std]
            if band:
                ax.fill_between(*zip(*band), alpha=0.25, lw=0)   # x, y - std, y + std
                key = "reward_mean ± reward_std"
                drawn.append("reward_std")
        for _, start, _ in segs[1:]:
            ax.axvline(start - 0.5, color="gray", ls="--", lw=0.8)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7, labelbottom=True)   # sharex hides them above an empty slot
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.supxlabel("step (across stages)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return drawn


def main(argv=None):
    p = argparse.ArgumentParser(description="a run's metrics.jsonl as a PNG of training curves")
    p.add_argument("path", help="a run's --out folder, or its metrics.jsonl")
    p.add_argument("-o", "--out", help="the PNG (default: metrics.png beside metrics.jsonl)")
    p.add_argument("--dpi", type=int, default=100)
    args = p.parse_args(argv)
    path = os.path.join(args.path, "metrics.jsonl") if os.path.isdir(args.path) else args.path
    if not os.path.isfile(path):
        p.error(f"{path}: no such file (give a run's --out folder or its metrics.jsonl)")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        p.error(f"{path} has no rows yet")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(path)), "metrics.png")
    try:
        drawn = plot(rows, out, title=path, dpi=args.dpi)
    except (ValueError, ImportError) as e:   # rows of no known trainer; no matplotlib
        p.error(f"{path}: {e}")
    print(f"{out}: {', '.join(drawn)}")
    return drawn


if __name__ == "__main__":
    main()
