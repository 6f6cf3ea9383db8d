"""The PSFTJob schema: the single source of truth.

The CRD (charts/psft/crds), the reference docs and `psft validate` all derive from
these models. Field names are camelCase on the wire (YAML, JSON, Kubernetes) and
snake_case in Python. Unknown fields are rejected everywhere.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from psft.workflows import formats as fmt
from psft.workflows.paths import is_s3_uri, local_folder, s3_uri_in_local_folder

API_VERSION = "psft.dev/v1alpha1"
KIND = "PSFTJob"
SEED_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
DEFAULT_TRAINER_IMAGE = "ghcr.io/psft-dev/psft-trainer:0.1.0"

# Upper bounds of the numeric fields. Each is far above any real run, so a user meets one
# only through a typo (an extra digit, `1e30`), and low enough that every engine holds the
# value: a count that passes validation never overflows int64 or allocates gigabytes first.
# They reach the CRD as `maximum` and docs/psftjob.md's "Allowed values" column.
SEED_MAX = 2**32 - 1
"""numpy seeds must lie in [0, 2**32); torch's in [-2**63, 2**64)."""
BATCH_MAX = 65_536
"""Rows per batch (or prompts per generate call)."""
STEPS_MAX = 10_000_000
"""Optimizer steps; at one step a second still four months of training."""
EPOCHS_MAX = 10_000
TOKENS_MAX = 1_048_576
"""Token budgets (prompt, response, generation): 1M tokens, past any model's long-context
training, before a tensor of that length is allocated."""
CONTEXT_MAX = 16_777_216
"""A context length is only compared against; models with 10M-token contexts exist."""
ROWS_MAX = 1_000_000_000
"""Row and problem counts (limits and caps)."""
SAMPLES_MAX = 1024
"""Samples per problem (eval k, GRPO group size): each is a full generation."""
BENCHMARKS_MAX = 64
"""Benchmarks named in eval.samplesPerBenchmark (the registry has 8; custom files add more)."""
GPUS_MAX = 64
"""GPUs of one node (or of one vLLM engine); today's largest nodes have 8 or 16."""
NODES_MAX = 4096
RETRIES_MAX = 1000
SECONDS_MAX = 2_147_483_647
"""int32: the largest seconds value Argo and Kubernetes take in every field (68 years)."""
GRADING_SECONDS_MAX = 3600.0
"""One symbolic comparison; a stuck worker is killed after this many seconds."""
CLIP_MAX = 100.0
"""Clip epsilons: a ratio ceiling of 1 + 100 never binds, so no larger value differs."""
TEMPERATURE_MAX = 10.0
"""Sampling temperature: above ~2 samples are noise; 10 is flat over the vocabulary."""


class Section(BaseModel):
    """Base for every part of the spec: camelCase aliases, unknown keys rejected."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        validate_assignment=True,
        use_attribute_docstrings=True,
        # NaN and +-inf fail every float field: JSON has no such values, so the stage.json
        # would carry null and every stage would fail
        allow_inf_nan=False,
    )

    def to_wire(self) -> dict[str, Any]:
        """The camelCase dict users write, with defaults filled in."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


DNS_LABEL = fmt.DNS_LABEL

# Strings Kubernetes, the container runtime or S3 check with rules of their own
# (psft.workflows.formats): `psft validate` and the CRD check them the same way.
JobName = Annotated[str, fmt.JOB_NAME]
Namespace = Annotated[str, fmt.NAMESPACE]
ObjectName = Annotated[str, fmt.OBJECT_NAME]
LabelKey = Annotated[str, fmt.LABEL_KEY]
LabelValue = Annotated[str, fmt.LABEL_VALUE_FORMAT]
Quantity = Annotated[str, fmt.POSITIVE_QUANTITY_FORMAT]

ANNOTATIONS_MAX_BYTES = 256 * 1024
"""Kubernetes' limit on the total size of an object's annotations (keys and values)."""


SERVER_METADATA = {
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "ownerReferences",
    "finalizers",
    "selfLink",
    "generateName",
}


