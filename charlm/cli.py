"""Entry-point plumbing shared by every `python -m charlm.X`: the config folder, the compose-time
check of the command line (before Hydra writes anything), and one-line reports of user mistakes.

Set CHARLM_DEBUG=1 to see the traceback anyway.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from charlm.errors import CharLMError, DivergenceError

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # the Hydra config groups


def user_error_types() -> tuple[type[BaseException], ...]:
    from hydra.errors import InstantiationException

    return (CharLMError, DivergenceError, OmegaConfBaseException, InstantiationException)


def error_line(e: BaseException) -> str:
    """The one line that tells the user what went wrong."""
    cause = e.__cause__ if type(e).__name__ == "InstantiationException" and e.__cause__ else e
    msg = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if isinstance(e, OmegaConfBaseException):
        key = getattr(e, "full_key", None)
        msg = f"config key {key}: {msg}" if key and key not in msg else f"config: {msg}"
    return msg


@contextlib.contextmanager
def report_user_errors():
    """Turn the known user-facing errors into `error: ...` on stderr and exit status 2."""
    try:
        yield
    except user_error_types() as e:
        if os.environ.get("CHARLM_DEBUG"):
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        if in_multirun():
            raise  # Hydra records the failed job and the sweep goes on
        sys.exit(2)


def in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - outside Hydra
        return False


def _unparsable_override_line(override: str) -> str:
    """An override Hydra's grammar cannot read (a non-ASCII or special character in an unquoted value), and
    the same override quoted, as a shell takes it."""
    import re
    import shlex

    key, eq, value = override.partition("=")
    if not eq or value[:1] in ("'", '"') or not re.fullmatch(r"[+~]{0,2}[A-Za-z0-9_./@-]+", key):
        return f"cannot read the override {override!r} (Hydra's override grammar: KEY=VALUE, KEY in ASCII)"
    why = "non-ASCII characters" if not value.isascii() else "characters Hydra's override grammar reserves"
    # inside Hydra's double quotes, backslashes before a quote or at the end are doubled, the quote escaped
    inner = re.sub(r'(\\*)("|$)', lambda m: m.group(1) * 2 + ("\\" if m.group(2) else "") + m.group(2), value)
    quoted = shlex.quote(key + '="' + inner + '"')
    return f"{override}: a value with {why} must be quoted: {quoted}"


def _compose_error_line(e: Exception) -> str:
    if type(e).__name__ == "OverrideParseException" and getattr(e, "override", None):
        return _unparsable_override_line(str(e.override))
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    skip = ("full_key", "object_type", "Config search path", "provider=")
    lines = [ln for ln in lines if not ln.startswith(skip)]
    msg = lines[0] if lines else type(e).__name__
    if "Available options" in str(e):
        i = next(i for i, ln in enumerate(lines) if ln.startswith("Available options"))
        msg += f" (available: {', '.join(lines[i + 1:])})"
    elif msg.startswith("Could not override") and "+" in str(e):
        key = msg.split("'")[1]
        msg = f"no such config key {key!r} (check its spelling; `+{key}=...` adds a new key on purpose)"
    return msg


def override_key(arg: str) -> str:
    """The key of a `key=value` argument, without Hydra's `+`/`++`/`~` prefix."""
    return arg.split("=", 1)[0].lstrip("+~")


def dedupe(args: list[str]) -> list[str]:
    """Later arguments for the same key win (Hydra would refuse the repeat)."""
    last = {override_key(a): a for a in args}
    return [a for a in args if last[override_key(a)] is a]


def quote_free_text(argv: list[str], keys: tuple[str, ...], verbatim: tuple[str, ...] = ()) -> list[str]:
    """Let free text (`prompt=To be, or not`) pass through Hydra's override grammar verbatim: a value of
    `keys` is quoted unless it already is, a value of `verbatim` always (a regex may start with a quote)."""
    out = []
    for a in argv:
        key, eq, value = a.partition("=")
        name = key.lstrip("+")
        if eq and name in verbatim:  # backslashes doubled only before a quote, so it reads back as given
            a = f"{key}='" + re.sub(r"(\\+)(?='|$)", r"\1\1", value).replace("'", "\\'") + "'"
        elif eq and name in keys and value[:1] not in ("'", '"'):
            a = f"{name}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        out.append(a)
    return out


def compose(config_name: str, overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """The config as Hydra would compose it for these overrides (no run folder, nothing written)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides,
                                 return_hydra_config=return_hydra_config)
    finally:
        GlobalHydra.instance().clear()


def compose_or_exit(config_name: str, overrides: list[str]) -> DictConfig:
    """`compose`, with a composition error (misspelt key, unknown option) as one line and exit 2."""
    try:
        return compose(config_name, overrides, return_hydra_config=True)
    except Exception as e:
        if os.environ.get("CHARLM_DEBUG"):
            raise
        print(f"error: {_compose_error_line(e)}", file=sys.stderr)
        sys.exit(2)


def checked_config(config_name: str, argv: list[str], check: Callable[[DictConfig], None] | None = None
                   ) -> DictConfig:
    """The config one run's command line composes to, checked by `check`, with nothing written; a user
    mistake is one line on stderr and exit status 2. What `hydra_main` does before it runs anything (the
    tests put the documented commands through it)."""
    cfg = compose_or_exit(config_name, argv)
    with report_user_errors():
        if check is not None:
            check(cfg)
    return cfg


# Hydra launchers that come from a package extra: launcher -> (the plugin's module, the extra)
LAUNCHER_EXTRAS = {"slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm")}


def missing_launcher(argv: list[str]) -> str | None:
    """What is wrong with `hydra/launcher=NAME` when its plugin (a package extra) is not installed, else None."""
    import importlib.util

    for a in argv:
        key, _, value = a.partition("=")
        if key.lstrip("+~") != "hydra/launcher" or value not in LAUNCHER_EXTRAS:
            continue
        module, extra = LAUNCHER_EXTRAS[value]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its namespace package is missing too
            found = False
        if not found:
            return (f"hydra/launcher={value} needs the {extra} extra: pip install -e '.[{extra}]' "
                    f"({module.split('.')[-1].replace('_', '-')})")
    return None


def check_launcher(argv: list[str]) -> None:
    """A launcher whose plugin is not installed: one line naming the extra and exit status 2 (instead of
    Hydra's config search path)."""
    if (problem := missing_launcher(argv)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


def hydra_main(config_name: str, fn: Callable[[DictConfig], object], argv_hook: Callable[[list[str]], list[str]]
               | None = None, check: Callable[[DictConfig], None] | None = None,
               plan: Callable[[DictConfig, list[str]], list[str]] | None = None) -> None:
    """Run `fn(cfg)` as a Hydra app on conf/CONFIG_NAME.yaml, after the command line has been composed
    and checked (`check`) with nothing written; `plan` may then add overrides (a claimed run folder).
    User mistakes inside `fn` end in one line too."""
    import hydra

    argv = sys.argv[1:]
    if argv_hook is not None:
        argv = argv_hook(argv)
    check_launcher(argv)
    if not any(a in ("-m", "--multirun") or a.startswith("-") for a in argv):  # Hydra's flags: it composes
        cfg = checked_config(config_name, argv, check)
        if plan is not None:
            with report_user_errors():
                argv = plan(cfg, argv)
    sys.argv = [sys.argv[0], *argv]

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def _main(cfg: DictConfig):
        with report_user_errors():
            return fn(cfg)

    _main()
