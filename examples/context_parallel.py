"""Context parallelism on the CPU: causal attention over a sequence split
across 2 processes (gloo), forward and backward, checked against
flash_attn_func on the whole sequence in one process.

    torchrun --standalone --nproc_per_node 2 examples/context_parallel.py

On GPUs: init_process_group("nccl"), torch.cuda.set_device(local rank) and
CUDA tensors in fp16/bf16; nothing else changes.
"""
import argparse

import torch
import torch.distributed as dist

import flash_attn_ext
from flash_attn_ext import distributed as cp


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqlen", type=int, default=2048, help="full sequence length")
    parser.add_argument("--method", choices=["ring", "all_gather"], default="ring")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world_size = dist.get_rank(), dist.get_world_size()

    # The same full tensors on every rank (same seed), for the check below;
    # in training each rank would only ever build its own part.
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.seqlen, 8, 64) for _ in range(3))
    dout = torch.randn_like(q)

    # Zigzag sharding: rank r holds chunks r and 2 * world_size - 1 - r of
    # 2 * world_size, which balances the causal work.
    q_local, k_local, v_local = (cp.shard(x, rank, world_size).requires_grad_() for x in (q, k, v))
    attention = cp.ring_flash_attn_func if args.method == "ring" else cp.all_gather_flash_attn_func
    out_local = attention(q_local, k_local, v_local, causal=True)
    out_local.backward(cp.shard(dout, rank, world_size))

    # Put the shards together and compare with one process doing it all.
    out = cp.gather(out_local.detach())
    grads = [cp.gather(t.grad) for t in (q_local, k_local, v_local)]
    if rank == 0:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        ref = flash_attn_ext.flash_attn_func(q, k, v, causal=True)
        ref.backward(dout)
        errors = [(a - b).abs().max().item() for a, b in zip([out] + grads, [ref, q.grad, k.grad, v.grad])]
        print(f"{args.method} attention over {world_size} ranks, seqlen {args.seqlen}: max difference from one "
              f"process: out {errors[0]:.1e}, dq {errors[1]:.1e}, dk {errors[2]:.1e}, dv {errors[3]:.1e}")
        assert max(errors) < 1e-4
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
