"""Session-wide pytest setup: offline Hugging Face, the `gpu` marker, and tiny checkpoint fixtures.

Every fixture here builds its folder once per test session (with the builders in `vistune.testing`)
under pytest's tmp_path_factory, and hands out the folder's Path. Tests must treat these folders as
read-only: they are shared by the whole session. A test that wants to modify a checkpoint should
copy it first (`shutil.copytree(llama_dir, tmp_path / "llm")`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Set before anything imports transformers / huggingface_hub, which read them at import time:
# tests must never reach for the Hub (there is no network), and the Rust tokenizers' thread pool
# must not warn (or deadlock) when DataLoader workers fork.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402

# The helper modules beside this file (eval_fixtures.py, servers.py, ...) are imported by plain name;
# make that work whatever pytest's import mode is (importlib mode does not put test folders on sys.path).
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from vistune.testing import (  # noqa: E402
    build_bpe_tokenizer,
    build_clip,
    build_dataset,
    build_llama,
    build_siglip_vision,
    build_spm_tokenizer,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` on machines without CUDA (the marker is declared in pyproject.toml)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch  # only here: a run that selects no gpu test does not pay for importing torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Byte-level BPE tokenizer folder, ChatML template, no automatic BOS (SmolLM2/Qwen style)."""
    return build_bpe_tokenizer(tmp_path_factory.mktemp("bpe_tokenizer"))


@pytest.fixture(scope="session")
def spm_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama-style Metaspace BPE tokenizer folder that prepends `<s>`; no chat template."""
    return build_spm_tokenizer(tmp_path_factory.mktemp("spm_tokenizer"))


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two-tower CLIPModel folder + CLIPImageProcessor: 32x32 input, patch 8, width 32 (17 tokens)."""
    return build_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SiglipVisionModel folder + SiglipImageProcessor: 32x32 input, patch 8, width 32 (16 tokens)."""
    return build_siglip_vision(tmp_path_factory.mktemp("siglip"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer: Path) -> Path:
    """Tiny LlamaForCausalLM folder with the BPE/ChatML tokenizer saved beside it."""
    return build_llama(tmp_path_factory.mktemp("llama"), bpe_tokenizer)


@pytest.fixture(scope="session")
def llama_spm_dir(tmp_path_factory: pytest.TempPathFactory, spm_tokenizer: Path) -> Path:
    """Tiny LlamaForCausalLM folder with the Llama-style (BOS-adding, no template) tokenizer."""
    return build_llama(tmp_path_factory.mktemp("llama_spm"), spm_tokenizer)


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLaVA-format dataset: images/, train.json (12 image + 4 text-only records), align.json."""
    return build_dataset(tmp_path_factory.mktemp("dataset"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, clip_dir: Path, llama_dir: Path,
                    dataset_dir: Path) -> Path:
    """A finished vistune checkpoint (chat_template format, full LLM) from a few finetune steps."""
    from vistune.config import load_config
    from vistune.train.loop import train_stage

    out = tmp_path_factory.mktemp("tiny_checkpoint") / "model"
    cfg = load_config(data={
        "model": {"vision": {"path": str(clip_dir)}, "llm": {"path": str(llama_dir)}, "projector": "mlp2x_gelu"},
        "stages": {"finetune": {
            "parts": {"projector": "full", "llm": "full"},
            "data": {"path": str(dataset_dir / "train.json"), "image_folder": str(dataset_dir / "images")},
            "format": "chat_template", "output_dir": str(out), "max_steps": 40, "global_batch_size": 4,
            "micro_batch_size": 4, "lr": 3e-3, "precision": "fp32", "tensorboard": False,
        }},
    })
    train_stage(cfg.model, cfg.stages["finetune"], "finetune")
    return out
