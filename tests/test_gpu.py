"""GPU-only: the DeepSpeed backend through the handler on the SD 1.5 architecture (random weights).

Skipped on machines without CUDA. scripts/gpu_check.py runs the same path with timings and writes the committed record
(bench/results/gpu-check-*.json); this test is the pass/fail version for a GPU CI.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from ts.context import Context, RequestProcessor

from sd_engine.config import EngineConfig
from sd_engine.engine import load_engine
from sd_engine.optimize import injection_report
from sd_engine.random_models import save_pipeline
from sd_engine.requests import parse_request
from sd_handler import StableDiffusionHandler

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
SETTINGS = {"num_inference_steps": 10, "height": 512, "width": 512, "warmup_steps": 2}


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    return save_pipeline("sd15", tmp_path_factory.mktemp("sd15") / "weights", device="cuda", dtype=torch.float16)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_deepspeed_through_the_handler_injects_kernels_and_matches_eager(sd15_dir, tmp_path, cuda_graph):
    config = EngineConfig.from_mapping(dict(SETTINGS, weights=str(sd15_dir), backend="eager"))
    request = parse_request({"prompt": "an astronaut riding a horse", "seed": 1}, config)
    eager = load_engine(config, sd15_dir, torch.device("cuda:0"))
    reference = np.asarray(eager.generate([request])[0].image, dtype=np.float64) / 255
    del eager
    torch.cuda.empty_cache()

    yaml_config = {"handler": dict(SETTINGS, weights=str(sd15_dir), backend="deepspeed", cuda_graph=cuda_graph)}
    context = Context("stable-diffusion", str(tmp_path), {"model": {}}, 1, 0, "0.12.0", model_yaml_config=yaml_config)
    handler = StableDiffusionHandler()
    handler.initialize(context)
    assert injection_report(handler.engine.pipe)["unet"].get("DeepSpeedDiffusersTransformerBlock", 0) > 0

    context.request_processor = [RequestProcessor({})]
    [jpeg] = handler.handle([{"body": {"prompt": request.prompt, "seed": 1}}], context)
    assert context.get_response_status(0)[0] == 200
    assert Image.open(io.BytesIO(jpeg)).size == (512, 512)

    image = np.asarray(handler.engine.generate([request])[0].image, dtype=np.float64) / 255
    assert not np.isnan(image).any()
    assert np.sqrt(np.mean((image - reference) ** 2)) <= 0.02


@pytest.mark.parametrize("backend", ["eager", "deepspeed"])
def test_cuda_graphs_are_shape_safe(sd15_dir, backend):
    """Batches 4 -> 1 -> 3 -> 4 and sizes 512 -> 768 -> 512 through one graphed engine give the images eager gives.
    A medium batch after a small one once made DeepSpeed reallocate its workspace under the graphs captured before:
    the 4 after the 3 then hit an illegal memory access (see optimize.pin_deepspeed_workspace)."""
    base = dict(SETTINGS, weights=str(sd15_dir), max_height=1024, max_width=1024)
    sequence = [(4, 512), (1, 512), (3, 512), (4, 512), (1, 768), (1, 512)]

    def run(engine):
        out = []
        for batch, size in sequence:
            requests = [parse_request({"prompt": f"a fox {i}", "seed": i, "height": size, "width": size},
                                      engine.config) for i in range(batch)]
            out.append([np.asarray(r.image, dtype=np.float64) / 255 for r in engine.generate(requests)])
        return out

    eager = load_engine(EngineConfig.from_mapping(dict(base, backend="eager")), sd15_dir, torch.device("cuda:0"),
                        max_batch_size=4)
    expected = run(eager)
    del eager
    torch.cuda.empty_cache()
    graphed = load_engine(EngineConfig.from_mapping(dict(base, backend=backend, cuda_graph=True)), sd15_dir,
                          torch.device("cuda:0"), max_batch_size=4)
    for (batch, size), images, references in zip(sequence, run(graphed), expected):
        assert len(images) == batch and images[0].shape == (size, size, 3)
        for image, reference in zip(images, references):
            assert np.sqrt(np.mean((image - reference) ** 2)) <= 0.02, (batch, size)
