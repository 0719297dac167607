"""The bundled default models: a tiny LLaVA and a tiny open_clip ψ.

Why: no model hub is reachable where this project is built and tested, and no
package ships CLIP or VLM weights. So the default models are produced here, by
code, with the *same architectures* as the real ones (``LlavaForConditionalGeneration``
with a CLIP vision tower and a Llama text model; an open_clip ViT dual encoder),
so that every code path the tiny models exercise is the path real checkpoints take.

Both are written in the formats their loaders expect:

* the LLaVA directory is a Hugging Face checkpoint (config, tokenizer, chat
  template, processor config, ``model.safetensors``) that vLLM loads as-is. Its
  vision weights use the ``vision_tower.vision_model.*`` layout vLLM 0.32 loads
  (transformers 5 would save ``vision_tower.embeddings.*``);
* the ψ directory is open_clip's own ``local-dir:`` format
  (``open_clip_config.json`` + ``open_clip_model.safetensors``).

The weights built here are random (seeded); trained ones replace them later.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .bundled import (
    DEFAULT_MODEL_DIR,
    DEFAULT_RELEVANCE_DIR,
    DEFAULT_TOWER_DIR,
    LEGACY_RELEVANCE_DIR,
    LEGACY_RELEVANCE_MODEL_NAME,
    LEGACY_TOWER_DIR,
    TOWER_MODEL_NAME,
    register_model_configs,
)

# LLaVA-1.5's conversation format; accepts plain-string and OpenAI-style list content.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}{% endif %}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' or c['type'] == 'image_url' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

COLORS = ("red", "green", "blue", "yellow", "teal", "brown", "gray", "black", "white", "orange", "purple", "pink")
SHAPES = ("circle", "rectangle", "triangle", "square", "star", "cross", "diamond", "ellipse")


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Sizes of the tiny LLaVA's language side; the vision tower is the tiny CLIP's (``vision_model``).

    Every attention head is 32 wide (vLLM's CPU backend needs ≥ 32).
    """

    vision_model: str = TOWER_MODEL_NAME  # open_clip config whose ViT is the tower
    text_hidden_size: int = 160
    text_layers: int = 4
    text_heads: int = 5
    text_intermediate_size: int = 432
    vocab_size: int = 640
    max_position_embeddings: int = 8192
    text_rope_theta: float = 10000.0  # RoPE base (Llama 2's); larger leaves more of a 32-wide head position-free
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.text_hidden_size, self.text_layers, self.text_heads, self.text_intermediate_size) < 1:
            raise ValueError("the language model's sizes must be positive")
        if self.text_rope_theta <= 0:
            raise ValueError("text_rope_theta must be positive")
        if self.text_hidden_size % self.text_heads or self.text_hidden_size // self.text_heads < 32:
            raise ValueError(f"text_hidden_size {self.text_hidden_size} must split into text_heads "
                             f"{self.text_heads} heads at least 32 wide (vLLM's CPU attention backend)")


def _tokenizer_corpus() -> list[str]:
    """Text the tiny BPE is trained on: the questions and answers the models will see."""
    lines = []
    for c in COLORS:
        for s in SHAPES:
            lines += [
                f"a {c} {s}",
                f"The color of the {s} is {c}.",
                f"What is the color of the {s}?",
                f"Is there a {c} {s} in the image?",
            ]
    for a in SHAPES:
        for b in SHAPES:
            lines += [
                f"Is the {a} on the left or right side of the {b}?",
                f"The {a} is on the left side of the {b}.",
                f"The {a} is on the right side of the {b}.",
            ]
    lines += [
        "USER: ASSISTANT: Describe the image. What is in the picture? Yes. No.",
        "What is the person holding? What color is the cup? How many objects are there?",
        "The astronaut is wearing a white suit. A cup of coffee on a plate. A cat. A rocket.",
    ]
    try:  # real questions from the easy-VQA dataset, when installed
        import easy_vqa

        qs, answers, _ = easy_vqa.get_train_questions()
        lines += list(qs[:5000]) + list(answers)
    except ImportError:
        pass
    return lines


