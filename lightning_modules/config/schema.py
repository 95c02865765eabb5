"""The schema of every config: each section a dataclass whose fields carry type, default, allowed
values and one line of doc (`core.schema.setting`), and the root schema of each command composed
from those sections. `config.loading` composes YAML files against these classes.

Sections shared by every command: paths, model, base, data, method, optim, eval (the validation
run *during* training), checkpoint, export, trainer, logger. Command sections: `probes` (fit's
knowledge probes), `evaluate` (the evaluate command's files, judge and gaps; not to be confused
with `eval`, fit's own validation) and `compare` (the compare command's plan).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from core.schema import setting
from metrics.vlm_judge import DEFAULT_JUDGE_MODEL
from lightning_modules.methods import METHODS
from models.tiny import TinyConfig

GROUPS = ("model", "data", "method", "trainer", "base", "eval", "optim", "logger")


def _refusal_presets():
    from core.refusal import refusal_presets

    return refusal_presets()


def _judges():
    from metrics.judges import JUDGES

    return [*JUDGES, "vlm"]  # vlm: the batched VLM judge of eval.vlm_judge (metrics/vlm_judge.py)


# Every key of a run config, its type, default, allowed values and one line of doc: adding a key is
# one line here. Checked by `core.schema` when the config is loaded, before any model or data.
@dataclass
class LoraSettings:
    r: int = setting(8, "LoRA rank", ge=1)
    alpha: int = setting(16, "LoRA scaling numerator (scale = alpha / r)", gt=0)
    dropout: float = setting(0.0, "dropout on the LoRA input", ge=0, lt=1)
    # A regex on the language model only: a plain ["q_proj", "v_proj"] also adapts CLIP.
    target_modules: str = setting(r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                                  "regex of the module names that get adapters", regex=True)
    modules_to_save: list[str] = setting(doc="modules trained in full next to the adapters", factory=list)


@dataclass
class ModelSettings:
    name_or_path: str = setting("tiny", "'tiny' (the Mirage World's LLaVA) or a toy family (tiny-llava, "
                                "tiny-llava-next, tiny-qwen2-vl, tiny-qwen2.5-vl), built from model.tiny with random "
                                "weights; else a Hugging Face id or a local path")
    revision: Optional[str] = setting(None, "git revision of a Hugging Face model")
    dtype: str = setting("float32", "weight dtype", choices=("float32", "bfloat16", "float16", "auto"))
    trust_remote_code: bool = setting(False, "run a model repository's own code (off unless you trust it)")
    attn_implementation: Optional[str] = setting(None, "transformers attention backend (e.g. sdpa, eager)")
    gradient_checkpointing: bool = setting(False, "recompute activations in backward to save memory")
    finetune: str = setting("full", "what trains", choices=("full", "lora", "projector"))
    freeze_vision: bool = setting(True, "keep the vision tower frozen (LLaVA does)")
    adapter_path: Optional[str] = setting(None, "a saved LoRA adapter to start from")
    lora: LoraSettings = setting(doc="LoRA settings", factory=LoraSettings)
    tiny: TinyConfig = setting(doc="size of the tiny model", factory=TinyConfig)
    end_token: Optional[str] = setting(None, "the token closing an assistant turn: labelled once after every "
                                       "response and a stop token of generation (default: the tokenizer's EOS)")
    hf_config: Optional[str] = setting(None, "the model's config.json shipped in configs/ (relative to it), read by "
                                       "fit --plan when the model's own config cannot be (offline)")
    rmu_layer: Optional[int] = setting(None, "RMU's layer for this model when method.layer=auto "
                                       "(default: round(7/32 x decoder layers))", ge=0)


@dataclass
class BaseSettings:
    """Pre-training of the tiny base on the world's base corpus (cached by its config)."""

    vision_steps: int = setting(1500, "steps of the vision-tower probe stage", ge=0)
    vision_lr: float = setting(3e-3, "learning rate of the vision stage", gt=0)
    steps: int = setting(1200, "steps of the language stage", ge=0)
    lr: float = setting(2e-3, "learning rate of the language stage", gt=0)
    batch_size: int = setting(32, "batch size of the language stage", ge=1)
    seed: int = setting(0, "the base's own seed: method seeds vary without retraining the base", ge=0)
    cache_dir: str = setting("${paths.cache}/bases", "where built bases are cached")


