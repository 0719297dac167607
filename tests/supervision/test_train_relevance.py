"""Training ψ on crop labels: the loss, a tiny run, and the checkpoint round trip (open_clip and the plugin)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vllm_semclip.eval.benchdata import load_bench, write_bench
from vllm_semclip.crops import candidate_boxes, candidate_groups, rank_scores
from vllm_semclip.eval.metrics import oracle_index
from vllm_semclip.supervision.label import label_row, write_shard
from vllm_semclip.relevance import query_features
from vllm_semclip.tiny.bundled import DEFAULT_TOWER_DIR, TOWER_MODEL_NAME
from vllm_semclip.supervision.train_relevance import (
    CropContrastiveLoss,
    CropEncoder,
    GridRankLoss,
    RelevanceTrainConfig,
    _crop_views,
    _encode_crops,
    train_relevance,
)
from conftest import PSI


def test_loss_is_text_to_crop_infonce_with_same_text_crops_of_other_images_masked():
    torch.manual_seed(0)
    b, c, d = 3, 4, 8
    text = torch.nn.functional.normalize(torch.randn(b, d), dim=-1)
    crops = torch.nn.functional.normalize(torch.randn(b, c, d), dim=-1)
    positives = torch.tensor([1, 3, 0])
    qids = torch.tensor([0, 1, 0])  # questions 0 and 2 ask the same thing about different images
    loss = CropContrastiveLoss()(text, crops, positives, torch.tensor(10.0), qids)
    expected = 0.0
    for i in range(b):
        allowed = [(j, k) for j in range(b) for k in range(c) if j == i or qids[j] != qids[i]]
        logits = torch.stack([10.0 * text[i] @ crops[j, k] for j, k in allowed])
        expected += -torch.log_softmax(logits, 0)[allowed.index((i, int(positives[i])))]
    assert loss.item() == pytest.approx(expected.item() / b, rel=1e-5)
    # a batch of one text: the loss is plain softmax over its own image's crops
    one = CropContrastiveLoss()(text[:1], crops[:1], positives[:1], torch.tensor(1.0), qids[:1])
    assert one.item() == pytest.approx(-torch.log_softmax(crops[0] @ text[0], 0)[1].item(), rel=1e-5)


def test_a_crops_logit_is_its_best_views():
    """Crops given as views [B, C, V, D]: each crop's logit is its best view's (as ψ serves a
    non-square crop); views that repeat one vector give the one-view loss exactly."""
    g = torch.Generator().manual_seed(2)
    b, c, v, d = 3, 4, 2, 8
    text = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1)
    views = torch.nn.functional.normalize(torch.randn(b, c, v, d, generator=g), dim=-1)
    positives, qids, scale = torch.tensor([1, 0, 3]), torch.tensor([0, 1, 2]), torch.tensor(10.0)
    loss = CropContrastiveLoss()
    one = views[:, :, 0]
    assert torch.allclose(loss(text, one[:, :, None].expand(-1, -1, 2, -1), positives, scale, qids),
                          loss(text, one, positives, scale, qids))
    logits = (scale * torch.einsum("id,jcvd->ijcv", text, views)).amax(-1).reshape(b, b * c)
    by_hand = torch.nn.functional.cross_entropy(logits, torch.arange(b) * c + positives)
    assert torch.allclose(loss(text, views, positives, scale, qids), by_hand)


def test_rank_loss_is_cross_entropy_over_the_scores_serving_ranks_by():
    """Each question's own candidates, standardised within their grids exactly as ``rank_scores``
    ranks them when serving (the bridges in a group of their own), then softmax towards the best."""
    g = torch.Generator().manual_seed(3)
    grids, d = (2, 3), 8
    groups = candidate_groups(grids, bridges=True)
    b, c, v = 3, len(groups), 2
    text = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1)
    views = torch.nn.functional.normalize(torch.randn(b, c, v, d, generator=g), dim=-1)
    views[2, :4] = views[2, :1]  # question 2's 2x2 cells all alike: their standardised scores are 0
    positives = torch.tensor([0, 5, 13])
    loss = GridRankLoss("grid", scale=4.0)(text, views, positives, torch.tensor(50.0),
                                           torch.tensor([groups] * b))
    expected = 0.0
    for i in range(b):
        raw = torch.einsum("d,cvd->cv", text[i], views[i]).amax(-1).tolist()
        served = torch.tensor(rank_scores(raw, grids, "grid", True))
        expected += -torch.log_softmax(4.0 * served, 0)[positives[i]]
    assert loss.item() == pytest.approx(expected.item() / b, rel=1e-5)
    # ranked as norm="none" serves: the raw scores at CLIP's logit scale, nothing standardised
    none = GridRankLoss("none")(text, views, positives, torch.tensor(50.0), torch.tensor([groups] * b))
    raw = torch.einsum("bd,bcvd->bcv", text, views).amax(-1)
    assert none.item() == pytest.approx(torch.nn.functional.cross_entropy(50.0 * raw, positives).item(), rel=1e-5)
    # the gradient reaches the text: training can move the ranking
    text.requires_grad_(True)
    GridRankLoss()(text, views, positives, torch.tensor(1.0), torch.tensor([groups] * b)).backward()
    assert torch.isfinite(text.grad).all() and text.grad.abs().sum() > 0


def test_rank_loss_with_several_positives_is_minus_log_their_summed_probability():
    """``positives`` as a [B, C] mask (target "hit": every crop holding the boxes): −log of the summed
    softmax probability of the marked crops; one marked crop a row is the index form's loss."""
    g = torch.Generator().manual_seed(4)
    grids, d = (2, 3), 8
    groups = torch.tensor([candidate_groups(grids, bridges=True)] * 2)
    b, c = 2, groups.shape[1]
    text = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1)
    views = torch.nn.functional.normalize(torch.randn(b, c, 2, d, generator=g), dim=-1)
    mask = torch.zeros(b, c, dtype=torch.bool)
    mask[0, [1, 6]] = True
    mask[1, 13] = True
    loss = GridRankLoss("grid", scale=8.0)(text, views, mask, torch.tensor(1.0), groups)
    expected = 0.0
    for i in range(b):
        raw = torch.einsum("d,cvd->cv", text[i], views[i]).amax(-1).tolist()
        p = torch.softmax(8.0 * torch.tensor(rank_scores(raw, grids, "grid", True)), 0)
        expected += -torch.log(p[mask[i]].sum())
    assert loss.item() == pytest.approx(expected.item() / b, rel=1e-5)
    one = torch.zeros(b, c, dtype=torch.bool)
    one[0, 6] = one[1, 13] = True
    assert GridRankLoss()(text, views, one, torch.tensor(1.0), groups).item() == pytest.approx(
        GridRankLoss()(text, views, torch.tensor([6, 13]), torch.tensor(1.0), groups).item(), rel=1e-6)


