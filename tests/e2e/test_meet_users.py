"""Issue 21: what users arriving from LLaVA's scripts, LLaMA-Factory, TRL, lmms-eval and the HF Trainer do
every day: eval replies never credited to another model, --limit on the demo, any model folder
everywhere, their data layouts and config names, the Python API, quiet loads, chat's image check."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import eval_fixtures
import pytest
import torch

import vistune
from vistune.cli import main
from vistune.errors import DataError

# --- item 1: eval replies are keyed by the model --------------------------------------------------------


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaldata")
    eval_fixtures.pope(root / "pope")
    return root


@pytest.fixture(scope="module")
def other_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another model folder (a copy elsewhere: another path, so another model as far as eval knows)."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path_factory.mktemp("other") / "model"))


def test_eval_refuses_another_models_cached_replies(tiny_checkpoint: Path, other_checkpoint: Path,
                                                    eval_data: Path, tmp_path: Path) -> None:
    from vistune.eval.run import run_eval

    out = tmp_path / "ev"
    run_eval(["pope"], tiny_checkpoint, eval_data, out, batch_size=4, max_new_tokens=3)
    with pytest.raises(DataError, match="another model"):
        run_eval(["pope"], other_checkpoint, eval_data, out, batch_size=4, max_new_tokens=3)
    # Rescoring without a model keeps crediting the model that wrote the replies.
    run_eval(["pope"], None, eval_data, out)
    assert json.loads((out / "metrics.json").read_text())["pope"]["model"] == str(tiny_checkpoint.resolve())
    # The same model again resumes (nothing to generate, no refusal); other settings are refused.
    run_eval(["pope"], tiny_checkpoint, eval_data, out, batch_size=4, max_new_tokens=3)
    with pytest.raises(DataError, match="max_new_tokens"):
        run_eval(["pope"], tiny_checkpoint, eval_data, out, batch_size=4, max_new_tokens=5)


def test_model_identity_follows_the_weights(other_checkpoint: Path, tmp_path: Path) -> None:
    from vistune.infer.load import model_identity

    folder = Path(shutil.copytree(other_checkpoint, tmp_path / "m"))
    before = model_identity(folder)
    assert model_identity(folder) == before
    (folder / "checkpoints").mkdir()  # resume checkpoints beside a finished model are not the model
    (folder / "checkpoints" / "trainable.safetensors").write_bytes(b"x")
    assert model_identity(folder) == before
    projector = folder / "projector.safetensors"
    projector.write_bytes(projector.read_bytes())  # retrained in place: rewritten weights
    assert model_identity(folder).fingerprint != before.fingerprint


# --- item 4: --limit keeps both passes of a task asked twice ------------------------------------------------

def test_eval_demo_with_limit_scores_both_passes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from vistune.demo.world import build_world
    from vistune.eval.run import run_eval
    from vistune.infer.engine import Engine

    world = tmp_path / "world"
    build_world(world, {"train": 2, "test": 10}, seed=0)
    m = run_eval(["demo"], None, world, tmp_path / "out", batch_size=8, limit=3,
                 engine=Engine.load(tiny_checkpoint, device="cpu"))["demo"]
    assert m["n"] == 3
    ids = [json.loads(x)["id"] for x in (tmp_path / "out" / "demo" / "predictions.jsonl").read_text().splitlines()]
    assert [i.split("/")[0] for i in ids[:3]] == [i.split("/")[0] for i in ids[3:]]  # the same questions, blind


# --- item 7: every command takes any model folder ---------------------------------------------------------

def test_missing_model_folder_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["ask", str(tmp_path / "nope"), "What is it?"], ["info", str(tmp_path / "nope")],
                    ["eval", "pope", "--model", str(tmp_path / "nope"), "--data", str(tmp_path), "--out",
                     str(tmp_path / "ev")]):
        assert main(command) == 2
        assert f"model folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def test_ask_and_eval_take_a_llava_hf_folder(tiny_checkpoint: Path, dataset_dir: Path, eval_data: Path,
                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(tiny_checkpoint), str(tmp_path / "hf"), "--to", "llava-hf"]) == 0
    img = dataset_dir / "images" / "img_0.png"
    capsys.readouterr()
    assert main(["ask", str(tmp_path / "hf"), "--image", str(img), "--max-new-tokens", "6", "What colour?"]) == 0
    expected = vistune.load(str(tiny_checkpoint)).ask(img, "What colour?", max_new_tokens=6)
    assert capsys.readouterr().out == expected + "\n"
    assert main(["eval", "pope", "--model", str(tmp_path / "hf"), "--data", str(eval_data), "--out",
                 str(tmp_path / "ev"), "--max-new-tokens", "3"]) == 0
    assert (tmp_path / "ev" / "pope" / "predictions.jsonl").is_file()


def test_ask_takes_an_original_llava_folder(tiny_checkpoint: Path, clip_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """LlavaLlamaForCausalLM's layout (as LLaVA's train.py saves it), the tower named by hub id."""
    from safetensors.torch import save_file

    from vistune.model.checkpoint import load_checkpoint

    bundle = load_checkpoint(tiny_checkpoint)
    src = tmp_path / "llava-v1.5-tiny"
    src.mkdir()
    state = dict(bundle.model.llm.state_dict())
    state |= {f"model.mm_projector.{k}": v for k, v in bundle.model.projector.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(src / "model.safetensors"))
    config = bundle.model.llm.config.to_dict() | {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": bundle.spec.projector,
        "mm_vision_select_layer": bundle.spec.vision.select_layer, "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False, "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat"}
    (src / "config.json").write_text(json.dumps(config))
    bundle.tokenizer.save_pretrained(str(src))
    assert main(["ask", str(src), "What is it?", "--max-new-tokens", "3"]) == 2
    assert "pass --vision with a local copy" in capsys.readouterr().err
    assert main(["ask", str(src), "What is it?", "--max-new-tokens", "3", "--vision", str(clip_dir)]) == 0
    loaded = vistune.load(str(src), device="cpu", vision=str(clip_dir)).model.projector.state_dict()
    for key, value in bundle.model.projector.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_a_mid_run_step_checkpoint_can_be_asked(clip_dir: Path, llama_dir: Path, dataset_dir: Path,
                                                tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from vistune.config import load_config
    from vistune.train.loop import train_stage

    out = tmp_path / "lora"
    cfg = load_config(data={
        "model": {"vision": {"path": str(clip_dir)}, "llm": {"path": str(llama_dir)}, "projector": "mlp2x_gelu"},
        "stages": {"finetune": {
            "parts": {"projector": "full", "llm": "lora"}, "lora": {"r": 4, "alpha": 8},
            "data": {"path": str(dataset_dir / "train.json"), "image_folder": str(dataset_dir / "images")},
            "format": "chat_template", "output_dir": str(out), "max_steps": 4, "global_batch_size": 4,
            "micro_batch_size": 4, "lr": 3e-3, "precision": "fp32", "tensorboard": False,
            "save_every": 2, "stop_after_steps": 2}}})
    assert train_stage(cfg.model, cfg.stages["finetune"], "finetune") is None
    step = out / "checkpoints" / "step-000002"
    engine = vistune.load(str(step), device="cpu")
    state = engine.model.state_dict()
    for name, saved in load_file(str(step / "trainable.safetensors")).items():
        assert torch.equal(state[name], saved), name
    assert engine.bundle.spec.provenance["steps"] == 2
    assert isinstance(engine.ask(dataset_dir / "images" / "img_0.png", "What colour?", max_new_tokens=3), str)


# --- item 11: the Python API and ask's empty reply ---------------------------------------------------------

def test_sampling_at_top_level_and_as_keywords(tiny_checkpoint: Path, dataset_dir: Path) -> None:
    from vistune.infer.rows import Sampling

    assert vistune.Sampling is Sampling
    engine = vistune.load(str(tiny_checkpoint), device="cpu")
    img = dataset_dir / "images" / "img_1.png"
    assert engine.ask(img, "What colour?", max_new_tokens=4, temperature=0.7, seed=3) == \
        engine.ask(img, "What colour?", vistune.Sampling(max_new_tokens=4, temperature=0.7, seed=3))
    with pytest.raises(TypeError, match="max_tokens"):
        engine.ask(img, "What colour?", max_tokens=4)


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"vistune {vistune.__version__}"


class _SilentEngine:
    """An engine whose model ends its turn at once."""

    def generate(self, convs, images, sampling):  # noqa: ANN001, ANN201
        return [""] * len(convs)


def test_an_empty_reply_prints_a_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    import vistune.infer.engine as engine_module

    monkeypatch.setattr(engine_module, "load", lambda *a, **k: _SilentEngine())
    assert main(["ask", str(tmp_path), "What is it?"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "\n" and "ended its turn at once" in captured.err


# --- item 12: the HF names people type, and lmms-eval's --tasks --------------------------------------------


def test_eval_takes_tasks_as_a_flag(eval_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ev"
    (out / "pope").mkdir(parents=True)
    from vistune.eval.tasks import get_task

    replies = {it.id: "Yes" for it in get_task("pope").load(eval_data / "pope")}
    (out / "pope" / "predictions.jsonl").write_text("".join(json.dumps({"id": k, "prompt": "", "reply": v}) + "\n"
                                                            for k, v in replies.items()))
    assert main(["eval", "--tasks", "pope", "--data", str(eval_data), "--out", str(out)]) == 0
    assert "| pope |" in capsys.readouterr().out
    assert main(["eval", "pope", "--tasks", "pope", "--data", str(eval_data), "--out", str(out)]) == 2


# --- item 14: chat checks its images before it starts -------------------------------------------------------

def test_chat_checks_images_at_start(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is it?\n\n"))
    assert main(["chat", str(tiny_checkpoint), "--image", str(tmp_path / "nope.png")]) == 2
    captured = capsys.readouterr()
    assert "vistune chat:" not in captured.out and "nope.png: no such file" in captured.err


