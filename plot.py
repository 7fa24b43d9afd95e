"""
Pictures from training logs (out_dir/log.jsonl of train.py), for the README:

    python plot.py out-residual out-hc out-mhc --out_dir=assets [--labels=residual,HC,mHC]

loss.png      validation loss against tokens (dashed: the second validation set, --extra_val)
grad_norm.png gradient norm against step
gain.png      composite forward/backward gain of H_res against depth (last eval) and against step
h_res.png     the batch-mean H_res of the first, middle and last sublayer (last eval)
Needs matplotlib (pip install matplotlib).
"""
import json
import os
import sys

from configurator import ConfigError, configure


def read_log(run_dir):
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        sys.exit(f"error: {path} not found; give the --out_dir folders of train.py runs")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if "val_loss" in r], [r for r in rows if "loss" in r]


def main(argv):
    c = dict(out_dir="assets", labels="")
    runs = [a for a in argv if not a.startswith("--")]
    try:
        configure(c, [a for a in argv if a.startswith("--")], allow_files=False)
    except ConfigError as e:
        sys.exit(f"error: {e}")
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
    logs = {label: read_log(r) for label, r in zip(labels, runs)}
    os.makedirs(c["out_dir"], exist_ok=True)
    written = []

    def save(fig, name):
        path = os.path.join(c["out_dir"], name)
        fig.savefig(path + ".tmp.png", dpi=120)
        os.replace(path + ".tmp.png", path)  # never a half-written picture
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for label, (evals, _) in logs.items():
        line, = ax.plot([r["tokens"] / 1e6 for r in evals], [r["val_loss"] for r in evals], label=label)
        extra = [r for r in evals if "extra_val_loss" in r]
        if extra:
            ax.plot([r["tokens"] / 1e6 for r in extra], [r["extra_val_loss"] for r in extra], "--",
                    color=line.get_color(), label=f"{label} (2nd val set)")
    ax.set(xlabel="tokens (M)", ylabel="validation loss", title="validation loss")
    ax.legend()
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for label, (_, steps) in logs.items():
        ax.plot([r["iter"] for r in steps], [r["grad_norm"] for r in steps], label=label, lw=0.8)
    ax.set(xlabel="step", ylabel="gradient norm (before clipping)", yscale="log", title="gradient norm")
    ax.legend()
    save(fig, "grad_norm.png")

    streams = {label: evals for label, (evals, _) in logs.items() if evals and "gain_by_depth" in evals[-1]}
    if streams:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
        for label, evals in streams.items():
            depth = evals[-1]["gain_by_depth"]
            line, = a1.plot(range(1, len(depth) + 1), [g[0] for g in depth], label=f"{label} forward")
            a1.plot(range(1, len(depth) + 1), [g[1] for g in depth], "--", color=line.get_color(), label=f"{label} backward")
            a2.plot([r["iter"] for r in evals], [r["fwd_gain"] for r in evals], color=line.get_color(), label=f"{label} forward")
            a2.plot([r["iter"] for r in evals], [r["bwd_gain"] for r in evals], "--", color=line.get_color(), label=f"{label} backward")
        a1.set(xlabel="sublayers composed", ylabel="gain of the composite H_res", yscale="log", title="gain against depth (end)")
        a2.set(xlabel="step", ylabel="gain of all sublayers", yscale="log", title="composite gain during training")
        a1.legend(fontsize=7)
        a2.legend(fontsize=7)
        save(fig, "gain.png")

        with_maps = {label: evals[-1]["h_res"] for label, evals in streams.items() if "h_res" in evals[-1]}
        if with_maps:
            fig, axes = plt.subplots(len(with_maps), 3, figsize=(8, 2.7 * len(with_maps)), squeeze=False,
                                     layout="constrained")
            for row, (label, mats) in zip(axes, with_maps.items()):
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
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main(sys.argv[1:])