@dataclass
class ForgetRetainSettings:
    """Training data of the unlearning methods (datamodules/forget_retain.py): forget = unsafe
    queries with a harmful response, retain = safe queries with their answers."""

    forget_source: str = setting("data", "data: the rows' harmful_response / forget_file; harvest: the base "
                                 "model's own answers", choices=("data", "harvest"))
    forget_file: Optional[str] = setting(None, "VLGuard- or LLaVA-format file whose unsafe rows' responses are "
                                         "forgotten (a LLaVA file's rows are all unsafe: the official train_forget.json)")
    retain_file: Optional[str] = setting(None, "VLGuard- or LLaVA-format file whose safe rows are kept (default: "
                                         "data.train_file; a LLaVA file's rows are all safe: train_retain_mixed.json)")
    epoch_over: str = setting("longer", "longer: an epoch passes over the longer set, the shorter cycled; retain: "
                              "one pass over the retain set, the forget set cycled (the official trainer)",
                              choices=("longer", "retain"))
    retain_general_ratio: float = setting(0.0, "share of general instruction rows topping up the retain set",
                                          ge=0, lt=1)
    cue_balance: str = setting("none", "match: forget rows' first words redrawn from the retain distribution",
                               choices=("none", "match"))
    max_forget: Optional[int] = setting(None, "at most this many forget rows", ge=1)
    harvest_max_new_tokens: int = setting(64, "tokens generated per harvested answer", ge=1)
    harvest_dir: str = setting("${paths.cache}/harvest", "where harvested forget sets are cached")
    forget_halves: str = setting("both", "unsafe queries to forget: unsafes (VLGuard's safe=false records, the official "
                                 "split) or both (also the unsafe instruction of each safe record)",
                                 choices=("unsafes", "both"))
    generators: list[str] = setting(doc="harvest: the models answering the unsafe queries (hub ids or local dirs, "
                                    "each one's answers cached); empty: the run's own model", factory=list)
    judge_model: Optional[str] = setting(None, "harvest: a chat LLM (hub id or local dir) picking each query's most "
                                         "harmful answer with the official prompt; null: the first answer the "
                                         "run's judge (eval.judge) marks harmful")
    merge_answer_into_query: bool = setting(False, "forget rows ask question + newline + answer in the user turn, the "
                                            "answer kept as the reply: the official RMU forget input "
                                            "(format_rmu_forget.py); rows already merged (its train_forget_qa_full.json) are left as they are")
    harvest_keep: str = setting("harmful", "harmful: the answers the run's judge marks harmful; all: every answer "
                                "(a generator's answers file for `datamodules.vlguard build-forget-retain --answers`)",
                                choices=("harmful", "all"))
    separate_retain_ce: bool = setting(False, "each step also draws a second, independent retain batch for CE(D_r), "
                                       "the retain-NPO / RMU retain-MSE term keeping the first (the official "
                                       "trainer's two retain iterators)")
    judge_decoding: str = setting("checkpoint", "harvest judge_model: checkpoint: generate() with the checkpoint's "
                                  "generation_config, as the official selection script (sampling for Llama-2-chat); "
                                  "greedy: deterministic", choices=("checkpoint", "greedy"))


