"""The DSEH Kubeflow pipeline: resolve the config, prepare, the alternating rounds unrolled
(LabNet r, ImgNet r), evaluate, promote, and the MAP table over code lengths. The pipeline only
wires the components; compile-time options set the image, the number of rounds, the cluster
resources and where the GPU pods may run.
"""

from dataclasses import dataclass

from kfp import dsl, kubernetes

from components import dseh_components as c
from dseh.errors import DsehError
from dseh.pipeline_params import (
    CHECKPOINTS,
    POD,
    POD_NAME_ENV,
    POD_NAMESPACE_ENV,
    POD_UID_ENV,
    TYPED,
    Placement,
    signature,
)

S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")
MLFLOW_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
CHECKPOINT_DIR = f"/data/{CHECKPOINTS}"  # with a claim: the training steps' resume checkpoints, per run


@dataclass(frozen=True)
class PipelineOptions:
    """Compile-time choices: the DAG's shape and what each pod asks of the cluster."""

    params_text: str  # params.yaml baked in as the default of the `params` parameter
    image: str = c.IMAGE  # the project image every step runs on
    rounds: int = 1
    gpus: int = 1  # per training pod (per node); more than 1: the steps run data-parallel under torchrun
    gpu_prepare: bool = True  # prepare asks for one GPU too (with gpus > 0)
    nodes: int = 1  # more than 1: ImgNet runs as a Kubeflow Trainer job over this many nodes (needs pvc_name)
    job_namespace: str = ""  # where the Trainer job is created ("": the launching pod's own namespace)
    accelerator_type: str = POD.accelerator
    placement: Placement = Placement()  # tolerations and node selector of every pod that holds a GPU
    cpu_limit: str = POD.cpu
    memory_limit: str = POD.memory
    shm_size: str = POD.shm_size
    retries: int = 2
    pvc_name: str = ""  # mount this PersistentVolumeClaim at /data in every data step (large image sets)
    enable_caching: bool = False  # data steps reuse results for the same data_version and config only
    checkpoint_root: str = ""  # s3://bucket/prefix: the training steps' resume checkpoints when there is no claim


def place_gpus(task, opts: PipelineOptions, gpus: int):
    """`gpus` of the accelerator type, on a node the placement allows (its taints tolerated, its labels matched)."""
    task.set_accelerator_type(opts.accelerator_type).set_accelerator_limit(gpus)
    for tol in opts.placement.tolerations:
        kubernetes.add_toleration(task, **tol)
    for key, value in opts.placement.node_selector.items():
        kubernetes.add_node_selector(task, key, value)


def data_step(task, opts: PipelineOptions, p: dict, gpus: int = 0, cache: bool | None = None):
    """A data step's pod: resources, GPUs and their placement, retries, caching (opts.enable_caching
    unless `cache` says otherwise), /dev/shm, the volume and the credentials (the Secrets named by the
    pipeline parameters in `p`)."""
    task.set_cpu_limit(opts.cpu_limit).set_memory_limit(opts.memory_limit)
    if gpus > 0:
        place_gpus(task, opts, gpus)
    task.set_retry(num_retries=opts.retries, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="600s")
    task.set_caching_options(opts.enable_caching if cache is None else cache)
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=opts.shm_size
    )
    if opts.pvc_name:
        kubernetes.mount_pvc(task, pvc_name=opts.pvc_name, mount_path="/data")
    # the tracking URI is required (a pod never falls back to a throw-away SQLite file): a missing
    # Secret or key stops the pod before it starts, naming the Secret; credentials are optional
    required = {MLFLOW_KEYS[0]: MLFLOW_KEYS[0]}
    kubernetes.use_secret_as_env(task, secret_name=p["mlflow_secret"], secret_key_to_env=required, optional=False)
    for secret, keys in ((p["s3_secret"], S3_KEYS), (p["mlflow_secret"], MLFLOW_KEYS[1:])):
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={k: k for k in keys}, optional=True)
    return task


