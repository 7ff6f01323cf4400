"""Projected wall time, per-rank peak memory and network traffic of a distributed budget compress of a large MoE, from
unit costs measured on the reference MoE. Every figure printed is a PROJECTION, with the formula it came from.

    python -m evals.scale_projection --measure            # unit costs on the reference MoE -> evals/results/scale_costs.json
    python -m evals.scale_projection /work/shared/moe-configs/DeepSeek-V3.json --ranks 1 --ranks 8 --ranks 64

Unit costs (--measure; one thread, real weights of one reference-MoE layer, the real functions, best of 3):
  c_fwd    s per multiply-add of a decoder layer forward (attention, router, the routed experts' matmuls)
  c_obs1   s per multiply-add of pass 1's observer (each routed row: (F+1) expert forwards and both Hessian updates)
  c_obs2   s per multiply-add of pass 2's observer (each routed row: both Hessian updates)
  c_herr   s per multiply-add of pass 1's Hessian error table (F candidates x (out x in x in) per matrix)
  c_rtn    s per weight per format of pass 1's RTN candidates
  c_gptq   s per (out x in x in) of GPTQ on one expert's two matrices
  c_deq    s per weight of dequantizing a packed expert (pass 2's forward after quantization, once per batch)
The model: every MoE layer's work is split into token work (forward, split over ranks by whole batches of 8 windows)
and expert work (split over ranks by owner, at most E ranks busy); communication and disk reads add, unoverlapped.
Routing is taken as uniform (k/E of the tokens per expert); LPT keeps owners balanced within one expert's work.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
COSTS = REPO / "evals" / "results" / "scale_costs.json"
FORMATS = 5  # keep, int8, int4, int3, int2: the default candidates


def best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(model_dir: Path, layer_index: int = 5, tokens: int = 1024) -> dict:
    """Unit costs on one real layer of `model_dir` (a Mixtral-type MoE, e.g. the reference MoE)."""
    from compressor.arch.view import decoder_layers, find_moe_blocks
    from compressor.calibration.stats import ExpertStats, RoutedObserver
    from compressor.io.streaming import StreamedModel
    from compressor.measure import ErrorObserver, candidates
    from compressor.quantize.formats import QuantSpec
    from compressor.quantize.gptq import gptq_quantize, hessian_error
    from compressor.runtime.experts import DenseExperts, PackedMatrix

    torch.set_num_threads(1)
    stream = StreamedModel(model_dir, torch.bfloat16)
    model, g = stream.model, torch.Generator().manual_seed(0)
    layer = decoder_layers(model)[layer_index]
    cfg = model.config
    out = {"model": str(model_dir), "layer": layer_index, "tokens": tokens, "threads": 1}
    with stream.resident(layer_index, layer):
        layer.float()
        block = [b for b in find_moe_blocks(model) if b.layer_idx == layer_index][0]
        dense = DenseExperts.from_view(block)
        E, I2, H = dense.gate_up.shape
        I, k = I2 // 2, block.top_k
        seq = 256
        hidden = torch.randn(tokens // seq, seq, H, generator=g)
        pos = torch.arange(seq)[None].expand(tokens // seq, -1)
        rotary = model.model.rotary_emb(hidden, pos)
        t = best(lambda: layer(hidden, position_embeddings=rotary, position_ids=pos))
        out["c_fwd"] = t / (tokens * layer_macs(cfg, H, I, E, k, seq))
        x, w = torch.randn(tokens, H, generator=g), torch.rand(tokens)
        fmts = ["keep", "int8", "int4", "int3", "int2"]
        t = best(lambda: [candidates(dense.gate_up[:1], f, 128, False) for f in fmts] +
                 [candidates(dense.down[:1], f, 128, False) for f in fmts])
        out["c_rtn"] = t / (3 * H * I * len(fmts))
        cand_gu = torch.stack([candidates(dense.gate_up[:1], f, 128, False) for f in fmts])
        cand_d = torch.stack([candidates(dense.down[:1], f, 128, False) for f in fmts])
        h = dense.hidden(0, x)

        def observe(kind: str):
            stats = ExpertStats.zeros(1, H, I)
            if kind == "pass 1":
                obs = ErrorObserver(stats, "", dense, cand_gu, cand_d, torch.zeros(E, len(fmts)), slot={0: 0})
            else:
                obs = RoutedObserver(stats, "")
            obs(0, x, h, torch.arange(tokens), w)

        out["c_obs1"] = best(lambda: observe("pass 1")) / (tokens * ((len(fmts) + 1) * 3 * H * I + H * H + I * I))
        out["c_obs2"] = best(lambda: observe("pass 2")) / (tokens * (H * H + I * I))
        Hin, Hmid = x.T @ x / tokens, h.T @ h / tokens
        t = best(lambda: (hessian_error(dense.gate_up[:1], cand_gu, Hin[None]),
                          hessian_error(dense.down[:1], cand_d, Hmid[None])))
        out["c_herr"] = t / (len(fmts) * (I2 * H * H + H * I * I))
        spec = QuantSpec("int3", 128, False)
        t = best(lambda: (gptq_quantize(dense.gate_up[:1], Hin[None], spec),
                          gptq_quantize(dense.down[:1], Hmid[None], spec)))
        out["c_gptq"] = t / (I2 * H * H + H * I * I)
        from compressor.quantize.rtn import quantize_rtn
        packed = [PackedMatrix.from_quantized(quantize_rtn(W[0], spec), *W.shape[1:])
                  for W in (dense.gate_up, dense.down)]
        out["c_deq"] = best(lambda: [p.dequantized() for p in packed]) / (3 * H * I)
    F = len(fmts)
    out["derived on this layer (H=%d, I=%d, E=%d)" % (H, I, E)] = {
        "pass 1 s per routed token per expert matrix": out["c_obs1"] * ((F + 1) * 3 * H * I + H * H + I * I) / 2,
        "pass 1 s per expert (candidates and Hessian-error table)":
            out["c_rtn"] * F * 3 * H * I + out["c_herr"] * F * (I2 * H * H + H * I * I),
        "pass 2 s per routed token per expert matrix": out["c_obs2"] * (H * H + I * I) / 2,
        "pass 2 s per expert (GPTQ)": out["c_gptq"] * (I2 * H * H + H * I * I),
        "Hessian bytes per expert": 4 * (H * H + I * I),
        "routed-input bytes per routed token sent to its owner": 4 * H + 12,
    }
    return out


def layer_macs(cfg, H: int, I: int, E: int, k: int, seq: int) -> float:
    """Multiply-adds per token of a Mixtral-type decoder layer (the reference MoE's)."""
    hd = getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads
    attn = H * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + seq * cfg.num_attention_heads * hd
    return attn + H * E + k * 3 * H * I


class Shape:
    """What the projection needs of a model, read off its architecture on the meta device."""

    def __init__(self, config_path: Path):
        from compressor.arch.view import decoder_layers, dense_linears, find_moe_blocks
        from compressor.pipeline.synthetic import meta_model

        config = json.loads(Path(config_path).read_text())
        path = Path(config_path)
        self.name = path.parent.name if path.name == "config.json" else path.stem
        self.fp8 = (config.get("quantization_config") or {}).get("quant_method") == "fp8"
        model = meta_model(config)
        layers = decoder_layers(model)
        blocks = find_moe_blocks(model)
        b = blocks[0]
        self.E, self.k = b.num_experts, b.top_k
        _, I2, self.H = b.gate_up().shape
        self.I = I2 // 2
        self.moe_layers, self.layers = len(blocks), len(layers)
        routed = 3 * self.H * self.I * self.E
        self.layer_params = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        self.active = [n - routed + routed * self.k / self.E if i in {bb.layer_idx for bb in blocks} else n
                       for i, n in enumerate(self.layer_params)]  # per token: the layer's weights a token meets
        self.linears = [(m.out_features, m.in_features) for m in dense_linears(model, blocks).values()]
        self.stem = sum(p.numel() for n, p in model.named_parameters() if ".layers." not in n)
        self.heads, self.head_dim = config["num_attention_heads"], config.get("head_dim") or (
            config.get("qk_nope_head_dim", 0) + config.get("qk_rope_head_dim", 0)) or self.H // config["num_attention_heads"]


def project(s: Shape, c: dict, ranks: int, samples: int, seq: int, bits: float, net_gbs: float, disk_gbs: float,
            method: str = "gptq") -> dict:
    """Seconds, bytes per rank. Each entry: (value, formula)."""
    T, F, E, k, H, I = samples * seq, FORMATS, s.E, s.k, s.H, s.I
    batches = math.ceil(samples / 8)
    tok_share = math.ceil(batches / ranks) / batches      # the busiest rank's share of the token work
    exp_share = math.ceil(E / min(ranks, E)) / E          # ... of the expert work (at most E owners busy)
    attn = T * s.heads * s.head_dim * seq                 # attention scores and values, per layer
    fwd = sum(c["c_fwd"] * (T * a + attn) for a in s.active)
    obs1 = c["c_obs1"] * T * k * ((F + 1) * 3 * H * I + H * H + I * I)
    herr = c["c_herr"] * E * F * (2 * I * H * H + H * I * I)
    rtn = c["c_rtn"] * E * F * 3 * H * I
    lin_h = c["c_obs2"] * T * sum(i * i for _, i in s.linears) / max(s.layers, 1)
    obs2 = c["c_obs2"] * T * k * (H * H + I * I)
    gptq = c["c_gptq"] * (E * (2 * I * H * H + H * I * I) + sum(o * i * i for o, i in s.linears) / s.moe_layers)
    deq = c["c_deq"] * batches * E * 3 * H * I            # each batch dequantizes every expert once
    sens_windows = 8
    sens = 3 * c["c_fwd"] * sum(sens_windows * seq * a for a in s.active) * math.ceil(sens_windows / ranks) / sens_windows
    layer_bytes = [2 * n for n in s.layer_params]         # bf16 checkpoint
    reads = 4 * sum(layer_bytes) / (disk_gbs * 1e9)        # pass 1, sensitivity forward and backward, pass 2
    routed_bytes = T * k * (4 * H + 12) * (ranks - 1) / ranks ** 2     # x fp32, token id, weight: leaves each rank
    expert_out = 3 * H * I * bits / 8
    share_bytes = E * expert_out * (ranks - 1) / ranks      # packed experts each rank receives per layer
    linear_bytes = T * 4 * sum(i for _, i in s.linears) * (ranks - 1) / ranks ** 2 / s.moe_layers
    routed_passes = 1 if method == "rtn" else 2  # RTN's pass 2 routes no inputs
    net_layer = routed_passes * routed_bytes + share_bytes + linear_bytes
    net = s.moe_layers * net_layer
    p1 = fwd * tok_share + s.moe_layers * (obs1 + herr + rtn) * exp_share
    p2 = (2 * fwd) * tok_share + s.moe_layers * (obs2 + gptq + deq) * exp_share + s.layers * lin_h * tok_share
    if method == "rtn":  # no data in pass 2: RTN of every matrix in its one format, no forward, no routed inputs
        p2 = s.moe_layers * c["c_rtn"] * E * 3 * H * I * exp_share
    total = p1 + sens + p2 + reads + net / (net_gbs * 1e9) + s.moe_layers * E * expert_out / (disk_gbs * 1e9)
    layer_fp32 = 4 * max(s.layer_params)
    mem_hess = math.ceil(E / min(ranks, E)) * (H * H + I * I) * 4
    mem_cand = math.ceil(E / min(ranks, E)) * F * 3 * H * I * 4
    mem_act = 2 * T * tok_share * H * 4 + T * k * tok_share * (4 * H + 12) * 2
    mem_sens = s.layers * sens_windows * math.ceil(sens_windows / ranks) / sens_windows * seq * H * 4
    peak = 2 * layer_fp32 + max(mem_cand, mem_hess) + mem_act + mem_sens
    out_bytes = s.moe_layers * E * expert_out + 2 * (sum(s.layer_params) - s.moe_layers * 3 * H * I * E + s.stem)
    return {
        "pass 1 s": (p1, "c_fwd*MACs(forward)*tok_share + layers*(c_obs1*T*k*((F+1)*3HI+H^2+I^2) "
                         "+ c_herr*E*F*(2IH^2+HI^2) + c_rtn*E*F*3HI)*exp_share"),
        "sensitivity s": (sens, "3*c_fwd*MACs(8 windows forward)*ceil(8/N)/8"),
        "pass 2 s": (p2, "2*c_fwd*MACs(forward)*tok_share + layers*(c_obs2*T*k*(H^2+I^2) + c_gptq*E*(2IH^2+HI^2) "
                         "+ c_deq*batches*E*3HI)*exp_share"),
        "disk reads s": (reads, "4 * bf16 layer bytes / disk bandwidth (every rank reads every layer: pass 1, "
                                "sensitivity x2, pass 2)"),
        "network s": (net / (net_gbs * 1e9), "network bytes per rank / link bandwidth"),
        "total s": (total, "sum of the above + output bytes / disk bandwidth (rank 0 writes)"),
        "network bytes per rank": (net, "layers*(2*T*k*(4H+12)*(N-1)/N^2 + E*3HI*bits/8*(N-1)/N + linear inputs)"),
        "peak memory per rank (B)": (peak, "2*fp32 layer + max(owned candidates F*3HI*4, owned Hessians "
                                           "(H^2+I^2)*4) + activations + sensitivity inputs"),
        "rank 0 holds the output (B)": (out_bytes, "experts at bits/8 + the rest in 16 bits"),
        "tok_share": (tok_share, "ceil(batches/N)/batches, batches = ceil(samples/8)"),
        "exp_share": (exp_share, "ceil(E/min(N,E))/E"),
    }


def fmt_time(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def fmt_bytes(b: float) -> str:
    return f"{b / 2**40:.2f} TiB" if b >= 2**40 else f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="*", help="config.json files")
    p.add_argument("--ranks", type=int, action="append", help="rank counts (repeatable; default 1, 8, 64)")
    p.add_argument("--measure", action="store_true", help=f"measure the unit costs into {COSTS.relative_to(REPO)}")
    p.add_argument("--model", default=str(Path("~/.cache/moe-compressor/reference-moe").expanduser()))
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--bits", type=float, default=3.25, help="expert bits at the budget")
    p.add_argument("--net-gbs", type=float, default=10.0, help="link bandwidth per rank, GB/s (assumed, not measured)")
    p.add_argument("--disk-gbs", type=float, default=2.0, help="read/write bandwidth per rank, GB/s (assumed)")
    p.add_argument("--method", choices=["gptq", "rtn"], default="gptq", help="pass 2's quantizer")
    args = p.parse_args(argv)
    if args.measure:
        costs = measure(Path(args.model))
        COSTS.write_text(json.dumps(costs, indent=1))
        print(json.dumps(costs, indent=1))
    if not args.configs:
        return
    costs = json.loads(COSTS.read_text())
    print(f"PROJECTIONS (not measurements) from unit costs measured on {costs['model']} (1 thread per rank); "
          f"{args.samples} x {args.seq_len} calibration tokens, {args.bits} expert bits, {FORMATS} candidate formats, "
          f"links {args.net_gbs} GB/s, disks {args.disk_gbs} GB/s (assumed)")
    print("| model | ranks | pass 1 | sensitivity | pass 2 | disk reads | network | total wall | peak memory per rank | "
          "rank 0 holds the output | network traffic per rank |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    formulas = None
    for path in args.configs:
        shape = Shape(Path(path))
        for n in args.ranks or [1, 8, 64]:
            r = project(shape, costs, n, args.samples, args.seq_len, args.bits, args.net_gbs, args.disk_gbs,
                        args.method)
            v = {k: x for k, (x, _) in r.items()}
            print(f"| {shape.name}{' (bf16 copy)' if shape.fp8 else ''} | {n} | {fmt_time(v['pass 1 s'])} | "
                  f"{fmt_time(v['sensitivity s'])} | {fmt_time(v['pass 2 s'])} | {fmt_time(v['disk reads s'])} | "
                  f"{fmt_time(v['network s'])} | **{fmt_time(v['total s'])}** | "
                  f"{fmt_bytes(v['peak memory per rank (B)'])} | {fmt_bytes(v['rank 0 holds the output (B)'])} | "
                  f"{fmt_bytes(v['network bytes per rank'])} |")
            formulas = {k: f for k, (_, f) in r.items()}
    print("\nFormulas (per rank; T = samples x seq_len, F formats, E experts, k top-k, H hidden, I expert width, "
          "N ranks):")
    for k, f in formulas.items():
        print(f"- {k}: {f}")


if __name__ == "__main__":
    main()
