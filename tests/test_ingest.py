"""Every rejection reason, every conversion, sidecar captions, duplicates."""

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import photo, save_photo
from tuneline.core.images import load_normalized


def reasons(project):
    return {r["source"].split("/")[-1]: r["reason"] for r in project.rejected("data/ingested")}


def test_every_rejection_reason_is_reported_and_nothing_stops(project):
    folder = project.raw("alpha")
    project.raw("beta")
    save_photo(folder / "good.jpg", (200, 150))
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not a picture")
    data = io.BytesIO()
    photo((300, 200), 1).save(data, "JPEG", quality=95)
    (folder / "cut.jpg").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    data = io.BytesIO()
    photo((300, 200), 2).save(data, "PNG")
    (folder / "cut.png").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    save_photo(folder / "tiny.png", (40, 300), 3)
    save_photo(folder / "huge.png", (400, 300), 4)
    (folder / "movie.mp4").write_bytes(b"\x00" * 10)
    (folder / ".hidden.jpg").write_bytes(b"ignored: hidden files are not data")

    report = project.ingest(project.params(ingest={"min_size": 64, "max_pixels": 100_000, "workers": 1}))
    found = reasons(project)
    assert found["empty.png"] == "zero-byte file"
    assert found["notes.jpg"] == "not an image despite the extension '.jpg'"
    assert found["cut.jpg"].startswith("truncated or corrupt image data")
    assert found["cut.png"].startswith("truncated or corrupt image data")
    assert found["tiny.png"] == "too small: 40x300, shorter side is below min_size 64"
    assert found["huge.png"].startswith("too many pixels: 400x300 = 0.1 MP exceeds max_pixels")
    assert found["movie.mp4"] == "unsupported file type: .mp4"
    assert ".hidden.jpg" not in found
    assert [item["source"] for item in project.manifest("data/ingested")] == ["data/raw/alpha/good.jpg"]
    assert report.produced == 1 and len(report.rejected) == 7
    assert report.rejection_counts()["too small"] == 1


def test_broken_link_is_reported(project):
    folder = project.raw("alpha")
    (folder / "gone.jpg").symlink_to(folder / "missing.jpg")
    report = project.ingest()
    assert reasons(project)["gone.jpg"].startswith("unreadable:")
    assert report.produced == 0


def test_duplicates_by_bytes_and_by_pixels_are_kept_once(project):
    alpha, beta = project.raw("alpha"), project.raw("beta")
    save_photo(alpha / "a.png", (120, 100), 1)
    shutil.copy(alpha / "a.png", beta / "copy.png")  # same bytes, other data set
    Image.open(alpha / "a.png").save(alpha / "a_again.bmp")  # same pixels, other format
    save_photo(alpha / "j.jpg", (640, 480), 2, quality=90)
    comment = b"same pixels, other bytes"
    data = (alpha / "j.jpg").read_bytes()  # a COM segment right after SOI: bytes differ, pixels not
    (alpha / "j_meta.jpg").write_bytes(data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:])
    # Differs only in fine detail: equal at 1/8 scale, so its fingerprint may collide; must be kept.
    pixels = np.asarray(Image.open(alpha / "j.jpg")).copy()
    pixels[100:108, 100:108] ^= np.indices((8, 8)).sum(0)[..., None].astype(np.uint8) % 2 * 60
    Image.fromarray(pixels).save(alpha / "j_edit.jpg", quality=90)

    report = project.ingest()
    found = reasons(project)
    assert found["copy.png"] == "duplicate: same bytes as data/raw/alpha/a.png"
    assert found["a_again.bmp"] == "duplicate: same pixels as data/raw/alpha/a.png"
    assert found["j_meta.jpg"] == "duplicate: same pixels as data/raw/alpha/j.jpg"
    kept = sorted(item["source"].split("/")[-1] for item in project.manifest("data/ingested"))
    assert kept == ["a.png", "j.jpg", "j_edit.jpg"]
    assert report.extra["duplicates"] == 3


def _normalised(project, path):
    project.ingest()
    [record] = [r for r in project.manifest("data/ingested") if r["source"].endswith(path.name)]
    image = load_normalized(project.root / record["source"], record["background"] or "white", None, 10**8)
    return record, image


def test_exif_orientation_is_applied(project):
    folder = project.raw("alpha")
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 100, 100))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise on display
    image.save(folder / "rotated.jpg", exif=exif, quality=95)
    record, upright = _normalised(project, folder / "rotated.jpg")
    assert (record["width"], record["height"]) == (100, 200)
    assert upright.size == (100, 200)
    top, bottom = np.asarray(upright)[10, 50], np.asarray(upright)[190, 50]
    assert top[2] > 200 and bottom[0] > 200  # the blue half is now on top


