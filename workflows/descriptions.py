"""Descriptions of the PSFTJob fields whose model declares no attribute docstring.

The CRD (`kubectl explain`) and docs/psftjob.md need a description for every field.
Most come from the attribute docstrings in psft.workflows.spec; this table fills the
rest, keyed by `ModelClass.python_field_name`. A test fails when an entry here shadows a
docstring that now exists in the model (move it there) or when a field has neither.
"""

from __future__ import annotations

from pydantic import BaseModel
from pydantic.fields import FieldInfo

FALLBACK: dict[str, str] = {
    "PSFTJob.api_version": "API version of the object: psft.dev/v1alpha1.",
    "PSFTJob.kind": "Always PSFTJob.",
    "PSFTJob.metadata": "Standard object metadata; the name must be a DNS label of at most 52 "
    "characters.",
    "PSFTJob.spec": "What to train, on which data, how, where, and how to evaluate it.",
    "Metadata.labels": "Labels of the job; copied onto the Workflow and its pods.",
    "Metadata.annotations": "Annotations of the job.",
    "PSFTJobSpec.model": "The policy to fine-tune.",
    "PSFTJobSpec.dataset": "Demonstrations to train on (prompt + response, loss on the response).",
    "PSFTJobSpec.psft": "The PSFT objective, batch geometry and optimizer.",
    "PSFTJobSpec.resources": "Compute, image and scheduling of the stage pods.",
    "PSFTJobSpec.eval": "Benchmark evaluation after training (and after GRPO).",
    "PSFTJobSpec.grpo": "Optional GRPO reinforcement learning after PSFT, on prompts with answers.",
    "PSFTJobSpec.storage": "Where the run's data, checkpoints, models and reports are kept.",
    "PSFTJobSpec.monitoring": "Prometheus metrics of the stages and the entropy-collapse alert.",
    "PSFTJobSpec.ttl_seconds_after_finished": "How long the finished Workflow is kept, by "
    "outcome; unset keeps it until the PSFTJob is deleted.",
    "DatasetSpec.validation": "Held-out demonstrations for validation loss and entropy.",
    "PSFTSpec.epochs": "Passes over the training rows (maxSteps may stop earlier).",
    "PSFTSpec.learning_rate": "Peak learning rate (AdamW) after warm-up.",
    "PSFTSpec.weight_decay": "AdamW decoupled weight decay.",
    "PSFTSpec.seed": "Seed of data order, dropout and initial state; equal seeds repeat a run.",
    "ResourcesSpec.image_pull_policy": "Pull policy of the trainer image.",
    "ResourcesSpec.node_selector": "Node labels the train, eval and grpo pods must match "
    "(prepare and report run on any node).",
    "ResourcesSpec.tolerations": "Taints the train, eval and grpo pods tolerate (e.g. GPU node "
    "taints); prepare and report get none.",
    "ResourcesSpec.priority_class_name": "PriorityClass of the train, eval and grpo pods "
    "(prepare and report get none).",
    "ResourcesSpec.service_account_name": "ServiceAccount of the stage pods (e.g. for cloud "
    "storage identity); the namespace default when unset.",
    "Toleration.key": "Taint key to tolerate; empty with operator Exists matches every taint.",
    "Toleration.operator": "`Equal` (default in Kubernetes) or `Exists`.",
    "Toleration.value": "Taint value for operator Equal.",
    "Toleration.effect": "Taint effect to match; empty matches all effects.",
    "Toleration.toleration_seconds": "For NoExecute: seconds the pod stays bound after the "
    "taint appears.",
    "EvalSpec.enabled": "Evaluate the trained model on the benchmarks.",
    "EvalSpec.temperature": "Sampling temperature (0: greedy).",
    "EvalSpec.top_p": "Nucleus sampling: keep the smallest token set with this probability mass.",
    "EvalSpec.seed": "Sampling seed.",
    "EvalSpec.tensor_parallel_size": "GPUs per vLLM engine (tensor parallelism).",
    "CustomBenchmark.name": "Benchmark name used in results and metrics labels.",
    "CustomBenchmark.type": "`math`: boxed answers graded symbolically; `multiple-choice`: a "
    "letter.",
    "CustomBenchmark.problem_key": "Column holding the problem text.",
    "CustomBenchmark.answer_key": "Column holding the reference answer.",
    "GRPOSpec.enabled": "Run GRPO after PSFT training.",
    "GRPOSpec.prompt_key": "Column holding the prompt.",
    "GRPOSpec.answer_key": "Column holding the reference answer the reward checks.",
    "GRPOSpec.mini_batch_size": "Prompts per optimizer update; must divide batchSize.",
    "GRPOSpec.steps": "GRPO steps.",
    "GRPOSpec.learning_rate": "Learning rate of the GRPO optimizer.",
    "GRPOSpec.kl_coef": "Weight of the KL penalty against the reference (PSFT) policy.",
    "GRPOSpec.use_kl_loss": "Apply the KL term as a loss (true) rather than in the reward.",
    "GRPOSpec.clip_ratio_low": "Lower clip epsilon of the policy ratio.",
    "GRPOSpec.clip_ratio_high": "Upper clip epsilon of the policy ratio.",
    "GRPOSpec.temperature": "Rollout sampling temperature.",
    "GRPOSpec.max_response_length": "Token budget of each rollout response.",
    "StorageSpec.type": "`local`: a folder (one machine, or a shared volume); `s3`: an S3 "
    "bucket (required on a cluster).",
    "StorageSpec.local": "Settings for type local.",
    "StorageSpec.s3": "Settings for type s3; required when type is s3.",
    "S3Storage.bucket": "Bucket name.",
    "S3Storage.region": "Bucket region.",
    "S3Storage.prefix": "Key prefix; the run lives at `<prefix>/<namespace>/<job>/<uid>/`.",
    "SecretRef.access_key_key": "Key of the access key id in the Secret.",
    "SecretRef.secret_key_key": "Key of the secret access key in the Secret.",
    "MonitoringSpec.enabled": "Serve and push the stages' Prometheus metrics.",
}


def describe(model: type[BaseModel], name: str, info: FieldInfo) -> str:
    """The one-paragraph description of a field: docstring first, then the table."""
    text = info.description or FALLBACK.get(f"{model.__name__}.{name}", "")
    return " ".join(text.split())
