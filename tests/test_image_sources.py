"""Every image source reaches the model upright (EXIF orientation), and URLs, bombs and bad base64 fail clearly."""

import base64
import io
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from PIL import Image

from conftest import noise_image
from ergo_vqa.cli import main
from processing_ergo.images_ergo import ErgoImageError, load_image

RED, GREEN, WHITE = (255, 0, 0), (0, 255, 0), (255, 255, 255)
# What the camera must store so that a viewer, applying the tag, shows the upright picture: the inverse turn.
STORED_TURN = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
OFFLINE_URL = "http://127.0.0.1:9/x.png"  # the discard port: nothing listens, the connection is refused at once


def upright_picture(width: int, height: int) -> Image.Image:
    """White, with a red top-left and a green top-right corner: together they pin down any turn or flip."""
    image = Image.new("RGB", (width, height), WHITE)
    image.paste(RED, (0, 0, 100, 100))
    image.paste(GREEN, (width - 100, 0, width, 100))
    return image


def oriented_jpeg(orientation: int) -> bytes:
    """An 800x400 JPEG whose EXIF orientation tag says how to turn it upright (400x800 for 6 and 8)."""
    upright = upright_picture(400, 800) if orientation in (6, 8) else upright_picture(800, 400)
    stored = upright.transpose(STORED_TURN[orientation])
    assert stored.size == (800, 400)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif, quality=95)
    return buffer.getvalue()


def assert_upright(image: Image.Image, size: tuple[int, int]) -> None:
    assert image.size == size
    width, height = size

    def near(pixel, colour):
        return all(abs(a - b) < 40 for a, b in zip(pixel, colour))

    assert near(image.getpixel((50, 50)), RED)
    assert near(image.getpixel((width - 50, 50)), GREEN)
    assert near(image.getpixel((50, height - 50)), WHITE) and near(image.getpixel((width - 50, height - 50)), WHITE)


class _Serve(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """A local HTTP server answering every GET with the given bytes: a real URL without the network."""
    servers = []

    def start(body: bytes) -> str:
        handler = type("Handler", (_Serve,), {"body": body})
        server = HTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/photo.jpg"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("orientation, size", [(3, (800, 400)), (6, (400, 800)), (8, (400, 800))])
@pytest.mark.parametrize("form", ["path", "bytes", "data_uri", "raw_base64", "opened_file", "opened_bytes", "url"])
def test_exif_orientation_is_applied_for_every_source(tmp_path, serve, orientation, size, form):
    data = oriented_jpeg(orientation)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    source = {
        "path": lambda: str(path),
        "bytes": lambda: data,
        "data_uri": lambda: "data:image/jpeg;base64," + base64.b64encode(data).decode(),
        "raw_base64": lambda: base64.b64encode(data).decode(),
        "opened_file": lambda: Image.open(path),
        "opened_bytes": lambda: Image.open(io.BytesIO(data)),
        "url": lambda: serve(data),
    }[form]()
    assert_upright(load_image(source), size)


def test_an_upright_pil_image_is_returned_as_is():
    image = upright_picture(300, 200)
    assert load_image(image) is image


def test_the_processor_and_the_cli_see_the_picture_upright(processor, tiny_folder, tmp_path, capsys):
    path = tmp_path / "photo.jpg"
    path.write_bytes(oriented_jpeg(6))
    sample = processor.prepare([str(path)], ["What is it?"])["ergo_context"].samples[0]
    assert_upright(sample.image, (400, 800))
    assert sample.coarse_size[0] < sample.coarse_size[1]  # the coarse view is portrait too
    viz = tmp_path / "viz.png"
    assert main(["infer", "--model", str(tiny_folder), "--image", str(path), "--question", "What is it?",
                 "--budget", "16", "--max-new-tokens", "2", "--viz", str(viz)]) == 0
    assert_upright(Image.open(viz), (400, 800))


def test_an_unreachable_url_names_the_sample():
    with pytest.raises(ErgoImageError, match=r"sample 7: cannot fetch http://127\.0\.0\.1:9/x\.png"):
        load_image(OFFLINE_URL, name="sample 7")


def test_an_unreachable_url_names_the_sample_in_prepare(processor):
    with pytest.raises(ErgoImageError, match="sample 1.*cannot fetch"):
        processor.prepare([noise_image(64, 64), OFFLINE_URL], ["a?", "b?"])


def test_ergo_infer_exits_2_for_an_unreachable_url(tiny_folder, capsys):
    assert main(["infer", "--model", str(tiny_folder), "--image", OFFLINE_URL, "--question", "What is it?"]) == 2
    error = capsys.readouterr().err
    assert "ergo: error:" in error and OFFLINE_URL in error and "Traceback" not in error


def test_an_http_error_status_is_reported():
    class Missing(_Serve):
        def do_GET(self):
            self.send_error(404)

    server = HTTPServer(("127.0.0.1", 0), Missing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ErgoImageError, match="sample 2: cannot fetch .*404"):
            load_image(f"http://127.0.0.1:{server.server_port}/gone.png", name="sample 2")
    finally:
        server.shutdown()
        server.server_close()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, on opening the file
@pytest.mark.parametrize("form", ["bytes", "path", "pil"])
def test_images_over_pils_pixel_limit_are_refused(monkeypatch, tmp_path, form):
    """Over ``Image.MAX_IMAGE_PIXELS`` but under twice it, where PIL itself only warns."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # lowered to keep the test small; restored after
    image = Image.new("L", (150, 100))
    path = tmp_path / "big.png"
    image.save(path)
    source = {"bytes": png_bytes(image), "path": str(path), "pil": image}[form]
    with pytest.raises(ErgoImageError, match=r"sample 5: image too large to decode safely \(150x100 ="):
        load_image(source, name="sample 5")


def test_images_at_pils_pixel_limit_load(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    assert load_image(png_bytes(Image.new("L", (100, 100)))).size == (100, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's way of turning the check off
    assert load_image(png_bytes(Image.new("L", (150, 100)))).size == (150, 100)


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(bytes(range(256)) * 12).decode(),  # valid base64, but not an image
        "iVBORw0KGgo" + "!" * 5000,  # not base64 at all
        base64.b64encode(png_bytes(noise_image(40, 40)))[:-3].decode(),  # cut short: broken padding
    ],
)
def test_bad_raw_base64_is_not_repeated_in_the_error(text):
    with pytest.raises(ErgoImageError) as caught:
        load_image(text, name="sample 4")
    message = str(caught.value)
    assert message.startswith("sample 4: ") and "not found" in message
    assert f"{text[:40]}... ({len(text)} characters)" in message
    assert len(message) < 200


def test_a_url_that_sends_too_much_or_redirects_off_http_is_refused(monkeypatch):
    from processing_ergo import images_ergo

    class Large(_Serve):
        def do_GET(self):
            if self.path == "/away.png":
                self.send_response(302)
                self.send_header("Location", "ftp://127.0.0.1/x.png")
                self.end_headers()
                return
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 2048)

    monkeypatch.setattr(images_ergo, "MAX_DOWNLOAD_BYTES", 1024)
    server = HTTPServer(("127.0.0.1", 0), Large)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ErgoImageError, match="sample 3: cannot fetch .*more than 1024 bytes"):
            load_image(f"http://127.0.0.1:{server.server_port}/big.png", name="sample 3")
        with pytest.raises(ErgoImageError, match="sample 4: cannot fetch"):
            load_image(f"http://127.0.0.1:{server.server_port}/away.png", name="sample 4")
    finally:
        server.shutdown()
        server.server_close()
