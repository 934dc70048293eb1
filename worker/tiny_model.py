"""A random-weight Qwen3-VL checkpoint that runs offline: tests, CI, GPU benchmarks, the closed loop.

Three sizes (:data:`SIZES`) share one recipe:

* ``tiny`` (default): 2 text layers of width 64 and 2 vision layers of width 32. About a
  megabyte on disk; loads through ``AutoProcessor`` / ``AutoModelForImageTextToText``
  and generates on the CPU in well under a second.
* ``small``: 4 text layers of width 256 and 4 vision layers of width 192 (about 7 M
  parameters, 14 MB in bf16): the smallest size that learns to box shapes within minutes on
  one GPU, the closed-loop benchmark's model (``bench/loop.py``, docs/loop.md). Its tokenizer
  has also read the shape scenes' prompts and labels (:data:`SHAPES_CORPUS`).
* ``full``: the EGM-4B architecture (REFERENCE.md section 1) with random bf16 weights,
  for timing. :func:`build_model_and_processor` builds it in memory, straight on the
  target device, so no 8 GB checkpoint is ever written.

The tokenizer is always a small one trained here on EGM-style text (reasoning,
``</think>``, fenced JSON with ``bbox_2d`` lists, digits, each digit its own token as in
Qwen's tokenizer). The full-size model keeps the real vocabulary size (151,936), so random
weights can produce ids the small tokenizer does not know: the engine's decoder turns those
into a replacement character instead of crashing.

The chat template renders an assistant turn as the Qwen3 Thinking models' template does
(``<think>\n`` + reasoning + ``\n</think>\n\n`` + answer), so a conversation of the SFT
export tokenizes for training exactly as the generation prompt (``...assistant\n<think>\n``)
continues at inference.

Nothing here touches the network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # torch/transformers stay lazy: only worker code that runs a model imports them
    import torch
    from transformers import PreTrainedModel, ProcessorMixin

#: bump when the recipe changes, so cached checkpoints are rebuilt
TINY_MODEL_VERSION = 3

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

# A Qwen3-VL chat template reduced to what EGM needs: images and text in user turns; assistant
# turns as the Thinking models render them (reasoning inside <think>...</think>, then the answer);
# the generation prompt that already opens the reasoning with ``<think>\n``.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}"
    "{%- else -%}"
    "{%- set text = namespace(value='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{%- set text.value = text.value + '<|vision_start|><|image_pad|><|vision_end|>' -%}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{%- set text.value = text.value + '<|vision_start|><|video_pad|><|vision_end|>' -%}"
    "{%- elif part['type'] == 'text' -%}"
    "{%- set text.value = text.value + part['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set text = text.value -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' and '</think>' in text -%}"
    "{%- set reasoning = text.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set answer = text.split('</think>')[-1].lstrip('\\n') -%}"
    "{{- '<think>\\n' + reasoning + '\\n</think>\\n\\n' + answer -}}"
    "{%- else -%}"
    "{{- text -}}"
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

#: What the ``small`` size's tokenizer reads besides :data:`_CORPUS`: the shape scenes' prompts and
#: answers (egm.scenes), so labels and prompts take a few tokens each, as in a real vocabulary.
SHAPES_CORPUS = tuple(
    line
    for label in ("circle", "square", "triangle")
    for line in (
        f"Locate {label}, output its bbox coordinates using JSON format.",
        f"\t{{\"bbox_2d\": [120, 345, 678, 901], \"label\": \"{label}\"}}",
        f"The {label} is one of the shapes in the picture.",
    )
) + ('Locate every instance that belongs to the following categories: "circle, square, triangle". '
     "Report bbox coordinates in JSON format.",)


def build_tokenizer(vocab_size: int = 640, extra_corpus: tuple[str, ...] = ()) -> Any:
    """Train a byte-level BPE on the built-in corpus (plus ``extra_corpus``) and wrap it as a fast HF tokenizer."""
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
    # repeated so that the extra lines' pairs outnumber one-off pairs of the base corpus
    core.train_from_iterator(list(_CORPUS) + list(extra_corpus) * 4, trainer=trainer)
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


@dataclass(frozen=True)
class ModelSize:
    """One architecture of the recipe (text and vision towers, tokenizer, initialisation)."""

    name: str
    text_hidden: int
    text_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    text_intermediate: int
    #: rotary frequencies of the temporal / height / width axes (sum = head_dim / 2)
    mrope_section: tuple[int, int, int]
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    vision_intermediate: int
    #: learned position embeddings of the vision tower (a square grid, interpolated to each image)
    vision_positions: int
    #: vision layers whose features also feed the first text layers
    deepstack: tuple[int, ...]
    init_std: float
    #: ``None``: the tokenizer's size
    vocab_size: int | None = None
    max_positions: int = 32768
    tokenizer_vocab: int = 640
    tokenizer_extra: tuple[str, ...] = ()


#: The tiny model is initialised wider than usual: with std 0.02 it only ever repeats one token,
#: and tests need answers that depend on the image and prompt.
TINY = ModelSize("tiny", 64, 2, 4, 2, 16, 128, (4, 2, 2), 32, 2, 2, 64, 256, (0, 1), init_std=0.1)
#: Width and depth picked so that a from-scratch model learns to box flat shapes within minutes on
#: one H200 and its bf16 weights stay under 16 MB (docs/loop.md); 32-wide heads like the vision tower.
SMALL = ModelSize("small", 256, 4, 8, 4, 32, 768, (6, 5, 5), 192, 4, 6, 576, 256, (1,), init_std=0.02,
                  tokenizer_vocab=1024, tokenizer_extra=SHAPES_CORPUS)
#: EGM-4B (REFERENCE.md 1); deepstack taps three vision layers that feed the first three text layers.
FULL = ModelSize("full", 2560, 36, 32, 8, 128, 9728, (24, 20, 20), 1024, 24, 16, 4096, 2304, (5, 11, 17),
                 init_std=0.02, vocab_size=151936, max_positions=262144)
SIZES = {size.name: size for size in (TINY, SMALL, FULL)}


def model_size(size: str | ModelSize = "tiny", *, full_size: bool = False) -> ModelSize:
    """The preset called ``size`` (``full_size=True`` is the older spelling of ``size="full"``)."""
    if isinstance(size, ModelSize):
        return size
    name = "full" if full_size else size
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(SIZES)}")
    return SIZES[name]


def tokenizer_for(size: str | ModelSize = "tiny") -> Any:
    spec = model_size(size)
    return build_tokenizer(spec.tokenizer_vocab, spec.tokenizer_extra)


def model_config(tokenizer: Any, *, full_size: bool = False, size: str | ModelSize = "tiny") -> Any:
    """Qwen3VLConfig of a size preset (tiny, small or the EGM-4B architecture), with token ids of ``tokenizer``."""
    from transformers import Qwen3VLConfig

    spec = model_size(size, full_size=full_size)
    ids = _token_ids(tokenizer)
    if spec.vision_hidden % spec.vision_heads or len(spec.mrope_section) != 3:
        raise ValueError(f"inconsistent model size {spec}")
    if sum(spec.mrope_section) != spec.head_dim // 2:
        raise ValueError(f"mrope_section {spec.mrope_section} must add up to head_dim / 2 = {spec.head_dim // 2}")
    if not all(0 <= i < spec.vision_depth for i in spec.deepstack) or len(spec.deepstack) > spec.text_layers:
        raise ValueError(f"deepstack layers {spec.deepstack} do not fit the towers")
    text = dict(
        hidden_size=spec.text_hidden, num_hidden_layers=spec.text_layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim, intermediate_size=spec.text_intermediate,
        vocab_size=spec.vocab_size or len(tokenizer), max_position_embeddings=spec.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                         "mrope_section": list(spec.mrope_section), "mrope_interleaved": True},
        initializer_range=spec.init_std, hidden_act="silu", rms_norm_eps=1e-6, attention_bias=False,
        tie_word_embeddings=True,
        pad_token_id=ids["<|endoftext|>"], bos_token_id=None, eos_token_id=ids["<|im_end|>"],
    )
    vision = dict(
        hidden_size=spec.vision_hidden, depth=spec.vision_depth, num_heads=spec.vision_heads,
        intermediate_size=spec.vision_intermediate, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
        out_hidden_size=spec.text_hidden, num_position_embeddings=spec.vision_positions,
        deepstack_visual_indexes=list(spec.deepstack),
        hidden_act="gelu_pytorch_tanh", in_channels=3, initializer_range=spec.init_std,
    )
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
        initializer_range=spec.init_std,
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
    full_size: bool = False, device: str = "cpu", dtype: str | torch.dtype = "auto", *, seed: int = 0,
    size: str | ModelSize = "tiny", min_pixels: int | None = None, max_pixels: int | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A random-weight model of a size preset in memory plus its processor; nothing is written to disk.

    ``dtype="auto"``: bfloat16 on CUDA, float32 elsewhere. ``min_pixels``/``max_pixels`` set the
    processor's default image budget (what trainers that call the processor without one use).
    """
    import torch

    spec = model_size(size, full_size=full_size)
    if dtype == "auto":
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    tokenizer = tokenizer_for(spec)
    pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    processor = build_processor(tokenizer, **pixels)
    model = _random_model(model_config(tokenizer, size=spec), seed, device, dtype)
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


