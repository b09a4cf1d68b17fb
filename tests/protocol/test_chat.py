"""``protocol.chat``: where image bytes may come from (data: URLs; local paths only inside the
allowed directory, one answer for every refused path), text validity, and limits that nest."""

from __future__ import annotations

import base64
import os

import pytest

import protocol as P
from protocol.chat import (
    ImageSourcePolicy,
    VideoSource,
    refused_path_message,
    source_bytes,
    to_turns,
)
from protocol.codec import MAX_MESSAGE_BYTES
from protocol.messages import MAX_BLOCKS, MAX_IMAGE_BYTES, MAX_IMAGES, MAX_TEXT, MAX_VIDEO_FRAMES

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40  # bytes only: nothing here decodes an image
WHERE = "messages[0].content[0].image_url"


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def _url(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture
def media(tmp_path):
    """An allowed directory with one image, a subdirectory, links in and out, and secrets beside."""
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "cat.png").write_bytes(PNG)
    (root / "sub" / "dog.png").write_bytes(PNG[::-1])
    (root / "empty.png").write_bytes(b"")
    (root / "big.png").write_bytes(b"x" * 1001)
    (tmp_path / "secret.txt").write_bytes(b"password")
    (root / "inside-link.png").symlink_to(root / "cat.png")
    (root / "outside-link.png").symlink_to(tmp_path / "secret.txt")
    (root / "outside-dir").symlink_to(tmp_path)
    (root / "loop").symlink_to(root / "loop")
    os.mkfifo(root / "fifo.png")
    locked = root / "locked.png"
    locked.write_bytes(PNG)
    locked.chmod(0)
    return root


def _images(url: str, policy: ImageSourcePolicy) -> list[bytes]:
    return to_turns(_user(_url(url)), policy)[1]


def test_paths_inside_the_root_are_read_relative_or_absolute(media):
    policy = ImageSourcePolicy(local_root=media, max_bytes=1000)
    for url in (str(media / "cat.png"), "cat.png", f"file://{media}/cat.png",
                f"file://localhost{media}/cat.png", "sub/../cat.png", "inside-link.png",
                f"file://{media}/%63at.png"):  # fmt: skip
        assert _images(url, policy) == [PNG], url
    assert _images("sub/dog.png", policy) == [PNG[::-1]]


def test_every_refused_path_gets_one_message_that_does_not_tell_whether_it_exists(media):
    policy = ImageSourcePolicy(local_root=media, max_bytes=1000)
    refused = [
        "/etc/shadow", "/etc/passwd", "/proc/self/environ", "/dev/zero", "/nonexistent.png",
        str(media.parent / "secret.txt"), "../secret.txt", "sub/../../secret.txt",
        "outside-link.png", "outside-dir/secret.txt", "loop", "fifo.png", "empty.png", "big.png",
        "sub", ".", "", "missing.png", "a" * 300, "d/" * 3000 + "x.png", "cat.png\x00.txt",
        "\ud800.png", "file://otherhost/etc/passwd", f"file://{media}/%ff%fe.png", "~/cat.png",
    ]  # fmt: skip
    if os.geteuid() != 0:  # root reads a mode-0 file anyway
        refused.append("locked.png")
    answers = set()
    for url in refused:
        with pytest.raises(ValueError) as info:
            _images(url, policy)
        answers.add(str(info.value))
    assert answers == {refused_path_message(WHERE, policy)}
    assert "--allowed-local-media-path" in answers.pop()


def test_paths_are_off_without_a_root(media):
    for policy in (
        ImageSourcePolicy(),
        ImageSourcePolicy(local_root=media, allow_local_files=False),
    ):
        for url in (str(media / "cat.png"), "/etc/shadow", "/no/such/file.png"):
            with pytest.raises(ValueError) as info:
                _images(url, policy)
            assert str(info.value) == refused_path_message(WHERE, policy)


def test_the_root_is_resolved_and_must_be_a_directory(media, tmp_path):
    (tmp_path / "alias").symlink_to(media)
    policy = ImageSourcePolicy(local_root=tmp_path / "alias")
    assert policy.local_root == media.resolve()
    assert _images("cat.png", policy) == [PNG]
    with pytest.raises(ValueError, match="not a directory"):
        ImageSourcePolicy(local_root=media / "cat.png")


def test_data_urls(media):
    policy = ImageSourcePolicy(max_bytes=100)
    ok = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert _images(ok, policy) == [PNG]
    bad = {
        "data:image/png;base64,!!!": "not valid base64",
        "data:image/png;base64,QUJD\ud800": "not valid base64",
        "data:image/png;base64,": "1..100 bytes",
        "data:text/plain;base64,aGVsbG8=": "data:image/<type>;base64",
        "data:image/png,rawbytes": "data:image/<type>;base64",
        "data:image/png;base64," + base64.b64encode(b"x" * 101).decode(): "1..100 bytes",
        "data:image/png;base64," + "QUJD" * 1000: "larger than 100 bytes",
        "https://example.com/cat.png": "scheme 'https' is not accepted",
        "ftp://example.com/cat.png": "scheme 'ftp' is not accepted",
    }
    for url, reason in bad.items():
        with pytest.raises(ValueError, match=reason) as info:
            _images(url, policy)
        assert str(info.value).startswith(WHERE + ":"), info.value