@pytest.fixture(scope="module")
def perfect_labels(tmp_path_factory) -> Path:
    """Labels from a perfect labeller: the crop that best covers the targets is the one that helps."""
    root = tmp_path_factory.mktemp("relevance")
    write_bench(root / "bench", 16, seed=515, progress=False)
    rows = []
    for rec in load_bench(root / "bench"):
        from PIL import Image

        with Image.open(rec.image) as im:
            size = im.size
        candidates = candidate_boxes(*size, (2, 3))
        best = oracle_index(candidates, rec.target_boxes)
        wrong = [-2.0] + [-1.0] * (len(rec.options) - 1)
        scored = [wrong] + [[-0.1] + [-3.0] * (len(rec.options) - 1) if i == best else wrong
                            for i in range(len(candidates))]
        rows.append(label_row(rec, size, (2, 3), scored))
    write_shard(root / "labels", 0, rows[:8])
    write_shard(root / "labels", 1, rows[8:])
    return root


@pytest.fixture(scope="module")
def plain_tower(tmp_path_factory) -> Path:
    """The 224-px CLIP without its reference texts and with its text projection scrambled (seeded):
    as bundled it already picks the right crop for all 4 validation questions, so no epoch could
    beat its start; scrambling the text side keeps the (locked) eyes and leaves the run something
    to learn — what a text tower fine-tuned on labels is for."""
    import shutil

    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("plain") / "psi"
    shutil.copytree(DEFAULT_TOWER_DIR, out)
    (out / "semclip_relevance.json").unlink()
    weights = out / "open_clip_model.safetensors"
    state = load_file(str(weights))
    proj = state["text_projection"]
    g = torch.Generator().manual_seed(0)
    state["text_projection"] = (torch.randn(proj.shape, generator=g) * proj.float().std()).to(proj.dtype)
    save_file(state, str(weights))
    return out


