"""The EVA-CLIP model: an open_clip model with a timm EVA-02 tower, token masking, attention backends."""

from __future__ import annotations

import subprocess
import sys

import open_clip
import pytest
import torch

from evaclip.config import ModelConfig
from evaclip.errors import EvaclipError
from evaclip.model import create_model, get_tokenizer, set_attention_backend, set_token_masking
from evaclip.model_configs import model_config


def _tokens_entering_first_block(model, images):
    seen = []
    handle = model.visual.trunk.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        model.encode_image(images)
    finally:
        handle.remove()
    return seen[0]


def test_demo_model_is_an_open_clip_model_with_an_eva02_tower():
    model = create_model(ModelConfig())
    assert isinstance(model, open_clip.CustomTextCLIP)
    trunk = model.visual.trunk
    assert type(trunk).__name__ == "Eva" and trunk.rope is not None  # rotary position embeddings
    assert type(trunk.blocks[0].mlp).__name__ == "SwiGLU"
    images, texts = torch.randn(2, 3, 32, 32), get_tokenizer("evaclip-demo")(["a photo of a shirt", "a boot"])
    image_features, text_features, logit_scale = model(images, texts)
    assert image_features.shape == text_features.shape == (2, 128)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("ratio, kept", [(0.0, 64), (0.5, 32), (0.75, 16)])
def test_token_masking_drops_patches_in_training_and_keeps_cls(ratio, kept):
    torch.manual_seed(0)
    model = create_model(ModelConfig(token_masking=ratio)).train()
    images = torch.randn(3, 3, 32, 32)
    masked = _tokens_entering_first_block(model, images)
    assert masked.shape == (3, 1 + kept, 192)

    full = _tokens_entering_first_block(model.eval(), images)
    assert full.shape == (3, 65, 192)  # evaluation never masks
    assert torch.equal(masked[:, 0], full[:, 0])  # the CLS token is always kept


def test_token_masking_can_change_between_steps():
    model = create_model(ModelConfig(token_masking=0.0)).train()
    images = torch.randn(1, 3, 32, 32)
    set_token_masking(model, 0.5)
    assert _tokens_entering_first_block(model, images).shape[1] == 33
    set_token_masking(model, 0.0)  # e.g. FLIP's final unmasked tuning
    assert _tokens_entering_first_block(model, images).shape[1] == 65


def test_eva02_b16_is_the_published_size_and_masks_half_its_tokens():
    model = create_model(ModelConfig(name="EVA02-B-16", token_masking=0.5)).train()
    n_params = sum(p.numel() for p in model.parameters())
    assert 149e6 < n_params < 150.5e6  # EVA02-CLIP-B/16: 149.7M
    assert _tokens_entering_first_block(model, torch.randn(1, 3, 224, 224)).shape == (1, 99, 768)


def test_sdpa_and_math_attention_agree():
    torch.manual_seed(0)
    model = create_model(ModelConfig(attention="sdpa")).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        fused = model.encode_image(images)
        assert set_attention_backend(model, "math") == 6  # one per block
        reference = model.encode_image(images)
    assert not model.visual.trunk.blocks[0].attn.fused_attn
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


def test_flash_attn_backend_explains_what_it_needs():
    model = create_model(ModelConfig())
    with pytest.raises(EvaclipError, match="flash-attn|CUDA GPU"):
        set_attention_backend(model, "flash_attn")


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(EvaclipError, match="model.name: unknown model 'EVA02-X-99'.*evaclip-demo"):
        create_model(ModelConfig(name="EVA02-X-99"))
    with pytest.raises(EvaclipError, match="model.name: 'ViT-B-32' has no timm vision tower"):
        model_config("ViT-B-32")


def test_the_launcher_reads_model_configs_as_open_clip_does_without_importing_it():
    # `evaclip train` checks the name before it starts the ranks; open_clip (timm, torchvision) costs seconds.
    code = ("import sys; import evaclip.train.launch; from evaclip.model_configs import model_config; "
            "print([model_config(n)['embed_dim'] for n in ('evaclip-demo', 'EVA02-B-16')]); "
            "print(sorted(m for m in ('open_clip', 'timm', 'torchvision', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[128, 512]", "[]"]
    create_model(ModelConfig(name="evaclip-micro"))  # registers ours with open_clip
    for name in ("evaclip-demo", "evaclip-micro", "EVA02-B-16", "EVA02-E-14-plus"):
        assert model_config(name) == open_clip.get_model_config(name)


def test_tokenizer_is_open_clips_bpe_at_the_models_context_length():
    tokenizer = get_tokenizer("evaclip-demo")
    tokens = tokenizer(["a photo of a sneaker"])
    assert tokens.shape == (1, 32)
    sot, eot = 49406, 49407  # CLIP's start/end-of-text tokens: the shipped vocabulary, not a download
    assert tokens[0, 0] == sot and eot in tokens[0].tolist()


