"""Training code paths (fast): batch building, curriculum, token layout, a few real steps."""

import random

import pytest
import torch

from vllm_semclip.tiny.cards import CAPTIONS, CROP_SIDE_RANGE
from vllm_semclip.tiny.train_clip import (
    ClipLossWithNegatives,
    ClipTrainConfig,
    PatchLabelLoss,
    PatchPositionLoss,
    ShapeQueryLoss,
    card_patch_labels,
    card_patch_mask,
    empty_photo_tiles,
    label_only_tiles,
    sample_blocks,
    side_range_at,
    train_clip,
    zero_shot_accuracy,
    zero_shot_scores,
)
from vllm_semclip.tiny.train_vlm import (
    LlavaTrainer,
    Sample,
    VlmTrainConfig,
    _batch,
    add_turns,
    ground_spatial_share,
    grounding_sample,
    scene_sample,
    side_sample,
    text_sample,
    tile_sample,
)


def test_clip_blocks_hold_every_caption_once():
    blocks = sample_blocks(random.Random(0), 224, 2, CROP_SIDE_RANGE)
    assert len(blocks) == 4  # 2 caption blocks + shape questions + pair questions
    for texts, tiles in blocks[:2]:
        assert sorted(texts) == sorted(CAPTIONS) and len(tiles) == 24
        assert all(f"a {t.cards[0].color} {t.cards[0].shape}" == text for text, t in zip(texts, tiles))
    for texts, tiles in blocks[2:]:
        assert len(texts) == len(set(texts)) == len(tiles) == 3
    assert all("left or right" in t for t in blocks[3][0])
    assert all(len(t.cards) == 2 for t in blocks[3][1])


def test_card_patch_mask_covers_the_patches_under_each_card():
    from vllm_semclip.tiny.scenes import Placed

    cards = [[Placed("circle", "red", (20, 40, 20, 10))], [], [Placed("square", "blue", (0, 0, 16, 16)),
                                                              Placed("triangle", "red", (200, 208, 24, 16))]]
    mask = card_patch_mask(cards, 224, 16).view(3, 14, 14)
    # x 20-40 → columns 1, 2; y 40-50 → rows 2, 3
    assert mask[0].nonzero().tolist() == [[2, 1], [2, 2], [3, 1], [3, 2]]
    assert not mask[1].any()
    assert mask[2].nonzero().tolist() == [[0, 0], [13, 12], [13, 13]]


def test_card_patch_labels_name_the_card_under_each_patch():
    from vllm_semclip.tiny.scenes import COLORS, SHAPES, Placed

    cards = [[Placed("circle", "red", (20, 40, 20, 10))], [],
             [Placed("rectangle", "blue", (0, 0, 16, 16)), Placed("triangle", "green", (200, 208, 24, 16))]]
    shapes, colors = card_patch_labels(cards, 224, 16)
    mask = card_patch_mask(cards, 224, 16)
    assert ((shapes >= 0) == mask).all() and ((colors >= 0) == mask).all()  # the same patches, labelled
    shapes, colors = shapes.view(3, 14, 14), colors.view(3, 14, 14)
    assert shapes[0, 2, 1] == SHAPES.index("circle") and colors[0, 3, 2] == list(COLORS).index("red")
    assert shapes[2, 0, 0] == SHAPES.index("rectangle") and shapes[2, 13, 13] == SHAPES.index("triangle")
    assert colors[2, 13, 12] == list(COLORS).index("green") and (shapes[1] == -1).all()


def test_patch_label_head_reads_the_card_under_a_token_and_ignores_the_rest():
    """Tokens under a card carry its shape and colour (plus noise): the head learns to read
    both; background tokens (label -1) add nothing to the loss, and a batch without a card
    gives 0, not NaN."""
    from vllm_semclip.tiny.scenes import COLORS, SHAPES

    torch.manual_seed(0)
    width, tokens = 64, 20
    shape_code, color_code = torch.randn(len(SHAPES), width), torch.randn(len(COLORS), width)

    def batch():
        shapes = torch.randint(0, len(SHAPES), (8, tokens))
        colors = torch.randint(0, len(COLORS), (8, tokens))
        x = shape_code[shapes] + color_code[colors] + 0.3 * torch.randn(8, tokens, width)
        shapes[:, 10:], colors[:, 10:] = -1, -1  # background: its content is noise the head never fits
        x[:, 10:] = 5 * torch.randn(8, tokens - 10, width)
        return x, (shapes, colors)

    head = PatchLabelLoss(width)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    x, labels = batch()
    start = head(x, labels).item()
    for _ in range(150):
        x, labels = batch()
        loss = head(x, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, labels = batch()
    shape_right, color_right = head.accuracy(x, labels)
    assert shape_right > 0.9 and color_right > 0.9 and head(x, labels).item() < start / 4
    background = x.clone()
    background[:, 10:] = 1e3 * torch.randn(8, tokens - 10, width)  # what is not under a card does not count
    assert head(background, labels).item() == pytest.approx(head(x, labels).item(), rel=1e-5)
    none = (torch.full_like(labels[0], -1), torch.full_like(labels[1], -1))
    assert head(x, none).item() == 0.0


def test_label_only_tiles_hold_one_to_three_cards_at_the_given_size():
    """The patch-label loss's extra tiles look like the LLaVA's training tiles: 1–3 distinct
    shapes, cards within the side range, each card's patches labelled with its own shape."""
    size, patch, side_range = 224, 16, CROP_SIDE_RANGE
    tiles = label_only_tiles(random.Random(3), size, 60, side_range)
    counts = [len(t.cards) for t in tiles]
    assert len(tiles) == 60 and set(counts) == {1, 2, 3}
    for tile in tiles:
        assert tile.image.size == (size, size)
        assert len({c.shape for c in tile.cards}) == len(tile.cards)
        # a rectangle's long side may pass the card side; its short side may not, nor a long side fall short
        assert all(min(c.bbox[2:]) <= side_range[1] * size + 1 and max(c.bbox[2:]) >= side_range[0] * size - 1
                   for c in tile.cards)
    shapes, _ = card_patch_labels([t.cards for t in tiles], size, patch)
    three = counts.index(3)
    assert len(set(shapes[three][shapes[three] >= 0].tolist())) == 3  # three cards, three labels


def test_curriculum_shrinks_cards_to_crop_size():
    first, later = side_range_at(0.0, 0.3), side_range_at(0.5, 0.3)
    assert first[0] > later[0] and first[1] > later[1]
    assert later == pytest.approx(CROP_SIDE_RANGE)


@pytest.mark.parametrize("bad", [{"steps": 0}, {"steps": -1}, {"lr": 2.0}, {"curriculum": 1.5}, {"position_weight": -1.0},
                                 {"position_layer": 0}, {"position_card_weight": -0.5},
                                 {"label_weight": -1.0}, {"label_tiles": -1, "label_weight": 1.0},
                                 {"label_tiles": 8}, {"empty_tiles": -1}, {"lock_image_unlocked_groups": 2},
                                 {"lock_image": True, "lock_image_unlocked_groups": -1},
                                 {"question_weight": -1.0}, {"render": "shifted"}, {"checkpoint_every": -1}])
def test_clip_config_is_validated(bad):
    with pytest.raises(ValueError):
        ClipTrainConfig(**bad)


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"scene_fraction": -0.1}, {"scene_scale": 2.0},
                                 {"side_fraction": 1.5}, {"binding_weight": -0.1}, {"binding_layer": -1},
                                 {"tower_lr": -1e-4}, {"turns": 0}, {"text_steps": -1},
                                 {"position_binding_weight": -0.5}, {"side_steps": -1},
                                 {"ground_spatial_fraction": 1.5}, {"align_ground_fraction": -0.1},
                                 {"word_binding_weight": -0.5}, {"word_binding_layer": -1},
                                 {"attribute_word_binding_weight": -0.5}, {"render": "shifted"},
                                 {"render": "val"}, {"checkpoint_every": -1}])
