"""SemClipConfig: defaults, layering, and refusals that name the field."""

import json

import pytest
from vllm.exceptions import VLLMValidationError

from vllm_semclip.config import SemClipConfig, SemClipConfigError, resolve_relevance_model

PSI_NAME = "ViT-B-16"  # any name: these checks load no ψ


def test_defaults():
    c = SemClipConfig()
    assert (c.topk, c.grids, c.method, c.overlap, c.bridges) == (1, (2, 3), "relevance", 0.0, True)
    assert c.num_candidates == 17 and c.num_crops == 1 and c.max_crops == 1  # 4 + 9 cells + 4 bridges
    assert SemClipConfig(bridges=False).num_candidates == 13
    with pytest.raises(SemClipConfigError, match="bridges must be true or false") as info:
        SemClipConfig(bridges="yes")
    assert info.value.parameter == "bridges"


def test_error_is_typed_for_vllm_and_python():
    with pytest.raises(SemClipConfigError) as info:
        SemClipConfig(topk=9)
    assert isinstance(info.value, VLLMValidationError) and isinstance(info.value, ValueError)
    assert info.value.parameter == "topk"
    assert "0..8" in str(info.value)


@pytest.mark.parametrize(
    "overrides, field, words",
    [
        ({"topk": 99}, "topk", "0..8"),
        ({"topk": -1}, "topk", "0..8"),
        ({"topk": "two"}, "topk", "integer"),
        ({"topk": 1.5}, "topk", "integer"),
        ({"topk": True}, "topk", "integer"),
        ({"grids": [0]}, "grids", "1..8"),
        ({"grids": "a,b"}, "grids", "grid sizes"),
        ({"grids": [2, 2]}, "grids", "repeat"),
        ({"grids": []}, "grids", "1 to 4"),
        ({"grids": 3}, "grids", "list"),
        ({"overlap": 0.9}, "overlap", "[0.0, 0.5]"),
        ({"overlap": "x"}, "overlap", "number"),
        ({"method": "magic"}, "method", "relevance, random, overview, all, given"),
        ({"method": "given"}, "boxes", "needs boxes"),
        ({"boxes": [[0, 0, 5, 5]]}, "boxes", "only used with method 'given'"),
        ({"method": "given", "boxes": [[5, 0, 5, 5]]}, "boxes", "x1 > x0"),
        ({"method": "given", "boxes": [[0, 0, 5]]}, "boxes", "[x0, y0, x1, y1]"),
        ({"method": "given", "boxes": [[0, 0, 5.5, 5]]}, "boxes", "integers"),
        ({"method": "given", "boxes": [[0, 0, 5, 5]] * 4}, "boxes", "at most 3 crops"),
        ({"method": "given", "boxes": "0,0,5,5"}, "boxes", "1 to 8 boxes"),
        ({"bogus": 1}, "bogus", "unknown"),
    ],
)
def test_request_values_refused_with_field_named(overrides, field, words):
    with pytest.raises(SemClipConfigError) as info:
        SemClipConfig(max_topk=3).replace(overrides, request=True)
    assert info.value.parameter == field
    assert words in str(info.value)


@pytest.mark.parametrize("field", ["relevance_model", "relevance_pretrained", "relevance_precision", "device", "max_topk"])
def test_server_only_fields_refused_per_request(field):
    with pytest.raises(SemClipConfigError, match="fixed when the server starts"):
        SemClipConfig().replace({field: "cpu" if field != "max_topk" else 2}, request=True)


def test_request_cannot_exceed_profiled_crops():
    server = SemClipConfig(topk=1, max_topk=3)
    assert server.replace({"topk": 3}, request=True).num_crops == 3
    with pytest.raises(SemClipConfigError, match="at most 3") as info:
        server.replace({"topk": 4}, request=True)
    assert info.value.parameter == "topk"
    with pytest.raises(SemClipConfigError, match="method 'all'"):
        server.replace({"method": "all"}, request=True)  # 17 crops
    assert server.replace({"method": "all", "grids": [1]}, request=True).num_crops == 1


def test_server_method_all_profiles_every_candidate():
    server = SemClipConfig(method="all")
    assert server.max_crops == 17
    assert server.replace({"method": "relevance", "topk": 8}, request=True).num_crops == 8


def test_lists_and_strings_become_tuples():
    assert SemClipConfig().replace({"grids": [3, 4]}).grids == (3, 4)
    assert SemClipConfig().replace({"grids": "2,3,4"}).grids == (2, 3, 4)
    assert SemClipConfig().replace({"overlap": 0}).overlap == 0.0


def test_from_hf_config():
    class HF:
        semclip_config = {"topk": 2, "grids": [2]}

    c = SemClipConfig.from_hf_config(HF())
    assert c.topk == 2 and c.grids == (2,)
    assert SemClipConfig.from_hf_config(object()) == SemClipConfig()

    class Bad:
        semclip_config = {"topk": 11}

    with pytest.raises(SemClipConfigError, match="topk"):
        SemClipConfig.from_hf_config(Bad())


def test_the_bundled_llava_names_its_psi_in_its_own_config(model_dir):
    """The core has no default ψ: the bundled LLaVA's config.json names it, relative to its directory."""
    from vllm_semclip.tiny.bundled import DEFAULT_RELEVANCE_DIR

    assert SemClipConfig().relevance_model is None
    assert SemClipConfig.from_hf_config(object(), model_dir).relevance_model == str(DEFAULT_RELEVANCE_DIR)