class Metadata(Section):
    name: JobName
    """Job name: a DNS label (lower case letters, digits, '-'), at most 52 characters so
    that derived child names stay within Kubernetes' 63-character limit."""
    namespace: Namespace = "default"
    """Namespace of the job. `psft run` uses it only for metric labels and storage paths."""
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    annotations: dict[LabelKey, str] = Field(default_factory=dict)
    uid: Annotated[str, fmt.UID] | None = None
    """Set by Kubernetes; `psft run` leaves it empty and storage paths use 'local'."""

    @field_validator("annotations")
    @classmethod
    def _annotations_fit(cls, value: dict[str, str]) -> dict[str, str]:
        size = sum(
            len(k.encode(errors="replace")) + len(v.encode(errors="replace"))
            for k, v in value.items()
        )
        if size > ANNOTATIONS_MAX_BYTES:
            raise PydanticCustomError(
                "annotations_too_large",
                f"hold {size} bytes, more than the {ANNOTATIONS_MAX_BYTES} (256 KiB) Kubernetes "
                "allows for all annotations of an object together",
            )
        return value


class ModelSpec(Section):
    source: Annotated[str, Field(min_length=1)]
    """Where the model comes from: a local folder in Hugging Face format, an `s3://` URI of
    such a folder, or a registered name (`psft models` lists them, e.g.
    `smollm2-135m-instruct`). Nothing is downloaded from a model hub."""
    chat_template: str | None = None
    """Jinja chat template that replaces the tokenizer's own."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Parameter dtype. `auto`: bfloat16 on GPU, float32 on CPU (bf16 is far slower on CPUs)."""
    trust_remote_code: bool = False
    """Allow custom modelling code shipped with the model. Off unless you trust the source."""
    max_context_length: Annotated[int, Field(gt=0, le=CONTEXT_MAX)] | None = None
    """Override the context length read from the model config (used by validation)."""


