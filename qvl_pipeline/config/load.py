"""Composition outside the CLI (Python API, tests) and the one conversion of the composed config into the typed
RootConfig object that travels down to the components."""

from __future__ import annotations

import math
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qvl_pipeline.config.schema import RootConfig, register_schemas
from qvl_pipeline.errors import ConfigError

CONFIG_MODULE = "qvl_pipeline.conf"
_SLOT = "(attention|rotary|kernels|memory|kv_cache)"
_OPEN_KEYS = re.compile(rf"^({_SLOT}\.options\.[A-Za-z_]\w*\.[A-Za-z_]\w*|hardware\.chains\.{_SLOT})=")


_RUN_ID = f"{os.getpid()}-{secrets.token_hex(2)}"


def run_id() -> str:
    """This process's run id, `<pid>-<4 hex digits>`: the suffix of the default run folder (hydra.run.dir uses
    `${qvl_run_id:}`) and the stamp on each saved result; unique among runs started in the same second."""
    return _RUN_ID


def register_resolvers() -> None:
    """OmegaConf resolvers the packaged config uses (idempotent)."""
    OmegaConf.register_new_resolver("qvl_run_id", run_id, replace=True)


def open_option_overrides(overrides: Sequence[str]) -> list[str]:
    """Plugin options (`attention.options.chunked.chunk_size=512`, any plugin, built-in or third-party) and a
    profile's per-slot chains (`hardware.chains.attention=[sdpa,eager]`) are open namespaces: such overrides get
    Hydra's add-or-override prefix `++`, so nobody has to type it."""
    return [f"++{o}" if _OPEN_KEYS.match(o) else o for o in overrides]


# User text: taken literally from `key=VALUE` (everything after the first `=`), never parsed by Hydra's override
# grammar nor interpolated by OmegaConf. The list keys take `[a.png,b.png]` (an element may be quoted to hold a
# comma) or a single path.
USER_TEXT_KEYS = ("prompt", "prompt_file", "image", "model.path", "results_dir", "bench.image")
USER_TEXT_LISTS = ("images", "video")
_NULLABLE = frozenset({"prompt_file", "image", "model.path", "results_dir", "bench.image"})
_USER_TEXT = re.compile(r"^(\+{0,2})(" + "|".join(re.escape(k) for k in USER_TEXT_KEYS + USER_TEXT_LISTS)
                        + r")=(.*)\Z", re.S)
QUOTING_HINT = ("quote the value for Hydra, e.g. key='a, b' (in a shell: \"key='a, b'\"); "
                f"{', '.join(k + '=' for k in USER_TEXT_KEYS + USER_TEXT_LISTS)} take their text as it is")
