"""A random-weight Qwen3-VL checkpoint that runs offline: tests, CI and GPU benchmarks.

Two sizes share one recipe:

* tiny (default): 2 text layers of width 64 and 2 vision layers of width 32. About a
  megabyte on disk; loads through ``AutoProcessor`` / ``AutoModelForImageTextToText``
  and generates on the CPU in well under a second.
* full size: the EGM-4B architecture (REFERENCE.md section 1) with random bf16 weights,
  for timing. :func:`build_model_and_processor` builds it in memory, straight on the
  target device, so no 8 GB checkpoint is ever written.

The tokenizer is always the small one trained here on EGM-style text (reasoning,
``</think>``, fenced JSON with ``bbox_2d`` lists, digits). The full-size model keeps the real
vocabulary size (151,936), so random weights can produce ids the small tokenizer does not
know: the engine's decoder turns those into a replacement character instead of crashing.

Nothing here touches the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch/transformers stay lazy: only worker code that runs a model imports them
    import torch
    from transformers import PreTrainedModel, ProcessorMixin

#: bump when the recipe changes, so cached checkpoints are rebuilt
TINY_MODEL_VERSION = 2

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: like the real Qwen3 tokenizers, the think tags are added tokens that are NOT special:
#: ``skip_special_tokens=True`` keeps them in decoded text.
THINK_TOKENS = ("<think>", "</think>")

# Qwen-style pre-tokenisation: letters in runs, every digit alone, punctuation runs, spaces.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A Qwen3-VL chat template reduced to what EGM needs: images and text in user turns, and the
# Thinking models' generation prompt that already opens the reasoning with ``<think>\n``.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' -}}"
    "{%- endif -%}"
)

_CORPUS = [
    "Locate the red car on the left, output its bbox coordinates using JSON format",
    "Locate the man in the blue shirt, output its bbox coordinates using JSON format.",
    "Locate every instance that belongs to the following categories: \"person, dog, car\". "
    "Report bbox coordinates in JSON format.",
    "Locate the lady with the blue shirt amodally, output its bbox coordinates using JSON format",
    "The lady in the blue shirt stands right of center, behind the table.",
    "The red car is parked on the left side of the street, next to a tree.",
    "There are two dogs; the smaller one sits in front of the bench.",
    "The person on the right holds an umbrella and walks towards the camera.",
    "Looking at the image, the cup is on the wooden table near the laptop.",
    "I need to find the object described, then give its box on the 0-1000 grid.",
    "The referring expression points to the second chair from the left.",
    "A white cat sleeps on the sofa under the window.",
    "The boy wearing a green hat is the one standing closest to the door.",
    "</think>\n\n```json\n[\n\t{\"bbox_2d\": [444, 468, 757, 745], \"label\": \"lady with the blue shirt\"}\n]\n```",
    "```json\n[\n\t{\"bbox_2d\": [12, 305, 398, 690], \"label\": \"red car\"}\n]\n```",
    "```json\n[\n\t{\"bbox_2d\": [100, 200, 300, 400], \"label\": \"person\"},\n"
    "\t{\"bbox_2d\": [510, 620, 730, 840], \"label\": \"dog\"}\n]\n```",
    "{\"bbox_2d\": [0, 0, 1000, 1000], \"label\": \"whole image\"}",
    "{\"bbox_2d\": [987, 654, 321, 123], \"label\": \"swapped corners\"}",
    "[13, 57, 246, 891]",
    "0 1 2 3 4 5 6 7 8 9 10 25 50 75 100 250 500 750 999 1000",
    "The answer is the bounding box of the left person, x1 y1 x2 y2.",
    "Coordinates are relative to the original image width and height.",
    "The object is partially hidden, so the box covers its full extent.",
    "No matching object is visible in this picture.",
    "<think>\nThe dog is lying on the grass near the fence.\n</think>\n",
    "Label: traffic light, stop sign, bicycle, bus, truck, horse, sheep, cow.",
    "Question: where is the small yellow ball? Answer with JSON.",
    "The tall building in the background is on the upper right.",
    "Two people are talking; the woman on the left wears glasses.",
    "Describe the region, then output {\"bbox_2d\": [x1, y1, x2, y2], \"label\": name}.",
    "Hello world! Numbers like 3.14 and 42 appear, as do commas, colons: and quotes \"here\".",
    "The zebra in the middle is eating grass while the others look away.",
]


# --------------------------------------------------------------------------- tokenizer / processor

def build_tokenizer(vocab_size: int = 640) -> Any:
    """Train a byte-level BPE on the built-in corpus and wrap it as a fast HF tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AddedToken, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS, trainer=trainer)
    # Think tags after the specials, as added (non-special) tokens, like Qwen3's tokenizer.
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])

    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=262144,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor(tokenizer: Any, *, min_pixels: int = 64 * 32 * 32, max_pixels: int = 16384 * 32 * 32) -> Any:
    """Qwen3-VL image + video processors (patch 16, merge 2: one token per 32x32 pixels)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = Qwen3VLVideoProcessor(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


# --------------------------------------------------------------------------- model config

def _token_ids(tokenizer: Any) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (*SPECIAL_TOKENS, *THINK_TOKENS)}
    missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer lacks special tokens {missing}")
    return ids


def model_config(tokenizer: Any, *, full_size: bool = False) -> Any:
    """Qwen3VLConfig for the tiny or the EGM-4B architecture, with token ids of ``tokenizer``."""
    from transformers import Qwen3VLConfig

    ids = _token_ids(tokenizer)
    if full_size:
        text = dict(
            hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
            head_dim=128, intermediate_size=9728, vocab_size=151936, max_position_embeddings=262144,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                             "mrope_section": [24, 20, 20], "mrope_interleaved": True},
        )
        # deepstack taps three vision layers; they feed the first three text layers
        vision = dict(
            hidden_size=1024, depth=24, num_heads=16, intermediate_size=4096, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2560,
            num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17],
        )
    else:
        # head_dim 16 -> 8 rotary frequencies, split T/H/W as 4/2/2 (interleaved like the real 24/20/20)
        text = dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=128, vocab_size=len(tokenizer), max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                             "mrope_section": [4, 2, 2], "mrope_interleaved": True},
        )
        vision = dict(
            hidden_size=32, depth=2, num_heads=2, intermediate_size=64, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
            num_position_embeddings=256, deepstack_visual_indexes=[0, 1],
        )
    assert vision["out_hidden_size"] == text["hidden_size"], "vision output must match text width"
    assert all(0 <= i < vision["depth"] for i in vision["deepstack_visual_indexes"])
    assert sum(text["rope_parameters"]["mrope_section"]) == text["head_dim"] // 2

    # The tiny model is initialised wider than usual: with std 0.02 it only ever repeats one token,
    # and tests need answers that depend on the image and prompt.
    init_std = 0.02 if full_size else 0.1
    text.update(
        initializer_range=init_std, hidden_act="silu", rms_norm_eps=1e-6, attention_bias=False,
        tie_word_embeddings=True,
        pad_token_id=ids["<|endoftext|>"], bos_token_id=None, eos_token_id=ids["<|im_end|>"],
    )
    vision.update(hidden_act="gelu_pytorch_tanh", in_channels=3, initializer_range=init_std)
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
        initializer_range=init_std,
    )


def generation_config(tokenizer: Any) -> Any:
    from transformers import GenerationConfig

    ids = _token_ids(tokenizer)
    return GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
        temperature=None, top_p=None, top_k=None,  # greedy by default; samplers set their own
    )


# --------------------------------------------------------------------------- builders

def _random_model(config: Any, seed: int, device: str | torch.device, dtype: torch.dtype) -> PreTrainedModel:
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    if torch.device(device).type == "cuda":
        torch.cuda.manual_seed_all(seed)
    # Build directly on the device in the target dtype: no 17 GB fp32 copy in host RAM.
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    if next(model.parameters()).device != torch.device(device):
        model = model.to(device)
    return model.eval()


def build_model_and_processor(
    full_size: bool = False, device: str = "cpu", dtype: str | torch.dtype = "auto", *, seed: int = 0
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A random-weight model in memory plus its processor; nothing is written to disk.

    ``dtype="auto"``: bfloat16 on CUDA, float32 elsewhere.
    """
    import torch

    if dtype == "auto":
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = _random_model(model_config(tokenizer, full_size=full_size), seed, device, dtype)
    model.generation_config = generation_config(tokenizer)
    return model, processor


