"""Every runtime setting, read from the environment, with its documented default.

This is the only place that reads environment variables. Names that Label Studio
ML backends already use (``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``,
``BASIC_AUTH_USER``, ``BASIC_AUTH_PASS``, ``MODEL_DIR``) keep their usual names;
everything specific to this project is prefixed ``EGM_``.

``docs/configuration.md`` is generated from the field descriptions below
(``egm-assist config --markdown``), so the table never drifts from the code.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _env(name: str, *aliases: str) -> AliasChoices:
    return AliasChoices(name, *aliases)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", populate_by_name=True)

    # --- Redis / queue -------------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=_env("REDIS_URL"),
        description="Redis connection URL shared by the backend, workers and CLI.",
    )
    queue_prefix: str = Field(
        "egm",
        validation_alias=_env("EGM_QUEUE_PREFIX"),
        description="Prefix of the RQ queue names and of every Redis key this project writes.",
    )
    job_timeout_s: int = Field(
        900, validation_alias=_env("EGM_JOB_TIMEOUT_S"),
        description="Longest a single batch job may run on a worker before RQ fails it.",
    )
    job_retries: int = Field(
        3, validation_alias=_env("EGM_JOB_RETRIES"),
        description="How often a batch job that failed or whose worker died is retried.",
    )
    heartbeat_s: int = Field(
        5, validation_alias=_env("EGM_HEARTBEAT_S"),
        description="Worker heartbeat period. A worker silent for 3 periods + 10 s is dead and its jobs are re-queued.",
    )
    result_ttl_s: int = Field(
        3600, validation_alias=_env("EGM_RESULT_TTL_S"),
        description="How long finished job results stay in Redis.",
    )
    failure_ttl_s: int = Field(
        7 * 24 * 3600, validation_alias=_env("EGM_FAILURE_TTL_S"),
        description="How long failed jobs stay in RQ's failed registry (RQ's default is a year).",
    )
    version_wait_s: float = Field(
        600.0, validation_alias=_env("EGM_VERSION_WAIT_S"),
        description="How long a job planned for a model_version waits for a live worker serving it (counted from "
                    "when such a worker was last seen, or from enqueueing); then a live worker of another version "
                    "fails it with error_kind version and a reason naming both versions.",
    )
    worker_wait_s: float = Field(
        120.0, validation_alias=_env("EGM_WORKER_WAIT_S"),
        description="How long a command that needs workers (prelabel, demo, export rationales) waits while it "
                    "sees no live worker at all before it gives up with a message.",
    )
    worker_start_timeout_s: float = Field(
        900.0, validation_alias=_env("EGM_WORKER_START_TIMEOUT_S"),
        description="How long such a command waits for workers that are alive but still loading their model.",
    )
    cache_ttl_s: int = Field(
        30 * 24 * 3600, validation_alias=_env("EGM_CACHE_TTL_S"),
        description="Lifetime of the content-addressed result cache entries (0 disables the cache).",
    )

    # --- Label Studio --------------------------------------------------------
    label_studio_url: str = Field(
        "http://127.0.0.1:8080", validation_alias=_env("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST"),
        description="Base URL of Label Studio, used to download /data/... images and to write predictions.",
    )
    label_studio_api_key: SecretStr | None = Field(
        None, validation_alias=_env("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN"),
        description="Label Studio legacy token or personal access token (JWT refresh token).",
    )
    ls_outage_wait_s: float = Field(
        300.0, validation_alias=_env("EGM_LS_OUTAGE_WAIT_S"),
        description="How long a worker keeps retrying a prediction write while Label Studio is unreachable "
                    "or failing (5xx, 429) before it fails those tasks with error_kind label_studio.",
    )

    # --- ML backend HTTP service --------------------------------------------
    host: str = Field("127.0.0.1", validation_alias=_env("EGM_HOST"),
                      description="Interface the ML backend listens on (0.0.0.0 inside containers).")
    port: int = Field(9090, validation_alias=_env("EGM_PORT", "PORT"),
                      description="Port of the ML backend.")
    basic_auth_user: str | None = Field(None, validation_alias=_env("BASIC_AUTH_USER"),
                                        description="Basic-auth user required on every route but /health.")
    basic_auth_pass: SecretStr | None = Field(None, validation_alias=_env("BASIC_AUTH_PASS"),
                                              description="Basic-auth password.")
    public_url: str | None = Field(
        None, validation_alias=_env("EGM_PUBLIC_URL"),
        description="URL Label Studio uses to reach this backend. On /setup the backend makes sure the "
                    "project has a webhook to <this URL>/webhook (creates it if Label Studio did not), with "
                    "basic auth when set. The host needs a dot: Label Studio refuses others. Unset: the "
                    "backend only patches basic auth into any <host>:EGM_PORT/webhook of the project.",
    )
    predict_budget_s: float = Field(
        25.0, validation_alias=_env("EGM_PREDICT_BUDGET_S"),
        description="How long /predict waits for workers before handing late results to them "
                    "(they write them to Label Studio). Keep well under ML_TIMEOUT_PREDICT (100 s).",
    )
    max_request_bytes: int = Field(
        10 * 1024 * 1024, validation_alias=_env("EGM_MAX_REQUEST_BYTES"),
        description="Largest request body the backend accepts (/predict: EGM_MAX_PREDICT_BYTES).",
    )
    max_prompt_chars: int = Field(
        1000, validation_alias=_env("EGM_MAX_PROMPT_CHARS"),
        description="Longest typed referring expression accepted.",
    )
    max_predict_bytes: int = Field(
        256 * 1024 * 1024, validation_alias=_env("EGM_MAX_PREDICT_BYTES"),
        description="Largest /predict body accepted: Label Studio's \"Retrieve predictions\" sends every selected "
                    "task in one request, with its annotations and predictions (a task without them is about 0.5 KB: "
                    "5,000 tasks measured 2.5 MB on Label Studio 1.23).",
    )
    predict_bulk_tasks: int = Field(
        200, validation_alias=_env("EGM_PREDICT_BULK_TASKS"), ge=1,
        description="A /predict with more tasks than this is handed to the bulk path (as `prelabel`): it answers "
                    "at once and the workers write the predictions to Label Studio.",
    )
    prompt_default_label: str | None = Field(
        None, validation_alias=_env("EGM_PROMPT_DEFAULT_LABEL"),
        description="Label of a typed prompt's box when the prompt names no label of the config "
                    "(else the annotator is told to name one).",
    )
    ls_sync_version: bool = Field(
        True, validation_alias=_env("EGM_LS_SYNC_VERSION"),
        description="On /setup, rename the connected ML backend in Label Studio to the live model_version and set "
                    "the project's model_version to it, so the Data Manager's prediction score column works "
                    "(needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY).",
    )

    # --- Model / engine ------------------------------------------------------
    engine: Literal["hf", "vllm", "openai", "scripted"] = Field(
        "hf", validation_alias=_env("EGM_ENGINE"),
        description="Inference engine: hf (transformers), vllm (in-process), openai (any OpenAI-compatible "
                    "server such as `vllm serve`), scripted (returns fixed EGM text; tests and benchmarks).",
    )
    model_dir: str | None = Field(
        None, validation_alias=_env("MODEL_DIR"),
        description="Local directory of a Qwen3-VL/EGM checkpoint. Takes precedence over EGM_MODEL_ID.",
    )
    model_id: str = Field(
        "nvidia/EGM-4B", validation_alias=_env("EGM_MODEL_ID"),
        description="Hub id used when MODEL_DIR is unset and weights are reachable.",
    )
    device: str = Field("auto", validation_alias=_env("EGM_DEVICE"),
                        description="torch device for the hf engine: auto, cpu, cuda, cuda:N.")
    dtype: str = Field("auto", validation_alias=_env("EGM_DTYPE"),
                       description="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16 or float32.")
    max_pixels: int = Field(
        1280 * 28 * 28, validation_alias=_env("EGM_MAX_PIXELS"),
        description="Pixel cap of the image given to the model (about max_pixels/1024 visual tokens).",
    )
    min_pixels: int = Field(256 * 28 * 28 // 4, validation_alias=_env("EGM_MIN_PIXELS"),
                            description="Lower pixel bound of the image given to the model.")
    max_new_tokens: int = Field(1024, validation_alias=_env("EGM_MAX_NEW_TOKENS"),
                                description="Generation budget per image (EGM answers are ~100 tokens).")
    temperature: float = Field(0.0, validation_alias=_env("EGM_TEMPERATURE"),
                               description="0 means greedy decoding, as EGM is evaluated.")
    bulk_batch_size: int = Field(
        64, validation_alias=_env("EGM_BULK_BATCH_SIZE"),
        description="Tasks per bulk batch job (prelabel). Large jobs amortise the Label Studio write "
                    "(one import request per job); the engine still runs EGM_BATCH_SIZE images at a time. "
                    "Default = EGM_BATCH_SIZE: one job is one engine batch (why: docs/configuration.md).",
    )
    batch_size: int = Field(64, validation_alias=_env("EGM_BATCH_SIZE"),
                            description="Images per engine call (the hf engine's largest batch bucket), and tasks "
                                        "per interactive batch job. 64 from the GPU measurements "
                                        "(docs/configuration.md, Batch sizes); raise to 128-256 on a card with "
                                        "room for the KV cache.")
    compile: bool = Field(False, validation_alias=_env("EGM_COMPILE"),
                          description="hf engine: static KV cache + torch.compile of the decode step (GPU).")
    openai_base_url: str = Field("http://127.0.0.1:8000/v1", validation_alias=_env("EGM_OPENAI_BASE_URL"),
                                 description="OpenAI-compatible endpoint for the openai engine.")
    openai_api_key: SecretStr | None = Field(None, validation_alias=_env("EGM_OPENAI_API_KEY"),
                                             description="Bearer token for the OpenAI-compatible endpoint.")
    openai_model: str | None = Field(None, validation_alias=_env("EGM_OPENAI_MODEL"),
                                     description="Model name to request (default: the served model).")
    openai_concurrency: int = Field(16, validation_alias=_env("EGM_OPENAI_CONCURRENCY"),
                                    description="Requests in flight per worker for the openai engine.")
    openai_timeout_s: float = Field(120.0, validation_alias=_env("EGM_OPENAI_TIMEOUT_S"),
                                    description="Timeout of one OpenAI-compatible request.")
    vllm_gpu_memory_utilization: float = Field(0.85, validation_alias=_env("EGM_VLLM_GPU_MEMORY_UTILIZATION"),
                                               description="vLLM: fraction of GPU memory to use.")
    vllm_max_model_len: int = Field(8192, validation_alias=_env("EGM_VLLM_MAX_MODEL_LEN"),
                                    description="vLLM: context length.")
    vllm_tensor_parallel_size: int = Field(1, validation_alias=_env("EGM_VLLM_TENSOR_PARALLEL_SIZE"),
                                           description="vLLM: GPUs per model replica.")
    scripted_response: str | None = Field(None, validation_alias=_env("EGM_SCRIPTED_RESPONSE"),
                                          description="scripted engine: completion to return ({label} is filled in).")
    scripted_delay_s: float = Field(0.0, validation_alias=_env("EGM_SCRIPTED_DELAY_S"),
                                    description="scripted engine: seconds each engine call takes (simulated GPU time).")

    # --- Prompts and labels --------------------------------------------------
    prompt_mode: Literal["multi", "per_label"] = Field(
        "multi", validation_alias=_env("EGM_PROMPT_MODE"),
        description="Label-driven pre-annotation: one Qwen3-VL multi-category prompt per image (multi) "
                    "or one EGM referring prompt per label (per_label).",
    )
    prompt_dir: str | None = Field(None, validation_alias=_env("EGM_PROMPT_DIR"),
                                   description="Folder with prompt templates overriding config/prompts/.")

    # --- Bulk runs and active learning ----------------------------------------
    task_retries: int = Field(
        3, validation_alias=_env("EGM_TASK_RETRIES"),
        description="Bulk runs: how often a task that failed transiently (image download, engine error) is "
                    "retried, with exponential backoff, before it lands in the run's failed list.",
    )
    task_retry_backoff_s: float = Field(
        2.0, validation_alias=_env("EGM_TASK_RETRY_BACKOFF_S"),
        description="Bulk runs: delay before the first retry of a transiently failed task (doubles each time).",
    )
    uncertainty: Literal["logprob", "samples", "both"] = Field(
        "logprob", validation_alias=_env("EGM_UNCERTAINTY"),
        description="Prediction score for active learning: logprob (box-token log-probabilities), samples "
                    "(agreement of EGM_UNCERTAINTY_SAMPLES answers) or both (their product). See docs/bulk.md.",
    )
    uncertainty_samples: int = Field(
        1, validation_alias=_env("EGM_UNCERTAINTY_SAMPLES"),
        description="K, the answers per query compared by the samples score (K-1 extra engine requests; "
                    "needs EGM_TEMPERATURE > 0 to differ).",
    )

    # --- Worker pipeline (keeping the GPU busy) ----------------------------------
    prefetch: bool = Field(
        True, validation_alias=_env("EGM_PREFETCH"),
        description="Workers load the next waiting job's images while the engine runs the current batch.",
    )
    write_behind: bool = Field(
        True, validation_alias=_env("EGM_WRITE_BEHIND"),
        description="Bulk jobs file their Label Studio write in a Redis outbox and a background writer does it, "
                    "so the GPU never waits for Label Studio; a crashed writer's entries are taken over.",
    )
    outbox_lease_s: float = Field(
        30.0, validation_alias=_env("EGM_OUTBOX_LEASE_S"),
        description="How long a writer holds an outbox entry without renewing it before any worker may take the "
                    "entry over (renewed every third of it while the write runs).",
    )
    preempt_interactive: bool = Field(
        True, validation_alias=_env("EGM_PREEMPT_INTERACTIVE"),
        description="A worker serving both queues runs a waiting interactive job during a pause of the bulk batch "
                    "on its engine (hf, scripted: every few decode steps and inside the prefill) instead of after "
                    "the batch; the bulk batch's answers do not change. See docs/gpu.md.",
    )
    preempt_check_s: float = Field(
        0.05, validation_alias=_env("EGM_PREEMPT_CHECK_S"), ge=0.0,
        description="How often, at most, a paused bulk batch looks at the interactive queue (one Redis LINDEX).",
    )
    outbox_max_pending: int = Field(
        4, validation_alias=_env("EGM_OUTBOX_MAX_PENDING"), ge=1,
        description="A worker with this many unwritten bulk results waits before filing another (Label Studio "
                    "slower than the GPU slows the worker down instead of piling results up).",
    )

    # --- Images --------------------------------------------------------------
    max_image_pixels: int = Field(
        64_000_000, validation_alias=_env("EGM_MAX_IMAGE_PIXELS"),
        description="Images with more pixels are refused (decompression-bomb guard).",
    )
    max_image_bytes: int = Field(50 * 1024 * 1024, validation_alias=_env("EGM_MAX_IMAGE_BYTES"),
                                 description="Largest image download accepted.")
    image_timeout_s: float = Field(20.0, validation_alias=_env("EGM_IMAGE_TIMEOUT_S"),
                                   description="Timeout of one image download.")
    allowed_hosts: str = Field(
        "", validation_alias=_env("EGM_ALLOWED_HOSTS"),
        description="Comma-separated extra hosts images may be fetched from (Label Studio's host is always allowed). "
                    "'*' allows any public host.",
    )
    allow_private_networks: bool = Field(
        False, validation_alias=_env("EGM_ALLOW_PRIVATE_NETWORKS"),
        description="Allow image URLs that resolve to loopback/private/link-local addresses (other than Label Studio's).",
    )
    local_files_root: str | None = Field(
        None, validation_alias=_env("EGM_LOCAL_FILES_ROOT", "LOCAL_FILES_DOCUMENT_ROOT"),
        description="Root folder for local paths and /data/local-files/?d=... URLs read from disk.",
    )

    state_dir: str = Field(
        "~/.cache/egm-assist", validation_alias=_env("EGM_STATE_DIR"),
        description="Folder for worker state: checkpoint fingerprint caches when the checkpoint folder is "
                    "read-only.",
    )

    # --- Logging -------------------------------------------------------------
    log_level: str | None = Field(None, validation_alias=_env("EGM_LOG_LEVEL", "LOG_LEVEL"),
                                  description="Log level; unset: INFO for serve and worker, WARNING for the "
                                              "other commands (their progress is printed, not logged).")
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", validation_alias=_env("EGM_LOG_FORMAT"),
        description="json (structured, one object per line), text, or auto: json for serve and worker, and for "
                    "other commands text when stderr is a terminal, json otherwise.")

    @property
    def model_path(self) -> str:
        return self.model_dir or self.model_id

    def with_overrides(self, **env: object) -> "Settings":
        """These settings with some variables replaced, named as in the environment (``REDIS_URL=...``);
        ``None`` leaves a variable as it is. Nothing is written to ``os.environ``."""
        given = {name: value for name, value in env.items() if value is not None}
        unknown = sorted(set(given) - set(_FIELD_OF))
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
        values = {f: getattr(self, f) for f in self.model_fields_set}
        values.update({_FIELD_OF[name]: value for name, value in given.items()})
        return Settings(**values)

    def is_set(self, env_name: str) -> bool:
        """Whether variable ``env_name`` was given (environment or override) rather than defaulted."""
        if env_name not in _FIELD_OF:
            raise ValueError(f"unknown setting {env_name}")
        return _FIELD_OF[env_name] in self.model_fields_set

    def environment(self) -> dict[str, str]:
        """The variables that give a child process these settings (those given, not defaulted)."""
        out = {}
        for name in sorted(self.model_fields_set):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, bool):
                value = "true" if value else "false"
            out[env_names(name)[0]] = str(value)
        return out

    def secret_values(self) -> list[str]:
        """Every secret this process knows, for log redaction."""
        out = []
        for value in (self.label_studio_api_key, self.basic_auth_pass, self.openai_api_key):
            if value is not None and value.get_secret_value():
                out.append(value.get_secret_value())
        redis_password = urlsplit(self.redis_url).password  # redis://:password@host/0
        if redis_password:
            out.append(redis_password)
        return out


def env_names(field_name: str) -> list[str]:
    """The environment variable(s) of a settings field, main name first."""
    alias = Settings.model_fields[field_name].validation_alias
    return [c for c in alias.choices if isinstance(c, str)] if isinstance(alias, AliasChoices) else [field_name]


#: environment variable -> settings field.
_FIELD_OF = {env: name for name in Settings.model_fields for env in env_names(name)}


#: settings a command built from its flags (use_settings); None: read the environment.
_installed: list[Settings | None] = [None]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return _installed[0] or Settings()


def reload_settings() -> Settings:
    """Re-read the environment (tests); forgets settings installed with :func:`use_settings`."""
    _installed[0] = None
    get_settings.cache_clear()
    return get_settings()


def use_settings(settings: Settings) -> Settings:
    """Make ``settings`` what :func:`get_settings` returns in this process (the CLI, after its flags)."""
    get_settings.cache_clear()
    _installed[0] = settings
    return settings