def test_vlm_config_is_validated(bad):
    with pytest.raises(ValueError):
        VlmTrainConfig(**bad)


@pytest.mark.engine
@pytest.mark.parametrize("position_weight,position_card_weight,label_weight,label_tiles",
                         [(0.0, 0.0, 0.0, 0), (0.5, 0.0, 0.0, 0), (0.0, 1.0, 0.0, 0), (0.0, 0.0, 1.0, 0),
                          (0.0, 0.0, 1.0, 4)])
def test_clip_training_writes_a_checkpoint_open_clip_loads(tmp_path, position_weight, position_card_weight,
                                                           label_weight, label_tiles):
    from vllm_semclip.relevance import RelevanceModel

    config = ClipTrainConfig(steps=2, caption_blocks=1, eval_cards=24, eval_mosaics=3, position_weight=position_weight,
                             position_card_weight=position_card_weight, label_weight=label_weight,
                             label_tiles=label_tiles)
    report = train_clip(config, tmp_path / "psi", progress=False)
    assert 0.0 <= report["zero_shot_accuracy"] <= 1.0 and report["eval_mosaics"] == 3
    assert report["config"]["position_weight"] == position_weight
    assert report["config"]["position_card_weight"] == position_card_weight
    assert report["config"]["label_weight"] == label_weight
    assert report["config"]["label_tiles"] == label_tiles
    psi = RelevanceModel.from_pretrained(str(tmp_path / "psi"))
    assert psi.image_size == 224 and (tmp_path / "psi" / "train_report.json").is_file()
    assert psi.reference.texts == CAPTIONS  # ψ's query is scored less the mean of what it was trained on


def test_clip_loss_with_negatives_is_clip_loss_without_them_and_a_matching_negative_costs():
    """No negatives: open_clip's ``ClipLoss`` to the bit. With them: a negative close to a
    caption raises the loss (text→image only) and gets a gradient; one far from all does little."""
    import open_clip

    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(images + 0.3 * torch.randn(6, 16, generator=g), dim=-1)
    scale = torch.tensor(20.0)
    loss = ClipLossWithNegatives()
    assert torch.equal(loss(images, texts, scale), open_clip.ClipLoss()(images, texts, scale))
    assert torch.equal(loss(images, texts, scale, images[:0]), open_clip.ClipLoss()(images, texts, scale))
    close = texts[2:3].clone().requires_grad_(True)  # a photo that looks exactly like caption 2
    far = -texts.mean(0, keepdim=True)
    far = torch.nn.functional.normalize(far, dim=-1)
    base = loss(images, texts, scale)
    with_close = loss(images, texts, scale, close)
    assert with_close > base + 0.1
    with_close.backward()
    assert close.grad is not None and close.grad.abs().sum() > 0
    assert loss(images, texts, scale, far) < base + 0.01
    # by hand: the text→image half over the block's images and the negative, the image→text half over texts
    ce = torch.nn.functional.cross_entropy
    labels = torch.arange(6)
    by_hand = 0.5 * (ce(scale * images @ texts.T, labels)
                     + ce(scale * texts @ torch.cat([images, close.detach()]).T, labels))
    assert torch.allclose(loss(images, texts, scale, close.detach()), by_hand)


