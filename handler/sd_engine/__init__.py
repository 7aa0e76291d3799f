"""sd_engine: Stable Diffusion generation for serving, independent of any server.

Modules: config (the `handler:` block), requests (the request contract), native (the model's own defaults),
protocols (KServe v1/v2 bodies), loading (weights and model.zip), optimize (the optimization steps), deepspeed_backend
and fp8 (two of them), graphs (shape-keyed CUDA graphs), engine (load -> optimize -> warm up -> generate), batching
(micro-batching for fronts without a batcher), timing, imaging (JPEG/PNG), random_models (seeded random-weight
pipelines), errors (typed errors with HTTP statuses). Importing the package itself is cheap:
torch and diffusers load only with the modules that need them.
"""

__version__ = "0.1.0"
