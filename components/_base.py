"""What every component shares: the default image and the decorator settings.

Components are decorated once at import with the config's default image; the pipeline sets the configured
image on every task (``icmil_kfp.pipelines.platform.use_image``), so ``pipeline.image`` in the config is what runs.
``install_kfp_package=False``: the project image already holds kfp, and the local runner then starts a task in
about 0.1 s instead of pip-installing kfp for every task.
"""

from __future__ import annotations

from icmil.config import PipelineConfig

DEFAULT_IMAGE: str = PipelineConfig.model_fields["image"].default
COMPONENT_OPTIONS = {"base_image": DEFAULT_IMAGE, "install_kfp_package": False}
