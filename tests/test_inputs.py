"""Reliability item 6: a stage's inputs are checked on the driver, naming the file, the column and the shape."""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.train.inputs import check_sources
from test_train_helpers import write_latents


@pytest.fixture
def source(tmp_path):
    return write_latents(str(tmp_path / "good"), rows=24, files=3)


def _parts(uri: str) -> list[Path]:
    return sorted(Path(uri).glob("*.parquet"))


def test_good_sources_give_their_shapes(source):
    latent, caption = check_sources({"a": source}, 64)
    assert latent == (4, 16, 16) and len(caption) == 2


@pytest.mark.parametrize("damage", ["truncated", "zero_bytes"])
def test_unreadable_part_is_named(source, damage):
    last = _parts(source)[-1]  # not the first file: every file is checked, not only the one that sorts first
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(ValueError, match=rf"{last.name}.*not a readable Parquet file"):
        check_sources({"a": source}, 64)


@pytest.mark.parametrize("damage", ["truncated", "zero_bytes"])
def test_training_task_names_an_unreadable_part_before_ray(source, tmp_path, damage, monkeypatch):
    """Through the training task, as a flow calls it: the damaged file is named before anything else reads the
    footers (the mixture's row counts did, with pyarrow's raw "magic bytes" error), and before Ray is asked."""
    from flows.tasks import train_task
    from pipeline.train import stage
    from pipeline.core.plan import EncodersConfig, ModelSection, stage_config
    from test_train_helpers import tiny_stage

    last = _parts(source)[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    asked = []
    monkeypatch.setattr(stage, "connect", lambda *a, **k: asked.append(a))  # this worker may hold a Ray already
    with pytest.raises(ValueError, match=rf"{last.name}.*not a readable Parquet file"):
        train_task.fn(stage=stage_config(tiny_stage()), model=ModelSection(preset="MicroDiT_Debug"),
                      encoders=EncodersConfig(vae="standin", text="tiny"), root=str(tmp_path / "run"),
                      latents={"a": source}, code="test")
    assert asked == []


def test_part_of_another_shape_is_named(source, tmp_path):
    other = write_latents(str(tmp_path / "other"), rows=8, files=1, downsample=8)
    shutil.copy(_parts(other)[0], Path(source) / "part-99999.parquet")
    with pytest.raises(ValueError, match=r"part-99999.parquet.*'latents_64' has shape \(4, 8, 8\), expected "
                                         r"\(4, 16, 16\)"):
        check_sources({"a": source}, 64)


def test_part_without_the_resolution_is_named(source):
    with pytest.raises(ValueError, match=r"part-.*parquet.*latents_128"):
        check_sources({"a": source}, 128)


def test_extension_columns_are_refused_before_reading(source):
    """A column of an Arrow extension type (Ray's pickled objects among them) is refused from the schema alone."""
    class Opaque(pa.ExtensionType):
        def __init__(self):
            super().__init__(pa.binary(), "test.opaque")

        def __arrow_ext_serialize__(self):
            return b""

        @classmethod
        def __arrow_ext_deserialize__(cls, storage_type, serialized):
            return cls()

    pa.register_extension_type(Opaque())
    try:
        first = _parts(source)[0]
        table = pq.read_table(first)
        col = pa.ExtensionArray.from_storage(Opaque(), pa.array([b"x"] * len(table), pa.binary()))
        pq.write_table(table.append_column("payload", col), first)
        with pytest.raises(ValueError, match=r"column 'payload' has extension type 'test.opaque'"):
            check_sources({"a": source}, 64)
    finally:
        pa.unregister_extension_type("test.opaque")


def test_truncated_ray_checkpoint_snapshot_is_named(tmp_path):
    """A damaged checkpoint_manager_snapshot.json is named on the driver, not left to a raw Ray error."""
    from pipeline.core.plan import stage_config
    from pipeline.train.stage import resolve_init

    run = tmp_path / "train" / "s1"
    run.mkdir(parents=True)
    (run / "checkpoint_manager_snapshot.json").write_text('"{\\"latest_checkpoint_result\\": {\\"checkpoint_d')
    with pytest.raises(ValueError, match=r"checkpoint_manager_snapshot.json.*unreadable.*delete it"):
        resolve_init(str(tmp_path), stage_config({"name": "s1"}), {}, "microdit")
