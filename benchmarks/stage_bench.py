"""timm versus native (versus transformers) Swin and ResNet, stage by stage, with the same weights.

Writes stage_bench.json, stage_bench.md and stage_bench.png into --output and prints the markdown table;
progress goes to stderr. The same benchmark runs as ``timm-backbone bench``.

    python benchmarks/stage_bench.py --quick                 # resnet18 + swin_t, batch 1, fp32, eager
    python benchmarks/stage_bench.py --full                  # all six models, batch 1 and 8, fp32 and bf16, compile
    python benchmarks/stage_bench.py --models swin_b --batch 4 --dtype bf16 --threads 2
"""

from __future__ import annotations

import argparse
import sys

from timm_backbone.benchmark import MODELS, add_arguments, run_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="the defaults: resnet18 and swin_t, batch 1, fp32")
    group.add_argument("--full", action="store_true", help="every model, batch 1 and 8, fp32 and bf16, eager+compile")
    args = parser.parse_args(argv)
    if args.full:
        args.models, args.batch, args.dtype, args.compile = list(MODELS), [1, 8], ["fp32", "bf16"], True
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