def test_shape_query_loss_is_cross_entropy_with_one_positive_and_makes_every_positive_count():
    """One positive per query: plain text→image cross-entropy. Several: each positive against the
    negatives alone, averaged — low only when *every* tile of the asked shape outranks the other
    shapes' tiles; one circle that looks unlike the query costs even if the others are first."""
    g = torch.Generator().manual_seed(1)
    queries = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=-1)
    images = torch.nn.functional.normalize(torch.randn(9, 16, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    loss = ShapeQueryLoss()
    one = torch.zeros(3, 9, dtype=torch.bool)
    one[0, 4] = one[1, 0] = one[2, 8] = True
    expected = torch.nn.functional.cross_entropy(scale * queries @ images.T, torch.tensor([4, 0, 8]))
    assert torch.allclose(loss(queries, images, one, scale), expected)
    # images that are the queries themselves, three per query: every positive above every negative → near 0
    stacked = queries.repeat_interleave(3, dim=0)
    shown = torch.arange(3)[:, None] == torch.arange(9)[None] // 3
    good = loss(queries, stacked, shown, torch.tensor(50.0))
    assert good < 1e-3
    unlike = stacked.clone()
    unlike[0] = -queries[0]  # a tile of shape 0 that looks nothing like query 0 (its other two are perfect)
    assert loss(queries, unlike, shown, torch.tensor(50.0)) > good + 1.0
    # by hand, for that case: positive 0 of query 0 against query 0's six negatives
    logits = 50.0 * queries @ unlike.T
    by_hand = -torch.log_softmax(torch.cat([logits[0, :1], logits[0, 3:]]), dim=0)[0]
    assert by_hand / 9 <= loss(queries, unlike, shown, torch.tensor(50.0)) <= by_hand / 9 + 1e-3


def test_empty_photo_tiles_hold_no_card():
    tiles = empty_photo_tiles(random.Random(5), 224, 8)
    assert len(tiles) == 8 and all(t.cards == [] and t.image.size == (224, 224) for t in tiles)
    assert len({t.image.tobytes() for t in tiles}) == 8  # different photos / regions


def test_a_locked_image_tower_keeps_everything_below_its_unlocked_groups(tmp_path):
    """``lock_image`` with 2 unlocked groups (open_clip's LiT lock) trains the last block, ln_post
    and the projection with the empty-tile negatives; the embeddings and the blocks below — all
    the LLaVA's feature layer (block -2) reads — stay bit for bit, so the LLaVA's features do."""
    from vllm_semclip.relevance import RelevanceModel
    from vllm_semclip.tiny.bundled import DEFAULT_TOWER_DIR

    config = ClipTrainConfig(steps=2, caption_blocks=1, eval_cards=24, eval_mosaics=3, init=str(DEFAULT_TOWER_DIR),
                             lr=1e-3, warmup=0, lock_image=True, lock_image_unlocked_groups=2, empty_tiles=4,
                             question_weight=1.0)
    report = train_clip(config, tmp_path / "psi", progress=False)
    assert report["config"]["empty_tiles"] == 4 and report["config"]["lock_image_unlocked_groups"] == 2
    assert report["config"]["question_weight"] == 1.0
    before = RelevanceModel.from_pretrained(str(DEFAULT_TOWER_DIR)).model.state_dict()
    after = RelevanceModel.from_pretrained(str(tmp_path / "psi")).model.state_dict()
    last = len({k.split(".")[3] for k in before if k.startswith("visual.transformer.resblocks.")}) - 1
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trainable = {k for k in before if k.startswith((f"visual.transformer.resblocks.{last}.", "visual.ln_post.",
                                                      "visual.proj"))}
    assert changed & trainable  # the head of the tower moved
    assert not {k for k in changed if k.startswith("visual.")} - trainable  # nothing below it did
    assert any(not k.startswith("visual.") for k in changed)  # the text tower trains as before


@pytest.mark.engine
def test_a_224_px_psi_goes_to_336_px_with_its_position_grid_resized(tmp_path):
    """``--model SemClip-ViT-T-16-336 --init <224-px ψ> --steps 0``: the same weights, the position
    grid resized by open_clip's factory (``resize_pos_embed``), evaluated at 336 px."""
    import open_clip
    from open_clip.model import resize_pos_embed

    from vllm_semclip.relevance import RelevanceModel

    small = dict(caption_blocks=1, eval_cards=24, eval_mosaics=3)
    train_clip(ClipTrainConfig(steps=1, **small), tmp_path / "psi224", progress=False)
    report = train_clip(ClipTrainConfig(model="SemClip-ViT-T-16-336", init=str(tmp_path / "psi224"), steps=0, **small),
                        tmp_path / "psi336", progress=False)
    assert report["model"] == "SemClip-ViT-T-16-336" and 0.0 <= report["zero_shot_accuracy"] <= 1.0
    a = RelevanceModel.from_pretrained(str(tmp_path / "psi224")).model.float().state_dict()
    b_model = RelevanceModel.from_pretrained(str(tmp_path / "psi336")).model.float()
    assert b_model.visual.image_size == (336, 336)
    b = b_model.state_dict()
    assert b["visual.positional_embedding"].shape == (1 + 21 * 21, 128)
    expected = {"visual.positional_embedding": a["visual.positional_embedding"].clone()}
    resize_pos_embed(expected, b_model)
    assert torch.allclose(b["visual.positional_embedding"], expected["visual.positional_embedding"].half().float())
    assert torch.equal(b["visual.positional_embedding"][0], a["visual.positional_embedding"][0])  # class token's
    for key in a:  # every other weight is carried over unchanged
        if key != "visual.positional_embedding":
            assert torch.equal(a[key], b[key]), key
    assert open_clip.get_model_config("SemClip-ViT-T-16-336")["vision_cfg"]["image_size"] == 336
    assert RelevanceModel.from_pretrained(str(tmp_path / "psi336")).reference.texts == CAPTIONS
    with pytest.raises(FileNotFoundError, match="local-dir"):
        train_clip(ClipTrainConfig(model="SemClip-ViT-T-16-336", init=str(tmp_path), steps=0, **small),
                   tmp_path / "none", progress=False)


def test_patch_position_head_reads_raster_position():
    """Fitted on tokens that carry a ViT's position embedding, the head names each patch's
    column and row; with the patches shuffled, the same labels cannot be learned."""
    import torch

    torch.manual_seed(0)
    grid, width = 14, 128
    position = torch.randn(grid * grid, width)  # patches in raster order

    def fit(shuffle: bool) -> float:
        head = PatchPositionLoss(width, grid)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(150):
            order = torch.randperm(grid * grid) if shuffle else torch.arange(grid * grid)
            loss = head(position[order][None] + 0.3 * torch.randn(4, grid * grid, width))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return head.accuracy(position[None] + 0.3 * torch.randn(4, grid * grid, width))

    assert fit(shuffle=False) > 0.9
    assert fit(shuffle=True) < 0.3



def test_patch_position_loss_and_accuracy_restrict_to_a_mask():
    """What the card-patch term measures: tokens whose content overwrote their position (here:
    pure noise under a "card") read badly even when the head reads the rest, and the masked
    loss is the mean over exactly those tokens."""
    import torch

    torch.manual_seed(0)
    grid, width = 14, 128
    position = torch.randn(grid * grid, width)
    mask = torch.zeros(4, grid * grid, dtype=torch.bool)
    mask[:, 30:40] = True

    def tokens():
        x = position[None] + 0.3 * torch.randn(4, grid * grid, width)
        return torch.where(mask[..., None], torch.randn(4, grid * grid, width), x)

    head = PatchPositionLoss(width, grid)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(150):
        loss = head(tokens())
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = tokens()
    assert head.accuracy(x) > 0.85 and head.accuracy(x, mask) < 0.3
    assert head(x, mask).item() == pytest.approx(head.token_loss(x)[mask].mean().item())
    assert head(x, mask).item() > 2 * head(x).item()
    assert head(x, torch.zeros_like(mask)).item() == 0.0  # no card in the batch: no term, not NaN

@pytest.mark.engine
def test_zero_shot_breakdown_is_consistent_on_the_bundled_psi():
    """The caption is right only when shape and colour both are, so it bounds them from both
    sides; and the breakdown's caption figure is ``zero_shot_accuracy`` on the same cards."""
    from vllm_semclip.relevance import RelevanceModel
    from vllm_semclip.tiny.bundled import DEFAULT_RELEVANCE_DIR

    psi = RelevanceModel.from_pretrained(str(DEFAULT_RELEVANCE_DIR))
    tokenizer = psi.tokenizer
    scores = zero_shot_scores(psi.model, tokenizer, random.Random(5), 72, psi.image_size)
    assert set(scores) == {"caption", "shape", "color"}
    assert scores["shape"] + scores["color"] - 1 <= scores["caption"] <= min(scores["shape"], scores["color"])
    assert scores["caption"] > 3 / len(CAPTIONS)  # a trained ψ, far above chance (1/24)
    assert zero_shot_accuracy(psi.model, tokenizer, random.Random(5), 72, psi.image_size) == scores["caption"]


def test_samples_carry_the_right_answer_first():
    rng = random.Random(1)
    for _ in range(20):
        s = tile_sample(rng, n_cards=2, spatial=True)
        assert len(s.options) == 2 and s.category == "relative_position"
        a, b = s.cards  # the question asks about a relative to b
        assert s.question == f"Is the {a.shape} on the left or right side of the {b.shape}?"
        side = "left" if a.center[0] < b.center[0] else "right"
        assert s.options[0] == f"The {a.shape} is on the {side} side of the {b.shape}."
        s = tile_sample(rng, n_cards=3, spatial=False)
        assert len(s.options) == 4 and len(set(s.options)) == 4 and s.category == "direct_attributes"
        s = side_sample(rng, n_cards=rng.randint(1, 3))
        card = next(c for c in s.cards if f"the {c.shape} on" in s.question)
        side = "left" if card.center[0] < s.tiles[0].width / 2 else "right"
        assert s.options[0].endswith(f"the {side} side of the image.") and s.category == "relative_position"
        assert abs(card.center[0] / s.tiles[0].width - 0.5) >= 0.1  # never ambiguous
    scene = scene_sample(rng, 0, spatial=False, scale=0.3, crops=2, pad_fill=(122, 116, 104), tile_size=224)
    assert len(scene.tiles) == 3 and all(t.size[0] == t.size[1] for t in scene.tiles)


def _kind(sample) -> str:
    if sample.category == "direct_attributes":
        return "colour"
    return "side" if sample.question.endswith(" of the image?") else "two-card"


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_grounding_samples_ask_the_side_of_the_image_or_the_two_card_question_in_the_given_share(fraction):
    rng = random.Random(3)
    samples = [grounding_sample(rng, fraction, 224) for _ in range(60)]
    kinds = [_kind(s) for s in samples]
    assert set(kinds) <= {"side", "two-card"}
    share = kinds.count("two-card") / len(kinds)
    assert share == fraction if fraction in (0.0, 1.0) else 0.3 < share < 0.7
    assert all(len(s.cards) >= 2 for s, k in zip(samples, kinds) if k == "two-card")


def test_the_two_card_question_joins_the_grounding_stage_in_its_second_half():
    config = VlmTrainConfig(side_steps=10, ground_spatial_fraction=0.4)
    assert [ground_spatial_share(config, step) for step in range(10)] == [0.0] * 5 + [0.4] * 5
    assert {ground_spatial_share(VlmTrainConfig(side_steps=10), step) for step in range(10)} == {0.0}


@pytest.mark.parametrize("align_ground_fraction", [0.0, 0.5, 1.0])
def test_alignment_batches_mix_in_grounding_samples_only_when_asked(trainer, align_ground_fraction):
    """Alignment is one-card colour questions; ``align_ground_fraction`` of them become grounding
    samples (side of the image, or two-card at ``ground_spatial_fraction``); after alignment, no
    change."""
    config = VlmTrainConfig(batch_size=40, align_ground_fraction=align_ground_fraction, ground_spatial_fraction=0.5)
    rng = random.Random(4)
    aligning = _batch(rng, config, 0, trainer, [0])
    kinds = [_kind(s) for s in aligning]
    grounded = 1 - kinds.count("colour") / len(kinds)
    assert all(len(s.cards) == 1 for s, k in zip(aligning, kinds) if k == "colour")
    if align_ground_fraction in (0.0, 1.0):
        assert grounded == align_ground_fraction
    else:
        assert 0.25 < grounded < 0.75 and {"side", "two-card"} <= set(kinds)
    config = VlmTrainConfig(batch_size=40, align_ground_fraction=align_ground_fraction, scene_fraction=0.0)
    later = _batch(random.Random(4), config, config.align_steps, trainer, [0])
    assert not any(_kind(s) == "side" for s in later)  # side_fraction 0: the instruction mix is unchanged


def test_later_turns_ask_about_the_other_cards_with_their_right_answers():
    rng = random.Random(3)
    for _ in range(30):
        first = tile_sample(rng, n_cards=3, spatial=rng.random() < 0.5)
        sample = add_turns(rng, first, 6)
        questions = [sample.question] + [q for q, _ in sample.turns]
        assert len(set(questions)) == len(questions) and 3 <= len(questions) <= 6
        assert sample.question == first.question and sample.options == first.options
        by_shape = {c.shape: c for c in sample.cards}
        for question, answer in sample.turns:
            words = question.rstrip("?").split()
            if question.startswith("What is the color"):
                card = by_shape[words[-1]]
                assert answer == f"The color of the {card.shape} is {card.color}."
            else:
                a, b = by_shape[words[2]], by_shape[words[-1]]
                assert abs(a.center[0] - b.center[0]) >= a.bbox[2]  # never ambiguous
                side = "left" if a.center[0] < b.center[0] else "right"
                assert answer == f"The {a.shape} is on the {side} side of the {b.shape}."
    one_card = tile_sample(rng, n_cards=1, spatial=False)
    assert add_turns(rng, one_card, 6).turns == []  # nothing else to ask
    two = tile_sample(rng, n_cards=3, spatial=False)
    assert add_turns(rng, two, 1) is two and len(add_turns(rng, two, 2).turns) == 1


def test_text_samples_write_each_card_as_colour_and_shape_among_filler_words():
    from vllm_semclip.tiny.scenes import COLORS, SHAPES
    from vllm_semclip.tiny.train_vlm import FILLER_WORDS

    rng = random.Random(3)
    for n_cards in (1, 2, 3, 3, 2):
        sample = text_sample(rng, n_cards=n_cards, span=40)
        words = sample.text.split()
        assert len(words) == 40 + 2 * n_cards and sample.tiles == []
        cards = [(words[i - 1], w) for i, w in enumerate(words) if w in SHAPES]
        assert len(cards) == n_cards and len({s for _, s in cards}) == n_cards
        assert all(c in COLORS for c, _ in cards)
        assert [w for w in words if w not in SHAPES and w not in COLORS] == \
            [w for w in words if w in FILLER_WORDS] and len([w for w in words if w in FILLER_WORDS]) == 40
        colour = dict((s, c) for c, s in cards)[sample.question.split()[-1].rstrip("?")]
        assert sample.options[0].endswith(f" {colour}.") and len(set(sample.options)) == 4


@pytest.fixture(scope="module")
def trainer(model_dir):
    return LlavaTrainer.from_pretrained(model_dir)


def test_token_layout_matches_what_vllm_serves(trainer, tokens_per_tile):
    sample = Sample([None, None], "What is the color of the circle?", ["The color of the circle is red."],
                    "direct_attributes")
    ids, start = trainer.encode(sample, sample.options[0])
    assert ids.count(trainer.image_token_id) == 2 * tokens_per_tile
    answer = trainer.tokenizer.decode(ids[start:])
    assert answer.strip() == "The color of the circle is red." + trainer.tokenizer.eos_token
    prompt = trainer.tokenizer.decode([t for t in ids[:start] if t != trainer.image_token_id])
    assert prompt.startswith("<s>USER:") and prompt.rstrip().endswith("ASSISTANT:")


def test_a_conversation_is_the_first_question_then_later_turns_with_every_answer_trained(trainer):
    rng = random.Random(5)
    sample = add_turns(rng, tile_sample(rng, n_cards=3, spatial=False), 3)
    ids, spans = trainer.encode_conversation(sample)
    first, start = trainer.encode(sample, sample.options[0])
    assert ids[:len(first)] == first and spans[0] == (start, len(first))  # the first turn is the served prompt
    answers = [sample.options[0]] + [a for _, a in sample.turns]
    assert [trainer.tokenizer.decode(ids[a:b]).strip() for a, b in spans] == \
        [a + trainer.tokenizer.eos_token for a in answers]
    between = trainer.tokenizer.decode(ids[spans[0][1]:spans[1][0]])
    assert between == f"USER: {sample.turns[0][0]} ASSISTANT:"
    # the loss covers every answer: a conversation's loss differs from its first turn's alone
    torch.manual_seed(0)
    alone = trainer.loss([Sample(sample.tiles, sample.question, sample.options, sample.category, sample.cards)],
                         random.Random(0))
    whole = trainer.loss([sample], random.Random(0))
    assert torch.isfinite(whole) and float(whole.detach()) != pytest.approx(float(alone.detach()), abs=1e-4)


def test_a_text_sample_puts_its_words_where_the_image_tokens_go(trainer):
    sample = text_sample(random.Random(8), n_cards=2, span=20)
    ids, start = trainer.encode(sample, sample.options[0])
    assert trainer.image_token_id not in ids
    prompt = trainer.tokenizer.decode(ids[:start])
    assert prompt.startswith("<s>USER:") and f"{sample.text}\n{sample.question}" in prompt
    image = Sample([None], sample.question, sample.options, sample.category)
    assert prompt.split(sample.text)[1] in trainer.tokenizer.decode(trainer.encode(image, None)[0])
    scores = trainer.option_scores([sample, tile_sample(random.Random(8), n_cards=1, spatial=False)])
    assert len(scores) == 2 and all(len(s) == 4 for s in scores)  # text and image samples batch together


def test_likelihood_scores_match_a_plain_forward(trainer):
    """The batched option scorer equals scoring each option alone with the model's own forward."""
    import torch

    sample = tile_sample(random.Random(4), n_cards=2, spatial=False)
    batched = trainer.option_scores([sample])[0]
    pixel_values = trainer.pixel_values([sample])
    for opt, score in zip(sample.options, batched):
        ids, start = trainer.encode(sample, opt, eos=False)
        with torch.inference_mode():
            logits = trainer.model(input_ids=torch.tensor([ids]), pixel_values=pixel_values).logits[0]
        logprobs = torch.log_softmax(logits.float(), -1)
        alone = sum(float(logprobs[i - 1, ids[i]]) for i in range(start, len(ids)))
        assert score == pytest.approx(alone, abs=1e-3)


def test_attention_weights_are_the_forward_the_scores_come_from(trainer):
    """``LlavaTrainer.attentions`` (the binding diagnostic's input): one causal, row-stochastic
    map per layer and head; asking for it leaves the model's attention kernel as it was."""
    import torch

    sample = tile_sample(random.Random(6), n_cards=3, spatial=False)
    ids, _ = trainer.encode(sample, sample.options[0], eos=False)
    before = trainer.model.model.language_model.config._attn_implementation
    with torch.no_grad():
        maps = trainer.attentions([ids], trainer.tile_features(trainer.pixel_values([sample])))
    config = trainer.model.config.text_config
    assert len(maps) == config.num_hidden_layers
    for a in maps:
        assert a.shape == (1, config.num_attention_heads, len(ids), len(ids))
        assert torch.allclose(a.sum(-1), torch.ones(()), atol=1e-4)
        assert float(a[0].triu(1).abs().max()) == 0.0  # nothing attends to a later token
    assert trainer.model.model.language_model.config._attn_implementation == before


def test_train_vlm_refuses_a_binding_layer_the_model_does_not_have(tmp_path):
    from vllm_semclip.tiny.build import TinyLlavaSpec
    from vllm_semclip.tiny.train_vlm import train_vlm

    with pytest.raises(ValueError, match="binding_layer 4"):
        train_vlm(VlmTrainConfig(binding_weight=0.1, binding_layer=4), out_dir=tmp_path / "x", spec=TinyLlavaSpec())
    assert not (tmp_path / "x").exists()  # refused before anything was built


def test_train_vlm_refuses_a_word_binding_layer_the_model_does_not_have(tmp_path):
    from vllm_semclip.tiny.build import TinyLlavaSpec
    from vllm_semclip.tiny.train_vlm import train_vlm

    for weight in ("word_binding_weight", "attribute_word_binding_weight"):
        with pytest.raises(ValueError, match="word_binding_layer 7"):
            train_vlm(VlmTrainConfig(**{weight: 0.5}, word_binding_layer=7), out_dir=tmp_path / "x",
                      spec=TinyLlavaSpec())
    assert not (tmp_path / "x").exists()


def test_continue_from_loads_projector_and_language_model_and_keeps_the_tower(tmp_path, model_dir):
    from transformers import LlavaForConditionalGeneration

    from vllm_semclip.tiny.build import TinyLlavaSpec, build_tiny_llava
    from vllm_semclip.tiny.train_vlm import continue_from

    build_tiny_llava(tmp_path / "fresh", TinyLlavaSpec(seed=3))  # random projector + LM, random tower
    fresh = LlavaForConditionalGeneration.from_pretrained(tmp_path / "fresh", dtype=torch.float32)
    saved = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    tower_before = {k: v.clone() for k, v in fresh.state_dict().items() if "vision_tower" in k}
    continue_from(fresh, model_dir)
    after = fresh.state_dict()
    lm = [k for k in after if "vision_tower" not in k]
    assert any("multi_modal_projector" in k for k in lm) and any("lm_head" in k for k in lm)
    assert all(torch.equal(after[k], saved[k]) for k in lm)
    assert all(torch.equal(after[k], v) for k, v in tower_before.items())
    assert not all(torch.equal(after[k], saved[k]) for k in tower_before)  # the tower is not the saved one's

    build_tiny_llava(tmp_path / "wide", TinyLlavaSpec(text_hidden_size=192, text_heads=6))
    with pytest.raises(ValueError, match="not a LLaVA of this model's sizes"):
        continue_from(fresh, tmp_path / "wide")


def test_train_vlm_refuses_to_continue_from_the_directory_it_writes(tmp_path, model_dir):
    from vllm_semclip.tiny.build import TinyLlavaSpec
    from vllm_semclip.tiny.train_vlm import train_vlm

    with pytest.raises(ValueError, match="same directory"):
        train_vlm(VlmTrainConfig(init=str(tmp_path)), out_dir=tmp_path, spec=TinyLlavaSpec())


@pytest.mark.engine
@pytest.mark.parametrize("tower_lr", [0.0, 1e-3])
def test_train_vlm_trains_the_tower_only_when_given_a_tower_lr(tmp_path, tower_lr):
    """LLaVA-1.5 keeps the tower frozen (``tower_lr`` 0: the saved tower is the CLIP's ViT,
    bit for bit); with a ``tower_lr`` the language model's loss trains it after alignment."""
    config = VlmTrainConfig(steps=4, batch_size=2, align_fraction=0.5, warmup=1, tower_lr=tower_lr, eval_questions=2)
    report, moved = _train_and_compare(tmp_path, config)
    assert report["config"]["tower_lr"] == tower_lr
    tower = [k for k in moved if ".vision_tower." in k]
    assert tower
    assert any(moved[k] for k in tower) == (tower_lr > 0), [k for k in tower if moved[k]][:3]
    assert any(moved[k] for k in moved if ".multi_modal_projector." in k)


def _train_and_compare(tmp_path, config: VlmTrainConfig) -> tuple[dict, dict[str, bool]]:
    """Train ``config`` on the bundled tower into ``tmp_path/trained``, build the same model
    untrained beside it; the report and, for every saved weight, whether training changed it."""
    from safetensors.torch import load_file

    from vllm_semclip.tiny.bundled import DEFAULT_TOWER_DIR
    from vllm_semclip.tiny.build import TinyLlavaSpec, build_tiny_llava
    from vllm_semclip.tiny.train_vlm import train_vlm

    spec = TinyLlavaSpec()
    report = train_vlm(config, DEFAULT_TOWER_DIR, tmp_path / "trained", spec=spec, progress=False)
    build_tiny_llava(tmp_path / "untrained", spec, relevance_dir=DEFAULT_TOWER_DIR)
    trained, untrained = (load_file(next((tmp_path / d).glob("*.safetensors"))) for d in ("trained", "untrained"))
    return report, {k: not bool((trained[k] == untrained[k]).all()) for k in trained}


@pytest.mark.engine
@pytest.mark.parametrize("text_steps,align_projector_only", [(0, True), (3, True), (0, False)])
def test_text_pretraining_and_a_projector_only_alignment_train_what_they_say(tmp_path, text_steps,
                                                                             align_projector_only):
    """All steps are alignment here: with ``align_projector_only`` the language model keeps its
    initial weights unless text pretraining trained it first; the projector always learns;
    text steps leave the projector and tower alone (they see no image)."""
    config = VlmTrainConfig(steps=2, batch_size=2, align_fraction=1.0, warmup=1, text_steps=text_steps,
                            align_projector_only=align_projector_only, eval_questions=2)
    report, moved_weights = _train_and_compare(tmp_path, config)
    assert ("text_accuracy" in report) == bool(text_steps)

    def moved(part: str) -> bool:
        return any(changed for k, changed in moved_weights.items() if part in k)

    assert moved(".multi_modal_projector.") and not moved(".vision_tower.")
    assert moved(".language_model.") == (bool(text_steps) or not align_projector_only)
    assert moved("lm_head.") == (bool(text_steps) or not align_projector_only)


@pytest.mark.engine
@pytest.mark.parametrize("position_binding_weight", [0.0, 0.5])
def test_a_grounding_stage_trains_projector_and_language_model_never_the_tower(tmp_path, position_binding_weight):
    """The alignment here trains the projector alone, so the language model moves only if the
    side-of-the-image stage before it trained it; that stage reports its held-out side accuracy."""
    config = VlmTrainConfig(steps=1, batch_size=2, align_fraction=1.0, warmup=1, align_projector_only=True,
                            side_steps=2, position_binding_weight=position_binding_weight, eval_questions=2,
                            ground_spatial_fraction=0.5, align_ground_fraction=0.5)
    report, moved_weights = _train_and_compare(tmp_path, config)
    assert report["config"]["side_steps"] == 2 and report["config"]["ground_spatial_fraction"] == 0.5
    assert 0 <= report["grounding_side_accuracy"] <= 1 and 0 <= report["grounding_spatial_accuracy"] <= 1

    def moved(part: str) -> bool:
        return any(changed for k, changed in moved_weights.items() if part in k)

    assert moved(".multi_modal_projector.") and moved(".language_model.") and moved("lm_head.")
    assert not moved(".vision_tower.")


@pytest.mark.engine
def test_text_pretraining_teaches_the_language_model_to_find_the_named_card(model_dir):
    """A few hundred text steps from the bundled LLaVA's language model take held-out text
    questions from chance (1 in 4) towards always right: the search the images need."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vllm_semclip.tiny.train_vlm import accuracy, held_out_text, pretrain_text

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    trainer = LlavaTrainer(model, AutoProcessor.from_pretrained(model_dir))
    for p in trainer.language_model_parameters():  # from nothing, as the recipe starts
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    trainer.model.eval()
    before = accuracy(trainer, held_out_text(128, 0, trainer.tokens_per_tile))  # what pretrain_text scores
    after = pretrain_text(trainer, VlmTrainConfig(text_steps=250, warmup=20), progress=False)
    assert before < 0.45 and after > 0.7, (before, after)


def test_binding_targets_point_at_the_asked_cards_tokens_from_the_colour_position(trainer):
    """Attribute questions about one tile get a target: the query is the token just before the
    colour word, the keys are the image tokens under the asked-for card; other questions none."""
    from vllm_semclip.tiny.scenes import SHAPES

    rng = random.Random(8)
    samples = [tile_sample(rng, n_cards=3, spatial=False) for _ in range(4)]
    samples += [tile_sample(rng, n_cards=2, spatial=True), side_sample(rng, n_cards=2)]
    encoded = [trainer.encode(s, s.options[0], bos=i % 2 == 0) for i, s in enumerate(samples)]
    targets = trainer.binding_targets(samples, encoded)
    assert [row for row, _, _ in targets] == [0, 1, 2, 3]
    grid = int(trainer.tokens_per_tile ** 0.5)
    for row, query, keys in targets:
        sample, (ids, _) = samples[row], encoded[row]
        colour = sample.options[0].rsplit(" ", 1)[1].rstrip(".")
        assert trainer.tokenizer.decode(ids[query + 1:query + 2]).strip() == colour
        image_at = ids.index(trainer.image_token_id)
        marked = keys.nonzero().flatten().tolist()
        assert marked and all(ids[k] == trainer.image_token_id for k in marked)
        asked = next(c for c in sample.cards if sample.question.endswith(f" {c.shape}?"))
        shapes, _ = card_patch_labels([sample.cards], trainer.tile_size, trainer.tile_size // grid)
        expected = (shapes[0] == SHAPES.index(asked.shape)).nonzero().flatten() + image_at
        assert marked == expected.tolist()


def test_position_binding_targets_point_heads_0_and_1_at_the_named_cards_from_the_left_right_position(trainer):
    """Left/right questions about one tile: the query is the token just before "left"/"right";
    head 0's keys are the tokens under {a}, head 1's under {b} — none for "… of the image?",
    whose second name is not a card; attribute questions get no position target."""
    from vllm_semclip.tiny.scenes import SHAPES

    rng = random.Random(11)
    samples = [tile_sample(rng, n_cards=3, spatial=False), tile_sample(rng, n_cards=3, spatial=True),
               side_sample(rng, n_cards=2), tile_sample(rng, n_cards=2, spatial=True)]
    encoded = [trainer.encode(s, s.options[0], bos=i % 2 == 1) for i, s in enumerate(samples)]
    first = trainer.binding_targets(samples, encoded, "relative_position", named=0)
    second = trainer.binding_targets(samples, encoded, "relative_position", named=1)
    assert [row for row, _, _ in first] == [1, 2, 3] and [row for row, _, _ in second] == [1, 3]
    grid = int(trainer.tokens_per_tile ** 0.5)
    for named, targets in ((0, first), (1, second)):
        for row, query, keys in targets:
            sample, (ids, _) = samples[row], encoded[row]
            side = sample.options[0].split(" side of ")[0].rsplit(" ", 1)[1]
            assert side in ("left", "right")
            assert trainer.tokenizer.decode(ids[query + 1:query + 2]).strip() == side
            words = sample.question.rstrip("?").split()
            shape = (words[2], words[-1])[named]
            card = next(c for c in sample.cards if c.shape == shape)
            shapes, _ = card_patch_labels([sample.cards], trainer.tile_size, trainer.tile_size // grid)
            image_at = ids.index(trainer.image_token_id)
            expected = (shapes[0] == SHAPES.index(card.shape)).nonzero().flatten() + image_at
            assert keys.nonzero().flatten().tolist() == expected.tolist() != []
    # the answer position of an attribute question is the colour position, as before
    (row, query, _), = trainer.binding_targets(samples[:1], encoded[:1])
    assert trainer.tokenizer.decode(encoded[0][0][query + 1:query + 2]).strip() == \
        samples[0].options[0].rsplit(" ", 1)[1].rstrip(".")


def test_word_targets_point_heads_0_and_1_from_the_left_right_position_at_the_words_naming_a_and_b(trainer):
    """The keys are exactly the question's tokens of {a} (head 0) and {b} (head 1) — "image" for a
    side-of-the-image question, the question's word and not the image token — the query the
    token before "left"/"right"; attribute questions get none."""
    rng = random.Random(21)
    samples = [tile_sample(rng, n_cards=3, spatial=False), tile_sample(rng, n_cards=3, spatial=True),
               side_sample(rng, n_cards=2), tile_sample(rng, n_cards=2, spatial=True)]
    encoded = [trainer.encode(s, s.options[0], bos=i % 2 == 0) for i, s in enumerate(samples)]
    for named in (0, 1):
        targets = trainer.word_targets(samples, encoded, named)
        assert [row for row, _, _ in targets] == [1, 2, 3]
        for row, query, keys in targets:
            sample, (ids, begin) = samples[row], encoded[row]
            words = sample.question.rstrip("?").split()
            marked = keys.nonzero().flatten().tolist()
            assert trainer.tokenizer.decode([ids[i] for i in marked]).strip() == (words[2], words[-1])[named]
            image_end = ids.index(trainer.image_token_id) + trainer.tokens_per_tile
            assert image_end <= marked[0] and marked[-1] < begin  # in the question, not the answer or the image
            side = sample.options[0].split(" side of ")[0].rsplit(" ", 1)[1]
            assert trainer.tokenizer.decode(ids[query + 1:query + 2]).strip() == side


@pytest.fixture(scope="module")
def untrained_dir(tmp_path_factory) -> str:
    """The tiny LLaVA as ``semclip train vlm`` starts it: the bundled tower, a random (seeded)
    projector and language model. The steering tests run on it: the bundled LLaVA was trained with
    the steerings, so its heads already look where they would be steered."""
    from vllm_semclip.tiny.bundled import DEFAULT_TOWER_DIR
    from vllm_semclip.tiny.build import TinyLlavaSpec, build_tiny_llava

    out = tmp_path_factory.mktemp("untrained") / "llava"
    build_tiny_llava(out, TinyLlavaSpec(), relevance_dir=DEFAULT_TOWER_DIR)
    return str(out)


@pytest.fixture(scope="module")
def untrained(untrained_dir):
    return LlavaTrainer.from_pretrained(untrained_dir)


def test_position_and_word_binding_add_terms_only_for_left_right_questions(untrained):
    trainer = untrained
    rng = random.Random(22)
    attribute = [tile_sample(rng, n_cards=2, spatial=False) for _ in range(3)]
    spatial = [tile_sample(rng, n_cards=2, spatial=True) for _ in range(3)]
    with torch.no_grad():
        plain = float(trainer.loss(attribute, random.Random(0)))
        for steering in ({"position_binding_weight": 1.0}, {"word_binding_weight": 1.0}):
            assert float(trainer.loss(attribute, random.Random(0), **steering)) == pytest.approx(plain)
        plain = float(trainer.loss(spatial, random.Random(0)))
        cards = float(trainer.loss(spatial, random.Random(0), position_binding_weight=1.0))
        first = float(trainer.loss(spatial, random.Random(0), word_binding_weight=1.0))
        later = float(trainer.loss(spatial, random.Random(0), word_binding_weight=1.0, word_binding_layer=3))
        both = float(trainer.loss(spatial, random.Random(0), word_binding_weight=1.0, position_binding_weight=1.0))
    # −log of an attention share below 1, for two heads; at the layer asked for; the terms add up
    assert cards > plain + 0.1 and first > plain + 0.1 and later > plain + 0.1 and first != pytest.approx(later)
    assert both == pytest.approx(first + cards - plain, rel=1e-4)


def test_attribute_word_targets_mark_the_asked_shape_in_the_question_at_the_colour_position(untrained):
    trainer = untrained
    rng = random.Random(5)
    samples = [tile_sample(rng, n_cards=3, spatial=i % 2 == 1) for i in range(6)]
    encoded = [trainer.encode(s, s.options[0]) for s in samples]
    targets = trainer.word_targets(samples, encoded, 0, "direct_attributes")
    assert [r for r, _, _ in targets] == [0, 2, 4]  # attribute questions only
    for row, position, keys in targets:
        ids, begin = encoded[row]
        marked = [i for i in range(len(ids)) if keys[i]]
        image_end = ids.index(trainer.image_token_id) + trainer.tokens_per_tile
        assert image_end <= marked[0] and marked[-1] < begin  # in the question, not the image or the answer
        assert trainer.tokenizer.decode([ids[i] for i in marked]).strip() == samples[row].asked_card().shape
        assert trainer.tokenizer.decode([ids[position + 1]]).strip() == samples[row].asked_card().color
    assert trainer.word_targets(samples, encoded, 1, "direct_attributes") == []  # a colour question names one card
    with torch.no_grad():
        plain = float(trainer.loss(samples, random.Random(0)))
        steered = float(trainer.loss(samples, random.Random(0), attribute_word_binding_weight=1.0))
        spatial_only = [s for s in samples if s.category == "relative_position"]
        assert float(trainer.loss(spatial_only, random.Random(0), attribute_word_binding_weight=1.0)) == \
            pytest.approx(float(trainer.loss(spatial_only, random.Random(0))))
    assert steered > plain + 0.1


def _steps_lower(model_dir, samples, steering, steps: int = 5) -> tuple[float, float]:
    """``steering(trainer, encoded, attentions)`` before and after ``steps`` Adam steps on it alone (a fresh copy of the model)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    trainer = LlavaTrainer(model, AutoProcessor.from_pretrained(model_dir))
    encoded = [trainer.encode(s, s.options[0]) for s in samples]
    features = trainer.tile_features(trainer.pixel_values(samples))

    def loss() -> torch.Tensor:
        out = trainer._forward_with_attentions([ids for ids, _ in encoded], features)
        return steering(trainer, encoded, out.attentions)

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    before = float(loss().detach())
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    return before, float(loss().detach())


def test_a_few_steps_of_word_binding_turn_the_first_layers_heads_to_the_named_words(untrained_dir):
    samples = [tile_sample(random.Random(i), n_cards=3, spatial=True) for i in range(6)]

    def steering(trainer, encoded, attentions):
        return sum(trainer.binding_loss(attentions, trainer.word_targets(samples, encoded, h), 0, h) for h in (0, 1))

    before, after = _steps_lower(untrained_dir, samples, steering)
    assert after < before - 0.5


def test_a_few_steps_of_attribute_word_binding_turn_the_first_layers_head_to_the_asked_shape(untrained_dir):
    samples = [tile_sample(random.Random(i), n_cards=3, spatial=False) for i in range(6)]

    def steering(trainer, encoded, attentions):
        return trainer.binding_loss(attentions, trainer.word_targets(samples, encoded, 0, "direct_attributes"), 0, 0)

    before, after = _steps_lower(untrained_dir, samples, steering)
    assert after < before - 0.5


def test_binding_loss_is_zero_when_the_head_looks_only_at_the_card_and_log_n_when_it_looks_everywhere(trainer):
    import math

    keys = torch.zeros(10)
    keys[[3, 4]] = 1.0
    targets = [(0, 7, keys)]
    on_card = torch.zeros(1, 2, 10, 10)
    on_card[0, 0, 7, [3, 4]] = 0.5
    everywhere = torch.full((1, 2, 10, 10), 0.1)
    assert float(trainer.binding_loss((on_card,), targets, layer=0)) == pytest.approx(0.0, abs=1e-6)
    assert float(trainer.binding_loss((everywhere,), targets, layer=0)) == pytest.approx(math.log(5), abs=1e-5)
    # head 1 of the first map pays the card nothing: the loss is capped, not infinite
    assert float(trainer.binding_loss((on_card,), targets, layer=0, head=1)) == pytest.approx(-math.log(1e-6))


@pytest.mark.engine
def test_a_few_steps_of_the_binding_loss_move_the_heads_attention_onto_the_asked_card(untrained_dir):
    """The loss trains what it says: its gradient reaches the language model, and a few steps of
    it raise the attention the steered head pays the asked-for card (on a copy of the model)."""
    samples = [tile_sample(random.Random(i), n_cards=3, spatial=False) for i in range(6)]

    def steering(trainer, encoded, attentions):
        return trainer.binding_loss(attentions, trainer.binding_targets(samples, encoded), layer=2)

    before, after = _steps_lower(untrained_dir, samples, steering)
    assert after < before - 0.5
    trainer = LlavaTrainer.from_pretrained(untrained_dir)
    combined = trainer.loss(samples, random.Random(0), binding_weight=0.1, binding_layer=2)
    plain = trainer.loss(samples, random.Random(0))
    assert float(combined.detach()) > float(plain.detach())  # the binding term is added, never negative


def _stopping_at_third_call(real):
    """``real``, except that its third call raises KeyboardInterrupt: a run stopped by hand."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.engine
def test_a_stopped_clip_run_goes_on_from_its_checkpoint_as_if_it_had_not_stopped(tmp_path, monkeypatch):
    """Seeded and resumable, on the randomised material: a run stopped after its step-2 checkpoint and
    started again ends with the very weights of a run that never stopped; a checkpoint of another
    configuration is refused."""
    from safetensors.torch import load_file

    from vllm_semclip.tiny import train_clip as trainer

    config = ClipTrainConfig(steps=4, caption_blocks=1, eval_cards=8, eval_mosaics=2, threads=1, render="train",
                             checkpoint_every=2, warmup=1)
    whole = train_clip(config, tmp_path / "whole", progress=False)
    assert whole["resumed_at_step"] is None and whole["config"]["render"] == "train"
    assert not (tmp_path / "whole" / trainer.CHECKPOINT).exists()  # a finished run leaves none

    real = trainer.sample_blocks
    monkeypatch.setattr(trainer, "sample_blocks", _stopping_at_third_call(real))  # a stop at step 3
    with pytest.raises(KeyboardInterrupt):
        train_clip(config, tmp_path / "stopped", progress=False)
    assert (tmp_path / "stopped" / trainer.CHECKPOINT).is_file()
    monkeypatch.setattr(trainer, "sample_blocks", real)
    with pytest.raises(ValueError, match="another configuration.*steps"):
        train_clip(ClipTrainConfig(**{**config.__dict__, "steps": 6}), tmp_path / "stopped", progress=False)
    again = train_clip(config, tmp_path / "stopped", progress=False)
    assert again["resumed_at_step"] == 2
    a = load_file(str(tmp_path / "whole" / "open_clip_model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "open_clip_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.engine
def test_a_stopped_vlm_run_on_the_randomised_material_goes_on_as_if_it_had_not_stopped(tmp_path, monkeypatch):
    """``semclip train vlm --render train``: its tiles and scenes come from the randomised training
    split (a scene of the legacy generator is never drawn), its held-out figures from ``val``; a run
    stopped after its step-2 checkpoint and started again ends with the very weights of a run that
    never stopped; a checkpoint of another configuration is refused; a finished run leaves none."""
    from safetensors.torch import load_file

    from vllm_semclip.eval import benchdata
    from vllm_semclip.tiny import train_vlm as trainer
    from vllm_semclip.tiny.bundled import DEFAULT_TOWER_DIR

    splits = []
    real_record = benchdata.make_record

    def spy(category, index, seed, split="legacy", scale=1.0):
        splits.append(split)
        return real_record(category, index, seed, split, scale)

    monkeypatch.setattr(trainer, "make_record", spy)
    config = VlmTrainConfig(steps=4, batch_size=2, align_fraction=0.25, scene_fraction=1.0, warmup=1, eval_questions=2,
                            render="train", checkpoint_every=2, threads=1)
    whole = trainer.train_vlm(config, DEFAULT_TOWER_DIR, tmp_path / "whole", progress=False)
    assert whole["resumed_at_step"] is None and whole["eval_split"] == "val"
    assert set(splits) == {"train", "val"} and splits.count("train") == 3 * 2  # 3 scene steps of 2; val: held out
    assert not (tmp_path / "whole" / trainer.CHECKPOINT).exists()

    real_batch = trainer._batch
    monkeypatch.setattr(trainer, "_batch", _stopping_at_third_call(real_batch))  # a stop at step 3
    with pytest.raises(KeyboardInterrupt):
        trainer.train_vlm(config, DEFAULT_TOWER_DIR, tmp_path / "stopped", progress=False)
    assert (tmp_path / "stopped" / trainer.CHECKPOINT).is_file()
    monkeypatch.setattr(trainer, "_batch", real_batch)
    with pytest.raises(ValueError, match="another configuration.*steps"):
        trainer.train_vlm(VlmTrainConfig(**{**config.__dict__, "steps": 6}), DEFAULT_TOWER_DIR, tmp_path / "stopped",
                          progress=False)
    again = trainer.train_vlm(config, DEFAULT_TOWER_DIR, tmp_path / "stopped", progress=False)
    assert again["resumed_at_step"] == 2
    a, b = (load_file(next((tmp_path / d).glob("*.safetensors"))) for d in ("whole", "stopped"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole["visible_attribute_accuracy"] == again["visible_attribute_accuracy"]
