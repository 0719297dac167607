"""The evaluation harness: oracle choice, the likelihood protocol, and a small real run through vLLM."""

import json
from dataclasses import dataclass

import pytest

from vllm_semclip.eval.benchdata import BenchRecord, write_bench
from vllm_semclip.eval.metrics import box_contains, oracle_index
from vllm_semclip.crops import candidate_boxes
from vllm_semclip.eval.harness import EvalSettings, choose_option, option_scores_from_outputs


def test_oracle_prefers_the_smallest_candidate_that_covers_every_target():
    candidates = candidate_boxes(900, 600, (2, 3))
    target = (310, 210, 340, 240)  # inside the centre 3x3 cell and the top-left 2x2 cell
    best = candidates[oracle_index(candidates, [target])]
    assert best == (300, 200, 600, 400)
    # two targets in different 3x3 cells of one 2x2 cell: only the 2x2 cell covers both
    both = [(20, 20, 40, 40), (400, 250, 420, 270)]
    assert candidates[oracle_index(candidates, both)] == (0, 0, 450, 300)
    # a target on a border: the candidate covering most of it
    straddle = [(440, 100, 470, 110)]
    chosen = candidates[oracle_index(candidates, straddle)]
    assert chosen[0] <= 440 and chosen[2] >= 450


def test_oracle_request_sends_that_box_as_method_given():
    rec = BenchRecord("x", "direct_attributes", "", "What is the color of the circle?",
                      ["The color of the circle is red."] * 4, ["circle"], [[610, 410, 30, 30]])
    kwargs = EvalSettings("oracle", overlap=0.0).request_kwargs(rec, (900, 600))
    assert kwargs == {"method": "given", "boxes": [[600, 400, 900, 600]]}
    assert EvalSettings("clip", topk=2).request_kwargs(rec, (900, 600))["method"] == "relevance"
    with pytest.raises(ValueError, match="method"):
        EvalSettings("best")
    # clip and trained are both method relevance, each on an engine with its own ψ
    from vllm_semclip.tiny.bundled import DEFAULT_TRAINED_RELEVANCE_DIR

    trained = EvalSettings("trained")
    assert trained.request_kwargs(rec, (900, 600))["method"] == "relevance"
    assert trained.server_config()["relevance_model"] == str(DEFAULT_TRAINED_RELEVANCE_DIR)
    assert "relevance_model" not in EvalSettings("clip").server_config()  # the plugin's default: zero-shot ψ
    assert EvalSettings("trained", relevance_model="/psi").server_config()["relevance_model"] == "/psi"
    assert EvalSettings("oracle", relevance_model="/psi").psi is None
    with pytest.raises(ValueError, match="protocol"):
        EvalSettings("clip", protocol="vibes")
    # a k sweep shares one engine: room for the largest k, never less than this run's k
    assert EvalSettings("clip", topk=1, max_topk=3).server_config()["max_topk"] == 3
    assert EvalSettings("clip", topk=2).server_config()["max_topk"] == 2
    with pytest.raises(ValueError, match="below topk"):
        EvalSettings("clip", topk=3, max_topk=2)


def test_overlap_widens_every_methods_candidates_alike():
    # a target across the 3x3 line x = 300 and the 2x2 line y = 300: only the bridge on that crossing
    # holds it; with overlap 0.2 the widened cells of both grids around it hold it too
    rec = BenchRecord("x", "direct_attributes", "", "What is the color of the circle?",
                      ["The color of the circle is red."] * 4, ["circle"], [[290, 290, 20, 20]])
    target = (290, 290, 310, 310)
    holding = lambda overlap: [b for b in candidate_boxes(900, 600, (2, 3), overlap) if box_contains(b, target)]  # noqa: E731
    assert len(holding(0.0)) == 1 and len(holding(0.2)) > 1
    oracle = EvalSettings("oracle", overlap=0.2).request_kwargs(rec, (900, 600))
    assert tuple(oracle["boxes"][0]) in holding(0.2)
    for method in ("clip", "random", "all"):
        assert EvalSettings(method, overlap=0.2).request_kwargs(rec, (900, 600))["overlap"] == 0.2
    assert EvalSettings("clip", overlap=0.2).server_config()["overlap"] == 0.2  # the engine makes the same candidates
    # unset, the engine's default decides (the model's config.json may set it); the oracle needs it resolved
    assert "overlap" not in EvalSettings("clip").request_kwargs(rec, (900, 600))
    assert "overlap" not in EvalSettings("clip").server_config()
    with pytest.raises(ValueError, match="overlap"):
        EvalSettings("oracle").request_kwargs(rec, (900, 600))
    with pytest.raises(ValueError, match="overlap"):
        EvalSettings("clip", overlap=0.9)  # SemClipConfig's own range check


