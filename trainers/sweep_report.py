"""Compare the runs of a Hydra multirun: a Markdown table and a PNG across its jobs.

Runs by itself at the end of every `python -m trainers.ppo -m ...` sweep (a Hydra callback set in
conf/ppo.yaml) and by hand on any finished sweep:

    python -m trainers.sweep_report multirun/2026-11-25/12-00-00
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

_COLUMNS = [
    ("reward_first_fifth", "reward 1st 1/5", "{:.3f}"),
    ("reward_last_fifth", "reward last 1/5", "{:.3f}"),
    ("final_eval_reward", "final eval", "{:.3f}"),
    ("mean_step_s", "step s", "{:.3f}"),
    ("mean_refit_s", "refit s", "{:.4f}"),
    ("refit_share", "refit share", "{:.1%}"),
    ("mean_gbps", "refit GB/s", "{:.3f}"),
    ("wall_s", "wall s", "{:.0f}"),
]


def _job_dirs(sweep_dir: Path) -> list[Path]:
    jobs = [
        p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra" / "overrides.yaml").exists()
    ]
    return sorted(jobs, key=lambda p: int(p.name) if p.name.isdigit() else p.name)


def _overrides(job: Path) -> str:
    lines = (job / ".hydra" / "overrides.yaml").read_text().splitlines()
    return (
        " ".join(line.removeprefix("- ").strip() for line in lines if line.strip()) or "(defaults)"
    )


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for job in _job_dirs(sweep_dir):
        summary_file, metrics_file = job / "summary.json", job / "metrics.jsonl"
        row: dict[str, Any] = {
            "job": job.name,
            "overrides": _overrides(job),
            "finished": summary_file.exists(),
        }
        if summary_file.exists():
            row.update(json.loads(summary_file.read_text()))
        history = []
        if metrics_file.exists():
            history = [
                json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()
            ]
        gbps = [h["refit/gbps"] for h in history if h.get("refit/gbps") is not None]
        row["mean_gbps"] = sum(gbps) / len(gbps) if gbps else None
        row["history"] = history
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = "| job | overrides | " + " | ".join(label for _, label, _ in _COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(_COLUMNS) + 2)]
    for row in rows:
        cells = [
            fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in _COLUMNS
        ]
        status = "" if row["finished"] else " (unfinished)"
        lines.append(f"| {row['job']} | `{row['overrides']}`{status} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for row in rows:
        h = row["history"]
        left.plot([r["step"] for r in h], [r["reward/mean"] for r in h], label=row["overrides"])
    left.set_xlabel("step")
    left.set_ylabel("reward/mean")
    left.legend(fontsize=7)
    labels = [row["job"] for row in rows]
    refit_ms = [1000 * (row.get("mean_refit_s") or 0.0) for row in rows]
    step_ms = [1000 * (row.get("mean_step_s") or 0.0) for row in rows]
    xs = range(len(rows))
    right.bar([x - 0.2 for x in xs], step_ms, width=0.4, label="step ms")
    right.bar([x + 0.2 for x in xs], refit_ms, width=0.4, label="refit ms")
    right.set_xticks(list(xs), labels)
    right.set_xlabel("job (see the table for its overrides)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(sweep_dir: str | Path) -> Path:
    """Write sweep_report.md and sweep_report.png into `sweep_dir`; returns the Markdown path."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"{sweep_dir} holds no Hydra job directories")
    table = markdown_table(rows)
    out = sweep_dir / "sweep_report.md"
    out.write_text(f"# Sweep {sweep_dir}\n\n{table}\n![runs](sweep_report.png)\n")
    plot(rows, sweep_dir / "sweep_report.png")
    print(table, flush=True)
    return out


class SweepReportCallback(Callback):
    """Hydra callback: the comparison of a multirun's jobs, written when the sweep ends."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        report(config.hydra.sweep.dir)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m trainers.sweep_report <multirun dir>")
    report(sys.argv[1])