@pytest.fixture(scope="module")
def tiny_run(perfect_labels, plain_tower):
    out = perfect_labels / "psi"
    config = RelevanceTrainConfig(labels=str(perfect_labels / "labels"), init=str(plain_tower), epochs=12,
                                  batch_size=6, lr=1e-3, warmup=2, val_fraction=0.25, loss="contrastive")
    return out, train_relevance(config, out, progress=False)


def test_the_loss_decreases_and_the_best_epoch_is_kept(tiny_run):
    out, report = tiny_run
    losses = [h["loss"] for h in report["history"][1:]]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert report["train_questions"] == 12 and report["val_questions"] == 4
    best = report["best_epoch"]
    assert best["mean_gain"] == max(h["mean_gain"] for h in report["history"])
    assert report["zero_shot"]["epoch"] == 0
    assert json.loads((out / "train_config.json").read_text())["lock_image"] is True
    assert report["kept_start"] is (best["epoch"] == 0) and best["epoch"] > 0


@pytest.mark.engine
def test_a_run_that_never_beats_its_start_says_it_kept_the_start(perfect_labels, tmp_path):
    """Keep-best with no better epoch keeps the start's weights: the report and a warning say so."""
    config = RelevanceTrainConfig(labels=str(perfect_labels / "labels"), init=str(DEFAULT_TOWER_DIR), epochs=1,
                                  batch_size=6, lr=1e-12, warmup=0, val_fraction=0.25)
    with pytest.warns(UserWarning, match="the saved ψ is the start's weights"):
        report = train_relevance(config, tmp_path / "psi", progress=False)
    assert report["kept_start"] is True and report["best_epoch"]["epoch"] == 0
    start = load_file(str(DEFAULT_TOWER_DIR / "open_clip_model.safetensors"))
    saved = load_file(str(tmp_path / "psi" / "open_clip_model.safetensors"))
    assert all(torch.equal(start[k], saved[k]) for k in start)
    # trained with its start's reference texts, saved with them: served as it was trained
    from vllm_semclip.relevance import RelevanceModel

    trained = RelevanceModel.from_pretrained(str(tmp_path / "psi"))
    assert trained.reference is not None and trained.reference == RelevanceModel.from_pretrained(
        str(DEFAULT_TOWER_DIR)).reference
    with torch.inference_mode():
        served = trained.query_vector("What is the color of the circle?")
        objective = query_features(trained.model, trained.tokenizer, ["What is the color of the circle?"],
                                   trained.reference)[0]
    assert torch.allclose(served, objective, atol=1e-6)
    assert not torch.allclose(served, query_features(trained.model, trained.tokenizer,
                                                     ["What is the color of the circle?"])[0], atol=1e-3)


def test_the_rank_loss_trains(perfect_labels, plain_tower, tmp_path):
    config = RelevanceTrainConfig(labels=str(perfect_labels / "labels"), init=str(plain_tower), epochs=4,
                                  batch_size=6, lr=1e-3, warmup=2, val_fraction=0.25)
    report = train_relevance(config, tmp_path / "psi", progress=False)
    losses = [h["loss"] for h in report["history"][1:]]
    assert report["config"]["loss"] == "rank" and losses[-1] < losses[0]
    with pytest.raises(ValueError, match="loss must be one of"):
        RelevanceTrainConfig(labels="x", loss="hinge")