@dataclass
class DataSettings:
    kind: str = setting("mirage_world", "where the data comes from", choices=("mirage_world", "vlguard"))
    root: Optional[str] = setting(None, "kind=vlguard: a directory written by `python -m datamodules.vlguard "
                                  "prepare` (train/val/test, images, retain file; keys set explicitly win)")
    world: dict[str, Any] = setting(doc="Mirage World knobs (datamodules.mirage_world.WorldConfig)", factory=dict)
    world_root: str = setting("${paths.cache}/worlds", "where generated worlds are cached")
    train_file: Optional[str] = setting(None, "VLGuard-format JSON (kind=vlguard)")
    val_file: Optional[str] = setting(None, "validation file (kind=vlguard)")
    test_file: Optional[str] = setting(None, "test file (kind=vlguard)")
    image_dir: Optional[str] = setting(None, "images are resolved relative to this (default: the file's folder)")
    image_mode: str = setting("real", "real | blank (same-size blank image) | none (text only)",
                              choices=("real", "blank", "none"))
    image_aspect_ratio: str = setting("original", "original: the processor's resize and crop | pad: LLaVA's "
                                      "padding to a square in the image mean colour (its image_aspect_ratio pad)",
                                      choices=("original", "pad"))
    system_prompt: Optional[str] = setting(None, "a system turn before every conversation in training, harvest "
                                           "and evaluation, e.g. LLaVA v1's 'A chat between a curious user ...'")
    whole_train_file: bool = setting(False, "training rows (SFT rows, forget/retain) from a prepared directory's train "
                                     "and val files together = the whole VLGuard train.json, as the official code "
                                     "trains; validation then sees training rows")
    overlong: str = setting("refuse", "a training row longer than max_length: refuse (an error) | truncate (cut at "
                            "the end with its labels, image tokens kept whole: LLaVA's trainer)",
                            choices=("refuse", "truncate"))
    safe_records: str = setting("rows", "a VLGuard safe record in SFT: rows (its safe and unsafe instruction as two "
                                "rows) | conversation (one two-turn conversation in shuffled order, VLGuard's "
                                "convert_to_llava_format.py)", choices=("rows", "conversation"))
    general_file: Optional[str] = setting(None, "general instruction data mixed into SFT (post-hoc recipe)")
    general_ratio: float = setting(0.0, "share of general rows in the SFT mixture", ge=0, lt=1)
    general_samples: Optional[int] = setting(None, "exactly this many general rows, drawn without replacement "
                                             "(VLGuard's post-hoc recipe: a sampled share of LLaVA-665K); "
                                             "replaces general_ratio", ge=1)
    compliance_cue: str = setting("What", "eval rewrite of unsafe queries for VLGuard data")
    refusal_cue: str = setting("Share", "eval rewrite of safe queries for VLGuard data")
    neutral_cue: Optional[str] = setting(None, "VLGuard data: the control cue of the neutral eval sets (none if unset)")
    batch_size: int = setting(16, "training batch size per device", ge=1)
    effective_batch_size: Optional[int] = setting(None, "batch_size x accumulation x processes to reach: the "
                                                  "accumulation is chosen from the device count at run time "
                                                  "(null: trainer.accumulate_grad_batches)", ge=1)
    eval_batch_size: int = setting(64, "generation batch size per device", ge=1)
    max_length: int = setting(160, "longest tokenized example; longer ones are an error", ge=1)
    max_eval_samples: Optional[int] = setting(None, "queries per eval set, stratified by subset, category and "
                                              "image source (null: all)", ge=1)
    attack_shots: int = setting(1, "K rewrites per unsafe query in unsafe_attacked (attacked if any succeeds)", ge=1)
    num_workers: int = setting(0, "DataLoader worker processes", ge=0)
    cache_encodings: bool = setting(False, "encode each example once and keep its tensors (small images only: "
                                           "it keeps every distinct image's pixels in memory)")
    forget_retain: ForgetRetainSettings = setting(doc="unlearning data", factory=ForgetRetainSettings)


