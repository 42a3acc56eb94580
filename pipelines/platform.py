"""Kubernetes placement for pipeline tasks, as tiny ``task -> task`` functions (the kfp-kubernetes style).

Every value comes from :class:`icmil.config.PipelineConfig` (compiled into the YAML's platform spec); nothing
here is a constant of the cluster. Secrets are referenced by name only: the compiled YAML names the Kubernetes
Secret and the keys it maps to environment variables, never a value. The local runner accepts and ignores all
of it, so the same pipeline object runs locally and on a cluster.

Example:
    >>> from kfp import dsl
    >>> from icmil.config import PipelineConfig
    >>> @dsl.component(base_image="python:3.11", install_kfp_package=False)
    ... def hello() -> str:
    ...     return "hi"
    >>> @dsl.pipeline(name="demo")
    ... def demo():
    ...     use_gpu(hello(), PipelineConfig())
"""

from __future__ import annotations

from kfp import kubernetes
from kfp.dsl import PipelineTask

from icmil.config import ICMILConfig, PipelineConfig

# Keys of the Secrets the pipeline pods read (k8s/secrets/*.yaml are templates with these keys).
# Required keys must exist (the pod will not start without them); optional keys may be absent.
MLFLOW_REQUIRED_KEYS = ("MLFLOW_TRACKING_URI",)
MLFLOW_OPTIONAL_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# S3 is optional as a whole: slides on a PVC or over HTTP need no S3 credentials.
S3_OPTIONAL_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
)
OPTUNA_STORAGE_KEY = "ICMIL_OPTUNA_STORAGE"
# The database's network policy admits only pods carrying this label (k8s/base/network/postgres.yaml).
OPTUNA_CLIENT_LABEL = ("icmil.io/optuna-client", "true")


def use_image(task: PipelineTask, image: str) -> PipelineTask:
    """Run the task in ``image`` (the project image; overrides the components' default ``base_image``)."""
    return task.set_container_image(image)


def use_resources(task: PipelineTask, cfg: PipelineConfig, gpu: bool = False) -> PipelineTask:
    """CPU and memory requests (GPU tasks request ``gpu_memory_request`` of host memory)."""
    task.set_cpu_request(cfg.cpu_request)
    return task.set_memory_request(cfg.gpu_memory_request if gpu else cfg.memory_request)


def use_gpu(task: PipelineTask, cfg: PipelineConfig) -> PipelineTask:
    """Accelerator type and limit, node selector and tolerations for a GPU stage (no-op when ``gpu_limit`` is 0)."""
    if cfg.gpu_limit <= 0:
        return task
    task.set_accelerator_type(cfg.gpu_accelerator_type).set_accelerator_limit(cfg.gpu_limit)
    for key, value in sorted(cfg.gpu_node_selector.items()):
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for tol in cfg.gpu_tolerations:
        seconds = tol.get("toleration_seconds") or tol.get("tolerationSeconds")
        kubernetes.add_toleration(
            task,
            key=tol.get("key"),
            operator=tol.get("operator"),  # type: ignore[arg-type]
            value=tol.get("value"),
            effect=tol.get("effect"),  # type: ignore[arg-type]
            toleration_seconds=int(seconds) if seconds is not None else None,
        )
    return task


def use_optuna_storage(task: PipelineTask, secret_name: str) -> PipelineTask:
    """The shared study storage URL (it holds a database password) from a Secret, plus the label the
    database's network policy admits."""
    kubernetes.use_secret_as_env(task, secret_name, {OPTUNA_STORAGE_KEY: OPTUNA_STORAGE_KEY})
    return kubernetes.add_pod_label(task, *OPTUNA_CLIENT_LABEL)


def use_feature_store(task: PipelineTask, cfg: PipelineConfig) -> PipelineTask:
    """Mount the feature-store PVC (slide cache shared by tasks and runs) when one is configured."""
    if cfg.feature_store_pvc:
        kubernetes.mount_pvc(task, pvc_name=cfg.feature_store_pvc, mount_path=cfg.feature_store_mount)
    return task


def use_caching(task: PipelineTask, enabled: bool) -> PipelineTask:
    """KFP caching on (content-addressed steps) or off (anything that talks to MLflow or reads mutable input)."""
    return task.set_caching_options(enable_caching=enabled)


def use_s3_secret(task: PipelineTask, cfg: PipelineConfig) -> PipelineTask:
    """S3 credentials only (tasks that read ``s3://`` slides but never talk to MLflow)."""
    return kubernetes.use_secret_as_env(task, cfg.s3_secret, {k: k for k in S3_OPTIONAL_KEYS}, optional=True)


def use_tracking_secrets(task: PipelineTask, cfg: PipelineConfig) -> PipelineTask:
    """MLflow and S3 credentials from Kubernetes Secrets, as environment variables (names only in the YAML)."""
    kubernetes.use_secret_as_env(task, cfg.mlflow_secret, {k: k for k in MLFLOW_REQUIRED_KEYS})
    kubernetes.use_secret_as_env(task, cfg.mlflow_secret, {k: k for k in MLFLOW_OPTIONAL_KEYS}, optional=True)
    return use_s3_secret(task, cfg)


def is_gpu_stage(cfg: PipelineConfig, stage: str) -> bool:
    """Whether tasks of ``stage`` get the GPU placement."""
    return stage in cfg.gpu_stages and cfg.gpu_limit > 0


def place(
    task: PipelineTask,
    cfg: ICMILConfig,
    stage: str,
    *,
    cache: bool = False,
    slides: bool = False,
    tracked: bool = True,
) -> PipelineTask:
    """Everything a task of ``stage`` needs on the cluster: image, requests, GPU (only for ``gpu_stages``),
    credentials (MLflow only for ``tracked`` tasks), caching, and the feature-store volume for tasks that read
    slides."""
    p = cfg.pipeline
    gpu = is_gpu_stage(p, stage)
    use_image(task, p.image)
    use_resources(task, p, gpu=gpu)
    if gpu:
        use_gpu(task, p)
    if tracked:
        use_tracking_secrets(task, p)
    else:
        use_s3_secret(task, p)
    if slides:
        use_feature_store(task, p)
    use_caching(task, cache and p.enable_caching)
    return task