class ValidationSplit(Section):
    files: list[str] = Field(default_factory=list)
    """Held-out files in the same format as `dataset.train`."""
    fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Share of training rows held out when no validation files are given."""
    max_rows: Annotated[int, Field(gt=0, le=ROWS_MAX)] | None = None
    """Cap on validation rows (held-out NLL is computed on all of them)."""


class DatasetSpec(Section):
    train: Annotated[list[str], Field(min_length=1)]
    """Training files: local paths or `s3://` URIs, JSONL (.jsonl/.json) or Parquet."""
    format: Literal["auto", "seed", "messages", "prompt-response"] = "auto"
    """Row format. `seed`: `prompt` as chat messages plus `demonstration`; `messages`: a
    chat whose last assistant turn is the demonstration; `prompt-response`: plain text
    columns named by promptKey and demonstrationKey. `auto` detects per file."""
    prompt_key: str = "prompt"
    """Column holding the prompt: a string or a list of chat messages."""
    demonstration_key: str = "demonstration"
    """Column holding the demonstration (the response the model learns)."""
    messages_key: str = "messages"
    """Column holding the chat for the `messages` format."""
    system_prompt: str | None = SEED_SYSTEM_PROMPT
    """System message prepended to prompts that have none. Empty string: none."""
    max_prompt_length: Annotated[int, Field(gt=0, le=TOKENS_MAX)] = 1024
    """Prompt token budget (chat template included)."""
    max_response_length: Annotated[int, Field(gt=0, le=TOKENS_MAX)] = 4096
    """Demonstration token budget (EOS included)."""
    truncation: Literal["left", "right", "error"] = "error"
    """Over-long rows: `left` drops the start of the prompt and the end of the response,
    `right` drops the end of both, `error` stops with the file and row."""
    on_bad_row: Literal["error", "skip"] = "error"
    """Rows with a missing key, an empty demonstration or (with truncation=error) too many
    tokens: `error` stops and names file and row; `skip` drops and counts them."""
    limit: Annotated[int, Field(gt=0, le=ROWS_MAX)] | None = None
    """Use only the first N training rows (smoke runs)."""
    shuffle: bool = True
    """Shuffle training rows each epoch (seeded by psft.seed)."""
    validation: ValidationSplit = Field(default_factory=ValidationSplit)


LossAggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "micro-token-mean"]


class PSFTSpec(Section):
    objective: Literal["psft", "sft"] = "psft"
    """`psft`: clipped-ratio objective. `sft`: plain cross-entropy, the baseline."""
    engine: Literal["auto", "native", "verl"] = "auto"
    """Training engine. `native`: one process, PyTorch + transformers, CPU or one GPU.
    `verl`: FSDP2 through verl, for GPU clusters. `auto`: verl when resources ask for more
    than one GPU, else native."""
    clip_ratio_low: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    """Lower clip epsilon: ratio floor 1 - clipRatioLow (inert for advantage +1)."""
    clip_ratio_high: Annotated[float, Field(gt=0.0, le=CLIP_MAX)] = 0.28
    """Upper clip epsilon: a token whose ratio exceeds 1 + clipRatioHigh stops pushing."""
    # a dual-clip bound of 1000x the advantage is no bound; verl's default is 3
    clip_ratio_c: Annotated[float, Field(gt=1.0, le=1000.0)] = 10.0
    """Dual-clip constant (only acts on negative advantages, i.e. in GRPO)."""
    loss_agg_mode: LossAggMode = "token-mean"
    """How token losses become one number."""
    batch_size: Annotated[int, Field(gt=0, le=BATCH_MAX)] = 64
    """Demonstrations per step (global batch). Old log-probs are taken once per step."""
    mini_batch_size: Annotated[int, Field(gt=0, le=BATCH_MAX)] = 8
    """Demonstrations per optimizer update; batchSize/miniBatchSize updates per step."""
    micro_batch_size: Annotated[int, Field(gt=0, le=BATCH_MAX)] = 2
    """Demonstrations per forward pass (gradient accumulation within a mini-batch)."""
    max_tokens_per_micro_batch: Annotated[int, Field(gt=0, le=TOKENS_MAX)] | None = None
    """Token-budget micro-batches (verl's dynamic batch size): each forward takes up to
    this many tokens (prompt + response) of its mini-batch instead of microBatchSize
    demonstrations; the native engine fills them with consecutive demonstrations, verl
    (data.use_dynamic_bsz) with its own balanced partition. Must be at least
    maxPromptLength + maxResponseLength (the seed: 38912 = 2048 + 36864 per GPU)."""
    balance_batch: bool = True
    """Reorder each step's batch into mini-batches of about equal token counts
    (Karmarkar-Karp), as the seed's `balance_batch` does across its GPUs; the step's
    demonstrations stay the same. Off: contiguous chunks of the shuffled batch."""
    epochs: Annotated[int, Field(gt=0, le=EPOCHS_MAX)] = 1
    max_steps: Annotated[int, Field(gt=0, le=STEPS_MAX)] | None = None
    """Stop after this many steps, whatever the epochs say."""
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-6
    lr_scheduler: Literal["constant", "cosine"] = "constant"
    """Schedule after warm-up."""
    warmup_steps: Annotated[int, Field(ge=0, le=STEPS_MAX)] = 10
    """Linear warm-up, in steps."""
    # AdamW multiplies weights by 1 - lr * weightDecay each update: above 10 that is
    # negative already at a learning rate of 0.1
    weight_decay: Annotated[float, Field(ge=0.0, le=10.0)] = 0.1
    # a norm of 1e6 never clips a real model's gradient: the largest value that means anything
    grad_clip: Annotated[float, Field(gt=0.0, le=1e6)] = 1.0
    """Max global gradient norm per update."""
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] = 42
    save_every: Annotated[int, Field(ge=0, le=STEPS_MAX)] = 0
    """Save a resumable checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: Annotated[int, Field(gt=0, le=EPOCHS_MAX)] = 2
    """Resumable checkpoints kept (oldest deleted first)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""

    @property
    def updates_per_step(self) -> int:
        return self.batch_size // self.mini_batch_size


class Toleration(Section):
    model_config = ConfigDict(
        # the API server refuses a Pod whose tolerations break these; the CRD refuses the job
        json_schema_extra={fmt.CEL: [r.wire() for r in fmt.TOLERATION_RULES]},
    )

    key: Annotated[str, fmt.TAINT_KEY] | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: Annotated[str, fmt.LABEL_VALUE_FORMAT] | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    # Kubernetes treats a negative value as 0 (evict at once), so 0 is the floor
    toleration_seconds: Annotated[int, Field(ge=0, le=SECONDS_MAX)] | None = None


class ResourcesSpec(Section):
    gpus_per_node: Annotated[int, Field(ge=0, le=GPUS_MAX)] = 1
    """GPUs each training pod asks for (nvidia.com/gpu)."""
    nodes: Annotated[int, Field(gt=0, le=NODES_MAX)] = 1
    """Nodes for training. Above 1, the train stage runs as a KubeRay RayJob: verl's Ray
    trainer with gpusPerNode workers per node (device cpu: one), checkpoints from the
    workers to S3 (docs/multinode.md)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Local runs: where to train. `auto`: cuda when available."""
    image: Annotated[str, fmt.IMAGE_FORMAT] = DEFAULT_TRAINER_IMAGE
    """Trainer image for the stage pods."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    cpu: Quantity = "8"
    """CPU request of each train, eval and grpo pod (Kubernetes quantity); prepare and
    report ask for 2."""
    memory: Quantity = "64Gi"
    """Memory request and limit of each train, eval and grpo pod (Kubernetes quantity);
    prepare and report ask for 8Gi."""
    shm_size: Quantity = "16Gi"
    """Size of the in-memory /dev/shm volume (NCCL and data loaders need more than 64Mi)."""
    node_selector: Annotated[
        dict[LabelKey, LabelValue],
        Field(max_length=fmt.NODE_SELECTOR_MAX),
        fmt.MapKeys(fmt.LABEL_KEY),
    ] = Field(default_factory=dict)
    tolerations: Annotated[list[Toleration], Field(max_length=fmt.TOLERATIONS_MAX)] = Field(
        default_factory=list
    )
    priority_class_name: ObjectName | None = None
    scheduler_name: ObjectName | None = None
    """Custom scheduler for gang scheduling (e.g. `volcano`)."""
    queue: Annotated[str, fmt.QUEUE] | None = None
    """Scheduler queue (Volcano / Kueue), set as the queue label on pods."""
    service_account_name: ObjectName | None = None


class CustomBenchmark(Section):
    name: Annotated[str, fmt.BENCHMARK_NAME]
    path: str
    """JSONL or Parquet file, local or `s3://`."""
    type: Literal["math", "multiple-choice"] = "math"
    problem_key: str = "problem"
    answer_key: str = "answer"
    choices_key: str = "choices"
    """Multiple choice only: list of option texts (or columns A..J, see docs)."""


class EvalSpec(Section):
    enabled: bool = True
    benchmarks: list[str | CustomBenchmark] = Field(
        default_factory=lambda: ["aime24", "aime25", "amc23"]
    )
    """Registered names (aime24, aime25, amc23, math500, minerva) or custom files."""
    samples: Annotated[int, Field(gt=0, le=SAMPLES_MAX)] = 32
    """k: samples per problem (Avg@k, pass@k, maj@k)."""
    samples_per_benchmark: Annotated[
        dict[str, Annotated[int, Field(gt=0, le=SAMPLES_MAX)]],
        Field(max_length=BENCHMARKS_MAX),
        fmt.MapKeys(fmt.BENCHMARK_NAME),
    ] = Field(default_factory=dict)
    """k for some benchmarks instead of `samples`, by benchmark name (the seed: 32 for
    AIME and AMC, 8 for MATH-500 and Minerva)."""
    temperature: Annotated[float, Field(ge=0.0, le=TEMPERATURE_MAX)] = 0.7
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.95
    max_tokens: Annotated[int, Field(gt=0, le=TOKENS_MAX)] = 32768
    """Generation budget per sample."""
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] = 0
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    """`auto`: vLLM when importable and a GPU is present, else transformers."""
    batch_size: Annotated[int, Field(gt=0, le=BATCH_MAX)] = 8
    """Prompts per generate call (transformers backend)."""
    tensor_parallel_size: Annotated[int, Field(gt=0, le=GPUS_MAX)] = 1
    limit: Annotated[int, Field(gt=0, le=ROWS_MAX)] | None = None
    """Only the first N problems of each benchmark (smoke runs)."""
    checkpoints: Literal["final", "all", "best"] = "final"
    """Which training checkpoints to evaluate; `best` picks the lowest validation loss."""
    system_prompt: str | None = None
    """Defaults to dataset.systemPrompt, so eval prompts match training."""
    grading_timeout: Annotated[float, Field(gt=0.0, le=GRADING_SECONDS_MAX)] = 5.0
    """Seconds per answer for symbolic grading before it counts as wrong."""
    accept_answer_phrase: bool = False
    """Also grade a math response that has no `\\boxed{}` answer by its last "The answer
    is: X" phrase ("The final answer is X", "Answer: X"), as the seed's evaluation does.
    Off: only boxed answers count."""


