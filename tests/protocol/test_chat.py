"""``protocol.chat``: where image bytes may come from (data: URLs; local paths only inside the
allowed directory, one answer for every refused path), text validity, and limits that nest."""

from __future__ import annotations

import base64
import os

import pytest

import protocol as P
from protocol.chat import ImageSourcePolicy, refused_path_message, source_bytes, to_turns
from protocol.codec import MAX_MESSAGE_BYTES
from protocol.messages import MAX_BLOCKS, MAX_IMAGE_BYTES, MAX_IMAGES, MAX_TEXT

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