@pytest.mark.parametrize("mode", ["CMYK", "P", "L", "1", "I;16", "LA", "RGBA", "P+transparency"])
def test_modes_become_rgb(project, mode):
    folder = project.raw("alpha")
    base = photo((96, 80), 7)
    suffix = ".png"
    if mode == "I;16":
        gray = np.full((80, 96), 32768, np.uint16)
        gray[:, :48] = 65535
        image = Image.fromarray(gray)
        assert image.mode == "I;16"
    elif mode in ("LA", "RGBA", "P+transparency"):
        alpha = np.full((80, 96), 255, np.uint8)
        alpha[:, :48] = 0  # left half transparent
        image = Image.fromarray(np.dstack([np.asarray(base), alpha]), "RGBA")
        if mode == "LA":
            image = image.convert("LA")
        if mode == "P+transparency":
            image, suffix = image.convert("P", palette=Image.Palette.ADAPTIVE), ".gif"
            image.info["transparency"] = image.getpixel((0, 0))
    else:
        image = base.convert(mode)
        suffix = ".tif" if mode == "CMYK" else suffix
    image.save(folder / f"img{suffix}")
    record, result = _normalised(project, folder / f"img{suffix}")
    assert result.mode == "RGB" and result.size == (96, 80)
    pixels = np.asarray(result).astype(int)
    if mode == "I;16":  # scaled from 16 to 8 bits, not clipped
        assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[0, 90]) == (128, 128, 128)
    if mode in ("LA", "RGBA", "P+transparency"):
        assert record["has_alpha"] and record["background"] == "white"
        assert tuple(pixels[10, 10]) == (255, 255, 255)  # transparent half shows the background
        assert tuple(pixels[10, 90]) != (255, 255, 255)
    else:
        assert not record["has_alpha"] and record["background"] is None
    if mode == "CMYK":
        assert np.abs(pixels - np.asarray(base).astype(int)).mean() < 12


def test_background_setting_is_used_for_transparency(project):
    folder = project.raw("alpha")
    image = Image.new("RGBA", (80, 80), (255, 0, 0, 0))
    image.save(folder / "clear.png")
    project.ingest(project.params(ingest={"background": "#00ff00"}))
    [record] = project.manifest("data/ingested")
    assert record["background"] == "#00ff00"
    result = load_normalized(project.root / record["source"], record["background"], None, 10**8)
    assert tuple(np.asarray(result)[5, 5]) == (0, 255, 0)


@pytest.mark.parametrize("suffix, args", [(".webp", {"lossless": True}), (".bmp", {}), (".tiff", {}),
                                          (".gif", {}), (".jpeg", {"quality": 90})])
def test_formats(project, suffix, args):
    folder = project.raw("alpha")
    save_photo(folder / f"x{suffix}", (90, 70), 5, **args)
    record, image = _normalised(project, folder / f"x{suffix}")
    assert image.mode == "RGB" and image.size == (90, 70) and (record["width"], record["height"]) == (90, 70)


def test_animated_gif_uses_first_frame(project):
    folder = project.raw("alpha")
    frames = [Image.new("RGB", (80, 80), color) for color in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    _, image = _normalised(project, folder / "anim.gif")
    assert tuple(np.asarray(image)[40, 40]) == (255, 0, 0)


def test_sidecar_captions_in_any_encoding(project):
    folder = project.raw("alpha")
    for index, name in enumerate(["plain", "bom", "utf16", "latin", "empty"]):
        save_photo(folder / f"{name}.png", (80, 80), index)
    (folder / "plain.txt").write_text("  a red  car\n on a road \n", "utf-8")
    (folder / "bom.txt").write_bytes("\ufeffcafé au lait".encode("utf-8"))
    (folder / "utf16.txt").write_text("naïve art", "utf-16")
    (folder / "latin.txt").write_bytes("crème brûlée".encode("latin-1"))
    (folder / "empty.txt").write_text("\n")
    report = project.ingest()
    captions = {r["source"].split("/")[-1]: r["caption"] for r in project.manifest("data/ingested")}
    assert captions["plain.png"] == "a red car on a road"
    assert captions["bom.png"] == "café au lait"
    assert captions["utf16.png"] == "naïve art"
    assert captions["latin.png"] == "cr\ufffdme br\ufffdl\ufffde"
    assert captions["empty.png"] is None
    assert len(report.warnings) == 1 and "latin.txt: not UTF-8" in report.warnings[0]
    assert report.extra["captions_from_sidecars"] == 4
