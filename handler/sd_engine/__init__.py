"""sd_engine: Stable Diffusion generation for serving, independent of any server.

Modules: config (the `handler:` block), requests (the request contract), loading (weights and model.zip), optimize
(eager / DeepSpeed backends), engine (load -> optimize -> warm up -> generate), imaging (JPEG/PNG), random_models
(seeded random-weight pipelines), errors (typed errors with HTTP statuses). Importing the package itself is cheap:
torch and diffusers load only with the modules that need them.
"""

__version__ = "0.1.0"
