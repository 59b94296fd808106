"""What the score features cost (issue 9), on the GPU, in one process.

Times flash_attn_func's forward and forward+backward with no feature, with
softcap, ALiBi, attention sinks and all three, and reports each as a
fraction of the plain kernel's time; beside them, PyTorch SDPA's FLASH and
cuDNN backends (plain) and compiled FlexAttention with the same softcap as a
score_mod. Dropout 0.1 runs beside SDPA's FLASH backend with the same
dropout (and cuDNN's, where it accepts dropout). bf16, head dim 128, causal
off by default; --dropout-only times the plain and dropout rows alone.

The configurations are timed interleaved: --rounds rounds, each timing
every configuration once (do_bench, --rep-ms of repetitions), starting one
configuration later each round. A GPU whose clock drifts during the run
(an H200 warming up) then slows every configuration alike instead of those
measured last: timed one after the other, plain first, softcap read +25%
in one run and +38% in the next. Reported: the median time over the rounds,
and as overhead the median over the rounds of time / ours plain in the same
round, minus 1. The backward timings call torch.autograd.grad on the
inputs (no accumulation into .grad, which would add elementwise kernels).
About a minute on an H200 (FlexAttention's compilation included).

    python benchmarks/bench_features.py [--seqlen 8192] [--batch 2] [--heads 16] [--rounds 15] [--dropout-only]
                                        [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401  (puts the checkout first on the path)
import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import flash_attn_ext  # noqa: E402


def fwd_bwd(fn, inputs):
    """fn() then the gradients of `inputs` for a fixed random output gradient;
    run once here, so that a backend declining the call raises now."""
    grad = torch.randn_like(fn())

    def run():
        return torch.autograd.grad(fn(), inputs, grad)

    run()
    return run


def time_ms(fn, rep_ms):
    """Median ms of fn() over about rep_ms of calls (do_bench flushes L2 between them)."""
    return do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlen", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (medians over them)")
    p.add_argument("--rep-ms", type=float, default=40.0, help="do_bench's rep per configuration and round")
    p.add_argument("--json", default=None)
    p.add_argument("--dropout-only", action="store_true", help="only the plain and dropout rows")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    b, s, h, d = args.batch, args.seqlen, args.heads, args.headdim
    dev = "cuda"
    mk = lambda: torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    q, k, v = mk(), mk(), mk()
    slopes = torch.rand(h, device=dev) * 0.1
    sinks = torch.randn(h, device=dev, requires_grad=True)
    cap = 30.0
    ours = {
        "plain": dict(),
        "softcap": dict(softcap=cap),
        "alibi": dict(alibi_slopes=slopes),
        "sinks": dict(s_aux=sinks),
        "all": dict(softcap=cap, alibi_slopes=slopes, s_aux=sinks),
        "dropout 0.1": dict(dropout_p=0.1),
    }
    if args.dropout_only:
        ours = {name: kw for name, kw in ours.items() if name in ("plain", "dropout 0.1")}
    # name -> (forward closure, forward+backward closure), in table order.
    configs = {}
    for name, kw in ours.items():
        fn = lambda kw=kw: flash_attn_ext.flash_attn_func(q, k, v, causal=args.causal, **kw)  # noqa: E731
        leaves = (q, k, v) + ((sinks,) if "s_aux" in kw else ())  # the sinks get their gradient too
        configs[f"ours {name}"] = (fn, fwd_bwd(fn, leaves))
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION)):
        for label, dropout in (("plain", 0.0), ("dropout 0.1", 0.1)):
            def f(backend=backend, dropout=dropout):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=args.causal,
                                                                            dropout_p=dropout)
            try:
                configs[f"{name} {label}"] = (f, fwd_bwd(f, (qt, kt, vt)))  # runs f: a declining backend raises
            except RuntimeError as e:  # a backend that declines the shape or dropout
                print(f"{name} {label}: {e}".splitlines()[0])
    try:
        if args.dropout_only:
            raise RuntimeError("skipped (--dropout-only)")
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention)
        block_mask = None
        if args.causal:
            block_mask = create_block_mask(lambda b_, h_, qi, ki: qi >= ki, None, None, s, s, device=dev)

        def softcap_mod(score, b_, h_, qi, ki):
            return cap * torch.tanh(score / cap)

        fn = lambda: flex(qt, kt, vt, score_mod=softcap_mod, block_mask=block_mask)  # noqa: E731
        configs["flex softcap"] = (fn, fwd_bwd(fn, (qt, kt, vt)))  # compiles the forward and backward
    except Exception as e:  # noqa: BLE001  (FlexAttention missing or failing to compile)
        print(f"flex: {type(e).__name__}: {e}".splitlines()[0])

    # Interleaved rounds: every configuration once per round (forward, then
    # forward+backward), each round starting one configuration later.
    names = list(configs)
    times = {name: ([], []) for name in names}
    for r in range(args.rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            for mode in (0, 1):
                times[name][mode].append(time_ms(configs[name][mode], args.rep_ms))
    rows = {name: (statistics.median(f), statistics.median(fb)) for name, (f, fb) in times.items()}

    def overhead(name, mode):
        # Median over the rounds of the ratio to ours plain in the same round.
        return statistics.median(t / p for t, p in zip(times[name][mode], times["ours plain"][mode])) - 1

    print(f"bf16, batch {b}, seqlen {s}, heads {h}, head dim {d}, causal {args.causal}; median ms over "
          f"{args.rounds} interleaved rounds; overhead = median over the rounds of time / ours plain - 1")
    print("| kernel | fwd ms | fwd+bwd ms | fwd overhead | fwd+bwd overhead |")
    print("|---|---:|---:|---:|---:|")
    for name, (f, fb) in rows.items():
        print(f"| {name} | {f:.3f} | {fb:.3f} | {overhead(name, 0):+.1%} | {overhead(name, 1):+.1%} |")
    plain = times["ours plain"]
    print(f"ours plain over the rounds: fwd {min(plain[0]):.3f}..{max(plain[0]):.3f} ms, "
          f"fwd+bwd {min(plain[1]):.3f}..{max(plain[1]):.3f} ms")
    if "flex softcap" in rows:
        ff, ffb = rows["flex softcap"]
        sf, sfb = rows["ours softcap"]
        print(f"ours softcap vs compiled FlexAttention softcap: fwd {ff / sf:.2f}x, fwd+bwd {ffb / sfb:.2f}x")
    for anchor in ("sdpa flash dropout 0.1", "sdpa cudnn dropout 0.1"):
        if anchor in rows and "ours dropout 0.1" in rows:
            (af, afb), (of, ofb) = rows[anchor], rows["ours dropout 0.1"]
            print(f"ours dropout 0.1 vs {anchor}: fwd {af / of:.2f}x, fwd+bwd {afb / ofb:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "rounds": args.rounds, "ms": rows, "ms_per_round": times}, f, indent=1)


if __name__ == "__main__":
    main()
