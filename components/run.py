"""Open and close the MLflow parent run of one pipeline run.

``open_run`` is the first task; its output (the parent run id) goes to every tracked task. ``close_run`` is the
pipeline's exit handler: it runs after success or failure and marks the parent run FINISHED or FAILED. An exit
task cannot take another task's output, so it finds the parent run by the KFP run id both tasks receive.
"""

from kfp import dsl

from icmil_kfp.components._base import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def open_run(config_yaml: str, kfp_run_id: str, kfp_run_name: str) -> str:
    """Create the parent run (tags: KFP run id, git commit, config digest; config as params + artifact)."""
    from icmil.config import config_from_yaml
    from icmil.tracking import start_parent_run

    return start_parent_run(config_from_yaml(config_yaml), run_name=kfp_run_name, kfp_run_id=kfp_run_id)


@dsl.component(**COMPONENT_OPTIONS)
def close_run(config_yaml: str, kfp_run_id: str, status: dsl.PipelineTaskFinalStatus):
    """Mark the parent run FINISHED when the pipeline succeeded, FAILED otherwise (with the error as a tag)."""
    from icmil.config import config_from_yaml
    from icmil_kfp.components._runtime import close_parent_run

    close_parent_run(config_from_yaml(config_yaml), kfp_run_id, status.state, status.error_message or "")
