"""End-to-end training on tiny models: what trains per stage, stage chaining, falling loss, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vistune.config import load_config
from vistune.model.checkpoint import load_checkpoint, read_spec
from vistune.model.projector import build_projector
from vistune.train.loop import run, train_stage


def stage(data_dir: Path, out: Path, **kw) -> dict:
    base = {
        "data": {"path": str(data_dir / "train.json"), "image_folder": str(data_dir / "images")},
        "format": "chat_template", "output_dir": str(out), "max_steps": 4, "global_batch_size": 4,
        "micro_batch_size": 2, "lr": 1e-3, "precision": "fp32", "warmup_ratio": 0.0, "tensorboard": False,
    }
    for k, v in kw.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and k in base else v
    return base


def config(clip_dir: Path, llama_dir: Path, stages: dict) -> dict:
    return {"model": {"vision": {"path": str(clip_dir)}, "llm": {"path": str(llama_dir)}, "projector": "mlp2x_gelu"},
            "stages": stages}


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory: pytest.TempPathFactory, clip_dir: Path, llama_dir: Path, dataset_dir: Path) -> dict:
    """An align run then a finetune run from its projector, as in LLaVA-1.5 (LoRA in stage 2)."""
    root = tmp_path_factory.mktemp("two_stage")
    align = stage(dataset_dir, root / "align", format="plain", max_steps=12, lr=3e-3, save_frozen=False,
                  data={"path": str(dataset_dir / "align.json")})
    finetune = stage(dataset_dir, root / "finetune", projector_from="align", max_steps=12, lr=1e-2,
                     parts={"projector": "full", "llm": "lora"}, lora={"r": 8, "alpha": 16, "dropout": 0.0},
                     tensorboard=True)
    cfg = load_config(data=config(clip_dir, llama_dir, {"align": align, "finetune": finetune}))
    outputs = run(cfg)
    return {"root": root, "outputs": outputs, "llama_dir": llama_dir, "clip_dir": clip_dir}


def test_align_trains_only_the_projector(two_stage: dict) -> None:
    out = two_stage["outputs"]["align"]
    spec = read_spec(out)
    assert spec.conversation_format == "plain" and spec.llm_adapter is None
    # save_frozen: false -> frozen parts recorded by absolute path, not copied (LLaVA's stage-1 output)
    assert not (out / "llm").exists() and not (out / "vision").exists()
    assert Path(spec.llm.path).is_absolute()
    # the projector changed from its seeded initialisation; nothing else was saved as trained
    torch.manual_seed(42)
    init = build_projector("mlp2x_gelu", 32, 64)
    trained = load_file(str(out / "projector.safetensors"))
    assert any(not torch.equal(trained[k], v) for k, v in init.state_dict().items()), "projector did not train"


@pytest.mark.parametrize("name,min_drop", [
    # Align trains only the projector in front of a random frozen LLM: little to gain, but it must fall.
    ("align", 0.05),
    ("finetune", 0.3),
])
def test_loss_falls_in_both_stages(two_stage: dict, name: str, min_drop: float) -> None:
    ls = losses(two_stage["outputs"][name])
    assert len(ls) == 12
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3 - min_drop, f"{name} loss did not fall enough: {ls}"


def test_finetune_output_is_self_describing(two_stage: dict) -> None:
    out = two_stage["outputs"]["finetune"]
    spec = read_spec(out)
    assert spec.conversation_format == "chat_template" and spec.llm_adapter == "llm_adapter"
    assert spec.vision.path == "vision"  # save_frozen (default) copies the frozen tower
    # A LoRA run saves its adapter and refers to the base LLM by path (no copy of the base per run).
    assert Path(spec.llm.path) == two_stage["llama_dir"].resolve() and not (out / "llm").exists()
    assert (out / "llm_adapter" / "adapter_model.safetensors").is_file()
    assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "image_processor").is_dir()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # no pickle in a model folder
    assert list((out / "tensorboard").iterdir()), "no TensorBoard event file"
    # it loads from the folder alone, wherever the sources are
    assert load_checkpoint(out).model.num_image_tokens == 16


def test_finetune_starts_from_the_align_projector(tmp_path: Path, two_stage: dict, dataset_dir: Path) -> None:
    """With the projector frozen in stage 2, the result's projector is exactly stage 1's."""
    out = tmp_path / "ft"
    st = stage(dataset_dir, out, projector_from=str(two_stage["outputs"]["align"]), max_steps=1,
               parts={"projector": "frozen", "llm": "full"}, save_frozen=False)
    cfg = load_config(data=config(two_stage["clip_dir"], two_stage["llama_dir"], {"ft": st}))
    train_stage(cfg.model, cfg.stages["ft"], "ft")
    a = load_file(str(two_stage["outputs"]["align"] / "projector.safetensors"))
    b = load_file(str(out / "projector.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "llm" / "model.safetensors").is_file()  # a fully trained LLM is always saved


def test_completed_stage_is_skipped(two_stage: dict, clip_dir: Path, llama_dir: Path, dataset_dir: Path) -> None:
    out = two_stage["outputs"]["align"]
    before = (out / "projector.safetensors").stat().st_mtime_ns
    cfg = load_config(data=config(clip_dir, llama_dir, {"align": stage(dataset_dir, out, format="plain")}))
    assert run(cfg) == {"align": out}
    assert (out / "projector.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize("llm_mode", ["lora", "full"])
def test_resume_gives_the_same_weights(tmp_path: Path, clip_dir: Path, llama_dir: Path, dataset_dir: Path,
                                       llm_mode: str) -> None:
    """Stopped after step 3 and resumed, a run ends with exactly the weights of an uninterrupted run.
    LoRA dropout is on, so the RNG state must be restored too; 6 steps of 2 micro-batches cross an epoch."""
    def make(out: Path, **kw) -> dict:
        return stage(dataset_dir, out, max_steps=6, parts={"projector": "full", "llm": llm_mode},
                     lora={"r": 4, "alpha": 8, "dropout": 0.1}, save_frozen=False, **kw)

    cfg = load_config(data=config(clip_dir, llama_dir, {"a": make(tmp_path / "a"),
                                                        "b": make(tmp_path / "b", stop_after_steps=3)}))
    train_stage(cfg.model, cfg.stages["a"], "a")
    assert train_stage(cfg.model, cfg.stages["b"], "b") is None  # stopped early
    assert not (tmp_path / "b" / "vistune.json").exists()
    resumed = cfg.stages["b"].model_copy(update={"stop_after_steps": None})
    assert train_stage(cfg.model, resumed, "b") == tmp_path / "b"

    def weights(out: Path) -> dict[str, torch.Tensor]:
        w = dict(load_file(str(out / "projector.safetensors")))
        for f in (out / "llm_adapter").glob("*.safetensors") if llm_mode == "lora" else (out / "llm").glob("*.safetensors"):
            w.update({f"llm.{k}": v for k, v in load_file(str(f)).items()})
        return w

    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and len(wa) > 4
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_skip_and_count_reports_at_the_end(tmp_path: Path, clip_dir: Path, llama_dir: Path, dataset_dir: Path) -> None:
    records = json.loads((dataset_dir / "train.json").read_text())
    records[0]["image"] = "missing.png"
    records[1]["conversations"] = []
    (tmp_path / "d.json").write_text(json.dumps(records))
    st = stage(dataset_dir, tmp_path / "out", max_steps=2, save_frozen=False,
               data={"path": str(tmp_path / "d.json"), "on_bad_sample": "skip"})
    cfg = load_config(data=config(clip_dir, llama_dir, {"s": st}))
    train_stage(cfg.model, cfg.stages["s"], "s")
    report = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert report["total"] == 2 and report["counts"] == {"missing image file": 1, "no conversations": 1}


def test_bf16_lora_stage_runs(tmp_path: Path, clip_dir: Path, llama_dir: Path, dataset_dir: Path) -> None:
    st = stage(dataset_dir, tmp_path / "bf16", max_steps=2, precision="bf16", gradient_checkpointing=True,
               parts={"projector": "full", "llm": "lora"}, lora={"r": 4, "alpha": 8}, save_frozen=False)
    cfg = load_config(data=config(clip_dir, llama_dir, {"s": st}))
    train_stage(cfg.model, cfg.stages["s"], "s")
    ls = losses(tmp_path / "bf16")
    assert len(ls) == 2 and all(0 < x < 20 for x in ls)


def test_stages_of_different_precision_run_in_one_process(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                                           dataset_dir: Path) -> None:
    """align in fp32 then finetune in bf16, in one `run` (one `vistune train`): accelerate's process-wide
    state must not keep the first stage's mixed precision (it used to raise at stage 2)."""
    align = stage(dataset_dir, tmp_path / "align", format="plain", max_steps=1, save_frozen=False,
                  data={"path": str(dataset_dir / "align.json")})
    finetune = stage(dataset_dir, tmp_path / "finetune", max_steps=1, precision="bf16", save_frozen=False,
                     projector_from=str(tmp_path / "align"), parts={"projector": "full", "llm": "lora"},
                     lora={"r": 4, "alpha": 8})
    again = stage(dataset_dir, tmp_path / "again", format="plain", max_steps=1, save_frozen=False,
                  data={"path": str(dataset_dir / "align.json")})
    cfg = load_config(data=config(clip_dir, llama_dir, {"align": align, "finetune": finetune, "again": again}))
    assert list(run(cfg)) == ["align", "finetune", "again"]


