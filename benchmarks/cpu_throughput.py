"""Training throughput on CPU: T-GM vs Hugging Face ImageGPT of the same shape, measured in one run.

    python benchmarks/cpu_throughput.py                                   # the params.yaml model: 4 x 128, 4 heads
    python benchmarks/cpu_throughput.py --layers 8 --embd 256 --heads 8   # a wider one

Both models get the same layers, width, heads, sequence (image_size ** 2 pixels), palette, batch and precision,
and both take full training steps as tgm.training.loop runs them: forward and cross-entropy over all T pixels,
backward, gradient clipping at 1.0, AdamW from tgm.training.optim.make_optimizer. For fp32 and bf16 autocast it prints
tokens (pixels) per second for each model, T-GM / HF, achieved FLOP/s and that as a fraction of the matmul peak
of the dtype the matmuls run in, measured here in the same run (benchmarks.common.matmul_peak). The FLOP count
per token is benchmarks.common.train_flops_per_token (PaLM's 6N + 12·L·C·T, as nanoGPT uses it), the same for
both models since their matrix shapes are identical. Timed rounds alternate between the models and the median
round is reported, so load from other processes hits both alike; --max-seconds caps each dtype's timing.
Another busy process on the same cores slows OpenMP kernels many-fold, hence the load averages in the output.

--breakdown adds a third arm to the same rounds, T-GM with attention free (SDPA hands V through), and from it the
most any attention kernel could give: that step plus the causal half of the attention FLOPs at the matmul peak.
Then it profiles T-GM's step by kind of operator.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# `python benchmarks/cpu_throughput.py` puts only benchmarks/ on the path; benchmarks.common needs the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling  # noqa: E402

from benchmarks.common import (  # noqa: E402
    matmul_peak,
    matmul_train_flops_per_token,
    optimizer,
    train_flops_per_token,
    train_step,
)
from tgm.model import TGM, TGMConfig  # noqa: E402

CPU = torch.device("cpu")
AMP = {"fp32": None, "bf16": torch.bfloat16}
NO_ATTENTION = "T-GM, attention free"
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


class ImageGPTAsTGM(nn.Module):
    """ImageGPT behind T-GM's call signature, so that batch_losses computes the very same loss for both.

    ImageGPT's own `labels=` loss shifts inside the model and would score only T-1 pixels (T+1 inputs do not
    fit n_positions = T), so the start token (vocab_size - 1) is prepended here, as T-GM does internally."""

    def __init__(self, cfg: ImageGPTConfig):
        super().__init__()
        self.hf = ImageGPTForCausalImageModeling(cfg)
        self.start_token = cfg.vocab_size - 1

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, None]:
        inputs = torch.cat([torch.full_like(tokens[:, :1], self.start_token), tokens[:, :-1]], dim=1)
        return self.hf(input_ids=inputs).logits, None  # (B, T, vocab_size - 1 = K)


def hf_config(cfg: TGMConfig) -> ImageGPTConfig:
    return ImageGPTConfig(
        vocab_size=cfg.palette_size + 1,
        n_positions=cfg.seq_len,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        activation_function="gelu",  # T-GM's exact GELU; ImageGPT defaults to quick_gelu
        use_cache=False,
    )  # a training step has no use for a KV cache


def sdpa_supported(cfg: ImageGPTConfig) -> bool:
    try:  # asking for it is the only check that stays true across transformers versions
        ImageGPTForCausalImageModeling._from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
        return True
    except (ValueError, ImportError):
        return False


def warmed_up(build, cfg: TGMConfig, args, amp: torch.dtype | None):
    """(model, optimizer, batch) after `args.warmup` untimed steps; seeded, so every caller gets the same."""
    torch.manual_seed(0)
    model = build().train()
    opt = optimizer(model)
    x = torch.randint(0, cfg.palette_size, (args.batch, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    for _ in range(args.warmup):
        train_step(model, opt, x, CPU, amp)
    return model, opt, x


@contextlib.contextmanager
def attention_free():
    """T-GM's SDPA call hands V straight through: every other operation of the step is unchanged, so the step
    takes what T-GM would take if attention cost nothing (HF's eager attention does not call SDPA). Under bf16
    autocast the fp32 casts T-GM makes for SDPA still run, so there the ceiling is, if anything, a little low."""
    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, **_: v
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def _attention_in(dtype: torch.dtype | None, math_kernel: bool = False, explicit: bool = False):
    """A stand-in for SDPA as T-GM calls it: attention in `dtype` (None: as called), through PyTorch's math
    kernel, or written out as matmul, mask and softmax the way HF's eager attention is."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    real = F.scaled_dot_product_attention

    def attention(q, k, v, is_causal=False, dropout_p=0.0, **kw):
        called = q.dtype
        q, k, v = (t.to(dtype) for t in (q, k, v)) if dtype else (q, k, v)
        if explicit:  # HF's recipe: scores, mask and softmax all in the attention dtype
            t = q.size(-2)
            scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
            mask = torch.ones(t, t, dtype=torch.bool).tril()
            y = torch.where(mask, scores, torch.finfo(scores.dtype).min).softmax(-1) @ v
        else:
            with sdpa_kernel(SDPBackend.MATH) if math_kernel else contextlib.nullcontext():
                y = real(q, k, v, is_causal=is_causal, dropout_p=dropout_p, **kw)
        return y.to(called)

    @contextlib.contextmanager
    def context():
        F.scaled_dot_product_attention = attention
        try:
            yield
        finally:
            F.scaled_dot_product_attention = real

    return context


def attention_variants(amp: torch.dtype | None) -> dict[str, object]:
    """Other attention paths T-GM could take at this dtype, each as an arm of `measure`: which is fastest
    depends on the machine (CPU kind, torch build), so each machine measures its own."""
    low = amp or torch.float32
    return {
        f"T-GM, SDPA in {DTYPE_NAMES[low]}": _attention_in(low),
        f"T-GM, math SDPA in {DTYPE_NAMES[low]}": _attention_in(low, math_kernel=True),
        f"T-GM, matmul attention in {DTYPE_NAMES[low]}": _attention_in(low, explicit=True),
    }


def measure(cfg: TGMConfig, args, amp: torch.dtype | None) -> dict[str, float]:
    """Median tokens/s per model over alternating timed rounds of `args.steps` steps each. With --breakdown,
    a third arm times T-GM with attention free, in the same rounds: the ceiling of any faster attention."""
    arms = {
        "T-GM": (lambda: TGM(cfg), contextlib.nullcontext),
        "HF": (lambda: ImageGPTAsTGM(hf_config(cfg)), contextlib.nullcontext),
    }
    if args.breakdown:
        arms[NO_ATTENTION] = (lambda: TGM(cfg), attention_free)
    if args.attention_variants:
        arms.update({name: (lambda: TGM(cfg), context) for name, context in attention_variants(amp).items()})
    models = {}
    for name, (build, context) in arms.items():
        with context():
            model, opt, x = warmed_up(build, cfg, args, amp)
        models[name] = (model, opt, context)
    seconds = {name: [] for name in models}
    deadline = time.perf_counter() + args.max_seconds
    for r in range(args.rounds):
        for name in list(models) if r % 2 == 0 else list(models)[::-1]:  # no model always goes first
            model, opt, context = models[name]
            with context():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    train_step(model, opt, x, CPU, amp)
                seconds[name].append(time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return {name: args.steps * args.batch * cfg.seq_len / statistics.median(s) for name, s in seconds.items()}


def breakdown(cfg: TGMConfig, args, amp: torch.dtype | None, hf_tokens_per_s: float, peak: float) -> None:
    """Where a T-GM training step spends its time, by kind of operator (torch.profiler, self CPU time), and
    the throughput T-GM would reach if everything but the matrix products and attention took no time."""
    from torch.profiler import ProfilerActivity, profile

    model, opt, x = warmed_up(lambda: TGM(cfg), cfg, args, amp)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            train_step(model, opt, x, CPU, amp)
    kinds = {
        "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
        "attention (SDPA)": ("aten::_scaled_dot_product",),
    }
    seconds = dict.fromkeys([*kinds, "everything else"], 0.0)
    for event in prof.key_averages():
        kind = next((k for k, names in kinds.items() if event.key.startswith(names)), "everything else")
        seconds[kind] += event.self_cpu_time_total / 1e6 / args.steps
    step = sum(seconds.values())
    print(f" T-GM step breakdown ({args.steps} profiled steps, {step * 1e3:.0f} ms a step):")
    for kind, sec in seconds.items():
        print(f"  {kind:<18}{sec * 1e3:8.1f} ms {sec / step:7.1%}")
    tokens = args.batch * cfg.seq_len
    matmul_rate = matmul_train_flops_per_token(cfg) * tokens / seconds["matrix products"]
    print(f"  the matrix products alone run at {matmul_rate / 1e9:.1f} GFLOP/s, {matmul_rate / peak:.1%} of peak")
    bound = tokens / (seconds["matrix products"] + seconds["attention (SDPA)"])
    print(f"  with everything else free: {bound:,.0f} tokens/s, {bound / hf_tokens_per_s:.2f}x HF")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=14)
    ap.add_argument("--palette", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="training steps per timed round")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per model (fewer if --max-seconds runs out)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="no new round starts after this, per dtype")
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="also time T-GM with attention free (the ceiling of a faster attention), then profile "
        "T-GM's step: time in matrix products, attention and the rest",
    )
    ap.add_argument(
        "--attention-variants",
        action="store_true",
        help="also time T-GM with other attention paths (SDPA in the autocast dtype instead of T-GM's fp32 "
        "upcast, PyTorch's math kernel, matmul + softmax), in the same rounds",
    )
    args = ap.parse_args()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if unknown := set(dtypes) - set(AMP):
        ap.error(f"unknown dtypes {sorted(unknown)}; choose from {sorted(AMP)}")
    load_start = os.getloadavg()[0]
    torch.manual_seed(0)
    cfg = TGMConfig(
        palette_size=args.palette, seq_len=args.image_size**2, n_layer=args.layers, n_head=args.heads, n_embd=args.embd
    )
    hf_cfg = hf_config(cfg)
    n_tgm = TGM(cfg).num_params()
    hf_probe = ImageGPTForCausalImageModeling(hf_cfg)
    n_hf, attn = hf_probe.num_parameters(), hf_probe.config._attn_implementation
    sdpa = sdpa_supported(hf_cfg)
    flops_per_token = train_flops_per_token(cfg)

    print(
        f"{cfg.n_layer} layers x {cfg.n_embd} wide, {cfg.n_head} heads, sequence {cfg.seq_len} "
        f"({args.image_size}x{args.image_size}), palette {cfg.palette_size}, batch {args.batch}; "
        f"{torch.get_num_threads()} threads; torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(
        f"parameters: T-GM {n_tgm:,}, HF ImageGPT {n_hf:,} (T-GM - HF = {n_tgm - n_hf:+,}: ImageGPT's "
        f"LayerNorm is an RMS norm without bias)"
    )
    print(
        f"HF attention: {attn} (default); attn_implementation='sdpa' "
        f"{'is supported' if sdpa else 'is refused by ImageGPT'}. T-GM: F.scaled_dot_product_attention"
    )
    print(f"FLOPs per training token: {flops_per_token / 1e6:.2f} M (same formula for both)")
    print(
        f"timing: {args.warmup} warm-up steps, then up to {args.rounds} alternating rounds of {args.steps} "
        f"steps per model, median round; load average (1 min) at start {load_start:.2f}\n"
    )
    print(f"{'dtype':<6}{'model':<7}{'tokens/s':>11}{'T-GM/HF':>9}{'GFLOP/s':>10}{'peak GFLOP/s':>14}{'of peak':>9}")
    results = {}
    for name in dtypes:
        peak = matmul_peak(CPU, AMP[name] or torch.float32)
        tok_s = measure(cfg, args, AMP[name])
        ratio = tok_s["T-GM"] / tok_s["HF"]
        row = {"peak_flops": peak, "tgm_hf_ratio": ratio}
        for model in ("T-GM", "HF"):
            rate = tok_s[model]
            flops = rate * flops_per_token
            key = model.lower().replace("-", "")
            row.update({f"{key}_tokens_per_s": rate, f"{key}_flops": flops, f"{key}_peak_fraction": flops / peak})
            shown = f"{ratio:>9.2f}" if model == "T-GM" else " " * 9
            print(
                f"{name:<6}{model:<7}{rate:>11,.0f}{shown}{flops / 1e9:>10.1f}{peak / 1e9:>14.1f}{flops / peak:>9.1%}"
            )
        if NO_ATTENTION in tok_s:
            # Its FLOP/s would count attention work it skipped, so only tokens/s and the ratio. Then the same
            # step plus the causal half of the attention FLOPs at the matmul peak: no kernel can beat that.
            free = tok_s[NO_ATTENTION]
            attention_flops = (flops_per_token - matmul_train_flops_per_token(cfg)) / 2
            at_peak = 1.0 / (1.0 / free + attention_flops / peak)
            row.update(
                {
                    "tgm_attention_free_tokens_per_s": free,
                    "tgm_attention_free_hf_ratio": free / tok_s["HF"],
                    "tgm_attention_at_peak_tokens_per_s": at_peak,
                    "tgm_attention_at_peak_hf_ratio": at_peak / tok_s["HF"],
                }
            )
            for label, rate in (("attention free", free), ("attention at peak", at_peak)):
                print(f"{name:<6}{'T-GM':<7}{rate:>11,.0f}{rate / tok_s['HF']:>9.2f}   <- {label}")
        for variant in attention_variants(AMP[name]) if args.attention_variants else ():
            rate = tok_s[variant]
            row[variant] = rate
            print(f"{name:<6}{'T-GM':<7}{rate:>11,.0f}{rate / tok_s['HF']:>9.2f}   <- {variant[6:]}")
        results[name] = row
    load_end = os.getloadavg()[0]
    print(f"load average (1 min) at end {load_end:.2f}")
    if args.breakdown:
        print(
            "<- attention free: T-GM's step with SDPA handing V through, timed in the same rounds;\n"
            "<- attention at peak: that step plus the causal half of attention's FLOPs at the matmul peak,\n"
            "   the most T-GM could reach with any attention kernel"
        )
    for name in dtypes if args.breakdown else ():
        print(f"\n{name}:", end="")
        breakdown(cfg, args, AMP[name], results[name]["hf_tokens_per_s"], results[name]["peak_flops"])
    print(
        json.dumps(
            {
                "layers": cfg.n_layer,
                "embd": cfg.n_embd,
                "heads": cfg.n_head,
                "seq_len": cfg.seq_len,
                "palette": cfg.palette_size,
                "batch": args.batch,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "hf_attn_implementation": attn,
                "hf_sdpa_supported": sdpa,
                "params_tgm": n_tgm,
                "params_hf": n_hf,
                "flops_per_token": flops_per_token,
                "loadavg_start": load_start,
                "loadavg_end": load_end,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
