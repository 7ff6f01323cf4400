"""Draw a compressed model's (or a plan.json's) per-expert formats as a layer x expert heat map.

    python -m evals.plan_heatmap OUT_DIR_OR_PLAN_JSON [--png evals/results/plan_heatmap.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = ["drop", "ternary", "int2", "int3", "int4", "int8", "keep"]


def load_plan(path: Path) -> dict:
    path = path / "plan.json" if path.is_dir() else path
    return json.loads(path.read_text())


def draw(plan: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    names = list(plan["experts"])
    grid = [[ORDER.index(f) for f in plan["experts"][n]] for n in names]
    fig, ax = plt.subplots(figsize=(max(4.5, len(grid[0]) * 0.35), max(2.5, len(names) * 0.35)))
    im = ax.imshow(grid, cmap=ListedColormap(plt.cm.viridis([i / (len(ORDER) - 1) for i in range(len(ORDER))])),
                   vmin=-0.5, vmax=len(ORDER) - 0.5, aspect="auto")
    ax.set_yticks(range(len(names)), [n.split(".")[2] if n.count(".") > 2 else n for n in names])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    bar = fig.colorbar(im, ticks=range(len(ORDER)))
    bar.ax.set_yticklabels(ORDER)
    budget = plan.get("budget_bytes")
    ax.set_title(f"{plan.get('allocation', {}).get('objective', 'uniform')} plan, "
                 f"{plan['predicted_bytes']:,} bytes" + (f"\n(budget {budget:,}, {plan['scope']})" if budget else ""),
                 fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("plan", type=Path)
    p.add_argument("--png", type=Path, default=Path(__file__).parent / "results" / "plan_heatmap.png")
    a = p.parse_args()
    draw(load_plan(a.plan), a.png)
    print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
