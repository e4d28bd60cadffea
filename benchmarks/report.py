"""Markdown tables and PNG plots for `bin/bench` results (the JSON it writes)."""

from __future__ import annotations


LABELS = {"dense": "dense, all on device", "offload": "dense layer offload (-ngl)",
          "hybrid": "hybrid sparse (predicted)", "transformers": "transformers eager (torch)",
          "cats": "CATS (threshold oracle: gate dense, up/down above the threshold)"}


def _f(v, fmt="{:.2f}"):
    return "n/a" if v is None else fmt.format(v)


def model_markdown(m: dict) -> str:
    """Per-budget table of one model's configurations, then its goal ratios."""
    lines = [f"### {m['name']}", "", m["description"] + ".", "", f"**{m['quality_note']}.**", "",
             f"Prompt {m['prompt_tokens']} tokens, {m['new_tokens']} greedy tokens per round; medians of "
             f"alternating rounds, [min-max] spread. Floors: bytes touched per token / "
             f"{m['floor_bandwidth_gbps']:.1f} GB/s.", ""]
    if "designed_mean_active" in m:
        lines += [f"Activity: designed {m['designed_mean_active']:.1%} of neurons per token, hottest 20% carry "
                  f"{m['designed_hot20_share']:.1%}; measured from the predictors on fresh tokens "
                  f"{m['measured_mean_active']:.1%} / {m['measured_hot20_share']:.1%}.", ""]
    lines += ["| budget (FFN %) | configuration | decode tok/s [spread] | ms/token | prefill tok/s | "
              "FFN computed/token | MB/token | floor ms | achieved/floor |",
              "|---|---|---|---|---|---|---|---|---|"]
    ffn_all = m["config"]["layers"] * m["config"]["ffn"]
    for r in m["budgets"]:
        for name, c in r["configs"].items():
            label = LABELS[name]
            if name == "offload":
                label += f", last {r['offload_layers']}/{m['config']['layers']} layers on device"
            if name == "hybrid":
                label += f", {r['hot_fraction']:.0%} of neurons hot"
            comp = c.get("ffn_computed_per_token")
            lo, hi = c["decode_tok_s_spread"]
            lines.append(
                f"| {r['fraction']:.0%} | {label} | {c['decode_tok_s']:.2f} [{lo:.2f}-{hi:.2f}] | "
                f"{c['ms_per_token']:.1f} | {c['prefill_tok_s']:.1f} | "
                f"{_f(comp / ffn_all if comp is not None else 1.0, '{:.1%}')} | {c['bytes_per_token'] / 1e6:.1f} | "
                f"{c['floor_ms']:.2f} | {c['achieved_over_floor']:.0%} |")
    s = m["summary"]
    lines += ["", "Ratios are medians of same-round ratios (configurations measured seconds apart).", "",
              "| budget | hybrid / dense | ideal (bytes ratio) | share of ideal | hybrid / offload | "
              "hybrid achieved/floor | dense achieved/floor |", "|---|---|---|---|---|---|---|"]
    for g in s["per_budget"]:
        lines.append(f"| {g['fraction']:.0%} | {g['hybrid_over_dense']:.2f}x | {g['ideal_ratio']:.2f}x | "
                     f"{g['share_of_ideal']:.0%} | {g['hybrid_over_offload']:.2f}x | "
                     f"{g['hybrid_achieved_over_floor']:.0%} | {g['dense_achieved_over_floor']:.0%} |")
    lines += ["", f"All budgets pooled: hybrid / dense **{s['hybrid_over_dense']:.2f}x** of an ideal "
              f"{s['ideal_ratio']:.2f}x (**{s['share_of_ideal']:.0%}** of it); hybrid at "
              f"**{s['hybrid_achieved_over_floor']:.0%}** of its floor (median over budgets). Dense decode "
              f"{_f(s['dense_decode_tok_s'])} tok/s, transformers eager {_f(s['transformers_decode_tok_s'])} tok/s "
              f"(medians over all rounds); ours / transformers **{_f(s['dense_over_transformers'])}x**."
              + (f" CATS / dense **{s['cats_over_dense']:.2f}x** (pooled)." if s.get("cats_over_dense") else ""), ""]
    return "\n".join(lines)


def report_markdown(res: dict) -> str:
    """The whole run: machine, bandwidth, command, then one section per model."""
    bw = res["bandwidth"]
    head = [f"## `bin/bench` on {res['device']} ({res['backend']} backend)", "",
            f"Machine: {res['machine']}; jax {res['jax']}; torch {res.get('torch', 'n/a')}. "
            f"Measured read bandwidth (best of the measurements before and after every budget): host "
            f"{bw['host_gbps']:.1f} GB/s, JAX device {bw['device_gbps']:.1f} GB/s.", "",
            f"Reproduce: `{res['command']}`", ""]
    return "\n".join(head + [model_markdown(m) for m in res["models"]])


def plot_throughput(m: dict, path: str, title_suffix: str = "") -> None:
    """PNG: decode tokens/s against the device budget, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [100 * r["fraction"] for r in m["budgets"]]
    for name, label in LABELS.items():
        pts = [(x, r["configs"][name]) for x, r in zip(xs, m["budgets"]) if name in r["configs"]]
        if not pts:
            continue
        x = [p[0] for p in pts]
        y = [p[1]["decode_tok_s"] for p in pts]
        lo = [p[1]["decode_tok_s"] - p[1]["decode_tok_s_spread"][0] for p in pts]
        hi = [p[1]["decode_tok_s_spread"][1] - p[1]["decode_tok_s"] for p in pts]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=label)
    ax.set_xlabel("device budget (% of FFN bytes, on top of attention, head, predictors, KV cache)")
    ax.set_ylabel("decode tokens/s (median, min-max bars)")
    ax.set_title(f"{m['name']}: decode throughput vs device budget{title_suffix}")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
