"""Image engines end to end: generation routed like text, results hosted and served by the gateway."""

from __future__ import annotations

import os
import struct

import httpx
import pytest

from gateway.files import LocalFileStore, image_extension
from gateway.testing import make_config

pytestmark = pytest.mark.e2e


def image_config(upstream_url: str, **image: object) -> dict:
    config = make_config(upstream_url)
    config["engines"] = [
        {
            "code": "acme_image",
            "name": "ACME pictures",
            "category": "image",
            "token": "img-token-0123456789abcdef",
            "route": [{"provider": "up", "model": "dall-e-3"}],
            "image": image,
        }
    ]
    return config


def image_request(portal, **prompt: object):
    return portal.new_request(category="image", prompt={"prompt": "a lighthouse", "style": None, "format": None, **prompt}, payload_provider="styledpicture")


def png_size(data: bytes) -> tuple[int, int]:
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("mode", ["b64", "url"])
def test_images_are_hosted_and_served(gateway, portal, upstream, mode):
    upstream.image_mode = mode
    gw = gateway(image_config(upstream.url, max_images=2))
    job_hash, body = image_request(portal, style="watercolor", format="portrait", images_number=3)
    assert portal.send(gw.completions_url("acme_image"), body).status_code == 202
    [callback] = portal.wait(job_hash, 20).delivered
    urls = callback.body["result"]
    assert callback.kind == "success" and len(urls) == 2  # images_number 3, capped by max_images
    sent = upstream.requests[0]
    assert (sent["prompt"], sent["size"], sent["n"], sent["model"]) == ("watercolor, a lighthouse", "1024x1792", 2, "dall-e-3")
    for url, original in zip(urls, upstream.pictures, strict=True):
        assert url.startswith(gw.url + "/files/") and url.endswith(".png")
        served = httpx.get(url)  # as the portal's user would, hours later
        assert served.status_code == 200 and served.headers["content-type"] == "image/png"
        assert served.content == original and png_size(served.content) == (8, 14)
        assert served.headers["etag"] and "max-age=2592000" in served.headers["cache-control"]
        assert httpx.get(url, headers={"If-None-Match": served.headers["etag"]}).status_code == 304
    assert len(set(urls)) == 2 and all(len(u.rsplit("/", 1)[1]) == len("x" * 32 + ".png") for u in urls)


@pytest.mark.parametrize("fmt, size", [(None, "1024x1024"), ("square", "1024x1024"), ("landscape", "1792x1024"), ("portrait", "512x896")])
def test_format_maps_to_size_with_engine_overrides(gateway, portal, upstream, fmt, size):
    gw = gateway(image_config(upstream.url, sizes={"portrait": "512x896"}))
    job_hash, body = image_request(portal, format=fmt)
    portal.send(gw.completions_url("acme_image"), body)
    assert portal.wait(job_hash, 20).delivered[0].kind == "success"
    assert upstream.requests[0]["size"] == size and upstream.requests[0]["n"] == 1
    assert upstream.requests[0]["prompt"] == "a lighthouse"  # no style: the prompt alone


@pytest.mark.parametrize("failure, code", [("500", 503), ("garbage", 502)])
def test_failures_reach_the_error_callback(gateway, portal, upstream, failure, code):
    if failure == "garbage":
        upstream.image_mode = "garbage"
    else:
        upstream.script(*[failure] * 3)
    gw = gateway(image_config(upstream.url))
    job_hash, body = image_request(portal)
    portal.send(gw.completions_url("acme_image"), body)
    [callback] = portal.wait(job_hash, 20).delivered
    assert callback.kind == "error" and callback.body["code"] == code
    if failure == "garbage":
        assert "not a PNG, JPEG or WebP image" in callback.body["message"]
    files = gw.workdir / "var" / "files"
    assert not files.exists() or os.listdir(files) == []  # nothing stored for a failed task


def test_bad_image_prompts_are_refused(gateway, portal, upstream):
    gw = gateway(image_config(upstream.url))
    for prompt, field in (
        ({"prompt": ""}, "prompt.prompt"),
        ({"prompt": "x", "format": "round"}, "prompt.format"),
        ({"prompt": "x", "images_number": 0}, "prompt.images_number"),
        ("a string", "prompt"),
    ):
        _, body = portal.new_request(category="image", prompt=prompt)
        response = portal.send(gw.completions_url("acme_image"), body)
        assert response.status_code == 422 and field in response.json()["error"]["message"]
    assert upstream.requests == []


def test_unknown_and_traversing_file_names_are_404(gateway, upstream):
    gw = gateway(image_config(upstream.url))
    (gw.workdir / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    for path in (
        "/files/nope.png",
        "/files/..%2Fgateway.yaml",
        "/files/../gateway.yaml",
        "/files/%2e%2e%2fsecret.png",
        "/files/" + "a" * 32 + ".exe",
        "/files/" + "a" * 32 + ".png",
        "/files/.hidden.png",
    ):
        assert httpx.get(gw.url + path).status_code == 404, path


def test_image_signatures():
    assert image_extension(b"\x89PNG\r\n\x1a\n....") == "png"
    assert image_extension(b"\xff\xd8\xff\xe0....") == "jpg"
    assert image_extension(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert image_extension(b"<html>") is None and image_extension(b"GIF89a") is None


@pytest.mark.anyio
async def test_provider_urls_are_fetched_safely(tmp_path):
    """Private addresses are refused unless allowed; an oversized picture is cut off mid-stream
    (the error is raised while reading, long before 128 MiB) and nothing is stored."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from gateway.adapters import AdapterError, GeneratedImage, ImageResult
    from gateway.files import ImageHost
    from gateway.loopback import LoopbackServer

    async def huge(request):
        async def chunks():
            yield b"\x89PNG\r\n\x1a\n"
            for _ in range(2000):  # 128 MiB: the cap must cut the download off mid-stream
                yield b"x" * 65536

        return StreamingResponse(chunks(), media_type="image/png")

    with LoopbackServer(Starlette(routes=[Route("/huge.png", huge)])) as server:
        url = f"{server.url}/huge.png"
        strict = ImageHost(LocalFileStore(tmp_path), "https://gw", allow_private_networks=False, max_bytes=1 << 20, retention_days=1)
        with pytest.raises(AdapterError, match=r"refused.*non-public address"):
            await strict.host(ImageResult([GeneratedImage(url=url)]))
        await strict.aclose()
        small = ImageHost(LocalFileStore(tmp_path), "https://gw", allow_private_networks=True, max_bytes=200_000, retention_days=1)
        with pytest.raises(AdapterError, match=r"larger than files.max_bytes"):
            await small.host(ImageResult([GeneratedImage(url=url)]))
        await small.aclose()
    assert list(tmp_path.iterdir()) == []