def test_target_hit_trains_on_the_crops_holding_the_boxes_and_keeps_the_best_hit_rate(perfect_labels, plain_tower,
                                                                                      tmp_path):
    """Target "hit": the questions with a crop holding their boxes train (gains are not read), every such
    crop a positive; the epoch of best held-out hit rate is kept."""
    rows = [json.loads(line) for f in sorted((perfect_labels / "labels").glob("shard-*.jsonl"))
            for line in f.read_text().splitlines()]
    for row in rows:  # no crop helps the VLM: distant supervision has nothing to learn, the boxes still do
        for crop in row["crops"]:
            crop["gain"] = 0.0
    write_shard(tmp_path / "labels", 0, rows)
    config = RelevanceTrainConfig(labels=str(tmp_path / "labels"), init=str(plain_tower), epochs=4, batch_size=6,
                                  lr=1e-3, warmup=2, val_fraction=0.25, target="hit")
    report = train_relevance(config, tmp_path / "psi", progress=False)
    losses = [h["loss"] for h in report["history"][1:]]
    assert report["train_questions"] == 12 and losses[-1] < losses[0]
    assert report["best_epoch"]["hit_rate"] == max(h["hit_rate"] for h in report["history"])
    assert report["config"]["target"] == "hit"
    with pytest.raises(ValueError, match="min_gain"):  # the same labels under distant supervision
        train_relevance(RelevanceTrainConfig(labels=str(tmp_path / "labels")), tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="target must be one of"):
        RelevanceTrainConfig(labels="x", target="boxes")
    with pytest.raises(ValueError, match="needs loss 'rank'"):
        RelevanceTrainConfig(labels="x", target="hit", loss="contrastive")


def test_the_checkpoint_is_safetensors_and_open_clip_loads_it(tiny_run, perfect_labels, plain_tower):
    from PIL import Image

    from vllm_semclip.relevance import RelevanceModel

    out, _ = tiny_run
    files = sorted(p.name for p in out.iterdir())
    assert files == ["open_clip_config.json", "open_clip_model.safetensors", "train_config.json", "train_report.json",
                     "validation.png"]  # its start had no reference texts, so neither has it
    trained = RelevanceModel.from_pretrained(str(out))
    zero_shot = RelevanceModel.from_pretrained(str(plain_tower))  # where tiny_run started
    assert trained.reference is None
    rec = load_bench(perfect_labels / "bench")[0]
    with Image.open(rec.image) as im:
        image = im.convert("RGB")
    boxes = candidate_boxes(*image.size, (2, 3))
    # the image tower was locked: same crop embeddings; the text tower moved
    a = trained.model.encode_image(trained.region_batch(image, boxes[:2], True))
    b = zero_shot.model.encode_image(zero_shot.region_batch(image, boxes[:2], True))
    assert torch.allclose(a, b, atol=1e-3)
    scores = trained.score_regions(rec.question, image, boxes)
    assert not torch.allclose(scores, zero_shot.score_regions(rec.question, image, boxes), atol=1e-4)
    # the weights file alone also serves as `relevance_pretrained` for the named config
    by_name = RelevanceModel.from_pretrained(TOWER_MODEL_NAME, str(out / "open_clip_model.safetensors"))
    assert torch.allclose(by_name.score_regions(rec.question, image, boxes), scores, atol=1e-3)


@pytest.mark.engine
@pytest.mark.parametrize("fit", ["windows", "pad"])
def test_training_scores_crops_as_select_crops_does(perfect_labels, fit):
    """The features train-relevance caches (every candidate's views, ``fit`` as served) rank the
    candidates as ``select_crops`` does with that ``relevance_fit``: training sees what serving scores."""
    from PIL import Image

    from vllm_semclip import SemClipConfig, select_crops
    from vllm_semclip.supervision.label import load_labels
    from vllm_semclip.relevance import get_relevance_model
    from vllm_semclip.tiny.bundled import DEFAULT_RELEVANCE_DIR

    psi = get_relevance_model(str(DEFAULT_RELEVANCE_DIR))
    rows = load_labels(perfect_labels / "labels")[:4]
    feats = _crop_views(psi, rows, fit, False, lambda px: _encode_crops(psi.model, px))
    assert feats.shape[:2] == (4, 17) and feats.shape[-1] == psi.model.visual.output_dim
    for row, f in zip(rows, feats):
        scores = (f @ psi.query_vector(row["question"])).amax(-1)
        with Image.open(row["image"]) as im:
            sel = select_crops(im.convert("RGB"), row["question"], SemClipConfig(relevance_model=PSI, relevance_fit=fit))
        assert [tuple(c["box"]) for c in row["crops"]] == sel.candidates
        assert scores.tolist() == pytest.approx(sel.candidate_scores, abs=1e-4)


