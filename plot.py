"""
Pictures and a results table from training logs (out_dir/log.jsonl of train.py), for the README:

    python plot.py out-residual out-hc out-mhc --out_dir=assets [--labels=residual,HC,mHC] [--prefix=cmp_]

Runs that share a label (seeds: --labels=HC,HC,mHC,mHC) get one colour in the pictures and one
row in the table (their mean, ± half the spread between them). Pictures, each named prefix + :
loss.png      validation loss against tokens (dashed: the second validation set, --extra_val), seeds
              as their mean and range; beside it the first set's second half, closer
grad_norm.png gradient norm against step
gain.png      composite forward/backward gain of H_res against depth (last eval) and against step
depth.png     gain and distance to the uniform matrix of the composite H_res against depth (last eval)
h_res.png     the batch-mean H_res of the first, middle and last sublayer (last eval)
moved.png     how far each sublayer's H_res has moved from its first logged value (the init, when
              the log starts at step 0) against step: the mean over sublayers and the largest
The table (markdown, on stdout) has the final losses, speed, memory, gains and distances, and
each label's final val loss minus the first label's (and the second set's, with --extra_val),
paired run by run (give the seeds in the same order in every group), with whether that difference
is beyond the first label's seed spread (larger than it, and the same sign for every seed).
Needs matplotlib (pip install matplotlib).
"""
import math
import os
import statistics
import sys

import mhc
from configurator import settings


def read_log(run_dir):
    """(evaluation rows, training rows) of a run's log.jsonl (a damaged line is dropped, as train.py does)."""
    from train import read_log as read_rows
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        sys.exit(f"error: {path} not found; give the --out_dir folders of train.py runs")
    rows = read_rows(path)
    evals, steps = [r for r in rows if "val_loss" in r], [r for r in rows if "loss" in r]
    if not evals:
        sys.exit(f"error: {path} has no eval row yet; let the run reach its first --eval_interval")
    return evals, steps


def uniform_by_depth(mats):
    """Distance to J/n of the composite H_res over the first d sublayers, for each d (train.py
    logs the gains by depth, not the distances; L products of a few 4x4 matrices, cheap)."""
    return [mhc.composite_distance(mats[:d])[1] for d in range(1, len(mats) + 1)]


def moved(evals):
    """At each eval: (mean, largest) over sublayers of ‖H_res − H_res at the first eval‖ (Frobenius)."""
    first = [sum(m, []) for m in evals[0]["h_res"]]
    out = []
    for r in evals:
        d = [math.dist(sum(m, []), f) for m, f in zip(r["h_res"], first)]
        out.append((statistics.fmean(d), max(d)))
    return out