def test_hf_overrides_merge_over_the_model_files_semclip_config(model_dir):
    """vLLM's --hf-overrides replaces the semclip_config mapping whole; the file's ψ still applies."""
    from vllm_semclip.tiny.bundled import DEFAULT_RELEVANCE_DIR

    class HF:
        semclip_config = {"topk": 2}

    c = SemClipConfig.from_hf_config(HF(), model_dir)
    assert c.topk == 2 and c.relevance_model == str(DEFAULT_RELEVANCE_DIR)

    class Named:
        semclip_config = {"relevance_model": "ViT-B-16", "relevance_pretrained": "openai"}

    assert SemClipConfig.from_hf_config(Named(), model_dir).relevance_model == "ViT-B-16"


def test_a_relative_psi_path_resolves_beside_the_model_only_when_it_is_there(tmp_path, monkeypatch):
    (tmp_path / "model" / "psi").mkdir(parents=True)
    (tmp_path / "model" / "config.json").write_text(json.dumps({"semclip_config": {"relevance_model": "psi"}}))
    (tmp_path / "cwd" / "psi").mkdir(parents=True)
    assert resolve_relevance_model("psi", tmp_path / "model") == str((tmp_path / "model" / "psi").resolve())
    assert SemClipConfig.from_hf_config(object(), tmp_path / "model").relevance_model == \
        str((tmp_path / "model" / "psi").resolve())
    assert resolve_relevance_model("ViT-B-16", tmp_path / "model") == "ViT-B-16"  # a name stays a name
    assert resolve_relevance_model(None, tmp_path / "model") is None
    monkeypatch.chdir(tmp_path / "cwd")
    assert resolve_relevance_model("psi", tmp_path / "model") == "psi"  # a path from the working directory wins


def test_selecting_with_psi_needs_a_named_psi(photo):
    from vllm_semclip.selection import select_crops

    with pytest.raises(SemClipConfigError, match="relevance_model is not set.*--relevance-model") as err:
        select_crops(photo, "What is the color of the flag?", SemClipConfig())
    assert err.value.parameter == "relevance_model"
    assert select_crops(photo, "What is the color of the flag?", SemClipConfig(method="random")).boxes  # no ψ needed


def test_given_boxes_become_the_crops_clipped_to_the_image():
    from PIL import Image

    from vllm_semclip.selection import select_crops

    config = SemClipConfig(max_topk=3).replace({"method": "given", "boxes": [[10, 20, 110, 80], [50, 50, 9999, 9999]]},
                                               request=True)
    assert config.num_crops == 2 and config.boxes == ((10, 20, 110, 80), (50, 50, 9999, 9999))
    sel = select_crops(Image.new("RGB", (300, 200)), "anything", config)
    assert sel.boxes == [(10, 20, 110, 80), (50, 50, 300, 200)]
    assert config.selection_key() != config.replace({"boxes": [[0, 0, 5, 5]]}).selection_key()


@pytest.mark.parametrize("field, default, other, bad, allowed", [
    ("relevance_fit", "windows", "pad", "stretch", "windows, pad, center"),
    ("relevance_norm", "grid", "none", "softmax", "grid, none"),
])
def test_how_psi_scores_and_ranks_is_a_per_request_choice_in_the_cache_key(field, default, other, bad, allowed):
    assert getattr(SemClipConfig(), field) == default
    changed = SemClipConfig().replace({field: other}, request=True)  # not server-only
    assert getattr(changed, field) == other and changed.selection_key() != SemClipConfig().selection_key()
    with pytest.raises(SemClipConfigError) as info:
        SemClipConfig().replace({field: bad}, request=True)
    assert info.value.parameter == field and allowed in str(info.value)


def test_relevance_precision_takes_open_clip_values():
    assert SemClipConfig().relevance_precision == "fp32"
    assert SemClipConfig(relevance_precision="bf16").selection_key() != SemClipConfig().selection_key()
    with pytest.raises(SemClipConfigError) as info:
        SemClipConfig().replace({"relevance_precision": "int4"}, source="command line")
    assert info.value.parameter == "relevance_precision"
    assert "fp32, bf16, fp16, pure_bf16, pure_fp16" in str(info.value)


def test_a_request_may_reshape_its_grids_within_the_servers_candidate_cap():
    server = SemClipConfig(relevance_model=PSI_NAME)  # grids [2, 3]: 13 cells + 4 bridges
    assert server.candidate_cap == 17
    assert server.replace({"grids": [3, 2]}, request=True).num_candidates == 17
    assert server.replace({"grids": [3]}, request=True).num_candidates == 9
    assert server.replace({"grids": [4], "bridges": False}, request=True).num_candidates == 16
    with pytest.raises(SemClipConfigError, match=r"grids \[5, 6, 7, 8\] make 174 candidates.*at most 17 \(max_candidates\)") as err:
        server.replace({"grids": [5, 6, 7, 8]}, request=True)
    assert err.value.parameter == "grids"
    with pytest.raises(SemClipConfigError, match="at most 17"):
        server.replace({"grids": [4, 2]}, request=True)  # 16 + 4 cells + bridges > 17
    assert server.replace({"grids": [8], "method": "overview"}, request=True).num_crops == 0  # nothing to score
    wider = SemClipConfig(max_candidates=30)
    assert wider.replace({"grids": [4, 3], "bridges": False}, request=True).num_candidates == 25
    with pytest.raises(SemClipConfigError, match="fixed when the server starts"):
        server.replace({"max_candidates": 200}, request=True)
    for bad in (0, 175, 2.5, "13", True):
        with pytest.raises(SemClipConfigError, match="max_candidates"):
            SemClipConfig(max_candidates=bad)
