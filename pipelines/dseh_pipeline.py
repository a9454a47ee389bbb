"""The DSEH Kubeflow pipeline: resolve the config, prepare, the alternating rounds unrolled
(LabNet r, ImgNet r), evaluate, promote, and the MAP table over code lengths. The pipeline only
wires the components; compile-time options set the number of rounds and the cluster resources.
"""

from dataclasses import dataclass

from kfp import dsl, kubernetes

from components import dseh_components as c
from dseh.errors import DsehError
from dseh.pipeline_params import POD, TYPED, signature

S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")
MLFLOW_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@dataclass(frozen=True)
class PipelineOptions:
    """Compile-time choices: the DAG's shape and what each pod asks of the cluster."""

    params_text: str  # params.yaml baked in as the default of the `params` parameter
    rounds: int = 1
    gpus: int = 1  # per training pod (per node); more than 1: the steps run data-parallel under torchrun
    nodes: int = 1  # more than 1: ImgNet runs as a Kubeflow Trainer job over this many nodes (needs pvc_name)
    trainer_kind: str = "trainjob"  # trainjob (Kubeflow Trainer v2) | pytorchjob (Training Operator v1)
    namespace: str = "kubeflow"  # where the Trainer job is created
    gpu_type: str = "nvidia.com/gpu"
    cpu_limit: str = POD.cpu
    memory_limit: str = POD.memory
    shm_size: str = POD.shm_size
    retries: int = 2
    pvc_name: str = ""  # mount this PersistentVolumeClaim at /data in every data step (large image sets)
    enable_caching: bool = False  # data steps reuse results for the same data_version and config only


def build_pipeline(opts: PipelineOptions):
    """The @dsl.pipeline function for these options."""
    if opts.nodes > 1 and not opts.pvc_name:
        raise DsehError("--nodes > 1 needs --pvc: the Trainer job's nodes share the inputs and output on it")
    if opts.trainer_kind not in ("trainjob", "pytorchjob"):
        raise DsehError(f"unknown trainer job kind '{opts.trainer_kind}': trainjob or pytorchjob")

    def gpu_step(task, gpu: bool = True):
        task.set_cpu_limit(opts.cpu_limit).set_memory_limit(opts.memory_limit)
        if gpu and opts.gpus > 0:
            task.set_accelerator_type(opts.gpu_type).set_accelerator_limit(opts.gpus)
        task.set_retry(
            num_retries=opts.retries, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="600s"
        )
        task.set_caching_options(opts.enable_caching)
        kubernetes.empty_dir_mount(
            task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=opts.shm_size
        )
        if opts.pvc_name:
            kubernetes.mount_pvc(task, pvc_name=opts.pvc_name, mount_path="/data")
        return task

    def secrets(task, s3_secret, mlflow_secret):
        kubernetes.use_secret_as_env(
            task, secret_name=s3_secret, secret_key_to_env={k: k for k in S3_KEYS}, optional=True
        )
        kubernetes.use_secret_as_env(
            task, secret_name=mlflow_secret, secret_key_to_env={k: k for k in MLFLOW_KEYS}, optional=True
        )
        task.set_env_variable("DSEH_PIPELINE_RUN", dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        return task

    def dseh_pipeline(*values):
        # KFP reads the parameters from the signature set below and passes one channel per parameter, in order
        p = dict(zip(params_signature.parameters, values))
        data_version, s3_secret, mlflow_secret = p["data_version"], p["s3_secret"], p["mlflow_secret"]
        cfg = c.resolve_config(
            params=p["params"],
            overrides=p["overrides"],
            data_version=data_version,
            rounds=opts.rounds,
            **{t.name: p[t.name] for t in TYPED},
        )
        cfg.set_caching_options(False).set_display_name("resolve config")
        config = cfg.output
        prep = secrets(
            gpu_step(c.prepare(config=config, data_version=data_version), gpu=False), s3_secret, mlflow_secret
        )
        data = prep.outputs["data"]
        lab = img = None
        for r in range(opts.rounds):
            prev = {"prev_labnet": lab.outputs["labnet"], "prev_imgnet": img.outputs["imgnet"]} if r else {}
            lab = c.train_labnet(
                config=config, data_version=data_version, round_index=r, data=data, gpus=opts.gpus, **prev
            )
            secrets(gpu_step(lab), s3_secret, mlflow_secret).set_display_name(f"train LabNet round {r}")
            prev = {"prev_imgnet": img.outputs["imgnet"]} if r else {}
            common = dict(config=config, data_version=data_version, round_index=r, data=data, **prev)
            if opts.nodes > 1:  # a light pod that runs the Trainer job and waits for it
                img = c.train_imgnet_job(
                    labnet=lab.outputs["labnet"], image=c.IMAGE, nodes=opts.nodes, gpus=opts.gpus,
                    kind=opts.trainer_kind, pvc_name=opts.pvc_name, namespace=opts.namespace,
                    s3_secret=s3_secret, mlflow_secret=mlflow_secret, **common,
                )  # fmt: skip
                img = secrets(gpu_step(img, gpu=False), s3_secret, mlflow_secret)
                img.set_display_name(f"train ImgNet round {r} on {opts.nodes} nodes")
            else:
                img = c.train_imgnet(labnet=lab.outputs["labnet"], gpus=opts.gpus, **common)
                secrets(gpu_step(img), s3_secret, mlflow_secret).set_display_name(f"train ImgNet round {r}")
        ev = c.evaluate(config=config, data=data, labnet=lab.outputs["labnet"], imgnet=img.outputs["imgnet"])
        secrets(gpu_step(ev), s3_secret, mlflow_secret)
        pro = c.promote(config=config, data=data, imgnet=img.outputs["imgnet"], evaluation=ev.outputs["evaluation"])
        secrets(gpu_step(pro, gpu=False), s3_secret, mlflow_secret).set_caching_options(False)
        table = c.map_table(config=config, data_version=data_version, data=data)
        secrets(gpu_step(table), s3_secret, mlflow_secret).set_display_name("MAP table over code lengths")

    params_signature = signature(params=opts.params_text)
    dseh_pipeline.__signature__ = params_signature
    return dsl.pipeline(name="dseh", description="Deep Joint Semantic-Embedding Hashing: train, evaluate, promote")(
        dseh_pipeline
    )