def summary(values):
    """'mean' for one run, 'mean ± half the spread' for seeds; '' when no run has the value."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    mean = statistics.fmean(values)
    text, spread = (f"{mean:.4g}" if abs(mean) < 1e4 else f"{mean:.3e}"), (max(values) - min(values)) / 2
    return text + (f" ± {spread:.2g}" if len(values) > 1 and spread >= 1e-4 * abs(mean) else "")  # not ± 8e-08


def paired_difference(runs, base_runs, key="val_loss"):
    """Final val loss (or `key`, e.g. the second set's) minus the first group's, run k against run k
    (the same seed when the seeds are given in the same order): 'mean ± half the spread', and whether
    it is beyond the first group's own seed spread: the mean larger than that spread and every pair on
    the same side ('' with a single baseline run, a different number of runs, or no such loss)."""
    final = lambda rs: [evals[-1][key] for evals, _ in rs]
    if len(runs) != len(base_runs) or runs is base_runs or any(key not in e[-1] for e, _ in runs + base_runs):
        return "", ""
    base = final(base_runs)
    diffs = [a - b for a, b in zip(final(runs), base)]
    noise = max(base) - min(base)
    one_side = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    beyond = ("yes" if one_side and abs(statistics.fmean(diffs)) > noise else "no") if len(base_runs) > 1 else ""
    return summary(diffs), beyond


def table(groups):
    base = next(iter(groups))  # differences are against the first label (put the residual model first)
    cols = ["mode", "runs", "val loss", f"Δ val vs {base}", "beyond seed spread", "2nd val loss",
            f"Δ 2nd val vs {base}", "beyond seed spread (2nd)", "tokens/s", "peak GiB", "fwd gain", "bwd gain",
            "max fwd gain", "‖P−I‖", "‖P−J/n‖", "H_res moved"]
    rows = []
    for label, runs in groups.items():
        last = [evals[-1] for evals, _ in runs]
        col = lambda key: summary([r.get(key) for r in last])
        speed = summary([statistics.median(r["tokens_per_s"] for r in steps[1:] or steps) for _, steps in runs])
        mem = summary([max((r["peak_mem_gib"] for r in steps if "peak_mem_gib" in r), default=None) for _, steps in runs])
        top = summary([max((r["fwd_gain"] for r in evals if "fwd_gain" in r), default=None) for evals, _ in runs])
        rows.append([label, str(len(runs)), col("val_loss"), *paired_difference(runs, groups[base]),
                     col("extra_val_loss"), *paired_difference(runs, groups[base], "extra_val_loss"), speed, mem,
                     col("fwd_gain"), col("bwd_gain"), top, col("dist_identity"), col("dist_uniform"),
                     summary([moved([evals[0], evals[-1]])[-1][0] if "h_res" in evals[0] else None for evals, _ in runs])])
    keep = [j for j in range(len(cols)) if any(row[j] for row in rows)]  # no empty column (peak GiB on a CPU)
    return "\n".join(["| " + " | ".join(cols[j] for j in keep) + " |", "|" + "---|" * len(keep)] +
                     ["| " + " | ".join(row[j] for j in keep) + " |" for row in rows])


DEFAULTS = dict(
    out_dir="assets",       # where the pictures go
    labels="",              # a label per run, comma-separated ("": the folder names); runs sharing one are seeds
    prefix="",              # put before each picture's name, e.g. cmp_
)


def main(argv):
    runs = [a for a in argv if not a.startswith("--")]
    c = settings(DEFAULTS, [a for a in argv if a.startswith("--")], allow_files=False)
    if not runs:
        sys.exit("error: give one or more run folders, e.g. python plot.py out-residual out-mhc")
    labels = c["labels"].split(",") if c["labels"] else [os.path.basename(os.path.normpath(r)) for r in runs]
    if len(labels) != len(runs):
        sys.exit(f"error: --labels has {len(labels)} names for {len(runs)} runs")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: plot.py needs matplotlib: pip install matplotlib")
    groups = {}
    for label, r in zip(labels, runs):
        groups.setdefault(label, []).append(read_log(r))
    color = {label: f"C{i}" for i, label in enumerate(groups)}
    os.makedirs(c["out_dir"], exist_ok=True)
    written = []

    def save(fig, name):
        path = os.path.join(c["out_dir"], c["prefix"] + name)
        fig.savefig(path + ".tmp.png", dpi=120)
        os.replace(path + ".tmp.png", path)  # never a half-written picture
        plt.close(fig)
        written.append(path)

    def lines(ax, label, k, x, y, style="-", name=None, **kw):
        """One curve per run, the legend entry on the group's first run only."""
        ax.plot(x, y, style, color=color[label], label=(name or label) if k == 0 else None, **kw)

    def band(ax, label, curves, style="-", name=None):
        """A group's runs as their mean and a band from the lowest to the highest (one line for one run)."""
        xs, ys = zip(*curves)
        if len(curves) == 1 or any(x != xs[0] for x in xs):  # one run, or runs evaluated at different points
            for k, (x, y) in enumerate(curves):
                lines(ax, label, k, x, y, style, name=name)
            return
        lines(ax, label, 0, xs[0], [statistics.fmean(v) for v in zip(*ys)], style, name=name)
        ax.fill_between(xs[0], [min(v) for v in zip(*ys)], [max(v) for v in zip(*ys)], color=color[label], alpha=0.2, lw=0)

    # validation loss against tokens: all of training, and the first set's second half, where the modes part
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    end = max(evals[-1]["tokens"] for group in groups.values() for evals, _ in group) / 1e6
    for ax, start in zip(axes, (0, end / 2)):
        shown = []  # the losses after the first eval and from `start` on, for the axis range
        keys = [("val_loss", "-", "{}"), ("extra_val_loss", "--", "{} (2nd val set)")][:1 if start else 2]
        for label, group in groups.items():
            for key, style, name in keys:
                curves = [([r["tokens"] / 1e6 for r in evals if key in r], [r[key] for r in evals if key in r])
                          for evals, _ in group]
                if not any(y for _, y in curves):
                    continue
                band(ax, label, curves, style, name.format(label))
                shown += [v for x, y in curves for t, v in zip(x[1:], y[1:]) if t >= start]
        if shown:  # the untrained step-0 loss (about 10.8) would squash the curves that matter
            pad = 0.05 * (max(shown) - min(shown) or 1)
            ax.set_ylim(min(shown) - pad, max(shown) + pad)
        ax.set_xlim(start, end * 1.02)
        ax.set(xlabel="tokens (M)", ylabel="validation loss",
               title="validation loss" + (" (seeds: mean and range)" if any(len(g) > 1 for g in groups.values()) else "")
               if start == 0 else "the second half, closer (first validation set)")
    axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=7)  # the upper right is free there
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for label, group in groups.items():
        for k, (_, steps) in enumerate(group):
            lines(ax, label, k, [r["iter"] for r in steps], [r["grad_norm"] for r in steps], lw=0.8)
    ax.set(xlabel="step", ylabel="gradient norm (before clipping)", yscale="log", title="gradient norm")
    ax.legend(fontsize=7)
    save(fig, "grad_norm.png")

    streams = {label: group for label, group in groups.items() if "h_res" in group[0][0][-1]}
    if streams:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
        for label, group in streams.items():
            for k, (evals, _) in enumerate(group):
                depth = evals[-1]["gain_by_depth"]
                lines(a1, label, k, range(1, len(depth) + 1), [g[0] for g in depth], name=f"{label} forward")
                lines(a1, label, k, range(1, len(depth) + 1), [g[1] for g in depth], "--", name=f"{label} backward")
                lines(a2, label, k, [r["iter"] for r in evals], [r["fwd_gain"] for r in evals], name=f"{label} forward")
                lines(a2, label, k, [r["iter"] for r in evals], [r["bwd_gain"] for r in evals], "--",
                      name=f"{label} backward")
        a1.set(xlabel="sublayers composed", ylabel="gain of the composite H_res", yscale="log", title="gain against depth (end)")
        a2.set(xlabel="step", ylabel="gain of all sublayers", yscale="log", title="composite gain during training")
        a1.legend(fontsize=7)
        a2.legend(fontsize=7)
        save(fig, "gain.png")

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
        for label, group in streams.items():
            for k, (evals, _) in enumerate(group):
                d = range(1, len(evals[-1]["gain_by_depth"]) + 1)
                lines(a1, label, k, d, [g[0] for g in evals[-1]["gain_by_depth"]])  # as logged by train.py
                lines(a2, label, k, d, uniform_by_depth(evals[-1]["h_res"]), name=f"{label}, step {evals[-1]['iter']}")
                lines(a2, label, k, d, uniform_by_depth(evals[0]["h_res"]), ":", name=f"{label}, step {evals[0]['iter']}")
        a1.set(xlabel="sublayers composed", ylabel="forward gain (max row sum)", yscale="log",
               title="gain of the composite H_res (end)")
        a2.set(xlabel="sublayers composed", ylabel="‖P − J/n‖ (0: every stream the same mix)", yscale="log",
               title="distance of the composite H_res to uniform")
        a1.legend(fontsize=7)
        a2.legend(fontsize=7)
        save(fig, "depth.png")

        fig, axes = plt.subplots(len(streams), 3, figsize=(8, 2.7 * len(streams)), squeeze=False, layout="constrained")
        for row, (label, group) in zip(axes, streams.items()):
            mats = group[0][0][-1]["h_res"]  # the group's first run
            for ax, k in zip(row, (0, len(mats) // 2, len(mats) - 1)):
                im = ax.imshow(mats[k], cmap="viridis", vmin=0, vmax=1)  # HC's entries may leave [0, 1]
                for i, line in enumerate(mats[k]):
                    for j, value in enumerate(line):
                        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                                color="black" if value > 0.5 else "white")
                ax.set_title(f"{label}: sublayer {k}", fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
        save(fig, "h_res.png")

        fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
        for label, group in streams.items():
            for k, (evals, _) in enumerate(group):
                steps, dist = [r["iter"] for r in evals], moved(evals)
                lines(ax, label, k, steps, [d[0] for d in dist], name=f"{label}, mean over sublayers")
                lines(ax, label, k, steps, [d[1] for d in dist], ":", name=f"{label}, largest")
        ax.set(xlabel="step", ylabel="‖H_res − its first logged value‖", title="how far the maps move")
        ax.legend(fontsize=7)
        save(fig, "moved.png")
    print(table(groups))
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main(sys.argv[1:])
