"""The PromptBuilder on videos against transformers' processor and ``get_rope_index``.

The oracle is transformers' Qwen3-VL processor on the frames PyAV decodes from the same bytes
(with the container's frame count and rate as metadata, as its PyAV loader reads them), and the
monolithic model's ``get_rope_index`` on its ``mm_token_type_ids``. The builder reads only the
container's metadata (or the frames' headers).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from language_server.prompt.builder import PromptError, PromptLimits
from protocol.chat import VideoSource
from protocol.messages import ChatTurn, ContentPart
from tests.conftest import decoded_frames, video_bytes

# name -> (items in prompt order: ("image", h, w) or ("video", frames, h, w, fps), options)
CASES = {
    "one_video": ([("video", 9, 64, 96, 4)], {}),
    "image_and_video": ([("image", 80, 112), ("video", 12, 96, 64, 6)], {}),
    "video_then_image": ([("video", 7, 48, 48, 3), ("image", 96, 160)], {}),
    "long_video": ([("video", 40, 128, 160, 8)], {}),  # 10 frames of 5 x 4 = 100 rows
    "fps_asked": ([("video", 24, 64, 64, 8)], {"fps": 1.0}),
    "max_frames_asked": ([("video", 40, 64, 64, 8)], {"max_frames": 6}),
    "two_videos": ([("video", 5, 32, 64, 2), ("video", 8, 64, 32, 4)], {}),
}


def _items(spec, options, make_image, encode_image):
    """(our visual items, transformers' images, videos and metadata)."""
    ours, images, videos, metadata = [], [], [], []
    for k, item in enumerate(spec):
        if item[0] == "image":
            image = make_image(item[1], item[2], k)
            ours.append(encode_image(image))
            images.append(image)
        else:
            _, n, h, w, fps = item
            data = video_bytes(n, h, w, fps=fps, seed=k)
            ours.append(VideoSource(data=data, **options))
            videos.append(decoded_frames(data))
            metadata.append({"total_num_frames": n, "fps": fps})
    return ours, images, videos, metadata


def _turns(items) -> list[ChatTurn]:
    parts = []
    for k, item in enumerate(items):
        kind = "video" if isinstance(item, VideoSource) else "image"
        parts += [ContentPart(kind=kind, image=k), ContentPart(kind="text", text=f"{k}.")]
    return [ChatTurn(role="user", parts=[*parts, ContentPart(kind="text", text="What is it?")])]


def _reference(processor, monolithic, items, images, videos, metadata, **kwargs):
    content = [{"type": "video" if isinstance(x, VideoSource) else "image"} for x in items]
    messages = [{"role": "user", "content": [
        p for k, c in enumerate(content) for p in (c, {"type": "text", "text": f"{k}."})
    ] + [{"type": "text", "text": "What is it?"}]}]  # fmt: skip
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=images or None, videos=videos or None,
                       video_metadata=metadata or None, return_metadata=bool(videos),
                       return_tensors="pt", **kwargs)  # fmt: skip
    positions, delta = monolithic.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"), video_grid_thw=inputs.get("video_grid_thw"),
    )  # fmt: skip
    return inputs, positions[:, 0], int(delta.reshape(-1)[0])


@pytest.mark.parametrize("name", list(CASES))
def test_build_equals_transformers(name, builder, monolithic, make_image, encode_image):
    spec, options = CASES[name]
    ours_items, images, videos, metadata = _items(spec, options, make_image, encode_image)
    ours = builder.build(_turns(ours_items), ours_items)
    kwargs = {"fps": options["fps"]} if "fps" in options else {}
    processor = builder.processor
    if "max_frames" in options:  # transformers 5.24 reads it from the processor, not the call
        processor = copy.deepcopy(processor)
        processor.video_processor.max_frames = options["max_frames"]
    inputs, positions, delta = _reference(processor, monolithic, ours_items, images, videos,
                                          metadata, **kwargs)  # fmt: skip
    assert torch.equal(ours.input_ids, inputs["input_ids"][0])
    assert torch.equal(ours.positions, positions) and ours.mrope_delta == delta
    assert torch.equal(ours.video_grid_thw, inputs["video_grid_thw"])
    if images:
        assert torch.equal(ours.image_grid_thw, inputs["image_grid_thw"])
    sampled = [m.frames_indices.tolist() for m in inputs["video_metadata"]]
    assert ours.video_frame_indices == sampled
    visual = inputs["mm_token_type_ids"][0] > 0
    assert torch.equal(ours.visual_mask, visual)
    assert ours.n_vis == int(visual.sum()) == sum(s.n_tokens for s in ours.images)
    assert [s.kind for s in ours.images] == [item[0] for item in spec]
    if name == "long_video":
        assert ours.n_vis > 3 * 16


