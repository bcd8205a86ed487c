"""Worker of tests/test_swin.py's DDP test, kept apart so the spawned processes import only torch and the package."""

import os

import torch

from timm_backbone import SwinBackbone, SwinConfig


def run(rank: int, world: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["SWIN_DDP_PORT"])
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    config = SwinConfig(out_indices=(0, 1), image_size=32, embed_dim=16, depths=[1, 2, 1], num_heads=[1, 2, 4])
    model = SwinBackbone(config)
    ddp = torch.nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False
    for _ in range(2):
        sum(f.mean() for f in ddp(torch.randn(2, 3, 32, 32)).feature_maps).backward()
    if rank == 0:
        torch.save(model.patch_embed.proj.weight.grad, path)
    torch.distributed.destroy_process_group()