@pytest.mark.parametrize("name, params_millions", [("EVA02-L-14", 427.8), ("EVA02-E-14", 4704.6)])
def test_large_published_sizes_build(name, params_millions):
    # On the meta device: shapes without memory (E/14 would need 19 GB in fp32).
    with torch.device("meta"):
        model = create_model(ModelConfig(name=name, token_masking=0.5), device="meta")
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    assert n_params == pytest.approx(params_millions, abs=0.1)  # EVA-CLIP: 428M and 4.7B
    assert model.visual.trunk.patch_embed.patch_size == (14, 14)


def _loss_and_grads(model, images, texts):
    from open_clip.loss import ClipLoss

    torch.manual_seed(1)  # the same token masking in both
    model.zero_grad()
    loss = ClipLoss()(*model(images, texts))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_padding_free_text_and_early_pooling_give_the_same_loss_and_gradients():
    """The exact shortcuts of a training step: the text tower sees a batch cut to its longest caption, and
    each tower's last block computes only the token it pools (the class token, the end-of-text token). Same
    loss, same gradients, less work."""
    import copy

    from evaclip.model import pool_early, trim_text_padding

    torch.manual_seed(0)
    reference = create_model(ModelConfig(token_masking=0.5)).train()
    fast = copy.deepcopy(reference)
    assert pool_early(fast) == ["visual", "text"]
    texts = get_tokenizer("evaclip-demo")(["a photo of a shirt.", "an ankle boot on a plain background.", "a bag"])
    short = trim_text_padding(fast, texts)
    eot = texts.argmax(dim=-1)
    assert short.shape == (3, int(eot.max()) + 1) and short.shape[1] < texts.shape[1]
    assert torch.equal(short, texts[:, : short.shape[1]])

    images = torch.randn(3, 3, 32, 32)
    loss, grads = _loss_and_grads(reference, images, texts)
    fast_loss, fast_grads = _loss_and_grads(fast, images, short)
    torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == fast_grads.keys()
    for name, grad in grads.items():  # equal up to float rounding, relative to each tensor's scale
        scale = grad.abs().max().item()
        assert (fast_grads[name] - grad).abs().max().item() <= 1e-5 * scale + 1e-7, name
    # The shortcut is real: the last block now hands on the class token alone.
    seen = []
    fast.visual.trunk.blocks[-1].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    fast.visual.trunk.blocks[-1].attn.q_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    fast.encode_image(images)
    assert seen == [(3, 1, 192), (3, 1, 192)]  # its queries too: the class token's alone
    seen.clear()
    fast.text.transformer.resblocks[-1].mlp.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    fast.encode_text(short)
    assert seen == [(3, 192)]  # one row per caption, not one per position


def test_text_padding_is_kept_where_cutting_would_change_the_features():
    from evaclip.model import trim_text_padding

    model = create_model(ModelConfig())
    model.text.pool_type = "last"  # pooling the last position: cutting would pool another token
    texts = get_tokenizer("evaclip-demo")(["a shirt"])
    assert trim_text_padding(model, texts) is texts


def test_training_on_a_cpu_in_bf16_uses_the_math_attention_kernel_with_the_same_gradients():
    """SDPA's fused CPU kernel has a slow bf16 backward (measured 2-5x the math kernel's): training forwards
    on a CPU in bf16 take the math kernel; fp32 and inference keep torch's fused choice."""
    import torch.nn.functional as F

    from evaclip.model import sdpa_kernels_for

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 3, 9, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def attend(kernels):
        with kernels:
            out = F.scaled_dot_product_attention(q, k, v)
        out.float().square().sum().backward()
        grads = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        return type(out.grad_fn).__name__, out.detach(), grads

    fused_name, fused_out, fused_grads = attend(sdpa_kernels_for(cpu, torch.float32, training=True))
    math_name, math_out, math_grads = attend(sdpa_kernels_for(cpu, torch.bfloat16, training=True))
    assert "Flash" in fused_name and "Flash" not in math_name, (fused_name, math_name)
    assert "Flash" in attend(sdpa_kernels_for(cpu, torch.bfloat16, training=False))[0]
    torch.testing.assert_close(math_out, fused_out, rtol=0.02, atol=0.02)
    for math_grad, fused_grad in zip(math_grads, fused_grads, strict=True):
        torch.testing.assert_close(math_grad, fused_grad, rtol=0.05, atol=0.05)


def test_early_pooling_gives_the_same_image_features_with_the_math_attention():
    import copy

    from evaclip.model import pool_early, set_attention_backend

    torch.manual_seed(0)
    reference = create_model(ModelConfig()).eval()
    set_attention_backend(reference, "math")
    fast = copy.deepcopy(reference)
    assert "visual" in pool_early(fast)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast.encode_image(images), reference.encode_image(images), rtol=1e-5, atol=1e-5)
