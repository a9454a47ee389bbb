"""Kubeflow Pipelines components, one per step: thin wrappers that build the typed config and call
one `dseh.stages` function. Every step runs on the project image: `on_image` makes the components
for the image chosen at compile time (--image or DSEH_IMAGE); the module's own use DSEH_IMAGE.

Each component receives the resolved params as YAML text (`config`, from `resolve_config`) and the
data version, which with the config forms the cache key: a step is reused only for the same data
and the same configuration. Every step after resolve_config also receives the KFP run's id
(`run_id`, given dsl.PIPELINE_JOB_ID_PLACEHOLDER, which the backend resolves in task inputs only)
and sets DSEH_PIPELINE_RUN from it, so that all steps of a run share one MLflow parent run.
"""

import os
from types import SimpleNamespace

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from dseh import pipeline_params

DEFAULT_IMAGE = "ghcr.io/your-org/dseh:0.1.0"  # a placeholder: compile, submit and schedule refuse it
IMAGE = os.environ.get("DSEH_IMAGE", DEFAULT_IMAGE)


# resolve_config's typed inputs are the pipeline parameters of the table in dseh.pipeline_params, so its
# function is generated from that table; the step calls pipeline_params.resolved_params.
resolve_config = dsl.component(base_image=IMAGE, install_kfp_package=False)(pipeline_params.resolve_config_function())


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare(config: str, data_version: str, data: Output[Dataset], run_id: str = ""):
    from dseh import kube, stages
    from dseh.config import from_yaml_text

    run = kube.enter_pipeline_run(run_id)
    manifest = stages.prepare(from_yaml_text(config), data.path, progress=False)
    info = {"dataset_sha256": manifest["dataset_sha256"], "data_version": data_version, "pipeline_run": run}
    data.metadata.update({**info, **manifest["sizes"]})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_labnet(
    config: str,
    data_version: str,
    round_index: int,
    data: Input[Dataset],
    labnet: Output[Model],
    prev_labnet: Input[Model] = None,
    prev_imgnet: Input[Model] = None,
    gpus: int = 1,
    run_id: str = "",
    checkpoint_dir: str = "",
):
    """With gpus > 1 the step runs data-parallel under torchrun, one process per GPU. With
    checkpoint_dir (a folder on the claim, or an s3:// prefix) a retry of the step in the same run resumes."""
    from dseh import kube

    kube.enter_pipeline_run(run_id)
    summary = kube.run_training_step(
        "train-labnet", config, round_index, gpus, data.path, labnet.path,
        prev_labnet=prev_labnet.path if prev_labnet else None, prev_imgnet=prev_imgnet.path if prev_imgnet else None,
        checkpoint_dir=checkpoint_dir or None,
    )  # fmt: skip
    labnet.metadata.update({"round": round_index, "distinct_codes": summary.get("distinct_codes")})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_imgnet(
    config: str,
    data_version: str,
    round_index: int,
    data: Input[Dataset],
    labnet: Input[Model],
    imgnet: Output[Model],
    prev_imgnet: Input[Model] = None,
    gpus: int = 1,
    run_id: str = "",
    checkpoint_dir: str = "",
):
    """With gpus > 1 the step runs data-parallel under torchrun, one process per GPU. With
    checkpoint_dir (a folder on the claim, or an s3:// prefix) a retry of the step in the same run resumes."""
    from dseh import kube

    run = kube.enter_pipeline_run(run_id)
    summary = kube.run_training_step(
        "train-imgnet", config, round_index, gpus, data.path, imgnet.path,
        labnet=labnet.path, prev_imgnet=prev_imgnet.path if prev_imgnet else None,
        checkpoint_dir=checkpoint_dir or None,
    )  # fmt: skip
    scalars = {k: v for k, v in summary.items() if not isinstance(v, dict)}
    imgnet.metadata.update({"round": round_index, "pipeline_run": run, **scalars})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_imgnet_job(
    config: str,
    data_version: str,
    round_index: int,
    data: Input[Dataset],
    labnet: Input[Model],
    imgnet: Output[Model],
    image: str,
    nodes: int,
    gpus: int,
    pvc_name: str,
    namespace: str,
    s3_secret: str,
    mlflow_secret: str,
    gpu_resource: str,
    tolerations: list,
    node_selector: dict,
    prev_imgnet: Input[Model] = None,
    run_id: str = "",
):
    """The ImgNet step over several nodes: a Kubeflow Trainer job (TrainJob) on the same image runs it
    under torchrun; this pod stages the inputs on the shared volume, copies the job's log to its own
    and waits. The job runs in `namespace`, else in this pod's (and is then owned by this pod)."""
    from dseh import kube
    from dseh.pipeline_params import Placement

    run = kube.enter_pipeline_run(run_id)
    # one job per pipeline run, round and attempt (this pod): a retried step starts a job of its own
    # instead of watching again the one that failed
    name = kube.job_name(f"dseh-imgnet-r{round_index}", run, kube.attempt_id())
    namespace, owner = kube.job_namespace(namespace)
    opts = kube.JobOptions(
        name=name, image=image, nodes=nodes, gpus_per_node=gpus, namespace=namespace, owner=owner,
        pvc_name=pvc_name, s3_secret=s3_secret, mlflow_secret=mlflow_secret, gpu_resource=gpu_resource,
        placement=Placement(tuple(tolerations), dict(node_selector)), labels=kube.run_labels(run, round_index),
    )  # fmt: skip
    summary = kube.train_imgnet_on_cluster(
        config, opts, round_index, data.path, labnet.path, imgnet.path, prev_imgnet.path if prev_imgnet else None
    )
    imgnet.metadata.update({"round": round_index, **{k: v for k, v in summary.items() if not isinstance(v, dict)}})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    config: str,
    data: Input[Dataset],
    labnet: Input[Model],
    imgnet: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    run_id: str = "",
):
    import shutil
    from pathlib import Path

    from dseh import artifacts, kube, stages
    from dseh.config import from_yaml_text

    kube.enter_pipeline_run(run_id)
    values = stages.evaluate(
        from_yaml_text(config), data.path, labnet.path, imgnet.path, evaluation.path, progress=False
    )
    for key, value in values.items():
        if isinstance(value, (int, float)):  # flags (`collapsed`) as 0 / 1
            metrics.log_metric(key, float(value))
    shutil.copyfile(Path(evaluation.path) / artifacts.REPORT, report.path)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(
    config: str,
    data: Input[Dataset],
    labnet: Input[Model],
    imgnet: Input[Model],
    evaluation: Input[Artifact],
    decision: Output[Markdown],
    run_id: str = "",
):
    from dseh import artifacts, kube, stages
    from dseh.config import from_yaml_text

    kube.enter_pipeline_run(run_id)
    # the round's LabNet goes into the retrieval model, which then also answers label sets
    d = stages.promote(from_yaml_text(config), data.path, imgnet.path, evaluation.path, None, labnet_dir=labnet.path)
    with open(decision.path, "w") as f:
        f.write(artifacts.markdown_table(["key", "value"], [[k, v] for k, v in d.items()]))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def map_table(
    config: str,
    data_version: str,
    data: Input[Dataset],
    table: Output[Markdown],
    table_csv: Output[Dataset],
    run_id: str = "",
):
    """Train and evaluate at every sweep.bits code length; the MAP table of the paper's Table 1."""
    import shutil
    import tempfile
    from pathlib import Path

    from dseh import experiments, kube
    from dseh.config import from_yaml_text

    kube.enter_pipeline_run(run_id)
    cfg = from_yaml_text(config)
    with tempfile.TemporaryDirectory() as tmp:
        for bits in cfg.sweep.bits:
            experiments.sweep_bits(cfg, data.path, bits, Path(tmp) / "sweep" / str(bits), progress=False)
        experiments.map_table(cfg, Path(tmp) / "sweep", Path(tmp) / "table")
        shutil.copyfile(Path(tmp) / "table" / "map_table.md", table.path)
        shutil.copyfile(Path(tmp) / "table" / "map_table.csv", table_csv.path)


STEPS = (resolve_config, prepare, train_labnet, train_imgnet, train_imgnet_job, evaluate, promote, map_table)


def on_image(image: str) -> SimpleNamespace:
    """Every component (by its name: .prepare, .train_labnet, ...) running on `image`."""
    make = dsl.component(base_image=image, install_kfp_package=False)
    return SimpleNamespace(**{step.python_func.__name__: make(step.python_func) for step in STEPS})
