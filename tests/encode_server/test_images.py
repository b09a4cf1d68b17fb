"""Untrusted image input: what is accepted, and the clear ValueError for everything else."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from encode_server.images import ImageLimits, split_messages

LIMITS = ImageLimits()


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _url_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def test_data_url_file_path_and_pil_are_accepted(tmp_path, make_image):
    image = make_image(40, 70, seed=5)
    path = tmp_path / "pic.png"
    path.write_bytes(_png(image))
    url = "data:image/png;base64," + base64.b64encode(_png(image)).decode()
    messages = _user(
        _url_part(url),
        _url_part(str(path)),
        _url_part(f"file://{path}"),
        {"type": "image", "image": image.convert("L")},
        {"type": "text", "text": "hi"},
    )
    template, images = split_messages(messages, LIMITS)
    assert [p["type"] for p in template[0]["content"]] == ["image"] * 4 + ["text"]
    assert all(im.mode == "RGB" and im.size == (70, 40) for im in images)
    assert images[0].tobytes() == image.tobytes() == images[1].tobytes()


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("data:image/png;base64,!!!notbase64", "not valid base64"),
        ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "cannot decode"),
        ("data:text/plain;base64,aGVsbG8=", "data:image"),
        ("data:image/png,rawbytes", "data:image"),
        ("http://example.com/cat.png", "scheme 'http'"),
        ("https://example.com/cat.png", "scheme 'https'"),
        ("ftp://example.com/cat.png", "scheme 'ftp'"),
        ("/definitely/not/here.png", "not a readable file"),
    ],
)
def test_bad_image_urls_are_rejected(url, match):
    with pytest.raises(ValueError, match=match):
        split_messages(_user(_url_part(url)), LIMITS)


def test_truncated_image_is_rejected(make_image):
    data = _png(make_image(64, 64))[:200]
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    with pytest.raises(ValueError, match="cannot decode"):
        split_messages(_user(_url_part(url)), LIMITS)


def test_local_files_obey_the_limits(tmp_path, make_image):
    inside, outside = tmp_path / "ok", tmp_path / "other"
    inside.mkdir()
    outside.mkdir()
    (outside / "x.png").write_bytes(_png(make_image(32, 32)))
    confined = ImageLimits(local_root=inside)
    with pytest.raises(ValueError, match="outside the allowed directory"):
        split_messages(_user(_url_part(str(inside / ".." / "other" / "x.png"))), confined)
    with pytest.raises(ValueError, match="not accepted"):
        split_messages(
            _user(_url_part(str(outside / "x.png"))), ImageLimits(allow_local_files=False)
        )


def test_size_limits(make_image):
    big = make_image(64, 64)
    url = "data:image/png;base64," + base64.b64encode(_png(big)).decode()
    with pytest.raises(ValueError, match="pixels"):
        split_messages(_user(_url_part(url)), ImageLimits(max_pixels=1000))
    with pytest.raises(ValueError, match="larger than"):
        split_messages(_user(_url_part(url)), ImageLimits(max_bytes=100))
    with pytest.raises(ValueError, match="too many images"):
        split_messages(_user(*[_url_part(url)] * 3), ImageLimits(max_images=2))
    with pytest.raises(ValueError, match="aspect ratio"):
        split_messages(_user({"type": "image", "image": Image.new("RGB", (401, 2))}), LIMITS)


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hello",
        [{"role": "wizard", "content": "hi"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": ["just a string"]}],
        _user({"type": "audio", "audio": "x"}),
        _user({"type": "text", "text": 3}),
        _user({"type": "image_url", "image_url": {"url": 7}}),
        _user({"type": "image", "image": b"raw bytes"}),
    ],
)
def test_malformed_messages_are_rejected(messages):
    with pytest.raises(ValueError):
        split_messages(messages, LIMITS)