def build_tokenizer(vocab_size: int):
    """A byte-level BPE (any text encodes, nothing is <unk>) with LLaVA's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=8192,
    )
    fast.chat_template = LLAVA_CHAT_TEMPLATE
    return fast


def _vllm_weight_layout(state_dict: dict) -> dict:
    """transformers 5 names the tower ``vision_tower.embeddings``; vLLM 0.32 loads ``vision_tower.vision_model``."""
    out = {}
    for name, tensor in state_dict.items():
        if name.startswith("model.vision_tower.") and not name.startswith("model.vision_tower.vision_model."):
            name = "model.vision_tower.vision_model." + name[len("model.vision_tower."):]
        out[name] = tensor.contiguous()
    return out


def _vision_source(spec: TinyLlavaSpec, relevance_dir: Path | str | None):
    """(open_clip model, its config): the trained ψ in ``relevance_dir``, or a seeded random one."""
    import open_clip
    import torch

    register_model_configs()
    if relevance_dir is not None:
        path = Path(relevance_dir).resolve()
        model_cfg = json.loads((path / "open_clip_config.json").read_text())["model_cfg"]
        model = open_clip.create_model(f"local-dir:{path}")
        return model.float().eval(), model_cfg
    torch.manual_seed(spec.seed)
    return open_clip.create_model(spec.vision_model, pretrained=None).eval(), open_clip.get_model_config(spec.vision_model)


def build_tiny_llava(
    out_dir: Path | str = DEFAULT_MODEL_DIR,
    spec: TinyLlavaSpec = TinyLlavaSpec(),
    relevance_dir: Path | str | None = None,
    weights: dict | None = None,
    relevance_model: str | None = None,
) -> Path:
    """Write a tiny LLaVA-1.5-style checkpoint to ``out_dir``.

    The vision tower is the ViT of ψ: converted from the open_clip checkpoint in
    ``relevance_dir`` (LLaVA's recipe: a contrastively trained CLIP tower), or from a
    seeded random ``spec.vision_model`` when none is given. The projector and language
    model are seeded random unless ``weights`` (a LLaVA state dict, e.g. a trained one)
    is given. The config names ψ for SemClip (``semclip_config.relevance_model``):
    ``relevance_model``, or by default the bundled ψ as a path relative to ``out_dir``.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import (
        CLIPImageProcessor,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from vllm_semclip.tiny.convert import clip_vision_config, clip_vision_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size)
    clip, clip_cfg = _vision_source(spec, relevance_dir)
    vision = clip_vision_config(clip, clip_cfg)
    text = LlamaConfig(
        hidden_size=spec.text_hidden_size,
        intermediate_size=spec.text_intermediate_size,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.text_rope_theta,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config).eval()
    tower = model.model.vision_tower
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in tower.state_dict()) else ""
    tower_weights = {k: v for k, v in clip_vision_state_dict(clip, prefix=prefix).items()
                     if not k.startswith(("visual_projection", "text_projection"))}
    tower.load_state_dict(tower_weights, strict=True)
    if weights is not None:
        model.load_state_dict(weights, strict=True)
    model = model.to(torch.bfloat16)
    config.dtype = "bfloat16"
    config.architectures = ["LlavaForConditionalGeneration"]  # stock LLaVA unless --hf-overrides says otherwise
    config.semclip_config = {"relevance_model": relevance_model or os.path.relpath(DEFAULT_RELEVANCE_DIR, out.resolve())}
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    save_file(_vllm_weight_layout(model.state_dict()), str(out / "model.safetensors"), metadata={"format": "pt"})

    size = vision.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        do_convert_rgb=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, as llava-hf's processors declare it
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    build = {"builder": "build_tiny_llava", **asdict(spec),
             "vision_tower_from": Path(relevance_dir).name if relevance_dir is not None else f"random {spec.vision_model}"}
    (out / "semclip_build.json").write_text(json.dumps(build, indent=2))
    return out