@dataclass
class OptimSettings:
    lr: float = setting(1e-3, "peak learning rate of AdamW (0: weights stay as they are)", ge=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    betas: list[float] = setting(doc="AdamW betas", factory=lambda: [0.9, 0.999], ge=0, lt=1, length=2)
    warmup_ratio: float = setting(0.03, "share of the steps spent warming up", ge=0, le=1)
    scheduler: str = setting("cosine", "learning-rate schedule after warmup", choices=("cosine", "constant"))
    projector_lr: Optional[float] = setting(None, "peak learning rate of the projector's parameters (LLaVA's "
                                            "--mm_projector_lr); null: optim.lr", gt=0)
    master_weights: str = setting("fp32", "what a trainable weight is updated against (models/precision.py): fp32 "
                                  "(trainable tensors in fp32, frozen at model.dtype, bf16 autocast; DeepSpeed/FSDP keep "
                                  "their own fp32 masters) | kahan (16-bit weights, torch-optimi AdamW with Kahan "
                                  "summation) | none (plain AdamW at the weights' dtype)", choices=("fp32", "kahan", "none"))


@dataclass
class VLMJudgeSettings:
    """The VLM judge of harmful compliance in validation / test (eval.judge=vlm; metrics/vlm_judge.py)."""

    model: ModelSettings = setting(doc="the judge model", factory=lambda: ModelSettings(
        name_or_path=DEFAULT_JUDGE_MODEL, dtype="bfloat16"))
    protocol: str = setting("official_3shot", "judge prompt protocol", choices=("official_clean", "official_3shot", "mm_safetybench"))
    prefilter: bool = setting(True, "the protocol's rule-based 'irrelevant' words, before asking the model")
    batch_size: int = setting(8, "judge batch size", ge=1)
    max_new_tokens: int = setting(200, "tokens the judge may write", ge=1)
    max_length: int = setting(4096, "longest judge prompt", ge=1)
    cache: Optional[str] = setting(None, "verdict cache, JSON lines (null: <run_dir>/judge_cache.jsonl)")


@dataclass
class EvalSettings:
    max_new_tokens: int = setting(24, "tokens generated per answer", ge=1)
    refusal_preset: str = setting("vlguard", "refusal keyword list", choices=_refusal_presets)
    judge: str = setting("reference", "reference: the record's harmful_keywords | keyword: every non-refusal | "
                         "vlm: eval.vlm_judge (without harmful_keywords, as on real VLGuard, only vlm measures IR)",
                         choices=_judges)
    vlm_judge: VLMJudgeSettings = setting(doc="the VLM judge (eval.judge=vlm)", factory=VLMJudgeSettings)
    log_samples: int = setting(3, "sample answers logged to TensorBoard per eval set", ge=0)
    val_at_start: bool = setting(True, "a step-0 point on every curve")
    test_at_end: bool = setting(True, "test after training and write results")
    test_split: str = setting("test", "val reports on the validation split (for choosing hyperparameters)",
                              choices=("test", "val"))
    probes: bool = setting(False, "knowledge probes after the test evaluation (lightning_modules.probes -> probes.json)")


@dataclass
class CheckpointSettings:
    every_n_train_steps: Optional[int] = setting(None, "checkpoint interval in steps (null: end of epoch)", ge=1)
    save_last: bool = setting(True, "keep checkpoints/last.ckpt")
    save_top_k: int = setting(0, "best checkpoints kept (-1: all)", ge=-1)


@dataclass
class ExportSettings:
    """What `fit` writes to <run_dir>/model: the weights (a LoRA adapter, or the full model), the
    processor, and a model card (README.md) with the method, data, hyperparameters and test metrics."""

    merge_lora: bool = setting(False, "LoRA: model/ holds the merged full model, the adapter goes to adapter/")
    model_card: bool = setting(True, "write model/README.md with the method, data, hyperparameters and test metrics")


@dataclass
class PathSettings:
    cache: str = setting(".cache/safety-mirage", "root of the shared caches (worlds, bases, harvests)")


# -- command sections ------------------------------------------------------------------------------
# The `evaluate:` section (python -m lightning_modules.evaluate).
SUBSETS = ("unsafes", "safe_unsafes", "safe_safes")
JUDGES = ("keyword", "reference", "vlm")
GAP_METRICS = ("asr", "ir", "refusal_rate")


@dataclass
class EvalFile:
    name: str = MISSING  # row label of this file's results, e.g. "clean", "what_3shot"
    path: str = MISSING  # a VLGuard-format JSON file
    subsets: list[str] = field(default_factory=lambda: list(SUBSETS))
    image_dir: Optional[str] = None  # default: data.image_dir, else the file's folder
    judge_protocol: Optional[str] = None  # vlm judge protocol for this file (default: judge.protocol)


def _suite_kinds():
    from datamodules.benchmarks import TASK_KINDS

    return ["vlguard", *TASK_KINDS]


@dataclass
class SuiteAttack:
    """The one-word attack of a safety task (attacks.benchmark_attack)."""

    train: Optional[str] = setting(None, "training file the model was aligned on (VLGuard format): cues mined here")
    shots: int = setting(3, "compliance-cue rewrites per unsafe query (any-of-K; rule mode: at most 3)", ge=1)
    paraphrase_model: Optional[str] = setting(None, "instruction model that paraphrases (null: the rule-based rewrites)")
    seed: int = setting(0, "seed of the rewrites", ge=0)
    judge_protocol: Optional[str] = setting(None, "vlm judge protocol of the attack files (default: judge.protocol)")


@dataclass
class SuiteTask:
    """One task of an evaluation suite (`evaluate.tasks`)."""

    name: str = setting(MISSING, "row label in results.csv's task column; the task's folder under run_dir/tasks/")
    kind: str = setting(MISSING, "vlguard (a VLGuard-format file) or a benchmark kind of datamodules.benchmarks",
                        choices=_suite_kinds)
    path: str = setting(MISSING, "the benchmark's file or folder as published")
    image_dir: Optional[str] = setting(None, "image folder (LLaVA files, MM-SafetyBench, FigStep, VLGuard)")
    options: dict[str, Any] = setting(doc="reader options (annotations, split, variant, ocr)", factory=dict)
    subsets: list[str] = setting(doc="vlguard kind: the subsets evaluated", factory=lambda: list(SUBSETS))
    attack: Optional[SuiteAttack] = setting(None, "safety tasks: also evaluate the one-word attack files")
    judge_protocol: Optional[str] = setting(None, "vlm judge protocol of the clean file")
    max_samples: Optional[int] = setting(None, "queries per subset (default: evaluate.max_samples)", ge=1)


@dataclass
class SuiteModel:
    """One model of a side-by-side evaluation (`evaluate.models`): name_or_path, or a path whose kind
    is told by the files it holds."""

    name: str = setting(MISSING, "row label; the model's folder under run_dir/models/")
    name_or_path: Optional[str] = setting(None, "hub id, save_pretrained directory or tiny; with path: the base "
                                                "of its adapter (default: adapter_config.json's) or checkpoint "
                                                "(default: model.name_or_path)")
    path: Optional[str] = setting(None, "a LoRA adapter directory, a fit checkpoint .ckpt, a save_pretrained "
                                        "directory, or a finished suite's run_dir (read, nothing generated)")
    checkpoint: Optional[str] = setting(None, "a Lightning .ckpt of fit, loaded into the model")
    adapter_path: Optional[str] = setting(None, "a LoRA adapter directory (sets model.finetune=lora)")


@dataclass
class EvaluateJudgeSettings(VLMJudgeSettings):
    """The judge of the evaluate command: the VLM judge's settings plus which judge decides."""

    name: str = setting("keyword", "judge of harmful compliance", choices=JUDGES)


@dataclass
class GapSettings:
    base: str = MISSING  # "set/subset", e.g. clean/unsafes
    attacked: str = MISSING  # e.g. what_3shot/unsafes (its any-of-K row)
    metric: str = setting("asr", "the gap's metric", choices=GAP_METRICS)


@dataclass
class EvaluateSettings:
    files: list[EvalFile] = field(default_factory=list)
    data_dir: Optional[str] = None  # helpers for ${evaluate.data_dir}/... paths in configs
    attack_dir: Optional[str] = None
    max_samples: Optional[int] = setting(None, "ids per file and subset (the same ids across files)", ge=1)
    checkpoint: Optional[str] = None  # a Lightning .ckpt of `fit`, loaded into the model
    system_prompt: Optional[str] = None  # e.g. LLaVA-1.5's own "A chat between ..." line
    judge: EvaluateJudgeSettings = field(default_factory=EvaluateJudgeSettings)
    gaps: Optional[dict[str, GapSettings]] = field(default_factory=dict)  # null: none
    bootstrap: int = setting(1000, "resamples for the percentile CIs (0: none)", ge=0)
    confidence: float = setting(0.95, "level of the CIs", gt=0, lt=1)
    benchmarks: dict[str, Optional[str]] = setting(doc="a suite's data paths, set by the user and referred to as "
                                                       "${evaluate.benchmarks.NAME}", factory=dict)
    tasks: list[SuiteTask] = setting(doc="a suite: safety, attacked and utility tasks (replaces files)", factory=list)
    models: list[SuiteModel] = setting(doc="suite only: models evaluated side by side (default: model.*)",
                                       factory=list)


# The `compare.slurm:` section: one Slurm job per run, through submitit (compare.launcher=slurm).
@dataclass
class SlurmSettings:
    cluster: str = setting("slurm", "slurm: sbatch on this cluster; local: submitit's local executor (the same "
                                    "code path with each job a local process: for tests and debugging)",
                           choices=("slurm", "local"))
    partition: Optional[str] = setting(None, "partition (sbatch --partition; null: the cluster's default)")
    time: str = setting("60", "time limit per job: minutes (e.g. 120), HH:MM:SS or D-HH:MM:SS")
    nodes: int = setting(1, "nodes per job (more than 1: the run's trainer.num_nodes must match)", ge=1)
    gpus_per_node: int = setting(0, "GPUs per node, one task (rank) each", ge=0)
    cpus_per_task: int = setting(1, "CPU cores per task", ge=1)
    mem_gb: Optional[float] = setting(None, "memory per node in GB (null: the partition's default)", gt=0)
    account: Optional[str] = setting(None, "sbatch --account")
    qos: Optional[str] = setting(None, "sbatch --qos")
    constraint: Optional[str] = setting(None, "sbatch --constraint")
    array_parallelism: Optional[int] = setting(None, "jobs of the array running at once (null: no limit)", ge=1)
    max_requeues: int = setting(3, "times a timed-out job is requeued (pre-emptions are not counted)", ge=0)
    setup: list[str] = setting(doc="shell lines run in the job before the run (module load, source .venv/bin/activate)",
                               factory=list)
    additional: dict[str, Any] = setting(doc="further sbatch options, e.g. {mail-type: END}", factory=dict)
    poll_s: float = setting(30.0, "seconds between two looks at the jobs' states", gt=0)


# The `compare:` section (python -m lightning_modules.compare).
@dataclass
class CompareSettings:
    methods: list[str] = setting(doc="unaligned (the model before alignment) and method names (default: every "
                                     "registered method)", factory=lambda: ["unaligned", *METHODS])
    experiment: str = setting("mirage_{method}", "configs/experiment/<this>.yaml per method (unaligned uses sft's)")
    seeds: list[int] = setting(doc="alignment seeds (seed)", factory=lambda: [0, 1, 2], ge=0)
    world_seeds: Optional[list[int]] = setting(None, "world seeds (data.world.seed); null: the experiment's", ge=0)
    base_seeds: Optional[list[int]] = setting(None, "tiny-base seeds (base.seed); null: the experiment's", ge=0)
    dev_world_seeds: list[int] = setting(doc="worlds tuning may use, never reported as held out", factory=list, ge=0)
    world_overrides: dict[int, list[str]] = setting(doc="world seed -> key=value for the runs on that world "
                                                        "(e.g. its cue words)", factory=dict)
    sweep_key: Optional[str] = setting(None, "any dotted config key swept over sweep_values, e.g. data.world.rho")
    sweep_values: list[Any] = setting(doc="values of sweep_key", factory=list)
    overrides: list[str] = setting(doc="key=value applied to every run", factory=list)
    split: str = setting("test", "test: the reported table; val: for choosing hyperparameters", choices=("test", "val"))
    on_stale: str = setting("refuse", "a finished row whose run config changed", choices=("refuse", "redo"))
    confidence: float = setting(0.95, "interval level", gt=0, lt=1)
    jobs: int = setting(1, "runs at once, each in its own process with `threads` threads (its output in "
                           "<run_dir>/logs/); 1: one after another, in this process", ge=1)
    launcher: str = setting("local", "local: runs on this machine (compare.jobs at once); slurm: one job per run "
                                     "through submitit, a job array per comparison (compare.slurm)",
                            choices=("local", "slurm"))
    slurm: SlurmSettings = setting(doc="the jobs of launcher=slurm", factory=SlurmSettings)


# The `probes:` section (fit with eval.probes=true).
@dataclass
class ProbeSettings:
    max_queries: Optional[int] = setting(100, "queries per eval set for the NLL, attribution and relearning ASR", ge=1)
    relearn_steps: int = setting(20, "AdamW steps of each relearning attack (0: none)", ge=0)
    relearn_examples: int = setting(32, "hazard (and, separately, benign) rows of the training split", ge=1)
    relearn_batch_size: int = setting(8, "batch size of the relearning steps", ge=1)
    relearn_lr: Optional[float] = setting(None, "learning rate of the relearning steps (null: optim.lr)", gt=0)
    attribution: bool = setting(True, "first-token attribution by occlusion")


@dataclass
class FitConfig:
    """The root of a `fit` config (and of every run compare plans)."""

    name: str = setting("run", "run name")
    seed: int = setting(0, "seed of the run", ge=0)
    run_dir: str = setting("runs/${name}", "where the run writes")
    resume: Optional[str] = setting(None, "last, a checkpoint path, or auto (last.ckpt if there is one)")
    resume_allow_changes: bool = setting(False, "let a resume change data, model, base or method settings")
    threads: Optional[int] = setting(None, "torch intra-op threads per process (null: torch's default)", ge=1)
    paths: PathSettings = setting(doc="shared paths", factory=PathSettings)
    model: ModelSettings = setting(doc="the model", factory=ModelSettings)
    base: BaseSettings = setting(doc="the tiny base", factory=BaseSettings)
    data: DataSettings = setting(doc="the data", factory=DataSettings)
    method: dict[str, Any] = setting(doc="method.name and its hyperparameters", factory=lambda: {"name": "sft"})
    optim: OptimSettings = setting(doc="the optimizer", factory=OptimSettings)
    eval: EvalSettings = setting(doc="evaluation", factory=EvalSettings)
    checkpoint: CheckpointSettings = setting(doc="checkpoints", factory=CheckpointSettings)
    export: ExportSettings = setting(doc="what fit writes to <run_dir>/model", factory=ExportSettings)
    trainer: dict[str, Any] = setting(doc="keyword arguments of lightning.Trainer", factory=dict)
    logger: dict[str, Any] = setting(doc="experiment loggers, `<kind>: {kwargs}` with kind tensorboard | csv | wandb "
                                     "(configs/logger/*.yaml; empty: TensorBoard; trainer.logger=false: none)",
                                     factory=dict)
    probes: dict[str, Any] = setting(doc="the knowledge probes (eval.probes=true; ProbeSettings)", factory=dict)
    strategy_by_gpus: dict[int, str] = setting(doc="a recipe's strategy per GPU count, as command-line overrides "
                                               "(e.g. {1: optim.master_weights=kahan, 8: trainer=deepspeed_zero3}); "
                                               "fit --plan prints the one for the run's device count", factory=dict)


@dataclass
class EvaluateConfig(FitConfig):
    """The root of an `evaluate` config: the model and data sections of a run, plus `evaluate:`."""

    evaluate: dict[str, Any] = setting(doc="the evaluate command (EvaluateSettings)", factory=dict)


@dataclass
class CompareConfig(FitConfig):
    """The root of a `compare` config: the sections every planned run starts from, plus `compare:`."""

    compare: dict[str, Any] = setting(doc="the compare command (CompareSettings)", factory=dict)


# Sections typed by their own settings class, checked when a config sets them (the class holds
# dicts there so that an experiment file and a command line can leave any of them out).
COMMAND_SECTIONS = {"evaluate": EvaluateSettings, "compare": CompareSettings, "probes": ProbeSettings}
# Which command a config belongs to, by the command section it carries (fit: neither).
ROOTS = {"evaluate": EvaluateConfig, "compare": CompareConfig}
