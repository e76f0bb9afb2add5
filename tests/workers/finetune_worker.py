"""Fine-tune the toy CNN once; run by the fault and DDP tests as a subprocess.

Single process: ``python finetune_worker.py --out-dir D ...``.
Distributed: ``python -m torch.distributed.run --nproc_per_node 2 finetune_worker.py ...``.
Each rank writes its final ``state_dict`` to ``D/rank{r}.pt`` and its result to
``D/result{r}.json``.  ``--print-steps`` prints ``STEP <n>`` after every step (the fault
test times its SIGKILLs on them); ``--fail-rank/--fail-at-step`` make one rank raise, and
``--hang-rank/--hang-at-step`` make one rank stop responding; ``--fsync-delay``
slows every fsync down (so that kills land inside checkpoint saves).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

import toy
from convfx.train import StepInfo, cleanup_distributed, distributed_info


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--ckpt-dir", type=Path, default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n-train", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--teacher", action="store_true")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--schedule", default="cosine")
    p.add_argument("--checkpoint-every", type=int, default=1)
    p.add_argument("--bn-recalibrate", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dist-timeout", type=float, default=None)
    p.add_argument("--print-steps", action="store_true")
    p.add_argument("--fail-rank", type=int, default=None)
    p.add_argument("--fail-at-step", type=int, default=None)
    p.add_argument("--hang-rank", type=int, default=None)
    p.add_argument("--hang-at-step", type=int, default=None)
    p.add_argument("--fsync-delay", type=float, default=0.0,
                   help="sleep this long in every fsync, to widen the window a kill can land in a save")
    return p.parse_args()


@record
def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    if args.fsync_delay > 0:
        real_fsync = os.fsync

        def slow_fsync(fd: int) -> None:
            time.sleep(args.fsync_delay)
            real_fsync(fd)

        os.fsync = slow_fsync
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")

    def callback(info: StepInfo) -> None:
        if args.print_steps:
            print(f"STEP {info.global_step}", flush=True)
        if info.rank == args.fail_rank and info.global_step == args.fail_at_step:
            raise RuntimeError(f"injected failure on rank {info.rank} at global step {info.global_step}")
        if info.rank == args.hang_rank and info.global_step == args.hang_at_step:
            logging.getLogger("worker").warning("rank %d now hangs", info.rank)
            time.sleep(3600)

    model, result = toy.train_toy(
        ckpt_dir=args.ckpt_dir, epochs=args.epochs, n_train=args.n_train, batch_size=args.batch_size,
        augment=not args.no_augment, dropout=args.dropout, teacher=args.teacher, lr=args.lr,
        schedule=args.schedule, checkpoint_every=args.checkpoint_every, bn_recalibrate=args.bn_recalibrate,
        seed=args.seed, callback=callback, dist_timeout_s=args.dist_timeout,
    )
    rank = distributed_info().rank
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out_dir / f"rank{rank}.pt")
    (args.out_dir / f"result{rank}.json").write_text(json.dumps(result))
    cleanup_distributed()


if __name__ == "__main__":
    main()
