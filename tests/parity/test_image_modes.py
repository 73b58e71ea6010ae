"""Image modes (single / hd / anyres): token counts, tile layout, parity with LlavaNext, conversion.

`anyres` is checked against transformers' own `LlavaNextForConditionalGeneration` and
`LlavaNextProcessor` loading vistune's llava-next export unchanged; `hd` against the layout the
LLaVA-1.5 paper describes, with a "tower" whose features are the mean colour of each patch, so a
feature carries the place it was cut from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration, LlavaNextProcessor

from vistune.chat.formats import Message
from vistune.cli import main
from vistune.config import LLMConfig, VisionConfig
from vistune.convert.detect import detect
from vistune.convert.llava_hf import write_llava_hf
from vistune.errors import CheckpointError, ConfigError
from vistune.infer.engine import Engine
from vistune.model.checkpoint import Bundle, ModelSpec, build_model, load_checkpoint
from vistune.model.llm import load_tokenizer
from vistune.model.tiling import ImageLayout, ImagePreprocessor, anyres_processor, default_pinpoints
from vistune.model.vision import load_image_processor
from vistune.model.vlm import IMAGE_TOKEN_ID

PINPOINTS = [(32, 64), (64, 32), (64, 64)]  # [height, width] for the tiny 32 px CLIP: 1x2, 2x1, 2x2 tiles
SIZES = [(40, 20), (20, 40), (30, 30), (90, 50)]  # (width, height): wide, tall, square, large


def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def _bundle(clip_dir: Path, llama_dir: Path, **vision_fields: object) -> Bundle:
    vision = VisionConfig(path=str(clip_dir), **vision_fields)  # type: ignore[arg-type]
    llm = LLMConfig(path=str(llama_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(vision, llm, "mlp2x_gelu").eval()
    spec = ModelSpec(vision=vision, llm=llm, projector="mlp2x_gelu", vision_hidden_size=model.vision.hidden_size,
                     llm_hidden_size=model.llm.get_input_embeddings().embedding_dim,
                     num_image_tokens=model.num_image_tokens, conversation_format="chat_template",
                     model_max_length=1024)
    return Bundle(model, load_tokenizer(llama_dir), load_image_processor(clip_dir), spec)


# ---------------------------------------------------------------------------------------------- token counts

def test_anyres_counts_equal_transformers_processor_for_llava_next_shapes(bpe_tokenizer: Path) -> None:
    """CLIP-L/14-336 with LLaVA-NeXT's pinpoints: our count per image size is the processor's."""
    from transformers import AutoTokenizer, LlavaNextImageProcessorPil

    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    proc = LlavaNextProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(
        str(bpe_tokenizer)), patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    layout = ImageLayout.build("anyres", 336, 14, 576)
    assert [list(p) for p in layout.pinpoints] == proc.image_processor.image_grid_pinpoints
    sizes = [(336, 336), (480, 640), (640, 480), (1000, 300), (300, 1000), (37, 1500), (2000, 2001), (1, 1)]
    theirs = proc._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    assert [layout.num_tokens(h, w) for h, w in sizes] == theirs
    assert ImageLayout.build("single", 336, 14, 576).num_tokens(480, 640) == 576
    assert ImageLayout.build("hd", 336, 14, 576, hd_grid=(2, 2)).num_tokens(480, 640) == 5 * 576


def test_layout_config_errors() -> None:
    with pytest.raises(ConfigError, match="select_feature: patch"):
        ImageLayout.build("anyres", 32, 8, 17)  # CLS kept: no spatial map
    with pytest.raises(ConfigError, match="multiples"):
        ImageLayout.build("anyres", 32, 8, 16, pinpoints=[(32, 50)])
    with pytest.raises(ConfigError, match="max_tiles 1 leaves none"):
        ImageLayout.build("anyres", 32, 8, 16, max_tiles=1)
    capped = ImageLayout.build("anyres", 32, 8, 16, max_tiles=2)
    assert capped.pinpoints == ((32, 64), (64, 32)) and default_pinpoints(32)[:2] == [(32, 64), (64, 32)]


# ---------------------------------------------------------------------------------------------- hd layout

def _patch_means(tiles: torch.Tensor, patch: int) -> torch.Tensor:
    """A 'tower' whose feature for each patch is the patch's mean colour: [N, 3, S, S] -> [N, s*s, 3]."""
    n, c, size, _ = tiles.shape
    s = size // patch
    return tiles.reshape(n, c, s, patch, s, patch).mean((3, 5)).permute(0, 2, 3, 1).reshape(n, s * s, c)