@pytest.mark.engine
def test_validation_ranks_the_candidates_as_select_crops_does(perfect_labels):
    """``validate`` picks, per question, the crop ``select_crops`` serves under the same
    ``relevance_norm``: marking exactly the served pick as the hit gives a hit rate of 1 for that
    norm — and less for the other, where the two picks differ."""
    from PIL import Image

    from vllm_semclip import SemClipConfig, select_crops
    from vllm_semclip.supervision.label import load_labels
    from vllm_semclip.relevance import get_relevance_model
    from vllm_semclip.tiny.bundled import DEFAULT_RELEVANCE_DIR
    from vllm_semclip.supervision.train_relevance import LabelledSet, validate

    psi = get_relevance_model(str(DEFAULT_RELEVANCE_DIR))
    rows = load_labels(perfect_labels / "labels")
    feats = _crop_views(psi, rows, "windows", False, lambda px: _encode_crops(psi.model, px))
    picks = {}
    for norm in ("grid", "none"):
        picks[norm] = []
        for row in rows:
            with Image.open(row["image"]) as im:
                sel = select_crops(im.convert("RGB"), row["question"], SemClipConfig(relevance_model=PSI, relevance_norm=norm))
            picks[norm].append(sel.candidates.index(sel.boxes[0]))
    assert picks["grid"] != picks["none"]  # the labelled scenes have questions where the norm decides
    for norm, other in (("grid", "none"), ("none", "grid")):
        hits = [[i == p for i in range(17)] for p in picks[norm]]
        data = LabelledSet([r["question"] for r in rows], [[0.0] * 17 for _ in rows], [0] * len(rows), hits, feats,
                           [tuple(r["grids"]) for r in rows], [r["bridges"] for r in rows])
        assert validate(psi.model, psi.tokenizer, data, True, psi.reference, norm)["hit_rate"] == 1.0
        assert validate(psi.model, psi.tokenizer, data, True, psi.reference, other)["hit_rate"] < 1.0


@pytest.mark.engine
def test_unlocking_the_image_tower_trains_it(perfect_labels):
    out = perfect_labels / "psi-unlocked"
    config = RelevanceTrainConfig(labels=str(perfect_labels / "labels"), epochs=1, batch_size=6, lr=1e-3,
                                  warmup=0, lock_image=False, keep_best=False, val_fraction=0.25,
                                  min_gain=0.0)
    report = train_relevance(config, out, progress=False)
    assert report["history"][1]["loss"] is not None
    before = load_file(str(Path(config.init) / "open_clip_model.safetensors"))
    after = load_file(str(out / "open_clip_model.safetensors"))
    assert report["best_epoch"]["epoch"] == 1  # keep_best=False: the last epoch is saved
    assert not torch.equal(before["visual.conv1.weight"], after["visual.conv1.weight"])


