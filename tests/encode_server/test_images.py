"""Untrusted image input: the encoder's ``decode_image``, and where image bytes may come from
(``protocol.chat.to_turns``, run by the language side before any bytes reach an encoder)."""

from __future__ import annotations

import base64

import pytest
from PIL import Image

from encode_server.images import ImageLimits, decode_image
from protocol.chat import ImageSourcePolicy, to_turns

LIMITS = ImageLimits()
POLICY = ImageSourcePolicy()


def _url_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def test_decode_gives_rgb_pixels_unchanged(make_image, encode_image):
    image = make_image(40, 70, seed=5)
    for data in (
        encode_image(image),
        encode_image(image.convert("RGBA")),
        encode_image(image, "BMP"),
    ):
        out = decode_image(data, LIMITS)
        assert out.mode == "RGB" and out.size == (70, 40)
        assert out.tobytes() == image.tobytes()
    assert decode_image(encode_image(image.convert("L")), LIMITS).mode == "RGB"


def test_decode_applies_exif_orientation(make_image, encode_image):
    image = make_image(40, 70, seed=6)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(encode_image(image, "JPEG", exif=exif, quality=95), LIMITS)
    assert out.size == (40, 70)


@pytest.mark.parametrize(
    "data", [b"not an image", b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"GIF89a\x01"]
)
def test_undecodable_bytes_are_rejected(data):
    with pytest.raises(ValueError, match="cannot decode"):
        decode_image(data, LIMITS)


def test_truncated_image_is_rejected(make_image, encode_image):
    data = encode_image(make_image(64, 64))[:200]
    with pytest.raises(ValueError, match="cannot decode"):
        decode_image(data, LIMITS)


def test_size_limits(make_image, encode_image):
    data = encode_image(make_image(64, 64))
    with pytest.raises(ValueError, match="pixels"):
        decode_image(data, ImageLimits(max_pixels=1000))
    with pytest.raises(ValueError, match="larger than"):
        decode_image(data, ImageLimits(max_bytes=100))
    with pytest.raises(ValueError, match="aspect ratio"):
        decode_image(encode_image(Image.new("RGB", (401, 2))), LIMITS)
    with pytest.raises(ValueError, match="positive"):
        ImageLimits(max_pixels=0)


def test_pixel_limit_is_checked_before_decoding(make_image, encode_image, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels decoded"))
    with pytest.raises(ValueError, match="pixels"):
        decode_image(encode_image(make_image(64, 64)), ImageLimits(max_pixels=1000))


def test_data_url_file_path_and_file_url_are_accepted(tmp_path, make_image, encode_image):
    data = encode_image(make_image(40, 70, seed=5))
    path = tmp_path / "pic.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    messages = _user(_url_part(url), _url_part(str(path)), {"type": "image", "image": f"file://{path}"},
                     {"type": "text", "text": "hi"})  # fmt: skip
    turns, images = to_turns(messages, ImageSourcePolicy(local_root=tmp_path))
    assert [p.kind for p in turns[0].parts] == ["image"] * 3 + ["text"]
    assert [p.image for p in turns[0].parts[:3]] == [0, 1, 2]
    assert images == [data] * 3


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("data:image/png;base64,!!!notbase64", "not valid base64"),
        ("data:text/plain;base64,aGVsbG8=", "data:image"),
        ("data:image/png,rawbytes", "data:image"),
        ("http://example.com/cat.png", "scheme 'http'"),
        ("https://example.com/cat.png", "scheme 'https'"),
        ("ftp://example.com/cat.png", "scheme 'ftp'"),
        ("/definitely/not/here.png", "image path refused"),  # paths are off by default
    ],
)
def test_bad_image_urls_are_rejected(url, match):
    with pytest.raises(ValueError, match=match):
        to_turns(_user(_url_part(url)), POLICY)


def test_local_files_obey_the_policy(tmp_path, make_image, encode_image):
    inside, outside = tmp_path / "ok", tmp_path / "other"
    inside.mkdir()
    outside.mkdir()
    (outside / "x.png").write_bytes(encode_image(make_image(32, 32)))
    confined = ImageSourcePolicy(local_root=inside)
    with pytest.raises(ValueError, match="image path refused"):
        to_turns(_user(_url_part(str(inside / ".." / "other" / "x.png"))), confined)
    with pytest.raises(ValueError, match="image path refused"):
        to_turns(_user(_url_part(str(outside / "x.png"))), ImageSourcePolicy())
    url = "data:image/png;base64," + base64.b64encode(b"x" * 200).decode()
    with pytest.raises(ValueError, match="larger than"):
        to_turns(_user(_url_part(url)), ImageSourcePolicy(max_bytes=100))
    with pytest.raises(ValueError, match="too many images"):
        to_turns(_user(*[_url_part(url)] * 3), ImageSourcePolicy(max_images=2))


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
        to_turns(messages, POLICY)
