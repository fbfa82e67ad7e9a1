"""Functions run in the processes that torch.multiprocessing.spawn starts: kept out of the test
modules, whose imports every spawned process would otherwise pay."""

from __future__ import annotations

import torch


def gather_hypotheses(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: its share of the validation sentences' translations (rank 0
    the even indices, rank 1 the odd ones plus index 0 again, as a DistributedSampler pads),
    merged by `gathered` and saved to out/rank<N>.pt."""
    from dlpipe.tasks.translator_bleu import gathered

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        share = {i: [i, i + 1] for i in range(rank, 7, 2)} | ({0: [0, 1]} if rank else {})
        torch.save(gathered(share), f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()