def test_hd_tile_features_land_where_the_paper_puts_them() -> None:
    """A 2x3 grid on an image of 6 coloured cells: the global image's features come first, then the
    merged map row-major, so map position (R, C) holds tile (R // s, C // s)'s patch (R % s, C % s)."""
    from transformers import CLIPImageProcessorPil

    rows, cols, tile, patch = 2, 3, 32, 8
    s = tile // patch
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200), (200, 0, 200)]
    image = Image.new("RGB", (cols * tile, rows * tile))
    for k, colour in enumerate(colours):
        r, c = divmod(k, cols)
        image.paste(colour, (c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
    processor = CLIPImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                      do_normalize=False)  # pixels stay colour / 255: features are readable
    layout = ImageLayout.build("hd", tile, patch, s * s, hd_grid=(rows, cols))
    pixels, sizes = ImagePreprocessor(layout, processor, "pad")([image])
    assert pixels.shape[0] == layout.num_tiles(*sizes[0].tolist()) == 1 + rows * cols
    merged = layout.merge(_patch_means(pixels, patch), sizes)  # [s*s + rows*s*cols*s, 3]
    assert merged.shape[0] == layout.num_tokens(rows * tile, cols * tile)
    grid = merged[s * s:].reshape(rows * s, cols * s, 3)
    for big_r in range(rows * s):
        for big_c in range(cols * s):
            want = torch.tensor(colours[(big_r // s) * cols + big_c // s]) / 255
            assert torch.allclose(grid[big_r, big_c], want, atol=1e-6), (big_r, big_c)
    # The global tile is the whole image padded to a square and downsampled: its top-left patch is a
    # band of the padding colour above the image, its centre row shows the cells left to right.
    centre = merged[: s * s].reshape(s, s, 3)[s // 2 - 1]
    assert centre[0, 0] > centre[0, 1] and centre[-1, 2] > centre[-1, 0]  # red cell left, blue cell right


class _PatchMeanTower(torch.nn.Module):
    """Stands in for the vision tower: each patch's feature is its mean colour (zero-padded to `dim`)."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.patch, self.dim = patch, dim

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = _patch_means(pixel_values, self.patch)  # [N, s*s, 3]
        return torch.nn.functional.pad(feats, (0, self.dim - 3))  # [N, s*s, dim]


def test_hd_features_reach_their_slots_in_the_llm_input(llama_dir: Path) -> None:
    """Through VisionLanguageModel.embed: two images in a batch of two samples, each image's merged map
    lands in its own run of image slots, in order."""
    from transformers import AutoModelForCausalLM, CLIPImageProcessorPil

    from vistune.model.vlm import VisionLanguageModel

    llm = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    dim = llm.get_input_embeddings().embedding_dim
    layout = ImageLayout.build("hd", 32, 8, 16, hd_grid=(2, 2))
    model = VisionLanguageModel(_PatchMeanTower(8, dim), torch.nn.Identity(), llm, layout)  # type: ignore[arg-type]
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                      do_normalize=False)
    left_red = Image.new("RGB", (64, 64), (0, 0, 200))
    left_red.paste((200, 0, 0), (0, 0, 32, 64))
    green = Image.new("RGB", (64, 64), (0, 200, 0))
    pixels, sizes = ImagePreprocessor(layout, processor, "pad")([left_red, green])
    n = layout.num_tokens(64, 64)  # 16 global + 64 merged
    ids = torch.tensor([[5] + [IMAGE_TOKEN_ID] * n + [6], [IMAGE_TOKEN_ID] * n + [7, 8]])  # [2, n + 2]
    embeds = model.embed(ids, pixels, sizes)  # [2, n + 2, dim]
    first = embeds[0, 1 + 16: 1 + n, :3].reshape(8, 8, 3)  # sample 0's merged map
    assert torch.allclose(first[:, :4], torch.tensor([200 / 255, 0, 0]).expand(8, 4, 3), atol=1e-6)  # left half red
    assert torch.allclose(first[:, 4:], torch.tensor([0, 0, 200 / 255]).expand(8, 4, 3), atol=1e-6)
    assert torch.allclose(embeds[1, :n, :3], torch.tensor([0, 200 / 255, 0]).expand(n, 3), atol=1e-6)
    assert torch.equal(embeds[0, 0], llm.get_input_embeddings().weight[5])  # text positions untouched


# ---------------------------------------------------------------------------------------------- anyres parity

def _hf_inputs(processor: LlavaNextProcessor, images: list[Image.Image], text: str) -> dict:
    conversation = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return processor(images=images, text=prompt, return_tensors="pt")


@pytest.fixture(scope="module")
def anyres_pair(clip_dir: Path, llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    bundle = _bundle(clip_dir, llama_dir, image_mode="anyres", image_grid_pinpoints=PINPOINTS)
    out = tmp_path_factory.mktemp("anyres") / "hf"
    write_llava_hf(bundle, out)
    hf = LlavaNextForConditionalGeneration.from_pretrained(str(out)).eval()
    return bundle, out, hf, AutoProcessor.from_pretrained(str(out))


@pytest.mark.parametrize("images", [[SIZES[0]], [SIZES[1]], [SIZES[2]], [SIZES[3]], [SIZES[0], SIZES[1]]],
                         ids=["40x20", "20x40", "30x30", "90x50", "two-images"])
def test_anyres_parity_with_llava_next(images: list, anyres_pair: tuple) -> None:
    bundle, _, hf, processor = anyres_pair
    _check_parity(bundle, hf, processor, images)


def test_anyres_parity_with_llava_next_siglip(siglip_dir: Path, llama_dir: Path, tmp_path: Path) -> None:
    """SigLIP: no CLS token (HF strategy `full`) and no crop in its processor."""
    bundle = _bundle(siglip_dir, llama_dir, image_mode="anyres", image_grid_pinpoints=PINPOINTS)
    write_llava_hf(bundle, tmp_path / "hf")
    hf = LlavaNextForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.vision_feature_select_strategy == "full"
    _check_parity(bundle, hf, AutoProcessor.from_pretrained(str(tmp_path / "hf")), [SIZES[0], SIZES[3]])


def _check_parity(bundle: Bundle, hf: LlavaNextForConditionalGeneration, processor: LlavaNextProcessor,
                  images: list) -> tuple[Engine, dict, dict]:
    """Same ids, tiles, image sizes and logits (< 1e-5) from vistune and transformers; returns the inputs."""
    pil = [_image(w, h, seed=i) for i, (w, h) in enumerate(images)]
    engine = Engine(bundle)
    batch = engine.inputs([engine.prepare([Message("user", "<image>\n" * len(pil) + "What colour is the shape?")],
                                          pil)])
    inputs = _hf_inputs(processor, pil, "What colour is the shape?")
    image_id = hf.config.image_token_id
    # Token counts per image equal the processor's, and so do the whole ids and the tiles.
    for im, n in zip(pil, processor._get_num_multimodal_tokens([(im.size[1], im.size[0]) for im in pil])
                     ["num_image_tokens"]):
        assert bundle.model.layout.num_tokens(im.size[1], im.size[0]) == n
    ids = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, image_id)
    assert torch.equal(ids, inputs["input_ids"])
    hf_tiles = torch.cat([p[:n] for p, n in zip(inputs["pixel_values"],
                                                 [bundle.model.layout.num_tiles(*hw) for hw in inputs["image_sizes"]])])
    assert torch.equal(batch["pixel_values"], hf_tiles)
    assert torch.equal(batch["image_sizes"], inputs["image_sizes"])
    with torch.no_grad():
        ours = engine.model(**batch).logits  # [1, L, V]
        theirs = hf(**inputs).logits  # [1, L, V + 1]
    assert (ours - theirs[..., : ours.shape[-1]]).abs().max() < 1e-5
    return engine, batch, inputs


def test_anyres_greedy_generation_equals_llava_next(anyres_pair: tuple) -> None:
    bundle, _, hf, processor = anyres_pair
    engine, batch, inputs = _check_parity(bundle, hf, processor, [SIZES[3]])
    ours = engine.model.generate(**batch, max_new_tokens=10, do_sample=False, eos_token_id=[],
                                 pad_token_id=engine.tokenizer.pad_token_id)[0]
    with torch.no_grad():
        theirs = hf.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert ours.tolist() == theirs[0, inputs["input_ids"].shape[1]:].tolist()


def test_llava_next_round_trip_and_detection(anyres_pair: tuple, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    bundle, hf_dir, _, _ = anyres_pair
    assert detect(hf_dir).format == "llava-next"
    assert main(["info", str(hf_dir)]) == 0
    assert "image_mode              anyres, pinpoints [[32, 64], [64, 32], [64, 64]]" in capsys.readouterr().out
    assert main(["convert", str(hf_dir), str(tmp_path / "back"), "--to", "vistune"]) == 0
    back = load_checkpoint(tmp_path / "back")
    assert back.spec.vision.image_mode == "anyres"
    assert [tuple(p) for p in back.spec.vision.image_grid_pinpoints or []] == PINPOINTS
    sa, sb = bundle.model.state_dict(), back.model.state_dict()
    assert sa.keys() == sb.keys() and "image_newline" in sa
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    # ... and out again: an anyres model goes to llava-next only.
    assert main(["convert", str(tmp_path / "back"), str(tmp_path / "hf2"), "--to", "llava-hf"]) != 0
    assert "llava-next holds `anyres` models only" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "back"), str(tmp_path / "hf3"), "--to", "llava-next"]) == 0
    assert detect(tmp_path / "hf3").format == "llava-next"


def test_hd_is_not_exportable(clip_dir: Path, llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="'hd'"):
        write_llava_hf(_bundle(clip_dir, llama_dir, image_mode="hd"), tmp_path / "hf")


def test_anyres_processor_copies_encoder_settings(clip_dir: Path) -> None:
    source = load_image_processor(clip_dir)
    layout = ImageLayout.build("anyres", 32, 8, 16, pinpoints=PINPOINTS)
    proc = anyres_processor(source, layout)
    assert proc.image_mean == source.image_mean and proc.crop_size == source.crop_size
    assert proc.image_grid_pinpoints == [list(p) for p in PINPOINTS]


def test_original_llava_next_folder(clip_dir: Path, llama_dir: Path, tmp_path: Path) -> None:
    """The original repo's LLaVA-NeXT layout (config `image_aspect_ratio: anyres`, `spatial_unpad`,
    pinpoints as (width, height), `model.image_newline` among the weights) reads as the same model."""
    import json

    from safetensors.torch import save_file

    native = _bundle(clip_dir, llama_dir, image_mode="anyres", image_grid_pinpoints=[(32, 64), (64, 64)])
    src = tmp_path / "llava-next-tiny"
    src.mkdir()
    model = native.model
    state = {k: v.clone() for k, v in model.llm.state_dict().items()}
    state |= {f"model.mm_projector.{k}": v.clone() for k, v in model.projector.state_dict().items()}
    state["model.image_newline"] = model.image_newline.detach().clone()
    save_file(state, str(src / "model.safetensors"))
    config = model.llm.config.to_dict() | {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "mm_vision_tower": str(clip_dir),
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False, "image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
        "image_grid_pinpoints": "[(64, 32), (64, 64)]",  # (width, height), as a string as LLaVA's args give it
        "tokenizer_model_max_length": 1024}
    (src / "config.json").write_text(json.dumps(config))
    native.tokenizer.save_pretrained(str(src))
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "vistune", "--format", "chat_template"]) == 0
    converted = load_checkpoint(tmp_path / "out")
    assert converted.model.layout.pinpoints == ((32, 64), (64, 64))  # (height, width): a wide 1x2 grid first
    assert converted.model.layout.grid(20, 40) == (1, 2)
    image = _image(40, 20, seed=5)
    ours, theirs = Engine(native), Engine(converted)
    question = [Message("user", "<image>\nWhat colour is the shape?")]
    batch = ours.inputs([ours.prepare(question, [image])])
    with torch.no_grad():
        torch.testing.assert_close(theirs.model(**batch).logits, ours.model(**batch).logits, rtol=0, atol=1e-6)
    config["mm_patch_merge_type"] = "spatial"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'spatial_unpad'"):
        from vistune.convert.api import load_any

        load_any(src)


def test_image_newline_trains_and_is_saved_with_the_projector(clip_dir: Path, llama_dir: Path,
                                                              tmp_path: Path) -> None:
    from vistune.config import LoraSettings, PartsConfig
    from vistune.model.checkpoint import save_checkpoint
    from vistune.train.parts import apply_parts, describe, param_groups

    bundle = _bundle(clip_dir, llama_dir, image_mode="anyres", image_grid_pinpoints=PINPOINTS)
    model = bundle.model
    apply_parts(model, PartsConfig(projector="frozen", llm="frozen"), LoraSettings(), False)
    assert not model.image_newline.requires_grad
    apply_parts(model, PartsConfig(projector="full", llm="frozen"), LoraSettings(), False)
    groups = param_groups(model, 1e-2, None, 0.0)
    assert any(p is model.image_newline for g in groups for p in g["params"])
    assert "projector trains         6,336 /" in describe(model)  # 6,272 projector + 64 newline
    before = model.image_newline.detach().clone()
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    engine = Engine(bundle)
    batch = engine.inputs([engine.prepare([Message("user", "<image>\nWhat colour is the shape?")],
                                          [_image(40, 20, seed=1)])])
    model.train()
    model(**batch, labels=batch["input_ids"].clamp(min=0)).loss.backward()
    optimizer.step()
    assert not torch.equal(model.image_newline.detach(), before)
    out = save_checkpoint(tmp_path / "ckpt", bundle, bundle.spec.vision, bundle.spec.llm, "frozen", True)
    assert torch.equal(load_checkpoint(out).model.image_newline.detach(), model.image_newline.detach())


def test_anyres_batch_of_prompts_equals_each_alone(anyres_pair: tuple) -> None:
    """Prompts with different image sizes (so different token and tile counts) batched together, left-padded:
    each row's last-position logits equal that prompt's alone."""
    bundle = anyres_pair[0]
    engine = Engine(bundle)
    prompts = [engine.prepare([Message("user", "<image>\n" * len(sizes) + "What colour is the shape?")],
                              [_image(w, h, seed=k) for k, (w, h) in enumerate(sizes)])
               for sizes in ([SIZES[0]], [SIZES[3], SIZES[1]], [SIZES[2]])]
    assert len({len(p.input_ids) for p in prompts}) == 3
    with torch.no_grad():
        together = engine.model(**engine.inputs(prompts)).logits[:, -1]  # [3, V]
        alone = torch.cat([engine.model(**engine.inputs([p])).logits[:, -1] for p in prompts])  # [3, V]
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-4)