def test_base64_without_a_data_prefix_is_a_refused_path_not_a_crash():
    payload = base64.b64encode(PNG * 10).decode()  # 300+ characters, looks like nothing
    policy = ImageSourcePolicy()
    with pytest.raises(ValueError) as info:
        to_turns(_user({"type": "image", "image": payload}), policy)
    assert str(info.value) == refused_path_message("messages[0].content[0].image", policy)
    assert "data:image/<type>;base64" in str(info.value)


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        (_user({"type": "text", "text": "a\ud800b"}), "messages[0].content[0].text"),
        ([{"role": "user", "content": "\udfff"}], "messages[0].content"),
        (["hello"], "messages[0]"),
        ([{"role": ["user"], "content": "x"}], "messages[0].role"),
        ([{"role": "tool", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": {"text": "x"}}], "messages[0].content"),
        (_user({"type": "text", "text": {"nested": ["x"]}}), "messages[0].content[0].text"),
        (_user({"type": ["text"]}), "messages[0].content[0].type"),
        (_user({"type": "image_url", "image_url": {"url": 7}}), "messages[0].content[0].image_url"),
        (
            [{"role": "user", "content": [{"type": "text", "text": "x"}] * 257}],
            "messages[0].content",
        ),
        ([{"role": "user", "content": "x" * (MAX_TEXT + 1)}], "messages[0].content"),
    ],
)
def test_malformed_messages_name_the_field(messages, field):
    with pytest.raises(ValueError) as info:
        to_turns(messages, ImageSourcePolicy())
    assert str(info.value).startswith(field + " "), info.value
    str(info.value).encode("utf-8")  # the message itself is valid Unicode


def test_too_many_images():
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    with pytest.raises(ValueError, match="too many images"):
        to_turns(_user(*[_url(url)] * 3), ImageSourcePolicy(max_images=2))
    with pytest.raises(ValueError, match="max_images"):
        ImageSourcePolicy(max_images=MAX_IMAGES + 1)
    with pytest.raises(ValueError, match="max_bytes"):
        ImageSourcePolicy(max_bytes=MAX_IMAGE_BYTES + 1)


def test_source_bytes_names_its_field():
    with pytest.raises(ValueError, match="^here: image path refused"):
        source_bytes("/etc/shadow", ImageSourcePolicy(), "here")


def test_the_largest_image_the_front_door_accepts_fits_one_job_message():
    """Limits nest: one image of MAX_IMAGE_BYTES (the most any policy accepts) with the most
    blocks a job may carry encodes into one message the codec accepts."""
    n = MAX_BLOCKS
    job = P.EncodeJob(rid="r" * 128, image=MAX_IMAGES - 1, data=b"\xff" * MAX_IMAGE_BYTES,
                      grid=[1, 1 << 10, 1 << 10], n_tokens=n, hidden=1 << 16, dtype="float32",
                      generation=(1 << 63) - 1, session="s" * 256, block_tokens=1,
                      blocks=list(range((1 << 32) - n, 1 << 32)),
                      embed_addrs=[(1 << 63) - 1] * n, deepstack_addrs=[(1 << 63) - 1] * n)  # fmt: skip
    wire = P.encode(job)
    assert len(wire) <= MAX_MESSAGE_BYTES
    assert P.decode(wire) == job


# --- videos -----------------------------------------------------------------------------------

MP4 = b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 40  # bytes only, never decoded here
VIDEO_URL = "data:video/mp4;base64," + base64.b64encode(MP4).decode()
IMAGE_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def _video_url(url: str = VIDEO_URL, **options) -> dict:
    return {"type": "video_url", "video_url": {"url": url, **options}}


def test_a_video_url_gives_its_bytes_and_sampling_options():
    turns, items = to_turns(_user(_video_url(fps=1, max_frames=8)), ImageSourcePolicy())
    assert items == [VideoSource(data=MP4, fps=1.0, max_frames=8)]
    assert turns[0].parts == [P.ContentPart(kind="video", image=0)]
    _, items = to_turns(_user({"type": "video", "video": VIDEO_URL}), ImageSourcePolicy())
    assert items == [VideoSource(data=MP4)]  # no options: the video processor decides


def test_a_list_of_frames_is_a_video_the_client_sampled():
    frames = [IMAGE_URL, "data:image/png;base64," + base64.b64encode(PNG[::-1]).decode()]
    part = {"type": "video", "video": frames, "fps": 2.5}
    turns, items = to_turns(_user(part), ImageSourcePolicy())
    assert items == [VideoSource(frames=(PNG, PNG[::-1]), fps=2.5)]
    assert turns[0].parts[0].kind == "video"
    with pytest.raises(ValueError, match=r"^messages\[0\]\.content\[0\]\.video\[1\]: "):
        to_turns(_user({"type": "video", "video": [IMAGE_URL, VIDEO_URL]}), ImageSourcePolicy())
    with pytest.raises(ValueError, match=f"1..{MAX_VIDEO_FRAMES} frames, got 0"):
        to_turns(_user({"type": "video", "video": []}), ImageSourcePolicy())
    three = _user({"type": "video", "video": [IMAGE_URL] * 3})  # policy.max_bytes: all frames
    with pytest.raises(ValueError, match=r"video: the frames are larger than 96 bytes in all"):
        to_turns(three, ImageSourcePolicy(max_bytes=2 * len(PNG)))
    with pytest.raises(ValueError, match=r"video: the frames are larger than 100 bytes in all"):
        to_turns(three, ImageSourcePolicy(max_bytes=2 * len(PNG) + 4))


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"fps": 0}, "fps"),
        ({"fps": -1}, "fps"),
        ({"fps": "2"}, "fps"),
        ({"fps": True}, "fps"),
        ({"fps": float("nan")}, "fps"),
        ({"fps": 241}, "fps"),
        ({"max_frames": 1}, "max_frames"),
        ({"max_frames": 5000}, "max_frames"),
        ({"max_frames": 2.5}, "max_frames"),
        ({"max_frames": True}, "max_frames"),
    ],
)
def test_bad_sampling_options_name_the_field(options, field):
    with pytest.raises(ValueError) as info:
        to_turns(_user(_video_url(**options)), ImageSourcePolicy())
    assert str(info.value).startswith(f"messages[0].content[0].video_url.{field} must be ")


