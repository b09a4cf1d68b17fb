"""The language side's PromptBuilder against transformers' own processor + get_rope_index.

The oracle is ``processor.apply_chat_template(..., tokenize=True)`` on the decoded images (as the
encoder will decode them) and the monolithic model's ``get_rope_index``; the builder only reads
image headers.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import struct
import zlib

import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from language_server.prompt.builder import PromptBuilder, PromptError, PromptLimits
from protocol.messages import ChatTurn, ContentPart

# name -> (list of (height, width, format, exif orientation), system turn?)
CASES = {
    "text_only": ([], True),
    "one_image": ([(80, 112, "PNG", 1)], False),
    "two_images": ([(200, 96, "PNG", 1), (96, 160, "BMP", 1)], True),
    "long_image": ([(224, 320, "PNG", 1)], False),  # 7 x 10 = 70 visual tokens > 3 blocks of 16
    "exif_rotated": ([(96, 160, "JPEG", 6)], False),
    "upscaled": ([(20, 30, "PNG", 1)], False),  # below the processor's min_pixels
    "downscaled": ([(1100, 1000, "JPEG", 1)], False),  # above its max_pixels
}


def _png_header(width: int, height: int) -> bytes:
    """A PNG with a valid header and no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def images(make_image, encode_image):
    """(h, w, format, orientation) -> encoded bytes."""

    def make(h, w, fmt, orientation, seed=0):
        exif = Image.Exif()
        exif[0x0112] = orientation
        return encode_image(
            make_image(h, w, seed), fmt, **({"exif": exif} if fmt == "JPEG" else {})
        )

    return make


def _turns(n_images: int, system: bool = False, text: str = "What is it?") -> list[ChatTurn]:
    parts = []
    for k in range(n_images):
        parts += [ContentPart(kind="image", image=k), ContentPart(kind="text", text=f"{k}.")]
    user = ChatTurn(role="user", parts=[*parts, ContentPart(kind="text", text=text)])
    return ([ChatTurn(role="system", parts=[ContentPart(kind="text", text="Be brief.")])]
            if system else []) + [user]  # fmt: skip


def _reference(builder, monolithic, turns, datas, add_generation_prompt=True):
    """transformers on the decoded images: (input_ids, positions, delta, grid)."""
    decoded = [ImageOps.exif_transpose(Image.open(io.BytesIO(d))).convert("RGB") for d in datas]
    messages = [
        {"role": t.role, "content": [
            {"type": "text", "text": p.text} if p.kind == "text"
            else {"type": "image", "image": decoded[p.image]} for p in t.parts]}
        for t in turns
    ]  # fmt: skip
    inputs = builder.processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True,
        return_tensors="pt",
    )  # fmt: skip
    grid = inputs.get("image_grid_thw")
    positions, delta = monolithic.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=grid
    )
    grid = torch.zeros(0, 3, dtype=torch.long) if grid is None else grid
    return inputs["input_ids"][0], positions[:, 0], int(delta.reshape(-1)[0]), grid


@pytest.mark.parametrize("name", list(CASES))
def test_build_equals_transformers(name, builder, monolithic, images):
    specs, system = CASES[name]
    datas = [images(*spec, seed=k) for k, spec in enumerate(specs)]
    turns = _turns(len(datas), system)
    ours = builder.build(turns, datas)
    ids, positions, delta, grid = _reference(builder, monolithic, turns, datas)
    assert torch.equal(ours.input_ids, ids)
    assert torch.equal(ours.positions, positions) and ours.mrope_delta == delta
    assert torch.equal(ours.image_grid_thw, grid)
    assert torch.equal(ours.visual_mask, ids == builder.image_token_id)
    assert ours.n_vis == int(ours.visual_mask.sum()) == sum(s.n_tokens for s in ours.images)
    assert [s.data for s in ours.images] == datas  # untouched
    assert [s.offset for s in ours.images] == [sum(s.n_tokens for s in ours.images[:k])
                                               for k in range(len(datas))]  # fmt: skip
    if name == "long_image":
        assert ours.n_vis > 3 * 16
    if name == "exif_rotated":
        assert ours.images[0].grid == (1, 10, 6)  # 96x160 stored, shown 160 high and 96 wide


def test_image_and_text_prompts_share_one_template(builder, images):
    with_image = builder.build(_turns(1, True, "Describe."), [images(80, 112, "PNG", 1)]).input_ids
    text_only = builder.build(
        [_turns(0, True)[0], ChatTurn(role="user", parts=[ContentPart(kind="text", text="0.Describe.")])],
        [],
    ).input_ids  # fmt: skip
    start, end = builder.config.vision_start_token_id, builder.config.vision_end_token_id
    a, b = with_image.tolist().index(start), with_image.tolist().index(end)
    assert with_image[:a].tolist() + with_image[b + 1 :].tolist() == text_only.tolist()
    rendered = builder.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "0.Describe."}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    assert text_only.tolist() == builder.tokenizer(rendered)["input_ids"]