def update_llava_tower(llava_dir: Path | str, clip_dir: Path | str) -> list[str]:
    """Make the LLaVA's vision tower the ViT of the CLIP in ``clip_dir``, where the two agree
    on everything the LLaVA reads; return the names of the tensors that changed.

    The LLaVA reads its tower's hidden states at ``vision_feature_layer`` (-2: the output of the
    second-to-last layer), so the last layer and the post-layernorm never reach it. A CLIP
    continued with those alone trainable (``semclip train clip --lock-image
    --lock-image-unlocked-groups 2``) is a better ψ and still the same eyes; this copies its
    unread layers into the LLaVA checkpoint so the tower *is* that CLIP's ViT again (converted,
    in the checkpoint's dtype) while every token the LLaVA sees stays bit for bit. Anything it
    reads that differs is refused, naming the tensors: that would be another LLaVA.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vllm_semclip.tiny.convert import clip_vision_state_dict

    llava = Path(llava_dir)
    config = json.loads((llava / "config.json").read_text())
    layers = int(config["vision_config"]["num_hidden_layers"])
    feature_layer = config.get("vision_feature_layer", -2)
    if not isinstance(feature_layer, int):
        raise ValueError(f"{llava}: vision_feature_layer {feature_layer!r} (several layers) is not supported")
    read = feature_layer if feature_layer >= 0 else layers + 1 + feature_layer  # hidden_states[0] = embeddings
    unread = tuple(f"model.vision_tower.vision_model.encoder.layers.{i}." for i in range(read, layers)) + \
        ("model.vision_tower.vision_model.post_layernorm.",)
    clip, _ = _vision_source(TinyLlavaSpec(), clip_dir)
    new = {f"model.vision_tower.{k}": v for k, v in clip_vision_state_dict(clip, prefix="vision_model.").items()
           if not k.startswith("visual_projection")}
    path = llava / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    tower = {k for k in state if k.startswith("model.vision_tower.")}
    if tower != set(new):
        raise ValueError(f"{clip_dir} does not convert to {llava}'s tower layout "
                         f"(missing {sorted(tower - set(new))[:3]}, extra {sorted(set(new) - tower)[:3]})")
    new = {k: v.to(state[k].dtype) for k, v in new.items()}
    differ = [k for k in sorted(tower) if not torch.equal(state[k], new[k])]
    read_differ = [k for k in differ if not k.startswith(unread)]
    if read_differ:
        raise ValueError(f"{clip_dir} differs from {llava}'s tower in what the LLaVA reads "
                         f"(vision_feature_layer {feature_layer}): {read_differ[:5]}")
    if differ:
        state.update({k: new[k] for k in differ})
        save_file(state, str(path), metadata=metadata)
    return differ


def build_tiny_relevance(out_dir: Path | str = LEGACY_TOWER_DIR, seed: int = 0) -> Path:
    """Write a randomly initialised (seeded) ``SemClip-ViT-T-16`` in open_clip's local-dir format
    (by default the stand-in of the legacy CLIP, never over the trained ψ and tower)."""
    import open_clip
    import torch

    from vllm_semclip.relevance import save_local_dir

    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(TOWER_MODEL_NAME, pretrained=None)
    return save_local_dir(model, open_clip.get_model_config(TOWER_MODEL_NAME), out_dir, half=False)


def ensure_default_models(force: bool = False) -> tuple[Path, Path]:
    """Build random stand-ins for the bundled models that are missing (seconds on a CPU): the
    legacy CLIP, ψ (a copy of it; its ViT is the LLaVA's tower), the LLaVA on that tower and the
    legacy ψ (the legacy CLIP's weights at 336 px)."""
    if force or not (LEGACY_TOWER_DIR / "open_clip_model.safetensors").is_file():
        build_tiny_relevance(LEGACY_TOWER_DIR)
    if force or not (DEFAULT_RELEVANCE_DIR / "open_clip_model.safetensors").is_file():
        shutil.copytree(LEGACY_TOWER_DIR, DEFAULT_RELEVANCE_DIR, dirs_exist_ok=True)
    if force or not (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        build_tiny_llava(DEFAULT_MODEL_DIR, relevance_dir=DEFAULT_TOWER_DIR)
    if force or not (LEGACY_RELEVANCE_DIR / "open_clip_model.safetensors").is_file():
        from vllm_semclip.tiny.train_clip import resize_local_dir

        resize_local_dir(LEGACY_TOWER_DIR, LEGACY_RELEVANCE_MODEL_NAME, LEGACY_RELEVANCE_DIR)
    return DEFAULT_MODEL_DIR, DEFAULT_RELEVANCE_DIR