class GRPOSpec(Section):
    enabled: bool = False
    prompts: list[str] = Field(default_factory=list)
    """Prompt files with reference answers (JSONL or Parquet, local or `s3://`)."""
    prompt_key: str = "problem"
    answer_key: str = "answer"
    rollout: Literal["auto", "vllm", "hf", "trl"] = "auto"
    """Rollout backend: vLLM on GPU clusters; transformers-based generation on one machine."""
    rollout_n: Annotated[int, Field(gt=1, le=SAMPLES_MAX)] = 8
    """Responses per prompt (the group)."""
    batch_size: Annotated[int, Field(gt=0, le=BATCH_MAX)] = 32
    """Prompts per step."""
    mini_batch_size: Annotated[int, Field(gt=0, le=BATCH_MAX)] = 8
    steps: Annotated[int, Field(gt=0, le=STEPS_MAX)] = 100
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-6
    # a KL weight of 100 already drowns the reward (advantages are normalised to ~1)
    kl_coef: Annotated[float, Field(ge=0.0, le=100.0)] = 0.001
    use_kl_loss: bool = True
    clip_ratio_low: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    clip_ratio_high: Annotated[float, Field(gt=0.0, le=CLIP_MAX)] = 0.28
    temperature: Annotated[float, Field(gt=0.0, le=TEMPERATURE_MAX)] = 1.0
    max_response_length: Annotated[int, Field(gt=0, le=TOKENS_MAX)] = 4096
    evaluate: bool = True
    """Run the evaluation stage again on the GRPO checkpoint."""


