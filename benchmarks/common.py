"""Helpers shared by bench_attention.py (GPU) and bench_cpu.py (CPU).

The measurement code itself (FLOP formulas, timing, memory probes,
references, tables, JSON) lives in flash_attn_ext/_bench_utils.py, because the
main job `python -m flash_attn_ext` ships in the package and uses the same
code; this module re-exports it and adds what only the scripts need (import
path set-up, plotting).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

# Run from a checkout: put the repository root first on the path when its
# package is built there (an in-place or editable build, which is what a
# benchmark of this checkout means) or when no flash_attn_ext is installed
# at all; a checkout without its libraries beside an installed wheel (CI's
# wheel step) uses the wheel.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BUILT_HERE = bool(glob.glob(os.path.join(_ROOT, "flash_attn_ext", "_C*.so")))
if _ROOT not in sys.path and (_BUILT_HERE or importlib.util.find_spec("flash_attn_ext") is None):
    sys.path.insert(0, _ROOT)

from flash_attn_ext.reference import attention_ref  # noqa: E402,F401  (the shared reference)
from flash_attn_ext._bench_utils import (  # noqa: E402,F401
    CpuPeakMemory,
    attention_flops,
    bwd_closure,
    cpu_cores,
    cpu_memory_probe_available,
    cpu_model,
    cuda_peak_extra_bytes,
    default_json_path,
    environment,
    cpu_measure,
    run_in_fork,
    fmt,
    fwd_closure,
    fwdbwd_closure,
    implementations,
    make_inputs,
    markdown_table,
    max_abs_err,
    mib,
    ours_attention,
    passes_2x_rule,
    sdpa_attention,
    sdpa_backends,
    sdpa_context,
    short_error,
    slug,
    tflops,
    time_cpu_ms,
    time_cuda_ms,
    write_json,
)

ROOT = _ROOT


def parse_list(text: str, cast=str):
    """'1k,2k,512' -> [1024, 2048, 512] for ints (k suffix = 1024); plain split otherwise."""
    items = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if cast is int and part.lower().endswith("k"):
            items.append(int(float(part[:-1]) * 1024))
        else:
            items.append(cast(part))
    return items


def parse_causal(text: str):
    """'0,1' / 'both' / 'true' -> list of bools."""
    if text.strip().lower() in ("both", "all"):
        return [False, True]
    return [part.strip().lower() in ("1", "true", "yes", "causal") for part in text.split(",") if part.strip()]


COLORS = {"ours": "tab:red", "flash": "tab:blue", "cudnn": "tab:green", "efficient": "tab:orange", "math": "tab:gray"}


def plot_tflops(rows, path, impls, directions=("fwd", "bwd", "fwdbwd"), title=""):
    """TFLOP/s against seqlen, one panel per (dtype, hdim, causal) x direction, one line per impl.

    Returns the path written, or None when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = sorted({(r["dtype"], r["d"], r["causal"]) for r in rows}, key=lambda g: (g[0], g[1], g[2]))
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), len(directions), figsize=(4.2 * len(directions), 3.0 * len(groups)),
                             squeeze=False)
    for gi, (dtype, d, causal) in enumerate(groups):
        sub = sorted((r for r in rows if (r["dtype"], r["d"], r["causal"]) == (dtype, d, causal)),
                     key=lambda r: r["S"])
        for di, direction in enumerate(directions):
            ax = axes[gi][di]
            for impl in impls:
                pts = [(r["S"], r.get(f"{impl}_{direction}")) for r in sub]
                pts = [(s, v) for s, v in pts if v is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl,
                            color=COLORS.get(impl), linewidth=2.5 if impl == "ours" else 1.2)
            ax.set_xscale("log", base=2)
            ticks = sorted({r["S"] for r in sub})
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{t // 1024}k" if t >= 1024 and t % 1024 == 0 else str(t) for t in ticks])
            ax.set_ylim(bottom=0)
            ax.set_title(f"{dtype} hd{d} {'causal' if causal else 'non-causal'} {direction}", fontsize=9)
            ax.set_xlabel("seqlen")
            ax.set_ylabel("TFLOP/s")
            ax.grid(True, alpha=0.3)
            if gi == 0 and di == 0:
                ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


_FLEX = {}  # the compiled flex_attention and the causal block masks by shape, built on first use


def flex_attention_compiled(q, k, v, causal: bool = False):
    """torch.compile(flex_attention) on (B, S, H, D) tensors, returning (B, H, S, D) as the SDPA
    implementations do; causal through a block mask aligned bottom-right like ours (one per shape,
    built by the untimed first call). GQA through enable_gqa. The project's speed targets count it
    beside SDPA's backends."""
    import torch
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        # One compiled graph per shape of a sweep: past dynamo's recompile limit it would fall back
        # to an unfused path, which would then be timed as FlexAttention.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    sq, sk = q.shape[1], k.shape[1]
    mask = None
    if causal:
        key = (sq, sk, str(q.device))
        if key not in _FLEX:
            offset = sk - sq
            _FLEX[key] = create_block_mask(lambda b, h, i, j: j <= i + offset, None, None, sq, sk, device=q.device)
        mask = _FLEX[key]
    return _FLEX["fn"](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                       enable_gqa=k.shape[2] != q.shape[2])


def graph_time_ms(fn, reps, trials=5):
    """Median per-call time (ms) of fn, `reps` calls captured in a CUDA graph: the GPU's time alone,
    where a call's host work (Python, autograd, launches) could otherwise leave the GPU waiting."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    del graph
    return sorted(times)[len(times) // 2]
