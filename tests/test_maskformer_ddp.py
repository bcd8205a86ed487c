"""MaskFormer trains under DistributedDataParallel (two CPU processes, gloo) without ``find_unused_parameters``: the
ranks see different images and instance counts (one image has none), the mask count is averaged across ranks, and
the parameters stay identical on both ranks after the optimiser steps."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZE = 64
STEPS = 2
WORLD_SIZE = 2
NUM_LABELS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(rank: int, step: int):
    """Rank-dependent data: rank 0 has 2 + 1 instances, rank 1 has 1 + 0 (an image without instances)."""
    g = torch.Generator().manual_seed(100 * rank + step)
    counts = [(2, 1), (1, 0)][rank]
    pixel_values = torch.randn(2, 3, SIZE, SIZE, generator=g)
    masks = [(torch.rand(n, SIZE, SIZE, generator=g) > 0.5).float() for n in counts]
    classes = [torch.randint(0, NUM_LABELS, (n,), generator=g) for n in counts]
    return pixel_values, masks, classes


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        from torch.nn.parallel import DistributedDataParallel

        from timm_backbone import MaskFormerConfig, MaskFormerForInstanceSegmentation, TimmBackboneConfig
        from timm_backbone.models.maskformer.loss import average_num_masks

        torch.manual_seed(rank)  # different initialisations: DDP must broadcast rank 0's
        decoder = dict(d_model=32, decoder_layers=2, num_queries=8, decoder_attention_heads=2, decoder_ffn_dim=64)
        config = MaskFormerConfig(
            backbone_config=TimmBackboneConfig("test_resnet"),
            decoder_config=decoder,
            fpn_feature_size=32,
            mask_feature_size=32,
            num_labels=NUM_LABELS,
            use_auxiliary_loss=True,
        )
        model = DistributedDataParallel(MaskFormerForInstanceSegmentation(config).train())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        losses = []
        for step in range(STEPS):
            pixel_values, masks, classes = _batch(rank, step)
            loss = model(pixel_values, mask_labels=masks, class_labels=classes).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        num_masks = average_num_masks(_batch(rank, 0)[2], torch.device("cpu")).item()
        flat = torch.cat([p.detach().flatten() for p in model.module.parameters()])
        torch.save({"params": flat, "losses": losses, "num_masks": num_masks}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_training_keeps_ranks_in_sync(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD_SIZE)]
    torch.testing.assert_close(results[0]["params"], results[1]["params"], atol=0, rtol=0)
    # the mask count is averaged over the ranks: (2 + 1 + 1 + 0) / 2 on both
    assert results[0]["num_masks"] == results[1]["num_masks"] == 2.0
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in results)
    assert results[0]["losses"] != results[1]["losses"]  # the ranks did see different data