def test_relevance_norm_reaches_only_the_psi_methods():
    rec = BenchRecord("x", "direct_attributes", "", "What is the color of the circle?",
                      ["The color of the circle is red."] * 4, ["circle"], [[610, 410, 30, 30]])
    for method in ("clip", "trained"):
        assert EvalSettings(method, relevance_norm="none").request_kwargs(rec, (900, 600))["relevance_norm"] == "none"
        assert "relevance_norm" not in EvalSettings(method).request_kwargs(rec, (900, 600))  # the engine's default
    assert "relevance_norm" not in EvalSettings("random", relevance_norm="none").request_kwargs(rec, (900, 600))
    with pytest.raises(ValueError, match="relevance_norm"):
        EvalSettings("clip", relevance_norm="softmax")


@dataclass
class _Logprob:
    logprob: float


@dataclass
class _Output:
    prompt_token_ids: list
    prompt_logprobs: list


def test_likelihood_sums_only_the_option_tokens():
    # prompt tokens 1,2 then option tokens 7,8 (logprobs -0.5, -0.25); the prompt's own must not count
    out = _Output([1, 2, 7, 8], [None, {2: _Logprob(-3.0)}, {7: _Logprob(-0.5)}, {8: _Logprob(-0.25), 9: _Logprob(-0.1)}])
    assert option_scores_from_outputs([out], [2]) == [pytest.approx(-0.75)]
    assert option_scores_from_outputs([out], [3]) == [pytest.approx(-3.75)]


def test_generated_answers_map_to_the_closest_option():
    options = ["The circle is on the left side of the square.", "The circle is on the right side of the square."]
    assert choose_option(" The circle is on the right side of the square.", options) == 1
    assert choose_option("The circle is on the left side", options) == 0


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from vllm_semclip.eval.harness import run

    root = tmp_path_factory.mktemp("eval")
    write_bench(root / "bench", 10, seed=99, progress=False)
    docs = run(root / "bench", ["overview", "oracle", "clip", "all", "trained"], root / "out", topk=[2, 1],
               progress=False)
    # a k sweep: the methods that choose k crops once per k, the others once
    return root, {d["method"] + (f"-k{d['topk']}" if d["topk"] else ""): d for d in docs}


def test_small_evaluation_writes_results_and_plot(small_run, tokens_per_tile):
    root, docs = small_run
    assert sorted(docs) == ["all", "clip-k1", "clip-k2", "oracle", "overview", "trained-k1", "trained-k2"]
    assert sorted(p.name for p in (root / "out").glob("*.json")) == sorted(f"{name}.json" for name in docs)
    for name, doc in docs.items():
        on_disk = json.loads((root / "out" / f"{name}.json").read_text())
        assert on_disk["overall_accuracy"] == doc["overall_accuracy"]
        assert set(on_disk["accuracy_by_category"]) == {"direct_attributes", "relative_position"}
        assert len(on_disk["records"]) == on_disk["questions"] == 10
        assert 0.0 <= on_disk["crop_hit_rate"] <= 1.0
        for r in on_disk["records"]:
            assert r["correct"] == (r["choice"] == 0) and len(r["option_scores"]) in (2, 4)
    assert (root / "out" / "accuracy_vs_tokens.png").stat().st_size > 10_000
    # visual tokens are counted in the prompts vLLM ran
    assert docs["overview"]["mean_visual_tokens"] == tokens_per_tile
    assert docs["oracle"]["mean_visual_tokens"] == docs["clip-k1"]["mean_visual_tokens"] == 2 * tokens_per_tile
    assert docs["trained-k1"]["mean_visual_tokens"] == 2 * tokens_per_tile
    assert docs["clip-k2"]["mean_visual_tokens"] == docs["trained-k2"]["mean_visual_tokens"] == 3 * tokens_per_tile
    assert docs["all"]["mean_visual_tokens"] == 18 * tokens_per_tile  # overview + 13 cells + 4 bridges
    assert docs["oracle"]["crop_hit_rate"] == docs["all"]["crop_hit_rate"] == 1.0
    assert docs["overview"]["crop_hit_rate"] == 0.0
    assert {d["overlap"] for d in docs.values()} == {0.0}  # no --overlap: the engine's default, resolved


