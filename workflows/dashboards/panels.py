"""The panels of the PSFT dashboards, as data.

One definition drives both renderings: the Grafana dashboards (PromQL `expr`, built by
`grafana.py`) and the PNGs of a local run (`field` of the metrics.jsonl records, drawn by
`render.py`). A panel without `field` exists only on a cluster (operator, GPUs); a panel
without `expr` only in the local report.

Metric names follow psft.trainer.telemetry: a record key `k` of a train/grpo stage is the
gauge `psft_train_<k>` with labels namespace, job, stage; eval records become
`psft_eval_accuracy{benchmark,k}`. Operator metrics: `psft_jobs{phase}`,
`psft_reconcile_total{result}`, `psft_reconcile_seconds` (histogram),
`psft_stage_duration_seconds{stage}`; these carry no job labels, and `namespace` is the
operator's own (added by the ServiceMonitor), which is what the operator dashboard's
namespace variable selects. GPU panels read NVIDIA DCGM exporter metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

PanelKind = Literal["timeseries", "stat", "bargauge"]

# Grafana template variables, applied to every training query.
JOB_SELECTOR = 'namespace=~"$namespace", job=~"$job"'
NAMESPACE_SELECTOR = 'namespace=~"$namespace"'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelDef:
    key: str
    """Stable identifier (file name of the PNG, anchor in tests)."""
    title: str
    description: str
    unit: str = "none"
    """Grafana unit id (none, s, percentunit, bytes, ...)."""
    queries: tuple[Query, ...] = ()
    field: str | None = None
    """metrics.jsonl key drawn against `step` in the local report."""
    kind: PanelKind = "timeseries"
    width: int = 8
    height: int = 8
    log_scale: bool = False


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[PanelDef, ...]


@dataclass(frozen=True)
class DashboardDef:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]
    job_variable: bool = True


def _train(
    key: str,
    title: str,
    description: str,
    *,
    unit: str = "none",
    log_scale: bool = False,
) -> PanelDef:
    metric = f"psft_train_{key}"
    return PanelDef(
        key=key,
        title=title,
        description=description,
        unit=unit,
        queries=(
            Query(
                f"max by (namespace, job, stage) ({metric}{{{JOB_SELECTOR}}})",
                "{{job}} · {{stage}}",
            ),
        ),
        field=key,
        log_scale=log_scale,
    )


ENTROPY = PanelDef(
    key="entropy",
    title="Entropy (PSFT vs SFT)",
    description=(
        "Token-mean entropy of the policy over response tokens, measured before each "
        "update. PSFT keeps it near its starting value; plain SFT lets it fall. A job with "
        "spec.compare shows both arms (stages train and train-sft); otherwise pick the "
        "PSFT job and its SFT baseline in the `job` variable to compare them. The "
        "PSFTEntropyCollapse alert fires when it stays below a fraction of its start."
    ),
    queries=(
        Query(
            f"max by (namespace, job, stage) (psft_train_entropy{{{JOB_SELECTOR}}})",
            "{{job}} · {{stage}}",
        ),
        Query(
            f"max by (namespace, job, stage) (psft_train_val_entropy{{{JOB_SELECTOR}}})",
            "{{job}} · {{stage}} held-out",
        ),
    ),
    field="entropy",
    width=12,
)

LOSS = PanelDef(
    key="loss",
    title="Loss",
    description="Training loss per step (token-mean) and held-out loss at evaluation steps.",
    queries=(
        Query(
            f"max by (namespace, job, stage) (psft_train_loss{{{JOB_SELECTOR}}})",
            "{{job}} · {{stage}}",
        ),
        Query(
            f"max by (namespace, job) (psft_train_val_loss{{{JOB_SELECTOR}}})",
            "{{job}} · held-out",
        ),
    ),
    field="loss",
    width=12,
)

PROGRESS = PanelDef(
    key="progress",
    title="Step progress",
    description="Completed steps over planned steps of each training stage.",
    unit="percentunit",
    kind="bargauge",
    queries=(
        Query(
            f"max by (namespace, job, stage) (psft_train_step{{{JOB_SELECTOR}}})"
            f" / max by (namespace, job, stage) (psft_train_total_steps{{{JOB_SELECTOR}}})",
            "{{job}} · {{stage}}",
        ),
    ),
    width=8,
    height=6,
)

ETA = PanelDef(
    key="eta",
    title="ETA",
    description=(
        "Time left at the step rate of the last 15 minutes: (total - step) / deriv(step)."
    ),
    unit="s",
    kind="stat",
    queries=(
        Query(
            f"(max by (namespace, job, stage) (psft_train_total_steps{{{JOB_SELECTOR}}})"
            f" - max by (namespace, job, stage) (psft_train_step{{{JOB_SELECTOR}}}))"
            f" / max by (namespace, job, stage) (deriv(psft_train_step{{{JOB_SELECTOR}}}[15m]))",
            "{{job}} · {{stage}}",
        ),
    ),
    width=8,
    height=6,
)

THROUGHPUT = replace(
    _train(
        "tokens_per_second",
        "Tokens/s",
        "Training throughput: response tokens per second of wall time.",
        unit="short",
    ),
    height=6,
)

TRAINING_DASHBOARD = DashboardDef(
    uid="psft-training",
    title="PSFT / Training",
    description="PSFTJob training, evaluation, GRPO and GPUs, per namespace and job.",
    rows=(
        Row("Progress", (PROGRESS, ETA, THROUGHPUT)),
        Row("Objective", (ENTROPY, LOSS)),
        Row(
            "Trust region",
            (
                _train(
                    "clip_fraction",
                    "Clip fraction",
                    "Share of response tokens whose gradient the ratio clip removes "
                    "(ratio above 1 + clipRatioHigh). Near 0 means PSFT behaves like SFT.",
                    unit="percentunit",
                ),
                _train(
                    "ratio_mean",
                    "Ratio mean",
                    "Mean probability ratio new/old over response tokens; 1 at the first "
                    "mini-batch of every step.",
                ),
                _train(
                    "approx_kl",
                    "Approx. KL(old || new)",
                    "How far each step moves the policy from the one that took the old log-probs.",
                    log_scale=True,
                ),
            ),
        ),
        Row(
            "Optimizer",
            (
                _train(
                    "grad_norm",
                    "Gradient norm",
                    "Global gradient norm before clipping (psft.gradClip).",
                    log_scale=True,
                ),
                _train(
                    "learning_rate",
                    "Learning rate",
                    "Learning rate of each step (linear warm-up, then the schedule).",
                ),
                _train(
                    "ratio_max",
                    "Ratio max",
                    "Largest probability ratio new/old in the step.",
                ),
            ),
        ),
        Row(
            "Evaluation and GRPO",
            (
                PanelDef(
                    key="eval_accuracy",
                    title="Eval Avg@k per benchmark",
                    description=(
                        "Mean accuracy over k samples per problem (Avg@k), per benchmark, "
                        "of the last evaluated checkpoint."
                    ),
                    unit="percentunit",
                    kind="bargauge",
                    field="accuracy",
                    queries=(
                        Query(
                            "max by (namespace, job, stage, benchmark, k) "
                            f"(psft_eval_accuracy{{{JOB_SELECTOR}}})",
                            "{{job}} · {{stage}} · {{benchmark}} avg@{{k}}",
                        ),
                    ),
                    width=12,
                ),
                PanelDef(
                    key="grpo_reward",
                    title="GRPO reward",
                    description=(
                        "Mean reward of the rollouts of each GRPO step (share of "
                        "correct answers for math prompts)."
                    ),
                    queries=(
                        Query(
                            "max by (namespace, job, stage) "
                            f'(psft_train_reward_mean{{{JOB_SELECTOR}, stage="grpo"}})',
                            "{{job}} · reward",
                        ),
                    ),
                    field="reward_mean",
                    width=12,
                ),
            ),
        ),
        Row(
            "GPUs (DCGM exporter)",
            (
                PanelDef(
                    key="gpu_utilization",
                    title="GPU utilisation",
                    description=(
                        "DCGM_FI_DEV_GPU_UTIL of the GPUs held by the job's pods (named "
                        "after its Workflow, psft-<job>-...). Empty without the NVIDIA DCGM "
                        "exporter and its Kubernetes pod mapping."
                    ),
                    unit="percent",
                    queries=(
                        Query(
                            'avg by (namespace, pod) (DCGM_FI_DEV_GPU_UTIL{namespace=~"$namespace"'
                            ', pod=~"psft-($job)-.*"})',
                            "{{pod}}",
                        ),
                    ),
                    width=12,
                ),
                PanelDef(
                    key="gpu_memory",
                    title="GPU memory used",
                    description=(
                        "DCGM_FI_DEV_FB_USED (framebuffer memory, MiB) summed over the "
                        "GPUs of each pod of the job."
                    ),
                    unit="mbytes",
                    queries=(
                        Query(
                            'sum by (namespace, pod) (DCGM_FI_DEV_FB_USED{namespace=~"$namespace"'
                            ', pod=~"psft-($job)-.*"})',
                            "{{pod}}",
                        ),
                    ),
                    width=12,
                ),
            ),
        ),
    ),
)

OPERATOR_DASHBOARD = DashboardDef(
    uid="psft-operator",
    title="PSFT / Operator",
    description=(
        "The psft operator: PSFTJobs by phase, reconciles, stage durations. `namespace` "
        "selects the operator installation (the namespace it runs in)."
    ),
    job_variable=False,
    rows=(
        Row(
            "Jobs",
            (
                PanelDef(
                    key="jobs_by_phase",
                    title="Jobs by phase",
                    description=(
                        "PSFTJobs per phase (Pending, Running, Succeeded, Failed...), as "
                        "counted by the operator (max over its replicas)."
                    ),
                    queries=(
                        Query(
                            f"max by (phase) (psft_jobs{{{NAMESPACE_SELECTOR}}})",
                            "{{phase}}",
                        ),
                    ),
                    width=12,
                ),
                PanelDef(
                    key="stage_duration",
                    title="Stage duration",
                    description="Wall time of finished stages, by stage (p95 over 1 hour).",
                    unit="s",
                    queries=(
                        Query(
                            "histogram_quantile(0.95, sum by (le, stage) "
                            f"(rate(psft_stage_duration_seconds_bucket{{{NAMESPACE_SELECTOR}}}[1h])))",
                            "{{stage}} p95",
                        ),
                    ),
                    width=12,
                ),
            ),
        ),
        Row(
            "Reconciles",
            (
                PanelDef(
                    key="reconcile_latency",
                    title="Reconcile latency",
                    description="Quantiles of the time one reconcile of a PSFTJob takes.",
                    unit="s",
                    queries=tuple(
                        Query(
                            f"histogram_quantile({q}, sum by (le) "
                            f"(rate(psft_reconcile_seconds_bucket{{{NAMESPACE_SELECTOR}}}[5m])))",
                            f"p{round(q * 100)}",
                        )
                        for q in (0.5, 0.95, 0.99)
                    ),
                    log_scale=True,
                    width=12,
                ),
                PanelDef(
                    key="reconcile_rate",
                    title="Reconciles by result",
                    description="Reconciles per second by result (ok, error, retry...).",
                    unit="ops",
                    queries=(
                        Query(
                            "sum by (result) "
                            f"(rate(psft_reconcile_total{{{NAMESPACE_SELECTOR}}}[5m]))",
                            "{{result}}",
                        ),
                    ),
                    width=12,
                ),
            ),
        ),
    ),
)

DASHBOARDS: tuple[DashboardDef, ...] = (TRAINING_DASHBOARD, OPERATOR_DASHBOARD)


def all_panels(dashboard: DashboardDef) -> list[PanelDef]:
    return [p for row in dashboard.rows for p in row.panels]


def local_panels() -> list[PanelDef]:
    """Panels the local report draws from metrics.jsonl (those with a `field`)."""
    return [p for d in DASHBOARDS for p in all_panels(d) if p.field is not None]
