"""The tiny Qwen3-VL checkpoint: builds, reloads offline, and matches the real format."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from egm.worker.engines.hf_text import REPLACEMENT, TokenTextDecoder
from egm.worker.tiny_model import (
    SPECIAL_TOKENS,
    THINK_TOKENS,
    build_tiny_checkpoint,
    build_tokenizer,
    model_config,
)

EGM_ANSWER = (
    "The lady in the blue shirt stands right of center, behind the table.\n</think>\n\n```json\n[\n"
    '\t{"bbox_2d": [444, 468, 757, 745], "label": "lady with the blue shirt"}\n]\n```'
)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    return model, processor


def test_checkpoint_reloads_through_auto_classes(loaded, tiny_model_dir: Path) -> None:
    model, processor = loaded
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen3VLProcessor"
    assert processor.video_processor is not None
    size_on_disk = sum(f.stat().st_size for f in tiny_model_dir.iterdir())
    assert size_on_disk < 5 * 2**20, "the tiny checkpoint should stay around a megabyte"


def test_config_is_consistent_with_tokenizer(loaded) -> None:
    model, processor = loaded
    cfg, tok = model.config, processor.tokenizer
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert cfg.text_config.vocab_size == len(tok)
    assert cfg.vision_config.out_hidden_size == cfg.text_config.hidden_size == 64
    assert cfg.text_config.num_hidden_layers == 2 and cfg.vision_config.depth == 2
    assert all(i < cfg.vision_config.depth for i in cfg.vision_config.deepstack_visual_indexes)
    eos = model.generation_config.eos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos


def test_full_size_config_matches_egm_4b() -> None:
    cfg = model_config(build_tokenizer(), full_size=True)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (2560, 36, 32, 8)
    assert (t.head_dim, t.intermediate_size, t.vocab_size) == (128, 9728, 151936)
    assert t.rope_parameters["mrope_section"] == [24, 20, 20]
    assert t.rope_parameters["rope_theta"] == 5_000_000.0
    assert cfg.tie_word_embeddings is True
    assert (v.hidden_size, v.depth, v.patch_size, v.spatial_merge_size) == (1024, 24, 16, 2)
    assert list(v.deepstack_visual_indexes) == [5, 11, 17]
    assert v.out_hidden_size == 2560


def test_chat_template_opens_the_reasoning(loaded) -> None:
    _, processor = loaded
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Locate the cat"}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Locate the cat")
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n")


def test_processor_expands_image_tokens(loaded) -> None:
    from PIL import Image

    _, processor = loaded
    prompt = "<|vision_start|><|image_pad|><|vision_end|>hi"
    enc = processor(text=[prompt], images=[Image.new("RGB", (640, 480))], return_tensors="pt",
                    min_pixels=64 * 32 * 32, max_pixels=1024 * 32 * 32)
    assert enc["image_grid_thw"].tolist() == [[1, 30, 40]]  # 16-pixel patches
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((enc["input_ids"] == image_id).sum()) == 300  # one token per 32x32 pixels
    assert "mm_token_type_ids" in enc


def test_tokenizer_keeps_think_tags_and_splits_digits() -> None:
    tok = build_tokenizer()
    ids = tok(EGM_ANSWER)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == EGM_ANSWER
    end_think = tok.convert_tokens_to_ids("</think>")
    assert end_think in ids, "</think> is one token"
    assert all(tok.convert_tokens_to_ids(s) in tok.all_special_ids for s in SPECIAL_TOKENS)
    assert not any(tok.convert_tokens_to_ids(s) in tok.all_special_ids for s in THINK_TOKENS)
    digits = tok.tokenize("[444, 1000]")
    assert "444" not in digits and "4" in digits, digits


def test_build_is_deterministic_per_seed(tmp_path: Path) -> None:
    def weights_hash(folder: Path) -> str:
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    a = build_tiny_checkpoint(tmp_path / "a", seed=0)
    b = build_tiny_checkpoint(tmp_path / "b", seed=0)
    c = build_tiny_checkpoint(tmp_path / "c", seed=1)
    assert weights_hash(a) == weights_hash(b)
    assert weights_hash(a) != weights_hash(c)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


# ---------------------------------------------------------------- token pieces

def test_pieces_match_tokenizer_decode_on_random_ids() -> None:
    tok = build_tokenizer()
    dec = TokenTextDecoder(tok)
    rng = random.Random(7)
    for _ in range(500):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 25))]
        pieces = dec.pieces(ids)
        assert len(pieces) == len(ids)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_pieces_split_multibyte_characters_exactly() -> None:
    tok = build_tokenizer()
    dec = TokenTextDecoder(tok)
    text = "Héllo 日本 " + EGM_ANSWER
    ids = tok(text)["input_ids"]
    pieces = dec.pieces(ids)
    assert "".join(pieces) == text
    assert "</think>" in pieces
    assert "" in pieces, "tokens ending inside a character yield an empty piece"


def test_pieces_drop_specials_and_survive_unknown_ids() -> None:
    tok = build_tokenizer()
    dec = TokenTextDecoder(tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    hello = tok("hello")["input_ids"]
    pieces = dec.pieces([*hello, im_end, len(tok) + 5, 151_000])
    assert pieces[len(hello)] == ""
    assert pieces[-2:] == [REPLACEMENT, REPLACEMENT]
    assert "".join(pieces) == "hello" + REPLACEMENT * 2


def test_taught_model_answers_in_egm_format_through_the_real_engine(tiny_model_dir: Path) -> None:
    """The default tiny model writes a parseable EGM answer for any image and prompt."""
    from PIL import Image

    from egm.parsing import ParseStatus, parse_completion
    from egm.worker.engines.base import DecodingConfig, EngineRequest
    from egm.worker.engines.hf import HFEngine

    engine = HFEngine(str(tiny_model_dir), DecodingConfig(max_new_tokens=128), max_pixels=300 * 1024,
                      min_pixels=32 * 32, device="cpu")
    requests = [EngineRequest(Image.new("RGB", size, color), prompt) for size, color, prompt in [
        ((640, 480), (200, 30, 30), "Locate the red circle, output its bbox coordinates using JSON format"),
        ((123, 777), (10, 90, 200), 'Locate every instance that belongs to the following categories: "square, '
                                    'circle". Report bbox coordinates in JSON format.'),
    ]]
    for out in engine.generate(requests):
        parsed = parse_completion(out.text)
        assert parsed.status == ParseStatus.ok, out.text
        assert [b.label for b in parsed.boxes] == ["circle"]
        assert parsed.reasoning and out.logprobs and all(lp <= 0 for lp in out.logprobs)
    engine.close()
