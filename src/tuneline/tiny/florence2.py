"""A tiny random-weight Florence-2 (DaViT vision tower + BART) in the native transformers layout."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from tuneline.tiny._common import RANDOM_WARNING, seeded, write_note
from tuneline.tiny._tokenizers import bart_vocab, bytes_to_unicode, write_bpe_files

log = logging.getLogger(__name__)

IMAGE_SIZE = 64  # px, square; small so CPU generation takes milliseconds
# DaViT downsamples by the product of patch strides (4*2*2*2 = 32): 64 px -> 2x2 grid.
PATCH_STRIDE = (4, 2, 2, 2)
# The projector emits one token per grid cell plus one pooled ("temporal") token; the
# processor inserts this many <image> placeholders and the model checks the counts match.
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // math.prod(PATCH_STRIDE)) ** 2 + 1
TEXT_D_MODEL = 32
MAX_TEXT_POSITIONS = 1024  # as the real model: callers ask for up to 1024 new tokens
IMAGE_TOKEN = "<image>"

# Florence-2's extra tokens: task markers the original tokenizer adds, then 1000 location bins.
TASK_TOKENS = (
    "<od>", "</od>", "<ocr>", "</ocr>", "<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>",
    "<grounding>", "</grounding>", "<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>",
    "<region_to_desciption>", "</region_to_desciption>", "<proposal>", "</proposal>",
    "<poly>", "</poly>", "<and>",
)  # fmt: skip
LOC_TOKENS = tuple(f"<loc_{index}>" for index in range(1000))

# Same parse rules as the converted florence-community checkpoints; the processor's
# post_process_generation raises "Unsupported parse task" for any type missing here.
POST_PROCESSOR_CONFIG: dict[str, Any] = {
    "ocr": {
        "pattern": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
        "area_threshold": 0.0,
    },
    "phrase_grounding": {"banned_grounding_tokens": ["it", "I", "me", "you", "the image", "image", "picture"]},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _tokenizer(folder: Path) -> Any:
    """Byte-level BART tokenizer with Florence-2's special tokens and the <image> placeholder.

    The base vocab.json + merges.txt are written into `folder` (as BART checkpoints ship them)
    and loaded from there; save_pretrained later adds tokenizer.json with the added tokens.
    """
    from tokenizers import AddedToken
    from transformers import BartTokenizer

    vocab, merges = bart_vocab()
    vocab["<mask>"] = len(vocab)
    write_bpe_files(folder, vocab, merges)
    tokenizer = BartTokenizer.from_pretrained(folder, model_max_length=MAX_TEXT_POSITIONS)
    extra = [AddedToken(token, special=True, normalized=False) for token in (*TASK_TOKENS, *LOC_TOKENS, IMAGE_TOKEN)]
    tokenizer.add_tokens(extra, special_tokens=True)
    tokenizer.save_pretrained(folder)
    # Reload naming the placeholder: without the `image_token` mapping the tokenizer has no
    # `image_token` attribute and Florence2Processor fails. Passing it on the first load
    # instead would give <image> an id before the task and location tokens.
    return BartTokenizer.from_pretrained(folder, extra_special_tokens={"image_token": IMAGE_TOKEN})


def _caption_suppressed_ids(tokenizer: Any) -> list[int]:
    """Ids of every token other than BOS/EOS and tokens made only of a-z and the space byte."""
    space = bytes_to_unicode()[ord(" ")]
    allowed = set("abcdefghijklmnopqrstuvwxyz") | {space}
    keep = {"<s>", "</s>"}  # transformers refuses to suppress the forced BOS token
    return [
        index
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
        if token not in keep and not (set(token) <= allowed)
    ]


def _drop_load_kwargs(config_file: Path) -> None:
    """Remove the from_pretrained kwargs transformers echoes into tokenizer_config.json."""
    config = json.loads(config_file.read_text("utf-8"))
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", "utf-8")


def _image_processor() -> Any:
    from transformers import CLIPImageProcessorPil  # PIL backend: torchvision is not required

    return CLIPImageProcessorPil(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=3,  # bicubic, as Florence-2
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
        image_seq_length=IMAGE_SEQ_LENGTH,
    )


def _config(vocab_size: int, image_token_id: int) -> Any:
    from transformers import BartConfig, Florence2Config, Florence2VisionConfig

    vision = Florence2VisionConfig(
        depths=(1, 1, 1, 1),
        patch_size=(7, 3, 3, 3),
        patch_stride=PATCH_STRIDE,
        patch_padding=(3, 1, 1, 1),
        patch_prenorm=(False, True, True, True),
        embed_dim=(8, 16, 32, 32),
        num_heads=(1, 2, 4, 4),
        num_groups=(1, 2, 4, 4),
        window_size=4,
        drop_path_rate=0.0,
        projection_dim=TEXT_D_MODEL,  # image features are spliced into the text embeddings
        max_position_embeddings=50,
        max_temporal_embeddings=100,
    )
    text = BartConfig(
        # Exactly the tokenizer's size: a larger head could sample ids no token decodes to.
        vocab_size=vocab_size,
        d_model=TEXT_D_MODEL,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=MAX_TEXT_POSITIONS,
        activation_function="gelu",
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        scale_embedding=False,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_bos_token_id=0,
        forced_eos_token_id=2,
        is_encoder_decoder=True,
        tie_word_embeddings=True,
    )
    return Florence2Config(vision_config=vision, text_config=text, image_token_id=image_token_id)


def build_tiny_florence2(path: Path, seed: int = 0) -> Path:
    """Write a tiny RANDOM-weight Florence-2 model + processor folder at `path`; return `path`.

    Loads with `Florence2ForConditionalGeneration.from_pretrained(path)` and
    `Florence2Processor.from_pretrained(path)` (native transformers classes, no
    remote code). Its captions are random lowercase letters and spaces: it exists to
    exercise the real captioning code path quickly on CPU.
    """
    from transformers import Florence2ForConditionalGeneration, Florence2Processor, GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    log.warning("building tiny Florence-2 at %s: %s", path, RANDOM_WARNING)

    tokenizer = _tokenizer(path)
    processor = Florence2Processor(
        image_processor=_image_processor(),
        tokenizer=tokenizer,
        num_additional_image_tokens=0,
        post_processor_config=POST_PROCESSOR_CONFIG,
    )
    config = _config(len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    with seeded(seed):
        model = Florence2ForConditionalGeneration(config).eval()
    # Florence-2's token ids; greedy and short by default so a tiny random model stays fast.
    # Untrained, it would emit mostly <loc_*> tokens, which decode to an empty caption with
    # skip_special_tokens=True; suppressing all but lowercase letters, spaces and EOS makes
    # its captions plain (meaningless) text, shaped like a real caption.
    model.generation_config = GenerationConfig(
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        decoder_start_token_id=2,
        forced_bos_token_id=0,
        forced_eos_token_id=2,
        num_beams=1,
        max_new_tokens=20,
        no_repeat_ngram_size=3,  # as Florence-2's own generation config
        suppress_tokens=_caption_suppressed_ids(tokenizer),
    )
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    _drop_load_kwargs(path / "tokenizer_config.json")
    write_note(path, "florence2", seed)
    return path