def test_a_partly_unlocked_tower_keeps_its_frozen_tokens_and_computes_its_own_forward():
    """Unlocked groups (open_clip's: 1 the projection, 2 also the last block and ln_post, ...): what is kept
    of a view is the float16 tokens before the first trainable block, and a step's embedding from them is
    the tower's own (``_encode_crops``) up to that rounding."""
    from vllm_semclip.relevance import get_relevance_model

    model = get_relevance_model(str(DEFAULT_TOWER_DIR)).model.float()
    blocks = len(model.visual.transformer.resblocks)
    pixels = torch.randint(0, 256, (3, 3, 224, 224), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    whole = _encode_crops(model, pixels)
    for groups in (1, 2, blocks + 1):
        encoder = CropEncoder(model, True, groups)
        kept = encoder.prepare(pixels)
        assert kept.dtype == torch.float16 and kept.shape[0] == 3 and kept.shape[-1] == model.visual.transformer.width
        assert encoder.split == blocks - max(0, groups - 1)
        assert torch.allclose(encoder(kept[None])[0], whole, atol=2e-3)
        assert not torch.allclose(encoder(kept.flip(0)), whole, atol=2e-3)
    assert torch.equal(CropEncoder(model, True).prepare(pixels), whole)  # locked: the embeddings, once
    assert torch.equal(CropEncoder(model, False).prepare(pixels), pixels)  # unlocked: the pixels
    with pytest.raises(ValueError, match="unlock it whole"):
        CropEncoder(model, True, blocks + 2)
    with pytest.raises(ValueError, match="lock_image_unlocked_groups"):
        RelevanceTrainConfig(labels="x", lock_image=False, lock_image_unlocked_groups=2)
    with pytest.raises(ValueError, match="lock_image_unlocked_groups"):
        RelevanceTrainConfig(labels="x", lock_image_unlocked_groups=-1)


def test_unlocked_groups_train_the_top_of_the_image_tower_only(perfect_labels, plain_tower, tmp_path):
    out = tmp_path / "psi"
    config = RelevanceTrainConfig(labels=str(perfect_labels / "labels"), init=str(plain_tower), epochs=1,
                                  batch_size=6, lr=1e-3, warmup=0, val_fraction=0.25, keep_best=False,
                                  target="hit", lock_image_unlocked_groups=2)
    report = train_relevance(config, out, progress=False)
    assert report["config"]["lock_image_unlocked_groups"] == 2 and report["history"][1]["loss"] is not None
    before = load_file(str(plain_tower / "open_clip_model.safetensors"))
    after = load_file(str(out / "open_clip_model.safetensors"))
    last = len([k for k in before if k.startswith("visual.transformer.resblocks.") and k.endswith(".ln_1.weight")]) - 1
    changed = {k for k in before if k.startswith("visual.") and not torch.equal(before[k], after[k])}
    assert "visual.proj" in changed and any(k.startswith(f"visual.transformer.resblocks.{last}.") for k in changed)
    assert all(k.startswith((f"visual.transformer.resblocks.{last}.", "visual.ln_post.", "visual.proj"))
               for k in changed), changed


def test_labels_with_no_helpful_crop_are_refused(perfect_labels, tmp_path):
    rows = [json.loads(line) for line in (perfect_labels / "labels" / "shard-00000.jsonl").read_text().splitlines()]
    for row in rows:
        for crop in row["crops"]:
            crop["gain"] = 0.0
    write_shard(tmp_path, 0, rows)
    with pytest.raises(ValueError, match="min_gain"):
        train_relevance(RelevanceTrainConfig(labels=str(tmp_path)), tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        RelevanceTrainConfig(labels="x", batch_size=1)


@pytest.mark.engine
def test_the_plugin_serves_a_trained_psi(tiny_run, perfect_labels, model_dir):
    """An engine started with a ψ trained by ``train_relevance`` (here, the module's run: the bundled
    trained ψ may be its start's weights, see README) picks its crops: same outputs as sending those
    boxes, other outputs than the zero-shot ψ's boxes."""
    from vllm import SamplingParams

    from vllm_semclip.config import SemClipConfig
    from vllm_semclip.eval.harness import ENGINE_MM_CACHE_GB, make_engine, prompt_for
    from vllm_semclip.selection import select_crops

    psi_dir = str(tiny_run[0])
    trained, zero_shot = SemClipConfig(relevance_model=psi_dir), SemClipConfig(relevance_model=PSI)
    cases = []
    for rec in load_bench(perfect_labels / "bench"):
        image = rec.load_image()
        t, z = select_crops(image, rec.question, trained).boxes, select_crops(image, rec.question, zero_shot).boxes
        if t != z:
            cases.append((rec, image, t, z))
    assert cases, "the trained ψ chose what the zero-shot one chose on every question"
    cases = cases[:3]
    llm = make_engine(model_dir, {"method": "relevance", "max_topk": 1, "relevance_model": psi_dir})
    try:
        # a small multimodal cache: two labelling engines with vLLM's default outgrew a 24 GiB host
        assert llm.llm_engine.vllm_config.model_config.multimodal_config.mm_processor_cache_gb == ENGINE_MM_CACHE_GB
        tok = llm.get_tokenizer()
        prompts = []
        for rec, image, t, z in cases:
            text = prompt_for(tok, rec.question) + " " + rec.options[0]
            for kwargs in ({"method": "relevance", "topk": 1}, {"method": "given", "boxes": [list(t[0])]},
                           {"method": "given", "boxes": [list(z[0])]}):
                prompts.append({"prompt": text, "multi_modal_data": {"image": image}, "mm_processor_kwargs": kwargs})
        outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()

    def logprobs(out):
        return [next(iter(e.values())).logprob if e else None for e in out.prompt_logprobs]

    for i in range(len(cases)):
        served, given_trained, given_zero_shot = (logprobs(o) for o in outs[3 * i:3 * i + 3])
        assert served == given_trained
        assert served != given_zero_shot