class SecretRef(Section):
    name: ObjectName
    """Kubernetes Secret holding the keys (mounted into pods as env variables)."""
    access_key_key: Annotated[str, fmt.SECRET_KEY] = "accessKey"
    secret_key_key: Annotated[str, fmt.SECRET_KEY] = "secretKey"


class S3Storage(Section):
    endpoint: Annotated[str, fmt.ENDPOINT_FORMAT]
    """host:port of the S3 API (MinIO, SeaweedFS, AWS), optionally after http:// or
    https:// (which then decides TLS). Never credentials: those come from secretRef."""
    bucket: Annotated[str, fmt.BUCKET_FORMAT]
    region: Annotated[str, fmt.REGION_FORMAT] = "us-east-1"
    prefix: Annotated[str, fmt.S3_PREFIX] = "psft"
    secure: bool = True
    """Use TLS."""
    ca_bundle: str | None = None
    """Path to a CA bundle for TLS with a private CA."""
    secret_ref: SecretRef | None = None
    """Credentials; locally they come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."""
    create_bucket: bool = False
    """Create the bucket when it is missing (otherwise that is an error)."""


class LocalStorage(Section):
    path: str = "runs"
    """Folder under which `<job name>/` holds the run (not empty, not the root folder)."""

    @field_validator("path")
    @classmethod
    def _not_empty_or_root(cls, value: str) -> str:
        if is_s3_uri(value):
            raise ValueError(s3_uri_in_local_folder(value))
        local_folder(value)  # PathProblem, a ValueError: empty, root, NUL, ~ of no user, ...
        return value


