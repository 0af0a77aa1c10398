"""Run folders: claimed atomically, never clobbered, and logged.

- A new run claims `outputs/DATE/HH-MM-SS-MODEL` with an exclusive `mkdir` before Hydra starts; two
  runs started in the same second get `...-MODEL-2`, `-3`, ...
- A resumed run (`ckpt_path=RUN/checkpoints/last.ckpt`) continues in the checkpoint's own folder.
- A folder that holds a run (a checkpoint or results.json) is refused before anything is written,
  unless the command resumes that very run.
- `train.log` in the folder holds what the run printed (progress-bar redraws left out).
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from charlm.errors import RunDirError


def holds_run(folder: Path) -> bool:
    """True when `folder` holds a charlm run's outputs (checkpoints or results)."""
    return (folder / "checkpoints" / "last.ckpt").exists() or (folder / "results.json").exists()


def checkpoint_folder(ckpt_path: str) -> Path:
    """The run folder a checkpoint belongs to (RUN/checkpoints/x.ckpt -> RUN)."""
    p = Path(ckpt_path).resolve()
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def explicit_dir(cfg: DictConfig) -> Path | None:
    """`hydra.run.dir` when the command (or a config) names a fixed folder; None for the dated template."""
    try:
        raw = cfg.hydra.run._get_node("dir")._value()
    except Exception:  # noqa: BLE001 - no hydra section (compose without it)
        return None
    return None if "${" in str(raw) else Path(str(raw))


def planned(cfg: DictConfig) -> Path | None:
    """The folder a command will write into, when it is already known before Hydra starts."""
    folder = explicit_dir(cfg)
    if folder is None and cfg.get("ckpt_path"):
        folder = checkpoint_folder(cfg.ckpt_path)
    return folder


def check(cfg: DictConfig, run_dir: Path | None) -> None:
    """Refuse a folder that holds another run: never overwrite checkpoints or results."""
    if run_dir is None or not holds_run(run_dir):
        return
    ckpt = cfg.get("ckpt_path")
    if ckpt is None:
        raise RunDirError(f"{run_dir} already holds a run; resume it with "
                          f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'} or pick another hydra.run.dir")
    if checkpoint_folder(ckpt) != run_dir.resolve():
        raise RunDirError(f"hydra.run.dir={run_dir} holds another run: resuming {ckpt} there would overwrite its "
                          f"checkpoints and results; leave hydra.run.dir out to continue in "
                          f"{checkpoint_folder(ckpt)}, or pick an empty folder")


def claim(base: Path) -> Path:
    """Create `base` (or `base-2`, `base-3`, ...) with an exclusive mkdir and return it."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        folder = base if k == 1 else base.with_name(f"{base.name}-{k}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RunDirError(f"{base}: could not claim a free run folder")


def plan(cfg: DictConfig, argv: list[str], root: str = "outputs") -> list[str]:
    """The overrides that fix the run folder before Hydra starts: the checkpoint's folder on resume,
    else a freshly claimed dated folder (unless the command names one)."""
    if explicit_dir(cfg) is not None:
        return argv
    if cfg.get("ckpt_path"):
        folder = checkpoint_folder(cfg.ckpt_path)
    else:
        model = str(cfg.hydra.runtime.choices.get("model", "model")) if "runtime" in cfg.hydra else "model"
        folder = claim(Path(root) / time.strftime("%Y-%m-%d") / f"{time.strftime('%H-%M-%S')}-{model}")
    return [*argv, f"hydra.run.dir='{folder}'"]


def current(run_dir: Path | None = None, model_name: str | None = None) -> tuple[Path, str]:
    """The Hydra job's run folder and model choice, unless given."""
    if run_dir is None or model_name is None:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        run_dir = run_dir or Path(hc.runtime.output_dir)
        model_name = model_name or hc.runtime.choices.get("model", "model")
    return Path(run_dir), str(model_name)


class _Tee(io.TextIOBase):
    """Writes to the terminal and to a log file; progress-bar redraws (carriage returns) skip the file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log
        self._skipped = False

    def write(self, s: str) -> int:
        self.stream.write(s)
        redraw = "\r" in s or "\x1b[" in s or (self._skipped and not s.strip())
        if not redraw:
            self.log.write(s)
            self.log.flush()
        self._skipped = redraw
        return len(s)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")

    def fileno(self) -> int:
        return self.stream.fileno()


@contextlib.contextmanager
def tee(path: Path):
    """Copy stdout and stderr (warnings included) into `path` for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err