#: image budgets (max pixels) the tiny model is taught at: from a few visual tokens to EGM's default.
TEACH_MAX_PIXELS = (16 * 1024, 64 * 1024, 300 * 1024, 1_003_520)


def teach_answer(model: Any, processor: Any, answer: str = TAUGHT_ANSWER, *, steps: int = 240,
                 lr: float = 3e-3, seed: int = 0, max_pixels: tuple[int, ...] = TEACH_MAX_PIXELS,
                 min_pixels: int = 32 * 32, progress: Callable[[int, int], None] | None = None) -> float:
    """Fine-tune a tiny random model until greedy decoding writes ``answer`` for any image and prompt.

    A random model writes noise, which the parser rightly rejects, so nothing downstream
    (boxes, Label Studio results, confidence) would run in demos and tests. Teaching it one
    fixed EGM-format answer exercises the whole path; the boxes still mean nothing.
    ``progress(done, steps)`` is called after each step (the demo prints it). Returns the final loss.
    """
    import random

    import torch
    from PIL import Image

    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        w, h = rng.randint(24, 900), rng.randint(24, 900)
        image = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        labels = rng.sample(_TEACH_LABELS, rng.randint(1, 3))
        prompt = rng.choice(_TEACH_PROMPTS).format(label=labels[0], labels=", ".join(labels))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        head = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pixels = {"min_pixels": min_pixels, "max_pixels": rng.choice(max_pixels)}
        enc = processor(text=[head + answer + "<|im_end|>"], images=[image], return_tensors="pt", **pixels)
        n_head = processor(text=[head], images=[image], return_tensors="pt", **pixels)["input_ids"].shape[1]
        target = enc["input_ids"].clone()
        target[:, :n_head] = -100
        loss = model(**enc, labels=target).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
        if progress is not None:
            progress(step + 1, steps)
    model.eval()
    return loss_value


