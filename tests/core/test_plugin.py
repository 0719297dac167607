"""The vLLM plugin: discovered through its entry point, lazy, idempotent, version-guarded."""

import importlib.metadata
import json
import subprocess
import sys

import pytest

from vllm_semclip.plugin import ARCHITECTURE, UnsupportedVLLMVersion, check_vllm_version


def _run(code: str, **env) -> dict:
    import os

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_entry_point_declared():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    semclip = [ep for ep in eps if ep.name == "semclip"]
    assert len(semclip) == 1 and semclip[0].value == "vllm_semclip.plugin:register"


@pytest.mark.engine
def test_vllm_loads_the_plugin_by_name():
    result = _run(
        "import json, sys\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "from vllm import ModelRegistry\n"
        f"print(json.dumps({{'registered': {ARCHITECTURE!r} in ModelRegistry.get_supported_archs()}}))",
        VLLM_PLUGINS="semclip",
    )
    assert result["registered"]


@pytest.mark.engine
def test_register_is_lazy_and_idempotent():
    result = _run(
        "import json, sys\n"
        "import vllm_semclip\n"
        "light = 'torch' not in sys.modules and 'vllm' not in sys.modules\n"
        "vllm_semclip.register(); vllm_semclip.register()\n"
        "from vllm import ModelRegistry\n"
        "archs = ModelRegistry.get_supported_archs()\n"
        "print(json.dumps({'light_import': light, 'registered': "
        f"{ARCHITECTURE!r} in archs, "
        "'heavy': [m for m in ('vllm_semclip.model', 'vllm_semclip.processor', 'open_clip', "
        "'vllm.model_executor.models.llava') if m in sys.modules]}))"
    )
    assert result["light_import"], "importing vllm_semclip must not import torch or vllm"
    assert result["registered"]
    assert result["heavy"] == []


def test_registered_class_resolves_to_llava_subclass():
    from vllm import ModelRegistry
    from vllm.model_executor.models.llava import LlavaForConditionalGeneration

    import vllm_semclip

    vllm_semclip.register()
    from vllm_semclip.model import SemClipLlavaForConditionalGeneration

    assert issubclass(SemClipLlavaForConditionalGeneration, LlavaForConditionalGeneration)
    assert ModelRegistry._try_load_model_cls(ARCHITECTURE) is SemClipLlavaForConditionalGeneration


@pytest.mark.parametrize("version", ["0.31.2", "0.35.0", "1.0.0"])
def test_unsupported_vllm_version_fails_clearly(version):
    with pytest.raises(UnsupportedVLLMVersion, match=f"vLLM {version} is installed"):
        check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.32.0", "0.32.3", "0.33.0", "0.34.0", "0.34.1.dev5+gabc"])
def test_supported_versions(version):
    assert check_vllm_version(version) == version


@pytest.mark.engine
def test_installing_the_plugin_leaves_pillows_guard_on_and_serving_semclip_answers_a_bomb_with_a_400():
    """register() runs in every vLLM process, whatever it serves: Pillow's decompression-bomb limit
    stays as Pillow set it there. Where SemClip's processor is built, vLLM's image loader turns the
    bomb error into a ValueError (a 400) naming the size; Pillow's limit is still on there too."""
    result = _run(
        "import io, json\n"
        "from PIL import Image\n"
        "default = Image.MAX_IMAGE_PIXELS\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "import vllm_semclip; vllm_semclip.register()\n"
        "after_register = Image.MAX_IMAGE_PIXELS\n"
        "buf = io.BytesIO(); Image.new('1', (16000, 12000)).save(buf, 'PNG'); bomb = buf.getvalue()\n"
        "from vllm.multimodal.media.image import ImageMediaIO\n"
        "def load():\n"
        "    try:\n"
        "        ImageMediaIO().load_bytes(bomb); return 'loaded'\n"
        "    except Exception as exc:\n"
        "        return type(exc).__name__ + ': ' + str(exc)\n"
        "stock = load()\n"
        "from vllm_semclip.images import answer_oversized_images_with_400\n"
        "answer_oversized_images_with_400(); answer_oversized_images_with_400()\n"
        "semclip = load()\n"
        "try:\n"
        "    Image.open(io.BytesIO(bomb)); guard = False\n"
        "except Image.DecompressionBombError:\n"
        "    guard = True\n"
        "print(json.dumps({'default': default, 'after_register': after_register, 'stock': stock,\n"
        "                  'semclip': semclip, 'guard': guard, 'now': Image.MAX_IMAGE_PIXELS}))",
        VLLM_PLUGINS="semclip",
    )
    assert result["default"] is not None and result["after_register"] == result["default"] == result["now"]
    # vLLM's own loader, untouched by register(): the bomb error itself up to 0.33, a ValueError from 0.34
    assert result["stock"].startswith(("DecompressionBombError", "ValueError: Failed to load image"))
    assert result["semclip"].startswith("ValueError") and "192000000 pixels" in result["semclip"]
    assert result["guard"], "Pillow's guard must stay on in a process that serves SemClip"