def build_pipeline(opts: PipelineOptions):
    """The @dsl.pipeline function for these options."""
    if opts.nodes > 1 and not opts.pvc_name:
        raise DsehError("--nodes > 1 needs --pvc: the Trainer job's nodes share the inputs and output on it")
    if opts.checkpoint_root and not opts.checkpoint_root.startswith("s3://"):
        raise DsehError(
            f"--checkpoint-root {opts.checkpoint_root}: give an s3://bucket/prefix (the pipeline root's bucket)"
        )
    comp = c.on_image(opts.image)

    def step(task, p: dict, gpus: int = 0, cache: bool | None = None):
        return data_step(task, opts, p, gpus, cache)

    def imgnet_job(p: dict, common: dict, labnet, r: int):
        """ImgNet over several nodes: a light pod that runs the Trainer job and waits for it."""
        task = comp.train_imgnet_job(
            labnet=labnet, image=opts.image, nodes=opts.nodes, gpus=opts.gpus,
            pvc_name=opts.pvc_name, namespace=opts.job_namespace, s3_secret=p["s3_secret"],
            mlflow_secret=p["mlflow_secret"], gpu_resource=opts.accelerator_type,
            tolerations=list(opts.placement.tolerations), node_selector=dict(opts.placement.node_selector), **common,
        )  # fmt: skip
        # the pod's name tells one attempt from the next: each retry starts a Trainer job of its own,
        # owned by the pod (name, uid, namespace), so the job goes when the pod does
        for env, field in ((POD_NAME_ENV, "name"), (POD_UID_ENV, "uid"), (POD_NAMESPACE_ENV, "namespace")):
            kubernetes.use_field_path_as_env(task, env_name=env, field_path=f"metadata.{field}")
        return step(task, p).set_display_name(f"train ImgNet round {r} on {opts.nodes} nodes")

    def dseh_pipeline(*values):
        # KFP reads the parameters from the signature set below and passes one channel per parameter, in order
        p = dict(zip(params_signature.parameters, values))
        cfg = comp.resolve_config(
            params=p["params"],
            overrides=p["overrides"],
            data_version=p["data_version"],
            rounds=opts.rounds,
            **{t.name: p[t.name] for t in TYPED},
        )
        cfg.set_caching_options(False).set_display_name("resolve config")  # always runs: it reads the run's inputs
        # the run's id, resolved by the KFP backend in task inputs (not in env variables): one MLflow parent run
        run = {"config": cfg.output, "run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}
        prep = step(comp.prepare(data_version=p["data_version"], **run), p, 1 if opts.gpu_prepare else 0)
        data = prep.outputs["data"]
        # a retried training step (a new pod) resumes from its checkpoint on the claim, else on S3
        root = CHECKPOINT_DIR if opts.pvc_name else opts.checkpoint_root
        ckpt = {"checkpoint_dir": root} if root else {}
        lab = img = None
        for r in range(opts.rounds):
            common = dict(data_version=p["data_version"], round_index=r, data=data, **run)
            prev = {"prev_labnet": lab.outputs["labnet"], "prev_imgnet": img.outputs["imgnet"]} if r else {}
            lab = step(comp.train_labnet(gpus=opts.gpus, **common, **prev, **ckpt), p, opts.gpus)
            lab.set_display_name(f"train LabNet round {r}")
            common.update({"prev_imgnet": img.outputs["imgnet"]} if r else {})
            if opts.nodes > 1:
                img = imgnet_job(p, common, lab.outputs["labnet"], r)
            else:
                task = comp.train_imgnet(labnet=lab.outputs["labnet"], gpus=opts.gpus, **common, **ckpt)
                img = step(task, p, opts.gpus)
                img.set_display_name(f"train ImgNet round {r}")
        models = {"labnet": lab.outputs["labnet"], "imgnet": img.outputs["imgnet"]}
        ev = step(comp.evaluate(data=data, **models, **run), p, opts.gpus)
        # promotion always runs: it reads the registry's champion, which changes between runs
        pro = comp.promote(data=data, **models, evaluation=ev.outputs["evaluation"], **run)
        step(pro, p, cache=False)
        table = step(comp.map_table(data_version=p["data_version"], data=data, **run), p, opts.gpus)
        table.set_display_name("MAP table over code lengths")

    params_signature = signature(params=opts.params_text)
    dseh_pipeline.__signature__ = params_signature
    return dsl.pipeline(name="dseh", description="Deep Joint Semantic-Embedding Hashing: train, evaluate, promote")(
        dseh_pipeline
    )
