"""The pieces a training run relies on, checked without training: the save requests from signals and the
clock, resume fingerprints, the shared precheck cache and its worker pool, and the run settings' checks
(trackers, held-out data, stage references in projector_from)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from vistune.config import load_config
from vistune.errors import ConfigError


def test_ctrl_c_asks_for_a_save_and_a_second_one_stops_at_once() -> None:
    from vistune.train.signals import SaveClock, StopRequests

    before = signal.getsignal(signal.SIGINT)
    with StopRequests() as requests:
        clock = SaveClock(None, None, None, requests)
        assert clock.due(1, lambda t: t) == (False, None)
        os.kill(os.getpid(), signal.SIGINT)
        assert requests.signum == signal.SIGINT
        assert clock.due(2, lambda t: t) == (True, signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored after training
    with StopRequests() as requests:  # SLURM's warning ahead of a time limit (--signal=USR1@120)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert SaveClock(None, None, None, requests).due(3, lambda t: t) == (True, signal.SIGUSR1)


def test_saves_by_the_clock_by_default(tmp_path: Path, clip_dir: Path, llama_dir: Path) -> None:
    from vistune.train.signals import SaveClock, StopRequests

    cfg = load_config(data={"model": {"vision": {"path": "v"}, "llm": {"path": "l"}}, "stages": {"s": {
        "data": {"path": "d.json"}, "output_dir": "o", "global_batch_size": 1, "micro_batch_size": 1, "lr": 1}}})
    assert cfg.stages["s"].save_every is None and cfg.stages["s"].save_every_minutes == 30  # bounded lost work
    clock = SaveClock(None, 1e-9, None, StopRequests())
    assert clock.due(1, lambda t: t) == (True, None)
    clock.saved()
    assert SaveClock(None, 60, None, StopRequests()).due(1, lambda t: t) == (False, None)


def test_fingerprints_compare_what_both_sides_record() -> None:
    from vistune.train.provenance import differences

    old = {"stage": {"lr": 1e-3, "gone": 1}, "data": {"samples": 4}, "world_size": 2}
    new = {"stage": {"lr": 1e-3, "added_later": True}, "data": {"samples": 5}, "world_size": 1}
    assert differences(old, new) == ["data.samples: 4 -> 5"]  # not the process count, not fields of other versions


def test_precheck_is_computed_once_and_shared(tmp_path: Path) -> None:
    """The first process of a machine checks and writes the cache; the others only read it; a rerun under the
    same key reuses it, another key recomputes."""
    from vistune.data.precheck import shared_outcomes

    calls: list[int] = []
    expected = [(5, None, "", 0), (0, "unreadable image", "sample b: image x cannot be read", 0)]

    def compute() -> list:
        calls.append(1)
        return list(expected)

    cache = tmp_path / ".precheck.json"
    waited: list[int] = []
    first = shared_outcomes(compute, cache, "k1", local_main=True, barrier=lambda: waited.append(1))
    other = shared_outcomes(lambda: pytest.fail("a non-first process must not check"), cache, "k1",
                            local_main=False, barrier=lambda: None)
    assert first == other == expected and len(calls) == 1 and waited == [1]
    shared_outcomes(compute, cache, "k1", local_main=True, barrier=lambda: None)
    assert len(calls) == 1  # reused
    shared_outcomes(compute, cache, "k2", local_main=True, barrier=lambda: None)
    assert len(calls) == 2


def test_precheck_pool_gives_the_serial_result(dataset_dir: Path, bpe_tokenizer: Path) -> None:
    from transformers import AutoTokenizer

    from vistune.chat.encode import ChatEncoder
    from vistune.chat.formats import get_format
    from vistune.data.precheck import check_samples
    from vistune.data.records import Problems, load_samples

    samples = load_samples(dataset_dir / "train.json", dataset_dir / "images", False, Problems())
    encoder = ChatEncoder(AutoTokenizer.from_pretrained(bpe_tokenizer), get_format("chat_template"), 16, 64)
    serial = check_samples(samples, encoder, verify_images=True)
    pooled = check_samples(samples, encoder, workers=2, pool_min=4, verify_images=True)
    assert pooled == serial and any(cut for *_, cut in serial)  # 64 tokens cut some replies


def test_report_to_is_checked() -> None:
    from vistune.train.tracking import accelerator_kwargs

    data = {"model": {"vision": {"path": "v"}, "llm": {"path": "l"}}, "stages": {"s": {
        "data": {"path": "d.json"}, "output_dir": "o", "global_batch_size": 1, "micro_batch_size": 1, "lr": 1}}}
    assert load_config(data=data).stages["s"].report_to == ["tensorboard"]  # the default
    assert load_config(data=data, overrides=["stages.s.report_to=none"]).stages["s"].report_to == []
    assert load_config(data=data, overrides=["stages.s.tensorboard=false"]).stages["s"].report_to == []
    with pytest.raises(ConfigError, match="unknown tracker.*'tensorbord'.*valid: .*mlflow.*tensorboard.*wandb"):
        load_config(data=data, overrides=["stages.s.report_to=[tensorbord]"])
    with pytest.raises(ConfigError, match=r"report_to: \['wandb'\] is not installed \(pip install wandb\)"):
        accelerator_kwargs(["wandb"], Path("o"))


def test_val_path_and_fraction_exclude_each_other() -> None:
    data = {"model": {"vision": {"path": "v"}, "llm": {"path": "l"}}, "stages": {"s": {
        "data": {"path": "d.json", "val_path": "v.json", "val_fraction": 0.1}, "output_dir": "o",
        "global_batch_size": 1, "micro_batch_size": 1, "lr": 1}}}
    with pytest.raises(ConfigError, match="data.val_path or data.val_fraction, not both"):
        load_config(data=data)


def test_projector_from_names_an_earlier_stage_and_follows_its_output_dir() -> None:
    data = {"model": {"vision": {"path": "v"}, "llm": {"path": "l"}}, "stages": {
        "align": {"data": {"path": "a.json"}, "output_dir": "runs/x/align", "global_batch_size": 1,
                  "micro_batch_size": 1, "lr": 1},
        "finetune": {"projector_from": "align", "data": {"path": "f.json"}, "output_dir": "runs/x/ft",
                     "global_batch_size": 1, "micro_batch_size": 1, "lr": 1}}}
    cfg = load_config(data=json.loads(json.dumps(data)), overrides=["stages.align.output_dir=/scratch/align"])
    assert cfg.stages["finetune"].projector_from == "/scratch/align"
    from vistune.config import RunConfig

    built = RunConfig.model_validate(json.loads(json.dumps(data)))  # built directly: run() resolves it
    assert built.stages["finetune"].projector_from == "align"
    assert built.resolved().stages["finetune"].projector_from == "runs/x/align"
    data["stages"] = {"finetune": data["stages"]["finetune"], "align": data["stages"]["align"]}
    with pytest.raises(ConfigError, match="projector_from names stage 'align', which does not run before it"):
        load_config(data=data)
