"""A video's plan from its metadata equals what transformers' Qwen3-VL processor does with its
frames: the sampled indices, the grid, and the prompt text with its timestamps (issue 19)."""

from __future__ import annotations

import numpy as np
import pytest

from language_server.prompt.video import VideoRules, plan_video, video_text


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


CASES = [  # (frames in the container, its fps, height, width, fps asked, num_frames asked)
    (300, 30.0, 64, 96, None, None),  # 20 frames at the default 2 fps
    (7, 2.0, 48, 64, None, None),  # an odd count: the last frame fills the last group
    (9, 30.0, 40, 40, None, None),  # fewer than min_frames at 2 fps: clamped up to 4
    (2000, 10.0, 32, 32, None, None),  # 400 frames
    (60, 10.0, 240, 320, None, None),  # over the pixel budget: resized down
    (40, 20.0, 20, 40, None, None),  # smaller than one patch * merge: scaled up
    (100, 25.0, 64, 64, 4.0, None),  # fps asked for
    (100, 25.0, 64, 64, None, 10),  # a frame count asked for (fps off)
    (50, None, 64, 64, None, None),  # no rate in the container: 24 assumed
]


@pytest.mark.parametrize(("total", "rate", "height", "width", "fps", "num"), CASES)
def test_the_plan_is_what_transformers_processor_does(processor, total, rate, height, width,
                                                       fps, num):  # fmt: skip
    rules = VideoRules.from_processor(processor.video_processor)
    plan = plan_video(rules, total, rate, height, width, fps=fps, num_frames=num)
    frames = np.zeros((total, height, width, 3), dtype=np.uint8)
    metadata = {"total_num_frames": total, "fps": rate}
    asked = {"fps": fps} if fps is not None else {}
    if num is not None:
        asked = {"num_frames": num, "fps": None}
    template = "<|vision_start|><|video_pad|><|vision_end|>"
    out = processor(text=[template], videos=[frames], video_metadata=[metadata],
                    return_metadata=True, **asked)  # fmt: skip
    assert tuple(out["video_metadata"][0].frames_indices) == plan.frame_indices
    assert tuple(int(x) for x in out["video_grid_thw"][0]) == plan.grid
    assert out["pixel_values_videos"].shape[0] == plan.grid[0] * plan.grid[1] * plan.grid[2]
    ours = processor.tokenizer(f"<|vision_start|>{video_text(plan)}<|vision_end|>")["input_ids"]
    assert list(out["input_ids"][0]) == ours
    pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert ours.count(pad) == plan.n_tokens


def test_a_video_with_no_frames_is_refused():
    with pytest.raises(ValueError, match="no frames"):
        plan_video(VideoRules(), 0, 30.0, 64, 64)