#: What the taught tiny model answers, whatever the image and prompt: EGM's format with one box.
TAUGHT_ANSWER = (
    "The circle is the round shape in the picture.\n</think>\n\n```json\n[\n"
    "\t{\"bbox_2d\": [250, 200, 750, 800], \"label\": \"circle\"}\n]\n```"
)
_TEACH_PROMPTS = (
    "Locate the red circle, output its bbox coordinates using JSON format",
    "Locate {label}, output its bbox coordinates using JSON format",
    'Locate every instance that belongs to the following categories: "{labels}". '
    "Report bbox coordinates in JSON format.",
)
_TEACH_LABELS = ("circle", "square", "triangle", "person", "car", "dog", "the lady in the blue shirt")


def teach_answer(model: Any, processor: Any, answer: str = TAUGHT_ANSWER, *, steps: int = 240,
                 lr: float = 3e-3, seed: int = 0) -> float:
    """Fine-tune a tiny random model until greedy decoding writes ``answer`` for any image and prompt.

    A random model writes noise, which the parser rightly rejects, so nothing downstream
    (boxes, Label Studio results, confidence) would run in demos and tests. Teaching it one
    fixed EGM-format answer exercises the whole path; the boxes still mean nothing.
    Returns the final loss.
    """
    import random

    import torch
    from PIL import Image

    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss_value = float("nan")
    for _ in range(steps):
        w, h = rng.randint(24, 900), rng.randint(24, 900)
        image = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        labels = rng.sample(_TEACH_LABELS, rng.randint(1, 3))
        prompt = rng.choice(_TEACH_PROMPTS).format(label=labels[0], labels=", ".join(labels))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        head = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pixels = {"min_pixels": 32 * 32, "max_pixels": rng.choice((16 * 1024, 64 * 1024, 300 * 1024, 1_003_520))}
        enc = processor(text=[head + answer + "<|im_end|>"], images=[image], return_tensors="pt", **pixels)
        n_head = processor(text=[head], images=[image], return_tensors="pt", **pixels)["input_ids"].shape[1]
        target = enc["input_ids"].clone()
        target[:, :n_head] = -100
        loss = model(**enc, labels=target).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
    model.eval()
    return loss_value


