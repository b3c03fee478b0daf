"""matplotlib figures (Agg backend, PNG): score vs budget per method, decode speed-up vs the bound."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


MARKERS = "osD^v<>pP*Xh"
_STYLES = ("-", "--", ":")


def _budget_axis(ax, budgets) -> None:
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    bs = sorted(set(budgets))
    ax.set_xticks(bs)
    ax.set_xticklabels([f"{b:g}" for b in bs])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("budget (fraction of context cells kept)")


def _style(i: int) -> dict:
    return {"marker": MARKERS[i % len(MARKERS)], "ls": _STYLES[(i // 10) % len(_STYLES)], "ms": 4, "lw": 1.3}


def plot_scores(rows: list[dict], out_dir: Path) -> dict:
    """score_vs_budget.png (one panel per task, relative to full) and continuation_kl.png, from the
    aggregated rows (`eval.report.aggregate`)."""
    plt = pyplot()
    agg = [r for r in rows if r["length"] == "all" and r["method"] != "full"]
    tasks = [t for t in ("passkey", "kv", "continuation") if any(r["task"] == t for r in agg)]
    paths = {}
    if not tasks:
        return paths
    methods = sorted({r["method"] for r in agg})
    cmap = plt.get_cmap("tab20")
    colors = {m: cmap(i % 20) for i, m in enumerate(methods)}
    styles = {m: _style(i) for i, m in enumerate(methods)}
    budgets = [r["budget"] for r in agg]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        key = "top1" if t == "continuation" else "score"
        for m in methods:
            rs = sorted((r for r in agg if r["task"] == t and r["method"] == m), key=lambda r: r["budget"])
            if rs:
                ax.plot([r["budget"] for r in rs], [r[key] for r in rs], label=m, color=colors[m], **styles[m])
        full = [r for r in rows if r["task"] == t and r["length"] == "all" and r["method"] == "full"]
        if full and t != "continuation":
            ax.axhline(full[0]["score"], color="k", ls="--", lw=1, label="full cache")
        _budget_axis(ax, budgets)
        ax.set_ylabel("top-1 agreement with full cache" if t == "continuation" else "accuracy")
        ax.set_title(t)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right", ncol=1)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    paths["plot_scores"] = Path(out_dir) / "score_vs_budget.png"
    fig.savefig(paths["plot_scores"], dpi=110)
    plt.close(fig)

    cont = [r for r in agg if r["task"] == "continuation" and r["kl"] is not None]
    if cont:
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        for m in methods:
            rs = sorted((r for r in cont if r["method"] == m), key=lambda r: r["budget"])
            if rs:
                ax.plot([r["budget"] for r in rs], [max(r["kl"], 1e-6) for r in rs], label=m, color=colors[m],
                        **styles[m])
        _budget_axis(ax, budgets)
        ax.set_yscale("log")
        ax.set_ylabel("KL(full || compressed), nats/token")
        ax.set_title("continuation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths["plot_kl"] = Path(out_dir) / "continuation_kl.png"
        fig.savefig(paths["plot_kl"], dpi=110)
        plt.close(fig)
    return paths


def plot_decode(rows: list[dict], path: Path) -> Path:
    """Decode speed-up vs budget, one line per context length, with the memory-bandwidth bound."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.8, 4.2))
    lengths = sorted({r["context"] for r in rows})
    cmap = plt.get_cmap("tab10")
    for i, L in enumerate(lengths):
        rs = sorted((r for r in rows if r["context"] == L and r["budget"] < 1), key=lambda r: r["budget"])
        if not rs:
            continue
        c = cmap(i)
        ax.plot([r["budget"] for r in rs], [r["speedup"] for r in rs], marker="o", color=c,
                label=f"measured, {L} tok")
        ax.plot([r["budget"] for r in rs], [r["bound"] for r in rs], ls="--", color=c,
                label=f"bound (weights+KV bytes), {L} tok")
    ax.axhline(1.0, color="k", lw=0.8)
    _budget_axis(ax, [r["budget"] for r in rows if r["budget"] < 1])
    ax.set_ylabel("decode speed-up vs full cache")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
