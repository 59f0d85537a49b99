"""Run by tests with torchrun (2 CPU processes): N optimizer steps of the micro model under DeepSpeed
with a given ZeRO stage and optimizer, on fixed synthetic batches; rank 0 saves the parameters."""

import sys

import deepspeed
import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss
from timm.optim import Lamb as TimmLamb

from evaclip.config import ModelConfig, TrainConfig
from evaclip.model import create_model
from evaclip.optim import create_optimizer, lr_multiplier, param_groups
from evaclip.train.distributed import init_distributed
from evaclip.train.ds_config import clip_gradients, deepspeed_config

stage, optimizer_name, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
clip = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
steps = int(sys.argv[5]) if len(sys.argv) > 5 else 4
rank, world = init_distributed()  # as training joins: gloo here, with its parameter all-gather
cfg = TrainConfig(steps=steps, batch_size=4, devices=2, warmup_steps=1, zero_stage=stage, lr=2e-2, grad_clip=clip or None, optimizer="adamw" if optimizer_name == "adamw" else "lamb")
torch.manual_seed(0)
model = create_model(ModelConfig(name="evaclip-micro"))
# The key part of nn.MultiheadAttention's in_proj_bias has a mathematically zero gradient (softmax is
# shift invariant); its float rounding noise, normalized by Adam/LAMB, would turn 1e-8 differences into
# lr-sized ones. Make it exactly zero, so the comparison measures the optimizer, not that noise.
for name, param in model.named_parameters():
    if name.endswith("attn.in_proj_bias"):
        width = param.shape[0] // 3
        param.register_hook(lambda g, w=width: torch.cat([g[:w], torch.zeros_like(g[w:2 * w]), g[2 * w:]]))
if optimizer_name == "timm_lamb":  # the stock LAMB, as the EVA-CLIP reference code uses it
    optimizer = TimmLamb(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, max_grad_norm=None)
else:
    optimizer = create_optimizer(model, cfg)
engine, _, _, _ = deepspeed.initialize(
    model=model, optimizer=optimizer, config=deepspeed_config(cfg),
    lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg)),
)
if optimizer_name == "lamb" and stage > 0:
    optimizer.attach_zero_partitions(engine.optimizer)
loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
generator = torch.Generator().manual_seed(100 + rank)
for _ in range(cfg.steps):
    images = torch.randn(4, 3, 32, 32, generator=generator)
    texts = torch.randint(1, 64, (4, 16), generator=generator)  # a small vocabulary: every row used often
    loss = loss_fn(*engine(images, texts))
    engine.backward(loss)
    clip_gradients(engine, cfg)
    engine.step()
if rank == 0:
    torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()}, out)
dist.barrier()