class StorageSpec(Section):
    type: Literal["local", "s3"] = "local"
    local: LocalStorage = Field(default_factory=LocalStorage)
    s3: S3Storage | None = None
    delete_on_job_deletion: bool = False
    """Delete the job's artifacts when the PSFTJob is deleted (cluster only)."""


class MonitoringSpec(Section):
    enabled: bool = True
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9400
    """Port of each stage's /metrics endpoint (0: pick a free one)."""
    pushgateway: Annotated[str, fmt.PUSHGATEWAY] | None = None
    """Pushgateway URL for final values of short stages."""
    entropy_collapse_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    """Alert when entropy falls below this share of its first value."""


class TTLSpec(Section):
    success: Annotated[int, Field(ge=0, le=SECONDS_MAX)] | None = None
    """Seconds to keep a succeeded job's Workflow."""
    failure: Annotated[int, Field(ge=0, le=SECONDS_MAX)] | None = None
    """Seconds to keep a failed job's Workflow."""


class CompareSpec(Section):
    enabled: bool = False
    """Also train an SFT arm beside the PSFT one: the same model, data, seed, schedule,
    batches and evaluation, objective `sft`. Its stages are `train-sft` and `eval-sft`
    (parallel branches of the Workflow on a cluster, run after the PSFT arm by `psft run`);
    the report overlays both arms' entropy, NLL and Avg@k. Needs psft.objective: psft."""


class PSFTJobSpec(Section):
    model: ModelSpec
    dataset: DatasetSpec
    psft: PSFTSpec = Field(default_factory=PSFTSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    grpo: GRPOSpec = Field(default_factory=GRPOSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec)
    compare: CompareSpec = Field(default_factory=CompareSpec)
    """PSFT vs SFT in one job: an SFT arm trained and evaluated beside the PSFT one."""
    suspend: bool = False
    """Suspend the running Workflow; set back to false to resume."""
    restart_policy: Literal["Never", "OnSpecChange"] = "Never"
    """What a spec change after start does: `Never` refuses it, `OnSpecChange` restarts."""
    backoff_limit: Annotated[int, Field(ge=0, le=RETRIES_MAX)] = 3
    """Retries of a stage after infrastructure failures (eviction, node loss, signals)."""
    active_deadline_seconds: Annotated[int, Field(gt=0, le=SECONDS_MAX)] | None = None
    """Cluster only: seconds the whole job may run, every stage, retry and wait included,
    before Argo stops it and the job fails. Each stage pod and a multi-node RayJob get the
    same limit. Unset: no limit. `psft run` ignores it."""
    ttl_seconds_after_finished: TTLSpec = Field(default_factory=TTLSpec)

    @property
    def engine(self) -> Literal["native", "verl"]:
        """psft.engine resolved: `auto` is verl when asking for several GPUs (not on CPU) or
        several nodes (only verl runs on a Ray cluster), else native."""
        if self.psft.engine != "auto":
            return self.psft.engine
        res = self.resources
        if res.nodes > 1:
            return "verl"
        many = res.gpus_per_node > 1 and res.device != "cpu"
        return "verl" if many else "native"


class PSFTJob(Section):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    api_version: Literal["psft.dev/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["PSFTJob"] = KIND
    metadata: Metadata
    spec: PSFTJobSpec
    status: dict[str, Any] | None = None
    """Written by the operator; ignored by `psft run`."""

    @model_validator(mode="before")
    @classmethod
    def _drop_server_fields(cls, data: Any) -> Any:
        # objects read back from a cluster carry fields no user writes
        if isinstance(data, dict) and isinstance(data.get("metadata"), dict):
            meta = {k: v for k, v in data["metadata"].items() if k not in SERVER_METADATA}
            data = {**data, "metadata": meta}
        return data
