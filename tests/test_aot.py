"""AOT-compiled UNet and VAE decoder (sd_engine/aot.py), made by `scripts/compile_artifacts.py --aot` on the tiny model
(with its LoRA adapters) for the CPU config's three derived sizes: a worker loads them instead of compiling, serves
every listed size with them (one package per size), gives the eager pipeline's image, and adapters fused into its
live weights reach the compiled code. A package made for other sizes is skipped with a line saying why."""

import json
import logging
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from sd_engine.aot import AOT_DIR, INDEX, description, load_packages, package_name
from sd_engine.artifacts import ARTIFACTS_DIR
from sd_engine.engine import GenerationResult, load_engine
from sd_engine.requests import parse_request

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def aot_model(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("aot") / "weights"
    shutil.copytree(tiny_model_dir, folder)
    made = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_artifacts.py"), str(folder), "--config",
                           str(ROOT / "config" / "model-config-cpu.yaml"), "--aot", "--batch-size", "2", "--check",
                           "--jobs", "2"],
                          capture_output=True, text=True, timeout=900)
    assert made.returncode == 0, made.stderr[-3000:]
    record = json.loads(made.stdout)
    # One package per module and listed size (the CPU config's three), two sizes built at a time.
    assert sorted(name.split("-")[0] for name in record["aot"]) == ["unet"] * 3 + ["vae_decode"] * 3
    assert record["aot_jobs"] == 2 and len(record["aot_build_s"]) == 3 and record["aot_reused"] == []
    assert record["aot_modules"] == ["unet", "vae_decode"]  # on a CPU, float32 throughout: both packaged
    # Each size's packages checked in a fresh process of its own, after the one that built them.
    assert len(record["aot_check_s"]) == 3 and made.stderr.count("checked in a fresh process") == 3
    assert made.stderr.count("AOT: checking ") == 6 and made.stderr.count("checked at batch 1, 2") == 6
    assert record["warm"]["aot"] == ["unet", "vae_decode"]  # --check: a fresh process used both
    # A run cut short before one size entered the index: running again builds that size alone and keeps the others.
    index_path = folder / ARTIFACTS_DIR / AOT_DIR / INDEX
    index = json.loads(index_path.read_text())
    wide = next(info["latent_sizes"] for info in index.values()  # the size 64 high, 96 wide
                if info["latent_sizes"][0][0] < info["latent_sizes"][0][1])
    index_path.write_text(json.dumps({name: info for name, info in index.items() if info["latent_sizes"] != wide}))
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_artifacts.py"), str(folder), "--config",
                            str(ROOT / "config" / "model-config-cpu.yaml"), "--aot", "--batch-size", "2"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads(again.stdout)
    assert list(resumed["aot_build_s"]) == ["96x64"]
    assert len(resumed["aot_reused"]) == 2
    assert "ready_cold_s" not in resumed and json.loads(index_path.read_text()).keys() == index.keys()
    return folder


def images(engine, fields_list, rules):
    results = engine.generate([parse_request(fields, rules) for fields in fields_list])
    assert all(isinstance(r, GenerationResult) for r in results), results
    return [np.asarray(r.image, dtype=np.int16) for r in results]


def test_a_worker_loads_the_packages_and_gives_the_eager_image_at_every_listed_size(aot_model, cpu_config, caplog,
                                                                                     tmp_path):
    eager = load_engine(replace(cpu_config, warmup=False), aot_model, CPU, max_batch_size=2)
    graphs_before = counters["stats"]["unique_graphs"]
    elsewhere = shutil.copytree(aot_model, tmp_path / "unpacked")  # a worker's folder is never where they were made
    with caplog.at_level(logging.INFO, logger="sd_engine"):
        fast = load_engine(replace(cpu_config, compile=True, warmup=False), elsewhere, CPU, max_batch_size=2)
    assert "UNet ahead of time (AOTInductor packages" in caplog.text and fast.startup["aot"] == ["unet",
                                                                                                       "vae_decode"]
    rules = fast.rules
    assert {(64, 64), (64, 96), (96, 64)} <= set(rules.sizes)
    for height, width in ((64, 64), (64, 96), (96, 64)):
        batch = [{"prompt": "a red fox", "seed": 1, "height": height, "width": width, "num_inference_steps": 2},
                 {"prompt": "a blue fox", "seed": 2, "height": height, "width": width, "num_inference_steps": 2}]
        for got, want in zip(images(fast, batch, rules), images(eager, batch, eager.rules)):
            assert got.shape == (height, width, 3) and np.abs(got - want).max() <= 2
    # LoRA adapters are fused into the live weights, which the packages read: the styled image is eager's too.
    styled = [{"prompt": "a red fox", "seed": 1, "num_inference_steps": 2, "loras": {"style": 0.8}}]
    plain = [{"prompt": "a red fox", "seed": 1, "num_inference_steps": 2}]
    got, want = images(fast, styled, rules)[0], images(eager, styled, eager.rules)[0]
    assert np.abs(got - want).max() <= 2 and np.abs(got - images(fast, plain, rules)[0]).max() > 10
    assert counters["stats"]["unique_graphs"] == graphs_before  # nothing went through torch.compile


