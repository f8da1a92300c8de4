"""What a finished run shows a person: the loss curve and a short summary."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of metrics.jsonl; a last line torn by a kill is left out."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise
    return records


def plot_losses(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Training loss per step (and eval loss where recorded) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics_path) if r.get("loss") is not None and not r.get("skipped")]
    if not records:
        return None
    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    axes.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss", linewidth=1.2)
    evals = [r for r in records if r.get("eval_loss") is not None]
    if evals:
        axes.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats/token)")
    axes.set_title("lorasp-edge training loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.stem}.tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    os.replace(tmp, png_path)
    return png_path


def format_summary(summary: dict) -> str:
    """A few lines for the terminal."""

    def gigabytes(value):
        return "-" if value is None else f"{value / 1e9:.2f} GB"

    lines = [
        f"steps        {summary['steps']} of {summary['total_steps']}" + (f" (stopped: {summary['stopped']})" if summary.get("stopped") else ""),
        f"tokens       {summary['tokens']:,} in {summary['train_seconds']:.1f} s ({summary.get('tokens_per_s') or 0:.0f} tokens/s)",
        f"peak memory  {gigabytes(summary.get('peak_bytes'))} (plan: {gigabytes(summary.get('planned_total_bytes'))}, budget: {gigabytes(summary.get('budget_bytes'))}; "
        f"{summary.get('peak_measure') or 'resident set'}; whole resident set {gigabytes(summary.get('peak_rss_bytes'))})",
    ]
    if summary.get("final_loss") is not None:
        lines.append(f"final loss   {summary['final_loss']:.4f}" + (f", eval loss {summary['eval_loss']:.4f}" if summary.get("eval_loss") is not None else ""))
    if summary.get("bad_lines"):
        lines.append(f"bad lines    {summary['bad_lines']} skipped")
    if summary.get("skipped_steps"):
        lines.append("skipped      " + ", ".join(f"{count} ({reason})" for reason, count in summary["skipped_steps"].items()) + " steps left the weights alone")
    if summary.get("adapter"):
        lines.append(f"adapter      {summary['adapter']}")
    return "\n".join(lines)
