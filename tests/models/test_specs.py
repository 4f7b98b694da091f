"""One definition per spec section (node_engine.specs): the API schemas restate it, the engine fills the
same defaults, families supply per-family defaults, and model families are found by registry."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from node_engine import specs
from node_engine.checkpoint import load_checkpoint, save_checkpoint
from node_engine.datasets import DATASETS
from node_engine.families import FAMILIES, family_for_dataset_name, get_family
from node_engine.inference import ClassifierModel, load_model
from node_engine.models import MODEL_TYPES
from node_engine.training import Trainer, build_trainer, normalize_spec
from service import schemas

PAIRS = [
    (schemas.SolverSpec, specs.SolverSection),
    (schemas.TrainingSpec, specs.TrainingSection),
    (schemas.DatasetSpec, specs.DatasetSection),
    (schemas.CNFModel, specs.CNFSection),
    (schemas.PlanarModel, specs.PlanarSection),
    (schemas.ODENetModel, specs.ODENetSection),
    (schemas.ResNetModel, specs.ResNetSection),
    (schemas.MLPModel, specs.MLPSection),
    (schemas.NODEModel, specs.NODESection),
    (schemas.LatentODEModel, specs.LatentODESection),
    (schemas.RNNModel, specs.RNNSection),
]


@pytest.mark.parametrize("model, section", PAIRS, ids=[p[1].__name__ for p in PAIRS])
def test_pydantic_schema_restates_the_section(model, section):
    api = set(model.model_fields) - {"type", "id", "name"}
    engine = {f.name for f in section.spec_fields()} - {"name"}
    assert api == engine
    props = model.model_json_schema()["properties"]
    for f in section.spec_fields():
        if f.name == "name":
            continue
        prop = props[f.name]
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        if not (model is schemas.TrainingSpec and f.name == "iterations"):  # null there: "iterations or epochs"
            assert prop.get("default") == default, f.name
        variants = prop.get("anyOf", [prop])
        typed = next(v for v in variants if v.get("type") != "null")
        if "items" in f.metadata:
            typed = typed["items"]
        for key, word in (("ge", "minimum"), ("le", "maximum"), ("gt", "exclusiveMinimum"), ("lt", "exclusiveMaximum")):
            bounds = f.metadata.get("items", {}) if "items" in f.metadata else f.metadata
            assert typed.get(word) == bounds.get(key), (f.name, key)
        if "choices" in f.metadata:
            assert set(typed["enum"]) == set(f.metadata["choices"])


def test_model_union_lists_the_registry_types():
    import typing

    classes = typing.get_args(typing.get_args(schemas.ModelSpec)[0])  # the discriminated union's members
    union = {t for cls in classes for t in cls.model_fields["type"].annotation.__args__}
    assert union == set(MODEL_TYPES) == set(specs.MODEL_SECTIONS)


@pytest.mark.parametrize("model, dataset, batch", [({"type": "mlp"}, "digits", 128), ({"type": "odenet"}, "digits", 128),
                                                    ({"type": "cnf"}, "moons", 512), ({"type": "planar"}, "u1", 512)])
def test_family_default_batch_size_in_api_and_engine(model, dataset, batch):
    job = schemas.JobCreate.model_validate({"model": model, "dataset": {"name": dataset}})
    api = job.model_dump(mode="json")
    assert api["training"]["batch_size"] == batch
    engine = normalize_spec({"model": model, "dataset": {"name": dataset}})
    assert engine["training"]["batch_size"] == batch
    # every default the API fills is the engine's: normalizing the API's spec changes nothing
    again = normalize_spec(api)
    for section in ("model", "solver", "training"):
        assert again[section] == engine[section]
    explicit = schemas.JobCreate.model_validate({"model": model, "dataset": {"name": dataset},
                                                 "training": {"batch_size": 7}})
    assert explicit.training.batch_size == 7


def test_mnist_without_files_is_refused_at_submission_naming_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.delenv("ODEFORGE_MNIST_DIR", raising=False)
    with pytest.raises(ValidationError) as info:
        schemas.JobCreate.model_validate({"model": {"type": "odenet"}, "dataset": {"name": "mnist"}})
    error = info.value.errors()[0]
    assert error["loc"][0] == "dataset" and "ODEFORGE_MNIST_DIR" in error["msg"]
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")
    monkeypatch.setenv("ODEFORGE_MNIST_DIR", str(tmp_path))
    with pytest.raises(ValidationError) as info:
        schemas.JobCreate.model_validate({"model": {"type": "odenet"}, "dataset": {"name": "mnist"}})
    msg = info.value.errors()[0]["msg"]
    lacking = msg.split("lacks ")[1].split(" (expected")[0]
    assert lacking == "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"


def test_section_bounds_are_enforced_by_the_engine_too():
    with pytest.raises(ValueError, match=r"solver.rtol must be > 0"):
        specs.SolverSection(rtol=0.0)
    with pytest.raises(ValueError, match=r"model.hidden_dims item 1 must be >= 1"):
        specs.CNFSection(hidden_dims=(8, 0))
    with pytest.raises(ValueError, match=r"unknown training option\(s\) \['learning_rate'\]"):
        specs.TrainingSection.from_spec({"learning_rate": 0.1})
    assert dataclasses.replace(specs.SolverSection(), method="rk4").solver_options(default_step=0.1) == {"step_size": 0.1}
    with pytest.raises(ValueError, match="step_size"):
        specs.SolverSection(method="rk4").solver_options()


def test_every_data_set_kind_and_model_type_has_a_family():
    for name, entry in DATASETS.items():
        assert family_for_dataset_name(name).name == entry.kind
    covered = {t for f in FAMILIES.values() for t in f.model_types}
    assert covered == set(MODEL_TYPES)
    assert get_family("classification") is FAMILIES["classifier"]  # the older spelling
    with pytest.raises(ValueError, match="unknown model family"):
        get_family("regression")


def test_checkpoint_with_the_old_family_name_loads_and_resumes():
    trainer = build_trainer({"model": {"type": "mlp", "hidden": 8}, "dataset": {"name": "digits", "n_samples": 200},
                             "training": {"iterations": 2, "eval_every": 100}})
    trainer.run()
    ckpt = load_checkpoint(trainer.checkpoint())
    ckpt.kind = "classification"  # how the registry used to name the family
    ckpt.dataset = {**ckpt.dataset, "kind": "classification"}
    old = save_checkpoint(ckpt)
    assert isinstance(load_model(old), ClassifierModel)
    resumed = Trainer.from_checkpoint(old)
    assert resumed.kind == "classifier" and resumed.step == 2


def test_a_new_family_is_one_class_and_one_registration(monkeypatch):
    # a family the trainer, checkpoints and inference have never heard of: regression of y = 2x on
    # points, with an mlp-free model (a planar flow's generate as the regressor)
    import torch

    from node_engine.datasets import DatasetEntry, DensityData, Standardization
    from node_engine.families import Family

    class Regression(Family):
        name = "regression"
        model_input = "points"
        default_batch_size = 16
        serves = ("predict_points",)
        train_metrics = ("mse",)
        eval_metrics = ("test_mse",)

        def data_info(self, data):
            return {"dim": data.dim}

        def train_tensors(self, data):
            return (data.train,)

        def loss(self, model, data, batch, size, generator):
            mse = ((model.generate(batch[0]) - 2 * batch[0]) ** 2).mean()
            return mse, {"mse": mse.item()}

        def evaluate(self, model, data, *, batch_size, device, generator):
            return {"test_mse": float(((model.generate(data.test) - 2 * data.test) ** 2).mean()), "nfe_forward": 0}

        def served(self, model, info, *, spec, step, metrics, device):
            return model

    def load(spec):
        x = torch.linspace(-1, 1, 40).reshape(20, 2)
        return DensityData("lines", x[:16], x[16:], Standardization.identity(2))

    monkeypatch.setitem(FAMILIES, "regression", Regression())  # the one registration line
    monkeypatch.setitem(DATASETS, "lines", DatasetEntry("lines", "regression", "y = 2x", load))
    trainer = build_trainer({"model": {"type": "planar", "num_layers": 2}, "dataset": {"name": "lines"},
                             "training": {"iterations": 30, "lr": 0.05, "eval_every": 30}})
    assert trainer.batch_size == 16 and trainer.kind == "regression"
    first = trainer.evaluate()["test_mse"]
    out = trainer.run()
    assert out["test_mse"] < first and "mse" in out
    served = load_model(trainer.checkpoint())
    assert served.generate(torch.zeros(1, 2, dtype=torch.float64)).shape == (1, 2)
    assert load_checkpoint(trainer.checkpoint()).kind == "regression"


def test_older_classifier_checkpoints_keep_their_group_norm_grouping():
    # checkpoints written before the grouping fix (no min_channels_per_group in their data info) were
    # built with the paper's min(32, C) groups: they must load with that grouping, not today's
    from torch import nn

    trainer = build_trainer({"model": {"type": "odenet", "channels": 8}, "dataset": {"name": "digits", "n_samples": 200},
                             "training": {"iterations": 1, "eval_every": 100}})
    trainer.run()
    new = trainer.checkpoint()
    ckpt = load_checkpoint(new)
    ckpt.dataset = {k: v for k, v in ckpt.dataset.items() if k != "min_channels_per_group"}
    old = save_checkpoint(ckpt)

    def groups(data):
        return {m.num_groups for m in load_model(data).model.modules() if isinstance(m, nn.GroupNorm)}

    assert groups(new) == {4} and groups(old) == {8}
    resumed = Trainer.from_checkpoint(old)
    assert {m.num_groups for m in resumed.model.modules() if isinstance(m, nn.GroupNorm)} == {8}
    assert load_checkpoint(resumed.checkpoint()).dataset["min_channels_per_group"] == 1  # and stays so


@pytest.mark.parametrize("model_type", ["odenet", "rknet", "resnet"])
def test_one_channel_classifiers_are_refused_with_the_reason(model_type):
    # one channel is one channel per GroupNorm group: the block's output stops depending on the input
    with pytest.raises(ValidationError) as info:
        schemas.JobCreate.model_validate({"model": {"type": model_type, "channels": 1}, "dataset": {"name": "digits"}})
    error = info.value.errors()[0]
    assert "channels" in error["loc"] and "2" in error["msg"]
    schemas.JobCreate.model_validate({"model": {"type": model_type, "channels": 2}, "dataset": {"name": "digits"}})


def test_sections_coerce_and_refuse_types_where_the_default_is_none_too():
    # through Python (the CLI, a resumed checkpoint), not only through the pydantic schema
    assert specs.SolverSection.from_spec({"step_size": "0.25", "method": "rk4"}).step_size == 0.25
    assert specs.TrainingSection.from_spec({"batch_size": 64.0}).batch_size == 64
    with pytest.raises(ValueError, match=r"solver.step_size: could not convert"):
        specs.SolverSection.from_spec({"step_size": "abc"})
    with pytest.raises(ValueError, match=r"training.epochs: must be a whole number"):
        specs.TrainingSection.from_spec({"epochs": 2.5})
    with pytest.raises(ValueError, match=r"solver.adjoint: must be true or false"):
        specs.SolverSection.from_spec({"adjoint": "false"})
