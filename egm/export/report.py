"""The correction report: ``report.json`` and a chart, ``report.png``.

The chart has one horizontal bar per (model_version, label): what happened to the
model's boxes (accepted / moved / relabeled / deleted) stacked to the number of
predicted boxes, boxes the human added stacked after them, and the acceptance rate
and mean IoU written at the end of the bar. It is drawn with matplotlib's Agg canvas
directly (no pyplot state), so it works headless and from threads.
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.ticker import MaxNLocator

from egm.export.corrections import Tally

COLORS = {"accepted": "#2e7d32", "moved": "#f9a825", "relabeled": "#6a1b9a", "deleted": "#c62828",
          "added": "#1565c0"}
ORDER = ("accepted", "moved", "relabeled", "deleted", "added")


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    png_path = out_dir / "report.png"
    draw_chart(report["corrections"], png_path)
    return json_path, png_path


def draw_chart(corrections: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = _rows(corrections)
    height = max(2.8, 0.45 * len(rows) + 2.0)
    fig = Figure(figsize=(10, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if not rows:
        ax.text(0.5, 0.5, "no annotation started from a prediction", ha="center", va="center")
        ax.set_axis_off()
    else:
        _bars(ax, rows)
    overall = corrections.get("overall", {})
    fig.suptitle(f"Corrections of pre-annotations: acceptance {_pct(overall.get('acceptance_rate'))}, "
                 f"mean IoU {_num(overall.get('mean_iou'))}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _rows(corrections: dict) -> list[tuple[str, dict]]:
    rows = []
    for version, figures in corrections.get("by_model_version", {}).items():
        for label, f in figures.get("by_label", {}).items():
            rows.append((f"{_short(version)} | {label}", f))
    return rows


def _bars(ax, rows: list[tuple[str, dict]]) -> None:
    names = [name for name, _ in rows]
    ys = list(range(len(rows)))
    left = [0.0] * len(rows)
    for kind in ORDER:
        values = [float(f.get(kind, 0)) for _, f in rows]
        ax.barh(ys, values, left=left, color=COLORS[kind], label=kind, height=0.6)
        left = [a + b for a, b in zip(left, values)]
    for y, (_, f), end in zip(ys, rows, left):
        note = (f"  {_pct(f.get('acceptance_rate'))} accepted, IoU {_num(f.get('mean_iou'))}"
                if f.get("predicted") else "  added by annotators only")
        ax.text(end, y, note, va="center", fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("boxes")
    ax.set_xlim(0, max(left) * 1.45 + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(rows) < 4 else -0.12), fontsize=8,
              ncol=len(ORDER), frameon=False)


def _short(version: str, limit: int = 28) -> str:
    return version if len(version) <= limit else version[: limit - 1] + "…"


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def corrections_section(tally: Tally) -> dict:
    return tally.as_dict()