def test_recorded_boxes_are_what_the_method_chose(small_run):
    from vllm_semclip.eval.benchdata import load_bench

    root, docs = small_run
    records = {r.name: r for r in load_bench(root / "bench")}
    for r in docs["oracle"]["records"]:
        (box,) = r["boxes"]
        assert all(box_contains(tuple(box), t) for t in records[r["name"]].target_boxes)
    assert all(len(r["boxes"]) == 1 for r in docs["clip-k1"]["records"])
    # ψ's best crop is the first of its best two, and k=2 never hits less often than k=1
    for one, two in zip(docs["clip-k1"]["records"], docs["clip-k2"]["records"]):
        assert len(two["boxes"]) == 2 and two["boxes"][0] == one["boxes"][0]
        assert two["crop_hit"] >= one["crop_hit"]
    # trained and clip are the same request on engines with different ψ: the records say which
    from vllm_semclip.config import SemClipConfig
    from vllm_semclip.selection import select_crops
    from vllm_semclip.tiny.bundled import DEFAULT_TRAINED_RELEVANCE_DIR

    assert docs["trained-k1"]["relevance_model"] == docs["trained-k2"]["relevance_model"] == \
        str(DEFAULT_TRAINED_RELEVANCE_DIR)
    assert docs["clip-k1"]["relevance_model"] is None
    for k in (1, 2):
        trained = SemClipConfig(relevance_model=str(DEFAULT_TRAINED_RELEVANCE_DIR), topk=k)
        for r in docs[f"trained-k{k}"]["records"]:
            rec = records[r["name"]]
            assert r["boxes"] == [list(b) for b in select_crops(rec.load_image(), rec.question, trained).boxes]
    assert all(r["boxes"] == [] for r in docs["overview"]["records"])


@pytest.fixture(scope="module")
def shifted_run(tmp_path_factory):
    """A tiny end-to-end evaluation on the shifted split (held-out photos, shades and styles)."""
    from vllm_semclip.eval.harness import run

    root = tmp_path_factory.mktemp("eval_shifted")
    records = write_bench(root / "bench", 12, seed=5, split="shifted", progress=False)
    docs = run(root / "bench", ["overview", "oracle", "clip"], root / "out", progress=False)
    return records, {d["method"]: d for d in docs}


def test_shifted_evaluation_reports_groups_and_hits(shifted_run):
    from vllm_semclip.eval.harness import GROUPS, TABLE_HEADER, format_row, record_group

    records, docs = shifted_run
    groups = {record_group(r) for r in records}
    for doc in docs.values():
        assert doc["questions"] == 12 and set(doc["accuracy_by_group"]) == groups
        assert set(doc["crop_hit_by_category"]) == {"direct_attributes", "relative_position"}
        assert all(r["group"] in GROUPS for r in doc["records"])
        row = format_row(doc)
        assert row.count("|") == TABLE_HEADER.splitlines()[0].count("|")
    # bridges: the oracle's one crop holds every attribute target, on cell lines too
    assert docs["oracle"]["crop_hit_by_category"]["direct_attributes"] == 1.0
    assert docs["overview"]["crop_hit_rate"] == 0.0
