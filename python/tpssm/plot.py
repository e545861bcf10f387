"""The bench sweep as a PNG: one row of panels per batch size - throughput, time to first token
and per-token decode latency against prompt length - titled with what was measured (model, layer
count, dtype, device), so a shortened CPU run cannot pass for a full-model GPU result."""

from __future__ import annotations

from typing import Dict, List

__all__ = ["have_matplotlib", "plot_bench"]

# (row key, axis label) per panel, left to right.
METRICS = (("throughput_tok_s", "throughput (generated tokens/s)"),
           ("ttft_ms", "time to first token (ms)"),
           ("decode_ms_per_token", "decode latency (ms per token)"))


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plain(value: float, _pos=None) -> str:
    """Tick labels as plain numbers (64, 0.5, 2000), not 2^6 or 2x10^0."""
    return f"{value:g}" if value >= 1e-3 else ""


def plot_bench(rows: List[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    # A colour per tp degree (rank shards dashed); the state cache off in open markers and
    # dotted lines. Log axes: the cache-off baseline is often 10x off, and prompt lengths are
    # usually powers of two.
    batches = sorted({r["batch"] for r in rows})
    prompt_lens = sorted({r["prompt_len"] for r in rows})
    degrees = sorted({(r["tp"], r["rank_shard_only"]) for r in rows})
    colours = {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(degrees)}
    fig, axes = plt.subplots(len(batches), len(METRICS),
                             figsize=(4.3 * len(METRICS) + 2.4, 3.4 * len(batches) + 0.8),
                             squeeze=False)
    for row_axes, batch in zip(axes, batches):
        for ax, (metric, label) in zip(row_axes, METRICS):
            series: Dict[tuple, List[tuple]] = {}
            for r in rows:
                if r["batch"] == batch:
                    series.setdefault((r["tp"], r["rank_shard_only"], r["state_cache"]),
                                      []).append((r["prompt_len"], r[metric]))
            # Per tp degree, the state cache on before off.
            for (tp, shard, cache), pts in sorted(series.items(),
                                                  key=lambda kv: (kv[0][:2], not kv[0][2])):
                pts.sort()
                colour = colours[(tp, shard)]
                ax.plot([p for p, _ in pts], [v for _, v in pts], color=colour,
                        marker="o", markerfacecolor=colour if cache else "none",
                        linestyle=("--" if shard else "-") if cache else ":",
                        label=f"tp {tp}" + (" rank shard" if shard else "")
                        + ("" if cache else ", no state cache"))
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(prompt_lens))
            ax.xaxis.set_major_formatter(FuncFormatter(_plain))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(_plain))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("prompt length (tokens)")
            ax.set_ylabel(label)
            ax.set_title(f"batch {batch}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
