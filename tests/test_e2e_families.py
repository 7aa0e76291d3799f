"""End to end, per SD family: SD 2.x (v-prediction) and SDXL (two text encoders, micro-conditioning, a VAE kept in
float32 on GPUs) packaged with package_model.py and served by the real TorchServe with the shipped CPU config; the
image that comes back is diffusers' own for the same seed and settings."""

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from sd_engine.random_models import save_pipeline
from ts_server import start_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["tiny-sd2", "tiny-sdxl"])
def served(request, tmp_path_factory):
    weights = save_pipeline(request.param, tmp_path_factory.mktemp(request.param) / "weights", seed=5)
    with start_server(tmp_path_factory.mktemp("torchserve"), weights) as server:
        yield request.param, weights, server


def test_the_served_image_is_diffusers_image_at_the_models_own_defaults(served):
    family, weights, server = served
    status, headers, body = server.predict({"prompt": "a lighthouse at dusk", "seed": 21, "format": "png"})
    assert status == 200, body[:300]
    served_pixels = np.asarray(Image.open(io.BytesIO(body)))
    pipe = DiffusionPipeline.from_pretrained(str(weights))
    pipe.set_progress_bar_config(disable=True)
    # The model's own size and guidance (64x64; 7.5 for SD 2.x, 5.0 for SDXL), the CPU config's 4 steps.
    expected = pipe(prompt="a lighthouse at dusk", num_inference_steps=4, output_type="np",
                    generator=[torch.Generator().manual_seed(21)]).images[0]
    assert served_pixels.shape == (64, 64, 3)
    assert np.array_equal(served_pixels, (np.clip(expected, 0, 1) * 255).round().astype(np.uint8)), family


def test_a_batch_with_a_bad_request_answers_each_on_its_own(served):
    family, _, server = served
    token = server.token
    payloads = [{"prompt": "a fox", "seed": 1}, {"prompt": "a fox", "seed": 2, "negative_prompt": "blurry"},
                {"prompt": "a fox", "height": 72, "width": 100}]
    with ThreadPoolExecutor(len(payloads)) as pool:
        answers = list(pool.map(lambda p: server.predict(p, token), payloads))
    for status, headers, body in answers[:2]:
        assert status == 200 and Image.open(io.BytesIO(body)).size == (64, 64), family
    status, _, body = answers[2]
    assert status == 400 and json.loads(body)["field"] == "width"
