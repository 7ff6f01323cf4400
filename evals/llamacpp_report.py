"""The table and plot of evals/llamacpp_compare.py's results (evals/results/llamacpp_compare.{md,png}): pure
functions of the results JSON, so `--steps report` and the tests need neither llama.cpp nor a model."""
from __future__ import annotations

from pathlib import Path

from compressor.assets import HELDOUT_TEXTS

TASKS = ("local_piqa", "local_arc_easy")

EXPERT_PARAMS = 30 * 8 * 3 * 576 * 1536  # the reference MoE's routed expert weights


def bits(expert_bytes: int, params: int = EXPERT_PARAMS) -> float:
    return expert_bytes * 8 / params


def type_summary(row: dict) -> str:
    t = row.get("expert_types")
    if t:
        return "; ".join(f"{p} " + "+".join(f"{n}x{k.lower()}" if len(c) > 1 else k.lower() for k, n in c.items())
                         for p, c in t.items())
    return ", ".join(f"{n} {f}" for f, n in list(row.get("formats", {}).items())[:4])


# row name prefixes, in the table's order within a point
KINDS = ("f16", "llama", "ours", "ours+rtn", "ours+imatrix", "ours+layout", "ours+layout+gptq", "ours+tq",
         "ours+tq+imatrix", "native", "native+imatrix", "vllm", "vllm+imatrix")


def row_order(name: str, qtypes) -> tuple:
    kind, _, q = name.partition("-")
    return qtypes.index(q) if q in qtypes else -1, KINDS.index(kind)


def markdown(results: dict) -> str:
    s = results["settings"]
    rows = results["rows"]
    head = ["row", "expert bytes", "bits/w", "expert types", "ppl pydocs", "ppl austen", "ppl shakespeare",
            "mean (llama.cpp)", "mean (ours)", "piqa", "arc_easy", "prefill tok/s", "decode tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    llama_mean = {r.get("qtype"): r["ppl_llama_cpp"]["mean"] for r in rows.values()
                  if r["kind"] == "llama" and "ppl_llama_cpp" in r}
    for name in sorted(rows, key=lambda n: row_order(n, list(s["qtypes"]))):
        r = rows[name]
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'].strip().splitlines()[-1][:120]} |" + " |" * (len(head) - 2))
            continue
        main = r.get("ppl_llama_cpp") or r.get("ppl_ours") or {}
        cells = [name + (f" (= {r['same_as']})" if "same_as" in r else ""), f"{r['expert_bytes']:,}",
                 f"{bits(r['expert_bytes']):.3f}", type_summary(r)]
        cells += [f"{main[t]:.2f}" if t in main else "" for t in HELDOUT_TEXTS]
        q = name.partition("-")[2]
        ref = llama_mean.get(q)
        for key in ("ppl_llama_cpp", "ppl_ours"):
            m = r.get(key, {}).get("mean")
            rel = f" ({(m / ref - 1) * 100:+.1f}%)" if m is not None and ref and r["kind"] != "llama" else ""
            cells.append(f"{m:.2f}{rel}" if m is not None else "")
        for t in TASKS:
            a = r.get("tasks", {}).get(t)
            cells.append(f"{a['acc']:.3f} ± {a['stderr']:.3f}" if a else "")
        b = r.get("bench", {})
        for k in ("prefill_tok_s", "decode_tok_s"):
            cells.append(f"{b[k]:.1f} ± {b[k + '_sd']:.1f}" if k in b else "")
        lines.append("| " + " | ".join(cells) + " |")
    lim = {r["tasks"]["limit"] for r in rows.values() if "tasks" in r}
    # what the rows were measured on, not the flags of the run that last wrote the settings
    toks = {r[k]["max_tokens"] for r in rows.values() for k in ("ppl_llama_cpp", "ppl_ours")
            if "max_tokens" in r.get(k, {})} or {s["max_tokens"]}
    lines.append(
        f"\nPerplexity: the first {' or '.join(map(str, sorted(toks)))} tokens of each held-out text in our "
        f"tokenizer's ids, windows of {s['seq_len']}, in llama.cpp (GGUF rows) and in our runtime "
        "(\"mean (ours)\"); in brackets the change against llama.cpp's own file at the same point. bits/w: expert "
        f"bytes x 8 / {EXPERT_PARAMS:,} expert weights. Tasks: acc ± standard error on the first "
        f"{', '.join(map(str, sorted(lim))) or '-'} examples. llama-bench pp128 / tg32, {s['threads']} threads, on "
        "shared cores.")
    cpus = {}
    for name, r in rows.items():
        if "cpu" in r.get("bench", {}):
            cpus.setdefault(r["bench"]["cpu"], []).append(name)
    if cpus:
        lines.append("Speeds compare on the same CPU only: " + "; ".join(
            f"{', '.join(names)} on {cpu}" for cpu, names in cpus.items()) + "; the other rows' bench was run before "
            "the CPU was recorded.")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"llama": ("llama.cpp imatrix k-quants", "s", "C1"), "ours": ("ours, --target gguf", "o", "C0"),
              "ours+rtn": ("ours, --target gguf, RTN in pass 2", "D", "C4"),
              "ours+imatrix": ("ours, --target gguf, --method imatrix", "X", "C6"),
              "ours+layout": ("ours, llama.cpp's layout, --method imatrix", "*", "C7"),
              "ours+layout+gptq": ("ours, llama.cpp's layout, GPTQ", "*", "k"),
              "ours+tq": ("ours, --target gguf with tq1_0/tq2_0", "P", "C5"),
              "ours+tq+imatrix": ("ours, --target gguf with tq1_0/tq2_0, --method imatrix", "P", "C6"),
              "native": ("ours, --target native (our runtime)", "^", "C2"),
              "native+imatrix": ("ours, --target native, --method imatrix (our runtime)", "^", "C8"),
              "vllm": ("ours, --target vllm (our runtime)", "v", "C3"),
              "vllm+imatrix": ("ours, --target vllm, --method imatrix (our runtime)", "v", "C9")}
    for kind, (label, marker, color) in styles.items():
        pts = sorted((r["expert_bytes"] / 1e6, (r.get("ppl_llama_cpp") or r["ppl_ours"])["mean"], n)
                     for n, r in rows.items() if n.partition("-")[0] == kind and "same_as" not in r
                     and ("ppl_llama_cpp" in r or "ppl_ours" in r))
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=label,
                linestyle="-" if kind in ("llama", "ours") else "none")
        if kind == "llama":
            for x, y, n in pts:
                ax.annotate(n.partition("-")[2], (x, y), fontsize=7, textcoords="offset points", xytext=(4, 4))
    f16 = rows.get("f16", {}).get("ppl_llama_cpp", {}).get("mean")
    if f16:
        ax.axhline(f16, color="gray", linestyle=":", label=f"F16 ({rows['f16']['expert_bytes'] / 1e6:,.0f} MB)")
    ax.set_xlabel("routed-expert bytes (MB)")
    ax.set_ylabel("mean held-out perplexity (llama.cpp)")
    ax.set_title("reference MoE: equal expert bytes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(results: dict, path: Path) -> None:
    """`path`.md and `path`.png from the results JSON at `path`."""
    path.with_suffix(".md").write_text(markdown(results))
    try:
        plot(results, path.with_suffix(".png"))
    except ImportError:
        pass
