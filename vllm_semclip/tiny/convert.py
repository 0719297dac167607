"""open_clip ViT → Hugging Face ``CLIPVisionModel``: ψ's tower becomes the LLaVA tower.

LLaVA-1.5's eyes are a contrastively trained CLIP vision tower; the tiny LLaVA gets the same
by converting the tiny open_clip model's visual encoder. The mapping is the one between
OpenAI's CLIP and transformers' CLIP (open_clip keeps OpenAI's layout):

    conv1 → embeddings.patch_embedding          class_embedding → embeddings.class_embedding
    positional_embedding → embeddings.position_embedding
    ln_pre → pre_layrnorm                       ln_post → post_layernorm
    resblocks.i.ln_1 / ln_2 → layers.i.layer_norm1 / layer_norm2
    resblocks.i.attn.in_proj (q|k|v stacked) → layers.i.self_attn.{q,k,v}_proj
    resblocks.i.attn.out_proj → layers.i.self_attn.out_proj
    resblocks.i.mlp.c_fc / c_proj → layers.i.mlp.fc1 / fc2
    proj (width × embed) → visual_projection.weight (embed × width)

open_clip's default ViT uses exact GELU, hence ``hidden_act="gelu"`` (OpenAI's own weights
use ``quick_gelu``, which open_clip marks in the model config). Only plain ViTs with a class
token and no layer scale / attentional pooler are supported; anything else is refused.
"""

from __future__ import annotations

from typing import Any

import torch


class UnsupportedVisionTower(ValueError):
    pass


def clip_vision_config(model: Any, model_cfg: dict) -> Any:
    """The ``CLIPVisionConfig`` matching an open_clip model's visual tower."""
    from transformers import CLIPVisionConfig

    visual = model.visual
    width = visual.conv1.out_channels
    layers = len(visual.transformer.resblocks)
    heads = visual.transformer.resblocks[0].attn.num_heads
    mlp = visual.transformer.resblocks[0].mlp.c_fc.out_features
    patch = visual.conv1.kernel_size[0]
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise UnsupportedVisionTower("only class-token ViTs without an attentional pooler convert to CLIPVisionModel")
    block = visual.transformer.resblocks[0]
    if not isinstance(getattr(block, "ls_1", torch.nn.Identity()), torch.nn.Identity):
        raise UnsupportedVisionTower("layer scale has no CLIPVisionModel counterpart")
    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=int(size), patch_size=int(patch), projection_dim=int(model_cfg["embed_dim"]),
        hidden_act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        layer_norm_eps=block.ln_1.eps, num_channels=3,
    )


def clip_vision_state_dict(model: Any, prefix: str = "vision_model.") -> dict[str, torch.Tensor]:
    """open_clip visual weights renamed to ``CLIPVisionModelWithProjection``'s keys."""
    v = model.visual.state_dict()
    out: dict[str, torch.Tensor] = {
        f"{prefix}embeddings.class_embedding": v["class_embedding"],
        f"{prefix}embeddings.patch_embedding.weight": v["conv1.weight"],
        f"{prefix}embeddings.position_embedding.weight": v["positional_embedding"],
        f"{prefix}pre_layrnorm.weight": v["ln_pre.weight"],
        f"{prefix}pre_layrnorm.bias": v["ln_pre.bias"],
        f"{prefix}post_layernorm.weight": v["ln_post.weight"],
        f"{prefix}post_layernorm.bias": v["ln_post.bias"],
    }
    if v.get("proj") is not None:
        out["visual_projection.weight"] = v["proj"].t().contiguous()
    for i in range(len(model.visual.transformer.resblocks)):
        src, dst = f"transformer.resblocks.{i}.", f"{prefix}encoder.layers.{i}."
        qw, kw, vw = v[src + "attn.in_proj_weight"].chunk(3)  # nn.MultiheadAttention stacks q, k, v
        qb, kb, vb = v[src + "attn.in_proj_bias"].chunk(3)
        out.update({
            dst + "self_attn.q_proj.weight": qw, dst + "self_attn.q_proj.bias": qb,
            dst + "self_attn.k_proj.weight": kw, dst + "self_attn.k_proj.bias": kb,
            dst + "self_attn.v_proj.weight": vw, dst + "self_attn.v_proj.bias": vb,
            dst + "self_attn.out_proj.weight": v[src + "attn.out_proj.weight"],
            dst + "self_attn.out_proj.bias": v[src + "attn.out_proj.bias"],
            dst + "layer_norm1.weight": v[src + "ln_1.weight"], dst + "layer_norm1.bias": v[src + "ln_1.bias"],
            dst + "layer_norm2.weight": v[src + "ln_2.weight"], dst + "layer_norm2.bias": v[src + "ln_2.bias"],
            dst + "mlp.fc1.weight": v[src + "mlp.c_fc.weight"], dst + "mlp.fc1.bias": v[src + "mlp.c_fc.bias"],
            dst + "mlp.fc2.weight": v[src + "mlp.c_proj.weight"], dst + "mlp.fc2.bias": v[src + "mlp.c_proj.bias"],
        })
    return {k: t.detach().clone().contiguous() for k, t in out.items()}


def open_clip_to_hf_vision(model: Any, model_cfg: dict):
    """A ``CLIPVisionModelWithProjection`` carrying the open_clip model's visual weights."""
    from transformers import CLIPVisionModelWithProjection

    hf = CLIPVisionModelWithProjection(clip_vision_config(model, model_cfg)).eval()
    missing, unexpected = hf.load_state_dict(clip_vision_state_dict(model), strict=False)
    if missing or unexpected:
        raise UnsupportedVisionTower(f"conversion left missing={missing} unexpected={unexpected}")
    return hf
