"""Where the Hydra configs live: inside the installed wheel, or at the repository top level."""

from pathlib import Path


def config_dir() -> str:
    packaged = Path(__file__).parent / "conf"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[1] / "conf")
