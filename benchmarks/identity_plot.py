"""Plot benchmarks/results/identity.json: one panel per metric, one line per method, vs N.

pip install -e '.[bench]' && python benchmarks/identity_plot.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_meta import RESULTS

PANELS = (  # (key, title, (ideal, issue #11 target))
    ("mean_retention", "mean retention (1 = all kept)", (1.0, 0.95)),
    ("mean_crosstalk", "mean crosstalk (0 = none)", (None, 0.15)),
    ("mean_prior_interference", "mean prior interference (0 = none)", (None, 0.15)),
    ("empty_prompt_interference", "empty-prompt interference (0 = none)", (None, 0.15)),
    ("sample_identity", "mean sample identity (1 = as alone)", (1.0, 0.8)),
)
LOG = ("mean_crosstalk", "mean_prior_interference", "empty_prompt_interference")
STYLE = {
    "blockctl": ("tab:green", "o", 2.5),
    "blockctl-strength": ("tab:cyan", "P", 2.0),
    "slots-no-roe": ("tab:olive", "s", 1.5),
    "lora-sum": ("tab:red", "^", 1.5),
    "lora-ties": ("tab:purple", "v", 1.5),
    "lora-dare": ("tab:blue", "D", 1.5),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=Path, default=RESULTS / "identity.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "identity.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(args.rows.read_text())
    # One line per method and training seed (blockctl has two).
    lines = sorted({(r["method"], r.get("seed", 0)) for r in rows if r["method"] in STYLE},
                   key=lambda ms: (list(STYLE).index(ms[0]), ms[1]))  # fmt: skip
    fig, axes = plt.subplots(1, len(PANELS), figsize=(3.8 * len(PANELS), 3.6))
    for ax, (key, title, (ideal, target)) in zip(axes, PANELS, strict=True):
        for method, seed in lines:
            points = sorted(
                (r["n"], r[key])
                for r in rows
                if r["method"] == method and r.get("seed", 0) == seed
                and r.get(key) is not None and (key not in LOG or r[key] > 0)  # 0 at N=1
            )  # fmt: skip
            if not points:
                continue
            color, marker, width = STYLE[method]
            label = f"{method} (seed {seed})" if method == "blockctl" else method
            ax.plot(*zip(*points, strict=True), marker=marker, color=color, lw=width,
                    ls="-" if seed == 0 else "--", label=label)  # fmt: skip
        if target is not None:
            ax.axhline(target, color="grey", ls="--", lw=1, label="target")
        if ideal is not None:
            ax.axhline(ideal, color="grey", ls=":", lw=1)
        if key in LOG:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("concepts merged (N)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Identity after merging N independently trained toy concepts", fontsize=11)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