def test_client_frames_equal_transformers_on_the_same_frames(builder, monolithic, make_image,
                                                            encode_image):  # fmt: skip
    frames = [make_image(48, 80, seed) for seed in range(5)]
    item = VideoSource(frames=tuple(encode_image(f) for f in frames), fps=2.0)
    ours = builder.build(_turns([item]), [item])
    stack = np.stack([np.asarray(f) for f in frames])
    meta = [{"total_num_frames": 5, "fps": 2.0, "frames_indices": list(range(5))}]
    inputs, positions, delta = _reference(builder.processor, monolithic, [item], [], [stack], meta,
                                          do_sample_frames=False)  # fmt: skip
    assert torch.equal(ours.input_ids, inputs["input_ids"][0])
    assert torch.equal(ours.positions, positions) and ours.mrope_delta == delta
    assert ours.video_frame_indices == [[0, 1, 2, 3, 4]]
    assert ours.images[0].frame_data == item.frames and ours.images[0].data == b""


def test_same_bytes_sampled_differently_get_different_content_keys(builder):
    data = video_bytes(24, 32, 32, fps=8)
    a = builder.build(_turns([VideoSource(data=data)]), [VideoSource(data=data)])
    b = builder.build(_turns([VideoSource(data=data)]), [VideoSource(data=data, fps=1.0)])
    again = builder.build(_turns([VideoSource(data=data)]), [VideoSource(data=data)])
    assert a.video_frame_indices != b.video_frame_indices
    assert a.images[0].content_key != b.images[0].content_key
    assert a.images[0].content_key == again.images[0].content_key


def _refused(builder, item, limits=None):
    if limits is not None:
        builder = type(builder)(builder.processor, builder.config, limits)
    with pytest.raises(PromptError) as info:
        builder.build(_turns([item]), [item])
    return info.value


def test_hostile_videos_are_refused_before_any_encoder_work(builder, make_image, encode_image):
    good = video_bytes(8, 32, 32)
    assert _refused(builder, VideoSource(data=b"\x00\x01garbage" * 50)).status == 400
    assert "cannot read" in _refused(builder, VideoSource(data=good[:200])).message
    one = _refused(builder, VideoSource(data=video_bytes(1, 32, 32)))
    assert one.status == 400 and "at least 2" in one.message
    many = _refused(builder, VideoSource(data=video_bytes(30, 32, 32, fps=30)),
                    PromptLimits(max_video_frames=20))  # fmt: skip
    assert many.status == 413 and "30 frames" in many.message
    long = _refused(builder, VideoSource(data=video_bytes(30, 32, 32, fps=1)),
                    PromptLimits(max_video_seconds=10))  # fmt: skip
    assert long.status == 413 and "lasts 30 s" in long.message
    big = _refused(builder, VideoSource(data=video_bytes(4, 64, 64)),
                   PromptLimits(max_image_pixels=64 * 63))  # fmt: skip
    assert big.status == 413 and "pixels a frame" in big.message
    tokens = _refused(builder, VideoSource(data=video_bytes(40, 128, 160, fps=8)),
                      PromptLimits(max_image_tokens=50))  # fmt: skip
    assert tokens.status == 413 and "visual tokens" in tokens.message
    sizes = VideoSource(frames=(encode_image(make_image(32, 32)), encode_image(make_image(32, 64))))
    assert "differ in size" in _refused(builder, sizes).message
    too_many = VideoSource(frames=(encode_image(make_image(32, 32)),) * 9, max_frames=8)
    assert "at most 8" in _refused(builder, too_many).message
    not_image = VideoSource(frames=(b"not an image",) * 2)
    assert _refused(builder, not_image).status == 400


def test_a_video_part_must_point_at_a_video(builder, encode_image):
    image = encode_image(Image.new("RGB", (32, 32)))
    video = VideoSource(data=video_bytes(4, 32, 32))
    crossed = [ChatTurn(role="user", parts=[ContentPart(kind="image", image=0)])]
    with pytest.raises(PromptError, match="each of its own kind"):
        builder.build(crossed, [video])
    with pytest.raises(PromptError, match="each of its own kind"):
        builder.build(_turns([video]), [image])
