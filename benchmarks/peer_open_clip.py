"""open_clip's own trainer (`python -m open_clip_train.main`) on an evaclip model, for bench_peer.py.

The only additions to the stock entry point: our model configs are registered with open_clip (as
`--model evaclip-demo` needs), and the vision tower drops `--token-masking` of the image tokens the way
`evaclip train` does (timm's PatchDropout; open_clip's --force-patch-dropout only reaches its own ViT).

    torchrun --nproc_per_node 2 benchmarks/peer_open_clip.py --token-masking 0.5 [open_clip_train args]

On CPUs one more fix is needed: open_clip_train passes `device_ids=[cpu]` to DistributedDataParallel,
which torch refuses for CPU modules (its multi-process path assumes GPUs); the shim drops them there.

torchrun's own parser would misread some of open_clip's options (`--logs` is an ambiguous prefix of its
`--logs-specs`), so bench_peer.py passes them as a JSON list in EVACLIP_PEER_ARGS instead.
"""

from __future__ import annotations

import json
import os
import sys

import open_clip_train.main as trainer
import torch

from evaclip.model import factory


def main() -> None:
    argv = json.loads(os.environ["EVACLIP_PEER_ARGS"]) if "EVACLIP_PEER_ARGS" in os.environ else sys.argv[1:]
    ratio = 0.0
    if "--token-masking" in argv:
        index = argv.index("--token-masking")
        ratio = float(argv[index + 1])
        del argv[index:index + 2]
    factory._register_configs()
    stock = trainer.create_model_and_transforms

    def with_masking(*args, **kwargs):
        model, *transforms = stock(*args, **kwargs)
        factory.set_token_masking(model, ratio)
        return (model, *transforms)

    trainer.create_model_and_transforms = with_masking
    if not torch.cuda.is_available():
        ddp = torch.nn.parallel.DistributedDataParallel

        def cpu_ddp(module, device_ids=None, **kwargs):
            return ddp(module, **kwargs)

        torch.nn.parallel.DistributedDataParallel = cpu_ddp
    trainer.main(argv)


if __name__ == "__main__":
    main()