def test_packages_are_code_so_other_weights_of_the_same_model_give_their_own_image(aot_model, cpu_config, tmp_path):
    """A package fits every checkpoint of its model (the index keys on the architecture, not the weights: a fine-tune,
    or weights replaced in place), so it must read all of them from the worker: Inductor would otherwise bake 1-D
    parameters of up to 8 values (the UNet's and the VAE decoder's last biases, the post-quant convolution's) into the
    code as literals, and such a worker would silently use the build's. New weights of the same tiny model (another
    seed) with the packages built for the first give the eager image of the new weights."""
    from sd_engine.random_models import save_pipeline

    other = save_pipeline("tiny", tmp_path / "other", seed=7)
    shutil.copytree(aot_model / ARTIFACTS_DIR, other / ARTIFACTS_DIR)
    assert (other / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() != \
        (aot_model / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    eager = load_engine(replace(cpu_config, warmup=False), other, CPU, max_batch_size=2)
    fast = load_engine(replace(cpu_config, compile=True, warmup=False), other, CPU, max_batch_size=2)
    assert fast.startup["aot"] == ["unet", "vae_decode"]
    batch = [{"prompt": "a red fox", "seed": 1, "num_inference_steps": 2}]
    got, want = images(fast, batch, fast.rules)[0], images(eager, batch, eager.rules)[0]
    assert np.abs(got - want).max() <= 2, np.abs(got - want).max()  # 12 with the build's biases baked in
    # A package made before (without the key that says it reads every parameter) fits no worker.
    from sd_engine import aot

    name, info = next(iter(json.loads((other / ARTIFACTS_DIR / AOT_DIR / INDEX).read_text()).items()))
    mine = description(fast.pipe, info["module"], CPU, info["latent_sizes"], 2)
    assert aot._fits(info, mine, info["latent_sizes"][0])
    assert not aot._fits({k: v for k, v in info.items() if k != "parameters"}, mine, info["latent_sizes"][0])


def test_packages_made_for_other_sizes_are_skipped_with_the_reason(aot_model, tiny_engine, caplog):
    index = json.loads((aot_model / ARTIFACTS_DIR / AOT_DIR / INDEX).read_text())
    assert {info["module"] for info in index.values()} == {"unet", "vae_decode"}
    made_for = {tuple(info["latent_sizes"][0]) for info in index.values()}
    assert len(made_for) == 3
    # A package's file name follows from what it is made for: the build's parent finds a failed size's files by it.
    for name, info in index.items():
        assert package_name(description(tiny_engine.pipe, info["module"], CPU, info["latent_sizes"], 2)) == name
    with caplog.at_level(logging.INFO, logger="sd_engine.aot"):
        assert load_packages(tiny_engine.pipe, aot_model / ARTIFACTS_DIR, CPU, {(40, 40)}, 2) == {}
        assert load_packages(tiny_engine.pipe, aot_model / ARTIFACTS_DIR, CPU, made_for, 64) == {}
    lines = [r.getMessage() for r in caplog.records if "no unet package fits" in r.getMessage()]
    assert len(lines) == 2 and "for latents 40x40 " in lines[0] and "max_batch" in lines[1]


def test_a_worker_runs_each_package_once_at_the_batch_its_warm_up_starts_with(aot_model, cpu_config, tiny_engine,
                                                                              monkeypatch, tmp_path):
    """cuDNN's per-shape work (choosing convolution engines, building attention kernels with NVRTC) is kept per
    process, so the one run a worker gives each package is at the shape the warm-up then starts with (largest batch
    and size first), rather than at batch 1, which the UNet meets only without guidance. Spies around the real calls
    record the batches: the packages' first runs (aot) and the warm-up's calls through them (aot_runtime)."""
    from sd_engine import aot, aot_runtime

    calls = []

    def spy(module, real):
        def call(runner, inputs):
            calls.append((module, "unet" if len(inputs) > 1 else "vae_decode", len(inputs[0])))
            return real(runner, inputs)
        return call

    monkeypatch.setattr(aot, "on_device", spy("aot", aot.on_device))
    monkeypatch.setattr(aot_runtime, "on_device", spy("aot_runtime", aot_runtime.on_device))
    engine = load_engine(replace(cpu_config, compile=True), shutil.copytree(aot_model, tmp_path / "w"), CPU,
                         max_batch_size=2)
    assert engine.startup["aot"] == ["unet", "vae_decode"] and engine.rules.guidance_scale > 1
    first_runs = [(module, batch) for where, module, batch in calls if where == "aot"]
    assert first_runs == [("unet", 4)] * 3 + [("vae_decode", 2)] * 3  # batch size 2, both halves of guidance
    warm_up = [(module, batch) for where, module, batch in calls if where == "aot_runtime"]
    assert warm_up[0] == ("unet", 4) and ("vae_decode", 2) in warm_up
    # Without guidance the UNet sees the batch size itself: its first runs follow.
    calls.clear()
    made_for = {tuple(info["latent_sizes"][0])
                for info in json.loads((aot_model / ARTIFACTS_DIR / AOT_DIR / INDEX).read_text()).values()}
    assert sorted(load_packages(tiny_engine.pipe, aot_model / ARTIFACTS_DIR, CPU, made_for, 2, guided=False)) == [
        "unet", "vae_decode"]
    assert [(module, batch) for _, module, batch in calls] == [("unet", 2)] * 3 + [("vae_decode", 2)] * 3


def test_a_size_without_a_package_runs_uncompiled_beside_the_packaged_ones(aot_model, tiny_engine, caplog):
    """A listed size whose build failed: the other sizes keep their packages, that one takes the plain module (as
    an unlisted size does), and the start-up report names it."""
    made_for = {tuple(info["latent_sizes"][0])
                for info in json.loads((aot_model / ARTIFACTS_DIR / AOT_DIR / INDEX).read_text()).values()}
    report = {}
    with caplog.at_level(logging.INFO, logger="sd_engine.aot"):
        loaded = load_packages(tiny_engine.pipe, aot_model / ARTIFACTS_DIR, CPU, made_for | {(40, 40)}, 2, report)
    assert sorted(loaded) == ["unet", "vae_decode"]
    assert report["aot_missing"] == {"unet": ["40x40"], "vae_decode": ["40x40"]}
    assert "no vae_decode package fits latents 40x40" in caplog.text and "run uncompiled" in caplog.text
    vae = tiny_engine.pipe.vae
    for size in ((40, 40), sorted(made_for)[0]):
        latents = torch.randn(1, vae.config.latent_channels, *size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got, want = loaded["vae_decode"](latents).sample, vae.decode(latents).sample
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-3)


def test_the_fresh_check_fails_when_a_package_of_its_size_is_not_there(aot_model, tmp_path):
    """The check child (--check-size, run by the build after each size's build child) loads the packages the build
    should have made, by the names the parent expects: one missing fails the check, with a nonzero exit."""
    folder = shutil.copytree(aot_model, tmp_path / "weights")
    aot_dir = folder / ARTIFACTS_DIR / AOT_DIR
    name, info = next((name, info) for name, info in json.loads((aot_dir / INDEX).read_text()).items()
                      if info["module"] == "unet")
    size = "x".join(map(str, info["latent_sizes"][0]))
    command = [sys.executable, str(ROOT / "scripts" / "compile_artifacts.py"), str(folder), "--config",
               str(ROOT / "config" / "model-config-cpu.yaml"), "--aot", "--batch-size", "2", "--check-size", size]
    passed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert passed.returncode == 0 and passed.stdout.strip() == "checked", passed.stderr[-2000:]
    (aot_dir / name).unlink()
    failed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert failed.returncode != 0 and "checked" not in failed.stdout and name in failed.stderr


def test_an_upcast_vae_decoder_gets_no_package_and_is_torch_compiled_beside_a_packaged_unet(
        tiny_model_dir, cpu_config, monkeypatch, caplog, tmp_path):
    """A float32 VAE decoder under a float16 UNet (SDXL's, whose packages faulted on an H100: aot.modules) is neither
    packaged nor looked for; beside a packaged UNet it is torch.compiled (from the compile artifacts the packages'
    build saves: the next test), as without packages. The UNet is put in float16 on the CPU for the rule alone; since
    no float16 package can be built here, load_packages is a fake that hands back a UNet package (the real loading is
    covered above). A float32 pipeline on a GPU (`dtype: float32`, never tried) is treated alike: a stand-in pipeline
    reaches that branch here."""
    from types import SimpleNamespace

    from sd_engine import aot, graphs
    from sd_engine.optimize import optimize

    on_gpu = SimpleNamespace(dtype=torch.float32, device=torch.device("cuda", 0))
    assert aot.modules(SimpleNamespace(unet=on_gpu, vae=on_gpu)) == ("unet",)
    # cuda_graph on, with a fake graph_pipeline (no CUDA graph can be captured on a CPU) that records how many calls
    # precede each capture: two where torch.compile compiles in the first, else one.
    config = replace(cpu_config, compile=True, cuda_graph=True)
    warmup_calls = []
    monkeypatch.setattr(graphs, "graph_pipeline", lambda *args, **kwargs: warmup_calls.append(kwargs["warmup_calls"])
                        or {})
    for packaged, compiled in (({}, ["unet", "vae_decode"]), ({"unet": object()}, ["vae_decode"])):
        pipe = load_engine(replace(cpu_config, warmup=False), tiny_model_dir, CPU).pipe
        assert aot.modules(pipe) == ("unet", "vae_decode")  # float32 throughout, as on any CPU: both packaged
        pipe.unet.to(torch.float16)
        assert aot.modules(pipe) == ("unet",)
        assert aot.missing_sizes(pipe, tmp_path, CPU, [(8, 8)], 1) == [(8, 8)]  # asked of the UNet alone
        monkeypatch.setattr(aot, "load_packages", lambda pipe, *args: packaged)
        decode = pipe.vae.decode
        caplog.clear()
        report = {}
        with caplog.at_level(logging.INFO, logger="sd_engine.optimize"):
            optimize(pipe, config, CPU, "eager", 1, ((64, 64),), tmp_path, report)
        assert report["aot"] == sorted(packaged) and report["torch_compile"] == compiled  # the warm-up's order
        assert warmup_calls.pop() == 2  # torch.compile compiles in the first call
        assert pipe.vae.decode != decode  # wrapped: compiled at the listed size
        assert "VAE decoder with torch.compile (static)" in caplog.text
    assert "UNet ahead of time (AOTInductor packages" in caplog.text


def test_the_packages_build_saves_torch_compiles_code_of_what_they_leave_out_and_a_worker_compiles_nothing(
        tiny_model_dir, tmp_path):
    """compile_artifacts.compile_unpackaged, which the --aot build runs beside its children: the decoder compiled by
    calling it as the pipeline does (batch 1, then the batch size, at every listed size), saved as this platform's
    compile artifacts; then a worker's start in a fresh process, with empty compile caches, finds every graph its
    warm-up compiles for the decoder in them (the GPU build's --check start fails unless it compiles nothing:
    artifacts_served). A build whose sizes were all built before keeps the artifacts it finds. On a CPU everything is
    float32 and both modules are packaged: here the decoder is named as left out, as SDXL's float32 decoder beside its
    float16 UNet is on a GPU, and the worker's load_packages is a fake handing back the plain UNet as its package (no
    float16 package can be built here; the real loading is covered above)."""
    import compile_artifacts
    from sd_engine.artifacts import read_index

    weights = tmp_path / "weights"
    shutil.copytree(tiny_model_dir, weights)
    # Each in a process of its own (load sets the process's JIT cache variables), with caches of its own.
    script = f"""
import json, sys
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, {str(ROOT / "scripts")!r})
import torch, yaml
from torch._dynamo.utils import counters
from sd_engine.config import EngineConfig
block = yaml.safe_load(open({str(ROOT / "config" / "model-config-cpu.yaml")!r}))["handler"]
config = replace(EngineConfig.from_mapping(block), compile=True, cache_dir=sys.argv[2])
weights = Path({str(weights)!r})
if sys.argv[1] == "build":
    import compile_artifacts
    from types import SimpleNamespace
    from sd_engine.artifacts import ARTIFACTS_DIR
    args = SimpleNamespace(weights=weights, preset="tiny", driver_cache=None)
    engine, _, _ = compile_artifacts.load_for_export(args, config, 2)  # as the --aot parent has it
    scale = engine.pipe.vae_scale_factor
    latents = [(h // scale, w // scale) for h, w in engine.rules.sizes]
    def made(reuse):
        return compile_artifacts.compile_unpackaged(engine.pipe.vae, latents, engine.pipe.unet.dtype, engine.device,
                                                    ["vae_decode"], config, 2, weights / ARTIFACTS_DIR, reuse=reuse)
    out = {{"made": made(False), "kept": made(True)}}
else:
    from sd_engine import aot
    from sd_engine.engine import load_engine
    from sd_engine.jit_caches import use_jit_caches
    aot.load_packages = lambda pipe, *args, **kwargs: {{"unet": pipe.unet.forward}}
    use_jit_caches(config.cache_dir, weights)
    out = {{"startup": load_engine(config, weights, torch.device("cpu"), 2).startup}}
print(json.dumps({{**out, "graphs": counters["stats"]["unique_graphs"],
                  "inductor": {{k: n for k, n in counters["inductor"].items() if k.startswith("fxgraph_cache")}}}}))
"""

    def run(role):
        done = subprocess.run([sys.executable, "-c", script, role, str(tmp_path / f"cache-{role}")],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    built = run("build")
    made = built["made"]
    assert made["modules"] == ["vae_decode"] and made["mb"] > 0
    # The CPU config's three sizes at batch 1, then at 2: one graph for batch 1 (torch's 0/1 rule keeps it static),
    # one dynamic in batch, height and width for the rest; both compiled there, from empty caches.
    assert made["graphs"] == 2 and built["graphs"] == 2 and built["inductor"] == {"fxgraph_cache_miss": 2}
    # A build whose sizes were all there already keeps the artifacts made for this platform.
    assert built["kept"] == {"modules": ["vae_decode"], "artifact": made["artifact"], "reused": True}
    index = read_index(weights / ARTIFACTS_DIR)
    assert list(index) == [made["artifact"]] and (weights / ARTIFACTS_DIR / made["artifact"]).is_file()
    worker = run("worker")
    assert worker["startup"]["artifacts_loaded"] and worker["startup"]["aot"] == ["unet"]
    assert worker["graphs"] == 2 and worker["inductor"] == {"fxgraph_cache_hit": 2}  # the decoder's, none compiled
    record = {"warm": {"artifacts_loaded": True, "compile_cache": worker["inductor"]}, "torch_compiled": made}
    assert compile_artifacts.artifacts_served(record)  # what --check requires of its start
    record["warm"]["compile_cache"] = {"fxgraph_cache_hit": 1, "fxgraph_cache_miss": 1}
    assert not compile_artifacts.artifacts_served(record)


def test_a_package_that_differs_from_the_plain_module_fails_its_size(aot_model, tiny_engine, monkeypatch):
    """validate_packages, run where the packages are built, on a package whose output is off. A fake: no real package
    differs on the CPU (the one this guards against faulted on an H100), so the real package's output plus 1 stands
    in."""
    from sd_engine import aot

    index = json.loads((aot_model / ARTIFACTS_DIR / AOT_DIR / INDEX).read_text())
    name, info = next((name, info) for name, info in index.items() if info["module"] == "vae_decode")
    aot.validate_packages(tiny_engine.pipe, aot_model / ARTIFACTS_DIR, CPU, {name: info}, 2)  # the real one passes

    class Off:
        def __init__(self, runner):
            self.runner = runner
            self.get_constant_fqns, self.load_constants = runner.get_constant_fqns, runner.load_constants

        def __call__(self, *args):
            return self.runner(*args) + 1

    real = aot.load_package
    monkeypatch.setattr(aot, "load_package", lambda path: Off(real(path)))
    size = "x".join(map(str, info["latent_sizes"][0]))
    with pytest.raises(RuntimeError, match=f"the vae_decode package for latents {size} differs .* at batch 1$"):
        aot.validate_packages(tiny_engine.pipe, aot_model / ARTIFACTS_DIR, CPU, {name: info}, 2)


def test_a_size_whose_build_outlasts_build_timeout_is_stopped_and_failed(aot_model, tmp_path):
    """A size's process past --build-timeout (a package hanging on the GPU: one SDXL size had not finished in 530 s
    on an H100) is stopped, its size named in the record and its files removed; the index keeps the sizes built, and
    the exit code is 1. One second is too short for a child even to import torch: the real processes are stopped."""
    folder = shutil.copytree(aot_model, tmp_path / "weights")
    index_path = folder / ARTIFACTS_DIR / AOT_DIR / INDEX
    index = json.loads(index_path.read_text())
    wide = [name for name, info in index.items() if info["latent_sizes"][0][0] < info["latent_sizes"][0][1]]
    index_path.write_text(json.dumps({name: info for name, info in index.items() if name not in wide}))
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_artifacts.py"), str(folder), "--config",
                          str(ROOT / "config" / "model-config-cpu.yaml"), "--aot", "--batch-size", "2",
                          "--build-timeout", "1"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stderr[-3000:]
    record = json.loads(run.stdout)
    assert record["aot_failed"] == ["96x64 (build stopped after 1 s)"] and len(record["aot_reused"]) == 2
    assert "building the AOT packages failed for 96x64" in run.stderr
    assert json.loads(index_path.read_text()).keys() == index.keys() - set(wide)
    assert not any((folder / ARTIFACTS_DIR / AOT_DIR / name).exists() for name in wide)  # stale files of that size


@pytest.mark.e2e
def test_torchserve_serves_with_the_packages_from_its_own_unpacked_model(aot_model, cpu_config, tmp_path):
    """Packaged into the MAR (covered by its sha256 manifest) and unpacked by TorchServe in a folder of its own: the
    worker's ready line says both modules run AOT-compiled, and the served image is the eager engine's for the seed."""
    import io

    import yaml
    from PIL import Image

    from ts_server import start_server

    model_config = yaml.safe_load((ROOT / "config" / "model-config-cpu.yaml").read_text())
    model_config["batchSize"] = 2  # what the packages were made for
    model_config["handler"]["compile"] = True
    config_path = tmp_path / "model-config.yaml"
    config_path.write_text(yaml.safe_dump(model_config, sort_keys=False))
    fields = {"prompt": "a red fox", "seed": 5, "format": "png", "height": 64, "width": 96}
    work = tmp_path / "ts"
    work.mkdir()
    with start_server(work, aot_model, model_config=config_path) as server:
        status, _, body = server.predict(fields)
        log = (work / "logs" / "model_log.log").read_text()
    assert status == 200, body[:500]
    assert "AOT-compiled: unet, vae_decode" in log and "torch.compile instead" not in log
    eager = load_engine(replace(cpu_config, warmup=False), aot_model, CPU, max_batch_size=2)
    [want] = images(eager, [{k: v for k, v in fields.items() if k != "format"}], eager.rules)
    got = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=np.int16)
    assert got.shape == want.shape and np.abs(got - want).max() <= 2


def test_a_gpu_package_compiles_its_wrapper_at_o0_unless_the_environment_says_otherwise(monkeypatch):
    """AOTInductor's options for a package: code only; on a GPU the C++ wrapper at -O0 (SDXL's C++ compiles 27-38 s a
    size on an H200, 95-106 s at -O1 on another, the same speed: aot._inductor_configs), unless
    AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL, torch's own variable, is set; on a CPU, where the kernels are C++ as well,
    torch's default. The options are handed to torch as they are, so each key must be one this torch knows."""
    import torch._inductor.config as inductor

    from sd_engine.aot import _inductor_configs

    monkeypatch.delenv("AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL", raising=False)
    code_only = {"aot_inductor.package_constants_in_so": False, "always_keep_tensor_constants": True}
    assert _inductor_configs(torch.device("cuda", 0)) == {**code_only, "aot_inductor.compile_wrapper_opt_level": "O0"}
    assert _inductor_configs(CPU) == code_only
    monkeypatch.setenv("AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL", "O2")
    assert "aot_inductor.compile_wrapper_opt_level" not in _inductor_configs(torch.device("cuda", 0))
    for key in (*code_only, "aot_inductor.compile_wrapper_opt_level"):
        *path, name = key.split(".")
        section = inductor
        for part in path:
            section = getattr(section, part)
        assert hasattr(section, name)