def build_tiny_checkpoint(out_dir: Path, *, seed: int = 0, full_size: bool = False, teach: bool = True,
                          size: str | ModelSize = "tiny", min_pixels: int | None = None,
                          max_pixels: int | None = None, teach_steps: int = 240, device: str = "cpu",
                          progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a loadable checkpoint folder (config, weights, tokenizer, processor) and return it.

    ``full_size=True`` (``size="full"``) writes the whole EGM-4B architecture (about 9 GB of bf16
    weights), for benchmarks whose model runs in another process (the end-to-end GPU benchmark's
    worker); in-process benchmarks call :func:`build_model_and_processor` instead.
    ``device="cuda"`` draws the random weights on the GPU (seconds, where the CPU takes minutes
    for 4 B values). Smaller sizes are ``teach``-ed EGM's answer format (:func:`teach_answer`) so
    demos and tests get boxes; with ``max_pixels`` set, at that image budget only (the
    processor's default is set to it too).
    """
    import torch

    spec = model_size(size, full_size=full_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if spec.name == "full" else torch.float32
    model, processor = build_model_and_processor(device=device, dtype=dtype, seed=seed, size=spec,
                                                 min_pixels=min_pixels, max_pixels=max_pixels)
    taught = teach and spec.name != "full"
    if taught:
        budget = {} if max_pixels is None else {"max_pixels": (max_pixels,), "min_pixels": min_pixels or 32 * 32}
        teach_answer(model, processor, seed=seed, steps=teach_steps, progress=progress, **budget)
    if spec.name != "tiny":
        model = model.to(torch.bfloat16)  # half the bytes; a CPU engine loads it back as float32
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "egm_tiny_model.json").write_text(json.dumps(
        {"version": TINY_MODEL_VERSION, "seed": seed, "size": spec.name, "full_size": spec.name == "full",
         "taught": taught}) + "\n")
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


def tiny_checkpoint_cached(cache_root: Path, *, teach: bool = True) -> bool:
    """Whether :func:`ensure_tiny_checkpoint` would find the checkpoint built already."""
    return _cached_ok(Path(cache_root) / f"tiny-model-v{TINY_MODEL_VERSION}{'' if teach else '-random'}", teach)


def ensure_tiny_checkpoint(cache_root: Path, *, teach: bool = True,
                           progress: Callable[[int, int], None] | None = None) -> Path:
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
    try:
        build_tiny_checkpoint(tmp, seed=0, teach=teach, progress=progress)
    except BaseException:  # Ctrl-C or SIGTERM mid-build (the demo prints progress): leave nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return target
