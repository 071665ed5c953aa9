"""Bad input gets a clear error or a documented fallback, never a crash deep inside torch or PIL."""

import io

import pytest
from PIL import Image
from transformers import pipeline

from conftest import noise_image
from ergo_vqa.testing_utils import scripted_stage1, zoom_text
from processing_ergo.images_ergo import ErgoImageError, load_image


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "source, message",
    [
        (b"definitely not an image", "cannot read image"),
        (png_bytes(noise_image(200, 200))[:400], "cannot read image"),  # truncated
        ("/no/such/file.png", "not found"),
        (Image.new("RGB", (0, 5)), "no pixels"),
        (12345, "unsupported image type"),
    ],
)
def test_unusable_images_fail_clearly(source, message):
    with pytest.raises(ErgoImageError, match=message):
        load_image(source, name="sample 3")


def test_decompression_bombs_are_refused(monkeypatch):
    data = png_bytes(Image.new("L", (400, 400)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # PIL's own limit, lowered to keep the test small
    with pytest.raises(ErgoImageError, match="too large"):
        load_image(data)


@pytest.mark.parametrize("mode", ["L", "LA", "La", "RGBA", "RGBa", "PA", "CMYK", "P", "1", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    if mode in ("I;16", "I", "F"):
        image = Image.linear_gradient("L").convert("I").point(lambda v: v * 200)
        image = image.convert(mode) if mode != "I" else image
    elif mode in ("La", "PA"):  # PIL converts to these only from their plain-alpha modes
        image = noise_image(64, 48).convert({"La": "LA", "PA": "P"}[mode]).convert(mode)
    else:
        image = noise_image(64, 48).convert(mode)
    rgb = load_image(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    if mode.startswith("I") or mode == "F":
        levels = rgb.convert("L").getcolors(256)
        assert len(levels) > 200  # stretched to 8 bits, not clipped to white


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert load_image(image).getpixel((5, 5)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["LA", "La", "RGBa", "P"])
def test_alpha_modes_composite_onto_white(mode):
    """Half-transparent black shows as mid grey, whether the alpha is straight (LA), premultiplied (La, RGBa) or a
    palette's transparent index (P, fully transparent: white)."""
    if mode == "P":
        image = Image.new("P", (10, 10), 3)
        image.info["transparency"] = 3
        expected = {255}
    else:
        base = "LA" if mode == "La" else "RGBA"
        image = Image.new(base, (10, 10), (0, 128) if base == "LA" else (0, 0, 0, 128)).convert(mode)
        expected = {126, 127}
    assert set(load_image(image).getpixel((5, 5))) <= expected


def test_mixed_batch_of_odd_but_usable_inputs_runs(model, processor):
    images = [
        Image.new("RGB", (1, 1), "red"),  # upscaled to the 4-token minimum
        noise_image(1, 2000),  # 1:2000, but 28 x 1988 after ERGO's resize: within Qwen's 200:1
        noise_image(300, 200).convert("L"),
        noise_image(300, 200).convert("RGBA"),
        noise_image(300, 200).convert("CMYK"),
        noise_image(300, 200).convert("P"),
        noise_image(900, 700),
        noise_image(900, 700),
        noise_image(900, 700),
        noise_image(900, 700),
    ]
    texts = [
        zoom_text((0, 0, 40, 40)),  # a 1x1 original has no sub-pixel regions: degenerate
        zoom_text((0, 0, 28, 900)),
        "<zoom>[-5, 0, 10, 10]</zoom>",  # negative: unparsable
        zoom_text((60, 60, 10, 10)),  # inverted
        zoom_text((5, 5, 5, 40)),  # zero width
        zoom_text((900, 900, 999, 999)),  # entirely out of range
        "<zoom>[1.0, 2.0, 30.0, 40.0]</zoom>",  # floats
        "<zoom>[1, 2, 30, 40] [3, 4, 50, 60]</zoom>",  # several boxes
        "I cannot tell.",  # no zoom at all
        zoom_text((0, 0, 5000, 5000)),  # out of range: clamped to the whole image
    ]
    inputs = processor.prepare(images, ["What is it?"] * len(images))
    out = model.generate(**inputs, max_new_tokens=4, return_dict_in_generate=True,
                         stage1_generate_kwargs=scripted_stage1(processor, texts))
    assert out.fallbacks == ["degenerate_box", None, "no_region", "degenerate_box", "degenerate_box", "degenerate_box",
                             "no_region", "no_region", "no_region", None]
    assert out.regions[9] == (0, 0, 900, 700)
    assert len(out.sequences) == len(images)  # nobody dropped
    assert out.vision_tokens[1]["full_resolution"] is None  # Qwen's processor refuses 1:2000 unresized


def test_reference_fallback_resizes_what_qwen_cannot_take_unresized(model, processor):
    inputs = processor.prepare([noise_image(1, 2000)], ["What is it?"], fallback="reference")
    out = model.generate(**inputs, max_new_tokens=2, return_dict_in_generate=True,
                         stage1_generate_kwargs=scripted_stage1(processor, ["no box"]))
    assert out.fallbacks == ["no_region"] and out.crop_sizes == [(28, 64 * 28)]


@pytest.mark.parametrize(
    "image, question, error, message",
    [
        (noise_image(300, 200), "", ValueError, "sample 0: the question is empty"),
        (noise_image(300, 200), "  \n", ValueError, "empty"),
        (b"junk", "q", ErgoImageError, r"^4 bytes: cannot read image"),
        (noise_image(300, 200), 42, ValueError, r"sample 0: the question must be a string, got int \(42\)"),
        (noise_image(300, 200), None, ValueError, "sample 0: the question is empty"),
        (noise_image(300, 200), ["What?"], ValueError, r"must be a string, got list \(\['What\?'\]\)"),
    ],
)
def test_unusable_requests_fail_before_generation(processor, image, question, error, message):
    with pytest.raises(error, match=message):
        processor.prepare([image], [question])


def test_images_flatter_than_qwen_accepts_fail_clearly(processor):
    # At 1280 tokens a 1x10000 image stays 28 x 10010 px: 357:1, beyond what Qwen2.5-VL's processor takes.
    with pytest.raises(ErgoImageError, match="sample 0: .*200:1"):
        processor.prepare([noise_image(1, 10000)], ["q"], coarse_budget=1280)


def test_mismatched_batches_fail_clearly(processor):
    with pytest.raises(ValueError, match="one each"):
        processor.prepare([noise_image(30, 30)], ["a", "b"])
    with pytest.raises(TypeError, match="list"):
        processor.prepare(noise_image(30, 30), "a")


def test_a_bad_image_in_a_batch_is_named_by_its_request(processor, model, tmp_path):
    """One unreadable image fails its batch (a BatchFeature cannot carry a missing sample); the error names the
    request by index and source, also in pipeline(batch_size=N), where every request is prepared on its own."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG truncated")
    good = noise_image(300, 200, 1)
    with pytest.raises(ErgoImageError, match=r"sample 1 \(.*broken\.png\): cannot read image"):
        processor.prepare([good, str(broken), good], ["What?"] * 3)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    requests = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
                for image in (good, str(broken))]
    with pytest.raises(ErgoImageError, match=r"^\S*broken\.png: cannot read image") as failure:
        pipe(text=requests, batch_size=2, max_new_tokens=2)
    assert "sample 0" not in str(failure.value)  # each request is its own call's sample 0: not a useful name