def test_sampling_options_at_their_bounds_are_accepted():
    _, items = to_turns(_user(_video_url(fps=240, max_frames=4096.0)), ImageSourcePolicy())
    assert items[0].fps == 240.0 and items[0].max_frames == 4096
    assert isinstance(items[0].max_frames, int)
    _, items = to_turns(_user(_video_url(fps=0.1, max_frames=2)), ImageSourcePolicy())
    assert items[0].fps == 0.1 and items[0].max_frames == 2


def test_image_and_video_data_urls_are_not_interchangeable():
    with pytest.raises(ValueError, match=r"video_url: a data URL must look like data:video/"):
        to_turns(_user(_video_url(IMAGE_URL)), ImageSourcePolicy())
    with pytest.raises(ValueError, match=r"image_url: a data URL must look like data:image/"):
        to_turns(_user(_url(VIDEO_URL)), ImageSourcePolicy())
    with pytest.raises(ValueError, match="scheme 'https' is not accepted"):
        to_turns(_user(_video_url("https://example.com/a.mp4")), ImageSourcePolicy())


def test_images_and_videos_share_one_index_space_in_prompt_order():
    first = [_video_url(), {"type": "text", "text": "and"}, _url(IMAGE_URL)]
    second = [{"type": "video", "video": [IMAGE_URL, IMAGE_URL]}]
    messages = [{"role": "user", "content": first}, {"role": "user", "content": second}]
    turns, items = to_turns(messages, ImageSourcePolicy())
    visual = [(p.kind, p.image) for t in turns for p in t.parts if p.kind != "text"]
    assert visual == [("video", 0), ("image", 1), ("video", 2)]
    assert items == [VideoSource(data=MP4), PNG, VideoSource(frames=(PNG, PNG))]


def test_videos_count_towards_max_images():
    parts = [_video_url(), _url(IMAGE_URL), {"type": "video", "video": [IMAGE_URL, IMAGE_URL]}]
    assert len(to_turns(_user(*parts), ImageSourcePolicy(max_images=3))[1]) == 3
    with pytest.raises(ValueError, match="too many images and videos: more than 2"):
        to_turns(_user(*parts), ImageSourcePolicy(max_images=2))


def test_local_video_paths_follow_the_image_policy(media):
    (media / "clip.mp4").write_bytes(MP4)
    policy = ImageSourcePolicy(local_root=media, max_bytes=1000)
    for url in ("clip.mp4", str(media / "clip.mp4"), f"file://{media}/clip.mp4"):
        assert to_turns(_user(_video_url(url)), policy)[1] == [VideoSource(data=MP4)], url
    where = "messages[0].content[0].video_url"
    for url, pol in (("../secret.txt", policy), ("outside-link.png", policy),
                     ("clip.mp4", ImageSourcePolicy())):  # fmt: skip
        with pytest.raises(ValueError) as info:
            to_turns(_user(_video_url(url)), pol)
        assert str(info.value) == refused_path_message(where, pol, "video"), url
        assert "video path refused" in str(info.value)
    frames = {"type": "video", "video": ["cat.png", "sub/dog.png"]}  # frames from files too
    assert to_turns(_user(frames), policy)[1] == [VideoSource(frames=(PNG, PNG[::-1]))]
