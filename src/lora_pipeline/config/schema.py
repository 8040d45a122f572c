"""The one typed config: every parameter, with its default, description and its Kubeflow names.

CLI flags (`--train.lora_r`), YAML files and the KFP pipeline's and components' parameters are all generated
from the dataclasses below, so a parameter is declared exactly once. Each field's metadata carries:
  help       its description, as `--help` shows it
  kfp        its name as a parameter of the compiled KFP pipeline, when it has one
  component  its name as an input of the KFP training component, when it has one
  component_optional   True where that component declares the input `Optional[...] = None` (None: the default)
  choices / min / max / min_exclusive   what validation enforces
  applies    "kubernetes" for options that shape the Kubeflow pods / TrainJob and do nothing on a local run
  cache      False for options that do not change the stage's output (resources, labels, logging):
             they stay out of its cache key, so changing them does not rerun the stage
  secret     True for credentials: never recorded (run.json, --print_config) nor printed
  group      the `--help` section of a train option that is neither LoRA nor optimisation (see option_group)
Fields with neither `kfp` nor `component` are no KFP input: `compile -c YAML` writes their values into the components.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

# Integers feed C code (torch, numpy, Arrow, the Kubernetes API) that takes 64 bits at most: every integer
# option is bounded, here at the root, unless its field names a tighter bound for what it feeds.
INT_MAX = 2**63 - 1
SEED_MAX = 2**32 - 1  # numpy's and the `random` module's seeds, which transformers.set_seed also seeds
THREADS_MAX = 4096  # torch.set_num_threads takes a C int; no machine has more cores than this


def param(default: Any, help: str, **meta: Any) -> Any:
    """A config field: default + description + spec names + validation bounds, in one place."""
    meta["help"] = help
    if type(default) is int:
        meta.setdefault("max", INT_MAX)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def pod_param(default: str, help: str, kfp: str, component: str) -> Any:
    """A setting of the training pods on Kubernetes: it shapes no output (not in the cache key) and a local run
    says it does not apply."""
    return param(default, help, kfp=kfp, component=component, cache=False, applies="kubernetes")


LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "polynomial", "cosine_with_restarts")
FSDP_STRATEGIES = ("FULL_SHARD", "HYBRID_SHARD", "NO_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD_ZERO2")
VERBOSITIES = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
EVAL_BACKENDS = ("auto", "hf", "vllm")
DATA_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text")


@dataclass
class DatasetConfig:
    data_uri: str | None = param(
        None,
        "[REQUIRED] Dataset location (hf://dataset, s3://bucket/path, https://url, local path)",
        kfp="phase_01_dataset_man_data_uri",
    )
    # Not KFP parameters: a compiled pipeline fixes them in its dataset component (`compile -c YAML`).
    sources: list[dict] = param(
        [],
        "Data sources mixed into the training data, each URI[@WEIGHT] (the flag is repeatable; YAML: a list of "
        "{uri, weight}). Weight w takes round(w x rows) of the source's rows: a seeded sample for w < 1, every row "
        "int(w) times plus a seeded sample of the rest for w > 1. data_uri, when set, is one more source of weight 1",
        flag="source",
        metavar="URI[@WEIGHT]",
    )
    eval_uri: str | None = param(
        None,
        "Separate eval set (any location data_uri takes): eval.jsonl is its rows, and data_split does not apply",
    )
    data_split: float = param(
        0.9,
        "Train/eval split (0.9 = 90%/10%, 1.0 = no split)",
        kfp="phase_01_dataset_man_data_split",
        min=0.0,
        min_exclusive=True,
        max=1.0,
    )
    subset: int = param(0, "Limit to first N examples (0 = all)", kfp="phase_01_dataset_opt_subset", min=0)
    seed: int = param(42, "Seed of the shuffle before the train/eval split", min=0, max=SEED_MAX)
    format: str = param(
        "auto",
        "Row format (auto = detected per file from its columns): messages (OpenAI chat), sharegpt "
        "(conversations), alpaca (instruction/input/output), prompt_completion, text (plain text, loss on all tokens)",
        choices=DATA_FORMATS,
    )
    columns: dict = param(
        {},
        "Column mapping for other layouts, field=column,... (e.g. instruction=question,output=answer); fields: "
        "messages, conversations, instruction, input, output, system, prompt, completion, text",
    )
    max_bad_rows: float = param(
        0.1, "Largest share of rows that may be dropped as bad (0.1 = 10%); more fails the stage", min=0.0, max=1.0
    )
    sha256: str = param("", "Expected sha256 of the data file (also `#sha256=...` at the end of the URI); empty = none")
    max_bytes: int = param(0, "Largest download accepted, in bytes, archives unpacked included (0 = no limit)", min=0)
    # Not KFP parameters, and not in the cache key: how long to wait changes no data.
    timeout: float = param(
        30.0,
        "Seconds a remote source may take to connect, and a download may go with less than 1 KiB received "
        "(http(s), s3; hf: each request and read); then it is retried, 3 attempts in all",
        min=0.0,
        min_exclusive=True,
        max=86400.0,
        cache=False,
    )
    deadline: float = param(
        0.0,
        "Most seconds an http(s) or s3 download may take, retries included (0 = no total limit)",
        min=0.0,
        max=30 * 86400.0,
        cache=False,
    )


@dataclass
class TrainConfig:
    model: str = param(
        "Qwen/Qwen2.5-1.5B-Instruct",
        "Base model (HuggingFace ID or path)",
        kfp="phase_02_train_man_train_model",
        component="training_base_model",
    )
    effective_batch_size: int = param(
        128,
        "Effective batch size (samples per optimizer step)",
        group="batching",
        kfp="phase_02_train_man_train_batch",
        component="training_effective_batch_size",
        min=1,
        max=1 << 20,
        why="rows per optimizer step; a step is cut into passes, but more than a million rows a step leaves a "
        "dataset a handful of steps",
    )
    micro_batch_size: int = param(
        0,
        "Most samples per forward pass (0 = as many as max_tokens_per_gpu allows; padding counts where passes "
        "are padded); each optimizer step's samples are cut into as many forward passes as the budget needs",
        group="batching",
        min=0,
    )
    epochs: int = param(
        2,
        "Number of training epochs. LoRA typically needs 2-3",
        kfp="phase_02_train_man_train_epochs",
        component="training_num_epochs",
        component_optional=True,
        min=1,
        max=1000,
        why="LoRA converges in a few epochs; more than 1000 passes over the data is a typo",
    )
    max_tokens_per_gpu: int = param(
        32000,
        "Max tokens per forward pass, padding included (memory cap). 32000 for LoRA",
        group="batching",
        kfp="phase_02_train_man_train_tokens",
        component="training_max_tokens_per_gpu",
        min=1,
    )
    max_seq_len: int = param(
        8192,
        "Max sequence length in tokens",
        group="batching",
        kfp="phase_02_train_opt_max_seq_len",
        component="training_max_seq_len",
        min=8,
        max=1 << 20,
        why="beyond the context of released models; pre-flight also checks the base model's own context",
    )
    learning_rate: float = param(
        2e-4,
        "Learning rate. 2e-4 recommended for LoRA",
        kfp="phase_02_train_opt_learning_rate",
        component="training_learning_rate",
        component_optional=True,
        min=0.0,
        min_exclusive=True,
    )
    lr_scheduler: str = param(
        "cosine",
        "LR schedule (cosine, linear, constant)",
        kfp="phase_02_train_opt_lr_scheduler",
        component="training_lr_scheduler",
        component_optional=True,
        choices=LR_SCHEDULERS,
    )
    lr_warmup: int = param(
        0,
        "Warmup steps before full LR",
        kfp="phase_02_train_opt_lr_warmup",
        component="training_lr_warmup_steps",
        component_optional=True,
        min=0,
    )
    seed: int = param(
        42,
        "Random seed for reproducibility",
        kfp="phase_02_train_opt_seed",
        component="training_seed",
        component_optional=True,
        min=0,
        max=SEED_MAX,
    )
    save_epoch: bool = param(
        False,
        "Save checkpoint at each epoch",
        kfp="phase_02_train_opt_save_epoch",
        component="training_checkpoint_at_epoch",
        component_optional=True,
    )
    checkpoint_steps: int = param(
        500,
        "Save a resumable checkpoint every N optimizer steps (0 = not by steps); "
        "a killed or interrupted run resumes from the last one",
        min=0,
        cache=False,
    )
    checkpoint_minutes: float = param(
        10.0,
        "Save a resumable checkpoint every N minutes of training (0 = not by time)",
        min=0.0,
        cache=False,
    )
    max_steps: int = param(0, "Stop after N optimizer steps, overriding epochs (0 = off)", min=-1)
    weight_decay: float = param(0.0, "AdamW weight decay (biases, norms excluded)", min=0.0)
    eval_steps: int = param(0, "Evaluate every N steps (0 = at each epoch's end)", min=0)
    load_best_model_at_end: bool = param(False, "Write the lowest-eval-loss adapter, not the last")
    early_stopping_patience: int = param(0, "Stop after N evals without a lower eval loss (0 = off)", min=0)
    gradient_checkpointing: str = param(
        "auto", "Recompute activations: auto (CUDA, if it saves memory), true, false", choices=("auto", "true", "false")
    )
    report_to: list[str] = param(
        ["none"], "Trackers: tensorboard, mlflow, wandb or none", group="resources", cache=False
    )
    use_liger: bool = param(
        True,
        "Enable Liger kernel optimizations (CUDA with liger-kernel; elsewhere the portable path, said at INFO)",
        kfp="phase_02_train_opt_use_liger",
        component="training_use_liger",
        component_optional=True,
    )
    backend: str = param(
        "auto",
        "Training backend: auto (unsloth when CUDA and unsloth are present, else peft), peft, unsloth",
        choices=("auto", "peft", "unsloth"),
    )
    lora_r: int = param(
        16,
        "[LoRA] Rank of the low-rank matrices (4, 8, 16, 32, 64)",
        kfp="phase_02_train_man_lora_r",
        component="training_lora_r",
        min=1,
        max=1 << 16,
        why="wider than the layers of released models; pre-flight checks it against the targeted layers",
    )
    lora_alpha: int = param(
        32,
        "[LoRA] Scaling factor (typically 2x lora_r)",
        kfp="phase_02_train_man_lora_alpha",
        component="training_lora_alpha",
        min=1,
    )
    lora_dropout: float = param(
        0.0,
        "[LoRA] Dropout rate for LoRA layers",
        kfp="phase_02_train_opt_lora_dropout",
        component="training_lora_dropout",
        min=0.0,
        max=1.0,
        max_exclusive=True,
    )
    lora_target_modules: str = param(
        "",
        "[LoRA] Modules to apply LoRA, comma-separated (empty = auto-detect: all linear layers but the LM head)",
        kfp="phase_02_train_opt_lora_target_modules",
        component="training_lora_target_modules",
    )
    lora_use_rslora: bool = param(
        False,
        "[LoRA] Use Rank-Stabilized LoRA",
        kfp="phase_02_train_opt_lora_use_rslora",
        component="training_lora_use_rslora",
        component_optional=True,
    )
    lora_use_dora: bool = param(
        False,
        "[LoRA] Use Weight-Decomposed LoRA (DoRA)",
        kfp="phase_02_train_opt_lora_use_dora",
        component="training_lora_use_dora",
        component_optional=True,
    )
    lora_load_in_4bit: bool = param(
        True,
        "[QLoRA] Enable 4-bit quantization (needs bitsandbytes)",
        kfp="phase_02_train_opt_lora_load_in_4bit",
        component="training_lora_load_in_4bit",
        component_optional=True,
    )
    lora_load_in_8bit: bool = param(
        False,
        "[QLoRA] Enable 8-bit quantization (needs bitsandbytes)",
        kfp="phase_02_train_opt_lora_load_in_8bit",
        component="training_lora_load_in_8bit",
        component_optional=True,
    )
    bnb_4bit_quant_type: str | None = param(
        None,
        "[QLoRA] 4-bit quantization type, nf4 or fp4 (None = nf4)",
        component="training_lora_bnb_4bit_quant_type",
        component_optional=True,
        choices=("nf4", "fp4"),
    )
    bnb_4bit_compute_dtype: str | None = param(
        None,
        "[QLoRA] 4-bit compute dtype (None = bfloat16)",
        component="training_lora_bnb_4bit_compute_dtype",
        component_optional=True,
        choices=("bfloat16", "float16", "float32"),
    )
    bnb_4bit_use_double_quant: bool | None = param(
        None,
        "[QLoRA] Enable double quantization (None = true)",
        component="training_lora_bnb_4bit_use_double_quant",
        component_optional=True,
    )
    lora_sample_packing: bool = param(
        False,
        "[LoRA] Pack multiple samples for efficiency: rows are packed into sequences of up to "
        "min(max_seq_len, max_tokens_per_gpu) tokens, which count as the samples of effective_batch_size; rows "
        "never attend to each other (applied where padding-free batches are exact, else a warning)",
        group="batching",
        kfp="phase_02_train_opt_lora_sample_packing",
        component="training_lora_sample_packing",
        component_optional=True,
    )
    merge: bool = param(
        False,
        "Also write merged/: the adapter merged onto the base loaded without quantization (even after 4-bit/8-bit "
        "training), safetensors + tokenizer, for servers without LoRA support; adapter/ is always written",
    )
    fsdp_sharding_strategy: str | None = param(
        None,
        "FSDP sharding strategy for multi-GPU training (FULL_SHARD, HYBRID_SHARD, NO_SHARD). Not applied yet: "
        "processes train with DDP (each holds the whole model), and a set value is named in a warning",
        group="resources",
        component="training_fsdp_sharding_strategy",
        component_optional=True,
        choices=FSDP_STRATEGIES,
    )
    data_output_dir: str | None = param(
        None,
        "Directory for processed training data (None = inside the train stage output)",
        group="resources",
        component="training_data_output_dir",
        component_optional=True,
    )
    gpus_per_worker: int = param(
        1,
        "GPUs per worker",
        kfp="phase_02_train_man_train_gpu",
        component="training_resource_gpu_per_worker",
        min=0,
        applies="kubernetes",
    )
    num_workers: int = param(
        1,
        "Number of training pods",
        kfp="phase_02_train_man_train_workers",
        component="training_resource_num_workers",
        min=1,
        applies="kubernetes",
    )
    num_procs: str = param(
        "auto",
        "Processes per worker ('auto' = one per GPU, 1 without one). A local run with N > 1 launches N training "
        "processes with torchrun (gloo on CPU, NCCL on GPU); on Kubernetes, processes per TrainJob node",
        group="resources",
        kfp="phase_02_train_opt_num_procs",
        component="training_resource_num_procs_per_worker",
    )
    cpu: str = pod_param("4", "CPU cores per worker", "phase_02_train_opt_cpu", "training_resource_cpu_per_worker")
    memory: str = pod_param(
        "32Gi", "RAM per worker", "phase_02_train_opt_memory", "training_resource_memory_per_worker"
    )
    labels: str = pod_param("", "K8s labels (key=val,...)", "phase_02_train_opt_labels", "training_metadata_labels")
    annotations: str = pod_param(
        "", "K8s annotations (key=val,...)", "phase_02_train_opt_annotations", "training_metadata_annotations"
    )
    env_vars: str = param(
        "", "Env vars (KEY=VAL,...)", kfp="phase_02_train_opt_env_vars", component="training_envs", group="resources"
    )
    trust_remote_code: bool = param(False, "Run the model repository's own code (off unless asked for)")
    chat_template: str = param(
        "",
        "Chat template for a base model without one (it replaces the model's own if set): chatml, llama3, mistral, "
        "zephyr, or a Jinja file (read where the train stage runs). Saved with the adapter's tokenizer, so eval, "
        "chat and export use it too. Empty: the model's own; a chat dataset on a model without one is refused",
        group="optimisation",
    )
    threads: int = param(
        0,
        "CPU threads for torch (0 = OMP_NUM_THREADS if set, else the cores this process may use)",
        group="resources",
        min=0,
        max=THREADS_MAX,
        cache=False,
    )


@dataclass
class EvalConfig:
    tasks: list[str] = param(
        ["arc_easy"],
        "lm-eval tasks (arc_easy, mmlu, gsm8k, hellaswag, etc.), comma-separated or a JSON list",
        kfp="phase_03_eval_man_eval_tasks",
    )
    batch_size: str = param("auto", "Eval batch size ('auto' or integer)", kfp="phase_03_eval_opt_batch")
    gen_kwargs: dict = param({}, "Generation params dict (max_tokens, temperature)", kfp="phase_03_eval_opt_gen_kwargs")
    limit: int = param(-1, "Max samples per task (-1 = all)", kfp="phase_03_eval_opt_limit", min=-1)
    log_samples: bool = param(True, "Log individual predictions", kfp="phase_03_eval_opt_log_samples")
    model_args: dict = param(
        {},
        "Model init args dict (dtype, max_length; gpu_memory_utilization with the vllm backend only)",
        kfp="phase_03_eval_opt_model_args",
    )
    backend: str = param(
        "auto",
        "lm-eval model backend: hf (transformers), vllm, or auto (vllm when CUDA and the vllm package are "
        "importable, else hf)",
        choices=EVAL_BACKENDS,
    )
    verbosity: str = param(
        "INFO",
        "Logging level (DEBUG, INFO, WARNING, ERROR)",
        kfp="phase_03_eval_opt_verbosity",
        choices=VERBOSITIES,
        cache=False,
    )
    include_path: str = param("", "Directory of extra lm-eval task YAMLs (empty = registered tasks only)")
    compare_base: bool = param(True, "Also evaluate the base model and show both side by side")
    full_precision: bool = param(
        False,
        "After 4-bit/8-bit training, also score base and adapter on the full-precision base "
        "(the quantized base the adapter was trained on is always scored)",
    )
    apply_chat_template: bool = param(
        True, "Score with the tokenizer's chat template, as the model was trained (when it has one)"
    )


@dataclass
class RegistryConfig:
    address: str = param(
        "",
        "Model Registry address: http://host or https://host (a bare host means https); "
        "'local' = the local registry file (registry.path); empty or 'none' = skip registration",
        kfp="phase_04_registry_man_address",
    )
    port: int = param(8080, "Model registry server port", kfp="phase_04_registry_opt_port", min=1, max=65535)
    author: str = param("pipeline", "Author name for the registered model", kfp="phase_04_registry_man_reg_author")
    model_name: str = param("lora-model", "Model name in registry", kfp="phase_04_registry_man_reg_name")
    version: str = param(
        "1.0.0",
        "Semantic version (major.minor.patch); 'auto' (local registry) = the version holding the same adapter "
        "content, else the next free patch",
        kfp="phase_04_registry_man_reg_version",
    )
    description: str = param("", "Model description", kfp="phase_04_registry_opt_description")
    format_name: str = param(
        "pytorch",
        "Model format name of the registered artifacts (adapter, and merged model with train.merge): pytorch, "
        "onnx, tensorflow",
        kfp="phase_04_registry_opt_format_name",
    )
    format_version: str = param(
        "1.0", "Model format version of the registered artifacts", kfp="phase_04_registry_opt_format_version"
    )
    # Not KFP parameters: a bearer token (a secret: never recorded, so not in the cache key either), a CA
    # bundle for a registry behind a private CA, and where the local registry lives.
    token: str = param(
        "",
        "Bearer token for the Model Registry; empty = env MODEL_REGISTRY_TOKEN. Never stored",
        cache=False,
        secret=True,
    )
    ca_cert: str = param("", "PEM CA bundle to verify an https registry with; empty = the system CAs", cache=False)
    allow_no_eval: bool = param(
        False, "Register a run whose eval did not complete (its version then carries no scores)", cache=False
    )
    timeout: float = param(
        60.0,
        "Most seconds a Model Registry may take to register, retries included; then one line, outputs kept",
        min=0.0,
        min_exclusive=True,
        max=86400.0,
        cache=False,
    )
    path: str = param(
        "",
        "Local registry file; empty = $LORA_PIPELINE_REGISTRY, else $LORA_PIPELINE_HOME/registry.db, "
        "else ~/.local/share/lora-pipeline/registry.db)",
    )


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "dataset": DatasetConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "registry": RegistryConfig,
}


def fields_of(section: str) -> list[dataclasses.Field]:
    return list(dataclasses.fields(SECTIONS[section]))


def field_type(section: str, name: str) -> Any:
    return typing.get_type_hints(SECTIONS[section])[name]


# `--help` sections, in order: (stage section, title). The train stage's options are split by option_group.
HELP_GROUPS: dict[str, tuple[str, str]] = {
    "data": ("dataset", "data (dataset stage)"),
    "optimisation": ("train", "model and optimisation (train stage)"),
    "lora": ("train", "LoRA and quantization (train stage)"),
    "batching": ("train", "batching (train stage)"),
    "resources": ("train", "resources (train stage)"),
    "kubernetes": ("train", "Kubernetes only: shape the pods / TrainJob, a local run does not use them"),
    "eval": ("eval", "eval (eval stage)"),
    "registry": ("registry", "registry (register stage)"),
}


def option_group(section: str, f: dataclasses.Field) -> str:
    """The `--help` section of an option, from its metadata: `applies`, `group`, its [LoRA]/[QLoRA] tag."""
    if section != "train":
        return "data" if section == "dataset" else section
    if f.metadata.get("applies") == "kubernetes":
        return "kubernetes"
    if "group" in f.metadata:
        return f.metadata["group"]
    return "lora" if f.metadata["help"].startswith(("[LoRA]", "[QLoRA]")) else "optimisation"


def kfp_parameters() -> dict[str, tuple[str, str]]:
    """KFP pipeline parameter name -> (section, field): the mapping the KFP pipeline is generated from."""
    return {
        f.metadata["kfp"]: (section, f.name) for section in SECTIONS for f in fields_of(section) if "kfp" in f.metadata
    }


def output_options(section_config: Any) -> dict[str, Any]:
    """The options of a section that change its stage's output: fields with metadata cache=False are left out."""
    return {
        f.name: getattr(section_config, f.name)
        for f in dataclasses.fields(section_config)
        if f.metadata.get("cache", True)
    }


def kubernetes_only(config: Any) -> dict[str, Any]:
    """Options set off their default that apply on Kubernetes only: a local run records and names them."""
    out = {}
    for section in SECTIONS:
        values, defaults = getattr(config, section), SECTIONS[section]()
        for f in fields_of(section):
            if f.metadata.get("applies") == "kubernetes" and getattr(values, f.name) != getattr(defaults, f.name):
                out[f"{section}.{f.name}"] = getattr(values, f.name)
    return out