# Hydra flags that take the next argument as their value (that argument is not an override).
_FLAGS_WITH_VALUE = frozenset({"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                               "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"})


def literal(text: str) -> str:
    """`text` as a Hydra quoted value that OmegaConf resolves to exactly `text`: `${` is escaped (`\\${`, with
    any backslashes before it doubled) so nothing is interpolated, then quotes and the backslashes before them are
    escaped for Hydra's quoted-string grammar."""
    escaped = re.sub(r"(\\*)\$\{", lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", text)
    escaped = re.sub(r"(\\+)(?='|\Z)", lambda m: m.group(1) * 2, escaped)
    return "'" + escaped.replace("'", "\\'") + "'"


def _split_list(key: str, text: str) -> list[str]:
    """The elements of `[a, 'b,c', "d"]` (quotes optional; inside quotes a backslash escapes the next character)
    or the single path `text`."""
    if not (text.startswith("[") and text.endswith("]")):
        return [text] if text else []
    items: list[str] = []
    buf: list[str] = []
    quote: str | None = None
    quoted = False
    chars = iter(text[1:-1])
    for ch in chars:
        if quote is not None:
            if ch == "\\":
                buf.append(next(chars, ""))
            elif ch == quote:
                quote = None
            else:
                buf.append(ch)
        elif ch in "'\"" and not "".join(buf).strip():
            quote, quoted, buf = ch, True, []
        elif ch == ",":
            item = "".join(buf) if quoted else "".join(buf).strip()
            if item or quoted:
                items.append(item)
            buf, quoted = [], False
        elif not (quoted and ch.isspace()):
            buf.append(ch)
    if quote is not None:
        raise ConfigError(f"{key}={text}: a quote is not closed", f"close it, e.g. {key}=['a, b.png',c.png]")
    item = "".join(buf) if quoted else "".join(buf).strip()
    if item or quoted:
        items.append(item)
    return items


def literal_user_text(overrides: Sequence[str]) -> list[str]:
    """Rewrite the user-text overrides (USER_TEXT_KEYS, USER_TEXT_LISTS) so their text reaches the config exactly
    as typed: `prompt=It's ${HOME}, #1` becomes a quoted, escaped Hydra value. `key=null` keeps meaning unset for
    the optional keys (write `./null` for a file of that name)."""
    out = []
    for override in overrides:
        match = _USER_TEXT.match(override)
        if match is None:
            out.append(override)
            continue
        prefix, key, value = match.groups()
        if key in USER_TEXT_LISTS:
            value = "[" + ",".join(literal(item) for item in _split_list(key, value)) + "]"
        elif not (key in _NULLABLE and value == "null"):
            value = literal(value)
        out.append(f"{prefix}{key}={value}")
    return out


def check_override_syntax(args: Sequence[str]) -> None:
    """Parse every override with Hydra's grammar first, so one that Hydra would reject (an unquoted comma, space
    or quote; a sweep without --multirun) is a ConfigError that names it and says how to quote it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    multirun = any(a in ("-m", "--multirun") for a in args)
    parser = OverridesParser.create()
    skip_next = False
    for arg in args:
        if skip_next or arg.startswith("-") or "=" not in arg:
            skip_next = arg in _FLAGS_WITH_VALUE and not skip_next
            continue
        try:
            parsed = parser.parse_override(arg)
        except (HydraException, OmegaConfBaseException) as exc:
            reason = " ".join(str(exc).split())
            raise ConfigError(f"cannot read the override {arg!r}: {reason}", QUOTING_HINT) from None
        if parsed.is_sweep_override() and not multirun:
            raise ConfigError(f"the override {arg!r} reads as a sweep over several values", QUOTING_HINT
                              + "; add --multirun to sweep")


def prepare_overrides(overrides: Sequence[str]) -> list[str]:
    """Command-line overrides as Hydra must see them: user text made literal, plugin options and chains opened
    with `++`, and every override checked against Hydra's grammar (ConfigError naming the one that is not)."""
    prepared = open_option_overrides(literal_user_text(overrides))
    check_override_syntax(prepared)
    return prepared


COMPOSE_HINT = ("check the override's spelling; `python -m qvl_pipeline --help` lists the groups and options, "
                "`--cfg job` shows the composed config")


def hydra_config_error(exc: BaseException) -> ConfigError | None:
    """Hydra's and OmegaConf's composition errors (an unknown option or key, a value of the wrong type) as one
    ConfigError with a short message; None for any other exception."""
    from hydra.errors import HydraException

    if not isinstance(exc, (HydraException, OmegaConfBaseException)):
        return None
    text = str(exc).split("Config search path:")[0]
    head, _, options = text.partition("Available options in")
    message = " ".join(head.split())
    if options:
        group, _, names = options.partition(":")
        message += f"; available options in{group}: {', '.join(names.split())}"
    cause = exc.__cause__
    if isinstance(cause, OmegaConfBaseException):
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        key = getattr(cause, "full_key", "") or ""
        message += f": {first}" + (f" (at {key})" if key and key not in first else "")
    return ConfigError(f"bad config or override: {message}", COMPOSE_HINT)


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose the root config with Hydra's compose API, exactly as the CLI would."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    register_schemas()
    register_resolvers()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
            return compose(config_name="config", overrides=prepare_overrides(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        error = hydra_config_error(exc)
        assert error is not None
        raise error from exc


def typed(cfg: DictConfig) -> RootConfig:
    """The composed config as RootConfig (dataclasses all the way down); a missing or bad value names its key."""
    cfg = cfg.copy()
    with_hydra = "hydra" in cfg
    if with_hydra:
        OmegaConf.set_struct(cfg, False)
        cfg.pop("hydra")
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        what = (str(exc).splitlines() or [type(exc).__name__])[0]    # OmegaConf appends key and type lines
        raise ConfigError(f"config value missing or invalid{f' at {key}' if key else ''}: {what}",
                          "set it on the command line (key=value) or in the group's YAML file") from exc
    if not isinstance(obj, RootConfig):
        raise ConfigError("the composed config is not a qvl-pipeline config", "compose it from qvl_pipeline.conf")
    validate_config(obj)
    return obj


OUTPUT_FORMATS = ("text", "json")
MODEL_SEED_LIMIT = 2**32        # the demo weights derive per-tensor seeds from it (must stay within 64 bits)
BENCH_COMPARE = ("none", "transformers")
BENCH_MAX_TOKENS = 4096
BENCH_MAX_ROUNDS = 100
TUNE_MAX_MIN_TIME = 10.0         # seconds per measurement
PROFILE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
CONF_DIR_ENV = "QVL_CONF_DIR"   # the user's config folder; config.yaml puts it on Hydra's search path


def user_conf_dir() -> Path:
    """The user's config folder on Hydra's search path: $QVL_CONF_DIR, else ./conf (as config.yaml says)."""
    return Path(os.environ.get(CONF_DIR_ENV) or "conf")


def group_options(group: str, *, packaged_only: bool = False) -> list[str]:
    """The option names of a config group: the packaged ones (qvl_pipeline/conf/<group>/*.yaml) and, unless
    `packaged_only`, the user's (<user conf dir>/<group>/*.yaml)."""
    from importlib.resources import files

    names = {entry.name[:-5] for entry in (files(CONFIG_MODULE) / group).iterdir() if entry.name.endswith(".yaml")}
    if not packaged_only:
        names |= {path.stem for path in (user_conf_dir() / group).glob("*.yaml")}
    return sorted(names)


def _require(ok: bool, key: str, value: Any, allowed: str, fix: str = "") -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range: {allowed}", fix or f"set {key} to {allowed}")


def validate_config(config: RootConfig) -> None:
    """Every range rule of the typed config, checked once right after typing (before anything is probed or loaded);
    a ConfigError names the key and the allowed range. The sampling ranges live in SamplingParams.check and the
    profile budgets' in hardware.profile.check_budgets, which this calls."""
    from qvl_pipeline.generation.sampling import SamplingParams
    from qvl_pipeline.hardware.profile import ProfileError, check_budgets

    proc, gen = config.processing, config.generate
    _require(proc.max_pixels is None or proc.max_pixels >= 1, "processing.max_pixels", proc.max_pixels,
             "an integer ≥ 1 (or null: the checkpoint's / profile's budget)")
    _require(proc.min_pixels is None or proc.min_pixels >= 0, "processing.min_pixels", proc.min_pixels,
             "an integer ≥ 0 (or null: the checkpoint's)")
    if proc.min_pixels is not None and proc.max_pixels is not None:
        _require(proc.min_pixels <= proc.max_pixels, "processing.min_pixels", proc.min_pixels,
                 f"at most processing.max_pixels={proc.max_pixels}")
    _require(proc.max_image_pixels >= 1, "processing.max_image_pixels", proc.max_image_pixels, "an integer ≥ 1")
    _require(config.features.max_cached_images >= 0, "features.max_cached_images",
             config.features.max_cached_images, "an integer ≥ 0 (0 = no cache)")
    _require(gen.max_new_tokens >= 1, "generate.max_new_tokens", gen.max_new_tokens, "an integer ≥ 1")
    _require(gen.max_context is None or gen.max_context >= 1, "generate.max_context", gen.max_context,
             "an integer ≥ 1 (or null: from the memory budget)")
    SamplingParams(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p, min_p=gen.min_p,
                   repetition_penalty=gen.repetition_penalty, seed=gen.seed).check()
    _require(0 <= config.model.seed < MODEL_SEED_LIMIT, "model.seed", config.model.seed,
             f"an integer in [0, {MODEL_SEED_LIMIT - 1}]")
    _require(config.output in OUTPUT_FORMATS, "output", config.output, " or ".join(OUTPUT_FORMATS))
    mem = config.memory
    for key in ("ram_budget_gb", "vram_budget_gb"):
        value = getattr(mem, key)
        _require(value is None or (math.isfinite(value) and value > 0), f"memory.{key}", value,
                 "a number of GiB > 0 (or null: from the machine's memory)")
    _require(math.isfinite(mem.reserve_gb) and mem.reserve_gb >= 0, "memory.reserve_gb", mem.reserve_gb,
             "a number of GiB ≥ 0")
    _require(config.hardware.threads is None or config.hardware.threads >= 1, "hardware.threads",
             config.hardware.threads, "an integer ≥ 1 (or null: one per physical core)")
    _validate_bench_and_tune(config)
    try:
        check_budgets(config.hardware.budgets)
    except ProfileError as exc:
        raise ConfigError(str(exc), "fix that budget in the hardware profile or on the command line") from None


def _validate_bench_and_tune(config: RootConfig) -> None:
    """The ranges of the bench and tune sections (task=bench, task=tune)."""
    bench, tune = config.bench, config.tune
    _require(1 <= bench.tokens <= BENCH_MAX_TOKENS, "bench.tokens", bench.tokens,
             f"an integer in [1, {BENCH_MAX_TOKENS}]")
    _require(1 <= bench.rounds <= BENCH_MAX_ROUNDS, "bench.rounds", bench.rounds,
             f"an integer in [1, {BENCH_MAX_ROUNDS}]")
    _require(bench.compare in BENCH_COMPARE, "bench.compare", bench.compare, " or ".join(BENCH_COMPARE))
    _require(0 < bench.ssd_share <= 1, "bench.ssd_share", bench.ssd_share, "a share of the weights in (0, 1]")
    presets = group_options("model")
    _require(bench.model in presets, "bench.model", bench.model, f"a model preset: {', '.join(presets)}")
    _require(bench.image is None or bool(bench.image.strip()), "bench.image", bench.image,
             "a picture's path (or null: a generated 448x448 picture)")
    _require(math.isfinite(tune.min_time) and 0 < tune.min_time <= TUNE_MAX_MIN_TIME, "tune.min_time",
             tune.min_time, f"a number of seconds in (0, {TUNE_MAX_MIN_TIME:g}]")
    if tune.name is not None:
        _require(bool(PROFILE_NAME.match(tune.name)), "tune.name", tune.name,
                 "a name of letters, digits and underscores that starts with a letter (it becomes the file name "
                 "and hardware=<name>)")
        taken = group_options("hardware", packaged_only=True)
        _require(tune.name not in taken, "tune.name", tune.name,
                 f"a name other than the packaged profiles' ({', '.join(taken)})",
                 "choose a new name, e.g. tune.name=my_laptop")


def load_config(overrides: Sequence[str] = ()) -> RootConfig:
    """compose_config + typed: the Python API's way to the same config the CLI builds."""
    return typed(compose_config(overrides))