def test_loader_workers_do_not_change_the_run(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                              dataset_dir: Path) -> None:
    """Tokenizing and loading images in worker processes gives the same losses as in the main process."""
    runs = []
    for workers in (0, 2):
        st = stage(dataset_dir, tmp_path / f"w{workers}", max_steps=3, save_frozen=False, data={"num_workers": workers})
        cfg = load_config(data=config(clip_dir, llama_dir, {"s": st}))
        train_stage(cfg.model, cfg.stages["s"], "s")
        runs.append(losses(tmp_path / f"w{workers}"))
    assert runs[0] == runs[1] and len(runs[0]) == 3


def test_a_bad_label_stops_the_run_before_the_first_step(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                                           dataset_dir: Path) -> None:
    from vistune.errors import DataError

    records = json.loads((dataset_dir / "train.json").read_text())
    records[-1]["conversations"][1]["value"] = "broken <|im_end|> reply"  # the last sample the loader would reach
    (tmp_path / "d.json").write_text(json.dumps(records))
    st = stage(dataset_dir, tmp_path / "out", max_steps=2, save_frozen=False, data={"path": str(tmp_path / "d.json")})
    cfg = load_config(data=config(clip_dir, llama_dir, {"s": st}))
    with pytest.raises(DataError, match=f"sample {records[-1]['id']}: the supervised tokens decode to"):
        train_stage(cfg.model, cfg.stages["s"], "s")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