def build_tiny_checkpoint(out_dir: Path, *, seed: int = 0, full_size: bool = False, teach: bool = True,
                          device: str = "cpu") -> Path:
    """Write a loadable checkpoint folder (config, weights, tokenizer, processor) and return it.

    ``full_size=True`` writes the whole EGM-4B architecture (about 9 GB of bf16 weights), for
    benchmarks whose model runs in another process (the end-to-end GPU benchmark's worker);
    in-process benchmarks call :func:`build_model_and_processor` instead. ``device="cuda"``
    draws the random weights on the GPU (seconds, where the CPU takes minutes for 4 B values).
    The tiny model is ``teach``-ed EGM's answer format (:func:`teach_answer`) so demos and tests
    get boxes.
    """
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if full_size else torch.float32
    model, processor = build_model_and_processor(full_size=full_size, device=device, dtype=dtype, seed=seed)
    taught = teach and not full_size
    if taught:
        teach_answer(model, processor, seed=seed)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "egm_tiny_model.json").write_text(
        json.dumps({"version": TINY_MODEL_VERSION, "seed": seed, "full_size": full_size, "taught": taught}) + "\n"
    )
    return out_dir


def _cached_ok(folder: Path, teach: bool) -> bool:
    marker = folder / "egm_tiny_model.json"
    if not (marker.is_file() and (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        return False
    try:
        meta = json.loads(marker.read_text())
    except ValueError:
        return False
    return meta.get("version") == TINY_MODEL_VERSION and meta.get("taught", False) == teach


def ensure_tiny_checkpoint(cache_root: Path, *, teach: bool = True) -> Path:
    """The cached tiny checkpoint ``cache_root/tiny-model-v<N>[-random]``, built if missing.

    ``teach=False`` keeps the purely random weights (engine tests compare decoding paths on
    them: varied, image-dependent text). Built in a private folder and renamed into place,
    so parallel builders are safe.
    """
    import os
    import shutil

    target = Path(cache_root) / f"tiny-model-v{TINY_MODEL_VERSION}{'' if teach else '-random'}"
    if _cached_ok(target, teach):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tiny-model-build-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_checkpoint(tmp, seed=0, teach=teach)
    shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return target