def test_add_generation_prompt_false_is_honoured(builder, monolithic, images):
    datas = [images(64, 96, "PNG", 1)]
    turns = _turns(1)
    open_ = builder.build(turns, datas, add_generation_prompt=False)
    ids, positions, _, _ = _reference(builder, monolithic, turns, datas, False)
    assert torch.equal(open_.input_ids, ids) and torch.equal(open_.positions, positions)
    closed = builder.build(turns, datas).input_ids
    suffix = builder.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert closed.tolist() == open_.input_ids.tolist() + suffix


@pytest.mark.parametrize(
    ("text", "n_images"),
    [("<|image_pad|> hi", 0), ("<|image_pad|>", 1), ("<|video_pad|>", 0),
     ("<|vision_start|>x", 1), ("x<|vision_end|>", 0)],
)  # fmt: skip
def test_vision_tokens_typed_in_text_are_rejected(builder, images, text, n_images):
    with pytest.raises(PromptError, match="pad") as err:
        builder.build(_turns(n_images, text=text), [images(64, 64, "PNG", 1)] * n_images)
    assert err.value.status == 400


@pytest.mark.parametrize(
    ("limits", "data", "status", "match"),
    [
        (PromptLimits(), b"not an image", 400, "cannot decode image"),
        (PromptLimits(), b"\x89PNG\r\n\x1a\n" + b"\0" * 30, 400, "cannot decode image"),
        (PromptLimits(), _png_header(0, 10), 400, "cannot decode image|zero size"),
        (PromptLimits(), _png_header(401, 2), 400, "aspect ratio"),
        (PromptLimits(max_image_pixels=4000), _png_header(64, 64), 413, "pixels"),
        (PromptLimits(), _png_header(20000, 20000), 413, "too large"),  # PIL's bomb limit
        (PromptLimits(max_image_tokens=69), _png_header(320, 224), 413, "visual tokens"),
        (
            PromptLimits(max_prompt_tokens=40),
            _png_header(320, 224),
            400,
            "prompt has",
        ),  # 400, as vLLM answers
    ],
)
def test_prompt_errors(builder, limits, data, status, match):
    strict = PromptBuilder(builder.processor, builder.config, limits)
    with pytest.raises(PromptError, match=match) as err:
        strict.build(_turns(1), [data])
    assert err.value.status == status and err.value.message in str(err.value)


def test_image_count_and_order_are_checked(builder, images):
    data = images(64, 64, "PNG", 1)
    strict = PromptBuilder(builder.processor, builder.config, PromptLimits(max_images=2))
    with pytest.raises(PromptError, match="too many images") as err:
        strict.build(_turns(3), [data] * 3)
    assert err.value.status == 400
    swapped = [ChatTurn(role="user", parts=[ContentPart(kind="image", image=1),
                                            ContentPart(kind="image", image=0)])]  # fmt: skip
    with pytest.raises(PromptError, match="in order"):
        builder.build(swapped, [data, data])
    with pytest.raises(PromptError, match="in order"):
        builder.build(_turns(1), [data, data])


def test_no_pixel_is_decoded(builder, images, monkeypatch):
    datas = [images(96, 160, "JPEG", 6), images(80, 112, "PNG", 1), images(40, 60, "BMP", 1)]
    for cls in (Image.Image, ImageFile.ImageFile):
        monkeypatch.setattr(cls, "load", lambda self: pytest.fail("pixels decoded"))
    prompt = builder.build(_turns(3), datas)
    assert [s.grid for s in prompt.images] == [(1, 10, 6), (1, 4, 8), (1, 4, 6)]


@pytest.mark.parametrize(
    ("h", "w", "fmt", "orientation"),
    [(64, 64, "PNG", 1), (20, 30, "PNG", 1), (33, 47, "JPEG", 8), (1100, 1000, "JPEG", 1),
     (1500, 800, "PNG", 1), (40, 2000, "PNG", 1), (96, 160, "JPEG", 5), (80, 112, "JPEG", 3)],
)  # fmt: skip
def test_encoder_grid_equals_builder_grid(builder, encoder, images, h, w, fmt, orientation):
    data = images(h, w, fmt, orientation)
    [spec] = builder.build(_turns(1), [data]).images
    pre = encoder.preprocess_image(data)
    assert pre.grid == spec.grid and pre.n_tokens == spec.n_tokens
    assert pre.pixel_values.shape[0] == spec.grid[0] * spec.grid[1] * spec.grid[2]


def test_build_is_thread_safe(builder, images):
    jobs = [(_turns(k % 3, bool(k % 2)), [images(64 + 16 * k, 96, "PNG", 1, seed=k)] * (k % 3))
            for k in range(12)]  # fmt: skip
    alone = [builder.build(*job) for job in jobs]
    with cf.ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda job: builder.build(*job), jobs * 4))
    for a, b in zip(alone * 4, together, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.positions, b.positions)
